"""llmkern.peft.LoRAConv: LoRA on nn.Conv1d / Conv2d / Conv3d, against Hugging Face PEFT's lora.Conv1d / Conv2d /
Conv3d (forward, gradients, merge, checkpoints both ways), and its place in inject_lora / merge_lora / save and
load."""
import copy
import json
import warnings

import pytest
import torch
from torch import nn

from llmkern import peft as lp
from llmkern.testing import peft_lora_model, randomize_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _copy_peft_factors(pm, ours, name):
    """PEFT's conv factors (lora_A / lora_B conv modules) into our LoRAConv `name`."""
    src = pm.base_model.model.get_submodule(name)
    dst = ours.get_submodule(name)
    with torch.no_grad():
        dst.lora_A.copy_(src.lora_A["default"].weight)
        dst.lora_B.copy_(src.lora_B["default"].weight)


def _pair(conv, r=4, alpha=8, use_rslora=False, dropout=0.0, seed=0):
    """(PEFT model, our model, our LoRAConv) over copies of nn.Sequential(conv), with the same random factors."""
    torch.manual_seed(seed)
    base = nn.Sequential(conv)
    ours = copy.deepcopy(base)
    pm = peft_lora_model(base, target_modules=["0"], r=r, lora_alpha=alpha, use_rslora=use_rslora, lora_dropout=dropout)
    randomize_lora(pm)
    assert lp.inject_lora(ours, ["0"], r=r, alpha=alpha, use_rslora=use_rslora, dropout=dropout) == ["0"]
    _copy_peft_factors(pm, ours, "0")
    return pm, ours, ours[0]


def _input(conv, batch=2, size=9, seed=0):
    nd = conv.weight.dim() - 2
    return torch.randn(batch, conv.in_channels, *(size,) * nd, generator=torch.Generator().manual_seed(seed))


CASES = {
    "conv1d-stride-pad": lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1),
    "conv1d-1x1-nobias": lambda: nn.Conv1d(5, 7, 1, bias=False),
    "conv2d-rect-stride": lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0)),
    "conv2d-groups": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "conv2d-depthwise": lambda: nn.Conv2d(4, 8, 3, groups=4),
    "conv2d-same-even-kernel": lambda: nn.Conv2d(3, 5, 4, padding="same"),
    "conv2d-valid": lambda: nn.Conv2d(3, 5, 3, padding="valid"),
    "conv2d-1x1": lambda: nn.Conv2d(6, 4, 1),
    "conv3d": lambda: nn.Conv3d(3, 4, (2, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1)),
    "conv3d-1x1x1": lambda: nn.Conv3d(3, 5, 1),
}
LORA = {"conv2d-groups": dict(r=4, use_rslora=True, alpha=5), "conv2d-depthwise": dict(r=8),
        "conv3d": dict(r=3, alpha=2), "conv2d-1x1": dict(r=2, use_rslora=True)}


# ---- forward / gradients against PEFT ----------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_grads_match_peft(case):
    conv = CASES[case]()
    pm, ours, layer = _pair(conv, **LORA.get(case, {}))
    assert isinstance(layer, lp.LoRAConv)
    src = pm.base_model.model[0]
    assert layer.scaling == src.scaling["default"]
    assert layer.lora_A.shape == src.lora_A["default"].weight.shape
    assert layer.lora_B.shape == src.lora_B["default"].weight.shape
    pm.train(), ours.train()
    x = _input(conv)
    xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = pm(xp), ours(xo)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.shape == layer.base_layer(x).shape
    assert not torch.allclose(got, layer.base_layer(x), rtol=1e-3, atol=1e-3)  # the update is not zero
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(3))
    (want * g).sum().backward()
    (got * g).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, src.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, src.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xo.grad, xp.grad, rtol=1e-5, atol=1e-5)
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad


def test_dropout_draws_the_same_mask_as_peft():
    """Dropout on the LoRA input only, drawn from the global generator in the same order as PEFT's nn.Dropout."""
    conv = nn.Conv2d(3, 5, 3, padding=1)
    pm, ours, layer = _pair(conv, dropout=0.5)
    pm.train(), ours.train()
    x = _input(conv)
    torch.manual_seed(11)
    want = pm(x)
    torch.manual_seed(11)
    got = ours(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ours.eval()  # no dropout in eval: a different (deterministic) output
    with torch.no_grad():
        assert not torch.allclose(ours(x), got, rtol=1e-3, atol=1e-3)
        pm.eval()
        torch.testing.assert_close(ours(x), pm(x), rtol=1e-5, atol=1e-5)


def test_half_precision_model_matches_peft_with_either_adapter_dtype():
    """A bfloat16 conv: with bfloat16 factors (PEFT's autocast_adapter_dtype=False) and with float32 factors (PEFT's
    default keeps adapters in float32: the input is cast to them, the sum back to bfloat16) the output equals
    PEFT's and keeps the base output's dtype."""
    conv = nn.Conv1d(4, 6, 3, padding=1).to(torch.bfloat16)
    x = _input(conv).to(torch.bfloat16)
    for autocast in (False, True):
        torch.manual_seed(0)
        ours = nn.Sequential(copy.deepcopy(conv))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(nn.Sequential(copy.deepcopy(conv)), peft.LoraConfig(target_modules=["0"], r=4),
                                     autocast_adapter_dtype=autocast)
        randomize_lora(pm)
        lp.inject_lora(ours, ["0"], r=4)
        src, layer = pm.base_model.model[0], ours[0]
        assert src.lora_A["default"].weight.dtype == (torch.float32 if autocast else torch.bfloat16)
        layer.lora_A = nn.Parameter(src.lora_A["default"].weight.detach().clone())
        layer.lora_B = nn.Parameter(src.lora_B["default"].weight.detach().clone())
        with torch.no_grad():
            got, want = ours(x), pm(x)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert not torch.equal(got, conv(x))


# ---- merge / unmerge / state_dict -------------------------------------------------------------------

@pytest.mark.parametrize("case", ["conv1d-stride-pad", "conv2d-rect-stride", "conv2d-1x1", "conv3d",
                                  "conv3d-1x1x1", "conv2d-same-even-kernel"])
def test_merge_unmerge_round_trip(case):
    conv = CASES[case]()
    pm, ours, layer = _pair(conv, **LORA.get(case, {}))
    x = _input(conv)
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        want = ours(x)
        delta = layer.delta_weight()
        assert delta.shape == w0.shape and delta.abs().sum() > 0
        if case != "conv3d-1x1x1":  # (PEFT's get_delta_weight fails there: see test_peft_quirks_we_refuse_or_fix)
            torch.testing.assert_close(delta, pm.base_model.model[0].get_delta_weight("default"), rtol=1e-5,
                                       atol=1e-5)
        lp.merge_lora(ours)
        assert layer.merged
        torch.testing.assert_close(layer.base_layer.weight, w0 + delta, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours(x), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(layer.base_layer(x), want, rtol=1e-4, atol=1e-4)  # the plain conv alone
        layer.disabled = True  # disabled while merged: unmerged first, then the base alone (PEFT)
        torch.testing.assert_close(ours(x), conv._conv_forward(x, w0, conv.bias), rtol=1e-5, atol=1e-5)
        assert not layer.merged
        layer.disabled = False
        lp.merge_lora(ours)
        lp.unmerge_lora(ours)
        assert not layer.merged
        torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)
        lp.merge_lora(ours, remove=True)  # the plain conv back in place, computing the adapted output
        assert type(ours[0]) is type(conv)
        torch.testing.assert_close(ours(x), want, rtol=1e-4, atol=1e-4)


def test_safe_merge_refuses_non_finite_and_leaves_the_model_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 7 * 7, 5))
    lp.inject_lora(model, ["0", "2"], r=2, alpha=4)
    randomize_lora(model)
    with torch.no_grad():
        model[0].lora_A[0, 0, 0, 0] = float("inf")
    w_conv, w_lin = model[0].base_layer.weight.detach().clone(), model[2].base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        model[0].merge()
    with pytest.raises(ValueError, match="non-finite"):
        lp.merge_lora(model)
    assert not model[0].merged and not model[2].merged  # checked before any layer merged
    assert torch.equal(model[0].base_layer.weight, w_conv) and torch.equal(model[2].base_layer.weight, w_lin)


def test_grouped_conv_merge_is_refused_and_nothing_merged():
    conv = nn.Conv2d(4, 6, 3, groups=2)
    pm, ours, layer = _pair(conv, r=4)
    with pytest.raises(NotImplementedError):  # PEFT refuses too
        pm.base_model.model[0].merge()
    with pytest.raises(ValueError, match="groups=2"):
        layer.merge()
    with pytest.raises(ValueError, match="groups=2"):
        layer.delta_weight()
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(6 * 7 * 7, 3))
    model[0] = layer
    lp.inject_lora(model, ["2"], r=2)
    randomize_lora(model, seed=4)
    w_lin = model[2].base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="groups=2"):
        lp.merge_lora(model)
    assert not layer.merged and not model[2].merged and torch.equal(model[2].base_layer.weight, w_lin)


