"""Vocabulary-parallel token embedding, LM head and cross-entropy (Megatron-LM's layout).

Rank r of p holds rows [r·S, (r+1)·S) of the [V, d] embedding / LM head weight, S = ceil(V / p) (the
last shard is padded with zero rows when p does not divide V; they are never looked up and their
logits are masked out of the softmax). A tied LM head shares the embedding's shard.

- VocabParallelEmbedding: each rank looks up the ids in its rows (zeros elsewhere) and the partial
  embeddings are summed over the ranks (one all-reduce; its backward is the identity, as every rank
  holds the whole output gradient).
- VocabParallelLMHead: forward(h) returns the whole logits [..., V] (an all-gather along the vocabulary:
  for generation and for callers that want logits); `vocab_parallel_loss(h, labels)` returns the mean
  next-token loss without gathering anything: each rank computes its logits [c, S] one chunk of c rows
  at a time, the softmax statistics are combined with two all-reduces per chunk (the row max, then the
  sums of exponentials and the target logits), and the gradients are formed while the chunk exists
  (llmkern.linear_cross_entropy's scheme), so neither the [N, V] logits nor an [N, S] softmax is kept. That is what the zoo models use with `model(ids, labels, return_logits=False)`.

`tensor_parallelize(model, group, vocab_parallel=True)` installs them; see
llmkern/parallel/tensor_parallel.py.
"""
import numbers

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llmkern.ops import _checks
from llmkern.ops.cross_entropy import _LABEL_DTYPES, _loss_terms, check_chunk_size, ignored
from llmkern.parallel import comm


def shard_rows(V, group):
    """(lo, hi, S): this rank's vocabulary rows [lo, hi) and the shard size S = ceil(V / p)."""
    p, r = comm.world_size(group), comm.rank(group)
    S = -(-V // p)
    lo = min(r * S, V)
    return lo, min(lo + S, V), S


def _check_shard(what, weight_shard, V, group):
    """A constructor's shard must be this rank's [ceil(V / p), d] rows (a full table, or another split, gave
    wrong rows or logits of the wrong width silently)."""
    if isinstance(V, bool) or not isinstance(V, int) or V < 1:
        raise ValueError(f"{what}: the vocabulary size must be an int >= 1, got {V!r}")
    S = shard_rows(V, comm.resolve_group(group, what))[2]
    if not isinstance(weight_shard, torch.Tensor) or weight_shard.dim() != 2 or weight_shard.shape[0] != S:
        raise ValueError(f"{what}: weight_shard must be this rank's [ceil({V} / world size) = {S}, d] rows (use "
                         f"from_embedding / from_linear to shard a full layer), got "
                         f"{tuple(getattr(weight_shard, 'shape', ()))}")


def _shard(weight, group):
    """This rank's rows of a [V, ...] tensor, zero-padded to S rows."""
    lo, hi, S = shard_rows(weight.shape[0], group)
    out = weight.new_zeros((S,) + tuple(weight.shape[1:]))
    out[:hi - lo] = weight[lo:hi]
    return out


class _SumOverRanks(torch.autograd.Function):
    """Forward: all-reduce (sum) of the partial results; backward: the identity (every rank holds the
    whole output gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, dy):
        return dy, None


class _CopyToRanks(torch.autograd.Function):
    """Forward: the identity (the input is replicated); backward: sum the gradient over the ranks (each
    holds the part that flowed back through its own vocabulary rows)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        dy = dy.contiguous().clone()
        dist.all_reduce(dy, group=ctx.group)
        return dy, None


class VocabParallelEmbedding(comm.SharesProcessGroups, nn.Module):
    def __init__(self, weight_shard: nn.Parameter, num_embeddings: int, group, padding_idx=None):
        super().__init__()
        _check_shard("VocabParallelEmbedding", weight_shard, num_embeddings, group)
        self.weight, self.num_embeddings, self.group = weight_shard, num_embeddings, group
        self.embedding_dim = weight_shard.shape[1]
        if padding_idx is not None:  # (as nn.Embedding: a negative one counts from the end; -1 matched no rank's rows)
            if isinstance(padding_idx, bool) or not isinstance(padding_idx, numbers.Integral) \
                    or not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"VocabParallelEmbedding: padding_idx must be None or an int in "
                                 f"[-{num_embeddings}, {num_embeddings}), got {padding_idx!r}")
            padding_idx = int(padding_idx) + (num_embeddings if padding_idx < 0 else 0)
        self.padding_idx = padding_idx  # (global id: its row gets no gradient on the rank that holds it)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group=None):
        if not isinstance(emb, nn.Embedding):
            raise TypeError(f"VocabParallelEmbedding.from_embedding: emb must be an nn.Embedding, got "
                            f"{type(emb).__name__}")
        group = comm.resolve_group(group, "VocabParallelEmbedding")
        if emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse:
            raise ValueError("VocabParallelEmbedding: max_norm, scale_grad_by_freq and sparse embeddings are not "
                             "supported")
        shard = nn.Parameter(_shard(emb.weight.detach(), group), requires_grad=emb.weight.requires_grad)
        return cls(shard, emb.num_embeddings, group, emb.padding_idx)

    def forward(self, ids):
        # ranks that pass different shapes raise here, on every rank (in the all-reduce below gloo
        # aborts the process and NCCL hangs until the timeout)
        comm.check_same_shape(ids if isinstance(ids, torch.Tensor) else None, self.group,
                              "VocabParallelEmbedding: ids")
        # (after the cross-rank check, which compares the dtypes: the same on every rank)
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"VocabParallelEmbedding: ids must be an integer tensor, got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)}")
        lo, hi, _ = shard_rows(self.num_embeddings, self.group)
        mine = (ids >= lo) & (ids < hi)
        # an id outside [0, V) looks up row S (out of range) on every rank: F.embedding raises as
        # nn.Embedding does (a device assert on CUDA), before any collective, instead of a zero embedding
        bad = (ids < 0) | (ids >= self.num_embeddings)
        local = torch.where(mine, ids - lo, torch.where(bad, self.weight.shape[0], 0))
        pad = self.padding_idx
        local_pad = pad - lo if pad is not None and lo <= pad < hi else None
        local = F.embedding(local, self.weight, padding_idx=local_pad)
        return _SumOverRanks.apply(local * mine.unsqueeze(-1).to(local.dtype), self.group)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, shard={tuple(self.weight.shape)}"


