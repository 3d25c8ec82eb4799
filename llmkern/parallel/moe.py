"""Tensor-parallel routed experts ("expert tensor parallelism") for the zoo's sparse MoE MLP.

Every routed expert is sharded along its FFN width F, as a dense SwiGLU MLP is: rank r of p keeps
rows [r·f, (r+1)·f), f = F/p, of each expert's gate and of its up projection, and the same columns of
its down projection:

    gate_up_proj [E, 2F, d] -> [E, 2f, d]   (the shard's gate rows, then its up rows: moe_mlp's layout)
    down_proj    [E, d, F]  -> [E, d, f]

SwiGLU acts on each hidden unit separately, so rank r's experts compute an exact part of every
expert's output and the parts add up to it:  y = Σ_r moe_mlp(x, gate_up_r, down_r, ids, weights).

Per MoE layer (x replicated, as the dense MLP's input):

    x ── router (replicated) ──> ids, weights
    (x, weights) ── enter ──> moe_mlp on this rank's shard, all tokens ──> partial y ── exit ──> y

- enter: the identity; backward: all-reduce of the x and weights gradients, of which each rank holds
  only its experts' part. So the router sees the whole routing-weight gradient and its own gradient is
  the unsharded model's on every rank (no gradient hook needed), as is the gradient of x.
- exit: all-reduce of the partial outputs (backward: the identity).

Sequence parallelism (``sequence_parallel=True``; tensor_parallelize does not apply it, like the dense
layers): x is this rank's contiguous 1/p of the flattened tokens. The router runs on the local tokens;
enter all-gathers x, ids and weights (backward: reduce-scatter), exit reduce-scatters the partial
outputs (backward: all-gather). The router (and the shared expert's gate) then sees only the local
tokens, so their weights' gradients are summed over the ranks in the backward (as RowParallelLinear does
for its bias), and the router logits handed out for the load-balancing loss are all-gathered, so that
the loss is the unsharded model's on every rank (their backward keeps this rank's slice of the
gradient: each rank adds the whole loss to its own once, as the unsharded model adds it once).

Qwen2-MoE's shared expert is a dense MLP: tensor_parallelize shards it with the column/row layers;
``TensorParallelMoE.from_moe`` does it itself when used alone. Memory per rank: the routed experts
take 1/p of their unsharded size; compute per rank: 1/p of the experts' FLOPs (plus the replicated
router).

The routing is the layer's own (llama.MoE.route: Mixtral's softmax top-k; DeepseekMoE.route: DeepSeek-V3's
sigmoid group-limited choice with its selection bias, a buffer that stays replicated and gets no gradient):
a DeepseekMoE becomes a TensorParallelDeepseekMoE, the same layer with DeepseekMoE's route and ungated
shared experts. Its router computes its float32 logits inside TopkRouter, so sequence parallelism (where the
router weight's gradient must be summed over the ranks) is refused for it.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import llmkern
from llmkern.models import llama
from llmkern.models.deepseek import DeepseekMoE
from llmkern.ops._checks import bool_arg
from llmkern.parallel import comm
from llmkern.parallel.layers import ColumnParallelLinear, RowParallelLinear, _maybe_no_compile, _ParallelLinear
from llmkern.parallel.vocab import _CopyToRanks, _SumOverRanks


# ---- token collectives under sequence parallelism ---------------------------------------------------

class _GatherTokens(torch.autograd.Function):
    """Forward: all-gather of the token shards [m, ...] -> [p·m, ...]. Backward: reduce-scatter (each rank
    used the gathered tokens with its own experts: every rank's gradient is a part), or this rank's slice
    (reduce_grad=False: every rank computed the same function of them, e.g. the load-balancing loss)."""

    @staticmethod
    def forward(ctx, x, group, reduce_grad):
        ctx.group, ctx.reduce_grad, ctx.m = group, reduce_grad, x.shape[0]
        return comm.all_gather_dim0(x.contiguous(), group)

    @staticmethod
    def backward(ctx, dy):
        if ctx.reduce_grad:
            return comm.reduce_scatter_dim0(dy.contiguous(), ctx.group), None, None
        r = comm.rank(ctx.group)
        return dy[r * ctx.m:(r + 1) * ctx.m], None, None


class _ScatterTokens(torch.autograd.Function):
    """Forward: reduce-scatter of the partial outputs [p·m, ...] -> this rank's tokens [m, ...], summed.
    Backward: all-gather of the gradient (every rank's partial output fed all of the tokens)."""

    @staticmethod
    def forward(ctx, y, group):
        ctx.group = group
        return comm.reduce_scatter_dim0(y.contiguous(), group)

    @staticmethod
    def backward(ctx, dy):
        return comm.all_gather_dim0(dy.contiguous(), ctx.group), None


def _apply(fn, *args):
    return _maybe_no_compile(fn.apply)(*args)  # collectives are opaque to torch.compile


# ---- the sharded experts ----------------------------------------------------------------------------

def _expert_shard(gate_up, down, p, r):
    """Rank r's (gate_up [E, 2f, d], down [E, d, f]) of the stacked experts, f = F/p."""
    F_ = down.shape[2]
    f = F_ // p
    gu = torch.cat([gate_up[:, r * f:(r + 1) * f], gate_up[:, F_ + r * f:F_ + (r + 1) * f]], dim=1)
    return gu, down[:, :, r * f:(r + 1) * f]


class ShardedExperts(comm.SharesProcessGroups, nn.Module):
    """This rank's 1/p of E stacked SwiGLU experts, split along the FFN width F (see the module
    docstring): gate_up_proj [E, 2F/p, d], down_proj [E, d, F/p]. The parameter names are the unsharded
    Experts' (a rank's state_dict holds its shard under the same keys)."""

    def __init__(self, experts, group):
        super().__init__()
        gate_up, down = experts.gate_up_proj, experts.down_proj
        p, r = comm.world_size(group), comm.rank(group)
        self.ffn_dim, self.world_size, self.rank, self.group = down.shape[2], p, r, group
        if self.ffn_dim % p:
            raise ValueError(f"the experts' FFN width (moe_ffn_dim) {self.ffn_dim} is not divisible by the "
                             f"tensor-parallel world size {p}")
        gu, dn = _expert_shard(gate_up.detach(), down.detach(), p, r)
        self.gate_up_proj = nn.Parameter(gu.clone(), requires_grad=gate_up.requires_grad)
        self.down_proj = nn.Parameter(dn.clone(), requires_grad=down.requires_grad)

    def gathered(self):
        """The whole (gate_up_proj [E, 2F, d], down_proj [E, d, F]) on every rank (one all-gather each;
        no gradient): for checkpoints and checks."""
        p, f = self.world_size, self.ffn_dim // self.world_size
        gu = comm.all_gather_dim0(self.gate_up_proj.detach().transpose(0, 1).contiguous(), self.group)
        gu = gu.view(p, 2, f, *gu.shape[1:])  # [rank, gate|up, f, E, d]
        gate_up = torch.cat([gu[:, 0].reshape(-1, *gu.shape[3:]), gu[:, 1].reshape(-1, *gu.shape[3:])])
        dn = comm.all_gather_dim0(self.down_proj.detach().permute(2, 0, 1).contiguous(), self.group)
        return gate_up.transpose(0, 1).contiguous(), dn.permute(1, 2, 0).contiguous()

    def extra_repr(self):
        E, two_f, d = self.gate_up_proj.shape
        return f"n_experts={E}, hidden={d}, ffn_dim={self.ffn_dim}, shard={two_f // 2}, world_size={self.world_size}"


# ---- the MoE layer ----------------------------------------------------------------------------------

class TensorParallelMoE(comm.SharesProcessGroups, llama.MoE):
    """The zoo's MoE (llmkern.models.llama.MoE: same attributes, forward and router_logits contract) with
    its routed experts sharded over a tensor-parallel group. Build it with ``from_moe``."""

    @classmethod
    def from_moe(cls, moe, group=None, *, sequence_parallel=False, shard_shared_expert=True, **layer_kw):
        """Shard `moe` (weights identical on every rank) without changing it. ValueError when the experts'
        FFN width (or the shared expert's) is not divisible by the world size. shard_shared_expert=False
        keeps the shared expert module as it is (tensor_parallelize shards its linear layers itself);
        layer_kw (overlap, chunks, pieces, transport) go to the shared expert's parallel layers."""
        if not isinstance(moe, llama.MoE):
            raise TypeError(f"TensorParallelMoE.from_moe: moe must be the zoo's MoE layer (llmkern.models.llama.MoE), "
                            f"got {type(moe).__name__}")
        # (strings were read as bools: "False" turned sequence parallelism on, silently)
        sequence_parallel = bool_arg("TensorParallelMoE: sequence_parallel", sequence_parallel)
        shard_shared_expert = bool_arg("TensorParallelMoE: shard_shared_expert", shard_shared_expert)
        unknown = sorted(set(layer_kw) - {"overlap", "chunks", "pieces", "transport"})
        if unknown:  # (swallowed before, when the layer has no shared expert)
            raise TypeError(f"TensorParallelMoE.from_moe: unexpected keyword argument {unknown[0]!r} (the layer "
                            f"arguments are overlap, chunks, pieces, transport)")
        group = comm.resolve_group(group, "TensorParallelMoE")
        if sequence_parallel:
            _check_sequence_parallel(moe, shard_shared_expert)
            if getattr(moe, "capacity_factor", None) is not None:  # (each rank would count its token shard)
                raise ValueError("TensorParallelMoE: a capacity factor (moe_capacity_factor) with sequence "
                                 "parallelism is not supported: the capacity would count each rank's token shard, "
                                 "not the sequence's; use tensor parallelism without sequence_parallel")
        if isinstance(moe, DeepseekMoE):
            cls = TensorParallelDeepseekMoE
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.n_experts, self.top_k, self.renormalize = moe.n_experts, moe.top_k, moe.renormalize
        self.capacity_factor = getattr(moe, "capacity_factor", None)  # (x replicated: the unsharded drops)
        self.drop_policy = getattr(moe, "drop_policy", "probs")
        self.backend_name, self.group, self.sequence_parallel = moe.backend_name, group, bool(sequence_parallel)
        self.world_size = comm.world_size(group)
        self.gate = moe.gate  # replicated (DeepSeek's with its selection bias buffer)
        for name in _SHARED_NAMES:  # (the shared expert(s) and Qwen2-MoE's gate of it, where the layer has them)
            if hasattr(moe, name):
                setattr(self, name, getattr(moe, name))
        self.experts = ShardedExperts(moe.experts, group)
        mlp = "shared_experts" if isinstance(moe, DeepseekMoE) else "shared_expert"
        if getattr(moe, mlp) is not None and shard_shared_expert:
            setattr(self, mlp, _shard_dense_mlp(getattr(moe, mlp), group, self.sequence_parallel, layer_kw))
        return self.train(moe.training)  # (a model put in eval() before tensor_parallelize stays in eval)

    def forward(self, x, router_logits=None):
        """x [..., d] (this rank's tokens under sequence parallelism) -> y, x's shape. router_logits: a list
        to append this layer's router logits [tokens, E] to (all of the tokens, also under sequence
        parallelism)."""
        comm.check_same_shape(x, self.group, type(self).__name__)  # a local error would hang the others
        weights, ids = self.route(x, router_logits)
        return self.add_shared(x, self._routed(x, ids, weights))

    def route(self, x, router_logits=None):
        """llama.MoE.route with the replicated router under sequence parallelism (see _replicated_linear) and
        the router logits of all of the tokens."""
        logits = self._replicated_linear(self.gate, x)
        if router_logits is not None:
            router_logits.append(self._all_tokens(logits.reshape(-1, self.n_experts), reduce_grad=False))
        return self.drop_over_capacity(*llmkern.moe_route(logits, self.top_k, renormalize=self.renormalize))

    def add_shared(self, x, y):
        """llama.MoE.add_shared with the shared expert's gate replicated as the router is."""
        if self.shared_expert is None:
            return y
        return y + torch.sigmoid(self._replicated_linear(self.shared_expert_gate, x)) * self.shared_expert(x)

    def _replicated_linear(self, linear, x):
        """A replicated linear layer on x. Under sequence parallelism it sees only this rank's tokens: its
        weight then enters through _CopyToRanks, whose backward sums the gradient over the ranks."""
        if not (self.sequence_parallel and self.world_size > 1):
            return linear(x)
        w = _apply(_CopyToRanks, linear.weight, self.group)
        b = None if linear.bias is None else _apply(_CopyToRanks, linear.bias, self.group)
        return F.linear(x, w, b)

    def _all_tokens(self, t, reduce_grad=True):
        """t [tokens, ...] of every rank's tokens: all-gathered under sequence parallelism, else
        identity with the gradient all-reduced (reduce_grad) or t itself."""
        if self.world_size == 1:
            return t
        if self.sequence_parallel:
            return _apply(_GatherTokens, t, self.group, reduce_grad)
        return _apply(_CopyToRanks, t, self.group) if reduce_grad else t

    def _routed(self, x, ids, weights):
        """The routed experts' output for x (this rank's shard of F, all tokens, summed over the ranks)."""
        shape, d, k = x.shape, x.shape[-1], ids.shape[-1]
        x2, ids2, w2 = x.reshape(-1, d), ids.reshape(-1, k), weights.reshape(-1, k)
        if self.sequence_parallel and self.world_size > 1:
            ids2 = comm.all_gather_dim0(ids2.contiguous(), self.group)  # (integers: no gradient)
        x2, w2 = self._all_tokens(x2), self._all_tokens(w2)
        y = llama.run_experts(self.backend_name, x2[None], self.experts.gate_up_proj, self.experts.down_proj,
                              ids2[None], w2[None])[0]
        if self.world_size > 1:
            y = _apply(_ScatterTokens if self.sequence_parallel else _SumOverRanks, y, self.group)
        return y.view(shape[:-1] + (y.shape[-1],))

    def extra_repr(self):
        return f"world_size={self.world_size}, sequence_parallel={self.sequence_parallel}"


class TensorParallelDeepseekMoE(TensorParallelMoE, DeepseekMoE):
    """TensorParallelMoE of DeepSeek-V3's MoE layer (llmkern.models.deepseek.DeepseekMoE): its sigmoid
    group-limited routing (the replicated TopkRouter: the routing weights' gradient reaches it whole through
    the experts' enter all-reduce, as the softmax router's does) and its ungated shared experts (a dense MLP,
    sharded like Qwen2-MoE's shared expert). No sequence parallelism (from_moe refuses it)."""

    # (TensorParallelMoE's route and add_shared come first in the MRO: the layer's own ones are wanted)
    route, add_shared = DeepseekMoE.route, DeepseekMoE.add_shared


_SHARED_NAMES = ("shared_expert", "shared_expert_gate", "shared_experts")


def _check_sequence_parallel(moe, shard_shared_expert):
    """Under sequence parallelism the replicated router and shared-expert gate see only this rank's
    tokens (their gradients are summed over the ranks through their weights: plain nn.Linear only), and a
    replicated shared expert would get only its tokens' gradient: it must be sharded."""
    if isinstance(moe, DeepseekMoE):
        raise ValueError("TensorParallelMoE(sequence_parallel=True) does not support DeepSeek-V3's MoE "
                         "(DeepseekMoE): its router (TopkRouter) computes the logits itself, so its weight's "
                         "gradient could not be summed over the ranks' token shards; use sequence_parallel=False")
    for name in ("gate", "shared_expert_gate"):
        if getattr(moe, name) is not None and type(getattr(moe, name)) is not nn.Linear:
            raise ValueError(f"TensorParallelMoE(sequence_parallel=True): {name} must be a plain nn.Linear, got "
                             f"{type(getattr(moe, name)).__name__}")
    if moe.shared_expert is not None and not shard_shared_expert:
        raise ValueError("TensorParallelMoE(sequence_parallel=True) shards the shared expert itself "
                         "(shard_shared_expert=False is for tensor_parallelize, without sequence parallelism)")


def _shard_dense_mlp(mlp, group, sequence_parallel, layer_kw):
    """A copy of Qwen2-MoE's shared expert with gate_proj / up_proj column- and down_proj row-parallel,
    as tensor_parallelize shards a dense MLP (already-parallel layers are kept; `mlp` is not changed)."""
    kw = dict(layer_kw, sequence_parallel=sequence_parallel)
    shard = copy.copy(mlp)
    shard._modules = dict(mlp._modules)  # (a shallow copy would share the child table with mlp)
    for name, cls in (("gate_proj", ColumnParallelLinear), ("up_proj", ColumnParallelLinear),
                      ("down_proj", RowParallelLinear)):
        child = getattr(mlp, name)
        if isinstance(child, _ParallelLinear):
            continue
        try:
            shard._modules[name] = cls.from_linear(child, group, **kw)
        except ValueError as exc:
            raise ValueError(f"cannot shard the shared expert's {name}: {exc}") from None
    return shard


def is_moe(module):
    """Whether tensor_parallelize shards `module` as a sparse MoE layer (the zoo's MoE, not already tensor- or
    expert-parallel: an ExpertParallelMoE holds only E/p experts, tensor_parallelize refuses such models)."""
    from llmkern.parallel.expert import ExpertParallelMoE

    return isinstance(module, llama.MoE) and not isinstance(module, (TensorParallelMoE, ExpertParallelMoE))


__all__ = ["TensorParallelMoE", "TensorParallelDeepseekMoE", "ShardedExperts", "is_moe"]
