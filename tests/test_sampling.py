"""llmkern.sample / top_k_top_p_filter on CPU: C++ kernel vs reference vs Hugging Face warpers."""
import math
import warnings

import pytest
import torch

import llmkern
import llmkern.reference as ref
from llmkern import _backend

pytestmark = pytest.mark.skipif(not _backend.has_kernel("llmkern::sample", "CPU"),
                                reason="llmkern._C not built")

hf_logits = pytest.importorskip("transformers.generation.logits_process")


def hf_filter(logits, top_k=0, top_p=1.0, min_p=0.0):
    """Hugging Face's warpers, in generate()'s order."""
    scores = logits.float().clone()
    if top_k:
        scores = hf_logits.TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = hf_logits.TopPLogitsWarper(top_p)(None, scores)
    if min_p > 0:
        scores = hf_logits.MinPLogitsWarper(min_p)(None, scores)
    return scores


def rows(kind, B, V, gen):
    if kind == "normal":
        return torch.randn(B, V, generator=gen) * 3
    if kind == "heavy":  # a few dominant tokens, long flat tail
        x = torch.randn(B, V, generator=gen)
        x[:, :3] += 12
        return x[:, torch.randperm(V, generator=gen)]
    if kind == "neginf":
        x = torch.randn(B, V, generator=gen)
        x[torch.rand(B, V, generator=gen) < 0.5] = float("-inf")
        x[:, 0] = 1.0  # at least one finite
        return x
    if kind == "ties":  # integer logits: many exact ties
        return torch.randint(-5, 5, (B, V), generator=gen).float()
    if kind == "huge":
        x = torch.randn(B, V, generator=gen)
        x[:, V // 2] = 1e4
        return x
    raise ValueError(kind)


FILTERS = [(0, 1.0, 0.0), (1, 1.0, 0.0), (5, 1.0, 0.0), (50, 1.0, 0.0), (0, 0.9, 0.0), (0, 0.3, 0.0),
           (0, 1e-6, 0.0), (20, 0.8, 0.0), (0, 1.0, 0.1), (40, 0.95, 0.05)]


@pytest.mark.parametrize("kind", ["normal", "heavy", "neginf", "huge"])
@pytest.mark.parametrize("top_k,top_p,min_p", FILTERS)
def test_filter_equals_hf_warpers(kind, top_k, top_p, min_p):
    gen = torch.Generator().manual_seed(hash((kind, top_k, top_p, min_p)) % 2**31)
    x = rows(kind, 6, 1013, gen)
    ours = llmkern.top_k_top_p_filter(x, top_k, top_p, min_p)
    theirs = hf_filter(x, top_k, top_p, min_p)
    assert torch.equal(ours.isfinite(), theirs.isfinite())
    assert torch.equal(ours[ours.isfinite()], x[ours.isfinite()])
    assert (ours.isfinite().sum(1) >= 1).all()


@pytest.mark.parametrize("top_k", [1, 3, 7, 100])
def test_topk_keeps_ties_like_hf(top_k):
    gen = torch.Generator().manual_seed(top_k)
    x = rows("ties", 8, 257, gen)
    ours = llmkern.top_k_top_p_filter(x, top_k=top_k)
    assert torch.equal(ours.isfinite(), hf_filter(x, top_k=top_k).isfinite())


def test_all_equal_row():
    x = torch.zeros(3, 64)
    assert llmkern.top_k_top_p_filter(x, top_k=5).isfinite().all()  # ties at the k-th value kept
    # the top-p boundary inside a tie group keeps the whole group (documented difference from HF)
    assert llmkern.top_k_top_p_filter(x, top_p=0.5).isfinite().all()
    assert torch.equal(llmkern.top_k_top_p_filter(x, top_p=0.5), ref.filter_logits(
        x, torch.zeros(3, dtype=torch.long), torch.full((3,), 0.5), torch.zeros(3)))


@pytest.mark.parametrize("kind", ["normal", "heavy", "ties", "neginf"])
def test_filter_matches_reference_per_row_params(kind):
    gen = torch.Generator().manual_seed(7)
    B, V = 16, 777
    x = rows(kind, B, V, gen)
    k = torch.randint(0, 60, (B,), generator=gen)
    p = torch.rand(B, generator=gen).clamp_min(0.05)
    mp = torch.rand(B, generator=gen) * 0.2
    ours = llmkern.top_k_top_p_filter(x, k, p, mp)
    assert torch.equal(ours, ref.filter_logits(x, k, p, mp))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_filter_dtypes(dtype):
    gen = torch.Generator().manual_seed(3)
    x = rows("normal", 4, 500, gen).to(dtype)
    ours = llmkern.top_k_top_p_filter(x, 30, 0.9, filter_value=-1000.0)
    assert ours.dtype == dtype
    B = x.shape[0]
    expected = ref.filter_logits(x, torch.full((B,), 30), torch.full((B,), 0.9), torch.zeros(B), -1000.0)
    assert torch.equal(ours, expected)
    theirs = hf_filter(x.float(), 30, 0.9).isfinite()
    kept = ours != -1000.0
    assert (kept | ~theirs).all()  # everything HF keeps is kept
    # bf16 has many exact ties: the only extra tokens are ties of the boundary value
    extra = kept & ~theirs
    for r in range(B):
        if extra[r].any():
            assert (x[r][extra[r]] == x[r][theirs[r]].min()).all()


def test_filter_1d_and_large_vocab_parallel_path():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(50000, generator=gen) * 2  # B=1, large V: the row is split across threads
    ours = llmkern.top_k_top_p_filter(x, top_k=1000, top_p=0.7)
    assert torch.equal(ours.isfinite(), hf_filter(x[None], 1000, 0.7)[0].isfinite())


# ---- sampling -----------------------------------------------------------------------------------

def ref_sample(x, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, position=0, **kw):
    B = x.shape[0]
    full = lambda v, dt=torch.float32: v if isinstance(v, torch.Tensor) else torch.full((B,), v, dtype=dt)  # noqa: E731
    return ref.sample(x, full(temperature), full(top_k, torch.long), full(top_p), full(min_p),
                      full(seed, torch.long), full(position, torch.long), **kw)


@pytest.mark.parametrize("top_k,top_p,min_p", FILTERS)
def test_sample_matches_reference(top_k, top_p, min_p):
    gen = torch.Generator().manual_seed(11)
    x = rows("heavy", 12, 999, gen)
    pos = torch.arange(12) * 3
    tok, lp, valid = llmkern.sample(x, temperature=0.8, top_k=top_k, top_p=top_p, min_p=min_p, seed=42,
                                    position=pos, return_logprobs=True, return_valid=True)
    rt, rlp, rv = ref_sample(x, 0.8, top_k, top_p, min_p, 42, pos)
    assert torch.equal(tok, rt)
    torch.testing.assert_close(lp, rlp, atol=1e-4, rtol=1e-4)
    assert valid.all() and rv.all()


def test_sample_frequencies_match_filtered_softmax():
    """Chi-square over many seeds: the draws follow softmax of the filtered, tempered logits."""
    V, n = 40, 20000
    gen = torch.Generator().manual_seed(1)
    row = torch.randn(V, generator=gen) * 1.5
    x = row.expand(n, V).contiguous()
    tok = llmkern.sample(x, temperature=0.7, top_k=25, top_p=0.9, seed=123, position=torch.arange(n))
    filtered = hf_filter((row / 0.7)[None], 25, 0.9)[0]
    probs = torch.softmax(filtered.double(), 0)
    counts = torch.bincount(tok, minlength=V).double()
    assert counts[probs == 0].sum() == 0  # never a filtered token
    support = probs > 0
    expected = probs[support] * n
    chi2 = ((counts[support] - expected) ** 2 / expected).sum().item()
    dof = int(support.sum()) - 1
    # 99.9% quantile of chi-square ~ dof + 3.1*sqrt(2 dof) + 7 for these dof
    assert chi2 < dof + 3.1 * math.sqrt(2 * dof) + 7, (chi2, dof)


def test_unseeded_sampling_follows_torch_generator():
    x = torch.randn(64, 100)
    torch.manual_seed(5)
    a = llmkern.sample(x)
    torch.manual_seed(5)
    b = llmkern.sample(x)
    assert torch.equal(a, b)
    c = llmkern.sample(x)
    assert not torch.equal(a, c)


def test_seed_reproducible_and_batch_invariant():
    gen = torch.Generator().manual_seed(2)
    x = rows("normal", 32, 3000, gen)
    seeds = torch.randint(0, 2**62, (32,), generator=gen)
    pos = torch.randint(0, 1000, (32,), generator=gen)
    kw = dict(temperature=1.3, top_k=200, top_p=0.95)
    a = llmkern.sample(x, seed=seeds, position=pos, **kw)
    assert torch.equal(a, llmkern.sample(x, seed=seeds, position=pos, **kw))
    perm = torch.randperm(32, generator=gen)
    b = llmkern.sample(x[perm], seed=seeds[perm], position=pos[perm], **kw)
    assert torch.equal(b, a[perm])  # batch order does not matter
    for r in (0, 17, 31):  # nor batch composition: a row alone draws the same token
        assert llmkern.sample(x[r:r + 1], seed=seeds[r:r + 1], position=pos[r:r + 1], **kw).item() == a[r]
    # thread count does not matter either (fixed-point masses are order independent)
    nt = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(a, llmkern.sample(x, seed=seeds, position=pos, **kw))
    finally:
        torch.set_num_threads(nt)


@pytest.mark.parametrize("kw", [dict(top_p=0.9), dict(top_p=0.5, min_p=0.01), dict(top_k=3000, top_p=0.8),
                                dict(top_k=40, top_p=0.95), dict(min_p=0.05), dict(temperature=0.7, top_p=0.99)])
def test_row_split_across_threads_matches_row_parallel(kw):
    """A lone long row is split across the threads (its passes share one parallel region); a batch
    runs one row per thread; one thread does everything. All three give the same draws and logprobs,
    and the filter the same logits."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 40000, generator=gen) * 3
    seeds = torch.arange(4) * 7919
    batch, lp = llmkern.sample(x, seed=seeds, return_logprobs=True, **kw)
    nt = torch.get_num_threads()
    try:
        for threads in {nt, 1}:
            torch.set_num_threads(threads)
            for r in range(4):
                tok, lpr = llmkern.sample(x[r:r + 1], seed=seeds[r:r + 1], return_logprobs=True, **kw)
                assert tok.item() == batch[r].item() and lpr.item() == lp[r].item(), (threads, r)
    finally:
        torch.set_num_threads(nt)
    fkw = {k: v for k, v in kw.items() if k != "temperature"}
    whole = llmkern.top_k_top_p_filter(x, **fkw)
    for r in range(4):
        assert torch.equal(llmkern.top_k_top_p_filter(x[r], **fkw), whole[r])


def test_greedy_rows_and_mixed_temperature():
    x = torch.randn(6, 300)
    x[0, 7] = x[0, 9] = 50.0  # tie: lowest index wins
    t = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.5, 2.0])
    tok, lp = llmkern.sample(x, temperature=t, top_k=10, seed=0, return_logprobs=True)
    assert tok[0] == 7
    assert tok[1] == x[1].argmax() and tok[3] == x[3].argmax()
    torch.testing.assert_close(lp[1], torch.log_softmax(x[1], 0)[tok[1]], atol=1e-5, rtol=1e-5)
    rt, rlp, _ = ref_sample(x, t, 10, 1.0, 0.0, 0, 0)
    assert torch.equal(tok, rt)


def test_logprobs_are_those_of_the_filtered_distribution():
    x = torch.randn(8, 500)
    tok, lp = llmkern.sample(x, temperature=0.9, top_p=0.8, seed=3, return_logprobs=True)
    filtered = hf_filter(x / 0.9, top_p=0.8)
    expected = torch.log_softmax(filtered, -1).gather(1, tok[:, None])[:, 0]
    torch.testing.assert_close(lp, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("V", [1, 2, 3, 31, 1001])
def test_edge_vocab_sizes(V):
    x = torch.randn(5, V)
    for k, p in [(0, 1.0), (1, 1.0), (V, 1.0), (V + 10, 1.0), (0, 1e-7), (3, 0.5)]:
        tok = llmkern.sample(x, top_k=k, top_p=p, seed=9)
        assert ((tok >= 0) & (tok < V)).all()
        if k == 1 or p == 1e-7:
            assert torch.equal(tok, x.argmax(1))


def test_no_finite_logit_rows_are_flagged():
    x = torch.randn(4, 50)
    x[1] = float("-inf")
    x[2] = float("nan")
    x[3, :] = float("nan")
    x[3, 5] = 2.0  # NaN counts as -inf: only token 5 is possible
    tok, lp, valid = llmkern.sample(x, top_p=0.9, seed=1, return_logprobs=True, return_valid=True)
    assert valid.tolist() == [True, False, False, True]
    assert tok[1] == 0 and tok[2] == 0 and tok[3] == 5
    assert lp[1] == float("-inf") and lp[3] == 0.0


def test_plus_inf_logit():
    x = torch.randn(2, 20)
    x[0, 4] = float("inf")
    tok = llmkern.sample(x, seed=0)
    assert tok[0] == 4


@pytest.mark.parametrize("kw", [dict(), dict(top_k=3), dict(top_p=0.5), dict(temperature=0.0)],
                         ids=["plain", "top_k", "top_p", "greedy"])
def test_plus_inf_logits_share_the_mass(kw):
    """Two +inf logits: each drawn about half the time, log-probability log(1/2) (it was NaN:
    inf - inf) on the kernel and on the reference."""
    x = torch.tensor([[1.0, float("inf"), 2.0, float("inf")]]).repeat(64, 1)
    for sample in (llmkern.sample, _reference_sample):
        tok, lp = sample(x, seed=torch.arange(64), return_logprobs=True, **kw)
        assert set(tok.tolist()) <= {1, 3} and (kw or len(set(tok.tolist())) == 2)
        torch.testing.assert_close(lp, torch.full_like(lp, -math.log(2.0)))


def _reference_sample(x, *, seed, return_logprobs, temperature=1.0, top_k=0, top_p=1.0):
    tok, lp, _ = ref_sample(x, temperature, top_k, top_p, 0.0, seed, torch.zeros_like(seed))
    return tok, lp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sample_dtypes(dtype):
    x = torch.randn(8, 2000).to(dtype)
    tok = llmkern.sample(x, top_k=100, top_p=0.9, seed=4, position=torch.arange(8))
    rt, _, _ = ref_sample(x.float(), 1.0, 100, 0.9, 0.0, 4, torch.arange(8))
    assert torch.equal(tok, rt)


def test_strided_logits():
    x = torch.randn(4, 600)[:, :500]  # row stride 600
    assert torch.equal(llmkern.sample(x, top_k=20, seed=1), llmkern.sample(x.contiguous(), top_k=20, seed=1))


def test_penalties_bias_and_allowed_mask():
    B, V = 4, 100
    x = torch.randn(B, V)
    prev = torch.tensor([[1, 2, 2, -1], [-1, -1, -1, -1], [5, 5, 5, 5], [0, 99, -1, -1]])
    bias = torch.zeros(V)
    bias[10] = 100.0
    tok = llmkern.sample(x, logit_bias=bias, temperature=0)
    assert (tok == 10).all()
    allowed = torch.zeros(B, V, dtype=torch.bool)
    allowed[:, 20:23] = True
    tok = llmkern.sample(x, allowed_tokens=allowed, seed=0)
    assert ((tok >= 20) & (tok < 23)).all()
    # packed bitmask: bit j of word w allows token 32 w + j
    packed = torch.zeros(B, 4, dtype=torch.int32)
    packed[:, 1] = 1 << 3  # token 35
    assert (llmkern.sample(x, allowed_tokens=packed, seed=0) == 35).all()
    # repetition penalty equals HF's processor
    penalised = ref.apply_penalties(x, prev, torch.full((B,), 1.5), torch.zeros(B), torch.zeros(B))
    hf = hf_logits.RepetitionPenaltyLogitsProcessor(1.5)(prev.clamp_min(0)[:1, :3], x[:1].clone())
    torch.testing.assert_close(penalised[0], hf[0])
    # presence / frequency penalties: OpenAI's definition
    pen = ref.apply_penalties(x, prev, torch.ones(B), torch.full((B,), 0.5), torch.full((B,), 0.25))
    assert torch.isclose(pen[2, 5], x[2, 5] - 0.5 - 4 * 0.25)
    a = llmkern.sample(x, prev_tokens=prev, repetition_penalty=1.3, frequency_penalty=0.2, seed=8,
                       position=torch.arange(B))
    xp = ref.apply_penalties(x, prev, torch.full((B,), 1.3), torch.zeros(B), torch.full((B,), 0.2))
    assert torch.equal(a, ref_sample(xp, 1.0, 0, 1.0, 0.0, 8, torch.arange(B))[0])


def test_hf_logits_warper_equals_hf_warpers():
    from llmkern.integrations.transformers import LlmkernSamplingWarper

    x = torch.randn(3, 400)
    warper = LlmkernSamplingWarper(top_k=40, top_p=0.9, min_p=0.02)
    expected = hf_filter(x, 40, 0.9, 0.02)
    assert torch.equal(warper(None, x).isfinite(), expected.isfinite())
    got64 = warper(None, x.double())  # float64 scores (HF's warpers take them): kept values unchanged
    assert got64.dtype == torch.float64 and torch.equal(got64.isfinite(), expected.isfinite())
    assert torch.equal(got64[got64.isfinite()], x.double()[expected.isfinite()])


def test_hf_logits_warper_temperature_and_min_tokens_to_keep():
    """temperature first, then the filters, none cutting below min_tokens_to_keep: HF's Temperature, TopK, TopP
    and MinP warpers in generate's order (a sharp row, where top-p alone would keep 1 token)."""
    from transformers.generation import logits_process as lp

    from llmkern.integrations.transformers import LlmkernSamplingWarper

    x = torch.randn(4, 300) * 3
    x[0, 7] = 40.0
    # (top_p=0: HF's TopPLogitsWarper keeps min_tokens_to_keep tokens; it raised llmkern.sample's (0, 1] error)
    for t, k, p, mp, m in [(0.5, 0, 0.5, 0.0, 1), (0.5, 0, 1.0, 0.2, 1), (2.0, 3, 0.9, 0.0, 5),
                           (0.7, 0, 0.01, 0.0, 3), (1.0, 1, 1.0, 0.5, 2), (1.0, 0, 0.0, 0.0, 1),
                           (0.8, 5, 0.0, 0.0, 3)]:
        want = lp.TemperatureLogitsWarper(t)(None, x.clone())
        if k:
            want = lp.TopKLogitsWarper(k, min_tokens_to_keep=m)(None, want)
        if p < 1.0:
            want = lp.TopPLogitsWarper(p, min_tokens_to_keep=m)(None, want)
        if mp:
            want = lp.MinPLogitsWarper(mp, min_tokens_to_keep=m)(None, want)
        got = LlmkernSamplingWarper(temperature=t, top_k=k, top_p=p, min_p=mp, min_tokens_to_keep=m)(None, x.clone())
        assert torch.equal(got.isfinite(), want.isfinite()), (t, k, p, mp, m)
        torch.testing.assert_close(got[got.isfinite()], want[want.isfinite()])
    # (top_k=-1, vLLM's "disabled", became top-1 through max(top_k, min_tokens_to_keep))
    for bad in (dict(temperature=0.0), dict(min_tokens_to_keep=0), dict(top_k=-1), dict(top_k=2.0),
                dict(top_k=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LlmkernSamplingWarper(**bad)
    # a [B] top_k tensor: min_tokens_to_keep raises its positive entries, 0 stays "no top-k"
    got = LlmkernSamplingWarper(top_k=torch.tensor([0, 1, 4, 2]), min_tokens_to_keep=3)(None, x.clone())
    assert got.isfinite().sum(-1).tolist() == [300, 3, 4, 3]
    # scores [..., V] of any leading shape, as HF's warpers take them (it raised: [batch, vocab] only)
    x3 = x.reshape(2, 2, 300)
    got3 = LlmkernSamplingWarper(top_k=7, top_p=0.8)(None, x3.clone())
    assert got3.shape == x3.shape and torch.equal(got3.reshape(4, 300), LlmkernSamplingWarper(top_k=7, top_p=0.8)(
        None, x.clone()))


@pytest.mark.parametrize("bad,match", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(temperature=-0.1), "temperature"), (dict(min_p=2.0), "min_p"), (dict(top_k=2.5), "top_k"),
    (dict(top_p=torch.tensor([0.5, 0.0])), "top_p"), (dict(temperature=torch.ones(3)), "temperature"),
    (dict(logit_bias=torch.zeros(7)), "logit_bias"), (dict(allowed_tokens=torch.ones(2, 7)), "allowed_tokens"),
    (dict(prev_tokens=torch.zeros(2, 3, dtype=torch.long) + 100), "prev_tokens"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_bad_arguments(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        llmkern.sample(torch.randn(2, 10), **bad)


def test_bad_logits():
    with pytest.raises(ValueError, match="logits"):
        llmkern.sample(torch.randn(10))
    with pytest.raises(ValueError, match="logits"):
        llmkern.sample(torch.randn(2, 10).double())
    with pytest.raises(TypeError, match="logits"):
        llmkern.sample([1.0, 2.0])
    with pytest.raises(ValueError, match="top_p"):
        llmkern.top_k_top_p_filter(torch.randn(2, 10), top_p=0)
    # at 2^24 tokens the kernels' 64-bit fixed-point mass sums (up to 2^40 a token) wrap (a uniform row sums to
    # 2^64 = 0: always the last token, logprob +inf): refused by the Python API and by the C++ op (an expanded
    # view: no 67 MB allocation)
    huge = torch.zeros(1, 1).expand(1, 2**24)
    for fn in (llmkern.sample, llmkern.top_k_top_p_filter, llmkern.top_logprobs):
        with pytest.raises(ValueError, match="below 2\\^24"):
            fn(huge) if fn is not llmkern.top_logprobs else fn(huge, 1)
    if hasattr(torch.ops.llmkern, "sample"):
        B = 1
        with pytest.raises(RuntimeError, match="below 2\\^24"):
            torch.ops.llmkern.sample(huge, None, None, torch.ones(B), torch.zeros(B, dtype=torch.long), torch.ones(B),
                                     torch.zeros(B), torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long))


def test_opcheck_and_compile():
    x = torch.randn(4, 64)
    B = 4
    args = (x, None, None, torch.ones(B), torch.full((B,), 5), torch.full((B,), 0.9), torch.zeros(B),
            torch.zeros(B, dtype=torch.long), torch.arange(B))
    torch.library.opcheck(torch.ops.llmkern.sample.default, args)
    torch.library.opcheck(torch.ops.llmkern.top_k_top_p_filter.default,
                          (x, torch.full((B,), 5), torch.ones(B), torch.zeros(B), float("-inf")))

    def step(logits):
        return llmkern.sample(logits, top_k=5, top_p=0.9, seed=3, position=0)

    compiled = torch.compile(step, fullgraph=True)
    assert torch.equal(compiled(x), step(x))


@pytest.mark.parametrize("name,bad,good", [("min_p", [0.0, 1.5, float("nan")], [0.0, 0.1, 0.2]),
                                           ("temperature", [1.0, -1.0, 1.0], [1.0, 0.0, 0.5]),
                                           ("top_p", [0.9, float("nan"), 0.9], [0.9, 0.5, 1.0]),
                                           ("top_k", [5, -2, 5], [5, 0, 1])])
def test_compiled_calls_check_tensor_parameters_when_run(name, bad, good):
    """Under torch.compile the range checks cannot read the values; they were skipped, and the kernels took
    the values as they came: min_p 1.5 kept no token and returned token 0 with logprob inf (valid), a
    negative or NaN temperature sampled at temperature 1. The check now runs inside the graph."""
    x = torch.randn(3, 100)
    kw = {name: torch.tensor(bad)}
    f = torch.compile(lambda t, **k: llmkern.sample(t, seed=0, return_logprobs=True, **k), backend="aot_eager",
                      fullgraph=True)
    with pytest.raises(RuntimeError, match=f"{name} values must be in"):
        f(x, **kw)
    g = torch.compile(lambda t, **k: llmkern.top_k_top_p_filter(t, **k), backend="aot_eager", fullgraph=True)
    if name != "temperature":
        with pytest.raises(RuntimeError, match=f"{name} values must be in"):
            g(x, **kw)
    good = {name: torch.tensor(good)}
    torch.testing.assert_close(f(x, **good), llmkern.sample(x, seed=0, return_logprobs=True, **good))


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 9),
                    reason="inductor drops torch._assert_async before torch 2.9")
def test_inductor_keeps_the_parameter_checks():
    """The default backend too (its decompositions dropped _assert_async before torch 2.9)."""
    f = torch.compile(lambda t, mp: llmkern.sample(t, seed=0, min_p=mp), fullgraph=True)
    with pytest.raises(RuntimeError, match="min_p values must be in"):
        f(torch.randn(3, 50), torch.tensor([0.0, 1.5, 0.1]))


def test_parameters_made_under_functionalize_are_not_cached():
    """The parameter caches stored functorch wrappers made under torch.func.functionalize: every later eager call
    with the same values returned tokens without storage (garbage through .numpy(), .tolist() raised)."""
    from llmkern.ops import sampling as ops

    x = torch.randn(2, 40)
    want = llmkern.sample(x, top_k=4, temperature=0.7, seed=11)
    ops._CONSTANT_ROWS.clear()
    ops._PARAM_SETS.clear()
    torch.func.functionalize(lambda t: llmkern.sample(t, top_k=4, temperature=0.7, seed=11))(x)
    got = llmkern.sample(x, top_k=4, temperature=0.7, seed=11)
    assert got.tolist() == want.tolist()


def test_compiled_output_start_is_checked_when_run():
    x, prev = torch.randn(2, 50), torch.randint(0, 50, (2, 6))
    f = torch.compile(lambda t, s: llmkern.sample(t, seed=0, prev_tokens=prev, output_start=s, presence_penalty=1.0),
                      backend="aot_eager", fullgraph=True)
    with pytest.raises(RuntimeError, match="output_start values must be in"):
        f(x, torch.tensor([0, 7]))
    assert torch.equal(f(x, torch.tensor([0, 6])), llmkern.sample(x, seed=0, prev_tokens=prev, presence_penalty=1.0,
                                                                  output_start=torch.tensor([0, 6])))


def test_reference_fallback_without_extension(monkeypatch):
    monkeypatch.setenv("LLMKERN_BACKEND", "reference")
    x = torch.randn(3, 100)
    a = llmkern.sample(x, top_k=10, seed=2)
    monkeypatch.delenv("LLMKERN_BACKEND")
    assert torch.equal(a, llmkern.sample(x, top_k=10, seed=2))


def test_each_op_says_once_under_its_own_name_that_it_uses_the_reference(monkeypatch):
    """Without the extension, top_k_top_p_filter warned as 'llmkern.sample' (one shared key: after either op
    had warned, the other said nothing)."""
    from llmkern import _backend
    from llmkern.ops import sampling as ops

    monkeypatch.setattr(ops, "_COMPILED", {})
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    x = torch.randn(2, 30)
    for op, call in (("top_k_top_p_filter", lambda: llmkern.top_k_top_p_filter(x, top_k=3)),
                     ("sample", lambda: llmkern.sample(x, top_k=3, seed=0))):
        with pytest.warns(RuntimeWarning, match=f"llmkern.{op}: no compiled kernel"):
            call()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            call()  # once


def test_fallback_warning_inside_torch_compile(monkeypatch):
    """A forced backend the op lacks warns once; inside torch.compile(fullgraph=True) the warning
    (which Dynamo cannot trace) is left to the first eager call instead of breaking the graph."""
    from llmkern import _backend

    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    monkeypatch.setattr(_backend, "_warned", set())
    torch._dynamo.reset()
    x = torch.randn(3, 40)
    f = torch.compile(lambda t: llmkern.sample(t, top_k=5, seed=3), fullgraph=True, backend="eager")
    assert torch.equal(f(x), llmkern.sample(x, top_k=5, seed=3))
    torch._dynamo.reset()


# ---- audit regressions ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,value", [
    ("top_k", torch.tensor([True, False])), ("temperature", torch.tensor([True, True])),
    ("top_p", torch.tensor([0.5 + 1j, 0.5])), ("seed", torch.tensor([True, False])),
])
def test_bool_and_complex_parameter_tensors_are_refused(name, value):
    """A bool tensor was read as 0/1 (a Python bool is refused), a complex one lost its imaginary part."""
    with pytest.raises(TypeError, match=name):
        llmkern.sample(torch.randn(2, 10), **{name: value})


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64])
def test_bool_and_complex_logit_bias_are_refused(dtype):
    with pytest.raises(TypeError, match="logit_bias"):
        llmkern.sample(torch.randn(2, 10), logit_bias=torch.zeros(10, dtype=dtype))


