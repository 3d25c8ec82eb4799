"""llmkern.peft and llmkern.integrations.peft: modules, PEFT interop, parameter counts (seed deck)."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

from llmkern import peft as lp
from llmkern.testing import tiny_hf_llama, triton_device

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

L_, D, H_, V = 2, 32, 4, 64


def tiny_llama(seed=0):
    return tiny_hf_llama(seed, vocab=V, hidden=D, layers=L_, heads=H_)


def _randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n or "lora_A" in n:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _ids(B=2, T=8, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton" and triton_device() != "cpu" and not torch.cuda.is_available():
        pytest.skip("no Triton device")
    monkeypatch.setenv("LLMKERN_BACKEND", request.param)
    return request.param


# ---- LoRALinear -----------------------------------------------------------------------------------

def test_lora_linear_init_scaling_merge():
    base = nn.Linear(20, 12)
    m = lp.LoRALinear(base, r=4, alpha=8)
    assert m.scaling == 2.0 and lp.LoRALinear(nn.Linear(20, 12), r=4, alpha=8, use_rslora=True).scaling == 4.0
    assert torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) > 0
    bound = 1 / math.sqrt(20)  # kaiming_uniform(a=sqrt(5)) on fan_in 20
    assert m.lora_A.abs().max() <= bound + 1e-6
    assert not base.weight.requires_grad and m.lora_A.requires_grad
    x = torch.randn(3, 5, 20)
    torch.testing.assert_close(m(x), base(x))  # B = 0: identity update
    nn.init.normal_(m.lora_B)
    y = m(x)
    torch.testing.assert_close(y, base(x) + 2.0 * (x @ m.lora_A.T) @ m.lora_B.T, rtol=1e-5, atol=1e-5)
    w0 = base.weight.detach().clone()
    m.merge()
    assert m.merged
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    m.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=1e-6, atol=1e-6)
    w1 = base.weight.detach().clone()
    with torch.no_grad():
        m.lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        m.merge()
    torch.testing.assert_close(base.weight, w1, rtol=0, atol=0)  # untouched
    with pytest.raises(ValueError, match="r must be"):
        lp.LoRALinear(nn.Linear(4, 4), r=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_disabled_merged_layer_gives_the_base_output(use_dora):
    """A merged layer holds W + s·B·A in its base weight: disabled, it returned the adapted output (PEFT
    unmerges first, giving the base model's)."""
    torch.manual_seed(0)
    base = nn.Linear(16, 8, dtype=torch.float64)
    want_base = base.weight.detach().clone()
    m = lp.LoRALinear(base, r=4, alpha=8, use_dora=use_dora)
    nn.init.normal_(m.lora_B)
    x = torch.randn(3, 16, dtype=torch.float64)
    adapted = m(x)
    m.merge()
    m.disabled = True
    torch.testing.assert_close(m(x), x @ want_base.T + base.bias)
    assert not m.merged
    m.disabled = False
    torch.testing.assert_close(m(x), adapted)


def test_float64_merge_round_trip_is_exact_to_float64():
    m = lp.LoRALinear(nn.Linear(20, 12).double(), r=4, alpha=8)
    nn.init.normal_(m.lora_B)
    x = torch.randn(3, 20, dtype=torch.float64)
    y, w0 = m(x), m.weight.detach().clone()
    m.merge()
    torch.testing.assert_close(m(x), y, rtol=1e-12, atol=1e-12)
    m.unmerge()
    torch.testing.assert_close(m.weight, w0, rtol=1e-13, atol=1e-13)


def test_lora_linear_dropout_only_in_training():
    m = lp.LoRALinear(nn.Linear(16, 16), r=4, alpha=4, dropout=0.5)
    nn.init.normal_(m.lora_B)
    x = torch.randn(6, 16)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    b = m(x)
    assert not torch.allclose(a, b)


def test_inject_lora_count_matches_deck_formula():
    model = tiny_llama()
    names = lp.inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    assert len(names) == 2 * L_
    # deck: W_Q and W_V considered, parameter scale 2 x 2 x d x r x L
    assert lp.count_trainable_parameters(model) == 2 * 2 * D * 4 * L_ == lp.lora_params(L_, D, 4)
    with pytest.raises(ValueError, match="matched no"):
        lp.inject_lora(tiny_llama(), ["nope"])


def test_inject_and_merge_same_logits(backend):
    model = tiny_llama()
    lp.inject_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=16)
    _randomize_lora(model)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        lp.merge_lora(model)
        merged = model(ids).logits
        lp.unmerge_lora(model)
        after = model(ids).logits
        lp.merge_lora(model, remove=True)
        removed = model(ids).logits
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(removed, before, rtol=1e-4, atol=1e-4)
    assert not lp.lora_modules(model)


# ---- PEFT interop ---------------------------------------------------------------------------------

def _peft_model(adapters=("default",), r=4, alpha=8, targets=("q_proj", "v_proj"), seed=1):
    base = tiny_llama()
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    model = peft.get_peft_model(base, cfg, adapter_name=adapters[0])
    for a in adapters[1:]:
        model.add_adapter(a, peft.LoraConfig(r=r * 2, lora_alpha=alpha, target_modules=list(targets)))
    _randomize_lora(model, seed)
    return model.eval()


def test_use_fused_lora_same_logits_and_grads(backend):
    model = _peft_model()
    ids = _ids()
    out = model(ids).logits
    out.float().pow(2).mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    calls = []
    from llmkern.integrations import peft as ip
    from llmkern.ops.lora import lora_linear as orig

    ip.lora_linear = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        ip.use_fused_lora(model)
        out2 = model(ids).logits
        out2.float().pow(2).mean().backward()
    finally:
        ip.lora_linear = orig
    assert len(calls) == 2 * L_
    torch.testing.assert_close(out2, out, rtol=1e-4, atol=1e-4)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-3, atol=1e-5, msg=n)
    ip.use_fused_lora(model, enable=False)
    assert not any(hasattr(m, "_llmkern_orig_forward") for m in model.modules())


def test_use_fused_lora_mixed_adapter_batch(backend):
    from llmkern.integrations.peft import use_fused_lora

    model = _peft_model(adapters=("ad1", "ad2"))
    ids = _ids(B=3)
    names = ["ad2", "__base__", "ad1"]
    with torch.no_grad():
        want = model(ids, adapter_names=names).logits
        use_fused_lora(model)
        got = model(ids, adapter_names=names).logits
        model.set_adapter("ad2")
        got_b = model(ids).logits
        use_fused_lora(model, enable=False)
        want_b = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_b, want_b, rtol=1e-4, atol=1e-4)


