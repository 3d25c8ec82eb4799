"""Edge cases of the non-attention ops found by an audit (each test failed before its fix): autocast on
moe_mlp's two backends."""
import pytest
import torch

import llmkern
from llmkern.reference import moe as moe_ref
from llmkern.testing import triton_device


def _moe_problem(T=5, d=8, F=6, E=3, k=2):
    torch.manual_seed(0)
    x = torch.randn(T, d)
    wgu, wd = torch.randn(E, 2 * F, d) / d ** 0.5, torch.randn(E, d, F) / F ** 0.5
    tw, ids = llmkern.moe_route(torch.randn(T, E), k)
    ids[1, 0] = -1  # a dropped slot
    return x, wgu, wd, ids, tw


def test_moe_mlp_autocast_reference_casts_like_linear():
    """Under autocast the CPU reference ran its float32 matmuls through autocast (h rounded to bf16 before
    the activation) while the kernels ignored autocast: now the inputs are cast as F.linear casts them and
    the op runs on them with autocast off, returning x's dtype."""
    x, wgu, wd, ids, tw = _moe_problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = llmkern.moe_mlp(x, wgu, wd, ids, tw)
    want = moe_ref.moe_mlp(x.bfloat16(), wgu.bfloat16(), wd.bfloat16(), ids, tw)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, want.float(), atol=0, rtol=0)


@pytest.mark.skipif(triton_device() is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
def test_moe_mlp_autocast_kernels_run_in_the_autocast_dtype(triton_backend):
    """The kernels ran float32 x and weights in float32 under a float16 autocast (the reference, above, in the
    autocast dtype): now they get float16 inputs, and the gradients still reach the float32 leaves."""
    x, wgu, wd, ids, tw = _moe_problem()
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        y = llmkern.moe_mlp(x, wgu, wd, ids, tw)
    want = llmkern.moe_mlp(x.detach().half(), wgu.half(), wd.half(), ids, tw)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, want.float(), atol=0, rtol=0)
    y.sum().backward()
    assert x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0


def _shape_call(op, device):
    m = dict(device=device)
    x = torch.randn(3, 8, **m, requires_grad=True)
    if op == "linear_cross_entropy":
        return x, llmkern.linear_cross_entropy(x, torch.randn(5, 8, **m), torch.zeros(3, dtype=torch.long, **m),
                                               chunk_size=2)
    if op == "lora_linear_multi":  # (device ids and scalings: their values were read, .tolist() on meta)
        return x, llmkern.lora_linear_multi(x, torch.randn(5, 8, **m), None, torch.randn(2, 2, 8, **m),
                                            torch.randn(2, 5, 2, **m), torch.ones(2, **m),
                                            torch.zeros(3, dtype=torch.long, **m))
    return x, llmkern.moe_mlp(x, torch.randn(2, 6, 8, **m), torch.randn(2, 8, 3, **m),
                              torch.zeros(3, 1, dtype=torch.long, **m), torch.ones(3, 1, **m))


_SHAPE_OPS = ["linear_cross_entropy", "lora_linear_multi", "moe_mlp"]


def _out_shape(op):
    return () if op == "linear_cross_entropy" else (3, 5 if op == "lora_linear_multi" else 8)


@pytest.mark.parametrize("op", _SHAPE_OPS)
def test_meta_tensors_give_shapes(op):
    """Meta tensors (shape inference, a model built on the meta device) run like torch's own ops: the other
    ops did; these raised torch.autocast("meta")'s "unsupported scalarType", read values a meta tensor lacks,
    or selected rows with torch.where (nonzero has no meta kernel)."""
    x, y = _shape_call(op, "meta")
    assert y.is_meta and y.shape == _out_shape(op)
    y.sum().backward()
    assert x.grad.is_meta and x.grad.shape == x.shape


@pytest.mark.parametrize("op", _SHAPE_OPS + ["cross_entropy"])
def test_fake_tensor_mode_gives_shapes(op):
    """Under FakeTensorMode (memory estimation, shape propagation outside torch.compile) the value checks and the
    references' row selection read values fake tensors lack (DataDependentOutputException); torch's
    F.cross_entropy and llmkern.attention run there."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        if op == "cross_entropy":
            x = torch.randn(3, 8, requires_grad=True)
            y = llmkern.cross_entropy(x, torch.zeros(3, dtype=torch.long))
        else:
            x, y = _shape_call(op, "cpu")
        assert y.shape == (() if op == "cross_entropy" else _out_shape(op))
        y.sum().backward()
        assert x.grad.shape == x.shape


def test_cross_entropy_chunk_keeps_the_logits_device():
    """linear_cross_entropy's reference chunk (CPU, and float64 on CUDA) filled ignored rows from a CPU
    zeros(1), which torch.where refuses beside tensors on another device (only 0-dim CPU tensors pass)."""
    from llmkern.reference.cross_entropy import cross_entropy_chunk

    logits = torch.randn(4, 6, device="meta", dtype=torch.float64)
    loss, d = cross_entropy_chunk(logits, torch.zeros(4, dtype=torch.long, device="meta"))
    assert loss.is_meta and loss.shape == (4,) and d.shape == (4, 6)


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_lora_linear_multi_nf4_empty_batch(lead):
    """An empty batch on a 4-bit (NF4) base raised reshape's "cannot reshape tensor of 0 elements into shape
    [0, -1]" (the dense base already gave [..., 0, out])."""
    from llmkern.ops.nf4 import nf4_quantize

    K, N = 64, 12
    x = torch.randn(*lead, K, requires_grad=True)
    y = llmkern.lora_linear_multi(x, nf4_quantize(torch.randn(N, K)), torch.randn(N), torch.randn(2, 4, K),
                                  torch.randn(2, N, 4), [0.5, 2.0], torch.zeros(lead, dtype=torch.long))
    assert y.shape == (*lead, N)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_cross_entropy_under_vmap():
    """The CPU path is plain PyTorch, which torch.func runs, but the label check read vmap's batched labels
    (bool() of a BatchedTensor: "data-dependent control flow"); F.cross_entropy runs there."""
    x, y = torch.randn(4, 3, 7), torch.randint(0, 7, (4, 3))
    y[1, 2] = -100
    got = torch.func.vmap(llmkern.cross_entropy)(x, y)
    torch.testing.assert_close(got, torch.stack([llmkern.cross_entropy(a, b) for a, b in zip(x, y)]))


@pytest.mark.filterwarnings("ignore:llmkern.linear_cross_entropy under torch.func")
def test_linear_cross_entropy_under_torch_func():
    """torch.func.grad / vmap raised PyTorch's "must override the setup_context staticmethod" through the
    custom op: they now get the unfused pair (with a one-time warning), the same loss and gradients."""
    h, w = torch.randn(4, 3, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (4, 3))
    y[0, 1] = -100
    got = torch.func.grad(lambda w: llmkern.linear_cross_entropy(h, w, y, softcap=2.0))(w)
    w2 = w.clone().requires_grad_()
    llmkern.linear_cross_entropy(h, w2, y, softcap=2.0).backward()
    torch.testing.assert_close(got, w2.grad)
    per_row = torch.func.vmap(lambda a, b: llmkern.linear_cross_entropy(a, w, b, reduction="sum"))(h, y)
    torch.testing.assert_close(per_row, torch.stack([llmkern.linear_cross_entropy(a, w, b, reduction="sum")
                                                     for a, b in zip(h, y)]))
