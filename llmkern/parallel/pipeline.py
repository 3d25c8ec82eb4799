"""Pipeline parallelism (PP) for the zoo models: the blocks cut into contiguous stages, one per rank, and each
batch streamed through them as micro-batches (GPipe, Huang et al. 2018; the 1F1B order of PipeDream-Flush,
Narayanan et al. 2021, which Megatron-LM and torchtitan run).

    pipe = pipeline_parallelize(model, group, n_microbatches=8, schedule="1f1b")
    opt = torch.optim.AdamW(pipe.parameters())        # this rank's stage only
    loss = pipe.step(input_ids, labels)               # forward + backward of the whole batch; the loss on the last rank
    opt.step(); opt.zero_grad()
    logits = pipe.forward(input_ids)                  # evaluation: logits [B, T, V] on the last rank, None elsewhere

Rank r of p (its rank in `group`) keeps blocks [lo_r, hi_r) of the model (balanced by block count by default,
or the caller's `stages`), rank 0 also the embeddings (GPT: wte, wpe; Llama: embed_tokens), rank p - 1 also
the final norm and the LM head, and computes the loss; everything else is deleted from the model on that rank
(in place: the model object becomes this rank's stage, its parameters keep their names, e.g. ``h.5.attn.q_proj
.weight``, so a rank's state_dict holds its slice under the unsharded keys). Per micro-batch of b = B / m
sequences, rank r receives the hidden states [b, T, d] from rank r - 1, runs its blocks and sends [b, T, d] to
rank r + 1 (in the embeddings' dtype); the backward sends their gradients the other way: 2·b·T·d elements
cross each stage boundary per micro-batch. A rank holds the weights, gradients and optimizer state of 1/p of
the blocks; the price is the bubble below.

Schedules (torch.distributed.pipelining's ScheduleGPipe and Schedule1F1B; the transport is torch's P2P,
isend / irecv, NCCL on GPUs and gloo on CPUs):

    "gpipe"  every rank runs the m forwards, then the m backwards: a rank holds the activations of all m
             micro-batches at the peak.
    "1f1b"   rank r runs p - r forwards, then alternates one backward and one forward: at most p - r
             micro-batches in flight, so activation memory is bounded by p, not m (needs m >= p).
Both leave the same bubble, (p - 1) / (m + p - 1) of the step idle on every rank
(llmkern.parallel.cost_model.pipeline_bubble_fraction): m >> p hides it.

What the zoo needs and how it is done:

- Positions: every stage builds its own (arange(T) of the micro-batch: GPT's learned positions on the first
  stage, RoPE's cos / sin on each stage for its blocks, Gemma 3's local RoPE by the global layer index).
- The loss: the zoo's own (fused_lm_loss: llmkern.linear_cross_entropy on the llmkern backend, the logit
  soft-cap) per micro-batch on the last stage, weighted so that the sum over the micro-batches is the mean over
  the valid (label != -100) tokens of the whole batch, not the mean of the micro-batch means: micro-batch j
  contributes n_j / N · mean_j (N the batch's valid tokens), and 0 when n_j = 0. Gradients therefore equal the
  unsharded model's full-batch step (tests: float32, 1e-5), whatever the ignored labels' spread.
- Tied embeddings (GPT-2's wte = lm_head, Gemma...): the first and last stage hold copies (equal at the
  start); after each step their gradients are summed over the two ranks (Megatron-LM's embedding group, here
  one isend / irecv pair), so both copies get the unsharded gradient and stay equal under any optimizer that
  updates them alike.
- Activation recomputation (model.gradient_checkpointing_enable()): each block runs through the zoo's own
  run_block, so it is recomputed in the stage's backward as unsharded.
- Dropout: works, but each rank draws from its own RNG, so the masks differ from a single-process run's.

Not supported (errors raised on every rank, so that none waits alone in a collective): a model that is not a
zoo GPT / Llama; one that is tensor-, expert- or context-parallel already, or has prefix tuning; more ranks than
blocks; n_microbatches not dividing the batch (checked per call), or below p under "1f1b"; a MoE model with
router_aux_loss_coef > 0 (the load-balancing loss pools the router statistics of every MoE layer, on every
stage, over the whole batch; no stage has them when its first backward starts under 1F1B: build the model with
router_aux_loss_coef=0; DeepSeek-V3's aux-loss-free routers have none); KV caches, attention_mask and
position_ids (training and evaluation of packed, unpadded batches only). A rank that fails inside the schedule
itself (an exception in a block) leaves the others waiting until the process group's timeout.

The stage's inputs and outputs are declared to torch.distributed.pipelining up front (static shapes: no
metadata exchange, no extra forward); one PipelineStage and schedule per micro-batch shape and mode (train /
eval) are built on first use and kept (the last few), so a new sequence length costs one small handshake.
"""
import collections
import zlib

