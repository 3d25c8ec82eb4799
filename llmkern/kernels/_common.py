"""Small pieces the Triton kernel files share."""
import contextlib
import functools

import torch
import triton
import triton.language as tl

from llmkern._backend import triton_interpreting as interpreting  # noqa: F401 (TRITON_INTERPRET=1)


def on_device(*args):
    """The device to launch on: Triton runs a kernel on the *current* CUDA device and its current stream, not on
    its arguments' device, so tensors on cuda:1 while device 0 is current (model.to("cuda:1"), transformers'
    device_map="auto") would be read from device 0, unordered with cuda:1's stream (or refused without peer
    access). Returns a context entering the first tensor argument's device when it is another one."""
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.is_cuda and a.device.index != torch.cuda.current_device():
                return torch.cuda.device(a.device.index)
            break
    return contextlib.nullcontext()


def launches_on_device(fn):
    """Decorator: run a launcher on its first tensor argument's CUDA device (see on_device)."""
    @functools.wraps(fn)
    def launcher(*args, **kwargs):
        with on_device(*args, *kwargs.values()):
            return fn(*args, **kwargs)
    return launcher


def cdiv(a, b):
    """ceil(a / b) for host-side ints. triton.cdiv does the same, but in Triton 3.8 (not 3.6) it is a
    constexpr function whose wrapper cost about 5 µs per call on the CI machine (cProfile), in the
    launchers' hot path."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two >= n (1 for n <= 1), host side (see cdiv for why not Triton's)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@triton.jit
def tanh(x):
    """tanh (tl has none on every Triton version we support) with a small relative error everywhere
    (< 1e-6 in float32). The sigmoid form 2 * sigmoid(2x) - 1 alone cancels near 0 (absolute error
    ~1e-7), and a softcap (softcap * tanh(s / softcap), attention and cross-entropy) multiplies that
    by softcap: with softcap = 1e6 the scores lost every digit. |x| < 1/8 takes the odd series
    x - x^3/3 + 2x^5/15 - 17x^7/315 instead."""
    x2 = x * x
    series = x + x * x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * -0.05396825396825397))
    return tl.where(x2 < 0.015625, series, 2.0 * tl.sigmoid(2.0 * x) - 1.0)


def dropout_params(p):
    """(threshold, inv_keep) of a hashed dropout mask: keep when hash >> 8 >= threshold; kept values
    scaled by inv_keep (LoRA and attention)."""
    threshold = int(round(float(p) * (1 << 24)))
    inv_keep = 1.0 / (1.0 - float(p)) if p < 1 else 0.0
    return threshold, inv_keep


@triton.jit
def seed_keys(SEED):
    """(k0, k1): the two 32-bit keys of the dropout hash, from the int32 [2] seed words at SEED (read on
    the device: no host value). Both depend on both words (with a column key from one word alone,
    seeds differing only in the other gave row permutations of one mask).
    llmkern/reference/lora.py's seed_keys computes the same."""
    seed0 = tl.load(SEED).to(tl.uint32)
    seed1 = tl.load(SEED + 1).to(tl.uint32)
    k0 = fmix32(seed0 ^ fmix32(seed1 ^ 0x68E31DA4))
    return k0, fmix32(k0 ^ 0x1B873593)


@triton.jit
def fmix32(h):
    """murmur3's 32-bit finaliser on uint32 values: the dropout masks' hash (LoRA, attention);
    llmkern/reference/lora.py reproduces it bit for bit in int64 arithmetic."""
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    h = h ^ (h >> 16)
    return h


@triton.jit
def split_rows(start, end, split, s, BLOCK_M: tl.constexpr):
    """(lo, hi): piece s of `split` of the rows [start, end), in whole BLOCK_M tiles: the row range one
    program of a split reduction (sum over rows, the pieces added afterwards in a fixed order) covers."""
    chunk = tl.cdiv(tl.cdiv(end - start, split), BLOCK_M) * BLOCK_M
    lo = start + s * chunk
    return lo, tl.minimum(lo + chunk, end)


def sort_segments(ids, n):
    """(sorted ids, order, seg), all int32, on the device with no host sync: ids (any shape, flattened)
    sorted stably (equal ids keep their order: deterministic sums), order[i] the position of the i-th sorted
    id, and seg [n + 1] where each value 0..n-1 starts in the sorted order (values outside [0, n) sort before
    seg[0] or after seg[n]). Multi-adapter LoRA's rows by adapter, MoE's (token, slot) pairs by expert."""
    sorted_ids, order = torch.sort(ids.reshape(-1).to(torch.int32), stable=True)
    bounds = torch.arange(n + 1, device=sorted_ids.device, dtype=torch.int32)
    return sorted_ids, order.to(torch.int32), torch.searchsorted(sorted_ids, bounds, out_int32=True)


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device):
    """Streaming multiprocessors of a CUDA device (cached per device; an index-less device is the current one)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def mma_precision(dtype):
    """tl.dot's input_precision for `dtype`: float32 inputs keep full precision unless torch allows TF32
    matmuls (torch.backends.cuda.matmul.allow_tf32), as cuBLAS does for them; 16-bit inputs are exact."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
