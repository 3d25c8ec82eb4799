"""Bad arguments to llmkern.parallel's public API: a clear error naming the argument (ValueError / TypeError),
raised before anything is changed (a model handed to *_parallelize is left as it was) and on every rank when the
problem is on one only (no hang); never a raw error from inside torch, a silently wrong result (a string flag read
as True, an out-of-range dim wrapped onto another one) or a half-changed model.

Most cases run in this process, on a process group of one rank (gloo, in-memory store: no processes to start);
the cost model and the launch helpers' argument checks need no group at all. One task on a pool of 2 spawned
gloo ranks covers what needs two ranks: sizes that the world size does not divide, and arguments bad on one rank
only. (Companion of tests/test_bad_arguments.py, which audits the ops.) Each case that was a bug says so (what the
old code did) after `# was:`.
"""
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from llmkern.parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead,
                              all_reduce_gradients, context_parallel_positions, context_parallelize, cost_model,
                              gather_sequence, launch, shard_sequence, tensor_parallelize)

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)


def _raises(exc, *words):
    """pytest.raises(exc) whose message names every one of `words`."""
    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *a):
            handled = self.ctx.__exit__(*a)  # (raises when nothing was raised; False: another exception, raised on)
            if handled:
                msg = str(self.info.value)
                for w in words:
                    assert w in msg, f"{w!r} not in {msg!r}"
            return handled
    return _Check()


# ---- small models (top level: the spawned ranks import them) -------------------------------------------------------

class MLP(nn.Module):
    def __init__(self, d=4, f=8):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        return self.down_proj(self.up_proj(x))


class TinyLM(nn.Module):
    def __init__(self, f=8):
        super().__init__()
        self.embed_tokens, self.mlp, self.lm_head = nn.Embedding(10, 4), MLP(4, f), nn.Linear(4, 10)

    def forward(self, ids):
        return self.lm_head(self.mlp(self.embed_tokens(ids)))


def _snapshot(model):
    """(module types, parameter values) of a model: equal before and after a refusal."""
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    types, state = _snapshot(model)
    return types == snap[0] and state.keys() == snap[1].keys() and \
        all(torch.equal(state[k], snap[1][k]) for k in state)


def _zoo(name="llama-tiny", **kw):
    from llmkern.models import Llama
    from llmkern.models.configs import get_config

    torch.manual_seed(0)
    return Llama(get_config(name, n_layer=2, **kw), backend="torch")


# ---- without a process group (these run first: the fixture below starts one for the rest of the module) -----------

def test_no_process_group_is_a_clear_error_and_the_model_is_unchanged():
    if dist.is_initialized():
        pytest.skip("a process group is up in this process already")
    with _raises(RuntimeError, "ColumnParallelLinear", "no process group"):
        ColumnParallelLinear(4, 4)
    m = TinyLM()
    snap = _snapshot(m)
    with _raises(RuntimeError, "tensor_parallelize", "no process group"):
        tensor_parallelize(m)
    assert _same(m, snap)
    with _raises(RuntimeError, "shard_sequence", "no process group"):
        shard_sequence(torch.zeros(1, 4))


# ---- one rank, in this process ---------------------------------------------------------------------------------------

# (world1, a one-rank group in this process: tests/conftest.py)


BAD_GROUPS = ["WORLD", 0, object()]


@pytest.mark.parametrize("group", BAD_GROUPS, ids=["str", "int", "object"])
def test_a_group_that_is_not_a_process_group_is_a_type_error(world1, group):
    # was: AttributeError "'str' object has no attribute 'size'" from inside torch.distributed
    m = TinyLM()
    snap = _snapshot(m)
    calls = [
        ("ColumnParallelLinear", lambda: ColumnParallelLinear(4, 4, group=group)),
        ("RowParallelLinear", lambda: RowParallelLinear(4, 4, group=group)),
        ("ColumnParallelLinear", lambda: ColumnParallelLinear.from_linear(nn.Linear(4, 4), group)),
        ("tensor_parallelize", lambda: tensor_parallelize(m, group)),
        ("VocabParallelEmbedding", lambda: VocabParallelEmbedding.from_embedding(nn.Embedding(10, 4), group)),
        ("shard_sequence", lambda: shard_sequence(torch.zeros(1, 4), group)),
        ("all_reduce_gradients", lambda: all_reduce_gradients(m, group)),
    ]
    for what, call in calls:
        with _raises(TypeError, what, "group", "ProcessGroup"):
            call()
    assert _same(m, snap)