import torch
import torch.distributed as dist
import torch.nn as nn

from llmkern.models._attn import ZooModel, _shift
from llmkern.models.gpt import GPT
from llmkern.models.llama import Llama
from llmkern.parallel import comm

SCHEDULES = ("1f1b", "gpipe")
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_CACHE = 4  # (stage, schedule) pairs kept per pipeline: one per micro-batch shape and mode


# ---- cross-rank agreement (a local error must not leave the other ranks waiting) ------------------

def _agree(group, what, meta, error=None, describe=None):
    """One all-gather of (error flag, *meta) ints over `group`; then every rank raises when any rank failed its
    local check (the failing rank its own exception, the others a ValueError naming it) or when the meta
    differs. Returns the gathered rows (rank order, without the flag)."""
    row = [1 if error is not None else 0] + [int(v) for v in meta]
    rows = [row]
    if comm.world_size(group) > 1:
        t = torch.tensor(row, dtype=torch.int64, device=comm._meta_device(None, group))
        out = t.new_empty(comm.world_size(group) * t.numel())
        comm.all_gather_into(out, t, group)
        rows = out.view(comm.world_size(group), -1).tolist()
    if error is not None:
        raise error
    failed = [i for i, r in enumerate(rows) if r[0]]
    if failed:
        raise ValueError(f"{what}: failed on pipeline rank(s) {failed} (their error says why)")
    if describe is not None and any(r[1:] != rows[0][1:] for r in rows):
        desc = "; ".join(f"rank {i}: {describe(r[1:])}" for i, r in enumerate(rows))
        raise ValueError(f"{what}: the ranks disagree ({desc}); every rank of the pipeline group must pass the same "
                         f"model and arguments")
    return [r[1:] for r in rows]


# ---- the zoo models' parts --------------------------------------------------------------------------

def _arch(model):
    """'gpt' / 'llama' for a zoo GPT / Llama (from_hf's too), else None."""
    return "gpt" if isinstance(model, GPT) else "llama" if isinstance(model, Llama) else None


# per architecture: the block list, the first stage's and the last stage's modules, the token embedding
_PARTS = {"gpt": dict(blocks="h", first=("wte", "wpe"), last=("ln_f", "lm_head"), embedding="wte"),
          "llama": dict(blocks="layers", first=("embed_tokens",), last=("norm", "lm_head"), embedding="embed_tokens")}


