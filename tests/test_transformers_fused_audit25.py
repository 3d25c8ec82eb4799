"""use_fused_ops audit: it can be undone (enable=False gives back the class forwards, exactly the unpatched model's
numerics), its switches must be bools (a string such as "off" is truthy and switched the kind on), and on
families tests/test_fused_ops_transformers.py does not cover (StableLM's per-head q/k LayerNorms, OLMo-2's norm
class it does not know, Qwen2-MoE's shared expert) the patched model gives the unpatched model's float32 logits
and gradients bit for bit on the PyTorch reference."""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import llmkern.integrations.transformers as lt  # noqa: E402
from llmkern.ops import norm as norm_ops, rope as rope_ops, swiglu as swiglu_ops  # noqa: E402

T = transformers
V = 128
COMMON = dict(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=48,
              vocab_size=V, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # (tiny configs: transformers' hints)


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):  # (bit-exact comparisons: every fused op's PyTorch reference)
    monkeypatch.setenv("LLMKERN_BACKEND", "reference")


def _model(kind):
    torch.manual_seed(0)
    c = dict(COMMON)
    if kind == "llama":
        m = T.LlamaForCausalLM(T.LlamaConfig(**c))
    elif kind == "gemma2":
        m = T.Gemma2ForCausalLM(T.Gemma2Config(head_dim=8, **c))
    elif kind == "neox":  # LayerNorms, partial rotary
        c.pop("num_key_value_heads")
        m = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(rotary_pct=0.5, **c))
    elif kind == "stablelm":  # per-head q/k LayerNorms (a ModuleList of nn.LayerNorm), partial rotary
        m = T.StableLmForCausalLM(T.StableLmConfig(qk_layernorm=True, **c))
    elif kind == "olmo2":  # Olmo2RMSNorm (weight times the float32 value): not Llama's, left alone
        m = T.Olmo2ForCausalLM(T.Olmo2Config(**c))
    elif kind == "qwen2_moe":  # the shared expert is a Llama-style MLP
        m = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(moe_intermediate_size=20, num_experts=4, num_experts_per_tok=2,
                                                   shared_expert_intermediate_size=16, **c))
    else:
        raise ValueError(kind)
    with torch.no_grad():  # norm weights away from their init, so a wrong convention shows
        for name, p in m.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.3 * torch.randn_like(p))
    return m.float().train()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, 7), generator=g)
    am = torch.ones(2, 7, dtype=torch.long)
    am[0, :2] = 0  # left padding
    return ids, am


def _logits_and_grads(model, ids, am):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp_min(0)).logits
    (logits * am[..., None]).square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_equal(model_a, model_b):
    ids, am = _batch()
    la, ga = _logits_and_grads(model_a, ids, am)
    lb, gb = _logits_and_grads(model_b, ids, am)
    assert torch.equal(la, lb)
    assert set(ga) == set(gb) and ga
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n


@pytest.fixture
def calls(monkeypatch):
    """Counts the fused ops' calls (the patched forwards import them at call time)."""
    counted = dict.fromkeys(("rms_norm", "layer_norm", "swiglu", "geglu", "rope"), 0)
    for mod, name in ((norm_ops, "rms_norm"), (norm_ops, "layer_norm"), (swiglu_ops, "swiglu"),
                      (swiglu_ops, "geglu"), (rope_ops, "rope")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, (lambda real, name: lambda *a, **k: (
            counted.__setitem__(name, counted[name] + 1), real(*a, **k))[1])(real, name))
    return counted


def _patch_attributes(model):
    return {(n, a) for n, m in model.named_modules() for a in vars(m)
            if a in ("forward", "_llmkern_fused", "_llmkern_offset", "_llmkern_eps_attr")}


@pytest.mark.parametrize("kind", ["llama", "gemma2", "neox"])
def test_enable_false_restores_the_unpatched_model(kind, calls):
    """There was no way back: use_fused_ops(model, enable=False) did not exist (TypeError), and the patch's
    instance forwards stayed. Now the modules run their class forwards again (no fused op is called, numerics
    equal the never-patched model's bit for bit), no patch attribute is left, and the model can be patched again."""
    ref = _model(kind)
    model = lt.use_fused_ops(copy.deepcopy(ref))
    patched = model._llmkern_fused_ops
    assert sum(patched.values()) > 0
    assert lt.use_fused_ops(model, enable=False) is model
    assert model._llmkern_fused_ops == dict.fromkeys(patched, 0)
    assert not _patch_attributes(model)
    _assert_equal(model, ref)
    assert all(v == 0 for v in calls.values())
    lt.use_fused_ops(model)  # and patched again
    assert model._llmkern_fused_ops == patched
    _assert_equal(model, ref)
    assert sum(calls.values()) > 0


