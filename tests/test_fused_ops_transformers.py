"""llmkern.integrations.transformers.use_fused_ops: a loaded transformers model with its RMSNorm / LayerNorm /
gated MLP / RoPE modules patched (per instance) onto llmkern's fused ops gives the logits, gradients and greedy
tokens of the unpatched model."""
import copy
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import llmkern.integrations.transformers as lt  # noqa: E402
from llmkern.ops import norm as norm_ops, rope as rope_ops, swiglu as swiglu_ops  # noqa: E402
from llmkern.testing import triton_device  # noqa: E402

V = 97
L = 2
# modules patched per kind for each tiny model (L layers)
EXPECTED = {
    "llama": {"rms_norm": 2 * L + 1, "layer_norm": 0, "mlp": L, "rope": L},
    "mistral": {"rms_norm": 2 * L + 1, "layer_norm": 0, "mlp": L, "rope": L},
    "qwen3": {"rms_norm": 4 * L + 1, "layer_norm": 0, "mlp": L, "rope": L},       # + q_norm, k_norm
    "gemma3": {"rms_norm": 6 * L + 1, "layer_norm": 0, "mlp": L, "rope": L},      # 4 per layer + q/k norms
    "gpt2": {"rms_norm": 0, "layer_norm": 2 * L + 1, "mlp": 0, "rope": 0},
    "phi3": {"rms_norm": 2 * L + 1, "layer_norm": 0, "mlp": L, "rope": L},        # fused gate_up_proj MLP
}


def _model(kind, **overrides):
    torch.manual_seed(0)
    common = dict(num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                  intermediate_size=48, vocab_size=V, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=L, n_head=2, n_embd=32, vocab_size=V, n_positions=64, attn_pdrop=0.0,
                                      resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1, eos_token_id=2)
        m = transformers.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(tie_word_embeddings=False, **common, **overrides))
    elif kind == "mistral":
        m = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=5, **common))
    elif kind == "qwen3":
        m = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=8, **common))
    elif kind == "gemma3":  # offset-1 norms (zero-initialised weights), gelu-tanh MLP, q/k norms, softcaps
        common.update(num_attention_heads=2, num_key_value_heads=1)
        m = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(head_dim=16, sliding_window=4, **common))
    elif kind == "phi3":
        m = transformers.Phi3ForCausalLM(transformers.Phi3Config(sliding_window=None, **common))
    else:
        raise ValueError(kind)
    with torch.no_grad():  # norm weights away from their init (ones / zeros), so a wrong convention shows
        for name, p in m.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.add_(0.3 * torch.randn_like(p))
    return m.float()


def _batch(T=9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, T), generator=g)
    am = torch.ones(2, T, dtype=torch.long)
    am[0, :3] = 0  # left padding
    return ids, am


