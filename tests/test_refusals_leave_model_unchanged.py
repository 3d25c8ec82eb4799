"""The functions that change a model in place leave it exactly as it was when they refuse (raise): its module tree,
state_dict, requires_grad flags, train/eval modes, hooks, instance-level forwards and LoRA flags (merged, disabled,
use_dora); and their undo paths restore what was there.

Regressions: LoRALinear.set_use_dora(True) set use_dora before computing the magnitude (a refusal left a DoRA layer
without one); a LoRA layer's constructor froze the caller's base layer before a DoRA init refused it;
merge_lora(safe_merge=False) "merged" offloaded (meta) weights, losing the update; merge_lora(remove=True) on a LoRA
layer itself gave it a child named ""; a refused load_state_dict still loaded a LoRA layer's factors (and a DoRA
layer's merged base weight), and an NF4Linear's refused load had already switched its scales to zeros of the other
layout; use_fused_lora(enable=False) deleted an instance-level forward the layer had before (accelerate's hooks);
use_fused_loss took any chunk_size and failed at the first training step; use_fused_ops patched modules before a
fallback warning raised (warnings as errors); register() took any name.
"""
import copy
import types
import warnings

import pytest
import torch
from torch import nn

from llmkern import peft as lp
from llmkern.testing import randomize_lora, tiny_hf_llama

transformers = pytest.importorskip("transformers")

WRAPPERS = (lp.LoRALinear, lp.LoRAEmbedding, lp.LoRAConv)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs")


def _module_state(m):
    """What a refused call must not change on one module besides its tensors."""
    state = {k: len(getattr(m, k)) for k in _HOOKS}
    state["training"] = m.training
    state["instance forward"] = type(m.__dict__.get("forward")).__name__
    if isinstance(m, WRAPPERS):
        state.update(r=m.r, alpha=m.alpha, dropout=m.dropout, rslora=m.use_rslora, dora=m.use_dora,
                     merged=m.merged, disabled=m.disabled)
    return state


def _assert_unchanged(model, before):
    """`model` is `before` (a deep copy taken before the call): modules (types, flags, hooks, forwards), parameters
    (values, requires_grad) and the rest of the state_dict (NaNs compare equal)."""
    got, want = list(model.named_modules()), list(before.named_modules())
    assert [(n, type(m)) for n, m in got] == [(n, type(m)) for n, m in want]
    assert [_module_state(m) for _, m in got] == [_module_state(m) for _, m in want]
    assert ({n: p.requires_grad for n, p in model.named_parameters()}
            == {n: p.requires_grad for n, p in before.named_parameters()})
    sd, sd0 = model.state_dict(), before.state_dict()
    assert list(sd) == list(sd0)
    for k in sd0:
        assert sd[k].dtype == sd0[k].dtype and torch.equal(sd[k].nan_to_num(), sd0[k].nan_to_num()), k


def _ids(vocab=64):
    return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))


def _lora_llama(**kw):
    model = tiny_hf_llama(seed=0)
    lp.inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8, **kw)
    randomize_lora(model, seed=2)
    return model


class _Net(nn.Module):
    def __init__(self, conv=None):
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.conv = conv or nn.Conv1d(8, 8, 3, padding=1)
        self.last = nn.Linear(8, 8)

    def forward(self, x):  # [B, T, 8]
        return self.last(self.conv(self.first(x).mT).mT)


def _nan_in(path):
    def corrupt(model):
        with torch.no_grad():
            model.get_submodule(path).lora_B[0, 0] = float("nan")
        return model
    return corrupt


