"""QLoRA: llmkern.peft.NF4Linear / quantize_nf4 / LoRALinear over a 4-bit base, and use_fused_lora on PEFT
models quantized with bitsandbytes (NF4). The oracle is always the same computation on the dequantized
dense weights (or PEFT's own forward)."""
import copy
import io

import pytest
import torch
from torch import nn

import llmkern
from llmkern import peft as lp
from llmkern.models import Llama, get_config
from llmkern.peft.lora import _set_submodule
from llmkern.testing import randomize_lora, triton_device

pytestmark = pytest.mark.usefixtures("one_thread")

needs_interpreter = pytest.mark.skipif(triton_device() is None, reason="no CUDA and no TRITON_INTERPRET")


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from llmkern import _backend

    assert _backend.choose_triton("lora_linear", torch.device("cpu"), torch.float32, (torch.float32,)) == "triton"


def _dense_copy(model):
    """The model with every NF4Linear (also under LoRALinear) replaced by its dequantized nn.Linear."""
    dense = copy.deepcopy(model)
    for name, m in list(dense.named_modules()):
        if isinstance(m, lp.NF4Linear):
            _set_submodule(dense, name, m.dequantize())
    return dense


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _dense_saved(fn, N, K):
    """Shapes of [N, K]-sized floating tensors autograd saves while fn() runs (a dense W kept for the
    backward), via saved-tensor hooks."""
    seen = []

    def pack(t):
        if t.is_floating_point() and t.numel() >= N * K and tuple(t.shape) in ((N, K), (K, N)):
            seen.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


# ---- NF4Linear ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K,N,bias", [(64, 48, True), (37, 23, False), (96, 5, True)])
def test_nf4_linear_matches_dense_dequantized_layer(dtype, K, N, bias):
    lin = nn.Linear(K, N, bias=bias).to(dtype)
    layer = lp.NF4Linear.from_linear(lin)
    assert layer.compute_dtype == dtype and layer.packed.dtype == torch.uint8 and layer.absmax.dtype == torch.float32
    dense = layer.dequantize()
    assert isinstance(dense, nn.Linear) and dense.weight.dtype == dtype and not dense.weight.requires_grad
    torch.testing.assert_close(dense.weight, llmkern.nf4_dequantize(llmkern.nf4_quantize(lin.weight)))
    x = torch.randn(3, 5, K).to(dtype)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    if bias:
        layer.bias.requires_grad_(True)
        dense.bias.requires_grad_(True)
    y, saved = _dense_saved(lambda: layer(xa), N, K)
    assert not saved, "the 4-bit layer kept a dense W for the backward"
    y_ref = dense(xb)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    if bias:
        torch.testing.assert_close(layer.bias.grad, dense.bias.grad, **tol)


def test_nf4_linear_state_dict_round_trip_and_casts():
    lin = nn.Linear(40, 24)
    layer = lp.NF4Linear.from_linear(lin, blocksize=32)
    sd = layer.state_dict()
    assert set(sd) == {"packed", "absmax", "bias", "weight_shape"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = lp.NF4Linear(40, 24, bias=True, blocksize=32)
    x = torch.randn(4, 40)
    assert fresh(x).abs().max() < 1e-3 * lin(x).abs().max()  # zeros + a zero bias until loaded
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh(x), layer(x), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="size mismatch"):
        lp.NF4Linear(40, 24, blocksize=64).load_state_dict(sd)
    # a module cast changes the compute dtype; the scales stay float32 (exactly)
    absmax = layer.absmax.clone()
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer.absmax.dtype == torch.float32 and torch.equal(layer.absmax, absmax)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    layer.float()
    assert layer.compute_dtype == torch.float32 and torch.equal(layer.absmax, absmax)
    assert "compute_dtype=torch.float32" in repr(layer)


def test_nf4_linear_errors_and_autocast():
    layer = lp.NF4Linear.from_linear(nn.Linear(16, 8))
    with pytest.raises(ValueError, match="compute_dtype"):
        layer(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must have shape \[..., 16\]"):
        layer(torch.randn(2, 15))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        lp.NF4Linear.from_linear(layer)
    with pytest.raises(ValueError, match="blocksize"):
        lp.NF4Linear.from_linear(nn.Linear(16, 8), blocksize=48)
    with pytest.raises(ValueError, match="in_features"):
        lp.NF4Linear(0, 8)
    with pytest.raises(ValueError, match="compute_dtype"):
        lp.NF4Linear(4, 8, compute_dtype=torch.int32)
    with pytest.raises(TypeError, match="qweight"):
        lp.nf4_dora_linear(torch.randn(2, 16), torch.randn(8, 16), None, torch.randn(2, 16), torch.randn(8, 2),
                           torch.ones(8), 1.0)
    x = torch.randn(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as F.linear: computed in the autocast dtype
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer.dequantize()(x), atol=5e-2, rtol=5e-2)


# ---- quantize_nf4 -----------------------------------------------------------------------------------------

def test_quantize_nf4_targets_skip_and_refusals():
    model = Llama(get_config("llama-tiny"), backend="torch")
    names = lp.quantize_nf4(copy.deepcopy(model))
    assert len(names) == 7 * model.config.n_layer and "lm_head" not in names
    m = copy.deepcopy(model)
    assert lp.quantize_nf4(m, ["q_proj", "down_proj"]) == [f"layers.{i}.{s}" for i in range(2)
                                                           for s in ("self_attn.q_proj", "mlp.down_proj")]
    assert type(m.layers[0].self_attn.k_proj) is nn.Linear
    assert lp.quantize_nf4(copy.deepcopy(model), r".*\.o_proj", skip=None) == ["layers.0.self_attn.o_proj",
                                                                               "layers.1.self_attn.o_proj"]
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        lp.quantize_nf4(copy.deepcopy(model), ["nope"])
    tied = Llama(get_config("llama-tiny", tie_embeddings=True), backend="torch")
    with pytest.raises(ValueError, match="tied weights"):
        lp.quantize_nf4(tied, skip=())
    assert type(tied.lm_head) is nn.Linear and type(tied.layers[0].self_attn.q_proj) is nn.Linear  # unchanged
    seq = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    assert lp.quantize_nf4(seq) == ["0"]  # the attention's out_proj (an nn.Linear subclass) stays dense
    bad = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).double())
    with pytest.raises(ValueError, match="quantize_nf4: 1: .*float32, float16 or bfloat16"):
        lp.quantize_nf4(bad)
    assert type(bad[0]) is nn.Linear  # checked before anything changed


