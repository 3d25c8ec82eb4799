"""The batched reference sampler (llmkern/reference/sampling.py) against the previous per-row reference.

The per-row code below is a verbatim copy of the reference as it was before it was vectorised over the
batch (a Python loop over rows, host reads of every parameter). It is kept here only as the oracle that
proves the batched code gives bit-identical results: tokens, logprobs (bit patterns, -0.0 included),
valid flags and filtered logits. It is not the semantics' definition; the module under test is.
"""
import math

import pytest
import torch

import llmkern
import llmkern.reference
from llmkern.reference import sampling as ref


# ---- the previous per-row reference (oracle; do not use elsewhere) ---------------------------------------

def _old_keep_mask(y, top_k, top_p, min_p):
    """Boolean [B, V]: which processed logits survive top-k, top-p, min-p (HF order)."""
    B, V = y.shape
    keep = torch.ones_like(y, dtype=torch.bool)
    for r in range(B):
        row = y[r]
        m = row.max()
        if m == float("-inf"):
            continue
        k = int(top_k[r])
        kth = torch.topk(row, k).values[-1] if 0 < k < V else float("-inf")
        keep[r] &= row >= kth
        e = torch.where(row == m, torch.ones_like(row), torch.exp(row - m))
        e = torch.where(keep[r], e, torch.zeros_like(e))
        p = float(top_p[r])
        if p < 1.0:
            asc, _ = torch.sort(row)
            e_asc = torch.where(asc == m, torch.ones_like(asc), torch.exp(asc - m))
            e_asc = torch.where(asc >= kth, e_asc, torch.zeros_like(e_asc))
            cum = torch.cumsum(e_asc, 0)
            z = cum[-1]
            last_le = torch.searchsorted(asc, row, right=True) - 1  # last position holding <= v
            mass_above = z - cum[last_le]
            # (the top group is always kept: p rounded to 0 in float32 keeps it, as the kernels do)
            keep[r] &= (mass_above < p * z) | (mass_above == 0)
        mp = float(min_p[r])
        if mp > 0:
            keep[r] &= e >= mp
    return keep


def _old_filter_logits(logits, top_k, top_p, min_p, filter_value=float("-inf")):
    y = torch.nan_to_num(logits.double(), nan=float("-inf"))
    keep = _old_keep_mask(y, top_k, top_p, min_p)
    return torch.where(keep, logits, torch.full_like(logits, filter_value))


def _old_sample(logits, temperature, top_k, top_p, min_p, seed, position, logit_bias=None, allowed=None):
    B, V = logits.shape
    y = ref._process(logits, temperature, logit_bias, allowed)  # (unchanged: it was batched already)
    keep = _old_keep_mask(y, top_k, top_p, min_p)
    tokens = torch.zeros(B, dtype=torch.long)
    logprobs = torch.full((B,), float("-inf"), dtype=torch.float32)
    valid = torch.zeros(B, dtype=torch.bool)
    for r in range(B):
        row = y[r]
        m = row.max()
        if m == float("-inf"):
            continue
        valid[r] = True
        e = torch.where(row == m, torch.ones_like(row), torch.exp(row - m))
        if float(temperature[r]) == 0.0:
            tokens[r] = int(torch.nonzero(row == m)[0])
            logprobs[r] = -math.log(float(e.sum()))
            continue
        e = torch.where(keep[r], e, torch.zeros_like(e))
        cdf = torch.cumsum(e, 0)
        u = ref.philox_uniform(int(seed[r]), int(position[r]))
        tok = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype), right=True)[0])
        tok = min(tok, V - 1)
        tokens[r] = tok
        d = 0.0 if row[tok] == m else float(row[tok] - m)  # (+inf maximum: 0, not inf - inf)
        logprobs[r] = d - math.log(float(cdf[-1]))
    dev = logits.device
    return tokens.to(dev), logprobs.to(dev), valid.to(dev)


# ---- random configurations -------------------------------------------------------------------------------

