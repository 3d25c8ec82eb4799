"""from_hf on Phi-3 checkpoints with partial rotary (Phi-4-mini's partial_rotary_factor) and LongRoPE (Phi-3 128k,
Phi-3.5-mini, Phi-4-mini): transformers' Phi3ForCausalLM logits in both regimes of LongRoPE (a forward whose
positions stay within original_max_position_embeddings takes the short factors, one past it the long factors),
greedy tokens through the KV cache, and the refusals. Tiny random float32 models; original_max_position_embeddings
is 8 so that 17 tokens run in the long regime."""
import json
import warnings

import pytest
import torch

from llmkern.generation import generate
from llmkern.models import Llama, from_hf, get_config
from llmkern.testing import (TinyHFFamilies, assert_greedy_matches_transformers,
                             assert_logits_and_loss_match_transformers, edit_hf_config, load_hf, random_ids)

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)

V, PAD, ORIGINAL = 97, 5, 8
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, pad_token_id=PAD,
              eos_token_id=None)
# head_dim 16 * 0.75: 12 rotated channels, 6 frequencies (Phi-4-mini: 128 * 0.75)
SHORT = [1.0, 1.1, 1.3, 1.6, 2.0, 2.5]
LONG = [1.5, 2.0, 3.0, 4.0, 6.0, 9.0]
LONGROPE = dict(original_max_position_embeddings=ORIGINAL,
                rope_scaling={"type": "longrope", "short_factor": SHORT, "long_factor": LONG})
PHI3 = TinyHFFamilies({
    "partial": ("Phi3Config", "Phi3ForCausalLM", dict(partial_rotary_factor=0.75)),
    "longrope": ("Phi3Config", "Phi3ForCausalLM", dict(LONGROPE, partial_rotary_factor=0.75)),
    # every channel rotated, an explicit attention_factor (no partial rotary)
    "longrope-full": ("Phi3Config", "Phi3ForCausalLM", dict(
        original_max_position_embeddings=ORIGINAL,
        rope_scaling={"type": "longrope", "short_factor": SHORT + [1.0, 1.0], "long_factor": LONG + [12.0, 16.0],
                      "attention_factor": 1.25})),
}, COMMON)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> (checkpoint directory, transformers Phi3ForCausalLM)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PHI3.save_all(tmp_path_factory.mktemp("phi3_rope"))


def _ids(B=2, T=17, seed=0):
    return random_ids(V, B, T, seed)


def test_configs_carry_the_rotary_width_and_longrope(saved):
    partial, longrope, full = (load_hf(saved[v][0]).config for v in ("partial", "longrope", "longrope-full"))
    assert (partial.rotary_dim, partial.rope_dim, partial.rope_scaling) == (12, 12, None)
    s = longrope.rope_scaling
    assert (longrope.rotary_dim, s["rope_type"], s["original_max_position_embeddings"]) == (12, "longrope", ORIGINAL)
    assert s["short_factor"] == tuple(SHORT) and s["long_factor"] == tuple(LONG)
    assert s["attention_factor"] == pytest.approx(2 ** 0.5)  # sqrt(1 + ln(64 / 8) / ln(8))
    assert full.rotary_dim is None and full.rope_scaling["attention_factor"] == 1.25


