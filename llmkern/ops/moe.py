"""Fused Mixture-of-Experts MLP (Mixtral, Qwen-MoE, DeepSeek-MoE, ...): public API, validation,
registration, dispatch, autograd.

    moe_route(router_logits, k, renormalize=True) -> (topk_weights, topk_ids)      softmax + top-k
    moe_mlp(x, w_gate_up, w_down, topk_ids, topk_weights, activation="swiglu") -> y
        y[t] = Σ_j topk_weights[t, j] · down_e(act(gate_e(x_t)) · up_e(x_t)),   e = topk_ids[t, j]
        (a slot with e = NO_EXPERT = -1, dropped by a capacity limit or owned by another rank, adds nothing)

Kernels: llmkern/kernels/moe.py (the T·k (token, slot) pairs sorted by expert on the device, grouped
GEMMs over the sorted rows with the activation fused into the first one's epilogue, a deterministic
weighted combine; the backward as grouped GEMMs plus per-expert row reductions for the weight
gradients); reference: llmkern/reference/moe.py (transformers' loop over experts). The Triton path
runs inside the torch.library custom ops `llmkern::moe_mlp_fwd` / `llmkern::moe_mlp_bwd` (autograd
registered on the forward), so the op traces under torch.compile(fullgraph=True) as one opaque node
and passes `opcheck`; eager calls take its autograd.Function twin (same kernels, no dispatcher cost).

Dispatch: CUDA tensors run the Triton kernels (float32, float16, bfloat16). CPU tensors run the
reference unless LLMKERN_BACKEND=triton, which runs the same kernels under TRITON_INTERPRET=1
(float32/float16). float64 always uses the reference.
"""
import functools
import math
import numbers
from typing import Tuple

import torch

from llmkern import _backend
from llmkern.ops import _checks
from llmkern.reference import moe as ref

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPES = _KERNEL_DTYPES + (torch.float64,)
_INT_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)
# moe_mlp's activation -> the kernels' act (llmkern/kernels/swiglu.py ACTS); "geglu_exact" is the gate of
# llmkern.geglu(approximate="none"), F.gelu's default erf form
_ACTS = ref.ACTIVATIONS  # activation name -> the kernels' fused activation
NO_EXPERT = -1  # the topk_ids value of a dropped slot, on every device
MAX_EXPERTS = 1024  # llmkern/kernels/moe.py's MAX_EXPERTS (not imported: that module needs Triton)


# ---- dispatch -----------------------------------------------------------------------------------

def _backend_for(device, dtype=torch.float32):
    return _backend.choose_triton("moe_mlp", device, dtype, _KERNEL_DTYPES)


_backend.register_op("moe_mlp", lambda device, dtype: _backend_for(device, dtype))


# ---- validation ---------------------------------------------------------------------------------

def _check_same_device(name, t, x):
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_weights(x, w_gate_up, w_down):
    """(E, F) of w_gate_up [E, 2F, d] and w_down [E, d, F]."""
    d = x.shape[-1]
    if w_gate_up.dim() != 3 or w_gate_up.shape[2] != d or w_gate_up.shape[1] % 2 or w_gate_up.shape[1] == 0:
        raise ValueError(f"w_gate_up must have shape [n_experts, 2 * ffn_dim, {d}] (gate rows first, then up), "
                         f"got {tuple(w_gate_up.shape)}")
    E, F = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"w_gate_up must hold 1..{MAX_EXPERTS} experts, got {E}")
    if tuple(w_down.shape) != (E, d, F):
        raise ValueError(f"w_down must have shape [{E}, {d}, {F}] (n_experts, hidden, ffn_dim), "
                         f"got {tuple(w_down.shape)}")
    for name, w in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if w.dtype != x.dtype:
            raise ValueError(f"{name} must have the dtype of x ({x.dtype}), got {w.dtype}")
        _check_same_device(name, w, x)
    return E, F