def _logits(B, V, gen):
    kind = int(torch.randint(0, 6, (), generator=gen))
    scale = float(torch.rand((), generator=gen)) * 8
    x = torch.randn(B, V, generator=gen, dtype=torch.float64) * scale
    if kind == 1:  # heavy ties
        x = x.round()
    elif kind == 2:  # a few dominant tokens
        x[:, torch.randint(0, V, (min(3, V),), generator=gen)] += 15
    elif kind == 3:  # coarse ties at a small scale: whole tie groups at the top-p boundary
        x = (x * 2).round() / 2
    x = x.float()
    special = torch.rand(B, V, generator=gen)
    p_special = float(torch.rand((), generator=gen)) * 0.4
    x[special < p_special * 0.5] = float("-inf")
    x[(special >= p_special * 0.5) & (special < p_special * 0.7)] = float("nan")
    if float(torch.rand((), generator=gen)) < 0.15:  # some +inf maxima (tied or not)
        x[special > 1 - p_special * 0.05] = float("inf")
    for r in range(B):
        if float(torch.rand((), generator=gen)) < 0.12:  # all -inf (or NaN) rows
            x[r] = float("-inf") if r % 2 else float("nan")
    dtype = (torch.float32, torch.float16, torch.bfloat16)[int(torch.randint(0, 3, (), generator=gen))]
    return x.to(dtype)


def _params(B, V, gen):
    def pick(choices, n=B):
        return [choices[int(i)] for i in torch.randint(0, len(choices), (n,), generator=gen)]

    t = torch.tensor(pick([0.0, 0.0, 1.0, 0.7, 1.5, 0.05, 1e-3, 3.0]), dtype=torch.float32)
    t = torch.where(t == 1.5, torch.rand(B, generator=gen) * 2 + 0.01, t)
    k = torch.tensor(pick([0, 0, 1, 2, 5, V - 1, V, V + 7, 2**62]), dtype=torch.int64)
    k = torch.where(k == 5, torch.randint(1, V + 1, (B,), generator=gen), k)
    p = torch.tensor(pick([1.0, 1.0, 0.9, 0.5, 1e-6, 1e-30, 0.3]), dtype=torch.float32)
    p = torch.where(p == 0.3, torch.rand(B, generator=gen).clamp_min(1e-3), p)
    mp = torch.tensor(pick([0.0, 0.0, 0.05, 0.5, 1.0, 0.2]), dtype=torch.float32)
    mp = torch.where(mp == 0.2, torch.rand(B, generator=gen) * 0.3, mp)
    seed = torch.randint(-2**63, 2**63 - 1, (B,), generator=gen, dtype=torch.int64)
    pos = torch.randint(0, 2**63 - 1, (B,), generator=gen, dtype=torch.int64)
    pos = torch.where(torch.rand(B, generator=gen) < 0.5, pos % 5000, pos)
    return t, k, p, mp, seed, pos


_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


def _bits(t):
    """The bit patterns of a float tensor (NaN equals NaN, -0.0 differs from 0.0), other tensors as they are."""
    return t.view(_INT_OF[t.dtype]) if t.dtype in _INT_OF else t


def _assert_same(new, old):
    for a, b in zip(new, old):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
        assert torch.equal(_bits(a), _bits(b)), (a, b)


def _config(i):
    gen = torch.Generator().manual_seed(1000 + i)
    B = int(torch.randint(1, 10, (), generator=gen))
    V = int(torch.randint(1, 301, (), generator=gen))
    x = _logits(B, V, gen)
    bias = allowed = None
    if float(torch.rand((), generator=gen)) < 0.3:
        bias = torch.randn(*((B, V) if i % 2 else (V,)), generator=gen) * 2
        if V > 1:
            bias[..., 0] = float("-inf")
    if float(torch.rand((), generator=gen)) < 0.3:
        allowed = torch.rand(*((B, V) if i % 3 else (V,)), generator=gen) < 0.6
    return x, _params(B, V, gen), bias, allowed


