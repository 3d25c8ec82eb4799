"""Expert parallelism (EP) for the zoo's sparse MoE layers: the routed experts partitioned over the ranks,
the tokens exchanged with all-to-all (the scheme of GShard, DeepSpeed-MoE, Megatron-LM and torchtitan).

Rank r of p keeps whole experts [r·E/p, (r+1)·E/p) (E must be divisible by p):

    gate_up_proj [E, 2F, d] -> [E/p, 2F, d],   down_proj [E, d, F] -> [E/p, d, F]

Everything else of the layer, the router ``gate`` and Qwen2-MoE's shared expert and its gate, stays
replicated and runs as data parallelism does: each rank feeds its own tokens x [..., d] (any number of
them, different on every rank). Per MoE layer, on every rank:

    x ── router (local) ──> (ids, weights) [T, k]
    the T·k (token, slot) pairs sorted by expert (so by destination rank, expert // (E/p)) on the device;
    dropped slots (id -1) are not sent
    counts per expert ── all_to_all (E ints + a small header) ──> what each rank will receive
                         (read on the host: the one sync, which sizes the buffers)
    pair rows ── all_to_all ──> this rank's experts (llama.run_experts: moe_mlp or the torch loop, weight 1)
              <── all_to_all ──  their outputs, back to the pairs' source rank
    y[t] = Σ_j weights[t, j] · out[t, j]   (on the source rank, so the routing weights' gradient is local)

The receiving rank learns each row's local expert from the per-expert counts (rows arrive grouped by
source rank, then by expert), so only the rows travel, no ids. Bytes per layer and rank: the forward sends
and receives about T·k·d elements each way twice (dispatch and return), i.e. 2·T·k·d elements sent, as
many received (fewer where slots are dropped, (p-1)/p of it leaving the rank when routing is uniform); the
backward moves the same again. Rows travel in the experts' compute dtype (autocast's when it is on).
Memory per rank: E/p of the experts; compute: the experts' FLOPs of the rows it receives (equal shares
only when the router balances the load).

A capacity factor (ModelConfig.moe_capacity_factor) drops pairs at the source, counted over this rank's own
tokens (each rank routes its own batch, as Megatron-LM's expert-parallel ranks do): dropped pairs are not
sent. Without one the layer is dropless (a rank receives however many rows are routed to it, up to p·T·k).
Not done here (documented limits): no overlap of the all-to-all with compute; no combination with expert
tensor parallelism (llmkern.parallel.moe) on the same layer.

Gradients. The exchange is an autograd.Function whose backward is the reverse all-to-all, so x and the
routing weights get this rank's gradient and every expert weight the gradient of all ranks' tokens routed
to it: the gradient of the sum of the ranks' losses. The replicated parameters (router, shared expert,
and the rest of the model: attention, norms, embeddings) get only their own tokens' gradient; summing
them over the ranks is data parallelism's job (DDP / FSDP over the same group, with the expert
parameters left out: ``expert_parameter_names``), or ``all_reduce_replicated_grads`` for training without
DDP. With averaged gradients (DDP's mean), divide the expert gradients by p too
(``all_reduce_replicated_grads(model, op="mean")`` does both), so that every gradient is that of the mean
of the ranks' losses.

The routing is the layer's own (its route method): Mixtral's softmax top-k, or DeepSeek-V3's sigmoid
group-limited choice for llmkern.models.deepseek.DeepseekMoE (an ExpertParallelDeepseekMoE then: its router,
selection bias buffer and ungated shared experts replicated like the rest; the bias gets no gradient, as
unsharded).

The load-balancing loss is each rank's own, computed on its tokens' router logits (as Megatron-LM does per
micro-batch): the layer appends only the local logits to ``router_logits``.

Under torch.compile the exchange and the experts run outside the graph (a graph break, as in
llmkern.parallel.moe): their sizes depend on the routing.
"""
import functools
import zlib

import torch
import torch.distributed as dist
import torch.nn as nn

from llmkern.models import llama
from llmkern.models.deepseek import DeepseekMoE
from llmkern.ops import _checks
from llmkern.parallel import comm
from llmkern.parallel.context import _reopen, all_reduce_grads, already_reduced, note_reduced, reduction_key
from llmkern.parallel.layers import _maybe_no_compile

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_HEADER = 3  # per destination, after the expert counts: (error flag, hidden size, dtype code)


# ---- the uneven all-to-all ------------------------------------------------------------------------