@pytest.mark.parametrize("cls", [ColumnParallelLinear, RowParallelLinear])
def test_parallel_linear_sizes_and_flags(world1, cls):
    name = cls.__name__
    for bad in ("4", 2.5, 4.0, True, 0, -1):
        with _raises(ValueError, name, "in_features"):
            cls(bad, 4)
        with _raises(ValueError, name, "out_features"):
            cls(4, bad)
    assert cls(np.int64(4), np.int64(6)).out_features == 6
    for kw, word in ((dict(overlap="nope"), "overlap"), (dict(overlap=None), "overlap"), (dict(chunks=2.5), "chunks"),
                     (dict(pieces=0), "pieces"), (dict(transport="x"), "transport"),
                     (dict(sequence_parallel="False"), "sequence_parallel")):
        with _raises(ValueError, name, word):
            cls(4, 4, **kw)
    flag = "gather_output" if cls is ColumnParallelLinear else "input_is_parallel"
    for bad in ("False", 1, np.int64(0)):  # (an int is no flag here)
        with _raises(ValueError, name, flag):
            cls(4, 4, **{flag: bad})
    # was: "must be True or False" for a numpy bool or a one-element bool tensor (bool_arg's bools)
    assert getattr(cls(4, 4, **{flag: np.bool_(True)}), flag) is True
    assert cls(4, 4, sequence_parallel=torch.tensor(False), **{flag: True}).sequence_parallel is False
    # was: bias="False" (any non-empty string, a list) made a bias, silently
    for bad in ("False", "no", [False]):
        with _raises(TypeError, name, "bias"):
            cls(4, 4, bias=bad)
    for off in (False, None, 0, np.bool_(False)):  # (None: no bias, as nn.Linear reads it)
        assert cls(4, 4, bias=off).bias is None
    assert cls(4, 4, bias=np.bool_(True)).bias is not None


def test_from_linear_arguments(world1):
    lin = nn.Linear(4, 4)
    # was: [0, 4] and [-2, 6] accepted (a negative segment takes rows off the end), [2.5, 1.5] said "not divisible by
    # the world size 1", a string failed in sum()
    for bad in ([2.5, 1.5], [0, 4], [-2, 6], "4", [3], [True, 3]):
        with _raises(ValueError, "from_linear", "segments"):
            ColumnParallelLinear.from_linear(lin, segments=bad)
    assert ColumnParallelLinear.from_linear(lin, segments=[2, 2]).segments == [2, 2]
    assert ColumnParallelLinear.from_linear(lin, segments=(np.int64(4),)).segments == [4]
    # was: skip_init's "got multiple values for keyword argument 'bias'"
    for cls in (ColumnParallelLinear, RowParallelLinear):
        for kw in (dict(bias=False), dict(in_features=4), dict(dtype=torch.float64)):
            with _raises(TypeError, "from_linear", next(iter(kw))):
                cls.from_linear(lin, **kw)
    with _raises(TypeError, "from_linear", "nn.Linear"):
        RowParallelLinear.from_linear(nn.Conv1d(2, 2, 1))


def test_tensor_parallelize_refusals_leave_the_model_unchanged(world1):
    for bad in (None, [nn.Linear(2, 2)], "model"):  # was: AttributeError 'NoneType' object has no attribute 'modules'
        with _raises(TypeError, "tensor_parallelize", "model"):
            tensor_parallelize(bad)
    cases = [(dict(vocab_parallel="False"), TypeError, "vocab_parallel"),  # was: "False" sharded the vocabulary
             (dict(vocab_parallel="yes"), TypeError, "vocab_parallel"),
             (dict(vocab_parallel=None), TypeError, "vocab_parallel"),
             (dict(overlap="nope"), ValueError, "overlap"), (dict(chunks=0), ValueError, "chunks"),
             (dict(transport="x"), ValueError, "transport")]
    for kw, exc, word in cases:
        m = TinyLM()
        snap = _snapshot(m)
        with _raises(exc, "tensor_parallelize", word):
            tensor_parallelize(m, **kw)
        assert _same(m, snap), kw
    m = tensor_parallelize(TinyLM(), vocab_parallel=np.bool_(False))
    assert type(m.embed_tokens) is nn.Embedding and isinstance(m.mlp.up_proj, ColumnParallelLinear)


