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

Double quantization (bnb `compress_statistics=True`) stores absmax itself as uint8 codes of an 8-bit
dynamic map with one fp32 scale per 256 blocks and a mean offset; `dequantize_absmax` undoes it.
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
    scaled = padded / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    levels = nf4_levels(weight.device)
    midpoints = (levels[1:] + levels[:-1]) / 2
    codes = torch.bucketize(scaled.reshape(-1)[:n], midpoints).to(torch.uint8)
    if n % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])  # the level 0.0, as bitsandbytes pads
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def nf4_unpack(packed, numel):
    """The 4-bit codes (uint8 [numel]) of `packed`, element 2i from the high nibble."""
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)
    return codes[:numel]


def nf4_dequantize(packed, absmax, shape, blocksize=64, dtype=torch.float32):
    """The weight of `shape` from its NF4 codes and per-block absmax: level[code] · absmax[i // blocksize],
    computed in fp32 and returned in `dtype`."""
    numel = 1
    for s in shape:
        numel *= int(s)
    codes = nf4_unpack(packed.reshape(-1), numel).long()
    scale = absmax.reshape(-1).to(torch.float32).repeat_interleave(blocksize)[:numel]
    return (nf4_levels(packed.device)[codes] * scale).reshape(tuple(shape)).to(dtype)


def dequantize_absmax(codes, code_map, scales, offset, blocksize2=256):
    """Double quantization's absmax (fp32 [n]): code_map[codes[i]] · scales[i // blocksize2] + offset."""
    vals = code_map.to(torch.float32)[codes.reshape(-1).long()]
    scale = scales.reshape(-1).to(torch.float32).repeat_interleave(blocksize2)[:vals.numel()]
    return vals * scale + float(offset)
