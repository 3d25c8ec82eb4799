"""llmkern.speculative_accept (exact rejection sampling) and llmkern.generate(draft_model=...)."""
import copy
import math
import warnings

import pytest
import torch

import llmkern
from llmkern.generation import generate
from llmkern.models import build
from llmkern.ops.speculative import philox_uniform, speculative_accept
from llmkern.reference import philox_uniform as reference_uniform


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)


def _chi2(tokens, probs, min_expected=5.0):
    """Pearson's chi-square of the token counts against probs [V], cells expected to hold fewer than
    min_expected tokens pooled into one: (statistic, degrees of freedom); inf if a zero-probability
    token occurs."""
    V = probs.numel()
    counts = torch.bincount(tokens.flatten(), minlength=V).double()
    if counts.numel() > V or counts[probs == 0].sum() > 0:
        return math.inf, 1
    expected = probs.double() * counts.sum()
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), max(int(keep.sum()) - 1, 1)


def _chi2_limit(df, z=4.75):
    """Wilson-Hilferty upper quantile of chi-square(df): z = 4.75 is a false alarm rate near 1e-6."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _fits(tokens, probs):
    stat, df = _chi2(tokens, probs)
    return stat < _chi2_limit(df)


# ---- the op ---------------------------------------------------------------------------------------------

def test_philox_stream0_is_the_samplers_uniform():
    seeds = torch.tensor([0, 1, -5, 2**62 + 7, -(2**63), 2**63 - 1, 123456789])
    positions = torch.tensor([0, 3, 2**40 + 5, 17, 9, 2**63 - 1, 55])
    ref = torch.tensor([reference_uniform(int(s), int(p)) for s, p in zip(seeds, positions)], dtype=torch.float64)
    assert torch.equal(philox_uniform(seeds, positions), ref)
    assert not torch.equal(philox_uniform(seeds, positions, stream=1), ref)
    u = philox_uniform(torch.tensor([7]), torch.arange(100000))
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.005


# p0 and q0 differ a lot, and each has a zero where the other has mass: token 2 can be drafted but
# never emitted at position 0; token 1 is never drafted, only drawn as a replacement
P0 = [0.4, 0.3, 0.0, 0.2, 0.1]
Q0 = [0.1, 0.0, 0.5, 0.2, 0.2]


def _case(N, k=3, V=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(k + 1, V, generator=g, dtype=torch.float64) ** 2
    q = torch.rand(k, V, generator=g, dtype=torch.float64) ** 2
    p[0], q[0] = torch.tensor(P0, dtype=torch.float64), torch.tensor(Q0, dtype=torch.float64)
    p, q = (p / p.sum(-1, keepdim=True)).float(), (q / q.sum(-1, keepdim=True)).float()
    drafts = torch.stack([torch.multinomial(q[i].expand(N, V), 1, generator=g)[:, 0] for i in range(k)], 1)
    return drafts, q.expand(N, k, V), p.expand(N, k + 1, V), p, q


def test_emitted_tokens_follow_the_target_exactly():
    N, k = 200_000, 3
    drafts, qs, ps, p, q = _case(N, k)
    out, n = speculative_accept(drafts, qs, ps, seed=torch.arange(N) * 7919)
    assert out.shape == (N, k + 1) and out.dtype == torch.int64 and n.dtype == torch.int64
    # the first emitted token is distributed as target_probs[:, 0] ...
    assert _fits(out[:, 0], p[0]), _chi2(out[:, 0], p[0])
    # ... which the bugs "always accept" / "emit the draft" / "resample from p on rejection" miss
    assert not _fits(drafts[:, 0], p[0])
    resampled = torch.where(out[:, 0] == drafts[:, 0], drafts[:, 0], torch.multinomial(p[0].expand(N, 5), 1)[:, 0])
    assert not _fits(resampled, p[0])
    # acceptance probability per position: sum_x min(p(x), q(x)); positions are independent here
    alpha = torch.minimum(p[:k], q).sum(-1).double()
    for j in range(1, k + 1):
        want = float(alpha[:j].prod())
        got = float((n >= j).double().mean())
        assert abs(got - want) < 5 * math.sqrt(want * (1 - want) / N) + 1e-9, (j, got, want)
    # given the first j drafts accepted, emitted token j follows target_probs[:, j] (the bonus at j = k)
    for j in range(1, k + 1):
        rows = n >= j
        assert _fits(out[rows, j], p[j]), (j, _chi2(out[rows, j], p[j]))
    # layout: accepted drafts, then one token, then -1
    idx = torch.arange(k + 1)
    assert torch.equal(torch.where(idx < n[:, None], out, 0), torch.where(idx < n[:, None], torch.cat(
        [drafts, drafts[:, :1]], 1), 0))
    assert bool((out[idx[None] > n[:, None]] == -1).all()) and bool((out.gather(1, n[:, None]) >= 0).all())


def test_one_seed_for_all_rows_and_float64():
    N = 100_000
    drafts, qs, ps, p, _ = _case(N, k=1, seed=1)
    out, _ = speculative_accept(drafts, qs.double(), ps.double(), seed=5)  # row r: seed 5 + r
    assert _fits(out[:, 0], p[0])
    ref, _ = speculative_accept(drafts, qs.double(), ps.double(), seed=5 + torch.arange(N))
    assert torch.equal(out, ref)


def test_seeded_reproducible_and_row_independent():
    drafts, qs, ps, _, _ = _case(64, seed=2)
    seeds = torch.arange(64) + 1000
    a = speculative_accept(drafts, qs, ps, seed=seeds, position=11)
    b = speculative_accept(drafts, qs, ps, seed=seeds, position=11)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = speculative_accept(drafts, qs, ps, seed=seeds + 1, position=11)
    d = speculative_accept(drafts, qs, ps, seed=seeds, position=torch.full((64,), 12))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])
    # a row's result does not depend on the other rows
    sub = speculative_accept(drafts[5:9], qs[5:9], ps[5:9], seed=seeds[5:9], position=11)
    assert torch.equal(sub[0], a[0][5:9])
    # fp16 / bf16 probabilities are accepted (computed in float32)
    out, _ = speculative_accept(drafts, qs.half(), ps.bfloat16(), seed=seeds)
    assert out.shape == (64, 4)


def test_all_accepted_gives_the_bonus_from_the_last_position():
    N, k, V = 20_000, 3, 5
    drafts, qs, _, _, q = _case(N, k, seed=3)
    g = torch.Generator().manual_seed(4)
    last = torch.rand(V, generator=g) + 0.1
    last[2] = 0
    last /= last.sum()
    ps = torch.cat([qs, last.expand(N, 1, V)], 1)  # p == q at the draft positions: all accepted
    out, n = speculative_accept(drafts, qs, ps, seed=7)
    assert bool((n == k).all()) and torch.equal(out[:, :k], drafts)
    assert _fits(out[:, k], last)
    onehot = torch.zeros(V)
    onehot[4] = 1
    out, n = speculative_accept(drafts, qs, torch.cat([qs, onehot.expand(N, 1, V)], 1), seed=8)
    assert bool((out[:, k] == 4).all())


def test_edge_probabilities():
    V = 4
    p = torch.tensor([[[0.0, 0.5, 0.5, 0.0], [0.25] * 4]])
    # q(x) = 0 < p(x): accepted (ratio inf); q(x) = p(x) = 0: rejected, and with p == q the residual
    # max(0, p - q) is all zero: the replacement comes from p, never a zero-probability token
    for seed in range(50):
        out, n = speculative_accept(torch.tensor([[1]]), torch.tensor([[[0.5, 0.0, 0.0, 0.5]]]), p, seed=seed)
        assert int(n) == 1 and int(out[0, 0]) == 1
        out, n = speculative_accept(torch.tensor([[0]]), p[:, :1].clone(), p, seed=seed)
        assert int(n) == 0 and int(out[0, 0]) in (1, 2) and int(out[0, 1]) == -1
        # p(x) = 0 < q(x): always rejected; the replacement avoids x
        out, n = speculative_accept(torch.tensor([[3]]), torch.tensor([[[0.0, 0.0, 0.0, 1.0]]]), p, seed=seed)
        assert int(n) == 0 and int(out[0, 0]) in (1, 2)


def test_greedy_mode():
    V = 6
    scores = torch.randn(3, 4, V, generator=torch.Generator().manual_seed(0))
    best = scores.argmax(-1)
    drafts = best[:, :3].clone()
    drafts[0, 0] = (best[0, 0] + 1) % V   # row 0: rejected at once
    drafts[1, 2] = (best[1, 2] + 1) % V   # row 1: two accepted, then the target's token
    out, n = speculative_accept(drafts, None, scores, greedy=True)  # row 2: all accepted + bonus
    assert n.tolist() == [0, 2, 3]
    assert out[0].tolist() == [int(best[0, 0]), -1, -1, -1]
    assert out[1].tolist() == best[1, :3].tolist() + [-1]
    assert out[2].tolist() == best[2].tolist()
    # probabilities or logits: the same argmax; ties go to the lowest index (as llmkern.sample)
    out2, _ = speculative_accept(drafts, torch.rand(3, 3, V), scores.softmax(-1), greedy=True)
    assert torch.equal(out, out2)
    tie = torch.zeros(1, 2, V)
    tie[0, :, 2] = tie[0, :, 4] = 1.0
    out, n = speculative_accept(torch.tensor([[4]]), None, tie, greedy=True)
    assert int(n) == 0 and out.tolist() == [[2, -1]]
    # NaN scores count as -inf, as in llmkern.sample(temperature=0) (torch.argmax picked the NaN)
    nan = torch.tensor([[[float("nan"), 0.1, 3.0], [float("nan"), 2.0, 1.0]]])
    out, n = speculative_accept(torch.tensor([[2]]), None, nan, greedy=True)
    assert int(n) == 1 and out.tolist() == [[2, 1]]
    assert out[0, 0] == llmkern.sample(nan[0, :1], temperature=0.0)


def test_bad_arguments():
    d, q, p = torch.zeros(2, 3, dtype=torch.long), torch.full((2, 3, 5), 0.2), torch.full((2, 4, 5), 0.2)
    speculative_accept(d, q, p, seed=0)
    with pytest.raises(ValueError, match="draft_tokens"):
        speculative_accept(d.int(), q, p)
    with pytest.raises(ValueError, match="draft_tokens"):
        speculative_accept(d[0], q, p)
    with pytest.raises(ValueError, match="k >= 1"):
        speculative_accept(d[:, :0], q[:, :0], p[:, :1])
    with pytest.raises(ValueError, match="target_probs"):
        speculative_accept(d, q, p[:, :3])
    with pytest.raises(ValueError, match="target_probs"):
        speculative_accept(d, q, p.long())
    with pytest.raises(ValueError, match="draft_probs"):
        speculative_accept(d, q[..., :4], p)
    with pytest.raises(ValueError, match="draft_probs"):
        speculative_accept(d, None, p)
    with pytest.raises(TypeError, match="draft_tokens"):
        speculative_accept([[0]], q, p)
    with pytest.raises(ValueError, match="draft_tokens values"):
        speculative_accept(d + 5, q, p)
    with pytest.raises(ValueError, match="seed"):
        speculative_accept(d, q, p, seed=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="seed"):
        speculative_accept(d, q, p, seed=torch.zeros(2))
    with pytest.raises(TypeError, match="seed"):
        speculative_accept(d, q, p, seed=1.5)
    with pytest.raises(ValueError, match="position"):
        speculative_accept(d, q, p, position=-1)
    with pytest.raises(ValueError, match="position values"):  # (a tensor's were not checked)
        speculative_accept(d, q, p, position=torch.tensor([3, -1]))
    assert llmkern.speculative_accept is speculative_accept


def test_compiles_without_graph_breaks():
    d, q, p = torch.zeros(2, 3, dtype=torch.long), torch.full((2, 3, 5), 0.2), torch.full((2, 4, 5), 0.2)
    seeds = torch.tensor([3, 4])
    f = torch.compile(lambda d, q, p, s: speculative_accept(d, q, p, seed=s, position=9), backend="eager",
                      fullgraph=True)
    got, want = f(d, q, p, seeds), speculative_accept(d, q, p, seed=seeds, position=9)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_compiled_graph_keeps_philox_opaque():
    """Regression: traced inline, the Philox rounds put ~500 integer ops into the graph, whose expression
    tree Inductor's lowering walked without bound: torch.compile(speculative_accept) with the default
    backend ran for over ten minutes (an int seed). The uniforms are one custom op in the graph now
    (and Inductor compiles the whole call in seconds)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(2, 3, 11, generator=g), -1)
    p = torch.softmax(torch.randn(2, 4, 11, generator=g), -1)
    d = torch.multinomial(q.view(-1, 11), 1, generator=g).view(2, 3)
    f = torch.compile(lambda d, q, p: speculative_accept(d, q, p, seed=1, position=5), backend=record,
                      fullgraph=True)
    got, want = f(d, q, p), speculative_accept(d, q, p, seed=1, position=5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.llmkern.philox_uniform.default) == 2, targets  # accept + residual draws
    assert len(targets) < 100, len(targets)


