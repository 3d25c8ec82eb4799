"""Context parallelism: the sequence sharded across ranks for long-context training (Llama 3's scheme).

Every rank holds a shard of the tokens (of every activation: [B, T_local, d]); the weights are
replicated. The only layer that mixes tokens is attention: each rank all-gathers the keys and values of
the whole sequence (one all-gather of K/V per layer) and computes the attention of its own queries against
the keys they may see. Llama 3 (Dubey et al. 2024, section 3.3.2) chose this over ring attention because
GQA makes K/V small (n_kv_head heads against n_head for Q) and the all-gather is one collective that
handles any mask.

Memory and the backward: the gathered K/V ([B, Hk, T, D + Dv], p times the local K/V) lives only during the
forward and again during the backward of one layer. What each call keeps for the backward is O(T_local):
this rank's q, k, v, the output and the float32 logsumexp. The backward all-gathers K/V once more (a
second all-gather per layer: re-sending is cheaper than holding the gathered K/V of every layer, the
trade Llama 3 and Megatron make), runs the attention op's own backward from the saved output and LSE
(no forward recomputation) for the local queries against the gathered keys, and reduce-scatters dK/dV
so that every rank gets the gradient of the tokens it owns. Per layer and step: 2 all-gathers of K/V
and 1 reduce-scatter of dK/dV.

Layouts (p ranks, global length T):

- "zigzag" (default): the sequence is cut into 2p equal chunks and rank r holds chunks r and 2p-1-r, in
  that order. Under the causal mask chunk j costs j+1 key chunks, so every rank does (r+1) + (2p-r) =
  2p+1: the same work on every rank. T must be a multiple of 2p.
- "contiguous": rank r holds chunk r of p (rank p-1 does p times the work of rank 0 under the causal
  mask). T must be a multiple of p.

Each local chunk j of c tokens holds the queries at absolute positions [j·c, (j+1)·c). With a causal
mask they see keys [0, (j+1)·c): llmkern.attention's causal mask is bottom-right aligned (query i of Tq
sees keys <= i + Tk - Tq), which for that key prefix is exactly the absolute causal mask; no custom mask
is built. A sliding window (left, right) keeps the same alignment and also drops the keys left of the
window from the call (less compute). Non-causal attention sees every key.

    from llmkern.parallel import context_parallel_attention, shard_sequence, context_parallelize
    q, k, v = (shard_sequence(t, group, dim=2) for t in (q_full, k_full, v_full))
    out = context_parallel_attention(q, k, v, group, causal=True)     # this rank's rows of the output

    model = context_parallelize(Llama(cfg), group)   # a zoo model: the sequence sharded, weights replicated
    _, loss = model(shard_sequence(ids, group), shard_sequence(ids, group))   # the global mean
    loss.backward()
    all_reduce_gradients(model)                      # each rank's gradients cover its tokens: sum them

Not supported (a clear error): lengths that 2p (zigzag) or p (contiguous) does not divide (pad the
sequence), KV caches (generation), attention masks / padding, prefix tuning, attention dropout, and a
second derivative through the attention (create_graph=True; neither do the attention kernels).
"""
import functools
import hashlib
import numbers
import weakref

import torch
import torch.distributed as dist
import torch.nn as nn

from llmkern.ops._checks import bool_arg
from llmkern.parallel import comm

LAYOUTS = ("zigzag", "contiguous")


# ---- the layout ----------------------------------------------------------------------------------

def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _rank_chunks(p, layout):
    """[global chunk ids that rank r holds, in its local order] for r in range(p)."""
    if layout == "zigzag":
        return [[r, 2 * p - 1 - r] for r in range(p)]
    return [[r] for r in range(p)]


def _global_order(p, layout):
    """[(rank, slot)] of the global chunks 0, 1, ...: where each one sits in the gathered shards."""
    where = {j: (r, s) for r, js in enumerate(_rank_chunks(p, layout)) for s, j in enumerate(js)}
    return [where[j] for j in range(len(where))]


def _take(x, dim, chunk_ids, c):
    """The chunks `chunk_ids` (of c elements along dim) of x, concatenated in that order."""
    parts = [x.narrow(dim, j * c, c) for j in chunk_ids]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _check_length(T, p, layout, what, local=False):
    n = 2 * p if layout == "zigzag" else p
    per_rank = n // p
    if (local and T % per_rank) or (not local and T % n):
        length = f"the local sequence length {T}" if local else f"the sequence length {T}"
        raise ValueError(f"{what}: {length} is not divisible: layout={layout!r} cuts the global sequence into "
                         f"{n} equal chunks ({'2p' if layout == 'zigzag' else 'p'}, p={p} ranks), "
                         f"{per_rank} per rank; pad the sequence to a multiple of {n}")
    return n


