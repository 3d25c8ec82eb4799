"""Fused attention: public API, validation, registration, dispatch, autograd.

    attention(q, k, v, *, causal, scale, window, softcap, key_padding_mask, return_lse, dropout_p, seed, sinks,
              alibi_slopes)
    attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ..., sinks, alibi_slopes)
    attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, *, k, v, causal, ..., sinks, alibi_slopes)

Kernels: llmkern/kernels/attention.py (forward, backward) and attention_decode.py (split-K
decode); reference: llmkern/reference/attention.py. The Triton path runs inside the
torch.library custom ops `llmkern::attention_fwd`, `llmkern::attention_bwd` (autograd registered
on the forward) and `llmkern::attention_decode`, so the op traces under
torch.compile(fullgraph=True) as one opaque node and passes `opcheck`.

Dispatch: CUDA tensors run the Triton kernels (float16, bfloat16, float32). CPU tensors run the
reference unless LLMKERN_BACKEND=triton, which runs the same kernels under TRITON_INTERPRET=1
(float32/float16; the interpreter has no bfloat16). float64 always uses the reference. On CPU,
calls SDPA can express (no softcap, no LSE) run the reference's semantics through SDPA's fused CPU
kernel (masks built here, bottom-right causal included); LLMKERN_BACKEND=reference forces the
plain reference.

The backward is deterministic (bitwise identical run to run): dK/dV and dQ are each owned by one
program, no atomics (FlashAttention-2's default backward accumulates dQ with atomics and is not).
"""
import functools
import inspect
import math
import numbers
import os
from typing import Optional, Tuple

import torch

from llmkern import _backend
from llmkern.ops import _checks
from llmkern.reference import attention as ref

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPES = _KERNEL_DTYPES + (torch.float64,)
# KV-cache storage dtypes besides q's (attention_with_kvcache: read with k_scale / v_scale)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
MAX_HEAD_DIM = 256


# ---- dispatch -----------------------------------------------------------------------------------

def _backend_for(device, dtype=torch.float16, op_name="attention"):
    return _backend.choose_triton(op_name, device, dtype, _KERNEL_DTYPES)


for _name in ("attention", "attention_varlen", "attention_with_kvcache"):
    _backend.register_op(_name, lambda device, dtype, _n=_name: _backend_for(device, dtype, _n))


# ---- validation ---------------------------------------------------------------------------------

_checking_values = _checks.checking_values
_tensor = _checks.tensor_arg


def _check_qkv(q, k, v, ndim, layout, names=("k", "v"), fp8_ok=False):
    """q, k, v (or the caches, named by `names`): dtypes, devices and shapes. v's last dimension (the
    value head dim Dv, the output's) may differ from q/k's D (DeepSeek MLA: D = 192, Dv = 128).
    fp8_ok: k and v may both be one float8 dtype (a quantized KV cache) instead of q's."""
    kn, vn = names
    for name, t in (("q", q), (kn, k), (vn, v)):
        _tensor(name, t)
        if t.dim() != ndim:
            raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")
        if t.dtype not in _DTYPES and not (fp8_ok and t is not q and t.dtype in FP8_DTYPES):
            also = " (a cache: also float8_e4m3fn or float8_e5m2)" if fp8_ok and t is not q else ""
            raise ValueError(f"{name} must be float16, bfloat16 or float32 (float64: reference only){also}, "
                             f"got {t.dtype}")
    want = k.dtype if fp8_ok and k.dtype in FP8_DTYPES else q.dtype
    for name, t in ((kn, k), (vn, v)):
        if t.dtype != want:
            what = f"{kn}'s float8 dtype" if want != q.dtype else "the dtype of q"
            raise ValueError(f"{name} must have {what} ({want}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"{vn} must have the shape of {kn} {tuple(k.shape[:-1]) + ('Dv',)} but for its last "
                         f"dimension (the value head dim), got {tuple(v.shape)}")
    D = q.shape[-1]
    if k.shape[-1] != D:
        raise ValueError(f"{kn} must have q's head_dim {D}, got {k.shape[-1]}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {D}")
    if not 1 <= v.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"{vn}'s head_dim (its last dimension, the value head dim) must be in 1..{MAX_HEAD_DIM}, "
                         f"got {v.shape[-1]}")


def _check_heads(H, Hk):
    if Hk < 1 or H % Hk != 0:
        raise ValueError(f"the number of k/v heads ({Hk}) must divide the number of q heads ({H}) "
                         f"(GQA/MQA)")


def _scale(scale, D):
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, torch.Tensor) or not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not _checks.finite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


_MAX_WINDOW = 2 ** 62


def _window(window):
    """window -> (left, right) ints, -1 = unbounded."""
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be None or a (left, right) pair, got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window):
        if w is None:
            out.append(-1)
        elif isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= -1:
            # -1: unbounded, as flash-attn's window_size. A side wider than any sequence is as good as unbounded:
            # kept under _MAX_WINDOW, so that i +- w stays in int64 (at 2**63 - 1 the reference's mask wrapped
            # around and hid keys; 2**64 overflowed) and fits the custom ops' int arguments
            out.append(min(int(w), _MAX_WINDOW))
        else:  # a negative size other than -1 is a mistake, not "unbounded"
            raise ValueError(f"window {side} must be an int >= 0, or None / -1 (unbounded), got {w!r}")
    return tuple(out)


_softcap = _checks.softcap_arg


def _check_sinks(sinks, H, device):
    """sinks: None or a floating tensor [heads] (the query heads) on q's device, each finite or -inf (no sink
    for that head). As for alibi_slopes, the values are read on CPU only (on CUDA it would cost a host sync
    per call; a NaN or +inf sink gives NaN rows)."""
    if sinks is None:
        return
    _tensor("sinks", sinks)
    if not sinks.is_floating_point() or sinks.dtype in FP8_DTYPES:  # (float8: no isnan, no arithmetic on CPU)
        raise ValueError(f"sinks must be a floating-point tensor (one logit per query head; float16, bfloat16, "
                         f"float32 or float64), got {sinks.dtype}")
    if tuple(sinks.shape) != (H,):
        raise ValueError(f"sinks must have shape [heads] = [{H}] (one logit per query head), "
                         f"got {tuple(sinks.shape)}")
    if sinks.device != device:
        raise ValueError(f"sinks is on {sinks.device} but q is on {device}")
    if sinks.device.type == "cpu" and _checking_values():
        with torch.no_grad():
            bad = bool((torch.isnan(sinks) | torch.isposinf(sinks)).any())
        if bad:
            raise ValueError(f"sinks must be finite or -inf (no sink for that head), got {sinks.tolist()}")


def _check_alibi(alibi_slopes, B, H, device):
    """alibi_slopes: None or a float32 tensor [heads] or [batch, heads] on q's device, finite. The values
    are read on CPU only (on CUDA it would cost a host sync per call; a NaN slope gives NaN rows)."""
    if alibi_slopes is None:
        return
    _tensor("alibi_slopes", alibi_slopes)
    if alibi_slopes.dtype != torch.float32:
        raise ValueError(f"alibi_slopes must be float32 (as FlashAttention's), got {alibi_slopes.dtype}")
    if tuple(alibi_slopes.shape) not in ((H,), (B, H)):
        raise ValueError(f"alibi_slopes must have shape [heads] = [{H}] or [batch, heads] = [{B}, {H}], "
                         f"got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {device}")
    if alibi_slopes.device.type == "cpu" and _checking_values() and not bool(torch.isfinite(alibi_slopes).all()):
        raise ValueError(f"alibi_slopes must be finite, got {alibi_slopes.tolist()}")