def test_quantize_nf4_refuses_a_zoo_models_lm_head(monkeypatch):
    """The zoo's head_logits / loss path read lm_head.weight: quantize_nf4 leaves a zoo model's LM head dense,
    with a ValueError saying why, wherever the model sits and under a LoRA layer too."""
    from collections import OrderedDict

    from llmkern.peft import qlora

    model = Llama(get_config("llama-tiny"), backend="torch")
    with pytest.raises(ValueError, match=r"lm_head is the LM head of the llmkern zoo model Llama, .*reads "
                                         r"lm_head\.weight .*skip=\('lm_head',\)"):
        lp.quantize_nf4(model, skip=())
    assert type(model.lm_head) is nn.Linear and type(model.layers[0].self_attn.q_proj) is nn.Linear  # unchanged
    with pytest.raises(ValueError, match=r"lm\.lm_head is the LM head .* at 'lm'"):
        lp.quantize_nf4(nn.ModuleDict({"lm": model}), ["lm_head"], skip=None)
    lp.inject_lora(model, ["lm_head"], r=2)
    with pytest.raises(ValueError, match=r"lm_head\.base_layer is the LM head"):
        lp.quantize_nf4(model, ["lm_head"], skip=None)
    # why: without the check, the quantized head has no .weight for the zoo's logits path
    monkeypatch.setattr(qlora, "_check_zoo_heads", lambda *a: None)
    m = Llama(get_config("llama-tiny"), backend="torch")
    lp.quantize_nf4(m, ["lm_head"], skip=None)
    with pytest.raises(AttributeError, match="weight"):
        m(torch.randint(0, 256, (1, 4)))
    monkeypatch.undo()
    # a module named lm_head outside a zoo model is a plain layer: quantized
    seq = nn.Sequential(OrderedDict(body=nn.Linear(8, 8), lm_head=nn.Linear(8, 16)))
    assert lp.quantize_nf4(seq, skip=()) == ["body", "lm_head"] and isinstance(seq.lm_head, lp.NF4Linear)


def test_quantize_nf4_under_existing_lora_layers():
    """A LoRA adapter loaded into a dense model (or injected before quantizing) keeps working: its base
    layer is quantized under the LoRALinear's name; merged layers are refused."""
    model = Llama(get_config("llama-tiny"), backend="torch")
    lp.inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    randomize_lora(model, std=0.1)
    names = lp.quantize_nf4(model, ["q_proj", "k_proj"])
    assert "layers.0.self_attn.q_proj.base_layer" in names and "layers.0.self_attn.k_proj" in names
    q = model.layers[0].self_attn.q_proj
    assert q.quantized and not model.layers[0].self_attn.v_proj.quantized
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), _dense_copy(model)(ids), atol=1e-5, rtol=1e-5)
    m2 = Llama(get_config("llama-tiny"), backend="torch")
    lp.inject_lora(m2, ["q_proj"], r=4)
    lp.merge_lora(m2)
    with pytest.raises(ValueError, match="merged"):
        lp.quantize_nf4(m2)


# ---- QLoRA zoo models ---------------------------------------------------------------------------------------

def _qlora_pair(use_dora=False, backend="torch", seed=0, double_quant=False):
    torch.manual_seed(seed)
    model = Llama(get_config("llama-tiny"), backend=backend)
    lp.quantize_nf4(model, double_quant=double_quant)
    layers = [m for m in model.modules() if isinstance(m, lp.NF4Linear)]
    assert len(layers) == 7 * model.config.n_layer and all(m.double_quant == double_quant for m in layers)
    dense = _dense_copy(model)
    for m in (model, dense):
        torch.manual_seed(seed + 1)
        lp.inject_lora(m, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8, use_dora=use_dora)
        randomize_lora(m, std=0.1)
    return model, dense


def _loss_and_grads(model, ids):
    model.zero_grad()
    _, loss = model(ids, labels=ids)
    loss.backward()
    return loss.detach(), _lora_grads(model)


@pytest.mark.parametrize("use_dora,double_quant", [(False, False), (True, False), (False, True)])
def test_zoo_qlora_matches_dequantized_dense_and_trains(use_dora, double_quant):
    model, dense = _qlora_pair(use_dora, double_quant=double_quant)
    n_lora = 3 * model.config.n_layer * (2 + use_dora)
    assert lp.count_trainable_parameters(model) == lp.count_trainable_parameters(dense)
    assert len([p for p in model.parameters() if p.requires_grad]) == n_lora
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (model, dense)]
    losses = []
    for _ in range(3):  # a few training steps stay in lockstep with the dense model
        (lq, gq), (ld, gd) = _loss_and_grads(model, ids), _loss_and_grads(dense, ids)
        torch.testing.assert_close(lq, ld, atol=1e-5, rtol=1e-5)
        assert gq.keys() == gd.keys() and len(gq) == n_lora
        for n in gq:
            torch.testing.assert_close(gq[n], gd[n], atol=1e-5, rtol=1e-4, msg=n)
        for o in opts:
            o.step()
        losses.append(lq.item())
    assert losses[-1] < losses[0]


