"""Pipeline parallelism (PP) for the zoo models: the blocks cut into contiguous stages, one per rank (or v
interleaved chunks per rank), and each batch streamed through them as micro-batches (GPipe, Huang et al. 2018;
the 1F1B order of PipeDream-Flush and its interleaved variant, Narayanan et al. 2021, which Megatron-LM and
torchtitan run), alone or with tensor parallelism inside each stage (Megatron's TP x PP grid).

    pipe = pipeline_parallelize(model, group, n_microbatches=8, schedule="1f1b")
    opt = torch.optim.AdamW(pipe.parameters())        # this rank's stage only
    loss = pipe.step(input_ids, labels)               # forward + backward of the whole batch; the loss on the last rank
    opt.step(); opt.zero_grad()
    logits = pipe.forward(input_ids)                  # evaluation: logits [B, T, V] on the last rank, None elsewhere

Rank r of p (its rank in `group`) keeps blocks [lo_r, hi_r) of the model (balanced by block count by default,
or the caller's `stages`), rank 0 also the embeddings (GPT: wte, wpe; Llama, NeoX: embed_tokens), rank p - 1
also the final norm and the LM head (Phi's with its bias), and computes the loss; everything else is deleted
from the model on that rank (in place: the model object becomes this rank's stage, its parameters keep their
names, e.g. ``h.5.attn.q_proj.weight``, so a rank's state_dict holds its slice under the unsharded keys). Per
micro-batch of b = B / m sequences, rank r receives the hidden states [b, T, d] from rank r - 1, runs its blocks
and sends [b, T, d] to rank r + 1 (in the embeddings' dtype); the backward sends their gradients the other way:
2·b·T·d elements cross each stage boundary per micro-batch. A rank holds the weights, gradients and optimizer
state of 1/p of the blocks; the price is the bubble below.

Schedules (torch.distributed.pipelining's ScheduleGPipe, Schedule1F1B and ScheduleInterleaved1F1B; the
transport is torch's P2P, isend / irecv, NCCL on GPUs and gloo on CPUs):

    "gpipe"             every rank runs the m forwards, then the m backwards: a rank holds the activations of
                        all m micro-batches at the peak.
    "1f1b"              rank r runs p - r forwards, then alternates one backward and one forward: at most p - r
                        micro-batches in flight, so activation memory is bounded by p, not m (needs m >= p).
    "interleaved-1f1b"  virtual_stages=v >= 2: the blocks are cut into v·p chunks and rank r holds chunks r,
                        r + p, ..., r + (v - 1)·p (non-contiguous: v = 2, p = 2, 8 blocks: rank 0 holds blocks
                        0-1 and 4-5, rank 1 blocks 2-3 and 6-7; `stages` then lists the v·p chunks' block counts);
                        a micro-batch goes round the ranks v times, 1F1B over the chunks (torch's
                        ScheduleInterleaved1F1B, one PipelineStage per chunk; needs m a multiple of p).
GPipe and 1F1B leave the same bubble, (p - 1) / (m + p - 1) of the step idle on every rank; interleaving
shrinks it to (p - 1) / (v·m + p - 1) (the ramp is made of chunks of 1/v of a stage's work) for v times the
stage-boundary transfers and somewhat more activations in flight
(llmkern.parallel.cost_model.pipeline_bubble_fraction(p, m, virtual_stages)): m >> p hides it.

Tensor parallelism inside the stages (tensor_parallelize(model, tp_group), then pipeline_parallelize(model,
pp_group, ...)): the groups must form a grid, each tensor-parallel group's ranks at the same stage of different
pipelines and each pipeline's ranks at the same tensor-parallel rank (4 ranks, TP = PP = 2: TP groups [0, 1],
[2, 3], PP groups [0, 2], [1, 3]; every rank creates every group). The hidden states between stages are
replicated over the tensor-parallel ranks (no sequence parallelism), so each rank sends to and receives from its
counterpart in its own pipeline, unchanged; the blocks' collectives run in the tensor-parallel group meanwhile.
The tied embedding's gradients are summed between the first and last stage of each pipeline, i.e. between
ranks of the same tensor-parallel rank, which hold the same (vocabulary-parallel: the same rows') copy;
vocab_parallel=True works (the first stage's sharded embedding, the last stage's sharded head and loss). The
argument checks run over both groups (pipeline, tensor-parallel, pipeline again), so an error on any rank of the
grid raises on every rank. Data parallelism over such grids (gradient all-reduce) is the caller's.

What the zoo needs and how it is done:

- Positions: every stage builds its own (arange(T) of the micro-batch: GPT's learned positions on the first
  stage, RoPE's cos / sin on each stage for its blocks, Gemma 3's local RoPE by the global layer index, NeoX's
  partial RoPE).
- The loss: the zoo's own (fused_lm_loss: llmkern.linear_cross_entropy on the llmkern backend, the logit
  soft-cap, the vocabulary-parallel loss of a sharded head) per micro-batch on the last stage, weighted so that
  the sum over the micro-batches is the mean over the valid (label != -100) tokens of the whole batch, not the
  mean of the micro-batch means: micro-batch j contributes n_j / N · mean_j (N the batch's valid tokens), and 0
  when n_j = 0. Gradients therefore equal the unsharded model's full-batch step (tests: float32, 1e-5), whatever
  the ignored labels' spread.
- Tied embeddings (GPT-2's wte = lm_head, Gemma...): the first and last stage hold copies (equal at the
  start); after each step their gradients are summed over the two ranks (Megatron-LM's embedding group, here
  one isend / irecv pair), so both copies get the unsharded gradient and stay equal under any optimizer that
  updates them alike.
- Activation recomputation (model.gradient_checkpointing_enable()): each block runs through the zoo's own
  run_block, so it is recomputed in the stage's backward as unsharded.
- Dropout: works, but each rank draws from its own RNG, so the masks differ from a single-process run's.

Not supported (errors raised on every rank, so that none waits alone in a collective): a model that is not a
zoo GPT / Llama / NeoX; one that is expert- or context-parallel already, or has prefix tuning; a tensor-parallel one
whose group shares ranks with the pipeline group (not a grid), whose layers use several groups, or with
sequence-parallel layers (the stages exchange replicated hidden states; tensor_parallelize never applies
sequence parallelism); more ranks (interleaved: v·p chunks) than blocks; n_microbatches not dividing the batch
(checked per call), below p under "1f1b", not a multiple of p under "interleaved-1f1b"; virtual_stages other
than 1 without "interleaved-1f1b", or below 2 with it; "interleaved-1f1b" on one rank; a MoE model with
router_aux_loss_coef > 0 (the load-balancing loss pools the router statistics of every MoE layer, on every
stage, over the whole batch; no stage has them when its first backward starts under 1F1B: build the model with
router_aux_loss_coef=0; DeepSeek-V3's aux-loss-free routers have none); KV caches, attention_mask and
position_ids (training and evaluation of packed, unpadded batches only). A rank that fails inside the schedule
itself (an exception in a block) leaves the others waiting until the process group's timeout, and so does a
model that is tensor-parallel on some ranks of a grid and not on others (a rank that is not cannot know the
tensor-parallel group to report to).

The stage's inputs and outputs are declared to torch.distributed.pipelining up front (static shapes: no
metadata exchange, no extra forward); one set of PipelineStages and a schedule per micro-batch shape and mode
(train / eval) are built on first use and kept (the last few), so a new sequence length costs one small
handshake. The batch goes to schedule.step whole (torch cuts it into the m micro-batches), the one calling
convention every torch release with these schedules takes. Tested on CPU with gloo only (2 and 4 ranks, against
the unsharded model); not timed, and not yet run with NCCL on GPUs.
"""
import collections
import collections.abc
import functools
import inspect
import zlib

