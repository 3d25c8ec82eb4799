"""from_hf on Mistral, Qwen2 and Qwen3 checkpoints: the zoo's Llama (with its family options) gives
transformers' logits on both backends, transformers' greedy tokens through the KV cache (sliding
windows shorter than the sequence, left padding), and loads PEFT LoRA adapters saved on transformers'
model. Tiny random float32 models, saved with save_pretrained (safetensors)."""
import warnings

import pytest
import torch

from llmkern import flops
from llmkern.generation import generate
from llmkern.models import Llama, from_hf, get_config
from llmkern.testing import (TinyHFFamilies, assert_greedy_matches_transformers,
                             assert_logits_and_loss_match_transformers, assert_peft_lora_round_trip, edit_hf_config,
                             load_hf, random_ids)

transformers = pytest.importorskip("transformers")

V = 97
PAD = 5
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
# family -> (config class, model class, options): windows shorter than the prompts below
FAMILIES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5)),
    # layer 0 full, layer 1 sliding (max_window_layers=1): per-layer windows
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    # head_dim 24 != 64 / 4, tied embeddings
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=True)),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)


HF = TinyHFFamilies(FAMILIES, COMMON)
_save, _load = HF.save, load_hf


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (checkpoint directory, transformers model)."""
    return HF.save_all(tmp_path_factory.mktemp("families"))


def _ids(B=2, T=17, seed=0):
    return random_ids(V, B, T, seed)


def test_configs_carry_the_family_options(saved):
    mistral, qwen2, qwen3 = (_load(saved[f][0]).config for f in FAMILIES)
    assert (mistral.sliding_window, mistral.sliding_window_layers, mistral.biases) == (5, None, (False,) * 3)
    assert [mistral.layer_window(i) for i in range(2)] == [5, 5]
    assert qwen2.biases == (True, False, False) and [qwen2.layer_window(i) for i in range(2)] == [None, 6]
    assert qwen3.qk_norm and qwen3.head_dim == 24 and qwen3.tie_embeddings and qwen3.sliding_window is None
    assert not qwen2.qk_norm and not mistral.qk_norm


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_logits_match_transformers(saved, family, backend):
    path, hf = saved[family]
    m = _load(path, backend)
    x = _ids()  # 17 tokens: past the windows
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(m(x), hf(x).logits, atol=1e-5, rtol=1e-5)
    assert m.num_params() == hf.num_parameters() == flops.param_counts(m.config)["total"]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_greedy_generation_matches_transformers(saved, family, backend):
    """8 new tokens after a 9-token prompt: the decode steps run past the windows; also left padded
    (transformers' windows count the padding positions too, as the zoo's do) and without the cache."""
    path, hf = saved[family]
    m = _load(path, backend)
    assert_greedy_matches_transformers(m, hf, _ids(T=9, seed=1), 8, PAD, no_cache=backend == "torch")


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_cache_decode_equals_full_forward_on_both_backends(saved, family, monkeypatch):
    """Token-by-token decoding through the cache (llmkern: the decode kernel's window) equals the full
    forward; the backends agree; backend="llmkern" hands the window to llmkern's attention ops."""
    ops = pytest.importorskip("llmkern.ops.attention")
    windows = []
    for fn in ("attention", "attention_with_kvcache"):
        def recorded(*a, _orig=getattr(ops, fn), _fn=fn, **kw):
            windows.append((_fn, kw.get("window")))
            return _orig(*a, **kw)
        monkeypatch.setattr(ops, fn, recorded)
    path, _ = saved[family]
    x = _ids(T=16, seed=2)
    outs = {}
    for backend in ("torch", "llmkern"):
        m = _load(path, backend)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            full = m(x)
            cache = m.new_cache(2, 16)
            steps = torch.cat([m(x[:, :7], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(7, 16)], 1)
        torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
        outs[backend] = full
    torch.testing.assert_close(outs["llmkern"], outs["torch"], atol=1e-5, rtol=1e-5)
    W = 5 if family == "mistral" else 6
    sliding = [(W - 1, 0)] if family == "mistral" else [None, (W - 1, 0)]  # per layer
    assert windows[:2] == [("attention", w) for w in sliding * (2 // len(sliding))]
    assert ("attention_with_kvcache", (W - 1, 0)) in windows


def test_peft_lora_adapter_on_qwen2_loads_into_the_zoo(tmp_path, saved):
    """A LoRA adapter that PEFT saved on Qwen2ForCausalLM (biased q/k/v, every linear targeted) loads
    with llmkern.peft.load_peft_adapter and gives PEFT's logits; saved back with HF names, PEFT reads it."""
    pytest.importorskip("peft")
    assert_peft_lora_round_trip(saved["qwen2"][0], tmp_path, _ids())


@pytest.mark.parametrize("family, changes", [
    ("qwen3", dict(attention_bias=True, use_sliding_window=True, sliding_window=4, layer_types=[
        "sliding_attention", "full_attention"])),
    ("qwen2", dict(use_sliding_window=False)),  # sliding_window set but off
    ("mistral", dict(sliding_window=None, tie_word_embeddings=True)),
], ids=["qwen3-bias-window-layer0", "qwen2-window-off", "mistral-no-window-tied"])
def test_more_options_match_transformers(tmp_path, family, changes):
    hf = _save(tmp_path, family, seed=3, **changes)
    x = _ids(T=12, seed=4)
    for backend in ("torch", "llmkern"):
        m = _load(str(tmp_path), backend)
        with torch.no_grad():
            torch.testing.assert_close(m(x), hf(x).logits, atol=1e-5, rtol=1e-5)
    assert m.num_params() == hf.num_parameters() == flops.param_counts(m.config)["total"]
    if family == "qwen3":
        assert m.config.biases == (True, True, False) and m.config.sliding_window_layers == (0,)
    else:
        assert m.config.sliding_window is None


def test_llama_attention_and_mlp_bias_match_transformers(tmp_path):
    torch.manual_seed(5)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith(".bias"):
                p.normal_(0.0, 0.5)
    hf.save_pretrained(tmp_path)
    m = _load(str(tmp_path))
    assert m.config.biases == (True, True, True)
    with torch.no_grad():
        torch.testing.assert_close(m(_ids()), hf(_ids()).logits, atol=1e-5, rtol=1e-5)
    assert m.num_params() == hf.num_parameters() == flops.param_counts(m.config)["total"]


@pytest.mark.parametrize("family, changes, key", [
    ("mistral", dict(hidden_act="gelu"), "hidden_act"),
    ("qwen2", dict(hidden_act="gelu_pytorch_tanh"), "hidden_act"),
    ("mistral", dict(num_local_experts=8), "num_local_experts"),
    ("qwen3", dict(num_experts=4), "num_experts"),
    ("qwen2", dict(moe_intermediate_size=32), "moe_intermediate_size"),
    ("mistral", dict(sliding_window=-2), "sliding_window"),
    ("qwen2", dict(sliding_window="6"), "sliding_window"),
    ("qwen2", dict(layer_types=["full_attention", "chunked_attention"]), "layer_types"),
    ("qwen3", dict(use_sliding_window=True, sliding_window=4, layer_types=["sliding_attention"]), "layer_types"),
    ("qwen3", dict(use_sliding_window="yes"), "use_sliding_window"),
    ("qwen3", dict(attention_bias="no"), "attention_bias"),
    ("qwen2", dict(model_type="qwen2_moe"), "model_type"),
    ("qwen3", dict(rope_parameters={"rope_type": "longrope", "factor": 2.0, "rope_theta": 1e4}), "rope_type"),
    ("mistral", dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 1e3}}),
     "rope_parameters"),
])
def test_unsupported_configs_raise_naming_the_key(tmp_path, family, changes, key):
    _save(tmp_path, family)
    edit_hf_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=key):
        from_hf(str(tmp_path))