def _all_to_all(x, out_splits, in_splits, group):
    """Rows x [sum(in_splits), ...]: in_splits[j] of them to rank j; returns [sum(out_splits), ...] with
    out_splits[j] rows from rank j, in rank order."""
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """The uneven all-to-all; backward: the reverse exchange (the split sizes swapped)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, dy):
        return _all_to_all(dy, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


# ---- cross-rank agreement (a local error must not leave the other ranks waiting) ------------------

def _agree(group, what, meta, error=None, describe=None):
    """One all-gather of (error flag, *meta) ints; then every rank raises the same ValueError when any
    rank failed its local check or any meta differs, so that none goes on into a collective alone."""
    rows = comm.agree(group, what, meta, error or None)
    if any(r != rows[0] for r in rows):
        desc = "; ".join(f"rank {i}: {describe(r) if describe else r}" for i, r in enumerate(rows))
        raise ValueError(f"{what}: the MoE layers differ across ranks ({desc}); every rank must hold the "
                         f"same model")


def _layer_meta(moe):
    """(E, 2F, d, top_k, renormalize, shared-expert parameter count or 0) of a zoo MoE layer."""
    E, two_f, d = moe.experts.gate_up_proj.shape
    shared = [getattr(moe, n, None) for n in ("shared_expert", "shared_experts")]
    shared = sum(p.numel() for m in shared if m is not None for p in m.parameters())
    return [E, two_f, d, moe.top_k, int(bool(moe.renormalize)), shared]


def _describe_layer(m):
    return f"n_experts={m[0]}, experts' gate_up_proj [{m[0]}, {m[1]}, {m[2]}], top_k={m[3]}"


def _layer_error(moe, p, what):
    """Why `moe` cannot be made expert-parallel on p ranks (None when it can)."""
    from llmkern.parallel.moe import TensorParallelMoE

    if isinstance(moe, TensorParallelMoE):
        return (f"{what}: the layer is already tensor-parallel (TensorParallelMoE: expert tensor parallelism); "
                f"expert parallelism cannot be combined with it on the same layer")
    if isinstance(moe, ExpertParallelMoE):
        return f"{what}: the layer is already expert-parallel"
    if not isinstance(moe, llama.MoE):
        return f"{what}: expected the zoo's MoE layer (llmkern.models.llama.MoE), got {type(moe).__name__}"
    if moe.n_experts % p:
        return (f"{what}: n_experts={moe.n_experts} is not divisible by the expert-parallel world size {p} "
                f"(every rank keeps n_experts / world size whole experts)")
    return None


# ---- the layer ------------------------------------------------------------------------------------

class LocalExperts(comm.SharesProcessGroups, nn.Module):
    """This rank's E/p whole experts [first, first + E/p): gate_up_proj [E/p, 2F, d], down_proj [E/p, d, F].
    The parameter names are the unsharded Experts' (a rank's state_dict holds its slice under the same
    keys). No forward: ExpertParallelMoE runs them."""

    def __init__(self, experts, group):
        super().__init__()
        p, r = comm.world_size(group), comm.rank(group)
        gate_up, down = experts.gate_up_proj, experts.down_proj
        self.n_experts, self.group = gate_up.shape[0], group
        self.n_local = self.n_experts // p
        self.first = r * self.n_local
        rows = slice(self.first, self.first + self.n_local)
        self.gate_up_proj = nn.Parameter(gate_up.detach()[rows].clone(), requires_grad=gate_up.requires_grad)
        self.down_proj = nn.Parameter(down.detach()[rows].clone(), requires_grad=down.requires_grad)

    def gathered(self):
        """All E experts (gate_up_proj [E, 2F, d], down_proj [E, d, F]) on every rank (one all-gather each,
        no gradient): for checkpoints and checks."""
        return (comm.all_gather_dim0(self.gate_up_proj.detach().contiguous(), self.group),
                comm.all_gather_dim0(self.down_proj.detach().contiguous(), self.group))

    def extra_repr(self):
        _, two_f, d = self.gate_up_proj.shape
        return (f"experts [{self.first}, {self.first + self.n_local}) of {self.n_experts}, hidden={d}, "
                f"ffn_dim={two_f // 2}")


class ExpertParallelMoE(comm.SharesProcessGroups, llama.MoE):
    """The zoo's MoE (llmkern.models.llama.MoE: same attributes, forward and router_logits contract) with its
    routed experts partitioned over an expert-parallel group (see the module docstring). Build it with
    ``from_moe`` or ``expert_parallelize``."""

    @classmethod
    def from_moe(cls, moe, group=None):
        """Rank r's expert-parallel copy of `moe` (weights identical on every rank; `moe` is not changed: the
        router and the shared expert are shared with it, the experts copied). ValueError on every rank when
        n_experts is not divisible by the world size, when `moe` is already parallel, or when the layer
        differs across ranks; RuntimeError without a process group."""
        group = comm.resolve_group(group, "ExpertParallelMoE")
        what = "ExpertParallelMoE.from_moe"
        error = _layer_error(moe, comm.world_size(group), what)
        meta = [0] * 6 if error else _layer_meta(moe)
        _agree(group, what, meta, error, _describe_layer)
        return cls._build(moe, group)

    @classmethod
    def _build(cls, moe, group):
        if isinstance(moe, DeepseekMoE):
            cls = ExpertParallelDeepseekMoE
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.n_experts, self.top_k, self.renormalize = moe.n_experts, moe.top_k, moe.renormalize
        # (a capacity counts this rank's tokens: each rank routes its own batch, as Megatron-LM's EP ranks do)
        self.capacity_factor = getattr(moe, "capacity_factor", None)
        self.drop_policy = getattr(moe, "drop_policy", "probs")
        self.backend_name, self.group = moe.backend_name, group
        self.world_size, self.rank = comm.world_size(group), comm.rank(group)
        self.gate = moe.gate  # replicated, as the shared expert(s) and Qwen2-MoE's gate of it
        for name in ("shared_expert", "shared_expert_gate", "shared_experts"):
            if hasattr(moe, name):
                setattr(self, name, getattr(moe, name))
        self.experts = LocalExperts(moe.experts, group)
        return self.train(moe.training)

    def forward(self, x, router_logits=None):
        """x [..., d]: this rank's tokens -> y, x's shape. router_logits: a list to append this layer's
        router logits [tokens, E] of this rank's tokens to (the load-balancing loss is per rank)."""
        problem = self._input_problem(x)
        if problem is not None:  # join the count exchange with an error flag: every rank raises
            _maybe_no_compile(_fail_together)(self, problem)
        weights, ids = self.route(x, router_logits)  # (the layer's own routing, on this rank's tokens)
        y = _maybe_no_compile(_expert_parallel_mlp)(self, x, ids, weights)  # data-dependent sizes, collectives
        return self.add_shared(x, y)

    def _input_problem(self, x):
        d = self.experts.gate_up_proj.shape[2]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != d:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            return f"{type(self).__name__} on rank {self.rank}: x must be a floating-point tensor [..., {d}], got {got}"
        return None

    def extra_repr(self):
        return f"world_size={self.world_size}, rank={self.rank}"