def _check_vocab_labels(labels, ignore_index, num_classes):
    """Out-of-range labels raise on CPU (labels are replicated: every rank raises); on CUDA the gather
    of column S in _shard_loss is the device-side assert (no host sync)."""
    valid = ~ignored(labels, ignore_index)
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if not labels.is_cuda and bool(bad.any()):
        raise IndexError(f"vocab_parallel_loss: label {labels[bad][0].item()} is out of bounds for "
                         f"{num_classes} classes (ignore_index={ignore_index})")
    return valid, bad


def _shard_loss(z, labels, valid, bad, lo, valid_cols, group, grad_scale, num_classes, label_smoothing=0.0,
                z_loss=0.0):
    """Per-row losses of one chunk of vocabulary-sharded float32 (float64) logits z [c, S] (combined over the ranks
    with two all-reduces: the row max, then the sums of exponentials and the target logits, and with label smoothing
    the sums of the logits), the z-loss included, the loss gradient dloss/dz [c, S] times grad_scale (None for no
    gradient), computed in place in z, and the rows' z-loss (None without z_loss).
    label_smoothing eps: torch's (1 - eps) (lse - z[label]) + eps (lse - mean z), the mean over all num_classes
    columns; z_loss: + z_loss lse^2 (PaLM / Liger-Kernel)."""
    if valid_cols < z.shape[1]:  # the padded rows of the last shard are no classes
        z[:, valid_cols:] = float("-inf")
    local = labels - lo
    mine = (local >= 0) & (local < valid_cols) & valid
    # an out-of-range label gathers column S (out of bounds): a device assert on CUDA, no host sync
    z_label = z.gather(1, torch.where(mine, local, torch.where(bad, z.shape[1], 0))[:, None])[:, 0]
    m = z.max(dim=1).values
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z -= m[:, None]
    # (the logits' sum relative to the row max: large logits do not cancel it away; the padded columns left out)
    rel_sum = [z[:, :valid_cols].sum(dim=1)] if label_smoothing else []
    z.exp_()
    stats = torch.stack([z.sum(dim=1), torch.where(mine, z_label - m, torch.zeros_like(m))] + rel_sum)
    dist.all_reduce(stats, group=group)
    total, target = stats[0], stats[1]
    log_total = torch.log(total)
    loss = log_total - target
    if label_smoothing:  # lse - mean z = log(total) - mean(z - m)
        loss = (1 - label_smoothing) * loss + label_smoothing * (log_total - stats[2] / num_classes)
    z_rows = None
    if z_loss:
        lse = m + log_total
        z_rows = torch.where(valid, z_loss * lse * lse, torch.zeros_like(lse))
        loss = loss + z_rows
    loss = torch.where(valid, loss, torch.zeros_like(total))
    if grad_scale is None:
        return loss, None, z_rows
    z /= total[:, None]  # the softmax minus the (smoothed) one-hot of the label, for the rows not ignored
    if z_loss:  # d(z_loss lse^2)/dz = 2 z_loss lse softmax (1 at ignored rows: an infinite lse there is no NaN)
        z *= torch.where(valid, 1 + 2 * z_loss * lse, torch.ones_like(lse))[:, None]
    rows = torch.arange(z.shape[0], device=z.device)
    z[rows, torch.where(mine, local, torch.zeros_like(local))] -= mine.to(z.dtype) * (1 - label_smoothing)
    if label_smoothing:
        z[:, :valid_cols] -= label_smoothing / num_classes
    # where, not z * valid: with every label ignored grad_scale is inf (1 / 0) and torch's cross_entropy
    # gives zero gradients (inf * 0 would be NaN)
    z *= torch.where(valid, grad_scale, torch.zeros_like(grad_scale))[:, None]
    return loss, z, z_rows


