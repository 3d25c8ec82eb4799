"""from_hf on DeepSeek-V2 checkpoints (model_type "deepseek_v2"): the zoo's Llama with multi-head latent attention and
DeepSeek-V2's softmax-routed MoE (moe_router "softmax_group") gives transformers' logits, loss, gradients and greedy
tokens, the latent KV cache gives the full cache's logits, and PEFT LoRA adapters carry over.

Tiny random float32 DeepseekV2ForCausalLM checkpoints (save_pretrained, safetensors): 3 layers, the first dense;
8 experts, top-2, 2 shared experts, routed_scaling_factor 2. Two variants:
- "group": topk_method "group_limited_greedy", n_group 2, topk_group 1 (the group limit matters: with groups
  scored by their best expert it can only when top-k > topk_group), q through a rank-24 bottleneck, plain RoPE;
- "lite": topk_method "greedy" with n_group / topk_group keys that transformers ignores (so must we), one q_proj
  (V2-Lite), YaRN (its mscale_all_dim softmax correction).
test_each_v2_feature_matters checks that the tests see each of those (and the interleaved RoPE, the scaling, the
absence of renormalisation)."""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from llmkern import flops
from llmkern.models import Llama, from_hf, get_config
from llmkern.models.deepseek import SoftmaxGroupRouter, softmax_group_route
from llmkern.testing import (TinyHFFamilies, assert_greedy_matches_transformers,
                             assert_logits_and_loss_match_transformers, assert_peft_lora_round_trip, edit_hf_config,
                             load_hf, random_ids)

transformers = pytest.importorskip("transformers")

V = 97
PAD = 5
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
              n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
              v_head_dim=12, max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.1,
              routed_scaling_factor=2.0)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0,
        "mscale_all_dim": 0.7, "rope_theta": 10000.0}
FAMILIES = {  # variant -> (config class, model class, options)
    "group": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
              dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=2, topk_group=1)),
    "lite": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
             dict(q_lora_rank=None, topk_method="greedy", n_group=4, topk_group=1, rope_parameters=YARN)),
}
HF = TinyHFFamilies(FAMILIES, COMMON, router_std=0.3)
TOL = dict(atol=2e-5, rtol=1e-5)

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> (checkpoint directory, transformers model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HF.save_all(tmp_path_factory.mktemp("deepseek_v2"))


def _ids(B=2, T=13, seed=0):
    return random_ids(V, B, T, seed)


# ---- config and counting ----------------------------------------------------------------------------

def test_config_fields_and_errors():
    c = get_config("deepseek-v2-tiny")
    assert (c.moe_router, c.moe_n_group, c.moe_topk_group, c.moe_routed_scaling, c.moe_renormalize) == \
        ("softmax_group", 2, 1, 2.0, False)
    assert (c.kv_lora_rank, c.q_lora_rank, c.head_dim, c.rope_dim, c.v_head_dim, c.rope_interleave) == \
        (16, None, 24, 8, 12, True)
    assert c.deepseek_moe and get_config("deepseek-v3-tiny").deepseek_moe
    assert not get_config("mixtral-tiny").deepseek_moe
    assert c.moe_layers == (1, 2) and c.moe_shared_ffn_dim == 64
    get_config("deepseek-v2-tiny", moe_n_group=8, moe_topk_group=2)  # groups of one expert: fine for the softmax
    for bad, match in ((dict(moe_n_group=3), "moe_n_group must be a positive divisor of n_experts=8, got 3"),
                       (dict(moe_topk_group=3), "moe_topk_group must be an int in 1..moe_n_group=2"),
                       (dict(n_experts_per_tok=5), "exceeds the 4 experts"),
                       (dict(moe_routed_scaling=-1.0), "moe_routed_scaling must be a number > 0"),
                       (dict(router_aux_loss_coef=0.01),
                        "router_aux_loss_coef must be 0 with moe_router='softmax_group'"),
                       (dict(moe_router="group_limited_greedy"), "moe_router must be one of")):
        with pytest.raises(ValueError, match=match):
            get_config("deepseek-v2-tiny", **bad)
    with pytest.raises(ValueError, match="leaving >= 2"):  # (the sigmoid router's groups rank by their top-2)
        get_config("deepseek-v2-tiny", moe_router="sigmoid", moe_n_group=8)
    with pytest.raises(ValueError, match="moe_topk_group applies to the DeepSeek routers only"):
        get_config("mixtral-tiny", moe_topk_group=2)
    with pytest.raises(ValueError, match="needs config.moe_router in"):
        from llmkern.models.deepseek import DeepseekMoE

        DeepseekMoE(get_config("mixtral-tiny"))


def test_deepseek_v2_lite_parameter_counts():
    """deepseek-v2-lite's count equals transformers' DeepseekV2ForCausalLM of DeepSeek-V2-Lite's config.json (built
    on the meta device): 15.7B parameters, 2.7B active per token (6 of 64 experts); the tiny presets' equal their
    Llama's."""
    cfg = transformers.DeepseekV2Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64, kv_lora_rank=512,
        q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="greedy",
        num_experts_per_tok=6, first_k_dense_replace=1)
    with torch.device("meta"):
        n = transformers.DeepseekV2ForCausalLM(cfg).num_parameters()
    p = flops.param_counts("deepseek-v2-lite")
    assert p["total"] == n == 15_706_484_224
    L_moe, E, k, d, F_ = 26, 64, 6, 2048, 1408
    assert p["total"] - p["active"] == L_moe * (E - k) * 3 * d * F_ and round(p["active"] / 1e9, 1) == 2.7
    for tiny in (get_config("deepseek-v2-tiny"), get_config("deepseek-v2-tiny", q_lora_rank=24)):
        assert flops.param_counts(tiny)["total"] == Llama(tiny).num_params()