def test_enable_false_per_kind_and_through_peft(calls):
    """enable=False with some kinds switched off undoes only the selected ones; a PeftModel is undone through its
    base model, as use_fused_ops patches it."""
    peft = pytest.importorskip("peft")
    ref = _model("llama")
    model = lt.use_fused_ops(copy.deepcopy(ref))
    lt.use_fused_ops(model, enable=False, rms_norm=False, mlp=False)  # only rope (and layer_norm: none here)
    assert model._llmkern_fused_ops == {"rms_norm": 3, "layer_norm": 0, "mlp": 1, "rope": 0}
    assert "forward" not in vars(model.model.layers[0].self_attn)
    assert "forward" in vars(model.model.norm) and "forward" in vars(model.model.layers[0].mlp)
    _assert_equal(model, ref)
    assert calls["rope"] == 0 and calls["rms_norm"] > 0 and calls["swiglu"] > 0
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "gate_proj"], lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(0)
    wrapped = lt.use_fused_ops(peft.get_peft_model(_model("llama"), cfg))
    assert lt.use_fused_ops(wrapped, enable=False) is wrapped
    assert not any("forward" in vars(m) and hasattr(m, "_llmkern_fused") for m in wrapped.modules())
    assert wrapped.get_base_model()._llmkern_fused_ops == dict.fromkeys(("rms_norm", "layer_norm", "mlp", "rope"), 0)


def test_enable_false_leaves_a_forward_wrapped_since_with_a_warning():
    """A patched forward that another instance-level patch wrapped since (accelerate's hooks keep the old forward
    inside theirs) is not torn out from under it: left patched, with a warning naming the class."""
    model = lt.use_fused_ops(_model("llama"))
    norm = model.model.norm
    inner = norm.forward
    norm._old_forward = inner
    norm.forward = lambda *a, **k: inner(*a, **k)
    with pytest.warns(RuntimeWarning, match="LlamaRMSNorm"):
        lt.use_fused_ops(model, enable=False)
    assert model._llmkern_fused_ops == {"rms_norm": 1, "layer_norm": 0, "mlp": 0, "rope": 0}
    x = torch.randn(2, 32)
    assert torch.equal(norm(x), inner(x))


@pytest.mark.parametrize("bad", [dict(rope="off"), dict(rms_norm=None), dict(mlp=0), dict(layer_norm="False"),
                                 dict(enable="no")])
def test_switches_must_be_bools(bad):
    """use_fused_ops(model, rope="off") patched RoPE (the string is truthy): a silent opposite of what was asked.
    Non-bool switches now raise a TypeError naming the switch, and nothing is patched."""
    model = _model("llama")
    name = next(iter(bad))
    with pytest.raises(TypeError, match=name):
        lt.use_fused_ops(model, **bad)
    assert not any("forward" in vars(m) for m in model.modules())


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        lt.use_fused_ops("meta-llama/Llama-3.2-1B")


# kinds patched per family (1 layer); families whose modules compute something else are left alone
FAMILIES = {
    "stablelm": {"rms_norm": 0, "layer_norm": 3 + 6, "mlp": 1, "rope": 1},   # + 4 q and 2 k per-head LayerNorms
    "olmo2": {"rms_norm": 0, "layer_norm": 0, "mlp": 1, "rope": 1},
    "qwen2_moe": {"rms_norm": 3, "layer_norm": 0, "mlp": 1, "rope": 1},
}


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_more_families_bit_exact_on_the_reference(kind):
    """float32 on the PyTorch reference (the CPU path of every fused op): logits and every gradient equal the
    unpatched model's bit for bit, with left padding and position_ids; what the ops cannot express is unpatched."""
    ref = _model(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (Olmo2RMSNorm: the unknown-convention warning)
        fused = lt.use_fused_ops(copy.deepcopy(ref))
    assert fused._llmkern_fused_ops == FAMILIES[kind]
    _assert_equal(fused, ref)
