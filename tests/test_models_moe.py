"""Sparse mixture-of-experts Llama (Mixtral, Qwen2-MoE, Qwen3-MoE): config validation, the llmkern and
torch backends against each other, from_hf against transformers (logits, greedy tokens, the load-balancing
loss), the MoE-aware parameter / FLOP counts, LoRA on an MoE model, and one case on the Triton kernels
(under the interpreter). Tiny random float32 models, saved with save_pretrained (safetensors)."""
import json
import os
import warnings

import pytest
import torch

from llmkern import flops
from llmkern.generation import generate
from llmkern.models import Llama, build, from_hf, get_config
from llmkern.models.llama import _experts_dense, _experts_loop, load_balancing_loss
from llmkern.testing import TinyHFFamilies, edit_hf_config, load_hf, random_ids

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)

V = 97
PAD = 5
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, num_experts_per_tok=2)
# family -> (config class, model class, options)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4)),
    # shared expert, no renormalization (norm_topk_prob False), layer 0 dense (mlp_only_layers)
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=40,
                       mlp_only_layers=[0])),
    # qk-norm, head_dim 24, renormalized top-3 of 5
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=5, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=True,
                       head_dim=24)),
}


HF = TinyHFFamilies(FAMILIES, COMMON, router_std=0.3)
_save, _load = HF.save, load_hf


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (checkpoint directory, transformers model)."""
    return HF.save_all(tmp_path_factory.mktemp("moe"))


def _ids(B=2, T=13, seed=0):
    return random_ids(V, B, T, seed)


# ---- config ---------------------------------------------------------------------------------------

def test_moe_config_defaults_and_errors():
    c = get_config("mixtral-tiny")
    assert (c.n_experts, c.n_experts_per_tok, c.moe_ffn_dim, c.moe_renormalize) == (4, 2, 96, True)
    assert c.layer_is_moe(0) and c.layer_is_moe(1) and c.router_aux_loss_coef == 0.0
    assert get_config("llama-tiny").n_experts == 0 and not get_config("llama-tiny").layer_is_moe(0)
    assert get_config("llama-tiny", n_experts=3).n_experts_per_tok == 2  # Mixtral's default top-2
    assert get_config("mixtral-tiny", moe_layers=[1, 1]).moe_layers == (1,)
    for bad, match in ((dict(n_experts=-1), "n_experts must be an int >= 0"),
                       (dict(n_experts=2.0), "n_experts must be"),
                       (dict(n_experts_per_tok=5), r"n_experts_per_tok must be an int in 1..n_experts=4"),
                       (dict(n_experts_per_tok=0), "n_experts_per_tok"),
                       (dict(moe_ffn_dim=0), "moe_ffn_dim must be a positive int"),
                       (dict(moe_shared_ffn_dim=-1), "moe_shared_ffn_dim"),
                       (dict(moe_renormalize="yes"), "moe_renormalize must be a bool"),
                       (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef must be a number >= 0"),
                       (dict(moe_layers=(2,)), r"moe_layers must list layer indices in 0..1")):
        with pytest.raises(ValueError, match=match):
            get_config("mixtral-tiny", **bad)
    # MoE fields on a dense model: refused, not ignored
    for field, value in (("n_experts_per_tok", 2), ("moe_ffn_dim", 32), ("router_aux_loss_coef", 0.01),
                         ("moe_layers", (0,)), ("moe_shared_ffn_dim", 8)):
        with pytest.raises(ValueError, match=f"{field} applies to mixture-of-experts models only"):
            get_config("llama-tiny", **{field: value})
    with pytest.raises(ValueError, match="n_experts applies to arch='llama' only"):
        get_config("gpt-tiny", n_experts=4)


# ---- the model ------------------------------------------------------------------------------------

def _grads(model, x, **kw):
    model.zero_grad(set_to_none=True)
    _, loss = model(x, labels=x, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("changes", [
    dict(router_aux_loss_coef=0.05),
    dict(n_experts=5, n_experts_per_tok=3, moe_renormalize=False, moe_shared_ffn_dim=24, moe_ffn_dim=40,
         moe_layers=(1,)),
    dict(moe_capacity_factor=0.75),  # pairs dropped (token dropping): the same on both backends
    dict(moe_capacity_factor=0.75, moe_drop_policy="position"),
], ids=["mixtral-aux", "qwen2moe-like", "capacity-probs", "capacity-position"])
def test_backends_agree_forward_and_backward(changes):
    """backend="llmkern" (llmkern.moe_mlp) and "torch" (the loop over experts): same loss (aux included)
    and gradients, every parameter's (router and experts too) reached; the model's parameters are
    param_counts' total."""
    cfg = get_config("mixtral-tiny", **changes)
    torch.manual_seed(0)
    ours = Llama(cfg, backend="llmkern")
    ref = Llama(cfg, backend="torch")
    ref.load_state_dict(ours.state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, 11))
    am = torch.ones_like(x)
    am[0, :3] = 0  # padding: not counted in the aux loss
    for kw in ({}, {"attention_mask": am}):
        l1, g1 = _grads(ours, x, **kw)
        l2, g2 = _grads(ref, x, **kw)
        torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
        assert g1.keys() == g2.keys() == {n for n, _ in ours.named_parameters()}
        for n in g1:
            torch.testing.assert_close(g1[n], g2[n], atol=1e-5, rtol=1e-4, msg=n)
    assert ours.num_params() == flops.param_counts(cfg)["total"]
    if cfg.router_aux_loss_coef:  # the aux loss is in the loss (and only with labels)
        off = Llama(cfg.replace(router_aux_loss_coef=0.0), backend="torch")
        off.load_state_dict(ours.state_dict())
        assert off(x, labels=x)[1] < ref(x, labels=x)[1]
        torch.testing.assert_close(off(x), ref(x))