@pytest.mark.parametrize("chunk", range(8))
def test_sample_and_filter_equal_the_per_row_reference(chunk):
    for i in range(chunk * 50, chunk * 50 + 50):  # 400 configurations in all
        x, (t, k, p, mp, seed, pos), bias, allowed = _config(i)
        new = ref.sample(x, t, k, p, mp, seed, pos, logit_bias=bias, allowed=allowed)
        old = _old_sample(x, t, k, p, mp, seed, pos, logit_bias=bias, allowed=allowed)
        _assert_same(new, old)
        for fv in (float("-inf"), -1000.0):
            _assert_same((ref.filter_logits(x, k, p, mp, fv),), (_old_filter_logits(x, k, p, mp, fv),))
        # the keep mask itself, on processed logits (the sampler's view)
        y = ref._process(x, t, bias, allowed)
        assert torch.equal(ref._keep_mask(y, k, p, mp), _old_keep_mask(y, k, p, mp))


@pytest.mark.parametrize("kw", [dict(), dict(top_k=0, top_p=1.0, min_p=0.0), dict(temperature=0.0, top_k=5),
                                dict(temperature=0.7, top_k=10 ** 6)])
def test_unfiltered_calls_skip_the_keep_mask_with_the_same_result(monkeypatch, kw):
    """llmkern.sample on the reference backend with top-k / top-p / min-p off (or every row greedy), known from
    Python numbers, skips the keep mask (a float64 sort of every row: 4-6x the time of such a call); the tokens
    and logprobs are those of the filtered path and of the per-row reference."""
    monkeypatch.setenv("LLMKERN_BACKEND", "reference")
    calls, ran = [], []
    real, real_sample = ref._keep_mask, ref.sample
    monkeypatch.setattr(ref, "_keep_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(llmkern.reference, "sample", lambda *a, **k: ran.append(1) or real_sample(*a, **k))
    for i in range(20):
        x, (t, k, p, mp, seed, pos), bias, allowed = _config(i)
        T = kw.get("temperature", 1.0)
        got = llmkern.sample(x, **kw, seed=seed, position=pos, logit_bias=bias, allowed_tokens=allowed,
                             return_logprobs=True, return_valid=True)
        B, V = x.shape
        row = lambda v, dt: torch.full((B,), v, dtype=dt)  # noqa: E731
        want = _old_sample(x, row(T, torch.float32), row(kw.get("top_k", 0), torch.int64),
                           row(kw.get("top_p", 1.0), torch.float32), row(kw.get("min_p", 0.0), torch.float32),
                           seed, pos, logit_bias=bias, allowed=allowed)
        _assert_same(got, want)
    assert calls == [] and len(ran) == 20  # (the reference ran, without its keep mask)


def test_row_chunks_give_the_same_result():
    """Large batches go in chunks of rows (bounded float64 temporaries): the same bits as one piece, with per-row
    and shared ([V]) logit_bias / allowed."""
    for i in range(6):
        x, (t, k, p, mp, seed, pos), bias, allowed = _config(i)
        whole = ref.sample(x, t, k, p, mp, seed, pos, logit_bias=bias, allowed=allowed)
        chunked = ref.sample(x, t, k, p, mp, seed, pos, logit_bias=bias, allowed=allowed,
                             chunk_elements=2 * x.shape[1])  # two rows a chunk
        _assert_same(chunked, whole)


def test_float64_filter_equals_the_per_row_reference():
    """filter_logits on float64 scores (the transformers integration's path: no float32 rounding)."""
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        B, V = int(torch.randint(1, 10, (), generator=gen)), int(torch.randint(1, 301, (), generator=gen))
        x = torch.randn(B, V, generator=gen, dtype=torch.float64) * 1e3
        x[torch.rand(B, V, generator=gen) < 0.1] = float("-inf")
        _, k, p, mp, _, _ = _params(B, V, gen)
        _assert_same((ref.filter_logits(x, k, p, mp),), (_old_filter_logits(x, k, p, mp),))


def test_large_vocab_equals_the_per_row_reference():
    gen = torch.Generator().manual_seed(9)
    B, V = 4, 50000
    x = torch.randn(B, V, generator=gen) * 3
    x[1] = x[1].round()
    t = torch.tensor([0.0, 0.8, 1.0, 0.0])
    k = torch.tensor([0, 1000, 0, 40])
    p = torch.tensor([0.9, 0.95, 1.0, 0.5])
    mp = torch.tensor([0.0, 0.0, 0.02, 0.0])
    seed = torch.tensor([1, -2, 2**62, -2**63])
    pos = torch.tensor([0, 7, 2**40, 3])
    _assert_same(ref.sample(x, t, k, p, mp, seed, pos), _old_sample(x, t, k, p, mp, seed, pos))
    _assert_same((ref.filter_logits(x, k, p, mp),), (_old_filter_logits(x, k, p, mp),))


def test_edge_rows():
    """All -inf, all NaN, +inf maxima (one, tied), V = 1, temperature 0 with ties (first maximum)."""
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[-inf, -inf, -inf], [nan, nan, nan], [1.0, inf, 2.0], [inf, 0.0, inf],
                      [3.0, 1.0, 3.0], [3.0, 1.0, 3.0], [-inf, 5.0, -inf]])
    B = x.shape[0]
    t = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.0, 1.0, 0.0])
    k, p, mp = torch.zeros(B, dtype=torch.long), torch.ones(B), torch.zeros(B)
    seed, pos = torch.arange(B), torch.zeros(B, dtype=torch.long)
    new = ref.sample(x, t, k, p, mp, seed, pos)
    _assert_same(new, _old_sample(x, t, k, p, mp, seed, pos))
    tok, lp, valid = new
    assert valid.tolist() == [False, False, True, True, True, True, True]
    assert tok[:2].tolist() == [0, 0] and lp[:2].isneginf().all()
    assert tok[2] == 1 and lp[2] == 0.0 and tok[3] in (0, 2) and tok[4] == 0 and tok[6] == 1
    one = torch.tensor([[0.5]])
    z = torch.zeros(1)
    args = (torch.zeros(1, dtype=torch.long), z + 0.5, z + 0.9, torch.ones(1, dtype=torch.long), z.long())
    _assert_same(ref.sample(one, z + 1, *args), _old_sample(one, z + 1, *args))