def _dim_arg(what, x, dim):
    """dim as an index into x's dimensions, or an error naming it: x % x.dim() wrapped an out-of-range dim
    (4 of a 3-D tensor) onto another dimension, silently."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: x must be a tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"{what}: dim must be an int in [-{x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, "
                         f"got {dim!r}")
    return int(dim) % x.dim()


def shard_sequence(x, group=None, dim=1, layout="zigzag"):
    """This rank's part of a full-sequence tensor x (inputs, labels, position ids, q/k/v...) along `dim`:
    chunks r and 2p-1-r of 2p (zigzag) or chunk r of p (contiguous). Not differentiable through
    collectives (it is a slice). ValueError when x.shape[dim] is not a multiple of 2p (p)."""
    _check_layout(layout)
    group = comm.resolve_group(group, "shard_sequence")
    p, r = comm.world_size(group), comm.rank(group)
    dim = _dim_arg("shard_sequence", x, dim)
    n = _check_length(x.shape[dim], p, layout, "shard_sequence")
    return _take(x, dim, _rank_chunks(p, layout)[r], x.shape[dim] // n)


def context_parallel_positions(T_global, group=None, layout="zigzag", device=None):
    """The absolute positions (int64 [T_global / p]) of this rank's tokens, in its local order: what RoPE or
    a learned position embedding needs (shard_sequence of arange(T_global))."""
    _check_layout(layout)
    if isinstance(T_global, bool) or not isinstance(T_global, numbers.Integral) or T_global < 0:
        # (a float 4.0 failed in narrow, a negative length in arange, a string in the divisibility check)
        raise ValueError(f"context_parallel_positions: T_global must be an int >= 0, got {T_global!r}")
    T_global = int(T_global)
    group = comm.resolve_group(group, "context_parallel_positions")
    p, r = comm.world_size(group), comm.rank(group)
    n = _check_length(T_global, p, layout, "context_parallel_positions")
    return _take(torch.arange(T_global, device=device), 0, _rank_chunks(p, layout)[r], T_global // n)


def _all_gather_sequence(x, group, dim, layout):
    """Every rank's shard along dim, put back in the global order (one all-gather)."""
    p = comm.world_size(group)
    if p == 1:
        return x
    shards = comm.all_gather_dim0(x.contiguous().unsqueeze(0), group)  # [p, *x.shape], rank order
    order = _global_order(p, layout)
    c = x.shape[dim] // (len(order) // p)
    return torch.cat([shards[r].narrow(dim, s * c, c) for r, s in order], dim)


def _reduce_scatter_sequence(dy, group, dim, layout):
    """The sum over ranks of each rank's gradient of the gathered tensor, restricted to this rank's tokens
    (one reduce-scatter): the backward of the all-gather when the ranks use the gathered tensor differently."""
    p = comm.world_size(group)
    if p == 1:
        return dy
    chunks = _rank_chunks(p, layout)
    c = dy.shape[dim] // (p * len(chunks[0]))
    per_rank = torch.stack([_take(dy, dim, js, c) for js in chunks])  # [p, *local shape], rank order
    return comm.reduce_scatter_dim0(per_rank, group)[0]