# (name, model factory, call, error): each refusal comes after the call has looked at part of the model
REFUSALS = [
    ("inject-rank-too-large", tiny_hf_llama, lambda m: lp.inject_lora(m, ["q_proj", "embed_tokens"], r=300),
     "r must be an int in 1..256"),
    ("inject-dora-on-embedding", tiny_hf_llama, lambda m: lp.inject_lora(m, ["q_proj", "embed_tokens"], use_dora=True),
     "not supported on embedding"),
    ("inject-dilated-conv", lambda: _Net(nn.Conv1d(8, 8, 3, dilation=2)),
     lambda m: lp.inject_lora(m, ["first", "conv", "last"]), "dilation"),
    ("inject-mha-out-proj", lambda: nn.TransformerEncoderLayer(16, 2, 32),
     lambda m: lp.inject_lora(m, ["linear1", "out_proj", "linear2"]), "out_proj of an nn.MultiheadAttention"),
    ("merge-nan-in-last-layer", lambda: _nan_in("model.layers.1.self_attn.v_proj")(_lora_llama()),
     lambda m: lp.merge_lora(m, remove=True), "non-finite"),
    ("merge-grouped-conv", lambda: _net_with_lora(nn.Conv1d(8, 8, 3, padding=1, groups=2)),
     lambda m: lp.merge_lora(m, safe_merge=False), "groups=2"),
    ("merge-tied-head", lambda: _tied_llama_with_lora(), lambda m: lp.merge_lora(m), "tied"),
    ("quantize-merged-lora", lambda: _merged_one(_lora_llama()), lambda m: lp.quantize_nf4(m), "is merged"),
    ("quantize-float64-layer", lambda: _double_last_mlp(tiny_hf_llama()), lambda m: lp.quantize_nf4(m), "float64"),
    ("adapters-nested", tiny_hf_llama, lambda m: lp.add_adapters(m, ["mlp", "layers.1"], d=32, r=2),
     "inside another match"),
]


def _net_with_lora(conv):
    model = _Net(conv)
    lp.inject_lora(model, ["first", "conv", "last"], r=2)
    randomize_lora(model, seed=1)
    return model


def _tied_llama_with_lora():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    lp.inject_lora(model, ["q_proj", "lm_head"], r=2)
    randomize_lora(model, seed=1)
    return model


def _merged_one(model):
    model.model.layers[1].self_attn.v_proj.merge()
    return model


def _double_last_mlp(model):
    model.model.layers[1].mlp.down_proj.double()
    return model


@pytest.mark.parametrize("make, call, match", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusal_leaves_the_model_as_it_was(make, call, match):
    model = make()
    model.train()
    model.get_submodule(next(n for n, _ in model.named_modules() if n)).register_forward_hook(lambda *a: None)
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match=match):
        call(model)
    _assert_unchanged(model, before)


# ---- DoRA switching, LoRA construction -------------------------------------------------------------------------

def test_set_use_dora_refused_leaves_a_plain_lora_layer():
    """The magnitude (the base weight's row norms) of an offloaded layer cannot be computed: use_dora was set True
    first, so the refusal left a "DoRA" layer without a magnitude (and the error was torch's 'unsupported
    scalarType')."""
    accelerate = pytest.importorskip("accelerate")
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    lp.inject_lora(model, ["0", "1"], r=2)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    layer = model[1]
    with pytest.raises(ValueError, match="use_dora=True: .* meta device"):
        layer.set_use_dora(True)
    assert not layer.use_dora and layer.lora_magnitude_vector is None
    assert "lora_magnitude_vector" not in dict(layer.named_parameters())


def test_lora_layer_that_refuses_its_base_leaves_the_base_unfrozen():
    base = nn.Linear(4, 4, device="meta")  # (not materialised: no row norms for DoRA's magnitude)
    with pytest.raises(ValueError, match="meta device"):
        lp.LoRALinear(base, r=2, use_dora=True)
    assert all(p.requires_grad for p in base.parameters())


def test_set_use_dora_round_trip_restores_the_outputs():
    model = _lora_llama()
    model.model.layers[0].self_attn.q_proj.set_use_dora(True)
    with torch.no_grad():
        want = model(_ids()).logits
    layer = model.model.layers[0].self_attn.q_proj
    layer.merge()
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="merged"):
        layer.set_use_dora(False)
    _assert_unchanged(model, before)
    layer.unmerge()
    layer.set_use_dora(True)  # (already DoRA: unchanged)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, want, rtol=1e-5, atol=1e-5)