import torch
import torch.distributed as dist
import torch.nn as nn

from llmkern.models._attn import ZooModel, _shift
from llmkern.models.gpt import GPT
from llmkern.models.llama import Llama
from llmkern.models.neox import NeoX
from llmkern.ops._checks import bool_arg
from llmkern.parallel import comm

SCHEDULES = ("1f1b", "gpipe", "interleaved-1f1b")
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_CACHE = 4  # (stages, schedule) entries kept per pipeline: one per micro-batch shape and mode
_GRID_EXAMPLE = "e.g. on 4 ranks: tensor-parallel groups [0, 1], [2, 3] and pipeline groups [0, 2], [1, 3]"


# ---- cross-rank agreement (a local error must not leave the other ranks waiting) ------------------

def _ranks(group):
    """The global ranks of `group`, in group-rank order."""
    return list(dist.get_process_group_ranks(group))


def _named(group, idx):
    """' (global ranks [...])' for group ranks idx of a subgroup, '' for WORLD."""
    if group is None or group is dist.group.WORLD:
        return ""
    ranks = _ranks(group)
    return f" (global ranks {[ranks[i] for i in idx]})"


def _check(group, what, meta, error=None, describe=None, kind="pipeline", hint=None):
    """One all-gather of (error flag, *meta) ints over `group`; returns (the gathered rows in rank order, without
    the flag; the error to raise or None): this rank's own error, else a ValueError naming the ranks that failed,
    else (describe given) one saying how the meta differs. Raises nothing itself: the caller spreads the outcome
    over the other groups of the grid first."""
    rows = comm.gather_ints([1 if error is not None else 0] + [int(v) for v in meta], group)
    if error is None:
        failed = [i for i, r in enumerate(rows) if r[0]]
        if failed:
            error = ValueError(f"{what}: failed on {kind} rank(s) {failed}{_named(group, failed)} (their error "
                               f"says why)")
        elif describe is not None and any(r[1:] != rows[0][1:] for r in rows):
            desc = "; ".join(f"{kind} rank {i}: {describe(r[1:])}" for i, r in enumerate(rows))
            error = ValueError(f"{what}: the ranks disagree ({desc}); " + (
                hint or "every rank of the pipeline group must pass the same model and arguments"))
    return [r[1:] for r in rows], error


# ---- the zoo models' parts --------------------------------------------------------------------------

# (the order is the architecture's index in the ranks' agreement on the model)
_ARCHS = {"gpt": GPT, "llama": Llama, "neox": NeoX}


def _arch(model):
    """'gpt' / 'llama' / 'neox' for a zoo GPT / Llama / NeoX (from_hf's too), else None."""
    for arch, cls in _ARCHS.items():
        if isinstance(model, cls):
            return arch
    return None


# per architecture: the block list, the first stage's and the last stage's modules (the final norm first), the
# token embedding
_PARTS = {"gpt": dict(blocks="h", first=("wte", "wpe"), last=("ln_f", "lm_head"), embedding="wte"),
          "llama": dict(blocks="layers", first=("embed_tokens",), last=("norm", "lm_head"), embedding="embed_tokens"),
          "neox": dict(blocks="layers", first=("embed_tokens",), last=("final_layernorm", "lm_head"),
                       embedding="embed_tokens")}


