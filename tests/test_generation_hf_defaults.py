"""generate's eos / pad defaults: a from_hf model stops where transformers' generate stops on the same checkpoint
(model.generation_config from generation_config.json, else config.json), and eos_token_id=None turns it off."""
import json
import shutil
import warnings

import pytest
import torch

from llmkern.generation import GenerationDefaults, generate
from llmkern.models import from_hf

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)
V = 61


def _hf(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _hf_generate(hf, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False, **kw)


def _edit(path, name, **keys):
    with open(path / name) as f:
        d = json.load(f)
    d.update(keys)
    with open(path / name, "w") as f:
        json.dump(d, f)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(checkpoint dir, prompts, their greedy tokens without eos, two eos ids that stop rows 0 and 2 early)."""
    path = tmp_path_factory.mktemp("gen_defaults")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32)).eval()
    hf.save_pretrained(path)
    x = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(1))
    free = _hf_generate(hf, x, eos_token_id=None, pad_token_id=0)
    eos = [int(free[0, 6]), int(free[2, 5])]
    assert [_stop(free[r], eos) for r in range(3)] == [7, 13, 6]  # row 1 runs to the end: the pads show
    return path, x, free, eos


def _stop(row, eos, T=5):
    """Where a row's tokens end when the eos ids stop it (just after its first new eos)."""
    hit = torch.isin(row[T:], torch.tensor(eos)).nonzero()
    return T + int(hit[0]) + 1 if len(hit) else len(row)


def test_checkpoint_eos_list_is_the_default_as_in_transformers(ckpt):
    """generation_config.json's eos_token_id (a list): greedy and beam search stop on it, padding with its first
    id, as transformers' generate on the checkpoint; eos_token_id=None (as there) or the model's
    generation_config.eos_token_id = None turns it off. The old generate ran past the checkpoint's eos."""
    path, x, free, eos = ckpt
    _edit(path, "generation_config.json", eos_token_id=eos)
    m, hf = from_hf(str(path), backend="torch"), _hf(path)
    for kw in ({}, dict(strategy="beam", num_beams=2, num_return_sequences=2)):
        hf_kw = {k: v for k, v in kw.items() if k != "strategy"}
        ours = generate(m, x, 8, **kw)
        assert torch.equal(ours, _hf_generate(hf, x, **hf_kw))
        assert kw or ours[2, 6:].tolist() == [eos[0]] * 7  # (greedy: row 2 stopped, padded with eos[0])
        no_eos = generate(m, x, 8, eos_token_id=None, pad_token_id=0, **kw)
        assert torch.equal(no_eos, _hf_generate(hf, x, eos_token_id=None, pad_token_id=0, **hf_kw))
    assert torch.equal(generate(m, x, 8, eos_token_id=None), free)
    assert hf.generation_config.eos_token_id == eos == m.generation_config.eos_token_id
    m.generation_config.eos_token_id = None
    assert torch.equal(generate(m, x, 8), free)


def test_config_json_eos_and_pad_without_generation_config(ckpt, tmp_path):
    """No generation_config.json: config.json's eos_token_id and pad_token_id (transformers' fallback); the
    finished row is padded with that pad, not with eos."""
    path, x, free, eos = ckpt
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    (tmp_path / "generation_config.json").unlink()
    pad = next(t for t in range(1, V) if t not in eos)  # (not 0: generate's last-resort pad)
    _edit(tmp_path, "config.json", eos_token_id=eos[0], pad_token_id=pad)
    m, hf = from_hf(str(tmp_path), backend="torch"), _hf(tmp_path)
    ours = generate(m, x, 8)
    assert torch.equal(ours, _hf_generate(hf, x))
    end = _stop(free[0], eos[:1])
    assert ours[0, :end].tolist() == free[0, :end].tolist() and ours[0, end:].tolist() == [pad] * (13 - end)


def test_checkpoint_ids_outside_the_vocabulary_and_bad_values(ckpt):
    """A checkpoint eos past the vocabulary (GPT-2's 50256 on a smaller test vocabulary) is never emitted: ignored,
    as transformers never stops on it; an explicit one still raises, and a malformed default names its source."""
    path, x, free, _ = ckpt
    m = from_hf(str(path), backend="torch")
    m.generation_config.eos_token_id, m.generation_config.pad_token_id = [V + 5], 50256
    assert torch.equal(generate(m, x, 8), free)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(m, x, 2, eos_token_id=V + 5)
    m.generation_config.eos_token_id = "2"
    with pytest.raises(ValueError, match="generation_config.eos_token_id"):
        generate(m, x, 2)


# ---- the other generation_config.json keys transformers' generate applies ----------------------------------

KNOBS = dict(repetition_penalty=1.5, no_repeat_ngram_size=1, min_new_tokens=3, length_penalty=-2.0,
             early_stopping=True)  # (+ bad_words_ids, from the prompts' tokens)
SAMPLING = dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05)
BEAM = dict(strategy="beam", num_beams=3, num_return_sequences=2)