# ---- merge_lora ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("safe_merge", [True, False])
def test_merge_lora_refuses_offloaded_layers(safe_merge):
    """accelerate's offloading keeps the weights on the meta device: safe_merge=False "merged" into the meta tensors
    (the layers then ran their base alone: the update was lost), safe_merge=True raised torch's meta-tensor error."""
    accelerate = pytest.importorskip("accelerate")
    model = _net_with_lora(nn.Conv1d(8, 8, 3, padding=1))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        want = model(x)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="offloaded"):
        lp.merge_lora(model, safe_merge=safe_merge)
    with pytest.raises(ValueError, match="offloaded"):
        model.last.merge(safe_merge=safe_merge)
    assert not any(m.merged for m in model.modules() if isinstance(m, WRAPPERS))
    with torch.no_grad():
        torch.testing.assert_close(model(x), want)


def test_merge_lora_remove_on_a_lora_layer_returns_the_plain_layer():
    """setattr(layer, "", base) gave the LoRA layer a child named "" (state_dict keys ".weight", ".bias")."""
    layer = lp.LoRALinear(nn.Linear(6, 4), r=2)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 6)
    with torch.no_grad():
        want = layer(x)
    plain = lp.merge_lora(layer, remove=True)
    assert type(plain) is nn.Linear and plain is layer.base_layer
    assert list(dict(layer.named_children())) == ["base_layer"] and layer.merged
    with torch.no_grad():
        torch.testing.assert_close(plain(x), want)


def test_merge_and_unmerge_round_trip_restore_the_weights():
    model = _lora_llama(use_dora=False)
    lp.inject_lora(model, ["embed_tokens"], r=2)
    randomize_lora(model, seed=4, std=0.1)
    before = copy.deepcopy(model)
    lp.unmerge_lora(lp.merge_lora(model))
    got, want = model.state_dict(), before.state_dict()
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    assert [_module_state(m) for m in model.modules()] == [_module_state(m) for m in before.modules()]


# ---- load_state_dict -----------------------------------------------------------------------------------------

def test_refused_lora_state_dict_is_not_loaded_into_the_layer():
    """LoRA weights alone into a merged layer are refused; they were loaded anyway, so unmerge() then took out
    another update than the one merged into the weight."""
    model = _lora_llama()
    other = {k: v for k, v in _lora_llama().state_dict().items() if "lora_" in k}
    for v in other.values():
        v.add_(1.0)
    lp.merge_lora(model)
    before = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="merged"):
        model.load_state_dict(other, strict=False)
    _assert_unchanged(model, before)


def test_refused_merged_dora_state_dict_leaves_the_layer_and_its_base():
    """A merged DoRA checkpoint without its row norms is refused; its merged base weight was loaded into the
    unmerged layer anyway (the update then applied twice)."""
    src = _lora_llama(use_dora=True)  # (the same model: only the merged layers differ)
    lp.merge_lora(src)
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("lora_dora_merged_norm")}
    model = _lora_llama(use_dora=True)
    before = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="without its merged row norms"):
        model.load_state_dict(sd)
    _assert_unchanged(model, before)


def test_refused_nf4_state_dict_keeps_the_layout_and_the_scales():
    """A double-quantized checkpoint of another shape (an older one, without weight_shape) switched the layer to
    the double-quantized layout (zero scales) before the size mismatch was found."""
    torch.manual_seed(0)
    layer = lp.NF4Linear.from_linear(nn.Linear(64, 8))
    other = lp.NF4Linear.from_linear(nn.Linear(128, 8), double_quant=True).state_dict()
    other.pop("weight_shape")
    before = copy.deepcopy(layer)
    with pytest.raises(RuntimeError, match="size mismatch for packed"):
        layer.load_state_dict(other)
    assert not layer.double_quant
    _assert_unchanged(layer, before)
    x = torch.randn(2, 64)
    torch.testing.assert_close(layer(x), before(x))


# ---- integrations --------------------------------------------------------------------------------------------

def _peft_llama():
    from llmkern.testing import peft_lora_model

    model = peft_lora_model(tiny_hf_llama(seed=0), target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8)
    randomize_lora(model, seed=1)
    return model


def _lora_layers(pm):
    from peft.tuners.lora.layer import Linear

    return [m for m in pm.modules() if type(m) is Linear]


