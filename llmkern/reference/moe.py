"""Reference of llmkern.moe_mlp / llmkern.moe_route: plain PyTorch, differentiable; the test oracle and
the CPU path.

    y[t] = Σ_j topk_weights[t, j] · down_e(act(gate_e(x_t)) · up_e(x_t)),   e = topk_ids[t, j]

with gate_e = rows [0, F) of w_gate_up[e] [2F, d], up_e = rows [F, 2F), down_e = w_down[e] [d, F]
(transformers' MixtralExperts / Qwen2MoeExperts layout), act = silu ("swiglu"), tanh-gelu ("geglu") or
exact erf gelu ("geglu_exact"). A slot whose id is -1 (a dropped slot) adds nothing.

`moe_mlp` is transformers' loop over experts (the rows routed to expert e, three matmuls, index_add
back), computed in float32 (float64 stays float64) and returned in x's dtype. Under torch.compile it
runs `moe_mlp_dense` instead, which has static shapes (every expert on every token, weighted by a
[T, E] coefficient matrix: E/k times the FLOPs, but no data-dependent sizes to break the graph).
Not exported from llmkern.reference (the name is this module's): use ``llmkern.reference.moe.moe_mlp``.
"""
import torch

from llmkern.reference.swiglu import activation as _activation

ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu_tanh", "geglu_exact": "gelu"}


def _prepare(x, w_gate_up, topk_ids, topk_weights):
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    d = x.shape[-1]
    k = topk_ids.shape[-1]
    return dt, x.reshape(-1, d).to(dt), topk_ids.reshape(-1, k), topk_weights.reshape(-1, k).to(dt)


def _expert(x, w_gate_up, w_down, act, dt):
    """down(act(gate(x)) · up(x)) of one expert for rows x [n, d]."""
    h = x @ w_gate_up.to(dt).t()
    g, u = h.chunk(2, dim=-1)
    return (_activation(g, ACTIVATIONS[act]) * u) @ w_down.to(dt).t()


def _no_values(t):
    """A meta or fake (FakeTensorMode) tensor: no values for torch.where to select an expert's rows by (nonzero
    raised), so the static-shape form runs."""
    return t.is_meta or torch._subclasses.fake_tensor.is_fake(t)


def moe_mlp(x, w_gate_up, w_down, topk_ids, topk_weights, activation="swiglu"):
    """The loop over experts; x [..., d], topk_ids / topk_weights [..., k] (or [T, k]). Slots with id -1
    match no expert, so they add nothing and their weights get no gradient."""
    if torch.compiler.is_compiling() or _no_values(x):
        return moe_mlp_dense(x, w_gate_up, w_down, topk_ids, topk_weights, activation)
    dt, x2, ids, w = _prepare(x, w_gate_up, topk_ids, topk_weights)
    y = torch.zeros_like(x2)
    hit = False
    for e in range(w_gate_up.shape[0]):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0 and (hit or e + 1 < w_gate_up.shape[0]):  # (a host sync: not the CUDA path)
            continue
        # (the last expert runs even on no rows when no slot was routed at all: y then still depends on the
        # inputs, whose gradients are zeros, as the kernels give, instead of a y outside the graph)
        hit = True
        o = _expert(x2[tok], w_gate_up[e], w_down[e], activation, dt)
        y = y.index_add(0, tok, o * w[tok, slot, None])
    return y.to(x.dtype).reshape(x.shape)


def moe_mlp_dense(x, w_gate_up, w_down, topk_ids, topk_weights, activation="swiglu"):
    """The same sum with static shapes: every expert on every token, times coef[t, e] = Σ_j
    w[t, j]·[ids[t, j] == e] (0 for experts the token does not use)."""
    dt, x2, ids, w = _prepare(x, w_gate_up, topk_ids, topk_weights)
    E = w_gate_up.shape[0]
    # a -1 slot, or an id no eager check saw (torch.compile) outside [0, E), scatters a zero weight onto
    # expert 0 (scatter needs an index in range): nothing added, and the where() leaves its weight without
    # gradient, as the kernels treat such slots
    dropped = (ids < 0) | (ids >= E)
    w = torch.where(dropped, 0.0, w)
    coef = torch.zeros(x2.shape[0], E, device=x.device, dtype=dt).scatter_add(1, ids.long().clamp(0, E - 1), w)
    y = torch.zeros_like(x2)
    for e in range(E):
        y = y + coef[:, e:e + 1] * _expert(x2, w_gate_up[e], w_down[e], activation, dt)
    return y.to(x.dtype).reshape(x.shape)


def moe_route(router_logits, k, renormalize=True):
    """(topk_weights, topk_ids int64) of softmax(router_logits) in float32 (float64 stays float64);
    renormalize: the k weights of a token divided by their sum (Mixtral; Qwen2-MoE's norm_topk_prob)."""
    dt = torch.float64 if router_logits.dtype == torch.float64 else torch.float32
    probs = torch.softmax(router_logits.to(dt), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe_capacity(ids, weights, n_experts, capacity, policy="probs"):
    """ids [..., k] with the (token, slot) pairs past each expert's capacity set to -1 (dropped: moe_mlp adds
    nothing for them). Within an expert the pairs are ranked by routing weight, highest first ("probs",
    Megatron-LM's default drop policy), or by token position, earliest first ("position", Megatron's other), ties in
    (token, slot) order; the first `capacity` of each expert are kept."""
    k = ids.shape[-1]
    flat_ids = ids.reshape(-1)
    n = flat_ids.numel()
    order = torch.arange(n, device=ids.device)
    if policy == "probs":  # weight descending; stable: ties keep (token, slot) order
        order = torch.sort(-weights.reshape(-1).detach().to(torch.float32), stable=True).indices
    by_expert = order[torch.sort(flat_ids[order], stable=True).indices]  # grouped by expert, priority kept
    experts = flat_ids[by_expert]  # sorted (dropped -1 pairs first)
    rank = torch.arange(n, device=ids.device) - torch.searchsorted(experts, experts)  # place within its expert
    drop = torch.zeros(n, dtype=torch.bool, device=ids.device)
    drop[by_expert] = (rank >= capacity) & (experts >= 0)
    return torch.where(drop, torch.full_like(flat_ids, -1), flat_ids).view(ids.shape[:-1] + (k,))