def test_philox_custom_op_opcheck():
    seeds, positions = torch.tensor([3, -4])[:, None], torch.arange(5)
    torch.library.opcheck(torch.ops.llmkern.philox_uniform.default, (seeds, positions, 2))
    assert torch.equal(torch.ops.llmkern.philox_uniform(seeds, positions, 2), philox_uniform(seeds, positions, 2))


# ---- generate(draft_model=...) ------------------------------------------------------------------------

V = 64


def _sharpen(m, scale):
    with torch.no_grad():
        m.lm_head.weight.mul_(scale)  # random tiny models are near uniform: make them decide
    return m


def _perturbed(m, std, seed):
    """A different model close to m (a plausible draft: it agrees with m on most tokens)."""
    d = copy.deepcopy(m)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in d.parameters():
            w.add_(torch.randn(w.shape, generator=g) * std * (w.std() if w.numel() > 1 else 1.0))
    return d


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    target = _sharpen(build("llama-tiny", backend="torch", vocab_size=V, block_size=64), 30)
    torch.manual_seed(1)
    return {"target": target, "close": _perturbed(target, 0.1, 0),
            "gpt": _sharpen(build("gpt-tiny", backend="torch", vocab_size=V, n_layer=1, block_size=64), 30)}


def _prompts(B, T=5, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [1, 2, 4, 7])
@pytest.mark.parametrize("draft", ["close", "gpt"])
def test_speculative_greedy_equals_plain_greedy(models, k, draft):
    target, small = models["target"], models[draft]
    x = _prompts(3)
    plain = generate(target, x, 20, return_dict=True)
    spec = generate(target, x, 20, draft_model=small, num_draft_tokens=k, return_dict=True)
    assert torch.equal(spec.sequences, plain.sequences)
    torch.testing.assert_close(spec.scores, plain.scores, atol=1e-4, rtol=1e-4)
    assert bool((spec.num_accepted_draft_tokens <= spec.num_draft_tokens).all())
    one = generate(target, x[1:2], 20, draft_model=small, num_draft_tokens=k)  # batch 1: no truncation
    assert torch.equal(one, plain.sequences[1:2])
    # eos: rows stop at different steps, possibly inside an accepted run
    eos = int(plain.sequences[1, 5 + 6])
    want = generate(target, x, 20, eos_token_id=eos, pad_token_id=3)
    got = generate(target, x, 20, eos_token_id=eos, pad_token_id=3, draft_model=small, num_draft_tokens=k)
    assert torch.equal(got, want)


