"""tensor_parallelize(model, group): shard a transformer's attention heads and MLP in place.

Module-naming contract (Hugging Face Llama / GPT-2 / nanoGPT names; llmkern.models follows it):

- "Linear" below is an nn.Linear or transformers' Conv1D (Hugging Face GPT-2's c_attn / c_fc / c_proj: y = x W + b,
  W stored [in, out]), sharded as the nn.Linear of W^T: the tensor-parallel layer holds a fresh [out/p, in] or
  [out, in/p] shard, so its state-dict entries are in the nn.Linear layout, not the Conv1D's.
- Column-parallel (output features split, weights [out/p, in]): linear children named
  q_proj, k_proj, v_proj, wq, wk, wv, up_proj, gate_proj, fc1, c_fc, w1, w3, fc_in, and multi-head latent
  attention's up projections q_b_proj and kv_b_proj (DeepSeek-V2/V3: per-head blocks of nope + rope and
  nope + v_head_dim rows, so contiguous row shards are whole heads).
  Fused projections are sharded segment by segment so that each rank keeps whole heads:
  qkv_proj, c_attn, Wqkv, qkv (3 segments: q, k, v; with GQA their sizes come from the head
  counts below) and gate_up_proj (2 segments).
- Row-parallel (input features split, output all-reduced, bias replicated): o_proj, out_proj,
  c_proj, down_proj, fc2, w2, wo, fc_out.
- A module holding a column-parallel q/k/v (or fused qkv) child is an attention module: its head
  counts n_head / n_heads / num_heads / num_attention_heads and n_kv_head / n_kv_heads /
  num_key_value_heads / num_kv_heads are divided by p (they must be divisible). Its forward must
  derive shapes from those counts and head_dim (``view(B, T, self.n_head, self.head_dim)``,
  ``reshape(B, T, self.n_head * self.head_dim)`` or ``-1``), never from the model width. An int attribute
  split_size (GPT-2's ``c_attn(x).split(self.split_size, dim=2)``; its embed_dim is read in __init__ only)
  must equal the width of each segment of its fused qkv projection (else refused) and is divided by p too.
  GPT-2's cross-attention (a q_attn beside a 2-segment c_attn) is refused.
  An attention module without head-count attributes (transformers 5's) takes them from its .config (or
  the model's) num_attention_heads / num_key_value_heads, which are checked but not rewritten: its forward
  must use ``-1`` and head_dim; one that reads head counts from the config (Phi3's split of qkv_proj) is
  refused, as is a fused qkv without any head count (its segment sizes are unknown).
- Multi-head latent attention (llmkern.models.deepseek.MLAttention, with transformers' DeepseekV3Attention
  names; transformers' own module is refused): the heads are sharded as above; the down projections q_a_proj and kv_a_proj_with_mqa and the
  latent norms q_a_layernorm / kv_a_layernorm stay replicated. Their outputs feed column-parallel layers,
  whose backward all-reduces the input gradient, so their gradients are whole on every rank, except through
  the rotary key head that kv_a_proj_with_mqa makes for all heads: its gradient is summed over the ranks
  (MLAttention.shared_key_grad).
- Per-head norms of such an attention module (children q_norm / k_norm, as Qwen3's: one gain per
  head_dim channel, shared by all heads) stay replicated; their gradients are summed over the ranks
  in the backward (each rank's heads give only part of it), as transformers' "replicated_with_grad_allreduce".
  A q_norm / k_norm whose gain is not head_dim wide (OLMo 2's norm over all the heads) is refused.
- PEFT-style LoRA wrappers (``.base_layer`` nn.Linear or Conv1D, plus lora_A/lora_B; on a Conv1D, PEFT's
  fan_in_fan_out layers of GPT-2, the factors A [r, in] / B [out, r] are as for nn.Linear) under those names are
  sharded with their factors. Every other module (embeddings, norms, lm_head) stays replicated, unless
  vocab_parallel=True: then the token embedding (wte / embed_tokens / tok_embeddings / word_embeddings)
  and the LM head (lm_head / output) are sharded by vocabulary rows (llmkern.parallel.vocab).
- Sparse MoE layers (the zoo's llmkern.models.llama.MoE: router `gate`, stacked experts
  `experts.gate_up_proj` [E, 2F, d] / `experts.down_proj` [E, d, F]) become TensorParallelMoE
  (llmkern.parallel.moe): every routed expert is sharded along F (F must be divisible by p), the router
  stays replicated, the partial outputs are all-reduced. A Qwen2-MoE shared expert is a dense MLP and
  is sharded as one (its names above); shared_expert_gate stays replicated. DeepSeek-V3's MoE
  (llmkern.models.deepseek.DeepseekMoE: sigmoid group-limited router `gate` with its selection bias, ungated
  `shared_experts`) likewise: routed experts sharded along F, router and bias replicated, shared experts
  sharded as a dense MLP.
- A module with column-parallel children must also hold the row-parallel one that reads their shards, and the
  other way round (Phi's attention, whose output projection is `dense`, and nn.MultiheadAttention's lone
  out_proj are refused).
- The weights must be identical on every rank before sharding (same seed, or a broadcast); a model
  loaded with llmkern.models.from_hf on every rank is. Checked (check_weights=True, the default): an integer
  fingerprint of each parameter's bits, compared across the ranks (llmkern.parallel.guards). A model built on
  the meta device has no values to compare: its parameters are skipped, and load_full_state_dict compares the
  checkpoint that every rank loads into it instead.

Checkpoints: a sharded model's state_dict() holds this rank's shards under the unsharded names (one file per rank).
full_state_dict(model) gathers the unsharded model's state_dict (one file, bit for bit the unsharded model's);
load_full_state_dict(model, state_dict) cuts each rank's shards out of it, e.g. into a model built on the meta
device, sharded, then materialised with to_empty (torchtitan's flow).

Sequence parallelism is not applied by tensor_parallelize (norms and dropout would then see token
shards); use the layers directly for it (TensorParallelMoE.from_moe(moe, group, sequence_parallel=True)
for an MoE layer).
"""
import collections
import hashlib
import inspect
import numbers
import re
import sys
import weakref

import torch
import torch.nn as nn

from llmkern.ops._checks import bool_arg
from llmkern.parallel import comm, guards
from llmkern.parallel.layers import ColumnParallelLinear, RowParallelLinear, _ParallelLinear, column_rows
from llmkern.peft._plain_lora import is_hf_conv1d, linear_features

MLA_COLUMN_NAMES = {"q_b_proj", "kv_b_proj"}  # (MLA's q_proj, without a q bottleneck, is the usual name)
COLUMN_NAMES = {"q_proj", "k_proj", "v_proj", "wq", "wk", "wv", "up_proj", "gate_proj", "fc1", "c_fc", "w1",
                "w3", "fc_in"} | MLA_COLUMN_NAMES
