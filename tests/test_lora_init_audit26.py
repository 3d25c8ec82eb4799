"""init_lora_weights (PEFT's LoRA initialisations) on llmkern's LoRALinear / inject_lora, against PEFT, and saving
PiSSA / OLoRA adapters converted to the original base (PEFT's path_initial_model_for_weight_conversion)."""
import copy
import json

import pytest
import torch
from torch import nn

import llmkern.peft as lp

peft = pytest.importorskip("peft")

INITS = [True, False, "gaussian", "pissa", "pissa_niter_2", "olora"]


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 12)
        self.v = nn.Linear(12, 16)
        self.o = nn.Linear(16, 8)

    def forward(self, x):
        return self.o(self.v(torch.relu(self.q(x))))


def _base(dtype=torch.float32):
    torch.manual_seed(0)
    return TwoLayer().to(dtype)


def _both(init, dtype=torch.float32, **kw):
    """(original, PEFT's model, ours), both adapters built from the same seed on copies of one base model."""
    orig = _base(dtype)
    theirs, ours = copy.deepcopy(orig), copy.deepcopy(orig)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                                         init_lora_weights=init, **kw))
    torch.manual_seed(1)
    lp.inject_lora(ours, ["q", "v"], r=4, alpha=8, init_lora_weights=init,
                   use_rslora=kw.get("use_rslora", False), use_dora=kw.get("use_dora", False))
    return orig, theirs.base_model.model, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("init", INITS)
def test_init_matches_peft_factors_and_base_weight(init, dtype):
    # was: LoRALinear / inject_lora had no init_lora_weights (only PEFT's default, and not PEFT's draws for a seed)
    orig, theirs, ours = _both(init, dtype)
    for name in ("q", "v"):
        p, o = getattr(theirs, name), getattr(ours, name)
        assert o.lora_A.dtype == p.lora_A["default"].weight.dtype == torch.float32  # (PEFT's autocast dtype)
        assert torch.equal(o.lora_A, p.lora_A["default"].weight), (name, "A")
        assert torch.equal(o.lora_B, p.lora_B["default"].weight), (name, "B")
        assert torch.equal(o.base_layer.weight, p.base_layer.weight), (name, "W")  # PiSSA / OLoRA's residual
    x = torch.randn(3, 16).to(dtype)
    with torch.no_grad():
        want, got = orig(x), ours(x)
    if init is False:  # a non-identity adapter
        assert not torch.allclose(got, want, atol=1e-2)
    else:  # the model starts as the original one (PiSSA / OLoRA: W - s·B A + s·B A, up to rounding)
        tol = 1e-5 if dtype == torch.float32 else 4e-3
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    changed = not torch.equal(ours.q.base_layer.weight, orig.q.weight)
    assert changed == lp.lora.is_base_changing_init(init)


def test_pissa_with_dora_and_rslora_starts_as_the_base_model():
    orig, theirs, ours = _both("pissa", use_dora=True, use_rslora=True)
    p, o = theirs.q, ours.q
    torch.testing.assert_close(o.lora_magnitude_vector, p.lora_magnitude_vector["default"].weight)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), orig(x), rtol=1e-5, atol=1e-5)


def test_base_changing_init_refusals_leave_the_model_unchanged():
    model = _base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="r=10 exceeds"):  # q, v could take r=10, o (16 -> 8) not: none rewritten
        lp.inject_lora(model, ["q", "v", "o"], init_lora_weights="olora", r=10)
    with pytest.raises(ValueError, match="alpha > 0"):
        lp.inject_lora(model, ["v"], init_lora_weights="pissa", r=4, alpha=-8)
    with pytest.raises(ValueError, match="init_lora_weights must be"):
        lp.inject_lora(model, ["v"], init_lora_weights="loftq")
    with pytest.raises(ValueError, match="init_lora_weights must be"):
        lp.LoRALinear(nn.Linear(4, 4), init_lora_weights="pissa_niter_")
    model.o = nn.Linear(16, 12)
    model.o.weight = model.q.weight  # tied (one Parameter in two modules)
    with pytest.raises(ValueError, match="init_lora_weights='pissa'.*shared with"):
        lp.inject_lora(model, ["q", "v"], init_lora_weights="pissa", r=4)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items() if not k.startswith("o."))
    assert not lp.lora_modules(model)
    with pytest.raises(ValueError, match="init_lora_weights='olora'.*4-bit"):
        lp.LoRALinear(lp.NF4Linear.from_linear(nn.Linear(64, 64)), r=4, init_lora_weights="olora")
    with pytest.raises(ValueError, match="init_lora_weights='pissa'.*meta"):
        lp.LoRALinear(nn.Linear(8, 8, device="meta"), r=4, init_lora_weights="pissa")
    emb = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match="init_lora_weights='gaussian' is not supported on embedding"):
        lp.inject_lora(emb, ["0", "1"], init_lora_weights="gaussian")