class ExpertParallelDeepseekMoE(ExpertParallelMoE, DeepseekMoE):
    """ExpertParallelMoE of DeepSeek-V3's MoE layer (llmkern.models.deepseek.DeepseekMoE): its route (sigmoid,
    group-limited, the selection bias) and add_shared (ungated shared experts) come from DeepseekMoE through
    the MRO (ExpertParallelMoE defines neither)."""


# ---- dispatch, experts, combine --------------------------------------------------------------------


def _exchange_counts(moe, counts, header):
    """counts [p, E/p] (this rank's pairs per expert, grouped by owner) and header [_HEADER] -> host lists
    (sent[p][E/p], received[p][E/p]): one all-to-all of [p, E/p + _HEADER] ints, read on the host (the
    sync that sizes the row buffers). Raises on every rank when a rank flagged an error or the ranks'
    hidden sizes / dtypes differ (each rank sees every rank's header)."""
    p = moe.world_size
    send = torch.cat([counts, header.expand(p, _HEADER)], 1).to(comm._meta_device(counts, moe.group))
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send.contiguous(), group=moe.group)  # row j to rank j, row j from rank j
    rows = torch.cat([send, recv]).tolist()
    sent, received = rows[:p], rows[p:]
    heads = [r[-_HEADER:] for r in received]
    failed = [j for j, h in enumerate(heads) if h[0]]
    if failed:
        raise ValueError(f"ExpertParallelMoE: the input was invalid on rank(s) {failed} (their error says why)")
    if any(h != heads[0] for h in heads):
        desc = "; ".join(f"rank {j}: hidden {h[1]}, dtype {_DTYPES[h[2]] if h[2] < len(_DTYPES) else 'other'}"
                         for j, h in enumerate(heads))
        raise ValueError(f"ExpertParallelMoE: the tokens' hidden size / dtype differ across ranks ({desc})")
    n = moe.experts.n_local
    return [r[:n] for r in sent], [r[:n] for r in received]