def _check_routing(x, topk_ids, topk_weights, E):
    """(T, k): topk_ids / topk_weights hold k slots per token of x, as [..., k] or [T, k]."""
    T = x.numel() // x.shape[-1]
    if topk_ids.dtype not in _INT_DTYPES:
        raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if topk_ids.dim() < 1 or topk_ids.shape[-1] < 1:
        raise ValueError(f"topk_ids must have shape [..., k] with k >= 1, got {tuple(topk_ids.shape)}")
    k = topk_ids.shape[-1]
    if topk_ids.shape[:-1] != x.shape[:-1] and tuple(topk_ids.shape) != (T, k):
        raise ValueError(f"topk_ids must hold k ids per token: shape {tuple(x.shape[:-1]) + (k,)} or [{T}, {k}], "
                         f"got {tuple(topk_ids.shape)}")
    if not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be a floating-point tensor, got {topk_weights.dtype}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_weights must have topk_ids' shape {tuple(topk_ids.shape)}, "
                         f"got {tuple(topk_weights.shape)}")
    _check_same_device("topk_ids", topk_ids, x)
    _check_same_device("topk_weights", topk_weights, x)
    # the ids' range costs a host sync on CUDA: checked on CPU only (the kernels skip bad ids on CUDA)
    if topk_ids.device.type == "cpu" and topk_ids.numel() and _checks.checking_values() \
            and _checks.has_values(topk_ids):
        lo, hi = torch.aminmax(topk_ids.to(torch.int64))
        if lo < NO_EXPERT or hi >= E:
            raise ValueError(f"topk_ids must be in [0, {E}) (n_experts) or {NO_EXPERT} (a dropped slot: no expert), "
                             f"got values in [{int(lo)}, {int(hi)}]")
    return T, k


def _check(x, w_gate_up, w_down, topk_ids, topk_weights, activation):
    for name, t in (("x", x), ("w_gate_up", w_gate_up), ("w_down", w_down), ("topk_ids", topk_ids),
                    ("topk_weights", topk_weights)):
        _checks.tensor_arg(name, t)
    if not isinstance(activation, str) or activation not in _ACTS:  # (a list: "unhashable type", unnamed)
        raise ValueError(f"activation must be one of {tuple(_ACTS)}, got {activation!r}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16 (float64: reference only), got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape [..., hidden] with hidden >= 1, got {tuple(x.shape)}")
    E, F = _check_weights(x, w_gate_up, w_down)
    T, k = _check_routing(x, topk_ids, topk_weights, E)
    return T, k, E, F


# ---- torch.library ops (the Triton path) --------------------------------------------------------

def _kern():
    from llmkern.kernels import moe as kern

    return kern


@torch.library.custom_op("llmkern::moe_mlp_fwd", mutates_args=())
def _moe_fwd_op(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, order: torch.Tensor, seg: torch.Tensor, activation: str,
                save_h: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y [T, d], h [T·k, 2F] or [0, 2F]); x [T, d], topk_ids int32 / topk_weights [T, k], order / seg
    from kernels.moe.sort_pairs."""
    return _fwd_impl(x, w_gate_up, w_down, topk_ids, topk_weights, order, seg, activation, save_h)


def _fwd_impl(x, w_gate_up, w_down, topk_ids, topk_weights, order, seg, activation, save_h):
    return _kern().moe_forward(x, w_gate_up, w_down, topk_ids, topk_weights, order, seg, activation, save_h)


@_moe_fwd_op.register_fake
def _(x, w_gate_up, w_down, topk_ids, topk_weights, order, seg, activation, save_h):
    n = topk_ids.numel() if save_h else 0
    return x.new_empty(x.shape), x.new_empty((n, w_gate_up.shape[1]))


@torch.library.custom_op("llmkern::moe_mlp_bwd", mutates_args=())
def _moe_bwd_op(dy: torch.Tensor, x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                topk_ids: torch.Tensor, topk_weights: torch.Tensor, order: torch.Tensor, seg: torch.Tensor,
                h: torch.Tensor, activation: str, need_x: bool, need_w_gate_up: bool,
                need_w_down: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw_gate_up, dw_down, dtopk_weights); a gradient not asked for is an empty [0] tensor."""
    return _bwd_impl(dy, x, w_gate_up, w_down, topk_ids, topk_weights, order, seg, h, activation,
                     need_x, need_w_gate_up, need_w_down)