@needs_interpreter
def test_zoo_qlora_triton_kernels_match_dequantized_dense(triton_backend, monkeypatch):
    model, dense = _qlora_pair()
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(4))
    lq, gq = _loss_and_grads(model, ids)
    monkeypatch.setenv("LLMKERN_BACKEND", "reference")
    ld, gd = _loss_and_grads(dense, ids)
    torch.testing.assert_close(lq, ld, atol=1e-4, rtol=1e-4)
    for n in gq:
        torch.testing.assert_close(gq[n], gd[n], atol=1e-4, rtol=1e-3, msg=n)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("use_dora,dropout,double_quant", [(False, 0.0, False), (True, 0.1, False),
                                                           (False, 0.0, True), (True, 0.1, True)])
def test_lora_layer_on_nf4_keeps_no_dense_weight(request, monkeypatch, backend, use_dora, dropout, double_quant):
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    K, N = 64, 40
    base = lp.NF4Linear.from_linear(nn.Linear(K, N), double_quant=double_quant)
    layer = lp.LoRALinear(base, r=4, alpha=8, dropout=dropout, use_dora=use_dora).train()
    randomize_lora(layer, std=0.1)
    ref = lp.LoRALinear(layer.base_layer.dequantize(), r=4, alpha=8, dropout=dropout, use_dora=use_dora).train()
    ref.load_state_dict({k: v for k, v in layer.state_dict().items() if "base_layer" not in k}, strict=False)
    x = torch.randn(2, 7, K)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.manual_seed(5)
    y, saved = _dense_saved(lambda: layer(xa), N, K)
    assert not saved, "the QLoRA layer kept a dense W for the backward"
    monkeypatch.setenv("LLMKERN_BACKEND", "reference")
    torch.manual_seed(5)  # the same dropout seed: the same mask on every path
    y_ref = ref(xb)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-4, rtol=1e-4)
    for n, p in layer.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, dict(ref.named_parameters())[n].grad, atol=1e-4, rtol=1e-3, msg=n)


def test_qlora_layers_compile_fullgraph():
    """NF4Linear and a LoRALinear over it trace without graph breaks (the NF4Weight is made outside the
    traced forward and kept); compiled outputs and gradients equal eager ones."""
    torch.manual_seed(0)
    for layer in (lp.NF4Linear.from_linear(nn.Linear(64, 32)),
                  lp.LoRALinear(lp.NF4Linear.from_linear(nn.Linear(64, 32)), r=4),
                  lp.LoRALinear(lp.NF4Linear.from_linear(nn.Linear(64, 32), double_quant=True), r=4)):
        randomize_lora(layer, std=0.1)
        x = torch.randn(4, 64)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        got = torch.compile(layer, fullgraph=True)(xa)
        want = layer(xb)
        got.sum().backward()
        want.sum().backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(xa.grad, xb.grad)


