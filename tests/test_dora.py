"""DoRA (llmkern.peft.dora_linear / dora_weight_norm, LoRALinear(use_dora=True)) vs PEFT's formula and
PEFT itself: the fused op's outputs and gradients, merge/unmerge, PEFT checkpoints both ways and
use_fused_lora on a PEFT DoRA model."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmkern import peft as lp
from llmkern import reference as ref
from llmkern.peft import dora as D
from llmkern.testing import assert_close, tiny_hf_llama, triton_device
from test_peft import _hf_base, _hf_dir, _zoo  # (the tiny transformers checkpoints of the PEFT tests)

TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=3e-2, rtol=3e-2)}


def peft_dora(x, W, b, A, B, m, s, p=0.0, seed=0):
    """PEFT's DoRA Linear forward, literally: W + s·B A formed, its row norms detached; with dropout
    the DoRA part runs on the dropped x (the fused op's mask). Computes in the inputs' dtype."""
    norm = torch.linalg.vector_norm(W + s * (B @ A).detach(), dim=1).detach()
    mag_norm_scale = m / norm
    result = F.linear(x, W, b)
    xd = ref.lora_dropout(x, p, seed) if p > 0 else x
    return result + (mag_norm_scale - 1) * F.linear(xd, W) + mag_norm_scale * F.linear(F.linear(xd, A), B) * s


def _inputs(M, K, N, r, dtype, bias=True, lead=()):
    g = lambda *sh, sc=1.0: (torch.randn(*sh) * sc).to(dtype)  # noqa: E731
    x = g(*lead, M, K)
    W = g(N, K, sc=K ** -0.5)
    b = g(N) if bias else None
    A = g(r, K, sc=K ** -0.5)
    B = g(N, r, sc=r ** -0.5)
    m = (torch.rand(N) + 0.5).to(dtype)
    return x, W, b, A, B, m


def _leaf(t, grad=True):
    return None if t is None else t.detach().clone().requires_grad_(grad)


def _d(t, grad=True):
    return None if t is None else t.detach().double().requires_grad_(grad)


# ---- the row-norm helper ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,K,r", [(50, 45, 5), (33, 64, 1), (7, 300, 16)])
def test_weight_norm_formula_equals_explicit_norm(dtype, N, K, r):
    _, W, _, A, B, _ = _inputs(1, K, N, r, dtype)
    s = 1.7
    got = lp.dora_weight_norm(W, A, B, s)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.shape == (N,)
    assert not got.requires_grad
    want = torch.linalg.vector_norm(W.double() + s * B.double() @ A.double(), dim=1)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_weight_norm_clamps_round_off_and_is_detached():
    W = torch.randn(6, 10, requires_grad=True)
    A = torch.eye(3, 10)
    B = torch.zeros(6, 3)
    B[:3] = -W.detach()[:3, :3]  # rows 0-2 of W + B A cancel in their first 3 columns
    with torch.no_grad():
        W[:3, 3:] = 0
    n = lp.dora_weight_norm(W, A, B.requires_grad_(), 1.0)
    assert torch.isfinite(n).all() and torch.all(n[:3] < 1e-3) and torch.all(n[3:] > 0.1)
    assert not n.requires_grad


def test_weight_norm_allocates_nothing_out_by_in(monkeypatch):
    """The helper's largest allocation stays far below an [out, in] tensor (never B A, never W + sBA,
    no float32 copy of a 16-bit W: CPU reductions that would copy run on row chunks)."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setattr(D, "_CHUNK_ELEMS", 1 << 12)
    N, K, r = 256, 512, 8
    for dtype in (torch.float32, torch.float16):
        _, W, _, A, B, _ = _inputs(1, K, N, r, dtype)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            lp.dora_weight_norm(W, A, B, 0.5)
        biggest = max(e.cpu_memory_usage for e in prof.events())
        assert 0 < biggest < N * K * 2 // 4, (dtype, biggest)
    # and the formula is what dora_linear uses: nothing in the module forms B A either
    import inspect

    src = inspect.getsource(D)
    assert "B @ A" not in src and "lora_B @ lora_A" not in src


