"""llmkern.peft on transformers' GPT-2 Conv1D layers (weight stored [in, out], PEFT's fan_in_fan_out=True).

Regression: inject_lora matched no Conv1D (a plain GPT2LMHeadModel got no LoRA), LoRALinear refused a Conv1D base,
and load_peft_adapter refused every PEFT adapter of a plain GPT2LMHeadModel ("fan_in_fan_out ... not supported");
only the zoo GPT (nn.Linear layers) took them. Each test compares with PEFT on the same model and factors.
"""
import copy
import json
import warnings

import pytest
import torch

from llmkern import peft as lp
from llmkern.peft import lora as lora_mod
from llmkern.testing import triton_device

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

V = 101
CONV = ["c_attn", "c_proj", "c_fc"]  # every Conv1D of GPT-2: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj


@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton" and triton_device() is None:
        pytest.skip("no Triton device")
    monkeypatch.setenv("LLMKERN_BACKEND", request.param)
    return request.param


def _gpt2(seed=3):
    """A tiny random GPT2LMHeadModel (tests/test_peft.py's _hf_dir sizes), eval mode, random norm gains."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".ln_" in n:
                p.uniform_(0.5, 1.5)
    return model.eval()


def _ids(B=2, T=8, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _randomize(model, seed=1):
    """Random LoRA factors (an initialised LoRA's update is zero) and DoRA magnitudes near their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def _peft(base, use_dora=False, targets=CONV, r=4, alpha=8):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                         lora_dropout=0.0, fan_in_fan_out=True,
                                                         use_dora=use_dora)).eval()


def _peft_layer(pm, name):
    return pm.base_model.model.get_submodule(name)


def _copy_into_peft(ours, pm):
    """Our LoRA factors (and DoRA magnitudes) into the PEFT model's "default" adapter, layer by layer."""
    with torch.no_grad():
        for n, m in lp.lora_modules(ours):
            layer = _peft_layer(pm, n)
            layer.lora_A["default"].weight.copy_(m.lora_A)
            layer.lora_B["default"].weight.copy_(m.lora_B)
            if m.use_dora:
                layer.lora_magnitude_vector["default"].weight.copy_(m.lora_magnitude_vector)


def _ours_and_peft(use_dora=False):
    """(GPT-2 with llmkern LoRA on its Conv1D layers, PEFT's LoRA on the same base with the same factors, the
    base)."""
    base = _gpt2()
    ours = copy.deepcopy(base)
    assert len(lp.inject_lora(ours, CONV, r=4, alpha=8, use_dora=use_dora)) == 4 * 2
    _randomize(ours)
    pm = _peft(copy.deepcopy(base), use_dora=use_dora)
    _copy_into_peft(ours, pm)
    return ours, pm, base


def _grads(ours, pm):
    """{(layer, what): (our gradient, PEFT's)} of every LoRA parameter."""
    out = {}
    for n, m in lp.lora_modules(ours):
        layer = _peft_layer(pm, n)
        out[n, "A"] = m.lora_A.grad, layer.lora_A["default"].weight.grad
        out[n, "B"] = m.lora_B.grad, layer.lora_B["default"].weight.grad
        if m.use_dora:
            out[n, "m"] = m.lora_magnitude_vector.grad, layer.lora_magnitude_vector["default"].weight.grad
    return out


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_inject_lora_on_gpt2_conv1d_matches_peft(backend, use_dora, monkeypatch):
    """inject_lora wraps GPT-2's Conv1D layers; the fused op reads each [in, out] weight as its transposed view (no
    copy), with PEFT's logits and LoRA (DoRA: and magnitude) gradients. DoRA's row norms are those of the [out, in]
    weight, as PEFT's fan_in_fan_out DoRA computes them."""
    ours, pm, _ = _ours_and_peft(use_dora)
    layer = ours.transformer.h[0].attn.c_attn
    assert isinstance(layer, lp.LoRALinear) and layer.conv1d and type(layer.base_layer).__name__ == "Conv1D"
    assert (layer.in_features, layer.out_features) == (32, 96) and layer.lora_A.shape == (4, 32)
    ptrs = {m.base_layer.weight.data_ptr() for _, m in lp.lora_modules(ours)}
    calls = []
    orig = lora_mod.dora_linear if use_dora else lora_mod.lora_linear
    spy = lambda *a, **k: calls.append((a[1].data_ptr(), a[1].stride())) or orig(*a, **k)  # noqa: E731
    monkeypatch.setattr(lora_mod, "dora_linear" if use_dora else "lora_linear", spy)
    ids = _ids()
    got = ours(ids).logits
    want = pm(ids).logits
    assert len(calls) == 8 and {p for p, _ in calls} == ptrs and all(st[0] == 1 for _, st in calls)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    got.pow(2).mean().backward()
    want.pow(2).mean().backward()
    for key, (g, w) in _grads(ours, pm).items():
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-6, msg=str(key))
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)  # base frozen