def _bwd_impl(dy, x, w_gate_up, w_down, topk_ids, topk_weights, order, seg, h, activation,
              need_x, need_w_gate_up, need_w_down):
    grads = _kern().moe_backward(dy, x, w_gate_up, w_down, topk_ids, topk_weights, order, seg, h, activation,
                                 need_x, need_w_gate_up, need_w_down)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_moe_bwd_op.register_fake
def _(dy, x, w_gate_up, w_down, topk_ids, topk_weights, order, seg, h, activation,
      need_x, need_w_gate_up, need_w_down):
    def grad(need, t):
        return t.new_empty(t.shape) if need else x.new_empty(0)

    return grad(need_x, x), grad(need_w_gate_up, w_gate_up), grad(need_w_down, w_down), \
        topk_weights.new_empty(topk_weights.shape)


def _setup_context(ctx, inputs, output):
    x, w_gate_up, w_down, topk_ids, topk_weights, order, seg, activation, save_h = inputs
    ctx.save_for_backward(x, w_gate_up, w_down, topk_ids, topk_weights, order, seg, output[1])
    ctx.activation = activation
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero [T·k, 2F] gradient for h


def _backward(ctx, dy, _dh, bwd=None):
    need = ctx.needs_input_grad
    if dy is None:
        return (None,) * 9
    dx, dwgu, dwd, dtw = (bwd or _moe_bwd_op)(dy, *ctx.saved_tensors, ctx.activation, need[0], need[1], need[2])
    return (dx if need[0] else None, dwgu if need[1] else None, dwd if need[2] else None, None,
            dtw if need[4] else None, None, None, None, None)


_moe_fwd_op.register_autograd(_backward, setup_context=_setup_context)


_MoEFunction = _checks.eager_twin("_MoEFunction", _fwd_impl, _setup_context,
                                  functools.partial(_backward, bwd=_bwd_impl),
                                  "The eager twin of llmkern::moe_mlp_fwd / _bwd.", materialize_grads=False)


# ---- public API ---------------------------------------------------------------------------------

