"""Fused RMSNorm and LayerNorm (with the pre-norm residual add): public API, validation,
registration, dispatch, autograd.

    rms_norm(x, weight, eps=1e-6, *, residual=None, offset=0.0, return_residual=False)
      == x / sqrt(mean(x^2, -1) + eps) * (offset + weight)          (LlamaRMSNorm; offset=1: Gemma's)
    layer_norm(x, weight, bias, eps=1e-5, *, residual=None, return_residual=False)
      == F.layer_norm(x, [N], weight, bias, eps)

With `residual`, the input is s = x + residual (added in float32, stored in x's dtype), and
return_residual=True also returns s, the next block's residual: `h = h + attn_out; x = norm(h)` in
one kernel that reads two tensors and writes two.

Kernels: llmkern/kernels/norm.py (one row per program, or a few for small hidden sizes; the whole
row in registers; the forward saves float32 rstd (and mean) per row; the backward writes dx row by
row and dweight/dbias as per-program float32 partial sums reduced by torch.sum, deterministic);
reference: llmkern/reference/norm.py. The Triton path runs inside the torch.library custom ops
`llmkern::rms_norm_fwd` / `_bwd` and `llmkern::layer_norm_fwd` / `_bwd` (autograd registered on the
forwards), so the ops trace under torch.compile(fullgraph=True) and pass `opcheck`; eager calls run
the autograd.Function twins (same kernels, no torch.library dispatch, see _checks.eager_fast_path).

Dispatch: CUDA tensors run the Triton kernels (float32, float16, bfloat16; hidden size up to 65536).
CPU tensors run the reference unless LLMKERN_BACKEND=triton, which runs the same kernels under
TRITON_INTERPRET=1 (float32/float16). float64 always uses the reference.

Rounding (see llmkern/reference/norm.py, which the kernels follow): rms_norm with a weight and
offset 0 rounds the normalised value to x's dtype before multiplying by the weight, as
transformers' LlamaRMSNorm and the zoo's RMSNorm do; with an offset (Gemma) or without a weight
there is one rounding at the end, as GemmaRMSNorm / Gemma3RMSNorm do. In float32 both are one
rounding; in bf16 they differ by at most about one bf16 ulp of y.
"""
import functools
from typing import Optional, Tuple

import torch

from llmkern import _backend
from llmkern.ops import _checks
from llmkern.reference import norm as ref

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPES = _KERNEL_DTYPES + (torch.float64,)


# ---- dispatch -----------------------------------------------------------------------------------

def _backend_for(device, dtype=torch.float32, op_name="rms_norm"):
    return _backend.choose_triton(op_name, device, dtype, _KERNEL_DTYPES)


_backend.register_op("rms_norm", lambda device, dtype: _backend_for(device, dtype, "rms_norm"))
_backend.register_op("layer_norm", lambda device, dtype: _backend_for(device, dtype, "layer_norm"))


# ---- validation ---------------------------------------------------------------------------------

_tensor = _checks.tensor_arg


def _check(x, params, residual, eps, return_residual):
    """params: ((name, tensor or None), ...) of the [N] affine parameters. Returns (eps, return_residual) as
    float and bool."""
    _tensor("x", x)
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16 (float64: reference only), got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape [..., N] with N >= 1, got {tuple(x.shape)}")
    N = x.shape[-1]
    for name, t in params:
        if t is None:
            continue
        _tensor(name, t)
        if tuple(t.shape) != (N,):
            raise ValueError(f"{name} must have shape [{N}] (x's last dim), got {tuple(t.shape)}")
        if t.dtype not in (x.dtype, torch.float32):
            want = "torch.float32 (x's dtype)" if x.dtype == torch.float32 else f"{x.dtype} (x's dtype) or float32"
            raise ValueError(f"{name} must be {want}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if residual is not None:
        _tensor("residual", residual)
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual must have x's shape, dtype and device {tuple(x.shape)} {x.dtype} "
                             f"{x.device}, got {tuple(residual.shape)} {residual.dtype} {residual.device}")
    return_residual = _checks.bool_arg("return_residual", return_residual, ints=False)  # (as attention's flags)
    if return_residual and residual is None:
        raise ValueError("return_residual=True needs a residual (it returns x + residual)")
    return _real("eps", eps, positive=True, dtype=x.dtype), return_residual


