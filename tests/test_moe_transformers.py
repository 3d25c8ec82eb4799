"""experts_implementation="llmkern" in Hugging Face transformers: tiny random Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE, DeepSeek-V3 (routed experts), Aria (transposed expert weights, passed as views), Gemma-4 (GeGLU
experts) and Mixtral with exact-gelu experts (hidden_act="gelu" -> "geglu_exact") give eager's logits and
gradients in training mode on a padded batch, on the reference path and on the Triton kernels (the
interpreter on CPU); greedy generation with a cache gives eager's tokens; from_pretrained(...,
experts_implementation="llmkern") works; an expert-parallel rank's experts (sentinel ids) give transformers'
batched_mm; layouts llmkern.moe_mlp does not take (gpt-oss, biases, post-expert norms, other activations,
...) raise NotImplementedError."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
moe = pytest.importorskip("transformers.integrations.moe")
if not hasattr(moe, "ExpertsInterface"):
    pytest.skip("this transformers has no ExpertsInterface", allow_module_level=True)

import llmkern  # noqa: E402
import llmkern.integrations.transformers as lt  # noqa: E402
from llmkern.testing import triton_device  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning")]  # (tiny configs: transformers' hints)
DEV = triton_device() or "cpu"
T = transformers
COMMON = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, vocab_size=64,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    lt.register()


@pytest.fixture
def triton_backend(monkeypatch):
    if triton_device() is None:
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")


@pytest.fixture
def moe_calls(monkeypatch):
    """The (w_gate_up, w_down, activation) of every llmkern.moe_mlp call: proof that the op ran."""
    calls, real = [], llmkern.moe_mlp

    def spy(x, w_gate_up, w_down, ids, weights, activation="swiglu"):
        calls.append((w_gate_up, w_down, activation))
        return real(x, w_gate_up, w_down, ids, weights, activation)

    monkeypatch.setattr(llmkern, "moe_mlp", spy)
    return calls


def _config(kind):
    if kind == "mixtral":
        return T.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    if kind == "mixtral_exact_gelu":  # transformers' "gelu" (GELUActivation: F.gelu, erf) -> geglu_exact
        return T.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                               hidden_act="gelu")
    if kind == "qwen2_moe":  # + a shared expert, top-k weights not renormalized
        return T.Qwen2MoeConfig(**COMMON, intermediate_size=24, moe_intermediate_size=20, num_experts=4,
                                num_experts_per_tok=2, shared_expert_intermediate_size=16)
    if kind == "qwen3_moe":
        return T.Qwen3MoeConfig(**COMMON, head_dim=8, intermediate_size=24, moe_intermediate_size=20,
                                num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
    if kind == "olmoe":
        return T.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=4, num_experts_per_tok=2)
    if kind == "deepseek_v3":  # MLA attention (key heads = query heads), a dense first layer, grouped routing
        return T.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=24,
                                  moe_intermediate_size=20, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                                  topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
                                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    if kind == "aria":  # expert weights stored transposed: [E, d, 2F] / [E, F, d]
        return T.AriaTextConfig(**COMMON, intermediate_size=24, moe_num_experts=4, moe_topk=2,
                                moe_num_shared_experts=1)
    if kind == "gemma4":  # gelu_pytorch_tanh experts -> geglu
        return T.Gemma4TextConfig(**COMMON, head_dim=8, global_head_dim=8, intermediate_size=24, enable_moe_block=True,
                                  num_experts=4, top_k_experts=2, moe_intermediate_size=20,
                                  vocab_size_per_layer_input=64, hidden_size_per_layer_input=8,
                                  layer_types=["sliding_attention", "full_attention"])
    raise ValueError(kind)


_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
            "olmoe": "OlmoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM", "aria": "AriaTextForCausalLM",
            "gemma4": "Gemma4ForCausalLM", "mixtral_exact_gelu": "MixtralForCausalLM"}
N_MOE_LAYERS = {"deepseek_v3": 1}  # (the others: every layer)
ACTIVATION = {"gemma4": "geglu", "mixtral_exact_gelu": "geglu_exact"}


def _model(kind):
    cls = getattr(T, _CLASSES[kind], None)
    if cls is None:
        pytest.skip(f"this transformers has no {_CLASSES[kind]}")
    torch.manual_seed(0)
    return cls(_config(kind)).to(DEV).float()


def _batch(n=2, length=9):
    ids = torch.randint(3, 64, (n, length), device=DEV)
    am = torch.ones(n, length, dtype=torch.long, device=DEV)
    am[0, :3] = 0          # left padding
    am[-1, length - 2:] = 0  # right padding
    return ids, am


def _logits_and_grads(model, impl, ids, am):
    model.set_experts_implementation(impl)
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=am).logits
    (logits * am[..., None]).square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_same_as_eager(kind, moe_calls, tol):
    model = _model(kind).train()
    ids, am = _batch()
    le, ge = _logits_and_grads(model, "eager", ids, am)
    assert not moe_calls
    lk, gk = _logits_and_grads(model, "llmkern", ids, am)
    assert len(moe_calls) == N_MOE_LAYERS.get(kind, 2)
    assert {c[2] for c in moe_calls} == {ACTIVATION.get(kind, "swiglu")}
    torch.testing.assert_close(lk, le, **tol)
    assert set(gk) == set(ge) and any("experts" in n for n in gk)
    for n in ge:
        torch.testing.assert_close(gk[n], ge[n], msg=n, **tol)


KINDS = list(_CLASSES)


@pytest.mark.parametrize("kind", KINDS)
def test_same_logits_and_grads_as_eager(kind, moe_calls):
    """Default backend (the PyTorch reference on CPU, the Triton kernels on CUDA)."""
    _check_same_as_eager(kind, moe_calls, dict(atol=1e-5, rtol=1e-4))


@pytest.mark.parametrize("kind", KINDS)
def test_same_logits_and_grads_triton(triton_backend, kind, moe_calls):
    _check_same_as_eager(kind, moe_calls, dict(atol=1e-4, rtol=1e-3))


def test_transposed_weights_are_views(moe_calls):
    """Aria's [E, d, 2F] / [E, F, d] weights reach the op as transpose views of the parameters, not copies."""
    model = _model("aria").eval()
    model.set_experts_implementation("llmkern")
    with torch.no_grad():
        model(input_ids=_batch(1, 5)[0])
    experts = model.model.layers[0].mlp.experts
    wgu, wd, _ = moe_calls[0]
    assert wgu.shape == (4, 48, 32) and wd.shape == (4, 32, 24)
    assert wgu.data_ptr() == experts.gate_up_proj.data_ptr() and wd.data_ptr() == experts.down_proj.data_ptr()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_generate_with_cache(kind):
    model = _model(kind).eval()
    ids = torch.randint(3, 64, (2, 8), device=DEV)
    am = torch.ones(2, 8, dtype=torch.long, device=DEV)
    am[0, :3] = 0
    out = {}
    for impl in ("eager", "llmkern"):
        model.set_experts_implementation(impl)
        out[impl] = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(out["eager"], out["llmkern"])