FUSED_QKV_NAMES = {"qkv_proj", "c_attn", "Wqkv", "qkv"}
FUSED_2_NAMES = {"gate_up_proj"}
ROW_NAMES = {"o_proj", "out_proj", "c_proj", "down_proj", "fc2", "w2", "wo", "fc_out"}
QKV_NAMES = {"q_proj", "k_proj", "v_proj", "wq", "wk", "wv"} | FUSED_QKV_NAMES | MLA_COLUMN_NAMES
HEAD_ATTRS = ("n_head", "n_heads", "num_heads", "num_attention_heads")
KV_HEAD_ATTRS = ("n_kv_head", "n_kv_heads", "num_key_value_heads", "num_kv_heads")
HEAD_NORM_NAMES = {"q_norm", "k_norm"}


def _plain_linear(m):
    """An nn.Linear, or transformers' Conv1D (GPT-2: W stored [in, out]; from_linear shards it as W^T)."""
    return isinstance(m, nn.Linear) or is_hf_conv1d(m)


def _is_linear(m):
    if isinstance(m, _ParallelLinear):
        return False
    return _plain_linear(m) or _plain_linear(getattr(m, "base_layer", None))


def _base(m):
    return m if _plain_linear(m) and not hasattr(m, "base_layer") else m.base_layer


def _out_features(m):
    """out_features of a linear child (its base layer's for a LoRA wrapper; a Conv1D's weight is [in, out])."""
    return linear_features(_base(m))[1]