def _peft_gpt2(adapters=("default",), use_dora=False):
    """PEFT LoRA on a tiny transformers GPT2LMHeadModel: c_attn, both c_proj and c_fc are Conv1D layers
    (weight [in, out], fan_in_fan_out=True)."""
    torch.manual_seed(3)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=D, n_layer=L_,
                                                                n_head=H_))
    cfg = lambda r: peft.LoraConfig(r=r, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],  # noqa: E731
                                    lora_dropout=0.0, fan_in_fan_out=True, use_dora=use_dora)
    model = peft.get_peft_model(base, cfg(4), adapter_name=adapters[0])
    for i, a in enumerate(adapters[1:]):
        model.add_adapter(a, cfg(2 + i))
    _randomize_lora(model, 5)
    return model.eval()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_use_fused_lora_fuses_gpt2_conv1d_layers(backend, use_dora):
    """GPT-2's Conv1D layers (PEFT's fan_in_fan_out) run the fused op on the weight's transposed view, with
    PEFT's outputs and gradients (they ran PEFT's forward before)."""
    from llmkern.integrations import peft as ip

    model = _peft_gpt2(use_dora=use_dora)
    ids = _ids()
    out = model(ids).logits
    out.float().pow(2).mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    name = "dora_linear" if use_dora else "lora_linear"
    orig, calls = getattr(ip, name), []
    setattr(ip, name, lambda *a, **k: calls.append(a[1].stride()) or orig(*a, **k))
    try:
        ip.use_fused_lora(model)
        got = model(ids).logits
        got.float().pow(2).mean().backward()
    finally:
        setattr(ip, name, orig)
    assert len(calls) == 4 * L_ and all(st[0] == 1 for st in calls)  # the [in, out] weights' transposed views
    torch.testing.assert_close(got, out, rtol=1e-4, atol=1e-4)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-3, atol=1e-5, msg=n)