def test_from_pretrained_with_experts_implementation(tmp_path, moe_calls):
    _model("olmoe").save_pretrained(tmp_path)
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="llmkern").to(DEV)
    assert model.config._experts_implementation == "llmkern"
    with torch.no_grad():
        model(input_ids=_batch(1, 5)[0])
    assert len(moe_calls) == 2


def test_register_is_idempotent_and_keeps_attention():
    from transformers import AttentionInterface

    assert lt.register() == lt.register() == "llmkern"
    assert moe.ALL_EXPERTS_FUNCTIONS["llmkern"] is lt.llmkern_experts_forward
    assert "llmkern" in AttentionInterface._global_mapping


def test_autocast_casts_like_eager():
    """Under autocast the experts run in the autocast dtype, as eager's F.linear does, and return the
    input's dtype (float32 here)."""
    model = _model("mixtral").eval()
    x = torch.randn(1, 6, 32, device=DEV)
    out = {}
    for impl in ("eager", "llmkern"):
        model.set_experts_implementation(impl)
        with torch.no_grad(), torch.autocast(DEV, dtype=torch.bfloat16):
            out[impl] = model.model.layers[0].mlp(x)
    assert out["llmkern"].dtype == out["eager"].dtype == torch.float32
    torch.testing.assert_close(out["llmkern"], out["eager"], atol=2e-2, rtol=2e-2)