def _heads(module, attrs):
    for a in attrs:
        v = getattr(module, a, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return a, v
    return None, None


def _config_heads(module, model):
    """(h, kv, head_dim) from the config of an attention module without head-count attributes
    (transformers 5's: they live in module.config, or the model's), None where it does not say."""
    cfg = getattr(module, "config", None)
    if cfg is None:
        cfg = getattr(model, "config", None)
    _, h = _heads(cfg, ("num_attention_heads", "n_head", "n_heads"))
    _, kv = _heads(cfg, KV_HEAD_ATTRS)
    _, hd = _heads(module, ("head_dim",))
    if hd is None:
        _, hd = _heads(cfg, ("head_dim",))
    return h, kv, hd


def _reads_config_heads(module):
    """Whether the module's forward reads head counts from its config (Phi3 splits its fused qkv_proj by
    config.num_attention_heads): after sharding those are the unsharded counts (the config is shared by
    the layers and the model; tensor_parallelize does not rewrite it)."""
    try:
        src = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return re.search(r"config\.(num_attention_heads|num_key_value_heads|n_head|num_heads)\b", src) is not None


def _head_dim(parent, children, h, hd):
    """The attention's head_dim: its attribute or config's, else q's rows over the head count."""
    if hd is not None or h is None:
        return hd
    q = children.get("q_proj", children.get("wq"))
    return _out_features(q) // h if q is not None and _is_linear(q) else None


def _check_head_norms(children, hd, where):
    """q_norm / k_norm stay replicated: right only for one gain per head_dim channel, shared by the heads
    (Qwen3, Gemma 3). OLMo 2's norm over all the heads' features would need the sharded features' sum."""
    for n, c in children.items():
        if n not in HEAD_NORM_NAMES:
            continue
        w = getattr(c, "weight", None)
        if not isinstance(w, nn.Parameter):  # (no gain: nothing to sum, and its width is not known)
            continue
        size = w.numel()
        if size != hd:
            raise ValueError(f"tensor_parallelize: {where}.{n} has {size} features, not head_dim={hd}: only a "
                             f"per-head norm (one gain per head_dim channel, Qwen3's) can stay replicated; a "
                             f"norm over all the heads' features (OLMo 2's) is not supported")


def _check_row_partner(children, where, parent):
    """A module whose column-parallel projections (q/k/v, up/gate) are sharded must have the row-parallel layer
    that reads their shards (o_proj, down_proj...): otherwise its output projection (Phi's `dense`) would get
    this rank's features only, and the model would fail in forward (or, with matching sizes, be wrong)."""
    column = [n for n, c in children.items() if (n in COLUMN_NAMES or n in FUSED_QKV_NAMES or n in FUSED_2_NAMES)
              and _is_linear(c)]
    row = [n for n, c in children.items() if n in ROW_NAMES and _is_linear(c)]
    if column and not row:
        raise ValueError(f"tensor_parallelize: {where} ({type(parent).__name__}) has column-parallel projections "
                         f"{column} but no row-parallel one to read their shards (a linear child named one of "
                         f"{sorted(ROW_NAMES)}); this module is not supported")
    if row and not column:  # (nn.MultiheadAttention's out_proj, T5's wo: their inputs are whole, not shards)
        raise ValueError(f"tensor_parallelize: {where} ({type(parent).__name__}) has row-parallel projections {row} "
                         f"but no column-parallel one making their input shards (a linear child named one of "
                         f"{sorted(COLUMN_NAMES | FUSED_QKV_NAMES | FUSED_2_NAMES)}); this module is not supported")


def _hook_grad_sum(param, group):
    """Sum param's gradient over the ranks, by a hook on the tensor. Also on a frozen parameter (PEFT leaves the
    norms frozen; unfrozen later to train them beside LoRA, its gradient would be this rank's part, different on
    each rank): torch takes a hook only while it requires grad, and keeps it when that is switched off and on."""
    def hook(grad):
        grad = grad.contiguous().clone()
        comm.all_reduce(grad, group)
        return grad

    frozen = not param.requires_grad
    param.requires_grad_(True)
    param.register_hook(hook)
    if frozen:
        param.requires_grad_(False)


def _sum_grad_over_ranks(module, name, group):
    """The gradient of a replicated parameter used by sharded heads is each rank's part: sum it. The hook sits
    on the tensor, which copy.deepcopy and load_state_dict(assign=True) replace without it: a forward pre-hook
    of the module (copied with it) hooks the parameter it finds there whenever that is not the hooked one
    (a weak reference on the module; a copy's points at the original's parameter)."""
    key = "_llmkern_grad_summed_" + name.replace(".", "_")

    def ensure(mod, args):
        param = mod.get_parameter(name)
        ref = mod.__dict__.get(key)
        if ref is None or ref() is not param:
            _hook_grad_sum(param, group)
            object.__setattr__(mod, key, weakref.ref(param))

    ensure(module, ())
    module.register_forward_pre_hook(ensure)


class _ShardedHeadsRNG:
    """`forward` of a tensor-parallel attention module: in training, the part of it that works on this rank's
    heads (up to its row-parallel output projection, which ends the region by a forward pre-hook) draws from
    generators seeded per rank, as Megatron-LM's model-parallel RNG tracker does for the attention dropout.
    With the one RNG state that every rank must share (the replicated activations' dropout, e.g. GPT's after the
    output projection, has to be the same everywhere), rank r's local head j had the mask of every other rank's
    local head j: global heads j, j + H/p, ... dropped together. The seed comes from one draw of the CPU
    generator (the same on every rank, and replayed by activation checkpointing); the generators' shared states
    are restored when the region ends."""

    def __init__(self, module, rank):
        self.module, self.rank, self._saved = module, rank, None
        # (an instance-level forward already there, e.g. use_fused_ops' RoPE patch, runs inside)
        patched = module.__dict__.get("forward")
        self.forward = patched if patched is not None else type(module).forward.__get__(module)

    def _begin(self):
        base = int(torch.randint(0, 2**62, (), generator=torch.default_generator))
        seed = (base + 0x9E3779B97F4A7C15 * (self.rank + 1)) % 2**63
        param = next(self.module.parameters(), None)
        gens = [torch.default_generator]
        if param is not None and param.is_cuda:
            gens.append(torch.cuda.default_generators[param.device.index])
        self._saved = [(g, g.get_state()) for g in gens]
        for g in gens:
            g.manual_seed(seed)

    def end(self, *_):
        """Back to the shared states (also the output projection's forward pre-hook)."""
        if self._saved is not None:
            for g, state in self._saved:
                g.set_state(state)
            self._saved = None

    def __call__(self, *args, **kwargs):
        if not self.module.training:
            return self.forward(*args, **kwargs)
        self._begin()
        try:
            return self.forward(*args, **kwargs)
        finally:
            self.end()


def _shared_key_grad(group):
    """MLAttention.shared_key_grad for tensor parallelism over `group`: the identity, its backward the sum
    of the gradient over the ranks (each rank's heads use the one rotary key head)."""
    from llmkern.parallel.layers import _maybe_no_compile
    from llmkern.parallel.vocab import _CopyToRanks

    def shared_key_grad(k_pe):
        return _maybe_no_compile(_CopyToRanks.apply)(k_pe, group)  # (a collective: opaque to torch.compile)

    return shared_key_grad


def _moe_shard(moe, group, where):
    from llmkern.parallel.moe import TensorParallelMoE

    try:
        return TensorParallelMoE.from_moe(moe, group, shard_shared_expert=False)
    except ValueError as exc:
        raise ValueError(f"tensor_parallelize: cannot shard {where}: {exc}") from None


# ---- cross-rank agreement -----------------------------------------------------------------------------

_FLAGS = ("vocab_parallel", "check_weights")  # bool arguments, coded 0 / 1
_HASHED = -(2 ** 62)  # argument codes in [_HASHED, _HASHED + 2**61): a hash of a value not shown in the error


def _stable_hash(value, bits=64):
    """A hash of repr(value) that every process computes alike (Python's hash() of a str is salted per process)."""
    h = int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little")
    return h % 2 ** bits if bits < 64 else h - 2 ** 64 if h >= 2 ** 63 else h


def _arg_codes(args, p):
    """One int64 per argument, comparable across ranks: an index into the choices (overlap, transport), the number
    (chunks, pieces; None as the default it stands for), 0 / 1 (the flags), else a hash of the value."""
    from llmkern.parallel.layers import DEFAULT_ALLREDUCE_CHUNKS, OVERLAPS, TRANSPORTS, default_pieces

    codes = []
    for name, v in args.items():
        choices = {"overlap": OVERLAPS, "transport": TRANSPORTS}.get(name)
        if name == "chunks" and v is None:
            v = max(DEFAULT_ALLREDUCE_CHUNKS, p)
        if name == "pieces" and v is None and args.get("transport") in TRANSPORTS:
            v = default_pieces(p, args["transport"])
        if choices is not None and isinstance(v, str) and v in choices:
            codes.append(choices.index(v))
        elif (isinstance(v, numbers.Integral) and (name in _FLAGS or not isinstance(v, bool))
              and -2 ** 60 < int(v) < 2 ** 60):  # (the flags: bools by now, 0 / 1)
            codes.append(int(v))
        else:  # (another object: its type only, as its repr may hold its address: the same check refuses it later)
            plain = v if isinstance(v, (str, bytes, numbers.Number, type(None))) else None
            codes.append(_HASHED + _stable_hash((name, type(v).__qualname__, plain), 61))
    return codes


def _describe_arg(name, code):
    from llmkern.parallel.layers import OVERLAPS, TRANSPORTS

    if code < _HASHED + 2 ** 61:
        return "another value"
    choices = {"overlap": OVERLAPS, "transport": TRANSPORTS}.get(name)
    if choices is not None:
        return repr(choices[code]) if 0 <= code < len(choices) else "another value"
    return str(bool(code)) if name in _FLAGS else str(code)


def _model_digest(model):
    """(a hash, the parameters' element count) of what tensor_parallelize shards by: the modules' names and types,
    the head counts (the modules' and their configs'), the parameters' names, shapes and dtypes. Not their values
    (check_weights compares those: guards.weight_fingerprints) nor devices."""
    attrs = HEAD_ATTRS + KV_HEAD_ATTRS + ("head_dim",)

    def counts(obj):
        return [(a, v) for a in attrs for v in (getattr(obj, a, None),) if isinstance(v, int)]

    h = hashlib.blake2b(digest_size=8)
    cfg = getattr(model, "config", None)
    h.update(repr((getattr(cfg, "model_type", None), getattr(cfg, "alibi", None), counts(cfg))).encode())
    for name, m in model.named_modules():
        h.update(repr((name, type(m).__module__, type(m).__qualname__, counts(m),
                       counts(getattr(m, "config", None)))).encode())
    numel = 0
    for name, t in model.named_parameters():
        h.update(repr((name, tuple(t.shape), str(t.dtype))).encode())
        numel += t.numel()
    return _stable_hash(h.hexdigest()), numel


def _check_agreement(model, group, args, error=None):
    """Every rank of `group` must shard the same model with the same arguments: otherwise the sharded layers'
    collectives pair different shapes or protocols (garbage, or a hang until the process group's timeout). One
    all-gather of a few int64s, at setup only: (this rank's argument error?, one code per argument, the model's
    digest, its parameter count, its weights' digest). Then every rank raises: its own argument error, or the same
    ValueError naming the rank(s) that failed, or the argument(s) (and / or the model) that differ, with every
    rank's value. With check_weights, returns this rank's weight fingerprints where the ranks' weights differ
    (None where they agree): the caller raises that, on every rank, after its own checks of the model."""
    p = comm.world_size(group)
    digest, numel = _model_digest(model)
    codes = _arg_codes(args, p)
    weights = None  # (not computed for one rank, nor where this rank's checks failed: agree raises then)
    if args.get("check_weights") is True and p > 1 and error is None:
        weights = guards.weight_fingerprints(model)
    wdigest = guards.weights_digest(weights) if weights is not None else 0
    rows = comm.agree(group, "tensor_parallelize", codes + [digest, numel, wdigest], error)
    differ = []
    for k, name in enumerate(args):
        if any(r[k] != rows[0][k] for r in rows):
            differ.append(f"{name} (" + ", ".join(f"rank {i}: {_describe_arg(name, r[k])}"
                                                  for i, r in enumerate(rows)) + ")")
    if any(r[-3] != rows[0][-3] for r in rows):
        differ.append("the model (its module names and types, head counts, or parameter names, shapes and dtypes; "
                      "parameter elements: " + ", ".join(f"rank {i}: {r[-2]}" for i, r in enumerate(rows)) + ")")
    if differ:
        raise ValueError(f"tensor_parallelize: the ranks of the group disagree on {'; '.join(differ)}. Every rank "
                         f"must shard the same model with the same arguments (the sharded layers' collectives would "
                         f"otherwise compute garbage or hang); the model is left unchanged")
    return weights if weights is not None and any(r[-1] != rows[0][-1] for r in rows) else None


def _refuse_model(model, group):
    """The refusals of a whole model (ALiBi; pipeline-, context- or expert-parallel already), made before the
    cross-rank agreement: a pipeline- or expert-parallel model differs across the ranks by design."""
    from llmkern.parallel.expert import ExpertParallelMoE

    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) in ("mpt", "bloom") or getattr(cfg, "alibi", False) is True:
        # (the model builds its ALiBi bias for all the heads, outside the attention modules: each rank's
        # sharded heads would get a bias of the wrong head count)
        raise ValueError(f"tensor_parallelize: {type(model).__name__} adds an ALiBi bias built for every head "
                         f"outside its attention modules; models with ALiBi are not supported")
    if getattr(model, "pipeline_parallel", None) is not None:
        raise ValueError("tensor_parallelize: the model is pipeline-parallel; tensor_parallelize it first, then "
                         "pipeline_parallelize (which splits the tensor-parallel model into stages)")
    cp = getattr(model, "context_parallel", None)
    if cp is not None and not comm.meets_only_here(group, cp.group):
        # (over shared ranks context parallelism would gather other heads' K/V: wrong, silently)
        raise ValueError("tensor_parallelize: the model is context-parallel over ranks that the tensor-parallel "
                         "group shares beyond this one: tensor- and context-parallel groups must form a grid")
    if any(getattr(m, "_llmkern_tensor_parallel", False) for m in model.modules()):
        # (a second pass found no projection to shard and said only that; its shards would also fail the weight
        # check, which expects whole weights)
        raise ValueError("tensor_parallelize: the model is already tensor-parallel (tensor_parallelize was called "
                         "on it, or on a module of it); shard the unsharded model once")
    if any(isinstance(m, ExpertParallelMoE) for m in model.modules()):  # (the same on every rank)
        raise ValueError("tensor_parallelize: the model is expert-parallel (expert_parallelize): its ranks hold "
                         "different tokens and different experts; tensor parallelism over the same group is not "
                         "supported")