# ---- dora_linear vs PEFT's formula ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,N,r,p,bias,w_grad", [
    (37, 45, 50, 5, 0.0, True, False),
    (19, 64, 33, 16, 0.25, True, False),
    (50, 30, 70, 1, 0.5, False, False),
    (13, 24, 17, 3, 0.0, True, True),    # a trainable base weight: its gradient through the linear terms
    (11, 40, 9, 4, 0.3, False, True),
])
def test_dora_linear_matches_peft_formula(dtype, M, K, N, r, p, bias, w_grad):
    x, W, b, A, B, m = _inputs(M, K, N, r, dtype, bias=bias, lead=(2,))
    s = 1.7
    xs, Ws, bs, As, Bs, ms = _leaf(x), _leaf(W, w_grad), _leaf(b), _leaf(A), _leaf(B), _leaf(m)
    y = lp.dora_linear(xs, Ws, bs, As, Bs, ms, s, p, seed=1234)
    assert y.dtype == dtype and y.shape == (2, M, N)
    dy = torch.randn_like(y)
    y.backward(dy)
    xd, Wd, bd, Ad, Bd, md = _d(x), _d(W, w_grad), _d(b), _d(A), _d(B), _d(m)
    yr = peft_dora(xd, Wd, bd, Ad, Bd, md, s, p, seed=1234)
    yr.backward(dy.double())
    tol = TOL[dtype]
    assert_close(y, yr, msg="y", **tol)
    grads = [("dx", xs, xd), ("dA", As, Ad), ("dB", Bs, Bd), ("dm", ms, md), ("db", bs, bd), ("dW", Ws, Wd)]
    for name, got, want in grads:
        if got is None or (name == "dW" and not w_grad):
            continue
        assert_close(got.grad, want.grad, msg=name, **tol)
    assert w_grad or Ws.grad is None


def test_dora_linear_dropout_is_seeded_and_peft_like():
    x, W, b, A, B, m = _inputs(24, 40, 16, 4, torch.float32)
    y1 = lp.dora_linear(x, W, b, A, B, m, 0.5, 0.4, seed=7)
    torch.testing.assert_close(lp.dora_linear(x, W, b, A, B, m, 0.5, 0.4, seed=7), y1, rtol=0, atol=0)
    assert not torch.equal(lp.dora_linear(x, W, b, A, B, m, 0.5, 0.4, seed=8), y1)
    # with m = ‖W + sBA‖ (factor 1) dropout only touches the LoRA branch: plain LoRA with the same mask
    n = lp.dora_weight_norm(W, A, B, 0.5)
    torch.testing.assert_close(lp.dora_linear(x, W, b, A, B, n, 0.5, 0.4, seed=7),
                               ref.lora_linear(x, W, b, A, B, 0.5, 0.4, seed=7), rtol=1e-5, atol=1e-5)
    torch.manual_seed(3)
    a = lp.dora_linear(x, W, b, A, B, m, 0.5, 0.4)
    torch.manual_seed(3)
    torch.testing.assert_close(lp.dora_linear(x, W, b, A, B, m, 0.5, 0.4), a, rtol=0, atol=0)


