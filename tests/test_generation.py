"""llmkern.generation: greedy and beam equal transformers' generate; sampling; guided decoding."""
import warnings

import pytest
import torch

from llmkern.generation import generate
from llmkern.models import build, from_hf

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)
V = 97
PAD = 5  # non-zero: transformers fills finished beams with eos when pad_token_id == 0


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(ours, transformers) for a random tiny GPT-2 and a random tiny Llama (GQA)."""
    torch.manual_seed(0)
    out = {}
    d = tmp_path_factory.mktemp("ckpt")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2,
                                                              n_head=4)).eval()
    hf.save_pretrained(d / "gpt2")
    out["gpt2"] = (from_hf(str(d / "gpt2"), backend="torch"), hf)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()
    hf.generation_config.eos_token_id = None  # no default eos (LlamaConfig has eos_token_id=2), here and in the
    hf.save_pretrained(d / "llama")            # checkpoint (from_hf takes it as generate's default)
    out["llama"] = (from_hf(str(d / "llama"), backend="torch"), hf)
    return out


def _hf(hf, x, **kw):
    return hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=PAD, **kw)


def _eos(m, x):
    """A token greedy decoding emits a few steps in, so that eos paths are exercised."""
    return int(generate(m, x, 6)[0, x.shape[1] + 3])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_greedy_equals_transformers(pairs, arch, backend):
    m, hf = pairs[arch]
    m.backend = backend
    x = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if backend == "torch":
            assert torch.equal(generate(m, x, 12), _hf(hf, x, max_new_tokens=12))
        eos = _eos(m, x)
        ours = generate(m, x, 12, eos_token_id=eos, pad_token_id=PAD)
        assert torch.equal(ours, _hf(hf, x, max_new_tokens=12, eos_token_id=eos))
        if backend == "torch":
            assert torch.equal(generate(m, x, 12, eos_token_id=eos, pad_token_id=PAD, use_cache=False), ours)
            # repetition penalty goes through llmkern.sample's processing, as in HF
            assert torch.equal(generate(m, x, 8, repetition_penalty=1.3),
                               _hf(hf, x, max_new_tokens=8, repetition_penalty=1.3))
    m.backend = "torch"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("early_stopping, length_penalty, K, R", [(False, 1.0, 3, 2), (True, 0.0, 4, 1),
                                                                  ("never", -1.5, 3, 3)])
def test_beam_equals_transformers(pairs, arch, early_stopping, length_penalty, K, R):
    m, hf = pairs[arch]
    x = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(4))
    eos = _eos(m, x)
    kw = dict(num_beams=K, length_penalty=length_penalty, early_stopping=early_stopping, num_return_sequences=R)
    ours = generate(m, x, 9, strategy="beam", eos_token_id=eos, pad_token_id=PAD, **kw)
    ref = _hf(hf, x, max_new_tokens=9, eos_token_id=eos, **kw)
    assert torch.equal(ours, ref), (ours, ref)


def test_beam_scores_and_no_cache(pairs):
    m, hf = pairs["gpt2"]
    x = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(4))
    eos = _eos(m, x)
    ours = generate(m, x, 9, strategy="beam", num_beams=3, eos_token_id=eos, pad_token_id=PAD, return_dict=True)
    ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=9, num_beams=3, eos_token_id=eos,
                      pad_token_id=PAD, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(ours.sequences, ref.sequences)
    torch.testing.assert_close(ours.scores, ref.sequences_scores, atol=1e-5, rtol=1e-5)
    assert torch.equal(generate(m, x, 9, strategy="beam", num_beams=3, use_cache=False, eos_token_id=eos,
                                pad_token_id=PAD), ours.sequences)


def test_sampling_seeded_and_filtered(pairs):
    m, _ = pairs["llama"]
    x = torch.randint(0, V, (4, 5), generator=torch.Generator().manual_seed(5))
    a = generate(m, x, 10, strategy="sample", temperature=0.9, top_p=0.9, seed=7)
    b = generate(m, x, 10, strategy="sample", temperature=0.9, top_p=0.9, seed=7)
    c = generate(m, x, 10, strategy="sample", temperature=0.9, top_p=0.9, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(generate(m, x, 10, strategy="sample", top_k=1, seed=1), generate(m, x, 10))
    out = generate(m, x, 10, strategy="sample", temperature=1.5, seed=3, return_dict=True)
    assert out.scores.shape == (4, 10) and bool((out.scores <= 0).all())
    assert generate(m, x, 3, strategy="sample", num_return_sequences=2, seed=0).shape == (8, 8)


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_guided_masks_respected(pairs, strategy):
    m, _ = pairs["gpt2"]
    x = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(6))
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[[3, 11, 42, 60]] = True
    kw = dict(num_beams=3) if strategy == "beam" else dict(seed=0, temperature=2.0)
    if strategy == "greedy":
        kw = {}
    out = generate(m, x, 8, strategy=strategy, allowed_tokens=allowed, **kw)
    assert bool(allowed[out[:, 5:]].all())

    def alternate(seqs):  # a tiny "grammar": even tokens at even positions, odd at odd ones
        mask = torch.zeros(seqs.shape[0], V, dtype=torch.bool)
        mask[:, seqs.shape[1] % 2::2] = True
        return mask

    out = generate(m, x, 8, strategy=strategy, allowed_tokens=alternate, **kw)
    pos = torch.arange(5, 13)
    assert bool(((out[:, 5:] % 2) == (pos % 2)).all())
    rows = torch.zeros(2, V, dtype=torch.bool)  # per-prompt masks
    rows[0, 7], rows[1, 9] = True, True
    out = generate(m, x, 4, strategy=strategy, allowed_tokens=rows, **kw)
    assert bool((out[0, 5:] == 7).all()) and bool((out[1, 5:] == 9).all())


def test_scored_search(pairs):
    """score(x_{t+1}, b_t) = score(b_t) + log p(x_{t+1}) + Σ α_i f_i(x_{t+1})."""
    m, _ = pairs["llama"]
    x = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(7))
    base = generate(m, x, 8, strategy="beam", num_beams=3, return_dict=True)

    def zero(seqs, logp):
        return torch.zeros_like(logp)

    same = generate(m, x, 8, strategy="beam", num_beams=3, scorers=[(5.0, zero)], return_dict=True)
    assert torch.equal(same.sequences, base.sequences)

    def likes_13(seqs, logp):  # a feature of the candidate token
        f = torch.zeros_like(logp)
        f[:, 13] = 1.0
        return f

    assert bool((generate(m, x, 6, scorers=[(100.0, likes_13)])[:, 5:] == 13).all())
    assert bool((generate(m, x, 6, strategy="beam", num_beams=2, scorers=[(100.0, likes_13)])[:, 5:] == 13).all())

    def no_repeat(seqs, logp):  # penalise tokens already in the beam
        f = torch.zeros_like(logp)
        f.scatter_(1, seqs, -1.0)
        return f

    out = generate(m, x, 8, strategy="beam", num_beams=3, scorers=[(1e3, no_repeat)])
    for row in out:
        assert len(set(row[5:].tolist())) == 8 and not set(row[5:].tolist()) & set(row[:5].tolist())
    # greedy with a scorer = argmax of log p + α f, step by step
    alpha = 0.7
    feat = torch.randn(V, generator=torch.Generator().manual_seed(0))
    out = generate(m, x, 5, scorers=[(alpha, lambda s, lp: feat.expand_as(lp))])
    seqs = x
    for _ in range(5):
        lp = torch.log_softmax(m(seqs)[:, -1].float(), -1)
        seqs = torch.cat([seqs, (lp + alpha * feat).argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seqs)


def test_generate_bad_arguments():
    m = build("gpt-tiny", backend="torch")
    x = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="strategy"):
        generate(m, x, 2, strategy="contrastive")
    with pytest.raises(ValueError, match="input_ids"):
        generate(m, x.float(), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, x, 200)
    with pytest.raises(ValueError, match="top_p"):
        generate(m, x, 2, strategy="beam", num_beams=2, top_p=0.5)
    with pytest.raises(ValueError, match="num_beams"):
        generate(m, x, 2, num_beams=3)
    with pytest.raises(ValueError, match="early_stopping"):
        generate(m, x, 2, strategy="beam", num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="allowed_tokens"):
        generate(m, x, 2, allowed_tokens=torch.ones(10, dtype=torch.bool))
    with pytest.raises(ValueError, match="scorers"):
        generate(m, x, 2, scorers=[3.0])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padded_batch_equals_transformers(pairs, arch):
    m, hf = pairs[arch]
    x = torch.randint(0, V, (3, 8), generator=torch.Generator().manual_seed(8))
    am = torch.ones_like(x)
    am[0, :3] = 0
    am[2, :5] = 0
    x[am == 0] = PAD
    pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)  # transformers' positions for left padding
    with torch.no_grad():
        torch.testing.assert_close(m(x, attention_mask=am)[am.bool()],
                                   hf(x, attention_mask=am, position_ids=pos).logits[am.bool()], atol=1e-4, rtol=1e-4)
    for backend in ("torch", "llmkern"):
        m.backend = backend
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = generate(m, x, 8, attention_mask=am, pad_token_id=PAD)
            assert torch.equal(ours, hf.generate(x, attention_mask=am, max_new_tokens=8, do_sample=False,
                                                 pad_token_id=PAD))
            beam = generate(m, x, 8, strategy="beam", num_beams=3, attention_mask=am, pad_token_id=PAD)
            assert torch.equal(beam, hf.generate(x, attention_mask=am, max_new_tokens=8, do_sample=False,
                                                 num_beams=3, pad_token_id=PAD))
            # the padded row continues exactly as the same prompt alone
            assert torch.equal(ours[2, 5:], generate(m, x[2:, 5:], 8)[0])
            # penalties do not count the padding (transformers skips it too)
            pen = dict(repetition_penalty=1.5, pad_token_id=PAD)
            ours = generate(m, x, 8, attention_mask=am, **pen)
            assert torch.equal(ours, hf.generate(x, attention_mask=am, max_new_tokens=8, do_sample=False, **pen))
            for kw in (dict(frequency_penalty=2.0), dict(presence_penalty=3.0, strategy="sample", top_k=5)):
                seeds = dict(seed=torch.tensor([4, 5, 6])) if "top_k" in kw else {}
                padded = generate(m, x, 8, attention_mask=am, pad_token_id=PAD, **kw, **seeds)
                seeds = dict(seed=torch.tensor([6])) if "top_k" in kw else {}
                assert torch.equal(padded[2, 5:], generate(m, x[2:, 5:], 8, **kw, **seeds)[0]), kw
    m.backend = "torch"
    with pytest.raises(ValueError, match="left padding"):
        generate(m, x, 2, attention_mask=am.flip(1))


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_choice_constraint_generates_one_of_the_choices(pairs, strategy):
    """ChoiceConstraint (vLLM's guided_choice): every row generates one of the choices, then eos and padding;
    choices sharing a prefix, one a prefix of another, a single-token one."""
    from llmkern.generation import ChoiceConstraint

    m, _ = pairs["gpt2"]
    x = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(8))
    choices = [[12, 7], [12, 9, 4], [12, 9], [30]]
    c = ChoiceConstraint(choices, vocab_size=V, prompt_len=5, eos_token_id=2)
    kw = dict(num_beams=3, num_return_sequences=2) if strategy == "beam" else dict(seed=1, temperature=3.0)
    if strategy == "greedy":
        kw = {}
    for _ in range(2 if strategy == "sample" else 1):
        out = generate(m, x, 5, strategy=strategy, allowed_tokens=c, eos_token_id=2, pad_token_id=0, **kw)
        for row in out[:, 5:].tolist():
            stop = row.index(2)
            assert row[:stop] in choices and all(t == 0 for t in row[stop + 1:]), row
        kw["seed"] = 2
    # without eos: a completed choice with no continuation allows anything
    c = ChoiceConstraint([[5, 6]], vocab_size=V, prompt_len=0)
    assert c(torch.tensor([[5]]))[0].nonzero().flatten().tolist() == [6]
    assert bool(c(torch.tensor([[5, 6]])).all())
    with pytest.raises(ValueError, match="choice"):
        ChoiceConstraint([[V]], vocab_size=V, prompt_len=0)
    with pytest.raises(ValueError, match="eos_token_id"):
        ChoiceConstraint([[1]], vocab_size=V, prompt_len=0, eos_token_id=V)
    with pytest.raises(ValueError, match="before its end"):  # generation would stop at that eos
        ChoiceConstraint([[12, 2, 7]], vocab_size=V, prompt_len=0, eos_token_id=2)
    with pytest.raises(ValueError, match="non-empty list"):
        ChoiceConstraint(torch.tensor([[12, 30]]), vocab_size=V, prompt_len=0)
    assert ChoiceConstraint([torch.tensor([12, 30])], vocab_size=V, prompt_len=0)(torch.zeros(1, 0, dtype=torch.long))[
        0].nonzero().flatten().tolist() == [12]


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_a_sequence_with_no_allowed_token_raises(pairs, strategy):
    """A row whose allowed_tokens are all False has no token to choose: an error, not token 0.
    A row that has finished (eos) may allow nothing afterwards."""
    m, _ = pairs["gpt2"]
    x = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(num_beams=2) if strategy == "beam" else {}
    allow = torch.ones(2, V, dtype=torch.bool)
    allow[1] = False
    with pytest.raises(ValueError, match=r"allowed_tokens allows no token for sequence\(s\) \[1\]"):
        generate(m, x, 3, strategy=strategy, allowed_tokens=allow, **kw)

    def eos_then_nothing(seqs):  # only token 7 until it is emitted, then nothing
        done = (seqs[:, 5:] == 7).any(-1)
        a = torch.zeros(seqs.shape[0], V, dtype=torch.bool)
        a[~done, 7] = True
        return a
    out = generate(m, x, 4, strategy=strategy, allowed_tokens=eos_then_nothing, eos_token_id=7, pad_token_id=PAD, **kw)
    assert (out[:, 5] == 7).all() and out.shape[1] == 6


# ---- review regressions ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_logit_bias_before_repetition_penalty_equals_transformers(pairs, arch):
    """HF's generate adds sequence_bias before the repetition penalty (so does vLLM): with both, our greedy
    tokens differed from transformers'. Greedy with a (zero) scorer ranks the same processed logits."""
    m, hf = pairs[arch]
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (3, 6), generator=g)
    bias = torch.randn(V, generator=g) * 0.5
    kw = dict(repetition_penalty=1.8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _hf(hf, x, max_new_tokens=10, sequence_bias={(t,): float(bias[t]) for t in range(V)}, **kw)
    assert torch.equal(generate(m, x, 10, logit_bias=bias, pad_token_id=PAD, **kw), want)
    zero = lambda s, lp: torch.zeros_like(lp)  # noqa: E731
    assert torch.equal(generate(m, x, 10, logit_bias=bias, pad_token_id=PAD, scorers=[zero], **kw), want)
    # per prompt [B, V] with the same rows: the same tokens
    assert torch.equal(generate(m, x, 10, logit_bias=bias.expand(3, V), pad_token_id=PAD, **kw), want)


def _vllm_greedy(m, x, n, rep, pres, freq, bias=None):
    """Greedy decoding step by step with vLLM's penalties written out: bias, then the repetition penalty over
    prompt and output tokens, then presence / frequency penalties over the output tokens only."""
    seqs = x
    for _ in range(n):
        y = m(seqs)[:, -1].float()
        if bias is not None:
            y = y + bias
        for r in range(seqs.shape[0]):
            for t in set(seqs[r].tolist()):
                y[r, t] = y[r, t] / rep if y[r, t] > 0 else y[r, t] * rep
            out = seqs[r, x.shape[1]:].tolist()
            for t in set(out):
                y[r, t] -= pres + freq * out.count(t)
        seqs = torch.cat([seqs, y.argmax(-1, keepdim=True)], 1)
    return seqs


def test_presence_and_frequency_penalties_count_generated_tokens_only(pairs):
    """vLLM and OpenAI count only generated tokens for presence / frequency penalties (the repetition
    penalty counts the prompt too): generate counted the prompt for all three, so even the first new token
    was penalised when the prompt held the unpenalised choice."""
    m, _ = pairs["llama"]
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, V, (64, 12), generator=g)
    first = generate(m, x, 1)[:, -1]
    held = (x == first[:, None]).any(-1)  # prompts that hold the token greedy emits first
    x, first = x[held][:4], first[held][:4]
    assert x.shape[0] == 4
    for kw in (dict(presence_penalty=2.0), dict(frequency_penalty=2.0)):
        assert torch.equal(generate(m, x, 1, **kw)[:, -1], first), kw
        # sampling: the first draw is the unpenalised one too
        assert torch.equal(generate(m, x, 1, strategy="sample", seed=3, **kw),
                           generate(m, x, 1, strategy="sample", seed=3))
    bias = torch.randn(V, generator=g)
    for rep, pres, freq in ((1.0, 0.8, 0.0), (1.0, 0.0, 0.6), (1.4, 0.5, 0.3)):
        kw = dict(repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq)
        want = _vllm_greedy(m, x, 10, rep, pres, freq, bias)
        assert torch.equal(generate(m, x, 10, logit_bias=bias, **kw), want), kw
        zero = lambda s, lp: torch.zeros_like(lp)  # noqa: E731
        assert torch.equal(generate(m, x, 10, logit_bias=bias, scorers=[zero], **kw), want), kw
        # temperature -> 0 in sampling (top_k=1) follows the same penalties
        assert torch.equal(generate(m, x, 10, strategy="sample", top_k=1, seed=0, logit_bias=bias, **kw), want), kw