def _fail_together(moe, problem):
    header = torch.tensor([1, 0, 0], dtype=torch.int64)
    counts = torch.zeros(moe.world_size, moe.experts.n_local, dtype=torch.int64)
    try:
        _exchange_counts(moe, counts, header)
    except ValueError:
        pass  # (this rank's own message is the one to raise)
    raise ValueError(problem)


def _expert_parallel_mlp(moe, x, ids, weights):
    """Σ_j weights[t, j] · expert_{ids[t, j]}(x_t) with the experts on their owner ranks (module docstring)."""
    shape, d, k = x.shape, x.shape[-1], ids.shape[-1]
    x2, ids2, w2 = x.reshape(-1, d), ids.reshape(-1), weights.reshape(-1, k)
    T, E, n_local, dt = x2.shape[0], moe.n_experts, moe.experts.n_local, _checks.autocast_dtype(x) or x.dtype
    # sort the pairs by expert, dropped ones (-1, or out of range) last: a pair's owner is expert // n_local
    key = torch.where((ids2 >= 0) & (ids2 < E), ids2, E)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=E + 1)[:E].view(moe.world_size, n_local)
    code = _DTYPES.index(dt) if dt in _DTYPES else len(_DTYPES)
    header = torch.tensor([0, d, code], dtype=torch.int64, device=counts.device)
    sent, received = _exchange_counts(moe, counts, header)
    send_splits, recv_splits = [sum(c) for c in sent], [sum(c) for c in received]
    pairs = order[:sum(send_splits)]  # the pairs that leave, grouped by owner rank
    tok, slot = pairs // k, pairs % k
    # indexing the k-fold expanded view: each (token, slot) is picked once, so the backward's scatter has
    # unique targets (deterministic on CUDA too) and sums the k slots' gradients in the expand's backward
    rows = x2[:, None].expand(T, k, d)[tok, slot].to(dt)
    rows = _AllToAll.apply(rows, recv_splits, send_splits, moe.group)
    local_ids = _received_ids(received, n_local, rows.device)
    out = _local_experts(moe, rows, local_ids)
    out = _AllToAll.apply(out, send_splits, recv_splits, moe.group)
    return _combine(out, pairs, w2, T, k, d, dt).view(shape[:-1] + (d,))


def _received_ids(received, n_local, device):
    """The local expert of each received row: rows arrive by source rank, then by expert."""
    n = torch.tensor(received, dtype=torch.int64).reshape(-1)
    ids = torch.arange(n_local, dtype=torch.int64).repeat(len(received))
    # (built on the host from the counts already read; pinned and non-blocking: a pageable copy would wait for
    # the device's queue again)
    return _checks.host_to_device(torch.repeat_interleave(ids, n), device)


def _local_experts(moe, rows, local_ids):
    """This rank's experts on the received rows [N, d] (weight 1 each: the source rank applies the routing
    weights) -> [N, d]."""
    gate_up, down = moe.experts.gate_up_proj, moe.experts.down_proj
    if rows.shape[0] == 0:
        # nothing to run (run_experts needs rows), but the result must depend on `rows`, so that the backward
        # still joins the reverse all-to-all every rank runs, and on the weights, which get zero gradients
        # like an unsharded expert without tokens
        return rows * 0 + (gate_up[:0].sum() + down[:0].sum()).to(rows.dtype)
    ones = torch.ones(1, rows.shape[0], 1, dtype=torch.float32, device=rows.device)
    y = llama.run_experts(moe.backend_name, rows[None], gate_up, down, local_ids[None, :, None], ones)[0]
    return y.to(rows.dtype)


def _combine(out, pairs, w2, T, k, d, dt):
    """y [T, d] = Σ_j w2[t, j] · out of pair (t, j); dropped pairs add nothing (and their weights get
    gradient 0). Each pair is written once, then the k slots are summed: no atomics, deterministic."""
    acc = torch.float64 if torch.float64 in (out.dtype, w2.dtype) else torch.float32
    per_pair = out.new_zeros(T * k, d).index_put((pairs,), out)
    y = (per_pair.view(T, k, d).to(acc) * w2[..., None].to(acc)).sum(1)
    return y.to(dt)


# ---- whole models -----------------------------------------------------------------------------------

