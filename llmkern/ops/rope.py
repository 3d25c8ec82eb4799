"""Fused rotary position embeddings on q and k: public API, validation, registration, dispatch, autograd.

    rope(q, k, cos, sin, interleaved=False) == transformers' apply_rotary_pos_emb(q, k, cos, sin)
                                               (computed in float32, one rounding to q's dtype)

Kernel: llmkern/kernels/rope.py (one launch rotates q and k: one program per (token, block of heads),
the token's cos / sin read once); reference: llmkern/reference/rope.py. The Triton path runs inside
the torch.library custom op `llmkern::rope(q, k, cos, sin, interleaved, transpose)`, whose autograd
is the same op with the transposed rotation (so it is differentiable any number of times), and
which traces under torch.compile(fullgraph=True) as one opaque node and passes `opcheck`.

Dispatch: CUDA tensors run the Triton kernel (float32, float16, bfloat16 q / k). CPU tensors run the
reference unless LLMKERN_BACKEND=triton, which runs the same kernel under TRITON_INTERPRET=1
(float32/float16; the interpreter has no bfloat16). float64 always uses the reference.

Memory traffic: eager apply_rotary_pos_emb moves each of q and k about 11 times (x * cos, the halves,
negation and cat of rotate_half, rot(x) * sin, the sum: ~6.5 reads and ~4.5 writes of x's size) and
its backward as much again; this op reads q and k once and writes the outputs once (the backward the
same with the gradients), plus cos / sin once per token.
"""
from typing import Tuple

import torch

from llmkern import _backend
from llmkern.ops import _checks
from llmkern.reference import rope as ref

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPES = _KERNEL_DTYPES + (torch.float64,)


# ---- dispatch -----------------------------------------------------------------------------------

def _backend_for(device, dtype=torch.float32, op_name="rope"):
    return _backend.choose_triton(op_name, device, dtype, _KERNEL_DTYPES)


_backend.register_op("rope", lambda device, dtype: _backend_for(device, dtype))


# ---- validation ---------------------------------------------------------------------------------

_tensor = _checks.tensor_arg


def _check(q, k, cos, sin, interleaved):
    _tensor("q", q)
    _tensor("k", k)
    _tensor("cos", cos)
    _tensor("sin", sin)
    interleaved = _checks.bool_arg("interleaved", interleaved, ints=False)  # (as attention's rotary_interleaved)
    if q.dtype not in _DTYPES:
        raise ValueError(f"q must be float32, float16 or bfloat16 (float64: reference only), got {q.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q must have shape [B, Hq, T, D] (heads before tokens, as for attention), "
                         f"got {tuple(q.shape)}")
    B, _, T, D = q.shape
    if k.dim() != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (B, T, D):
        raise ValueError(f"k must have shape [B={B}, Hk, T={T}, D={D}] like q (Hk may differ: GQA), "
                         f"got {tuple(k.shape)}")
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if k.dtype != q.dtype:
        raise ValueError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    _check_cos_shape(cos, B, T, D)
    return interleaved


def _check_cos_shape(cos, B, T, D):
    shape = tuple(cos.shape)
    ok = (len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, B))
          or (len(shape) == 4 and shape[0] in (1, B) and shape[1] == 1))
    if not ok or shape[-2] != T:
        raise ValueError(f"cos / sin must have shape [T, R], [B, T, R] or [B, 1, T, R] with T={T} (q.shape[2]) "
                         f"and B={B} or 1, got {shape}")
    R = shape[-1]
    if R > D or R < 1:
        raise ValueError(f"cos / sin's last dim (the rotary dim R) must be in [2, head_dim={D}], got {R}")
    if R % 2:
        what = f"q / k's head_dim ({D}) must be even" if R == D else f"the rotary dim R ({R}) must be even"
        raise ValueError(f"{what}: RoPE rotates channels in pairs (cos / sin have shape {shape})")


# ---- torch.library op (the Triton path) ---------------------------------------------------------

def _kern():
    from llmkern.kernels import rope as kern

    return kern