def test_vocab_parallel_arguments(world1):
    for bad in (None, nn.Linear(2, 2)):  # was: AttributeError ... has no attribute 'max_norm'
        with _raises(TypeError, "from_embedding", "emb"):
            VocabParallelEmbedding.from_embedding(bad)
    for bad in (None, nn.Embedding(3, 3)):  # was: AttributeError ... has no attribute 'weight' / 'bias'
        with _raises(TypeError, "from_linear", "linear"):
            VocabParallelLMHead.from_linear(bad)
    with _raises(ValueError, "VocabParallelLMHead", "bias_shard"):  # was: AttributeError 'float' ... 'shape'
        VocabParallelLMHead(nn.Parameter(torch.randn(10, 4)), 3.0, 10, None)
    emb = VocabParallelEmbedding.from_embedding(nn.Embedding(10, 4))
    for bad in (torch.tensor([1.0, 2.0]), [1, 2], torch.tensor([True])):  # was: raw errors from F.embedding / '>='
        with _raises(TypeError, "VocabParallelEmbedding", "ids"):
            emb(bad)
    torch.manual_seed(0)
    lin = nn.Linear(4, 10)
    head = VocabParallelLMHead.from_linear(lin)
    h, labels = torch.randn(3, 4), torch.tensor([1, 2, 3])
    with _raises(TypeError, "VocabParallelLMHead", "h"):  # was: AttributeError 'str' object has no attribute 'view_as'
        head("x")
    with _raises(ValueError, "VocabParallelLMHead", "h"):  # was: RuntimeError mat1 and mat2 shapes cannot be multiplied
        head(torch.randn(3, 5))
    for bad in (labels.float(), labels.bool(), [1, 2, 3]):  # was: gather()'s dtype error, a bool subtraction error
        with _raises(TypeError, "vocab_parallel_loss", "labels"):
            head.vocab_parallel_loss(h, bad)
    with _raises(TypeError, "vocab_parallel_loss", "h"):
        head.vocab_parallel_loss(h.tolist(), labels)
    # was: "x" and None failed with "'int' object has no attribute 'sum'"; 2.5 matched no label and ignored nothing
    for bad in ("x", None, 2.5, True, float("nan")):
        with _raises(TypeError, "vocab_parallel_loss", "ignore_index"):
            head.vocab_parallel_loss(h, labels, ignore_index=bad)
    want = torch.nn.functional.cross_entropy(lin(h), labels, ignore_index=1)
    for ok in (1, 1.0, np.int64(1)):
        torch.testing.assert_close(head.vocab_parallel_loss(h, labels, ignore_index=ok), want)


def test_context_parallel_arguments(world1):
    x = torch.arange(24.).view(2, 4, 3)
    # was: dim % x.dim(): dim=4 of a 3-D tensor sharded dim 1, silently; 1.5 / "1" failed deep inside
    for bad in (4, -4, 3, 1.5, "1", True):
        with _raises(ValueError, "shard_sequence", "dim"):
            shard_sequence(x, dim=bad)
        with _raises(ValueError, "gather_sequence", "dim"):
            gather_sequence(x, dim=bad)
    assert torch.equal(shard_sequence(x, dim=-2), x) and torch.equal(shard_sequence(x, dim=np.int64(1)), x)
    with _raises(TypeError, "shard_sequence", "x"):
        shard_sequence([1, 2], dim=0)
    with _raises(TypeError, "gather_sequence", "reduce_grad"):  # was: bool("False"), True
        gather_sequence(x, reduce_grad="False")
    assert torch.equal(gather_sequence(x, reduce_grad=np.bool_(False)), x)
    # was: 4.0 failed in narrow(), "4" in a string format, -2 in arange()
    for bad in (4.0, 2.5, "4", -2, True, None):
        with _raises(ValueError, "context_parallel_positions", "T_global"):
            context_parallel_positions(bad)
    assert context_parallel_positions(np.int64(4)).tolist() == [0, 1, 2, 3]
    assert context_parallel_positions(0).tolist() == []
    with _raises(ValueError, "layout"):
        context_parallel_positions(4, layout="zz")
    for bad in (None, nn.Linear(2, 2)):
        with _raises(TypeError, "context_parallelize"):
            context_parallelize(bad)
    with _raises(TypeError, "all_reduce_gradients", "model"):  # was: returned None
        all_reduce_gradients(None)


