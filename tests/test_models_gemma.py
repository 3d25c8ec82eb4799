"""from_hf on Gemma, Gemma 2 and Gemma 3 (text) checkpoints: the zoo's Llama with the Gemma options gives
transformers' logits and loss on both backends, its gradients, its greedy tokens through the KV cache
(sliding windows shorter than the sequence, left padding), and loads PEFT LoRA adapters saved on
transformers' model. Tiny random float32 models, saved with save_pretrained (safetensors), with weights
large enough (initializer_range 0.3) that the soft-caps, the windows and the local RoPE change the logits
by far more than the tolerance (test_each_gemma_option_matters checks that)."""
import os
import warnings

import pytest
import torch

import llmkern

from llmkern.generation import generate
from llmkern.models import Llama, from_hf, get_config
from llmkern.testing import (TinyHFFamilies, assert_greedy_matches_transformers,
                             assert_logits_and_loss_match_transformers, assert_peft_lora_round_trip, edit_hf_config,
                             load_hf, random_ids)

transformers = pytest.importorskip("transformers")

V = 97
PAD = 5
W = 5  # the sliding window: shorter than every sequence below
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=24, max_position_embeddings=64, rms_norm_eps=1e-6,
              initializer_range=0.3)
SANDWICH = dict(sliding_window=W, query_pre_attn_scalar=20, final_logit_softcapping=3.0,
                layer_types=["sliding_attention", "full_attention"])
# family -> (config class, model class, options)
FAMILIES = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict()),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(SANDWICH, attn_logit_softcapping=2.0)),
    # local RoPE base 100 on the sliding layer; linear scaling (factor 8) on the global one
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(SANDWICH, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}})),
}

# float32: the large weights put the fused ops' other rounding order (llmkern backend) at up to ~1e-5 of
# transformers' on logits of size ~3 (the torch backend is usually bit-exact)
TOL = dict(atol=3e-5, rtol=1e-5)

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)


HF = TinyHFFamilies(FAMILIES, COMMON)
_save, _load = HF.save, load_hf


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (checkpoint directory, transformers model)."""
    return HF.save_all(tmp_path_factory.mktemp("gemma"))


def _ids(B=2, T=13, seed=0):
    return random_ids(V, B, T, seed)


def test_configs_carry_the_gemma_options(saved):
    g1, g2, g3 = (_load(saved[f][0]).config for f in FAMILIES)
    for c in (g1, g2, g3):
        assert (c.activation, c.norm_offset, c.scale_embeddings, c.tie_embeddings, c.head_dim) == \
            ("gelu_tanh", 1.0, True, True, 24)
    assert not g1.post_norms and g1.sliding_window is None and g1.attn_scale is None and g1.logit_softcap is None
    assert g2.post_norms and not g2.qk_norm and (g2.attn_softcap, g2.logit_softcap) == (2.0, 3.0)
    assert g2.attn_scale == 20 ** -0.5 and [g2.layer_window(i) for i in range(2)] == [W, None]
    assert g3.post_norms and g3.qk_norm and (g3.attn_softcap, g3.logit_softcap) == (None, 3.0)
    assert (g3.rope_local_theta, g3.rope_theta, g3.rope_scaling) == (100.0, 1e4, {"rope_type": "linear", "factor": 8.0})
    assert [g3.layer_rope_is_local(i) for i in range(2)] == [True, False]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_logits_and_loss_match_transformers(saved, family, backend):
    """13 tokens (past the window of 5): logits, the loss with labels (some ignored), and the loss without
    the logits (llmkern: linear_cross_entropy with the final soft-cap) are transformers'."""
    path, hf = saved[family]
    m = _load(path, backend)
    assert_logits_and_loss_match_transformers(m, hf, _ids(), check_flops=False, **TOL)
    assert llmkern.flops.param_counts(m.config)["total"] == hf.num_parameters()  # the norms counted too


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_each_gemma_option_matters(saved, family):
    """Without any one of its options the model's logits are far from transformers': the tests above see them."""
    path, hf = saved[family]
    m = _load(path)
    x = _ids()
    with torch.no_grad():
        want = hf(x).logits
    off = [dict(logit_softcap=None), dict(attn_scale=None), dict(norm_offset=0.0), dict(scale_embeddings=False),
           dict(activation="silu"), dict(sliding_window=None, sliding_window_layers=None, rope_local_theta=None)]
    off += [dict(attn_softcap=None)] if family == "gemma2" else [dict(rope_local_theta=None), dict(rope_scaling=None)]
    for changes in off:
        other = Llama(m.config.replace(**changes), backend="torch").eval()
        other.load_state_dict(m.state_dict())
        with torch.no_grad():
            assert (other(x) - want).abs().max() > 0.05, changes


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradients_flow_and_the_backends_agree(saved, family):
    """A training step's loss and gradients: backend "llmkern" (fused norms, GeGLU, attention, and the fused
    linear cross-entropy) equals backend "torch"; every parameter gets a finite gradient."""
    path, _ = saved[family]
    x = _ids(seed=3)
    grads, losses = {}, {}
    for backend, fused in (("torch", False), ("llmkern", False), ("llmkern", True)):
        m = _load(path, backend).train()
        _, loss = m(x, labels=x, return_logits=not fused)
        loss.backward()
        losses[backend, fused] = loss.detach()
        grads[backend, fused] = {n: p.grad for n, p in m.named_parameters()}
    ref = grads["torch", False]
    assert all(g is not None and torch.isfinite(g).all() for g in ref.values())
    for key in (("llmkern", False), ("llmkern", True)):
        torch.testing.assert_close(losses[key], losses["torch", False], **TOL)
        for n, g in grads[key].items():
            torch.testing.assert_close(g, ref[n], atol=1e-4, rtol=1e-4, msg=f"{key} {n}")


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_greedy_generation_matches_transformers(saved, family, backend):
    """6 new tokens after a 9-token prompt: the decode steps run past the window; also left padded
    (transformers' windows count the padding positions too, as the zoo's do) and without the cache."""
    path, hf = saved[family]
    m = _load(path, backend)
    assert_greedy_matches_transformers(m, hf, _ids(T=9, seed=1), 6, PAD, no_cache=backend == "torch")