def _check_causal(causal, return_lse=False):
    for name, flag in (("causal", causal), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")


def _ref_window(wl, wr):
    if wl < 0 and wr < 0:
        return None
    return (wl if wl >= 0 else None, wr if wr >= 0 else None)


# ---- torch.library ops (the Triton path) --------------------------------------------------------

def _kern():
    from llmkern.kernels import attention as kern

    return kern


def _lse_shape(q, cu_seqlens_q):
    if cu_seqlens_q is None:
        return q.shape[:3]
    return (q.shape[1], q.shape[0])


@torch.library.custom_op("llmkern::attention_fwd", mutates_args=())
def _attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_padding_mask: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                      cu_seqlens_k: Optional[torch.Tensor], seed: Optional[torch.Tensor], max_seqlen_q: int,
                      max_seqlen_k: int, scale: float, causal: bool, window_left: int, window_right: int,
                      softcap: float, dropout_p: float, sinks: Optional[torch.Tensor] = None,
                      alibi_slopes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    # sinks and alibi_slopes come last, with defaults: calls written before them (opcheck tests, users of
    # torch.ops.llmkern.attention_fwd) keep their meaning
    return _fwd_impl(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, seed, max_seqlen_q, max_seqlen_k,
                     scale, causal, window_left, window_right, softcap, dropout_p, sinks, alibi_slopes)


def _kernel_layout(t):
    """The layout the kernels give their outputs: like t when its last dimension is contiguous,
    else contiguous (the launchers copy such inputs first). The fakes and the empty-input paths
    follow it, so that torch.compile sees the strides the kernels produce."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty_out(q, v):
    """The attention output of q with v's head dim, in the kernels' layout (kernels/attention.empty_out)."""
    q = _kernel_layout(q)
    if q.shape[-1] == v.shape[-1]:
        return torch.empty_like(q)  # (without importing the kernels)
    return _kern().empty_out(q, v.shape[-1])


def _fwd_impl(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, seed, max_seqlen_q, max_seqlen_k,
              scale, causal, window_left, window_right, softcap, dropout_p, sinks=None, alibi_slopes=None):
    if q.numel() == 0:
        return _empty_out(q, v).zero_(), torch.full(_lse_shape(q, cu_seqlens_q), float("-inf"),
                                                    device=q.device, dtype=torch.float32)
    return _kern().attention_forward(
        q, k, v, scale=scale, causal=causal, window_left=window_left, window_right=window_right,
        softcap=softcap, key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        dropout_p=dropout_p, seed=seed, sinks=sinks, alibi_slopes=alibi_slopes)


@_attention_fwd_op.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens_q, cu_seqlens_k, seed, max_seqlen_q, max_seqlen_k, scale, causal,
      window_left, window_right, softcap, dropout_p, sinks=None, alibi_slopes=None):
    return _empty_out(q, v), q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=torch.float32)


@torch.library.custom_op("llmkern::attention_bwd", mutates_args=())
def _attention_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor],
                      key_padding_mask: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
                      cu_seqlens_k: Optional[torch.Tensor], seed: Optional[torch.Tensor], max_seqlen_q: int,
                      max_seqlen_k: int, scale: float, causal: bool, window_left: int, window_right: int,
                      softcap: float, dropout_p: float, sinks: Optional[torch.Tensor] = None,
                      alibi_slopes: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dsinks). dsinks has sinks' shape and dtype; without sinks (None: not given, or
    no gradient wanted) it is an empty float32 tensor (a custom op's outputs cannot be None).
    alibi_slopes: the forward's (no gradient: ALiBi is not trained)."""
    return _bwd_impl(dout, q, k, v, out, lse, dlse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, seed,
                     max_seqlen_q, max_seqlen_k, scale, causal, window_left, window_right, softcap, dropout_p,
                     sinks, alibi_slopes)


def _no_dsinks(q):
    return q.new_empty(0, dtype=torch.float32)


def _bwd_impl(dout, q, k, v, out, lse, dlse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, seed, max_seqlen_q,
              max_seqlen_k, scale, causal, window_left, window_right, softcap, dropout_p, sinks=None,
              alibi_slopes=None):
    if q.numel() == 0 or k.numel() == 0:
        grads = tuple(torch.zeros_like(_kernel_layout(t)) for t in (q, k, v))
        if sinks is None:
            return grads + (_no_dsinks(q),)
        # no key: out = 0 and LSE = sink, so delta = -dLSE and the sinks take dLSE
        delta = torch.zeros_like(lse) if dlse is None else -dlse.float()
        return grads + (_kern().sink_grad(sinks, lse, delta, cu_seqlens_q is not None),)
    grads = _kern().attention_backward(
        dout, q, k, v, out, lse, scale=scale, causal=causal, window_left=window_left,
        window_right=window_right, softcap=softcap, key_padding_mask=key_padding_mask,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, dlse=dlse, dropout_p=dropout_p, seed=seed, sinks=sinks, alibi_slopes=alibi_slopes)
    return grads if sinks is not None else grads + (_no_dsinks(q),)


@_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, seed, max_seqlen_q,
      max_seqlen_k, scale, causal, window_left, window_right, softcap, dropout_p, sinks=None, alibi_slopes=None):
    dsinks = _no_dsinks(q) if sinks is None else torch.empty_like(sinks)
    return tuple(torch.empty_like(_kernel_layout(t)) for t in (q, k, v)) + (dsinks,)


_FWD_ARGS = ("key_padding_mask", "cu_seqlens_q", "cu_seqlens_k", "seed", "max_seqlen_q", "max_seqlen_k", "scale",
             "causal", "window_left", "window_right", "softcap", "dropout_p")
_N_ARGS = 3 + len(_FWD_ARGS)  # the forward's inputs before sinks (q, k, v, then _FWD_ARGS)
_ALIBI = _N_ARGS + 1  # alibi_slopes' position, after sinks


def _setup_context(ctx, inputs, output):
    q, k, v, kpm, cu_q, cu_k, seed = inputs[:7]
    sinks = inputs[_N_ARGS] if len(inputs) > _N_ARGS else None
    alibi = inputs[_ALIBI] if len(inputs) > _ALIBI else None
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kpm, cu_q, cu_k, seed, sinks, alibi)
    ctx.args = inputs[7:_N_ARGS]  # the LSE output is differentiable too: dLSE folds into delta
    ctx.n_inputs = len(inputs)


def _backward(ctx, dout, dlse, bwd=None):
    q, k, v, out, lse, kpm, cu_q, cu_k, seed, sinks, alibi = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    # the kernels only need the sink-aware LSE; sinks go to the backward only for their gradient
    want_dsinks = sinks is not None and ctx.needs_input_grad[_N_ARGS]
    extra = () if alibi is None else (alibi,)  # without ALiBi, the call of before (same graph)
    dq, dk, dv, dsinks = (bwd or _attention_bwd_op)(dout, q, k, v, out, lse, dlse, kpm, cu_q, cu_k, seed,
                                                    *ctx.args, sinks if want_dsinks else None, *extra)
    grads = (dq, dk, dv) + (None,) * (_N_ARGS - 3)
    # then sinks' gradient and alibi_slopes' (none: FlashAttention does not train the slopes either)
    return grads + (dsinks if want_dsinks else None, None)[:ctx.n_inputs - _N_ARGS]


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# an unused LSE's gradient stays None, as under the custom op
_AttentionFunction = _checks.eager_twin("_AttentionFunction", _fwd_impl, _setup_context,
                                        functools.partial(_backward, bwd=_bwd_impl),
                                        "The eager twin of llmkern::attention_fwd / attention_bwd.",
                                        materialize_grads=False)


def _attention_fwd(q, k, v, kpm, cu_q, cu_k, seed, *args, sinks=None, alibi_slopes=None):
    """(out, lse), differentiable: the custom op under torch.compile, its eager twin otherwise."""
    # without sinks or ALiBi, the calls of before (same graph)
    extra = (sinks, alibi_slopes) if alibi_slopes is not None else (() if sinks is None else (sinks,))
    if _checks.eager_fast_path(q, k, v, kpm, cu_q, cu_k, seed, sinks, alibi_slopes):
        return _AttentionFunction.apply(q, k, v, kpm, cu_q, cu_k, seed, *args, *extra)
    return _attention_fwd_op(q, k, v, kpm, cu_q, cu_k, seed, *args, *extra)


def _attention_backward(dout, q, k, v, out, lse, *, causal, scale, window, softcap):
    """(dq, dk, dv) of attention(q, k, v, causal=, scale=, window=, softcap=) from the forward's out and
    LSE and dout, without rerunning the forward: the op's own backward (the Triton kernels, or the
    reference's formulas). For callers that hold out/LSE but not the autograd graph (context parallelism
    re-gathers K/V for it). No masks, dropout or sinks; scale/window/softcap as `attention`."""
    scale, (wl, wr), sc = _scale(scale, q.shape[-1]), _window(window), _softcap(softcap)
    if _backend_for(q.device, q.dtype) != "triton":
        return ref.attention_backward(dout, q, k, v, out, lse, causal, scale, _ref_window(wl, wr), sc)
    args = (dout, q, k, v, out, lse, None, None, None, None, None, -1, -1, scale, causal, wl, wr, sc, 0.0)
    bwd = _bwd_impl if _checks.eager_fast_path(dout, q, k, v, out, lse) else _attention_bwd_op
    return tuple(bwd(*args)[:3])


def _decode_impl(q, k_cache, v_cache, cache_seqlens, block_table, scale, causal, window_left, window_right, softcap,
                 num_splits, sinks=None, key_padding_mask=None, alibi_slopes=None, k_scale=None, v_scale=None):
    """llmkern::attention_decode's implementation: (out, lse) from the split-K kernels."""
    if q.numel() == 0:
        return _empty_out(q, v_cache).zero_(), torch.full(q.shape[:3], float("-inf"), device=q.device,
                                                          dtype=torch.float32)
    from llmkern.kernels.attention_decode import attention_decode

    return attention_decode(q, k_cache, v_cache, cache_seqlens, scale=scale, causal=causal,
                            window_left=window_left, window_right=window_right, softcap=softcap,
                            num_splits=num_splits, block_table=block_table, sinks=sinks,
                            key_padding_mask=key_padding_mask, alibi_slopes=alibi_slopes, k_scale=k_scale,
                            v_scale=v_scale)