def _saved(state_dict):
    """state_dict through torch.save / torch.load (what a checkpoint holds)."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf)


def test_nf4_linear_double_quant_keeps_8bit_scales():
    lin = nn.Linear(1024, 512)
    plain, dq = lp.NF4Linear.from_linear(lin), lp.NF4Linear.from_linear(lin, double_quant=True)
    qw = llmkern.nf4_quantize(lin.weight, double_quant=True)
    assert dq.double_quant and not plain.double_quant and plain.state2 is None
    assert set(dq.state_dict()) == {"packed", "absmax", "state2", "bias", "weight_shape"} and "double_quant=True" in repr(dq)
    assert dq.absmax.dtype == torch.uint8 and dq.state2.dtype == torch.float32
    assert torch.equal(dq.packed, plain.packed) and torch.equal(dq.absmax, qw.absmax)
    assert torch.equal(dq.state2, qw.state2)

    def scale_bits(layer):  # bits of scale state per weight
        sd = layer.state_dict()
        nbytes = sum(sd[k].numel() * sd[k].element_size() for k in ("absmax", "state2") if k in sd)
        return 8 * nbytes / lin.weight.numel()

    blocks = lin.weight.numel() // 64
    assert scale_bits(plain) == 0.5
    assert scale_bits(dq) == 8 * (blocks + 4 * (257 + blocks // 256)) / lin.weight.numel() < 0.15
    # the layer's NF4Weight is the nested one, over the layer's buffers (nothing copied, nothing decoded)
    w = dq.nf4_weight()
    assert w.nested is not None and w.absmax.data_ptr() == dq.absmax.data_ptr() and w.state2 is dq.state2
    dense = dq.dequantize()
    torch.testing.assert_close(dense.weight, qw.dequantize(), atol=0, rtol=0)
    assert not torch.equal(dense.weight, plain.dequantize().weight)  # the 8-bit scales' own rounding
    x = torch.randn(3, 1024)
    torch.testing.assert_close(dq(x), dense(x), atol=1e-5, rtol=1e-5)
    # from_nf4 shares the codes and the 8-bit scales of a nested NF4Weight
    layer = lp.NF4Linear.from_nf4(qw)
    assert layer.double_quant and layer.absmax is qw.absmax and layer.state2 is qw.state2


def test_nf4_linear_double_quant_state_dicts_of_both_layouts_and_casts():
    lin = nn.Linear(64, 40)
    plain, dq = lp.NF4Linear.from_linear(lin), lp.NF4Linear.from_linear(lin, double_quant=True)
    x = torch.randn(3, 64)
    fresh = lp.NF4Linear(64, 40, double_quant=True)
    assert fresh(x).abs().max() == 0  # zeros until loaded
    cached = fresh.nf4_weight()
    fresh.load_state_dict(_saved(dq.state_dict()))
    assert fresh.nf4_weight() is cached  # loaded in place: the cached NF4Weight reads the new state
    torch.testing.assert_close(fresh(x), dq(x), atol=0, rtol=0)
    # a state dict of the other layout: the layer's buffers follow it
    for src in (plain, dq):
        for start in (False, True):
            layer = lp.NF4Linear(64, 40, double_quant=start)
            layer.load_state_dict(_saved(src.state_dict()))
            assert layer.double_quant == src.double_quant and layer.absmax.dtype == src.absmax.dtype
            torch.testing.assert_close(layer(x), src(x), atol=0, rtol=0)
    # an absmax of the wrong dtype for the layout is refused (copy_ would cast float scales to uint8)
    with pytest.raises(RuntimeError, match=r"absmax: a state dict with state2 .* uint8 codes .* torch.float32"):
        lp.NF4Linear(64, 40).load_state_dict(dict(dq.state_dict(), absmax=plain.absmax))
    with pytest.raises(RuntimeError, match=r"without state2 .* float32 scales .* torch.uint8"):
        lp.NF4Linear(64, 40, double_quant=True).load_state_dict(
            {k: v for k, v in dq.state_dict().items() if k != "state2"})
    with pytest.raises(RuntimeError, match="size mismatch for state2"):
        lp.NF4Linear(64, 40).load_state_dict(dict(dq.state_dict(), state2=dq.state2[:-1]))
    # module casts change the compute dtype; absmax codes and the fp32 state2 stay as they are
    codes, state2, want, weight = dq.absmax.clone(), dq.state2.clone(), dq(x), dq.dequantize().weight
    for cast, dt in ((lambda m: m.to(torch.bfloat16), torch.bfloat16), (lambda m: m.half(), torch.float16)):
        cast(dq)
        assert dq.compute_dtype == dt and dq.bias.dtype == dt and dq.nf4_weight().dtype == dt
        assert dq.state2.dtype == torch.float32 and torch.equal(dq.state2, state2) and torch.equal(dq.absmax, codes)
        torch.testing.assert_close(dq(x.to(dt)).float(), want, atol=5e-2, rtol=5e-2)
    dq.float()  # the weight comes back exactly (the bias went through bf16 / fp16, as an nn.Linear's would)
    assert dq.compute_dtype == torch.float32 and torch.equal(dq.dequantize().weight, weight)
    meta = copy.deepcopy(dq).to("meta")  # a device move takes every buffer along, dtypes kept
    assert {b.device.type for b in meta.buffers()} == {"meta"}
    assert meta.absmax.dtype == torch.uint8 and meta.state2.dtype == torch.float32
    assert meta.nf4_weight().state2 is meta.state2


def test_quantize_nf4_double_quant_argument():
    with pytest.raises(TypeError, match="double_quant must be a bool"):
        lp.quantize_nf4(nn.Sequential(nn.Linear(8, 8)), double_quant=1)
    with pytest.raises(TypeError, match="double_quant must be a bool"):
        lp.NF4Linear.from_linear(nn.Linear(8, 8), double_quant="yes")
    seq = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 8))
    lp.quantize_nf4(seq, double_quant=True)
    assert seq[0].double_quant and seq[1].double_quant and seq[1].state2.numel() == 258


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_dora_with_dropout_matches_dense_dora(double_quant):
    K, N = 48, 32
    base = lp.NF4Linear.from_linear(nn.Linear(K, N), double_quant=double_quant)
    layer = lp.LoRALinear(base, r=4, alpha=8, dropout=0.2, use_dora=True).train()
    ref = lp.LoRALinear(base.dequantize(), r=4, alpha=8, dropout=0.2, use_dora=True).train()
    # the magnitude starts at the row norms of the dequantized weight (the layer starts as its base)
    torch.testing.assert_close(layer.lora_magnitude_vector, ref.lora_magnitude_vector)
    randomize_lora(layer, std=0.1)
    randomize_lora(ref, std=0.1)
    x = torch.randn(6, K)
    outs = []
    for m in (layer, ref):
        torch.manual_seed(7)
        y = m(x)
        y.pow(2).sum().backward()
        outs.append((y, _lora_grads(m)))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    for n in outs[0][1]:
        torch.testing.assert_close(outs[0][1][n], outs[1][1][n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_merge_behaviour(double_quant):
    model, _ = _qlora_pair(double_quant=double_quant)
    q = model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="remove=True"):
        q.merge()
    with pytest.raises(ValueError, match="remove=True"):
        lp.merge_lora(model)
    assert all(not m.merged for _, m in lp.lora_modules(model))  # nothing merged
    lp.unmerge_lora(model)  # nothing to undo
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        before = model(ids)
        lp.merge_lora(model, remove=True)
        after = model(ids)
    assert not lp.lora_modules(model)
    merged_q = model.layers[0].self_attn.q_proj
    assert type(merged_q) is nn.Linear and not merged_q.weight.requires_grad
    assert isinstance(model.layers[0].self_attn.k_proj, lp.NF4Linear)  # not a LoRA layer: stays 4-bit
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    # DoRA: merged_linear holds (m / ‖W + sBA‖) ⊙ (W + sBA) of the dequantized W
    layer = lp.LoRALinear(lp.NF4Linear.from_linear(nn.Linear(32, 16), double_quant=double_quant), r=4,
                          use_dora=True)
    randomize_lora(layer, std=0.1)
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer.merged_linear()(x), layer(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        layer.merged_linear()


def test_qlora_adapter_saves_and_loads_both_ways(tmp_path):
    """Adapters trained on a QLoRA model save in PEFT's format; they load into a dense model (then
    quantize_nf4 it: the same codes), into a quantized model with LoRA injected first, and into a quantized
    model without LoRA (QLoRA's usual order: quantize, then load the adapter)."""
    model, _ = _qlora_pair()
    lp.save_peft_adapter(model, str(tmp_path))
    ids = torch.randint(0, 256, (1, 8))
    torch.manual_seed(0)
    dense = Llama(get_config("llama-tiny"), backend="torch")  # _qlora_pair's model before quantize_nf4
    lp.load_peft_adapter(dense, str(tmp_path))
    lp.quantize_nf4(dense)
    injected, _ = _qlora_pair()
    randomize_lora(injected, seed=9, std=0.1)
    lp.load_peft_adapter(injected, str(tmp_path))
    with torch.no_grad():
        want = model(ids)
        torch.testing.assert_close(dense(ids), want, atol=0, rtol=0)
        torch.testing.assert_close(injected(ids), want, atol=0, rtol=0)
    torch.manual_seed(0)
    quantized = Llama(get_config("llama-tiny"), backend="torch")
    lp.quantize_nf4(quantized)
    lp.load_peft_adapter(quantized, str(tmp_path))  # (was refused: "a NF4Linear, not an nn.Linear")
    assert {n for n, _ in lp.lora_modules(quantized)} == {n for n, _ in lp.lora_modules(model)}
    with torch.no_grad():
        torch.testing.assert_close(quantized(ids), want, atol=0, rtol=0)


def test_qlora_adapter_on_some_layers_saves_peft_targets_of_those_only(tmp_path):
    """save_peft_adapter counts the 4-bit layers among the candidates of PEFT's target_modules: LoRA on one of
    two q_proj layers must not save target_modules=["q_proj"] (PEFT would wrap both, the second untrained)."""
    peft = pytest.importorskip("peft")

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = nn.Linear(64, 64), nn.Linear(64, 64)

        def forward(self, x):
            return self.v_proj(self.q_proj(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            return self.layers[1](self.layers[0](x))

    torch.manual_seed(0)
    base = Net()
    model = copy.deepcopy(base)
    lp.quantize_nf4(model)
    lp.inject_lora(model, ["layers.0.q_proj"], r=4, alpha=8)
    lp.save_peft_adapter(model, str(tmp_path), task_type=None)
    import json

    targets = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert targets != ["q_proj"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    wrapped = [n for n, m in loaded.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert wrapped == ["base_model.model.layers.0.q_proj"]


# ---- PEFT models quantized with bitsandbytes --------------------------------------------------------------

def _bnb_peft_model(tmp_path, double_quant=True, compute_dtype=torch.float32, dtype=torch.float32,
                    targets=("q_proj", "v_proj", "down_proj"), **lora):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    # in_features multiples of 64: bitsandbytes 0.50's CPU dequantization is wrong when a 64-block spans
    # two rows (see test_bnb_cpu_blocks_spanning_rows)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                   attn_implementation="eager")
    path = tmp_path / "tiny-llama"
    if not path.exists():
        transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_compute_dtype=compute_dtype,
                                           bnb_4bit_use_double_quant=double_quant)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=qcfg, device_map="cpu",
                                                             dtype=dtype)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                      lora_dropout=0.0, **lora))
    randomize_lora(model, std=0.1)
    # train mode: in eval mode without grad, bitsandbytes repacks CPU weights into its own inference layout
    return model.train()


def _logits_and_grads(model, ids):
    model.zero_grad()
    out = model(ids).logits
    out.float().pow(2).mean().backward()
    return out.detach(), _lora_grads(model)


def _count_nf4_calls(monkeypatch):
    from llmkern.integrations import peft as ip
    from llmkern.ops.nf4 import NF4Weight

    calls = []
    orig = ip.lora_linear
    monkeypatch.setattr(ip, "lora_linear", lambda *a, **k: calls.append(isinstance(a[1], NF4Weight)) or orig(*a, **k))
    return calls


@pytest.mark.parametrize("backend,double_quant", [("reference", True), ("reference", False), ("triton", True)])
def test_use_fused_lora_on_bnb_4bit_same_logits_and_grads(tmp_path, monkeypatch, request, backend, double_quant):
    if backend == "triton":
        if triton_device() is None:
            pytest.skip("no CUDA and no TRITON_INTERPRET")
        request.getfixturevalue("triton_backend")
    monkeypatch.setenv("LLMKERN_BACKEND", backend)
    from llmkern.integrations.peft import use_fused_lora

    model = _bnb_peft_model(tmp_path, double_quant)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb" and type(layer.base_layer).__name__ == "Linear4bit"
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    want, want_g = _logits_and_grads(model, ids)
    calls = _count_nf4_calls(monkeypatch)
    use_fused_lora(model)
    got, got_g = _logits_and_grads(model, ids)
    assert calls == [True] * 6  # every targeted 4-bit layer ran the fused op on its NF4 codes
    tol = dict(atol=1e-5, rtol=1e-5) if backend == "reference" else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, want, **tol)
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], atol=1e-5, rtol=1e-3, msg=n)
    use_fused_lora(model, enable=False)
    assert not any(hasattr(m, "_llmkern_orig_forward") or hasattr(m, "_llmkern_nf4_cache") for m in model.modules())