def tensor_parallelize(model, group=None, *, overlap="ring", chunks=None, pieces=None, transport="p2p",
                       vocab_parallel=False, check_weights=True):
    """Replace, in place, the attention and MLP projections of `model` by tensor-parallel layers
    (see the module docstring for the naming contract). Returns `model`. Raises ValueError (on
    every rank) when a head count or a feature size is not divisible by the world size, and
    RuntimeError when there is no process group; the model is then left unchanged.
    vocab_parallel=True also shards the token embedding and the LM head by vocabulary rows
    (llmkern.parallel.vocab; a tied head shares the embedding's shard): the LM head's forward then
    all-gathers the logits, and the zoo models' `model(ids, labels, return_logits=False)` computes the
    loss on the shards without any [N, V] tensor.

    Every rank must pass the same arguments and the same model (structure): checked first, by one all-gather of a
    digest of both (a ValueError on every rank naming what differs, the model left unchanged), since ranks that
    disagree would pair different collectives (garbage, or a hang until the process group's timeout).
    check_weights=True (default) also compares the weights (an integer fingerprint of every parameter's bits,
    one pass over the weights on their devices, in the same all-gather): ranks with different weights (one not
    seeded, another checkpoint) raise a ValueError on every rank naming the first parameter that differs. Parameters
    on the meta device (a model built under ``torch.device("meta")``) hold no values and are not compared: load the
    weights with load_full_state_dict, whose check_weights compares the checkpoint across the ranks. A model
    sharded already (by tensor_parallelize) is refused."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"tensor_parallelize: model must be an nn.Module, got {type(model).__name__}")
    group = comm.resolve_group(group, "tensor_parallelize")
    error = None
    try:  # (raised after the agreement: on one rank only, the others would be left waiting in a collective)
        # (a string "False" sharded the embedding and the LM head, silently)
        vocab_parallel = bool_arg("tensor_parallelize: vocab_parallel", vocab_parallel)
        check_weights = bool_arg("tensor_parallelize: check_weights", check_weights)
        _refuse_model(model, group)
    except (TypeError, ValueError) as exc:
        error = exc
    mismatch = _check_agreement(model, group, dict(overlap=overlap, chunks=chunks, pieces=pieces, transport=transport,
                                                   vocab_parallel=vocab_parallel, check_weights=check_weights), error)
    from llmkern.models.deepseek import MLAttention

    p = comm.world_size(group)
    kw = dict(overlap=overlap, chunks=chunks, pieces=pieces, transport=transport)
    plan = []  # (object, attribute, value), applied only once every projection could be sharded
    summed = []  # replicated parameters of the sharded heads (q_norm / k_norm gains)
    from llmkern.parallel.moe import TensorParallelMoE, is_moe  # (imports the model zoo: on first use only)

    for parent_name, parent in list(model.named_modules()):
        children = dict(parent.named_children())
        attention = any(n in QKV_NAMES and _is_linear(c) for n, c in children.items())
        h_attr, h = _heads(parent, HEAD_ATTRS)
        kv_attr, kv = _heads(parent, KV_HEAD_ATTRS)
        where = parent_name or type(parent).__name__
        if "kv_a_proj_with_mqa" in children and not isinstance(parent, MLAttention):
            # another MLA implementation (transformers' DeepseekV3Attention): its shared rotary key's gradient
            # would stay this rank's heads' part (the zoo's MLAttention sums it over the ranks): refuse
            raise ValueError(f"tensor_parallelize: {where} ({type(parent).__name__}) is a multi-head latent "
                             f"attention other than the zoo's MLAttention; load the checkpoint with "
                             f"llmkern.models.from_hf to shard it")
        hd = None
        if attention and h is None:  # transformers 5: the counts are in the config (not rewritten)
            h, cfg_kv, hd = _config_heads(parent, model)
            kv = kv if kv is not None else cfg_kv
            if h is not None and _reads_config_heads(parent):
                raise ValueError(f"tensor_parallelize: {where} ({type(parent).__name__}) reads its head counts "
                                 f"from the config in forward (config.num_attention_heads), which stays the "
                                 f"unsharded count; this attention module is not supported")
        if attention and h is None and any(n in FUSED_QKV_NAMES for n in children):
            raise ValueError(f"tensor_parallelize: {where} ({type(parent).__name__}) has a fused qkv projection "
                             f"but no head count (an attribute {'/'.join(HEAD_ATTRS)}, or a config with "
                             f"num_attention_heads): its q/k/v segment sizes cannot be derived")
        if attention:
            hd = _head_dim(parent, children, h, hd if hd is not None else _heads(parent, ("head_dim",))[1])
            _check_head_norms(children, hd, where)
        if attention and h is not None:
            h_name = f"{where}.{h_attr}" if h_attr else f"{where} (config.num_attention_heads)"
            kv_name = f"{where}.{kv_attr}" if kv_attr else f"{where} (config.num_key_value_heads)"
            if h % p:
                raise ValueError(f"tensor_parallelize: {h_name}={h} is not divisible by the world size {p}")
            if kv is not None and kv % p:
                raise ValueError(f"tensor_parallelize: {kv_name}={kv} is not divisible by the world "
                                 f"size {p} (GQA key/value heads are sharded too)")
        if attention and _is_linear(children.get("q_attn")):
            # (GPT-2's cross-attention: q from q_attn, k / v from a 2-segment c_attn over the encoder's states)
            raise ValueError(f"tensor_parallelize: {where} ({type(parent).__name__}) is a cross-attention (a q_attn "
                             f"projection beside its fused c_attn); cross-attention modules are not supported")
        _check_row_partner(children, where, parent)
        fused = None  # the fused qkv projection's segment sizes
        for name, child in children.items():
            full = f"{parent_name}.{name}" if parent_name else name
            if is_moe(child):  # (its shared expert's linear layers are planned with its own children)
                plan.append((parent, name, _moe_shard(child, group, full)))
                continue
            if not _is_linear(child):
                continue
            try:
                if name in COLUMN_NAMES:
                    new = ColumnParallelLinear.from_linear(child, group, **kw)
                elif name in FUSED_QKV_NAMES:
                    out = _out_features(child)
                    n_kv = kv if kv is not None else h
                    if out % (h + 2 * n_kv):
                        raise ValueError(f"fused qkv out_features={out} is not (heads {h} + 2 * key/value "
                                         f"heads {n_kv}) * head_dim")
                    d = out // (h + 2 * n_kv)
                    segments = fused = [h * d, n_kv * d, n_kv * d]
                    new = ColumnParallelLinear.from_linear(child, group, segments=segments, **kw)
                elif name in FUSED_2_NAMES:
                    out = _out_features(child)
                    new = ColumnParallelLinear.from_linear(child, group, segments=[out // 2] * 2, **kw)
                elif name in ROW_NAMES:
                    new = RowParallelLinear.from_linear(child, group, **kw)
                else:
                    continue
            except ValueError as exc:
                raise ValueError(f"tensor_parallelize: cannot shard {full}: {exc}") from None
            plan.append((parent, name, new))
        _, split = _heads(parent, ("split_size",))
        if attention and split is not None:  # (GPT-2's: the forward splits the fused qkv output by it)
            if fused is None or any(n != split for n in fused):
                raise ValueError(f"tensor_parallelize: {where}.split_size={split} is not the width of each segment of "
                                 f"its fused qkv projection ({fused or 'none'}): the sharded forward's split "
                                 f"cannot be derived; this attention module is not supported")
            plan.append((parent, "split_size", split // p))
        if attention:  # (whether or not the module holds the head counts: each rank has its heads' part)
            summed += [(c, pn) for n, c in children.items() if n in HEAD_NORM_NAMES for pn, _ in c.named_parameters()]
        if attention and h_attr is not None:
            plan.append((parent, h_attr, h // p))
        if attention and h is not None:
            if kv_attr is not None:
                plan.append((parent, kv_attr, kv // p))
            if isinstance(parent, MLAttention) and p > 1:
                plan.append((parent, "shared_key_grad", _shared_key_grad(group)))
        rows = [v for o, _, v in plan if o is parent and isinstance(v, RowParallelLinear)]
        if attention and p > 1 and rows:  # (its dropout: per rank, see _ShardedHeadsRNG)
            rng = _ShardedHeadsRNG(parent, comm.rank(group))
            rows[0].register_forward_pre_hook(rng.end)
            plan.append((parent, "forward", rng))
    if vocab_parallel:
        from llmkern.parallel.vocab import vocab_parallel_plan

        plan += vocab_parallel_plan(model, group)
    if not any(isinstance(v, (_ParallelLinear, TensorParallelMoE)) for _, _, v in plan):
        if any(isinstance(m, comm.SharesProcessGroups) and isinstance(m, nn.Module) for m in model.modules()):
            raise ValueError("tensor_parallelize: the model is already tensor-parallel (its projections are "
                             "tensor-parallel layers): nothing is left to shard")
        raise ValueError("tensor_parallelize: found no projection to shard; the model's linear layers must "
                         "follow the naming contract in llmkern.parallel.tensor_parallel")
    if mismatch is not None:  # (after the checks above: a model that cannot be sharded says so first)
        guards.raise_weight_mismatch(mismatch, group, "tensor_parallelize")
    # (full_state_dict returns the keys in this order: the sharded MoE layers register their children in another)
    key_order = list(model.state_dict(keep_vars=True))
    for obj, attr, value in plan:  # (an error above leaves the model as it was)
        setattr(obj, attr, value)
    model._llmkern_tp_key_order = key_order
    model._llmkern_tensor_parallel = True  # (a second tensor_parallelize is refused: _refuse_model)
    if p > 1:
        for module, name in summed:
            _sum_grad_over_ranks(module, name, group)
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if isinstance(vocab, int) and not getattr(model, "_llmkern_tp_ids_check", False):
            model.register_forward_pre_hook(_IdsInVocabulary(group, vocab), with_kwargs=True)
            model._llmkern_tp_ids_check = True
    return model


class _IdsInVocabulary(comm.SharesProcessGroups):
    """Forward pre-hook of a tensor-parallel model: CPU input_ids outside [0, vocab_size) on one rank raised there
    only (the model's own check, or the embedding's IndexError), and the other ranks waited in the first sharded
    layer's collective until the process group's timeout; ids of the same shape but other tokens on one rank (each
    rank loading its own batch, as under data parallelism) gave every rank wrong outputs, silently (the sharded
    layers mixed the ranks' sequences). One all-gather of (a flag, a hash of the ids) per forward makes every rank
    raise. CUDA ids are not read (a host sync per forward; the models do not check them either), nor traced ones,
    nor with validation off (llmkern.parallel.comm.set_validation(False))."""

    def __init__(self, group, vocab_size):
        self.group, self.vocab_size = group, vocab_size

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if (not comm.validation_enabled() or not torch.is_tensor(ids) or ids.device.type != "cpu"
                or torch.compiler.is_compiling()):
            return None
        ok = comm.ids_in_range(ids, self.vocab_size)
        rows = comm.gather_ints([int(ok), guards.tensor_hash(ids)], self.group)
        bad = [i for i, r in enumerate(rows) if not r[0]]
        if bad:
            raise ValueError(f"input_ids: token ids must lie in [0, vocab_size={self.vocab_size}) (tensor parallelism: "
                             f"out of range on rank(s) {bad})")
        other = [i for i, r in enumerate(rows) if r[1] != rows[0][1]]
        if other:
            raise ValueError(f"input_ids: the ranks of a tensor-parallel model must all pass the same input_ids; those "
                             f"of rank(s) {other} differ from rank 0's (in shape, dtype or tokens): the sharded layers "
                             f"would mix the ranks' sequences")
        return None


# ---- full (unsharded) checkpoints -----------------------------------------------------------------------
#
# A tensor-parallel model's state_dict() holds this rank's shards under the unsharded names. full_state_dict gathers
# them into the unsharded model's state_dict; load_full_state_dict cuts this rank's shards out of one. Both go
# through _sharded_entries, whose cuts are the ones the layers' constructors made (column_rows, the vocabulary
# rows' _shard, the experts' _expert_shard), so that a round trip is exact by construction.

class _Sharded:
    """A sharded tensor of a tensor-parallel module: its unsharded shape, this rank's cut of the whole tensor, and
    the whole tensor gathered from the ranks' shards (a collective over the module's group)."""

    def __init__(self, full_shape, shard, gather):
        self.full_shape, self.shard, self.gather = tuple(full_shape), shard, gather


def _transposed_if(t, flag):
    return t.t() if flag else t


def _linear_entries(m):
    """Column- / row-parallel layer: a Conv1D's weight is whole as [in, out] (its unsharded layout), the shard
    [out/p, in] / [out, in/p] as nn.Linear's (see from_linear)."""
    from llmkern.parallel.layers import gather_column_rows

    p, r, g, conv = m.world_size, m.rank, m.group, m.conv1d
    w_shape = (m.in_features, m.out_features) if conv else (m.out_features, m.in_features)
    entries = {}
    if isinstance(m, ColumnParallelLinear):
        segs = list(getattr(m, "segments", None) or [m.out_features])

        def rows(t):
            return column_rows(t, segs, p, r)

        entries["weight"] = _Sharded(w_shape, lambda t: rows(_transposed_if(t, conv)),
                                     lambda: _transposed_if(gather_column_rows(m.weight.detach(), segs, g), conv))
        if m.bias is not None:
            entries["bias"] = _Sharded((m.out_features,), rows, lambda: gather_column_rows(m.bias.detach(), segs, g))
        if m.lora_B is not None:  # (lora_A [r, in] is replicated)
            entries["lora_B"] = _Sharded((m.out_features, m.lora_B.shape[1]), rows,
                                         lambda: gather_column_rows(m.lora_B.detach(), segs, g))
        return entries
    k = m.in_features // p

    def cols(t):
        return t[:, r * k:(r + 1) * k]

    entries["weight"] = _Sharded(w_shape, lambda t: cols(_transposed_if(t, conv)),
                                 lambda: _transposed_if(comm.all_gather_last_dim(m.weight.detach(), g), conv))
    if m.lora_A is not None:  # (the bias and lora_B [out, r] are replicated)
        entries["lora_A"] = _Sharded((m.lora_A.shape[0], m.in_features), cols,
                                     lambda: comm.all_gather_last_dim(m.lora_A.detach(), g))
    return entries