def test_empty_batch_and_no_gradient():
    z = torch.zeros(0)
    tok, lp, valid = ref.sample(torch.randn(0, 7), z, z.long(), z + 1, z, z.long(), z.long())
    assert tok.shape == lp.shape == valid.shape == (0,)
    assert ref.filter_logits(torch.randn(0, 7), z.long(), z + 0.5, z).shape == (0, 7)
    # the sampler's outputs carry no gradient (the C++ op marks them non-differentiable); the filter passes it
    x = torch.randn(3, 20, requires_grad=True)
    one = torch.ones(3)
    out = ref.sample(x, one, one.long(), one * 0.9, one * 0, one.long(), one.long(), logit_bias=torch.randn(20))
    assert not any(t.requires_grad for t in out)
    ref.filter_logits(x, one.long() * 5, one * 0.9, one * 0).sum().backward()
    assert x.grad.sum() > 0


def test_top_p_zero_keeps_the_top_group():
    """top_p that rounds to 0 (not a valid argument of llmkern.sample, but the reference takes it): the top tie
    group is kept, as the kernels do."""
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.0, -1.0, -2.0, 5.0], [-1.0, -1.0, -1.0, -1.0]])
    B = x.shape[0]
    k, p, mp = torch.tensor([0, 2, 0]), torch.zeros(B), torch.zeros(B)
    out = ref.filter_logits(x, k, p, mp)
    _assert_same((out,), (_old_filter_logits(x, k, p, mp),))
    assert out.isfinite().tolist() == [[False, True, True, False], [False, False, False, True], [True] * 4]
    t, seed, pos = torch.ones(B), torch.arange(B), torch.zeros(B, dtype=torch.long)
    new = ref.sample(x, t, k, p, mp, seed, pos)
    _assert_same(new, _old_sample(x, t, k, p, mp, seed, pos))
    assert new[0][0].item() in (1, 2) and new[0][1].item() == 3


# ---- Philox: tensor version vs the scalar definition -------------------------------------------------------

