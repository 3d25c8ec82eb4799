"""Audit of llmkern's LoRA layers against Hugging Face PEFT (round 25): DoRA around a hooked base layer,
argument checks of the LoRA / adapter / prefix modules."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import llmkern.peft as lp

peft = pytest.importorskip("peft")


class _Proj(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.proj = nn.Linear(8, 6, bias=bias)

    def forward(self, x):
        return self.proj(x)


def _dora_pair(dropout, bias=True):
    """(ours, PEFT's) DoRA on the same random adapter."""
    torch.manual_seed(0)
    base = _Proj(bias)
    ours = copy.deepcopy(base)
    lp.inject_lora(ours, ["proj"], r=2, alpha=4, dropout=dropout, use_dora=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=dropout,
                                                                      target_modules=["proj"], use_dora=True))
    layer = theirs.base_model.model.proj
    with torch.no_grad():
        nn.init.normal_(ours.proj.lora_B)
        ours.proj.lora_magnitude_vector.mul_(torch.rand(6) + 0.5)
        layer.lora_A["default"].weight.copy_(ours.proj.lora_A)
        layer.lora_B["default"].weight.copy_(ours.proj.lora_B)
        layer.lora_magnitude_vector["default"].weight.copy_(ours.proj.lora_magnitude_vector)
    return ours, theirs


def _grads(model):
    """{lora_A / lora_B / lora_magnitude_vector: gradient} (ours: proj.lora_A, PEFT's: ...lora_A.default.weight)."""
    names = ("lora_A", "lora_B", "lora_magnitude_vector")
    return {k: p.grad for n, p in model.named_parameters() for k in names if f".{k}" in n}