def _vocab_entries(m, V):
    """Vocabulary-parallel embedding / LM head: rows [r·S, (r+1)·S) of [V, d], the last shard zero-padded."""
    from llmkern.parallel.vocab import _shard

    def gather(t):
        return comm.all_gather_dim0(t.detach().contiguous(), m.group)[:V]

    entries = {"weight": _Sharded((V, m.weight.shape[1]), lambda t: _shard(t, m.group), lambda: gather(m.weight))}
    if getattr(m, "bias", None) is not None:
        entries["bias"] = _Sharded((V,), lambda t: _shard(t, m.group), lambda: gather(m.bias))
    return entries


def _expert_entries(m):
    """ShardedExperts: each expert's gate and up rows and down columns along the FFN width (moe._expert_shard)."""
    from llmkern.parallel.moe import _expert_shard

    E, _, d = m.gate_up_proj.shape
    F_, p, r = m.ffn_dim, m.world_size, m.rank
    gate_up_shape, down_shape = (E, 2 * F_, d), (E, d, F_)

    def stand_in(shape):  # (_expert_shard cuts both; the other one costs nothing on the meta device)
        return torch.empty(shape, device="meta")

    return {"gate_up_proj": _Sharded(gate_up_shape, lambda t: _expert_shard(t, stand_in(down_shape), p, r)[0],
                                     lambda: m.gathered()[0]),
            "down_proj": _Sharded(down_shape, lambda t: _expert_shard(stand_in(gate_up_shape), t, p, r)[1],
                                  lambda: m.gathered()[1])}