def moe_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_ids: torch.Tensor,
            topk_weights: torch.Tensor, activation: str = "swiglu") -> torch.Tensor:
    """A sparse Mixture-of-Experts MLP, fused: each token through its k experts' gated MLPs, summed
    with the routing weights.

        y[t] = Σ_j topk_weights[t, j] · w_down[e] · (act(w_gate_up[e][:F] · x_t) * (w_gate_up[e][F:] · x_t)),
        e = topk_ids[t, j]

    Args:
        x: [..., d] float32 / float16 / bfloat16 (float64: reference only); the leading dims are tokens.
        w_gate_up: [E, 2F, d], x's dtype: each expert's gate rows [0, F) then up rows [F, 2F)
            (transformers' MixtralExperts.gate_up_proj; Mixtral's w1 and w3 stacked). Any strides.
        w_down: [E, d, F], x's dtype (nn.Linear layout per expert). Any strides.
        topk_ids: integer [..., k] (x's leading dims) or [T, k], values in [0, E) or -1. The k
            ids of a token are normally distinct (top-k); repeated ids are summed like distinct experts,
            and k may exceed E (an expert-parallel rank holds fewer experts than a token's k slots). -1 marks a
            dropped slot (a capacity-limited router's overflow, an expert on another
            rank under expert parallelism), on every device and backend: the slot adds nothing and its
            topk_weight gets gradient 0. Other values are checked on CPU in eager calls (ValueError); where
            the ids are not read on the host (CUDA, torch.compile) any id outside [0, E) is treated like -1.
        topk_weights: floating point, topk_ids' shape (any float dtype: a float32 router's weights
            with a bf16 x are read as they are). Its gradient is the router's.
        activation: "swiglu" (silu(g) * u: Mixtral, Qwen-MoE, DeepSeek), "geglu" (tanh-approximated
            gelu(g) * u: Gemma-4, llmkern.geglu's default) or "geglu_exact" (the exact erf gelu(g) * u:
            F.gelu's default, llmkern.geglu(approximate="none")).

    Returns y with x's shape and dtype. Differentiable in x, w_gate_up, w_down and topk_weights.
    Accumulates in float32; the activation a = act(g)·u is rounded to x's dtype before the down
    projection, like an eager model. Deterministic (no atomics). The backward keeps (g | u)
    [T·k, 2F] in x's dtype and the expert sort, nothing else activation-sized.

    Under torch.autocast, x, w_gate_up and w_down are cast to the autocast dtype first, as each expert's
    F.linear would be, on every backend, and y is returned in x's dtype, as transformers' experts (which add
    into zeros_like(x)) return it.
    """
    dt = _checks.autocast_dtype(x)
    if dt is None or x.dtype == torch.float64:  # (autocast leaves float64 alone)
        return _moe_mlp(x, w_gate_up, w_down, topk_ids, topk_weights, activation)
    # Autocast off inside: the kernels ignore it, while the CPU reference's float32 matmuls would be cast
    # (h rounded before the activation). Without the casts the kernels ran float32 x in float32 GEMMs and
    # the reference in the autocast dtype: two backends, two results for one call.
    cast = [_checks.autocast_cast(dt, t) for t in (x, w_gate_up, w_down)]
    with torch.autocast(x.device.type, enabled=False):
        y = _moe_mlp(*cast, topk_ids, topk_weights, activation)
    return y.to(x.dtype)


def _moe_mlp(x, w_gate_up, w_down, topk_ids, topk_weights, activation):
    T, k, E, F = _check(x, w_gate_up, w_down, topk_ids, topk_weights, activation)
    if _backend_for(x.device, x.dtype) != "triton":
        return ref.moe_mlp(x, w_gate_up, w_down, topk_ids, topk_weights, activation)
    kern = _kern()
    # out-of-range ids (unchecked on CUDA: no host sync) become -1 before the narrowing cast, so that a huge
    # int64 id cannot wrap onto a real expert; the kernels skip -1
    ids = topk_ids.reshape(T, k)
    ids = torch.where((ids < 0) | (ids >= E), NO_EXPERT, ids).to(torch.int32).contiguous()
    tw = topk_weights.reshape(T, k).contiguous()
    x2 = x.reshape(T, x.shape[-1]).contiguous()
    order, seg = kern.sort_pairs(ids, E)
    save_h = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_gate_up, w_down, topk_weights))
    args = (x2, w_gate_up, w_down, ids, tw, order, seg, _ACTS[activation], save_h)
    if _checks.eager_fast_path(x2, w_gate_up, w_down, tw):
        y = _MoEFunction.apply(*args)[0]
    else:
        y = _moe_fwd_op(*args)[0]
    return y.reshape(x.shape)