@torch.library.custom_op("llmkern::attention_decode", mutates_args=())
def _attention_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cache_seqlens: torch.Tensor, block_table: Optional[torch.Tensor], scale: float,
                         causal: bool, window_left: int, window_right: int, softcap: float,
                         num_splits: int, sinks: Optional[torch.Tensor] = None,
                         key_padding_mask: Optional[torch.Tensor] = None,
                         alibi_slopes: Optional[torch.Tensor] = None, k_scale: Optional[torch.Tensor] = None,
                         v_scale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    return _decode_impl(q, k_cache, v_cache, cache_seqlens, block_table, scale, causal, window_left, window_right,
                        softcap, num_splits, sinks, key_padding_mask, alibi_slopes, k_scale, v_scale)


@_attention_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, scale, causal, window_left, window_right, softcap,
      num_splits, sinks=None, key_padding_mask=None, alibi_slopes=None, k_scale=None, v_scale=None):
    return _empty_out(q, v_cache), q.new_empty(q.shape[:3], dtype=torch.float32)


def _decode(*args, **kwargs):
    """The decode op (inference only); eager calls run its implementation directly (a decode step calls it once
    per layer: see _checks.op_or_impl)."""
    return _checks.op_or_impl(_attention_decode_op, _decode_impl, *args, **kwargs)


# ---- public API ---------------------------------------------------------------------------------

def _like_sdpa_under_autocast(fn):
    """Under torch.autocast, an attention API function runs as SDPA does: q, k, v (floating point,
    not float64) in the autocast dtype, the op itself with autocast off, so that every path (SDPA,
    reference, kernels) gives the same output dtype and the float32 softmax statistics and LSE the
    docs promise. The KV-cache call casts q and the new k/v to the cache's dtype instead (the
    cache is updated in place and keeps its dtype)."""
    sig = inspect.signature(fn)
    kv_cache = fn.__name__ == "attention_with_kvcache"

    @functools.wraps(fn)
    def wrapper(q, *args, **kw):
        dt = _checks.autocast_dtype(q)
        if dt is None:
            return fn(q, *args, **kw)
        bound = sig.bind(q, *args, **kw)  # (k, v / k_cache may come by position or by keyword, as SDPA's)
        a = bound.arguments
        if kv_cache:  # q and the new k/v take the cache's dtype (a float8 cache's: the autocast dtype)
            kc = a.get("k_cache")
            dt = kc.dtype if isinstance(kc, torch.Tensor) and kc.dtype not in FP8_DTYPES else dt
        for name in ("q", "k", "v"):
            if name in a:
                a[name] = _checks.autocast_cast(dt, a[name])
        with torch.autocast(q.device.type, enabled=False):
            return fn(*bound.args, **bound.kwargs)
    return wrapper


@_like_sdpa_under_autocast
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: Optional[float] = None, window: Optional[Tuple[Optional[int], Optional[int]]] = None,
              softcap: Optional[float] = None, key_padding_mask: Optional[torch.Tensor] = None,
              return_lse: bool = False, dropout_p: float = 0.0, seed=None, sinks: Optional[torch.Tensor] = None,
              alibi_slopes: Optional[torch.Tensor] = None):
    """Fused scaled-dot-product attention (FlashAttention-2 style), a drop-in for
    ``F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)``.

    Args:
        q: [batch, heads, Tq, head_dim]; k: [batch, kv_heads, Tk, head_dim]; v: [batch, kv_heads, Tk,
            head_dim_v]. kv_heads must divide heads (GQA/MQA; K/V are never repeated in memory).
            head_dim and head_dim_v 1..256 (they may differ, as SDPA allows: DeepSeek MLA's prefill and
            training shape has head_dim 192 = 128 + 64 rope, head_dim_v 128), any lengths.
            float16, bfloat16 or float32 (accumulation in float32, output in the input dtype).
        causal: bottom-right aligned when Tq != Tk: query i sees keys j <= i + Tk - Tq
            (identical to SDPA's is_causal when Tq == Tk).
        scale: softmax scale, default 1/sqrt(head_dim).
        window: (left, right) sliding window around that diagonal: query i sees keys with
            i + Tk - Tq - left <= j <= i + Tk - Tq + right; None (or -1) on a side = unbounded.
        softcap: tanh soft-capping of the scaled scores: softcap * tanh(s / softcap).
        key_padding_mask: bool [batch, Tk], True = attend (left or right padding). The masked
            keys' k and v must still be finite, as for SDPA (their weight is 0, but 0 * NaN is NaN in
            the Triton kernels and the CPU SDPA path); attention_with_kvcache and attention_varlen never
            read hidden keys.
        return_lse: also return the float32 logsumexp [batch, heads, Tq] (differentiable; float64 for float64
            inputs).
        dropout_p: attention dropout on the softmax weights, in [0, 1) (applied whenever > 0, like
            SDPA's dropout_p: pass 0 in evaluation). Kept weights are scaled by 1/(1-p); the mask is
            a hash of the seed and the (batch row, query head, query, key) position, regenerated in
            the backward (never stored), identical on every backend
            (``llmkern.reference.attention.attention_dropout_keep``). The LSE is the undropped one.
        seed: the dropout seed: an int, or an int32 tensor of two words on q's device (default: drawn
            with torch.randint on q's device, so torch.manual_seed makes runs reproducible, with no
            host sync).
        sinks: attention sinks (gpt-oss), a floating tensor [heads] of per-query-head logits on q's
            device (any float dtype, used in float32; finite, or -inf for no sink in that head). Each
            joins its head's softmax denominator and contributes no value:
            p_j = exp(s_j) / (sum_k exp(s_k) + exp(sinks[h])), with s_j the scores after scale,
            softcap and masks (transformers' gpt-oss eager attention, `s_aux`).
            The LSE is then that of the whole denominator, and a row that sees no key gets zeros and
            LSE sinks[h]. Differentiable (gpt-oss trains them). Dropout drops only the keys'
            weights; the sink always stays in the denominator.
        alibi_slopes: ALiBi with FlashAttention-2's semantics: a float32 tensor [heads] or
            [batch, heads] on q's device; the score of query i and key j gets the bias
            -slope * |i + Tk - Tq - j| (bottom-right aligned, as the causal mask), added after scale
            and softcap and before the masks: s = softcap(scale * q.k) - slope * |i + Tk - Tq - j|.
            The slopes get no gradient (FlashAttention's neither); q, k and v's gradients include the bias.

    Returns out [batch, heads, Tq, head_dim_v] (v's head dim) (, lse float32 [batch, heads, Tq]; float64 for
    float64 inputs).
    A query row that sees no key returns zeros (and LSE -inf, or the sink), never NaN.
    Memory is O(T): no Tq x Tk tensor is materialised on the Triton path.
    """
    _check_qkv(q, k, v, 4, "[batch, heads, seq, head_dim]")
    B, H, Tq, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k must have q's batch size {B}, got {k.shape[0]}")
    _check_heads(H, k.shape[1])
    Tk = k.shape[2]
    scale = _scale(scale, D)
    p = _checks.dropout_p_arg(dropout_p)
    seed_t = _checks.dropout_seed(seed, p, q.device)
    wl, wr = _window(window)
    sc = _softcap(softcap)
    _check_causal(causal, return_lse)
    _check_sinks(sinks, H, q.device)
    _check_alibi(alibi_slopes, B, H, q.device)
    if key_padding_mask is not None:
        _tensor("key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be a bool tensor (True = attend), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, Tk):
            raise ValueError(f"key_padding_mask must have shape [batch, Tk] = [{B}, {Tk}], "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    backend = _backend_for(q.device, q.dtype, "attention")
    if backend == "triton" and _runs_as_decode(q, k, v, p, sinks):
        extra = {n: t for n, t in (("sinks", sinks), ("key_padding_mask", key_padding_mask),
                                   ("alibi_slopes", alibi_slopes)) if t is not None}
        lens = torch.full((B,), Tk, dtype=torch.int32, device=q.device)
        out, lse = _decode(q, k, v, lens, None, scale, causal, wl, wr, sc, 0, **extra)
    elif backend == "triton":
        out, lse = _attention_fwd(q, k, v, key_padding_mask, None, None, seed_t, -1, -1, scale, causal, wl, wr, sc,
                                  p, sinks=sinks, alibi_slopes=alibi_slopes)
    elif (q.device.type == "cpu" and not sc and not return_lse and not p and sinks is None and alibi_slopes is None
          and _backend.forced() != "reference"):
        return _cpu_sdpa(q, k, v, causal, scale, wl, wr, key_padding_mask)
    else:
        out, lse = ref.attention(q, k, v, causal=causal, scale=scale, window=_ref_window(wl, wr),
                                 softcap=sc or None, key_padding_mask=key_padding_mask, return_lse=True,
                                 dropout_p=p, seed=seed_t, sinks=sinks, alibi_slopes=alibi_slopes)
    return (out, lse) if return_lse else out


def _decode_max_tq():
    """The most queries per row an inference call runs on the split-K decode kernel (LLMKERN_ATTN_DECODE_MAX_TQ,
    default 16; 0: never)."""
    return int(os.environ.get("LLMKERN_ATTN_DECODE_MAX_TQ", "16"))


def _runs_as_decode(q, k, v, p, sinks=None):
    """Whether an attention call takes the split-K decode kernel (attention_with_kvcache's) instead of the
    forward kernel: a few queries per row (a decode step of a model whose cache is a plain tensor, e.g.
    transformers' DynamicCache; speculative drafts), no dropout, and no gradient wanted, trainable sinks included
    (the decode kernel has no backward). Its grid splits the keys, so a small batch still fills the GPU, and it packs a GQA group's
    query heads into one tile, reading each K/V tile once per group (the forward kernel's grid is one program
    per query block and head: for one query, B * H programs each over every key).
    A symbolic query count (a dynamic length under torch.compile / torch.export) takes the forward kernel: the
    comparison would otherwise specialise the graph to lengths on one side of the threshold (an exported zoo forward
    was then valid for prompts of 2..16 tokens only)."""
    Tq = q.shape[2]
    if p or isinstance(Tq, torch.SymInt) or Tq > _decode_max_tq():
        return False
    return not _checks.wants_grad(q, k, v, sinks)


def _cpu_sdpa(q, k, v, causal, scale, wl, wr, key_padding_mask):
    """The CPU path where SDPA can express the call (no softcap, no LSE, no sinks): the same semantics as the
    reference through SDPA's fused CPU kernel (about 10x faster than the plain reference).
    SDPA's safe softmax gives zeros for rows with no visible key, as the reference does."""
    Tq, Tk = q.shape[2], k.shape[2]
    mask = ref.visibility_mask(Tq, Tk, causal=causal, window=_ref_window(wl, wr), device=q.device)
    is_causal = False
    if mask is not None and key_padding_mask is None and causal and Tq == Tk and wl < 0 and wr < 0:
        mask, is_causal = None, True  # top-left == bottom-right when Tq == Tk
    if mask is not None:
        mask = mask[None, None]
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, None, :]
        mask = kpm if mask is None else (mask & kpm)
    gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                            scale=scale, **gqa)