def test_model_config_options_are_checked():
    llama = get_config("llama-tiny")
    for bad, match in ((dict(sliding_window=0), "sliding_window"), (dict(sliding_window_layers=(0,)), "needs"),
                       (dict(sliding_window=4, sliding_window_layers=(2,)), "sliding_window_layers"),
                       (dict(qkv_bias="yes"), "qkv_bias"), (dict(qk_norm=1.0), "qk_norm")):
        with pytest.raises(ValueError, match=match):
            llama.replace(**bad)
    for field, value in (("qk_norm", True), ("sliding_window", 4), ("qkv_bias", True)):
        with pytest.raises(ValueError, match=f"{field} applies to arch='llama' only"):
            get_config("gpt-tiny", **{field: value})
    # off by default: the named configs are unchanged
    assert llama.biases == (False, False, False) and not llama.qk_norm and llama.layer_window(0) is None
    cfg = llama.replace(sliding_window=4, sliding_window_layers=[1, 0, 1], qk_norm=True, qkv_bias=True)
    assert cfg.sliding_window_layers == (0, 1)
    m = Llama(cfg, backend="torch")
    assert m.layers[0].self_attn.q_norm.weight.shape == (cfg.head_dim,)
    assert m.layers[0].self_attn.q_proj.bias is not None and m.layers[0].self_attn.o_proj.bias is None
    assert m.num_params() == flops.param_counts(cfg)["total"]
    names = m.hf_module_names()
    assert names["layers.1.self_attn.k_proj"].name == "model.layers.1.self_attn.k_proj"
    assert not any("norm" in n for n in names)


