"""Audit of the fused elementwise ops and the activation-memory tools: what tests/test_norm.py, test_rope.py,
test_swiglu.py and test_memory.py do not cover (which outputs of the fused residual norm require grad; nested
saved_activations blocks, shape-only (meta / fake) measurements)."""
import pytest
import torch

import llmkern
from llmkern.memory import saved_activation_bytes, saved_activations


def _mlp(lin):
    return lambda x: torch.relu(lin(x)).sin()  # saves x (linear), relu's output, sin's input: 3 tensors


# ---- llmkern.memory.saved_activations -----------------------------------------------------------------------------

def test_nested_blocks_both_count_what_the_inner_one_sees():
    """torch calls only the innermost saved_tensors_hooks: an enclosing block saw nothing of an inner one's
    forward (an outer total of one block where two were run), silently."""
    lin = torch.nn.Linear(8, 8)
    f = _mlp(lin)
    x = torch.randn(4, 8)
    one = 2 * 4 * 8 * 4  # x and relu's output (sin saves relu's output too: the same storage)
    with saved_activations(exclude=lin) as outer:
        y = f(x)
        with saved_activations(exclude=lin) as inner:
            f(y)
        assert inner.bytes == one
        assert saved_activation_bytes(f, y.clone(), exclude=lin) == one  # (the helper nested inside, too)
    assert outer.bytes == 3 * one
    assert len(outer.tensors) == 6
    # each block applies its own exclusions: without `exclude` the weight (a trainable leaf) is still skipped,
    # and a frozen weight the inner block excludes is counted by an outer one that does not
    lin.weight.requires_grad_(False)
    h = torch.randn(4, 8, requires_grad=True) * 2.0  # (a non-leaf input: linear saves the weight for its dx)
    with saved_activations() as outer:
        with saved_activations(exclude=lin) as inner:
            lin(h).sum()
    assert inner.bytes == 0 and outer.bytes == 8 * 8 * 4


@pytest.mark.parametrize("mode", ["meta", "fake"])
def test_shape_only_tensors_are_counted_by_their_sizes(mode):
    """Meta tensors and FakeTensors (a memory estimate that allocates nothing) all have data_ptr 0: they counted as
    one storage, which the parameters' address 0 then excluded: 0 bytes."""
    if mode == "meta":
        lin = torch.nn.Linear(8, 8, device="meta")
        x = torch.randn(4, 8, device="meta")
        assert saved_activation_bytes(_mlp(lin), x, exclude=lin) == 2 * 4 * 8 * 4
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        lin = torch.nn.Linear(8, 8)
        x = torch.randn(4, 8)
        got = saved_activation_bytes(_mlp(lin), x, exclude=lin)
    assert got == 2 * 4 * 8 * 4


def test_views_of_one_storage_still_count_once_and_parameters_views_are_skipped():
    """(The storage identity that replaced the address keeps the old rules.)"""
    lin = torch.nn.Linear(8, 8)
    h = torch.randn(4, 8, requires_grad=True) * 1.0  # (non-leaf activations; a scalar product saves nothing)
    with saved_activations(exclude=lin) as saved:
        y = h * 2
        (y[:2] * y[2:]).sum()                       # two views of y's storage: counted once, whole
        (h @ lin.weight.detach()[:, :4]).sum()      # saves a view of the weight's storage only: excluded
        (h * h).sum()                               # saves h
    assert saved.bytes == 2 * 4 * 8 * 4 and len(saved.tensors) == 2


# ---- the fused residual add + norm: s = x + residual requires grad as the unfused sum does --------------------------

def _norm(op, x, w, r):
    if op == "rms_norm":
        return llmkern.rms_norm(x, w, 1e-6, residual=r, return_residual=True)
    return llmkern.layer_norm(x, w, w * 0.5, 1e-5, residual=r, return_residual=True)


@pytest.mark.parametrize("path", ["reference", "triton", "custom_op"])
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
@pytest.mark.parametrize("grad_of", ["weight", "x", "residual"])
def test_returned_residual_requires_grad_as_unfused(op, grad_of, path, request, monkeypatch):
    """On the kernel path (an autograd Function) the returned s required grad whenever any input did: with only the
    weight trainable (norm-only tuning on a frozen trunk) s = x + residual required grad and backpropagated into
    nothing, where the unfused `h = x + residual` (and the CPU reference path) does not require grad."""
    if path != "reference":
        request.getfixturevalue("triton_backend")
    if path == "custom_op":  # (the torch.library op: what torch.compile runs)
        monkeypatch.setattr(llmkern.ops.norm._checks, "eager_fast_path", lambda *tensors: False)
    t = dict(x=torch.randn(3, 8), residual=torch.randn(3, 8), weight=torch.randn(8) + 1)
    t[grad_of].requires_grad_()
    y, s = _norm(op, t["x"], t["weight"], t["residual"])
    assert y.requires_grad
    assert s.requires_grad == (grad_of != "weight")
    g = torch.randn(3, 8)
    ((y * g).sum() + (s * g).sum() if s.requires_grad else (y * g).sum()).backward()
    got = t[grad_of].grad
    leaf = t[grad_of].detach().requires_grad_()
    want = {**t, grad_of: leaf}
    h = want["x"] + want["residual"]
    ref = (torch.nn.functional.rms_norm(h, (8,), want["weight"], 1e-6) if op == "rms_norm"
           else torch.nn.functional.layer_norm(h, (8,), want["weight"], want["weight"] * 0.5, 1e-5))
    ((ref * g).sum() + (h * g).sum() if h.requires_grad else (ref * g).sum()).backward()
    torch.testing.assert_close(got, leaf.grad, atol=1e-5, rtol=1e-5)


def test_returned_residual_under_torch_compile(triton_backend):
    x, r, w = torch.randn(3, 8), torch.randn(3, 8), (torch.randn(8) + 1).requires_grad_()
    y, s = torch.compile(lambda x, w, r: llmkern.rms_norm(x, w, residual=r, return_residual=True),
                         fullgraph=True, backend="aot_eager")(x, w, r)
    assert y.requires_grad and not s.requires_grad
    y.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