def test_dora_linear_with_dropout_compiles_with_an_opaque_mask():
    """Regression: under torch.compile the dropout term's mask (llmkern.reference.lora_dropout, on every
    device) was traced inline, and Inductor's lowering of the hash from a tensor seed ran for many
    minutes. The mask is one custom op in the graph now; the compiled call equals eager."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, W, b, A, B, m = _inputs(12, 16, 10, 4, torch.float32)
    f = torch.compile(lambda x: lp.dora_linear(x, W, b, A, B, m, 0.5, 0.3, seed=5), backend=record,
                      fullgraph=True)
    torch.testing.assert_close(f(x), lp.dora_linear(x, W, b, A, B, m, 0.5, 0.3, seed=5), rtol=0, atol=0)
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.llmkern.lora_dropout_keep_mask.default in targets, targets
    assert len(targets) < 60, len(targets)
    seed = torch.tensor([5, 0], dtype=torch.int32)
    torch.library.opcheck(torch.ops.llmkern.lora_dropout_keep_mask.default, (seed, 6, 7, 0.3))


@pytest.mark.skipif(triton_device() is None, reason="no CUDA and no TRITON_INTERPRET")
def test_dora_linear_through_triton_kernels(monkeypatch):
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    from llmkern.ops import lora as ops_lora

    calls = []
    orig = ops_lora._run_triton
    monkeypatch.setattr(ops_lora, "_run_triton", lambda *a: calls.append(1) or orig(*a))
    dev = triton_device()
    x, W, b, A, B, m = (t.to(dev) for t in _inputs(21, 40, 18, 4, torch.float32))
    xs, As, Bs, ms = _leaf(x), _leaf(A), _leaf(B), _leaf(m)
    y = lp.dora_linear(xs, W, b, As, Bs, ms, 0.8, 0.2, seed=5)
    y.sum().backward()  # (an expanded, stride-0 gradient)
    assert calls
    xd, Ad, Bd, md = _d(x), _d(A), _d(B), _d(m)
    peft_dora(xd, W.double(), b.double(), Ad, Bd, md, 0.8, 0.2, seed=5).sum().backward()
    for name, got, want in (("dx", xs, xd), ("dA", As, Ad), ("dB", Bs, Bd), ("dm", ms, md)):
        assert_close(got.grad, want.grad, msg=name, **TOL[torch.float32])


@pytest.mark.parametrize("bad, match", [
    (dict(magnitude=torch.randn(11)), r"magnitude must have shape \[12\]"),
    (dict(magnitude=torch.ones(12, dtype=torch.int64)), "magnitude must be a floating-point"),
    (dict(magnitude=[1.0] * 12), "magnitude must be a torch.Tensor"),
    (dict(lora_B=torch.randn(12, 4)), "lora_B must have shape"),
    (dict(lora_A=torch.randn(3, 9)), "lora_A must have shape"),
    (dict(weight=torch.randn(12, 9)), "weight must have shape"),
    (dict(bias=torch.randn(5)), "bias must have shape"),
    (dict(scaling=torch.tensor(1.0, requires_grad=True)), "scaling must not require grad"),
    (dict(scaling=float("nan")), "scaling must be finite"),
    (dict(dropout_p=1.0), "dropout_p must be in"),
])
def test_dora_linear_validation(bad, match):
    args = dict(x=torch.randn(4, 10), weight=torch.randn(12, 10), bias=torch.randn(12), lora_A=torch.randn(3, 10),
                lora_B=torch.randn(12, 3), magnitude=torch.rand(12), scaling=1.0, dropout_p=0.0)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        lp.dora_linear(**args)


def test_weight_norm_validation():
    W, A, B = torch.randn(12, 10), torch.randn(3, 10), torch.randn(12, 3)
    with pytest.raises(ValueError, match="lora_A must have shape"):
        lp.dora_weight_norm(W, A.t(), B, 1.0)
    with pytest.raises(ValueError, match=r"lora_B must have shape \[12, 3\]"):
        lp.dora_weight_norm(W, A, B.t(), 1.0)
    with pytest.raises(ValueError, match="weight must be"):
        lp.dora_weight_norm(W[0], A, B, 1.0)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        lp.dora_weight_norm(None, A, B, 1.0)


# ---- LoRALinear(use_dora=True) ------------------------------------------------------------------------

def _dora_module(N=12, K=20, r=4, alpha=8, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    m = lp.LoRALinear(nn.Linear(K, N).to(dtype), r=r, alpha=alpha, use_dora=True, **kw)
    with torch.no_grad():
        nn.init.normal_(m.lora_B, std=0.3)
        m.lora_magnitude_vector.mul_(torch.rand(N, dtype=dtype) + 0.5)
    return m


def test_lora_linear_dora_init_forward_merge():
    base = nn.Linear(20, 12)
    m = lp.LoRALinear(base, r=4, alpha=8, use_dora=True)
    torch.testing.assert_close(m.lora_magnitude_vector, torch.linalg.vector_norm(base.weight, dim=1).detach())
    assert m.lora_magnitude_vector.requires_grad and not base.weight.requires_grad
    assert m.num_trainable_parameters() == 4 * 20 + 12 * 4 + 12
    assert "dora=True" in repr(m)
    x = torch.randn(3, 5, 20)
    torch.testing.assert_close(m(x), base(x))  # B = 0, m = ‖W‖: the base layer
    m = _dora_module()
    y = m(x)
    torch.testing.assert_close(y, peft_dora(x, m.weight, m.bias, m.lora_A, m.lora_B, m.lora_magnitude_vector,
                                            m.scaling), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert m.lora_magnitude_vector.grad is not None and m.lora_A.grad is not None
    w0 = m.weight.detach().clone()
    m.merge()
    assert m.merged
    # PEFT's merged weight: (m / ‖W + sBA‖) ⊙ (W + sBA), row-wise
    Wd = w0.double() + m.scaling * m.lora_B.double() @ m.lora_A.double()
    want = (m.lora_magnitude_vector.double() / torch.linalg.vector_norm(Wd, dim=1))[:, None] * Wd
    torch.testing.assert_close(m.weight.double(), want.detach(), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    m.unmerge()
    torch.testing.assert_close(m.weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)


def test_lora_linear_dora_safe_merge_checks():
    m = _dora_module()
    w1 = m.weight.detach().clone()
    with torch.no_grad():
        m.lora_magnitude_vector[3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        m.merge()
    assert torch.equal(m.weight, w1) and not m.merged
    with torch.no_grad():
        m.lora_magnitude_vector[3] = 0.0
    with pytest.raises(ValueError, match="zero entries"):  # unmerge() could not restore that row
        m.merge()
    assert torch.equal(m.weight, w1) and not m.merged


def test_lora_linear_dora_float64_merge_round_trip():
    m = _dora_module(dtype=torch.float64)
    x = torch.randn(3, 20, dtype=torch.float64)
    y, w0 = m(x), m.weight.detach().clone()
    m.merge()
    torch.testing.assert_close(m(x), y, rtol=1e-12, atol=1e-12)
    m.unmerge()
    torch.testing.assert_close(m.weight, w0, rtol=1e-13, atol=1e-13)


def test_lora_linear_dora_dropout_and_set_use_dora():
    m = _dora_module(dropout=0.5)
    x = torch.randn(6, 20)
    m.eval()
    want = peft_dora(x, m.weight, m.bias, m.lora_A, m.lora_B, m.lora_magnitude_vector, m.scaling)
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, m(x))
    m.eval()
    m.set_use_dora(False)
    assert m.lora_magnitude_vector is None and m.num_trainable_parameters() == 4 * 20 + 12 * 4
    m.set_use_dora(True)  # a fresh magnitude = ‖W + sBA‖: the same output as plain LoRA
    torch.testing.assert_close(m(x), ref.lora_linear(x, m.weight, m.bias, m.lora_A, m.lora_B, m.scaling),
                               rtol=1e-5, atol=1e-5)


# ---- models: inject_lora, PEFT ------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

L_, Dm, H_, V = 2, 32, 4, 64


def tiny_llama(seed=0):
    return tiny_hf_llama(seed, vocab=V, hidden=Dm, layers=L_, heads=H_)


def _randomize(model, seed=1):
    """Random A/B (std 0.1) and DoRA magnitudes (x U[0.5, 1.5]), so that every part shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_A" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in n:
                p.mul_(torch.rand(p.shape, generator=g) + 0.5)


