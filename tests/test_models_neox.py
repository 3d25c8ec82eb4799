"""GPT-NeoX (Pythia) and Phi-1/1.5/2 in the zoo (llmkern/models/neox.py): from_hf gives transformers'
float32 logits, loss and greedy / beam tokens (through the KV cache, with left padding) on both backends; the
llmkern kernels (Triton interpreter) agree with plain torch; legacy checkpoint names and config keys load;
unsupported options raise ValueError naming the key. The zoo's wiring: the meta-device build (to_empty,
assign loads, init_weights), the named configs' parameter counts and FLOPs, the tensor-parallel naming of Phi's
q/k norms, torch.compile. Tiny random float32 models, saved with save_pretrained."""
import json

import pytest
import torch

import llmkern
from llmkern.models import NeoX, NeoXConfig, from_hf
from llmkern.testing import (TinyHFFamilies, assert_greedy_matches_transformers,
                             assert_logits_and_loss_match_transformers, edit_hf_config, load_hf, random_ids)

transformers = pytest.importorskip("transformers")

V = 97
PAD = 5
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64)
FAMILIES = {
    # Pythia's block: parallel residual, two norms, exact GELU; half the head's channels rotate
    "neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
             dict(rope_parameters=dict(rope_type="default", rope_theta=500.0, partial_rotary_factor=0.5))),
    # the sequential block, a tied head, the tanh GELU, rotary_pct's default 0.25
    "neox_sequential": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                        dict(use_parallel_residual=False, tie_word_embeddings=True, hidden_act="gelu_new")),
    # Phi: one shared norm, GQA, q/k LayerNorms, the LM head's bias, 12 of 16 channels rotated
    "phi": ("PhiConfig", "PhiForCausalLM",
            dict(num_key_value_heads=2, qk_layernorm=True, pad_token_id=PAD,
                 rope_parameters=dict(rope_type="default", rope_theta=300.0, partial_rotary_factor=0.75))),
}

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)