@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_per_prompt_tensors_with_num_return_sequences(pairs, strategy):
    """A [B, V] logit_bias and [B] temperature / seed / top_k / penalties failed with num_return_sequences > 1
    ("must have shape [4], got (2,)"); they apply per prompt, as a [B, V] allowed_tokens does."""
    m, _ = pairs["llama"]
    g = torch.Generator().manual_seed(3)
    B, R = 2, 3
    x = torch.randint(0, V, (B, 5), generator=g)
    bias = torch.randn(B, V, generator=g) * 2
    per_prompt = dict(logit_bias=bias, repetition_penalty=torch.tensor([1.0, 1.5]),
                      presence_penalty=torch.tensor([0.5, 0.0]))
    if strategy == "sample":
        per_prompt.update(temperature=torch.tensor([0.7, 1.3]), top_k=torch.tensor([0, 20]),
                          top_p=torch.tensor([0.9, 1.0]), min_p=torch.tensor([0.0, 0.05]), seed=torch.tensor([11, 50]))
    out = generate(m, x, 8, strategy=strategy, num_return_sequences=R, **per_prompt)
    assert out.shape == (B * R, 13)
    alone = torch.cat([generate(m, x[b:b + 1], 8, strategy=strategy, num_return_sequences=R,
                                **{k: v[b:b + 1] for k, v in per_prompt.items()}) for b in range(B)])
    assert torch.equal(out, alone)
    explicit = {k: v.repeat_interleave(R, 0) for k, v in per_prompt.items()}
    if strategy == "sample":  # sequence j of prompt b: seed[b] + j
        explicit["seed"] = torch.tensor([11, 12, 13, 50, 51, 52])
        assert len({tuple(r) for r in out[:R].tolist()}) > 1  # distinct sequences, not R copies
    assert torch.equal(out, generate(m, x.repeat_interleave(R, 0), 8, strategy=strategy, **explicit))
    assert torch.equal(out, generate(m, x, 8, strategy=strategy, num_return_sequences=R, **explicit))
    if strategy == "sample":  # an int seed s: row r draws with s + r, the same as the [B] seed [s, s + R]
        assert torch.equal(generate(m, x, 8, strategy=strategy, num_return_sequences=R, seed=11),
                           generate(m, x, 8, strategy=strategy, num_return_sequences=R, seed=torch.tensor([11, 14])))
    with pytest.raises(ValueError, match=r"logit_bias must be .* per prompt \(2\) or per returned sequence \(6"):
        generate(m, x, 2, strategy=strategy, num_return_sequences=R, logit_bias=torch.zeros(4, V))
    with pytest.raises(ValueError, match="presence_penalty"):
        generate(m, x, 2, strategy=strategy, num_return_sequences=R, presence_penalty=torch.zeros(5))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_beam_search_per_prompt_logit_bias(pairs, arch):
    """A [B, V] logit_bias crashed beam search (log_probs [B * K, V] + bias [B, V]): it is added to every beam
    of its prompt; a [V] bias equals transformers' sequence_bias."""
    m, hf = pairs[arch]
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, V, (2, 6), generator=g)
    bias = torch.randn(2, V, generator=g) * 2
    kw = dict(strategy="beam", num_beams=3, num_return_sequences=2, pad_token_id=PAD)
    out = generate(m, x, 7, logit_bias=bias, **kw)
    for b in range(2):
        alone = generate(m, x[b:b + 1], 7, logit_bias=bias[b], **kw)
        assert torch.equal(out[2 * b:2 * b + 2], alone), b
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = _hf(hf, x[b:b + 1], max_new_tokens=7, num_beams=3, num_return_sequences=2,
                      sequence_bias={(t,): float(bias[b, t]) for t in range(V)})
        assert torch.equal(alone, ref), b
    with pytest.raises(ValueError, match="logit_bias"):
        generate(m, x, 2, logit_bias=torch.zeros(3, V), strategy="beam", num_beams=2)
    with pytest.raises(ValueError, match="temperature is a sampling option"):
        generate(m, x, 2, temperature=torch.tensor([0.5, 1.0]), strategy="beam", num_beams=2)


