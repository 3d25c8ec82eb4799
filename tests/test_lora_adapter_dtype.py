"""LoRA parameters' dtype (adapter_dtype): float32 over 16-bit bases by default, as PEFT's
autocast_adapter_dtype=True keeps them, so that small optimizer updates are not rounded away."""
import copy
import os

import pytest
import torch
from torch import nn

from llmkern.peft import LoRAConv, LoRAEmbedding, LoRALinear, NF4Linear, inject_lora, merge_lora
from llmkern.peft import load_peft_adapter, lora_modules, save_peft_adapter

pytestmark = pytest.mark.usefixtures("one_thread")
HALF = (torch.bfloat16, torch.float16)


def _layers(dtype):
    return {"linear": LoRALinear(nn.Linear(8, 6).to(dtype), r=2),
            "dora": LoRALinear(nn.Linear(8, 6).to(dtype), r=2, use_dora=True),
            "embedding": LoRAEmbedding(nn.Embedding(10, 6).to(dtype), r=2),
            "conv": LoRAConv(nn.Conv1d(4, 6, 3).to(dtype), r=2)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_default_is_float32_over_16bit_bases_else_the_base_dtype(dtype):
    want = torch.float32 if dtype in HALF else dtype
    for kind, layer in _layers(dtype).items():
        params = [p for n, p in layer.named_parameters() if "lora_" in n]
        assert len(params) == (3 if kind == "dora" else 2)
        assert all(p.dtype == want for p in params), kind
        assert layer.adapter_dtype == want and layer.base_layer.weight.dtype == dtype


def test_base_keeps_the_base_dtype_and_a_dtype_is_taken_as_given():
    lin = nn.Linear(8, 6).bfloat16()
    assert LoRALinear(lin, r=2, adapter_dtype="base", use_dora=True).lora_magnitude_vector.dtype == torch.bfloat16
    assert LoRALinear(nn.Linear(8, 6), r=2, adapter_dtype=torch.float64).lora_B.dtype == torch.float64
    for bad in (torch.int8, "float32", torch.complex64):
        with pytest.raises(ValueError, match="adapter_dtype"):
            LoRALinear(lin, r=2, adapter_dtype=bad)


def test_qlora_adapters_are_float32_on_a_16bit_compute_dtype():
    # (PEFT's LoRA on bitsandbytes 4-bit layers is float32: the base weight's uint8 dtype is not taken)
    base = NF4Linear.from_linear(nn.Linear(64, 32).bfloat16())
    layer = LoRALinear(base, r=4, use_dora=True)
    assert {p.dtype for n, p in layer.named_parameters() if "lora_" in n} == {torch.float32}
    nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    layer(x).float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_magnitude_vector.grad.dtype == torch.float32


def test_inject_lora_and_module_casts():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).bfloat16()
    inject_lora(model, ["0", "1"], r=2)
    assert model[0].lora_embedding_A.dtype == model[1].lora_A.dtype == torch.float32
    assert model[3].weight.dtype == torch.bfloat16
    inject_lora(model, ["3"], r=2, adapter_dtype="base")
    assert model[3].lora_A.dtype == torch.bfloat16
    model.half()  # (module casts cast every parameter, PEFT's model.half() too)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_forward_casts_to_the_input_dtype_and_small_updates_survive():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 32).bfloat16(), r=4, dropout=0.1)
    nn.init.normal_(layer.lora_B, std=0.1)
    ref = copy.deepcopy(layer)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    with torch.no_grad():
        ref.lora_A.data, ref.lora_B.data = ref.lora_A.bfloat16(), ref.lora_B.bfloat16()
        want = ref(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)  # (the factors rounded to x's dtype by the op)
    hooked = copy.deepcopy(layer).eval()
    hooked.base_layer.register_forward_hook(lambda *args: None)  # (accelerate-style hooks: the unfused path)
    with torch.no_grad():
        torch.testing.assert_close(hooked(x), layer.eval()(x), rtol=1e-2, atol=1e-2)
    layer.train()
    y.float().square().sum().backward()
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    A0 = layer.lora_A.detach().clone()
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-5, weight_decay=0.0)
    for _ in range(3):  # ~1e-5 per step: below half a bf16 ulp of most entries of A
        opt.step()
    delta = (layer.lora_A.detach() - A0).abs()
    assert (delta > 0).float().mean() > 0.95 and delta.max() < 4e-5


