"""Serving-side ops audit (session 25): the sampler's filter value, flags and argument messages.

Every case here failed before its fix; all are CPU-only and take well under a second.
"""
import pytest
import torch

import llmkern
from llmkern import _backend

pytestmark = pytest.mark.skipif(not _backend.has_kernel("llmkern::sample", "CPU"),
                                reason="llmkern._C not built")


@pytest.mark.parametrize("dtype,filter_value", [
    (torch.float16, -1e9),     # past float16's range: -inf, as the C++ kernel writes it
    (torch.float32, 1e39),     # past float32's range: +inf
    (torch.bfloat16, -1e9),    # in range: bfloat16's nearest value
])
def test_filter_value_is_rounded_to_the_logits_dtype_on_every_backend(monkeypatch, dtype, filter_value):
    """top_k_top_p_filter's removed entries hold filter_value in the logits' dtype (a cast, as the kernels
    round it) whichever backend runs. The reference raised torch's "cannot be converted without overflow"
    error where the C++ kernel returned the rounded value (LLMKERN_BACKEND=reference, an unbuilt extension)."""
    x = torch.randn(3, 17).to(dtype)
    want_fill = torch.tensor(filter_value, dtype=torch.float64).to(dtype)
    results = {}
    for backend in ("cpu", "reference"):
        monkeypatch.setenv("LLMKERN_BACKEND", backend)
        results[backend] = llmkern.top_k_top_p_filter(x, top_k=4, top_p=0.8, filter_value=filter_value)
    cpu, reference = results["cpu"], results["reference"]
    assert cpu.dtype == reference.dtype == dtype
    assert torch.equal(cpu, reference)
    removed = cpu != x
    assert removed.any(-1).all() and (~removed).any(-1).all()
    assert torch.equal(cpu[removed], want_fill.expand(int(removed.sum())))


def test_reference_filter_value_keeps_its_gradient_and_float64():
    """The reference's fill is a constant: the kept logits still get their gradient, float64 logits (the HF
    warper's path) keep the float64 filter value exactly."""
    from llmkern.reference.sampling import filter_logits

    x = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    k, p, mp = torch.tensor([3, 0]), torch.tensor([1.0, 0.5]), torch.zeros(2)
    y = filter_logits(x, k, p, mp, -1.2345678901234567)
    removed = y.detach() != x.detach()
    assert removed.any() and torch.all(y.detach()[removed] == -1.2345678901234567)
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad, (~removed).double())


@pytest.mark.parametrize("flag", ["return_logprobs", "return_valid"])
def test_sample_flags_must_be_bools(flag):
    """A string flag was read by truthiness: return_logprobs="False" returned (tokens, logprobs)."""
    x = torch.randn(2, 11)
    for bad in ("False", [False], 2, None):
        with pytest.raises(TypeError, match=flag):
            llmkern.sample(x, seed=0, **{flag: bad})
    # bools and the ints 0 / 1 are flags (as llmkern's other flags)
    plain = llmkern.sample(x, seed=0)
    assert torch.equal(llmkern.sample(x, seed=0, **{flag: 0}), plain)
    out = llmkern.sample(x, seed=0, **{flag: 1})
    assert isinstance(out, tuple) and len(out) == 2 and torch.equal(out[0], plain)


@pytest.mark.parametrize("name", ["seed", "position", "top_k"])
def test_bool_tensor_for_an_integer_parameter_says_integer(name):
    """A bool [B] tensor for an integer parameter said it "must be an integer or floating-point tensor", and a
    floating-point one is refused next: the message now names the one kind accepted."""
    x = torch.randn(2, 11)
    with pytest.raises(TypeError, match=f"{name} must be an integer tensor, got torch.bool"):
        llmkern.sample(x, **{name: torch.tensor([True, False])})
    with pytest.raises(TypeError, match="temperature must be an integer or floating-point tensor"):
        llmkern.sample(x, temperature=torch.tensor([True, False]))


@pytest.mark.parametrize("name,value", [("repetition_penalty", 1.3), ("presence_penalty", 0.5),
                                        ("frequency_penalty", -0.2)])
def test_a_penalty_without_prev_tokens_is_refused(name, value):
    """sample(x, repetition_penalty=1.3) with no prev_tokens returned the unpenalised draw, silently (the
    penalties count tokens of prev_tokens). A number or a tensor holding a non-neutral value now raises naming
    the penalty; the neutral values still pass."""
    x = torch.randn(2, 11)
    with pytest.raises(ValueError, match=f"{name} needs prev_tokens"):
        llmkern.sample(x, seed=0, **{name: value})
    with pytest.raises(ValueError, match=f"{name} needs prev_tokens"):
        llmkern.sample(x, seed=0, **{name: torch.tensor([1.0 if name == "repetition_penalty" else 0.0, value])})
    neutral = 1.0 if name == "repetition_penalty" else 0.0
    assert llmkern.sample(x, seed=0, **{name: torch.full((2,), neutral)}).equal(llmkern.sample(x, seed=0))
    prev = torch.tensor([[1, 2], [3, -1]])
    assert llmkern.sample(x, seed=0, prev_tokens=prev, **{name: value}).shape == (2,)
