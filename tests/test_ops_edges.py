"""Edge cases of the non-attention ops found by an audit (each test failed before its fix): autocast on
moe_mlp's two backends."""
import numpy as np
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


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("grad_of", ["k", "q", "cos"])
def test_rope_outputs_require_grad_as_unfused(backend, grad_of, request):
    """On the Triton path (an autograd.Function with two outputs) q_out required grad when only k did; each output
    now requires grad as the unfused expression's does: when its own input or cos / sin requires it."""
    from llmkern.reference import rope as rope_ref

    if backend == "triton":
        request.getfixturevalue("triton_backend")
    torch.manual_seed(0)
    t = dict(q=torch.randn(1, 2, 3, 4), k=torch.randn(1, 1, 3, 4), cos=torch.randn(3, 4), sin=torch.randn(3, 4))
    t[grad_of].requires_grad_()
    q_out, k_out = llmkern.rope(t["q"], t["k"], t["cos"], t["sin"])
    want = [x * t["cos"] + rope_ref.rotate_half(x) * t["sin"] for x in (t["q"], t["k"])]
    assert (q_out.requires_grad, k_out.requires_grad) == (want[0].requires_grad, want[1].requires_grad)
    (q_out.sum() * 2 + k_out.sum() if q_out.requires_grad else k_out.sum()).backward()
    got = t[grad_of].grad
    t[grad_of].grad = None
    (want[0].sum() * 2 + want[1].sum() if want[0].requires_grad else want[1].sum()).backward()
    torch.testing.assert_close(got, t[grad_of].grad)


@pytest.mark.parametrize("flag", [np.True_, torch.tensor(True)])
def test_norm_and_rope_flags_take_numpy_bools(flag):
    """return_residual and interleaved raised TypeError for a numpy bool (or a one-element bool tensor), which the
    other ops' flags take through _checks.bool_arg; a string is still refused, not read as True."""
    x, r, w = torch.randn(3, 8), torch.randn(3, 8), torch.randn(8)
    for got, want in ((llmkern.rms_norm(x, w, residual=r, return_residual=flag),
                       llmkern.rms_norm(x, w, residual=r, return_residual=True)),
                      (llmkern.layer_norm(x, w, residual=r, return_residual=flag),
                       llmkern.layer_norm(x, w, residual=r, return_residual=True))):
        assert isinstance(got, tuple) and len(got) == 2
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    q, k, cos, sin = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(llmkern.rope(q, k, cos, sin, interleaved=flag),
                               llmkern.rope(q, k, cos, sin, interleaved=True), atol=0, rtol=0)
    with pytest.raises(TypeError, match="return_residual must be a bool"):
        llmkern.rms_norm(x, w, residual=r, return_residual="False")
    with pytest.raises(TypeError, match="interleaved must be a bool"):
        llmkern.rope(q, k, cos, sin, interleaved="False")


@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_norm_weight_dtype_message_for_float32_x(op):
    """For float32 x the message read "weight must be torch.float32 (x's dtype) or float32"."""
    x, w = torch.randn(3, 8), torch.randn(8, dtype=torch.float16)
    with pytest.raises(ValueError) as e:
        getattr(llmkern, op)(x, w)
    assert str(e.value) == "weight must be torch.float32 (x's dtype), got torch.float16"
    with pytest.raises(ValueError, match=r"weight must be torch.float16 \(x's dtype\) or float32, got torch.float64"):
        getattr(llmkern, op)(x.half(), w.double())
