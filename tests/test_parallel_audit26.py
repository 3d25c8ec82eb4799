"""Audit of the pipeline's training-loop API and of column_parallel_shared_input's arguments.

- PipelineParallel had no zero_grad, state_dict or load_state_dict: a training loop written for an nn.Module (or
  for torch.distributed.pipelining, whose stage is one) failed with AttributeError, and a full unsharded checkpoint
  could only be loaded through pipe.model with strict=False, which skipped a misspelt or missing key silently.
- pipe.model.load_state_dict(..., assign=True) (how a checkpoint is loaded without a copy) replaced the tied
  embedding's parameters, but step() kept summing the gradients of the replaced ones: the first stage's embedding
  and the last stage's head then got only their own part of the gradient, silently, and the copies drifted apart.
- column_parallel_shared_input(x, []) raised an IndexError; column layers that disagree on sequence_parallel ran
  one by one on one input that cannot be both a token shard and the whole sequence.

The user flow (2 gloo ranks, one spawn): pipeline a tied GPT, step with SGD + momentum, save each stage's state_dict and
optimizer state to a file, "restart" (a model from another seed, pipelined again, loaded from the files), step
again; losses, gradients and parameters against the unsharded model trained alike, float32 1e-5.
"""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from llmkern.testing import call_outcome as _outcome, collect_close, expect_outcome as _expect, raise_failures

TOL = dict(atol=1e-5, rtol=1e-5)


def _batch(vocab, seed):
    ids = torch.randint(0, vocab, (4, 8), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, 3:] = -100
    return ids, labels


def _compare(tag, pipe, ref, failures, grads=True):
    """This stage's parameters (and gradients) against the unsharded model's of the same name."""
    want = dict(ref.named_parameters(remove_duplicate=False))
    for name, prm in pipe.named_parameters():
        collect_close(f"{tag}: {name}", prm, want[name], failures, **TOL)
        if grads:
            if prm.grad is None:
                failures.append(f"{tag}: {name} has no gradient")
            else:
                collect_close(f"{tag}: grad of {name}", prm.grad, want[name].grad, failures, **TOL)


def _step(tag, pipe, ref, opts, seed, failures, clip=None):
    """One step of both models (the loss compared on the last stage), their gradients compared (clip: (max_norm,
    norm_type) after clipping both by the norm of all the gradients), then opts."""
    ids, labels = _batch(ref.config.vocab_size, seed)
    loss = pipe.step(ids, labels)
    _, ref_loss = ref(ids, labels, return_logits=False)
    ref_loss.backward()
    if pipe.is_last:
        collect_close(f"{tag}: loss", loss, ref_loss, failures, **TOL)
    if clip is not None:
        norm = pipe.clip_grad_norm_(*clip)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), *clip)
        collect_close(f"{tag}: clip_grad_norm_{clip}", norm, ref_norm, failures, **TOL)
        if not ref_norm > clip[0]:
            failures.append(f"{tag}: the norm {ref_norm} does not exceed max_norm {clip[0]}: nothing was clipped")
    _compare(f"{tag}, before the optimizer step", pipe, ref, failures)
    for opt in opts:
        opt.step()
    pipe.zero_grad()
    ref.zero_grad()
    if any(prm.grad is not None for prm in pipe.parameters()):
        failures.append(f"{tag}: zero_grad() left gradients (set_to_none=True is the default)")