def test_conv1d_base_weight_trains_through_the_transposed_view(backend):
    """freeze_base=False: the gradient of the [in, out] parameter (and bias, input, A, B) is that of x W + b +
    s (x Aᵀ) Bᵀ computed by plain autograd."""
    conv = transformers.pytorch_utils.Conv1D(24, 16)
    layer = lp.LoRALinear(conv, r=4, alpha=6, freeze_base=False)
    _randomize(layer)
    ref = copy.deepcopy(layer)
    x = torch.randn(3, 5, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    b = ref.base_layer
    y_ref = x_ref @ b.weight + b.bias + ref.scaling * (x_ref @ ref.lora_A.t()) @ ref.lora_B.t()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    assert conv.weight.grad.shape == (16, 24)
    for got, want in [(conv.weight.grad, b.weight.grad), (conv.bias.grad, b.bias.grad), (x.grad, x_ref.grad),
                      (layer.lora_A.grad, ref.lora_A.grad), (layer.lora_B.grad, ref.lora_B.grad)]:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_unmerge_and_remove_on_gpt2_conv1d(use_dora):
    """merge / unmerge work in place on the Conv1D's [in, out] parameter (through its transposed view), the
    disabled layer is the base layer, the state dict keeps the Conv1D layout, and merge_lora(remove=True) leaves
    Conv1D layers holding PEFT's merge_and_unload weights."""
    ours, pm, base = _ours_and_peft(use_dora)
    ids = _ids()
    with torch.no_grad():
        want = pm(ids).logits
        plain = base(ids).logits
        before = {n: m.base_layer.weight.detach().clone() for n, m in lp.lora_modules(ours)}
        sd = ours.state_dict()
        assert sd["transformer.h.0.attn.c_attn.base_layer.weight"].shape == (32, 96)  # Conv1D's [in, out]
        for m in (m for _, m in lp.lora_modules(ours)):
            m.disabled = True
        torch.testing.assert_close(ours(ids).logits, plain, rtol=0, atol=0)
        for m in (m for _, m in lp.lora_modules(ours)):
            m.disabled = False
        lp.merge_lora(ours)
        assert all(m.merged for _, m in lp.lora_modules(ours))
        torch.testing.assert_close(ours(ids).logits, want, rtol=1e-4, atol=1e-4)
        lp.unmerge_lora(ours)
        for n, m in lp.lora_modules(ours):
            torch.testing.assert_close(m.base_layer.weight, before[n], rtol=1e-5, atol=1e-6, msg=n)
        torch.testing.assert_close(ours(ids).logits, want, rtol=1e-4, atol=1e-4)
        # the layer's merged copy: a new Conv1D computing what the layer computes
        layer = ours.transformer.h[1].mlp.c_fc
        dense = layer.merged_linear()
        assert type(dense) is type(layer.base_layer) and dense.weight.shape == (32, 128)
        x = torch.randn(2, 3, 32)
        torch.testing.assert_close(dense(x), layer(x), rtol=1e-4, atol=1e-5)
        # remove: the Conv1D layers are back, with the merged weights (PEFT's merge_and_unload's)
        merged = lp.merge_lora(ours, remove=True)
        peft_merged = pm.merge_and_unload()
        for n in before:
            got, ref = merged.get_submodule(n), peft_merged.get_submodule(n)
            assert type(got).__name__ == "Conv1D" and type(got) is type(ref), n
            torch.testing.assert_close(got.weight, ref.weight, rtol=1e-5, atol=1e-6, msg=n)
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-4, atol=1e-4)