def test_speculative_greedy_options(models):
    target, small = models["target"], models["close"]
    x = _prompts(3, T=7, seed=1)
    am = torch.ones_like(x)
    am[0, :3] = 0
    am[2, :5] = 0
    kw = dict(attention_mask=am, pad_token_id=3)
    spec = generate(target, x, 12, draft_model=small, num_draft_tokens=3, **kw)
    assert torch.equal(spec, generate(target, x, 12, **kw))
    bias = torch.zeros(V)
    bias[[5, 9]] = 3.0
    allowed = torch.rand(V, generator=torch.Generator().manual_seed(2)) < 0.5
    allowed[9] = True  # eos (and padding)
    kw = dict(logit_bias=bias, allowed_tokens=allowed, eos_token_id=9, num_return_sequences=2)
    out = generate(target, x, 12, draft_model=small, num_draft_tokens=3, **kw)
    assert torch.equal(out, generate(target, x, 12, **kw)) and bool(allowed[out[:, 7:]].all())
    # max_new_tokens smaller than k, and 0
    assert torch.equal(generate(target, x, 2, draft_model=small, num_draft_tokens=5), generate(target, x, 2))
    assert torch.equal(generate(target, x, 0, draft_model=small), x)


class _SometimesWrong(torch.nn.Module):
    """A draft that is the target (a copy) except where wrong(row, slot) says: there it proposes the
    target's least likely token (the argmin), so it is rejected. `slot` is the key slot of the predicted
    token (padding counted), read from the per-row cache lengths."""

    def __init__(self, target, wrong):
        super().__init__()
        self.m, self.wrong = copy.deepcopy(target), wrong
        self.config = target.config

    def new_cache(self, batch, max_len=None):
        return self.m.new_cache(batch, max_len)

    def forward(self, ids, cache=None, last_only=False, **kw):
        y = self.m(ids, cache=cache, last_only=last_only, **kw)
        assert last_only  # (generate asks the draft for the last position only)
        flip = torch.tensor([self.wrong(b, int(s)) for b, s in enumerate(cache.lengths)])
        return torch.where(flip[:, None, None], -y, y)


