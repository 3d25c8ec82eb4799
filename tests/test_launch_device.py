"""Triton launches a kernel on the *current* CUDA device and stream, whatever its arguments' device: every launch
in llmkern/kernels must first enter its tensors' device (llmkern.kernels._common.on_device), or a model on cuda:1
runs its kernels on device 0 against cuda:1's memory (a race with cuda:1's stream, or an error without peer
access)."""
import ast
import contextlib
import os

import pytest
import torch

from llmkern import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "llmkern", "kernels")


def _is_launch(node):
    # kernel[grid](...): a call of a subscripted callable
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)


def _guarded(stack):
    for node in reversed(stack):
        if isinstance(node, ast.With) and any(
                isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "id", None) == "on_device"
                for i in node.items):
            return True
        if isinstance(node, ast.FunctionDef):
            return any(getattr(d, "id", None) == "launches_on_device" for d in node.decorator_list)
    return False


def _unguarded_launches(path):
    tree = ast.parse(open(path).read())
    found = []

    def visit(node, stack):
        if _is_launch(node) and not _guarded(stack):
            found.append(f"{os.path.basename(path)}:{node.lineno}")
        for child in ast.iter_child_nodes(node):
            visit(child, stack + [node])

    visit(tree, [])
    return found


def test_every_kernel_launch_enters_its_tensors_device():
    files = [os.path.join(KERNELS, f) for f in sorted(os.listdir(KERNELS))
             if f.endswith(".py") and f != "_autotune.py"]  # (the autotune front is called from guarded launches)
    bad = [site for f in files for site in _unguarded_launches(f)]
    assert not bad, f"Triton launches outside on_device / @launches_on_device: {bad}"
    # the scan sees launches at all (a pattern that matched nothing would pass vacuously)
    tree = ast.parse(open(os.path.join(KERNELS, "norm.py")).read())
    assert any(_is_launch(n) for n in ast.walk(tree))


@pytest.mark.skipif(not _backend.triton_available(), reason="needs triton")
def test_on_device_enters_the_tensors_device(monkeypatch):
    from llmkern.kernels import _common

    class OnCuda1(torch.Tensor):  # a CPU tensor that says it lives on cuda:1
        is_cuda = property(lambda self: True)
        device = property(lambda self: torch.device("cuda", 1))

    entered = []

    @contextlib.contextmanager
    def fake_device(index):
        entered.append(index)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    t1 = torch.Tensor._make_subclass(OnCuda1, torch.zeros(2))
    with _common.on_device(None, 3, t1, torch.zeros(1)):
        pass
    assert entered == [1]
    with _common.on_device(torch.zeros(1), t1):  # the first tensor decides (a CPU one: nothing to enter)
        pass
    assert entered == [1]

    @_common.launches_on_device
    def launcher(scale, x, *, out=None):
        return scale, x

    assert launcher(2.0, t1)[0] == 2.0 and entered == [1, 1]
    launcher(2.0, None, out=t1)  # keyword tensors count too
    assert entered == [1, 1, 1]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # already current: nothing entered
    launcher(2.0, t1)
    assert entered == [1, 1, 1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_ops_on_the_second_gpu():
    import llmkern

    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(2, 4, 256, 64, device=dev, dtype=torch.float16, generator=g)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), q.float(), q.float(), is_causal=True)
    out = llmkern.attention(q, q, q, causal=True)
    assert out.device == dev
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)
    x = torch.randn(64, 256, device=dev, dtype=torch.float16, generator=g)
    w = torch.rand(256, device=dev, dtype=torch.float16, generator=g) + 0.5
    ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()
    torch.testing.assert_close(llmkern.rms_norm(x, w, eps=1e-6).float(), ref, atol=2e-2, rtol=2e-2)
    torch.cuda.synchronize(dev)