def _vocab_parallel_lce(h, weight, bias, labels, lo, valid_cols, ignore_index, group, num_classes, chunk_size,
                        need_dh, need_dw, need_db, softcap=None, label_smoothing=0.0, z_loss=0.0):
    """(mean loss, partial dh [N, d], dW [S, d], db [S] float32, n_valid, the mean z-loss (0 without z_loss);
    float64 for float64 h): the loss of
    the sharded LM head and the gradients of the summed loss (upstream gradient 1, no 1 / n_valid: the backward
    scales them in float32, so that in float16 p / N does not underflow before a loss scale reaches it), chunk by
    chunk of rows while each chunk's logits exist. dh is this rank's part (its vocabulary rows' contribution); the
    ranks' parts sum to dh. dW is accumulated in float32 (float64) and kept in linear_cross_entropy's dtype
    (ops/cross_entropy._dw_dtype): a bfloat16 shard's dW is divided by n_valid in float32 once complete and
    rounded once to bfloat16 (2·S·d bytes kept instead of 4·S·d), any other stays float32 (float64), unscaled.
    softcap: the logits soft-capped first, c * tanh(z / c) (Gemma 2/3's final_logit_softcapping);
    label_smoothing, z_loss: see _shard_loss."""
    from llmkern.ops.cross_entropy import _add_mm, _dw_dtype, _lce_chunk_rows

    valid, bad = _check_vocab_labels(labels, ignore_index, num_classes)
    n_valid = valid.sum()
    # float32 at least (16-bit logits lose the loss), float64 inputs in float64 (as F.cross_entropy)
    ct = torch.promote_types(h.dtype, torch.float32)
    scale = torch.ones((), device=h.device, dtype=ct).expand(labels.shape[0])
    grads = need_dh or need_dw or need_db
    S, d = weight.shape
    dh = torch.empty_like(h) if need_dh else None
    dw = torch.zeros(S, d, device=h.device, dtype=ct) if need_dw else None
    db = torch.zeros(S, device=h.device, dtype=ct) if need_db else None
    total = torch.zeros((), device=h.device, dtype=ct)
    z_total = torch.zeros((), device=h.device, dtype=ct)
    step = _lce_chunk_rows(h.shape[0], S, chunk_size)
    z = dz = t = None
    for r0 in range(0, h.shape[0], step):
        rows = slice(r0, r0 + step)
        z = F.linear(h[rows], weight, bias).to(ct)
        if softcap:
            t = torch.tanh(z / softcap)
            z = softcap * t
        loss, dz, z_rows = _shard_loss(z, labels[rows], valid[rows], bad[rows], lo, valid_cols, group,
                                       scale[rows] if grads else None, num_classes, label_smoothing, z_loss)
        total += loss.sum()
        if z_rows is not None:
            z_total += z_rows.sum()
        if not grads:
            continue
        if softcap:
            dz = dz * (1 - t * t)  # d(c tanh(z / c)) / dz
        dz = dz.to(h.dtype)
        if need_dh:
            torch.matmul(dz, weight, out=dh[rows])
        if need_dw:
            _add_mm(dw, dz.t(), h[rows])
        if need_db:
            db += dz.sum(0, dtype=ct)
    if need_dw and _dw_dtype(weight.dtype) != dw.dtype:
        # Kept until the backward in the shard's dtype (bfloat16: 2·S·d bytes instead of 4·S·d), as
        # linear_cross_entropy keeps it. The mean's 1 / n_valid is applied here, in float32, before the one
        # rounding: the backward then only multiplies by the upstream gradient g, exactly for g = 1 (bfloat16
        # training has no loss scale) or a power of two (bfloat16 has float32's exponent range). n_valid is the
        # same on every rank (the labels are replicated: each rank counts all the rows, not its vocabulary's),
        # so every shard is divided by the same count and no all-reduce is needed. (The float32 accumulator and
        # its bfloat16 copy coexist for this cast, 6·S·d bytes, the chunk's logits freed first.)
        del z, dz, t
        dw /= n_valid.clamp_min(1)
        dw = dw.to(_dw_dtype(weight.dtype))
    return total / n_valid, dh, dw, db, n_valid, z_total / n_valid