def _target_steps(wrong, B, T0, max_new, k, per_row):
    """Target verify forwards of greedy speculative decoding when the draft is right at (row, slot) unless
    wrong(row, slot): per_row=True, every row keeps its own run (K as _speculative_decode chooses it);
    per_row=False, the previous rule: every row keeps the shortest run of the batch."""
    gen, steps, K = [0] * B, 0, min(k, max_new - 1)
    while any(g < max_new for g in gen):
        rows = [b for b in range(B) if gen[b] < max_new]
        runs = {}
        for b in rows:
            n = 0
            while n < K and not wrong(b, T0 + gen[b] + n):
                n += 1
            runs[b] = min(n, max_new - gen[b] - 1) + 1
        for b in rows:
            gen[b] += runs[b] if per_row else min(runs.values())
        steps += 1
        left = [gen[b] for b in range(B) if gen[b] < max_new]
        if left:
            K = min(k, max_new - max(left), max_new - min(left) - 1)
    return steps


def test_batched_rows_keep_their_own_accepted_runs(models):
    """Rows whose drafts fail at different slots: each keeps its whole accepted run (the old rule kept the
    batch's shortest, here one token a step), with the output of plain greedy decoding, row by row."""
    target = models["target"]
    B, T0, n, k = 4, 8, 24, 4
    x = _prompts(B, T=T0, seed=6)
    am = torch.ones_like(x)
    for b, pad in enumerate([0, 3, 5, 1]):  # prompts of 8, 5, 3, 7 tokens
        am[b, :pad] = 0

    def wrong(b, slot):  # row 0: always right; rows 1-3: wrong every third slot, each at another phase
        return b > 0 and (slot + b) % 3 == 0

    draft = _SometimesWrong(target, wrong)
    calls = []
    hook = target.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[1]))
    try:
        spec = generate(target, x, n, attention_mask=am, draft_model=draft, num_draft_tokens=k, return_dict=True)
    finally:
        hook.remove()
    assert torch.equal(spec.sequences, generate(target, x, n, attention_mask=am))
    verify = len(calls) - 1  # (the first call is the prompt's prefill)
    assert calls[0] == T0 - 1 and verify == _target_steps(wrong, B, T0, n, k, per_row=True)
    old = _target_steps(wrong, B, T0, n, k, per_row=False)
    assert old == n and 2 * verify < old, (verify, old)  # measured: 9 verify forwards instead of 24
    # the kept proposals: row 0 all of them; the others about two of every three tokens
    acc = spec.num_accepted_draft_tokens.tolist()
    assert acc[0] == int(spec.num_draft_tokens[0]) and all(a >= 14 for a in acc[1:]), acc