def test_philox_tensor_equals_scalar():
    gen = torch.Generator().manual_seed(3)
    n = 2000
    seeds = torch.randint(-2**63, 2**63 - 1, (n,), generator=gen, dtype=torch.int64)
    pos = torch.randint(-2**63, 2**63 - 1, (n,), generator=gen, dtype=torch.int64)
    small = torch.randint(0, 2**20, (n,), generator=gen, dtype=torch.int64)
    edges = torch.tensor([0, 1, -1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, -2**31, -2**32, 2**62,
                          2**63 - 1, 2**63 - 2, -2**63, -2**63 + 1, 0x5A4D504C, -0x5A4D504C])
    grid_s, grid_p = torch.meshgrid(edges, edges, indexing="ij")
    cases = [(seeds, pos), (seeds, small), (small, pos), (grid_s.flatten(), grid_p.flatten()),
             (2**63 - 1 - small, 2**63 - 1 - small), (-2**63 + small, small)]
    for s, p in cases:
        got = ref.philox_uniform_tensor(s, p)
        assert got.dtype == torch.float64 and got.shape == s.shape
        want = torch.tensor([ref.philox_uniform(a, b) for a, b in zip(s.tolist(), p.tolist())],
                            dtype=torch.float64)
        assert torch.equal(got, want)
        assert ((got >= 0) & (got < 1)).all()
    # the seed is its uint64 bit pattern: a negative int64 seed is the same seed as its uint64 value
    assert ref.philox_uniform_tensor(torch.tensor([-1]), torch.tensor([5])).item() == ref.philox_uniform(2**64 - 1, 5)


def test_philox_tensor_matches_the_speculative_op():
    from llmkern.ops.speculative import philox_uniform

    gen = torch.Generator().manual_seed(4)
    s = torch.randint(-2**63, 2**63 - 1, (500,), generator=gen, dtype=torch.int64)
    p = torch.randint(0, 2**63 - 1, (500,), generator=gen, dtype=torch.int64)
    assert torch.equal(ref.philox_uniform_tensor(s, p), philox_uniform(s, p))


# ---- no host reads: the reference backend compiles whole ----------------------------------------------------

def test_reference_sample_compiles_fullgraph(monkeypatch):
    """LLMKERN_BACKEND=reference: llmkern.sample and top_k_top_p_filter compile whole (fullgraph, Inductor) with
    tensor parameters, penalties, a bias and a packed allowed mask; the compiled calls give the eager ones'
    tokens and valid flags, and their logprobs to rounding (Inductor's exp / log need not be eager's bits)."""
    monkeypatch.setenv("LLMKERN_BACKEND", "reference")
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(8)
    B, V = 5, 97
    t = torch.tensor([0.0, 0.8, 1.0, 1.2, 0.5])
    k = torch.tensor([0, 5, 0, 3, 1000])
    p = torch.tensor([1.0, 0.9, 0.5, 1.0, 0.2])
    seed = torch.tensor([1, -5, 2**62, 7, -2**63])
    pos = torch.tensor([0, 3, 2**40, 9, 1])
    prev = torch.randint(-1, V, (B, 6), generator=gen)
    bias = torch.randn(V, generator=gen)
    allowed = torch.randint(-2**31, 2**31 - 1, (B, (V + 31) // 32), generator=gen, dtype=torch.int32)

    def f(x, t, k, p, seed, pos):
        return llmkern.sample(x, temperature=t, top_k=k, top_p=p, min_p=0.01, seed=seed, position=pos,
                              prev_tokens=prev, repetition_penalty=1.3, presence_penalty=0.5, logit_bias=bias,
                              allowed_tokens=allowed, return_logprobs=True, return_valid=True)

    def g(x, k, p):
        return llmkern.top_k_top_p_filter(x, k, p, 0.02)

    compiled_f, compiled_g = torch.compile(f, fullgraph=True), torch.compile(g, fullgraph=True)
    for step in range(3):
        x = torch.randn(B, V, generator=gen) * 2
        x[3] = float("-inf")
        x[4, 7] = float("inf")
        x[1] = x[1].round()
        got, want = compiled_f(x, t, k, p, seed, pos + step), f(x, t, k, p, seed, pos + step)
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
        assert torch.equal(compiled_g(x, k, p), g(x, k, p))
    # without a seed the draws come from torch's generator, compiled too
    h = torch.compile(lambda x: llmkern.sample(x, temperature=0.7, top_p=0.8), fullgraph=True)
    torch.manual_seed(3)
    a = h(x)
    torch.manual_seed(3)
    assert torch.equal(a, h(x))
