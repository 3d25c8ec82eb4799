"""use_fused_lora on PEFT's default float32 adapters of a 16-bit model (autocast_adapter_dtype=True).

Under torch.autocast PEFT computes them in the autocast dtype (F.linear casts x, A and B), so the fused op,
which rounds A and B to that dtype, computes the same up to accumulation order: they are fused, per call.
Outside autocast PEFT computes them in float32: PEFT's forward (a warning, once), unless float32_adapters="round".
A float32 model under autocast (AMP), or a 16-bit one under the other 16-bit autocast dtype, is fused too: F.linear
casts its weights to the autocast dtype as the fused op does (DoRA there keeps PEFT's forward: tests/test_peft.py).

Tolerance: the fused result must be as close to PEFT's as PEFT's own 16-bit result is to the float64 one (twice
that, plus 2^-10 of the largest value): differences at the 16-bit rounding, not a looser absolute bound.
"""
import copy
import warnings

import pytest
import torch

from llmkern import _backend
from llmkern.integrations import peft as ip
from llmkern.testing import randomize_lora, tiny_hf_llama, triton_device

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models
V = 64
TARGETS = ("q_proj", "v_proj", "down_proj")


def _model(dtype=torch.bfloat16, use_dora=False, layers=2, targets=TARGETS, extra=()):
    base = tiny_hf_llama(0, vocab=V, hidden=32, layers=layers, heads=4).to(dtype)
    cfg = lambda r: peft.LoraConfig(r=r, lora_alpha=8, target_modules=list(targets), use_dora=use_dora)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, cfg(4))
        for i, name in enumerate(extra):
            model.add_adapter(name, cfg(2 + 4 * i))
    g = torch.Generator().manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_A" in n or "lora_B" in n:
            assert p.dtype == torch.float32  # PEFT's default for a 16-bit model
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _ids(B=2, T=8):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0))


def _run(model, ids, autocast=None, scale=1.0, **kw):
    """(logits, input-embedding grad, {param: grad}) of one forward/backward, under autocast to `autocast`."""
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    model.zero_grad()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = model(inputs_embeds=emb, **kw).logits
    (out.float().pow(2).mean() * scale).backward()
    return out.detach(), emb.grad, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _truth(model, ids, **kw):
    exact = copy.deepcopy(model)
    ip.use_fused_lora(exact, enable=False)
    return _run(exact.double(), ids, **kw)


def _err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _assert_like_peft(got, want, truth):
    """got (fused) vs want (PEFT) at the 16-bit rounding: no further from PEFT than PEFT is from float64."""
    pairs = [("logits", got[0], want[0], truth[0]), ("x grad", got[1], want[1], truth[1])]
    pairs += [(n, got[2][n], want[2][n], truth[2][n]) for n in want[2]]
    for name, g, w, t in pairs:
        assert g.dtype == w.dtype, name  # (the float32 parameters' gradients too)
        assert _err(g, w) <= 2 * _err(w, t) + 2 ** -10, (name, _err(g, w), _err(w, t))


def _count(monkeypatch, *names):
    calls = []
    for name in names:
        orig = getattr(ip, name)
        monkeypatch.setattr(ip, name, lambda *a, _o=orig, _n=name, **k: calls.append(_n) or _o(*a, **k))
    return calls


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_float32_adapters_fuse_under_autocast(monkeypatch, use_dora):
    model = _model(use_dora=use_dora)
    ids = _ids()
    want = _run(model, ids, torch.bfloat16)
    truth = _truth(model, ids)
    calls = _count(monkeypatch, "lora_linear", "dora_linear")
    ip.use_fused_lora(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fused: nothing to warn about
        got = _run(model, ids, torch.bfloat16)
    assert calls == ["dora_linear" if use_dora else "lora_linear"] * 6
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got[2].values())
    _assert_like_peft(got, want, truth)