@pytest.mark.parametrize("dropout,bias", [(0.0, True), (0.0, False), (0.5, True)])
def test_dora_with_a_hooked_base_layer_runs_peft_formula(dropout, bias):
    """A forward hook on a DoRA layer's base layer (activation capture: hooks on every nn.Linear) sent it to the
    unfused path, which raised NotImplementedError for DoRA ("accelerate offloading?") though the weight was there;
    PEFT runs it. Now it runs PEFT's formula through base_layer(x) (the hook sees the call), with PEFT's dropout
    mask (drawn after the base layer, as PEFT draws it), the same outputs and gradients."""
    ours, theirs = _dora_pair(dropout, bias)
    seen = []
    ours.proj.base_layer.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    x = torch.randn(2, 3, 8)
    outs = []
    for model in (ours, theirs):
        model.train(dropout > 0)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(1)
        y = model(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        outs.append((y, xi.grad, _grads(model)))
    assert seen == [(2, 3, 6)]
    (y, dx, g), (y_p, dx_p, g_p) = outs
    torch.testing.assert_close(y, y_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_p, rtol=1e-5, atol=1e-5)
    for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
        torch.testing.assert_close(g[name], g_p[name].reshape(g[name].shape), rtol=1e-4, atol=1e-5, msg=name)


def test_offloaded_dora_base_is_still_refused_by_name():
    """The hooked path reads the weight for DoRA's row norms: a base weight on the meta device (accelerate's
    offload) still raises, naming the cause, rather than computing norms of nothing."""
    layer = lp.LoRALinear(nn.Linear(8, 6), r=2, use_dora=True)
    layer.base_layer.register_forward_pre_hook(lambda mod, args: None)
    layer.base_layer.to("meta")
    with pytest.raises(NotImplementedError, match="DoRA needs the base weight"):
        layer(torch.randn(2, 8))


def test_numpy_scalars_are_taken_as_lora_arguments():
    """r / alpha / dropout from a NumPy sweep (np.arange, np.linspace) were refused ("r must be an int in 1..256,
    got np.int64(2)"), and np.float32 dropout too while np.float64 (a float subclass) was taken; PEFT takes them.
    They are taken now and stored as Python numbers; bools and bad values are still refused by name."""
    lin = lp.LoRALinear(nn.Linear(8, 6), r=np.int64(2), alpha=np.float32(4.0), dropout=np.float32(0.25))
    assert (type(lin.r), lin.r, lin.scaling, type(lin.dropout), lin.dropout) == (int, 2, 2.0, float, 0.25)
    assert lin.lora_A.shape == (2, 8) and lin(torch.randn(3, 8)).shape == (3, 6)
    emb = lp.LoRAEmbedding(nn.Embedding(10, 4), r=np.int32(3), alpha=np.int64(6))
    assert emb.lora_embedding_A.shape == (3, 10) and emb.scaling == 2.0
    conv = lp.LoRAConv(nn.Conv2d(4, 6, 3, groups=2), r=np.int16(4))
    assert conv.lora_B.shape == (6, 2, 1, 1) and type(conv.r) is int
    model = _Proj()
    lp.inject_lora(model, ["proj"], r=np.int64(4), alpha=np.float64(8), use_rslora=True)
    assert model.proj.scaling == 4.0
    ad = lp.Adapter(np.int64(8), np.int32(2))
    assert (ad.d, ad.r, ad.down.weight.shape) == (8, 2, (2, 8))
    for kw, name in ((dict(r=True), "r"), (dict(r=np.int64(0)), "r"), (dict(alpha=np.float32("nan")), "alpha"),
                     (dict(dropout=np.float32(1.0)), "dropout"), (dict(r=2.0), "r")):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            lp.LoRALinear(nn.Linear(8, 6), **{"r": 2, **kw})
    with pytest.raises(ValueError, match="^r must be"):
        lp.Adapter(8, True)


def test_prefix_tuning_arguments_are_checked_by_name():
    """PrefixTuning took a bool as a count (n_layers=True: one layer), never checked d_embed (0: a silently empty
    prefix embedding; -1: a torch error about negative dimensions), and forward(batch_size=-1) returned a batch
    of 1 (expand(-1) keeps the size). Each is now a ValueError naming the argument; NumPy ints are taken."""
    bad = [(dict(n_layers=True), "n_layers"), (dict(reparam=True, hidden=8, d_embed=0), "d_embed"),
           (dict(reparam=True, hidden=8, d_embed=-1), "d_embed"), (dict(reparam=True, hidden=True), "hidden"),
           (dict(n_heads=2.0), "n_heads")]
    for kw, name in bad:
        with pytest.raises(ValueError, match=f"^{name} must be a positive int"):
            lp.PrefixTuning(**{"n_layers": 2, "n_prefix": 3, "d": 8, "n_heads": 2, **kw})
    with pytest.raises(TypeError, match="init must be a torch.Tensor"):
        lp.PrefixTuning(1, 2, 4, 2, init=[[0.0] * 4] * 2)  # (was an AttributeError: 'list' object has no 'shape')
    pt = lp.PrefixTuning(np.int64(2), np.int32(3), 8, 2, reparam=True, hidden=np.int64(5), d_embed=np.int64(4))
    assert pt.num_trainable_parameters() == pt.formula_parameters() == 3 * 4 + 4 * 5 + 5 * 8 * 2 * 2
    for b in (-1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be an int >= 0"):
            pt(batch_size=b)
    assert pt(batch_size=np.int64(3))[0][0].shape == (3, 2, 3, 4)
    assert pt(batch_size=0)[1][1].shape == (0, 2, 3, 4)


def test_num_trainable_parameters_counts_what_trains():
    """LoRA layers counted their factors whatever their state: the base weight trained with freeze_base=False but
    was not counted, a factor frozen by hand still was. Now the count is that of count_trainable_parameters (and of
    Adapter / PrefixTuning): the parameters that require grad."""
    layer = lp.LoRALinear(nn.Linear(8, 6), r=2, use_dora=True)
    assert layer.num_trainable_parameters() == 2 * 8 + 6 * 2 + 6 == lp.count_trainable_parameters(layer)
    layer.lora_A.requires_grad_(False)  # (LoRA-FA: A frozen)
    assert layer.num_trainable_parameters() == 6 * 2 + 6
    open_base = lp.LoRAEmbedding(nn.Embedding(10, 4), r=2, freeze_base=False)
    assert open_base.num_trainable_parameters() == 10 * 4 + 2 * 10 + 4 * 2 == lp.count_trainable_parameters(open_base)


class _ScaledLinear(nn.Linear):
    """An nn.Linear subclass with a forward of its own (as transformers' FalconLinear, routers, quantized linears)."""

    def forward(self, x):
        return 2.0 * super().forward(x) - 1.0


class _Router(nn.Linear):
    def forward(self, x):
        logits = super().forward(x)
        return logits.softmax(-1), logits


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = _ScaledLinear(8, 6)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_linear_subclass_with_its_own_forward_keeps_it(use_dora):
    """LoRALinear over an nn.Linear subclass that overrides forward ran the fused op, F.linear(x, W, b) + update, in
    its place: the subclass's own computation was silently dropped. PEFT calls base_layer(x) and adds the update;
    so does LoRALinear now (outputs and gradients equal PEFT's, dropout mask included)."""
    torch.manual_seed(0)
    base = _Scaled()
    ours = copy.deepcopy(base)
    lp.inject_lora(ours, ["proj"], r=2, alpha=4, dropout=0.25, use_dora=use_dora)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.25,
                                                                      target_modules=["proj"], use_dora=use_dora))
    src = theirs.base_model.model.proj
    with torch.no_grad():
        nn.init.normal_(ours.proj.lora_B)
        src.lora_A["default"].weight.copy_(ours.proj.lora_A)
        src.lora_B["default"].weight.copy_(ours.proj.lora_B)
        if use_dora:
            ours.proj.lora_magnitude_vector.mul_(1.5)
            src.lora_magnitude_vector["default"].weight.copy_(ours.proj.lora_magnitude_vector)
    x = torch.randn(4, 8)
    ys = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(2)
        y = model(x)
        y.sum().backward()
        ys.append((y, _grads(model)))
    (y, g), (y_p, g_p) = ys
    torch.testing.assert_close(y, y_p, rtol=1e-5, atol=1e-5)
    for name, grad in g.items():
        torch.testing.assert_close(grad, g_p[name].reshape(grad.shape), rtol=1e-4, atol=1e-5, msg=name)


def test_linear_subclass_with_a_tuple_output_is_refused_by_name():
    """A router returning (scores, logits) got the fused op's single tensor back (its caller's unpacking then split
    the batch, or for 2 tokens silently took rows as scores); now a TypeError names the layer."""
    layer = lp.LoRALinear(_Router(8, 4), r=2)
    with pytest.raises(TypeError, match=r"base layer \(_Router\) returned a tuple"):
        layer(torch.randn(2, 8))