def _logits_and_grads(model, ids, am):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=am).logits
    (logits * am[..., None]).square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(model_a, model_b, ids, am, atol=1e-5, rtol=1e-5):
    la, ga = _logits_and_grads(model_a, ids, am)
    lb, gb = _logits_and_grads(model_b, ids, am)
    real = am.bool()
    torch.testing.assert_close(la[real], lb[real], atol=atol, rtol=rtol)
    assert set(ga) == set(gb) and ga
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=atol, rtol=rtol, msg=n)


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the fused ops (the patched forwards import them at call time)."""
    calls = {"rms_norm": 0, "layer_norm": 0, "swiglu": 0, "geglu": 0, "rope": 0}

    def wrap(mod, name):
        real = getattr(mod, name)

        def counted(*a, **kw):
            calls[name] += 1
            return real(*a, **kw)
        monkeypatch.setattr(mod, name, counted)

    for mod, name in ((norm_ops, "rms_norm"), (norm_ops, "layer_norm"), (swiglu_ops, "swiglu"),
                      (swiglu_ops, "geglu"), (rope_ops, "rope")):
        wrap(mod, name)
    return calls


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3", "mistral", "gpt2", "phi3"])
def test_same_logits_and_grads_and_counts(kind, spy):
    ref = _model(kind).train()
    fused = copy.deepcopy(ref)
    assert lt.use_fused_ops(fused) is fused
    assert fused._llmkern_fused_ops == EXPECTED[kind]
    ids, am = _batch()
    _assert_same(fused, ref, ids, am)
    n = EXPECTED[kind]
    assert spy["rms_norm"] == n["rms_norm"] and spy["layer_norm"] == n["layer_norm"]
    assert spy["rope"] == n["rope"]
    assert spy["swiglu" if kind != "gemma3" else "geglu"] == n["mlp"]
    # idempotent: a second call patches nothing new and reports the same counts
    forwards = [m.__dict__.get("forward") for m in fused.modules()]
    lt.use_fused_ops(fused)
    assert fused._llmkern_fused_ops == EXPECTED[kind]
    assert [m.__dict__.get("forward") for m in fused.modules()] == forwards


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3", "gpt2", "phi3"])
def test_greedy_generate_same_tokens(kind):
    ref = _model(kind).eval()
    fused = lt.use_fused_ops(copy.deepcopy(ref))
    ids, am = _batch(7)
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(fused.generate(input_ids=ids, **kw), ref.generate(input_ids=ids, **kw))


def test_only_the_patched_instance_changes(spy):
    """Per instance: the class, transformers' module globals and another model of the same class are untouched."""
    from transformers.models.llama import modeling_llama

    original_rope = modeling_llama.apply_rotary_pos_emb
    fused, other = lt.use_fused_ops(_model("llama")), _model("llama")
    assert modeling_llama.apply_rotary_pos_emb is original_rope
    assert "forward" not in vars(other.model.norm) and "forward" not in vars(other.model.layers[0].self_attn)
    ids, am = _batch()
    with torch.no_grad():
        other(input_ids=ids, attention_mask=am)
    assert all(v == 0 for v in spy.values())
    with torch.no_grad():
        fused(input_ids=ids, attention_mask=am)
    assert spy["rope"] == L and spy["rms_norm"] == 2 * L + 1


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_with_llmkern_attention_and_fused_loss(kind, spy):
    lt.register()
    ref = _model(kind).train()
    fused = copy.deepcopy(ref)
    fused.set_attn_implementation("llmkern")
    lt.use_fused_loss(lt.use_fused_ops(fused))
    ids, am = _batch()
    labels = ids.masked_fill(am == 0, -100)
    want = ref(input_ids=ids, attention_mask=am, labels=labels)
    got = fused(input_ids=ids, attention_mask=am, labels=labels)
    want.loss.backward()
    got.loss.backward()
    assert got.logits is None
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    for (n, a), b in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, msg=n)
    assert spy["rope"] == L and spy["rms_norm"] == EXPECTED[kind]["rms_norm"]


@pytest.mark.parametrize("kind", ["qwen3", "gemma3", "phi3"])
def test_triton_kernels_under_the_interpreter(monkeypatch, kind):
    """Qwen3 (q/k norms, GQA), Gemma 3 (offset norms, geglu) and Phi-3 (gate and up as the halves of one
    projection: strided rows) with every fused op on the Triton kernels (the interpreter on CPU, float32)."""
    if triton_device() is None:
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    from llmkern.kernels import norm as kn, rope as kr, swiglu as ks

    launches = {"norm": 0, "rope": 0, "glu": 0}
    for mod, name, key in ((kn, "norm_forward", "norm"), (kr, "rope_apply", "rope"), (ks, "glu_forward", "glu")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, (lambda real, key: lambda *a, **kw: (
            launches.__setitem__(key, launches[key] + 1), real(*a, **kw))[1])(real, key))
    dev = triton_device()
    ref = _model(kind).to(dev).train()
    fused = lt.use_fused_ops(copy.deepcopy(ref))
    ids, am = (t.to(dev) for t in _batch(6))
    la, ga = _logits_and_grads(ref, ids, am)
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    lb, gb = _logits_and_grads(fused, ids, am)
    real = am.bool()
    torch.testing.assert_close(lb[real], la[real], atol=1e-5, rtol=1e-5)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-5, rtol=1e-4, msg=n)
    n = EXPECTED[kind]  # (rope_apply runs the backward too)
    assert launches == {"norm": n["rms_norm"], "rope": 2 * n["rope"], "glu": n["mlp"]}