class _FixedLogits(torch.nn.Module):
    """The same logits at every step: token 3 the largest finite one, and a NaN at token 0 or a +inf at 5."""

    def __init__(self, special):
        super().__init__()
        self.special = special

    def forward(self, ids, cache=None, last_only=True, **kw):
        y = -torch.arange(V, dtype=torch.float32).expand(ids.shape[0], 1, V).clone()
        y[..., 3] = 5.0
        if self.special == "nan":
            y[..., 0] = float("nan")
        else:
            y[..., 5] = float("inf")
        return y


@pytest.mark.parametrize("special", ["nan", "inf"])
def test_greedy_with_scorers_treats_nan_and_inf_logits_like_plain_greedy(special):
    """llmkern.sample counts NaN logits as -inf and lets +inf logits share the mass; greedy with scorers
    took torch.log_softmax of the raw row (all NaN) and raised "no finite value"."""
    m = _FixedLogits(special)
    x = torch.zeros(2, 3, dtype=torch.long)
    plain = generate(m, x, 3, use_cache=False, return_dict=True)
    assert bool((plain.sequences[:, 3:] == (3 if special == "nan" else 5)).all())
    zero = lambda s, lp: torch.zeros_like(lp)  # noqa: E731
    for strategy in ("greedy", "sample"):
        kw = dict(strategy=strategy, top_k=1, seed=0) if strategy == "sample" else {}
        # a scorer reading the log-probabilities (finite where plain greedy's are)
        reads_lp = (1e-3, lambda s, lp: lp.clamp(min=-50))
        got = generate(m, x, 3, use_cache=False, return_dict=True, scorers=[zero, reads_lp], **kw)
        assert torch.equal(got.sequences, plain.sequences), strategy
    got = generate(m, x, 3, use_cache=False, return_dict=True, scorers=[zero])
    torch.testing.assert_close(got.scores, plain.scores)