def test_expert_and_moe_arguments(world1):
    from llmkern.parallel.expert import all_reduce_replicated_grads, expert_parallelize
    from llmkern.parallel.moe import TensorParallelMoE

    for bad in (None, [1]):  # was: AttributeError 'NoneType' object has no attribute 'named_modules'
        with _raises(TypeError, "expert_parallelize", "model"):
            expert_parallelize(bad)
        with _raises(TypeError, "all_reduce_replicated_grads", "model"):
            all_reduce_replicated_grads(bad)
    m = _zoo("mixtral-tiny")
    snap = _snapshot(m)
    with _raises(TypeError, "expert_parallelize", "group"):
        expert_parallelize(m, group="g")
    assert _same(m, snap)
    moe = next(x for x in m.modules() if type(x).__name__ == "MoE")
    # was: sequence_parallel="False" gave a sequence-parallel layer; shard_shared_expert="False" sharded it
    for kw in (dict(sequence_parallel="False"), dict(shard_shared_expert="False"), dict(sequence_parallel=None)):
        with _raises(TypeError, "TensorParallelMoE", next(iter(kw))):
            TensorParallelMoE.from_moe(moe, **kw)
    with _raises(TypeError, "TensorParallelMoE", "moe"):  # was: AttributeError ... 'n_experts'
        TensorParallelMoE.from_moe(None)
    with _raises(TypeError, "TensorParallelMoE", "overlpa"):  # was: swallowed (no shared expert)
        TensorParallelMoE.from_moe(moe, overlpa="ring")
    assert TensorParallelMoE.from_moe(moe, sequence_parallel=np.bool_(False)).sequence_parallel is False
    assert _same(m, snap)


def test_pipeline_arguments_leave_the_model_unchanged(world1):
    from llmkern.parallel.pipeline import pipeline_parallelize

    cases = [(dict(n_microbatches=2.5), "n_microbatches"), (dict(n_microbatches=0), "n_microbatches"),
             (dict(n_microbatches=True), "n_microbatches"), (dict(n_microbatches="2"), "n_microbatches"),
             (dict(n_microbatches=2, schedule="zb"), "schedule"), (dict(n_microbatches=2, schedule=None), "schedule"),
             (dict(n_microbatches=2, virtual_stages=0), "virtual_stages"),
             (dict(n_microbatches=2, virtual_stages=2.0), "virtual_stages"),
             (dict(n_microbatches=2, stages=[2.0]), "stages"), (dict(n_microbatches=2, stages="2"), "stages")]
    for kw, word in cases:
        m = _zoo()
        snap = _snapshot(m)
        with _raises(ValueError, "pipeline_parallelize", word):
            pipeline_parallelize(m, **kw)
        assert _same(m, snap) and getattr(m, "pipeline_parallel", None) is None, kw
    m = _zoo()
    with _raises(TypeError, "pipeline_parallelize", "group"):
        pipeline_parallelize(m, group="g", n_microbatches=1)
    pipe = pipeline_parallelize(m, n_microbatches=1)
    ids = torch.randint(0, 10, (2, 8))
    with _raises(TypeError, "return_logits"):  # was: "False" returned the logits
        pipe.forward(ids, ids, return_logits="False")
    assert pipe.forward(ids, ids, return_logits=np.bool_(False))[0] is None
    with _raises(ValueError, "loss_scale"):
        pipe.step(ids, ids, loss_scale="2")


# ---- the cost model: pure functions ----------------------------------------------------------------------------------

PREDICT_BAD = [  # (argument, bad values); the old behaviour after each `# was:`
    ("p", [0, -1, True, "8", 2.5]),  # was: ZeroDivisionError, negative times, 1, a TypeError from %
    ("micro_batch", [0, -1, 2.5, "1", None]),  # was: a 0-token step, negative tokens, 2 / 2.5 mixed, MemoryError
    ("seq", [0, -5, 2.5, "2048"]),  # was: 0 taken for the model's length, -5 tokens, 2 tokens
    ("dtype_bytes", [0, -2, "2", float("inf")]),  # was: free or negative communication
    ("gemm_efficiency", [0, -1, float("nan")]),  # was: ZeroDivisionError, negative time, NaN
    ("attention_efficiency", [0, -1]),
    ("link_efficiency", [0, -0.5]),
    ("latency_us", [-1, float("nan")]),  # was: negative latency
    ("chunks", [0, 2.5, "4"]),  # was: 0 taken as 1, 2.5 used as is, "4" ignored under sequence parallelism
    ("overlap_slowdown", [-0.5]),
    ("link_gbps", [0, -1]),  # was: 0 taken for the hardware's figure, -1 a negative bandwidth
    ("hardware", ["X100", None, 3]),  # was: KeyError 'X100', AttributeError
    ("overlap", ["x", None]),
]