def test_use_fused_lora_4bit_cache_follows_the_weight(tmp_path, monkeypatch):
    import bitsandbytes as bnb
    from llmkern.integrations.peft import use_fused_lora

    model = _bnb_peft_model(tmp_path, targets=("q_proj",))
    use_fused_lora(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    layer(x)
    cached = layer._llmkern_nf4_cache[1]
    layer(x)
    assert layer._llmkern_nf4_cache[1] is cached  # the double-quantized absmax is expanded once
    # a new weight (same shape): the cache is rebuilt, the result follows it
    W = torch.randn(64, 64)
    layer.base_layer.weight = bnb.nn.Params4bit(W, requires_grad=False, quant_type="nf4").to("cpu")
    got = layer(x)
    assert layer._llmkern_nf4_cache[1] is not cached
    want = layer._llmkern_orig_forward(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_use_fused_lora_4bit_falls_back_where_bnb_differs(tmp_path, monkeypatch):
    from llmkern import _backend
    from llmkern.integrations.peft import use_fused_lora

    monkeypatch.setattr(_backend, "_warned", set())
    # float32 inputs on bf16-compute layers: bitsandbytes rounds the base product through bf16; kept on PEFT
    model = _bnb_peft_model(tmp_path, compute_dtype=torch.bfloat16, targets=("q_proj",))
    ids = torch.randint(0, 64, (2, 8))
    want, want_g = _logits_and_grads(model, ids)
    calls = _count_nf4_calls(monkeypatch)
    use_fused_lora(model)
    with pytest.warns(RuntimeWarning, match="compute_dtype=torch.bfloat16"):
        got, got_g = _logits_and_grads(model, ids)
    assert not calls
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # DoRA on a 4-bit base: PEFT's forward
    dora = _bnb_peft_model(tmp_path, targets=("q_proj",), use_dora=True)
    with torch.no_grad():
        want = dora(ids).logits
        use_fused_lora(dora)
        torch.testing.assert_close(dora(ids).logits, want, atol=0, rtol=0)
    assert not calls
    # eval mode without grad: bitsandbytes may repack the CPU weights (packing_format_for_cpu); after that
    # the codes are not in the NF4 layout, and the layer stays on PEFT's forward
    model = _bnb_peft_model(tmp_path, targets=("q_proj",)).eval()
    with torch.no_grad():
        want = model(ids).logits
        use_fused_lora(model)
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    state = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.quant_state
    assert len(calls) == (0 if getattr(state, "packing_format_for_cpu", False) else 2)


def test_use_fused_lora_on_bnb_4bit_bf16(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKERN_BACKEND", "reference")
    from llmkern.integrations.peft import use_fused_lora

    model = _bnb_peft_model(tmp_path, compute_dtype=torch.bfloat16, dtype=torch.bfloat16, targets=("q_proj", "v_proj"))
    for m in model.modules():  # PEFT keeps the adapters in float32 by default (computed in float32)
        if hasattr(m, "lora_A"):
            m.to(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 8))
    want, want_g = _logits_and_grads(model, ids)
    calls = _count_nf4_calls(monkeypatch)
    use_fused_lora(model)
    got, got_g = _logits_and_grads(model, ids)
    assert calls == [True] * 4
    torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)
    for n in want_g:
        torch.testing.assert_close(got_g[n].float(), want_g[n].float(), atol=2e-2, rtol=1e-1, msg=n)


def test_nf4_linear_from_bnb_matches_the_bnb_layer():
    bnb = pytest.importorskip("bitsandbytes")
    lin = nn.Linear(128, 32)
    for double_quant in (False, True):
        q = bnb.nn.Linear4bit(128, 32, compute_dtype=torch.float32, compress_statistics=double_quant,
                              quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant)
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        q = q.to("cpu").train()
        layer = lp.NF4Linear.from_bnb(q)
        state = q.weight.quant_state
        # bitsandbytes' scales are shared, not copied; double-quantized ones stay 8-bit codes
        assert layer.double_quant == double_quant and layer.absmax.data_ptr() == state.absmax.data_ptr()
        assert layer.absmax.dtype == (torch.uint8 if double_quant else torch.float32)
        if double_quant:
            want = torch.cat([state.state2.code, state.offset.reshape(1), state.state2.absmax])
            assert torch.equal(layer.state2, want) and layer.nf4_weight().state2 is layer.state2
        x = torch.randn(5, 128)
        torch.testing.assert_close(layer(x), q(x), atol=1e-5, rtol=1e-5)
        if not double_quant:  # the same bytes as llmkern's own quantizer
            assert torch.equal(layer.packed, lp.NF4Linear.from_linear(lin).packed)


def test_bnb_cpu_blocks_spanning_rows():
    """Documents why the bitsandbytes tests use in_features % 64 == 0: bitsandbytes 0.50.2's CPU
    dequantize_4bit is wrong where a 64-element block spans two rows; llmkern reads the same codes right."""
    bnb = pytest.importorskip("bitsandbytes")
    W = torch.randn(8, 32)
    p = bnb.nn.Params4bit(W.clone(), requires_grad=False, quant_type="nf4", compress_statistics=False).to("cpu")
    from bitsandbytes.functional import dequantize_4bit

    ours = llmkern.ops.nf4.NF4Weight.from_bnb(p).dequantize()
    assert torch.equal(llmkern.nf4_quantize(W).packed, p.data.reshape(-1))  # the same codes
    assert (ours - W).abs().max() < 0.5  # NF4's rounding error on N(0, 1) weights
    theirs = dequantize_4bit(p.data, p.quant_state)
    if (theirs - W).abs().max() < 0.5:
        pytest.skip("this bitsandbytes dequantizes blocks spanning rows right on CPU")


# ---- the benchmark row ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_bnb", [True, False])
def test_bench_qlora_row_baselines_compute_the_same_layer(monkeypatch, with_bnb):
    from llmkern.bench.suites import lora as suite

    if with_bnb:
        pytest.importorskip("bitsandbytes")
    else:
        monkeypatch.setattr(suite, "_bnb_linear4bit", lambda W, b: None)
    def run_once(fn):
        fn()
        return 1.0

    M, K, N = 16, 64, 32
    W, b, x, dy = torch.randn(N, K) / 8, torch.randn(N), torch.randn(M, K), torch.randn(M, N)
    rnd = lambda *s, sc=1.0: torch.randn(*s) * sc  # noqa: E731
    rows = list(suite._qlora_rows(x.requires_grad_(True), W, b, dy, rnd, 4, run_once, "float32", 1.0))
    assert len(rows) == 1 and rows[0].op == "qlora lora_linear fwd+bwd (NF4 W)"
    assert ("bitsandbytes" in rows[0].baseline) == with_bnb
    if with_bnb:  # the bitsandbytes baseline layer computes x·dequant(nf4(W))ᵀ + b, as ours
        layer = suite._bnb_linear4bit(W, b)
        ref = nn.functional.linear(x, llmkern.nf4_dequantize(llmkern.nf4_quantize(W)), b)
        torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


_NF4_STORAGE = ("packed", "absmax", "state2", "weight_shape")


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_cast(model, before, dtype):
    """Every floating parameter / buffer of `model` is `dtype` holding its `before` value (cast), except the NF4
    storage (codes, scales, shape), which kept its dtype and bytes; every NF4Linear computes in `dtype`."""
    now = model.state_dict()
    assert now.keys() == before.keys()
    for k, old in before.items():
        if k.rpartition(".")[2] in _NF4_STORAGE or not old.is_floating_point():
            assert now[k].dtype == old.dtype and torch.equal(now[k], old), k
        else:
            assert now[k].dtype == dtype and torch.equal(now[k], old.to(dtype)), k
    assert all(m.compute_dtype == dtype for m in model.modules() if isinstance(m, lp.NF4Linear))


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4linear_casts_to_float64_and_back(double_quant):
    """was: .double() / .to(torch.float64) raised from NF4Linear._apply, which a model reaches after Module._apply has
    cast the modules before it (a model left half float64). Now a float64 cast works as for an nn.Linear: the codes
    stay 4-bit and the scales float32 (the same bytes), bias and compute dtype follow, and the layer computes in
    float64 (the reference: no kernel), so gradcheck runs on it. .float() gives the layer back exactly."""
    torch.manual_seed(0)
    q = lp.NF4Linear.from_linear(nn.Linear(64, 16), double_quant=double_quant)
    before = _snapshot(q)
    x = torch.randn(3, 64)
    y32 = q(x)
    W64 = q.dequantize().weight.double()  # the float32 dequantized weight, exactly
    for cast in (lambda m: m.double(), lambda m: m.to(torch.float64), lambda m: m.type(torch.float64)):
        assert cast(q) is q
        _assert_cast(q, before, torch.float64)
        xd = x.double().requires_grad_()
        y = q(xd)
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, nn.functional.linear(xd, W64, before["bias"].double()), atol=1e-12, rtol=0)
        assert torch.autograd.gradcheck(q, (xd[:2],))
        torch.testing.assert_close(q.dequantize().weight, W64, atol=0, rtol=0)
        q.float()
        _assert_cast(q, before, torch.float32)
        torch.testing.assert_close(q(x), y32, atol=0, rtol=0)


