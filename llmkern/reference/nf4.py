"""NF4 (4-bit NormalFloat, QLoRA: Dettmers et al. 2023) quantization in plain PyTorch: the oracle of the
Triton dequantization in llmkern/kernels/nf4.py and the CPU path of llmkern.ops.nf4.

Layout (the bitsandbytes layout, so a bnb `Params4bit` weight is read as it is stored):
- the weight [N, K] is flattened in row-major order and cut into blocks of `blocksize` consecutive
  elements (the last block may be short; blocks may span rows when K is not a multiple of it);
- each block stores absmax = max |w| over the block (fp32), and each element the index of the NF4 level
  nearest to w / absmax;
- two indices per byte: element 2i in the high nibble, element 2i+1 in the low one (an odd count pads
  the last low nibble with code 7, the level 0.0, as bnb does). packed is uint8 [ceil(N·K / 2)].

The 16 levels are the quantiles of N(0, 1) that the QLoRA paper defines (8 positive, 7 negative, and 0),
normalised to [-1, 1]; below are their float32 values as bitsandbytes stores them (they differ from a
float64 recomputation by at most 1.2e-7, so they are data here, not recomputed).

Double quantization (QLoRA's, bnb `compress_statistics=True`) stores absmax itself in 8 bits: the mean
`offset` is subtracted, each group of 256 absmax values is scaled by its own max |.| (absmax2, fp32), and
each value becomes the index of the nearest entry of the signed 8-bit dynamic map (`dynamic_map`): 0.127
bits per weight for the scales instead of 0.5 at blocksize 64. `dequantize_absmax` undoes it.
bitsandbytes' own quantizer picks a neighbouring entry for a few values near a midpoint; the codes here are
the nearest ones, and the decoding is the same.
"""
import torch

NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
              0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)


def nf4_levels(device=None):
    """The 16 NF4 levels, fp32 [16], ascending (index = the 4-bit code)."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def level_pairs(device=None):
    """The kernels' level table (llmkern/kernels/nf4.py): int64 [256], entry b holds the fp32 bits of
    levels[b >> 4] (the byte's first element) in its low word and of levels[b & 15] in its high word, so
    one gather dequantizes both elements of a packed byte."""
    bits = nf4_levels().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    b = torch.arange(256)
    return (bits[b >> 4] | (bits[b & 15] << 32)).to(device)


def nf4_quantize(weight, blocksize=64):
    """(packed uint8 [ceil(numel / 2)], absmax fp32 [ceil(numel / blocksize)]) of `weight` (any shape,
    flattened row-major). Each element takes the nearest level (ties to the lower one); an all-zero block
    has absmax 0 and dequantizes to zeros."""
    flat = weight.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    scaled = _scaled(padded, absmax)
    levels = nf4_levels(weight.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize(scaled.reshape(-1)[:n], midpoints).to(torch.uint8)
    if n % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])  # the level 0.0, as bitsandbytes pads
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def _scaled(blocks, absmax):
    """blocks [n, bs] / absmax [n] (0 for an all-zero block: left as it is). Times the reciprocal, as bitsandbytes
    scales (a division differs by an ulp now and then, which moves an element lying on a midpoint between two
    levels to the other one), except where the reciprocal overflows (absmax below ~2.9e-39: every element would
    be ±inf and the zeros NaN), which divide."""
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    inv = 1.0 / safe
    return torch.where(torch.isinf(inv)[:, None], blocks / safe[:, None], blocks * inv[:, None])


def nf4_unpack(packed, numel):
    """The 4-bit codes (uint8 [numel]) of `packed`, element 2i from the high nibble."""
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)
    return codes[:numel]


def nf4_dequantize(packed, absmax, shape, blocksize=64, dtype=torch.float32):
    """The weight of `shape` from its NF4 codes and per-block absmax: level[code] · absmax[i // blocksize],
    computed in fp32 and returned in `dtype`. (One gather of both levels per byte from a [256, 2] table and
    one multiply by the block scales: the CPU path of every NF4 op runs this, forward and backward.)"""
    numel = 1
    for s in shape:
        numel *= int(s)
    b = torch.arange(256, device=packed.device)
    levels = nf4_levels(packed.device)
    pair_table = torch.stack([levels[b >> 4], levels[b & 15]], dim=1)  # [256, 2]: byte -> its two values
    vals = pair_table[packed.reshape(-1).long()].reshape(-1)
    nblocks = absmax.numel()
    vals = torch.nn.functional.pad(vals, (0, max(0, nblocks * blocksize - vals.numel())))[:nblocks * blocksize]
    out = vals.view(nblocks, blocksize) * absmax.reshape(-1, 1).to(torch.float32)
    return out.reshape(-1)[:numel].reshape(tuple(shape)).to(dtype)


BLOCKSIZE2 = 256  # absmax values per second-level scale (bitsandbytes' fixed choice)


def dynamic_map():
    """The signed 8-bit dynamic map of double quantization, fp32 [256] ascending: for i = 0..6 the
    midpoints of 2^i equal steps of [0.1, 1] scaled by 10^(i-6), both signs, plus 0 and 1 (a float
    with a 7-level decimal exponent and a fraction of i bits; Dettmers 2015). Computed in float32, which
    gives bitsandbytes' create_dynamic_map() bit for bit."""
    vals = []
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2 ** i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)
        vals += mids.tolist() + (-mids).tolist()
    return torch.tensor(sorted(vals + [0.0, 1.0]), dtype=torch.float32)


def quantize_absmax(absmax, blocksize2=BLOCKSIZE2):
    """(codes uint8 [n], code_map fp32 [256], absmax2 fp32 [ceil(n / blocksize2)], offset fp32 [])) of
    fp32 block scales: double quantization, the nearest map entry of (absmax - mean) / absmax2."""
    # bitsandbytes' float32 mean; its sum overflows for scales near float32's top (then float64's, rounded)
    offset = absmax.mean()
    offset = torch.where(torch.isfinite(offset), offset, absmax.double().mean().float())
    centred = absmax - offset
    n = centred.numel()
    groups = -(-n // blocksize2)
    padded = torch.nn.functional.pad(centred, (0, groups * blocksize2 - n)).view(groups, blocksize2)
    absmax2 = padded.abs().amax(dim=1)
    scaled = _scaled(padded, absmax2)
    code_map = dynamic_map().to(absmax.device)
    codes = torch.bucketize(scaled.reshape(-1)[:n], (code_map[1:] + code_map[:-1]) / 2).to(torch.uint8)
    return codes, code_map, absmax2, offset


def block_scales(absmax, state2=None):
    """fp32 absmax [n] from what the kernels take: absmax itself, or (double quantization) its uint8 codes
    and state2 = [code_map (256) | offset (1) | absmax2], llmkern.NF4Weight's layout."""
    if state2 is None:
        return absmax
    return dequantize_absmax(absmax, state2[:256], state2[257:], state2[256])


def dequantize_absmax(codes, code_map, scales, offset, blocksize2=BLOCKSIZE2):
    """Double quantization's absmax (fp32 [n]): code_map[codes[i]] · scales[i // blocksize2] + offset."""
    vals = code_map.to(torch.float32)[codes.reshape(-1).long()]
    scale = scales.reshape(-1).to(torch.float32).repeat_interleave(blocksize2)[:vals.numel()]
    # (offset may be a 0-d device tensor: added as a tensor, never read on the host)
    return vals * scale + torch.as_tensor(offset, dtype=torch.float32, device=vals.device)