def test_dense_expert_path_equals_the_loop():
    """The torch backend's static-shape form (used under torch.compile) equals its loop, dropped pairs too."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g)
    w_gu, w_d = torch.randn(4, 2 * 12, 16, generator=g) * 0.2, torch.randn(4, 16, 12, generator=g) * 0.2
    w, ids = torch.softmax(torch.randn(2, 5, 4, generator=g), -1).topk(2, -1)
    torch.testing.assert_close(_experts_dense(x, w_gu, w_d, ids, w), _experts_loop(x, w_gu, w_d, ids, w))
    ids = ids.clone()
    ids[0, 1, 0] = ids[1, 3, 1] = -1  # dropped (moe_capacity)
    torch.testing.assert_close(_experts_dense(x, w_gu, w_d, ids, w), _experts_loop(x, w_gu, w_d, ids, w))


def _capacity_loop(ids, w, E, C, policy):
    """moe_capacity written as a loop: per expert, its pairs in priority order, all past the first C dropped."""
    out = ids.clone()
    pairs = [(n, j) for n in range(ids.shape[0]) for j in range(ids.shape[1])]
    for e in range(E):
        mine = [p for p in pairs if ids[p] == e]
        if policy == "probs":
            mine.sort(key=lambda p: (-float(w[p]), p))
        for p in mine[C:]:
            out[p] = -1
    return out


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_moe_capacity_equals_a_loop(policy):
    """llmkern.moe_capacity: C = ceil(tokens * k / E * factor) pairs per expert (Megatron's rounding), by weight or by position, ties
    in (token, slot) order, pairs dropped before stay dropped; a large factor drops nothing."""
    import math

    import llmkern

    g = torch.Generator().manual_seed(1)
    for trial in range(40):
        N, E = int(torch.randint(1, 25, (), generator=g)), int(torch.randint(1, 8, (), generator=g))
        k = int(torch.randint(1, E + 1, (), generator=g))
        w, ids = torch.softmax(torch.randn(N, E, generator=g), -1).topk(k, -1)
        if trial % 3 == 0:
            w = (w * 4).round() / 4  # ties
        ids[torch.rand(N, k, generator=g) < 0.1] = -1
        factor = float(torch.rand((), generator=g)) * 1.5 + 0.05
        got = llmkern.moe_capacity(ids.view(N, 1, k), w.view(N, 1, k), E, factor, policy).view(N, k)
        assert torch.equal(got, _capacity_loop(ids, w, E, math.ceil(N * k / E * factor), policy)), trial
    assert torch.equal(llmkern.moe_capacity(ids, w, E, float(E), policy), ids)
    assert torch.equal(llmkern.moe_capacity(ids, w, E, 1e300, policy), ids)  # (huge: every pair fits)
    for bad, match in ((dict(capacity_factor=0.0), "capacity_factor"), (dict(policy="random"), "policy"),
                       (dict(n_experts=0), "n_experts")):
        kw = dict(topk_ids=ids, topk_weights=w, n_experts=E, capacity_factor=1.0, policy=policy) | bad
        with pytest.raises(ValueError, match=match):
            llmkern.moe_capacity(**kw)


def test_capacity_factor_in_the_zoo():
    """moe_capacity_factor drops the routed pairs past each expert's capacity (fewer expert rows computed: the
    output changes), a factor large enough for every pair changes nothing; DeepSeek's routers refuse it."""
    cfg = get_config("mixtral-tiny")
    torch.manual_seed(0)
    m = Llama(cfg, backend="torch")
    x = torch.randint(0, cfg.vocab_size, (2, 11))
    for factor, same in ((float(cfg.n_experts), True), (0.5, False)):
        dropped = Llama(cfg.replace(moe_capacity_factor=factor), backend="torch")
        dropped.load_state_dict(m.state_dict())
        with torch.no_grad():
            assert torch.allclose(dropped(x), m(x)) == same
    with pytest.raises(ValueError, match="moe_capacity_factor applies to the 'softmax' router only"):
        get_config("deepseek-v3-tiny", moe_capacity_factor=1.0)
    with pytest.raises(ValueError, match="moe_drop_policy"):
        get_config("mixtral-tiny", moe_drop_policy="random")
    with pytest.raises(ValueError, match="mixture-of-experts models only"):
        get_config("llama-tiny", moe_capacity_factor=1.0)