def test_nf4linear_type_cast_keeps_the_codes():
    """was: Module.type(dtype) casts every buffer, the uint8 codes and int64 shape too (codes turned into float16
    numbers: the weight lost); only the float32 scales were kept."""
    q = lp.NF4Linear.from_linear(nn.Linear(64, 16), double_quant=True)
    before, W = _snapshot(q), q.dequantize().weight
    q.type(torch.float16)
    _assert_cast(q, before, torch.float16)
    torch.testing.assert_close(q.dequantize().weight, W.half(), atol=0, rtol=0)
    assert q(torch.randn(2, 64).half()).dtype == torch.float16


def _qlora_net(use_dora):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 24), nn.Linear(24, 16))
    lp.quantize_nf4(model, ["1", "3"], blocksize=32)
    lp.quantize_nf4(model, ["4"], double_quant=True)
    lp.inject_lora(model, ["1", "4"], r=4, use_dora=use_dora)  # "3" stays a bare NF4Linear
    randomize_lora(model, seed=1)
    return model


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_model_casts_to_float64_as_a_whole(use_dora):
    """was: model.double() raised at the first NF4Linear, the dense layer (and LoRA weights) before it already float64
    and the rest still float32. Now every module is cast (codes and scales kept), the float64 model computes what
    the dense float64 model of the dequantized weights does, gradcheck passes, and .float() gives it back exactly."""
    model = _qlora_net(use_dora)
    before = _snapshot(model)
    x = torch.randn(5, 32)
    y32 = model(x)
    for cast in (lambda m: m.double(), lambda m: m.to(torch.float64)):
        assert cast(model) is model
        _assert_cast(model, before, torch.float64)
        xd = x.double()
        y = model(xd)
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, _dense_copy(model)(xd), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(y, y32.double(), atol=1e-5, rtol=1e-5)
        # (DoRA's row norm is detached, as PEFT's: its gradient in A, B is not the true one, so x only)
        lora = [] if use_dora else [p for p in model.parameters() if p.requires_grad][:2]
        assert torch.autograd.gradcheck(lambda inp, *ps: model(inp), (xd[:2].requires_grad_(), *lora))
        model.float()
        _assert_cast(model, before, torch.float32)
        torch.testing.assert_close(model(x), y32, atol=0, rtol=0)
    model.half()  # (float16 / bfloat16 casts worked and still do)
    _assert_cast(model, before, torch.float16)