def test_use_fused_lora_gpt2_compiles_without_graph_breaks(monkeypatch):
    """torch.compile(fullgraph=True) traces the fused Conv1D layers (the Conv1D test reads sys.modules): the trace
    runs lora_linear once per adapted layer, not PEFT's own forward."""
    from llmkern.integrations import peft as ip

    model = _peft_gpt2()
    ids = _ids()
    traced, orig = [], ip.lora_linear
    monkeypatch.setattr(ip, "lora_linear", lambda *a, **k: (traced.append(1), orig(*a, **k))[1])
    with torch.no_grad():
        want = model(ids).logits
        ip.use_fused_lora(model)
        got = torch.compile(lambda t: model(t).logits, backend="eager", fullgraph=True)(ids)
    assert len(traced) == 4 * L_  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_use_fused_lora_gpt2_mixed_adapter_batch(backend):
    from llmkern.integrations import peft as ip

    model = _peft_gpt2(adapters=("ad1", "ad2"))
    ids = _ids(B=3)
    names = ["ad2", "__base__", "ad1"]
    orig, calls = ip.lora_linear_multi, []
    with torch.no_grad():
        want = model(ids, adapter_names=names).logits
        ip.use_fused_lora(model)
        ip.lora_linear_multi = lambda *a, **k: calls.append(1) or orig(*a, **k)
        try:
            got = model(ids, adapter_names=names).logits
        finally:
            ip.lora_linear_multi = orig
    assert len(calls) == 4 * L_
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_use_fused_lora_gpt2_layer_with_unmatched_fan_in_fan_out_runs_peft():
    """A Conv1D layer whose fan_in_fan_out was turned off (PEFT's merge would then use the wrong layout; its
    forward is still the Conv1D's) keeps PEFT's forward."""
    from llmkern.integrations import peft as ip

    model = _peft_gpt2()
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    layer.fan_in_fan_out = False
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
        orig, calls = ip.lora_linear, []
        ip.use_fused_lora(model)
        ip.lora_linear = lambda *a, **k: calls.append(1) or orig(*a, **k)
        try:
            got = model(ids).logits
        finally:
            ip.lora_linear = orig
    assert len(calls) == 4 * L_ - 1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_use_fused_lora_keeps_peft_float32_adapters_of_half_model(monkeypatch):
    from llmkern import _backend
    from llmkern.integrations.peft import use_fused_lora

    monkeypatch.setattr(_backend, "_warned", set())

    # PEFT's default autocast_adapter_dtype=True: float32 adapters on a float16 model, computed in
    # float32; the fused op computed them in float16 (logits off by ~1e-3, LoRA grads by ~2%)
    model = peft.get_peft_model(tiny_llama().half(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    _randomize_lora(model)
    ids = _ids()
    want = model(ids).logits
    want.float().pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    use_fused_lora(model)
    with pytest.warns(RuntimeWarning, match="autocast_adapter_dtype=False"):  # says why it is not fused
        got = model(ids).logits
    got.float().pow(2).mean().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_peft_saved_adapter_loads_into_llmkern_and_back(tmp_path):
    model = _peft_model(r=4, alpha=12)
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "peft")
    ours = lp.load_peft_adapter(tiny_llama(), str(tmp_path / "peft"))
    assert len(lp.lora_modules(ours)) == 2 * L_
    assert all(m.scaling == 3.0 for _, m in lp.lora_modules(ours))
    with torch.no_grad():
        got = ours(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # ... and back: our files load into PEFT
    lp.save_peft_adapter(ours, str(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_llmkern_adapter_with_rank_pattern_roundtrip(tmp_path):
    model = tiny_llama()
    lp.inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8, use_rslora=True)
    big = lp.LoRALinear(model.model.layers[1].mlp.down_proj, r=8, alpha=2, use_rslora=True)
    model.model.layers[1].mlp.down_proj = big
    _randomize_lora(model, 5)
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    lp.save_peft_adapter(model, str(tmp_path))
    back = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    again = lp.load_peft_adapter(tiny_llama(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_rank_and_alpha_patterns_name_one_module_each(tmp_path):
    """rank_pattern / alpha_pattern keys are anchored: PEFT matches a key k as (.*\\.)?(k)$, so a bare "layers.0"
    would also set vision.layers.0's rank and alpha (a shape error or a silently wrong scaling in PEFT)."""
    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    class Net(Tower):
        def __init__(self):
            super().__init__()
            self.vision = Tower()

        def forward(self, x):
            return self.vision(super().forward(x))

    torch.manual_seed(0)
    base = Net()
    model = copy.deepcopy(base)
    lp.inject_lora(model, ["vision.layers.0", "vision.layers.1", "layers.1"], r=4, alpha=8)
    lp.inject_lora(model, ["layers.0"], r=2, alpha=32)  # its own rank and alpha
    _randomize_lora(model, 3)
    model.eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = model(x)
    lp.save_peft_adapter(model, str(tmp_path), task_type=None)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    again = lp.load_peft_adapter(copy.deepcopy(base), str(tmp_path)).eval()
    assert back.base_model.model.vision.layers[0].lora_A["default"].weight.shape[0] == 4
    with torch.no_grad():
        torch.testing.assert_close(back(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again(x), want, rtol=1e-5, atol=1e-5)


def test_use_fused_lora_under_cpu_autocast(monkeypatch):
    """Autocast is checked on the input's device (CPU here; the check once asked about CUDA's only). A float32
    model under autocast (AMP, e.g. Trainer's bf16=True) is fused: PEFT's F.linear casts x, W, A and B to bfloat16
    there, as the fused op does. DoRA on it keeps PEFT's forward under autocast (PEFT forms its DoRA term in
    float32 from the bfloat16 products, dora_linear in bfloat16), and is fused outside it."""
    from llmkern.integrations import peft as ip

    calls = []
    for name in ("lora_linear", "dora_linear"):
        monkeypatch.setattr(ip, name, lambda *a, _o=getattr(ip, name), _n=name, **k: calls.append(_n) or _o(*a, **k))
    for use_dora in (False, True):
        model = _peft_model() if not use_dora else peft.get_peft_model(
            tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)).eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            want = model(_ids()).logits
            ip.use_fused_lora(model)
            got = model(_ids()).logits
        assert calls == ([] if use_dora else ["lora_linear"] * 2 * L_) and got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        with torch.no_grad():
            model(_ids())
        assert calls[-1:] == ["dora_linear" if use_dora else "lora_linear"]
        calls.clear()
        ip.use_fused_lora(model, enable=False)


class _Proj(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 8)

    def forward(self, x):
        return self.proj(x)


def test_offloaded_layers_run_through_their_hooks():
    """accelerate's offloading (cpu_offload, device_map with offload) keeps a layer's weight on the meta device
    and loads it inside the layer's own forward: the fused paths read the weight directly and raised 'weight is
    on meta'. They now run the hooked layers' forwards (use_fused_lora: PEFT's; LoRALinear: base + update)."""
    accelerate = pytest.importorskip("accelerate")
    from llmkern.integrations import peft as ip

    torch.manual_seed(0)
    x = torch.randn(3, 16)
    pm = peft.get_peft_model(_Proj(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"]))
    _randomize_lora(pm)
    own = _Proj()
    lp.inject_lora(own, ["proj"], r=2, alpha=4)
    nn.init.normal_(own.proj.lora_B)
    with torch.no_grad():
        want_peft, want_own = pm(x), own(x)
    for model, want in ((pm, want_peft), (own, want_own)):
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        if model is pm:
            ip.use_fused_lora(pm)
            assert pm.base_model.model.proj.base_layer.weight.device.type == "meta"
        with torch.no_grad():
            torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    ip.use_fused_lora(pm, enable=False)
    dora = _Proj()
    lp.inject_lora(dora, ["proj"], r=2, alpha=4, use_dora=True)
    accelerate.cpu_offload(dora, execution_device=torch.device("cpu"))
    with pytest.raises(NotImplementedError, match="DoRA needs the base weight"):
        dora(x)


def test_use_fused_lora_falls_back_above_the_kernels_rank():
    """PEFT takes any rank; the fused kernels take up to 256: a rank-320 adapter runs on PEFT's forward."""
    from llmkern.integrations import peft as ip

    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(320, 320))
    model = peft.get_peft_model(lin, peft.LoraConfig(r=320, lora_alpha=16, target_modules=["0"]))
    _randomize_lora(model, 2)
    x = torch.randn(2, 320)
    with torch.no_grad():
        want = model(x)
        ip.use_fused_lora(model)
        torch.testing.assert_close(model(x), want)


def test_load_rejects_unsupported(tmp_path):
    # (DoRA, once refused here, loads now: tests/test_dora.py)
    base = tiny_llama()
    m = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    m.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="lora_bias"):
        lp.load_peft_adapter(tiny_llama(), str(tmp_path))
    # DoRA on an embedding is still refused (only nn.Linear)
    m = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["embed_tokens"], use_dora=True))
    m.save_pretrained(tmp_path / "emb")
    with pytest.raises(ValueError, match="embedding"):
        lp.load_peft_adapter(tiny_llama(), str(tmp_path / "emb"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(alora_invocation_tokens=[5, 7]), "aLoRA"),                     # was loaded as plain LoRA
    (dict(init_lora_weights="pissa"), "pissa"),                          # base weights PEFT rewrites
    (dict(init_lora_weights="olora"), "olora"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),              # was "unsupported key"
    (dict(trainable_token_indices=[1, 2]), "trainable_token_indices"),
])
def test_load_rejects_peft_variants_by_name(tmp_path, kwargs, match):
    kwargs = {"target_modules": ["q_proj", "v_proj"], **kwargs}
    m = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, **kwargs))
    _randomize_lora(m)
    m.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        lp.load_peft_adapter(tiny_llama(), str(tmp_path))


def test_peft_lm_head_adapter_loads_with_its_saved_base_weight(tmp_path):
    # PEFT saves lm_head.base_layer.weight next to a LoRA on lm_head and loads it into the base layer
    base = tiny_llama()
    nn.init.normal_(base.lm_head.weight, std=0.5)
    m = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]))
    _randomize_lora(m)
    m.save_pretrained(tmp_path)
    ids = _ids()
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()(ids).logits
        torch.testing.assert_close(want, m.eval()(ids).logits)
        got = lp.load_peft_adapter(tiny_llama(), str(tmp_path)).eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_existing_lora_modules_stay_trainable(tmp_path):
    model = tiny_llama()
    lp.inject_lora(model, ["q_proj"], r=4, alpha=8)
    lp.inject_lora(model, ["v_proj"], r=4, alpha=8)  # used to freeze the q_proj LoRA weights
    assert lp.count_trainable_parameters(model) == 2 * 2 * D * 4 * L_
    lp.save_peft_adapter(model, str(tmp_path))
    resumed = tiny_llama()
    lp.inject_lora(resumed, ["q_proj", "v_proj"], r=4, alpha=8)
    lp.load_peft_adapter(resumed, str(tmp_path))  # used to leave 0 trainable parameters
    assert lp.count_trainable_parameters(resumed) == 2 * 2 * D * 4 * L_
    assert all(m.lora_A.requires_grad and m.lora_B.requires_grad for _, m in lp.lora_modules(resumed))
    assert not any(p.requires_grad for n, p in resumed.named_parameters() if "lora_" not in n)