def test_use_fused_lora_undo_restores_an_instance_forward():
    """enable=False deleted the layer's forward: an instance-level one it had before (accelerate's hooks wrap a
    module's forward so) was dropped along with the fused one."""
    from llmkern.integrations.peft import use_fused_lora

    pm = _peft_llama()
    layers = _lora_layers(pm)
    calls = []

    def hooked(self, *args, **kwargs):
        calls.append(1)
        return type(self).forward(self, *args, **kwargs)

    for m in layers[::2]:
        m.forward = types.MethodType(hooked, m)
    before = copy.deepcopy(pm)
    with torch.no_grad():
        want = pm(_ids()).logits
    use_fused_lora(pm)
    with torch.no_grad():
        torch.testing.assert_close(pm(_ids()).logits, want, rtol=1e-5, atol=1e-5)
    use_fused_lora(pm, enable=False)
    _assert_unchanged(pm, before)
    assert all(m.forward.__func__ is hooked for m in layers[::2])
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(pm(_ids()).logits, want)
    assert len(calls) == len(layers[::2])


def test_use_fused_lora_undo_refuses_a_forward_wrapped_since():
    from llmkern.integrations.peft import use_fused_lora

    pm = use_fused_lora(_peft_llama())
    layer = _lora_layers(pm)[-1]
    fused = layer.forward
    layer.forward = lambda *a, **k: fused(*a, **k)  # (a wrapper put over the fused forward afterwards)
    before = copy.deepcopy(pm)
    with pytest.raises(ValueError, match="replaced after use_fused_lora"):
        use_fused_lora(pm, enable=False)
    assert all(hasattr(m, "_llmkern_orig_forward") for m in _lora_layers(pm))
    assert [type(m.__dict__.get("forward")) for m in pm.modules()] == [
        type(m.__dict__.get("forward")) for m in before.modules()]
    del layer.forward  # (the wrapper gone: the undo restores every layer)
    use_fused_lora(pm, enable=False)
    assert not any("forward" in vars(m) or hasattr(m, "_llmkern_orig_forward") for m in _lora_layers(pm))


@pytest.mark.parametrize("chunk_size", [0, -5, 2.5, "64", True])
def test_use_fused_loss_checks_chunk_size_before_patching(chunk_size):
    import llmkern.integrations.transformers as lt

    model = tiny_hf_llama()
    before = copy.deepcopy(model)
    with pytest.raises(ValueError, match="use_fused_loss: chunk_size must be None or an int >= 1"):
        lt.use_fused_loss(model, chunk_size=chunk_size)
    _assert_unchanged(model, before)
    assert "forward" not in vars(model) and not hasattr(model, "_llmkern_fused_loss")


def test_use_fused_ops_patches_nothing_when_it_raises_partway():
    """A fallback warning (an RMSNorm of unknown convention, found after the decoder layers were patched) under
    warnings-as-errors left the layers before it patched."""
    import llmkern.integrations.transformers as lt

    class OddRMSNorm(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * self.weight

    lt.use_fused_ops(tiny_hf_llama())  # (transformers' reference classes imported, the RoPE probed: no warnings)
    model = tiny_hf_llama()
    model.model.norm = OddRMSNorm(32)
    before = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="OddRMSNorm is not a known RMSNorm convention"):
            lt.use_fused_ops(model)
    _assert_unchanged(model, before)
    assert not any("forward" in vars(m) for m in model.modules())
    lt.use_fused_ops(model)  # (warned once already: patches)
    assert model._llmkern_fused_ops == {"rms_norm": 4, "layer_norm": 0, "mlp": 2, "rope": 2}


@pytest.mark.parametrize("name", [None, "", 3, b"llmkern"])
def test_register_refuses_bad_names_before_registering(name):
    import llmkern.integrations.transformers as lt
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    before = (dict(AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping))
    with pytest.raises(ValueError, match="name must be a non-empty str"):
        lt.register(name)
    with pytest.raises(ValueError, match="name must be a non-empty str"):
        lt.register_experts(name)
    assert (dict(AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping)) == before