def test_qlora_model_cast_to_a_dtype_nf4_cannot_compute_in_is_whole():
    """A cast to a floating dtype the layer cannot compute in (float8) casts the whole model as for dense layers
    (was: refused at the first NF4Linear, the modules before it cast); its forward then says why, and a cast back
    makes it usable again."""
    model = _qlora_net(False)
    before = _snapshot(model)
    model.to(torch.float8_e4m3fn)
    now = model.state_dict()
    for k, old in before.items():
        want = old.dtype if k.rpartition(".")[2] in _NF4_STORAGE else torch.float8_e4m3fn
        assert now[k].dtype == want, k
        if k.rpartition(".")[2] in _NF4_STORAGE:
            assert torch.equal(now[k], old), k
    with pytest.raises(ValueError, match=r"NF4Linear computes in .* not its compute_dtype torch.float8_e4m3fn"):
        model[3](torch.randn(2, 48).to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="not its compute_dtype torch.float8_e4m3fn"):
        model[1](torch.randn(2, 32).to(torch.float8_e4m3fn))
    model.float()
    assert model(torch.randn(2, 32)).dtype == torch.float32


def test_qlora_gpt_partial_dora_adapter_saves(tmp_path):
    """GPT's q/k/v LoRAs save as one c_attn LoRA; with DoRA the magnitude rows of the projections without a
    LoRA are their base rows' norms, read from the 4-bit base (dequantized) after quantize_nf4."""
    from llmkern.models import build
    from llmkern.peft import inject_lora, quantize_nf4, save_peft_adapter
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = build("gpt-tiny")
    dense_k = model.get_submodule("h.0.attn.k_proj").weight.detach().clone()
    quantize_nf4(model)
    inject_lora(model, ["q_proj"], r=4, use_dora=True)
    save_peft_adapter(model, str(tmp_path))
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    mags = [t for n, t in tensors.items() if "magnitude" in n]
    assert mags and all(torch.isfinite(t).all() and (t > 0).all() for t in mags)
    # layer 0's c_attn magnitude: the k rows are ‖dequantized W_k‖ per row, close to the dense norms
    d = dense_k.shape[0]
    mag0 = next(t for n, t in tensors.items() if "magnitude" in n and ".0." in n)
    torch.testing.assert_close(mag0[d:2 * d].float(), dense_k.norm(dim=1), rtol=0.05, atol=1e-3)