def _real(name, v, positive=False, dtype=torch.float64):
    """real_arg's float (> 0 when `positive`); for inputs other than float64, whose statistics are float32, also a
    float32 value: eps = 1e-50 rounded to 0 (0 / 0 = NaN on a row of zeros), eps or offset = 1e39 to inf."""
    return _checks.real_arg(name, v, positive=positive, float32=dtype != torch.float64,
                            why=f" for {dtype} x (the statistics are float32)")


def _use_triton(x, op_name):
    """Whether x goes to the Triton kernels; they hold a row in registers, up to MAX_N columns."""
    if _backend_for(x.device, x.dtype, op_name) != "triton":
        return False
    from llmkern.kernels.norm import MAX_N

    if x.shape[-1] > MAX_N:
        raise ValueError(f"llmkern.{op_name}: x's last dim must be <= {MAX_N} for the Triton kernels, got "
                         f"{x.shape[-1]}")
    return x.numel() > 0


# ---- torch.library ops (the Triton path) --------------------------------------------------------

def _kern():
    from llmkern.kernels import norm as kern

    return kern


@torch.library.custom_op("llmkern::rms_norm_fwd", mutates_args=())
def _rms_fwd_op(x: torch.Tensor, weight: Optional[torch.Tensor], residual: Optional[torch.Tensor], eps: float,
                offset: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual [..., N] (M rows); weight [N]. Returns (y, x's shape; s = x + residual, x's shape,
    or empty without a residual; rstd float32 [M])."""
    return _rms_fwd_impl(x, weight, residual, eps, offset)


def _rms_fwd_impl(x, weight, residual, eps, offset):
    y, s, _, rstd = _kern().norm_forward(x, weight, None, residual, eps, rms=True, offset=offset)
    return y, s, rstd


@_rms_fwd_op.register_fake
def _(x, weight, residual, eps, offset):
    return x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else 0), _row_stat(x)


def _row_stat(x):
    """The fake of a float32 per-row statistic."""
    return x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@torch.library.custom_op("llmkern::rms_norm_bwd", mutates_args=())
def _rms_bwd_op(dy: torch.Tensor, ds: Optional[torch.Tensor], x: torch.Tensor, weight: Optional[torch.Tensor],
                rstd: torch.Tensor, offset: float, need_dw: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dx in x's shape and dtype, dweight float32 [N] or empty); x is the normalised input."""
    return _rms_bwd_impl(dy, ds, x, weight, rstd, offset, need_dw)


def _rms_bwd_impl(dy, ds, x, weight, rstd, offset, need_dw):
    dx, dw, _ = _kern().norm_backward(dy, ds, x, weight, None, rstd, rms=True, offset=offset, need_dw=need_dw)
    return dx, dw


@_rms_bwd_op.register_fake
def _(dy, ds, x, weight, rstd, offset, need_dw):
    return x.new_empty(x.shape), _stat_vec(x, need_dw and weight is not None)


def _stat_vec(x, need):
    """The fake of a float32 [N] gradient partial sum (empty when not computed)."""
    return x.new_empty(x.shape[-1] if need else 0, dtype=torch.float32)


@torch.library.custom_op("llmkern::layer_norm_fwd", mutates_args=())
def _ln_fwd_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               residual: Optional[torch.Tensor], eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
    """(y; s or empty; mean, rstd float32 [M]), as rms_norm_fwd."""
    return _ln_fwd_impl(x, weight, bias, residual, eps)


def _ln_fwd_impl(x, weight, bias, residual, eps):
    return _kern().norm_forward(x, weight, bias, residual, eps, rms=False)


@_ln_fwd_op.register_fake
def _(x, weight, bias, residual, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else 0), _row_stat(x), _row_stat(x)


@torch.library.custom_op("llmkern::layer_norm_bwd", mutates_args=())
def _ln_bwd_op(dy: torch.Tensor, ds: Optional[torch.Tensor], x: torch.Tensor, weight: Optional[torch.Tensor],
               mean: torch.Tensor, rstd: torch.Tensor, need_dw: bool,
               need_db: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx in x's shape, dweight float32 [N] or empty, dbias float32 [N] or empty)."""
    return _ln_bwd_impl(dy, ds, x, weight, mean, rstd, need_dw, need_db)


def _ln_bwd_impl(dy, ds, x, weight, mean, rstd, need_dw, need_db):
    return _kern().norm_backward(dy, ds, x, weight, mean, rstd, rms=False, need_dw=need_dw, need_db=need_db)


@_ln_bwd_op.register_fake
def _(dy, ds, x, weight, mean, rstd, need_dw, need_db):
    return x.new_empty(x.shape), _stat_vec(x, need_dw and weight is not None), _stat_vec(x, need_db)


def _saved_input(x, residual, s):
    """The tensor the norm read: s with a residual, else x itself (nothing new is saved)."""
    return x if residual is None else s


def _constant_sum(ctx, s, residual_index):
    """(s,) when s = x + residual needs no gradient (neither x, input 0, nor the residual, input residual_index,
    requires one), else (): an autograd Function marks every output as requiring grad when any input does, so a
    trainable weight alone (norm-only tuning on a frozen trunk) made s require grad, unlike `h = x + residual`."""
    need = ctx.needs_input_grad
    return () if need[0] or need[residual_index] else (s,)


def _rms_setup(ctx, inputs, output):
    x, weight, residual, _, offset = inputs
    _, s, rstd = output
    ctx.save_for_backward(_saved_input(x, residual, s), weight, rstd)
    ctx.offset = offset
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(rstd, *_constant_sum(ctx, s, 2))
    ctx.set_materialize_grads(False)  # an unused s gets no zero gradient to read


def _rms_backward(ctx, dy, ds, _drstd, bwd=None):
    x, weight, rstd = ctx.saved_tensors
    need_x, need_w, need_r = ctx.needs_input_grad[:3]
    ds = ds if ctx.has_residual else None  # (the empty s of a call without residual: a traced zero grad)
    if dy is None:  # only s was used downstream: s = x + residual passes ds through
        return ds if need_x else None, None, ds if need_r else None, None, None
    dx, dw = (bwd or _rms_bwd_op)(dy, ds, x, weight, rstd, ctx.offset, bool(need_w))
    dw = dw.to(weight.dtype) if need_w else None
    return dx if need_x else None, dw, dx if need_r else None, None, None


_rms_fwd_op.register_autograd(_rms_backward, setup_context=_rms_setup)


def _ln_setup(ctx, inputs, output):
    x, weight, bias, residual, _ = inputs
    _, s, mean, rstd = output
    ctx.save_for_backward(_saved_input(x, residual, s), weight, mean, rstd)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(mean, rstd, *_constant_sum(ctx, s, 3))
    ctx.set_materialize_grads(False)


def _ln_backward(ctx, dy, ds, _dmean, _drstd, bwd=None):
    x, weight, mean, rstd = ctx.saved_tensors
    need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
    ds = ds if ctx.has_residual else None
    if dy is None:
        return ds if need_x else None, None, None, ds if need_r else None, None
    dx, dw, db = (bwd or _ln_bwd_op)(dy, ds, x, weight, mean, rstd, bool(need_w), bool(need_b))
    dw = dw.to(weight.dtype) if need_w else None
    db = db.to(ctx.bias_dtype) if need_b else None
    return dx if need_x else None, dw, db, dx if need_r else None, None


_ln_fwd_op.register_autograd(_ln_backward, setup_context=_ln_setup)


_RMSNormFunction = _checks.eager_twin("_RMSNormFunction", _rms_fwd_impl, _rms_setup,
                                      functools.partial(_rms_backward, bwd=_rms_bwd_impl),
                                      "The eager twin of llmkern::rms_norm_fwd / _bwd.")
_LayerNormFunction = _checks.eager_twin("_LayerNormFunction", _ln_fwd_impl, _ln_setup,
                                        functools.partial(_ln_backward, bwd=_ln_bwd_impl),
                                        "The eager twin of llmkern::layer_norm_fwd / _bwd.")


def _finish(out, return_residual):
    return (out[0], out[1]) if return_residual else out[0]


# ---- public API ---------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6, *,
             residual: Optional[torch.Tensor] = None, offset: float = 0.0, return_residual: bool = False):
    """RMSNorm over the last dimension, optionally fused with the residual add before it.

    ``y = s / sqrt(mean(s^2, -1) + eps) * (offset + weight)`` with s = x, or s = x + residual (added
    in float32, rounded to x's dtype: exactly ``h = x + residual``). Statistics in float32; y in x's
    dtype. Rounding follows transformers: with a weight and offset == 0, LlamaRMSNorm's (the
    normalised value is rounded to x's dtype, then multiplied by the weight); otherwise one rounding
    at the end, GemmaRMSNorm's (offset=1.0 is Gemma's ``1 + weight``).

    Args:
        x: [..., N] float32 / float16 / bfloat16 (float64: reference only); any strides.
        weight: [N], x's dtype or float32, or None (no affine; offset must then be 0).
        eps: > 0, added to the mean square.
        residual: optional, x's shape, dtype and device.
        offset: added to the weight (Gemma: 1.0).
        return_residual: also return s = x + residual, the next block's residual (needs residual).

    Returns y (x's shape and dtype), or (y, s). Gradients flow to x, residual and weight; the
    gradient of s from its own downstream use is added to the one through the norm.
    """
    eps, return_residual = _check(x, (("weight", weight),), residual, eps, return_residual)
    offset = _real("offset", offset, dtype=x.dtype)
    if weight is None and offset != 0.0:
        raise ValueError(f"offset must be 0 without a weight (there is nothing to offset), got {offset}")
    if not _use_triton(x, "rms_norm"):
        return ref.rms_norm(x, weight, eps, residual=residual, offset=offset, return_residual=return_residual)
    # (x and residual go to the op in their own shape: were they reshaped views, their gradients would
    # be two views of one dx, and two leaves' .grad would share storage)
    if _checks.eager_fast_path(x, weight, residual):
        out = _RMSNormFunction.apply(x, weight, residual, eps, offset)
    else:
        out = _rms_fwd_op(x, weight, residual, eps, offset)
    return _finish(out, return_residual)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5, *, residual: Optional[torch.Tensor] = None, return_residual: bool = False):
    """LayerNorm over the last dimension (``F.layer_norm(s, [N], weight, bias, eps)``), optionally
    fused with the residual add before it (s = x + residual, as for rms_norm).

    Args:
        x: [..., N] float32 / float16 / bfloat16 (float64: reference only); any strides.
        weight, bias: [N], x's dtype or float32, or None (nn.LayerNorm(elementwise_affine=False) /
            bias=False).
        eps: > 0, added to the variance (the biased one, as F.layer_norm).
        residual, return_residual: as for rms_norm.

    Statistics in float32, y rounded once to x's dtype. Returns y, or (y, s). Unlike F.layer_norm, which
    torch.autocast runs in float32 (a float32 output for bf16 inputs), the output stays in x's dtype
    under autocast too.
    """
    eps, return_residual = _check(x, (("weight", weight), ("bias", bias)), residual, eps, return_residual)
    if not _use_triton(x, "layer_norm"):
        return ref.layer_norm(x, weight, bias, eps, residual=residual, return_residual=return_residual)
    if _checks.eager_fast_path(x, weight, bias, residual):
        out = _LayerNormFunction.apply(x, weight, bias, residual, eps)
    else:
        out = _ln_fwd_op(x, weight, bias, residual, eps)
    return _finish(out, return_residual)


__all__ = ["rms_norm", "layer_norm"]