def _sharded_entries(module):
    """{local state-dict name: _Sharded} of a tensor-parallel module's sharded tensors ({} for any other module:
    its tensors are replicated, whole on every rank)."""
    from llmkern.parallel.vocab import VocabParallelEmbedding, VocabParallelLMHead

    if isinstance(module, _ParallelLinear):
        return _linear_entries(module)
    if isinstance(module, VocabParallelEmbedding):
        return _vocab_entries(module, module.num_embeddings)
    if isinstance(module, VocabParallelLMHead):
        return _vocab_entries(module, module.out_features)
    moe = sys.modules.get("llmkern.parallel.moe")  # (not imported: no sharded experts exist)
    if moe is not None and isinstance(module, moe.ShardedExperts):
        return _expert_entries(module)
    return {}


class _Entry:
    """One key of the model's state_dict: its name here and in the unsharded model, the tensor this rank holds,
    and how it is sharded (None: replicated)."""

    def __init__(self, key, full_key, tensor, sharded):
        self.key, self.full_key, self.tensor, self.sharded = key, full_key, tensor, sharded


def _checkpoint_entries(model, what):
    """[_Entry] in the order of model.state_dict(). Refuses the models whose rank-local state is not a shard of an
    unsharded tensor (expert parallelism: each rank holds other whole experts)."""
    from llmkern.parallel.expert import ExpertParallelMoE, LocalExperts

    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: model must be an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, (ExpertParallelMoE, LocalExperts)) for m in model.modules()):
        raise ValueError(f"{what}: the model is expert-parallel (expert_parallelize): each rank holds other whole "
                         f"experts, not shards of them; only tensor-parallel layers are gathered or cut")
    modules = dict(model.named_modules(remove_duplicate=False))
    specs = {}
    entries = []
    for key, tensor in model.state_dict(keep_vars=True).items():
        path, _, local = key.rpartition(".")
        module = modules.get(path)
        if module is not None and id(module) not in specs:
            specs[id(module)] = _sharded_entries(module)
        sharded = specs.get(id(module), {}).get(local)
        source = module.source_names.get(local, local) if isinstance(module, _ParallelLinear) else local
        entries.append(_Entry(key, f"{path}.{source}" if path else source, tensor, sharded))
    return entries


