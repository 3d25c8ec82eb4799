"""transformers' logits processors generate applies (as arguments, defaulting to the checkpoint's keys): forced_bos /
forced_eos_token_id, sequence_bias, exponential_decay_length_penalty, remove_invalid_values, renormalize_logits (the
same greedy and beam search tokens as transformers' generate on a tiny random checkpoint) and sampling's typical_p,
epsilon_cutoff, eta_cutoff (the same kept tokens as transformers' warpers on the same logits; samples draw only
those). was: generate had no such arguments, and warned that it ignored the checkpoint's keys."""
import warnings

import pytest
import torch

from llmkern.generation import FROM_MODEL, GenerationDefaults, _Processors, generate
from llmkern.models import from_hf

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as lp  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)
V = 61
BEAM = dict(strategy="beam", num_beams=3, num_return_sequences=2)


def _hf_generate(hf, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False, pad_token_id=0,
                           **kw)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(from_hf model, transformers model, prompts [3, 5], their greedy tokens without eos), and the same pair
    with token NAN's logit NaN (its lm_head row), for remove_invalid_values."""
    path = tmp_path_factory.mktemp("gen_processors")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32)).eval()
    hf.save_pretrained(path)
    with torch.no_grad():
        hf.lm_head.weight[NAN] = float("nan")
    hf.save_pretrained(path / "nan")
    x = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs = [(from_hf(str(p), backend="torch"), transformers.AutoModelForCausalLM.from_pretrained(str(p)).eval())
                 for p in (path, path / "nan")]
    free = _hf_generate(pairs[0][1], x, eos_token_id=None)
    return pairs, x, free


NAN = 17


def _cases(free):
    """(name, keywords for both generates, prompt width) per processor, values that change the tokens."""
    t = free[:, 5:].tolist()
    return [
        ("forced_bos_token_id", dict(forced_bos_token_id=7), 1),
        ("forced_eos_token_id", dict(forced_eos_token_id=[9, 3]), 5),
        ("sequence_bias", dict(sequence_bias={(t[0][0],): -3.0, (t[1][1], t[1][2]): -5.0}), 5),
        ("sequence_bias", dict(sequence_bias=[[[t[2][0]], 4.0]]), 5),
        ("exponential_decay_length_penalty", dict(exponential_decay_length_penalty=(2, 3.0), eos_token_id=[t[0][3]]),
         5),
        ("renormalize_logits", dict(renormalize_logits=True, repetition_penalty=1.5), 5),
    ]


def _ours(m, x, **kw):
    return generate(m, x, 8, pad_token_id=0, **kw)


def test_processors_give_transformers_tokens(ckpt):
    """Greedy and beam search: the same tokens as transformers' generate, each processor given as an argument and
    as the checkpoint's key (model.generation_config; explicit arguments left at FROM_MODEL), and each changes the
    tokens (renormalize_logits: beam search's, against renormalize_logits=False)."""
    (m, hf), _ = ckpt[0]
    x, free = ckpt[1], ckpt[2]
    saved = m.generation_config, hf.generation_config
    try:
        for name, kw, T in _cases(free):
            kw = dict(dict(eos_token_id=None), **kw)
            xx = x[:, :T]
            for strategy in ({}, BEAM):
                hf_kw = {k: v for k, v in strategy.items() if k != "strategy"}
                theirs = _hf_generate(hf, xx, **kw, **hf_kw)
                assert torch.equal(_ours(m, xx, **kw, **strategy), theirs), (name, strategy)
                m.generation_config = GenerationDefaults(**kw)
                hf.generation_config = transformers.GenerationConfig(**kw)
                assert torch.equal(_ours(m, xx, **strategy), _hf_generate(hf, xx, **hf_kw)), (name, strategy)
                m.generation_config, hf.generation_config = saved
                off = {name: None if name != "renormalize_logits" else False}
                if strategy or name != "renormalize_logits":
                    assert not torch.equal(_ours(m, xx, **dict(kw, **off), **strategy), theirs), (name, strategy)
    finally:
        m.generation_config, hf.generation_config = saved