@pytest.mark.parametrize("R", [1, 3])
def test_zero_dim_and_numpy_seeds_are_ints(pairs, R):
    """A 0-dim tensor seed gave every row the same seed (the R sequences of a prompt were identical, where an
    int seed s gives row r the seed s + r); np.int64 raised AttributeError; float / bool seed tensors were
    truncated silently."""
    np = pytest.importorskip("numpy")
    m, _ = pairs["llama"]
    x = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(9))
    kw = dict(strategy="sample", temperature=1.5, num_return_sequences=R)
    want = generate(m, x, 6, seed=3, **kw)
    assert torch.equal(generate(m, x, 6, seed=torch.tensor(3), **kw), want)
    assert torch.equal(generate(m, x, 6, seed=np.int64(3), **kw), want)
    if R > 1:
        assert len({tuple(r) for r in want[:R].tolist()}) > 1  # distinct sequences, not R copies
    for bad in (torch.tensor([1.9, 2.9]), torch.tensor([True, False]), torch.tensor(3.0), torch.tensor(True),
                torch.tensor([[1], [2]]), torch.tensor([1, 2, 3, 4, 5])):
        with pytest.raises(ValueError, match="seed"):
            generate(m, x, 2, seed=bad, **kw)


@pytest.mark.parametrize("early_stopping, length_penalty", [(False, 1.0), ("never", 0.0), ("never", 1.0),
                                                            ("never", 2.0)])
def test_beam_search_allows_nothing_after_eos_with_any_early_stopping(pairs, early_stopping, length_penalty):
    """early_stopping="never" with length_penalty > 0 raised "allowed_tokens allows no token" once every real
    hypothesis had finished: the running beams left were eos-ended placeholders, counted as stuck."""
    m, _ = pairs["gpt2"]
    x = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(2))

    def eos_then_nothing(seqs):  # only token 7 until it is emitted, then nothing
        done = (seqs[:, 5:] == 7).any(-1)
        a = torch.zeros(seqs.shape[0], V, dtype=torch.bool)
        a[~done, 7] = True
        return a
    for K in (2, 3):
        out = generate(m, x, 4, strategy="beam", num_beams=K, allowed_tokens=eos_then_nothing, eos_token_id=7,
                       pad_token_id=PAD, early_stopping=early_stopping, length_penalty=length_penalty)
        assert out[:, 5:].tolist() == [[7], [7]], K
    # a real beam with nothing allowed still raises
    allow = torch.ones(2, V, dtype=torch.bool)
    allow[1] = False
    with pytest.raises(ValueError, match=r"allowed_tokens allows no token for sequence\(s\) \[1\]"):
        generate(m, x, 3, strategy="beam", num_beams=2, allowed_tokens=allow, early_stopping=early_stopping,
                 length_penalty=length_penalty)