def split_layers(n_layer, p, stages=None):
    """[(lo, hi)] per rank: contiguous block ranges. stages=None: balanced by block count, the first
    n_layer % p ranks one block more (the last rank also runs the LM head and the loss); else `stages` gives
    each rank's block count (p positive ints summing to n_layer). ValueError naming what is wrong."""
    if n_layer < p:
        raise ValueError(f"pipeline_parallelize: {p} ranks but the model has {n_layer} blocks: every stage needs at "
                         f"least one block (use fewer pipeline ranks)")
    if stages is None:
        counts = [n_layer // p + (1 if r < n_layer % p else 0) for r in range(p)]
    else:
        counts = list(stages) if isinstance(stages, (list, tuple)) else None
        if (counts is None or len(counts) != p or any(isinstance(c, bool) or not isinstance(c, int) or c < 1
                                                        for c in counts) or sum(counts) != n_layer):
            raise ValueError(f"pipeline_parallelize: stages must list each of the {p} ranks' block counts (positive "
                             f"ints summing to n_layer={n_layer}), got {stages!r}")
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return list(zip(bounds, bounds[1:]))


def _model_error(model, p, n_microbatches, schedule, stages):
    """Why `model` cannot be pipelined this way (an exception to raise), or None."""
    what = "pipeline_parallelize"
    if not isinstance(model, ZooModel) or _arch(model) is None:
        return TypeError(f"{what}: needs a llmkern.models model (GPT or Llama, from_hf's too), got "
                         f"{type(model).__name__}")
    if getattr(model, "pipeline_parallel", None) is not None:
        return ValueError(f"{what}: the model is pipeline-parallel already")
    if schedule not in SCHEDULES:
        return ValueError(f"{what}: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if isinstance(n_microbatches, bool) or not isinstance(n_microbatches, int) or n_microbatches < 1:
        return ValueError(f"{what}: n_microbatches must be a positive int, got {n_microbatches!r}")
    if schedule == "1f1b" and n_microbatches < p:
        return ValueError(f"{what}: schedule='1f1b' needs n_microbatches >= the number of stages ({p}), got "
                          f"n_microbatches={n_microbatches} (use more micro-batches, or schedule='gpipe')")
    if getattr(model, "context_parallel", None) is not None:
        return ValueError(f"{what}: the model is context-parallel (context_parallelize); pipeline parallelism is "
                          f"not combined with it here")
    if getattr(model, "prefix_tuning", None) is not None:
        return ValueError(f"{what}: prefix tuning is not supported under pipeline parallelism (detach it first)")
    parallel = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("llmkern.parallel.")})
    if parallel:
        return ValueError(f"{what}: the model is tensor- or expert-parallel already ({', '.join(parallel)}); "
                          f"pipeline parallelism is not combined with tensor_parallelize / expert_parallelize here")
    cfg = model.config
    if cfg.n_experts and cfg.router_aux_loss_coef:
        return ValueError(f"{what}: router_aux_loss_coef={cfg.router_aux_loss_coef} > 0 is not supported: the "
                          f"load-balancing loss pools the router statistics of every MoE layer over the whole batch, "
                          f"which no stage has before its backward starts; build the model with "
                          f"router_aux_loss_coef=0")
    try:
        split_layers(cfg.n_layer, p, stages)
    except ValueError as exc:
        return exc
    if _embedding(model).weight.dtype not in _DTYPES:
        return ValueError(f"{what}: the embeddings' dtype {_embedding(model).weight.dtype} is not supported")
    return None


def _embedding(model):
    return getattr(model, _PARTS[_arch(model)]["embedding"])


def _refuse_forward(model, args, kwargs):
    raise RuntimeError("this model is pipeline-parallel (pipeline_parallelize) and holds one stage only: run it "
                       "through the returned PipelineParallel (step / forward)")


# ---- the stage module ------------------------------------------------------------------------------

class _Stage(nn.Module):
    """What torch.distributed.pipelining runs on this rank: forward(x), x the input_ids [b, T] (first stage) or
    the hidden states [b, T, d] (the others) -> the hidden states after this rank's blocks [b, T, d], sent in
    `dtype`; on the last stage after the final norm (the loss and the logits are taken from them)."""

    def __init__(self, model, layers, first, last, dtype):
        super().__init__()
        self.model = model  # (a submodule: the stage's parameters are the pruned model's)
        self.arch = _arch(model)
        self.layers, self.first, self.last, self.dtype = layers, first, last, dtype

    def forward(self, x):
        model, cfg = self.model, self.model.config
        if self.first:
            x = self._embed(x)
        T = x.shape[1]
        pos = model.positions(0, T, x.device)
        blocks = getattr(model, _PARTS[self.arch]["blocks"])
        if self.arch == "gpt":
            for i in self.layers:
                x = model.run_block(blocks[str(i)], x, cache=None, layer=i, prefix=None, kpm=None)
        else:
            rope = model.rope(pos, x.dtype)
            local = model.rope(pos, x.dtype, local=True) if cfg.rope_local_theta is not None else rope
            for i in self.layers:
                cos, sin = local if cfg.layer_rope_is_local(i) else rope
                x = model.run_block(blocks[str(i)], x, cos, sin, cache=None, layer=i, prefix=None, kpm=None,
                                    router_logits=None)
        if self.last:
            return (model.ln_f if self.arch == "gpt" else model.norm)(x)
        return x.to(self.dtype).contiguous()  # what the next stage's receive buffer holds

    def _embed(self, ids):
        model = self.model
        if self.arch == "gpt":
            pos = model.positions(0, ids.shape[1], ids.device)
            return model.drop(model.wte(ids) + model.wpe(pos))
        x = model.embed_tokens(ids)
        if model.config.scale_embeddings:  # Gemma: times sqrt(d), rounded to x's dtype first (as the zoo)
            x = x * model.embed_scale.to(x.dtype)
        return x