class _VocabParallelLinearCE(torch.autograd.Function):
    """The sharded LM head and its mean cross-entropy in one function (h [N, d] replicated, labels [N]
    global ids, ignore_index rows left out): the [N, S] logits exist one chunk of rows at a time and the
    gradients are formed in the forward (as llmkern.linear_cross_entropy does), so the backward only
    scales them and sums dh over the ranks (one all-reduce of [N, d])."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, lo, valid_cols, ignore_index, group, num_classes, chunk_size,
                softcap=None, label_smoothing=0.0, z_loss=0.0):
        need = ctx.needs_input_grad
        loss, dh, dw, db, n_valid, z_term = _vocab_parallel_lce(
            h, weight, bias, labels, lo, valid_cols, ignore_index, group, num_classes, chunk_size, need[0], need[1],
            bias is not None and need[2], softcap, label_smoothing, z_loss)
        ctx.save_for_backward(dh, dw, db, n_valid)
        ctx.meta = (group, h.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(z_term)  # (the z-loss term is for logging; the loss holds it)
        return loss, z_term

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _g_z_term):
        dh, dw, db, n_valid = ctx.saved_tensors
        group, h_dtype, w_dtype, b_dtype = ctx.meta
        ct = torch.promote_types(h_dtype, torch.float32)
        # (in float32: g / n_valid may be tiny, and a float16 loss scale of 2^16 is float16's inf)
        scale = g.to(ct) / n_valid.clamp_min(1).to(ct)  # (every row ignored: the saved gradients are zero)
        if dh is not None:
            dh = (dh.to(ct) * scale).to(h_dtype)
            dist.all_reduce(dh, group=group)
        # (a bfloat16 dW already holds the mean's 1 / n_valid: only g is left, see _vocab_parallel_lce)
        dw = None if dw is None else (dw.to(ct) * (g.to(ct) if dw.dtype == torch.bfloat16 else scale)).to(w_dtype)
        db = None if db is None else (db * scale).to(b_dtype)
        return (dh, dw, db) + (None,) * 10  # labels ... z_loss


def _check_same_call(flags):
    """VocabParallelLMHead's first cross-rank check carries the call each rank makes (0: forward, the logits;
    1: vocab_parallel_loss): the two start with the same check of h, so a rank computing the loss while another
    computed the logits paired different collectives after it (a gloo abort on one rank, NaN logits on the other).
    Every rank raises."""
    if flags is not None and len(set(flags)) > 1:
        calls = ", ".join(f"rank {i}: {'the loss' if f else 'the logits'}" for i, f in enumerate(flags))
        raise ValueError(f"VocabParallelLMHead: the ranks make different calls ({calls}); every rank must ask for "
                         f"the loss (labels given) or every rank for the logits")


class VocabParallelLMHead(comm.SharesProcessGroups, nn.Module):
    def __init__(self, weight_shard: nn.Parameter, bias_shard, out_features: int, group):
        super().__init__()
        _check_shard("VocabParallelLMHead", weight_shard, out_features, group)
        if bias_shard is not None and (not isinstance(bias_shard, torch.Tensor)
                                       or tuple(bias_shard.shape) != (weight_shard.shape[0],)):
            raise ValueError(f"VocabParallelLMHead: bias_shard must be [{weight_shard.shape[0]}] (the weight shard's "
                             f"rows) or None, got {tuple(getattr(bias_shard, 'shape', ())) or bias_shard!r}")
        self.weight, self.bias, self.out_features, self.group = weight_shard, bias_shard, out_features, group
        self.in_features = weight_shard.shape[1]

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None, weight_shard=None):
        """Shard `linear` by output rows; `weight_shard` (a tied embedding's shard) is reused as is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"VocabParallelLMHead.from_linear: linear must be an nn.Linear, got "
                            f"{type(linear).__name__}")
        group = comm.resolve_group(group, "VocabParallelLMHead")
        if weight_shard is None:
            weight_shard = nn.Parameter(_shard(linear.weight.detach(), group),
                                        requires_grad=linear.weight.requires_grad)
        bias = None
        if linear.bias is not None:
            bias = nn.Parameter(_shard(linear.bias.detach(), group), requires_grad=linear.bias.requires_grad)
        return cls(weight_shard, bias, linear.out_features, group)

    def _local_logits(self, h):
        return F.linear(_CopyToRanks.apply(h, self.group), self.weight, self.bias)

    def forward(self, h):
        """The whole logits [..., V] (all-gathered over the vocabulary)."""
        from llmkern.parallel.layers import _GatherLastDim

        _check_same_call(comm.check_same_shape(h if isinstance(h, torch.Tensor) else None, self.group,
                                               "VocabParallelLMHead: h", flag=0))
        _check_hidden("VocabParallelLMHead", h, self.in_features)  # (the same on every rank, after the check)
        full = _GatherLastDim.apply(self._local_logits(h).contiguous(), self.group)
        return full[..., :self.out_features]

    def vocab_parallel_loss(self, h, labels, ignore_index=-100, chunk_size=None, softcap=None, label_smoothing=0.0,
                            z_loss=0.0, return_z_loss=False):
        """Mean cross-entropy of the logits of h [..., d] against labels [...] (ignore_index rows left
        out), computed on the vocabulary shards a chunk of rows at a time (`chunk_size` rows; default as
        llmkern.linear_cross_entropy's): no [N, V] tensor on any rank, and no [N, S] one either.
        softcap: the logits soft-capped first, softcap * tanh(z / softcap) (None or 0: off).
        label_smoothing, z_loss, return_z_loss: as llmkern.linear_cross_entropy's (torch's label smoothing, its
        mean logit over the whole vocabulary; the z-loss z_loss * lse^2; (loss, z_term) returned), the extra
        statistics all-reduced with the existing ones."""
        # the cross-rank checks first: on one rank only, the local error below would leave the others in
        # _shard_loss's all-reduces, where different sizes abort the process (gloo) or hang (NCCL)
        _check_same_call(comm.check_same_shape(h if isinstance(h, torch.Tensor) else None, self.group,
                                               "vocab_parallel_loss: h", flag=1))
        comm.check_same_shape(labels if isinstance(labels, torch.Tensor) else None, self.group,
                              "vocab_parallel_loss: labels")
        lo, hi, _ = shard_rows(self.out_features, self.group)
        # (the same on every rank, after the cross-rank checks: a wrong width reshaped into other rows, and
        # chunk_size -1 ran no chunk, loss 0)
        check_chunk_size(chunk_size, "vocab_parallel_loss: ")
        # (as linear_cross_entropy's: NaN and inf gave a NaN loss, a negative or True one was taken for a cap)
        softcap = _checks.softcap_arg(softcap) or None
        label_smoothing, z_loss, return_z_loss = _loss_terms(label_smoothing, z_loss, return_z_loss)
        _check_hidden("vocab_parallel_loss", h, self.in_features)
        # (int64 / int32 as linear_cross_entropy takes: uint8 labels indexed the logits as a mask, a silently wrong
        # gradient on some ranks, and int16 failed in the indexing)
        if not isinstance(labels, torch.Tensor) or labels.dtype not in _LABEL_DTYPES:
            raise TypeError(f"vocab_parallel_loss: labels must be an int64 or int32 tensor of class indices, got "
                            f"{getattr(labels, 'dtype', type(labels).__name__)}")
        ignore_index = _ignore_index_arg(ignore_index)
        if tuple(labels.shape) != tuple(h.shape[:-1]) and tuple(labels.shape) != (h.numel() // self.in_features,):
            raise ValueError(f"vocab_parallel_loss: labels must have shape {list(h.shape[:-1])} (h's leading dims) "
                             f"or [{h.numel() // self.in_features}], got {list(labels.shape)}")
        y = labels.reshape(-1)
        h, weight, bias = h.reshape(-1, self.in_features), self.weight, self.bias
        dt = _checks.autocast_dtype(h)
        if dt is not None:  # the logits in the autocast dtype, as F.linear would compute them
            h, weight, bias = (_checks.autocast_cast(dt, t) for t in (h, weight, bias))
        with torch.autocast(h.device.type, enabled=False):
            if not torch.is_grad_enabled():
                # (an autograd.Function's needs_input_grad ignores no_grad: through apply, an evaluation
                # would form dh, the float32 [S, d] dW and db, three GEMMs' work, and throw them away)
                out = _vocab_parallel_lce(h, weight, bias, y, lo, hi - lo, ignore_index, self.group,
                                          self.out_features, chunk_size, False, False, False, softcap,
                                          label_smoothing, z_loss)
                loss, z_term = out[0], out[5]
            else:
                loss, z_term = _VocabParallelLinearCE.apply(h, weight, bias, y, lo, hi - lo, ignore_index, self.group,
                                                            self.out_features, chunk_size, softcap, label_smoothing,
                                                            z_loss)
        return (loss, z_term) if return_z_loss else loss

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, shard={tuple(self.weight.shape)}"


def _check_hidden(what, h, in_features):
    """h must be a floating-point tensor [..., in_features] (a wrong width failed in the GEMM, a list in torch)."""
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{what}: h must be a tensor, got {type(h).__name__}")
    if h.dim() < 1 or h.shape[-1] != in_features:
        raise ValueError(f"{what}: h must be [..., {in_features}] (the head's in_features), got {tuple(h.shape)}")


def _ignore_index_arg(ignore_index):
    """ignore_index as an int: a float that is not a whole number (2.5) matched no label and ignored nothing,
    silently, and None / a string failed deep inside; a whole float (1.0) is taken as the int."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Real) \
            or (not isinstance(ignore_index, numbers.Integral) and not float(ignore_index).is_integer()):
        raise TypeError(f"vocab_parallel_loss: ignore_index must be an int, got {ignore_index!r}")
    return int(ignore_index)


EMBEDDING_NAMES = {"wte", "embed_tokens", "tok_embeddings", "word_embeddings"}
HEAD_NAMES = {"lm_head", "output"}


def vocab_parallel_plan(model, group):
    """[(parent, name, new module)] sharding the token embedding and the LM head of `model` by vocabulary
    rows (a tied head shares the embedding's shard)."""
    emb = [(p, n, c) for p in model.modules() for n, c in p.named_children()
           if n in EMBEDDING_NAMES and type(c) is nn.Embedding]
    heads = [(p, n, c) for p in model.modules() for n, c in p.named_children()
             if n in HEAD_NAMES and type(c) is nn.Linear]
    wrapped = [n for p in model.modules() for n, c in p.named_children()
               if n in HEAD_NAMES | EMBEDDING_NAMES and hasattr(c, "base_layer")]
    if wrapped:
        raise ValueError(f"tensor_parallelize(vocab_parallel=True): {wrapped[0]} is wrapped (LoRA); a LoRA on the "
                         f"token embedding or the LM head is not supported with vocab_parallel")
    if len(emb) != 1 or len(heads) != 1:
        raise ValueError(f"tensor_parallelize(vocab_parallel=True): needs one token embedding (named one of "
                         f"{sorted(EMBEDDING_NAMES)}, an nn.Embedding) and one LM head ({sorted(HEAD_NAMES)}, an "
                         f"nn.Linear); found {len(emb)} and {len(heads)}")
    (ep, en, e), (hp, hn, h) = emb[0], heads[0]
    if h.weight is not e.weight and h.out_features != e.num_embeddings:
        raise ValueError("tensor_parallelize(vocab_parallel=True): the LM head and the embedding have "
                         "different vocabulary sizes")
    new_e = VocabParallelEmbedding.from_embedding(e, group)
    tied = h.weight is e.weight
    new_h = VocabParallelLMHead.from_linear(h, group, weight_shard=new_e.weight if tied else None)
    return [(ep, en, new_e), (hp, hn, new_h)]


__all__ = ["VocabParallelEmbedding", "VocabParallelLMHead", "shard_rows", "vocab_parallel_plan"]