def expert_parallelize(model, group=None):
    """Replace, in place, every zoo MoE layer (llmkern.models.llama.MoE, DeepseekMoE too) of `model` (a zoo Llama with
    n_experts, or a from_hf Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 model) by an ExpertParallelMoE over `group`;
    returns `model`. The weights must be identical on every rank. ValueError on every rank (the model then
    left unchanged) when the model is already expert- or tensor-parallel (TensorParallelMoE), has no MoE
    layer, n_experts is not divisible by the world size, or the layers differ across ranks; RuntimeError
    without a process group. Combine with DDP / FSDP (or ``all_reduce_replicated_grads``) for the
    replicated parameters' gradients."""
    group = comm.resolve_group(group, "expert_parallelize")
    p, what = comm.world_size(group), "expert_parallelize"
    error = None
    if not isinstance(model, nn.Module):  # (raised on every rank by _agree below: the others would wait there)
        error = TypeError(f"{what}: model must be an nn.Module, got {type(model).__name__}")
    targets = [] if error else [(parent, name, child) for _, parent in model.named_modules()
                                for name, child in parent.named_children() if isinstance(child, llama.MoE)]
    if isinstance(model, llama.MoE):
        error = f"{what}: got a single MoE layer; use ExpertParallelMoE.from_moe(layer, group)"
    if getattr(model, "pipeline_parallel", None) is not None:  # (its stages' transfers and the exchange deadlock)
        error = f"{what}: the model is pipeline-parallel; pipeline parallelism is not combined with expert parallelism"
    for parent, name, child in targets:
        error = error or _layer_error(child, p, f"{what}: {type(parent).__name__}.{name}")
    if not targets and error is None:
        error = f"{what}: found no MoE layer (llmkern.models.llama.MoE) in {type(model).__name__}"
    metas = [] if error else [_layer_meta(m) for _, _, m in targets]
    digest = zlib.crc32(repr(metas).encode())  # (stable across processes, unlike hash())
    first = metas[0] if metas else [0] * 6
    _agree(group, what, [len(metas), digest] + first, error,
           lambda m: f"{m[0]} MoE layers, first: {_describe_layer(m[2:])}, digest {m[1]}")
    built = {}
    for parent, name, child in targets:  # (a layer reachable twice stays one layer)
        if id(child) not in built:
            built[id(child)] = ExpertParallelMoE._build(child, group)
        setattr(parent, name, built[id(child)])
    return model


def expert_parameter_names(model):
    """Names of the parameters that ExpertParallelMoE partitions (each rank holds different ones): leave them
    out of DDP's all-reduce (e.g. DistributedDataParallel._set_params_and_buffers_to_ignore_for_model)."""
    return [f"{mn}.{pn}" if mn else pn for mn, m in model.named_modules() if isinstance(m, ExpertParallelMoE)
            for pn, _ in m.experts.named_parameters(prefix="experts")]


def all_reduce_replicated_grads(model, group=None, op="sum"):
    """Data parallelism's gradient step for an expert-parallel model without DDP: all-reduce the gradients of
    every parameter but the partitioned experts over `group` (default: the group of the model's
    ExpertParallelMoE layers, else WORLD), in one flattened all-reduce per dtype. op="sum": the gradients
    of the sum of the ranks' losses (the expert gradients already are); op="mean": divided by the world
    size, the expert gradients too (the gradient of the mean of the ranks' losses, DDP's convention).
    A parameter without a gradient on some rank but not all gets zeros there. With gradient accumulation, call it
    after the last backward or after each one: a gradient it reduced already is not reduced again, and a backward
    that adds to one leaves, after the next call, the sum (or mean) of the micro-steps (see
    llmkern.parallel.context.all_reduce_gradients). Returns `model`."""
    if op not in ("sum", "mean"):
        raise ValueError(f"all_reduce_replicated_grads: op must be 'sum' or 'mean', got {op!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"all_reduce_replicated_grads: model must be an nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]
    if group is None and layers:
        group = layers[0].group
    group = comm.resolve_group(group, "all_reduce_replicated_grads")
    p = comm.world_size(group)
    experts = {id(prm) for m in layers for prm in m.experts.parameters()}
    params = [prm for prm in model.parameters() if prm.requires_grad and id(prm) not in experts]
    if p > 1:
        all_reduce_grads(params, group, op, "all_reduce_replicated_grads")
    if op == "mean" and p > 1:
        # each expert gradient divided once (a second call left p² less); a backward adding to a divided one first
        # multiplies it back, so that the next call divides the micro-steps' sum
        key = reduction_key("mean", group)
        for m in layers:
            for prm in m.experts.parameters():
                if prm.grad is not None and not already_reduced(prm, key):
                    _reopen(prm)
                    prm.grad.div_(p)
                    note_reduced(prm, key, functools.partial(torch.Tensor.mul_, other=p))
    return model


__all__ = ["ExpertParallelMoE", "ExpertParallelDeepseekMoE", "LocalExperts", "expert_parallelize",
           "all_reduce_replicated_grads", "expert_parameter_names"]