def test_cache_decode_hands_scale_softcap_and_window_to_llmkern(saved, monkeypatch):
    """Gemma 2, token by token through the cache on backend "llmkern" (the decode op) equals the full
    forward, and both attention ops get the scale, the soft-cap and (on the sliding layer) the window."""
    ops = pytest.importorskip("llmkern.ops.attention")
    calls = []
    for fn in ("attention", "attention_with_kvcache"):
        def recorded(*a, _orig=getattr(ops, fn), _fn=fn, **kw):
            calls.append((_fn, kw.get("window"), kw.get("scale"), kw.get("softcap")))
            return _orig(*a, **kw)
        monkeypatch.setattr(ops, fn, recorded)
    path, hf = saved["gemma2"]
    m = _load(path, "llmkern")
    x = _ids(T=12, seed=2)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2, 12)
        steps = torch.cat([m(x[:, :6], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(6, 12)], 1)
        torch.testing.assert_close(steps, full, **TOL)
        torch.testing.assert_close(full, hf(x).logits, **TOL)
    s = 20 ** -0.5
    assert calls[:2] == [("attention", (W - 1, 0), s, 2.0), ("attention", None, s, 2.0)]
    assert ("attention_with_kvcache", (W - 1, 0), s, 2.0) in calls
    assert ("attention_with_kvcache", None, s, 2.0) in calls


def test_peft_lora_adapter_on_gemma3_round_trips(tmp_path, saved):
    """A LoRA adapter that PEFT saved on Gemma3ForCausalLM (every linear targeted) loads into the zoo through
    hf_module_names and gives PEFT's logits; saved back with HF names, PEFT reads it."""
    pytest.importorskip("peft")
    assert_peft_lora_round_trip(saved["gemma3_text"][0], tmp_path, _ids(), **TOL)


@pytest.mark.parametrize("family, changes", [
    # legacy keys, read by transformers' config classes: Gemma's hidden_act "gelu" (the tanh gelu), Gemma 2's
    # default layer_types (every other layer slides), Gemma 3's rope_theta / rope_local_base_freq /
    # rope_scaling and sliding_window_pattern instead of rope_parameters and layer_types
    ("gemma", dict(hidden_act="gelu", attention_bias=True)),
    ("gemma2", dict(layer_types=None, num_hidden_layers=3, hidden_activation="gelu")),
    ("gemma3_text", dict(layer_types=None, rope_parameters=None, rope_theta=5e4, rope_local_base_freq=50.0,
                         rope_scaling={"rope_type": "linear", "factor": 4.0}, sliding_window_pattern=2,
                         num_hidden_layers=3)),
], ids=["gemma-legacy-gelu-bias", "gemma2-default-layers-erf-gelu", "gemma3-legacy-rope-keys"])
def test_older_config_keys_load_as_transformers_reads_them(tmp_path, family, changes):
    _save(tmp_path, family, seed=4, **{k: v for k, v in changes.items() if k in ("num_hidden_layers", "layer_types")})
    edit_hf_config(tmp_path, **changes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
        if family == "gemma":  # attention_bias: random biases, saved again
            with torch.no_grad():
                for n, p in hf.named_parameters():
                    if n.endswith(".bias"):
                        p.normal_(0.0, 0.5)
            hf.save_pretrained(tmp_path)
    m = _load(str(tmp_path))
    if family == "gemma2":
        assert (m.config.sliding_window_layers, m.config.activation) == ((0, 2), "gelu")
    if family == "gemma3_text":
        assert (m.config.sliding_window_layers, m.config.rope_local_theta, m.config.rope_theta) == ((0, 2), 50.0, 5e4)
    x = _ids(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(m(x), hf(x).logits, **TOL)


def test_gemma2_through_the_triton_kernels(saved, monkeypatch):
    """backend="llmkern" with the Triton kernels (under the interpreter here): RMSNorm with the (1 + w) gain,
    GeGLU, the soft-capped windowed attention and its decode kernel, the soft-capped cross-entropy: the
    logits, the loss and the greedy tokens are transformers'."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernels on CPU tensors under TRITON_INTERPRET=1")
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    path, hf = saved["gemma2"]
    m = _load(path, "llmkern")
    x = _ids(B=1, T=8, seed=6)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = hf(x, labels=x)
        logits, loss = m(x, labels=x)
        torch.testing.assert_close(logits, want.logits, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(loss, want.loss, **TOL)
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False, pad_token_id=PAD)
        assert torch.equal(generate(m, x, 3), out)


@pytest.mark.parametrize("family, changes, key", [
    ("gemma", dict(hidden_act="relu"), "hidden_act"),
    ("gemma2", dict(hidden_activation="quick_gelu"), "hidden_activation"),
    ("gemma2", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gemma3_text", dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    ("gemma2", dict(attn_logit_softcapping="50"), "attn_logit_softcapping"),
    ("gemma2", dict(final_logit_softcapping=0), "final_logit_softcapping"),
    ("gemma2", dict(query_pre_attn_scalar=None), "query_pre_attn_scalar"),
    ("gemma2", dict(sliding_window=None), "sliding_window"),
    ("gemma2", dict(layer_types=["sliding_attention"]), "layer_types"),
    ("gemma3_text", dict(layer_types=["sliding_attention", "chunked_attention"]), "layer_types"),
    ("gemma", dict(num_local_experts=4), "num_local_experts"),
    ("gemma2", dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e3}}),
     "rope_parameters"),
    ("gemma3_text", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4}), "rope_parameters"),
    ("gemma3_text", dict(rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0},
                                          "full_attention": {"rope_type": "default"}}), "sliding_attention"),
    ("gemma3_text", dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 8.0}), "rope_scaling"),
    ("gemma3_text", dict(rope_parameters={"full_attention": {"rope_type": "longrope", "factor": 2.0}}),
     "rope_type"),
    # transformers reads yarn's truncate from the outer per-layer-type dict, so Gemma 3 always truncates
    ("gemma3_text", dict(rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 4.0, "truncate": False,
                                                             "original_max_position_embeddings": 64},
                                          "sliding_attention": {"rope_type": "default"}}), "truncate"),
    ("gemma3_text", dict(model_type="gemma3"), "model_type"),
    ("gemma3_text", dict(model_type="gemma3n_text"), "model_type"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_unsupported_configs_raise_naming_the_key(tmp_path, family, changes, key):
    _save(tmp_path, family)
    edit_hf_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=key):
        from_hf(str(tmp_path))


def test_model_config_gemma_options_are_checked():
    llama = get_config("llama-tiny")
    for bad, match in ((dict(attn_softcap=0.0), "attn_softcap"), (dict(logit_softcap="3"), "logit_softcap"),
                       (dict(attn_scale=-1.0), "attn_scale"), (dict(post_norms=1), "post_norms"),
                       (dict(scale_embeddings="yes"), "scale_embeddings"), (dict(norm_offset=True), "norm_offset"),
                       (dict(rope_local_theta=100.0), "needs sliding_window"), (dict(activation="relu"), "activation"),
                       (dict(activation="gelu_tanh", n_experts=2), "mixture-of-experts")):
        with pytest.raises(ValueError, match=match):
            llama.replace(**bad)
    for field, value in (("post_norms", True), ("attn_softcap", 2.0), ("norm_offset", 1.0)):
        with pytest.raises(ValueError, match=f"{field} applies to arch='llama' only"):
            get_config("gpt-tiny", **{field: value})
    # a fresh Gemma-style model: (1 + w) gains start at 1, and the HF names of its linear layers are Llama's
    cfg = llama.replace(norm_offset=1.0, post_norms=True, activation="gelu_tanh", sliding_window=4,
                        sliding_window_layers=(0,), rope_local_theta=100.0)
    m = Llama(cfg, backend="torch")
    assert not m.layers[0].post_feedforward_layernorm.weight.detach().any() and not m.norm.weight.detach().any()
    names = m.hf_module_names()
    assert names["layers.1.mlp.gate_proj"].name == "model.layers.1.mlp.gate_proj" and len(names) == 1 + 2 * 7
    assert m.half().inv_freq_local.dtype == torch.float32
