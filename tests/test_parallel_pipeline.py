"""Pipeline parallelism (llmkern.parallel.pipeline): the zoo models cut into stages over 2 and 4 ranks, against the
unsharded model (single process, same weights) on the whole batch.

The ranks are gloo processes on 127.0.0.1 (llmkern.parallel.launch.RankPool, one pool of 2 ranks and one of 4 per
module). Every rank builds the same model from one seed and keeps a deep copy as the reference. A pipelined step
over m micro-batches must give the unsharded full-batch loss (the mean over the valid tokens of the whole batch)
and, for each parameter this rank's stage holds (by its unsharded name), the unsharded gradient: float32, 1e-5.
The labels ignore (-100) a whole micro-batch, most of another and a random 30% of a third, so a mean of
micro-batch means would differ. GPT ties wte and lm_head: the first and last stage hold copies whose gradients
must both be the unsharded (summed) one, and stay bitwise equal through optimizer steps.
"""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from llmkern.models import build, get_config
from llmkern.parallel.launch import RankPool
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


def _layout(tag, pipe, n_layer, stages, failures):
    """The stage holds exactly its blocks (by global index), the embeddings on the first, the head on the last."""
    bounds = split_layers(n_layer, pipe.num_stages, stages)
    model = pipe.model
    blocks = model.h if hasattr(model, "h") else model.layers
    want = [str(i) for i in range(*bounds[pipe.stage_index])]
    if list(blocks.keys()) != want:
        failures.append(f"{tag}: stage {pipe.stage_index} holds blocks {list(blocks.keys())}, expected {want}")
    emb = model.wte if hasattr(model, "h") else model.embed_tokens
    if (emb is not None) != pipe.is_first or (model.lm_head is not None) != pipe.is_last:
        failures.append(f"{tag}: stage {pipe.stage_index}: embeddings / LM head on the wrong stages")


# ---- workers ------------------------------------------------------------------------------------

def step_worker(rank, p, name, overrides, schedule, backend, stages, checkpointing, group_ranks=None):
    """A pipelined step (loss, every gradient), the evaluation forward (logits; loss with labels, fused and not),
    an SGD step (parameters), two accumulated steps, and AdamW keeping the tied copies equal. group_ranks: the
    pipelines' rank lists (several pipelines on subgroups of WORLD), else one over WORLD."""
    failures = []
    group, seed = None, 1
    if group_ranks is not None:
        groups = [dist.new_group(r) for r in group_ranks]  # (every rank creates every group)
        which = next(i for i, r in enumerate(group_ranks) if rank in r)
        group, seed = groups[which], 10 + which  # each pipeline its own batches
    tag = f"{name} {overrides} {schedule} {backend} stages={stages} ckpt={checkpointing} p={p} rank={rank}"
    ref = _reference(name, overrides, backend, checkpointing)
    n_layer = ref.config.n_layer
    pipe = pipeline_parallelize(copy.deepcopy(ref), group, n_microbatches=M, schedule=schedule, stages=stages)
    _layout(tag, pipe, n_layer, stages, failures)
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
    out["tensor-parallel"] = _outcome(lambda: pipeline_parallelize(tensor_parallelize(fresh()), n_microbatches=2))
    moe = _reference("mixtral-tiny", {}, "torch")
    out["expert-parallel"] = _outcome(lambda: pipeline_parallelize(expert_parallelize(copy.deepcopy(moe)),
                                                                   n_microbatches=2))
    aux = _reference("mixtral-tiny", {"router_aux_loss_coef": 0.02}, "torch")
    out["aux loss"] = _outcome(lambda: pipeline_parallelize(aux, n_microbatches=2))
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

    def no_grad_step():
        with torch.no_grad():
            pipe.step(ids, labels)
    out["step under no_grad"] = _outcome(no_grad_step)
    loss = pipe.step(ids, labels)  # still usable
    ok = loss is None or bool(torch.isfinite(loss))
    return out, unchanged, ok, repr(pipe)


def too_many_ranks_worker(rank, p):
    return _outcome(lambda: pipeline_parallelize(_reference("gpt-tiny", {}, "torch"), n_microbatches=4))


# ---- tests --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool2():
    p = RankPool(2, pg_timeout=30.0)
    yield p
    p.close()


@pytest.fixture(scope="module")
def pool4():
    p = RankPool(4, pg_timeout=30.0)
    yield p
    p.close()


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


def _id(case):
    name, overrides, schedule, backend, stages, ckpt = case
    return "-".join([name, *(f"{k}{v}" for k, v in overrides.items()), schedule, backend] +
                    (["stages"] if stages else []) + (["ckpt"] if ckpt else []))


@pytest.mark.parametrize("case", CASES_2, ids=_id)
def test_pipeline_equals_unsharded_2_ranks(pool2, case):
    assert pool2.run(step_worker, case, timeout=60) == [0, 1]


@pytest.mark.parametrize("case", CASES_4, ids=_id)
def test_pipeline_equals_unsharded_4_ranks(pool4, case):
    assert pool4.run(step_worker, case, timeout=60) == [0, 1, 2, 3]


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
        "tensor-parallel": ("ValueError", "ValueError", "tensor"),
        "expert-parallel": ("ValueError", "ValueError", "expert"),
        "aux loss": ("ValueError", "ValueError", "router_aux_loss_coef"),
        "calling the model": ("RuntimeError", "RuntimeError", "pipeline-parallel"),
        "parallelize twice": ("ValueError", "ValueError", "already"),
        "batch not divisible": ("ValueError", "ValueError", "n_microbatches=2 must divide the batch size 3"),
        "no labels on the last rank": ("ValueError", "ValueError", None),
        "shapes differ": ("ValueError", "ValueError", "one shape"),
        "float input_ids": ("ValueError", "ValueError", None),
        "too long": ("ValueError", "ValueError", "block_size"),
        "step under no_grad": ("RuntimeError", "RuntimeError", "torch.no_grad"),
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


def test_more_ranks_than_blocks(pool4):
    for got in pool4.run(too_many_ranks_worker, timeout=60):
        assert got is not None and got[0] == "ValueError" and "4 ranks but the model has 2 blocks" in got[1]


def test_split_layers():
    assert split_layers(5, 4) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert split_layers(8, 2) == [(0, 4), (4, 8)]
    assert split_layers(5, 2, [1, 4]) == [(0, 1), (1, 5)]
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