def test_merge_computes_in_float32_and_rounds_once():
    torch.manual_seed(0)
    for use_dora in (False, True):
        layer = LoRALinear(nn.Linear(64, 32).bfloat16(), r=4, alpha=8, use_dora=use_dora)
        nn.init.normal_(layer.lora_B, std=0.05)
        W = layer.weight.detach().clone()
        full = W.float() + 2.0 * (layer.lora_B.detach() @ layer.lora_A.detach())
        if use_dora:
            full = (layer.lora_magnitude_vector.detach() / layer.dora_weight_norm())[:, None] * full
        layer.merge()
        assert torch.equal(layer.weight, full.bfloat16())
        with pytest.raises(ValueError, match="merged"):
            layer.set_adapter_dtype("base")
        layer.unmerge()
        assert (layer.weight.float() - W.float()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * W.abs().max()
        assert layer.lora_A.dtype == torch.float32


def test_load_into_existing_layers_keeps_or_casts(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)).bfloat16()
    inject_lora(model, ["0", "1"], r=2)
    nn.init.normal_(model[1].lora_B)
    save_peft_adapter(model, str(tmp_path))
    load_peft_adapter(model, str(tmp_path))
    assert model[1].lora_A.dtype == torch.float32
    load_peft_adapter(model, str(tmp_path), adapter_dtype="base")
    assert model[0].lora_A.dtype == model[1].lora_B.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="adapter_dtype"):
        load_peft_adapter(model, str(tmp_path), adapter_dtype="fp32")


@pytest.fixture(scope="module")
def peft_llama():
    """A tiny bf16 LlamaForCausalLM and a PEFT LoRA model of a copy (float32 adapters, PEFT's default)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, vocab_size=64)
    base = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj",
                                                                                                     "v_proj"]))
    return base, pm, torch.randint(0, 64, (2, 12))


def _peft_factors(pm, kind):
    return {n.split("base_model.model.")[1].split(f".{kind}")[0]: p for n, p in pm.named_parameters() if kind in n}


def test_training_tracks_peft_float32_adapters(peft_llama):
    base, pm, ids = peft_llama
    pm = copy.deepcopy(pm)
    model = copy.deepcopy(base)
    inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    A = _peft_factors(pm, "lora_A")
    A0 = {n: a.detach().clone() for n, a in A.items()}
    with torch.no_grad():
        for n, m in lora_modules(model):
            m.lora_A.copy_(A[n])
    for net in (pm, model):
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.0)
        for _ in range(4):
            net(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    mine = dict(lora_modules(model))
    d_peft = torch.cat([(A[n].detach() - A0[n]).flatten() for n in A])
    d_mine = torch.cat([(mine[n].lora_A.detach() - A0[n]).flatten() for n in A])
    assert d_peft.norm() > 0 and (d_mine - d_peft).norm() < 0.1 * d_peft.norm()


def test_float32_peft_adapter_loads_saves_and_computes_as_peft(peft_llama, tmp_path):
    peft = pytest.importorskip("peft")
    base, pm, ids = peft_llama
    pm = copy.deepcopy(pm)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.05)  # (float32 values a bf16 tensor cannot hold)
    pm.save_pretrained(str(tmp_path / "peft"))
    model = load_peft_adapter(copy.deepcopy(base), str(tmp_path / "peft"))
    for n, m in lora_modules(model):
        assert m.lora_A.dtype == torch.float32 and torch.equal(m.lora_A, _peft_factors(pm, "lora_A")[n])
    save_peft_adapter(model, str(tmp_path / "mine"))
    from safetensors.torch import load_file

    theirs, ours = (load_file(os.path.join(str(tmp_path / d), "adapter_model.safetensors")) for d in ("peft", "mine"))
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert {t.dtype for t in ours.values()} == {torch.float32}
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()(ids).logits.float()
        got = model.eval()(ids).logits.float()
    # PEFT computes the update in float32, the fused op in bf16 with the factors rounded: bf16 rounding apart
    assert (got - want).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * want.abs().max()


def test_merge_lora_model_gives_the_unmerged_outputs(peft_llama):
    base, _, ids = peft_llama
    model = copy.deepcopy(base).eval()
    inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    for _, m in lora_modules(model):
        nn.init.normal_(m.lora_B, std=0.05)
    with torch.no_grad():
        y = model(ids).logits.float()
        merge_lora(model)
        assert (model(ids).logits.float() - y).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * y.abs().max()