def test_lora_on_the_attention_of_an_moe_model():
    lp = pytest.importorskip("llmkern.peft")
    m = build("mixtral-tiny", backend="llmkern")
    lp.inject_lora(m, ["q_proj", "v_proj"], r=4, alpha=8)
    x = torch.randint(0, 256, (2, 9))
    _, loss = m(x, labels=x)
    loss.backward()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n and ("q_proj" in n or "v_proj" in n) for n in trainable)
    assert all(m.get_parameter(n).grad is not None for n in trainable)
    assert m.layers[0].mlp.experts.gate_up_proj.grad is None


def test_autocast_runs_the_experts_in_the_autocast_dtype():
    """Under autocast the stacked expert weights (not nn.Linear) are cast as nn.Linear's would be: both
    backends run, and agree."""
    torch.manual_seed(0)
    ours, ref = build("mixtral-tiny", backend="llmkern"), build("mixtral-tiny", backend="torch")
    ref.load_state_dict(ours.state_dict())
    x = torch.randint(0, 256, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ours(x), ref(x)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


# ---- from_hf --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_from_hf_logits_match_transformers(saved, family):
    path, hf = saved[family]
    x = _ids()
    with torch.no_grad():
        want = hf(x).logits
    for backend in ("torch", "llmkern"):
        m = _load(path, backend)
        with torch.no_grad():
            torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
    assert m.num_params() == hf.num_parameters() == flops.param_counts(m.config)["total"]
    c = m.config
    if family == "qwen2_moe":
        assert (c.moe_shared_ffn_dim, c.moe_renormalize, c.moe_layers, c.moe_ffn_dim) == (40, False, (1,), 32)
    elif family == "qwen3_moe":
        assert c.qk_norm and (c.n_experts, c.n_experts_per_tok, c.moe_renormalize) == (5, 3, True)


@pytest.mark.parametrize("backend", ["torch", "llmkern"])
def test_mixtral_greedy_generation_matches_transformers(saved, backend):
    """Greedy tokens through the KV cache, also left padded."""
    path, hf = saved["mixtral"]
    m = _load(path, backend)
    x = _ids(T=7, seed=1)
    am = torch.ones_like(x)
    am[1, :2] = 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                           pad_token_id=PAD)
        assert torch.equal(generate(m, x, 6), want)
        want = hf.generate(x, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
        assert torch.equal(generate(m, x, 6, attention_mask=am, pad_token_id=PAD), want)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_aux_loss_matches_transformers(tmp_path, family):
    """output_router_logits=True: transformers' loss is CE + router_aux_loss_coef * aux; from_hf takes the
    coefficient and the zoo's loss is the same, padding excluded; load_balancing_loss equals
    transformers' load_balancing_loss_func."""
    hf = _save(tmp_path, family, seed=2, output_router_logits=True, router_aux_loss_coef=0.25)
    m = _load(str(tmp_path))
    assert m.config.router_aux_loss_coef == 0.25
    x = _ids(T=9, seed=3)
    am = torch.ones_like(x)
    am[0, :3] = 0
    mod = __import__(f"transformers.models.{family}.modeling_{family}", fromlist=["load_balancing_loss_func"])
    for mask in (None, am):
        out = hf(x, labels=x, attention_mask=mask)
        want_aux = mod.load_balancing_loss_func(out.router_logits, m.config.n_experts, m.config.n_experts_per_tok, mask)
        torch.testing.assert_close(out.aux_loss, want_aux)
        got = load_balancing_loss(list(out.router_logits), m.config.n_experts_per_tok, mask)
        torch.testing.assert_close(got, want_aux, atol=1e-6, rtol=1e-6)
        # (transformers' CE over padded labels counts them: the same labels here)
        torch.testing.assert_close(m(x, labels=x, attention_mask=mask)[1], out.loss, atol=1e-5, rtol=1e-5)
    # without output_router_logits transformers adds nothing: neither does the loaded model
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["output_router_logits"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert _load(str(tmp_path)).config.router_aux_loss_coef == 0.0


@pytest.mark.parametrize("family, changes, match", [
    ("qwen2_moe", dict(use_sliding_window=True), "use_sliding_window"),
    ("mixtral", dict(num_experts_per_tok=5), "num_experts_per_tok"),
    ("mixtral", dict(num_local_experts=0), "num_local_experts"),
    ("mixtral", dict(num_local_experts=8), "missing expert weight"),
    ("qwen3_moe", dict(mlp_only_layers=[0, 1]), "no sparse layer"),
    ("qwen3_moe", dict(moe_intermediate_size=None), "moe_intermediate_size"),
])
def test_unsupported_moe_configs_raise_naming_the_key(tmp_path, family, changes, match):
    _save(tmp_path, family)
    edit_hf_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match):
        from_hf(str(tmp_path))


def test_mixtral_config_without_rope_theta_and_eps_takes_mixtrals_defaults(tmp_path, saved):
    """A config.json that leaves out rope_theta and rms_norm_eps gets MixtralConfig's defaults (1e6, 1e-5), not
    Llama's (10000, 1e-6): the same logits as transformers' model loaded from that file."""
    import shutil

    from transformers import AutoModelForCausalLM

    path, _ = saved["mixtral"]
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_theta", "rope_parameters", "rope_scaling", "rms_norm_eps"):
        cfg.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert (hf.config.rope_parameters["rope_theta"], hf.config.rms_norm_eps) == (1e6, 1e-5)
    m = _load(str(tmp_path))
    assert (m.config.rope_theta, m.config.norm_eps) == (1e6, 1e-5)
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(m(x), hf(x).logits, atol=1e-5, rtol=1e-5)


def test_stacked_checkpoint_layout_loads_too(tmp_path, saved):
    """A checkpoint holding transformers 5's in-memory names (experts stacked) loads as the per-expert one."""
    from safetensors.torch import save_file

    path, hf = saved["mixtral"]
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in hf.state_dict())
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(_load(str(tmp_path))(x), hf(x).logits, atol=1e-5, rtol=1e-5)