def _checkpoint_group(model, what):
    """The process group of the model's tensor-parallel modules (None: it has none, or one rank), one for all."""
    groups = {}
    for m in model.modules():
        g = getattr(m, "group", None)
        if isinstance(m, comm.SharesProcessGroups) and isinstance(g, torch.distributed.ProcessGroup):
            groups[id(g)] = g
    if len(groups) > 1:
        raise ValueError(f"{what}: the model's tensor-parallel layers use {len(groups)} process groups; a full "
                         f"checkpoint needs one (as tensor_parallelize builds)")
    group = next(iter(groups.values()), None)
    return group if group is not None and comm.world_size(group) > 1 else None


def _raise_everywhere(group, what, error):
    """Raise `error` (this rank's, or None) on every rank of `group` (one small all-gather): the ranks that passed
    raise a ValueError naming those that failed, instead of waiting in the next collective."""
    if group is None:
        if error is not None:
            raise error
        return
    comm.agree(group, what, [], error)


def full_state_dict(model, rank0_only=True, cpu_offload=False):
    """The unsharded model's state_dict, gathered from a tensor-parallel model's shards (torchtitan's DTensor
    full_state_dict, Megatron's checkpoint conversion to one file): the same keys, in the same order, and the same
    values bit for bit as the model had before tensor_parallelize; load it with load_full_state_dict (any world
    size) or into the unsharded model with load_state_dict. A collective over the model's tensor-parallel group:
    every rank calls it. rank0_only=True returns the dict on rank 0 of that group and {} on the others (which gather
    all the same: a collective); False on every rank. cpu_offload=True moves each gathered tensor to the CPU at once
    (a large model's whole state does not fit beside the shards on one accelerator).

    Keys (in the unsharded model's order): a column / row / vocabulary-parallel layer's and the sharded experts'
    are the unsharded ones; a layer sharded from a LoRA wrapper keeps the wrapper's names (base_layer.weight, its
    lora_A / lora_B keys), one from a transformers Conv1D its [in, out] layout. A tied LM head is the embedding's
    tensor (one object under both keys). Replicated tensors are this rank's (detached, as state_dict returns them).
    A model without tensor-parallel layers gives its state_dict. ValueError (on every rank) for a model on the meta
    device or an expert-parallel one. Pipeline stages: the stage's part (its keys), whole over the tensor-parallel
    ranks."""
    what = "full_state_dict"
    rank0_only = bool_arg(f"{what}: rank0_only", rank0_only)
    cpu_offload = bool_arg(f"{what}: cpu_offload", cpu_offload)
    entries = _checkpoint_entries(model, what)
    group = _checkpoint_group(model, what)
    meta = [e.key for e in entries if e.sharded is not None and e.tensor.is_meta]
    error = None
    if meta:  # (nothing to gather: the ranks would exchange no values)
        error = ValueError(f"{what}: the model's tensors are on the meta device ({_few(meta)}): materialise them "
                           f"first (to_empty, then load_full_state_dict)")
    _raise_everywhere(group, what, error)
    keep = not rank0_only or group is None or comm.rank(group) == 0
    gathered, values = {}, {}
    for e in entries:  # (the same order on every rank: the ranks' models agree, tensor_parallelize checked it)
        value = gathered.get(id(e.tensor))  # (a tied head: gathered once, one tensor under both keys)
        if value is None:
            value = e.tensor if e.sharded is None else e.sharded.gather()
            if torch.is_tensor(value):  # (not a module's extra state)
                value = value.detach().cpu() if cpu_offload else value.detach()
            gathered[id(e.tensor)] = value
        if keep:
            values[e.full_key] = value
    order = {k: i for i, k in enumerate(getattr(model, "_llmkern_tp_key_order", ()))}
    # (the unsharded model's order; keys it did not have, e.g. modules added since, after its own)
    return collections.OrderedDict((k, values[k]) for k in sorted(values, key=lambda k: order.get(k, len(order))))