@pytest.mark.parametrize("kw", [dict(temperature=float("inf")), dict(temperature=torch.tensor([1.0, float("inf")])),
                                dict(repetition_penalty=float("inf"))])
def test_infinite_temperature_and_repetition_penalty_are_refused(kw):
    """temperature=inf turned a +inf logit (the token that must win) into NaN, then -inf: the kernel
    drew another token and the reference returned a NaN logprob."""
    with pytest.raises(ValueError, match=next(iter(kw))):
        llmkern.sample(torch.tensor([[1.0, float("inf"), 2.0], [1.0, 3.0, 2.0]]), **kw)


@pytest.mark.parametrize("kw", [dict(presence_penalty=float("inf")), dict(frequency_penalty=float("inf"))])
def test_infinite_presence_frequency_penalty_bans_only_seen_tokens(kw):
    """inf * 0 was NaN for every unseen token: the whole row became invalid instead of banning the
    tokens already seen."""
    x = torch.tensor([[1.0, 5.0, 2.0], [1.0, 3.0, 2.0]])
    prev = torch.tensor([[1, -1], [1, 2]])
    for backend in ("cpu", "reference"):
        tok, valid = llmkern.sample(x, prev_tokens=prev, temperature=0, return_valid=True, **kw) if backend == "cpu" \
            else _ref_penalised_greedy(x, prev, **kw)
        assert valid.all() and tok.tolist() == [2, 0], backend
    pen = ref.apply_penalties(x, prev, torch.ones(2), torch.full((2,), kw.get("presence_penalty", 0.0)),
                              torch.full((2,), kw.get("frequency_penalty", 0.0)))
    assert pen[0].tolist() == [1.0, float("-inf"), 2.0] and pen[1].tolist() == [1.0, float("-inf"), float("-inf")]