# ---- counting -------------------------------------------------------------------------------------

def test_mixtral_8x7b_parameter_and_flop_counts():
    """Mixtral 8x7B: 46.7B parameters, 12.9B active per token (2 of 8 experts); training FLOPs count the
    active ones."""
    p = flops.param_counts("mixtral-8x7b")
    assert p["total"] == 46_702_792_704  # transformers' num_parameters() of MixtralForCausalLM
    assert round(p["active"] / 1e9, 1) == 12.9 and round(p["total"] / 1e9, 1) == 46.7
    L, d, F = 32, 4096, 14336
    assert p["experts"] == L * 8 * 3 * d * F and p["router"] == L * d * 8
    assert p["total"] - p["active"] == L * 6 * 3 * d * F
    n = flops.matmul_params("mixtral-8x7b")
    assert n == p["active"] - 32000 * d  # the input embedding is a lookup
    assert flops.model_flops_per_token("mixtral-8x7b", 4096) == 6 * n + 6 * L * 4096 * d
    dense = flops.param_counts("llama-tiny")
    assert dense["active"] == dense["total"] and dense["router"] == dense["experts"] == 0
    shared = get_config("mixtral-tiny", moe_shared_ffn_dim=24, moe_layers=(0,))
    assert flops.param_counts(shared)["total"] == build(shared).num_params()


