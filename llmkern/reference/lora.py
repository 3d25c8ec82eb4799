"""Reference of llmkern.lora_linear / lora_linear_multi: plain PyTorch, differentiable.

    y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ          (PEFT shapes: W [out, in], A [r, in], B [out, r])

Dropout keeps x[row, col] when hash(seed, row, col) >> 8 >= round(p · 2^24) and scales kept values
by 1/(1-p): the same mask the Triton kernels regenerate from the seed (rows index the flattened
[M, in] view of x). Computes in the dtype of its inputs (pass float64 copies for an oracle).
"""
import torch
import torch.nn.functional as F

_M32 = 0xFFFFFFFF


def _mul32(a, c):
    """(a * c) mod 2^32 for int64 tensors a in [0, 2^32) and a constant c < 2^32 (no overflow)."""
    return ((a & 0xFFFF) * c + ((((a >> 16) * c) & 0xFFFF) << 16)) & _M32


def _fmix32(h):
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def seed_words(seed):
    """An int seed (its low 64 bits) as the (seed0, seed1) words of the kernels' int32 [2] seed
    tensor (signed int32 values)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return tuple(w - (1 << 32) if w >= 1 << 31 else w for w in (seed & _M32, seed >> 32))


def seed_words_tensor(seed, device):
    """seed_words(seed) as the kernels' int32 [2] seed tensor on `device`, filled there: torch.tensor(...,
    device=) copies from host memory, which on CUDA waits for the device's queued work (a host sync per call)."""
    w0, w1 = seed_words(seed)
    t = torch.full((2,), w1, dtype=torch.int32, device=device)
    t[:1].fill_(w0)
    return t


def dropout_params(p, seed):
    """(seed0, seed1, threshold). `seed`: an int, or an int32 [2] tensor holding (seed0, seed1)."""
    thr = int(round(float(p) * (1 << 24)))
    if isinstance(seed, torch.Tensor):
        w = seed.reshape(-1).to(torch.int64) & 0xFFFFFFFF
        return w[0], w[1], thr
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed & _M32, seed >> 32, thr


def seed_keys(s0, s1):
    """(k0, k1): the dropout hash's two keys from the seed words (the kernels' _common.seed_keys)."""
    k0 = _fmix32(s0 ^ _fmix32(s1 ^ 0x68E31DA4))
    return k0, _fmix32(k0 ^ 0x1B873593)


def dropout_keep_mask(M, K, p, seed, device=None):
    """Bool [M, K]: which elements of the flattened x the fused LoRA dropout keeps.

    seed: an int (its low 64 bits, split into two 32-bit words) or an int32 [2] tensor of the words.
    Under torch.compile a tensor seed goes through the opaque custom op `llmkern::lora_dropout_keep_mask`:
    inlined, Inductor's lowering walked the hash's integer expression tree (each word read several times
    per step, keys derived from the tensor) without bound, so compiling lora_linear's reference path or
    dora_linear with dropout ran for many minutes."""
    if isinstance(seed, torch.Tensor) and torch.compiler.is_compiling():
        return _keep_mask_op(seed.to(device), M, K, float(p))
    return _keep_mask(M, K, p, seed, device)


def _keep_mask(M, K, p, seed, device):
    s0, s1, thr = dropout_params(p, seed)
    if isinstance(s0, torch.Tensor):
        s0, s1 = s0.to(device), s1.to(device)
    rows = torch.arange(M, device=device, dtype=torch.int64)
    cols = torch.arange(K, device=device, dtype=torch.int64)
    k0, k1 = seed_keys(s0, s1)
    hr = _fmix32(rows ^ k0)
    hc = (_mul32(cols, 0x9E3779B1) + k1) & _M32
    h = _fmix32(hr[:, None] ^ hc[None, :])
    return (h >> 8) >= thr


@torch.library.custom_op("llmkern::lora_dropout_keep_mask", mutates_args=())
def _keep_mask_op(seed: torch.Tensor, M: int, K: int, p: float) -> torch.Tensor:
    return _keep_mask(M, K, p, seed, seed.device)


@_keep_mask_op.register_fake
def _(seed, M, K, p):
    return seed.new_empty((M, K), dtype=torch.bool)


def lora_dropout(x, p, seed):
    """dropout(x) with the fused kernels' mask; x [..., K]."""
    if p == 0:
        return x
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    keep = dropout_keep_mask(M, K, p, seed, x.device).reshape(x.shape)
    return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros_like(x))


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=0):
    """y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ."""
    return F.linear(x, weight, bias) + lora_delta(x, lora_A, lora_B, scaling, dropout_p, seed)


def lora_delta(x, lora_A, lora_B, scaling, dropout_p=0.0, seed=0):
    """The low-rank term alone: scaling · (dropout(x) Aᵀ) Bᵀ."""
    xd = lora_dropout(x, dropout_p, seed)
    return scaling * F.linear(F.linear(xd, lora_A), lora_B)


def lora_linear_multi(x, weight, bias, lora_A, lora_B, scalings, adapter_ids):
    """Per-token adapters: row m of x[..., in] (flattened) uses adapter adapter_ids[m]; -1 = none.

    lora_A [n, r, in], lora_B [n, out, r], scalings [n], adapter_ids [M]."""
    shape = x.shape
    y = F.linear(x.reshape(-1, shape[-1]), weight, bias)
    return add_lora_multi(y, x, lora_A, lora_B, scalings, adapter_ids).reshape(*shape[:-1], weight.shape[0])


def add_lora_multi(y, x, lora_A, lora_B, scalings, adapter_ids):
    """y [M, out] (the base output of the flattened x) plus each row's adapter update."""
    x2 = x.reshape(-1, x.shape[-1])
    ids = adapter_ids.reshape(-1).to(x2.device)
    for a in range(lora_A.shape[0]):
        s = scalings[a].to(x2.dtype) if torch.is_tensor(scalings) else scalings[a]
        # no data-dependent shapes in a graph, nor for meta / fake tensors (nonzero raised): all rows, masked
        if torch.compiler.is_compiling() or x2.is_meta or torch._subclasses.fake_tensor.is_fake(x2):
            sel = (ids == a)[:, None]
            upd = s * F.linear(F.linear(torch.where(sel, x2, 0), lora_A[a]), lora_B[a])
            y = y + torch.where(sel, upd.to(y.dtype), 0)
            continue
        idx = (ids == a).nonzero().squeeze(1)
        # (an adapter without rows still enters the graph, through an empty product: its gradient is zeros, not
        # None, as on the kernel path; autograd.grad would otherwise raise "not used in the graph")
        upd = s * F.linear(F.linear(x2.index_select(0, idx), lora_A[a]), lora_B[a])
        y = y.index_add(0, idx, upd.to(y.dtype))
    return y