def test_remove_invalid_values_and_begin_suppress_after_forced_bos(ckpt):
    """remove_invalid_values: a NaN logit counts as 0 (llmkern's default reads it as -inf), +-inf as float32's
    extremes, as transformers; begin_suppress_tokens wait for the forced bos of a one-token prompt there, and here."""
    (m, hf), (mn, hfn) = ckpt[0]
    x = ckpt[1]
    down = {(t,): -1.0 for t in range(V) if t != NAN}  # (the other logits below 0: the NaN one's 0 is chosen)
    for strategy in ({}, BEAM):
        hf_kw = {k: v for k, v in strategy.items() if k != "strategy"}
        ours = _ours(mn, x, eos_token_id=None, remove_invalid_values=True, sequence_bias=down, **strategy)
        assert torch.equal(ours, _hf_generate(hfn, x, eos_token_id=None, remove_invalid_values=True,
                                              sequence_bias=down, **hf_kw))
        if strategy:  # (beam search: the NaN makes the whole log-softmax NaN, so every token 0, in both)
            continue
        assert (ours[:, 5:] == NAN).any()
        assert not (_ours(mn, x, eos_token_id=None, sequence_bias=down, **strategy)[:, 5:] == NAN).any()
    x1 = x[:, :1]
    second = _ours(m, x1, eos_token_id=None, forced_bos_token_id=7)[:, 2].tolist()
    saved = m.generation_config, hf.generation_config
    try:
        keys = dict(begin_suppress_tokens=second, forced_bos_token_id=7)
        m.generation_config = GenerationDefaults(**keys)
        hf.generation_config = transformers.GenerationConfig(**keys)
        ours = _ours(m, x1, eos_token_id=None)
        assert torch.equal(ours, _hf_generate(hf, x1, eos_token_id=None))
        assert ours[:, 1].tolist() == [7] * 3 and all(a != b for a, b in zip(ours[:, 2].tolist(), second))
    finally:
        m.generation_config, hf.generation_config = saved


WARPS = [dict(typical_p=0.4), dict(epsilon_cutoff=0.02), dict(eta_cutoff=0.05),
         dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.01, typical_p=0.8, epsilon_cutoff=0.01, eta_cutoff=0.02)]


def _hf_warped(y, w):
    """transformers' sampling warpers, in _get_logits_processor's order, on scores y."""
    procs = [lp.TemperatureLogitsWarper(w.get("temperature", 1.0))]
    procs += [lp.TopKLogitsWarper(w["top_k"])] if "top_k" in w else []
    procs += [lp.TopPLogitsWarper(w["top_p"])] if "top_p" in w else []
    procs += [lp.MinPLogitsWarper(w["min_p"])] if "min_p" in w else []
    procs += [lp.TypicalLogitsWarper(w["typical_p"])] if "typical_p" in w else []
    procs += [lp.EpsilonLogitsWarper(w["epsilon_cutoff"])] if "epsilon_cutoff" in w else []
    procs += [lp.EtaLogitsWarper(w["eta_cutoff"])] if "eta_cutoff" in w else []
    return lp.LogitsProcessorList(procs)(torch.zeros(y.shape[0], 1, dtype=torch.long), y.clone())


def _warp(y, w):
    values = dict(forced_bos_token_id=None, forced_eos_token_id=None, sequence_bias=None,
                  exponential_decay_length_penalty=None, remove_invalid_values=False, renormalize_logits=False,
                  typical_p=w.get("typical_p", 1.0), epsilon_cutoff=w.get("epsilon_cutoff", 0.0),
                  eta_cutoff=w.get("eta_cutoff", 0.0))
    N = y.shape[0]
    row = [torch.full((N,), w.get(k, d), dtype=dt) for k, d, dt in (
        ("temperature", 1.0, torch.float32), ("top_k", 0, torch.long), ("top_p", 1.0, torch.float32),
        ("min_p", 0.0, torch.float32))]
    return _Processors(5, 8, None, values).warp(y, *row)