def test_later_peft_calls_keep_earlier_adapters_trainable():
    """add_adapters froze every parameter, adapters and LoRA weights the model already had included (a second call,
    or one after inject_lora, silently stopped their training)."""
    model = tiny_llama()
    lp.inject_lora(model, ["q_proj"], r=4, alpha=8)
    lp.add_adapters(model, ["self_attn"], d=D, r=4)
    lp.add_adapters(model, ["mlp"], d=D, r=4)
    assert all(m.lora_A.requires_grad and m.lora_B.requires_grad for _, m in lp.lora_modules(model))
    adapters = [m for m in model.modules() if isinstance(m, lp.Adapter)]
    assert len(adapters) == 2 * L_ and all(p.requires_grad for a in adapters for p in a.parameters())
    lp.inject_lora(model, ["v_proj"], r=4, alpha=8)  # ... and a LoRA after them keeps the adapters trainable
    assert all(p.requires_grad for a in adapters for p in a.parameters())
    frozen_base = [n for n, p in model.named_parameters() if "lora_" not in n and "adapter" not in n]
    assert frozen_base and not any(dict(model.named_parameters())[n].requires_grad for n in frozen_base)


def test_inject_lora_refuses_the_model_itself():
    """A regex matching the root name '' made the LoRALinear a child of the nn.Linear it wraps (the LoRA never ran;
    state_dict / repr recursed forever)."""
    layer = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="matched the model itself"):
        lp.inject_lora(layer, ".*", r=2)
    assert not list(layer.children())


def test_save_peft_adapter_task_type_follows_the_model(tmp_path):
    """The config said CAUSAL_LM for any model, and PEFT's PeftModelForCausalLM fails on a model without
    prepare_inputs_for_generation (an encoder, a classifier, a plain module): "auto" writes None there."""
    import json

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    torch.manual_seed(0)
    base = Net()
    model = copy.deepcopy(base)
    lp.inject_lora(model, ["up", "down"], r=2, alpha=4)
    for _, m in lp.lora_modules(model):
        nn.init.normal_(m.lora_B, std=0.1)
    lp.save_peft_adapter(model, str(tmp_path / "net"))
    assert json.load(open(tmp_path / "net" / "adapter_config.json"))["task_type"] is None
    x = torch.randn(3, 8)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "net")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=1e-5, atol=1e-6)
    llama = tiny_llama()
    lp.inject_lora(llama, ["q_proj"], r=2)
    lp.save_peft_adapter(llama, str(tmp_path / "llama"))  # a zoo model: a causal LM
    assert json.load(open(tmp_path / "llama" / "adapter_config.json"))["task_type"] == "CAUSAL_LM"
    lp.save_peft_adapter(model, str(tmp_path / "forced"), task_type="SEQ_CLS")  # an explicit value is written
    assert json.load(open(tmp_path / "forced" / "adapter_config.json"))["task_type"] == "SEQ_CLS"


def test_load_into_merged_lora_model_raises(tmp_path):
    src = tiny_llama()
    lp.inject_lora(src, ["q_proj"], r=4, alpha=8)
    _randomize_lora(src, 7)
    lp.save_peft_adapter(src, str(tmp_path))
    model = tiny_llama()
    lp.inject_lora(model, ["q_proj"], r=4, alpha=8)
    _randomize_lora(model, 8)
    lp.merge_lora(model)
    A0 = model.model.layers[0].self_attn.q_proj.lora_A.detach().clone()
    with pytest.raises(ValueError, match="merged"):  # the new weights were ignored (merged forward)
        lp.load_peft_adapter(model, str(tmp_path))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.lora_A, A0)
    lp.unmerge_lora(model)
    lp.load_peft_adapter(model, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, src(_ids()).logits, rtol=1e-5, atol=1e-5)


def test_load_refuses_active_lora_the_checkpoint_does_not_name(tmp_path):
    """Loading a q/k adapter into a model that has trained LoRA on q/v kept v's LoRA active (outputs of neither
    adapter, silently); fresh LoRA (lora_B zero, as inject_lora leaves it) on extra modules is inert and allowed."""
    src = tiny_llama()
    lp.inject_lora(src, ["q_proj", "k_proj"], r=4, alpha=8)
    _randomize_lora(src, 7)
    lp.save_peft_adapter(src, str(tmp_path))
    model = tiny_llama()
    lp.inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    _randomize_lora(model, 8)
    with pytest.raises(ValueError, match=r"carries LoRA on .*v_proj"):
        lp.load_peft_adapter(model, str(tmp_path))
    fresh = tiny_llama()
    lp.inject_lora(fresh, ["q_proj", "k_proj", "v_proj"], r=4, alpha=8)
    lp.load_peft_adapter(fresh, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids()).logits, src(_ids()).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_state_dict_keeps_the_merged_state(use_dora):
    """merged was a plain attribute: a merged model's state_dict loaded into a fresh LoRA model added s·B·A twice,
    and a training (unmerged) checkpoint loaded into a merged model was ignored by the merged forward."""
    def lora_model():
        m = tiny_llama()
        lp.inject_lora(m, ["q_proj", "v_proj"], r=4, alpha=8, use_dora=use_dora)
        _randomize_lora(m, 3)
        return m.eval()

    a = lora_model()
    with torch.no_grad():
        ref = a(_ids()).logits
    train_sd = copy.deepcopy(a.state_dict())
    assert not any(k.endswith("lora_merged") for k in train_sd)  # unmerged state_dicts are unchanged
    lp.merge_lora(a)
    merged_sd = copy.deepcopy(a.state_dict())
    b = lora_model()
    b.load_state_dict(merged_sd)  # merged checkpoint -> unmerged model: it becomes merged
    assert all(m.merged for _, m in lp.lora_modules(b))
    a.load_state_dict(train_sd)  # unmerged checkpoint -> merged model: it becomes unmerged
    assert not any(m.merged for _, m in lp.lora_modules(a))
    with torch.no_grad():
        torch.testing.assert_close(b(_ids()).logits, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a(_ids()).logits, ref, rtol=1e-5, atol=1e-5)
    lp.unmerge_lora(b)  # (DoRA: the merged row norms came with the checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(b(_ids()).logits, ref, rtol=1e-5, atol=1e-5)
    lp.merge_lora(b)
    c = lora_model()  # a merged checkpoint into a merged layer: its DoRA norms come along (unmerge needs them)
    lp.merge_lora(c)
    c.load_state_dict(merged_sd)
    lp.unmerge_lora(c)
    with torch.no_grad():
        torch.testing.assert_close(c(_ids()).logits, ref, rtol=1e-5, atol=1e-5)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict  # (resolves every key by name)

    assert set(get_model_state_dict(b)) == set(merged_sd)
    lora_only = {k: v for k, v in train_sd.items() if "lora_" in k}
    with pytest.raises(RuntimeError, match="merged"):  # new LoRA weights under a merged base weight
        b.load_state_dict(lora_only, strict=False)