@torch.library.custom_op("llmkern::rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
             transpose: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q_out, k_out) = the rotation of q and k (transpose: its transpose, i.e. the backward)."""
    return _impl(q, k, cos, sin, interleaved, transpose)


def _impl(q, k, cos, sin, interleaved, transpose):
    return _kern().rope_apply(q, k, cos, sin, interleaved=interleaved, transpose=transpose)


@_rope_op.register_fake
def _(q, k, cos, sin, interleaved, transpose):
    return torch.empty_like(q), torch.empty_like(k)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, interleaved, transpose = inputs
    # q and k are kept only when cos / sin need a gradient (rare: transformers never trains them)
    need_cs = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    ctx.save_for_backward(cos, sin, q if need_cs else None, k if need_cs else None)
    ctx.args = (interleaved, transpose)
    # an output depends on its own input and on cos / sin only: q_out needs no grad when only k does (autograd
    # would mark every output of the Function as requiring grad, unlike the unfused expression)
    need = ctx.needs_input_grad
    for out, own in zip(output, need[:2]):
        if not (own or need_cs):
            ctx.mark_non_differentiable(out)


def _backward(ctx, dq, dk):
    cos, sin, q, k = ctx.saved_tensors
    interleaved, transpose = ctx.args
    gq, gk = _rope(dq, dk, cos, sin, interleaved, not transpose)  # linear: the transposed rotation
    gcos = gsin = None
    if q is not None:
        gcos, gsin = ref.cos_sin_grad(dq, dk, q, k, cos, sin, interleaved, transpose)
    return gq, gk, gcos, gsin, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)


_RopeFunction = _checks.eager_twin("_RopeFunction", _impl, _setup_context, _backward,
                                   "The eager twin of llmkern::rope.", once_differentiable=False)


def _rope(q, k, cos, sin, interleaved, transpose):
    """The rotation, differentiable: the custom op under torch.compile, its eager twin otherwise."""
    if _checks.eager_fast_path(q, k, cos, sin):
        return _RopeFunction.apply(q, k, cos, sin, interleaved, transpose)
    return _rope_op(q, k, cos, sin, interleaved, transpose)


# ---- public API ---------------------------------------------------------------------------------

def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
         interleaved: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embeddings applied to q and k in one fused launch, with their gradients.

    Equal to transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` (non-interleaved): per head,
    ``x * cos + rotate_half(x) * sin``, computed in float32 and rounded once to q's dtype.

    Args:
        q: [B, Hq, T, D] (the attention layout, e.g. the transpose(1, 2) of a [B, T, Hq, D]
            projection: any strides are read in place), float32 / float16 / bfloat16 (float64:
            reference only).
        k: [B, Hk, T, D], q's dtype and device; Hk may differ from Hq (GQA / MQA).
        cos, sin: [T, R], [B, T, R] or [B, 1, T, R] (B may be 1: shared by the batch), any float
            dtype (converted to float32 in the kernel), R <= D and even. Non-interleaved they are
            transformers' position_embeddings, cos = cat(freqs, freqs).cos() (channel j and
            j + R/2 share an angle); interleaved, each angle is repeated twice in a row,
            cos = freqs.repeat_interleave(2, -1).cos() (channels 2i and 2i+1 share one). Either way
            the op computes x[..., :R] * cos + rot(x[..., :R]) * sin channel by channel, exactly.
            R < D is partial rotary (GPT-NeoX's rotary_pct, Phi's partial_rotary_factor): channels
            [R, D) pass through unchanged.
        interleaved: False rotates the pairs (i, i + R/2) (GPT-NeoX / Llama / transformers'
            rotate_half); True the pairs (2i, 2i + 1) (GPT-J, Meta's original Llama code, which
            uses complex multiplication on consecutive pairs).

    Returns (q_out, k_out) in q's dtype, shaped like q and k (laid out like them when they are
    dense, e.g. still [B, T, H, D] in memory for a transposed projection).

    Gradients flow to q and k (the transposed rotation, fused, one launch for both). cos / sin get
    gradients too when they require them (computed in plain PyTorch from the saved q and k, which
    are kept only in that case); transformers never trains them.

    Rounding: transformers in bfloat16 computes q * cos, rotate_half(q) * sin and their sum each
    rounded to bfloat16 (cos / sin cast to q's dtype first); this op rounds once, so it differs
    from that by up to about 1 bfloat16 ulp of the result (|x| * 2^-8), and is the closer of the two
    to the exact value. In float32 both agree to about 1e-6 relative. cos / sin given in float32
    with bfloat16 q are used in float32 (transformers would have rounded them to bfloat16) and the
    result is still bfloat16.
    """
    interleaved = _check(q, k, cos, sin, interleaved)
    backend = _backend_for(q.device, q.dtype)
    if backend != "triton" or q.numel() + k.numel() == 0:
        return ref.rope(q, k, cos, sin, interleaved=interleaved)
    return _rope(q, k, cos, sin, interleaved, False)


__all__ = ["rope"]
