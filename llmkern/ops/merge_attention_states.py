"""Merging attention states: public API, validation, registration, dispatch.

    merge_attention_states(out_a, lse_a, out_b, lse_b) -> (out, lse)

Attention of the same queries over two disjoint key sets A and B, each with its log-sum-exp (``return_lse=True``
of llmkern.attention / attention_with_kvcache / mla_decode), gives the attention over A and B together:

    out = (w_a out_a + w_b out_b) / (w_a + w_b),  w = exp(lse - max(lse_a, lse_b)),  lse = logsumexp(lse_a, lse_b)

(FlashInfer's merge_state, vLLM's merge_attn_states). This is what cascade (shared-prefix) decoding needs: a
batch whose rows share a long prompt attends to the prompt's K/V once for all rows (one K/V row, the rows'
queries as its query positions: q.transpose(0, 2), non-causal) and to each row's own suffix separately, then
merges (tests/test_merge_attention_states.py does exactly this); chunked prefill over a cached prefix and
context parallelism merge the same way.

Kernel: llmkern/kernels/merge_attention_states.py (one pass: each input row read once, the merged row
written once, float32 math); reference: llmkern/reference/attention.py merge_attention_states (torch ops,
differentiable). Calls that need gradients (grad mode on and an input that requires grad) run the reference,
whose autograd gives d out_a, d lse_a, d out_b, d lse_b; the others run the kernel on CUDA (and under
TRITON_INTERPRET=1 with LLMKERN_BACKEND=triton), inside the custom op `llmkern::merge_attention_states`.
"""
from typing import Tuple

import torch

from llmkern import _backend
from llmkern.ops import _checks
from llmkern.reference import attention as ref

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPES = _KERNEL_DTYPES + (torch.float64,)

_backend.register_op("merge_attention_states",
                     lambda device, dtype: _backend.choose_triton("merge_attention_states", device, dtype,
                                                                  _KERNEL_DTYPES))


def _merge_impl(out_a, lse_a, out_b, lse_b):
    """llmkern::merge_attention_states's implementation: (out, lse) from the kernel."""
    from llmkern.kernels.merge_attention_states import merge_attention_states as kernel

    D, N = out_a.shape[-1], lse_a.numel()  # (N rows, not -1: a head dim of 0 leaves -1 undetermined)
    out, lse = kernel(out_a.reshape(N, D).contiguous(), lse_a.reshape(N).contiguous(),
                      out_b.reshape(N, D).contiguous(), lse_b.reshape(N).contiguous())
    return out.view(out_a.shape), lse.view(lse_a.shape)


@torch.library.custom_op("llmkern::merge_attention_states", mutates_args=())
def _merge_op(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
              lse_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return _merge_impl(out_a, lse_a, out_b, lse_b)


@_merge_op.register_fake
def _(out_a, lse_a, out_b, lse_b):
    return out_a.new_empty(out_a.shape), lse_a.new_empty(lse_a.shape, dtype=torch.float32)


def _check(out_a, lse_a, out_b, lse_b):
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        _checks.tensor_arg(name, t)
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != out_a.device:
            raise ValueError(f"{name} is on {t.device} but out_a is on {out_a.device}")
    if out_a.dtype not in _DTYPES or out_b.dtype != out_a.dtype:
        raise ValueError(f"out_a and out_b must share a dtype in {[str(d) for d in _DTYPES]}, got {out_a.dtype} "
                         f"and {out_b.dtype}")
    if out_a.dim() < 1 or out_b.shape != out_a.shape:
        raise ValueError(f"out_a and out_b must have the same shape [..., head_dim], got {tuple(out_a.shape)} and "
                         f"{tuple(out_b.shape)}")
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if lse.shape != out_a.shape[:-1]:
            raise ValueError(f"{name} must have out_a's shape without its last dimension, "
                             f"{tuple(out_a.shape[:-1])}, got {tuple(lse.shape)} (attention_varlen's LSE is "
                             f"[heads, tokens]: pass lse.transpose(0, 1))")


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                           lse_b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The attention state over the union of two disjoint key sets, from each set's (out, lse).

    out_a, out_b [..., head_dim] (one floating dtype; e.g. [batch, heads, Tq, Dv]); lse_a, lse_b [...] (natural
    log, as the attention ops return it; any floating dtype). A side whose LSE is -inf (its queries saw no key)
    weighs nothing; both -inf give a zero output and LSE -inf; NaN propagates, and so does an LSE of +inf (no
    attention op returns one) as NaN. Returns (out in out_a's dtype,
    lse float32; float64 for float64 outputs). Differentiable in all four inputs.
    """
    _check(out_a, lse_a, out_b, lse_b)
    backend = _backend.choose_triton("merge_attention_states", out_a.device, out_a.dtype, _KERNEL_DTYPES)
    if backend == "triton" and not _checks.wants_grad(out_a, lse_a, out_b, lse_b):
        return _checks.op_or_impl(_merge_op, _merge_impl, out_a, lse_a, out_b, lse_b)
    return ref.merge_attention_states(out_a, lse_a, out_b, lse_b)


__all__ = ["merge_attention_states"]