def test_llmkern_backend(models):
    """The target's k + 1 queries go through llmkern.attention_with_kvcache (bottom-right causal)."""
    target, small = models["target"], models["close"]
    x = _prompts(2, seed=3)
    plain = generate(target, x, 12)
    target.backend = small.backend = "llmkern"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (a backend that falls back says so once)
            spec = generate(target, x, 12, draft_model=small, num_draft_tokens=4)
    finally:
        target.backend = small.backend = "torch"
    assert torch.equal(spec, plain)


@pytest.mark.gpu
def test_gpu_batched_speculative_llmkern_backend(models):
    """On CUDA the target's per-row verify runs the Triton decode kernel with per-row cache_seqlens
    (the padded batch: SDPA with the per-row mask); greedy equals plain greedy row by row."""
    target, draft = copy.deepcopy(models["target"]).cuda(), copy.deepcopy(models["close"]).cuda()
    target.backend = draft.backend = "llmkern"
    x = _prompts(4, T=8, seed=7).cuda()
    am = torch.ones_like(x)
    am[1, :3] = 0
    am[3, :5] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the padded batch says it takes SDPA)
        for kw in ({}, {"attention_mask": am}):
            plain = generate(target, x, 20, **kw)
            assert torch.equal(generate(target, x, 20, draft_model=draft, num_draft_tokens=4, **kw), plain)


