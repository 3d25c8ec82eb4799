"""from_hf on DeepSeek-V3 checkpoints: the zoo's Llama with multi-head latent attention (MLA) and the aux-loss-free
sigmoid-routed MoE gives transformers' logits and loss on both backends, the same gradients on both, transformers'
greedy tokens through the KV cache (left padding too), and loads PEFT LoRA adapters saved on transformers' model.
Tiny random float32 DeepseekV3ForCausalLM checkpoints (save_pretrained, safetensors): 3 layers, the first dense;
8 experts in 2 groups of which 1 is kept, so the group limit matters; a nonzero e_score_correction_bias, so the
bias matters (test_each_deepseek_feature_matters checks both, and the RoPE layout and the YaRN softmax scale)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from llmkern import flops
from llmkern.models import Llama, from_hf, get_config
from llmkern.models._attn import attend
from llmkern.models.deepseek import sigmoid_group_route
from llmkern.testing import (TinyHFFamilies, assert_greedy_matches_transformers,
                             assert_logits_and_loss_match_transformers, assert_peft_lora_round_trip, edit_hf_config,
                             load_hf, random_ids)

transformers = pytest.importorskip("transformers")

V = 97
PAD = 5
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
              topk_group=1, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=16,
              qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=64, rms_norm_eps=1e-5,
              initializer_range=0.1)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0,
        "mscale_all_dim": 0.7, "rope_theta": 10000.0}
# variant -> (config class, model class, options)
FAMILIES = {
    # DeepSeek-V3 proper: q through a rank-24 bottleneck, interleaved RoPE, plain RoPE
    "v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(q_lora_rank=24)),
    # V2-Lite-style: one q_proj; YaRN (the softmax scale gets mscale_all_dim's correction); rotate-half RoPE;
    # no renormalisation of the routing weights
    "lite-yarn": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                  dict(q_lora_rank=None, rope_parameters=YARN, rope_interleave=False, norm_topk_prob=False,
                       routed_scaling_factor=1.5)),
}
HF = TinyHFFamilies(FAMILIES, COMMON, router_std=0.3)
TOL = dict(atol=2e-5, rtol=1e-5)

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)


def _save(path, family, seed=0, **changes):
    """HF.save with a random e_score_correction_bias (transformers initialises it to zeros), saved again."""
    hf = HF.save(path, family, seed, **changes)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> (checkpoint directory, transformers model)."""
    root = tmp_path_factory.mktemp("deepseek")
    return {f: (str(root / f), _save(root / f, f)) for f in FAMILIES}


def _ids(B=2, T=13, seed=0):
    return random_ids(V, B, T, seed)


# ---- config and counting ----------------------------------------------------------------------------

def test_config_fields_and_errors():
    c = get_config("deepseek-v3-tiny")
    assert (c.kv_lora_rank, c.q_lora_rank, c.head_dim, c.qk_nope_head_dim, c.rope_dim, c.v_head_dim) == \
        (16, 24, 24, 16, 8, 12)
    assert c.moe_router == "sigmoid" and c.moe_layers == (1, 2) and c.out_dim == 4 * 12
    assert get_config("llama-tiny").rope_dim == get_config("llama-tiny").head_dim
    for bad, match in ((dict(moe_n_group=3), "moe_n_group must be a positive divisor"),
                       (dict(moe_n_group=8), "leaving >= 2"),
                       (dict(moe_topk_group=5), "moe_topk_group must be an int in 1..moe_n_group=4"),
                       (dict(moe_topk_group=1, n_experts_per_tok=3), "exceeds the 2 experts"),
                       (dict(moe_routed_scaling=0), "moe_routed_scaling must be a number > 0"),
                       (dict(router_aux_loss_coef=0.01), "router_aux_loss_coef must be 0 with moe_router='sigmoid'"),
                       (dict(moe_router="greedy"), "moe_router must be"),
                       (dict(qk_rope_head_dim=7), "qk_rope_head_dim must be an even int"),
                       (dict(v_head_dim=300), "v_head_dim=300 must be at most 256"),
                       (dict(n_kv_head=2), "n_kv_head must equal n_head"),
                       (dict(qk_norm=True), "qk_norm is not supported with multi-head latent attention"),
                       (dict(sliding_window=4), "sliding_window is not supported"),
                       (dict(kv_lora_rank=0), "applies to multi-head latent attention only")):
        with pytest.raises(ValueError, match=match):
            get_config("deepseek-v3-tiny", **bad)
    with pytest.raises(ValueError, match="moe_n_group applies to the DeepSeek routers only"):
        get_config("mixtral-tiny", moe_n_group=2)
    with pytest.raises(ValueError, match="moe_router applies to mixture-of-experts models only"):
        get_config("llama-tiny", moe_router="sigmoid")
    with pytest.raises(ValueError, match="kv_lora_rank applies to arch='llama' only"):
        get_config("gpt-tiny", kv_lora_rank=8)