def _ref_penalised_greedy(x, prev, **kw):
    import os
    old = os.environ.get("LLMKERN_BACKEND")
    os.environ["LLMKERN_BACKEND"] = "reference"
    try:
        return llmkern.sample(x, prev_tokens=prev, temperature=0, return_valid=True, **kw)
    finally:
        if old is None:
            del os.environ["LLMKERN_BACKEND"]
        else:
            os.environ["LLMKERN_BACKEND"] = old


def test_reference_keeps_the_top_token_when_top_p_rounds_to_zero():
    """top_p=1e-50 is in (0, 1] but rounds to 0 in float32: the kernel keeps the top token (HF's and
    vLLM's limit), the reference kept nothing (filter) or failed with a math domain error (sample)."""
    x = torch.tensor([[1.0, 5.0, 2.0], [1.0, 3.0, 3.0]])
    zero_p = torch.zeros(2)
    expected = torch.tensor([[float("-inf"), 5.0, float("-inf")], [float("-inf"), 3.0, 3.0]])
    assert torch.equal(ref.filter_logits(x, torch.zeros(2, dtype=torch.long), zero_p, torch.zeros(2)), expected)
    assert torch.equal(llmkern.top_k_top_p_filter(x, top_p=1e-50), expected)
    tok, lp, valid = ref_sample(x, 1.0, 0, zero_p, 0.0, 0, 0)
    assert tok[0] == 1 and tok[1] in (1, 2) and valid.all()
    torch.testing.assert_close(lp, torch.tensor([0.0, -math.log(2.0)]))
    ktok, klp = llmkern.sample(x, top_p=1e-50, seed=0, return_logprobs=True)
    assert torch.equal(ktok, tok) and torch.allclose(klp, lp)