@pytest.mark.parametrize("name,values", PREDICT_BAD, ids=[n for n, _ in PREDICT_BAD])
def test_cost_model_predict_bad_arguments(name, values):
    for v in values:
        with _raises(ValueError, name):
            cost_model.predict("gpt3-1.3b", **{"p": 8, name: v})


def test_cost_model_predict_good_and_flag_arguments():
    ref = cost_model.predict("gpt3-1.3b", 8)
    for kw in (dict(p=8.0), dict(p=np.int64(8)), dict(seq=2048.0), dict(seq=np.int32(2048)), dict(micro_batch=1.0),
               dict(link_gbps=None), dict(latency_us=10), dict(gemm_efficiency=np.float32(0.7))):
        r = cost_model.predict("gpt3-1.3b", **{"p": 8, **kw})
        assert r["step_ms"] == pytest.approx(ref["step_ms"]) and r["p"] == 8 and type(r["p"]) is int, kw
    with _raises(TypeError, "sequence_parallel"):  # was: "False" predicted with sequence parallelism
        cost_model.predict("gpt3-1.3b", 8, sequence_parallel="False")
    no_sp = cost_model.predict("gpt3-1.3b", 8, sequence_parallel=False)
    assert cost_model.predict("gpt3-1.3b", 8, sequence_parallel=np.bool_(False)) == no_sp
    with _raises(ValueError, "gpt3-1.3b", "7 ways"):
        cost_model.predict("gpt3-1.3b", 7)
    with _raises(ValueError, "unknown"):
        cost_model.dims("nope")


def test_cost_model_table_arguments():
    # was: a single name was iterated letter by letter (KeyError 'H'); an int micro_batches was not iterable
    assert cost_model.table("gpt3-1.3b", 8, hardware="H100") == cost_model.table("gpt3-1.3b", 8, hardware=("H100",))
    assert cost_model.table("gpt3-1.3b", 8, hardware="H100", micro_batches=4) == \
        cost_model.table("gpt3-1.3b", 8, hardware=["H100"], micro_batches=[4])
    with _raises(ValueError, "hardware", "X100"):
        cost_model.table("gpt3-1.3b", 8, hardware=("H100", "X100"))
    with _raises(ValueError, "micro_batch"):
        cost_model.table("gpt3-1.3b", 8, micro_batches=(0,))
    for kw in ("overlap", "sequence_parallel", "micro_batch"):  # was: predict() got multiple values for 'overlap'
        with _raises(TypeError, "cost_model.table", kw):
            cost_model.table("gpt3-1.3b", 8, **{kw: 1})
    with _raises(ValueError, "p"):
        cost_model.pipeline_bubble_fraction(0, 4)


# ---- the launch helpers: checked before any process starts -----------------------------------------------------------

def _rank_of(rank, world_size):
    return rank


def test_launch_arguments_fail_fast():
    t0 = time.monotonic()
    for bad in (0, -1, "2", 1.5, True):  # was: 0 and -1 returned [] (nothing ran), True started one rank
        with _raises(ValueError, "world_size"):
            launch.spawn(_rank_of, bad)
        with _raises(ValueError, "world_size"):
            launch.RankPool(bad)
    # was: every run failed as "did not finish within 0 s"; 10**400: OverflowError "int too large to convert to float"
    for bad in (0, -1, "5", float("nan"), 10**400):
        with _raises(ValueError, "timeout"):
            launch.spawn(_rank_of, 1, timeout=bad)
    for bad in (-1, 0, "30"):  # was: a negative pg_timeout failed inside the ranks' store
        with _raises(ValueError, "pg_timeout"):
            launch.spawn(_rank_of, 1, pg_timeout=bad)
    with _raises(ValueError, "num_threads"):  # was: set_num_threads's error inside the rank
        launch.spawn(_rank_of, 1, num_threads="2")
    with _raises(TypeError, "backend"):
        launch.spawn(_rank_of, 1, backend=None)
    with _raises(TypeError, "fn"):  # was: started the ranks, which failed calling None
        launch.spawn(None, 1)
    # was: a lambda failed in the queue's feeder thread (a printed traceback) and the run waited out its timeout
    with _raises(TypeError, "fn", "picklable"):
        launch.spawn(lambda r, w: r, 1)
    assert time.monotonic() - t0 < 5, "an argument check started processes"