def _check_cu(name, cu, device, total):
    _tensor(name, cu)
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor [batch + 1] of cumulative lengths, got {tuple(cu.shape)}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {cu.dtype}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if cu.device.type == "cpu" and _checking_values():
        if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"{name} must start at 0, be non-decreasing and end at the number of packed "
                             f"tokens ({total}), got {cu.tolist()}")


class _MaxSeqlenCheck:
    """max_seqlen_q/k, when given, size the kernels' grids: a bound under a sequence's length would
    leave rows uncomputed, so it is an error. The longest lengths are read from cu_seqlens at once
    on CPU; on CUDA after the kernels are queued (_checks.DeferredRead: no GPU stall), and the call
    raises instead of returning. Skipped where values cannot be read (torch.compile, graph capture)."""

    def __init__(self, cu_q, cu_k, max_q, max_k):
        self.bounds = (max_q, max_k)
        self.lens = None
        if (max_q is not None or max_k is not None) and _checking_values() and cu_q.numel() > 1:
            longest = torch.stack([(cu_q[1:] - cu_q[:-1]).max(), (cu_k[1:] - cu_k[:-1]).max()])
            self.lens = _checks.DeferredRead(longest)
            if self.lens.ready:
                self.finish()

    def finish(self):
        if self.lens is None:
            return
        lens, self.lens = self.lens.values(), None
        for name, bound, n in zip(("max_seqlen_q", "max_seqlen_k"), self.bounds, lens):
            if bound is not None and n > bound:  # (0 is a bound too: only empty sequences)
                raise ValueError(f"{name} ({bound}) is smaller than the longest sequence in cu_seqlens_"
                                 f"{name[-1]} ({n}): it must be an upper bound (or None)")


@_like_sdpa_under_autocast
def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int] = None,
                     max_seqlen_k: Optional[int] = None, *, causal: bool = False,
                     scale: Optional[float] = None, window=None, softcap: Optional[float] = None,
                     return_lse: bool = False, dropout_p: float = 0.0, seed=None,
                     sinks: Optional[torch.Tensor] = None, alibi_slopes: Optional[torch.Tensor] = None):
    """Attention over packed variable-length sequences (training on packed documents).

    q [total_q, heads, head_dim], k [total_k, kv_heads, head_dim], v [total_k, kv_heads, head_dim_v]
    (head_dim_v may differ from head_dim, as for ``attention``); sequence b holds tokens
    cu_seqlens_q[b]:cu_seqlens_q[b+1] (int32, [batch + 1]). max_seqlen_* are optional upper bounds
    (a tighter grid); without them no host sync is needed. Causal/window are per sequence,
    bottom-right aligned. Returns out [total_q, heads, head_dim_v] (, lse float32 [heads, total_q];
    float64 for float64 inputs).
    dropout_p / seed: as for ``attention``, sequence b taking the mask of batch row b (packed
    sequences of equal lengths drop what the padded batch drops).
    sinks: as for ``attention``: [heads] per-query-head sink logits in every row's softmax denominator
    (differentiable); the LSE includes them.
    alibi_slopes: as for ``attention`` (float32 [heads] or [batch, heads], batch = the number of sequences;
    not differentiated): sequence b's bias is -slope * |i + Tk_b - Tq_b - j| over its own lengths.
    """
    _check_qkv(q, k, v, 3, "[total_tokens, heads, head_dim]")
    H, D = q.shape[1], q.shape[2]
    _check_heads(H, k.shape[1])
    _check_cu("cu_seqlens_q", cu_seqlens_q, q.device, q.shape[0])
    _check_cu("cu_seqlens_k", cu_seqlens_k, q.device, k.shape[0])
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(f"cu_seqlens_k must have the length of cu_seqlens_q ({cu_seqlens_q.numel()}), "
                         f"got {cu_seqlens_k.numel()}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if m is not None and (isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 0):
            raise ValueError(f"{name} must be None or an int >= 0, got {m!r}")
    scale = _scale(scale, D)
    wl, wr = _window(window)
    sc = _softcap(softcap)
    _check_causal(causal, return_lse)
    _check_sinks(sinks, H, q.device)
    _check_alibi(alibi_slopes, cu_seqlens_q.numel() - 1, H, q.device)
    p = _checks.dropout_p_arg(dropout_p)
    seed_t = _checks.dropout_seed(seed, p, q.device)
    backend = _backend_for(q.device, q.dtype, "attention_varlen")
    bounds = _MaxSeqlenCheck(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if backend == "triton":
        # (a bound past int32 is no bound: cu_seqlens are int32; as it was, 2**40 overflowed the kernels' int32 grid
        # arithmetic and 2**63 the custom op's int argument)
        mq = int(max_seqlen_q) if max_seqlen_q and max_seqlen_q < 2**31 else -1
        mk = int(max_seqlen_k) if max_seqlen_k and max_seqlen_k < 2**31 else -1
        out, lse = _attention_fwd(q, k, v, None, cu_seqlens_q, cu_seqlens_k, seed_t, mq, mk, scale, causal,
                                  wl, wr, sc, p, sinks=sinks, alibi_slopes=alibi_slopes)
    elif torch.compiler.is_compiling() and not p:  # (the per-sequence loop reads cu_seqlens on the host)
        out, lse = ref.attention_varlen_dense(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale,
                                              window=_ref_window(wl, wr), softcap=sc or None, return_lse=True,
                                              sinks=sinks, alibi_slopes=alibi_slopes)
    else:
        out, lse = ref.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, scale=scale,
                                        window=_ref_window(wl, wr), softcap=sc or None, return_lse=True,
                                        dropout_p=p, seed=seed_t, sinks=sinks, alibi_slopes=alibi_slopes)
    bounds.finish()
    return (out, lse) if return_lse else out


# ---- packed rows by sequence index (transformers' packed-sequence masks, traced) ----------------------------------

def _segment_starts(seq_ids):
    """cu_seqlens (int32) of the runs of equal indices in each row of seq_ids [B, T] (every row starts a run):
    one host read, inside the custom ops below, so torch.compile sees no data-dependent shape."""
    B, T = seq_ids.shape
    if B * T == 0:  # no token: one empty sequence (cu_seqlens holds at least one)
        return torch.zeros(2, dtype=torch.int32, device=seq_ids.device)
    starts = torch.ones(B, T, dtype=torch.bool, device=seq_ids.device)
    starts[:, 1:] = seq_ids[:, 1:] != seq_ids[:, :-1]
    first = starts.reshape(-1).nonzero().reshape(-1)
    return torch.cat([first, first.new_tensor([B * T])]).to(torch.int32)


# (the ops read the bounds on the host, which a CUDA graph cannot capture: tagged so that torch.compile's CUDA graphs
# leave them out, where this torch has the tag)
_HOST_READ = {"tags": (torch.Tag.cudagraph_unsafe,)} if hasattr(torch.Tag, "cudagraph_unsafe") else {}


@torch.library.custom_op("llmkern::attention_segments_fwd", mutates_args=(), **_HOST_READ)
def _segments_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_ids: torch.Tensor,
                     seed: Optional[torch.Tensor], scale: float, causal: bool, window_left: int, window_right: int,
                     softcap: float, dropout_p: float, sinks: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """attention_varlen's forward over q, k, v [B * T, heads, d] whose sequences are the runs of seq_ids [B, T]
    (each at most T tokens: the kernels' grid bound, no second host read). Returns (out, lse, cu_seqlens): the runs'
    bounds go to the backward as a tensor (its length is host metadata), so a training step reads them from the
    device once per layer, not once in the forward and again in the backward."""
    cu, T = _segment_starts(seq_ids), seq_ids.shape[1]
    out, lse = _fwd_impl(q, k, v, None, cu, cu, seed, T, T, scale, causal, window_left, window_right, softcap,
                         dropout_p, sinks)
    return out, lse, cu


@_segments_fwd_op.register_fake
def _(q, k, v, seq_ids, seed, scale, causal, window_left, window_right, softcap, dropout_p, sinks=None):
    bounds = torch.library.get_ctx().new_dynamic_size(min=2)  # (data-dependent: the rows' runs, plus one; >= 2)
    return (_empty_out(q, v), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32),
            seq_ids.new_empty(bounds, dtype=torch.int32))