def _ids(B=2, T=8, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_inject_lora_dora_count_merge_and_train():
    model = tiny_llama()
    names = lp.inject_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=16, use_dora=True)
    assert len(names) == 3 * L_
    assert lp.count_trainable_parameters(model) == L_ * (2 * (4 * Dm + Dm * 4 + Dm) + (4 * 48 + Dm * 4 + Dm))
    _randomize(model)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        lp.merge_lora(model)
        merged = model(ids).logits
        lp.unmerge_lora(model)
        after = model(ids).logits
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    model.train()
    model(ids).logits.pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def _peft_dora(dropout=0.0, targets=("q_proj", "v_proj"), seed=1):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=dropout, use_dora=True)
    model = peft.get_peft_model(tiny_llama(), cfg)
    _randomize(model, seed)
    return model


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_use_fused_lora_dora_same_logits_and_grads(monkeypatch, backend):
    if backend == "triton" and triton_device() is None:
        pytest.skip("no Triton device")
    monkeypatch.setenv("LLMKERN_BACKEND", backend)
    from llmkern.integrations import peft as ip

    model = _peft_dora()
    ids = _ids()
    calls = []
    orig = ip.dora_linear
    monkeypatch.setattr(ip, "dora_linear", lambda *a, **k: calls.append(1) or orig(*a, **k))
    for mode in ("train", "eval") if backend == "reference" else ("train",):
        getattr(model, mode)()
        ip.use_fused_lora(model, enable=False)
        model.zero_grad()
        want = model(ids).logits
        want.pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert any("lora_magnitude_vector" in n for n in grads)
        model.zero_grad()
        calls.clear()
        ip.use_fused_lora(model)
        got = model(ids).logits
        got.pow(2).mean().backward()
        assert len(calls) == 2 * L_, mode
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=mode)
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, grads[n], rtol=1e-3, atol=1e-6, msg=f"{mode} {n}")