# ---- Triton -----------------------------------------------------------------------------------------

def test_mixtral_on_the_triton_kernels(saved, monkeypatch):
    """backend="llmkern" with LLMKERN_BACKEND=triton: llmkern.moe_mlp's Triton kernels (under the
    interpreter here) give transformers' logits, and the torch backend's gradients."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernels on CPU tensors under TRITON_INTERPRET=1")
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    path, hf = saved["mixtral"]
    m = _load(path, "llmkern")
    x = _ids(T=8, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(m(x), hf(x).logits, atol=1e-5, rtol=1e-5)
    m.train()
    ref = _load(path, "torch").train()
    l1, g1 = _grads(m, x)
    monkeypatch.delenv("LLMKERN_BACKEND")
    l2, g2 = _grads(ref, x)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    for n in ("layers.0.mlp.experts.gate_up_proj", "layers.1.mlp.experts.down_proj", "layers.0.mlp.gate.weight"):
        torch.testing.assert_close(g1[n], g2[n], atol=1e-5, rtol=1e-4, msg=n)


def test_moe_capacity_refuses_ids_past_n_experts():
    """Ids >= n_experts were taken as experts of their own while the capacity counted n_experts."""
    import llmkern

    ids = torch.tensor([[0, 3], [1, 2]])
    with pytest.raises(ValueError, match="topk_ids must be in"):
        llmkern.moe_capacity(ids, torch.ones(2, 2), n_experts=2, capacity_factor=1.0)


def test_moe_capacity_huge_finite_factor_keeps_every_pair():
    """tokens * k / E * factor overflowed to inf for a factor near float's maximum (ceil(inf) raised
    OverflowError) before the min with tokens * k was taken."""
    import llmkern

    ids, w = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1]]), torch.rand(4, 2)
    for factor in (1e300, 1e308, 1.7976931348623157e308):
        kept = llmkern.moe_capacity(ids, w, n_experts=3, capacity_factor=factor)
        assert torch.equal(kept, ids)