@pytest.mark.parametrize("early_stopping", [False, "never"])
def test_one_beam_is_greedy_as_transformers(pairs, early_stopping):
    """transformers' generate(num_beams=1) is greedy search; our one-beam search went on past an eos looking for
    a better hypothesis and returned other tokens. Its scores stay a beam's: [N], sum of log-probabilities /
    (new tokens, eos included) ** length_penalty."""
    m, hf = pairs["gpt2"]
    x = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(1))
    eos = int(generate(m, x, 8)[0, 8])
    kw = dict(eos_token_id=eos, pad_token_id=PAD)
    out = generate(m, x, 8, strategy="beam", num_beams=1, early_stopping=early_stopping, length_penalty=2.0,
                   return_dict=True, **kw)
    greedy = generate(m, x, 8, return_dict=True, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _hf(hf, x, max_new_tokens=8, num_beams=1, eos_token_id=eos)
    assert torch.equal(out.sequences, ref) and torch.equal(out.sequences, greedy.sequences)
    new = out.sequences[:, 6:]
    n = torch.where((new == eos).any(-1), (new == eos).long().argmax(-1) + 1, new.shape[1])
    assert (n < 8).any()  # an eos path is exercised
    torch.testing.assert_close(out.scores, greedy.scores.sum(-1) / n.float() ** 2.0)
    empty = generate(m, x, 0, strategy="beam", num_beams=1, return_dict=True)
    assert torch.equal(empty.sequences, x) and torch.equal(empty.scores, torch.zeros(3))
    with pytest.raises(ValueError, match="num_return_sequences"):
        generate(m, x, 2, strategy="beam", num_beams=1, num_return_sequences=2)
    with pytest.raises(ValueError, match="temperature is a sampling option"):
        generate(m, x, 2, strategy="beam", num_beams=1, temperature=0.5)


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_allowed_tokens_rows_must_be_one_per_prompt_or_sequence(pairs, strategy):
    """A mask with a row count dividing the sequences (2 rows for 4 prompts) was spread over the wrong rows."""
    m, _ = pairs["gpt2"]
    x = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(8))
    kw = dict(num_beams=3, num_return_sequences=3) if strategy == "beam" else dict(num_return_sequences=3)
    if strategy == "sample":
        kw["seed"] = 0
    rows = torch.zeros(6, V, dtype=torch.bool)
    rows[torch.arange(6), 10 + torch.arange(6)] = True
    per_seq = generate(m, x, 2, strategy=strategy, allowed_tokens=rows, **kw)[:, 5:]
    if strategy != "beam":  # (beams are ranked: row k of a prompt is not beam k)
        assert per_seq.tolist() == [[10 + i] * 2 for i in range(6)]
    per_prompt = generate(m, x, 2, strategy=strategy, allowed_tokens=rows[[0, 3]], **kw)[:, 5:]
    assert bool((per_prompt[:3] == 10).all()) and bool((per_prompt[3:] == 13).all())
    assert bool((generate(m, x, 2, strategy=strategy, allowed_tokens=rows[:1], **kw)[:, 5:] == 10).all())
    for n in (3, 4, 12):
        with pytest.raises(ValueError, match=rf"allowed_tokens has {n} rows.*per prompt \(2\).*per sequence \(6\)"):
            generate(m, x, 2, strategy=strategy, allowed_tokens=rows.repeat(2, 1)[:n], **kw)
        with pytest.raises(ValueError, match=rf"allowed_tokens has {n} rows"):
            generate(m, x, 2, strategy=strategy, allowed_tokens=lambda s, n=n: rows.repeat(2, 1)[:n], **kw)
    x4 = torch.randint(0, V, (4, 5), generator=torch.Generator().manual_seed(8))  # the reviewer's case
    with pytest.raises(ValueError, match="allowed_tokens has 2 rows"):
        generate(m, x4, 2, strategy=strategy, allowed_tokens=rows[:2],
                 **({"num_beams": 2} if strategy == "beam" else {}))


@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_num_return_sequences_is_an_int_at_least_one(pairs, strategy):
    """0 returned an empty tensor, -1 and 2.0 raised torch errors, True counted as 1."""
    m, _ = pairs["gpt2"]
    x = torch.zeros(2, 3, dtype=torch.long)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_return_sequences must be an int >= 1"):
            generate(m, x, 2, strategy=strategy, num_return_sequences=bad, seed=0)


def test_empty_prompt_and_choice_constraint_prompt_len_are_checked(pairs):
    """An empty prompt [B, 0] raised IndexError; a ChoiceConstraint whose prompt_len exceeds the sequences read
    the wrong tokens as generated ones."""
    from llmkern.generation import ChoiceConstraint

    m, _ = pairs["gpt2"]
    with pytest.raises(ValueError, match="input_ids"):
        generate(m, torch.zeros(1, 0, dtype=torch.long), 3)
    c = ChoiceConstraint([[12, 7]], vocab_size=V, prompt_len=6, eos_token_id=2)
    x = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(8))
    with pytest.raises(ValueError, match="prompt_len=6"):
        generate(m, x, 3, allowed_tokens=c, eos_token_id=2)
    assert c(torch.zeros(1, 6, dtype=torch.long))[0].nonzero().flatten().tolist() == [12]


def _ngrams(row, n):
    return [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_min_new_tokens_no_repeat_ngram_and_bad_words_equal_transformers(pairs, arch):
    """transformers' masking processors (min_new_tokens, no_repeat_ngram_size, bad_words_ids), alone and
    together, greedy and beam search, a left-padded batch included: the same tokens as HF generate."""
    m, hf = pairs[arch]
    x = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(11))
    am = torch.ones_like(x)
    am[1, :2] = 0
    x[am == 0] = PAD
    plain = generate(m, x, 10, attention_mask=am, pad_token_id=PAD)
    eos = int(plain[0, 6 + 1])  # emitted early: min_new_tokens must hold it back
    bad = [[int(plain[2, 6 + 2])], [int(plain[0, 6 + 3]), int(plain[0, 6 + 4])], [eos]]  # ([eos] dropped, as HF)
    cases = [dict(min_new_tokens=5, eos_token_id=eos), dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=1),
             dict(bad_words_ids=bad, eos_token_id=eos),
             dict(min_new_tokens=3, no_repeat_ngram_size=3, bad_words_ids=bad[:2], eos_token_id=eos)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kw in cases:
            for beams in (1, 3):
                ours = generate(m, x, 10, attention_mask=am, pad_token_id=PAD, num_beams=beams,
                                strategy="beam" if beams > 1 else "greedy", **kw)
                ref = hf.generate(x, attention_mask=am, max_new_tokens=10, do_sample=False, num_beams=beams,
                                  pad_token_id=PAD, **kw)
                assert torch.equal(ours, ref), (kw, beams, ours, ref)
    # the constraints hold when sampling too
    out = generate(m, x, 12, strategy="sample", temperature=2.0, seed=1, no_repeat_ngram_size=2,
                   min_new_tokens=6, eos_token_id=eos, pad_token_id=PAD, bad_words_ids=[[7], [8, 9]])
    for row in out.tolist():
        grams = _ngrams(row, 2)
        assert len(grams) == len(set(grams))
        assert eos not in row[6:12] and 7 not in row[6:] and (8, 9) not in _ngrams(row[5:], 2)