@pytest.mark.parametrize("fv", [float("nan"), float("-inf"), -50.0])
def test_hf_warper_float64_scores_exact(fv):
    """float64 scores: the kept set is that of the float64 values (it was that of their float32
    rounding: values equal in float32 were kept as ties), and a NaN filter_value filters (it left
    the scores unchanged)."""
    from llmkern.integrations.transformers import LlmkernSamplingWarper

    x = torch.tensor([[1e-300, 2e-300, 0.0, -1e-300], [1.0, 1.0 + 1e-12, 0.5, 0.9]], dtype=torch.float64)
    got = LlmkernSamplingWarper(top_k=1, filter_value=fv)(None, x.clone())
    want = hf_logits.TopKLogitsWarper(1, filter_value=fv)(None, x.clone())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    if fv == float("-inf"):  # (HF's chain with a finite filter value gives the removed tokens mass)
        x = torch.randn(3, 300, dtype=torch.float64)
        got = LlmkernSamplingWarper(top_k=40, top_p=0.9, min_p=0.02)(None, x.clone())
        want = hf_logits.MinPLogitsWarper(0.02)(None, hf_logits.TopPLogitsWarper(0.9)(
            None, hf_logits.TopKLogitsWarper(40)(None, x.clone())))
        assert torch.equal(got, want)