# ---- two ranks ------------------------------------------------------------------------------------------------------

def _expect(seen, tag, exc, words, fn):
    """Run fn, which must raise exc naming `words`; append what went wrong to seen."""
    try:
        fn()
    except exc as e:
        missing = [w for w in words if w not in str(e)]
        if missing:
            seen.append(f"{tag}: {type(e).__name__} {e} does not name {missing}")
    except Exception as e:  # noqa: BLE001  (reported to the parent)
        seen.append(f"{tag}: {type(e).__name__}: {e} (expected {exc.__name__})")
    else:
        seen.append(f"{tag}: no error")


def _case_two_ranks(rank, p):
    from llmkern.parallel.expert import expert_parallelize
    from llmkern.parallel.pipeline import pipeline_parallelize

    seen = []
    # sizes the world size does not divide: the same error on every rank
    _expect(seen, "column out_features", ValueError, ["out_features=3", "world size 2"],
            lambda: ColumnParallelLinear(4, 3))
    _expect(seen, "row in_features", ValueError, ["in_features=3", "world size 2"], lambda: RowParallelLinear(3, 4))
    m = TinyLM(f=7)
    snap = _snapshot(m)
    _expect(seen, "tensor_parallelize f=7", ValueError, ["tensor_parallelize", "up_proj", "7"],
            lambda: tensor_parallelize(m))
    if not _same(m, snap):
        seen.append("tensor_parallelize f=7: the model was changed")
    # a bad model on one rank only: a clear error on both (was: rank 1 AttributeError, rank 0 left in the
    # agreement's all-gather until the process group's timeout)
    moe_model = _zoo("mixtral-tiny")
    _expect(seen, "expert_parallelize(None) on rank 1", (TypeError, ValueError), ["expert_parallelize"],
            lambda: expert_parallelize(None if rank == 1 else moe_model))
    # a flag bad on every rank of a two-stage pipeline: raised on both stages, neither left in a transfer
    pipe = pipeline_parallelize(_zoo(), n_microbatches=2)
    ids = torch.randint(0, 10, (2, 8), generator=torch.Generator().manual_seed(0))
    _expect(seen, "PipelineParallel.forward return_logits", TypeError, ["return_logits"],
            lambda: pipe.forward(ids, ids, return_logits="False"))
    logits = pipe.forward(ids)  # (still usable afterwards: no rank was left behind)
    if (logits is None) != (rank == 0):
        seen.append("PipelineParallel.forward after the refusal: wrong stage output")
    # the vocabulary-parallel layers' argument checks come after their cross-rank shape checks: both ranks
    emb = VocabParallelEmbedding.from_embedding(nn.Embedding(10, 4))
    _expect(seen, "VocabParallelEmbedding float ids", TypeError, ["ids"], lambda: emb(torch.tensor([1.0, 2.0])))
    head = VocabParallelLMHead.from_linear(nn.Linear(4, 10))
    h = torch.randn(3, 4)
    _expect(seen, "vocab_parallel_loss float labels", TypeError, ["labels"],
            lambda: head.vocab_parallel_loss(h, torch.tensor([1.0, 2.0, 3.0])))
    _expect(seen, "shard_sequence dim", ValueError, ["dim"], lambda: shard_sequence(torch.zeros(2, 4, 3), dim=4))
    # an id outside the vocabulary on one rank of a tensor-parallel model: raised on that rank only, and the other
    # waited in the first sharded layer's collective until the timeout
    tp = tensor_parallelize(_zoo())
    good = torch.randint(0, 10, (2, 8), generator=torch.Generator().manual_seed(0))
    _expect(seen, "tensor-parallel model, bad id on rank 0", ValueError, ["rank(s) [0]", "vocab_size"],
            lambda: tp(good.clone().fill_(10**6) if rank == 0 else good))
    tp(good)  # (still usable: no rank was left behind)
    # then a collective that works: no rank is behind
    t = torch.ones(1)
    dist.all_reduce(t)
    if t.item() != p:
        seen.append(f"final all-reduce gave {t.item()}")
    return seen


def test_two_ranks_refuse_together(pool2):
    t0 = time.monotonic()
    results = pool2.run(_case_two_ranks, timeout=100)
    assert results == [[], []], results
    assert time.monotonic() - t0 < 25, "a refusal waited for a timeout"