def test_reset_restores_initial_factors_without_rewriting_again():
    layer = lp.LoRALinear(nn.Linear(16, 12), r=4, alpha=8, init_lora_weights="olora")
    w_res = layer.base_layer.weight.detach().clone()
    a0 = layer.lora_A.detach().clone()
    with torch.no_grad():
        layer.lora_A.add_(1.0)
    layer.reset_lora_parameters()
    assert torch.equal(layer.lora_A, a0) and torch.equal(layer.base_layer.weight, w_res)
    assert "lora_A_init" not in layer.state_dict()  # (non-persistent: state dicts are as before)


def _train_a_bit(model):
    with torch.no_grad():
        for _, m in lp.lora_modules(model):
            m.lora_A.add_(0.1 * torch.randn_like(m.lora_A))
            m.lora_B.add_(0.1 * torch.randn_like(m.lora_B))


@pytest.mark.parametrize("init, rslora", [("pissa", False), ("olora", True)])
def test_save_converts_to_original_base_and_peft_loads_it(tmp_path, init, rslora):
    orig = _base()
    ours = copy.deepcopy(orig)
    lp.inject_lora(ours, ["q", "v"], r=4, alpha=8, init_lora_weights=init, use_rslora=rslora)
    lp.inject_lora(ours, ["o"], r=2, alpha=3, use_rslora=rslora)  # a plain LoRA beside them keeps its rank
    _train_a_bit(ours)
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = ours(x)
    # was: written as plain A, B with init_lora_weights true, an adapter of neither the original nor the residual
    with pytest.raises(ValueError, match="init_lora_weights=.*convert_to_original_base"):
        lp.save_peft_adapter(ours, str(tmp_path / "no"))
    lp.save_peft_adapter(ours, str(tmp_path), convert_to_original_base=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["rank_pattern"] == {"^o": 2} and config["init_lora_weights"] is True
    with torch.no_grad():
        got_peft = peft.PeftModel.from_pretrained(copy.deepcopy(orig), str(tmp_path))(x)
        got_ours = lp.load_peft_adapter(copy.deepcopy(orig), str(tmp_path))(x)
    torch.testing.assert_close(got_peft, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_ours, want, rtol=1e-5, atol=1e-5)
    # False: A, B for the rewritten (residual) base weights, as they are
    lp.save_peft_adapter(ours, str(tmp_path / "res"), convert_to_original_base=False)
    residual = copy.deepcopy(ours)
    lp.merge_lora(residual, remove=True)
    for name in ("q", "v"):
        getattr(residual, name).weight.data.copy_(getattr(ours, name).base_layer.weight)
    residual.o = copy.deepcopy(orig.o)
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(residual, str(tmp_path / "res"))(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tensor_parallel_refuses_a_base_changing_init(world1):
    """A PiSSA / OLoRA layer sharded by from_linear lost its initial factors and init_lora_weights, so
    save_peft_adapter wrote it as an adapter of the original model: refused, naming the init."""
    from llmkern.parallel import ColumnParallelLinear

    torch.manual_seed(0)
    layer = lp.LoRALinear(nn.Linear(16, 8), r=2, alpha=4, init_lora_weights="pissa")
    with pytest.raises(NotImplementedError, match="init_lora_weights='pissa'"):
        ColumnParallelLinear.from_linear(layer, group=world1)
    plain = lp.LoRALinear(nn.Linear(16, 8), r=2, alpha=4)
    assert ColumnParallelLinear.from_linear(plain, group=world1).weight.shape == (8, 16)


def test_inject_base_changing_init_on_a_4bit_model_names_the_argument():
    """Was: inject_lora(init_lora_weights="pissa") on a quantize_nf4 model raised AttributeError ('NF4Linear' object
    has no attribute 'weight', from the tied-weight check), not the ValueError a LoRALinear gives."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    lp.quantize_nf4(model)
    for init in ("pissa", "olora"):
        with pytest.raises(ValueError, match=f"init_lora_weights='{init}'.*4-bit"):
            lp.inject_lora(model, ["0", "1"], r=4, init_lora_weights=init)
    assert not lp.lora_modules(model)