@pytest.fixture(scope="module")
def knobbed(ckpt, tmp_path_factory):
    """(from_hf model, transformers model, prompts, eos ids, the knobs) of a checkpoint whose generation_config.json
    sets every knob generate takes from it, plus do_sample / num_beams, which generate does not take."""
    path, x, free, eos = ckpt
    new = tmp_path_factory.mktemp("gen_knobs")
    shutil.copytree(path, new, dirs_exist_ok=True)
    knobs = dict(KNOBS, bad_words_ids=[[int(free[1, 5])], [int(free[0, 5]), int(free[0, 6])]])
    with open(new / "generation_config.json", "w") as f:
        json.dump(dict(knobs, **SAMPLING, eos_token_id=eos, do_sample=True, num_beams=4), f)
    return from_hf(str(new), backend="torch"), _hf(new), x, eos, knobs


def _set(m, hf, eos, **knobs):
    """Both models' generation config: eos and `knobs` only."""
    m.generation_config = GenerationDefaults(eos_token_id=eos, **knobs)
    hf.generation_config = transformers.GenerationConfig(eos_token_id=eos, **knobs)


def _both(m, hf, x, kw):
    """(ours, transformers') tokens for generate's keywords kw (strategy -> do_sample / num_beams)."""
    hf_kw = dict({k: v for k, v in kw.items() if k != "strategy"}, num_beams=kw.get("num_beams", 1))
    return generate(m, x, 8, **kw), _hf_generate(hf, x, **hf_kw)


def test_checkpoint_knobs_are_defaults_as_in_transformers(knobbed):
    """generation_config.json's repetition_penalty, no_repeat_ngram_size, bad_words_ids, min_new_tokens (greedy and
    beam search), length_penalty and early_stopping (beam search): the same tokens as transformers' greedy / beam
    search on the checkpoint, all keys at once and each alone (each changes the tokens). The old generate ignored
    them (Qwen2.5-Instruct's repetition_penalty 1.05 made its greedy differ from transformers')."""
    m, hf, x, eos, knobs = knobbed
    assert {k: getattr(m.generation_config, k) for k in knobs} == knobs
    assert {k: getattr(m.generation_config, k) for k in SAMPLING} == SAMPLING
    for kw in ({}, BEAM):  # (the checkpoint's do_sample / num_beams: not generate's strategy)
        ours, theirs = _both(m, hf, x, kw)
        assert torch.equal(ours, theirs)
    saved = m.generation_config, hf.generation_config
    try:
        for name, v in knobs.items():
            changed = False
            for kw in ({}, BEAM):
                _set(m, hf, eos)
                base = generate(m, x, 8, **kw)
                _set(m, hf, eos, **{name: v})
                ours, theirs = _both(m, hf, x, kw)
                assert torch.equal(ours, theirs), (name, kw)
                changed |= ours.shape != base.shape or not torch.equal(ours, base)
            assert changed, name
    finally:
        m.generation_config, hf.generation_config = saved


def test_explicit_arguments_win_and_sampling_knobs(knobbed):
    """An argument given to generate wins over the checkpoint; the sampling keys apply to strategy="sample" only
    (greedy and beam search, which refuse an explicit temperature, ignore the checkpoint's), and a checkpoint
    without top_k samples without top-k (vLLM's choice; transformers' generate would use top_k=50)."""
    m, hf, x, eos, knobs = knobbed
    neutral = dict(repetition_penalty=1.0, no_repeat_ngram_size=0, bad_words_ids=None, min_new_tokens=0)
    plain, theirs = _both(m, hf, x, neutral)
    assert torch.equal(plain, theirs)
    assert not torch.equal(plain, generate(m, x, 8))
    ours, theirs = _both(m, hf, x, dict(neutral, length_penalty=1.0, early_stopping=False, **BEAM))
    assert torch.equal(ours, theirs)
    s = generate(m, x, 8, strategy="sample", seed=3)
    not_beam = {k: v for k, v in knobs.items() if k not in ("length_penalty", "early_stopping")}
    assert torch.equal(s, generate(m, x, 8, strategy="sample", seed=3, **SAMPLING, **not_beam))
    assert not torch.equal(s, generate(m, x, 8, strategy="sample", seed=3, temperature=1.0, top_k=0, top_p=1.0,
                                       min_p=0.0, **not_beam))
    cfg = m.generation_config
    m.generation_config = GenerationDefaults(temperature=5.0)  # (no top_k: transformers would take 50 of V = 61)
    try:
        s = generate(m, x, 8, strategy="sample", seed=3)
        assert torch.equal(s, generate(m, x, 8, strategy="sample", seed=3, temperature=5.0, top_k=0))
        assert not torch.equal(s, generate(m, x, 8, strategy="sample", seed=3, temperature=5.0, top_k=50))
    finally:
        m.generation_config = cfg