def test_deepcopy_uses_the_copys_parameters():
    ref = _model("qwen3").train()
    fused = lt.use_fused_ops(copy.deepcopy(ref))
    twin, ref2 = copy.deepcopy(fused), copy.deepcopy(ref)
    assert twin._llmkern_fused_ops == EXPECTED["qwen3"]
    for name, m in twin.named_modules():
        if "forward" in vars(m):
            assert m.forward.__self__ is m, name
    with torch.no_grad():  # change the copies only: a forward bound to the original would miss it
        for a, b in zip(twin.parameters(), ref2.parameters()):
            a.mul_(1.5)
            b.mul_(1.5)
    ids, am = _batch()
    _assert_same(twin, ref2, ids, am)
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    ref = peft.get_peft_model(_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                               lora_dropout=0.0))
    with torch.no_grad():  # LoRA B starts at zero: give the adapters an effect
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ref.train()
    fused = copy.deepcopy(ref)
    assert lt.use_fused_ops(fused) is fused
    assert fused._llmkern_fused_ops == EXPECTED["llama"]
    assert fused.get_base_model()._llmkern_fused_ops == EXPECTED["llama"]
    ids, am = _batch()
    _assert_same(fused, ref, ids, am)


def test_nothing_to_patch_gives_zero_counts():
    zero = dict.fromkeys(("rms_norm", "layer_norm", "mlp", "rope"), 0)
    torch.manual_seed(0)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        d_model=32, d_ff=48, num_layers=1, num_heads=2, d_kv=16, vocab_size=V))  # T5LayerNorm, T5 MLPs: not ours
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lt.use_fused_ops(t5)._llmkern_fused_ops == zero
        seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        assert lt.use_fused_ops(seq)._llmkern_fused_ops == zero
    assert not any("forward" in vars(m) for m in t5.modules())
    gpt2 = lt.use_fused_ops(_model("gpt2"), layer_norm=False)
    assert gpt2._llmkern_fused_ops == zero
    llama = lt.use_fused_ops(_model("llama"), rms_norm=False, rope=False)
    assert llama._llmkern_fused_ops == {**zero, "mlp": L}
    lt.use_fused_ops(llama)  # enabling more kinds later patches those too
    assert llama._llmkern_fused_ops == EXPECTED["llama"]


