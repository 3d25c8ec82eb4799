"""from_hf on IBM Granite and OLMo 2 checkpoints: the zoo's Llama with Granite's four scalars (embedding and
residual multipliers, attention_multiplier as the softmax scale, logits divided by logits_scaling) and OLMo 2's
post-norm blocks with q/k norms over all the heads gives transformers' logits and loss on both backends and
transformers' greedy tokens. Tiny random float32 models, saved with save_pretrained (safetensors)."""
import pytest

from llmkern.models import Llama, from_hf, get_config
from llmkern.testing import (TinyHFFamilies, assert_greedy_matches_transformers,
                             assert_logits_and_loss_match_transformers, edit_hf_config, load_hf, random_ids)

transformers = pytest.importorskip("transformers")

V = 97
PAD = 5
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
# every scalar away from 1 (attention_multiplier 0.2, not head_dim ** -0.5 = 0.25): a dropped one shows
GRANITE = dict(embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.2, logits_scaling=2.5)
FAMILIES = {
    "granite": ("GraniteConfig", "GraniteForCausalLM", GRANITE),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(pad_token_id=PAD)),
}

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)

HF = TinyHFFamilies(FAMILIES, COMMON)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (checkpoint directory, transformers model)."""
    return HF.save_all(tmp_path_factory.mktemp("granite_olmo"))


def _ids(B=2, T=13, seed=0):
    return random_ids(V, B, T, seed)


def test_configs_carry_the_family_options(saved):
    granite, olmo = (load_hf(saved[f][0]).config for f in FAMILIES)
    assert (granite.embedding_multiplier, granite.residual_multiplier, granite.attn_scale,
            granite.logits_scaling) == (3.0, 0.4, 0.2, 2.5)
    assert granite.pre_norms and not granite.post_norms and not granite.qk_norm
    assert (olmo.pre_norms, olmo.post_norms, olmo.qk_norm, olmo.qk_norm_full) == (False, True, True, True)
    assert olmo.pad_token_id == PAD and olmo.attn_scale is None and olmo.logits_scaling == 1.0
    block = Llama(olmo, backend="torch").layers[0]
    assert not hasattr(block, "input_layernorm") and not hasattr(block, "pre_feedforward_layernorm")
    assert block.self_attn.q_norm.weight.shape == (4 * 16,) and block.self_attn.k_norm.weight.shape == (2 * 16,)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_logits_and_loss_match_transformers(saved, family, backend):
    """Logits, the loss from them and the fused loss (return_logits=False: Granite's 1 / logits_scaling moved
    onto the hidden states) equal transformers'."""
    path, hf = saved[family]
    m = load_hf(path, backend)
    assert_logits_and_loss_match_transformers(m, hf, _ids(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_greedy_generation_matches_transformers(saved, family, backend):
    """6 new tokens after a 7-token prompt through the KV cache, unpadded and left padded."""
    path, hf = saved[family]
    m = load_hf(path, backend)
    assert_greedy_matches_transformers(m, hf, _ids(T=7, seed=1), 6, PAD, no_cache=backend == "torch")


@pytest.mark.parametrize("family, changes, key", [
    ("granite", dict(logits_scaling=0), "logits_scaling"),
    ("granite", dict(attention_multiplier=-0.5), "attention_multiplier"),
    ("granite", dict(embedding_multiplier="3"), "embedding_multiplier"),
    ("granite", dict(residual_multiplier=None), "residual_multiplier"),
    ("granite", dict(hidden_act="gelu"), "hidden_act"),
    ("olmo2", dict(hidden_act="relu"), "hidden_act"),
    ("olmo2", dict(num_experts=4), "num_experts"),
    ("olmo2", dict(rope_parameters={"rope_type": "longrope", "factor": 2.0, "rope_theta": 1e4}), "rope_type"),
])
def test_unsupported_configs_raise_naming_the_key(tmp_path, family, changes, key):
    HF.save(tmp_path, family)
    edit_hf_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=key):
        from_hf(str(tmp_path))


def test_model_config_options_are_checked():
    llama = get_config("llama-tiny")
    for bad, match in ((dict(embedding_multiplier=0.0), "embedding_multiplier"),
                       (dict(residual_multiplier=float("inf")), "residual_multiplier"),
                       (dict(logits_scaling=True), "logits_scaling"), (dict(logits_scaling=1e-50), "logits_scaling"),
                       (dict(pre_norms=False), "needs post_norms"), (dict(pre_norms=0), "pre_norms"),
                       (dict(qk_norm_full=True), "needs qk_norm"),
                       (dict(qk_norm=True, qk_norm_full=1), "qk_norm_full")):
        with pytest.raises(ValueError, match=match):
            llama.replace(**bad)
    for field, value in (("embedding_multiplier", 2.0), ("logits_scaling", 2.0), ("pre_norms", False)):
        with pytest.raises(ValueError, match=f"{field} applies to arch='llama' only"):
            get_config("gpt-tiny", **{field: value})
    # off by default: a named config keeps its pre-norm block and per-head qk norm
    assert (llama.embedding_multiplier, llama.residual_multiplier, llama.logits_scaling) == (1.0, 1.0, 1.0)
    m = Llama(llama.replace(qk_norm=True), backend="torch")
    assert hasattr(m.layers[0], "input_layernorm") and m.layers[0].self_attn.q_norm.weight.shape == (16,)