def test_safe_merge_on_conv1d_refuses_and_keeps_the_weight():
    """A non-finite merged weight is refused with every Conv1D weight (and the merged state) left as it was."""
    ours, _, _ = _ours_and_peft()
    before = {n: m.base_layer.weight.detach().clone() for n, m in lp.lora_modules(ours)}
    with torch.no_grad():
        ours.transformer.h[1].attn.c_proj.lora_B[3, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        lp.merge_lora(ours)
    for n, m in lp.lora_modules(ours):
        assert not m.merged and torch.equal(m.base_layer.weight, before[n]), n


def _peft_saved(path, **lora):
    """PEFT's LoRA on a tiny GPT2LMHeadModel with random factors, saved to `path`; its logits on _ids()."""
    pm = _peft(_gpt2(), **lora)
    _randomize(pm, 11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(path))
    with torch.no_grad():
        return pm(_ids()).logits


@pytest.mark.parametrize("lora", [
    dict(targets=CONV),
    dict(targets=CONV, use_dora=True),
    dict(targets=["c_attn", "lm_head"]),  # PEFT saves fan_in_fan_out=false then (lm_head, its last layer, is Linear)
], ids=["lora", "dora", "c_attn-lm_head"])
def test_peft_gpt2_adapter_loads_into_plain_gpt2_and_back(tmp_path, lora):
    """A PEFT adapter of a plain GPT2LMHeadModel loads with load_peft_adapter (LoRALinear over the Conv1D layers,
    whatever fan_in_fan_out the config says, as PEFT); save_peft_adapter writes fan_in_fan_out=true and files that
    PeftModel.from_pretrained loads with the same logits."""
    want = _peft_saved(tmp_path / "peft", **lora)
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is ("lm_head" not in lora["targets"])
    ours = lp.load_peft_adapter(_gpt2(), str(tmp_path / "peft"))
    mods = dict(lp.lora_modules(ours))
    c_attn = mods["transformer.h.1.attn.c_attn"]
    assert c_attn.conv1d and c_attn.use_dora == lora.get("use_dora", False)
    assert ("lm_head" in mods) == ("lm_head" in lora["targets"])
    if "lm_head" in mods:
        assert not mods["lm_head"].conv1d and isinstance(mods["lm_head"].base_layer, torch.nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, want, rtol=1e-5, atol=1e-5)
    lp.save_peft_adapter(ours, str(tmp_path / "ours"))
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["use_dora"] == lora.get("use_dora", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = peft.PeftModel.from_pretrained(_gpt2(), str(tmp_path / "ours")).eval()
    # PEFT only warns about adapter keys it did not find (and then runs without them)
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert sum("lora_A" in n for n, _ in back.named_parameters()) == len(mods)
    with torch.no_grad():
        torch.testing.assert_close(back(_ids()).logits, want, rtol=1e-5, atol=1e-5)


def test_fan_in_fan_out_adapter_without_conv1d_is_refused_naming_the_layer(tmp_path):
    """fan_in_fan_out=true on an adapter none of whose linear layers is a Conv1D here (PEFT never writes one) is
    refused, naming the layer, before the model changes."""
    _peft_saved(tmp_path, targets=["lm_head"])
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "fan_in_fan_out": True}))
    model = _gpt2()
    with pytest.raises(ValueError, match=r"fan_in_fan_out=True .* \(lm_head is a Linear\)"):
        lp.load_peft_adapter(model, str(tmp_path))
    assert not lp.lora_modules(model) and all(p.requires_grad for p in model.parameters())