def test_config_json_knobs_without_generation_config(ckpt, tmp_path):
    """No generation_config.json: config.json's generation keys, as transformers reads them there."""
    path, x, _, _ = ckpt
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    (tmp_path / "generation_config.json").unlink()
    _edit(tmp_path, "config.json", repetition_penalty=1.5, no_repeat_ngram_size=1)
    m, hf = from_hf(str(tmp_path), backend="torch"), _hf(tmp_path)
    assert (m.generation_config.repetition_penalty, m.generation_config.no_repeat_ngram_size) == (1.5, 1)
    ours = generate(m, x, 8)
    assert torch.equal(ours, _hf_generate(hf, x))
    assert not torch.equal(ours, generate(m, x, 8, repetition_penalty=1.0, no_repeat_ngram_size=0))


def test_bad_checkpoint_knobs_speculative_and_models_without_defaults(knobbed):
    """A malformed value raises naming model.generation_config.<key> (where the strategy uses it); a model
    default that speculative decoding cannot apply raises, naming it, until the argument overrides it; a model
    without generation_config (llmkern.models.build) decodes with generate's neutral values, as before."""
    from llmkern.models import build

    m, hf, x, eos, knobs = knobbed
    cfg = m.generation_config
    bad = [("repetition_penalty", "1.05", {}), ("no_repeat_ngram_size", 1.5, {}), ("min_new_tokens", -1, {}),
           ("bad_words_ids", [[V]], {}), ("length_penalty", float("nan"), BEAM), ("early_stopping", "yes", BEAM),
           ("temperature", -1.0, dict(strategy="sample")), ("top_k", 2.5, dict(strategy="sample")),
           ("top_p", 0.0, dict(strategy="sample")), ("min_p", True, dict(strategy="sample"))]
    try:
        for name, v, kw in bad:
            m.generation_config = GenerationDefaults(**dict(vars(cfg), **{name: v}))
            with pytest.raises(ValueError, match=f"model.generation_config.{name} must be"):
                generate(m, x, 2, **kw)
            if kw.get("strategy") == "sample":
                generate(m, x, 2)  # (greedy does not read it)
        m.generation_config = GenerationDefaults(**dict(vars(cfg), bad_words_ids=None, min_new_tokens=0,
                                                        no_repeat_ngram_size=0))
        with pytest.raises(ValueError, match="model.generation_config.repetition_penalty=1.5 .* draft_model"):
            generate(m, x, 4, draft_model=m)
        assert torch.equal(generate(m, x, 4, draft_model=m, repetition_penalty=1.0),
                           generate(m, x, 4, repetition_penalty=1.0))
    finally:
        m.generation_config = cfg
    torch.manual_seed(0)
    z = build("llama-tiny", backend="torch").eval()
    assert not hasattr(z, "generation_config")
    xz = x % z.config.vocab_size
    old = dict(eos_token_id=None, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
               min_new_tokens=0, no_repeat_ngram_size=0, bad_words_ids=None)
    want = generate(z, xz, 4, strategy="sample", seed=1, **old)
    assert torch.equal(generate(z, xz, 4, strategy="sample", seed=1), want)
    old = dict({k: v for k, v in old.items() if k not in SAMPLING}, length_penalty=1.0, early_stopping=False)
    a, b = generate(z, xz, 4, return_dict=True, **BEAM), generate(z, xz, 4, return_dict=True, **BEAM, **old)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.scores, b.scores)


# ---- min_length, suppress_tokens, begin_suppress_tokens; the keys generate ignores warn --------------------