HF = TinyHFFamilies(FAMILIES, COMMON)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (checkpoint directory, transformers model)."""
    return HF.save_all(tmp_path_factory.mktemp("neox"))


def test_configs_carry_the_family_options(saved):
    neox, seq, phi = (load_hf(saved[f][0]).config for f in FAMILIES)
    assert (neox.rotary_dim, neox.rope_theta, neox.activation, neox.parallel_residual, neox.shared_norm) == \
        (8, 500.0, "gelu", True, False)
    assert (seq.rotary_dim, seq.parallel_residual, seq.tie_embeddings, seq.activation) == (4, False, True, "gelu_tanh")
    assert (phi.rotary_dim, phi.rope_theta, phi.n_kv_head, phi.shared_norm, phi.qk_layernorm, phi.lm_head_bias,
            phi.pad_token_id) == (12, 300.0, 2, True, True, True, PAD)
    block = NeoX(phi, backend="torch").layers[0]
    assert not hasattr(block, "post_attention_layernorm") and block.self_attn.k_proj.weight.shape == (2 * 16, 64)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_logits_and_loss_match_transformers(saved, family, backend):
    path, hf = saved[family]
    m = load_hf(path, backend)
    assert_logits_and_loss_match_transformers(m, hf, random_ids(V, 2, 13), check_flops=True, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_greedy_generation_matches_transformers(saved, family, backend):
    """6 new tokens after a 7-token prompt through the KV cache, unpadded and left padded."""
    path, hf = saved[family]
    m = load_hf(path, backend)
    assert_greedy_matches_transformers(m, hf, random_ids(V, 2, 7, seed=1), 6, PAD, no_cache=backend == "torch")


def test_llmkern_kernels_agree_with_torch(triton_backend):
    """Under the Triton interpreter: the left-padded prefill's logits equal plain torch's, for Phi's block (GQA,
    q/k LayerNorms, one shared norm, the head's bias) and NeoX's sequential one (the LayerNorm fused with the
    residual add); for the first, also 2 greedy tokens (the second through the cache's decode kernel)."""
    x = random_ids(61, 2, 6)
    am = torch.ones_like(x)
    am[1, :2] = 0
    real = am.bool()
    for decode, options in ((True, dict(n_kv_head=1, shared_norm=True, qk_layernorm=True, lm_head_bias=True,
                                        rotary_dim=8, activation="gelu_tanh")),
                            (False, dict(parallel_residual=False, rotary_dim=4))):
        torch.manual_seed(0)
        cfg = NeoXConfig(vocab_size=61, n_layer=1, n_head=2, n_embd=32, block_size=32, intermediate_size=48,
                         **options)
        m = NeoX(cfg, backend="torch").eval()
        with torch.no_grad():  # (random norms and biases: a mix-up shows)
            for n, p in m.named_parameters():
                if "norm" in n or n.endswith(".bias"):
                    p.uniform_(0.5, 1.5)
            want = m(x, attention_mask=am)
            want_tokens = llmkern.generate(m, x, 2, attention_mask=am) if decode else None
            m.backend = "llmkern"
            torch.testing.assert_close(m(x, attention_mask=am)[real], want[real], atol=1e-5, rtol=1e-5)
            if decode:
                assert torch.equal(llmkern.generate(m, x, 2, attention_mask=am), want_tokens)


def test_legacy_checkpoint_names_and_keys(saved, tmp_path):
    """NeoX's other names and keys: the LM head as lm_head (the fixtures' checkpoints name it embed_out, as
    Pythia's do), the attention's mask and rotary buffers of old checkpoints, and rotary_pct / rotary_emb_base
    in config.json (no rope_parameters); old Phi configs' top-level rope_theta / partial_rotary_factor. Each
    loads as transformers reads it."""
    from safetensors.torch import load_file, save_file

    src, hf = saved["neox"]
    state = load_file(f"{src}/model.safetensors")
    # (save_pretrained writes the head as Pythia's embed_out; a state dict saved as is names it lm_head)
    state["lm_head.weight"] = state.pop("embed_out.weight")
    state["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool).tril()
    state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    state["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(4)
    (tmp_path / "neox").mkdir()
    save_file(state, str(tmp_path / "neox" / "model.safetensors"))
    with open(f"{src}/config.json") as f:
        cfg = json.load(f)
    cfg.pop("rope_parameters")
    cfg.update(rotary_pct=0.5, rotary_emb_base=500.0, rope_theta=7.0)  # (NeoX ignores a top-level rope_theta)
    (tmp_path / "neox" / "config.json").write_text(json.dumps(cfg))

    _, phi = saved["phi"]
    phi.save_pretrained(tmp_path / "phi")
    cfg = json.loads((tmp_path / "phi" / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=300.0, partial_rotary_factor=0.75, rope_scaling=None)
    (tmp_path / "phi" / "config.json").write_text(json.dumps(cfg))

    x = random_ids(V, 2, 9)
    for name, want_model, theta, rotary in (("neox", hf, 500.0, 8), ("phi", phi, 300.0, 12)):
        path = str(tmp_path / name)
        m = load_hf(path)
        assert (m.config.rope_theta, m.config.rotary_dim) == (theta, rotary)
        rope = transformers.AutoConfig.from_pretrained(path).rope_parameters  # (transformers reads the same)
        assert (rope["rope_theta"], rope["partial_rotary_factor"] * 16) == (theta, rotary)
        with torch.no_grad():
            torch.testing.assert_close(m(x), want_model(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, changes, key", [
    ("neox", dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4)), "rope_type"),
    ("neox", dict(rope_scaling=dict(type="dynamic", factor=2.0)), "rope_scaling"),
    ("neox", dict(hidden_act="silu"), "hidden_act"),
    ("neox", dict(use_parallel_residual="yes"), "use_parallel_residual"),
    ("phi", dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.3125)),
     "partial_rotary_factor"),  # (5 of 16 channels: no rotate-half pairs)
    ("phi", dict(head_dim=8), "qk_layernorm"),
    ("phi", dict(resid_pdrop=1.5), "resid_dropout"),
    ("phi", dict(pad_token_id=V), "pad_token_id"),
])
def test_unsupported_configs_raise_naming_the_key(tmp_path, family, changes, key):
    HF.save(tmp_path, family)
    edit_hf_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=key):
        from_hf(str(tmp_path))