def test_use_fused_lora_dora_dropout_and_mixed_batches():
    from llmkern.integrations.peft import use_fused_lora

    model = _peft_dora(dropout=0.3)
    use_fused_lora(model)
    ids = _ids()
    model.train()
    out = model(ids).logits  # dropout runs in the fused path (llmkern's mask, not nn.Dropout's draws)
    assert torch.isfinite(out).all()
    model.eval()
    with pytest.raises(ValueError, match="DoRA"):  # PEFT's own refusal, kept
        model(ids, adapter_names=["default", "__base__"])


def test_peft_dora_adapter_loads_into_plain_model_and_back(tmp_path):
    model = _peft_dora(targets=("q_proj", "v_proj", "down_proj"))
    ids = _ids()
    with torch.no_grad():
        want = model.eval()(ids).logits
    model.save_pretrained(tmp_path / "peft")
    ours = lp.load_peft_adapter(tiny_llama(), str(tmp_path / "peft"))
    mods = dict(lp.lora_modules(ours))
    assert len(mods) == 3 * L_ and all(m.use_dora for m in mods.values())
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, want, rtol=1e-5, atol=1e-5)
    lp.save_peft_adapter(ours, str(tmp_path / "ours"))
    cfg = json.load(open(tmp_path / "ours" / "adapter_config.json"))
    assert cfg["use_dora"] is True
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "ours" / "adapter_model.safetensors")).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    assert sorted(keys) == sorted(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).keys())
    back = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, want, rtol=1e-5, atol=1e-5)
    # an existing plain LoRALinear becomes DoRA, and a plain adapter turns it back
    plain = tiny_llama()
    lp.inject_lora(plain, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    lp.load_peft_adapter(plain, str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, want, rtol=1e-5, atol=1e-5)
    assert all(m.lora_magnitude_vector.requires_grad for _, m in lp.lora_modules(plain))


def test_save_refuses_mixed_dora_and_lora(tmp_path):
    model = tiny_llama()
    lp.inject_lora(model, ["q_proj"], r=4, alpha=8, use_dora=True)
    lp.inject_lora(model, ["v_proj"], r=4, alpha=8)
    with pytest.raises(ValueError, match="mixes DoRA and plain LoRA"):
        lp.save_peft_adapter(model, str(tmp_path))


def test_load_rejects_inconsistent_dora_files(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _peft_dora()
    model.save_pretrained(tmp_path)
    f = str(tmp_path / "adapter_model.safetensors")
    w = load_file(f)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    save_file({k: v for k, v in w.items() if k != key}, f)
    with pytest.raises(ValueError, match="no lora_magnitude_vector"):
        lp.load_peft_adapter(tiny_llama(), str(tmp_path))
    save_file({**w, key: torch.ones(5)}, f)
    with pytest.raises(ValueError, match="lora_magnitude_vector has shape"):
        lp.load_peft_adapter(tiny_llama(), str(tmp_path))
    save_file(w, f)
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    json.dump({**cfg, "use_dora": False}, open(tmp_path / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match="use_dora=False"):
        lp.load_peft_adapter(tiny_llama(), str(tmp_path))
    json.dump({**cfg, "lora_bias": True}, open(tmp_path / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match="lora_bias"):
        lp.load_peft_adapter(tiny_llama(), str(tmp_path))


# ---- PEFT on transformers <-> zoo models ----------------------------------------------------------

def test_peft_dora_on_hf_llama_loads_into_zoo_llama_and_back(tmp_path):
    base = _hf_dir(tmp_path / "base", "llama")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    m = peft.get_peft_model(_hf_base(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                            use_dora=True, lora_dropout=0.0))
    _randomize(m, 11)
    m.save_pretrained(tmp_path / "ad")
    with torch.no_grad():
        want = m.eval()(_ids()).logits
    zoo = lp.load_peft_adapter(_zoo(base), str(tmp_path / "ad"))
    assert len(lp.lora_modules(zoo)) == 2 * len(targets) and all(x.use_dora for _, x in lp.lora_modules(zoo))
    with torch.no_grad():
        torch.testing.assert_close(zoo(_ids()), want, rtol=1e-4, atol=1e-4)
        lp.merge_lora(zoo)
        torch.testing.assert_close(zoo(_ids()), want, rtol=1e-4, atol=1e-4)
        lp.unmerge_lora(zoo)
    lp.save_peft_adapter(zoo, str(tmp_path / "ours"))
    back = peft.PeftModel.from_pretrained(_hf_base(base), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(_ids()).logits, want, rtol=1e-4, atol=1e-4)


def test_zoo_gpt_dora_saves_as_peft_gpt2_c_attn_and_loads_back(tmp_path):
    """q/v DoRA of the zoo GPT become one exact DoRA on GPT-2's fused c_attn (k's rows: factor 1)."""
    base = _hf_dir(tmp_path / "base", "gpt2")
    zoo = _zoo(base)
    lp.inject_lora(zoo, ["attn.q_proj"], r=4, alpha=8, use_dora=True)
    lp.inject_lora(zoo, ["attn.v_proj", "mlp.up_proj"], r=2, alpha=6, use_dora=True)
    _randomize(zoo, 13)
    with torch.no_grad():
        want = zoo(_ids())
    lp.save_peft_adapter(zoo, str(tmp_path / "ad"))
    back = peft.PeftModel.from_pretrained(_hf_base(base), str(tmp_path / "ad")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(_ids()).logits, want, rtol=1e-4, atol=1e-4)
    again = lp.load_peft_adapter(_zoo(base), str(tmp_path / "ad"))
    assert isinstance(again.h[0].attn.k_proj, nn.Linear) and again.h[0].attn.q_proj.use_dora
    with torch.no_grad():
        torch.testing.assert_close(again(_ids()), want, rtol=1e-5, atol=1e-5)