def test_merged_state_dict_loads_without_adding_twice():
    def lora_model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 1))
        lp.inject_lora(m, ["0", "2"], r=2, alpha=4)
        randomize_lora(m, seed=5)
        return m

    a = lora_model()
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        ref = a(x)
    train_sd = copy.deepcopy(a.state_dict())
    assert not any(k.endswith("lora_merged") for k in train_sd)
    assert train_sd["0.lora_A"].shape == (2, 3, 3) and train_sd["0.lora_B"].shape == (4, 2, 1)
    lp.merge_lora(a)
    merged_sd = copy.deepcopy(a.state_dict())
    assert "0.lora_merged" in merged_sd and "2.lora_merged" in merged_sd
    b = lora_model()
    b.load_state_dict(merged_sd)  # merged checkpoint -> fresh model: it becomes merged (no double add)
    assert b[0].merged
    a.load_state_dict(train_sd)  # unmerged checkpoint -> merged model: it becomes unmerged
    assert not a[0].merged
    with torch.no_grad():
        torch.testing.assert_close(b(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a(x), ref, rtol=1e-5, atol=1e-5)
    lora_only = {k: v for k, v in train_sd.items() if k.startswith("0.lora_")}
    with pytest.raises(RuntimeError, match="merged"):  # new LoRA weights under a merged weight
        b.load_state_dict(lora_only, strict=False)


# ---- arguments ---------------------------------------------------------------------------------------

def test_bad_arguments_raise_naming_the_argument():
    conv = nn.Conv2d(4, 6, 3)
    for kwargs, match in [(dict(r=0), "r must"), (dict(r=2.0), "r must"), (dict(r=True), "r must"),
                          (dict(alpha=float("inf")), "alpha must"), (dict(alpha="8"), "alpha must"),
                          (dict(dropout=1.0), "dropout must"), (dict(dropout=-0.1), "dropout must"),
                          (dict(use_dora=True), "use_dora")]:
        with pytest.raises(ValueError, match=match):
            lp.LoRAConv(conv, **kwargs)
    for base, r, match in [(nn.Conv2d(4, 6, 3, groups=2), 3, "r=3 is not divisible by .*groups=2"),
                           (nn.Conv2d(4, 6, 3, dilation=2), 4, "dilation"),
                           (nn.Conv1d(4, 6, 3, dilation=(2,), padding="same"), 4, "dilation"),
                           (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), 4, "padding_mode"),
                           (nn.Conv3d(4, 6, 3, padding=1, padding_mode="circular"), 4, "padding_mode"),
                           (nn.LazyConv2d(6, 3), 4, "lazy")]:
        with pytest.raises(ValueError, match=match):
            lp.LoRAConv(base, r=r)
    for base in (nn.ConvTranspose2d(4, 6, 3), nn.Linear(3, 3)):
        with pytest.raises(TypeError, match="nn.Conv1d, nn.Conv2d or nn.Conv3d"):
            lp.LoRAConv(base)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 7 * 7, 5))
    with pytest.raises(ValueError, match="use_dora"):
        lp.inject_lora(model, ["0", "2"], r=2, use_dora=True)
    with pytest.raises(ValueError, match="dilation"):
        lp.inject_lora(nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2), nn.Flatten(), model[2]), ["0", "2"], r=2)
    assert type(model[0]) is nn.Conv2d and type(model[2]) is nn.Linear  # refused: model unchanged
    assert all(p.requires_grad for p in model.parameters())


