"""Reference of llmkern.swiglu / llmkern.geglu: plain PyTorch, differentiable; the test oracle and the
CPU path.

    swiglu(gate, up)                    = silu(gate) * up
    geglu(gate, up, approximate="tanh") = gelu(gate, approximate) * up

Computed in float32 (float64 stays float64) and returned in the inputs' dtype: one rounding, where
eager ``F.silu(gate) * up`` in bfloat16 rounds the activation first and the product again. Not
exported from llmkern.reference (the name is this module's): use ``llmkern.reference.swiglu.swiglu``.
"""
import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


def activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """silu, gelu with the tanh approximation ("gelu_tanh", Gemma's gelu_pytorch_tanh) or exact gelu."""
    if act == "silu":
        return F.silu(x)
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if act == "gelu":
        return F.gelu(x)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {act!r}")


def gated(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    dt = torch.float64 if gate.dtype == torch.float64 else torch.float32
    return (activation(gate.to(dt), act) * up.to(dt)).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gated(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    return gated(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")
