"""Pipeline parallelism (llmkern.parallel.pipeline): the zoo models cut into stages over 2 and 4 ranks, against the
unsharded model (single process, same weights) on the whole batch.

The ranks are gloo processes on 127.0.0.1 (llmkern.parallel.launch.RankPool, one pool of 2 ranks and one of 4 per
module). Every rank builds the same model from one seed and keeps a deep copy as the reference. A pipelined step
over m micro-batches must give the unsharded full-batch loss (the mean over the valid tokens of the whole batch)
and, for each parameter this rank's stage holds (by its unsharded name), the unsharded gradient: float32, 1e-5.
The labels ignore (-100) a whole micro-batch, most of another and a random 30% of a third, so a mean of
micro-batch means would differ. GPT ties wte and lm_head: the first and last stage hold copies whose gradients
must both be the unsharded (summed) one, and stay bitwise equal through optimizer steps. Interleaved 1F1B
(virtual_stages chunks per rank) is checked the same way on 2 and 4 ranks. Tensor parallelism inside the stages runs
on the 4-rank grid TP = 2 x PP = 2 (tensor_parallelize over [0, 1] / [2, 3], pipeline_parallelize over [0, 2] /
[1, 3]): every parameter's gradient is compared shard-wise with its slice of the unsharded gradient.
"""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from llmkern.models import build, get_config
from llmkern.parallel.pipeline import PipelineParallel, pipeline_parallelize, split_layers
from llmkern.testing import collect_close, raise_failures

TOL = dict(atol=1e-5, rtol=1e-5)
B, T, M = 8, 12, 4  # batch, sequence, micro-batches (2 sequences each)


# ---- helpers (top level: the spawned ranks import them) -----------------------------------------

def _close(tag, actual, expected, failures, **tol):
    collect_close(tag, actual, expected, failures, **{**TOL, **tol})