def test_peft_quirks_we_refuse_or_fix():
    """What PEFT's _ConvNd gets wrong: a dilated base (the A conv ignores dilation: a shape error, or with padding
    'same' a silently different update that its own merge does not reproduce), and the delta weight of a Conv3d
    with a (1, 1, k) or 1x1x1 kernel (its 1x1 fast path is written for Conv2d). LoRAConv refuses the first and
    merges the second exactly."""
    x = torch.randn(1, 4, 9, 9)
    pm = peft_lora_model(nn.Sequential(nn.Conv2d(4, 6, 3, dilation=2)), target_modules=["0"], r=2)
    randomize_lora(pm)
    with pytest.raises(RuntimeError):
        pm(x)
    conv = nn.Conv2d(4, 6, 3, dilation=2, padding="same")
    pm = peft_lora_model(nn.Sequential(conv), target_modules=["0"], r=2)
    randomize_lora(pm)
    with torch.no_grad():
        unmerged = pm(x)
        pm.base_model.model[0].merge()
        assert not torch.allclose(pm(x), unmerged, rtol=1e-3, atol=1e-3)  # PEFT's merge changes the output
    with pytest.raises(ValueError, match="dilation"):
        lp.LoRAConv(copy.deepcopy(conv), r=2)
    conv3 = nn.Conv3d(3, 5, (1, 1, 3), padding=(0, 0, 1))
    pm, ours, layer = _pair(conv3)
    with pytest.raises(RuntimeError):
        pm.base_model.model[0].get_delta_weight("default")
    x3 = _input(conv3, size=5)
    with torch.no_grad():
        want = pm(x3)
        torch.testing.assert_close(ours(x3), want, rtol=1e-5, atol=1e-5)
        layer.merge()
        torch.testing.assert_close(ours(x3), want, rtol=1e-4, atol=1e-4)


# ---- inject_lora integration --------------------------------------------------------------------------

def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 5))


def test_inject_lora_on_a_small_cnn_trains_only_lora_and_matches_peft():
    base = _cnn()
    ours = copy.deepcopy(base)
    names = lp.inject_lora(ours, ["0", "2", "4"], r=4, alpha=8)
    assert names == ["0", "2", "4"]
    assert isinstance(ours[0], lp.LoRAConv) and isinstance(ours[2], lp.LoRAConv) and isinstance(ours[4], lp.LoRALinear)
    # lora_modules keeps returning the LoRALinear modules only (its callers read lora_A / lora_B as matrices)
    assert [n for n, _ in lp.lora_modules(ours)] == ["4"]
    assert [n for n, _ in lp.lora_conv_modules(ours)] == ["0", "2"]
    assert lp.lora_embedding_modules(ours) == []
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.lora_{ab}" for i in (0, 2, 4) for ab in "AB"}
    assert lp.count_trainable_parameters(ours) == sum(m.num_trainable_parameters() for m in (ours[0], ours[2], ours[4]))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # B = 0 at init: the base model's output
        torch.testing.assert_close(ours(x), base(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="matched no"):  # a LoRAConv (and its base conv) is not wrapped again
        lp.inject_lora(ours, r"2|2\.base_layer", r=2)
    assert type(ours[2].base_layer) is nn.Conv2d
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == trainable
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    w0 = ours[0].base_layer.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        ours(x).square().mean().backward()
        opt.step()
    assert ours[0].lora_B.abs().sum() > 0 and ours[2].lora_B.abs().sum() > 0
    assert torch.equal(ours[0].base_layer.weight, w0)
    # the same factors in PEFT: the same output
    pm = peft_lora_model(copy.deepcopy(base), target_modules=["0", "2", "4"], r=4, lora_alpha=8)
    with torch.no_grad():
        for i in ("0", "2", "4"):
            src = pm.base_model.model.get_submodule(i)
            src.lora_A["default"].weight.copy_(ours.get_submodule(i).lora_A)
            src.lora_B["default"].weight.copy_(ours.get_submodule(i).lora_B)
        torch.testing.assert_close(ours(x), pm(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours(x), base(x), rtol=1e-4, atol=1e-4)


# ---- PEFT checkpoints, both ways ---------------------------------------------------------------------

def test_our_adapter_loads_into_peft_with_the_same_outputs(tmp_path):
    base = _cnn()
    ours = copy.deepcopy(base)
    lp.inject_lora(ours, ["0", "4"], r=4, alpha=8, use_rslora=True)
    lp.inject_lora(ours, ["2"], r=2, alpha=3, use_rslora=True)
    randomize_lora(ours, seed=7)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = ours(x)
    lp.save_peft_adapter(ours, str(tmp_path))
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert sorted(cfg["target_modules"]) == ["0", "2", "4"] and cfg["use_rslora"] and cfg["task_type"] is None
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert keys["base_model.model.0.lora_A.weight"].shape == (4, 3, 3, 3)
    assert keys["base_model.model.0.lora_B.weight"].shape == (8, 4, 1, 1)
    assert keys["base_model.model.2.lora_A.weight"].shape == (2, 8, 3, 3)
    assert keys["base_model.model.4.lora_A.weight"].shape == (4, 36)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    conv = back.base_model.model[2]
    assert conv.r["default"] == 2 and conv.scaling["default"] == ours[2].scaling
    assert torch.equal(conv.lora_A["default"].weight, ours[2].lora_A)
    with torch.no_grad():
        torch.testing.assert_close(back(x), want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base(x), want, rtol=1e-3, atol=1e-3)
    again = lp.load_peft_adapter(copy.deepcopy(base), str(tmp_path))  # and back into llmkern
    assert isinstance(again[0], lp.LoRAConv) and again[2].r == 2 and again[2].alpha == 3
    with torch.no_grad():
        torch.testing.assert_close(again(x), want, rtol=1e-5, atol=1e-5)
    lp.merge_lora(ours)
    with pytest.raises(ValueError, match="merged"):
        lp.save_peft_adapter(ours, str(tmp_path / "m"))


def test_peft_adapter_loads_into_llmkern_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.GELU(), nn.Conv2d(8, 6, 1), nn.Flatten(),
                         nn.Linear(6 * 6 * 6, 5))
    pm = peft_lora_model(copy.deepcopy(base), target_modules=["0", "2", "4"], r=4, lora_alpha=16,
                         rank_pattern={"2": 3}, alpha_pattern={"2": 5}, lora_dropout=0.1)
    randomize_lora(pm, seed=3)
    pm.save_pretrained(tmp_path)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        want = pm.eval()(x)
    ours = lp.load_peft_adapter(copy.deepcopy(base), str(tmp_path))
    assert [n for n, _ in lp.lora_conv_modules(ours)] == ["0", "2"]
    assert ours[0].r == 4 and ours[0].groups == 2 and ours[0].dropout == 0.1
    assert ours[2].r == 3 and ours[2].alpha == 5
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {f"{i}.lora_{ab}" for i in (0, 2, 4)
                                                                          for ab in "AB"}
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base(x), want, rtol=1e-3, atol=1e-3)
    # loading again into the same (now LoRA) model replaces the factors
    with torch.no_grad():
        ours[0].lora_B.zero_()
    lp.load_peft_adapter(ours, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)
    # a stale active conv LoRA the checkpoint does not name is refused
    pm_lin = peft_lora_model(copy.deepcopy(base), target_modules=["4"], r=4)
    pm_lin.save_pretrained(tmp_path / "lin")
    with pytest.raises(ValueError, match="carries LoRA on 0, 2"):
        lp.load_peft_adapter(ours, str(tmp_path / "lin"))