def test_masking_options_bad_arguments(pairs):
    m, _ = pairs["llama"]
    x = torch.randint(0, V, (1, 4))
    for kw, match in [(dict(min_new_tokens=-1), "min_new_tokens"), (dict(no_repeat_ngram_size=1.5), "no_repeat"),
                      (dict(bad_words_ids=[3]), "bad_words_ids"), (dict(bad_words_ids=[[]]), "bad_words_ids"),
                      (dict(bad_words_ids=[[True]]), "bad_words_ids")]:
        with pytest.raises(ValueError, match=match):
            generate(m, x, 2, **kw)
    for words in ([[V]], [[V + 10, 3]], [[3, V, 4]]):  # (a word with an id past V never matched: silently no ban)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            generate(m, x, 2, bad_words_ids=words)
    with pytest.raises(ValueError, match="not supported with draft_model"):
        generate(m, x, 2, draft_model=m, no_repeat_ngram_size=2)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_beam_search_repetition_penalty_equals_transformers(pairs, arch):
    """HF applies the repetition penalty to the beams' log-probabilities (multiplied where seen); a padded
    batch, eos, several returned sequences, and a [B] per-prompt penalty against each prompt alone."""
    m, hf = pairs[arch]
    x = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(12))
    am = torch.ones_like(x)
    am[2, :3] = 0
    x[am == 0] = PAD
    eos = _eos(m, x)
    kw = dict(num_beams=3, num_return_sequences=2, eos_token_id=eos, pad_token_id=PAD)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for pen in (1.5, 0.7):
            ours = generate(m, x, 9, strategy="beam", attention_mask=am, repetition_penalty=pen, **kw)
            ref = hf.generate(x, attention_mask=am, max_new_tokens=9, do_sample=False, repetition_penalty=pen, **kw)
            assert torch.equal(ours, ref), (pen, ours, ref)
        assert not torch.equal(generate(m, x, 9, strategy="beam", attention_mask=am, repetition_penalty=1.5, **kw),
                               generate(m, x, 9, strategy="beam", attention_mask=am, **kw))
        per_row = generate(m, x[:2], 9, strategy="beam", repetition_penalty=torch.tensor([1.5, 2.0]), **kw)
        for b, pen in enumerate((1.5, 2.0)):  # (the batch's width is its longest sequence's: pads past a row's)
            alone = generate(m, x[b:b + 1], 9, strategy="beam", repetition_penalty=pen, **kw)
            w = alone.shape[1]
            assert torch.equal(per_row[2 * b:2 * b + 2, :w], alone) and bool((per_row[2 * b:2 * b + 2, w:] == PAD).all())
        one = generate(m, x, 9, strategy="beam", num_beams=1, attention_mask=am, repetition_penalty=1.5,
                       eos_token_id=eos, pad_token_id=PAD)
        assert torch.equal(one, hf.generate(x, attention_mask=am, max_new_tokens=9, do_sample=False,
                                            repetition_penalty=1.5, eos_token_id=eos, pad_token_id=PAD))


def test_stop_sequences_equal_a_transformers_stopping_criterion(pairs):
    """A row stops once its generated tokens end with a stop sequence (kept, then padding), as transformers'
    generate with a StoppingCriteria of the same test; sampling keeps every row up to its first stop."""

    class StopOn(transformers.StoppingCriteria):
        def __init__(self, seqs, T0):
            self.seqs, self.T0 = [torch.tensor(s) for s in seqs], T0

        def __call__(self, input_ids, scores, **kw):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            for s in self.seqs:
                if input_ids.shape[1] - self.T0 >= len(s):
                    done |= (input_ids[:, -len(s):] == s).all(-1)
            return done

    m, hf = pairs["llama"]
    x = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(13))
    plain = generate(m, x, 12)
    stops = [[int(plain[0, 8]), int(plain[0, 9])], [int(plain[2, 10])], [int(x[1, -1])]]  # the last: in the prompt
    # (an eos that never comes: without one HF does not pad the rows its criteria stop, it runs them on)
    eos = next(t for t in range(V) if t not in plain.tolist()[0] + plain.tolist()[1] + plain.tolist()[2])
    ours = generate(m, x, 12, stop_sequences=stops, eos_token_id=eos, pad_token_id=PAD)
    ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False, pad_token_id=PAD,
                      eos_token_id=eos, stopping_criteria=transformers.StoppingCriteriaList([StopOn(stops, 6)]))
    assert torch.equal(ours, ref) and not torch.equal(ours[:, :plain.shape[1]], plain)
    assert ours.shape[1] <= plain.shape[1] and bool((ours[0, 10:] == PAD).all())
    out = generate(m, x, 12, strategy="sample", temperature=1.5, seed=2, stop_sequences=[[3], [4, 5]], pad_token_id=PAD)
    for row in out[:, 6:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t == 3 or (i and row[i - 1:i + 1] == [4, 5])), len(row))
        assert all(t == PAD for t in row[cut:])
    for kw in (dict(stop_sequences=[[]]), dict(stop_sequences=[[3]], draft_model=m)):
        with pytest.raises(ValueError, match="stop_sequences"):
            generate(m, x, 2, **kw)


def test_min_new_tokens_holds_back_stop_sequences(pairs):
    """min_new_tokens (vLLM's min_tokens) holds back stop sequences as it holds back eos: a row stopped on a
    one-token stop at its first new token despite min_new_tokens=5."""
    m, _ = pairs["llama"]
    x = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(13))
    plain = generate(m, x, 8)
    first = int(plain[0, 6])
    out = generate(m, x, 8, stop_sequences=[[first]], min_new_tokens=5, pad_token_id=PAD)
    row = out[0, 6:].tolist()
    assert len(row) >= 5 and PAD not in row[:5]
    cut = next((i + 1 for i, t in enumerate(row) if t == first and i >= 4), len(row))
    assert all(t == PAD for t in row[cut:])


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_prompt_logprobs_equal_transformers_logits(pairs, strategy):
    """log p(x_t | x_<t) of every prompt token from the prefill: transformers' log-softmax at the previous
    position, NaN at padding and at a row's first token; rows repeated per returned sequence; the generated
    tokens unchanged."""
    m, hf = pairs["llama"]
    x = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(14))
    am = torch.ones_like(x)
    am[1, :3] = 0
    x[am == 0] = PAD
    pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)
    with torch.no_grad():
        ref = torch.log_softmax(hf(x, attention_mask=am, position_ids=pos).logits.float(), -1)
    want = torch.full((3, 7), float("nan"))
    want[:, 1:] = ref[:, :-1].gather(-1, x[:, 1:, None])[..., 0]
    want[1, :4] = float("nan")  # row 1: 3 pads, then its first real token
    kw = dict(strategy=strategy, attention_mask=am, pad_token_id=PAD, num_return_sequences=2)
    kw.update(num_beams=2) if strategy == "beam" else kw.update(seed=1) if strategy == "sample" else None
    for n in (5, 0):
        out = generate(m, x, n, return_dict=True, prompt_logprobs=True, **kw)
        assert out.prompt_logprobs.shape == (6, 7)
        torch.testing.assert_close(out.prompt_logprobs, want.repeat_interleave(2, 0), atol=1e-4, rtol=1e-4,
                                   equal_nan=True)
        assert torch.equal(out.sequences, generate(m, x, n, **kw))
    with pytest.raises(ValueError, match="prompt_logprobs needs return_dict"):
        generate(m, x, 2, prompt_logprobs=True)


