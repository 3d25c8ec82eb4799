"""Label smoothing, z-loss and out-of-range labels in the cross-entropy family.

llmkern.cross_entropy, llmkern.linear_cross_entropy and VocabParallelLMHead.vocab_parallel_loss against
F.cross_entropy(label_smoothing=eps) in float64 (on the soft-capped logits where softcap is given: torch has no
softcap) plus the z-loss of PaLM / Liger-Kernel, z_loss * logsumexp^2 over the rows not ignored, written out here
independently; the kernels under the interpreter (64-wide vocabulary chunks: several chunks and a partial last
one), the CPU reference path, and two gloo ranks for the vocabulary-parallel loss (one spawn). Out-of-range labels
must raise where the op cannot read them (torch.compile; CUDA, emulated by the no-read path), not be ignored.
"""
import pytest
import torch
import torch.nn.functional as F

import llmkern
from llmkern.ops import _checks
from llmkern.ops import cross_entropy as _ce_ops  # noqa: F401 (registers the llmkern::cross_entropy ops)
from llmkern.testing import triton_device

DEV = triton_device()
needs_triton = pytest.mark.skipif(DEV is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
IGNORE = -100


def _oracle(logits, labels, *, ignore_index=IGNORE, reduction="mean", softcap=None, label_smoothing=0.0,
            z_loss=0.0):
    """(loss, z-term) in float64: torch's label smoothing on the capped logits, plus z_loss * lse^2 of the rows
    not ignored, reduced as torch reduces the loss (mean: over the rows not ignored)."""
    V = logits.shape[-1]
    z = logits.reshape(-1, V).double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    y = labels.reshape(-1).long()
    loss = F.cross_entropy(z, y, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    keep = (y != ignore_index).double()
    z_rows = z_loss * torch.logsumexp(z, dim=-1) ** 2 * keep
    z_term = {"mean": z_rows.sum() / keep.sum(), "sum": z_rows.sum(), "none": z_rows}[reduction]
    loss = loss + z_term
    if reduction == "none":
        return loss.reshape(logits.shape[:-1]), z_term.reshape(logits.shape[:-1])
    return loss, z_term


def _labels(shape, V, n_ignored, gen, ignore_index=IGNORE):
    y = torch.randint(0, V, shape, generator=gen)
    y.view(-1)[torch.randperm(y.numel(), generator=gen)[:n_ignored]] = ignore_index
    return y


def _compare_ce(x, y, tol, **kw):
    """Loss, z-term and dlogits (a non-unit upstream gradient) of llmkern.cross_entropy vs the oracle."""
    x = x.detach().requires_grad_()
    out, z_term = llmkern.cross_entropy(x, y, return_z_loss=True, **kw)
    xd = x.detach().double().requires_grad_()
    want, want_z = _oracle(xd, y, **kw)
    assert out.dtype == torch.float32 and out.shape == want.shape and z_term.shape == want.shape
    assert not z_term.requires_grad
    torch.testing.assert_close(out.double(), want.detach(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(z_term.double(), want_z.detach(), atol=2e-5, rtol=2e-5)
    gen = torch.Generator().manual_seed(3)
    up = torch.rand(out.shape, generator=gen) + 0.5 if out.dim() else torch.tensor(1.7)
    (g,) = torch.autograd.grad(out, x, up)
    (wg,) = torch.autograd.grad(want, xd, up.double())
    assert g.dtype == x.dtype
    torch.testing.assert_close(g.double(), wg, **tol)


# (eps, z_loss, reduction, softcap, ignore_index): every reduction, with and without a softcap, ignored rows
CASES = [
    (0.1, 0.0, "mean", None, IGNORE),
    (0.25, 0.0, "sum", 3.0, IGNORE),
    (1.0, 0.0, "none", None, 4),          # eps = 1: the uniform target only; ignore_index inside [0, V)
    (0.2, 1e-2, "mean", 2.5, IGNORE),
    (0.0, 1e-1, "none", 3.0, IGNORE),     # the z-loss alone
    (0.3, 1e-2, "sum", None, IGNORE),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernels_label_smoothing_and_z_loss_match_torch(triton_backend, dtype):
    gen = torch.Generator().manual_seed(0)
    tol = dict(atol=1e-6, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-4, rtol=1e-2)
    for eps, lam, reduction, softcap, ignore_index in CASES:
        x = (torch.randn(5, 70, generator=gen) * 3).to(device=DEV, dtype=dtype)  # a whole chunk, a partial one
        y = _labels((5,), 70, 2, gen, ignore_index).to(DEV)
        _compare_ce(x, y, tol, label_smoothing=eps, z_loss=lam, reduction=reduction, softcap=softcap,
                    ignore_index=ignore_index)
    # a [B, T, V] slice read in place (the two-stride path) and int32 labels
    base = torch.randn(2, 3, 70, generator=gen).to(device=DEV, dtype=dtype)
    y = _labels((2, 2), 70, 1, gen).to(device=DEV, dtype=torch.int32)
    _compare_ce(base[:, 1:], y, tol, label_smoothing=0.15, z_loss=1e-3, reduction="none")


def test_reference_path_label_smoothing_and_z_loss_match_torch(monkeypatch):
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)  # the CPU default: the reference
    gen = torch.Generator().manual_seed(1)
    for eps, lam, reduction, softcap, ignore_index in CASES:
        x = torch.randn(2, 4, 33, generator=gen) * 2
        y = _labels((2, 4), 33, 2, gen, ignore_index)
        _compare_ce(x, y, dict(atol=1e-6, rtol=1e-4), label_smoothing=eps, z_loss=lam, reduction=reduction,
                    softcap=softcap, ignore_index=ignore_index)


@needs_triton
def test_label_smoothing_keeps_large_logits_shift_invariant(triton_backend):
    """The kernels sum the logits relative to the label's: with a mean logit of 1e5 a plain float32 sum of the
    logits, then lse - mean, loses the loss to rounding."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 200, generator=gen)
    y = _labels((5,), 200, 1, gen).to(DEV)
    want = llmkern.cross_entropy(x.to(DEV), y, label_smoothing=0.3, reduction="none")
    got = llmkern.cross_entropy((x + 1e5).to(DEV), y, label_smoothing=0.3, reduction="none")
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)  # (float32's ulp at 1e5 is 0.0078)
    torch.testing.assert_close(want.double(), _oracle(x, y.cpu(), reduction="none", label_smoothing=0.3)[0],
                               atol=1e-5, rtol=1e-5)


def _lce_oracle(h, w, b, y, **kw):
    return _oracle(F.linear(h, w, b), y, **kw)


@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_linear_cross_entropy_label_smoothing_and_z_loss(monkeypatch, path):
    if path == "kernels":
        if DEV is None:
            pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    else:
        monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    gen = torch.Generator().manual_seed(4)
    N, d, V = 12, 16, 70
    for eps, lam, reduction, softcap, chunk in ((0.1, 1e-2, "mean", None, 5), (0.4, 0.0, "sum", 3.0, 7),
                                                (0.0, 1e-1, "mean", 2.0, None)):
        h = torch.randn(N, d, generator=gen).requires_grad_()
        w = (torch.randn(V, d, generator=gen) * 0.5).requires_grad_()
        b = torch.randn(V, generator=gen).requires_grad_()
        y = _labels((N,), V, 3, gen)
        kw = dict(label_smoothing=eps, z_loss=lam, reduction=reduction, softcap=softcap)
        got, z_term = llmkern.linear_cross_entropy(h, w, y, bias=b, chunk_size=chunk, return_z_loss=True, **kw)
        grads = torch.autograd.grad(got * 1.7, (h, w, b))
        dd = [t.detach().double().requires_grad_() for t in (h, w, b)]
        want, want_z = _lce_oracle(*dd, y, **kw)
        wants = torch.autograd.grad(want * 1.7, dd)
        torch.testing.assert_close(got.double(), want.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(z_term.double(), want_z.detach(), atol=1e-6, rtol=1e-5)
        for name, g, wg in zip("hwb", grads, wants):
            torch.testing.assert_close(g.double(), wg, atol=1e-6, rtol=1e-4, msg=f"d{name} {kw}")
    # the loss alone without return_z_loss, and no gradient asked for
    with torch.no_grad():
        alone = llmkern.linear_cross_entropy(h, w, y, bias=b, **kw)
    torch.testing.assert_close(alone, got.detach())


def test_bad_label_smoothing_and_z_loss_are_refused():
    x, y = torch.randn(3, 5), torch.tensor([0, 1, 4])
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    calls = (lambda **kw: llmkern.cross_entropy(x, y, **kw),
             lambda **kw: llmkern.linear_cross_entropy(h, w, y, **kw))
    for call in calls:
        for value in (-0.1, 1.5, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="label_smoothing"):
                call(label_smoothing=value)
        for value in ("0.1", None, True):
            with pytest.raises(TypeError, match="label_smoothing"):
                call(label_smoothing=value)
        for value in (-1e-3, float("inf"), 1e39):
            with pytest.raises(ValueError, match="z_loss"):
                call(z_loss=value)
        with pytest.raises(TypeError, match="z_loss"):
            call(z_loss="1e-4")
        with pytest.raises(TypeError, match="return_z_loss"):
            call(return_z_loss="yes")
        call(label_smoothing=1, z_loss=0)  # ints are fine, as torch takes them


@needs_triton
def test_new_arguments_under_opcheck_and_torch_compile(triton_backend):
    """The ops' schemas gained label_smoothing and z_loss (defaults 0: old calls keep working) and the fused
    linear op a fifth output (the z-term); the compiled call equals the eager one."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 70, generator=gen).to(DEV).requires_grad_()
    y = _labels((4,), 70, 1, gen).to(DEV)
    torch.library.opcheck(torch.ops.llmkern.cross_entropy_fwd.default, (x, y, IGNORE, 2.0, "mean", 0.1, 0.01))
    _, lse, n, _ = torch.ops.llmkern.cross_entropy_fwd(x.detach(), y, IGNORE, 0.0, "none", 0.2, 0.01)
    torch.library.opcheck(torch.ops.llmkern.cross_entropy_bwd.default,
                          (torch.rand(4, generator=gen).to(DEV), x.detach(), y, lse, n, IGNORE, 0.0, "none", 0.2,
                           0.01))
    h, w = torch.randn(4, 8, generator=gen).requires_grad_(), torch.randn(70, 8, generator=gen).requires_grad_()
    torch.library.opcheck(torch.ops.llmkern.linear_cross_entropy_fwd.default,
                          (h, w, None, y.cpu(), IGNORE, 0.0, "sum", 3, True, True, False, 0.3, 0.02))

    def f(a, b):
        loss, z_term = llmkern.cross_entropy(a, b, label_smoothing=0.1, z_loss=0.01, softcap=5.0, return_z_loss=True)
        return loss + z_term

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, y)
    (g,) = torch.autograd.grad(got, x)
    want = f(x, y)
    (wg,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, wg)


# ---- out-of-range labels where the op cannot read them ----------------------------------------------------------

@needs_triton
def test_out_of_range_labels_raise_under_torch_compile(triton_backend):
    """The kernels count a row whose label is outside [0, V) as ignored: eager CPU calls read the labels and raise,
    but a compiled call read nothing and returned a silently wrong loss."""
    torch._dynamo.reset()
    x = torch.randn(4, 40, device=DEV)
    h, w = torch.randn(4, 8, device=DEV), torch.randn(40, 8, device=DEV)
    ce = torch.compile(lambda a, b: llmkern.cross_entropy(a, b), fullgraph=True, backend="aot_eager")
    lce = torch.compile(lambda a, b, c: llmkern.linear_cross_entropy(a, b, c), fullgraph=True, backend="aot_eager")
    good = torch.tensor([3, IGNORE, 39, 0], device=DEV)
    torch.testing.assert_close(ce(x, good), F.cross_entropy(x, good))
    torch.testing.assert_close(lce(h, w, good), F.cross_entropy(h @ w.t(), good))
    for bad in ([3, 40, 1, 0], [3, -1, 1, 0]):
        bad = torch.tensor(bad, device=DEV)
        with pytest.raises(RuntimeError, match=r"labels must be in \[0, 40\)"):
            ce(x, bad)
        with pytest.raises(RuntimeError, match=r"labels must be in \[0, 40\)"):
            lce(h, w, bad)


@needs_triton
def test_out_of_range_labels_raise_where_values_are_not_read(triton_backend, monkeypatch):
    """The path of CUDA tensors and CUDA graph capture (no host read), emulated on the CPU: the check is an
    assert_async that raises when it runs; inside trusted() nothing is checked."""
    monkeypatch.setattr(_checks, "checking_values", lambda: False)
    x = torch.randn(3, 20, device=DEV)
    bad = torch.tensor([1, 20, IGNORE], device=DEV)
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 20\) or equal ignore_index \(-100\)"):
        llmkern.cross_entropy(x, bad)
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 20\)"):
        llmkern.linear_cross_entropy(torch.randn(3, 4), torch.randn(20, 4), bad)
    ok = torch.tensor([1, 19, IGNORE], device=DEV)
    torch.testing.assert_close(llmkern.cross_entropy(x, ok), F.cross_entropy(x, ok))
    with _checks.trusted():  # (the caller vouches for the values: no check, the kernels' semantics)
        llmkern.cross_entropy(x, bad)


@needs_triton
def test_forward_kernel_counts_out_of_range_labels(triton_backend):
    """The forward kernel counts the labels neither in [0, V) nor ignore_index (the ops' one assert_async reads
    that count): compared as int64, so an int32 -100 is not ignore_index 2**32 - 100 nor 2**40; a count passed in
    is added to (linear_cross_entropy's chunks share one)."""
    from llmkern.kernels.cross_entropy import cross_entropy_forward

    V = 20
    x = torch.randn(7, V, device=DEV)
    values = [3, V, -1, IGNORE, 5, 2**31 - 1, 0]
    for dtype in (torch.int64, torch.int32):
        y = torch.tensor(values, device=DEV, dtype=dtype)
        for ignore_index in (IGNORE, 5, 2**32 - 100, 2**40):
            want = sum(not 0 <= v < V and v != ignore_index for v in values)
            _, _, bad = cross_entropy_forward(x, y, ignore_index=ignore_index)
            assert bad.dtype == torch.int32 and bad.shape == ()
            assert int(bad) == want, (dtype, ignore_index)
        acc = torch.full((), 2, device=DEV, dtype=torch.int32)
        assert cross_entropy_forward(x[:3], y[:3], bad_count=acc)[2] is acc
        assert int(acc) == 4  # 2 + the chunk's V and -1


# ---- the vocabulary-parallel loss on two gloo ranks -------------------------------------------------------------

def vocab_worker(rank, world_size):
    from llmkern.parallel.vocab import VocabParallelLMHead, shard_rows

    gen = torch.Generator().manual_seed(7)
    N, d, V = 10, 8, 37  # (not divisible by 2: the last shard has a padded row)
    full = torch.nn.Linear(d, V)
    with torch.no_grad():
        full.weight.copy_(torch.randn(V, d, generator=gen) * 0.5)
        full.bias.copy_(torch.randn(V, generator=gen))
    head = VocabParallelLMHead.from_linear(full, None)
    lo, hi, _ = shard_rows(V, None)
    out = {}
    for eps, lam, cap, chunk in ((0.1, 0.0, None, 4), (0.3, 1e-2, 3.0, None), (0.0, 5e-2, None, 3)):
        h0 = torch.randn(2, N // 2, d, generator=gen)
        y = torch.randint(0, V, (2, N // 2), generator=gen)
        y[0, 1] = y[1, 3] = -100
        head.zero_grad()
        h = h0.clone().requires_grad_()
        loss, z_term = head.vocab_parallel_loss(h, y, chunk_size=chunk, softcap=cap, label_smoothing=eps, z_loss=lam,
                                                return_z_loss=True)
        (loss * 1.7).backward()
        hd = h0.double().requires_grad_()
        wd, bd = full.weight.detach().double().requires_grad_(), full.bias.detach().double().requires_grad_()
        want, want_z = _lce_oracle(hd, wd, bd, y, softcap=cap, label_smoothing=eps, z_loss=lam)
        (want * 1.7).backward()
        with torch.no_grad():
            alone = head.vocab_parallel_loss(h0, y, chunk_size=chunk, softcap=cap, label_smoothing=eps, z_loss=lam)
        out[(eps, lam, cap)] = dict(
            loss=abs(loss.item() - want.item()), z=abs(z_term.item() - want_z.item()),
            no_grad=abs(alone.item() - want.item()), z_grad=z_term.requires_grad,
            dh=(h.grad.double() - hd.grad).abs().max().item(),
            dw=(head.weight.grad[:hi - lo].double() - wd.grad[lo:hi]).abs().max().item(),
            db=(head.bias.grad[:hi - lo].double() - bd.grad[lo:hi]).abs().max().item(),
            pad=head.weight.grad[hi - lo:].abs().max().item() if head.weight.grad.shape[0] > hi - lo else 0.0)
    errors = []
    for kw in (dict(label_smoothing=1.2), dict(label_smoothing="0.1"), dict(z_loss=-1.0), dict(return_z_loss=2)):
        try:
            head.vocab_parallel_loss(torch.randn(3, d), torch.tensor([0, 1, 2]), **kw)
            errors.append(None)
        except (TypeError, ValueError) as e:
            errors.append(str(e))
    out["errors"] = errors
    return out


def test_vocab_parallel_loss_label_smoothing_and_z_loss_match_unsharded(pool2):
    results = pool2.run(vocab_worker, timeout=120)
    for res in results:
        errors = res.pop("errors")
        for name, message in zip(("label_smoothing", "label_smoothing", "z_loss", "return_z_loss"), errors):
            assert message is not None and name in message, (name, message)
        for key, r in res.items():
            assert r["loss"] < 1e-5 and r["z"] < 1e-6 and r["no_grad"] < 1e-5 and not r["z_grad"], (key, r)
            assert max(r["dh"], r["dw"], r["db"]) < 1e-5 and r["pad"] == 0.0, (key, r)
