"""Audit of the parallel training helpers: gradient reductions under accumulation, and the launch helpers.

- all_reduce_gradients (context parallelism) and all_reduce_replicated_grads (expert parallelism) summed whatever
  .grad held: called after each of several accumulated backwards (or twice) they counted the earlier micro-steps'
  gradients p times (a sum is not idempotent, unlike DDP's average). Now every micro-step counts once.
- launch.spawn / RankPool.run: a return value or an argument that does not pickle was lost in the queue's feeder
  thread, and the run waited out its whole timeout ("did not finish"); args="x" was split into characters.

One RankPool of 2 gloo ranks for the module (the last test closes it on purpose).
"""
import copy
import time

import pytest
import torch

from llmkern.parallel import launch
from llmkern.testing import collect_close, raise_failures

TOL = dict(atol=1e-5, rtol=1e-5)


def _ids(seed, shape=(2, 8)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def _check_cp(tag, model, ref, failures, scale=1.0):
    for (name, prm), (_, want) in zip(model.named_parameters(), ref.named_parameters()):
        if prm.grad is None:
            failures.append(f"{tag}: {name} has no gradient")
        else:
            collect_close(f"{tag}: grad of {name}", prm.grad, want.grad * scale, failures, **TOL)


def _context_accumulation(rank, failures):
    """Context parallelism: all_reduce_gradients after each of two accumulated backwards (a torch.autograd.grad
    probe between them: it adds to no .grad, and must not touch the reduced ones), once more with nothing new,
    then after zero_grad(set_to_none=False) and a third step: every time the unsharded model's gradients."""
    from llmkern.models import Llama, get_config
    from llmkern.parallel import all_reduce_gradients, context_parallelize, shard_sequence

    torch.manual_seed(0)
    ref = Llama(get_config("llama-tiny"), backend="torch")
    model = context_parallelize(copy.deepcopy(ref))
    for step in range(2):
        ids = _ids(step)
        ref(ids, ids)[1].backward()
        model(shard_sequence(ids), shard_sequence(ids))[1].backward()
        all_reduce_gradients(model)
        _check_cp(f"context, micro-step {step}", model, ref, failures)
        if step == 0:  # a probe between the reduction and the step (a grad norm, a penalty) adds to no .grad
            params = [q for q in model.parameters() if q.requires_grad]
            torch.autograd.grad(model(shard_sequence(ids), shard_sequence(ids))[1], params, allow_unused=True)
            _check_cp("context, after a torch.autograd.grad probe", model, ref, failures)
    all_reduce_gradients(model)  # nothing new: unchanged
    _check_cp("context, a second call", model, ref, failures)
    model.zero_grad(set_to_none=False)
    ref.zero_grad()
    ids = _ids(5)
    ref(ids, ids)[1].backward()
    model(shard_sequence(ids), shard_sequence(ids))[1].backward()
    all_reduce_gradients(model)
    _check_cp("context, after zero_grad in place", model, ref, failures)
    # a gradient on one rank only is summed with zeros (the flattened sizes differed: a failed all-reduce)
    model.zero_grad()
    w = model.lm_head.weight
    if rank == 0:
        w.grad = torch.ones_like(w)
    all_reduce_gradients(model)
    collect_close("context, gradient on rank 0 only", w.grad, torch.ones_like(w), failures, **TOL)


def _check_ep(tag, ep, ref, failures, scale):
    from llmkern.parallel.expert import LocalExperts

    mods, ref_params = dict(ep.named_modules()), dict(ref.named_parameters())
    for name, prm in ep.named_parameters():
        want = ref_params[name].grad
        owner = mods[name.rsplit(".", 1)[0]]
        if isinstance(owner, LocalExperts):
            want = want[owner.first:owner.first + owner.n_local]
        collect_close(f"{tag}: grad of {name}", prm.grad, want * scale, failures, **TOL)


def _expert_accumulation(rank, p, failures):
    """Expert parallelism: all_reduce_replicated_grads after each of two accumulated backwards (and twice after the
    last), op="sum" and op="mean": the gradients of the sum (mean) of the ranks' losses over both micro-steps."""
    from llmkern.models import Llama, get_config
    from llmkern.parallel import all_reduce_replicated_grads, expert_parallelize

    torch.manual_seed(0)
    ref = Llama(get_config("mixtral-tiny", n_layer=1), backend="torch")
    for step in range(2):
        sum(ref(b, labels=b)[1] for b in (_ids(10 * step + r) for r in range(p))).backward()
    for op, scale in (("sum", 1.0), ("mean", 1.0 / p)):
        ep = expert_parallelize(copy.deepcopy(ref))
        ep.zero_grad()
        for step in range(2):
            b = _ids(10 * step + rank)
            ep(b, labels=b)[1].backward()
            all_reduce_replicated_grads(ep, op=op)
            if step == 0:  # (a torch.autograd.grad probe: the reduced gradients stay as they are)
                torch.autograd.grad(ep(b, labels=b)[1], [q for q in ep.parameters() if q.requires_grad],
                                    allow_unused=True)
        all_reduce_replicated_grads(ep, op=op)
        _check_ep(f"expert, op={op}", ep, ref, failures, scale)


def accumulation_worker(rank, p):
    failures = []
    _context_accumulation(rank, failures)
    _expert_accumulation(rank, p, failures)
    raise_failures(rank, failures)
    return True


def test_gradient_reductions_count_each_micro_step_once(pool2):
    assert pool2.run(accumulation_worker, timeout=90) == [True, True]


# ---- launch -----------------------------------------------------------------------------------------------------

def _rank_of(rank, world_size):
    return rank


def _lambda_on_rank_1(rank, world_size):
    return (lambda: rank) if rank == 1 else rank


def test_spawn_args_are_checked_before_any_rank_starts():
    t0 = time.monotonic()
    with pytest.raises(TypeError, match="args must be a tuple.*comma"):  # was: split into 'a', 'b'
        launch.spawn(_rank_of, 1, args="ab", timeout=20)
    with pytest.raises(TypeError, match="args must be a tuple"):  # was: a TypeError after the ranks started
        launch.spawn(_rank_of, 1, args=3, timeout=20)
    with pytest.raises(TypeError, match="args must pickle"):  # was: the whole timeout, then "did not finish"
        launch.spawn(_rank_of, 1, args=(lambda: 0,), timeout=20)
    assert time.monotonic() - t0 < 5, "an argument check started processes"


def test_a_return_value_that_does_not_pickle_fails_at_once(pool2):
    """(Last: the failure closes the module's pool.) Was: rank 1 "did not finish within 20 s"."""
    with pytest.raises(TypeError, match="args must pickle"):
        pool2.run(_rank_of, (lambda: 0,))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        pool2.run(_lambda_on_rank_1, timeout=20)
    message = str(info.value)
    assert "rank 1 failed" in message and "cannot be sent back" in message and "did not finish" not in message, \
        message
    assert time.monotonic() - t0 < 10