def test_checkpoint_mismatch_and_bad_config_raise(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    src, _ = saved["phi"]
    state = load_file(f"{src}/model.safetensors")
    del state["model.layers.1.mlp.fc2.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with open(f"{src}/config.json") as f:
        (tmp_path / "config.json").write_text(f.read())
    with pytest.raises(ValueError, match="missing=.*layers.1.mlp.down_proj.bias"):
        from_hf(str(tmp_path))
    bad_configs = ((dict(rotary_dim=3), "rotary_dim"), (dict(shared_norm=True, parallel_residual=False), "shared_norm"),
                   (dict(n_kv_head=3), "n_kv_head"), (dict(activation="silu"), "activation"),
                   (dict(attn_dropout=1.0), "attn_dropout"), (dict(family="gpt2"), "family"))
    for bad, match in bad_configs:
        with pytest.raises(ValueError, match=match):
            NeoXConfig(n_embd=32, n_head=2, **bad)
    with pytest.raises(ValueError, match="NeoXConfig"):
        NeoX(llmkern.models.get_config("gpt-tiny"))


def test_dropout_rates_apply_in_training(saved, tmp_path):
    """Phi's resid_pdrop / embd_pdrop / attention_dropout and NeoX's hidden_dropout are read and drop in training
    only (eval: transformers' logits)."""
    HF.save(tmp_path, "phi", resid_pdrop=0.3, embd_pdrop=0.2, attention_dropout=0.1)
    m = load_hf(str(tmp_path))
    assert (m.config.resid_dropout, m.config.embd_dropout, m.config.attn_dropout) == (0.3, 0.2, 0.1)
    x = random_ids(V, 2, 9)
    with torch.no_grad():
        ref = m(x)
        m.train()
        assert not torch.allclose(m(x), ref)
        m.eval()
        assert torch.equal(m(x), ref)
    HF.save(tmp_path / "neox", "neox", hidden_dropout=0.25)
    cfg = load_hf(str(tmp_path / "neox")).config
    assert (cfg.resid_dropout, cfg.embd_dropout, cfg.attn_dropout) == (0.25, 0.25, 0.0)


# ---- the zoo's wiring: meta-device build, named configs and FLOPs, beam search, tensor parallelism, compile ------

# Phi's options (tied here: the head keeps its bias) and NeoX's sequential block without RoPE, tiny
PHI_TINY = dict(family="phi", shared_norm=True, qk_layernorm=True, lm_head_bias=True, n_kv_head=2, rotary_dim=6,
                tie_embeddings=True, pad_token_id=3, activation="gelu_tanh")
SEQ_TINY = dict(parallel_residual=False, rotary_dim=0)


def _tiny(**options):
    return llmkern.models.get_config("neox-tiny", n_layer=1, **options)


def _on_meta(cfg):
    with torch.device("meta"):
        return llmkern.models.build(cfg, backend="torch")


def _same(model, ref, x):
    """The buffers (float32 RoPE frequencies), the tie and the logits (bitwise) of the normally built ref."""
    assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, ref.inv_freq)
    assert (model.lm_head.weight is model.embed_tokens.weight) == ref.config.tie_embeddings
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref.eval()(x))