@pytest.mark.parametrize("fv", [float("-inf"), 0.0])
def test_filter_gradient_is_that_of_hf_warpers(fv):
    """Backward through the filter gave no gradient at all (no autograd kernel: a warning, grad None).
    The gradient is HF's: that of the kept logits, zero for the removed ones."""
    x = (torch.randn(3, 200) * 2).requires_grad_()
    with torch.no_grad():
        x[0, :3] = 10.0  # a tie at the top
    w = torch.randn(3, 200)
    ks = [20, 0, 5]
    out = llmkern.top_k_top_p_filter(x, top_k=torch.tensor(ks), top_p=0.9, filter_value=fv)
    (torch.where(out.isfinite(), out, torch.zeros_like(out)) * w).sum().backward()
    xh = x.detach().clone().requires_grad_()
    hout = torch.cat([hf_filter_grad(xh[r:r + 1], k, 0.9) for r, k in enumerate(ks)])
    (torch.where(hout.isfinite(), hout, torch.zeros_like(hout)) * w).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, xh.grad)
    # a kept value equal to filter_value keeps its gradient
    x2 = torch.tensor([[10.0, 10.0, 1.0, -3.0]], requires_grad=True)
    llmkern.top_k_top_p_filter(x2, top_k=2, filter_value=10.0).sum().backward()
    assert x2.grad.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    # 1-D input: the same gradient
    x1 = x.detach()[1].clone().requires_grad_()
    llmkern.top_k_top_p_filter(x1, top_p=0.9, filter_value=fv).mul(w[1]).sum().backward()
    assert torch.equal(x1.grad, xh.grad[1])