def split_layers(n_layer, p, stages=None, virtual_stages=1):
    """[(lo, hi)] per model chunk: contiguous block ranges, v·p of them (v = virtual_stages) in pipeline order
    (chunk c runs on rank c % p: one chunk per rank for v = 1, ranks r, r + p, ... for interleaving).
    stages=None: balanced by block count, the first chunks one block more when v·p does not divide n_layer (the
    last chunk also runs the LM head and the loss); else `stages` gives each chunk's block count (v·p positive
    ints summing to n_layer). ValueError naming what is wrong."""
    v = virtual_stages
    n = p * v
    if n_layer < n:
        if v == 1:
            raise ValueError(f"pipeline_parallelize: {p} ranks but the model has {n_layer} blocks: every stage needs "
                             f"at least one block (use fewer pipeline ranks)")
        raise ValueError(f"pipeline_parallelize: {n} model chunks (virtual_stages={v} x {p} ranks) but the model has "
                         f"{n_layer} blocks: every chunk needs at least one block (use fewer virtual stages or ranks)")
    if stages is None:
        counts = [n_layer // n + (1 if r < n_layer % n else 0) for r in range(n)]
    else:
        counts = list(stages) if isinstance(stages, (list, tuple)) else None
        if (counts is None or len(counts) != n or any(isinstance(c, bool) or not isinstance(c, int) or c < 1
                                                        for c in counts) or sum(counts) != n_layer):
            whose = f"{p} ranks'" if v == 1 else \
                f"{n} model chunks' (virtual_stages={v} x {p} ranks, in pipeline order)"
            raise ValueError(f"pipeline_parallelize: stages must list each of the {whose} block counts (positive "
                             f"ints summing to n_layer={n_layer}), got {stages!r}")
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return list(zip(bounds, bounds[1:]))


def _is_count(v, least=1):
    return not isinstance(v, bool) and isinstance(v, int) and v >= least


def _model_error(model, p, n_microbatches, schedule, stages, virtual_stages):
    """Why `model` cannot be pipelined this way (an exception to raise), or None (the tensor-parallel layers are
    checked by _tensor_parallel)."""
    what = "pipeline_parallelize"
    if not isinstance(model, ZooModel) or _arch(model) is None:
        return TypeError(f"{what}: needs a llmkern.models model (GPT, Llama or NeoX, from_hf's too), got "
                         f"{type(model).__name__}")
    if getattr(model, "pipeline_parallel", None) is not None:
        return ValueError(f"{what}: the model is pipeline-parallel already")
    if schedule not in SCHEDULES:
        return ValueError(f"{what}: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not _is_count(n_microbatches):
        return ValueError(f"{what}: n_microbatches must be a positive int, got {n_microbatches!r}")
    if not _is_count(virtual_stages):
        return ValueError(f"{what}: virtual_stages must be a positive int, got {virtual_stages!r}")
    if schedule == "interleaved-1f1b":
        if virtual_stages < 2:
            return ValueError(f"{what}: schedule='interleaved-1f1b' needs virtual_stages >= 2 model chunks per rank "
                              f"(got {virtual_stages}; one chunk per rank is schedule='1f1b')")
        if p < 2:
            return ValueError(f"{what}: schedule='interleaved-1f1b' needs at least 2 pipeline ranks, got {p}")
        if n_microbatches % p:
            return ValueError(f"{what}: schedule='interleaved-1f1b' needs n_microbatches to be a multiple of the "
                              f"number of pipeline ranks ({p}), got n_microbatches={n_microbatches}")
    elif virtual_stages != 1:
        return ValueError(f"{what}: virtual_stages={virtual_stages} needs schedule='interleaved-1f1b' (got "
                          f"schedule={schedule!r}, which runs one chunk per rank)")
    if schedule == "1f1b" and n_microbatches < p:
        return ValueError(f"{what}: schedule='1f1b' needs n_microbatches >= the number of stages ({p}), got "
                          f"n_microbatches={n_microbatches} (use more micro-batches, or schedule='gpipe')")
    if getattr(model, "context_parallel", None) is not None:
        return ValueError(f"{what}: the model is context-parallel (context_parallelize); pipeline parallelism is "
                          f"not combined with it here")
    if getattr(model, "prefix_tuning", None) is not None:
        return ValueError(f"{what}: prefix tuning is not supported under pipeline parallelism (detach it first)")
    cfg = model.config
    if getattr(cfg, "n_experts", 0) and cfg.moe_capacity_factor is not None:  # (a NeoXConfig has no MoE fields)
        return ValueError(f"{what}: moe_capacity_factor={cfg.moe_capacity_factor} is not supported: an expert's "
                          f"capacity counts the tokens of one forward, a micro-batch here, so other pairs would be "
                          f"dropped than in the whole-batch step; build the model with moe_capacity_factor=None")
    if getattr(cfg, "n_experts", 0) and cfg.router_aux_loss_coef:
        return ValueError(f"{what}: router_aux_loss_coef={cfg.router_aux_loss_coef} > 0 is not supported: the "
                          f"load-balancing loss pools the router statistics of every MoE layer over the whole batch, "
                          f"which no stage has before its backward starts; build the model with "
                          f"router_aux_loss_coef=0")
    try:
        split_layers(cfg.n_layer, p, stages, virtual_stages)
    except ValueError as exc:
        return exc
    if _embedding(model).weight.dtype not in _DTYPES:
        return ValueError(f"{what}: the embeddings' dtype {_embedding(model).weight.dtype} is not supported")
    return None


@functools.lru_cache(maxsize=1)
def _tensor_parallel_types():
    from llmkern.parallel.layers import ColumnParallelLinear, RowParallelLinear
    from llmkern.parallel.moe import ShardedExperts, TensorParallelMoE
    from llmkern.parallel.vocab import VocabParallelEmbedding, VocabParallelLMHead

    return (ColumnParallelLinear, RowParallelLinear, TensorParallelMoE, ShardedExperts, VocabParallelEmbedding,
            VocabParallelLMHead)


def _value_error(what, input_ids, labels, vocab):
    """ValueError for token ids outside [0, vocab) or labels outside it other than -100 (ignored), else None."""
    for name, t, low in (("input_ids", input_ids, 0), ("labels", labels, -100)):
        if t is None or t.numel() == 0:
            continue
        lo, hi = (int(v) for v in t.aminmax())
        bad = hi >= vocab or lo < low or (name == "labels" and bool(((t < 0) & (t != -100)).any()))
        if bad:
            return ValueError(f"{what}: {name} must lie in [0, {vocab}) (the vocabulary)"
                              f"{' or be -100 (ignored)' if name == 'labels' else ''}; got values in {lo}..{hi}")
    return None


def _tensor_parallel(model, group):
    """(the tensor-parallel group of `model`'s layers or None, an error or None). The group is found whenever the
    model has tensor-parallel layers over one group (also when the error is set: the grid agreement then runs over
    it); None for a plain model, or a tensor-parallel group of one rank."""
    what = "pipeline_parallelize"
    if not isinstance(model, nn.Module):
        return None, None
    mods = [(n, m) for n, m in model.named_modules() if type(m).__module__.startswith("llmkern.parallel.")]
    if not mods:
        return None, None
    tp_types = _tensor_parallel_types()
    other = sorted({type(m).__name__ for _, m in mods if not isinstance(m, tp_types)})
    if other:
        return None, ValueError(f"{what}: the model is expert-parallel ({', '.join(other)}); pipeline parallelism "
                                f"is not combined with expert_parallelize here (tensor_parallelize is)")
    groups = {}
    for _, m in mods:
        groups.setdefault(tuple(_ranks(m.group)), m.group)
    if len(groups) > 1:
        return None, ValueError(f"{what}: the model's tensor-parallel layers use different process groups (global "
                                f"ranks {sorted(groups)}); tensor_parallelize the model over one group")
    tp = next(iter(groups.values()))
    if comm.world_size(tp) == 1:
        tp = None
    sp = [n for n, m in mods if getattr(m, "sequence_parallel", False)]
    if sp:
        return tp, ValueError(f"{what}: sequence parallelism ({sp[0]}) is not supported under pipeline "
                              f"parallelism: the stages exchange hidden states replicated over the tensor-parallel "
                              f"ranks (tensor_parallelize does not apply sequence parallelism)")
    if tp is not None:
        shared = set(_ranks(tp)) & set(_ranks(group))
        if shared != {dist.get_rank()}:
            return tp, ValueError(f"{what}: the model is tensor-parallel over global ranks {_ranks(tp)}, which share "
                                  f"ranks with the pipeline group (global ranks {_ranks(group)}): tensor- and "
                                  f"pipeline-parallel groups must form a grid, each rank of a tensor-parallel group "
                                  f"at the same stage of another pipeline ({_GRID_EXAMPLE})")
    return tp, None


def _embedding(model):
    return getattr(model, _PARTS[_arch(model)]["embedding"])


def _norm_args(what, max_norm, norm_type):
    """clip_grad_norm_'s max_norm (a finite real >= 0) and norm_type (a positive real or inf) as floats, or a
    ValueError naming them."""
    def real(v):
        return not isinstance(v, bool) and isinstance(v, (int, float)) and v == v

    if not real(max_norm) or not 0 <= max_norm < float("inf"):
        raise ValueError(f"{what}: max_norm must be a finite number >= 0, got {max_norm!r}")
    if not real(norm_type) or not norm_type > 0:
        raise ValueError(f"{what}: norm_type must be a positive number or float('inf'), got {norm_type!r}")
    return float(max_norm), float(norm_type)


def _few(items, n=6):
    """The first n of `items` (strings) and how many more, for an error message."""
    return f"[{', '.join(items[:n])}{f', ... ({len(items) - n} more)' if len(items) > n else ''}]"


def _refuse_forward(model, args, kwargs):
    raise RuntimeError("this model is pipeline-parallel (pipeline_parallelize) and holds one stage only: run it "
                       "through the returned PipelineParallel (step / forward)")


@functools.lru_cache(maxsize=None)
def _step_takes(cls, name):
    """Whether `cls.step` takes the keyword `name` (return_outputs is not in every torch the pipeline runs on)."""
    return name in inspect.signature(cls.step).parameters


# ---- the stage module ------------------------------------------------------------------------------

class _Stage(nn.Module):
    """What torch.distributed.pipelining runs for one model chunk: forward(x), x the input_ids [b, T] (the first
    chunk) or the hidden states [b, T, d] (the others) -> the hidden states after the chunk's blocks [b, T, d],
    sent in `dtype`; on the last chunk after the final norm (the loss and the logits are taken from them). Its
    submodules are the chunk's own (blocks, and the embeddings / final norm and head on the first / last chunk):
    the pruned model holds them all, a rank's chunks share it."""

    def __init__(self, model, layers, first, last, dtype):
        super().__init__()
        self.__dict__["model"] = model  # (not a submodule: only this chunk's parts are the stage's)
        self.arch = _arch(model)
        parts = _PARTS[self.arch]
        blocks = getattr(model, parts["blocks"])
        self.blocks = nn.ModuleDict({str(i): blocks[str(i)] for i in layers})
        names = (parts["first"] if first else ()) + (parts["last"] if last else ())
        self.ends = nn.ModuleDict({n: getattr(model, n) for n in names if getattr(model, n, None) is not None})
        self.layers, self.first, self.last, self.dtype = layers, first, last, dtype

    def forward(self, x):
        model, cfg = self.model, self.model.config
        if self.first:
            x = self._embed(x)
        T = x.shape[1]
        pos = model.positions(0, T, x.device)
        if self.arch == "gpt":
            for i in self.layers:
                x = model.run_block(self.blocks[str(i)], x, cache=None, layer=i, prefix=None, kpm=None)
        elif self.arch == "neox":  # (partial RoPE: cos / sin of the rotated channels only)
            cos, sin = model.rope(pos, x.dtype)
            for i in self.layers:
                x = model.run_block(self.blocks[str(i)], x, cos, sin, cache=None, layer=i, prefix=None, kpm=None)
        else:
            rope = model.rope(pos, x.dtype)
            local = model.rope(pos, x.dtype, local=True) if cfg.rope_local_theta is not None else rope
            for i in self.layers:
                cos, sin = local if cfg.layer_rope_is_local(i) else rope
                x = model.run_block(self.blocks[str(i)], x, cos, sin, cache=None, layer=i, prefix=None, kpm=None,
                                    router_logits=None)
        if self.last:
            return getattr(model, _PARTS[self.arch]["last"][0])(x)  # the final norm
        return x.to(self.dtype).contiguous()  # what the next stage's receive buffer holds

    def _embed(self, ids):
        model = self.model
        if self.arch == "gpt":
            pos = model.positions(0, ids.shape[1], ids.device)
            return model.drop(model.wte(ids) + model.wpe(pos))
        return model.embed(ids)  # (Gemma's and Granite's scaling, NeoX's dropout included, as the model's forward)


# ---- the pipeline ----------------------------------------------------------------------------------


def _loss_scale_arg(loss_scale):
    """PipelineParallel.step's loss_scale as a float32 0-dim tensor (None: none), or an error naming it."""
    if loss_scale is None:
        return None
    if torch.is_tensor(loss_scale):
        if loss_scale.numel() != 1 or not loss_scale.is_floating_point():
            raise ValueError(f"loss_scale must be a positive float or a one-element floating tensor, got "
                             f"{loss_scale.dtype} {tuple(loss_scale.shape)}")
        scale = loss_scale.detach().reshape(()).float()
        if not bool(torch.isfinite(scale) & (scale > 0)):  # (a negative scale was gradient ascent, silently)
            raise ValueError(f"loss_scale must be positive and finite, got {scale.item()}")
        return scale
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not 0 < loss_scale < float("inf"):
        raise ValueError(f"loss_scale must be a positive finite float (or None), got {loss_scale!r}")
    return torch.tensor(float(loss_scale))

class PipelineParallel:
    """This rank's stage of a pipeline-parallel zoo model (build it with pipeline_parallelize).

    model          the zoo model, pruned to this rank's stage in place (parameters keep their names)
    stage_index    this rank's stage (its rank in `group`); num_stages = p (the pipeline ranks)
    bounds         [(lo, hi)] per model chunk: the global block indices of every chunk (one per rank, or v·p
                   under interleaving, chunk c on rank c % p)
    virtual_stages v, the model chunks per rank; chunks: this rank's chunk indices (stage_index, + p, ...)
    layers         the global indices of this rank's blocks (a range for v = 1)
    tp_group       the tensor-parallel group of the model's layers (None without tensor parallelism)
    is_first, is_last, n_microbatches, schedule, group

    step(input_ids, labels)   one training step's forward + backward (gradients accumulated)
    forward(input_ids, ...)   evaluation (no gradients)
    parameters(), named_parameters(), train(), eval(), zero_grad(): the stage model's
    clip_grad_norm_(max_norm) torch's gradient clipping by the norm over all the stages (not each stage's own)
    state_dict()              this stage's state under the unsharded model's keys (save one file per stage)
    load_state_dict(sd)       this stage's keys of `sd`: its own dict, or the unsharded model's whole one
    """

    def __init__(self, model, group, n_microbatches, schedule, bounds, dtype, virtual_stages=1, tp_group=None):
        self.model, self.group = model, group
        self.n_microbatches, self.schedule = n_microbatches, schedule
        self.num_stages, self.stage_index = comm.world_size(group), comm.rank(group)
        self.is_first, self.is_last = self.stage_index == 0, self.stage_index == self.num_stages - 1
        self.bounds = bounds
        self.virtual_stages = virtual_stages
        self.chunks = [self.stage_index + k * self.num_stages for k in range(virtual_stages)]
        self.chunk_layers = [range(*bounds[c]) for c in self.chunks]
        self.layers = self.chunk_layers[0] if virtual_stages == 1 else [i for r in self.chunk_layers for i in r]
        self.tp_group = tp_group
        self.dtype = dtype
        self._tied = None  # (the module holding this rank's copy of the tied embedding, the other end's group rank)
        self._stages = []  # one _Stage per chunk
        self._entries = collections.OrderedDict()
        self._n_valid = self._loss_scale = None
        # (before the pruning) the unsharded model's keys, and those of the tied embedding (its input embedding's
        # and the head's: one tensor there): load_state_dict skips the other stages' keys, refuses any other
        full = model.state_dict(keep_vars=True)
        emb = _embedding(model).weight
        self._full_keys = frozenset(full)
        # (and as a full checkpoint names them: a tensor-parallel layer cut from a LoRA wrapper keeps its names)
        from llmkern.parallel.tensor_parallel import _checkpoint_entries

        entries = _checkpoint_entries(model, "pipeline_parallelize")
        self._full_checkpoint_keys = frozenset(e.full_key for e in entries)
        self._tied_keys = tuple(k for k, v in full.items() if v is emb) if model.lm_head.weight is emb else ()

    @property
    def device(self):
        """The device this rank's stage runs on: its parameters' (read at each call, so that a model pipelined on the
        meta device runs where to_empty / load_state_dict(assign=True) put it)."""
        return self.model._parameter_device()

    @property
    def tied(self):
        """(this rank's copy of the tied embedding, the other end's group rank), or None: the parameter read from its
        module at each call, so that one replaced (load_state_dict(assign=True)) is still the one whose gradient
        step() sums with the other copy's."""
        if self._tied is None:
            return None
        owner, peer = self._tied
        return owner.weight, peer

    # (the stage model's)
    def parameters(self, recurse=True):
        return self.model.parameters(recurse)

    def named_parameters(self, *args, **kwargs):
        return self.model.named_parameters(*args, **kwargs)

    def train(self, mode=True):
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self, set_to_none=True):
        """The stage's gradients dropped (set_to_none=True, nn.Module's default) or zeroed in place."""
        self.model.zero_grad(bool_arg("PipelineParallel.zero_grad: set_to_none", set_to_none))

    def clip_grad_norm_(self, max_norm, norm_type=2.0, error_if_nonfinite=False):
        """torch.nn.utils.clip_grad_norm_ over the whole pipeline: the norm of the gradients of every stage's
        parameters together (a tied embedding's two copies counted once: one parameter in the unsharded model),
        and each stage's gradients scaled by max_norm / (norm + 1e-6) where that is below 1. Returns that total
        norm (a float32 0-dim tensor) on every rank; every rank of the group must call it. torch's own function on
        pipe.parameters() would clip each stage by its own norm. Not under tensor parallelism (ValueError): a
        sharded weight's norm needs its shards' squares summed, a replicated one's counted once."""
        what = "PipelineParallel.clip_grad_norm_"
        error = None
        try:
            max_norm, norm_type = _norm_args(what, max_norm, norm_type)
            error_if_nonfinite = bool_arg(f"{what}: error_if_nonfinite", error_if_nonfinite)
            if self.tp_group is not None:
                raise ValueError(f"{what}: not supported with tensor parallelism inside the stages (the norm of a "
                                 f"sharded weight sums its shards', a replicated one counts once)")
        except (TypeError, ValueError) as exc:  # (raised on every rank: the others would wait in the all-reduce)
            error = exc
        if comm.validation_enabled():  # (one collective and a wait per call: off with the other per-call checks)
            self._agree(what, error)
        elif error is not None:
            raise error
        tied_copy = self.tied[0] if self.tied is not None and self.is_last else None  # (the first stage counts it)
        grads = [q.grad for q in self.model.parameters() if q.grad is not None]
        counted = [q.grad for q in self.model.parameters() if q.grad is not None and q is not tied_copy]
        norms = [torch.linalg.vector_norm(g.detach(), norm_type).double() for g in counted]
        local = torch.linalg.vector_norm(torch.stack(norms), norm_type) if norms else \
            torch.zeros((), dtype=torch.float64)
        # [this stage's part, whether it is NaN] (float64: p-th powers of large norms do not overflow; the NaN flag
        # travels apart as a MAX reduction may drop a NaN beside a number or an inf, where torch's norm is NaN)
        inf = norm_type == float("inf")
        row = torch.stack([local if inf else local.pow(norm_type), torch.isnan(local).double()]).to(self.device)
        dist.all_reduce(row, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=self.group)
        total = row[0] if inf else row[0].pow(1.0 / norm_type)
        total = torch.where(row[1] > 0, torch.full_like(total, float("nan")), total)  # (on the device: no host sync)
        if error_if_nonfinite and not bool(torch.isfinite(total)):  # (the same total on every rank: all raise)
            raise RuntimeError(f"{what}: the total norm of order {norm_type} of the gradients is non-finite "
                               f"({total.item()}; error_if_nonfinite=True)")
        total = total.float()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:  # (the tied copy too: both copies scaled alike stay equal)
            g.detach().mul_(coef.to(device=g.device, dtype=g.dtype))
        return total

    def state_dict(self, *args, **kwargs):
        """This stage's state (nn.Module.state_dict of the stage model) under the unsharded model's keys, e.g.
        ``h.5.attn.q_proj.weight``: the union of the stages' dicts is the unsharded model's state_dict (a tied
        embedding's copies under the input embedding's key on the first stage and ``lm_head.weight`` on the last,
        both keys as the unsharded model saves them). Under tensor parallelism the values are this rank's shards."""
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Load this stage's part of `state_dict`: this stage's own state_dict(), the union of every stage's, or the
        unsharded model's whole state_dict (a rank takes its stage's keys and skips those of the other stages, so
        every rank may pass the same full checkpoint). A tied embedding's copy missing under its own key is taken
        from the tied weight's other key (checkpoints that store it once). Returns nn.Module's (missing_keys,
        unexpected_keys).

        strict=True: ValueError naming the keys, on every rank and before anything is loaded, for keys of this
        stage missing from `state_dict` or keys that are neither the unsharded model's nor this stage's (strict=False:
        skipped and reported in the return). Modules added to the stages after pipeline_parallelize (e.g.
        inject_lora on pipe.model) have keys the unsharded model lacked: a stage takes its own, but another stage's
        are unexpected here (load each stage's own dict then). A tensor whose shape differs from the stage's is a
        ValueError either way. Every rank of the group (of the grid, with tensor parallelism) must call it. assign:
        as nn.Module's."""
        what = "PipelineParallel.load_state_dict"
        error = result = None
        try:
            strict = bool_arg(f"{what}: strict", strict)
            assign = bool_arg(f"{what}: assign", assign)
            result = self._stage_state(what, state_dict, strict)
        except (TypeError, ValueError) as exc:  # (raised on every rank below: the others would wait in step)
            error = exc
        self._agree(what, error)
        stage_dict, missing, unexpected = result
        self.model.load_state_dict(stage_dict, strict=strict, assign=assign)
        # (nn.Module.load_state_dict's namedtuple, with the keys as the whole state_dict had them)
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    def __repr__(self):
        blocks = ", ".join(f"[{r.start}, {r.stop})" for r in self.chunk_layers)
        parts = (["embeddings"] if self.is_first else []) + [f"blocks {blocks}"] + \
                (["final norm, LM head, loss"] if self.is_last else [])
        extra = f", virtual_stages={self.virtual_stages} (chunks {self.chunks})" if self.virtual_stages > 1 else ""
        if self.tp_group is not None:
            extra += f", tensor-parallel rank {comm.rank(self.tp_group)} of {comm.world_size(self.tp_group)}"
        return (f"PipelineParallel(stage {self.stage_index} of {self.num_stages}: {', '.join(parts)}; "
                f"schedule={self.schedule!r}, n_microbatches={self.n_microbatches}{extra})")

    # ---- the steps ----

    def step(self, input_ids=None, labels=None, *, loss_scale=None):
        """One training step over the batch: forward and backward of its n_microbatches micro-batches through
        the pipeline, the gradients accumulated into this stage's parameters' .grad (as loss.backward() would:
        zero them between optimizer steps), equal to those of the unsharded model's mean loss over the valid
        tokens of the whole batch. The tied embedding's two copies get the summed gradient.

        input_ids [B, T] (integer) is needed on the first rank, labels [B, T] (aligned with input_ids, shifted
        inside, -100 ignored) on the last; other ranks may pass them or None (under tensor parallelism the ranks
        of a stage pass the same). n_microbatches must divide B. Returns the batch's mean loss (a detached scalar)
        on the last rank, None on the others. Every rank of the group (of the grid, with tensor parallelism)
        must call it; a bad argument on any rank raises on every rank (before any transfer).

        loss_scale: float16 training's loss scale (read on the last rank): the backward runs on loss_scale times
        the loss, so every stage's gradients come out scaled, as after ``scaler.scale(loss).backward()``; pass
        ``scaler.scale(torch.ones((), device=...))`` (which also starts the GradScaler), then ``scaler.step`` /
        ``scaler.update`` as usual. A positive float or a 0-dim tensor; the returned loss is the unscaled one."""
        scale, error = None, None
        try:
            scale = _loss_scale_arg(loss_scale) if self.is_last else None
        except ValueError as exc:  # (raised on every rank by _agree_batch, not here alone: the others would hang)
            error = exc
        B, T = self._agree_batch("PipelineParallel.step", input_ids, labels, need_labels=True, train=True,
                                 error=error)
        m = self.n_microbatches
        schedule = self._entry(B // m, T, train=True)
        ids = input_ids.to(self.device, torch.long) if self.is_first else None
        losses, n_valid = [], None
        if self.is_last:
            labels = labels.to(self.device, torch.long)
            n_valid = (_shift(labels) != -100).sum()  # N: the valid tokens of the whole batch (_loss reads it)
        before = self._tied_grad_before()
        self._n_valid, self._loss_scale = n_valid, scale
        try:
            self._run(schedule, ids, labels, losses, train=True)
        finally:
            self._n_valid = self._loss_scale = None
        self._sync_tied(before)
        if not self.is_last:
            return None
        with torch.no_grad():  # (the micro-batches' weighted parts: their sum is the batch's mean)
            dtype = torch.promote_types(losses[0].dtype, torch.float32) if losses else torch.float32
            loss = torch.stack([x.detach().to(dtype) for x in losses]).sum()
            if scale is not None:
                loss = loss / scale.to(device=loss.device, dtype=loss.dtype)
            return loss + torch.where(n_valid > 0, 0.0, float("nan"))  # no valid label: NaN, as unsharded

    def forward(self, input_ids=None, labels=None, *, return_logits=True):
        """Evaluation forward of the batch through the pipeline (no gradients; the model's train / eval mode as
        it is): on the last rank the zoo model's return, logits [B, T, V], or (logits, loss) with labels, or
        (None, loss) with labels and return_logits=False (the fused loss, no logits); the loss is the mean
        over the valid tokens of the whole batch. None on the other ranks. input_ids on the first rank; labels
        (optional) on the last. Every rank of the group must call it."""
        error = None
        try:  # (a string "False" returned the logits; raised on every rank by _agree_batch)
            return_logits = bool_arg("PipelineParallel.forward: return_logits", return_logits)
        except TypeError as exc:
            error = exc
        B, T = self._agree_batch("PipelineParallel.forward", input_ids, labels, need_labels=False, error=error)
        m = self.n_microbatches
        schedule = self._entry(B // m, T, train=False)
        ids = input_ids.to(self.device, torch.long) if self.is_first else None
        with torch.no_grad():
            h = self._run(schedule, ids, train=False)
            if not self.is_last:
                return None
            model = self.model
            if labels is not None:
                labels = labels.to(self.device, torch.long)
                if not return_logits:
                    return None, model.fused_lm_loss(h, labels)
            logits = model.head_logits(h)
            return logits if labels is None else (logits, model.lm_loss(logits, labels))

    __call__ = forward

    # ---- helpers ----

    def _stage_state(self, what, state_dict, strict):
        """(the entries of `state_dict` this stage loads, its missing keys, the keys that are no stage's), or a
        ValueError / TypeError naming the keys (see load_state_dict)."""
        if not isinstance(state_dict, collections.abc.Mapping):
            raise TypeError(f"{what}: state_dict must be a mapping of names to tensors, got "
                            f"{type(state_dict).__name__}")
        own = self.model.state_dict()
        stage_dict, missing = collections.OrderedDict(), []
        for key in own:
            # (a tied copy's key, else the tied weight's other key: a checkpoint may hold it once)
            aliases = self._tied_keys if key in self._tied_keys else ()
            source = next((k for k in (key,) + aliases if k in state_dict), None)
            if source is None:
                missing.append(key)
            else:
                stage_dict[key] = state_dict[source]
        # (the stage's own keys too: modules added to the stage after the split, e.g. LoRA, are no unsharded key)
        unexpected = [k for k in state_dict if k not in self._full_keys and k not in own]
        if strict and (missing or unexpected):
            parts = ([f"missing this stage's keys {_few([repr(k) for k in missing])}"] if missing else []) + \
                    ([f"keys that are not the model's {_few([repr(k) for k in unexpected])}"] if unexpected else [])
            raise ValueError(f"{what}: {'; '.join(parts)} (stage {self.stage_index} of {self.num_stages}; strict=False "
                             f"skips them)")
        wrong = [f"{k}: {tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}, the stage's "
                 f"{tuple(own[k].shape)}" for k, v in stage_dict.items()
                 if not torch.is_tensor(v) or (torch.is_tensor(own[k]) and v.shape != own[k].shape)]
        if wrong:
            raise ValueError(f"{what}: shapes differ from this stage's ({_few(wrong)}; under tensor parallelism a "
                             f"stage holds its rank's shards)")
        if hasattr(state_dict, "_metadata"):  # (the modules' versions, which their load hooks read)
            stage_dict._metadata = state_dict._metadata
        return stage_dict, missing, unexpected

    def _agree(self, what, error):
        """Raise `error` (this rank's, or None) on every rank of the pipeline and tensor-parallel groups: a
        ValueError naming the ranks that failed on the others."""
        _, error = _check(self.group, what, [], error)
        if self.tp_group is not None:
            _, error = _check(self.tp_group, what, [], error, kind="tensor-parallel")
            _, error = _check(self.group, what, [], error)
        if error is not None:
            raise error

    def _run(self, schedule, ids, labels=None, losses=None, train=False):
        """schedule.step over the whole batch (torch cuts it into the n_microbatches micro-batches along dim 0,
        as chunk() would: they divide it), input_ids on the first rank, the targets on the last."""
        args = (ids,) if self.is_first else ()
        kw = {}
        if train and self.is_last:
            kw.update(target=labels, losses=losses)
        if _step_takes(type(schedule), "return_outputs"):
            kw["return_outputs"] = not train
        return schedule.step(*args, **kw)

    def _agree_batch(self, what, input_ids, labels, need_labels, train=False, error=None):
        """Check the arguments on every rank (one all-gather of a few ints over the pipeline group; with tensor
        parallelism one more over the tensor-parallel group and a third over the pipeline group, so that an error
        anywhere in the grid raises everywhere): (B, T) of the batch, or an error on every rank (`error`: one
        the caller found already)."""
        shapes = []
        for name, t in (("input_ids", input_ids), ("labels", labels)):
            if t is None:
                shapes += [-1, -1]
            elif not torch.is_tensor(t) or t.dim() != 2 or t.dtype not in (torch.long, torch.int32):
                error = error or ValueError(f"{what}: {name} must be an integer tensor [batch, seq], got "
                                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
                shapes += [-1, -1]
            else:
                shapes += list(t.shape)
        if error is None and train and not torch.is_grad_enabled():
            error = RuntimeError(f"{what}: runs the backward, so gradients must be enabled (not under torch.no_grad(); "
                                 f"PipelineParallel.forward is the evaluation forward)")
        if error is None and self.is_first and input_ids is None:
            error = ValueError(f"{what}: the first stage (pipeline rank 0) needs input_ids")
        if error is None and self.is_last and need_labels and labels is None:
            error = ValueError(f"{what}: the last stage (pipeline rank {self.num_stages - 1}) needs labels")
        if error is None:  # out-of-range values would fail inside the schedule, on one rank, the others then hang
            error = _value_error(what, input_ids if self.is_first else None, labels if self.is_last else None,
                                 self.model.config.vocab_size)
        # the tied embedding's copies (first and last stage) must agree on requires_grad: one frozen by name
        # (wte on the first stage, lm_head on the last) would leave the other alone in _sync_tied's exchange
        shapes.append(-1 if self.tied is None or not train else int(self.tied[0].requires_grad))
        rows, error = _check(self.group, what, shapes, error)
        B = T = -1
        if error is None and len({r[4] for r in rows if r[4] >= 0}) > 1:
            error = ValueError(f"{what}: the tied embedding's two copies (the first stage's input embedding, the last "
                               f"stage's lm_head.weight) must both require grad or both not: freeze or unfreeze "
                               f"them together (one parameter in the unsharded model)")
        if error is None:
            given = {tuple(r[i:i + 2]) for r in rows for i in (0, 2) if r[i] >= 0}
            B, T = next(iter(given)) if len(given) == 1 else (-1, -1)
            m = self.n_microbatches
            if len(given) > 1:
                desc = "; ".join(f"rank {i}: input_ids {tuple(r[:2]) if r[0] >= 0 else None}, labels "
                                 f"{tuple(r[2:4]) if r[2] >= 0 else None}" for i, r in enumerate(rows))
                error = ValueError(f"{what}: input_ids and labels must have one shape [batch, seq] on every rank "
                                   f"({desc})")
            elif B < 1 or T < 1 or B % m:
                error = ValueError(f"{what}: n_microbatches={m} must divide the batch size {B} (input_ids [{B}, {T}]): "
                                   f"every micro-batch holds batch / n_microbatches sequences")
            elif T > self.model.config.block_size:
                error = ValueError(f"{what}: input_ids: {T} tokens exceed block_size={self.model.config.block_size}")
        if self.tp_group is not None:
            _, error = _check(self.tp_group, what, [B, T] if error is None else [-1, -1], error,
                              lambda r: f"batch [{r[0]}, {r[1]}]", kind="tensor-parallel",
                              hint="the tensor-parallel ranks of a stage must pass the same batch")
            _, error = _check(self.group, what, [], error)
        if error is not None:
            raise error
        return B, T

    def _entry(self, b, T, train):
        """The schedule for micro-batches [b, T] (train: with the loss and backward), built on first use."""
        key = (b, T, train, self.device)  # (PipelineStage keeps the device: a stage moved since needs new ones)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                                  ScheduleInterleaved1F1B)

        d = self.model.config.n_embd
        n = self.num_stages * self.virtual_stages
        # (requires_grad on the examples: torch derives from it which gradients travel back)
        hidden = torch.empty(b, T, d, dtype=self.dtype, device="meta", requires_grad=train)
        ids = torch.empty(b, T, dtype=torch.long, device="meta")
        stages = [PipelineStage(module, c, n, self.device, input_args=(ids if c == 0 else hidden,),
                                output_args=(hidden,), group=self.group)
                  for c, module in zip(self.chunks, self._stages)]
        loss_fn = self._loss if train else None
        if self.schedule == "interleaved-1f1b":
            sched = ScheduleInterleaved1F1B(stages, self.n_microbatches, loss_fn=loss_fn, scale_grads=False)
        else:
            cls = Schedule1F1B if self.schedule == "1f1b" else ScheduleGPipe
            sched = cls(stages[0], self.n_microbatches, loss_fn=loss_fn, scale_grads=False)
        self._entries[key] = sched
        while len(self._entries) > _CACHE:  # (the same keys in the same order on every rank: the same eviction)
            self._entries.popitem(last=False)
        return sched

    def _loss(self, h, labels):
        """Micro-batch j's part of the batch's mean loss: n_j / N · (the zoo's loss, the mean over its n_j valid
        tokens); 0 (and zero gradients) when it has none. Summed over j: the mean over the N valid tokens."""
        n = (_shift(labels) != -100).sum()
        loss = self.model.fused_lm_loss(h, labels)
        loss = torch.where(n > 0, loss, torch.zeros_like(loss))  # (n = 0: the mean is NaN; its gradient zero)
        # (the weight in the loss's dtype: int64 / int64 is float32, 1/3 rounded for a float64 model)
        loss = loss * (n.to(loss.dtype) / self._n_valid.clamp_min(1).to(loss.dtype))
        if self._loss_scale is not None:  # (GradScaler's: the backward from the scaled loss)
            loss = loss * self._loss_scale.to(device=loss.device, dtype=loss.dtype)
        return loss

    def _tied_grad_before(self):
        if self.tied is None:
            return None
        g = self.tied[0].grad
        return None if g is None else g.clone()

    def _sync_tied(self, before):
        """Sum this step's gradient of the tied embedding over its two copies (first and last stage, of this
        pipeline: under tensor parallelism the same tensor-parallel rank, so the same vocabulary shard of a
        vocab-parallel one): one isend / irecv pair. Both ranks then hold before + (d_first + d_last), bitwise
        equal (addition commutes)."""
        if self.tied is None or not self.tied[0].requires_grad:
            return
        weight, peer = self.tied
        g = weight.grad if weight.grad is not None else torch.zeros_like(weight)
        delta = (g if before is None else g - before).contiguous()
        other = torch.empty_like(delta)
        peer = comm.global_rank(self.group, peer)
        ops = [dist.P2POp(dist.isend, delta, peer, self.group), dist.P2POp(dist.irecv, other, peer, self.group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        total = delta + other
        weight.grad = total if before is None else before + total


def pipeline_parallelize(model, group=None, *, n_microbatches, schedule="1f1b", stages=None, virtual_stages=1):
    """Cut a zoo model (llmkern.models GPT, Llama or NeoX: Mistral, Qwen, Gemma, Mixtral / Qwen-MoE, DeepSeek-V2/V3,
    GPT-NeoX / Pythia and Phi-1/1.5/2 included), plain or tensor-parallel (tensor_parallelize over a group that forms
    a grid with `group`), into pipeline stages over the ranks of `group` (default WORLD), this rank keeping its own;
    returns a PipelineParallel (module docstring: the schedules, the loss, tied embeddings, the TP x PP grid).

    n_microbatches  m: each batch is cut into m micro-batches of B / m sequences (m must divide B)
    schedule        "1f1b" (default: activation memory bounded by p micro-batches; needs m >= p), "gpipe", or
                    "interleaved-1f1b" (virtual_stages >= 2 chunks per rank; needs m a multiple of p)
    stages          None: the blocks split evenly by count (the first ranks / chunks one more when p / v·p does not
                    divide them); or each rank's block count, e.g. [3, 2, 2, 1] (p positive ints summing to
                    n_layer), under interleaving each chunk's, in pipeline order (v·p ints; chunk c on rank c % p)
    virtual_stages  v, the model chunks per rank (interleaved-1f1b only; 1 otherwise)

    The model is changed in place: the blocks of other stages, and the embeddings (all but the first stage) and
    the final norm and LM head (all but the last) are removed; the remaining parameters keep their names (the
    blocks sit in an nn.ModuleDict keyed by their global index) and calling the model itself raises (use
    step / forward). The weights must be identical on every rank (same seed, or a broadcast) and the model on
    the device this rank's stage runs on. A tied embedding becomes two copies (first and last stage) whose
    gradients step() sums.

    Errors (on every rank, of the whole TP x PP grid, the model left unchanged): TypeError for a model that is
    not a zoo GPT / Llama / NeoX; ValueError for more ranks (chunks) than blocks, bad stages / schedule /
    n_microbatches / virtual_stages, a model that is expert- or context-parallel, sequence-parallel, tensor-parallel
    over a group that is not a grid with `group`, has prefix tuning, router_aux_loss_coef > 0 on a MoE model, or
    differs across ranks; RuntimeError without a process group."""
    group = comm.resolve_group(group, "pipeline_parallelize")
    p, what = comm.world_size(group), "pipeline_parallelize"
    error = _model_error(model, p, n_microbatches, schedule, stages, virtual_stages)
    tp, tp_error = _tensor_parallel(model, group)
    error = error or tp_error
    tp_meta = [comm.world_size(tp), comm.rank(tp)] if tp is not None else [1, 0]
    meta = [0] * 11
    if error is None:
        cfg = model.config
        emb = _embedding(model).weight
        counts = [hi - lo for lo, hi in split_layers(cfg.n_layer, p, stages, virtual_stages)]
        meta = [list(_ARCHS).index(_arch(model)), cfg.n_layer, cfg.n_embd, cfg.vocab_size,
                int(model.lm_head.weight is emb), sum(prm.numel() for prm in model.parameters()),
                n_microbatches, SCHEDULES.index(schedule), virtual_stages, zlib.crc32(repr(counts).encode()),
                _DTYPES.index(emb.dtype)]

    def describe(m):
        return (f"{_ARCHS[list(_ARCHS)[m[0]]].__name__} n_layer={m[1]} n_embd={m[2]} vocab={m[3]} tied={bool(m[4])} "
                f"params={m[5]}, n_microbatches={m[6]}, schedule={SCHEDULES[m[7]]!r}, virtual_stages={m[8]}, "
                f"stages digest {m[9]}, dtype {_DTYPES[m[10]]}, tensor-parallel rank {m[12]} of {m[11]}")

    # 1. over the pipeline group: this rank's checks, the same model and arguments, the same tensor-parallel rank
    rows, error = _check(group, what, meta + tp_meta, error, describe)
    if tp is not None:
        # 2. over the tensor-parallel group: its ranks at the same stage (the grid), with the same arguments
        def describe_tp(m):
            return (f"pipeline rank {m[0]} of {m[1]}, n_microbatches={m[2]}, schedule={SCHEDULES[m[3]]!r}, "
                    f"virtual_stages={m[4]}, stages digest {m[5]}")

        grid = [comm.rank(group), p] + meta[6:10]
        _, error = _check(tp, what, grid, error, describe_tp, kind="tensor-parallel",
                          hint=f"tensor- and pipeline-parallel groups must form a grid, each rank of a tensor-parallel "
                               f"group at the same stage of another pipeline, all with the same arguments "
                               f"({_GRID_EXAMPLE})")
    if any(r[-2] > 1 for r in rows):
        # 3. over the pipeline group again: an error found in step 2 reaches the pipelines of the other ranks
        _, error = _check(group, what, [], error)
    if error is not None:
        raise error
    bounds = split_layers(model.config.n_layer, p, stages, virtual_stages)
    pipe = PipelineParallel(model, group, n_microbatches, schedule, bounds, _embedding(model).weight.dtype,
                            virtual_stages, tp)
    _prune(model, pipe, p)
    n = p * virtual_stages
    pipe._stages = [_Stage(model, layers, c == 0, c == n - 1, pipe.dtype)
                    for c, layers in zip(pipe.chunks, pipe.chunk_layers)]
    model.pipeline_parallel = pipe
    model.register_forward_pre_hook(_refuse_forward, with_kwargs=True)
    return pipe


def _prune(model, pipe, p):
    """Keep this rank's stage of `model` (see pipeline_parallelize)."""
    parts = _PARTS[_arch(model)]
    emb = getattr(model, parts["embedding"])
    tied = model.lm_head.weight is emb.weight
    head = model.lm_head
    while "weight" not in head._parameters and hasattr(head, "base_layer"):  # (a LoRA / DoRA wrapper's base layer)
        head = head.base_layer
    if tied and p > 1 and pipe.is_last:  # the last stage's own copy of the tied weight
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    blocks = getattr(model, parts["blocks"])
    setattr(model, parts["blocks"], nn.ModuleDict({str(i): blocks[i] for i in sorted(pipe.layers)}))
    if not pipe.is_first:
        for name in parts["first"]:
            setattr(model, name, None)
    if not pipe.is_last:
        for name in parts["last"]:
            setattr(model, name, None)
    if tied and p > 1:
        if pipe.is_first:
            pipe._tied = (emb, p - 1)
        elif pipe.is_last:
            pipe._tied = (head, 0)


__all__ = ["pipeline_parallelize", "PipelineParallel", "split_layers", "SCHEDULES"]