def test_phi4_mini_style_config_json_reads_the_same(saved, tmp_path):
    """Phi-4-mini's config.json: rope_scaling {"type": "longrope"} (no rope_parameters), partial_rotary_factor at
    the top level: the same model config as transformers' own save."""
    import shutil

    shutil.copytree(saved["longrope"][0], tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg.update(rope_scaling={"type": "longrope", "short_factor": SHORT, "long_factor": LONG},
               partial_rotary_factor=0.75, original_max_position_embeddings=ORIGINAL)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_hf(str(tmp_path)).config == load_hf(saved["longrope"][0]).config


@pytest.mark.parametrize("variant", ["partial", "longrope", "longrope-full"])
@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_logits_match_transformers_in_both_longrope_regimes(saved, variant, backend):
    """17 tokens (long factors: 16 + 1 > 8) with the loss, and 8 tokens (short factors: 7 + 1 <= 8)."""
    path, hf = saved[variant]
    m = load_hf(path, backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_logits_and_loss_match_transformers(m, hf, _ids(), atol=1e-5, rtol=1e-5)
        short = _ids(T=ORIGINAL, seed=3)
        with torch.no_grad():
            torch.testing.assert_close(m(short), hf(short).logits, atol=1e-5, rtol=1e-5)
    if variant != "partial":  # (the two regimes differ: a model that took one set of factors would fail one case)
        with torch.no_grad():
            assert not torch.allclose(m.rope(torch.arange(ORIGINAL), torch.float32)[0],
                                      m.rope(torch.arange(ORIGINAL + 1), torch.float32)[0][:ORIGINAL])


@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_greedy_tokens_match_transformers_through_the_cache(saved, backend):
    """Both regimes through the KV cache (left padded too): a 9-token prompt decodes with the long factors
    throughout; a 3-token prompt and 4 new tokens stay within 8 positions (short factors)."""
    path, hf = saved["longrope"]
    m = load_hf(path, backend)
    assert_greedy_matches_transformers(m, hf, _ids(T=9, seed=1), 4, PAD)
    assert_greedy_matches_transformers(m, hf, _ids(T=4, seed=2), 4, PAD)


def _greedy_with_recompute(m, x, n_new):
    """Greedy decoding through a cache that is dropped and refilled from the whole sequence at the step
    m.longrope_recompute names (transformers' Phi3ForCausalLM.generate); returns (tokens, each step's logits
    [B, V], the lengths at which it recomputed)."""
    cache, seqs, new = m.new_cache(x.shape[0], x.shape[1] + n_new), x, x
    steps, recomputed = [], []
    for _ in range(n_new):
        if m.longrope_recompute(cache.seqlen, seqs.shape[1]):
            recomputed.append(seqs.shape[1])
            cache, new = m.new_cache(x.shape[0], x.shape[1] + n_new), seqs
        steps.append(m(new, cache=cache, last_only=True)[:, -1])
        new = steps[-1].argmax(-1, keepdim=True)
        seqs = torch.cat([seqs, new], 1)
    return seqs, steps, recomputed


def test_crossing_into_the_long_factors_matches_transformers_generate(saved):
    """A 5-token prompt and 8 new tokens: the forwards switch to the long factors at 9 positions, where
    transformers' Phi3 generate recomputes its cache (keys cached with the short factors would be rotated
    otherwise: logits off by ~5e-3 here). The zoo's generate without a cache gives its tokens; a decode loop
    through the cache that drops it where Llama.longrope_recompute says so gives its tokens and every step's
    logits."""
    path, hf = saved["longrope"]
    m = load_hf(path, "torch")
    x = _ids(T=5, seed=4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                           pad_token_id=PAD, return_dict_in_generate=True, output_logits=True)
        assert torch.equal(generate(m, x, 8, use_cache=False), want.sequences)
        out = generate(m, x, 8, return_dict=True, top_logprobs=1)  # (its _Stepper recomputes there too)
        hf_lp = torch.log_softmax(torch.stack(want.logits, 1).float(), -1)
        hf_lp = hf_lp.gather(-1, want.sequences[:, 5:, None])[..., 0]
        assert torch.equal(out.sequences, want.sequences)
        torch.testing.assert_close(out.raw_logprobs, hf_lp, atol=1e-5, rtol=1e-5)
        got, steps, recomputed = _greedy_with_recompute(m, x, 8)
        with pytest.raises(ValueError, match="max_new_tokens: model's LongRoPE switches"):
            generate(m, x, 8, draft_model=m)
        assert torch.equal(generate(m, x, 3, draft_model=m), want.sequences[:, :8])  # (no switch in 8 positions)
    assert torch.equal(got, want.sequences) and recomputed == [ORIGINAL + 1]
    torch.testing.assert_close(torch.stack(steps), torch.stack(want.logits), atol=1e-5, rtol=1e-5)


def test_cache_decode_equals_full_forward_in_each_regime(saved):
    """Token by token through the cache (llmkern backend: the fused RoPE on 12 of 16 channels, the decode
    kernel) equals the full forward when the whole run stays short (8 positions) or long (prefill 9)."""
    path, _ = saved["longrope"]
    m = load_hf(path, "llmkern")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for T, prefill in ((ORIGINAL, 3), (12, ORIGINAL + 1)):
            x = _ids(T=T, seed=5)
            cache = m.new_cache(2, T)
            steps = [m(x[:, :prefill], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(prefill, T)]
            torch.testing.assert_close(torch.cat(steps, 1), m(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("changes, match", [
    # (the saved rope_parameters' partial_rotary_factor wins over the top-level key, as in Phi3Config)
    (dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.7}),
     "partial_rotary_factor=0.7 gives"),  # 16 * 0.7 -> 11 channels: odd
    (dict(rope_parameters={"rope_type": "default"}, partial_rotary_factor=0), "partial_rotary_factor=0 must be"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope_type='dynamic'"),
    (dict(rope_parameters={"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG[:5],
                           "partial_rotary_factor": 0.75}), "long_factor"),
    (dict(rope_parameters={"rope_type": "longrope", "short_factor": "1.0", "long_factor": LONG}), "short_factor"),
], ids=["odd-rotary", "zero-partial", "dynamic", "long-factor-length", "short-factor-type"])
def test_unsupported_phi3_rope_configs_raise_naming_the_key(tmp_path, saved, changes, match):
    import shutil

    shutil.copytree(saved["partial"][0], tmp_path, dirs_exist_ok=True)
    edit_hf_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        from_hf(str(tmp_path))


def test_longrope_on_a_llama_checkpoint_and_bad_rotary_dims_are_refused(tmp_path, saved):
    """longrope is read from phi3 checkpoints only (transformers' Llama generate does not recompute at the switch);
    ModelConfig.rotary_dim must be an even width within head_dim, and not with MLA."""
    import shutil

    shutil.copytree(saved["partial"][0], tmp_path, dirs_exist_ok=True)
    edit_hf_config(tmp_path, model_type="llama", partial_rotary_factor=None, rope_parameters={
        "rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 8})
    with pytest.raises(ValueError, match="llama config rope_type 'longrope'"):
        from_hf(str(tmp_path))
    for bad in (7, 18, 0, True):
        with pytest.raises(ValueError, match="rotary_dim"):
            get_config("llama-tiny", rotary_dim=bad)
    with pytest.raises(ValueError, match="rotary_dim"):
        get_config("deepseek-v3-tiny", rotary_dim=4)
    with pytest.raises(ValueError, match="rotary_dim"):
        get_config("gpt-tiny", rotary_dim=4)


def test_zoo_llama_partial_rotary_leaves_the_other_channels_alone():
    """A zoo Llama with rotary_dim 8 of head_dim 16: a query / key pair's score does not change with a shift of
    both positions (RoPE is relative) on the llmkern and torch backends alike, and the cos / sin are 8 wide."""
    cfg = get_config("llama-tiny", rotary_dim=8)
    torch.manual_seed(0)
    models = [Llama(cfg, backend=b) for b in ("torch", "llmkern")]
    models[1].load_state_dict(models[0].state_dict())
    x = _ids(T=6, seed=6) % cfg.vocab_size
    with torch.no_grad():
        a, b = (mm(x) for mm in models)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        cos, _ = models[0].rope(torch.arange(6), torch.float32)
        assert cos.shape == (6, 8)
        # shifted positions: the same logits (the pass-through channels carry no position)
        pos = torch.arange(6)[None].expand(2, 6)
        torch.testing.assert_close(models[0](x, position_ids=pos + 5), a, atol=1e-4, rtol=1e-4)
