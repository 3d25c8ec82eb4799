"""Loss ops against the libraries a user compares them with: torch.func transforms through llmkern.cross_entropy
(F.cross_entropy runs there), and the label dtypes vocab_parallel_loss takes (linear_cross_entropy's)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import llmkern


def _capped(logits, softcap):
    return softcap * torch.tanh(logits / softcap)


@pytest.mark.filterwarnings("ignore:llmkern.cross_entropy under torch.func")
def test_cross_entropy_under_torch_func_grad_and_jacrev(triton_backend):
    """On the kernel path torch.func.grad raised PyTorch's "must override the setup_context staticmethod" through
    the custom op (F.cross_entropy, and llmkern.linear_cross_entropy, run there): now the reference runs, with the
    same loss and gradients; a plain call still runs the kernels."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, generator=g)
    y = torch.randint(0, 9, (2, 3), generator=g)
    y[0, 1] = -100

    def ours(t):
        return 0.5 * llmkern.cross_entropy(t, y, softcap=2.0)

    def torchs(t):
        return 0.5 * F.cross_entropy(_capped(t, 2.0).reshape(-1, 9), y.reshape(-1))

    torch.testing.assert_close(torch.func.grad(ours)(x), torch.func.grad(torchs)(x))
    weights = torch.rand(2, 3, generator=g)
    jac = torch.func.jacrev(lambda t: llmkern.cross_entropy(t, y, reduction="none"))(x)
    want = torch.func.jacrev(lambda t: F.cross_entropy(t.reshape(-1, 9), y.reshape(-1), reduction="none"))(x)
    torch.testing.assert_close(jac, want.reshape(2, 3, 2, 3, 9))
    # (the weighted per-token loss through the Jacobian equals plain autograd through the kernels)
    xt = x.clone().requires_grad_()
    (llmkern.cross_entropy(xt, y, reduction="none") * weights).sum().backward()
    assert "CrossEntropyFunction" in type(llmkern.cross_entropy(xt, y).grad_fn).__name__  # (the kernels' twin)
    torch.testing.assert_close(torch.einsum("ab,abcdv->cdv", weights, jac), xt.grad)


# ---- vocab_parallel_loss on a one-rank group in this process ------------------------------------------------------

# (world1: tests/conftest.py)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.float32])
def test_vocab_parallel_loss_takes_the_label_dtypes_linear_cross_entropy_takes(world1, dtype):
    """uint8 labels were used as a boolean mask in the one-hot subtraction: labels [1, 1] over a vocabulary of 2
    subtracted 1 at columns 0 and 1 of rows 0 and 1 (the diagonal), a silently wrong weight gradient; int16 ones
    failed in torch's indexing. linear_cross_entropy refuses both (int64 / int32 only)."""
    from llmkern.parallel.vocab import VocabParallelLMHead

    torch.manual_seed(0)
    lin = nn.Linear(3, 2, bias=False)
    head = VocabParallelLMHead.from_linear(lin, world1)
    h, y = torch.randn(2, 3), torch.tensor([1, 1])
    with pytest.raises(TypeError, match="labels must be an int64 or int32 tensor"):
        head.vocab_parallel_loss(h, y.to(dtype))
    with pytest.raises(ValueError, match="labels must be an int64 or int32"):
        llmkern.linear_cross_entropy(h, lin.weight, y.to(dtype))


def test_vocab_parallel_loss_int32_labels_and_a_scaled_loss_equal_torch(world1):
    """The label dtypes it keeps: int32 labels with ignore_index, softcap, bias and 0.5 * loss give F.cross_entropy's
    loss and gradients (hidden, weight, bias)."""
    from llmkern.parallel.vocab import VocabParallelLMHead

    torch.manual_seed(0)
    lin = nn.Linear(4, 9)
    head = VocabParallelLMHead.from_linear(lin, world1)
    h = torch.randn(2, 5, 4, requires_grad=True)
    y = torch.randint(0, 9, (2, 5))
    y[0, :2] = -100
    loss = 0.5 * head.vocab_parallel_loss(h, y.int(), softcap=3.0, chunk_size=3)
    got = torch.autograd.grad(loss, (h, head.weight, head.bias))
    want_loss = 0.5 * F.cross_entropy(_capped(lin(h), 3.0).reshape(-1, 9), y.reshape(-1))
    want = torch.autograd.grad(want_loss, (h, lin.weight, lin.bias))
    torch.testing.assert_close(loss, want_loss)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
