"""Fused gated activations (SwiGLU, GeGLU): public API, validation, registration, dispatch, autograd.

    swiglu(gate, up)                    == F.silu(gate) * up                          (Llama, Mistral, Qwen)
    geglu(gate, up, approximate="tanh") == F.gelu(gate, approximate="tanh") * up      (Gemma)

computed in float32 and rounded once to the inputs' dtype. Kernels: llmkern/kernels/swiglu.py (forward:
one read of gate and up, one write; backward: one read of dout, gate, up, one write of dgate and dup,
the activation recomputed from gate); reference: llmkern/reference/swiglu.py. The Triton path runs
inside the torch.library custom ops `llmkern::swiglu_fwd` / `llmkern::swiglu_bwd` (autograd
registered on the forward), so the op traces under torch.compile(fullgraph=True) as one opaque node
and passes `opcheck`.

Dispatch: CUDA tensors run the Triton kernels (float32, float16, bfloat16). CPU tensors run the
reference unless LLMKERN_BACKEND=triton, which runs the same kernels under TRITON_INTERPRET=1
(float32/float16; the interpreter has no bfloat16). float64 always uses the reference.

Memory traffic per element (bf16): eager ``F.silu(g) * u`` reads g, writes silu(g), reads it and u,
writes the product (10 bytes) forward and saves silu(g) for the backward (an extra activation-sized
tensor per MLP); its backward moves about 18 more (three elementwise kernels). This op moves 6 bytes
forward, 10 backward, and saves only gate and up (which autograd keeps anyway for the projections).
"""
import functools
from typing import Tuple

import torch

from llmkern import _backend
from llmkern.ops import _checks
from llmkern.reference import swiglu as ref

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPES = _KERNEL_DTYPES + (torch.float64,)
_APPROXIMATE = {"tanh": "gelu_tanh", "none": "gelu"}


# ---- dispatch -----------------------------------------------------------------------------------

def _backend_for(device, dtype=torch.float32, op_name="swiglu"):
    return _backend.choose_triton(op_name, device, dtype, _KERNEL_DTYPES)


_backend.register_op("swiglu", lambda device, dtype: _backend_for(device, dtype))


# ---- validation ---------------------------------------------------------------------------------

def _check(gate, up):
    _checks.tensor_arg("gate", gate)
    _checks.tensor_arg("up", up)
    if gate.dtype not in _DTYPES:
        raise ValueError(f"gate must be float32, float16 or bfloat16 (float64: reference only), got {gate.dtype}")
    if up.dtype != gate.dtype:
        raise ValueError(f"up must have gate's dtype {gate.dtype}, got {up.dtype}")
    if up.device != gate.device:
        raise ValueError(f"up is on {up.device} but gate is on {gate.device}")
    if up.shape != gate.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)} "
                         f"(a fused [..., 2F] projection: pass x[..., :F] and x[..., F:])")
    if gate.dim() < 1:
        raise ValueError("gate and up must have at least one dimension, got 0-dim tensors")


# ---- torch.library ops (the Triton path) --------------------------------------------------------

def _kern():
    from llmkern.kernels import swiglu as kern

    return kern


@torch.library.custom_op("llmkern::swiglu_fwd", mutates_args=())
def _glu_fwd_op(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up, contiguous; activation: "silu", "gelu_tanh" or "gelu"."""
    return _fwd_impl(gate, up, activation)


def _fwd_impl(gate, up, activation):
    return _kern().glu_forward(gate, up, activation)


@_glu_fwd_op.register_fake
def _(gate, up, activation):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("llmkern::swiglu_bwd", mutates_args=())
def _glu_bwd_op(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                activation: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _bwd_impl(dout, gate, up, activation)


def _bwd_impl(dout, gate, up, activation):
    return _kern().glu_backward(dout, gate, up, activation)


@_glu_bwd_op.register_fake
def _(dout, gate, up, activation):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _setup_context(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)  # act(gate) is recomputed: nothing activation-sized is added
    ctx.activation = activation


def _backward(ctx, dout, bwd=None):
    gate, up = ctx.saved_tensors
    dgate, dup = (bwd or _glu_bwd_op)(dout, gate, up, ctx.activation)
    return dgate, dup, None


_glu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


_GatedFunction = _checks.eager_twin("_GatedFunction", _fwd_impl, _setup_context,
                                    functools.partial(_backward, bwd=_bwd_impl),
                                    "The eager twin of llmkern::swiglu_fwd / _bwd.")


def _gated(gate, up, activation):
    _check(gate, up)
    if _backend_for(gate.device, gate.dtype) != "triton" or gate.numel() == 0:
        return ref.gated(gate, up, activation)
    if _checks.eager_fast_path(gate, up):
        return _GatedFunction.apply(gate, up, activation)
    return _glu_fwd_op(gate, up, activation)


# ---- public API ---------------------------------------------------------------------------------

def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gating, ``silu(gate) * up`` (Llama's MLP: down_proj(swiglu(gate_proj(x), up_proj(x)))),
    fused, with its gradient.

    Args:
        gate, up: the same shape [..., F] (any leading dims), dtype (float32 / float16 / bfloat16;
            float64: reference only) and device. Any strides are read in place when the leading
            dims flatten into one row stride (the halves x[..., :F], x[..., F:] of a fused
            [..., 2F] gate-up projection included); other layouts are copied first.

    Returns a contiguous tensor of gate's shape and dtype. Computed in float32 and rounded once (eager
    ``F.silu(gate) * up`` in bfloat16 rounds silu(gate) first, then the product: results differ by
    about 1 bfloat16 ulp; in float32 they agree to ~1e-6 relative). The backward recomputes
    silu(gate) from gate: only gate and up are saved.
    """
    return _gated(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """GeGLU's gating, ``gelu(gate, approximate) * up`` (Gemma's MLP uses approximate="tanh", i.e.
    transformers' gelu_pytorch_tanh), fused, with its gradient. approximate: "tanh" (default) or
    "none" (the exact erf gelu, F.gelu's default). Shapes, dtypes, layouts and rounding as for
    ``swiglu``.
    """
    if not isinstance(approximate, str) or approximate not in _APPROXIMATE:  # (a list: "unhashable type", unnamed)
        raise ValueError(f"approximate must be 'tanh' or 'none' (as for F.gelu), got {approximate!r}")
    return _gated(gate, up, _APPROXIMATE[approximate])


__all__ = ["swiglu", "geglu"]