@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_draft_equal_to_target_accepts_everything(models, strategy):
    target = models["target"]
    x = _prompts(2, seed=4)
    out = generate(target, x, 17, strategy=strategy, seed=1, draft_model=target, num_draft_tokens=4,
                   return_dict=True)
    # steps of 4 + 1 tokens; the last step proposes max_new_tokens - generated - 1 = 1
    assert out.num_draft_tokens.tolist() == [4 * 3 + 1] * 2
    assert torch.equal(out.num_accepted_draft_tokens, out.num_draft_tokens)
    if strategy == "greedy":
        assert torch.equal(out.sequences, generate(target, x, 17))


def test_sampled_speculative_is_reproducible(models):
    target, small = models["target"], models["close"]
    x = _prompts(3, seed=5)
    kw = dict(strategy="sample", temperature=0.8, top_p=0.9, draft_model=small, num_draft_tokens=3, return_dict=True)
    a, b = generate(target, x, 15, seed=7, **kw), generate(target, x, 15, seed=7, **kw)
    c = generate(target, x, 15, seed=8, **kw)
    assert torch.equal(a.sequences, b.sequences) and not torch.equal(a.sequences, c.sequences)
    assert a.scores.shape == (3, 15) and bool((a.scores <= 0).all())
    assert int(a.num_accepted_draft_tokens.sum()) > 0
    d = generate(target, x, 15, seed=torch.tensor([7, 8, 9]), **kw)
    assert torch.equal(d.sequences, a.sequences)  # an int seed s gives row r the seed s + r
    # top_k=1 sampling is greedy; per-row knobs ([B] tensors) apply per row
    greedy = generate(target, x, 10)
    assert torch.equal(generate(target, x, 10, strategy="sample", top_k=1, seed=0, draft_model=small), greedy)
    per_row = generate(target, x, 10, strategy="sample", seed=1, draft_model=small, top_k=torch.tensor([1, 5, 0]),
                       temperature=torch.tensor([0.5, 1.0, 2.0]), top_p=0.9)
    assert torch.equal(per_row[0], greedy[0])
    with pytest.raises(ValueError, match="temperature"):
        generate(target, x, 4, strategy="sample", draft_model=small, temperature=torch.tensor([0.0, 1.0, 1.0]))