def test_deepseek_v3_parameter_counts():
    """The real sizes: transformers' DeepseekV3ForCausalLM (built on the meta device) has 671,026,404,352
    parameters without the multi-token-prediction layer; 37.6B are active per token (8 of 256 experts)."""
    p = flops.param_counts("deepseek-v3")
    assert p["total"] == 671_026_404_352
    L_moe, E, k, d, F_ = 58, 256, 8, 7168, 2048
    assert p["experts"] == L_moe * E * 3 * d * F_ and p["router"] == L_moe * E * d
    assert p["total"] - p["active"] == L_moe * (E - k) * 3 * d * F_ and round(p["active"] / 1e9, 1) == 37.6
    for tiny in (get_config("deepseek-v3-tiny"), get_config("deepseek-v3-tiny", q_lora_rank=None)):
        assert flops.param_counts(tiny)["total"] == Llama(tiny).num_params()


# ---- the pieces -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_attend_with_narrow_v_equals_sdpa(backend):
    """The zoo's attention with values narrower than q/k (Dv < D) equals SDPA; with left padding, and through
    a KV cache (its values' buffers Dv wide) for a decode step after a prefill."""
    from llmkern.models._attn import KVCache

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 7, 24, generator=g), torch.randn(2, 4, 7, 24, generator=g)
    v = torch.randn(2, 4, 7, 12, generator=g)
    kpm = torch.ones(2, 7, dtype=torch.bool)
    kpm[1, :2] = False
    mask = kpm[:, None, None, :] & torch.ones(7, 7, dtype=torch.bool).tril()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want[1, :, :2] = 0  # (queries with no visible key: zeros, as the zoo's attention returns them)
    got = attend(q, k, v, backend=backend, key_padding_mask=kpm)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    cache = KVCache(1, 2, 4, 16, 24)
    attend(q[:, :, :6], k[:, :, :6], v[:, :, :6], backend=backend, cache=cache, layer=0)
    cache.advance(6)
    last = attend(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], backend=backend, cache=cache, layer=0)
    assert cache.v[0].shape == (2, 4, 16, 12) and cache.k[0].shape == (2, 4, 16, 24)
    torch.testing.assert_close(last, F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, 6:],
                               atol=1e-5, rtol=1e-5)


def test_router_matches_transformers():
    """sigmoid_group_route equals transformers' DeepseekV3TopkRouter (weights and chosen experts) on random
    inputs, with the group limit and the bias in play."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = transformers.DeepseekV3Config(hidden_size=16, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                                        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)
    r = DeepseekV3TopkRouter(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        r.weight.copy_(torch.randn(8, 16, generator=g))
        r.e_score_correction_bias.copy_(torch.randn(8, generator=g) * 0.3)
    x = torch.randn(50, 16, generator=g)
    _, w_hf, ids_hf = r(x)
    w, ids = sigmoid_group_route(F.linear(x, r.weight), r.e_score_correction_bias, 3, 4, 2, True, 2.5)
    order_hf, order = ids_hf.sort(-1), ids.sort(-1)
    assert torch.equal(order.values, order_hf.values)
    torch.testing.assert_close(w.gather(1, order.indices), w_hf.gather(1, order_hf.indices))
    groups = ids // 2  # every token's experts lie in at most topk_group = 2 groups
    assert all(len(set(row.tolist())) <= 2 for row in groups)


# ---- from_hf ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_logits_and_loss_match_transformers(saved, family, backend):
    """Logits, the loss with labels (some ignored; plain cross-entropy: DeepSeek-V3 adds no aux loss), and the
    loss without the logits (llmkern: linear_cross_entropy) are transformers'; parameters counted right."""
    path, hf = saved[family]
    m = _load(path, backend)
    assert_logits_and_loss_match_transformers(m, hf, _ids(), **TOL)