@pytest.mark.parametrize("options", [PHI_TINY, SEQ_TINY], ids=["phi", "sequential"])
def test_meta_built_model_loads_and_inits_as_the_normal_one(options):
    """ZooModel's meta-device flow on NeoX: to_empty + load_state_dict, load_state_dict(assign=True) straight from
    meta, a bfloat16 cast on meta (RoPE stays float32), and init_weights (the constructor's init drawn again, from
    the default generator or per parameter from seed=)."""
    cfg = _tiny(**options)
    torch.manual_seed(0)
    ref = llmkern.models.build(cfg, backend="torch")
    sd, x = ref.state_dict(), random_ids(cfg.vocab_size, 2, 6)
    model = _on_meta(cfg).to_empty(device="cpu")
    model.load_state_dict(sd)
    _same(model, ref, x)
    model = _on_meta(cfg)
    model.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
    _same(model, ref, x)
    assert _on_meta(cfg).to(torch.bfloat16).to_empty(device="cpu").inv_freq.dtype == torch.float32

    meta = _on_meta(cfg).to_empty(device="cpu")
    with torch.no_grad():
        for t in meta.parameters():  # (to_empty's memory is arbitrary: NaN shows anything left undrawn)
            t.fill_(float("nan"))
    for seed in (None, 7):
        torch.manual_seed(5)
        ref.init_weights(seed=seed)
        torch.manual_seed(5 if seed is None else 6)  # (with seed=, the default generator plays no part)
        assert meta.init_weights(seed=seed) is meta
        for name, t in meta.state_dict().items():
            assert torch.equal(t, ref.state_dict()[name]), name
    _same(meta, ref, x)
    if cfg.pad_token_id is not None:
        assert not meta.embed_tokens.weight[cfg.pad_token_id].any()
    assert abs(meta.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 0.004


def test_from_hf_builds_on_meta_and_casts_once(saved, tmp_path):
    """from_hf loads a NeoX checkpoint into the meta-built model: bfloat16 parameters, float32 RoPE frequencies,
    the values a float32 load cast to bfloat16 gives. Another model_type: from_hf_neox refuses it, and from_hf's
    refusal lists the NeoX families."""
    import shutil
    import warnings

    from llmkern.models.neox import from_hf_neox

    path, _ = saved["phi"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = from_hf(path, backend="torch", dtype=torch.bfloat16)
        ref = from_hf_neox(path, backend="torch").to(torch.bfloat16)
    assert isinstance(model, NeoX) and model.inv_freq.dtype == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    x = random_ids(V, 2, 5)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    other = tmp_path / "bert"
    shutil.copytree(path, other)
    edit_hf_config(other, model_type="bert")
    with pytest.raises(ValueError, match="from_hf_neox: config.json's model_type is 'bert'"):
        from_hf_neox(str(other))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported .*gpt_neox, phi"):
        from_hf(str(other))


# parameter counts, embeddings included, and without the embeddings and the LM head: Pythia's as its model cards
# publish them; Phi-2's (published as 2.7B) as its module shapes give them (51200 x 2560 embedding and biased head,
# 32 blocks of biased q/k/v/dense 2560 x 2560, fc1 / fc2 to 10240 and back, one LayerNorm each)
PUBLISHED = {"pythia-70m": (70_426_624, 18_915_328), "pythia-160m": (162_322_944, 85_056_000),
             "pythia-410m": (405_334_016, 302_311_424), "pythia-1b": (1_011_781_632, 805_736_448),
             "phi-2": (2_779_683_840, 2_517_488_640)}


def test_named_configs_param_counts_and_flops():
    """get_config / build for the Pythia and Phi-2 names (built on the meta device: no memory): every parameter
    counted by llmkern.flops.param_counts, the published sizes; the FLOPs per token from N = all but the input
    embedding (a lookup; a tied Phi head with its bias: all of them)."""
    from llmkern import flops

    for name, (total, non_embedding) in PUBLISHED.items():
        cfg = llmkern.models.get_config(name)
        model = _on_meta(cfg)
        assert isinstance(model, NeoX) and isinstance(cfg, NeoXConfig) and cfg.name == name
        counts = flops.param_counts(cfg)
        assert model.num_params() == counts["total"] == total, name
        assert total - 2 * cfg.vocab_size * cfg.n_embd - (cfg.vocab_size if cfg.lm_head_bias else 0) == non_embedding
        N = total - cfg.vocab_size * cfg.n_embd
        assert flops.matmul_params(name) == N
        assert flops.model_flops_per_token(cfg, 1024) == 6 * N + 6 * cfg.n_layer * 1024 * cfg.n_embd
    phi2 = llmkern.models.get_config("phi-2")
    assert (phi2.rotary_dim, phi2.head_dim, phi2.shared_norm, phi2.lm_head_bias, phi2.resid_dropout) == \
        (32, 80, True, True, 0.1)
    assert llmkern.models.get_config("pythia-1b").rotary_dim == 64  # (rotary_pct 0.25 of 256)
    tied = _tiny(**PHI_TINY)
    assert flops.matmul_params(tied) == flops.param_counts(tied)["total"] == _on_meta(tied).num_params()
    assert llmkern.models.get_config("pythia-70m", n_layer=2).n_layer == 2
    with pytest.raises(ValueError, match=r"unknown NeoXConfig field\(s\) \['qkv_bias'\]"):
        llmkern.models.get_config("pythia-70m", qkv_bias=True)
    with pytest.raises(ValueError, match="NeoXConfig.replace: unknown"):
        tied.replace(bias=False)
    with pytest.raises(AttributeError, match="NeoXConfig 'pythia-70m' .* no 'n_experts'"):  # (ModelConfig-only code)
        llmkern.models.get_config("pythia-70m").n_experts


@pytest.mark.parametrize("family", ["neox", "phi"])
def test_beam_search_matches_transformers(saved, family):
    """strategy="beam" through the KV cache (and without it) equals transformers' beam search, with an eos."""
    import warnings

    from llmkern.generation import generate

    path, hf = saved[family]
    m = load_hf(path)
    x = random_ids(V, 2, 6, seed=4)
    eos = int(generate(m, x, 6)[0, x.shape[1] + 3])  # (a token greedy decoding emits: eos paths run)
    kw = dict(num_beams=3, num_return_sequences=2, eos_token_id=eos, pad_token_id=PAD)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = generate(m, x, 8, strategy="beam", **kw)
        want = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False, **kw)
        assert torch.equal(ours, want), (ours, want)
        assert torch.equal(generate(m, x, 8, strategy="beam", use_cache=False, **kw), want)


def test_per_head_norms_are_named_for_tensor_parallelism():
    """Phi's q/k LayerNorms are named q_norm / k_norm (Qwen3's in the zoo), the names tensor_parallelize keeps
    replicated with their gradients summed over the ranks: named q_layernorm, each rank's gradient held its own
    heads' part only (measured on 2 gloo ranks: off by up to 0.017, the other parameters' gradients exact)."""
    import torch.nn as nn

    from llmkern.parallel.tensor_parallel import HEAD_NORM_NAMES

    attn = NeoX(_tiny(**PHI_TINY), backend="torch").layers[0].self_attn
    assert {n for n, c in attn.named_children() if isinstance(c, nn.LayerNorm)} == HEAD_NORM_NAMES


def test_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces the Phi block (GQA, q/k norms, shared norm, partial RoPE, tied head
    with a bias) with a padded batch: the loss equals eager."""
    cfg = _tiny(**PHI_TINY)
    model = NeoX(cfg, backend="torch")
    x = random_ids(cfg.vocab_size, 2, 8)
    am = torch.ones_like(x)
    am[0, :2] = 0
    labels = x.masked_fill(am == 0, -100)
    want = model(x, labels, attention_mask=am)[1]
    torch._dynamo.reset()
    got = torch.compile(model, fullgraph=True, backend="eager")(x, labels, attention_mask=am)[1]
    torch.testing.assert_close(got, want)