def test_conv_adapter_that_does_not_fit_is_refused_naming_the_module(tmp_path):
    pm = peft_lora_model(_cnn(), target_modules=["0", "2"], r=4)
    pm.save_pretrained(tmp_path)
    other = _cnn()
    other[2] = nn.Conv2d(8, 4, 5, stride=2)  # another kernel size
    with pytest.raises(ValueError, match=r"2: checkpoint shapes lora_A\(4, 8, 3, 3\)"):
        lp.load_peft_adapter(other, str(tmp_path))
    dilated = _cnn()
    dilated[2] = nn.Conv2d(8, 4, 3, stride=2, dilation=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="2: .*padding_mode"):
        lp.load_peft_adapter(dilated, str(tmp_path))
    linear = _cnn()
    linear[2] = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="module 2 is a Linear, but the checkpoint has conv LoRA"):
        lp.load_peft_adapter(linear, str(tmp_path))
    for m in (other, dilated, linear):  # refused before anything changed
        assert not lp.lora_conv_modules(m) and not lp.lora_modules(m)
        assert all(p.requires_grad for p in m.parameters())


def test_rank_zero_conv_adapter_is_refused_before_anything_changed(tmp_path):
    """A conv LoRA of rank 0 (lora_A [0, in, k, k], the config agreeing): refused naming the module, with the model
    unchanged. Regression: only LoRAConv() refused it, while loading, after the Linear's LoRA was in and the base
    frozen, with an error naming neither the checkpoint nor the module."""
    from safetensors.torch import load_file, save_file

    ours = _cnn()
    lp.inject_lora(ours, ["2", "4"], r=4)
    lp.save_peft_adapter(ours, str(tmp_path))
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    for key, rank_dim in (("base_model.model.2.lora_A.weight", 0), ("base_model.model.2.lora_B.weight", 1)):
        weights[key] = weights[key].narrow(rank_dim, 0, 0).contiguous()
    save_file(weights, str(tmp_path / "adapter_model.safetensors"))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"^2": 0}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    model = _cnn()
    with pytest.raises(ValueError, match="2: rank 0 must be positive"):
        lp.load_peft_adapter(model, str(tmp_path))
    assert not lp.lora_conv_modules(model) and not lp.lora_modules(model)
    assert all(p.requires_grad for p in model.parameters())