def hf_filter_grad(x, k, p):
    if k:
        x = hf_logits.TopKLogitsWarper(k)(None, x)
    return hf_logits.TopPLogitsWarper(p)(None, x)


def test_sample_logprobs_are_not_differentiable_and_compile_on_grad_logits():
    """The outputs are marked non-differentiable: a backward through them raises, and torch.compile, whose AOT
    autograd traces the backward at compile time, takes logits that require grad (it ran the raising backward:
    BackendCompilerFailed for every sample / top_logprobs call in a graph with grad-requiring logits)."""
    x = torch.randn(2, 30, requires_grad=True)
    tok, lp = llmkern.sample(x, seed=0, return_logprobs=True)  # sampling itself works
    assert not lp.requires_grad and not tok.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        lp.sum().backward()
    f = torch.compile(lambda lg: llmkern.sample(lg, top_k=3, seed=1, return_logprobs=True), fullgraph=True,
                      backend="aot_eager")
    for got, want in zip(f(x), llmkern.sample(x, top_k=3, seed=1, return_logprobs=True)):
        assert torch.equal(got, want)
    if hasattr(torch.ops.llmkern, "top_logprobs"):
        toks = torch.tensor([1, 2])
        g = torch.compile(lambda lg: llmkern.top_logprobs(lg, 3, tokens=toks), fullgraph=True, backend="aot_eager")
        for got, want in zip(g(x), llmkern.top_logprobs(x, 3, tokens=toks)):
            assert torch.equal(got, want)