def test_load_peft_adapter_refuses_several_named_adapters_in_one_file(tmp_path):
    """Keys lora_A.<name>.weight of two adapters in one file loaded silently, one over the other, with the
    config's single alpha: neither adapter."""
    from safetensors.torch import load_file, save_file

    src = tiny_llama()
    lp.inject_lora(src, ["q_proj"], r=4, alpha=8)
    lp.save_peft_adapter(src, str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    weights = load_file(str(path))
    both = {}
    for name in ("default", "other"):
        both.update({k.replace(".weight", f".{name}.weight"): v.clone() for k, v in weights.items()})
    save_file(both, str(path))
    with pytest.raises(ValueError, match="several named adapters"):
        lp.load_peft_adapter(tiny_llama(), str(tmp_path))
    save_file({k: v for k, v in both.items() if ".other." in k}, str(path))  # one named adapter loads
    lp.load_peft_adapter(tiny_llama(), str(tmp_path))


def test_inject_lora_does_not_wrap_a_lora_base_layer():
    model = tiny_llama()
    lp.inject_lora(model, r".*q_proj", r=2, alpha=2)
    # ".*q_proj.*" also matches q_proj.base_layer: wrapping it hid that LoRA from the outer forward
    with pytest.raises(ValueError, match="matched no"):
        lp.inject_lora(model, r".*q_proj.*", r=2, alpha=2)
    assert all(type(m.base_layer) is nn.Linear for _, m in lp.lora_modules(model))


def test_merge_lora_refuses_tied_weights():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=H_, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lp.inject_lora(model, ["lm_head"], r=4, alpha=8)
    _randomize_lora(model)
    emb = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(ValueError, match="tied"):  # merging also changed the token embedding
        lp.merge_lora(model)
    assert torch.equal(model.model.embed_tokens.weight, emb) and not lp.lora_modules(model)[0][1].merged


def test_safe_merge_checks_the_stored_dtype_and_merges_all_or_nothing():
    """float16: W + s B A past 65504 is refused (it was cast to inf after the float32 check); merge_lora checks
    every layer before merging any (a broken second layer left the first merged, its adapter gone)."""
    torch.manual_seed(0)
    lin = lp.LoRALinear(nn.Linear(2, 2).half(), r=1, alpha=1.0)
    with torch.no_grad():
        lin.base_layer.weight.fill_(60000.0)
        lin.lora_A.fill_(100.0)
        lin.lora_B.fill_(100.0)
    with pytest.raises(ValueError, match="non-finite values .* in torch.float16"):
        lin.merge()
    assert not lin.merged and bool(torch.isfinite(lin.base_layer.weight).all())
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    lp.inject_lora(model, ["0", "1"], r=2)
    _randomize_lora(model)
    with torch.no_grad():
        model[1].lora_B[0, 0] = float("nan")
    for remove in (False, True):
        with pytest.raises(ValueError, match="non-finite"):
            lp.merge_lora(model, remove=remove)
        assert all(isinstance(m, lp.LoRALinear) and not m.merged for m in model)


def test_inject_lora_refuses_multihead_attention_out_proj():
    """nn.MultiheadAttention reads out_proj.weight itself: a LoRA there would never run (it was wrapped, silently
    inert)."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    with pytest.raises(ValueError, match="out_proj of an nn.MultiheadAttention"):
        lp.inject_lora(layer, ["out_proj", "linear1"])
    assert type(layer.linear1) is nn.Linear  # nothing wrapped
    assert lp.inject_lora(layer, ["linear1"]) == ["linear1"]


# ---- Adapter --------------------------------------------------------------------------------------

def test_adapter_identity_init_and_counts():
    a = lp.Adapter(D, 8)
    h = torch.randn(2, 5, D)
    torch.testing.assert_close(a(h), h)
    assert a.num_trainable_parameters() == 2 * 8 * D + 8 + D
    model = tiny_llama()
    names = lp.add_adapters(model, ["self_attn", "mlp"], d=D, r=8)
    assert len(names) == 2 * L_
    n = lp.count_trainable_parameters(model)
    assert n == lp.adapter_params_exact(L_, D, 8, sites_per_layer=2)
    # the deck's 2·L·(r·d + r + d) per adapter site counts the biases twice: exact = deck − L(r + d)
    assert lp.adapter_params_exact(L_, D, 8) == lp.adapter_params(L_, D, 8) - L_ * (8 + D)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_llama()(ids).logits)
    model(ids).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_add_adapters_refuses_nested_targets():
    """A target inside another (self_attn and its o_proj) was a crash after the outer wrap and the freeze; now a
    ValueError before anything changes."""
    model = tiny_llama()
    before = sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="inside another match"):
        lp.add_adapters(model, ["self_attn", "o_proj"], d=D, r=4)
    assert sum(p.requires_grad for p in model.parameters()) == before
    assert not any(isinstance(m, lp.AdapterWrapper) for m in model.modules())


# ---- Prefix-tuning --------------------------------------------------------------------------------

@pytest.mark.parametrize("reparam", [False, True])
def test_prefix_counts_match_deck(reparam):
    P, Hh = 5, 24
    pt = lp.PrefixTuning(L_, P, D, H_, reparam=reparam, hidden=Hh if reparam else None)
    want = lp.prefix_params_reparam(L_, D, P, Hh) if reparam else lp.prefix_params(L_, D, P)
    assert pt.num_trainable_parameters() == want == pt.formula_parameters()
    if reparam:
        assert want == P * D + D * Hh + Hh * D * 2 * L_
    else:
        assert want == P * D * 2 * L_
    kv = pt(batch_size=3)
    assert len(kv) == L_ and kv[0][0].shape == (3, H_, P, D // H_)


def test_prefix_attention_is_always_visible_and_trains():
    P, B, T, hd = 4, 2, 6, D // H_
    pt = lp.PrefixTuning(L_, P, D, H_, reparam=True, hidden=16)
    q, k, v = (torch.randn(B, H_, T, hd) for _ in range(3))
    pk, pv = pt(B)[1]
    out = lp.prefix_attention(q, k, v, pk, pv, causal=True)
    # plain math: scores over [prefix; keys], key j (after the prefix) visible to query i iff j <= i
    kk, vv = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    s = q @ kk.transpose(-1, -2) / math.sqrt(hd)
    mask = torch.ones(T, P + T, dtype=torch.bool)
    mask[:, P:] = torch.ones(T, T, dtype=torch.bool).tril()
    want = s.masked_fill(~mask, float("-inf")).softmax(-1) @ vv
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # the first query still sees every prefix position
    assert mask[0, :P].all() and not mask[0, P + 1:].any()
    out.sum().backward()
    assert pt.embedding.grad is not None and pt.mlp[0].weight.grad is not None
    van = pt.to_vanilla()
    torch.testing.assert_close(van.kv(), pt.kv().detach())
    assert van.num_trainable_parameters() == lp.prefix_params(L_, D, P)
    # decoding with a KV cache: one query at the end sees the prefix and every cached key
    o1 = lp.prefix_attention(q[:, :, -1:], k, v, pk, pv, causal=True)
    torch.testing.assert_close(o1, out[:, :, -1:], rtol=1e-5, atol=1e-5)


def test_prefix_attention_gqa_and_bad_shapes():
    B, T, P, hd = 2, 5, 3, 8
    q = torch.randn(B, 4, T, hd, dtype=torch.float64)
    k, v = torch.randn(B, 2, T, hd, dtype=torch.float64), torch.randn(B, 2, T, hd, dtype=torch.float64)
    pk, pv = torch.randn(1, 2, P, hd, dtype=torch.float64), torch.randn(1, 2, P, hd, dtype=torch.float64)
    out = lp.prefix_attention(q, k, v, pk, pv, causal=True)
    rep = lambda t: t.repeat_interleave(2, dim=1)  # noqa: E731
    want = lp.prefix_attention(q, rep(k), rep(v), rep(pk), rep(pv), causal=True)
    torch.testing.assert_close(out, want)
    cases = [((q, k, v, pk[:, :1], pv), "prefix_k"), ((q, k, v, pk, pv[..., :4]), "prefix_v"),
             ((q, k, v[:, :, :4], pk, pv), "v "), ((q, k, v, pk, pv[:, :, :2]), "as many positions"),
             ((q[..., :4], k, v, pk, pv), "head_dim"), ((q[:, :3], k, v, pk, pv), "multiple"),
             ((q, k, v, pk[0], pv), "4-D"), ((torch.randn(B, 4, T + 1, hd, dtype=torch.float64), k, v, pk, pv),
                                              "no longer than k")]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            lp.prefix_attention(*args, causal=True)
    with pytest.raises(ValueError, match="scale"):
        lp.prefix_attention(q, k, v, pk, pv, scale=float("nan"))
    with pytest.raises(ValueError, match="prefix_k"):
        lp.extend_kv(k, v, pk.expand(3, -1, -1, -1), pv)


def test_prefix_validation():
    with pytest.raises(ValueError, match="divisible"):
        lp.PrefixTuning(2, 3, 30, 4)
    with pytest.raises(ValueError, match="hidden"):
        lp.PrefixTuning(2, 3, 32, 4, reparam=True)


# ---- PEFT on transformers <-> zoo models (Hugging Face module names) -------------------------------

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf_dir(path, kind):
    """A tiny random GPT2LMHeadModel / LlamaForCausalLM (GQA) saved to `path`."""
    torch.manual_seed(3)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        hf = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4)
        hf = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # random norm gains so that a mix-up would show
        for n, p in hf.named_parameters():
            if "norm" in n or ".ln_" in n:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(path)
    return str(path)


def _hf_base(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _zoo(path):
    from llmkern.models import from_hf

    return from_hf(path, backend="torch")


def _peft_trained(base_dir, adapter_dir, seed=11, **lora):
    """A PEFT adapter on the HF model with random A/B, saved; returns its logits on _ids()."""
    m = peft.get_peft_model(_hf_base(base_dir), peft.LoraConfig(lora_dropout=0.0, **lora))
    _randomize_lora(m, seed)
    m.save_pretrained(adapter_dir)
    with torch.no_grad():
        return m.eval()(_ids()).logits


@pytest.mark.parametrize("lora", [
    dict(target_modules=LLAMA_ALL, r=4, lora_alpha=8),
    dict(target_modules=["q_proj", "v_proj", "down_proj", "lm_head"], r=4, lora_alpha=16, use_rslora=True,
         rank_pattern={"v_proj": 2}, alpha_pattern={"lm_head": 3}),
], ids=["all-linear", "lm_head-rslora-patterns"])
def test_peft_adapter_on_hf_llama_loads_into_zoo_llama(tmp_path, lora):
    base = _hf_dir(tmp_path / "base", "llama")
    want = _peft_trained(base, tmp_path / "ad", **lora)
    zoo = lp.load_peft_adapter(_zoo(base), str(tmp_path / "ad"))
    names = dict(lp.lora_modules(zoo))
    assert "layers.0.self_attn.q_proj" in names and not any(n.startswith("model.") for n in names)
    assert len(names) == 2 * len([t for t in lora["target_modules"] if t != "lm_head"]) + ("lm_head" in names)
    with torch.no_grad():
        torch.testing.assert_close(zoo(_ids()), want, rtol=1e-4, atol=1e-4)


def test_zoo_llama_adapter_saves_with_hf_names_and_loads_back(tmp_path):
    import json

    base = _hf_dir(tmp_path / "base", "llama")
    zoo = _zoo(base)
    lp.inject_lora(zoo, LLAMA_ALL, r=4, alpha=8)
    lp.inject_lora(zoo, ["lm_head"], r=2, alpha=5)
    _randomize_lora(zoo, 12)
    with torch.no_grad():
        want = zoo(_ids())
    lp.save_peft_adapter(zoo, str(tmp_path / "ad"))
    cfg = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    assert sorted(cfg["target_modules"]) == sorted(LLAMA_ALL + ["lm_head"]) and cfg["rank_pattern"] == {"^lm_head": 2}
    back = peft.PeftModel.from_pretrained(_hf_base(base), str(tmp_path / "ad")).eval()
    assert sum("lora_A" in n for n, _ in back.named_parameters()) == 7 * 2 + 1  # every module found
    again = lp.load_peft_adapter(_zoo(base), str(tmp_path / "ad"))
    with torch.no_grad():
        torch.testing.assert_close(back(_ids()).logits, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(again(_ids()), want, rtol=1e-5, atol=1e-5)
    # the zoo's own names on request (older llmkern files): still load into the zoo model
    lp.save_peft_adapter(zoo, str(tmp_path / "zoo"), hf_names=False)
    assert json.load(open(tmp_path / "zoo" / "adapter_config.json"))["rank_pattern"] == {"^lm_head": 2}
    from safetensors import safe_open
    with safe_open(str(tmp_path / "zoo" / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in f.keys()
    with torch.no_grad():
        torch.testing.assert_close(lp.load_peft_adapter(_zoo(base), str(tmp_path / "zoo"))(_ids()), want,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora", [
    dict(target_modules=["c_attn", "c_proj", "c_fc"], r=4, lora_alpha=8),
    dict(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=8, use_rslora=True, rank_pattern={"c_fc": 2}),
], ids=["all", "rslora"])
def test_peft_adapter_on_hf_gpt2_loads_into_zoo_gpt(tmp_path, lora):
    base = _hf_dir(tmp_path / "base", "gpt2")
    want = _peft_trained(base, tmp_path / "ad", **lora)
    import json
    assert json.load(open(tmp_path / "ad" / "adapter_config.json"))["fan_in_fan_out"] is True  # PEFT sets it
    zoo = lp.load_peft_adapter(_zoo(base), str(tmp_path / "ad"))
    attn = zoo.h[1].attn
    assert all(isinstance(getattr(attn, p), lp.LoRALinear) for p in ("q_proj", "k_proj", "v_proj"))
    assert torch.equal(attn.q_proj.lora_A, attn.v_proj.lora_A) and attn.k_proj.lora_B.shape == (32, 4)
    assert isinstance(zoo.h[0].mlp.up_proj, lp.LoRALinear)
    assert isinstance(zoo.h[0].attn.o_proj, lp.LoRALinear) == ("c_proj" in lora["target_modules"])
    with torch.no_grad():
        torch.testing.assert_close(zoo(_ids()), want, rtol=1e-4, atol=1e-4)
    # a plain GPT2LMHeadModel takes it too: LoRALinear over its Conv1D layers (tests/test_peft_conv1d.py)
    plain = lp.load_peft_adapter(_hf_base(base), str(tmp_path / "ad"))
    assert plain.transformer.h[1].attn.c_attn.conv1d
    with torch.no_grad():
        torch.testing.assert_close(plain(_ids()).logits, want, rtol=1e-5, atol=1e-5)


def _inject(model, targets, r, alpha, use_rslora=False):
    lp.inject_lora(model, [f"attn.{t}" if "proj" in t and t[0] in "qkvo" else f"mlp.{t}" for t in targets],
                   r=r, alpha=alpha, use_rslora=use_rslora)


@pytest.mark.parametrize("case", ["qkvo-up-down", "q-v-only-mixed-scalings", "rslora"])
def test_zoo_gpt_adapter_saves_as_peft_gpt2_and_loads_back(tmp_path, case):
    import json

    base = _hf_dir(tmp_path / "base", "gpt2")
    zoo = _zoo(base)
    if case == "qkvo-up-down":
        _inject(zoo, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"], r=4, alpha=8)
    elif case == "q-v-only-mixed-scalings":  # k_proj without LoRA: its block of c_attn is zero
        _inject(zoo, ["q_proj"], r=4, alpha=8)
        _inject(zoo, ["v_proj"], r=2, alpha=6)
    else:
        _inject(zoo, ["q_proj", "k_proj", "v_proj", "down_proj"], r=4, alpha=8, use_rslora=True)
        zoo.h[1].attn.k_proj = lp.LoRALinear(zoo.h[1].attn.k_proj.base_layer, r=3, alpha=2, use_rslora=True)
    _randomize_lora(zoo, 13)
    before = {n: (m.r, m.alpha, m.lora_A.detach().clone(), m.lora_B.detach().clone())
              for n, m in lp.lora_modules(zoo)}
    with torch.no_grad():
        want = zoo(_ids())
    lp.save_peft_adapter(zoo, str(tmp_path / "ad"))
    cfg = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    assert cfg["fan_in_fan_out"] is True and "c_attn" in cfg["target_modules"]
    assert cfg["use_rslora"] == (case == "rslora")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = peft.PeftModel.from_pretrained(_hf_base(base), str(tmp_path / "ad")).eval()
    # PEFT only warns about adapter keys it did not find (and then runs the base model)
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    with torch.no_grad():
        torch.testing.assert_close(back(_ids()).logits, want, rtol=1e-4, atol=1e-4)
    # ... and back into the zoo: the same separate q/k/v LoRAs (ranks, alphas, weights)
    again = lp.load_peft_adapter(_zoo(base), str(tmp_path / "ad"))
    after = dict(lp.lora_modules(again))
    assert sorted(after) == sorted(before)
    for n, (r, alpha, A, B) in before.items():
        assert (after[n].r, after[n].alpha) == (r, alpha), n
        torch.testing.assert_close(after[n].lora_A, A, rtol=0, atol=0)
        torch.testing.assert_close(after[n].lora_B, B, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(again(_ids()), want, rtol=1e-5, atol=1e-5)


def test_zoo_gpt_c_attn_without_block_structure_still_loads_exactly(tmp_path):
    # save_peft_adapter's record of how q/k/v were packed is only used while B is still block-diagonal
    # that way; once PEFT trained the c_attn LoRA further, each of q/k/v gets A and its rows of B
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    base = _hf_dir(tmp_path / "base", "gpt2")
    zoo = _zoo(base)
    _inject(zoo, ["q_proj", "v_proj"], r=2, alpha=4)
    _randomize_lora(zoo, 14)
    lp.save_peft_adapter(zoo, str(tmp_path / "ad"))
    f = str(tmp_path / "ad" / "adapter_model.safetensors")
    with safe_open(f, "pt") as fh:
        meta = fh.metadata()
    w = load_file(f)
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"
    w[key] = torch.randn(w[key].shape, generator=torch.Generator().manual_seed(0)) * 0.1
    save_file(w, f, metadata=meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = peft.PeftModel.from_pretrained(_hf_base(base), str(tmp_path / "ad")).eval()(_ids()).logits
    got = lp.load_peft_adapter(_zoo(base), str(tmp_path / "ad"))
    assert got.h[0].attn.k_proj.r == 4 and got.h[1].attn.q_proj.r == 2 and isinstance(got.h[1].attn.k_proj, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(got(_ids()), want, rtol=1e-4, atol=1e-4)


def test_hf_name_mapping_refuses_what_it_cannot_express(tmp_path):
    base = _hf_dir(tmp_path / "base", "gpt2")
    _peft_trained(base, tmp_path / "ad", target_modules=["c_attn"], r=4, lora_alpha=8)
    # a c_attn LoRA for another width: its B rows do not split into this model's q/k/v
    torch.manual_seed(0)
    wide = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=48,
                                                                 n_layer=2, n_head=4))
    wide.save_pretrained(tmp_path / "wide")
    model = _zoo(str(tmp_path / "wide"))
    with pytest.raises(ValueError, match=r"transformer\.h\.\d\.attn\.c_attn\.lora_B has 96 output rows"):
        lp.load_peft_adapter(model, str(tmp_path / "ad"))
    assert not lp.lora_modules(model)  # nothing half-loaded
    # an HF c_attn LoRA into a zoo model whose q/k/v LoRAs have another rank
    zoo = _zoo(base)
    _inject(zoo, ["q_proj", "k_proj", "v_proj"], r=2, alpha=8)
    with pytest.raises(ValueError, match=r"h\.0\.attn\.q_proj \(from transformer\.h\.0\.attn\.c_attn .*rank 2"):
        lp.load_peft_adapter(zoo, str(tmp_path / "ad"))
    # a zoo LoRA that has no place in the HF model (inside an Adapter wrapper)
    zoo = _zoo(base)
    lp.add_adapters(zoo, ["mlp"], d=32, r=4)
    lp.inject_lora(zoo, ["up_proj"], r=2, alpha=2)
    with pytest.raises(ValueError, match=r"h\.0\.mlp\.module\.up_proj has no counterpart"):
        lp.save_peft_adapter(zoo, str(tmp_path / "x"))
    lp.save_peft_adapter(zoo, str(tmp_path / "x"), hf_names=False)  # its own names are fine


def test_save_peft_adapter_replaces_files_whole(tmp_path, monkeypatch):
    """The files are written beside their place and renamed into it (another replica's writer of the same path
    truncated them under a reader); a failed write leaves the old files and no temporary one."""
    import os

    model = tiny_llama()
    lp.inject_lora(model, ["q_proj"], r=2)
    lp.save_peft_adapter(model, str(tmp_path))
    before = {f: open(tmp_path / f, "rb").read() for f in os.listdir(tmp_path)}
    assert set(before) == {"adapter_model.safetensors", "adapter_config.json"}
    mode = os.stat(tmp_path / "adapter_config.json").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # (a plain file's permissions, not a private temporary's)

    def broken(tensors, dest, metadata=None):
        with open(dest, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        lp.save_peft_adapter(model, str(tmp_path))
    assert {f: open(tmp_path / f, "rb").read() for f in os.listdir(tmp_path)} == before


@pytest.mark.parametrize("call", ["lora_r0", "lora_dropout", "lora_bool_r", "lora_alpha_nan", "adapter_r0"])
def test_refused_peft_calls_leave_the_model_as_it_was(call):
    """inject_lora / add_adapters froze the whole model before checking their arguments: a refused call (caught)
    left a model in which nothing trained."""
    model = tiny_llama()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = [n for n, _ in model.named_modules()]
    kw = {"lora_r0": dict(r=0), "lora_dropout": dict(dropout=1.5), "lora_bool_r": dict(r=True),
          "lora_alpha_nan": dict(alpha=float("nan"))}
    with pytest.raises(ValueError):
        if call == "adapter_r0":
            lp.add_adapters(model, ["mlp"], d=D, r=0)
        else:
            lp.inject_lora(model, ["q_proj"], **kw[call])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert [n for n, _ in model.named_modules()] == modules


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_prefix_on_zoo_equals_peft_prefix_tuning(tmp_path, kind):
    """The same prefix K/V on the zoo model and on PEFT's PrefixTuning over transformers give the same logits:
    the prefix takes positions 0..P-1 and the tokens P.. (RoPE / learned positions), as there, where the prefix
    fills the first cache slots (the zoo numbered the tokens from 0: Llama logits 0.03 off, GPT-2 0.3)."""
    path = _hf_dir(tmp_path / "base", kind)
    P = 3
    pm = peft.get_peft_model(_hf_base(path), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    pm.eval()
    cfg = pm.peft_config["default"]
    emb = pm.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        emb.normal_(0, 1.0, generator=torch.Generator().manual_seed(5))
    L, d = cfg.num_layers, cfg.token_dim
    init = emb.detach().view(P, L, 2, d).permute(1, 2, 0, 3).contiguous()  # PEFT's layout -> [L, 2, P, d]
    zoo = _zoo(path).eval()
    zoo.attach_prefix(lp.PrefixTuning(L, P, d, cfg.num_attention_heads, init=init))
    ids = _ids(B=1)
    with torch.no_grad():
        want = pm(ids).logits
        torch.testing.assert_close(zoo(ids), want, rtol=1e-4, atol=1e-4)
        # with left padding (attention_mask): the positions count the real tokens after the prefix
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, :3] = 0
        ids2 = torch.cat([ids, ids], 0)
        got = zoo(ids2, attention_mask=mask)
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[1, 3:], pm(ids[:, 3:]).logits[0], rtol=1e-4, atol=1e-4)