@pytest.mark.parametrize("base", [torch.float16, torch.float32], ids=["fp16", "fp32-amp"])
def test_float32_adapters_fuse_under_fp16_autocast_on_the_kernels(monkeypatch, triton_backend, base):
    """The Triton kernels (the interpreter takes float16, not bfloat16); the loss scaled as fp16 training's
    GradScaler does (unscaled, the tiny gradients underflow float16 in PEFT as in the kernels). A float32 base
    (AMP) too: F.linear and the fused op cast its weights to float16."""
    if triton_device() != "cpu":
        pytest.skip("the interpreter's tiny shapes")
    model = _model(base, layers=1, targets=("q_proj",))
    ids = _ids(B=1)
    want = _run(model, ids, torch.float16, scale=2.0 ** 12)
    truth = _truth(model, ids, scale=2.0 ** 12)
    calls = _count(monkeypatch, "lora_linear")
    ip.use_fused_lora(model)
    got = _run(model, ids, torch.float16, scale=2.0 ** 12)
    assert len(calls) == 1
    _assert_like_peft(got, want, truth)


def test_outside_autocast_peft_forward_once_warned_or_round(monkeypatch):
    """Per call: outside autocast PEFT's forward (float32 math, bit for bit, one warning), under autocast fused;
    with float32_adapters="round" fused outside autocast too, computing what PEFT computes under autocast."""
    monkeypatch.setattr(_backend, "_warned", set())
    model = _model()
    ids = _ids()
    want = _run(model, ids)
    want_ac = _run(model, ids, torch.bfloat16)
    truth = _truth(model, ids)
    calls = _count(monkeypatch, "lora_linear")
    with pytest.raises(ValueError, match="float32_adapters"):
        ip.use_fused_lora(model, float32_adapters="float32")
    assert not any(hasattr(m, ip._ORIG) for m in model.modules())  # refused before any change
    ip.use_fused_lora(model)
    with pytest.warns(RuntimeWarning) as rec:
        got = _run(model, ids)
        _run(model, ids)
    msgs = [str(w.message) for w in rec if "use_fused_lora" in str(w.message)]
    assert len(msgs) == 1 and 'float32_adapters="round"' in msgs[0] and "autocast" in msgs[0], msgs
    assert not calls
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _run(model, ids, torch.bfloat16)
    assert len(calls) == 6  # the same layers, fused in this call
    calls.clear()
    with torch.autocast("cpu", dtype=torch.float16), torch.no_grad():  # (F.linear casts the bf16 base to float16)
        model(ids)
    assert len(calls) == 6
    calls.clear()
    ip.use_fused_lora(model, float32_adapters="round")  # (on a fused model: changes the mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _run(model, ids)
    assert len(calls) == 6
    _assert_like_peft(got, want_ac, truth)
    ip.use_fused_lora(model, enable=False)
    assert not any(hasattr(m, ip._FP32_MODE) for m in model.modules())


@pytest.mark.parametrize("base", [torch.bfloat16, torch.float32], ids=["bf16", "fp32-amp"])
def test_float32_adapters_mixed_batch_under_autocast(monkeypatch, base):
    model = _model(base, extra=("b",))
    ids = _ids(B=3)
    names = ["b", "__base__", "default"]
    want = _run(model, ids, torch.bfloat16, adapter_names=names)
    truth = _truth(model, ids, adapter_names=names)
    calls = _count(monkeypatch, "lora_linear_multi")
    ip.use_fused_lora(model)
    got = _run(model, ids, torch.bfloat16, adapter_names=names)
    assert len(calls) == 6
    _assert_like_peft(got, want, truth)


@pytest.mark.parametrize("base,ac", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)],
                         ids=["fp32-amp-bf16", "bf16-fp16"])