def _few(items, n=4):
    items = list(items)
    return ", ".join(repr(k) for k in items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _load_plan(entries, state_dict, strict, what, pipe=None):
    """({this rank's key: the tensor to load}, missing full keys, unexpected keys), or a ValueError naming the
    keys that are missing or unexpected (strict) or whose shape is not the unsharded one. pipe: the model's
    PipelineParallel (a stage): the other stages' keys are skipped, neither loaded nor unexpected."""
    local, missing, wrong, cuts = collections.OrderedDict(), [], [], {}
    keys_of = {}  # a tensor's keys: a tied LM head's weight is the embedding's
    for e in entries:
        keys_of.setdefault(id(e.tensor), []).append(e.full_key)
    # (a pipeline's tied embedding: the first stage's embedding and the last stage's head are two tensors then)
    tied = list(pipe._tied_keys) if pipe is not None else []
    for e in entries:
        # (a checkpoint may hold a tied weight once: safetensors' save_model drops the shared copies)
        aliases = keys_of[id(e.tensor)] + (tied if e.full_key in tied else [])
        source = next((k for k in [e.full_key] + aliases if k in state_dict), None)
        if source is None:
            missing.append(e.full_key)
            continue
        value = state_dict[source]
        if not torch.is_tensor(e.tensor):  # (a module's extra state: loaded as it is)
            local[e.key] = value
            continue
        want = e.sharded.full_shape if e.sharded is not None else tuple(e.tensor.shape)
        if not torch.is_tensor(value) or tuple(value.shape) != want:
            got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            wrong.append(f"{e.full_key}: {got}, not {want}")
            continue
        if e.sharded is None:
            local[e.key] = value
        else:  # (one cut per parameter: a tied head's key gets the embedding's)
            key = (id(value), id(e.tensor))
            if key not in cuts:
                cuts[key] = e.sharded.shard(value)
            local[e.key] = cuts[key]
    known = {e.full_key for e in entries}
    if pipe is not None:  # (every rank of a pipeline passes the whole checkpoint: the other stages' keys too)
        known |= pipe._full_checkpoint_keys
    unexpected = [k for k in state_dict if k not in known]
    problems = []
    if wrong:
        problems.append(f"shapes differ from the unsharded model's ({_few(wrong)})")
    if strict and missing:
        problems.append(f"missing keys {_few(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if problems:
        raise ValueError(f"{what}: {'; '.join(problems)}" + (" (strict=False skips missing and unexpected keys)"
                                                             if strict and (missing or unexpected) else ""))
    return local, missing, unexpected


def _value_digests(state_dict):
    """[int64] per entry of the checkpoint: its key, dtype and shape and guards' integer fingerprint of its bits."""
    out = []
    for key, value in state_dict.items():
        try:
            f = guards._fingerprint(value) if torch.is_tensor(value) else None
        except (RuntimeError, TypeError):  # (a tensor subclass without these ops: its dtype and shape only)
            f = None
        shape = (str(value.dtype), tuple(value.shape)) if torch.is_tensor(value) else type(value).__name__
        out.append(guards._hash((key, shape, None if f is None else f.tolist())))
    return out


def _check_same_checkpoint(state_dict, group, what, error, check_weights):
    """Every rank raises `error` (this rank's, or None), or the same ValueError where the ranks passed different
    checkpoints: other keys (one all-gather), or with check_weights other values (the same all-gather, and one more
    naming the first key that differs)."""
    keys = guards._hash(sorted(str(k) for k in state_dict)) if error is None else 0
    digests = _value_digests(state_dict) if check_weights and error is None else []
    rows = comm.agree(group, what, [keys, guards._hash(digests)], error)
    if any(r[0] != rows[0][0] for r in rows):
        raise ValueError(f"{what}: the ranks passed checkpoints with different keys; every rank must load the same "
                         f"full state_dict (the same file)")
    if any(r[1] != rows[0][1] for r in rows):  # (the same keys: one digest per key on every rank)
        per_key = comm.gather_ints(digests, group)
        first = next(k for i, k in enumerate(state_dict) if any(r[i] != per_key[0][i] for r in per_key))
        raise ValueError(f"{what}: the ranks passed different checkpoints: {first!r} differs (in its values, dtype "
                         f"or shape). Every rank must load the same full state_dict (the same file): its shards "
                         f"would not fit the other ranks' (check_weights=False skips this comparison)")


def load_full_state_dict(model, state_dict, strict=True, check_weights=True):
    """Load the unsharded model's state_dict (full_state_dict's, the unsharded model's own, or a converted Hugging
    Face checkpoint's) into a tensor-parallel model: every rank cuts its shard of each column / row / vocabulary-
    parallel weight, bias and LoRA factor (a fused q/k/v or gate/up projection segment by segment, GQA's key/value
    heads with their q heads), and of the sharded experts, as tensor_parallelize cut them; replicated tensors are
    loaded whole. The flow for a model too large to build whole (torchtitan's):

        with torch.device("meta"):
            model = build(cfg)
        tensor_parallelize(model, group)            # shards of nothing: no memory, no values
        model.to_empty(device="cuda")
        load_full_state_dict(model, torch.load(path, mmap=True))

    Every rank passes the whole checkpoint and calls it (one small all-gather: the ranks' errors are raised on every
    rank). ValueError naming the keys: missing or unexpected ones (strict=True; strict=False skips them and returns
    them), a shape other than the unsharded model's (also with strict=False), a model still on the meta device.
    check_weights=True (default) compares an integer fingerprint of the checkpoint across the ranks (one pass over
    it): ranks that loaded different files raise a ValueError naming the first key that differs, before anything is
    loaded (tensor_parallelize cannot compare the weights of a model built on the meta device). Returns
    nn.Module.load_state_dict's (missing_keys, unexpected_keys), with the unsharded names. The model's dtype is
    kept (a checkpoint of another dtype is cast, as load_state_dict does).

    A pipeline stage (pipeline_parallelize after tensor_parallelize, or alone) loads its own keys of the whole
    checkpoint and skips the other stages' (as PipelineParallel.load_state_dict does): missing means missing from
    this stage, unexpected a key of no stage; a tied embedding's last-stage copy (lm_head.weight) is read from the
    embedding's key when the checkpoint holds the weight once. The checks then agree over the tensor-parallel group
    only: every rank of the grid calls it (pipe.load_state_dict agrees over the pipeline group too)."""
    import collections.abc

    what = "load_full_state_dict"
    strict = bool_arg(f"{what}: strict", strict)
    check_weights = bool_arg(f"{what}: check_weights", check_weights)
    entries = _checkpoint_entries(model, what)
    group = _checkpoint_group(model, what)
    error, plan = None, None
    try:
        if not isinstance(state_dict, collections.abc.Mapping):
            raise TypeError(f"{what}: state_dict must be a mapping of names to tensors, got "
                            f"{type(state_dict).__name__}")
        meta = [e.key for e in entries if torch.is_tensor(e.tensor) and e.tensor.is_meta]
        if meta:  # (load_state_dict copies into meta tensors without error: nothing would be loaded)
            raise ValueError(f"{what}: the model's tensors are on the meta device ({_few(meta)}): materialise them "
                             f"first (model.to_empty(device=...))")
        plan = _load_plan(entries, state_dict, strict, what, getattr(model, "pipeline_parallel", None))
    except (TypeError, ValueError) as exc:
        error = exc
    if group is not None:
        _check_same_checkpoint(state_dict, group, what, error, check_weights)
    elif error is not None:
        raise error
    local, missing, unexpected = plan
    if hasattr(state_dict, "_metadata"):  # (the modules' versions, which their load hooks read)
        local._metadata = state_dict._metadata
    model.load_state_dict(local, strict=False)  # (the keys were checked above, under their unsharded names)
    return nn.modules.module._IncompatibleKeys(missing, unexpected)