# ---- the pipeline ----------------------------------------------------------------------------------

class PipelineParallel:
    """This rank's stage of a pipeline-parallel zoo model (build it with pipeline_parallelize).

    model          the zoo model, pruned to this rank's stage in place (parameters keep their names)
    stage_index    this rank's stage (its rank in `group`); num_stages = p
    layers         the global indices of this stage's blocks (range)
    is_first, is_last, n_microbatches, schedule, group

    step(input_ids, labels)   one training step's forward + backward (gradients accumulated)
    forward(input_ids, ...)   evaluation (no gradients)
    parameters(), named_parameters(), train(), eval(): the stage model's
    """

    def __init__(self, model, group, n_microbatches, schedule, bounds, dtype):
        self.model, self.group = model, group
        self.n_microbatches, self.schedule = n_microbatches, schedule
        self.num_stages, self.stage_index = comm.world_size(group), comm.rank(group)
        self.is_first, self.is_last = self.stage_index == 0, self.stage_index == self.num_stages - 1
        self.bounds = bounds
        self.layers = range(*bounds[self.stage_index])
        self.dtype = dtype
        self.device = _embedding(model).weight.device  # (before the pruning: the stage runs there)
        self.tied = None  # (this rank's copy of the tied embedding, the other end's group rank)
        self._stage = None
        self._entries = collections.OrderedDict()
        self._n_valid = None

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

    def __repr__(self):
        lo, hi = self.bounds[self.stage_index]
        parts = (["embeddings"] if self.is_first else []) + [f"blocks [{lo}, {hi})"] + \
                (["final norm, LM head, loss"] if self.is_last else [])
        return (f"PipelineParallel(stage {self.stage_index} of {self.num_stages}: {', '.join(parts)}; "
                f"schedule={self.schedule!r}, n_microbatches={self.n_microbatches})")

    # ---- the steps ----

    def step(self, input_ids=None, labels=None):
        """One training step over the batch: forward and backward of its n_microbatches micro-batches through
        the pipeline, the gradients accumulated into this stage's parameters' .grad (as loss.backward() would:
        zero them between optimizer steps), equal to those of the unsharded model's mean loss over the valid
        tokens of the whole batch. The tied embedding's two copies get the summed gradient.

        input_ids [B, T] (integer) is needed on the first rank, labels [B, T] (aligned with input_ids, shifted
        inside, -100 ignored) on the last; other ranks may pass them or None. n_microbatches must divide B.
        Returns the batch's mean loss (a detached scalar) on the last rank, None on the others. Every rank of
        the group must call it; a bad argument on any rank raises on every rank (before any transfer)."""
        B, T = self._agree_batch("PipelineParallel.step", input_ids, labels, need_labels=True, train=True)
        m = self.n_microbatches
        schedule = self._entry(B // m, T, train=True)
        kw = {}
        if self.is_first:
            kw["arg_mbs"] = [(c,) for c in input_ids.to(self.device, torch.long).chunk(m)]
        losses, n_valid = [], None
        if self.is_last:
            labels = labels.to(self.device, torch.long)
            n_valid = (_shift(labels) != -100).sum()  # N: the valid tokens of the whole batch (_loss reads it)
            kw.update(target_mbs=list(labels.chunk(m)), losses=losses)
        before = self._tied_grad_before()
        self._n_valid = n_valid
        try:
            schedule.step(return_outputs=False, **kw)
        finally:
            self._n_valid = None
        self._sync_tied(before)
        if not self.is_last:
            return None
        with torch.no_grad():  # (the micro-batches' weighted parts: their sum is the batch's mean)
            loss = torch.stack([x.detach().float() for x in losses]).sum()
            return loss + torch.where(n_valid > 0, 0.0, float("nan"))  # no valid label: NaN, as unsharded

    def forward(self, input_ids=None, labels=None, *, return_logits=True):
        """Evaluation forward of the batch through the pipeline (no gradients; the model's train / eval mode as
        it is): on the last rank the zoo model's return, logits [B, T, V], or (logits, loss) with labels, or
        (None, loss) with labels and return_logits=False (the fused loss, no logits); the loss is the mean
        over the valid tokens of the whole batch. None on the other ranks. input_ids on the first rank; labels
        (optional) on the last. Every rank of the group must call it."""
        B, T = self._agree_batch("PipelineParallel.forward", input_ids, labels, need_labels=False)
        m = self.n_microbatches
        schedule = self._entry(B // m, T, train=False)
        kw = {}
        if self.is_first:
            kw["arg_mbs"] = [(c,) for c in input_ids.to(self.device, torch.long).chunk(m)]
        with torch.no_grad():
            h = schedule.step(**kw)
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

    def _agree_batch(self, what, input_ids, labels, need_labels, train=False):
        """Check the arguments on every rank (one all-gather of a few ints): (B, T) of the batch, or an error
        on every rank."""
        error = None
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
        rows = _agree(self.group, what, shapes, error)
        given = {tuple(r[i:i + 2]) for r in rows for i in (0, 2) if r[i] >= 0}
        if len(given) > 1:
            desc = "; ".join(f"rank {i}: input_ids {tuple(r[:2]) if r[0] >= 0 else None}, labels "
                             f"{tuple(r[2:]) if r[2] >= 0 else None}" for i, r in enumerate(rows))
            raise ValueError(f"{what}: input_ids and labels must have one shape [batch, seq] on every rank ({desc})")
        B, T = rows[0][:2]
        m = self.n_microbatches
        if B < 1 or T < 1 or B % m:
            raise ValueError(f"{what}: n_microbatches={m} must divide the batch size {B} (input_ids [{B}, {T}]): "
                             f"every micro-batch holds batch / n_microbatches sequences")
        if T > self.model.config.block_size:
            raise ValueError(f"{what}: input_ids: {T} tokens exceed block_size={self.model.config.block_size}")
        return B, T

    def _entry(self, b, T, train):
        """The schedule for micro-batches [b, T] (train: with the loss and backward), built on first use."""
        key = (b, T, train)
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        d = self.model.config.n_embd
        # (requires_grad on the examples: torch derives from it which gradients travel back)
        hidden = torch.empty(b, T, d, dtype=self.dtype, device="meta", requires_grad=train)
        inp = torch.empty(b, T, dtype=torch.long, device="meta") if self.is_first else hidden
        stage = PipelineStage(self._stage, self.stage_index, self.num_stages, self.device, input_args=(inp,),
                              output_args=(hidden,), group=self.group)
        cls = Schedule1F1B if self.schedule == "1f1b" else ScheduleGPipe
        sched = cls(stage, self.n_microbatches, loss_fn=self._loss if train else None, scale_grads=False)
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
        return loss * (n / self._n_valid.clamp_min(1)).to(loss.dtype)

    def _tied_grad_before(self):
        if self.tied is None:
            return None
        g = self.tied[0].grad
        return None if g is None else g.clone()

    def _sync_tied(self, before):
        """Sum this step's gradient of the tied embedding over its two copies (first and last stage): one isend /
        irecv pair. Both ranks then hold before + (d_first + d_last), bitwise equal (addition commutes)."""
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


def pipeline_parallelize(model, group=None, *, n_microbatches, schedule="1f1b", stages=None):
    """Cut a zoo model (llmkern.models GPT or Llama: Mistral, Qwen, Gemma, Mixtral / Qwen-MoE, DeepSeek-V2/V3
    included) into pipeline stages over the ranks of `group` (default WORLD), this rank keeping its own;
    returns a PipelineParallel (module docstring: the schedules, the loss, tied embeddings).

    n_microbatches  m: each batch is cut into m micro-batches of B / m sequences (m must divide B)
    schedule        "1f1b" (default: activation memory bounded by p micro-batches; needs m >= p) or "gpipe"
    stages          None: the blocks split evenly by count (the first ranks one more when p does not divide
                    them); or each rank's block count, e.g. [3, 2, 2, 1] (p positive ints summing to n_layer)

    The model is changed in place: the blocks of other stages, and the embeddings (all but the first stage) and
    the final norm and LM head (all but the last) are removed; the remaining parameters keep their names (the
    blocks sit in an nn.ModuleDict keyed by their global index) and calling the model itself raises (use
    step / forward). The weights must be identical on every rank (same seed, or a broadcast) and the model on
    the device this rank's stage runs on. A tied embedding becomes two copies (first and last stage) whose
    gradients step() sums.

    Errors (on every rank, the model left unchanged): TypeError for a model that is not a zoo GPT / Llama;
    ValueError for more ranks than blocks, bad stages / schedule / n_microbatches, a model that is tensor-,
    expert- or context-parallel or has prefix tuning, router_aux_loss_coef > 0 on a MoE model, or a model
    that differs across ranks; RuntimeError without a process group."""
    group = comm.resolve_group(group, "pipeline_parallelize")
    p, what = comm.world_size(group), "pipeline_parallelize"
    error = _model_error(model, p, n_microbatches, schedule, stages)
    meta = [0] * 9
    if error is None:
        cfg = model.config
        emb = _embedding(model).weight
        counts = [hi - lo for lo, hi in split_layers(cfg.n_layer, p, stages)]
        meta = [0 if _arch(model) == "gpt" else 1, cfg.n_layer, cfg.n_embd, cfg.vocab_size,
                int(model.lm_head.weight is emb), sum(prm.numel() for prm in model.parameters()),
                n_microbatches * 2 + SCHEDULES.index(schedule), zlib.crc32(repr(counts).encode()),
                _DTYPES.index(emb.dtype)]

    def describe(m):
        return (f"{'GPT' if m[0] == 0 else 'Llama'} n_layer={m[1]} n_embd={m[2]} vocab={m[3]} tied={bool(m[4])} "
                f"params={m[5]}, n_microbatches={m[6] // 2}, schedule={SCHEDULES[m[6] % 2]!r}, stages digest {m[7]}, "
                f"dtype {_DTYPES[m[8]]}")

    _agree(group, what, meta, error, describe)
    bounds = split_layers(model.config.n_layer, p, stages)
    pipe = PipelineParallel(model, group, n_microbatches, schedule, bounds, _embedding(model).weight.dtype)
    _prune(model, pipe, p)
    pipe._stage = _Stage(model, pipe.layers, pipe.is_first, pipe.is_last, pipe.dtype)
    model.pipeline_parallel = pipe
    model.register_forward_pre_hook(_refuse_forward, with_kwargs=True)
    return pipe


def _prune(model, pipe, p):
    """Keep this rank's stage of `model` (see pipeline_parallelize)."""
    parts = _PARTS[_arch(model)]
    emb = getattr(model, parts["embedding"])
    tied = model.lm_head.weight is emb.weight
    if tied and p > 1 and pipe.is_last:  # the last stage's own copy of the tied weight
        model.lm_head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    blocks = getattr(model, parts["blocks"])
    setattr(model, parts["blocks"], nn.ModuleDict({str(i): blocks[i] for i in pipe.layers}))
    if not pipe.is_first:
        for name in parts["first"]:
            setattr(model, name, None)
    if not pipe.is_last:
        for name in parts["last"]:
            setattr(model, name, None)
    if tied and p > 1:
        if pipe.is_first:
            pipe.tied = (emb.weight, p - 1)
        elif pipe.is_last:
            pipe.tied = (model.lm_head.weight, 0)


__all__ = ["pipeline_parallelize", "PipelineParallel", "split_layers", "SCHEDULES"]