def test_mistral_window_through_the_triton_kernels(saved, monkeypatch):
    """backend="llmkern" with the Triton attention and decode kernels (under the interpreter here):
    the windowed logits and the greedy tokens (left padded) are transformers'."""
    import os

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernels on CPU tensors under TRITON_INTERPRET=1")
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    path, hf = saved["mistral"]
    m = _load(path, "llmkern")
    x = _ids(T=9, seed=5)
    am = torch.ones_like(x)
    am[0, :2] = 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(m(x), hf(x).logits, atol=1e-5, rtol=1e-5)
        want = hf.generate(x, attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
        assert torch.equal(generate(m, x, 8, attention_mask=am, pad_token_id=PAD), want)


@pytest.mark.parametrize("types", [["full_attention", "sliding_attention"], ["full_attention", "full_attention"]])
def test_mistral_config_with_layer_types_loads_as_transformers_auto_classes_do(tmp_path, types):
    """A model_type "mistral" config.json that lists layer_types (Ministral-style checkpoints): transformers'
    AutoConfig treats it as Ministral, whose layers slide only where layer_types says "sliding_attention"
    (MistralForCausalLM itself would slide everywhere, and warns to use the Auto classes). from_hf follows
    the Auto classes: logits and greedy tokens through the KV cache (left padded) are theirs."""
    _save(tmp_path, "mistral", seed=6, sliding_window=3)
    edit_hf_config(tmp_path, layer_types=types)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    hf.generation_config.eos_token_id = None
    m = _load(str(tmp_path))
    assert [m.config.layer_window(i) for i in range(2)] == [3 if t == "sliding_attention" else None for t in types]
    x = _ids(T=9, seed=7)
    am = torch.ones_like(x)
    am[0, :2] = 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(m(x), hf(x).logits, atol=1e-5, rtol=1e-5)
        want = hf.generate(x, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
        assert torch.equal(generate(m, x, 6, attention_mask=am, pad_token_id=PAD), want)


def test_pad_token_row_gets_no_embedding_gradient_as_in_transformers(tmp_path):
    """transformers' Llama-family embeddings take padding_idx=pad_token_id: that row gets no gradient from the
    lookup (the zoo trained it); the vocabulary-parallel embedding keeps the rule (tests/test_parallel_vocab)."""
    hf = _save(tmp_path, "qwen2", seed=5, pad_token_id=PAD)
    m = _load(str(tmp_path), "torch")
    assert m.config.pad_token_id == PAD and m.embed_tokens.padding_idx == PAD
    x = _ids(T=9, seed=6)
    x[:, :3] = PAD
    labels = x.clone()
    labels[:, :3] = -100
    _, loss = m(x, labels=labels)
    loss.backward()
    hf(x, labels=labels).loss.backward()
    got, want = m.embed_tokens.weight.grad, hf.model.embed_tokens.weight.grad
    assert float(want[PAD].abs().max()) == 0.0 and float(got[PAD].abs().max()) == 0.0
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="pad_token_id=97"):
        edit_hf_config(tmp_path, pad_token_id=V)
        _load(str(tmp_path), "torch")


# Phi-3 (model_type "phi3"): fused qkv_proj / gate_up_proj split into the zoo's projections. "window": a
# sliding_window shorter than the prompts (transformers 5.24's Phi3Model masks with it), untied; "tied": no
# window, head_dim 24 != 64 / 4, tied embeddings. (pad / eos: Phi3Config's defaults, 32000, are past V.)
PHI3_IDS = dict(pad_token_id=PAD, eos_token_id=None)
PHI3 = TinyHFFamilies({
    "window": ("Phi3Config", "Phi3ForCausalLM", dict(PHI3_IDS, sliding_window=5)),
    "tied": ("Phi3Config", "Phi3ForCausalLM", dict(PHI3_IDS, head_dim=24, tie_word_embeddings=True)),
}, COMMON)


@pytest.fixture(scope="module")
def phi3_saved(tmp_path_factory):
    """variant -> (checkpoint directory, transformers Phi3ForCausalLM)."""
    return PHI3.save_all(tmp_path_factory.mktemp("phi3"))


@pytest.mark.parametrize("variant", ["window", "tied"])
@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_phi3_logits_loss_and_greedy_tokens_match_transformers(phi3_saved, variant, backend):
    """from_hf on a Phi3ForCausalLM checkpoint: transformers' logits and loss (17 tokens: past the window),
    its parameter count, and its greedy tokens through the KV cache (left padded too)."""
    path, hf = phi3_saved[variant]
    m = _load(path, backend)
    c = m.config
    assert (c.n_kv_head, c.head_dim, c.biases, c.tie_embeddings, c.norm_eps) == \
        (2, 24 if variant == "tied" else 16, (False,) * 3, variant == "tied", hf.config.rms_norm_eps)
    assert [c.layer_window(i) for i in range(2)] == ([5, 5] if variant == "window" else [None, None])
    attn, mlp = hf.model.layers[1].self_attn, hf.model.layers[1].mlp
    zoo = m.layers[1]
    qkv = torch.cat([zoo.self_attn.q_proj.weight, zoo.self_attn.k_proj.weight, zoo.self_attn.v_proj.weight])
    assert torch.equal(qkv, attn.qkv_proj.weight)
    assert torch.equal(torch.cat([zoo.mlp.gate_proj.weight, zoo.mlp.up_proj.weight]), mlp.gate_up_proj.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_logits_and_loss_match_transformers(m, hf, _ids(), atol=1e-5, rtol=1e-5)
    assert_greedy_matches_transformers(m, hf, _ids(T=9, seed=1), 6, PAD)


@pytest.mark.parametrize("variant", ["window", "tied"])
def test_phi3_peft_lora_adapter_round_trip(tmp_path, phi3_saved, variant):
    """A LoRA adapter that PEFT saved on Phi3ForCausalLM's fused qkv_proj and gate_up_proj (and o_proj, down_proj)
    loads into the zoo's split projections with PEFT's logits; saved back on the fused names, PEFT reads it (it
    was refused: 'qkv_proj is not in the model')."""
    pytest.importorskip("peft")
    assert_peft_lora_round_trip(phi3_saved[variant][0], tmp_path, _ids(),
                                targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], n_modules=2 * 7)


@pytest.mark.parametrize("changes, match", [
    (dict(resid_pdrop=0.1), "resid_pdrop"),
    (dict(layer_types=["sliding_attention", "full_attention"]), "layer_types"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(num_key_value_heads=4), "qkv_proj"),  # (the file's fused rows do not match the config)
], ids=["resid_pdrop", "layer_types", "hidden_act", "sliding_window", "qkv-rows"])
def test_phi3_unsupported_configs_raise_naming_the_key(tmp_path, phi3_saved, changes, match):
    import shutil

    shutil.copytree(phi3_saved["window"][0], tmp_path, dirs_exist_ok=True)
    edit_hf_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        from_hf(str(tmp_path))