class _GatherSequence(torch.autograd.Function):
    """Forward: the all-gather of the shards in the global order. Backward: reduce-scatter of the gradient
    (each rank's use of the whole tensor contributes to every token's gradient), or this rank's slice
    of it (every rank computed the same function of the whole tensor)."""

    @staticmethod
    def forward(ctx, x, group, dim, layout, reduce_grad):
        ctx.meta = (group, dim, layout, reduce_grad)
        return _all_gather_sequence(x, group, dim, layout)

    @staticmethod
    def backward(ctx, dy):
        group, dim, layout, reduce_grad = ctx.meta
        if reduce_grad:
            dx = _reduce_scatter_sequence(dy.contiguous(), group, dim, layout)
        else:
            p, r = comm.world_size(group), comm.rank(group)
            chunks = _rank_chunks(p, layout)
            dx = _take(dy, dim, chunks[r], dy.shape[dim] // (p * len(chunks[0])))
        return dx, None, None, None, None


def gather_sequence(x, group=None, dim=1, layout="zigzag", *, reduce_grad=True):
    """The inverse of shard_sequence: the full sequence (global order) from every rank's shard x along
    `dim` (one all-gather). Differentiable. reduce_grad=True (default): the backward reduce-scatters the
    gradient (right when each rank computes something different from the gathered tensor, e.g. its own
    queries' attention over gathered keys); reduce_grad=False: each rank keeps its slice of its own
    gradient (right when every rank computes the same function of the gathered tensor)."""
    _check_layout(layout)
    reduce_grad = bool_arg("gather_sequence: reduce_grad", reduce_grad)  # (bool("False") is True)
    group = comm.resolve_group(group, "gather_sequence")
    dim = _dim_arg("gather_sequence", x, dim)
    _check_length(x.shape[dim], comm.world_size(group), layout, "gather_sequence", local=True)
    comm.check_same_shape(x, group, "gather_sequence")
    return _GatherSequence.apply(x, group, dim, layout, reduce_grad)


# ---- attention -----------------------------------------------------------------------------------

def _key_range(j, c, T, causal, wl, wr):
    """(lo, hi, window) of the call for local chunk j (queries [j·c, (j+1)·c)): the keys [lo, hi) it needs
    and the window to pass so that llmkern.attention's bottom-right alignment (query i of the call sits
    at key index i + (hi - lo) - c) puts each query on its absolute position. wl/wr: -1 = unbounded."""
    lo = 0 if wl < 0 else max(0, j * c - wl)
    if causal:  # keys up to the chunk's end: the alignment is then exact (no shift)
        hi = (j + 1) * c
    else:  # keys up to the window's right edge; the diagonal then sits delta = hi - (j+1)·c to the right
        hi = T if wr < 0 else min(T, (j + 1) * c + wr)
    delta = hi - (j + 1) * c
    if wl < 0 and (wr < 0 or causal):
        return lo, hi, None
    return lo, hi, (None if wl < 0 else wl + delta, None if wr < 0 else wr - delta)


def _chunk_calls(T_local, p, rank, layout, causal, wl, wr):
    """[(local slot, lo, hi, window)]: for each local chunk, the gathered keys [lo, hi) it attends to and
    the window of its llmkern.attention call (see _key_range)."""
    chunks = _rank_chunks(p, layout)[rank]
    c = T_local // len(chunks)
    return [(s, *_key_range(j, c, p * T_local, causal, wl, wr)) for s, j in enumerate(chunks)]


def _cat(parts, dim):
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _gather_kv(k, v, group, layout):
    """K [B, Hk, T, D] and V [B, Hk, T, Dv] of the whole sequence in the global order: one all-gather of both,
    concatenated along the head dim (Dv may differ from D: DeepSeek's MLA), returned as views of it (the
    attention kernels take views whose last dim is contiguous as they are)."""
    kv = _all_gather_sequence(torch.cat((k, v), -1), group, 2, layout)
    return kv.split([k.shape[-1], v.shape[-1]], -1)


class _ContextParallelAttention(torch.autograd.Function):
    """Forward: all-gather K/V, attend each local chunk to its key range (`calls`, see _chunk_calls).
    Saved: this rank's q, k, v, the output and the fp32 LSE, all O(T_local); the gathered K/V are freed
    when the forward returns. Backward: all-gather K/V again, the attention op's own backward per chunk
    from out/LSE (dq of the local queries, dK/dV of the gathered keys, summed where the chunks' key
    ranges overlap), then one reduce-scatter sends every rank the dK/dV of the tokens it owns."""

    @staticmethod
    def forward(ctx, q, k, v, group, layout, calls, opts):
        from llmkern.ops.attention import attention

        k_all, v_all = _gather_kv(k, v, group, layout)
        c = q.shape[2] // len(calls)
        res = [attention(q.narrow(2, s * c, c), k_all[:, :, lo:hi], v_all[:, :, lo:hi], window=win,
                         return_lse=True, **opts) for s, lo, hi, win in calls]
        out, lse = (_cat([r[i] for r in res], 2) for i in (0, 1))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta = (group, layout, calls, opts)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        from llmkern.ops.attention import _attention_backward

        q, k, v, out, lse = ctx.saved_tensors
        group, layout, calls, opts = ctx.meta
        k_all, v_all = _gather_kv(k, v, group, layout)  # again: cheaper to re-send than to hold for every layer
        D = k.shape[-1]
        dkv = k_all.new_zeros(k_all.shape[:-1] + (D + v.shape[-1],))  # dK and dV side by side, as gathered
        c = q.shape[2] // len(calls)
        dqs = []
        for s, lo, hi, win in calls:
            dq, dk, dv = _attention_backward(*(t.narrow(2, s * c, c) for t in (dout, q)), k_all[:, :, lo:hi],
                                             v_all[:, :, lo:hi], *(t.narrow(2, s * c, c) for t in (out, lse)),
                                             window=win, **opts)
            dqs.append(dq)
            dkv[:, :, lo:hi, :D] += dk  # zigzag: both local chunks see the keys of the early chunks
            dkv[:, :, lo:hi, D:] += dv
        dk = dv = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:  # one reduce-scatter for both
            dk, dv = _reduce_scatter_sequence(dkv, group, 2, layout).split([D, v.shape[-1]], -1)
        return _cat(dqs, 2), dk, dv, None, None, None, None


def context_parallel_attention(q, k, v, group=None, *, causal=True, layout="zigzag", scale=None, window=None,
                               softcap=None):
    """Attention of this rank's queries over the whole (sequence-sharded) context.

    q [B, H, T_local, D], k [B, Hk, T_local, D], v [B, Hk, T_local, Dv] (Dv may differ from D, as in
    llmkern.attention: DeepSeek's MLA): this rank's shard of the sequence (shard_sequence along dim 2,
    `layout`), T_local = T / p. K and V are all-gathered (one collective for both, concatenated along the
    head dim; un-repeated under GQA), then every local chunk attends to the keys it may see with
    llmkern.attention (bottom-right causal alignment, no custom mask). For the backward only this rank's
    q, k, v, output and fp32 LSE are kept: it all-gathers K/V once more, runs the attention backward from the
    saved output and LSE (no forward recomputation) and reduce-scatters dK/dV to their owners (one
    reduce-scatter for both). Returns this rank's rows of
    attention(q_full, k_full, v_full, causal=causal, window=window, ...) [B, H, T_local, Dv].
    causal / scale / window (left, right) / softcap: as llmkern.attention, in absolute positions.
    Under torch.autocast, q/k/v are cast to the autocast dtype first (as llmkern.attention does), so
    K/V travel in it. Not twice differentiable (like the attention kernels).
    ValueError when T_local is odd under zigzag, or the shapes differ across ranks; RuntimeError without a
    process group."""
    from llmkern.ops import _checks
    from llmkern.ops.attention import _window

    _check_layout(layout)
    group = comm.resolve_group(group, "context_parallel_attention")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not torch.is_tensor(t) or t.dim() != 4:
            raise ValueError(f"context_parallel_attention: {name} must be a tensor [batch, heads, seq, head_dim], "
                             f"got {getattr(t, 'shape', type(t))}")
    if k.shape[:3] != v.shape[:3] or (k.shape[0], k.shape[2], k.shape[3]) != (q.shape[0], q.shape[2], q.shape[3]):
        raise ValueError(f"context_parallel_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"must be this rank's shard of the same sequence ([B, H, T_local, D], [B, Hk, T_local, D], "
                         f"[B, Hk, T_local, Dv])")
    _check_length(q.shape[2], comm.world_size(group), layout, "context_parallel_attention", local=True)
    calls = _chunk_calls(q.shape[2], comm.world_size(group), comm.rank(group), layout, causal, *_window(window))
    opts = dict(causal=causal, scale=scale, softcap=softcap)
    # (one check for both: the shape of the concatenated K/V that is all-gathered; no memory behind it)
    comm.check_same_shape(k.new_empty(()).expand(*k.shape[:3], k.shape[3] + v.shape[3]), group,
                          "context_parallel_attention")
    dt = _checks.autocast_dtype(q)
    if dt is None:
        return _ContextParallelAttention.apply(q, k, v, group, layout, calls, opts)
    with torch.autocast(q.device.type, enabled=False):  # the saved tensors and the kernels in one dtype
        q, k, v = (_checks.autocast_cast(dt, t) for t in (q, k, v))
        return _ContextParallelAttention.apply(q, k, v, group, layout, calls, opts)


# ---- the zoo models --------------------------------------------------------------------------------

class ContextParallel(comm.SharesProcessGroups):
    """What context_parallelize attaches to a zoo model (`model.context_parallel`) and to its attention
    modules; llmkern.models calls it at four hook points: the attention (attend), the positions
    (ZooModel.positions), the next-token labels and the loss (ZooModel.lm_loss / fused_lm_loss)."""

    def __init__(self, group, layout):
        self.group, self.layout = group, layout

    def attend(self, q, k, v, *, cache=None, prefix=None, key_padding_mask=None, sliding_window=None,
               dropout_p=0.0, scale=None, softcap=None):
        unsupported = [name for name, on in (("a KV cache", cache is not None), ("prefix tuning", prefix is not None),
                                             ("an attention mask (padding)", key_padding_mask is not None),
                                             ("attention dropout", dropout_p > 0)) if on]
        if unsupported:
            raise NotImplementedError(f"context parallelism does not support {unsupported[0]} (use the model "
                                      f"without context_parallelize for it; dropout: config.dropout=0 or eval())")
        window = None if sliding_window is None else (sliding_window - 1, 0)  # W keys: itself + W-1 left
        return context_parallel_attention(q, k, v, self.group, causal=True, layout=self.layout, window=window,
                                          scale=scale, softcap=softcap)

    def positions(self, T_local, block_size, device):
        p = comm.world_size(self.group)
        _check_length(T_local, p, self.layout, "context parallelism", local=True)
        if p * T_local > block_size:
            raise ValueError(f"context parallelism: the global sequence ({p} ranks x {T_local} tokens) exceeds "
                             f"block_size={block_size}")
        return context_parallel_positions(p * T_local, self.group, self.layout, device)

    def next_token_labels(self, labels):
        """labels [B, T_local] (this rank's shard, aligned with input_ids) -> the next token's label at each
        local position: the shift crosses chunk borders, so it is done on the gathered labels (one
        all-gather of B·T integers)."""
        full = _all_gather_sequence(labels, self.group, 1, self.layout)
        shifted = torch.cat([full[:, 1:], full.new_full((full.shape[0], 1), -100)], dim=1)
        return shard_sequence(shifted, self.group, 1, self.layout)

    def pool_router_stats(self, counts, prob_sum, rows):
        """The load-balancing loss's statistics (llmkern.models.llama.load_balancing_loss) summed over the
        ranks: the loss E * sum_e f_e P_e is a product of two whole-sequence averages, so per-rank copies do not
        add up to it. counts and rows are plain sums (no gradient); prob_sum's backward is this rank's part, so
        every rank computes the unsharded loss and the summed parameter gradients are the unsharded ones."""
        from llmkern.parallel.vocab import _SumOverRanks

        counts = counts.detach().clone()
        rows = torch.as_tensor(rows, dtype=torch.float32, device=counts.device).detach().clone()
        dist.all_reduce(counts, group=self.group)
        dist.all_reduce(rows, group=self.group)
        return counts, _SumOverRanks.apply(prob_sum, self.group), rows

    def global_mean(self, loss, shifted):
        """The mean over the valid tokens of all ranks from this rank's mean `loss` over its own.
        Returns the same value on every rank; its backward carries only this rank's part
        (n_local / n_global · d local mean): summing the parameter gradients over the ranks
        (all_reduce_gradients) gives the unsharded model's gradient."""
        from llmkern.parallel.vocab import _SumOverRanks

        n_local = (shifted != -100).sum()
        n = n_local.clone()
        dist.all_reduce(n, group=self.group)
        # (the share in the loss's dtype: int64 / int64 is float32, rounded for a float64 model)
        share = n_local.to(loss.dtype) / n.clamp_min(1).to(loss.dtype)
        part = torch.where(n_local > 0, loss, torch.zeros_like(loss)) * share
        total = _SumOverRanks.apply(part, self.group)
        # no valid label anywhere: NaN like the unsharded mean (an added constant: the gradients stay zero)
        return total + torch.where(n > 0, 0.0, float("nan")).to(total.dtype)


def _check_forward(model, args, kwargs):
    """Forward pre-hook of a context-parallel zoo model: refuse what the sharded sequence cannot do."""
    if kwargs.get("cache") is not None:
        raise NotImplementedError("context parallelism does not support a KV cache (generation): generate with "
                                  "a model that is not context_parallelize'd (same weights)")
    if kwargs.get("attention_mask") is not None:
        raise NotImplementedError("context parallelism does not support attention_mask (padding); pack the "
                                  "sequences instead")
    if kwargs.get("last_only"):
        raise NotImplementedError("context parallelism does not support last_only (the last token lives on "
                                  "one rank): it is for decoding")
    if getattr(model, "prefix_tuning", None) is not None:
        raise NotImplementedError("context parallelism does not support prefix tuning")
    input_ids = args[0] if args else kwargs.get("input_ids")
    labels = args[1] if len(args) > 1 else kwargs.get("labels")
    _check_same_batch(model.context_parallel.group, input_ids, labels, model.config.vocab_size)


def _check_same_batch(group, input_ids, labels, vocab_size=None):
    """ValueError on every rank unless every rank's labels are given (or not) with input_ids' shape: the label
    shift's all-gather and the loss's all-reduce otherwise hang, or abort the process (gloo's size check).
    One all-gather of 5 ints (off with llmkern.parallel.comm.set_validation(False)); with vocab_size, also
    ValueError on every rank when one rank's CPU ids lie outside the vocabulary."""
    if not comm.validation_enabled() or comm.world_size(group) == 1 or not torch.is_tensor(input_ids):
        return
    def dims(t):  # [B, T] of a 2-D tensor; [-1, -1] for none, [-2, ndim] for another rank
        if not torch.is_tensor(t):
            return [-1, -1]
        return list(t.shape) if t.dim() == 2 else [-2, t.dim()]

    ok = vocab_size is None or comm.ids_in_range(input_ids, vocab_size)
    rows = comm.gather_ints(dims(input_ids) + dims(labels) + [int(ok)], group)
    bad = [i for i, r in enumerate(rows) if not r[4]]
    if bad:
        raise ValueError(f"context parallelism: input_ids of rank(s) {bad} hold token ids outside "
                         f"[0, vocab_size={vocab_size})")
    rows = [r[:4] for r in rows]
    mine = rows[comm.rank(group)]
    if any(r != rows[0] for r in rows) or (mine[2] != -1 and mine[2:] != mine[:2]):
        desc = "; ".join(f"rank {i}: input_ids {tuple(r[:2])}, labels " + ("none" if r[2] == -1 else str(tuple(r[2:])))
                         for i, r in enumerate(rows))
        raise ValueError(f"context parallelism: every rank must pass labels (or none) shaped like its input_ids "
                         f"shard, and the same shard shape ({desc})")


def context_parallelize(model, group=None, layout="zigzag"):
    """Make a zoo model (llmkern.models GPT or Llama, DeepSeek-V3's MLA and MoE included) run with the sequence
    sharded over `group`; returns it.

    Afterwards the model takes this rank's shard of input_ids and labels (shard_sequence(x, group, 1,
    layout)) and position_ids if any (the shard of the absolute ones; default: context_parallel_positions),
    returns the logits of its own tokens and, with labels, the mean loss over all tokens of all ranks
    (the same value on every rank; the next-token shift is done across the shards). The parameters stay
    replicated, and each rank's gradients cover only its tokens: call all_reduce_gradients(model) after
    loss.backward() (it sums them over the group) to get the unsharded model's gradients. Under data
    parallelism on top, reduce over the data x context ranks by a sum divided by the data-parallel size
    (an averaging DDP/FSDP over both: multiply the loss by the context-parallel size).

    Attention runs through context_parallel_attention (llmkern.attention) whatever model.backend says.
    The weights must be identical on every rank (same seed, or a broadcast). Composes with
    tensor_parallelize on a different group (heads sharded over the TP group, tokens over this one).
    NotImplementedError for a KV cache, attention_mask, last_only, prefix tuning, attention dropout and a MoE
    capacity factor."""
    group = comm.resolve_group(group, "context_parallelize")
    error = None
    try:
        _check_parallelizable(model, group, layout)
    except (TypeError, ValueError, NotImplementedError) as exc:
        error = exc
    _check_agreement(model, group, layout, error)
    cp = ContextParallel(group, layout)
    for m in model.modules():
        if m is not model and hasattr(m, "backend_name") and hasattr(m, "n_head"):  # the attention modules
            m.context_parallel = cp
    model.context_parallel = cp
    model.register_forward_pre_hook(_check_forward, with_kwargs=True)
    return model


def _check_agreement(model, group, layout, error):
    """Every rank must shard the same model (its config, module names and types, parameter shapes) with the same
    layout: otherwise each rank's tokens run another model or sit at other positions, and the loss was silently
    wrong. One all-gather of a few ints at setup, made by every rank (also one whose own checks failed, so that
    none waits in it); then every rank raises the same error."""
    from llmkern.parallel.tensor_parallel import _model_digest

    meta = [0, 0, 0]
    if error is None:
        digest, _ = _model_digest(model)
        config = int.from_bytes(hashlib.blake2b(repr(model.config).encode(), digest_size=7).digest(), "little")
        meta = [LAYOUTS.index(layout), digest, config]
    rows = comm.agree(group, "context_parallelize", meta, error)
    if any(r[0] != rows[0][0] for r in rows):
        raise ValueError("context_parallelize: the ranks of the group disagree on layout (" + ", ".join(
            f"rank {i}: {LAYOUTS[r[0]]!r}" for i, r in enumerate(rows)) + "); every rank must pass the same one")
    if any(r[1:] != rows[0][1:] for r in rows):
        raise ValueError("context_parallelize: the ranks of the group hold different models (their configs, module "
                         "names and types, or parameter names, shapes and dtypes differ); every rank must shard the "
                         "same model, with the same weights")


def _check_parallelizable(model, group, layout):
    """context_parallelize's checks of its arguments on this rank (ValueError / TypeError / NotImplementedError)."""
    from llmkern.models._attn import ZooModel

    _check_layout(layout)
    if not isinstance(model, ZooModel):
        raise TypeError(f"context_parallelize: needs a llmkern.models model (GPT, Llama), got {type(model).__name__}")
    if getattr(model.config, "arch", None) == "neox":  # (its config lacks fields read below: refused by name)
        raise ValueError(f"context_parallelize: {type(model).__name__} (GPT-NeoX / Phi, config "
                         f"{model.config.name or 'unnamed'!r}) is not supported: context parallelism covers the GPT "
                         f"and Llama-family models; train it without context_parallelize")
    if getattr(model, "context_parallel", None) is not None:
        raise ValueError("context_parallelize: the model is context-parallel already")
    if getattr(model, "pipeline_parallel", None) is not None:  # (its stages' transfers would hang: refused here)
        raise ValueError("context_parallelize: the model is pipeline-parallel (pipeline_parallelize refuses a "
                         "context-parallel model, and the other order is not supported either)")
    check_tensor_parallel_grid(model, group, "context_parallelize")
    capacity = getattr(model.config, "moe_capacity_factor", None)
    if getattr(model.config, "n_experts", 0) and capacity is not None:
        raise NotImplementedError(f"context_parallelize: moe_capacity_factor={capacity} is not supported: an expert's "
                                  f"capacity counts the tokens in front of it, this rank's shard here, so other pairs "
                                  f"would be dropped than in the unsharded model; build it with moe_capacity_factor=None")
    from llmkern.models._attn import MAX_HEAD_DIM

    c = model.config
    dims = (c.head_dim, c.v_head_dim or c.head_dim)
    if max(dims) > MAX_HEAD_DIM:  # (the zoo's own attention falls back to SDPA there; this one cannot)
        raise NotImplementedError(f"context_parallelize: head dims {dims[0]} / {dims[1]} exceed llmkern.attention's "
                                  f"1..{MAX_HEAD_DIM}, which context-parallel attention runs on")


def check_tensor_parallel_grid(model, cp_group, what):
    """ValueError unless every tensor-parallel layer's group meets the context-parallel `cp_group` in this rank
    only (a TP x CP grid). Over the same ranks (both functions' default: all of them) context parallelism would
    gather K/V shards of other heads from the other ranks: the shapes agree, so the logits were silently wrong.
    Every rank of an overlapping layout sees the overlap, so every rank raises."""
    from llmkern.parallel.pipeline import _tensor_parallel_types

    for name, m in model.named_modules():
        if isinstance(m, _tensor_parallel_types()) and not comm.meets_only_here(m.group, cp_group):
            raise ValueError(f"{what}: {name} is tensor-parallel over global ranks "
                             f"{sorted(dist.get_process_group_ranks(m.group))}, which share ranks other than this one "
                             f"({dist.get_rank()}) with the context-parallel group (global ranks "
                             f"{sorted(dist.get_process_group_ranks(cp_group))}): tensor- and context-parallel groups "
                             f"must form a grid (each tensor-parallel group meets each context-parallel group in one "
                             f"rank)")


def _partitioned_experts(model, group):
    """ids of the parameters of expert-parallel layers partitioned over `group` itself (each rank holds other
    experts, whose gradients the all-to-all's backward already completed: not to be summed); ValueError for
    expert parallelism over a group that overlaps `group` partly (neither replicas nor one partition)."""
    from llmkern.parallel.expert import ExpertParallelMoE

    ranks = set(dist.get_process_group_ranks(group))
    skip = set()
    for name, m in model.named_modules():
        if not isinstance(m, ExpertParallelMoE):
            continue
        ep = set(dist.get_process_group_ranks(m.group))
        if ep == ranks:
            skip.update(id(prm) for prm in m.experts.parameters())
        elif ep & ranks != {dist.get_rank()}:
            raise ValueError(f"all_reduce_gradients: {name} is expert-parallel over global ranks {sorted(ep)}, which "
                             f"overlap the context-parallel group (global ranks {sorted(ranks)}) in part: expert- and "
                             f"context-parallel groups must be the same ranks or form a grid")
    return skip


# ---- reducing gradients over ranks once (a sum is not idempotent) -----------------------------------------
# A gradient summed over p ranks is the same on every rank; summing it again (a second call, or a call after each
# of several accumulated backwards, as loss.backward(); all_reduce_gradients(model) in a loop invites) counted it p
# times: g1 + g2 came out as p·g1 + g2. So each reduced gradient is recorded (the tensor, its version counter): a
# reduction skips a gradient unchanged since on every rank, and when a backward is about to add to one, a hook on
# the parameter runs the record's `before_next` first (the ranks other than the group's first zero their copy of the
# sum, which the first keeps): the next sum is then the sum of every micro-step's, as DDP's averaging gives by
# itself. zero_grad (set to None, or zeroed in place: a new version) ends a record.

# (keyed by id: a WeakKeyDictionary compares tensors with ==; each entry dies with its parameter)
_REDUCED = {}  # id(parameter) -> (key, weakref to its .grad then, its _version, before_next)
_HOOKED = {}  # id(parameter) -> weakref to the parameter, which carries the hook


def _forget(pid, _ref=None):
    _REDUCED.pop(pid, None)
    _HOOKED.pop(pid, None)


def _record(prm):
    ref = _HOOKED.get(id(prm))
    return _REDUCED.get(id(prm)) if ref is not None and ref() is prm else None


def _still_reduced(prm, record):
    g = prm.grad
    return g is not None and record[1]() is g and g._version == record[2]


def already_reduced(prm, key):
    """Whether prm.grad is exactly what the last reduction `key` (reduction_key: how, over which ranks) left:
    no backward and no in-place change since."""
    record = _record(prm)
    return record is not None and record[0] == key and _still_reduced(prm, record)


def note_reduced(prm, key, before_next=None):
    """Record prm.grad as reduced by `key`; before_next(grad), if given, runs in place (no autograd) when a later
    backward is about to accumulate into that same, unchanged gradient, or a reduction takes it up again."""
    ref = _HOOKED.get(id(prm))
    if ref is None or ref() is not prm:  # (one hook per parameter, for its lifetime)
        _forget(id(prm))
        ref = weakref.ref(prm, functools.partial(_forget, id(prm)))
        if prm.requires_grad:
            prm.register_hook(functools.partial(_before_accumulation, ref))
        _HOOKED[id(prm)] = ref
    _REDUCED[id(prm)] = (key, weakref.ref(prm.grad), prm.grad._version, before_next)


def _reopen(prm):
    """End prm's record; run its before_next when the gradient is still the recorded one."""
    record = _record(prm)
    _REDUCED.pop(id(prm), None)
    if record is not None and record[3] is not None and _still_reduced(prm, record):
        with torch.no_grad():
            record[3](prm.grad)


def _before_accumulation(prm_ref, grad):
    prm = prm_ref()
    if prm is not None and _record(prm) is not None and _accumulates(prm):
        _reopen(prm)
    return None  # (the incoming gradient itself is unchanged)


def _accumulates(prm):
    """Whether the running backward adds into prm.grad: torch.autograd.grad(..., inputs=[prm]) (a gradient penalty,
    a grad-norm probe between the reduction and the optimizer step) runs prm's hooks too but adds nothing, and must
    leave the reduced gradient as it is."""
    will_run = getattr(torch._C, "_will_engine_execute_node", None)
    if will_run is None:  # (a torch without it: every hook call is taken for an accumulation)
        return True
    with torch.enable_grad():
        accumulator = prm.view_as(prm).grad_fn.next_functions[0][0]  # (the live AccumulateGrad node of prm)
    try:
        return bool(will_run(accumulator))
    except RuntimeError as e:  # ("a leaf node ... while running autograd.grad()": it captures the gradient, adds
        if "autograd.grad" in str(e):  # nothing); any other error is not taken for that
            return False
        raise


def reduction_key(op, group):
    return op, tuple(dist.get_process_group_ranks(group))


def all_reduce_grads(params, group, op, what):
    """Sum (op="sum") or average ("mean") the gradients of `params` (the same list on every rank) over `group`, in
    place, one flattened all-reduce per dtype, each gradient once (see above). One all-reduce of a flag per
    parameter first decides which to reduce: those with a gradient on some rank that no reduction of this kind
    has left unchanged; a rank without one joins with zeros (a parameter its tokens did not reach). Returns the
    reduced parameters."""
    key, keep = reduction_key(op, group), comm.rank(group) == 0
    # per parameter: 0 no gradient, 1 the last reduction's (unchanged), 2 a gradient to reduce
    state = [0 if prm.grad is None else 1 if already_reduced(prm, key) else 2 for prm in params]
    flags = torch.tensor(state, dtype=torch.int64)
    if params:
        flags = flags.to(comm._meta_device(None, group))
        comm.check_same_shape(flags, group, f"{what} (parameter count)")
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    todo = [prm for prm, most in zip(params, flags.tolist()) if most == 2]
    for prm in todo:
        if prm.grad is None:
            prm.grad = torch.zeros_like(prm)
        else:
            _reopen(prm)  # (a copy of the last sum on a rank that does not keep it: zeroed)
    grads = {}
    for prm in todo:
        grads.setdefault(prm.grad.dtype, []).append(prm.grad)
    for _, gs in sorted(grads.items(), key=lambda kv: str(kv[0])):  # (the same order on every rank)
        flat = torch.cat([g.reshape(-1) for g in gs])
        dist.all_reduce(flat, group=group)
        if op == "mean":
            flat /= comm.world_size(group)
        for g, part in zip(gs, flat.split([g.numel() for g in gs])):
            g.copy_(part.view_as(g))
    for prm in todo:  # (an average is idempotent: mean(G + g_r) = G + mean(g_r))
        note_reduced(prm, key, torch.Tensor.zero_ if op == "sum" and not keep else None)
    return todo


def all_reduce_gradients(model, group=None):
    """Sum the gradients of `model`'s parameters over the context-parallel group (default: the one
    context_parallelize gave the model, else WORLD), in place, in one all-reduce per dtype (flattened).
    The experts of an expert-parallel model partitioned over the same group are left as they are (their
    gradients are complete on the rank that holds them). With gradient accumulation, call it after the last
    backward or after each one: a gradient it summed already is not summed again (a second call leaves it), and a
    backward that adds to one leaves, after the next call, the sum of the micro-steps (the ranks other than the
    group's first drop their copy of the earlier sum as that backward starts adding to it: read .grad after the
    call). A parameter with a gradient on some ranks only is summed with zeros for the others."""
    if not isinstance(model, nn.Module):  # (None returned None on one rank, and failed on more)
        raise TypeError(f"all_reduce_gradients: model must be an nn.Module, got {type(model).__name__}")
    if group is None and getattr(model, "context_parallel", None) is not None:
        group = model.context_parallel.group
    group = comm.resolve_group(group, "all_reduce_gradients")
    if comm.world_size(group) == 1:
        return model
    skip = _partitioned_experts(model, group)
    params = [prm for prm in model.parameters() if id(prm) not in skip]  # (parameters() yields a tied weight once)
    all_reduce_grads(params, group, "sum", "all_reduce_gradients")
    return model


__all__ = ["context_parallel_attention", "shard_sequence", "gather_sequence", "context_parallel_positions",
           "context_parallelize", "all_reduce_gradients", "ContextParallel", "LAYOUTS"]