@torch.library.custom_op("llmkern::attention_segments_bwd", mutates_args=(), **_HOST_READ)
def _segments_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, dlse: Optional[torch.Tensor], cu_seqlens: torch.Tensor, max_seqlen: int,
                     seed: Optional[torch.Tensor], scale: float, causal: bool, window_left: int, window_right: int,
                     softcap: float, dropout_p: float, sinks: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dsinks) of _segments_fwd_op (as llmkern::attention_bwd, with the forward's cu_seqlens and the
    rows' length T as max_seqlen). Tagged like the forward: a batch past the grid limit reads cu_seqlens to slice."""
    return _bwd_impl(dout, q, k, v, out, lse, dlse, None, cu_seqlens, cu_seqlens, seed, max_seqlen, max_seqlen,
                     scale, causal, window_left, window_right, softcap, dropout_p, sinks)


@_segments_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens, max_seqlen, seed, scale, causal, window_left, window_right, softcap,
      dropout_p, sinks=None):
    dsinks = _no_dsinks(q) if sinks is None else torch.empty_like(sinks)
    return tuple(torch.empty_like(_kernel_layout(t)) for t in (q, k, v)) + (dsinks,)


_SEGMENT_ARGS = 11  # _segments_fwd_op's inputs before sinks


def _segments_setup(ctx, inputs, output):
    q, k, v, seq_ids, seed = inputs[:5]
    sinks = inputs[_SEGMENT_ARGS] if len(inputs) > _SEGMENT_ARGS else None
    ctx.save_for_backward(q, k, v, output[0], output[1], output[2], seed, sinks)
    ctx.max_seqlen = seq_ids.shape[1]
    ctx.args = inputs[5:_SEGMENT_ARGS]
    ctx.n_inputs = len(inputs)


def _segments_backward(ctx, dout, dlse, _dcu):
    q, k, v, out, lse, cu, seed, sinks = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    want_dsinks = sinks is not None and ctx.needs_input_grad[_SEGMENT_ARGS]
    dq, dk, dv, dsinks = _segments_bwd_op(dout, q, k, v, out, lse, dlse, cu, ctx.max_seqlen, seed, *ctx.args,
                                          sinks if want_dsinks else None)
    grads = (dq, dk, dv) + (None,) * (_SEGMENT_ARGS - 3)
    return grads + (dsinks if want_dsinks else None,)[:ctx.n_inputs - _SEGMENT_ARGS]


_segments_fwd_op.register_autograd(_segments_backward, setup_context=_segments_setup)


def _check_segments(q, k, v, seq_ids, causal, sinks):
    """attention_segments' arguments (shapes, dtypes, devices: free under torch.compile), so that a bad call raises
    an error naming the argument instead of failing inside a reshape."""
    _check_qkv(q, k, v, 4, "[batch, heads, seq, head_dim]")
    B, H, T = q.shape[:3]
    if k.shape[0] != B or k.shape[2] != T:
        raise ValueError(f"k must have q's batch size {B} and as many keys as q has queries ({T}): [{B}, kv_heads, "
                         f"{T}, head_dim], got {tuple(k.shape)}")
    _check_heads(H, k.shape[1])
    _tensor("seq_ids", seq_ids)
    if tuple(seq_ids.shape) != (B, T):
        raise ValueError(f"seq_ids must be [batch, seq] = [{B}, {T}] (q's rows and queries), got "
                         f"{tuple(seq_ids.shape)}")
    if seq_ids.device != q.device:
        raise ValueError(f"seq_ids is on {seq_ids.device} but q is on {q.device}")
    _check_causal(causal)
    _check_sinks(sinks, H, q.device)


@_like_sdpa_under_autocast
def attention_segments(q, k, v, seq_ids, *, causal=False, scale=None, window=None, softcap=None, dropout_p=0.0,
                       sinks=None):
    """Attention within the runs of equal indices of each row of seq_ids [B, T] (packed sequences, as transformers'
    packed-sequence masks give them: position ids restarting inside a row), q [B, H, T, D], k / v [B, Hk, T, D / Dv]
    -> [B, T, H, Dv]. attention_varlen over the runs, with the host read of their bounds inside a custom op (its
    forward reads them once and hands them to its backward), so a compiled forward traces it whole, fullgraph too;
    without the Triton kernels, the reference with a same-run mask (traceable as it is). In eager mode:
    attention_varlen itself, after one host read of the bounds (its backward reuses them). Causal / window positions
    are token indices (within a run positions rise by one per token)."""
    _check_segments(q, k, v, seq_ids, causal, sinks)
    B, H, T, D = q.shape
    scale = _scale(scale, D)
    wl, wr = _window(window)
    sc = _softcap(softcap)
    p = _checks.dropout_p_arg(dropout_p)
    Dv = v.shape[-1]

    def tokens(t):  # [B, heads, T, d] -> [B * T, heads, d]
        return t.transpose(1, 2).reshape(B * T, t.shape[1], t.shape[3])

    triton = _backend_for(q.device, q.dtype, "attention_varlen") == "triton"
    if triton and torch.compiler.is_compiling():
        extra = () if sinks is None else (sinks,)
        out = _segments_fwd_op(tokens(q), tokens(k), tokens(v), seq_ids, _checks.dropout_seed(None, p, q.device),
                               scale, causal, wl, wr, sc, p, *extra)[0]
        return out.reshape(B, T, H, Dv)
    if p or not torch.compiler.is_compiling():
        # (eager; or the reference's dropout, keyed on the packed sequences: attention_varlen, a graph break if traced)
        cu = _segment_starts(seq_ids)
        out = attention_varlen(tokens(q), tokens(k), tokens(v), cu, cu, causal=causal, scale=scale, window=window,
                               softcap=softcap, dropout_p=p, sinks=sinks)
        return out.reshape(B, T, H, Dv)
    same = seq_ids[:, :, None] == seq_ids[:, None, :]
    out = ref.attention(q, k, v, causal=causal, scale=scale, window=_ref_window(wl, wr), softcap=sc or None,
                        mask=same[:, None], sinks=sinks)
    return out.transpose(1, 2)