def test_eos_ids_checked_and_one_beam_with_no_new_token(pairs):
    """A negative eos id is refused (with min_new_tokens it banned the vocabulary's last token); so is an id past
    the model's vocabulary (it could never be emitted: silently no eos); one beam with max_new_tokens=0 and an
    eos returns the prompt (argmax over zero tokens raised)."""
    m, _ = pairs["llama"]
    x = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(15))
    with pytest.raises(ValueError, match="eos_token_id must be a token id"):
        generate(m, x, 3, eos_token_id=-1, min_new_tokens=2)
    with pytest.raises(ValueError, match="eos_token_id: token 102 is outside the vocabulary"):
        generate(m, x, 4, eos_token_id=[3, V + 5], min_new_tokens=3, pad_token_id=PAD)
    out = generate(m, x, 0, strategy="beam", num_beams=1, eos_token_id=3, return_dict=True, prompt_logprobs=True)
    assert torch.equal(out.sequences, x) and out.scores.shape == (2,)


@pytest.mark.parametrize("strategy, kw, name", [
    ("greedy", dict(temperature=1.5), "temperature"), ("greedy", dict(top_p=0.5), "top_p"),
    ("greedy", dict(top_k=3), "top_k"), ("greedy", dict(min_p=0.3), "min_p"),
    ("greedy", dict(temperature=torch.tensor([1.0, 1.0])), "temperature"),
    ("greedy", dict(num_draft_tokens=-3), "num_draft_tokens"), ("beam", dict(num_draft_tokens=2), "num_draft_tokens"),
    ("greedy", dict(early_stopping="foo"), "early_stopping"), ("sample", dict(early_stopping=True), "early_stopping"),
    ("greedy", dict(length_penalty=float("nan")), "length_penalty"), ("sample", dict(length_penalty=2.0), "length_penalty"),
    ("beam", dict(length_penalty=float("nan")), "length_penalty"), ("beam", dict(length_penalty=float("inf")), "length_penalty"),
    ("beam", dict(length_penalty=True), "length_penalty"), ("beam", dict(length_penalty="1"), "length_penalty"),
    ("greedy", dict(max_new_tokens=True), "max_new_tokens"), ("beam", dict(num_beams=True), "num_beams"),
    ("greedy", dict(num_beams=True), "num_beams"),
])
def test_options_the_strategy_ignores_raise(pairs, strategy, kw, name):
    """Regression: greedy decoding took temperature / top_k / top_p / min_p, num_draft_tokens without a draft model
    and early_stopping / length_penalty outside beam search and ignored them (beam search already raised for the
    sampling options); a NaN length_penalty gave NaN beam scores; bools passed as max_new_tokens / num_beams."""
    m, _ = pairs["llama"]
    x = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(16))
    kw = dict(kw)
    n = kw.pop("max_new_tokens", 3)
    if strategy == "beam":
        kw.setdefault("num_beams", 2)
    with pytest.raises(ValueError, match=name):
        generate(m, x, n, strategy=strategy, **kw)


def test_defaults_seed_and_integer_ids_accepted(pairs):
    """The options at their defaults pass (given explicitly too), a seed is accepted by greedy and beam search (it
    draws nothing), and numpy integers / 0-dim integer tensors are ids (eos_token_id raised TypeError for them)."""
    np = pytest.importorskip("numpy")
    m, _ = pairs["llama"]
    x = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(17))
    plain = generate(m, x, 6)
    eos = int(plain[0, 6])
    assert torch.equal(generate(m, x, 6, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3, num_draft_tokens=4,
                                early_stopping=False, length_penalty=1.0, num_beams=1), plain)
    assert torch.equal(generate(m, x, np.int64(6)), plain)
    beam = generate(m, x, 4, strategy="beam", num_beams=2, length_penalty=0.5)
    assert torch.equal(generate(m, x, 4, strategy="beam", num_beams=np.int64(2), seed=1,
                                length_penalty=torch.tensor(0.5)), beam)
    want = generate(m, x, 6, eos_token_id=eos, pad_token_id=PAD)
    for e in (np.int64(eos), torch.tensor(eos), [np.int32(eos)], torch.tensor([eos])):
        assert torch.equal(generate(m, x, 6, eos_token_id=e, pad_token_id=PAD), want)
    for p in (np.int64(PAD), torch.tensor(PAD)):
        assert torch.equal(generate(m, x, 6, eos_token_id=eos, pad_token_id=p), want)
    for bad in (torch.tensor(float(eos)), True, [True], torch.tensor([[eos]])):
        with pytest.raises(ValueError, match="eos_token_id"):
            generate(m, x, 2, eos_token_id=bad)


@pytest.mark.parametrize("kw, match", [
    (dict(pad_token_id=-1), "pad_token_id"), (dict(pad_token_id=V), "pad_token_id: token 97 is outside"),
    (dict(pad_token_id=2.5), "pad_token_id"), (dict(pad_token_id=True), "pad_token_id"),
    (dict(eos_token_id=V), "eos_token_id: token 97 is outside"),
    (dict(stop_sequences=[[3], [4, V + 10]]), "stop_sequences: token 107 is outside"),
])
def test_token_ids_outside_the_vocabulary_raise(pairs, kw, match):
    """Regression: a pad id out of range raised IndexError in the embedding once a row finished (a device assert
    on CUDA), a float pad id was truncated, eos / stop ids past the vocabulary were silently never matched."""
    m, _ = pairs["gpt2"]
    x = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(18))
    kw = dict(kw)
    kw.setdefault("eos_token_id", int(generate(m, x, 1)[0, -1]))
    with pytest.raises(ValueError, match=match):
        generate(m, x, 3, **kw)
    with pytest.raises(ValueError, match="input_ids"):
        generate(m, torch.full((1, 3), V), 2)


def test_scorers_see_the_same_log_probs_under_every_strategy():
    """score = log p + Σ α f(seqs, log_probs) with log_probs after bias, penalties and the mask: greedy and beam
    search passed those, sampling passed the raw log-softmax (so a scorer reading them changed meaning, and
    sample(top_k=1) left greedy's token)."""
    torch.manual_seed(0)
    model = build("llama-tiny").eval()
    ids = torch.randint(0, 256, (2, 4))
    bias = torch.randn(256) * 3
    seen = {}

    def feature(name):
        def f(seqs, lp):
            seen.setdefault(name, []).append(lp.clone())
            return lp
        return f

    kw = dict(logit_bias=bias, repetition_penalty=1.3, presence_penalty=0.5)
    greedy = generate(model, ids, 4, scorers=[feature("greedy")], **kw)
    sampled = generate(model, ids, 4, strategy="sample", top_k=1, seed=0, scorers=[feature("sample")], **kw)
    assert torch.equal(sampled, greedy)
    for a, b in zip(seen["greedy"], seen["sample"]):
        torch.testing.assert_close(a, b)