def test_sampling_warpers_keep_transformers_tokens(ckpt):
    """typical_p, epsilon_cutoff, eta_cutoff (with temperature, top-k, top-p, min-p before them): the tokens left and
    their probabilities at the temperature are transformers' warpers' on the same logits; sampling (argument or
    checkpoint key) draws only tokens the warpers keep for its prefix, and typical_p changes the draws."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(6, V, generator=g) * 3
    y[0, :5] = float("-inf")
    for w in WARPS:
        theirs, ours = _hf_warped(y, w), _warp(y, w)
        assert torch.equal(torch.isfinite(theirs), torch.isfinite(ours)), w
        assert (~torch.isfinite(ours)).sum() > 6, w  # (each removes tokens)
        t = w.get("temperature", 1.0)
        torch.testing.assert_close(torch.softmax(ours / t, -1), torch.softmax(theirs, -1))
    (m, _), _ = ckpt[0]
    x = ckpt[1]
    cfg = m.generation_config
    try:
        for source in ("argument", "checkpoint"):
            w = dict(typical_p=0.3, eta_cutoff=0.05)
            m.generation_config = GenerationDefaults(**(w if source == "checkpoint" else {}))
            kw = w if source == "argument" else {}
            seqs = torch.cat([_ours(m, x, strategy="sample", seed=s, eos_token_id=None, **kw) for s in range(3)])
            with torch.no_grad():
                logits = m(seqs[:, :-1]).float()[:, 4:]  # (the logits of each new token's position)
            kept = torch.isfinite(_hf_warped(logits.reshape(-1, V), w)).view(seqs.shape[0], 8, V)
            assert kept.gather(-1, seqs[:, 5:, None]).all(), source
            assert (kept.sum(-1) < V // 2).all()  # (a near-uniform random model: about a third kept)
        m.generation_config = cfg
        plain = torch.cat([_ours(m, x, strategy="sample", seed=s, eos_token_id=None) for s in range(3)])
        assert not torch.equal(plain, seqs)
    finally:
        m.generation_config = cfg


BAD = [("forced_bos_token_id", V), ("forced_bos_token_id", 1.0), ("forced_eos_token_id", [3, -1]),
       ("sequence_bias", {3: 1.0}), ("sequence_bias", [[[3], float("nan")]]), ("sequence_bias", {}),
       ("exponential_decay_length_penalty", (2.5, 1.1)), ("exponential_decay_length_penalty", 2),
       ("remove_invalid_values", 1), ("renormalize_logits", "yes")]
BAD_SAMPLING = [("typical_p", 0.0), ("typical_p", 1.5), ("epsilon_cutoff", 1.5), ("eta_cutoff", -0.1)]


def test_bad_values_strategies_and_draft_model(ckpt):
    """Malformed values raise ValueError naming the argument (or model.generation_config.<key>); the sampling
    warpers are sampling options (greedy and beam search raise for them, and ignore the checkpoint's); speculative
    decoding refuses every processor but renormalize_logits (no token changes there); the decay needs an eos."""
    (m, _), _ = ckpt[0]
    x = ckpt[1][:, :3]
    cfg = m.generation_config
    try:
        for name, bad in BAD + BAD_SAMPLING:
            kw = dict(strategy="sample", seed=0) if (name, bad) in BAD_SAMPLING else {}
            with pytest.raises(ValueError, match=f"^{name} must be"):
                generate(m, x, 2, **kw, **{name: bad})
            m.generation_config = GenerationDefaults(**{name: bad})
            with pytest.raises(ValueError, match=f"model.generation_config.{name} must be"):
                generate(m, x, 2, **kw)
            m.generation_config = cfg
        for name, v in (("typical_p", 0.5), ("epsilon_cutoff", 0.1), ("eta_cutoff", 0.1)):
            for strategy in ({}, BEAM):
                with pytest.raises(ValueError, match=f"{name} is a sampling option"):
                    generate(m, x, 2, **strategy, **{name: v})
            m.generation_config = GenerationDefaults(**{name: v})
            assert torch.equal(generate(m, x, 2), generate(m, x, 2, **{name: FROM_MODEL}))
            m.generation_config = cfg
        with pytest.raises(ValueError, match="exponential_decay_length_penalty .*needs an eos_token_id"):
            generate(m, x, 2, eos_token_id=None, exponential_decay_length_penalty=(1, 2.0))
        on = dict(forced_bos_token_id=1, forced_eos_token_id=2, sequence_bias={(3,): 1.0},
                  exponential_decay_length_penalty=(1, 2.0), remove_invalid_values=True)
        for name, v in on.items():
            kw = {}
            with pytest.raises(ValueError, match=f"{name}: not supported with draft_model"):
                generate(m, x, 2, draft_model=m, eos_token_id=5, **kw, **{name: v})
            m.generation_config = GenerationDefaults(eos_token_id=5, **{name: v})
            with pytest.raises(ValueError, match=f"model.generation_config.{name}=.*draft_model"):
                generate(m, x, 2, draft_model=m, **kw)
            m.generation_config = cfg
        assert torch.equal(generate(m, x, 4, draft_model=m, renormalize_logits=True), generate(m, x, 4))
        # a checkpoint's eta_cutoff / epsilon_cutoff of 1.0 is off (as transformers reads it): speculative
        # sampling took it for an active filter and refused
        m.generation_config = GenerationDefaults(eta_cutoff=1.0, epsilon_cutoff=1.0)
        assert generate(m, x, 2, draft_model=m, strategy="sample", seed=0).shape == (x.shape[0], x.shape[1] + 2)
    finally:
        m.generation_config = cfg


def test_tensor_parallel_agreement_covers_the_processor_arguments(ckpt, monkeypatch):
    """Ranks of a tensor-parallel model must pass the same processor arguments: the agreement's codes differ for
    each (checked here without processes: the all-gather is replaced by the two calls' codes)."""
    import llmkern.parallel  # noqa: F401  (generate runs the agreement once llmkern.parallel is imported)
    from llmkern.parallel import guards

    (m, _), _ = ckpt[0]
    x = ckpt[1][:, :3]
    seen = []
    monkeypatch.setattr(guards, "tensor_parallel_group", lambda *models: "group")
    monkeypatch.setattr(guards.comm, "agree", lambda group, what, codes: seen.append(codes) or [codes, codes])
    pairs = [("forced_bos_token_id", 1, 2), ("forced_eos_token_id", [2], [2, 3]),
             ("sequence_bias", {(3,): 1.0}, {(3,): 2.0}), ("sequence_bias", {(3, 4): 1.0}, {(4, 3): 1.0}),
             ("exponential_decay_length_penalty", (1, 2.0), (1, 2.5)), ("remove_invalid_values", True, False),
             ("renormalize_logits", True, False), ("typical_p", 0.5, 0.6), ("epsilon_cutoff", 0.1, 0.2),
             ("eta_cutoff", 0.1, 0.2)]
    for name, a, b in pairs:
        seen.clear()
        kw = dict(strategy="sample", seed=0) if name in ("typical_p", "epsilon_cutoff", "eta_cutoff") else {}
        for v in (a, b):
            generate(m, x, 1, eos_token_id=3, **kw, **{name: v})
        rows = list(seen)
        monkeypatch.setattr(guards.comm, "agree", lambda group, what, codes: rows)
        with pytest.raises(ValueError, match=f"disagree on {name}"):
            generate(m, x, 1, eos_token_id=3, **kw, **{name: a})
        monkeypatch.setattr(guards.comm, "agree", lambda group, what, codes: seen.append(codes) or [codes, codes])