def _load(path, backend="torch"):
    return load_hf(path, backend)


def test_configs_carry_the_deepseek_options(saved):
    v3, lite = (_load(saved[f][0]).config for f in FAMILIES)
    assert (v3.q_lora_rank, v3.rope_interleave, v3.attn_scale, v3.rope_scaling) == (24, True, None, None)
    assert (v3.moe_n_group, v3.moe_topk_group, v3.moe_routed_scaling, v3.moe_renormalize) == (2, 1, 2.5, True)
    assert (v3.moe_layers, v3.moe_shared_ffn_dim, v3.n_experts, v3.n_experts_per_tok) == ((1, 2), 32, 8, 2)
    assert lite.q_lora_rank is None and not lite.rope_interleave and lite.rope_scaling["rope_type"] == "yarn"
    mscale = 0.1 * 0.7 * torch.log(torch.tensor(4.0, dtype=torch.float64)).item() + 1
    assert lite.attn_scale == pytest.approx(24 ** -0.5 * mscale ** 2, rel=1e-12)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_deepseek_feature_matters(saved, family):
    """Without the group limit, without the selection bias, with the other RoPE layout, or (YaRN) without the
    mscale_all_dim softmax correction, the logits are far from transformers': the tests above see each."""
    path, hf = saved[family]
    m = _load(path)
    x = _ids()
    with torch.no_grad():
        want = hf(x).logits
    c = m.config
    off = [dict(moe_n_group=1, moe_topk_group=1), "no bias", dict(rope_interleave=not c.rope_interleave)]
    off += [dict(attn_scale=None)] if c.attn_scale is not None else []
    for changes in off:
        other = Llama(c if changes == "no bias" else c.replace(**changes), backend="torch").eval()
        state = m.state_dict()
        if changes == "no bias":
            state = {k: torch.zeros_like(t) if k.endswith("e_score_correction_bias") else t for k, t in state.items()}
        other.load_state_dict(state)
        with torch.no_grad():
            assert (other(x) - want).abs().max() > 1e-2, changes


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradients_flow_and_the_backends_agree(saved, family):
    """A training step's loss and gradients: backend "llmkern" (fused norms, RoPE, SwiGLU, llmkern.moe_mlp,
    attention, the loss) equals backend "torch"; every parameter gets a finite gradient."""
    path, _ = saved[family]
    x = _ids(seed=3)
    grads, losses = {}, {}
    for backend in ("torch", "llmkern"):
        m = _load(path, backend).train()
        _, loss = m(x, labels=x)
        loss.backward()
        losses[backend] = loss.detach()
        grads[backend] = {n: p.grad for n, p in m.named_parameters()}
    ref = grads["torch"]
    assert all(g is not None and torch.isfinite(g).all() for g in ref.values())
    assert ref["layers.1.mlp.gate.weight"].abs().max() > 0  # the router learns through the routing weights
    torch.testing.assert_close(losses["llmkern"], losses["torch"], **TOL)
    for n, g in grads["llmkern"].items():
        torch.testing.assert_close(g, ref[n], atol=1e-4, rtol=1e-4, msg=n)


@pytest.mark.parametrize("family, backend", [("v3", "llmkern"), ("lite-yarn", "torch")])
def test_greedy_generation_matches_transformers(saved, family, backend):
    """Greedy tokens through the KV cache (which holds k and the zero-padded v), unpadded and left padded, and
    left padded without the cache."""
    path, hf = saved[family]
    assert_greedy_matches_transformers(_load(path, backend), hf, _ids(T=7, seed=1), 6, PAD, no_cache=True)