def test_nan_and_inf_bias_or_scores_in_beam_search_and_greedy_scorers():
    """A NaN in logit_bias or a scorer's terms counts as -inf, as in plain greedy / sampling: torch.topk and
    argmax ranked NaN first, so beam search chose it and stopped after one token with NaN scores, and greedy with
    scorers emitted it every step. A +inf bias forces its token in beam search (it raised "no finite value")."""
    torch.manual_seed(0)
    model = build("llama-tiny").eval()
    ids = torch.randint(0, 256, (2, 4))
    bias = torch.zeros(256)
    bias[77] = float("nan")
    import llmkern

    plain = llmkern.generate(model, ids, 5, strategy="beam", num_beams=2, return_dict=True)
    out = llmkern.generate(model, ids, 5, strategy="beam", num_beams=2, logit_bias=bias, return_dict=True)
    if (plain.sequences == 77).any():  # (then the NaN changes the search: only check it did not stop)
        assert out.sequences.shape == plain.sequences.shape
    else:
        assert torch.equal(out.sequences, plain.sequences)
        torch.testing.assert_close(out.scores, plain.scores)

    def nan_feature(seqs, lp):
        return torch.where(torch.arange(lp.shape[-1]) == 77, float("nan"), 0.0).expand_as(lp)

    assert torch.equal(llmkern.generate(model, ids, 5, scorers=[nan_feature]), llmkern.generate(model, ids, 5))
    bias = torch.zeros(256)
    bias[77] = float("inf")
    out = llmkern.generate(model, ids, 3, strategy="beam", num_beams=2, logit_bias=bias, return_dict=True)
    assert (out.sequences[:, 4:] == 77).all() and torch.isfinite(out.scores).all()


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_no_token_left_names_the_processing_not_only_the_model(strategy):
    """A logit_bias of -inf everywhere leaves no token: the error said only "the model's logits have no finite
    value", blaming the model; it names what else removes tokens (logit_bias first)."""
    import llmkern

    torch.manual_seed(0)
    model = build("llama-tiny").eval()
    ids = torch.randint(0, 256, (2, 4))
    kw = dict(num_beams=2) if strategy == "beam" else dict(seed=0) if strategy == "sample" else {}
    with pytest.raises(RuntimeError, match=r"no finite value .*\(after logit_bias, the penalties"):
        llmkern.generate(model, ids, 3, strategy=strategy, logit_bias=torch.full((256,), float("-inf")), **kw)


def test_prefix_positions_count_against_block_size_up_front():
    """A prefix's positions come before the tokens (as with PEFT): generate counted only prompt + new tokens and
    failed after 110 decode steps; now refused before the first."""
    import llmkern.peft as lp
    from llmkern.models import GPT, get_config

    torch.manual_seed(0)
    m = GPT(get_config("gpt-tiny"), backend="torch").eval()  # block_size 128
    c = m.config
    m.attach_prefix(lp.PrefixTuning(c.n_layer, 10, c.n_embd, c.n_head))
    ids = torch.randint(0, c.vocab_size, (1, 8))
    with pytest.raises(ValueError, match="10 prefix-tuning positions"):
        generate(m, ids, 120)
    assert generate(m, ids, 110).shape == (1, 118)  # 10 + 8 + 110 = 128 fits


@pytest.mark.parametrize("kw", [dict(), dict(strategy="sample", seed=1, top_k=5), dict(strategy="beam", num_beams=2),
                                dict(strategy="beam", num_beams=1), dict(scorers=[(0.5, lambda s, lp: lp)]),
                                dict(draft="self", num_draft_tokens=2)])
def test_generate_runs_without_autograd(pairs, kw):
    """@torch.no_grad() had slid onto a helper inserted above generate: every decode step recorded autograd history
    (the scores came back with a grad_fn, the KV cache and the graph of every step kept alive)."""
    m, _ = pairs["llama"]
    kw = dict(kw)
    if kw.pop("draft", None):
        kw["draft_model"] = m
    modes = []
    handle = m.register_forward_pre_hook(lambda mod, args: modes.append(torch.is_grad_enabled()))
    try:
        x = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(0))
        out = generate(m, x, 3, return_dict=True, **kw)
    finally:
        handle.remove()
    assert modes and not any(modes)
    assert not out.scores.requires_grad and out.scores.grad_fn is None


def test_early_stopping_numpy_and_tensor_bools(pairs):
    """Beam search tests `early_stopping is True`: np.True_ (and a 0-dim bool tensor) passed the
    `in (True, False, "never")` check and then ran as early_stopping=False."""
    np = pytest.importorskip("numpy")
    m, _ = pairs["gpt2"]
    x = torch.tensor([[52, 58, 83, 54]])
    bias = torch.zeros(V)
    bias[11] = 1.0
    kw = dict(num_beams=2, eos_token_id=11, pad_token_id=PAD, logit_bias=bias, length_penalty=2.0)
    early = generate(m, x, 8, strategy="beam", early_stopping=True, **kw)
    late = generate(m, x, 8, strategy="beam", early_stopping=False, **kw)
    assert early.shape != late.shape or not torch.equal(early, late)  # (the case tells them apart)
    for v in (np.True_, torch.tensor(True)):
        assert torch.equal(generate(m, x, 8, strategy="beam", early_stopping=v, **kw), early), v
    assert torch.equal(generate(m, x, 8, strategy="beam", early_stopping=np.False_, **kw), late)
    for v in (1, 0, "Never", None, torch.tensor([True])):
        with pytest.raises(ValueError, match="early_stopping"):
            generate(m, x, 2, strategy="beam", num_beams=2, early_stopping=v)


def test_scorers_alpha_must_be_a_finite_number(pairs):
    """A NaN alpha made every score NaN and was reported as 'the model's logits have no finite value'; a string
    alpha raised float()'s message, naming no argument."""
    m, _ = pairs["gpt2"]
    x = torch.randint(0, V, (1, 4), generator=torch.Generator().manual_seed(0))
    f = lambda s, lp: torch.zeros_like(lp)  # noqa: E731
    for alpha in (float("nan"), float("inf"), "a", None, True):
        for strategy, kw in (("greedy", {}), ("beam", dict(num_beams=2))):
            with pytest.raises(ValueError, match="scorers"):
                generate(m, x, 2, strategy=strategy, scorers=[(alpha, f)], **kw)
    with pytest.raises(ValueError, match="scorers"):
        generate(m, x, 2, scorers=f)  # a scorer, not a list of them
    assert generate(m, x, 2, scorers=[(torch.tensor(0.5), f), (2, f)]).shape == (1, 6)


def test_attention_mask_values_must_be_zero_or_one(pairs):
    """bool() turned a mask value of -1 or 2 into a token, silently (transformers' positions count the values)."""
    m, _ = pairs["gpt2"]
    x = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(0))
    for bad in (torch.tensor([[-1, 1, 1, 1], [1, 1, 1, 1]]), torch.full_like(x, 2), torch.full(x.shape, 0.5)):
        for kw in (dict(), dict(strategy="beam", num_beams=2)):
            with pytest.raises(ValueError, match="attention_mask"):
                generate(m, x, 2, attention_mask=bad, **kw)
    ok = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    want = generate(m, x, 2, attention_mask=ok)
    for same in (ok.bool(), ok.float(), ok.int()):
        assert torch.equal(generate(m, x, 2, attention_mask=same), want)