def moe_route(router_logits: torch.Tensor, k: int, renormalize: bool = True
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The usual softmax top-k router: (topk_weights, topk_ids) for moe_mlp.

    router_logits [..., E] (any float dtype; the softmax runs in float32, float64 stays float64);
    k in 1..E. topk_weights: float32 [..., k], the k largest probabilities in decreasing order
    (renormalize=True: divided by their sum, as Mixtral and Qwen2-MoE's norm_topk_prob; False:
    as they are, Qwen2-MoE's default, DeepSeek-V2); topk_ids: int64 [..., k]. Plain PyTorch, differentiable
    through topk_weights (the router's gradient)."""
    _checks.tensor_arg("router_logits", router_logits)
    if not router_logits.is_floating_point() or router_logits.dim() < 1 or router_logits.shape[-1] < 1:
        raise ValueError(f"router_logits must be a floating-point tensor [..., n_experts] with n_experts >= 1, "
                         f"got {router_logits.dtype} {tuple(router_logits.shape)}")
    E = router_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= E:
        raise ValueError(f"k must be an int in 1..{E} (n_experts), got {k!r}")
    # (a flag: bool("False") is True, and renormalize="False" renormalized)
    return ref.moe_route(router_logits, int(k), _checks.bool_arg("renormalize", renormalize))


def moe_capacity(topk_ids: torch.Tensor, topk_weights: torch.Tensor, n_experts: int, capacity_factor: float,
                 policy: str = "probs") -> torch.Tensor:
    """Token dropping by expert capacity (GShard, Switch Transformer, Megatron-LM's moe_expert_capacity_factor):
    each expert takes at most C = ceil(tokens * k / n_experts * capacity_factor) (token, slot) pairs (Megatron's
    get_capacity); the others' ids become -1, which moe_mlp treats as "no expert" (nothing added, zero gradient
    for their weight).

    topk_ids int [..., k] (ids in 0..n_experts-1, or -1 already dropped), topk_weights [..., k] (ranks the pairs
    under policy "probs": the highest routing weights of an expert are kept, Megatron's default; "position":
    the earliest tokens, Megatron's other policy; GShard's top-2 also puts every first choice before the second
    choices, which this does not). capacity_factor > 0 (1.0: a perfectly balanced router drops nothing).
    Returns the new ids [..., k] (int64); the weights are left as they are (renormalise them yourself if the
    dropped share should go to the kept experts). Plain PyTorch: no host sync."""
    _checks.tensor_arg("topk_ids", topk_ids)
    _checks.tensor_arg("topk_weights", topk_weights)
    if topk_ids.dtype not in (torch.int32, torch.int64) or topk_ids.dim() < 1:
        raise ValueError(f"topk_ids must be an int32/int64 tensor [..., k], got {topk_ids.dtype} "
                         f"{tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape or topk_weights.device != topk_ids.device:
        raise ValueError(f"topk_weights must have topk_ids' shape {tuple(topk_ids.shape)} and device, got "
                         f"{tuple(topk_weights.shape)} on {topk_weights.device}")
    if topk_weights.is_complex():  # (ranked by their real part, with only a warning)
        raise ValueError(f"topk_weights must be real (routing weights), got {topk_weights.dtype}")
    if isinstance(n_experts, bool) or not isinstance(n_experts, numbers.Integral) or n_experts < 1:
        raise ValueError(f"n_experts must be an int >= 1, got {n_experts!r}")
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, numbers.Real) or \
            not 0 < capacity_factor < float("inf"):
        raise ValueError(f"capacity_factor must be a finite number > 0, got {capacity_factor!r}")
    if policy not in ("probs", "position"):
        raise ValueError(f"policy must be 'probs' or 'position', got {policy!r}")
    if topk_ids.device.type == "cpu" and topk_ids.numel() and _checks.checking_values():
        lo, hi = torch.aminmax(topk_ids.to(torch.int64))  # (on CUDA a host sync: unchecked, as in moe_mlp)
        # (compared as Python ints: an n_experts past int64 raised OverflowError against the tensor)
        if int(lo) < NO_EXPERT or int(hi) >= n_experts:
            raise ValueError(f"topk_ids must be in [0, {n_experts}) (n_experts) or {NO_EXPERT} (dropped already), got "
                             f"values in [{int(lo)}, {int(hi)}]")
    tokens, k = topk_ids.numel() // max(topk_ids.shape[-1], 1), topk_ids.shape[-1]
    # Megatron-LM's get_capacity: ceil(tokens * k / E * factor); never more than every pair (a huge factor)
    # (compared before ceil: a huge finite factor overflows the product to inf)
    fair = tokens * k / n_experts * capacity_factor
    capacity = tokens * k if fair >= tokens * k else math.ceil(fair)
    return ref.moe_capacity(topk_ids.to(torch.int64), topk_weights, int(n_experts), capacity, policy)


__all__ = ["moe_mlp", "moe_route", "moe_capacity"]