def test_peft_lora_round_trip(saved, tmp_path):
    """A LoRA adapter PEFT saves on transformers' model (every MLA projection targeted) loads into the zoo with
    PEFT's logits, and saved back, PEFT reads it to the same."""
    pytest.importorskip("peft")
    # (attention only: PEFT turns any target named gate_proj / up_proj / down_proj on a DeepSeek-V3 model, however
    # qualified, into LoRA on the stacked experts' parameters too (target_parameters), which llmkern.peft refuses)
    targets = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    assert_peft_lora_round_trip(saved["v3"][0], tmp_path, _ids(), targets=targets, n_layers=3, **TOL)


def test_multi_token_prediction_layers_are_ignored(saved, tmp_path):
    """Weights of num_nextn_predict_layers MTP layers (stored as layer num_hidden_layers) are dropped with a
    warning, as transformers ignores them; a layer past those is refused."""
    from safetensors.torch import load_file, save_file

    path, hf = saved["v3"]
    state = load_file(f"{path}/model.safetensors")
    mtp = {k.replace("layers.2.", "layers.3."): v.clone() for k, v in state.items() if "layers.2." in k}
    mtp["model.layers.3.eh_proj.weight"] = torch.randn(64, 128)
    save_file({**state, **mtp}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(open(f"{path}/config.json").read())
    x = _ids()
    with pytest.warns(UserWarning, match="ignoring the 1 multi-token-prediction layer"):
        m = from_hf(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(m(x), hf(x).logits, **TOL)
    edit_hf_config(tmp_path, num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="beyond num_nextn_predict_layers=0"):
        from_hf(str(tmp_path))


@pytest.mark.parametrize("changes, match", [
    (dict(topk_method="greedy"), "topk_method='greedy' is not supported"),
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(moe_layer_freq=2), "moe_layer_freq"),
    (dict(quantization_config={"quant_method": "fp8"}), "quantization_config"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(num_key_value_heads=2), "num_key_value_heads=2"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(first_k_dense_replace=3), "first_k_dense_replace=3 leaves no MoE layer"),
    (dict(n_shared_experts=0), "n_shared_experts=0 must be an int >= 1"),
    (dict(n_group=3), "n_group=3 must divide n_routed_experts=8"),
    (dict(topk_group=3), "topk_group=3 must be <= n_group=2"),
    (dict(num_experts_per_tok=5), "keep num_experts_per_tok=5"),
    (dict(kv_lora_rank=None), "kv_lora_rank=None must be an int"),
    (dict(n_routed_experts=16), "missing expert weight"),
    # (a V3 config under V2's name: V2's softmax router would run, where the file asks for renormalised weights)
    (dict(model_type="deepseek_v2"), "deepseek_v2 config norm_topk_prob=True is not supported"),
])
def test_unsupported_configs_raise_naming_the_key(saved, tmp_path, changes, match):
    path, _ = saved["v3"]
    (tmp_path / "config.json").write_text(open(f"{path}/config.json").read())
    (tmp_path / "model.safetensors").symlink_to(f"{path}/model.safetensors")
    edit_hf_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_hf(str(tmp_path))


def test_router_stays_float32_when_the_model_is_cast(saved):
    """As transformers keeps gate.weight and e_score_correction_bias float32 (_keep_in_fp32_modules_strict), a
    model loaded or cast to bfloat16 keeps its routers float32 (values unrounded), and runs on both backends.
    (Logits are not compared in bf16: rounding noise can flip a near-tie routing choice either way.)"""
    path, _ = saved["v3"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = from_hf(path, backend="torch", dtype=torch.bfloat16)
    ref = _load(path)
    gate, want = m.layers[1].mlp.gate, ref.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.weight, want.weight) and torch.equal(gate.e_score_correction_bias,
                                                                 want.e_score_correction_bias)
    assert m.layers[1].mlp.experts.down_proj.dtype == m.layers[1].self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    x = _ids()
    for backend in ("torch", "llmkern"):
        m.backend = backend
        with torch.no_grad():
            out = m(x)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert m.float().layers[1].mlp.experts.down_proj.dtype == torch.float32