def test_sampled_speculative_checks_tensor_knobs_once(models, monkeypatch):
    """Per-row top_k / top_p tensors are range-checked (one host read) once per generate call, not at
    every draft and verify step; out-of-range values are still refused."""
    from llmkern.ops import sampling

    target, small = models["target"], models["close"]
    x = _prompts(2, seed=3)
    calls = []
    verify = sampling._RangeChecks.verify
    monkeypatch.setattr(sampling._RangeChecks, "verify", lambda self: (calls.append(1), verify(self))[1])
    out = generate(target, x, 12, strategy="sample", seed=2, draft_model=small, num_draft_tokens=3,
                   top_k=torch.tensor([1, 4]), top_p=torch.tensor([0.9, 0.8]))
    assert len(calls) == 1 and out.shape == (2, x.shape[1] + 12)
    with pytest.raises(ValueError, match="top_p"):
        generate(target, x, 4, strategy="sample", draft_model=small, top_p=torch.tensor([0.5, 1.5]))


def _exact_joint(model, prompt, V, process):
    """P(x1, x2) [V, V] and P(x3) [V] of the target's sampled continuation, by enumeration."""
    pairs = torch.cartesian_prod(torch.arange(V), torch.arange(V))
    ids = torch.cat([prompt.expand(V * V, -1), pairs], 1)
    with torch.no_grad():
        logits = model(ids).float()
    T = prompt.shape[1]
    p1 = process(logits[0, T - 1])
    p2 = process(logits[::V, T])                      # [V, V]: rows x1
    p3 = process(logits[:, T + 1]).view(V, V, V)      # [x1, x2, x3]
    joint12 = p1[:, None] * p2
    return joint12, (joint12[..., None] * p3).sum((0, 1))


def test_sampled_speculative_matches_the_target_distribution():
    """Per-position token statistics of speculative sampling equal the target's exact distribution
    (with temperature and top-k applied to both models), on a tiny vocabulary."""
    Vs, N, T = 6, 4000, 4
    torch.manual_seed(0)
    target = _sharpen(build("llama-tiny", backend="torch", vocab_size=Vs, n_layer=1, block_size=16), 4)
    draft = _perturbed(target, 0.3, 1)
    prompt = torch.randint(0, Vs, (1, T), generator=torch.Generator().manual_seed(1))
    temperature, top_k = 0.9, 4

    def process(logits):
        y = logits / temperature
        kth = y.topk(top_k, -1).values[..., -1:]
        return torch.softmax(y.masked_fill(y < kth, float("-inf")), -1)

    joint12, p3 = _exact_joint(target, prompt, Vs, process)
    draft12, _ = _exact_joint(draft, prompt, Vs, process)
    x = prompt.expand(N, T)
    kw = dict(strategy="sample", temperature=temperature, top_k=top_k)
    out = generate(target, x, 3, draft_model=draft, num_draft_tokens=2, seed=123, return_dict=True, **kw)
    new = out.sequences[:, T:]
    assert float(out.num_accepted_draft_tokens.sum()) > 0.3 * N  # the truncation path is exercised
    pair = new[:, 0] * Vs + new[:, 1]
    assert _fits(pair, joint12.flatten()), _chi2(pair, joint12.flatten())
    assert _fits(new[:, 2], p3), _chi2(new[:, 2], p3)
    assert not _fits(pair, draft12.flatten())  # the test can tell the draft's distribution apart
    # batch 1 (whole accepted runs kept): fewer samples, same check
    runs = torch.cat([generate(target, prompt, 3, draft_model=draft, num_draft_tokens=2, seed=s, **kw)[:, T:]
                      for s in range(600)])
    assert _fits(runs[:, 0] * Vs + runs[:, 1], joint12.flatten())