@_like_sdpa_under_autocast
def attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           cache_seqlens, *, k: Optional[torch.Tensor] = None,
                           v: Optional[torch.Tensor] = None, causal: bool = True,
                           scale: Optional[float] = None, window=None, softcap: Optional[float] = None,
                           return_lse: bool = False, num_splits: int = 0,
                           block_table: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None,
                           key_padding_mask: Optional[torch.Tensor] = None,
                           alibi_slopes: Optional[torch.Tensor] = None, k_scale=None, v_scale=None,
                           rotary_cos: Optional[torch.Tensor] = None, rotary_sin: Optional[torch.Tensor] = None,
                           rotary_interleaved: bool = False, cache_batch_idx: Optional[torch.Tensor] = None):
    """Decode attention against a KV cache, split along the keys (flash-decoding).

    q [batch, heads, Tq, head_dim] (Tq = 1..a few new tokens); k_cache [batch, kv_heads, Tmax, head_dim],
    v_cache [batch, kv_heads, Tmax, head_dim_v] (head_dim_v may differ from head_dim, as for ``attention``);
    cache_seqlens int [batch] (or an int): valid keys per row.
    If k [batch, kv_heads, Tq_new, head_dim] and v [batch, kv_heads, Tq_new, head_dim_v] are given they are
    first written into the caches (in place) at cache_seqlens[b], and attention covers cache_seqlens[b] +
    Tq_new keys.
    Query t of row b sits at position len_b - Tq + t (bottom-right causal alignment).
    num_splits: key splits (0 = chosen from the GPU size). Inference only (no autograd).
    block_table: a paged cache (vLLM / FlashAttention's block_table): int32 [batch, pages_per_row];
        k_cache/v_cache are then page pools [num_pages, kv_heads, page_size, head_dim (v: head_dim_v)] (any strides:
        a token-major pool [num_pages, page_size, kv_heads, head_dim] works as ``.transpose(1, 2)``),
        key j of row b lives in page block_table[b, j // page_size] at slot j % page_size, and
        Tmax = pages_per_row * page_size. New k/v are written into those slots (on the kernels' backend by one
        Triton launch for k and v together, dense or paged). Entries must name pages of the pool (checked on CPU
        in eager mode; on CUDA the kernels write nothing through a bad entry and read it as a NaN row, never
        writing into another sequence's page).
    sinks: as for ``attention``: [heads] per-query-head sink logits in the softmax denominator (the
        split-K kernel adds them when it combines the splits); the LSE includes them.
    key_padding_mask: bool [batch, Tmax], True = attend: cache slots no query may see, e.g. the pads of a
        left-padded prompt in a batch (positions stay cache indices: the pads sit before a row's tokens).
        A query that then sees no key returns zeros (LSE -inf).
    alibi_slopes: as for ``attention`` (float32 [heads] or [batch, heads]): query t of row b, at position
        pos = len_b - Tq + t, gets -slope * |pos - j| on key j (Tk = the row's cache length, new tokens
        included; positions are cache indices, so left padding counts in the distance, as in FlashAttention).
    k_scale, v_scale: a float8 cache (vLLM's / FlashInfer's fp8 KV cache): k_cache and v_cache may both be
        float8_e4m3fn or float8_e5m2 while q is 16-bit (or float32); stored x stands for x * k_scale (v:
        x * v_scale), a positive float or a float tensor [] or [kv_heads] on q's device (per-tensor or per-head;
        default 1.0, vLLM's without calibrated scales). New k/v are written as ``quantize_kv`` does (divided by
        the scale, saturated to the format's range). The kernel reads the 1-byte tiles (decode is bound by
        reading the cache: half the bytes of a 16-bit cache) and widens them in registers; the scales multiply
        the scores and the output. Scales with a cache in q's dtype raise ValueError.
    rotary_cos, rotary_sin: FlashAttention's flash_attn_with_kvcache rotary: [seqlen_ro, rotary_dim / 2] tables
        (rotary_dim <= head_dim, even); with new k/v, RoPE (llmkern.rope, fused) is applied to the new keys at
        positions cache_seqlens[b] + i before they are written, and to q at its own positions (the last Tq of the
        row's new length) when causal or windowed, else at cache_seqlens[b] for every query token (as
        FlashAttention). rotary_interleaved: pairs (2i, 2i + 1) (GPT-J) instead of (i, i + rotary_dim / 2).
        seqlen_ro must cover cache_seqlens + Tq_new (checked on CPU).
    cache_batch_idx: int [batch] (FlashAttention's): row b reads and appends cache row cache_batch_idx[b] of a
        dense cache [N, kv_heads, Tmax, D] with N >= batch (a persistent pool of request slots); run as a paged
        cache of one page per row (page size Tmax), so everything above holds. Not with block_table. With new k/v
        the entries must be distinct (two rows appending into one cache row would overwrite each other).
    Returns out [batch, heads, Tq, head_dim_v] (, lse float32 [batch, heads, Tq]; float64 for float64 inputs).
    """
    _check_qkv(q, k_cache, v_cache, 4, "[batch, heads, seq, head_dim]", names=("k_cache", "v_cache"), fp8_ok=True)
    B, H, Tq, D = q.shape
    Dv = v_cache.shape[-1]
    Hk, Tmax = k_cache.shape[1], k_cache.shape[2]
    if cache_batch_idx is not None:  # a dense pool is a paged cache with one page of Tmax slots per row
        block_table = _batch_idx_table(cache_batch_idx, block_table, B, q.device, k_cache.shape[0], k is not None)
    if block_table is not None:
        Tmax = _check_block_table(block_table, B, k_cache, q.device)
    elif k_cache.shape[0] != B:
        raise ValueError(f"k_cache must have q's batch size {B}, got {k_cache.shape[0]}")
    _check_heads(H, Hk)
    cache_seqlens = _int_lengths(cache_seqlens, B, Tmax, q.device)
    _tensor("cache_seqlens", cache_seqlens)
    if cache_seqlens.dtype not in (torch.int32, torch.int64) or tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"cache_seqlens must be an int32/int64 tensor of shape [{B}], "
                         f"got {cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new tokens to append) or both be None")
    t_new = 0
    if k is not None:
        for name, t, d in (("k", k, D), ("v", v, Dv)):  # each as wide as its cache (Dv: v_cache's)
            _tensor(name, t)
            if t.dim() != 4 or t.shape[0] != B or t.shape[1] != Hk or t.shape[3] != d or t.shape[2] != k.shape[2]:
                raise ValueError(f"{name} must have shape [{B}, {Hk}, Tq_new, {d}], got {tuple(t.shape)}")
            if t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"{name} must be {q.dtype} on {q.device}, got {t.dtype} on {t.device}")
        _check_writable("k_cache", k_cache)
        _check_writable("v_cache", v_cache)
        t_new = k.shape[2]
    if cache_seqlens.device.type == "cpu" and _checking_values() and B > 0:
        if bool((cache_seqlens < 0).any()) or int(cache_seqlens.max()) + t_new > Tmax:
            raise ValueError(f"cache_seqlens (+ {t_new} new tokens) must lie in 0..{Tmax} (the cache "
                             f"length), got {cache_seqlens.tolist()}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")
    scale = _scale(scale, D)
    wl, wr = _window(window)
    sc = _softcap(softcap)
    _check_causal(causal, return_lse)
    _check_sinks(sinks, H, q.device)
    _check_alibi(alibi_slopes, B, H, q.device)
    k_scale = _kv_scale("k_scale", k_scale, k_cache, Hk, q.device)
    v_scale = _kv_scale("v_scale", v_scale, v_cache, Hk, q.device)
    if key_padding_mask is not None:
        _tensor("key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, Tmax):
            raise ValueError(f"key_padding_mask must be a bool tensor [batch={B}, Tmax={Tmax}] (True = attend), got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    lens = cache_seqlens
    backend = _backend_for(q.device, q.dtype, "attention_with_kvcache")
    if backend == "triton":  # (before the rotary and the append: refused, nothing is written)
        _refuse_grad(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, sinks=sinks, alibi_slopes=alibi_slopes,
                     k_scale=k_scale, v_scale=v_scale, rotary_cos=rotary_cos, rotary_sin=rotary_sin)
    if rotary_cos is not None or rotary_sin is not None:
        q, k = _rotary(q, k, cache_seqlens, rotary_cos, rotary_sin, rotary_interleaved,
                       causal or wl >= 0 or wr >= 0, D, Tmax)
    if k is not None:
        if k_cache.dtype in FP8_DTYPES:
            k, v = quantize_kv(k, k_cache.dtype, k_scale), quantize_kv(v, v_cache.dtype, v_scale)
        _append(k_cache, v_cache, block_table, cache_seqlens, k, v, backend)
        lens = cache_seqlens + t_new
    if backend == "triton":
        extra = {} if sinks is None else {"sinks": sinks}
        if key_padding_mask is not None:
            extra["key_padding_mask"] = key_padding_mask
        if alibi_slopes is not None:
            extra["alibi_slopes"] = alibi_slopes
        extra.update({n: t for n, t in (("k_scale", k_scale), ("v_scale", v_scale)) if t is not None})
        out, lse = _decode(q, k_cache, v_cache, lens.to(torch.int32), block_table, scale, causal, wl, wr, sc,
                           _splits(num_splits), **extra)
        return (out, lse) if return_lse else out
    if block_table is not None:  # the CPU paths read a dense copy of each row's pages
        k_cache, v_cache = _gather_pages(k_cache, block_table), _gather_pages(v_cache, block_table)
    if k_cache.dtype in FP8_DTYPES:  # (the reference and SDPA read the dequantized cache)
        k_cache, v_cache = ref.dequantize_kv(k_cache, k_scale, q.dtype), ref.dequantize_kv(v_cache, v_scale, q.dtype)
    if (q.device.type == "cpu" and not sc and not return_lse and sinks is None and alibi_slopes is None
            and _backend.forced() != "reference"):
        # SDPA's CPU kernel with the reference's visibility mask (per-row lengths, bottom-right)
        left, right = ref._normalize_window(_ref_window(wl, wr), causal)
        j = torch.arange(Tmax, device=q.device)
        pos = lens.to(torch.long)[:, None] - Tq + torch.arange(Tq, device=q.device)[None, :]
        vis = j[None, None, :] < lens.to(torch.long)[:, None, None]
        if right is not None:
            vis = vis & (j[None, None, :] <= pos[:, :, None] + right)
        if left is not None:
            vis = vis & (j[None, None, :] >= pos[:, :, None] - left)
        if key_padding_mask is not None:
            vis = vis & key_padding_mask[:, None, :]
        unseen = ~vis.any(dim=1)  # [B, Tmax]: slots past the length or padded may hold anything (0 * NaN = NaN)
        if torch.compiler.is_compiling() or bool(unseen.any()):  # (SDPA adds its -inf mask: a NaN key too)
            k_cache = k_cache.masked_fill(unseen[:, None, :, None], 0.0)
            v_cache = v_cache.masked_fill(unseen[:, None, :, None], 0.0)
        gqa = {"enable_gqa": True} if Hk != H else {}
        return torch.nn.functional.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=vis[:, None],
                                                                scale=scale, **gqa)
    out, lse = ref.attention_with_kvcache(q, k_cache, v_cache, lens, causal=causal, scale=scale,
                                          window=_ref_window(wl, wr), softcap=sc or None, return_lse=True,
                                          sinks=sinks, key_padding_mask=key_padding_mask, alibi_slopes=alibi_slopes)
    return (out, lse) if return_lse else out


def _refuse_grad(**tensors):
    """The kernels' path of attention_with_kvcache runs the decode op, which has no autograd formula: inputs that
    require grad gave an output that failed only at backward, with PyTorch's "no autograd formula was registered for
    llmkern.attention_decode". Refused at the call instead, naming them (the CPU paths are plain torch ops and
    differentiable; a forward without torch.no_grad() on the kernels would keep a graph it cannot use anyway)."""
    if not torch.is_grad_enabled():
        return
    names = [n for n, t in tensors.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    if names:
        raise ValueError(f"attention_with_kvcache is inference-only on the Triton kernels (no backward), but "
                         f"{', '.join(names)} require{'s' if len(names) == 1 else ''} grad: call it under "
                         f"torch.no_grad() / torch.inference_mode() or pass detached tensors; for gradients use "
                         f"llmkern.attention over the cache's keys (key_padding_mask= hides unwritten slots)")


def _check_writable(name, cache):
    """A cache the new k/v are written into in place: neither a leaf tensor that requires grad (or a view of one),
    which autograd refuses to write, nor one whose elements share memory (an expand()ed tensor), where the write
    would land in several places. (Both raised PyTorch's errors from inside the write, naming no argument.)

    It runs per decoding step and layer, so it stays cheap: a contiguous cache cannot overlap, and the overlap test
    runs only for strided ones. (No memo per tensor: set_(), as_strided_() and `.data =` change a tensor's layout
    in place, and a memo keyed on identity, sizes and strides costs as much as the test.)"""
    if cache.requires_grad and torch.is_grad_enabled() and (cache.is_leaf or cache._base is not None
                                                            and cache._base.is_leaf):
        raise ValueError(f"{name} is written in place (the new k / v are appended to it): it must not be a leaf tensor "
                         f"that requires grad, or a view of one (pass {name}.detach(), or call under torch.no_grad())")
    if (not torch.compiler.is_compiling() and not cache.is_contiguous()
            and torch._debug_has_internal_overlap(cache) == 1):
        raise ValueError(f"{name} is written in place (the new k / v are appended to it): its elements must not share "
                         f"memory (an expand()ed tensor), got shape {tuple(cache.shape)} with strides {cache.stride()}")


def _int_lengths(cache_seqlens, B, Tmax, device):
    """cache_seqlens given as one int: an int32 tensor [B] of it, range-checked first (an int beyond int32, e.g.
    2**40, raised torch.full's RuntimeError); anything else as it is."""
    if not isinstance(cache_seqlens, numbers.Integral) or isinstance(cache_seqlens, bool):
        return cache_seqlens
    if not 0 <= cache_seqlens <= Tmax:
        raise ValueError(f"cache_seqlens must lie in 0..{Tmax} (the cache length), got {cache_seqlens}")
    return torch.full((B,), int(cache_seqlens), dtype=torch.int32, device=device)


def _rotary(q, k, cache_seqlens, cos, sin, interleaved, aligned, D, Tmax):
    """attention_with_kvcache's rotary: (q, k) rotated at their positions (see its docstring)."""
    from llmkern.ops.rope import rope

    if k is None:
        raise ValueError("rotary_cos / rotary_sin rotate the new keys: pass k and v (FlashAttention's rule)")
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        _tensor(name, t)
        if t.dim() != 2 or not t.is_floating_point() or t.shape != (cos.shape if torch.is_tensor(cos) else ()):
            raise ValueError(f"{name} must be a float tensor [seqlen_ro, rotary_dim / 2] shaped like rotary_cos, "
                             f"got {getattr(t, 'dtype', None)} {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not isinstance(interleaved, bool):
        raise TypeError(f"rotary_interleaved must be a bool, got {type(interleaved).__name__}")
    half = cos.shape[1]
    if not 1 <= 2 * half <= D:
        raise ValueError(f"rotary_cos's rotary_dim / 2 = {half} must be in 1..head_dim / 2 = {D // 2}")
    B, Tq, t_new = q.shape[0], q.shape[2], k.shape[2]
    start = cache_seqlens.to(torch.long)[:, None]
    pos_k = start + torch.arange(t_new, device=q.device)[None, :]  # [B, t_new]
    pos_q = (start + t_new - Tq + torch.arange(Tq, device=q.device)[None, :]) if aligned else start.expand(B, Tq)
    if t_new == 0:  # (nothing to write, nothing to rotate it with)
        return q, k
    if q.device.type == "cpu" and _checking_values() and B and int(pos_k.max()) >= cos.shape[0]:
        raise ValueError(f"rotary_cos has {cos.shape[0]} positions; the new keys reach {int(pos_k.max())}")

    def table(t, pos):  # [seqlen_ro, R / 2] -> [B, T, R] at the positions, in the layout llmkern.rope takes
        rows = t[pos.clamp(0, t.shape[0] - 1)]
        return rows.repeat_interleave(2, dim=-1) if interleaved else torch.cat([rows, rows], dim=-1)

    if aligned and Tq == t_new:  # the same positions: one fused launch for both
        return rope(q, k, table(cos, pos_k), table(sin, pos_k), interleaved=interleaved)
    q = rope(q, q, table(cos, pos_q), table(sin, pos_q), interleaved=interleaved)[0]
    k = rope(k, k, table(cos, pos_k), table(sin, pos_k), interleaved=interleaved)[0]
    return q, k


def _bytes(t):
    """A float8 tensor as its bytes (scatter_ has no float8 kernel on the CPU), others as they are."""
    return t.view(torch.uint8) if t.dtype in FP8_DTYPES else t


def _kv_scale(name, scale, cache, Hk, device):
    """k_scale / v_scale of a float8 cache as a float32 tensor [Hk] (None: a scale of 1, or a cache in q's
    dtype, which takes no scale)."""
    if scale is None:
        return None
    if cache.dtype not in FP8_DTYPES:
        raise ValueError(f"{name} is for a float8 cache (float8_e4m3fn / float8_e5m2); this cache is {cache.dtype}")
    return _scale_tensor(name, scale, Hk, device)


def _scale_tensor(name, scale, Hk, device, on="q"):
    """A dequantization scale (positive float, or float tensor [] / [Hk]) as float32 [Hk], validated (`on`:
    the tensor whose device it must share, for the message)."""
    if torch.is_tensor(scale) and scale.dtype == torch.float32 and scale.dim() == 1 and scale.shape[0] == Hk \
            and scale.device == device and scale.is_contiguous() and not (device.type == "cpu" and _checking_values()):
        return scale  # (already the kernel's form; a cache's own scales each decode step: no copy)
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        if not (_checks.finite(scale) and scale > 0):
            raise ValueError(f"{name} must be a finite positive float, got {scale!r}")
        # (used as float32: 1e-46 rounded to 0, and quantize_kv's x / 0 gave NaN for x = 0; 1e39 raised
        # torch.full's overflow RuntimeError)
        if not _checks.float32_finite(scale, nonzero=True):
            raise ValueError(f"{name} must be a positive float32 value, in {_checks.FLOAT32_TINY:.4g}.."
                             f"{_checks.FLOAT32_MAX:.4g}, got {scale!r}")
        return torch.full((Hk,), float(scale), dtype=torch.float32, device=device)
    if not torch.is_tensor(scale):
        raise TypeError(f"{name} must be a positive float or a float tensor [] or [kv_heads={Hk}], got "
                        f"{type(scale).__name__}")
    if not scale.is_floating_point() or tuple(scale.shape) not in ((), (1,), (Hk,)):
        raise ValueError(f"{name} must be a positive float or a float tensor [] or [kv_heads={Hk}], "
                         f"got {scale.dtype} {tuple(scale.shape)}")
    if scale.device != device:
        raise ValueError(f"{name} is on {scale.device} but {on} is on {device}")
    scale = scale.to(torch.float32)  # (a float8 scale has no isfinite)
    if scale.device.type == "cpu" and _checking_values() and not bool((scale.isfinite() & (scale > 0)).all()):
        raise ValueError(f"{name} must be finite and positive, got {scale.tolist()}")
    return scale.reshape(-1).expand(Hk).contiguous()


def quantize_kv(x: torch.Tensor, dtype=torch.float8_e4m3fn, scale=None) -> torch.Tensor:
    """Keys or values [..., kv_heads, T, head_dim] (dim 1 of a 4-d cache layout: [B, Hk, T, D], or a page pool
    [num_pages, Hk, page_size, D]) as a float8 cache stores them: x / scale, saturated to `dtype`'s finite range
    (float8_e4m3fn: +-448, float8_e5m2: +-57344; a plain cast would turn the overflow into NaN / inf), NaN kept.
    scale: None (1), a positive float, or a float tensor [] or [kv_heads]; attention_with_kvcache's k_scale /
    v_scale read it back."""
    if dtype not in FP8_DTYPES:
        raise ValueError(f"quantize_kv: dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")
    _tensor("x", x)
    if not x.is_floating_point() or x.dim() != 4:
        raise ValueError(f"quantize_kv: x must be a floating tensor [batch or pages, kv_heads, T, head_dim], got "
                         f"{x.dtype} {tuple(x.shape)}")
    y = x.to(torch.float32)
    if scale is not None:  # (validated and made float32 [kv_heads], whatever form it came in)
        scale = _scale_tensor("scale", scale, x.shape[1], x.device, on="x")
    if scale is not None:
        y = y / scale.view(1, -1, 1, 1)
    fmax = torch.finfo(dtype).max
    return y.clamp(-fmax, fmax).to(dtype)


def _batch_idx_table(cache_batch_idx, block_table, B, device, n_rows, appending):
    """cache_batch_idx [B] as a block table [B, 1] (one page per row)."""
    _tensor("cache_batch_idx", cache_batch_idx)
    if block_table is not None:
        raise ValueError("cache_batch_idx and block_table cannot be combined (a paged cache names its rows' pages)")
    if cache_batch_idx.dtype not in (torch.int32, torch.int64) or tuple(cache_batch_idx.shape) != (B,):
        raise ValueError(f"cache_batch_idx must be an int32/int64 tensor [batch={B}], got {cache_batch_idx.dtype} "
                         f"{tuple(cache_batch_idx.shape)}")
    if cache_batch_idx.device != device:
        raise ValueError(f"cache_batch_idx is on {cache_batch_idx.device} but q is on {device}")
    if cache_batch_idx.device.type == "cpu" and _checking_values() and B:  # (before int32: 2^32 + 1 would wrap to 1)
        lo, hi = int(cache_batch_idx.min()), int(cache_batch_idx.max())
        if lo < 0 or hi >= n_rows:
            raise ValueError(f"cache_batch_idx entries must be rows of k_cache in 0..{n_rows - 1}, got values in "
                             f"{lo}..{hi}")
        if appending and torch.unique(cache_batch_idx).numel() != B:
            raise ValueError(f"cache_batch_idx names one cache row for two batch rows ({cache_batch_idx.tolist()}): "
                             f"their new k/v would overwrite each other")
    if cache_batch_idx.dtype == torch.int64:  # unchecked (CUDA, compile): out of range stays out of range in int32
        cache_batch_idx = cache_batch_idx.clamp(-1, n_rows)
    return cache_batch_idx.to(torch.int32).view(B, 1)


def _splits(num_splits):
    """num_splits for the decode kernels' custom op (an int64 argument): the kernels never use more splits than key
    blocks, so a count past int32 is as many as there are (2**63 overflowed the op's argument)."""
    return min(int(num_splits), 2**31 - 1)


def _check_block_table(block_table, B, k_cache, device, cache_name="k_cache"):
    """Validate a paged cache's block table; returns the per-row capacity Tmax."""
    _tensor("block_table", block_table)
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != B:
        raise ValueError(f"block_table must be an int32 tensor [batch={B}, pages_per_row], "
                         f"got {block_table.dtype} {tuple(block_table.shape)}")
    if block_table.device != device:
        raise ValueError(f"block_table is on {block_table.device} but q is on {device}")
    n_pages = k_cache.shape[0]
    if block_table.device.type == "cpu" and _checking_values() and block_table.numel():
        lo, hi = int(block_table.min()), int(block_table.max())
        if lo < 0 or hi >= n_pages:
            raise ValueError(f"block_table entries must be page indices in 0..{n_pages - 1} ({cache_name}'s first "
                             f"dimension), got values in {lo}..{hi}")
    return block_table.shape[1] * k_cache.shape[2]


def _page_index(block_table):
    """An int32 block table as int64 indices, negative entries read as unsigned (-1 -> 2^32 - 1): out of range,
    so indexing raises (a device-side assert on CUDA) where a negative index would wrap to the pool's last page,
    another sequence's, unnoticed (the host-side range check runs on CPU tensors in eager mode only)."""
    return block_table.to(torch.long) & 0xFFFFFFFF


def _append(k_cache, v_cache, block_table, cache_seqlens, k, v, backend):
    """Write the new tokens k [B, Hk, t, D] / v [B, Hk, t, Dv] at each row's positions cache_seqlens[b] + i: one
    Triton launch on the kernels' backend (eager), else indexing ops (the CPU paths; torch.compile, which traces
    and fuses them). LLMKERN_KV_APPEND_KERNEL=0 takes the indexing ops on the kernels' backend too (for timing
    both: benchmarks/gpu_diag.py host)."""
    kernel = backend == "triton" and os.environ.get("LLMKERN_KV_APPEND_KERNEL") != "0"
    if kernel and not torch.compiler.is_compiling():
        from llmkern.kernels.attention_decode import append_kv

        return append_kv(k_cache, v_cache, cache_seqlens, k, v, block_table)
    B, Hk, t = k.shape[:3]
    pos = (cache_seqlens.to(torch.long)[:, None] + torch.arange(t, device=k.device)[None, :])
    if block_table is not None:
        return _append_paged(k_cache, v_cache, block_table, pos, k, v)
    idx = pos[:, None, :, None]
    _bytes(k_cache).scatter_(2, idx.expand(B, Hk, t, k.shape[3]), _bytes(k))
    _bytes(v_cache).scatter_(2, idx.expand(B, Hk, t, v.shape[3]), _bytes(v))


def _append_paged(k_cache, v_cache, block_table, pos, k, v):
    """Write new tokens k [B, Hk, t, D] / v [B, Hk, t, Dv] at positions pos [B, t] of each row's pages."""
    page_size = k_cache.shape[2]
    pages = torch.gather(_page_index(block_table), 1, pos // page_size).reshape(-1)  # [B * t]
    slots = (pos % page_size).reshape(-1)
    k_cache[pages, :, slots] = k.permute(0, 2, 1, 3).reshape(-1, k.shape[1], k.shape[3])
    v_cache[pages, :, slots] = v.permute(0, 2, 1, 3).reshape(-1, v.shape[1], v.shape[3])


def _gather_pages(cache, block_table):
    """A page pool [num_pages, Hk, page_size, D] as each row's dense cache [B, Hk, Tmax, D] (D: the pool's)."""
    B, n = block_table.shape
    pages = cache[_page_index(block_table)]  # [B, n, Hk, page_size, D]
    return pages.permute(0, 2, 1, 3, 4).reshape(B, cache.shape[1], n * cache.shape[2], cache.shape[3])


__all__ = ["attention", "attention_varlen", "attention_with_kvcache", "quantize_kv"]