def test_reference_processes_logits_in_float32_like_the_kernels():
    """At a temperature so small that logits / T overflows float32 (documented: those logits become
    +-inf and share the mass), the reference divided in float64 and drew the argmax while the kernel
    drew among the overflowed logits: the oracle disagreed with the kernel."""
    x = torch.tensor([[1.0, 5.0, 2.0], [1.0, 3.0, 2.0], [-1.0, -3.0, 0.0]])
    seeds = torch.arange(3)
    for t in (1e-40, 1e-30, 1e-6):
        tok, lp, _ = llmkern.sample(x, temperature=t, seed=seeds, return_logprobs=True, return_valid=True)
        rt, rlp, _ = ref_sample(x, t, 0, 1.0, 0.0, seeds, 0)
        assert torch.equal(tok, rt), t
        torch.testing.assert_close(lp, rlp)
    rt, rlp, _ = ref_sample(x, 1e-40, 0, 1.0, 0.0, seeds, 0)
    torch.testing.assert_close(rlp, torch.tensor([-math.log(3.0), -math.log(3.0), 0.0]))


# ---- review regressions: bias order, output-only presence/frequency penalties, int64 scalars ------------

def _hf_bias_then_repetition(x, prev, bias, penalty):
    """Hugging Face generate()'s order: SequenceBiasLogitsProcessor, then RepetitionPenaltyLogitsProcessor."""
    s = hf_logits.SequenceBiasLogitsProcessor({(t,): float(bias[t]) for t in range(bias.numel())})(prev, x.clone())
    return hf_logits.RepetitionPenaltyLogitsProcessor(penalty)(prev, s)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_logit_bias_is_added_before_the_repetition_penalty(monkeypatch, backend):
    """HF and vLLM add the bias first; llmkern.sample added it after the penalties, so the repetition
    penalty did not scale it: greedy picked token 0 (2 / 2 + 1.5 = 2.5) where HF picks token 1
    ((2 + 1.5) / 2 = 1.75 < 2.2)."""
    if backend == "reference":
        monkeypatch.setenv("LLMKERN_BACKEND", "reference")
    x, prev = torch.tensor([[2.0, 2.2, 0.0]]), torch.tensor([[0]])
    bias = torch.tensor([1.5, 0.0, 0.0])
    assert int(_hf_bias_then_repetition(x, prev, bias, 2.0).argmax()) == 1
    assert llmkern.sample(x, temperature=0, repetition_penalty=2.0, prev_tokens=prev, logit_bias=bias).tolist() == [1]
    # random rows: the distribution drawn from is HF's processed logits (seeded draws and logprobs equal)
    g = torch.Generator().manual_seed(3)
    B, V = 6, 50
    x = torch.randn(B, V, generator=g) * 2
    prev = torch.randint(0, V, (B, 12), generator=g)
    bias = torch.randn(V, generator=g) * 2
    want = torch.cat([_hf_bias_then_repetition(x[r:r + 1], prev[r:r + 1], bias, 1.7) for r in range(B)])
    tok, lp = llmkern.sample(x, repetition_penalty=1.7, prev_tokens=prev, logit_bias=bias, seed=5,
                             position=torch.arange(B), return_logprobs=True)
    rt, rlp, _ = ref_sample(want, 1.0, 0, 1.0, 0.0, 5, torch.arange(B))
    assert torch.equal(tok, rt)
    torch.testing.assert_close(lp, rlp)
    greedy = llmkern.sample(x, temperature=0, repetition_penalty=1.7, prev_tokens=prev,
                            logit_bias=bias[None].expand(B, V))
    assert torch.equal(greedy, want.argmax(-1))


def _vllm_penalties(x, prompt, output, rep, pres, freq):
    """vLLM's apply_penalties, written out: the repetition penalty over prompt and output tokens, presence and
    frequency over the output tokens only (-1 = padding)."""
    y = x.clone()
    for r in range(x.shape[0]):
        seen = {t for t in prompt[r].tolist() + output[r].tolist() if t >= 0}
        for t in seen:
            y[r, t] = y[r, t] / rep if y[r, t] > 0 else y[r, t] * rep
        outs = [t for t in output[r].tolist() if t >= 0]
        for t in set(outs):
            y[r, t] -= pres + freq * outs.count(t)
    return y


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_output_start_presence_and_frequency_count_only_output_tokens(monkeypatch, backend):
    """vLLM and OpenAI count only the generated tokens for presence / frequency penalties, the prompt too for
    the repetition penalty: output_start says where the output begins in prev_tokens."""
    if backend == "reference":
        monkeypatch.setenv("LLMKERN_BACKEND", "reference")
    g = torch.Generator().manual_seed(4)
    B, V, L = 3, 40, 10
    x = torch.randn(B, V, generator=g) * 2
    prev = torch.randint(0, 12, (B, L), generator=g)  # small ids: repeats within and across the parts
    prev[1, :2] = -1                                   # left padding
    start = torch.tensor([6, 2, 10])                   # row 2: no output token yet
    want = _vllm_penalties(x, [prev[r, :start[r]] for r in range(B)], [prev[r, start[r]:] for r in range(B)],
                           1.3, 0.7, 0.4)
    got = ref.apply_penalties(x, prev, torch.full((B,), 1.3), torch.full((B,), 0.7), torch.full((B,), 0.4),
                              output_start=start)
    torch.testing.assert_close(got, want)
    kw = dict(prev_tokens=prev, repetition_penalty=1.3, presence_penalty=0.7, frequency_penalty=0.4)
    assert torch.equal(llmkern.sample(x, temperature=0, output_start=start, **kw), want.argmax(-1))
    tok = llmkern.sample(x, output_start=start, seed=9, position=3, **kw)
    assert torch.equal(tok, ref_sample(want, 1.0, 0, 1.0, 0.0, 9, 3)[0])
    # an int applies to every row; without output_start every token counts (the old, documented default)
    torch.testing.assert_close(
        ref.apply_penalties(x, prev, torch.ones(B), torch.full((B,), 0.7), torch.zeros(B), output_start=L), x)
    every = _vllm_penalties(x, [prev[r, :0] for r in range(B)], list(prev), 1.3, 0.7, 0.4)
    assert torch.equal(llmkern.sample(x, temperature=0, **kw), every.argmax(-1))
    assert torch.equal(llmkern.sample(x, temperature=0, output_start=0, **kw), every.argmax(-1))
    only_rep = _vllm_penalties(x, list(prev), [prev[r, :0] for r in range(B)], 1.3, 0.7, 0.4)
    assert torch.equal(llmkern.sample(x, temperature=0, output_start=torch.tensor(L), **kw), only_rep.argmax(-1))