def _checkpoint_flow(rank, tmp, failures):
    from llmkern.models import build, get_config
    from llmkern.parallel.pipeline import pipeline_parallelize

    cfg = get_config("gpt-tiny")  # (tied: wte on the first stage, its copy lm_head on the last)
    torch.manual_seed(0)
    ref = build(cfg, backend="torch")
    pipe = pipeline_parallelize(copy.deepcopy(ref), n_microbatches=2, schedule="1f1b")
    # (SGD with momentum: a state to save; Adam's normalized steps would turn the rounding noise of the key bias's
    # zero gradient into steps of lr)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (pipe, ref))
    _step("step 1", pipe, ref, (opt, ref_opt), 1, failures)

    # save per stage; the stages' dicts together are the unsharded model's state_dict
    state = pipe.state_dict()
    torch.save({"model": state, "optim": opt.state_dict()}, f"{tmp}/stage{rank}.pt")
    keys = [None, None]
    dist.all_gather_object(keys, sorted(state))
    full = ref.state_dict()
    if sorted(set(keys[0]) | set(keys[1])) != sorted(full) or set(keys[0]) & set(keys[1]):
        failures.append(f"the stages' state_dict keys {keys} are not a partition of the unsharded model's")
    for key, value in state.items():
        collect_close(f"state_dict {key}", value, full[key], failures, **TOL)

    # restart: another seed's model, pipelined, loaded from this stage's file, two more steps
    torch.manual_seed(99)
    pipe2 = pipeline_parallelize(build(cfg, backend="torch"), n_microbatches=2, schedule="1f1b")
    saved = torch.load(f"{tmp}/stage{rank}.pt")
    result = pipe2.load_state_dict(saved["model"])
    if list(result.missing_keys) or list(result.unexpected_keys):
        failures.append(f"loading the stage's own file reported {result}")
    opt2 = torch.optim.SGD(pipe2.parameters(), lr=0.5, momentum=0.9)
    opt2.load_state_dict(saved["optim"])
    _compare("restored", pipe2, ref, failures, grads=False)
    for s, clip in ((2, (0.5, 2.0)), (3, (0.01, float("inf")))):
        _step(f"step {s} after the restart", pipe2, ref, (opt2, ref_opt), s, failures, clip)
    _compare("after the restart", pipe2, ref, failures, grads=False)

    # the unsharded model's whole state_dict on every rank, its tied head stored once (under wte.weight only);
    # assign=True replaces the parameters, the tied copies' gradients must still be summed
    full = {k: v.clone() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    torch.manual_seed(98)
    pipe3 = pipeline_parallelize(build(cfg, backend="torch"), n_microbatches=2, schedule="gpipe")
    result = pipe3.load_state_dict(full, assign=True)
    if list(result.missing_keys) or list(result.unexpected_keys):
        failures.append(f"loading the full state_dict reported {result}")
    _step("full state_dict, assign=True", pipe3, ref, (), 4, failures)
    return pipe3, full


def _assign_through_model(failures):
    """Was: a tied copy replaced by pipe.model.load_state_dict(assign=True) kept only its own gradient part."""
    from llmkern.models import build, get_config
    from llmkern.parallel.pipeline import pipeline_parallelize

    torch.manual_seed(0)
    ref = build(get_config("gpt-tiny"), backend="torch")
    torch.manual_seed(97)
    pipe = pipeline_parallelize(build(get_config("gpt-tiny"), backend="torch"), n_microbatches=2, schedule="gpipe")
    full = ref.state_dict()
    pipe.model.load_state_dict({k: full[k].clone() for k in pipe.model.state_dict()}, assign=True)
    ids, labels = _batch(ref.config.vocab_size, 5)
    pipe.step(ids, labels)
    ref(ids, labels)[1].backward()
    _compare("pipe.model.load_state_dict(assign=True)", pipe, ref, failures)


def _load_errors(rank, pipe, full, failures):
    """Mismatched keys and shapes raise on every rank, naming them, and load nothing; so does a bad max_norm."""
    before = {k: v.clone() for k, v in pipe.state_dict().items()}
    own = pipe.state_dict()
    lacking = {k: v for k, v in own.items() if k != "h.1.ln_1.weight"} if rank == 1 else own
    _expect("a stage key missing", _outcome(lambda: pipe.load_state_dict(lacking)), "ValueError",
            ["h.1.ln_1.weight", "missing"] if rank == 1 else ["failed on pipeline rank(s) [1]"], failures)
    typo = dict(full, **{"h.0.attn.q_proj.wieght": full["h.0.attn.q_proj.weight"]})
    _expect("a key that is not the model's", _outcome(lambda: pipe.load_state_dict(typo)), "ValueError",
            ["h.0.attn.q_proj.wieght", "not the model's"], failures)
    wrong = dict(full, **{"h.0.ln_1.bias": torch.zeros(3), "h.1.ln_1.bias": torch.zeros(3)})
    _expect("a shape mismatch", _outcome(lambda: pipe.load_state_dict(wrong)), "ValueError",
            [f"h.{rank}.ln_1.bias: (3,)", "shapes differ"], failures)
    _expect("not a mapping", _outcome(lambda: pipe.load_state_dict([1] if rank == 0 else full)),
            "TypeError" if rank == 0 else "ValueError", ["state_dict must be a mapping"] if rank == 0 else
            ["failed on pipeline rank(s) [0]"], failures)
    for key, value in pipe.state_dict().items():
        if not torch.equal(value, before[key]):
            failures.append(f"a refused load changed {key}")
    clip = _outcome(lambda: pipe.clip_grad_norm_(-1.0 if rank == 0 else 1.0))
    _expect("clip_grad_norm_(-1) on rank 0", clip, "ValueError",
            ["max_norm must be a finite number >= 0"] if rank == 0 else ["failed on pipeline rank(s) [0]"], failures)
    # strict=False: skipped and reported
    result = pipe.load_state_dict(typo if rank == 0 else lacking, strict=False)
    want = ([], ["h.0.attn.q_proj.wieght"]) if rank == 0 else (["h.1.ln_1.weight"], [])
    if (list(result.missing_keys), list(result.unexpected_keys)) != want:
        failures.append(f"strict=False on rank {rank} reported {result}, expected {want}")


def pipeline_api_worker(rank, p, tmp):
    failures = []
    _assign_through_model(failures)  # (first: the methods below are new)
    pipe, full = _checkpoint_flow(rank, tmp, failures)
    _load_errors(rank, pipe, full, failures)
    raise_failures(rank, failures)
    return rank


def test_pipeline_checkpoint_restart_and_state_dict_api(pool2, tmp_path):
    assert pool2.run(pipeline_api_worker, (str(tmp_path),), timeout=90) == [0, 1]


# ---- column_parallel_shared_input -----------------------------------------------------------------------------

def test_column_parallel_shared_input_argument_errors(world1):
    from llmkern.parallel.layers import ColumnParallelLinear, column_parallel_shared_input

    x = torch.randn(4, 6)
    plain = ColumnParallelLinear(6, 4)
    with pytest.raises(ValueError, match="layers must hold at least one module"):  # was: IndexError
        column_parallel_shared_input(x, [])
    with pytest.raises(TypeError, match="layers must be a sequence of modules"):  # was: 'not iterable'
        column_parallel_shared_input(x, plain)
    with pytest.raises(TypeError, match=r"layers must hold modules \(callables\), got Tensor at index 1"):
        column_parallel_shared_input(x, [plain, torch.ones(2)])
    with pytest.raises(ValueError, match="disagree on sequence_parallel.*0: False, 1: True"):  # was: ran
        column_parallel_shared_input(x, [plain, ColumnParallelLinear(6, 4, sequence_parallel=True)])
    # what still runs: one layer, a plain nn.Linear beside a column layer, a generator, a ModuleList
    lin = nn.Linear(6, 3)
    for mods, wrap in (([plain], list), ([plain, lin], list), ([plain, plain], iter), ([plain, plain], nn.ModuleList)):
        outs = column_parallel_shared_input(x, wrap(mods))
        assert len(outs) == len(mods) and all(torch.allclose(o, m(x)) for o, m in zip(outs, mods)), wrap


# ---- review of the above (R1) ---------------------------------------------------------------------------------

class _HostSyncs:
    """A dispatch mode counting the reads of a tensor's value on the host (bool(), item(): a sync on GPU)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    outer.count += 1
                return func(*args, **(kwargs or {}))

        self.count, self.mode = 0, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def test_pipeline_stage_with_lora_reloads_its_state_dict_and_clips_without_host_sync(world1):
    """Was: after inject_lora on pipe.model, pipe.load_state_dict(pipe.state_dict()) raised 'keys that are not the
    model's' for the LoRA keys (only the unsharded model's keys were known); clip_grad_norm_ read its NaN flag on
    the host (bool(), a device sync per training step on GPU, where torch's clip_grad_norm_ has none)."""
    import llmkern.peft as lp
    from llmkern.models import build, get_config
    from llmkern.parallel.pipeline import pipeline_parallelize

    cfg = get_config("gpt-tiny")
    torch.manual_seed(0)
    pipe = pipeline_parallelize(build(cfg, backend="torch"), world1, n_microbatches=1, schedule="gpipe")
    lp.inject_lora(pipe.model, ["q_proj"], r=2)
    ids, labels = _batch(cfg.vocab_size, 3)
    pipe.step(ids, labels)
    saved = {k: v.clone() for k, v in pipe.state_dict().items()}
    with torch.no_grad():
        for prm in pipe.parameters():
            prm.add_(1.0)
    result = pipe.load_state_dict(saved)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(v, saved[k]) for k, v in pipe.state_dict().items())
    with pytest.raises(ValueError, match="h.0.attn.q_proj.lora_AA"):  # (a misspelt key is still named)
        pipe.load_state_dict(dict(saved, **{"h.0.attn.q_proj.lora_AA": saved["h.0.attn.q_proj.lora_A"]}))

    with _HostSyncs() as syncs:
        norm = pipe.clip_grad_norm_(1e-4)
    assert syncs.count == 0
    assert float(norm) > 1e-3  # (clipped: the gradients' norm was larger)
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in pipe.parameters() if p.grad is not None]))
    torch.testing.assert_close(total, 1e-4 * norm / (norm + 1e-6), rtol=1e-4, atol=0)  # (torch's coefficient)

    # with the per-call cross-rank checks off (LLMKERN_TP_VALIDATE=0) it runs no argument all-gather (was: always)
    import llmkern.parallel.pipeline as pp
    from llmkern.parallel import comm

    def no_check(*args, **kwargs):
        raise AssertionError("a cross-rank argument check ran")

    previous, pp_check = comm.set_validation(False), pp._check
    try:
        pp._check = no_check
        pipe.clip_grad_norm_(1.0)
        with pytest.raises(ValueError, match="max_norm"):  # (this rank's own error still raises)
            pipe.clip_grad_norm_(-1.0)
    finally:
        pp._check = pp_check
        comm.set_validation(previous)


def _clip_nan_beside_inf_worker(rank, p):
    """inf-norm clipping with an inf gradient on one stage and a NaN one on the other: torch's norm over all the
    gradients is NaN (was: the MAX all-reduce could drop the NaN and return inf)."""
    from llmkern.models import build, get_config
    from llmkern.parallel.pipeline import pipeline_parallelize

    torch.manual_seed(0)
    pipe = pipeline_parallelize(build(get_config("gpt-tiny"), backend="torch"), n_microbatches=1, schedule="gpipe")
    prm = next(q for q in pipe.parameters() if q.requires_grad)
    prm.grad = torch.zeros_like(prm)
    prm.grad.view(-1)[0] = float("inf") if rank == 0 else float("nan")
    failures = []
    for order in (float("inf"), 2.0):
        norm = pipe.clip_grad_norm_(1.0, order)
        if not torch.isnan(norm):
            failures.append(f"clip_grad_norm_(norm_type={order}) with inf and NaN gradients returned {norm}, not nan")
    raise_failures(rank, failures)
    return rank


def test_pipeline_clip_grad_norm_nan_beside_inf(pool2):
    assert pool2.run(_clip_nan_beside_inf_worker, (), timeout=60) == [0, 1]