def _batch(vocab, seed, batch=B, seq=T):
    """input_ids [batch, seq] and labels with ignored tokens spread unevenly over the micro-batches of 2 rows:
    rows 0-1 all ignored, row 3 and most of row 2 ignored, 30% of rows 4-5 at random, rows 6-7 all valid
    (smaller batches: what of that fits)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[0:2] = -100
    if batch >= 4:
        labels[2, 5:] = -100
        labels[3] = -100
    if batch >= 6:
        labels[4:6][torch.rand(2, seq, generator=g) < 0.3] = -100
    return ids, labels


def _reference(name, overrides, backend, checkpointing=False, seed=0):
    torch.manual_seed(seed)
    ref = build(get_config(name, **overrides), backend=backend)
    if checkpointing:
        ref.gradient_checkpointing_enable()
    return ref


def _check_grads(tag, pipe, ref, failures):
    """Every parameter of this rank's stage has the unsharded model's gradient (by name; a tied copy the tied
    weight's, i.e. the sum of the embedding's and the head's)."""
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    names = [n for n, _ in pipe.named_parameters()]
    if not names or any(n not in ref_params for n in names):
        failures.append(f"{tag}: stage parameter names {names} are not the unsharded model's")
        return
    for name, prm in pipe.named_parameters():
        if prm.grad is None:
            failures.append(f"{tag}: {name} has no gradient")
        else:
            _close(f"{tag}: grad of {name}", prm.grad, ref_params[name].grad, failures)


def _check_params(tag, pipe, ref, failures):
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    for name, prm in pipe.named_parameters():
        _close(f"{tag}: {name} after the optimizer step", prm, ref_params[name], failures)


def _tied_copies_equal(pipe, group=None):
    """Whether the first stage's embedding and the last stage's LM head weight are bitwise equal (every rank of
    the group calls it: one all-gather)."""
    model = pipe.model
    if pipe.is_first:
        w = model.wte.weight if hasattr(model, "wte") else model.embed_tokens.weight
    elif pipe.is_last:
        w = model.lm_head.weight
    else:
        w = torch.zeros(model.config.vocab_size, model.config.n_embd)
    out = [torch.empty_like(w) for _ in range(pipe.num_stages)]
    dist.all_gather(out, w.detach().contiguous(), group=group)
    return torch.equal(out[0], out[-1])


def _layout(tag, pipe, n_layer, stages, failures, virtual_stages=1):
    """The stage holds exactly its blocks (by global index: under interleaving the chunks r, r + p, ...), the
    embeddings on the first, the head on the last."""
    p = pipe.num_stages
    bounds = split_layers(n_layer, p, stages, virtual_stages)
    model = pipe.model
    blocks = model.h if hasattr(model, "h") else model.layers
    want = [str(i) for k in range(virtual_stages) for i in range(*bounds[pipe.stage_index + k * p])]
    if list(blocks.keys()) != want:
        failures.append(f"{tag}: stage {pipe.stage_index} holds blocks {list(blocks.keys())}, expected {want}")
    emb = model.wte if hasattr(model, "h") else model.embed_tokens
    if (emb is not None) != pipe.is_first or (model.lm_head is not None) != pipe.is_last:
        failures.append(f"{tag}: stage {pipe.stage_index}: embeddings / LM head on the wrong stages")


# ---- workers ------------------------------------------------------------------------------------

def step_worker(rank, p, name, overrides, schedule, backend, stages, checkpointing, group_ranks=None,
                virtual_stages=1):
    """A pipelined step (loss, every gradient), the evaluation forward (logits; loss with labels, fused and not),
    an SGD step (parameters), two accumulated steps, and AdamW keeping the tied copies equal. group_ranks: the
    pipelines' rank lists (several pipelines on subgroups of WORLD), else one over WORLD. virtual_stages: the
    model chunks per rank (schedule "interleaved-1f1b")."""
    failures = []
    group, seed = None, 1
    if group_ranks is not None:
        groups = [dist.new_group(r) for r in group_ranks]  # (every rank creates every group)
        which = next(i for i, r in enumerate(group_ranks) if rank in r)
        group, seed = groups[which], 10 + which  # each pipeline its own batches
    tag = (f"{name} {overrides} {schedule} v={virtual_stages} {backend} stages={stages} ckpt={checkpointing} p={p} "
           f"rank={rank}")
    ref = _reference(name, overrides, backend, checkpointing)
    n_layer = ref.config.n_layer
    pipe = pipeline_parallelize(copy.deepcopy(ref), group, n_microbatches=M, schedule=schedule, stages=stages,
                                virtual_stages=virtual_stages)
    _layout(tag, pipe, n_layer, stages, failures, virtual_stages)
    tied = ref.config.tie_embeddings

    # one step: loss and gradients
    ids, labels = _batch(ref.config.vocab_size, seed)
    loss = pipe.step(ids, labels)
    _, ref_loss = ref(ids, labels, return_logits=False)
    ref_loss.backward()
    if pipe.is_last:
        _close(f"{tag}: loss", loss, ref_loss, failures)
    elif loss is not None:
        failures.append(f"{tag}: step returned a loss on a stage that is not the last")
    _check_grads(f"{tag}: step 1", pipe, ref, failures)

    # evaluation: logits, (logits, loss), (None, loss), on another shape too
    with torch.no_grad():
        logits = pipe.forward(ids)
        small_ids, small_labels = _batch(ref.config.vocab_size, seed + 1, batch=4, seq=8)
        both = pipe.forward(small_ids, small_labels)
        fused = pipe.forward(small_ids, small_labels, return_logits=False)
        if pipe.is_last:
            _close(f"{tag}: eval logits", logits, ref(ids), failures)
            ref_logits, ref_small = ref(small_ids, small_labels)
            _close(f"{tag}: eval logits [4, 8]", both[0], ref_logits, failures)
            _close(f"{tag}: eval loss", both[1], ref_small, failures)
            _close(f"{tag}: eval fused loss", fused[1], ref_small, failures)
            if fused[0] is not None:
                failures.append(f"{tag}: return_logits=False returned logits")
        elif (logits, both, fused) != (None, None, None):
            failures.append(f"{tag}: forward returned something on a stage that is not the last")

    # SGD step: the same parameters; then two accumulated steps (ids / labels only where they are needed)
    opt = torch.optim.SGD(pipe.parameters(), lr=0.5, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    opt.step(), ref_opt.step(), opt.zero_grad(), ref_opt.zero_grad()
    _check_params(tag, pipe, ref, failures)
    losses = []
    for s in (2, 3):
        ids, labels = _batch(ref.config.vocab_size, seed + 10 * s)
        losses.append(pipe.step(ids if pipe.is_first else None, labels if pipe.is_last else None))
        _, ref_loss = ref(ids, labels)
        ref_loss.backward()
        if pipe.is_last:
            _close(f"{tag}: loss of step {s}", losses[-1], ref_loss, failures)
    _check_grads(f"{tag}: two accumulated steps", pipe, ref, failures)

    # AdamW: each rank updates its own copy; the tied copies stay bitwise equal
    adam = torch.optim.AdamW(pipe.parameters(), lr=1e-2)
    adam.step()
    if tied and p > 1 and not _tied_copies_equal(pipe, group):
        failures.append(f"{tag}: the tied embedding's copies differ after AdamW")
    raise_failures(rank, failures)
    return pipe.stage_index


def _outcome(fn):
    """(exception type name, message) of fn(), or None when it returns."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001  (reported to the test)
        return type(exc).__name__, str(exc)
    return None


def errors_worker(rank, p):
    """{case: (exception type, message)} of every refused call on this rank; after the per-call refusals the
    pipeline still runs a step (no rank was left inside a collective)."""
    from llmkern.parallel import expert_parallelize, tensor_parallelize

    out = {}
    gpt = _reference("gpt-tiny", {}, "torch")
    fresh = lambda: copy.deepcopy(gpt)  # noqa: E731
    out["not a zoo model"] = _outcome(lambda: pipeline_parallelize(nn.Linear(4, 4), n_microbatches=2))
    out["not a zoo model on rank 1"] = _outcome(
        lambda: pipeline_parallelize(nn.Linear(4, 4) if rank == 1 else fresh(), n_microbatches=2))
    out["models differ"] = _outcome(lambda: pipeline_parallelize(
        _reference("gpt-tiny", {"n_layer": 2 + rank}, "torch"), n_microbatches=2))
    out["schedule"] = _outcome(lambda: pipeline_parallelize(fresh(), n_microbatches=2, schedule="zero-bubble"))
    out["stages"] = _outcome(lambda: pipeline_parallelize(fresh(), n_microbatches=2, stages=[2, 0]))
    out["1f1b micro-batches"] = _outcome(lambda: pipeline_parallelize(fresh(), n_microbatches=1))
    out["n_microbatches type"] = _outcome(lambda: pipeline_parallelize(fresh(), n_microbatches=2.0))
    out["tensor-parallel over the pipeline group"] = _outcome(
        lambda: pipeline_parallelize(tensor_parallelize(fresh()), n_microbatches=2))
    out["interleaved, virtual_stages=1"] = _outcome(
        lambda: pipeline_parallelize(fresh(), n_microbatches=2, schedule="interleaved-1f1b"))
    out["virtual_stages without interleaving"] = _outcome(
        lambda: pipeline_parallelize(fresh(), n_microbatches=2, virtual_stages=2))
    out["interleaved micro-batches"] = _outcome(lambda: pipeline_parallelize(
        _reference("gpt-tiny", {"n_layer": 4}, "torch"), n_microbatches=3, schedule="interleaved-1f1b",
        virtual_stages=2))
    out["interleaved chunks"] = _outcome(
        lambda: pipeline_parallelize(fresh(), n_microbatches=2, schedule="interleaved-1f1b", virtual_stages=2))
    out["interleaved stages"] = _outcome(lambda: pipeline_parallelize(
        _reference("gpt-tiny", {"n_layer": 4}, "torch"), n_microbatches=2, schedule="interleaved-1f1b",
        virtual_stages=2, stages=[2, 2]))
    out["virtual_stages on rank 1"] = _outcome(lambda: pipeline_parallelize(
        _reference("gpt-tiny", {"n_layer": 6}, "torch"), n_microbatches=2, schedule="interleaved-1f1b",
        virtual_stages=3 if rank == 1 else 2))
    moe = _reference("mixtral-tiny", {}, "torch")
    out["expert-parallel"] = _outcome(lambda: pipeline_parallelize(expert_parallelize(copy.deepcopy(moe)),
                                                                   n_microbatches=2))
    aux = _reference("mixtral-tiny", {"router_aux_loss_coef": 0.02}, "torch")
    out["aux loss"] = _outcome(lambda: pipeline_parallelize(aux, n_microbatches=2))
    cap = _reference("mixtral-tiny", {"moe_capacity_factor": 1.0}, "torch")
    out["capacity factor"] = _outcome(lambda: pipeline_parallelize(cap, n_microbatches=2))
    unchanged = isinstance(aux.layers, nn.ModuleList) and len(aux.layers) == 2 and aux.lm_head is not None

    model = fresh()
    pipe = pipeline_parallelize(model, n_microbatches=2, schedule="gpipe")
    ids, labels = _batch(256, 3, batch=4)
    out["calling the model"] = _outcome(lambda: model(ids))
    out["parallelize twice"] = _outcome(lambda: pipeline_parallelize(model, n_microbatches=2))
    out["batch not divisible"] = _outcome(lambda: pipe.step(ids[:3], labels[:3]))
    out["no labels on the last rank"] = _outcome(lambda: pipe.step(ids, None))
    out["shapes differ"] = _outcome(lambda: pipe.step(ids, labels[:, :8] if rank == 1 else labels))
    out["float input_ids"] = _outcome(lambda: pipe.step(ids.float() if rank == 0 else ids, labels))
    out["too long"] = _outcome(lambda: pipe.step(*_batch(256, 4, batch=2, seq=200)))
    out["token id out of range"] = _outcome(lambda: pipe.step(ids + 256 * (rank == 0), labels))
    out["label out of range"] = _outcome(lambda: pipe.step(ids, labels.clamp(min=-1) if rank == 1 else labels))

    def no_grad_step():
        with torch.no_grad():
            pipe.step(ids, labels)
    out["step under no_grad"] = _outcome(no_grad_step)
    # freezing the tied embedding by name reaches one copy only (wte on rank 0): refused, not a hang
    for name, param in model.named_parameters():
        if name.startswith("wte"):
            param.requires_grad_(False)
    out["one tied copy frozen"] = _outcome(lambda: pipe.step(ids, labels))
    for name, param in model.named_parameters():
        param.requires_grad_(True)
    loss = pipe.step(ids, labels)  # still usable
    ok = loss is None or bool(torch.isfinite(loss))
    return out, unchanged, ok, repr(pipe)


def too_many_ranks_worker(rank, p):
    return _outcome(lambda: pipeline_parallelize(_reference("gpt-tiny", {}, "torch"), n_microbatches=4))


# ---- tensor parallelism inside the stages: the 4-rank TP x PP grid --------------------------------

TP_GROUPS, PP_GROUPS = [[0, 1], [2, 3]], [[0, 2], [1, 3]]  # TP = 2 x PP = 2


def _grid_groups(rank, tp_groups=TP_GROUPS, pp_groups=PP_GROUPS):
    """(this rank's tensor-parallel group, its pipeline group); every rank creates every group, in one order."""
    tgs = [dist.new_group(r) for r in tp_groups]
    pgs = [dist.new_group(r) for r in pp_groups]
    return (next(g for g, r in zip(tgs, tp_groups) if rank in r), next(g for g, r in zip(pgs, pp_groups) if rank in r))


def _expected_shard(name, owner, grad, tp):
    """This tensor-parallel rank's slice of the unsharded gradient of parameter `name` of module `owner`."""
    from llmkern.parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead
    from llmkern.parallel.layers import column_rows
    from llmkern.parallel.vocab import _shard

    p, r = dist.get_world_size(tp), dist.get_rank(tp)
    if isinstance(owner, ColumnParallelLinear):
        return column_rows(grad, owner.segments, p, r)
    if isinstance(owner, RowParallelLinear) and name.endswith("weight"):
        k = grad.shape[1] // p
        return grad[:, r * k:(r + 1) * k]
    if isinstance(owner, (VocabParallelEmbedding, VocabParallelLMHead)):
        return _shard(grad, tp)  # (rows [r S, (r + 1) S), zero-padded)
    return grad  # replicated: the whole gradient on every rank


def _check_shards(tag, pipe, ref, tp, what, failures, values=False):
    """Every parameter of this rank's stage (tensor-parallel shards) has its slice of the unsharded model's
    gradient (values=True: its slice of the parameter)."""
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    mods = dict(pipe.model.named_modules())
    names = [n for n, _ in pipe.named_parameters()]
    if not names or any(n not in ref_params for n in names):
        failures.append(f"{tag}: stage parameter names {names} are not the unsharded model's")
        return 0
    sharded = 0
    for name, prm in pipe.named_parameters():
        owner = mods[name.rsplit(".", 1)[0]]
        want = ref_params[name] if values else ref_params[name].grad
        exp = _expected_shard(name, owner, want, tp)
        sharded += exp.shape != want.shape
        got = prm if values else prm.grad
        if got is None:
            failures.append(f"{tag}: {name} has no gradient")
        else:
            _close(f"{tag}: {what} of {name}", got, exp, failures)
    return sharded


def grid_worker(rank, p, name, overrides, schedule, backend, vocab_parallel=False, virtual_stages=1):
    """tensor_parallelize over the TP groups, then pipeline_parallelize over the PP groups: the loss, every
    gradient (shard-wise against the unsharded full-batch step), the evaluation logits and loss, an SGD step, a
    second step, and the tied copies equal after AdamW."""
    from llmkern.parallel import tensor_parallelize

    failures = []
    tp, pp = _grid_groups(rank)
    tag = f"grid {name} {overrides} {schedule} v={virtual_stages} {backend} vocab_parallel={vocab_parallel} rank={rank}"
    ref = _reference(name, overrides, backend)
    model = tensor_parallelize(copy.deepcopy(ref), tp, vocab_parallel=vocab_parallel)
    pipe = pipeline_parallelize(model, pp, n_microbatches=M, schedule=schedule, virtual_stages=virtual_stages)
    _layout(tag, pipe, ref.config.n_layer, None, failures, virtual_stages)
    if pipe.tp_group is not tp or pipe.stage_index != rank // 2:
        failures.append(f"{tag}: stage {pipe.stage_index}, tp_group {pipe.tp_group}")

    ids, labels = _batch(ref.config.vocab_size, 1)  # (the same batch on every rank)
    loss = pipe.step(ids, labels)
    _, ref_loss = ref(ids, labels, return_logits=False)
    ref_loss.backward()
    if pipe.is_last:
        _close(f"{tag}: loss", loss, ref_loss, failures)
    sharded = _check_shards(tag, pipe, ref, tp, "grad", failures)
    if not sharded:
        failures.append(f"{tag}: no tensor-parallel shard on this stage")

    with torch.no_grad():
        logits = pipe.forward(ids)
        both = pipe.forward(ids, labels)
        if pipe.is_last:
            ref_logits, ref_eval = ref(ids, labels)
            _close(f"{tag}: eval logits", logits, ref_logits, failures)
            _close(f"{tag}: eval loss", both[1], ref_eval, failures)

    opt = torch.optim.SGD(pipe.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt.step(), ref_opt.step(), opt.zero_grad(), ref_opt.zero_grad()
    _check_shards(tag, pipe, ref, tp, "value after SGD", failures, values=True)
    ids, labels = _batch(ref.config.vocab_size, 2)
    loss = pipe.step(ids if pipe.is_first else None, labels if pipe.is_last else None)
    _, ref_loss = ref(ids, labels)
    ref_loss.backward()
    if pipe.is_last:
        _close(f"{tag}: loss of step 2", loss, ref_loss, failures)
    _check_shards(f"{tag}: step 2", pipe, ref, tp, "grad", failures)
    torch.optim.AdamW(pipe.parameters(), lr=1e-2).step()
    if ref.config.tie_embeddings and not _tied_copies_equal(pipe, pp):
        failures.append(f"{tag}: the tied embedding's copies differ after AdamW")
    raise_failures(rank, failures)
    return pipe.stage_index, dist.get_rank(tp)


def grid_errors_worker(rank, p):
    """Refusals on the 4-rank grid raise on every rank: a local error on one rank, a disagreement inside one
    pipeline, groups that are not a grid, sequence parallelism, a bad batch on one rank; then a step still runs."""
    from llmkern.parallel import tensor_parallelize

    tp, pp = _grid_groups(rank)
    crossed_tp, crossed_pp = _grid_groups(rank, [[0, 3], [1, 2]], [[0, 1], [2, 3]])  # TP ranks at different stages
    mixed_tp, mixed_pp = _grid_groups(rank, TP_GROUPS, [[0, 3], [1, 2]])  # pipelines mixing TP ranks 0 and 1
    gpt = _reference("gpt-tiny", {}, "torch")

    def tp_model(group=tp):
        return tensor_parallelize(copy.deepcopy(gpt), group)

    out = {}
    out["bad schedule on rank 3"] = _outcome(lambda: pipeline_parallelize(
        tp_model(), pp, n_microbatches=2, schedule="zero-bubble" if rank == 3 else "1f1b"))
    out["n_microbatches differ on rank 2"] = _outcome(lambda: pipeline_parallelize(
        tp_model(), pp, n_microbatches=4 if rank == 2 else 2))
    out["TP group = PP group"] = _outcome(lambda: pipeline_parallelize(tp_model(), tp, n_microbatches=2))
    out["TP ranks at different stages"] = _outcome(lambda: pipeline_parallelize(
        tp_model(crossed_tp), crossed_pp, n_microbatches=2))
    out["pipelines mix TP ranks"] = _outcome(lambda: pipeline_parallelize(tp_model(mixed_tp), mixed_pp,
                                                                          n_microbatches=2))

    def sequence_parallel():
        model = tp_model()
        model.h[0].mlp.up_proj.sequence_parallel = True
        return pipeline_parallelize(model, pp, n_microbatches=2)
    out["sequence parallel"] = _outcome(sequence_parallel)

    pipe = pipeline_parallelize(tp_model(), pp, n_microbatches=2)
    ids, labels = _batch(256, 3, batch=4)
    out["float input_ids on rank 0"] = _outcome(lambda: pipe.step(ids.float() if rank == 0 else ids, labels))
    out["batch differs on rank 1"] = _outcome(lambda: pipe.step(ids[:2] if rank == 1 else ids,
                                                                labels[:2] if rank == 1 else labels))
    loss = pipe.step(ids, labels)  # still usable
    ok = loss is None or bool(torch.isfinite(loss))
    return out, ok, repr(pipe)


# ---- tests --------------------------------------------------------------------------------------

CASES_2 = [  # (name, config overrides, schedule, backend, stages, gradient checkpointing)
    ("gpt-tiny", {}, "1f1b", "torch", None, False),
    ("gpt-tiny", {}, "gpipe", "llmkern", None, True),
    ("llama-tiny", {}, "1f1b", "llmkern", None, False),
    ("llama-tiny", {}, "gpipe", "torch", None, True),
    ("deepseek-v3-tiny", {}, "1f1b", "torch", [1, 2], False),  # MLA + aux-loss-free MoE, an uneven split
]
CASES_4 = [
    ("gpt-tiny", {"n_layer": 4}, "1f1b", "llmkern", None, False),
    ("gpt-tiny", {"n_layer": 5}, "gpipe", "torch", [1, 1, 2, 1], False),
    ("llama-tiny", {"n_layer": 5}, "1f1b", "torch", None, True),  # default split [2, 1, 1, 1]
    ("llama-tiny", {"n_layer": 4}, "gpipe", "llmkern", None, False),
    ("mixtral-tiny", {"n_layer": 4}, "1f1b", "torch", None, False),
]


CASES_INTERLEAVED_2 = [  # (... as above, v): v model chunks per rank
    ("gpt-tiny", {"n_layer": 4}, "interleaved-1f1b", "torch", None, False, 2),  # rank 0: blocks 0, 2; rank 1: 1, 3
    ("llama-tiny", {"n_layer": 7}, "interleaved-1f1b", "llmkern", None, True, 3),  # uneven: [2, 1, 1, 1, 1, 1]
]
CASES_INTERLEAVED_4 = [
    ("gpt-tiny", {"n_layer": 8}, "interleaved-1f1b", "llmkern", None, False, 2),
    ("llama-tiny", {"n_layer": 9}, "interleaved-1f1b", "torch", [1, 1, 1, 1, 2, 1, 1, 1], False, 2),
]


def _id(case):
    name, overrides, schedule, backend, stages, ckpt = case[:6]
    return "-".join([name, *(f"{k}{v}" for k, v in overrides.items()), schedule, backend] +
                    (["stages"] if stages else []) + (["ckpt"] if ckpt else []) +
                    ([f"v{case[6]}"] if len(case) > 6 else []))


@pytest.mark.parametrize("case", CASES_2, ids=_id)
def test_pipeline_equals_unsharded_2_ranks(pool2, case):
    assert pool2.run(step_worker, case, timeout=60) == [0, 1]


@pytest.mark.parametrize("case", CASES_4, ids=_id)
def test_pipeline_equals_unsharded_4_ranks(pool4, case):
    assert pool4.run(step_worker, case, timeout=60) == [0, 1, 2, 3]


@pytest.mark.parametrize("case", CASES_INTERLEAVED_2, ids=_id)
def test_interleaved_equals_unsharded_2_ranks(pool2, case):
    assert pool2.run(step_worker, case[:6] + (None, case[6]), timeout=60) == [0, 1]


@pytest.mark.parametrize("case", CASES_INTERLEAVED_4, ids=_id)
def test_interleaved_equals_unsharded_4_ranks(pool4, case):
    assert pool4.run(step_worker, case[:6] + (None, case[6]), timeout=60) == [0, 1, 2, 3]


GRID_CASES = [  # (name, config overrides, schedule, backend, vocab_parallel, virtual_stages) on TP = 2 x PP = 2
    ("gpt-tiny", {}, "1f1b", "torch", False, 1),  # tied: the copies' gradients summed between matching TP ranks
    ("gpt-tiny", {"n_layer": 3}, "gpipe", "llmkern", True, 1),  # vocab-parallel tied embedding and head
    ("llama-tiny", {}, "1f1b", "llmkern", False, 1),  # GQA: 4 query heads, 2 key / value heads
    ("llama-tiny", {}, "gpipe", "torch", False, 1),
    ("gpt-tiny", {"n_layer": 4}, "interleaved-1f1b", "torch", False, 2),
]


def _grid_id(case):
    name, overrides, schedule, backend, vocab, v = case
    return "-".join([name, *(f"{k}{x}" for k, x in overrides.items()), schedule, backend] +
                    (["vocab_parallel"] if vocab else []) + ([f"v{v}"] if v > 1 else []))


@pytest.mark.parametrize("case", GRID_CASES, ids=_grid_id)
def test_tensor_parallel_stages_equal_unsharded_4_ranks(pool4, case):
    """Megatron's TP x PP grid: tensor_parallelize over [0, 1] / [2, 3], then pipeline_parallelize over [0, 2] /
    [1, 3]: (pipeline stage, tensor-parallel rank) per global rank."""
    assert pool4.run(grid_worker, case, timeout=60) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_tensor_parallel_stages_errors_on_every_rank(pool4):
    results = pool4.run(grid_errors_worker, timeout=90)
    expect = {  # case: (phrase in every rank's message, or None)
        "bad schedule on rank 3": None,
        "n_microbatches differ on rank 2": None,
        "TP group = PP group": "form a grid",
        "TP ranks at different stages": "form a grid",
        "pipelines mix TP ranks": "disagree",
        "sequence parallel": "sequence parallelism",
        "float input_ids on rank 0": None,
        "batch differs on rank 1": None,
    }
    for case, phrase in expect.items():
        got = [out[case] for out, _, _ in results]
        assert all(g is not None for g in got), f"{case}: not refused on every rank: {got}"
        if phrase is not None:
            assert all(phrase in g[1] for g in got), f"{case}: {got}"
    outs = [out for out, _, _ in results]
    assert outs[3]["bad schedule on rank 3"][0] == "ValueError" and "schedule" in outs[3]["bad schedule on rank 3"][1]
    assert "tensor-parallel rank(s) [1]" in outs[2]["bad schedule on rank 3"][1]  # rank 2 hears it from rank 3
    assert "disagree" in outs[0]["n_microbatches differ on rank 2"][1]
    assert "input_ids must be an integer tensor" in outs[0]["float input_ids on rank 0"][1]
    assert "one shape" in outs[3]["batch differs on rank 1"][1]
    assert all(ok for _, ok, _ in results)
    assert "tensor-parallel rank 1 of 2" in results[1][2]


def test_two_pipelines_on_subgroups(pool4):
    """Two 2-stage pipelines on the groups [0, 1] and [2, 3] (a 2 x 2 pipeline x data mesh without the data
    parallel reduction): the group ranks, not the global ones, pick the stages and the tied-weight peer."""
    case = ("gpt-tiny", {}, "1f1b", "torch", None, False)
    assert pool4.run(step_worker, case + ([[0, 1], [2, 3]],), timeout=60) == [0, 1, 0, 1]


def test_pipeline_errors_on_every_rank(pool2):
    results = pool2.run(errors_worker, timeout=90)
    expect = {  # case: (rank 0's exception, rank 1's, a phrase both messages hold or None)
        "not a zoo model": ("TypeError", "TypeError", "llmkern.models"),
        "not a zoo model on rank 1": ("ValueError", "TypeError", None),
        "models differ": ("ValueError", "ValueError", "disagree"),
        "schedule": ("ValueError", "ValueError", "schedule"),
        "stages": ("ValueError", "ValueError", "stages"),
        "1f1b micro-batches": ("ValueError", "ValueError", "n_microbatches"),
        "n_microbatches type": ("ValueError", "ValueError", "n_microbatches"),
        "tensor-parallel over the pipeline group": ("ValueError", "ValueError", "form a grid"),
        "interleaved, virtual_stages=1": ("ValueError", "ValueError", "virtual_stages >= 2"),
        "virtual_stages without interleaving": ("ValueError", "ValueError", "needs schedule='interleaved-1f1b'"),
        "interleaved micro-batches": ("ValueError", "ValueError", "multiple of the number of pipeline ranks (2)"),
        "interleaved chunks": ("ValueError", "ValueError", "4 model chunks (virtual_stages=2 x 2 ranks)"),
        "interleaved stages": ("ValueError", "ValueError", "each of the 4 model chunks'"),
        "virtual_stages on rank 1": ("ValueError", "ValueError", "disagree"),
        "expert-parallel": ("ValueError", "ValueError", "expert"),
        "aux loss": ("ValueError", "ValueError", "router_aux_loss_coef"),
        "capacity factor": ("ValueError", "ValueError", "moe_capacity_factor"),
        "token id out of range": ("ValueError", "ValueError", None),
        "label out of range": ("ValueError", "ValueError", None),
        "calling the model": ("RuntimeError", "RuntimeError", "pipeline-parallel"),
        "parallelize twice": ("ValueError", "ValueError", "already"),
        "batch not divisible": ("ValueError", "ValueError", "n_microbatches=2 must divide the batch size 3"),
        "no labels on the last rank": ("ValueError", "ValueError", None),
        "shapes differ": ("ValueError", "ValueError", "one shape"),
        "float input_ids": ("ValueError", "ValueError", None),
        "too long": ("ValueError", "ValueError", "block_size"),
        "step under no_grad": ("RuntimeError", "RuntimeError", "torch.no_grad"),
        "one tied copy frozen": ("ValueError", "ValueError", "freeze or unfreeze them together"),
    }
    (out0, unchanged0, ok0, repr0), (out1, unchanged1, ok1, repr1) = results
    assert unchanged0 and unchanged1, "a refused model was changed"
    assert ok0 and ok1
    assert "stage 0 of 2" in repr0 and "LM head" in repr1
    for case, (t0, t1, phrase) in expect.items():
        got = (out0[case], out1[case])
        assert got[0] is not None and got[1] is not None, f"{case}: not refused on every rank: {got}"
        assert (got[0][0], got[1][0]) == (t0, t1), f"{case}: {got}"
        if phrase is not None:
            assert phrase in got[0][1] and phrase in got[1][1], f"{case}: {got}"
    # a rank that did not fail itself names the one that did
    assert "rank(s) [1]" in out0["not a zoo model on rank 1"][1]
    assert "needs labels" in out1["no labels on the last rank"][1]
    assert "rank(s) [1]" in out0["no labels on the last rank"][1]
    assert "input_ids must be an integer tensor" in out0["float input_ids"][1]
    assert "rank(s) [0]" in out1["float input_ids"][1]
    assert "input_ids must lie in [0, 256)" in out0["token id out of range"][1]
    assert "rank(s) [0]" in out1["token id out of range"][1]
    assert "labels must lie in [0, 256) (the vocabulary) or be -100" in out1["label out of range"][1]


def lora_tied_head_worker(rank, p):
    """GPT (tied wte / lm_head) with LoRA on lm_head as well: the last stage's copy lives in the LoRA layer's base
    layer; loss and every gradient (the LoRA factors') equal the unsharded model's."""
    from llmkern.peft.lora import inject_lora

    failures, tag = [], f"gpt-tiny LoRA on lm_head rank={rank}"
    ref = _reference("gpt-tiny", {}, "torch")
    inject_lora(ref, ("q_proj", "v_proj", "lm_head"), r=4)
    for name, param in ref.named_parameters():  # (B starts at zero: give the factors values)
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    pipe = pipeline_parallelize(copy.deepcopy(ref), n_microbatches=2, schedule="gpipe")
    ids, labels = _batch(ref.config.vocab_size, 5, batch=4)
    loss = pipe.step(ids, labels)
    _, ref_loss = ref(ids, labels)
    ref_loss.backward()
    if pipe.is_last:
        _close(f"{tag}: loss", loss, ref_loss, failures)
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    trained = [(n, prm) for n, prm in pipe.named_parameters() if prm.requires_grad]
    if not any("lora_A" in n for n, _ in trained):
        failures.append(f"{tag}: no LoRA factor on this stage: {[n for n, _ in trained]}")
    for name, prm in trained:
        if prm.grad is None:
            failures.append(f"{tag}: {name} has no gradient")
        else:
            _close(f"{tag}: grad of {name}", prm.grad, ref_params[name].grad, failures)
    raise_failures(rank, failures)
    return pipe.stage_index


def test_tied_embeddings_with_lora_on_the_head(pool2):
    assert pool2.run(lora_tied_head_worker, timeout=60) == [0, 1]


def loss_scale_worker(rank, p):
    """step(loss_scale=S): every stage's gradients are S times the unscaled step's (as after
    GradScaler.scale(loss).backward()), the returned loss the unscaled one; a bad scale raises on every rank."""
    failures, tag = [], f"loss_scale rank={rank}"
    ref = _reference("llama-tiny", {}, "torch")
    ids, labels = _batch(ref.config.vocab_size, 3, batch=4)
    plain = pipeline_parallelize(copy.deepcopy(ref), n_microbatches=2, schedule="1f1b")
    scaled = pipeline_parallelize(copy.deepcopy(ref), n_microbatches=2, schedule="1f1b")
    loss = plain.step(ids, labels)
    loss_s = scaled.step(ids, labels, loss_scale=torch.tensor(1024.0))
    if plain.is_last:
        _close(f"{tag}: loss", loss_s, loss, failures)
    for (name, a), (_, b) in zip(plain.named_parameters(), scaled.named_parameters()):
        _close(f"{tag}: grad of {name}", b.grad / 1024, a.grad, failures)
    # (only the last rank reads it: the others must raise too, not hang; a tensor's value was not checked)
    for bad in (-1.0, torch.tensor(-1.0), torch.tensor(0.0), torch.tensor(float("nan"))):
        try:
            scaled.step(ids, labels, loss_scale=bad if rank == p - 1 else 2.0)
            failures.append(f"{tag}: loss_scale={bad} was accepted")
        except ValueError as exc:  # (the other ranks' error points to the last rank's, which names the argument)
            if "loss_scale" not in str(exc) and rank == p - 1:
                failures.append(f"{tag}: {exc}")
    raise_failures(rank, failures)
    return True


def test_pipeline_loss_scale(pool2):
    assert pool2.run(loss_scale_worker, timeout=90) == [True, True]


def test_more_ranks_than_blocks(pool4):
    for got in pool4.run(too_many_ranks_worker, timeout=60):
        assert got is not None and got[0] == "ValueError" and "4 ranks but the model has 2 blocks" in got[1]


def test_split_layers():
    assert split_layers(5, 4) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert split_layers(8, 2) == [(0, 4), (4, 8)]
    assert split_layers(5, 2, [1, 4]) == [(0, 1), (1, 5)]
    # interleaved: v * p chunks in pipeline order (rank r holds chunks r, r + p, ...)
    assert split_layers(7, 2, virtual_stages=3) == [(0, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7)]
    assert split_layers(6, 2, [1, 2, 2, 1], virtual_stages=2) == [(0, 1), (1, 3), (3, 5), (5, 6)]
    with pytest.raises(ValueError, match="4 model chunks"):
        split_layers(6, 2, [3, 3], virtual_stages=2)
    with pytest.raises(ValueError, match="every chunk needs at least one block"):
        split_layers(3, 2, virtual_stages=2)
    for bad in ([2, 2, 1], [5, 0], [2.5, 2.5], (3, 3), "23"):
        with pytest.raises(ValueError, match="stages"):
            split_layers(5, 2, bad)
    with pytest.raises(ValueError, match="blocks"):
        split_layers(3, 4)


def test_pipeline_parallelize_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="process group"):
        pipeline_parallelize(build("gpt-tiny", backend="torch"), n_microbatches=2)
    assert issubclass(PipelineParallel, object)


def float64_worker(rank, p):
    """A float64 model: the micro-batch weights n_j / N were int64 / int64 = float32 (1/3 rounded: gradients
    1e-7 off) and the returned loss float32."""
    import copy

    from llmkern.models import build, get_config
    from llmkern.parallel.pipeline import pipeline_parallelize

    torch.manual_seed(0)
    ref = build(get_config("llama-tiny", n_layer=2), backend="torch").double()
    pipe = pipeline_parallelize(copy.deepcopy(ref), n_microbatches=3, schedule="gpipe")
    ids = torch.randint(0, ref.config.vocab_size, (6, 8), generator=torch.Generator().manual_seed(1))
    loss = pipe.step(ids, ids)
    _, want = ref(ids, ids, return_logits=False)
    want.backward()
    refp = dict(ref.named_parameters())
    worst = max(((q.grad - refp[n].grad).abs().max() / refp[n].grad.abs().max()).item()
                for n, q in pipe.named_parameters())
    return worst, None if loss is None else (loss.dtype, abs(loss.item() - want.item()))


def test_float64_pipeline_is_float64_exact(pool2):
    out = pool2.run(float64_worker, timeout=90)
    assert all(worst < 1e-12 for worst, _ in out), out
    dtype, err = next(r for _, r in out if r is not None)
    assert dtype == torch.float64 and err < 1e-12, out


# ---- NeoX (GPT-NeoX / Phi) on a TP = 2 x PP = 2 grid: an unsharded checkpoint loaded into the stages' shards ----

def _full_equal(tag, model, ref, failures, tol=None):
    """full_state_dict of this stage (gathered over its tensor-parallel ranks) against the unsharded model's."""
    from llmkern.parallel import full_state_dict
    from llmkern.testing import collect_close

    want = ref.state_dict()
    for key, value in full_state_dict(model, rank0_only=False).items():
        collect_close(f"{tag}: {key}", value, want[key], failures, **(tol or dict(atol=0, rtol=0)))


def _grid_full_load(tag, tp, pp, options, lora, failures):
    """The unsharded state_dict (a tied head stored once) loaded into each TP x PP stage's shards by
    load_full_state_dict, then a 1F1B step and an SGD step equal to the unsharded model's."""
    from llmkern.parallel import load_full_state_dict, tensor_parallelize
    from llmkern.peft import inject_lora
    from llmkern.testing import call_outcome, collect_close

    from test_pipeline_neox_audit26 import TOL, _batch, _reference

    ref, other = _reference("neox-tiny", options), _reference("neox-tiny", options, seed=7)
    if lora:  # (layers sharded from LoRA wrappers: a full checkpoint names them base_layer.weight, lora_A...)
        for m in (ref, other):
            inject_lora(m, ["q_proj", "up_proj"], r=2, init_lora_weights=False)
    tied = ref.config.tie_embeddings
    full = {k: v.clone() for k, v in ref.state_dict().items() if not (tied and k == "lm_head.weight")}
    pipe = pipeline_parallelize(tensor_parallelize(other, tp, vocab_parallel=True), pp, n_microbatches=2,
                                schedule="1f1b")
    result = call_outcome(lambda: load_full_state_dict(pipe.model, full))
    if result is not None:
        failures.append(f"{tag}: load_full_state_dict raised {result}")
    _full_equal(f"{tag}: loaded", pipe.model, ref, failures)
    ids, labels = _batch(ref.config.vocab_size, 1)
    loss = pipe.step(ids, labels)
    _, ref_loss = ref(ids, labels, return_logits=False)
    ref_loss.backward()
    if pipe.is_last:
        collect_close(f"{tag}: loss", loss, ref_loss, failures, **TOL)
    for opt in (torch.optim.SGD(pipe.parameters(), lr=1.0), torch.optim.SGD(ref.parameters(), lr=1.0)):
        opt.step()
    _full_equal(f"{tag}: after an SGD step", pipe.model, ref, failures, TOL)


def neox_grid_worker(rank, p):
    from test_pipeline_neox_audit26 import PHI, PYTHIA

    from llmkern.testing import raise_failures

    failures = []
    tp, pp = _grid_groups(rank)
    _grid_full_load("TP x PP phi (tied, vocab-parallel head with bias)", tp, pp, PHI, False, failures)
    _grid_full_load("TP x PP pythia + LoRA", tp, pp, PYTHIA, True, failures)
    raise_failures(rank, failures)
    return rank


def test_neox_tensor_and_pipeline_parallel_full_checkpoint(pool4):
    assert pool4.run(neox_grid_worker, timeout=60) == [0, 1, 2, 3]