def test_base_of_another_dtype_fuses_under_autocast(monkeypatch, base, ac):
    """A float32 model under bf16 autocast (AMP: Trainer's bf16=True on a model loaded in float32), and a bf16
    one under fp16 autocast: PEFT's F.linear casts x, W, A and B to the autocast dtype, as the fused op does."""
    model = _model(base)
    ids = _ids()
    scale = 2.0 ** 12 if ac == torch.float16 else 1.0  # (GradScaler's: unscaled, fp16 gradients underflow)
    want = _run(model, ids, ac, scale=scale)
    truth = _truth(model, ids, scale=scale)
    calls = _count(monkeypatch, "lora_linear")
    ip.use_fused_lora(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _run(model, ids, ac, scale=scale)
    assert len(calls) == 6 and got[0].dtype == ac
    _assert_like_peft(got, want, truth)


def test_float32_adapters_gpt2_conv1d_under_autocast(monkeypatch):
    """GPT-2's Conv1D layers (fan_in_fan_out=True), bf16 with PEFT's float32 adapters."""
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=1, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    base = transformers.GPT2LMHeadModel(cfg).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                          fan_in_fan_out=True)).eval()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    ids = _ids()
    want = _run(model, ids, torch.bfloat16)
    truth = _truth(model, ids)
    calls = _count(monkeypatch, "lora_linear")
    ip.use_fused_lora(model)
    got = _run(model, ids, torch.bfloat16)
    assert len(calls) == 3  # c_attn, attn.c_proj, mlp.c_proj
    _assert_like_peft(got, want, truth)


def test_autocast_dispatch_compiles_per_call(monkeypatch):
    """torch.compile(fullgraph=True) of a fused layer: the autocast check traces, guarded (one graph fused under
    autocast, one on PEFT's forward outside it), each giving its eager result."""
    model = _model(layers=1, targets=("q_proj",))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 8, 32, dtype=torch.bfloat16)
    ip.use_fused_lora(model)
    traced = _count(monkeypatch, "lora_linear")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want_ac = layer(x)
        traced.clear()
        fn = torch.compile(lambda t: layer(t), backend="eager", fullgraph=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_ac = fn(x)
        assert len(traced) == 1
        got = fn(x)
        assert len(traced) == 1
    assert want.dtype == got.dtype == torch.bfloat16
    torch.testing.assert_close(got_ac, want_ac, rtol=0, atol=0)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _bnb_model(tmp_path):
    """A tiny Llama loaded in bf16 with bitsandbytes NF4 layers computing in bf16 (QLoRA), float32 adapters."""
    pytest.importorskip("bitsandbytes")
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4, attn_implementation="eager")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)  # (in_features multiples of 64: bnb's CPU blocks)
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_compute_dtype=torch.bfloat16)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=qcfg, device_map="cpu",
                                                             dtype=torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model, std=0.1)
    return model.train()  # (in eval mode without grad bitsandbytes repacks its CPU weights)


def test_bnb_4bit_base_fuses_under_autocast(tmp_path, monkeypatch):
    """QLoRA under autocast: a bf16 input to a bf16-compute 4-bit layer under bf16 autocast (autocast casts nothing
    there; PEFT's F.linear casts the float32 A and B to bf16, as the fused op does) is fused; a float32 input (e.g.
    after prepare_model_for_kbit_training) keeps PEFT's forward, which adds the bf16 products in float32."""
    monkeypatch.setenv("LLMKERN_BACKEND", "reference")
    model = _bnb_model(tmp_path)
    ids = _ids()
    want = _run(model, ids, torch.bfloat16)
    calls = _count(monkeypatch, "lora_linear")
    ip.use_fused_lora(model)
    got = _run(model, ids, torch.bfloat16)
    assert len(calls) == 2
    for g, w in [*zip(got[:2], want[:2]), *((got[2][n], want[2][n]) for n in want[2])]:
        assert g.dtype == w.dtype and _err(g, w) <= 2 ** -8
    calls.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(inputs_embeds=model.get_input_embeddings()(ids).float())
    assert not calls