def _hf_padded(hf, x, am, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.generate(x, attention_mask=am, max_new_tokens=8, do_sample=False, **kw)


@pytest.fixture(scope="module")
def padded(ckpt, tmp_path_factory):
    """(from_hf model, transformers model, left-padded prompts, their mask, eos, the banning keys) of a checkpoint
    whose generation_config.json sets min_length, suppress_tokens (eos among them: unlike bad_words_ids, transformers
    bans it) and begin_suppress_tokens, plus typical_p (sampling only: greedy and beam search ignore it there too)."""
    path, x, _, _ = ckpt
    new = tmp_path_factory.mktemp("gen_rules")
    shutil.copytree(path, new, dirs_exist_ok=True)
    am = torch.ones_like(x)
    am[1, :2] = 0
    free = _hf_padded(_hf(path), x, am, eos_token_id=None, pad_token_id=0)
    eos, T = [int(free[0, 6])], x.shape[1]  # (row 0 stops at its second new token)
    rules = dict(min_length=T + 4, suppress_tokens=[int(free[1, T]), eos[0]], begin_suppress_tokens=[int(free[2, T])])
    with open(new / "generation_config.json", "w") as f:
        json.dump(dict(rules, eos_token_id=eos, typical_p=0.5), f)
    return from_hf(str(new), backend="torch"), _hf(new), x, am, eos, rules


def test_checkpoint_min_length_and_suppressed_tokens_as_in_transformers(padded):
    """generation_config.json's min_length (it counts the prompt's padded width, as transformers' processor
    compares input_ids.shape[-1]; min_new_tokens given replaces it, as there), suppress_tokens and
    begin_suppress_tokens: greedy and beam search give transformers' tokens on left-padded prompts, all keys at once
    and each alone (each changes the tokens). The old generate ignored them."""
    m, hf, x, am, eos, rules = padded
    assert {k: getattr(m.generation_config, k) for k in rules} == rules and m.generation_config.typical_p == 0.5
    saved = m.generation_config, hf.generation_config
    try:
        for keys in [rules] + [{k: v} for k, v in rules.items()]:
            changed = False
            for kw in ({}, BEAM):
                hf_kw = dict({k: v for k, v in kw.items() if k != "strategy"}, num_beams=kw.get("num_beams", 1))
                _set(m, hf, eos)
                base = generate(m, x, 8, attention_mask=am, **kw)
                _set(m, hf, eos, **keys)
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # (typical_p: sampling only, no warning)
                    ours = generate(m, x, 8, attention_mask=am, **kw)
                assert torch.equal(ours, _hf_padded(hf, x, am, **hf_kw)), (keys, kw)
                changed |= ours.shape != base.shape or not torch.equal(ours, base)
            assert changed, keys
        _set(m, hf, eos, min_length=rules["min_length"])
        assert torch.equal(generate(m, x, 8, attention_mask=am, min_new_tokens=0),
                           _hf_padded(hf, x, am, min_new_tokens=0))
    finally:
        m.generation_config, hf.generation_config = saved


IGNORED = [("stop_strings", ["x"], None), ("watermarking_config", {"bias": 2.0}, None),
           ("top_h", 0.4, "sample")]  # (the other keys transformers applies, generate applies too:
# tests/test_generation_processors.py)
NEUTRAL = dict(guidance_scale=1.0, remove_invalid_values=False, renormalize_logits=False, typical_p=1.0,
               epsilon_cutoff=0.0, eta_cutoff=1.0)


def _warned(m, x, **kw):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        generate(m, x, 2, **kw)
    return [str(w.message) for w in seen if "llmkern's generate ignores it" in str(w.message)]


def test_checkpoint_keys_generate_ignores_warn_and_rules_refused_with_a_draft(padded):
    """A checkpoint key transformers' generate applies and generate does not warns, naming it, with the strategies
    transformers applies it with (top_h, a sampling warper: sampling only); their neutral values do not.
    min_length / suppress_tokens / begin_suppress_tokens: malformed values raise naming them, and speculative
    decoding refuses them (min_new_tokens=0 overrides min_length)."""
    m, _, x, am, eos, rules = padded
    cfg = m.generation_config
    kws = dict(greedy={}, sample=dict(strategy="sample", seed=0), beam=dict(strategy="beam", num_beams=2))
    try:
        for name, v, only in IGNORED:
            m.generation_config = GenerationDefaults(**{name: v})
            for strategy, kw in kws.items():
                seen = _warned(m, x, **kw)
                want = only in (None, strategy)
                assert len(seen) == want and (not want or f"model.generation_config.{name}=" in seen[0]), (name, kw)
        m.generation_config = GenerationDefaults(**NEUTRAL)
        assert not any(_warned(m, x, **kw) for kw in kws.values())
        for name, bad in (("min_length", -1), ("suppress_tokens", 3), ("begin_suppress_tokens", [1.0])):
            m.generation_config = GenerationDefaults(**{name: bad})
            with pytest.raises(ValueError, match=f"model.generation_config.{name} must be"):
                generate(m, x, 2)
        for name, v in rules.items():
            m.generation_config = GenerationDefaults(**{name: v})
            with pytest.raises(ValueError, match=f"model.generation_config.{name}=.* draft_model"):
                generate(m, x, 2, draft_model=m)
        m.generation_config = GenerationDefaults(min_length=rules["min_length"])
        assert torch.equal(generate(m, x, 4, draft_model=m, min_new_tokens=0), generate(m, x, 4))
    finally:
        m.generation_config = cfg