def test_unknown_rms_norm_class_warns_once_and_is_left_alone():
    class OddRMSNorm(nn.Module):  # a different computation behind an RMSNorm name
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return self.weight * x / x.norm(dim=-1, keepdim=True)

    model = nn.Sequential(OddRMSNorm(), OddRMSNorm())
    with pytest.warns(RuntimeWarning, match="OddRMSNorm"):
        lt.use_fused_ops(model)
    assert model._llmkern_fused_ops["rms_norm"] == 0
    assert not any("forward" in vars(m) for m in model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lt.use_fused_ops(model)  # one-time warning


def test_fallbacks_keep_transformers_semantics(spy):
    """Mixed dtypes (RMSNorm: transformers returns the weight's dtype), LayerNorm under autocast (float32
    result), apply_rotary_pos_emb calls the op does not express: the original code runs."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    rms = LlamaRMSNorm(16)
    ln = nn.LayerNorm(16)
    with torch.no_grad():
        rms.weight.copy_(torch.randn(16))
    model = lt.use_fused_ops(nn.Sequential(rms, ln))
    assert model._llmkern_fused_ops["rms_norm"] == 1 and model._llmkern_fused_ops["layer_norm"] == 1
    x = torch.randn(3, 16)
    rms_bf16 = copy.deepcopy(rms).to(torch.bfloat16)
    for module, inp in ((rms, x.to(torch.bfloat16)), (rms_bf16, x)):  # both give float32 in transformers
        want, got = LlamaRMSNorm.forward(module, inp), module(inp)
        assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)
    assert spy["rms_norm"] == 0
    rms64 = copy.deepcopy(rms).double()  # transformers computes float64 inputs in float32: its forward runs
    assert torch.equal(rms64(x.double()), LlamaRMSNorm.forward(rms64, x.double())) and spy["rms_norm"] == 0
    torch.testing.assert_close(rms(x), LlamaRMSNorm.forward(rms, x))
    assert spy["rms_norm"] == 1
    xb = x.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = nn.LayerNorm.forward(ln, xb), ln(xb)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert spy["layer_norm"] == 0
    torch.testing.assert_close(ln(x), nn.LayerNorm.forward(ln, x))
    assert spy["layer_norm"] == 1

    attn = lt.use_fused_ops(_model("llama")).model.layers[0].self_attn
    fused_apply = attn.forward.__func__.__wrapped__.__globals__["apply_rotary_pos_emb"]
    assert fused_apply is not apply_rotary_pos_emb and fused_apply.__wrapped__ is apply_rotary_pos_emb
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)  # [B, T, H, D]: unsqueeze_dim=2
    cos, sin = torch.randn(2, 2, 5, 8).unbind(0)
    for a, b in zip(fused_apply(q, k, cos, sin, unsqueeze_dim=2), apply_rotary_pos_emb(q, k, cos, sin, 2)):
        assert torch.equal(a, b)
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    for a, b in zip(fused_apply(qt, kt, cos.double(), sin.double()), apply_rotary_pos_emb(qt, kt, cos.double(),
                                                                                          sin.double())):
        assert a.dtype == b.dtype == torch.float64 and torch.equal(a, b)  # cos / sin of another dtype
    assert spy["rope"] == 0
    for a, b in zip(fused_apply(qt, kt, cos, sin), apply_rotary_pos_emb(qt, kt, cos, sin)):
        torch.testing.assert_close(a, b)
    assert spy["rope"] == 1


def _save_load(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("kind", ["llama", "gemma3", "gpt2"])
def test_pickled_model_stays_patched(kind, spy):
    """Regression: the patched forwards were bound methods (types.MethodType), which pickle as
    getattr(module, fn.__name__): torch.load of a torch.save'd model failed ('LlamaMLP' object has no attribute
    '_mlp_forward'), or (RoPE alone) silently loaded the class forward under markers claiming the patch, so
    use_fused_ops on it was a no-op. The loaded model computes the same, on the fused ops, patched per module."""
    import pickle

    ref = _model(kind).train()
    fused = lt.use_fused_ops(copy.deepcopy(ref))
    for loaded in (_save_load(fused), pickle.loads(pickle.dumps(fused))):
        assert loaded._llmkern_fused_ops == EXPECTED[kind]
        patched = {n: m for n, m in loaded.named_modules() if "forward" in vars(m)}
        assert len(patched) == sum(EXPECTED[kind].values())
        for name, m in patched.items():  # markers truthful: each patched module runs its own fused forward
            orig = fused.get_submodule(name).forward
            assert m.forward.__self__ is m and m.forward.__func__ is orig.__func__, name
            assert m._llmkern_fused == getattr(fused.get_submodule(name), "_llmkern_fused"), name
        ids, am = _batch()
        for k in spy:
            spy[k] = 0
        _assert_same(loaded, ref, ids, am)
        n = EXPECTED[kind]
        assert spy["rms_norm"] == n["rms_norm"] and spy["layer_norm"] == n["layer_norm"] and spy["rope"] == n["rope"]
        assert spy["swiglu" if kind != "gemma3" else "geglu"] == n["mlp"]
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids, attention_mask=am).logits,
                                       fused(input_ids=ids, attention_mask=am).logits, atol=0, rtol=0)
        forwards = [m.__dict__.get("forward") for m in loaded.modules()]  # idempotent after the load too
        lt.use_fused_ops(loaded)
        assert loaded._llmkern_fused_ops == EXPECTED[kind]
        assert [m.__dict__.get("forward") for m in loaded.modules()] == forwards
        twin = copy.deepcopy(loaded)  # and a copy of the loaded model is bound to the copy
        assert all(m.forward.__self__ is m for m in twin.modules() if "forward" in vars(m))


def test_pickled_use_fused_lora_model_stays_fused(monkeypatch):
    """Regression: use_fused_lora bound its forward with types.MethodType; torch.load of a saved PEFT model then
    failed ('Linear' object has no attribute '_fused_forward'). The loaded model runs the fused op, same outputs."""
    peft = pytest.importorskip("peft")
    from llmkern.integrations import peft as lip

    torch.manual_seed(0)
    model = peft.get_peft_model(_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                 lora_dropout=0.0, init_lora_weights=False))
    fused = lip.use_fused_lora(model).eval()
    calls = []
    real = lip.lora_linear
    monkeypatch.setattr(lip, "lora_linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ids, am = _batch()
    with torch.no_grad():
        want = fused(input_ids=ids, attention_mask=am).logits
    n = len(calls)
    assert n == 2 * L
    loaded = _save_load(fused)
    layers = [m for m in loaded.modules() if hasattr(m, "_llmkern_orig_forward")]
    assert len(layers) == 2 * L
    for m in layers:
        assert m.forward.__func__ is lip._fused_forward and m.forward.__self__ is m
        assert m._llmkern_orig_forward.__self__ is m and m._llmkern_orig_forward.__func__ is type(m).forward
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=am).logits
    assert len(calls) == 2 * n
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    lip.use_fused_lora(loaded, enable=False)  # and it can still be switched off
    assert not any("forward" in vars(m) or hasattr(m, "_llmkern_orig_forward") for m in loaded.modules()
                   if type(m).__name__ == "Linear" and hasattr(m, "lora_A"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=am).logits, want, atol=1e-5, rtol=1e-5)
    assert len(calls) == 2 * n


@pytest.mark.parametrize("family", ["neox", "phi3"])
def test_partial_rotary_runs_llmkern_rope(family, spy):
    """GPT-NeoX's rotary_pct / Phi-3's partial_rotary_factor: transformers' function rotates the first R
    channels; it was counted as patched but every call fell back (cos / sin narrower than the head). The
    probe now checks the function with R < D too, and llmkern.rope (which takes R < D) runs."""
    torch.manual_seed(0)
    if family == "neox":
        cfg = transformers.GPTNeoXConfig(num_hidden_layers=L, num_attention_heads=4, hidden_size=32,
                                         intermediate_size=48, vocab_size=V, rotary_pct=0.5,
                                         max_position_embeddings=64)
        ref = transformers.GPTNeoXForCausalLM(cfg)
    else:
        cfg = transformers.Phi3Config(num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
                                      hidden_size=32, intermediate_size=48, vocab_size=V, partial_rotary_factor=0.5,
                                      max_position_embeddings=64, pad_token_id=0)
        ref = transformers.Phi3ForCausalLM(cfg)
    ref = ref.float().train()
    fused = lt.use_fused_ops(copy.deepcopy(ref))
    assert fused._llmkern_fused_ops["rope"] == L
    ids, am = _batch()
    _assert_same(fused, ref, ids, am)
    assert spy["rope"] == L


def _rotate_half_interleaved(x):  # GPT-J's pairs, in place of Llama's halves
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


@pytest.mark.parametrize("name,replacement", [
    ("apply_rotary_pos_emb", lambda q, k, cos, sin, unsqueeze_dim=1: (q, k)),  # no rotation
    ("rotate_half", _rotate_half_interleaved),
])
def test_a_reassigned_rope_global_is_probed_again(monkeypatch, name, replacement):
    """The patched attention forward was built once per class with the module globals of the first patch, and the
    RoPE verdict cached per function: after apply_rotary_pos_emb (or the rotate_half it calls) was replaced, a
    model patched later still ran llmkern.rope, never checked against the new code."""
    from transformers.models.llama import modeling_llama

    lt.use_fused_ops(_model("llama"))  # the first patch of the class
    monkeypatch.setattr(modeling_llama, name, replacement)
    ref = _model("llama").eval()
    fused = lt.use_fused_ops(copy.deepcopy(ref))
    assert fused._llmkern_fused_ops["rope"] == 0
    ids, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, ref(input_ids=ids).logits)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gpt2_peft_model_on_every_llmkern_op(monkeypatch, backend):
    """The whole drop-in stack on a PEFT LoRA GPT-2 (Conv1D layers, fan_in_fan_out): llmkern attention, fused
    LayerNorms, the fused LoRA op on every targeted Conv1D and the fused loss give PEFT's loss and gradients, on
    the reference backend and on the Triton kernels (the interpreter on CPU)."""
    peft = pytest.importorskip("peft")
    import llmkern
    from llmkern.integrations import peft as ip

    if backend == "triton" and triton_device() is None:
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    dev = triton_device() if backend == "triton" else "cpu"
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0,
                          fan_in_fan_out=True)
    ref = peft.get_peft_model(_model("gpt2"), cfg).to(dev)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ref.train()
    fused = copy.deepcopy(ref)
    lt.register()
    fused.get_base_model().set_attn_implementation("llmkern")
    lt.use_fused_loss(ip.use_fused_lora(lt.use_fused_ops(fused)))
    calls, attn = [], []
    real, real_attn = ip.lora_linear, llmkern.attention
    monkeypatch.setattr(ip, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(llmkern, "attention", lambda *a, **k: attn.append(1) or real_attn(*a, **k))
    monkeypatch.setenv("LLMKERN_BACKEND", backend)
    ids, am = (t.to(dev) for t in _batch())
    labels = ids.masked_fill(am == 0, -100)
    want = ref(input_ids=ids, attention_mask=am, labels=labels)
    got = fused(input_ids=ids, attention_mask=am, labels=labels)
    want.loss.backward()
    got.loss.backward()
    assert got.logits is None and len(calls) == 4 * L  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    assert len(attn) == L
    assert fused.get_base_model()._llmkern_fused_ops["layer_norm"] == 2 * L + 1
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    for n, p in fused.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=n)