def test_compiles_without_graph_breaks():
    """The experts forward (layout checks included) traces under torch.compile(fullgraph=True): on CPU the
    op's reference takes its static-shape form there, on CUDA the kernels are one custom-op node."""
    model = _model("mixtral").eval()
    model.set_experts_implementation("llmkern")
    block = model.model.layers[0].mlp
    x = torch.randn(1, 6, 32, device=DEV)
    with torch.no_grad():
        want = block(x)
        got = torch.compile(block, fullgraph=True)(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_activation_names():
    """act_fn -> the op's activation, by the function it computes: exact erf gelu in any spelling is
    "geglu_exact", the tanh forms "geglu", a clipped gelu nothing."""
    from transformers.activations import ACT2FN

    from llmkern.integrations.transformers.moe import _activation_name

    want = {"gelu": "geglu_exact", "gelu_python": "geglu_exact", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu",
            "silu": "swiglu", "gelu_10": None, "quick_gelu": None}
    assert {name: _activation_name(ACT2FN[name]) for name in want} == want
    assert _activation_name(torch.nn.GELU()) == _activation_name(torch.nn.functional.gelu) == "geglu_exact"
    assert _activation_name(torch.nn.GELU(approximate="tanh")) == "geglu"


def _expert_parallel_rank(model, rank, ep_size):
    """Layer 0's experts as rank `rank` of `ep_size` holds them under transformers' expert parallelism
    (MoEParamShard): its slice of the experts, num_experts the local count, _is_expert_parallel set."""
    experts = model.model.layers[0].mlp.experts
    n = experts.num_experts // ep_size
    for name in ("gate_up_proj", "down_proj"):
        local = getattr(experts, name)[rank * n:(rank + 1) * n].detach().clone()
        setattr(experts, name, torch.nn.Parameter(local))
    experts.num_experts, experts._is_expert_parallel = n, True
    return experts


@pytest.mark.parametrize("ep_size", [2, 4])
@pytest.mark.parametrize("backend", ["default", "triton"])
def test_expert_parallel_sentinel_ids(backend, ep_size, request, moe_calls):
    """Under expert parallelism a rank's experts get local ids, the other ranks' slots as the sentinel
    num_experts (AllReduceEP). They become the op's -1: output and gradients (experts, input, routing
    weights; a sentinel slot's weight gradient 0) are transformers' own EP-aware batched_mm's, with
    nonzero weights at the sentinels (batched_mm masks them too). ep_size 4: one local expert for k = 2."""
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    model = _model("mixtral")
    experts = _expert_parallel_rank(model, rank=1, ep_size=ep_size)
    n = 4 // ep_size
    torch.manual_seed(1)
    x = torch.randn(7, 32, device=DEV)
    ids = torch.randint(0, 4, (7, 2), device=DEV)
    ids[0] = n + torch.arange(2, device=DEV) % n  # a token with both slots on this rank (experts n.. 2n-1)
    off_rank = ids // n != 1
    local = torch.where(off_rank, n, ids % n)
    assert off_rank.any() and not off_rank.all()
    tw = torch.rand(7, 2, device=DEV) + 0.1
    out = {}
    for impl in ("batched_mm", "llmkern"):
        model.set_experts_implementation(impl)
        leaves = [x.clone().requires_grad_(), tw.clone().requires_grad_()]
        y = experts(leaves[0], local, leaves[1])
        out[impl] = (y,) + torch.autograd.grad(y.square().sum(), leaves + [experts.gate_up_proj, experts.down_proj])
    assert len(moe_calls) == 1
    for name, a, b in zip(("y", "dx", "dtopk_weights", "dgate_up", "ddown"), out["llmkern"], out["batched_mm"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    assert not out["llmkern"][2][off_rank].any() and out["llmkern"][2][~off_rank].all()


# ---- refusals -----------------------------------------------------------------------------------------

def test_gpt_oss_is_refused():
    if not hasattr(T, "GptOssForCausalLM"):
        pytest.skip("this transformers has no gpt-oss")
    cfg = T.GptOssConfig(**COMMON, head_dim=8, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    model = T.GptOssForCausalLM(cfg).to(DEV)
    model.set_experts_implementation("llmkern")
    with pytest.raises(NotImplementedError, match="GptOssExperts") as err:
        model(input_ids=_batch(1, 4)[0])
    for part in ("is_concatenated=False", "has_bias=True", "_apply_gate", 'experts_implementation="grouped_mm"'):
        assert part in str(err.value)


@pytest.mark.parametrize("flag, value, words", [
    ("is_concatenated", False, "interleaved"),
    ("has_bias", True, "biases"),
    ("has_post_expert_norm", True, "post-expert norm"),
    ("has_gate", False, "ungated"),
])
def test_unsupported_layout_flags_are_refused(flag, value, words):
    model = _model("mixtral")
    model.set_experts_implementation("llmkern")
    setattr(model.model.layers[0].mlp.experts, flag, value)
    with pytest.raises(NotImplementedError, match=words):
        model(input_ids=_batch(1, 4)[0])


@pytest.mark.parametrize("act, words", [("gelu_10", "ClippedGELUActivation"), ("relu", "ReLU")])
def test_unsupported_activations_are_refused(act, words):
    cfg = _config("mixtral")
    cfg.hidden_act = act
    model = T.MixtralForCausalLM(cfg).to(DEV)
    model.set_experts_implementation("llmkern")
    with pytest.raises(NotImplementedError, match=words):
        model(input_ids=_batch(1, 4)[0])


def test_quantized_weights_are_refused():
    model = _model("mixtral")
    model.set_experts_implementation("llmkern")
    experts = model.model.layers[0].mlp.experts
    experts.down_proj = torch.nn.Parameter(experts.down_proj.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(NotImplementedError, match="torch.int8"):
        model(input_ids=_batch(1, 4)[0])


def test_check_cache_sees_in_place_changes(moe_calls):
    """Regression: the experts' validated activation was cached under id(act_fn) and the weight dtypes only, so an
    in-place change of the activation (nn.GELU.approximate) kept the old gate (exact gelu computed for a tanh
    one), and an in-place layout flag change skipped the check. The cache keys on the activation's type and
    settings (holding the activation it validated) and on the layout flags."""
    model = _model("mixtral").eval()
    model.set_experts_implementation("llmkern")
    experts = [layer.mlp.experts for layer in model.model.layers]
    ids, _ = _batch(2, 6)

    def run(impl="llmkern"):
        model.set_experts_implementation(impl)
        moe_calls.clear()
        with torch.no_grad():
            return model(input_ids=ids).logits

    for e in experts:
        e.act_fn = torch.nn.GELU()
    torch.testing.assert_close(run(), run("eager"), atol=1e-5, rtol=1e-4)
    run()
    assert [c[2] for c in moe_calls] == ["geglu_exact"] * len(experts)
    for e in experts:
        e.act_fn.approximate = "tanh"  # the same object, now the tanh approximation
    got = run()
    assert [c[2] for c in moe_calls] == ["geglu"] * len(experts)
    torch.testing.assert_close(got, run("eager"), atol=1e-5, rtol=1e-4)
    for e in experts:
        e.act_fn = torch.nn.SiLU()
    got = run()
    assert [c[2] for c in moe_calls] == ["swiglu"] * len(experts)
    torch.testing.assert_close(got, run("eager"), atol=1e-5, rtol=1e-4)
    experts[0].has_bias = True  # a layout flag set in place: checked again
    with pytest.raises(NotImplementedError, match="has_bias"):
        run()