@pytest.mark.parametrize("kw,err,match", [
    (dict(output_start=2), ValueError, "output_start needs prev_tokens"),
    (dict(output_start=4, prev_tokens=torch.zeros(2, 3, dtype=torch.long)), ValueError,
     r"output_start must be in \[0, 3\]"),
    (dict(output_start=-1, prev_tokens=torch.zeros(2, 3, dtype=torch.long)), ValueError, "output_start"),
    (dict(output_start=torch.tensor([0, 4]), prev_tokens=torch.zeros(2, 3, dtype=torch.long)), ValueError,
     r"output_start values must be in \[0, 3\]"),
    (dict(output_start=torch.tensor([0, 1, 2]), prev_tokens=torch.zeros(2, 3, dtype=torch.long)), ValueError,
     r"output_start must be an int or a tensor of shape \[2\]"),
    (dict(output_start=torch.tensor([0.0, 1.0]), prev_tokens=torch.zeros(2, 3, dtype=torch.long)), TypeError,
     "output_start must be an integer tensor"),
    (dict(output_start=True, prev_tokens=torch.zeros(2, 3, dtype=torch.long)), TypeError, "output_start"),
    (dict(output_start=1.0, prev_tokens=torch.zeros(2, 3, dtype=torch.long)), TypeError, "output_start"),
])
def test_output_start_bad_arguments(kw, err, match):
    with pytest.raises(err, match=match):
        llmkern.sample(torch.randn(2, 10), presence_penalty=1.0, **kw)


def test_int64_scalars_near_the_limits_are_accepted():
    """float(2**63 - 1) rounds up to 2**63, so valid int64 seeds near the top (and positions, top_k) were
    refused as out of range; a [1] tensor with the same seed was accepted."""
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    for s in (2**63 - 1, 2**63 - 100, 2**63 - 512, -(2**63)):
        assert torch.equal(llmkern.sample(x, seed=s), llmkern.sample(x, seed=torch.full((3,), s))), s
    big = 2**63 - 1
    assert torch.equal(llmkern.sample(x, seed=1, position=big),
                       llmkern.sample(x, seed=1, position=torch.full((3,), big)))
    assert torch.equal(llmkern.sample(x, seed=1, top_k=big), llmkern.sample(x, seed=1, top_k=0))
    for name, value in (("seed", 2**63), ("seed", -(2**63) - 1), ("position", 2**63), ("top_k", 2**63)):
        with pytest.raises(ValueError, match=name):
            llmkern.sample(x, **{"seed": 1, name: value})


def test_parameter_caches_hold_no_inference_or_fake_tensors():
    """The sampler caches its per-row parameter tensors across calls; one made under torch.inference_mode (a serving
    thread, an evaluation) was an inference tensor, and a later differentiable filter could not save it for
    backward; one made under FakeTensorMode was a fake tensor that a real call then got (and the reverse)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from llmkern.ops import sampling as S

    S._CONSTANT_ROWS.clear()
    S._PARAM_SETS.clear()
    logits = torch.randn(3, 40)
    with torch.inference_mode():
        llmkern.top_k_top_p_filter(logits, top_k=7, top_p=0.8)
        llmkern.sample(logits, top_k=7, top_p=0.8, repetition_penalty=1.3, prev_tokens=torch.tensor([[1], [2], [3]]))
    x = logits.clone().requires_grad_()
    out = llmkern.top_k_top_p_filter(x, top_k=7, top_p=0.8)
    out.masked_fill(torch.isinf(out), 0).sum().backward()
    assert int((x.grad != 0).sum()) >= 3
    y = logits.clone().requires_grad_()  # (RL-style sampling from logits that require grad)
    llmkern.sample(y, top_k=7, top_p=0.8, repetition_penalty=1.3, prev_tokens=torch.tensor([[1], [2], [3]]))
    with FakeTensorMode():
        fake = torch.empty(3, 40)
        llmkern.top_k_top_p_filter(fake, top_k=5, top_p=0.7)
    assert not any(isinstance(t, torch._subclasses.FakeTensor) for t in S._CONSTANT_ROWS.values())
    llmkern.top_k_top_p_filter(logits, top_k=5, top_p=0.7)  # (a real call after the fake one)


def test_greedy_sampling_leaves_the_global_rng_alone():
    """temperature=0 without a seed drew fresh seeds from torch's generator, so a greedy evaluation inside a
    training loop changed its later dropout masks and shuffles."""
    logits = torch.randn(4, 50)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    tok = llmkern.sample(logits, temperature=0.0)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(tok, logits.argmax(-1))
    tok = llmkern.sample(logits, temperature=torch.zeros(4))  # per-row zeros: greedy too
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(tok, logits.argmax(-1))
    llmkern.sample(logits, temperature=torch.tensor([0.0, 0.0, 1.0, 0.0]))  # one sampled row: seeds drawn
    assert not torch.equal(torch.get_rng_state(), before)
    torch.set_rng_state(before)
    llmkern.sample(logits, temperature=1.0)  # (sampling without a seed still draws)
    assert not torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("kw,match", [(dict(temperature=1e39), r"temperature must be in \[0.0, inf\), got 1e\+39 \(inf in float32\)"),
                                      (dict(repetition_penalty=1e39), "repetition_penalty must be in"),
                                      (dict(top_p=-1e39), "top_p must be in")])
def test_scalars_past_float32_range_are_checked_as_float32(kw, match):
    """A Python float past float32's range is +-inf in the kernels' float32 (torch.full raised its own overflow
    error, naming no argument): refused where inf is, an infinite penalty where inf is one."""
    x = torch.randn(3, 20)
    with pytest.raises(ValueError, match=match):
        llmkern.sample(x, seed=0, **kw)
    y = torch.randn(3, 20)
    prev = torch.tensor([[1, 2], [3, 4], [5, -1]])
    got = llmkern.sample(y, seed=1, prev_tokens=prev, presence_penalty=1e39, return_logprobs=True)
    want = llmkern.sample(y, seed=1, prev_tokens=prev, presence_penalty=float("inf"), return_logprobs=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