# ---- the router ---------------------------------------------------------------------------------------

def _route_by_hand(logits, k, G, Gk, renormalize, scaling):
    """The V2 router's formula, one token at a time in float64: p = softmax; a group scores its max p; the kept
    groups are Gk best ones (with tied group scores, any of the tied groups: every such choice is listed); the
    other groups' p count as 0; the chosen k are the largest of those. Returns per token {kept groups: sorted
    expected weights} over the valid choices, and p."""
    out = []
    for row in logits.double():
        p = row.softmax(-1)
        gs = p.view(G, -1).max(-1).values
        best = gs.sort(descending=True).values[:Gk]
        choices = {}
        for kept in itertools.combinations(range(G), Gk):
            if not torch.equal(gs[list(kept)].sort(descending=True).values, best):
                continue
            allowed = torch.zeros(G, dtype=torch.bool)
            allowed[list(kept)] = True
            top = p.masked_fill(~allowed.repeat_interleave(p.numel() // G), 0.0).sort(descending=True).values[:k]
            choices[kept] = (top / (top.sum() + 1e-20) if renormalize else top) * scaling
        out.append((choices, p))
    return out


@pytest.mark.parametrize("G, Gk, k, renormalize", [(1, 1, 3, False), (4, 2, 3, False), (4, 1, 2, True),
                                                   (8, 3, 3, False)])
def test_router_equals_the_formula_with_ties(G, Gk, k, renormalize):
    """softmax_group_route against the formula written out per token, on random logits and on rows with ties
    (equal experts, equal group maxima): the ids are distinct and lie in Gk best-scoring groups (one valid choice
    among tied groups), the weights are the formula's for that choice, and (not renormalised) each chosen id's
    weight is its p times the scale."""
    E, scaling = 8, 2.5
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, E, generator=g)
    ties = torch.tensor([[1.0, 1.0, 0.0, 0.0, 2.0, 2.0, -1.0, -1.0],    # tied pairs, tied within groups
                         [3.0, 0.0, 0.0, 3.0, 3.0, 0.0, 0.0, 3.0],      # every group's max ties
                         [0.5] * 8,                                    # all equal
                         [2.0, -1.0, 1.0, 2.0, -3.0, 2.0, 0.0, 0.0]])   # three tied best experts in 3 groups
    logits = torch.cat([logits, ties])
    w, ids = softmax_group_route(logits, k, G, Gk, renormalize, scaling)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64 and w.shape == ids.shape == (44, k)
    n_tied = 0
    for t, (choices, p) in enumerate(_route_by_hand(logits, k, G, Gk, renormalize, scaling)):
        row = ids[t].tolist()
        assert len(set(row)) == k
        n_tied += len(choices) > 1
        fits = [kept for kept in choices if {e // (E // G) for e in row} <= set(kept)]
        assert fits, (t, row, list(choices))
        torch.testing.assert_close(w[t].double().sort(descending=True).values, choices[fits[0]], atol=1e-6,
                                   rtol=1e-6)
        if not renormalize:
            torch.testing.assert_close(w[t].double(), p[ids[t]] * scaling, atol=1e-6, rtol=1e-6)
    assert n_tied >= (1 if G > Gk else 0)  # (the tie rows do tie groups)


def test_router_matches_transformers():
    """softmax_group_route equals transformers' DeepseekV2TopkRouter (weights and ids, position for position: the
    same top-k calls) for both topk_methods, and SoftmaxGroupRouter runs it on [B, T, d] inputs."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 16, generator=g)
    for method, (G, Gk) in (("greedy", (1, 1)), ("group_limited_greedy", (4, 2))):
        cfg = transformers.DeepseekV2Config(hidden_size=16, num_attention_heads=4, n_routed_experts=8,
                                            num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                                            topk_method=method)
        r = DeepseekV2TopkRouter(cfg)
        with torch.no_grad():
            r.weight.copy_(torch.randn(8, 16, generator=g))
        _, w_hf, ids_hf = r(x)
        w, ids = softmax_group_route(F.linear(x, r.weight), 3, G, Gk, False, 2.5)
        assert torch.equal(ids, ids_hf), method
        torch.testing.assert_close(w, w_hf, atol=0, rtol=0)
        zoo = SoftmaxGroupRouter(get_config("deepseek-v2-tiny", n_embd=16, n_experts_per_tok=3, moe_n_group=G,
                                            moe_topk_group=Gk, moe_routed_scaling=2.5))
        with torch.no_grad():
            zoo.weight.copy_(r.weight)
        w3, ids3 = zoo(x.view(6, 10, 16))
        assert w3.shape == (6, 10, 3) and torch.equal(ids3.reshape(60, 3), ids_hf)
        torch.testing.assert_close(w3.reshape(60, 3), w_hf, atol=0, rtol=0)


# ---- from_hf ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_logits_and_loss_match_transformers(saved, family, backend):
    """Logits, the loss with labels (some ignored; no aux loss, as transformers), and the loss without the logits
    (llmkern: linear_cross_entropy) are transformers'; parameters counted right."""
    path, hf = saved[family]
    m = load_hf(path, backend)
    assert_logits_and_loss_match_transformers(m, hf, _ids(), **TOL)


def test_triton_interpreter_logits(saved, triton_backend):
    """backend "llmkern" through the Triton kernels (the interpreter on a CPU): transformers' logits."""
    path, hf = saved["group"]
    x = _ids(T=6)
    with torch.no_grad():
        torch.testing.assert_close(load_hf(path, "llmkern")(x), hf(x).logits, atol=1e-4, rtol=1e-4)


def test_configs_carry_the_v2_options(saved):
    group, lite = (load_hf(saved[f][0]).config for f in FAMILIES)
    assert (group.moe_router, group.moe_n_group, group.moe_topk_group, group.moe_renormalize) == \
        ("softmax_group", 2, 1, False)
    assert (group.moe_routed_scaling, group.moe_layers, group.moe_shared_ffn_dim, group.q_lora_rank) == \
        (2.0, (1, 2), 64, 24)
    assert group.rope_interleave and group.attn_scale is None and group.rope_scaling is None
    # greedy: n_group / topk_group of the file are ignored, as transformers ignores them
    assert (lite.moe_router, lite.moe_n_group, lite.moe_topk_group, lite.q_lora_rank) == ("softmax_group", 1, 1, None)
    mscale = 0.1 * 0.7 * torch.log(torch.tensor(4.0, dtype=torch.float64)).item() + 1
    assert lite.rope_scaling["rope_type"] == "yarn" and lite.attn_scale == pytest.approx(24 ** -0.5 * mscale ** 2)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_v2_feature_matters(saved, family):
    """Without the group limit (or, greedy, with the file's ignored one), with renormalised weights, without the
    scale, with rotate-half RoPE, or (YaRN) without the mscale_all_dim correction, the logits are far from
    transformers': the tests above see each."""
    path, hf = saved[family]
    m = load_hf(path)
    x = _ids()
    with torch.no_grad():
        want = hf(x).logits
    c = m.config
    off = [dict(moe_n_group=1, moe_topk_group=1) if family == "group" else dict(moe_n_group=4, moe_topk_group=1),
           dict(moe_renormalize=True), dict(moe_routed_scaling=1.0), dict(rope_interleave=False)]
    off += [dict(attn_scale=None)] if c.attn_scale is not None else []
    for changes in off:
        other = Llama(c.replace(**changes), backend="torch").eval()
        other.load_state_dict(m.state_dict())
        with torch.no_grad():
            assert (other(x) - want).abs().max() > 1e-2, changes


def test_gradients_match_transformers(saved):
    """A training step's loss and every parameter's gradient equal transformers' (the router's included: it learns
    through the routing weights), on both backends."""
    path, hf = saved["group"]
    x = _ids(seed=3)
    hf.zero_grad()
    want = hf.train()(x, labels=x).loss
    want.backward()
    hf.eval()
    ref = {n.removeprefix("model."): p.grad for n, p in hf.named_parameters()}
    assert ref["layers.1.mlp.gate.weight"].abs().max() > 0
    for backend in ("torch", "llmkern"):
        m = load_hf(path, backend).train()
        _, loss = m(x, labels=x)
        loss.backward()
        torch.testing.assert_close(loss, want, **TOL)
        grads = {n: p.grad for n, p in m.named_parameters()}
        assert grads.keys() == ref.keys()
        for n, g in grads.items():
            torch.testing.assert_close(g, ref[n], atol=1e-4, rtol=1e-4, msg=f"{backend}: {n}")
    hf.zero_grad()


@pytest.mark.parametrize("family, backend", [("group", "llmkern"), ("lite", "torch")])
def test_greedy_generation_matches_transformers(saved, family, backend):
    """Greedy tokens through the KV cache, unpadded and left padded, and left padded without the cache."""
    path, hf = saved[family]
    assert_greedy_matches_transformers(load_hf(path, backend), hf, _ids(T=7, seed=1), 6, PAD, no_cache=True)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_latent_cache_equals_full_cache(saved, family):
    """new_cache(latent=True) (kv_b_proj absorbed; backend llmkern: llmkern.mla_decode, its reference on a CPU)
    gives the full cache's logits for a prompt, single-token steps and a two-token chunk, and no cache's."""
    path, hf = saved[family]
    m = load_hf(path, "llmkern")
    x = _ids(T=10, seed=2)
    out = {}
    with torch.no_grad():
        for latent in (False, True):
            cache = m.new_cache(2, 16, latent=latent)
            steps = [m(x[:, :5], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(5, 8)]
            out[latent] = torch.cat(steps + [m(x[:, 8:], cache=cache)], 1)
            assert getattr(cache, "latent", False) == latent
        torch.testing.assert_close(out[True], out[False], **TOL)
        torch.testing.assert_close(out[True], hf(x).logits, **TOL)


def test_peft_lora_round_trip(saved, tmp_path):
    """A LoRA adapter PEFT saves on transformers' V2-Lite-style model (every MLA projection targeted: q_proj
    without the q bottleneck) loads into the zoo with PEFT's logits, and saved back, PEFT reads it to the same."""
    pytest.importorskip("peft")
    targets = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]  # (attention only: see the V3 test)
    assert_peft_lora_round_trip(saved["lite"][0], tmp_path, _ids(), targets=targets, n_layers=3, **TOL)


def test_router_stays_float32_when_the_model_is_cast(saved):
    """As transformers keeps gate.weight float32 (_keep_in_fp32_modules_strict), a bf16 model's routers stay
    float32 with the checkpoint's values."""
    path, _ = saved["group"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = from_hf(path, backend="torch", dtype=torch.bfloat16)
    gate = m.layers[1].mlp.gate
    assert type(gate) is SoftmaxGroupRouter and gate.weight.dtype == torch.float32
    assert torch.equal(gate.weight, load_hf(path).layers[1].mlp.gate.weight)
    assert m.layers[1].mlp.experts.down_proj.dtype == torch.bfloat16
    with torch.no_grad():
        out = m(_ids())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("family, changes, match", [
    ("lite", dict(topk_method="noaux_tc"), "topk_method='noaux_tc' is not supported"),
    ("lite", dict(topk_method=None), "topk_method=None is not supported"),
    ("lite", dict(scoring_func="sigmoid"), "scoring_func='sigmoid' is not supported"),
    ("lite", dict(moe_layer_freq=2), "moe_layer_freq=2"),
    ("lite", dict(norm_topk_prob=True), "norm_topk_prob=True is not supported.*never renormalises"),
    ("lite", dict(rope_interleave=False), "rope_interleave=False is not supported"),
    ("lite", dict(quantization_config={"quant_method": "fp8"}), "quantization_config"),
    ("lite", dict(attention_bias=True), "attention_bias=True"),
    ("lite", dict(mlp_bias=True), "mlp_bias=True"),
    ("lite", dict(num_key_value_heads=2), "num_key_value_heads=2"),
    ("lite", dict(hidden_act="gelu"), "hidden_act"),
    ("lite", dict(first_k_dense_replace=3), "first_k_dense_replace=3 leaves no MoE layer"),
    ("lite", dict(n_shared_experts=0), "n_shared_experts=0 must be an int >= 1"),
    ("lite", dict(num_experts_per_tok=None), "num_experts_per_tok=None must be an int"),
    ("lite", dict(n_routed_experts=16), "missing expert weight"),
    ("group", dict(n_group=3), "deepseek_v2 config n_group=3 must divide n_routed_experts=8"),
    ("group", dict(n_group=None), "n_group=None must be an int"),
    ("group", dict(topk_group=3), "topk_group=3 must be <= n_group=2"),
    ("group", dict(num_experts_per_tok=5), "keep num_experts_per_tok=5"),
])
def test_unsupported_configs_raise_naming_the_key(saved, tmp_path, family, changes, match):
    path, _ = saved[family]
    (tmp_path / "config.json").write_text(open(f"{path}/config.json").read())
    (tmp_path / "model.safetensors").symlink_to(f"{path}/model.safetensors")
    edit_hf_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_hf(str(tmp_path))
