"""Vocabulary-parallel token embedding, LM head and cross-entropy (Megatron-LM's layout).

Rank r of p holds rows [r·S, (r+1)·S) of the [V, d] embedding / LM head weight, S = ceil(V / p) (the
last shard is padded with zero rows when p does not divide V; they are never looked up and their
logits are masked out of the softmax). A tied LM head shares the embedding's shard.

- VocabParallelEmbedding: each rank looks up the ids in its rows (zeros elsewhere) and the partial
  embeddings are summed over the ranks (one all-reduce; its backward is the identity, as every rank
  holds the whole output gradient).
- VocabParallelLMHead: forward(h) returns the whole logits [..., V] (an all-gather along the vocabulary:
  for generation and for callers that want logits); `vocab_parallel_loss(h, labels)` returns the mean
  next-token loss without gathering anything: each rank computes its [N, S] logits and the softmax
  statistics are combined with three all-reduces of [N] floats (max, sum of exponentials, target
  logit). That is what the zoo models use with `model(ids, labels, return_logits=False)`.

`tensor_parallelize(model, group, vocab_parallel=True)` installs them; see
llmkern/parallel/tensor_parallel.py.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llmkern.parallel import comm


def shard_rows(V, group):
    """(lo, hi, S): this rank's vocabulary rows [lo, hi) and the shard size S = ceil(V / p)."""
    p, r = comm.world_size(group), comm.rank(group)
    S = -(-V // p)
    lo = min(r * S, V)
    return lo, min(lo + S, V), S


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


class VocabParallelEmbedding(nn.Module):
    def __init__(self, weight_shard: nn.Parameter, num_embeddings: int, group):
        super().__init__()
        self.weight, self.num_embeddings, self.group = weight_shard, num_embeddings, group
        self.embedding_dim = weight_shard.shape[1]

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group=None):
        group = comm.resolve_group(group, "VocabParallelEmbedding")
        if emb.padding_idx is not None or emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse:
            raise ValueError("VocabParallelEmbedding: padding_idx, max_norm, scale_grad_by_freq and sparse "
                             "embeddings are not supported")
        shard = nn.Parameter(_shard(emb.weight.detach(), group), requires_grad=emb.weight.requires_grad)
        return cls(shard, emb.num_embeddings, group)

    def forward(self, ids):
        lo, hi, _ = shard_rows(self.num_embeddings, self.group)
        mine = (ids >= lo) & (ids < hi)
        # an id outside [0, V) looks up row S (out of range) on every rank: F.embedding raises as
        # nn.Embedding does (a device assert on CUDA), before any collective, instead of a zero embedding
        bad = (ids < 0) | (ids >= self.num_embeddings)
        local = torch.where(mine, ids - lo, torch.where(bad, self.weight.shape[0], 0))
        local = F.embedding(local, self.weight)
        return _SumOverRanks.apply(local * mine.unsqueeze(-1).to(local.dtype), self.group)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, shard={tuple(self.weight.shape)}"


class _VocabParallelCE(torch.autograd.Function):
    """Per-row cross-entropy over vocabulary-sharded logits [N, S] (float32), labels [N] (global ids;
    ignore_index rows give 0). The backward is local: softmax minus the one-hot of the label."""

    @staticmethod
    def forward(ctx, logits, labels, lo, valid_cols, ignore_index, group, num_classes):
        valid = labels != ignore_index
        bad = valid & ((labels < 0) | (labels >= num_classes))
        if not labels.is_cuda and bool(bad.any()):  # (labels are replicated: every rank raises)
            raise IndexError(f"vocab_parallel_loss: label {labels[bad][0].item()} is out of bounds for "
                             f"{num_classes} classes (ignore_index={ignore_index})")
        z = logits.float()
        if valid_cols < z.shape[1]:  # the padded rows of the last shard are no classes
            z = z.clone()
            z[:, valid_cols:] = float("-inf")
        local = labels - lo
        mine = (local >= 0) & (local < valid_cols) & valid
        # an out-of-range label gathers column S (out of bounds): a device assert on CUDA, no host sync
        idx = torch.where(mine, local, torch.where(bad, z.shape[1], 0))
        z_label = z.gather(1, idx[:, None])[:, 0]
        idx = torch.where(mine, local, torch.zeros_like(local))
        m = z.max(dim=1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(z - m[:, None])
        total = e.sum(dim=1)
        target = torch.where(mine, z_label - m, torch.zeros_like(m))
        stats = torch.stack([total, target])
        dist.all_reduce(stats, group=group)
        total, target = stats[0], stats[1]
        loss = torch.where(valid, torch.log(total) - target, torch.zeros_like(total))
        e /= total[:, None]  # the softmax, kept for the backward
        ctx.save_for_backward(e, idx, mine, valid)
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        p, idx, mine, valid = ctx.saved_tensors
        d = p.clone()
        rows = torch.arange(d.shape[0], device=d.device)
        d[rows, idx] -= mine.to(d.dtype)
        # where, not g * valid: with every label ignored the mean's gradient g is inf (1 / 0) and torch's
        # cross_entropy gives zero gradients (inf * 0 would be NaN)
        d *= torch.where(valid, g, torch.zeros_like(g))[:, None]
        return d.to(ctx.dtype), None, None, None, None, None, None


class VocabParallelLMHead(nn.Module):
    def __init__(self, weight_shard: nn.Parameter, bias_shard, out_features: int, group):
        super().__init__()
        self.weight, self.bias, self.out_features, self.group = weight_shard, bias_shard, out_features, group
        self.in_features = weight_shard.shape[1]

    @classmethod
    def from_linear(cls, linear: nn.Linear, group=None, weight_shard=None):
        """Shard `linear` by output rows; `weight_shard` (a tied embedding's shard) is reused as is."""
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

        full = _GatherLastDim.apply(self._local_logits(h).contiguous(), self.group)
        return full[..., :self.out_features]

    def vocab_parallel_loss(self, h, labels, ignore_index=-100):
        """Mean cross-entropy of the logits of h [..., d] against labels [...] (ignore_index rows left
        out), computed on the vocabulary shards: no [N, V] tensor on any rank."""
        lo, hi, _ = shard_rows(self.out_features, self.group)
        logits = self._local_logits(h).reshape(-1, self.weight.shape[0])
        y = labels.reshape(-1)
        loss = _VocabParallelCE.apply(logits, y, lo, hi - lo, ignore_index, self.group, self.out_features)
        return loss.sum() / (y != ignore_index).sum()

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, shard={tuple(self.weight.shape)}"


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