def test_peft_dora_conv_adapter_is_refused(tmp_path):
    pm = peft_lora_model(_cnn(), target_modules=["0", "4"], r=4, use_dora=True)
    pm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="use_dora=True on conv layers"):
        lp.load_peft_adapter(_cnn(), str(tmp_path))


def _give_peft_convs_their_stride(pm):
    """PEFT 0.21's lora.Conv1d does not expose its base conv's stride, which WhisperEncoder.forward reads
    (conv1.stride[0]): PEFT's own Whisper encoder raises AttributeError. Copied onto PEFT's wrappers for the
    comparison (LoRAConv exposes it)."""
    for m in pm.modules():
        if isinstance(m, peft.tuners.lora.layer._ConvNd) and "stride" not in vars(m):
            m.stride = m.get_base_layer().stride


def test_whisper_encoder_conv1d_adapter_both_ways(tmp_path):
    """Whisper's encoder stem (two nn.Conv1d, the second strided) with attention LoRA beside it: a PEFT adapter
    loads into llmkern with the same encoder output, and ours loads into PEFT."""
    cfg = transformers.WhisperConfig(vocab_size=64, num_mel_bins=8, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_source_positions=12, max_target_positions=16,
                                     pad_token_id=1, bos_token_id=2, eos_token_id=2, decoder_start_token_id=3)
    torch.manual_seed(0)
    base = transformers.WhisperModel(cfg).eval()
    assert isinstance(base.encoder.conv2, nn.Conv1d) and base.encoder.conv2.stride == (2,)
    feats = torch.randn(2, 8, 24)
    pm = peft_lora_model(copy.deepcopy(base), target_modules=["conv1", "conv2", "q_proj"], r=4, lora_alpha=8)
    randomize_lora(pm, seed=2, std=0.2)
    pm.save_pretrained(tmp_path / "peft")
    _give_peft_convs_their_stride(pm)
    with torch.no_grad():
        want = pm.base_model.model.encoder(feats).last_hidden_state
        assert not torch.allclose(base.encoder(feats).last_hidden_state, want, rtol=1e-3, atol=1e-3)
    ours = lp.load_peft_adapter(copy.deepcopy(base), str(tmp_path / "peft"))
    assert [n for n, _ in lp.lora_conv_modules(ours)] == ["encoder.conv1", "encoder.conv2"]
    assert ours.encoder.conv2.stride == (2,)  # (read by WhisperEncoder.forward through the wrapper)
    with torch.no_grad():
        torch.testing.assert_close(ours.encoder(feats).last_hidden_state, want, rtol=1e-5, atol=1e-5)
    lp.save_peft_adapter(ours, str(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    _give_peft_convs_their_stride(back)
    assert sum(n.endswith("conv2.lora_A.default.weight") for n, _ in back.named_parameters()) == 1
    with torch.no_grad():
        torch.testing.assert_close(back.base_model.model.encoder(feats).last_hidden_state, want, rtol=1e-5,
                                   atol=1e-5)
        lp.merge_lora(ours)  # the whole model merged: convs and linears
        torch.testing.assert_close(ours.encoder(feats).last_hidden_state, want, rtol=1e-4, atol=1e-4)


def test_saved_target_modules_select_no_module_peft_cannot_wrap(tmp_path):
    """save_peft_adapter wrote the bare suffixes ["0", "2"] for a CNN's features.0 / features.2, having checked them
    against the model's linear / embedding / conv layers only: PEFT matches them against every module, found
    classifier.0 (an nn.Flatten) and refused the adapter ("Target module Flatten(...) is not supported"). The suffixes
    are now checked against every module name (here: a regex naming the two convs)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
            self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 5, 3))

        def forward(self, x):
            return self.classifier(self.features(x))

    base = Net().eval()
    ours = copy.deepcopy(base)
    lp.inject_lora(ours, ["features.0", "features.2"], r=2, alpha=4)
    lp.inject_lora(ours, ["1"], r=2, alpha=4)  # classifier.1 (suffix "1" also names features.1, a ReLU)
    randomize_lora(ours)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        want = ours(x)
    lp.save_peft_adapter(ours, str(tmp_path))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), want, rtol=1e-5, atol=1e-5)
    again = lp.load_peft_adapter(copy.deepcopy(base), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(again(x), want, rtol=1e-5, atol=1e-5)