def test_nf4_weight_made_under_inference_mode_trains_later():
    """An NF4Weight built under torch.inference_mode (use_fused_lora's cache at an evaluation) held inference
    tensors (the level-pair table, the double-quantization state) that a later training step saves for backward."""
    from llmkern.ops.nf4 import NF4Weight, nf4_quantize

    q0 = nf4_quantize(torch.randn(16, 64), blocksize=32, double_quant=True)
    with torch.inference_mode():  # (the codes and scales: the model's own tensors, as bitsandbytes' are)
        q = NF4Weight(q0.packed, q0.absmax, q0.shape, q0.blocksize, nested=q0.nested)
    assert not q.pairs.is_inference() and not q.state2.is_inference()
    x = torch.randn(3, 64, requires_grad=True)
    llmkern.nf4_linear(x, q).sum().backward()
    torch.testing.assert_close(x.grad, q.dequantize(torch.float32).sum(0).expand(3, 64), rtol=1e-5, atol=1e-5)


def test_nf4_linear_state_dict_refuses_another_shape():
    """The flat buffers of a [64, 32] layer fit a [32, 64] one: the load succeeded with the values reshaped."""
    from llmkern.peft import NF4Linear

    src = NF4Linear.from_linear(torch.nn.Linear(64, 32, bias=False))
    dst = NF4Linear(32, 64, bias=False)
    with pytest.raises(RuntimeError, match="size mismatch"):
        dst.load_state_dict(src.state_dict())
    same = NF4Linear(64, 32, bias=False)
    same.load_state_dict(src.state_dict())
    assert torch.equal(same.nf4_weight().dequantize(), src.nf4_weight().dequantize())
    old = {k: v for k, v in src.state_dict().items() if k != "weight_shape"}  # a checkpoint without the shape
    NF4Linear(64, 32, bias=False).load_state_dict(old)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict  # (resolves every key by name)

    assert set(get_model_state_dict(torch.nn.Sequential(src))) == {"0." + k for k in src.state_dict()}
