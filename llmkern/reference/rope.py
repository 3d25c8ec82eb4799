"""Reference of llmkern.rope: plain PyTorch, differentiable (cos and sin included); the test oracle and
the CPU path.

    rope(q, k, cos, sin, interleaved=False) = (rotate(q), rotate(k)), each
    rotate(x)[..., :R] = x[..., :R] * cos + rot(x[..., :R]) * sin      (R = cos.shape[-1] <= D)
    rotate(x)[..., R:] = x[..., R:]                                     (partial rotary: passed through)

rot is ``rotate_half`` (GPT-NeoX / Llama / transformers: the channel pairs are (i, i + R/2)) or, with
interleaved=True, ``rotate_every_two`` (GPT-J / Meta's original Llama: the pairs are (2i, 2i + 1)).
cos / sin have the layout that multiplies x channel by channel in that formula: [T, R], [B, T, R] or
[B, 1, T, R], with cos[..., j] the cosine of channel j's angle. transformers' position_embeddings
(cos = cat(freqs, freqs).cos()) are the non-interleaved layout; the interleaved one repeats each
angle twice in a row (cos = freqs.repeat_interleave(2, -1).cos(), as GPT-J's apply_rotary_pos_emb
does). The formula is applied channel by channel as written, so cos / sin that do not have the
duplicated structure still get exactly this map (and its exact transpose in the backward).

Computed in float32 (float64 when q is float64; cos / sin of any float dtype are converted) and
returned in q's / k's dtype: one rounding, where transformers' ``(q * cos) + (rotate_half(q) * sin)``
in bfloat16 rounds three times. Not exported from llmkern.reference (the name is this module's):
use ``llmkern.reference.rope.rope``.
"""
import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[-x2, x1] for x = [x1, x2] split in halves of the last dimension (transformers' rotate_half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(-x[2i+1], x[2i]) at channels (2i, 2i+1) (GPT-J's rotate_every_two)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def cos_sin_4d(t: torch.Tensor) -> torch.Tensor:
    """cos / sin as [1 or B, 1, T, R], broadcasting over the heads of a [B, H, T, D] tensor."""
    if t.dim() == 2:
        return t[None, None]
    if t.dim() == 3:
        return t[:, None]
    return t


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """One of the two outputs of rope(): x [B, H, T, D], cos / sin as for rope()."""
    R = cos.shape[-1]
    dt = _compute_dtype(x)
    c, s = cos_sin_4d(cos).to(dt), cos_sin_4d(sin).to(dt)
    xr = x[..., :R].to(dt)
    rot = rotate_every_two if interleaved else rotate_half
    out = xr * c + rot(xr) * s
    if R < x.shape[-1]:  # (into x's layout, as the kernel writes: a cat would give a contiguous tensor)
        full = torch.empty_like(x)
        full[..., :R] = out
        full[..., R:] = x[..., R:]
        return full
    return out.to(x.dtype)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
         interleaved: bool = False):
    """(q_out, k_out): see the module docstring."""
    return rotate(q, cos, sin, interleaved), rotate(k, cos, sin, interleaved)


def cos_sin_grad(dq, dk, q, k, cos, sin, interleaved=False, transpose=False):
    """(dcos, dsin) of the kernels' map (float32; cos's / sin's shape and dtype), summed over heads
    (and over the batch when cos / sin have none): the Triton path's backward for cos / sin, which
    are rarely trained (transformers never does), so plain PyTorch is fast enough.

    transpose=False: the map is y = x * cos + rot(x) * sin, so dcos = g * x, dsin = g * rot(x).
    transpose=True (the map of the backward, x -> x * cos - rot(x * sin); rot^T = -rot):
    dcos = g * x, dsin = x * rot(g)."""
    R = cos.shape[-1]
    rot = rotate_every_two if interleaved else rotate_half
    dt = _compute_dtype(q)
    dcos = dsin = 0
    for g, x in ((dq, q), (dk, k)):
        g, x = g[..., :R].to(dt), x[..., :R].to(dt)
        dcos = dcos + (g * x).sum(1)                                      # [B, T, R]
        dsin = dsin + ((x * rot(g)) if transpose else (g * rot(x))).sum(1)
    return _like(dcos, cos), _like(dsin, sin)


def _like(g, t):
    """A [B, T, R] gradient reduced to t's shape ([T, R], [1, T, R], [B, 1, T, R], ...)."""
    if t.dim() == 2:
        g = g.sum(0)
    elif t.shape[0] == 1 and g.shape[0] != 1:
        g = g.sum(0, keepdim=True)
    return g.reshape(t.shape).to(t.dtype)
