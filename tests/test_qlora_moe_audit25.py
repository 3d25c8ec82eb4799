"""Audit of the 4-bit NF4 / QLoRA layers and the MoE op against bitsandbytes / PEFT / transformers semantics:
bitsandbytes' quant_storage, quantize_nf4's skip of whole blocks and its argument errors."""
import types

import pytest
import torch
from torch import nn

import llmkern
from llmkern.ops.nf4 import NF4Weight
from llmkern.peft import NF4Linear, quantize_nf4

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- bitsandbytes' quant_storage ------------------------------------------------------------------

def _params4bit(weight, storage, double_quant):
    """A stand-in for a bitsandbytes Params4bit quantized with quant_storage=`storage`: the NF4 bytes
    reinterpreted as that dtype, shape [bytes / itemsize, 1] (bitsandbytes' quantize_4bit:
    packed.squeeze().view(quant_storage).unsqueeze(1)), and a quant_state with bitsandbytes' attribute names."""
    qw = llmkern.nf4_quantize(weight, 64, double_quant)
    data = qw.packed.view(storage).unsqueeze(1)
    state = types.SimpleNamespace(absmax=qw.absmax, shape=weight.shape, blocksize=64, dtype=weight.dtype,
                                  quant_type="nf4", nested=double_quant)
    if double_quant:
        code_map, absmax2, offset = qw.nested
        state.state2 = types.SimpleNamespace(code=code_map, absmax=absmax2, blocksize=256)
        state.offset = offset
    data.quant_state = state
    return data, qw


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("double_quant", [False, True])
def test_from_bnb_reads_a_quant_storage_weight(storage, double_quant):
    """bnb_4bit_quant_storage=torch.bfloat16 (QLoRA with FSDP) stores the same NF4 bytes as bfloat16 elements:
    from_bnb raised "packed must be uint8" for it; now it reads the bytes through a uint8 view, no copy."""
    torch.manual_seed(0)
    w = torch.randn(24, 128)
    data, qw = _params4bit(w, storage, double_quant)
    got = NF4Weight.from_bnb(data)
    assert got.packed.data_ptr() == data.data_ptr() and got.packed.dtype == torch.uint8
    assert torch.equal(got.dequantize(), qw.dequantize())
    bias = torch.randn(24)
    layer = nn.Module()
    layer.weight, layer.bias, layer.compute_dtype = data, bias, torch.float32
    nf4 = NF4Linear.from_bnb(layer)
    x = torch.randn(3, 128)
    torch.testing.assert_close(nf4(x), torch.nn.functional.linear(x, qw.dequantize(), bias))


def test_from_bnb_quant_storage_of_a_real_bitsandbytes_layer():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    src = nn.Linear(128, 16)
    layer = bnb.nn.Linear4bit(128, 16, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True,
                              quant_storage=torch.bfloat16)
    layer.load_state_dict(src.state_dict())
    layer = layer.to("cpu")  # (quantizes)
    assert layer.weight.dtype == torch.bfloat16
    want = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    nf4 = NF4Linear.from_bnb(layer)
    assert torch.equal(nf4.dequantize().weight, want)
    x = torch.randn(2, 128)
    torch.testing.assert_close(nf4(x), torch.nn.functional.linear(x, want, src.bias.detach()))


# ---- quantize_nf4: skip and argument errors ---------------------------------------------------------

def _vlm():
    torch.manual_seed(0)
    return nn.ModuleDict({"vision_tower": nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)),
                          "layers": nn.ModuleList([nn.ModuleDict({"q_proj": nn.Linear(8, 8)}) for _ in range(2)]),
                          "lm_head": nn.Linear(8, 4)})


def test_quantize_nf4_skip_leaves_every_layer_of_a_named_block_dense():
    """transformers' llm_int8_skip_modules=["vision_tower"] (modules_to_not_convert) leaves a block's layers dense;
    quantize_nf4(skip=("vision_tower",)) quantized them all, silently (only the layer's own name was matched)."""
    m = _vlm()
    assert quantize_nf4(m, skip=("vision_tower", "lm_head")) == ["layers.0.q_proj", "layers.1.q_proj"]
    assert all(type(lin) is nn.Linear for lin in m["vision_tower"]) and type(m["lm_head"]) is nn.Linear
    m = _vlm()  # a block path, as transformers' "layers.0" prefix
    assert quantize_nf4(m, skip=["layers.0", "lm_head"]) == ["vision_tower.0", "vision_tower.1", "layers.1.q_proj"]
    m = _vlm()  # a regex string: full match on the layer's or a parent's name
    assert quantize_nf4(m, skip=r"vision_tower|lm_head") == ["layers.0.q_proj", "layers.1.q_proj"]
    m = _vlm()  # the default still quantizes everything but the head
    assert quantize_nf4(m) == ["vision_tower.0", "vision_tower.1", "layers.0.q_proj", "layers.1.q_proj"]


@pytest.mark.parametrize("kw, name", [(dict(target_modules=123), "target_modules"), (dict(skip=5), "skip"),
                                      (dict(target_modules=["q_proj", 0]), "target_modules"),
                                      (dict(skip=b"lm_head"), "skip")])
def test_quantize_nf4_bad_name_arguments_are_named(kw, name):
    m = _vlm()
    with pytest.raises(TypeError, match=f"{name} must be None, a regex string or a list of module names"):
        quantize_nf4(m, **kw)
    assert type(m["layers"][0]["q_proj"]) is nn.Linear  # nothing changed


def test_numpy_integer_sizes_are_taken_as_ints():
    """nn.Linear takes numpy integer sizes; NF4Linear / nf4_quantize / quantize_nf4 refused a numpy 64 as "not a
    power of two" (blocksize) or "not an int" (in_features)."""
    np = pytest.importorskip("numpy")
    layer = NF4Linear(np.int64(64), np.int32(8), blocksize=np.int64(32))
    assert (layer.in_features, layer.out_features, layer.blocksize) == (64, 8, 32)
    assert all(type(v) is int for v in (layer.in_features, layer.out_features, layer.blocksize))
    w = torch.randn(8, 64)
    qw = llmkern.nf4_quantize(w, blocksize=np.int64(32))
    assert type(qw.blocksize) is int and torch.equal(qw.dequantize(), llmkern.nf4_quantize(w, 32).dequantize())
    m = nn.Sequential(nn.Linear(64, 8))
    assert quantize_nf4(m, blocksize=np.int64(128)) == ["0"] and m[0].blocksize == 128
    assert m[0](torch.randn(2, 64)).shape == (2, 8)
    with pytest.raises(ValueError, match="blocksize must be a power of two .* got np.int64\\(48\\)"):
        llmkern.nf4_quantize(w, blocksize=np.int64(48))