def test_speculative_bad_arguments(models):
    target, small = models["target"], models["close"]
    x = _prompts(1)
    with pytest.raises(ValueError, match="beam"):
        generate(target, x, 4, strategy="beam", num_beams=2, draft_model=small)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        generate(target, x, 4, draft_model=small, num_draft_tokens=0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate(target, x, 4, draft_model=small, repetition_penalty=1.2)
    with pytest.raises(ValueError, match="scorers"):
        generate(target, x, 4, draft_model=small, scorers=[lambda s, lp: lp])
    with pytest.raises(ValueError, match="allowed_tokens"):
        generate(target, x, 4, draft_model=small, allowed_tokens=lambda s: torch.ones(1, V, dtype=torch.bool))
    with pytest.raises(ValueError, match="use_cache"):
        generate(target, x, 4, draft_model=small, use_cache=False)
    with pytest.raises(ValueError, match="vocab"):
        generate(target, x, 4, draft_model=build("llama-tiny", backend="torch", vocab_size=V + 1))
    with pytest.raises(ValueError, match="block_size"):
        generate(build("llama-tiny", backend="torch", vocab_size=V), x, 20, draft_model=build(
            "llama-tiny", backend="torch", vocab_size=V, block_size=16))
    with pytest.raises(ValueError, match="top_p"):
        generate(target, x, 4, strategy="sample", draft_model=small, top_p=0.0)
    allow = torch.ones(2, V, dtype=torch.bool)
    allow[1] = False
    with pytest.raises(ValueError, match=r"allowed_tokens allows no token for sequence\(s\) \[1\]"):
        generate(target, _prompts(2), 3, draft_model=small, allowed_tokens=allow)
    moe = build("mixtral-tiny", backend="torch", vocab_size=V, moe_capacity_factor=1.0)
    with pytest.raises(ValueError, match="model: a MoE with moe_capacity_factor=1.0"):
        generate(moe, x, 4, draft_model=small)


def test_speculative_infinite_bias_and_zero_dim_temperature(models):
    """A +inf logit_bias forces a token: greedy speculation reports the scores plain greedy does (0, not NaN);
    a 0-d temperature tensor is one temperature for every row (it crashed the speculative path)."""
    target, small = models["target"], models["close"]
    x = _prompts(2)
    bias = torch.zeros(V)
    bias[7] = float("inf")
    plain = generate(target, x, 3, logit_bias=bias, return_dict=True)
    spec = generate(target, x, 3, logit_bias=bias, draft_model=small, num_draft_tokens=2, return_dict=True)
    assert torch.equal(spec.sequences, plain.sequences) and bool((spec.sequences[:, 5:] == 7).all())
    torch.testing.assert_close(spec.scores, plain.scores)
    assert not bool(spec.scores.isnan().any())
    got = generate(target, x, 6, strategy="sample", temperature=torch.tensor(0.8), seed=3, draft_model=small)
    want = generate(target, x, 6, strategy="sample", temperature=0.8, seed=3, draft_model=small)
    assert torch.equal(got, want)


def test_speculative_per_prompt_tensors_with_num_return_sequences(models):
    """A [B, V] logit_bias and [B] temperature / seed failed with num_return_sequences > 1: they apply to each
    of the prompt's sequences (as in plain decoding; seeds seed[b] + j)."""
    target, small = models["target"], models["close"]
    B, R = 2, 2
    x = _prompts(B, T=5, seed=3)
    bias = torch.zeros(B, V)
    bias[0, 7], bias[1, 11] = 2.0, 2.0
    kw = dict(draft_model=small, num_draft_tokens=3, num_return_sequences=R)
    greedy = generate(target, x, 10, logit_bias=bias, **kw)
    assert torch.equal(greedy, generate(target, x, 10, logit_bias=bias, num_return_sequences=R))
    per_prompt = dict(logit_bias=bias, temperature=torch.tensor([0.7, 1.2]), top_k=torch.tensor([0, 10]),
                      seed=torch.tensor([5, 40]))
    out = generate(target, x, 10, strategy="sample", **per_prompt, **kw)
    explicit = dict(logit_bias=bias.repeat_interleave(R, 0), temperature=torch.tensor([0.7, 0.7, 1.2, 1.2]),
                    top_k=torch.tensor([0, 0, 10, 10]), seed=torch.tensor([5, 6, 40, 41]))
    assert torch.equal(out, generate(target, x.repeat_interleave(R, 0), 10, strategy="sample", draft_model=small,
                                     num_draft_tokens=3, **explicit))
    assert torch.equal(out, generate(target, x, 10, strategy="sample", **explicit, **kw))
