"""llmkern.attention / attention_varlen / attention_with_kvcache: Triton kernels (the interpreter
on CPU, small shapes, float32/float16) against the float64 reference; reference against SDPA;
validation; registration (opcheck, torch.compile). GPU cases (bf16, real sizes) under -m gpu."""
import math

import pytest
import torch
import torch.nn.functional as F

import llmkern
import llmkern.ops.attention  # noqa: F401  (registers torch.ops.llmkern.attention_*)
from llmkern.reference import attention as ref
from llmkern.testing import assert_close, interpreter_dtypes, triton_device

DEV = triton_device()
needs_triton = pytest.mark.skipif(DEV is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


def _qkv(B, H, Hk, Tq, Tk, D, dtype, device=DEV, requires_grad=True):
    q = torch.randn(B, H, Tq, D, device=device, dtype=dtype)
    k = torch.randn(B, Hk, Tk, D, device=device, dtype=dtype)
    v = torch.randn(B, Hk, Tk, D, device=device, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _kpm(B, Tk, device=DEV):
    """Left padding on row 0, right padding on row 1, random holes elsewhere (always one key)."""
    m = torch.rand(B, Tk, device=device) > 0.3
    m[:, 0] = True
    if B > 0:
        m[0, : Tk // 3] = False
        m[0, -1] = True
    if B > 1:
        m[1, :] = True
        m[1, Tk - Tk // 4:] = False
    return m


def _check(q, k, v, dtype, *, grad_lse=False, **kw):
    """Forward, LSE and gradients of llmkern.attention vs the float64 reference."""
    out, lse = llmkern.attention(q, k, v, return_lse=True, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    rout, rlse = ref.attention(qd, kd, vd, return_lse=True, **kw)
    assert_close(out, rout, dtype, msg="out")
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin), "LSE -inf rows differ"
    assert_close(lse[fin], rlse[fin], torch.float32, atol=2e-3 if dtype == torch.float16 else 1e-4)
    assert not out.isnan().any()
    dout = torch.randn_like(out)
    loss = (out.float() * dout.float()).sum()
    rloss = (rout * dout.double()).sum()
    if grad_lse:
        dl = torch.randn_like(lse)
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0) * dl).sum()
        rloss = rloss + (torch.where(fin, rlse, 0) * dl.double()).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    rgrads = torch.autograd.grad(rloss, (qd, kd, vd))
    for name, g, rg in zip("qkv", grads, rgrads):
        assert g.dtype == dtype and torch.isfinite(g).all()
        scale = max(1.0, rg.abs().max().item())
        assert_close(g / scale, rg / scale, dtype, msg=f"d{name}")
    return out, lse


# ---- the Triton kernels vs the float64 reference ------------------------------------------------

CASES = [
    # B, H, Hk, Tq, Tk, D, kwargs
    (1, 2, 2, 64, 64, 32, dict()),
    (1, 2, 2, 64, 64, 32, dict(causal=True)),
    (2, 4, 2, 47, 47, 40, dict(causal=True)),                  # GQA, odd length and head dim
    (1, 4, 1, 33, 90, 16, dict(causal=True)),                  # MQA, Tq < Tk: bottom-right (chunked prefill)
    (1, 2, 2, 70, 30, 24, dict(causal=True)),                  # Tq > Tk: first rows see nothing
    (2, 2, 1, 50, 70, 64, dict(window=(10, 5))),               # sliding window both sides
    (1, 2, 2, 80, 80, 32, dict(causal=True, window=(16, None))),
    (2, 2, 2, 40, 65, 16, dict(softcap=5.0)),
    (2, 2, 2, 40, 65, 16, dict(softcap=2.0, causal=True, scale=0.3)),
    (2, 2, 1, 37, 61, 32, dict(key_padding_mask="pad")),
    (2, 2, 2, 61, 61, 32, dict(key_padding_mask="pad", causal=True, window=(20, None))),
    (1, 2, 2, 40, 40, 80, dict(causal=True)),                  # GPT-3 2.7B head dim
    (1, 1, 1, 20, 36, 96, dict()),
    (1, 2, 1, 33, 45, 16, dict(causal=True, scale=-0.2)),     # scale <= 0: the forward's scores stay
    (1, 2, 2, 20, 40, 16, dict(window=(8, 8), scale=0.0)),    # unscaled until the exponent (needs > 0)
]


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[f"{c[:6]}-{sorted(c[6])}" for c in CASES])
def test_kernel_vs_reference_fp32(triton_backend, case):
    B, H, Hk, Tq, Tk, D, kw = case
    kw = dict(kw)
    if kw.get("key_padding_mask") == "pad":
        kw["key_padding_mask"] = _kpm(B, Tk)
    q, k, v = _qkv(B, H, Hk, Tq, Tk, D, torch.float32)
    _check(q, k, v, torch.float32, **kw)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter block sizes (GPU uses autotuned ones)")
@pytest.mark.parametrize("blocks", ["16,64", "64,16"])
def test_kernel_unequal_blocks(triton_backend, monkeypatch, blocks):
    """GPU configs are asymmetric (e.g. 128x64, 32x128): block-range logic with BLOCK_M != BLOCK_N."""
    monkeypatch.setenv("LLMKERN_ATTN_INTERP_BLOCK", blocks)
    q, k, v = _qkv(2, 2, 1, 45, 77, 16, torch.float32)
    _check(q, k, v, torch.float32, causal=True, window=(30, None), key_padding_mask=_kpm(2, 77))


@needs_triton
@pytest.mark.parametrize("dtype", interpreter_dtypes())
def test_kernel_dtypes(triton_backend, dtype):
    q, k, v = _qkv(2, 4, 2, 50, 50, 64, dtype)
    _check(q, k, v, dtype, causal=True)


@needs_triton
def test_lse_gradient(triton_backend):
    q, k, v = _qkv(1, 2, 1, 30, 45, 32, torch.float32)
    _check(q, k, v, torch.float32, causal=True, grad_lse=True)


@needs_triton
def test_empty_rows_are_zero_not_nan(triton_backend):
    q, k, v = _qkv(2, 2, 2, 40, 24, 16, torch.float32)
    kpm = torch.ones(2, 24, dtype=torch.bool, device=DEV)
    kpm[1] = False                                            # row 1: no key at all
    out, lse = llmkern.attention(q, k, v, causal=True, key_padding_mask=kpm, return_lse=True)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert (out[0, :, :16] == 0).all() and torch.isneginf(lse[0, :, :16]).all()   # Tq > Tk, causal
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@needs_triton
def test_backward_with_expanded_grad_and_strided_inputs(triton_backend):
    """.sum().backward() sends a stride-0 gradient; HF hands [B, T, H, D]-transposed q/k/v."""
    B, T, H, D = 2, 45, 2, 32
    base = [torch.randn(B, T, H, D, device=DEV, requires_grad=True) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in base)
    out = llmkern.attention(q, k, v, causal=True)
    out.sum().backward()
    rb = [t.detach().double().requires_grad_() for t in base]
    ref.attention(*(t.transpose(1, 2) for t in rb), causal=True).sum().backward()
    for t, r in zip(base, rb):
        assert_close(t.grad, r.grad, torch.float32)


@needs_triton
def test_backward_is_deterministic(triton_backend):
    q, k, v = _qkv(1, 4, 2, 64, 64, 32, torch.float32)
    dout = torch.randn(1, 4, 64, 32, device=DEV)
    runs = []
    for _ in range(2):
        out = llmkern.attention(q, k, v, causal=True)
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- the TMA (tensor-descriptor) kernels of sm_90+ --------------------------------------------

TMA_CASES = [
    # B, H, Hk, Tq, Tk, D, kwargs, layout ([B, H, T, D] or HF's [B, T, H, D] transposed)
    (1, 2, 1, 37, 37, 64, dict(causal=True), "bhtd"),
    (2, 4, 2, 50, 70, 80, dict(causal=True), "bthd"),                 # GQA, D not a power of two
    (1, 2, 2, 33, 65, 32, dict(window=(5, 3), softcap=10.0), "bhtd"),
    (2, 2, 1, 40, 45, 64, dict(causal=True, key_padding_mask="pad"), "bhtd"),
]


def _run_kernels(q, k, v, dout, kw):
    from llmkern.kernels import attention as A

    scale = kw.pop("scale", q.shape[-1] ** -0.5)
    wl, wr = kw.pop("window", (None, None))
    wl, wr = -1 if wl is None else wl, -1 if wr is None else wr
    out, lse = A.attention_forward(q, k, v, scale=scale, window_left=wl, window_right=wr, **kw)
    grads = A.attention_backward(dout, q, k, v, out, lse, scale=scale, window_left=wl, window_right=wr, **kw)
    return (out, lse) + tuple(grads)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter only (the GPU test compares within tolerance)")
@pytest.mark.parametrize("case", TMA_CASES, ids=[f"{c[:6]}-{sorted(c[6])}-{c[7]}" for c in TMA_CASES])
def test_tma_kernels_equal_pointer_kernels(monkeypatch, case):
    """The descriptor loads read exactly what the masked pointer loads read (zeros past T and D),
    so on the interpreter both paths give bitwise identical outputs and gradients."""
    from llmkern.kernels import attention as A

    B, H, Hk, Tq, Tk, D, kw, layout = case
    kw = dict(kw)
    if kw.get("key_padding_mask") == "pad":
        kw["key_padding_mask"] = _kpm(B, Tk)

    def make(heads, T):
        if layout == "bthd":
            return torch.randn(B, T, heads, D, dtype=torch.float16).transpose(1, 2)
        return torch.randn(B, heads, T, D, dtype=torch.float16)
    q, k, v, dout = make(H, Tq), make(Hk, Tk), make(Hk, Tk), make(H, Tq)
    launched = []
    launch = A._launch
    monkeypatch.setattr(A, "_launch", lambda name, *a: (launched.append(name), launch(name, *a)))
    results = {}
    monkeypatch.setenv("LLMKERN_ATTN_TMA_BWD", "1")
    for mode in ("0", "force"):
        monkeypatch.setenv("LLMKERN_ATTN_TMA", mode)
        results[mode] = _run_kernels(q, k, v, dout, dict(kw))
    assert launched == ["fwd", "dkdv", "dq", "fwd_tma", "dkdv_tma", "dq_tma"]
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], results["0"], results["force"]):
        assert torch.equal(a, b), name


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter only")
@pytest.mark.parametrize("mode,want", [(None, ["fwd_tma", "dkdv", "dq_tma"]), ("all", ["fwd_tma", "dkdv_tma", "dq_tma"]),
                                       ("0", ["fwd_tma", "dkdv", "dq"])])
def test_tma_backward_kernels_follow_the_switch(monkeypatch, mode, want):
    """The forward takes the TMA kernel wherever it may; the backward's dQ by default (faster on the
    H100), dK/dV only with LLMKERN_ATTN_TMA_BWD=all (slower there); same numbers either way."""
    from llmkern.kernels import attention as A

    monkeypatch.setenv("LLMKERN_ATTN_TMA", "force")
    if mode is None:
        monkeypatch.delenv("LLMKERN_ATTN_TMA_BWD", raising=False)
    else:
        monkeypatch.setenv("LLMKERN_ATTN_TMA_BWD", mode)
    monkeypatch.setattr(A._TMA, "failed", [])
    launched = []
    launch = A._launch
    monkeypatch.setattr(A, "_launch", lambda name, *a: (launched.append(name), launch(name, *a)))
    q, k, v, dout = (torch.randn(1, 2, 20, 16, dtype=torch.float16) for _ in range(4))
    got = _run_kernels(q, k, v, dout, dict(causal=True))
    assert launched == want
    monkeypatch.setenv("LLMKERN_ATTN_TMA", "0")
    for a, b in zip(got, _run_kernels(q, k, v, dout, dict(causal=True))):
        assert torch.equal(a, b)


@needs_triton
def test_a_tma_failure_keeps_no_tensors_alive_and_out_of_memory_is_raised(monkeypatch):
    """The switch kept the exception that turned TMA off, and its traceback every frame of the failing call and
    its callers (the model's activations, for good); an out-of-memory error turned TMA off for good too."""
    import gc
    import warnings
    import weakref

    from llmkern.kernels import _tma

    switch = _tma.Switch("LLMKERN_TEST_TMA", "test kernels")

    def step():
        activations = torch.empty(1000)

        def launch():
            raise RuntimeError("out of resource: shared memory")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert switch.run(launch) is False
        return weakref.ref(activations)

    ref_ = step()
    gc.collect()
    assert ref_() is None and switch.failed and "out of resource" in str(switch.failed[0])
    fresh = _tma.Switch("LLMKERN_TEST_TMA", "test kernels")

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(torch.OutOfMemoryError):
        fresh.run(oom)
    assert not fresh.failed


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter only")
def test_tma_failure_falls_back_to_pointer_kernels(monkeypatch):
    from llmkern.kernels import attention as A

    monkeypatch.setenv("LLMKERN_ATTN_TMA", "force")
    monkeypatch.setenv("LLMKERN_ATTN_TMA_BWD", "1")
    monkeypatch.setattr(A._TMA, "failed", [])
    launch = A._launch

    def broken(name, *a):
        if name.endswith("_tma"):
            raise RuntimeError("simulated descriptor failure")
        return launch(name, *a)
    monkeypatch.setattr(A, "_launch", broken)
    q, k, v, dout = (torch.randn(1, 2, 30, 32, dtype=torch.float16) for _ in range(4))
    with pytest.warns(RuntimeWarning, match="TMA kernels failed"):
        got = _run_kernels(q, k, v, dout, dict(causal=True))
    assert A._TMA.failed and not A.use_tma(q, k, v, dout)
    monkeypatch.setenv("LLMKERN_ATTN_TMA", "0")
    for a, b in zip(got, _run_kernels(q, k, v, dout, dict(causal=True))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("env,count", [({}, None), ({"LLMKERN_ATTN_TUNE_TOP": "2"}, 2),
                                       ({"LLMKERN_ATTN_AUTOTUNE": "0"}, 1)])
def test_autotune_candidates(monkeypatch, env, count):
    from llmkern.kernels import attention as A

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for kernel in ("fwd", "fwd_tma", "dkdv_tma", "dq"):
        bucket = A._CONFIGS[kernel][A._arch(kernel)][128]
        kept = A._pruner(kernel)(A._all_configs(kernel), {"BLOCK_D": 128})
        got = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]
        assert sorted(got) == sorted(bucket[:count or len(bucket)])
        assert all((c.pre_hook is not None) == kernel.endswith("_tma") for c in kept)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter only")
@pytest.mark.parametrize("case", ["slices", "negative_scale"])
def test_kernel_outputs_have_the_strides_their_fakes_promise(monkeypatch, case):
    """torch.compile trusts the fakes' strides (inductor asserts them): the batch-sliced launch (B * H > 65535)
    concatenated its outputs, contiguous whatever q's layout (transformers' [B, T, H, D] transposed), and a
    scale <= 0 allocated the output from the sign-folded, dense copy of an expanded q."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from llmkern.kernels import attention as A

    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    B, H, T, D = 4, 2, 5, 16
    if case == "slices":
        monkeypatch.setattr(A, "MAX_GRID_YZ", 3)
        q, k, v = (torch.randn(B, T, H, D).transpose(1, 2) for _ in range(3))
        scale = 0.25
    else:
        q = torch.randn(1, H, T, D).expand(B, H, T, D)
        k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, 8)
        scale = -0.25
    fwd = (q, k, v, None, None, None, None, -1, -1, scale, False, -1, -1, 0.0, 0.0)
    out, lse = torch.ops.llmkern.attention_fwd(*fwd)
    dout = torch.randn_like(out)
    bwd = (dout, q, k, v, out, lse, None) + fwd[3:]
    grads = torch.ops.llmkern.attention_bwd(*bwd)[:3]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = lambda args: tuple(mode.from_tensor(a) if torch.is_tensor(a) else a for a in args)  # noqa: E731
        f_out, _ = torch.ops.llmkern.attention_fwd(*fake(fwd))
        f_grads = torch.ops.llmkern.attention_bwd(*fake(bwd))[:3]
    assert out.stride() == f_out.stride()
    assert [g.stride() for g in grads] == [g.stride() for g in f_grads]


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter only")
def test_batch_beyond_the_grid_limit_runs_in_slices(monkeypatch):
    """CUDA caps grid y/z at 65535 and the kernels put batch x heads there: larger batches run as
    several launches over batch slices. Shrink the cap to see the slicing on small tensors."""
    from llmkern.kernels import attention as A
    from llmkern.kernels.attention_decode import attention_decode

    B, H, Hk, T, D = 5, 2, 1, 19, 16
    q, k, v, dout = (torch.randn(B, h, T, D) for h in (H, Hk, Hk, H))
    kpm = _kpm(B, T)
    cu = torch.tensor([0, 7, 19, 20, 33, 40], dtype=torch.int32)
    qv, kv, vv, dv_out = (torch.randn(40, h, D) for h in (H, Hk, Hk, H))
    lens = torch.tensor([3, 19, 1, 10, 7], dtype=torch.int32)

    def run_all():
        kw = dict(scale=0.3, causal=True, key_padding_mask=kpm)
        o, lse = A.attention_forward(q, k, v, **kw)
        dense = (o, lse) + A.attention_backward(dout, q, k, v, o, lse, **kw, dlse=torch.randn_like(lse))
        kv_kw = dict(scale=0.3, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=13, max_seqlen_k=13)
        o, lse = A.attention_forward(qv, kv, vv, **kv_kw)
        varlen = (o, lse) + A.attention_backward(dv_out, qv, kv, vv, o, lse, **kv_kw)
        dec = attention_decode(q[:, :, :2], k, v, lens, scale=0.3)
        return dense + varlen + dec

    torch.manual_seed(1)
    whole = run_all()
    monkeypatch.setattr(A, "MAX_GRID_YZ", 3)  # dense/varlen: 1 batch row per launch; decode: 3
    assert len(A._batch_slices(B, H)) == 5 and len(A._batch_slices(B, Hk)) == 2
    torch.manual_seed(1)
    sliced = run_all()
    for i, (a, b) in enumerate(zip(whole, sliced)):
        assert a.shape == b.shape and torch.equal(a, b), i


# ---- varlen -------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("kw,give_max", [(dict(causal=True), False), (dict(window=(6, 3), softcap=4.0), True)],
                         ids=["causal", "window-softcap-maxlen"])
def test_varlen_vs_reference(triton_backend, kw, give_max):
    lq, lk = [5, 0, 37, 20], [9, 3, 37, 41]
    cu_q = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32, device=DEV)
    H, Hk, D = 4, 2, 24
    q = torch.randn(sum(lq), H, D, device=DEV, requires_grad=True)
    k = torch.randn(sum(lk), Hk, D, device=DEV, requires_grad=True)
    v = torch.randn(sum(lk), Hk, D, device=DEV, requires_grad=True)
    mx = (max(lq), max(lk)) if give_max else (None, None)
    out, lse = llmkern.attention_varlen(q, k, v, cu_q, cu_k, *mx, return_lse=True, **kw)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    rout, rlse = ref.attention_varlen(qd, kd, vd, cu_q.cpu(), cu_k.cpu(), return_lse=True, **kw)
    assert_close(out, rout, torch.float32)
    fin = torch.isfinite(rlse)
    assert_close(lse[fin], rlse[fin], torch.float32)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    rgrads = torch.autograd.grad(rout, (qd, kd, vd), dout.double())
    for g, rg in zip(grads, rgrads):
        assert_close(g, rg, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("mq,mk", [(8, None), (None, 8), (8, 8), (0, None), (None, 0)])  # (0 was "no bound")
def test_varlen_max_seqlen_under_a_length_raises(monkeypatch, backend, mq, mk):
    """max_seqlen_* sizes the grids: a bound under the longest sequence would leave rows
    uncomputed (uninitialised output), so it is an error naming the argument."""
    if backend == "triton" and DEV is None:
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("LLMKERN_BACKEND", backend)
    device = DEV or "cpu"
    cu = torch.tensor([0, 3, 40], dtype=torch.int32, device=device)  # lengths 3 and 37
    q, k, v = (torch.randn(40, 2, 16, device=device) for _ in range(3))
    with pytest.raises(ValueError, match="max_seqlen_q" if mq is not None else "max_seqlen_k"):
        llmkern.attention_varlen(q, k, v, cu, cu, mq, mk, causal=True)
    ok = llmkern.attention_varlen(q, k, v, cu, cu, 37, 40, causal=True)  # loose bounds are fine
    assert_close(ok, llmkern.attention_varlen(q, k, v, cu, cu, causal=True), torch.float32)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("kw", [dict(causal=True), dict(window=(2, 1), softcap=3.0, sinks=True)],
                         ids=["causal", "window-softcap-sinks"])
def test_attention_segments_equals_varlen_over_the_runs(monkeypatch, backend, kw):
    """attention_segments (transformers' packed rows) traced, where it runs its own paths (the custom ops that read
    the runs' bounds, or the reference's same-run mask; eager calls are attention_varlen itself): attention within
    the runs of equal indices of each row, as attention_varlen over those runs gives it (out and every gradient,
    sinks' too); GQA, Dv != D."""
    if backend == "triton" and DEV is None:
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("LLMKERN_BACKEND", backend)
    from llmkern.ops.attention import attention_segments

    device, kw = DEV or "cpu", dict(kw)
    torch.manual_seed(0)
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]], device=device)
    B, H, Hk, T, D, Dv = 2, 4, 2, 9, 16, 8
    q = torch.randn(B, H, T, D, device=device, requires_grad=True)
    k = torch.randn(B, Hk, T, D, device=device, requires_grad=True)
    v = torch.randn(B, Hk, T, Dv, device=device, requires_grad=True)
    leaves = [q, k, v]
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(H, device=device, requires_grad=True)
        leaves.append(kw["sinks"])
    torch._dynamo.reset()
    out = torch.compile(lambda *a: attention_segments(*a, **kw), fullgraph=True, backend="aot_eager")(q, k, v, ids)
    cu = torch.tensor([0, 3, 8, 9, 18], dtype=torch.int32, device=device)
    want = llmkern.attention_varlen(*(t.transpose(1, 2).reshape(B * T, t.shape[1], -1) for t in (q, k, v)), cu, cu,
                                    **kw).reshape(B, T, H, Dv)
    assert out.shape == (B, T, H, Dv)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    dout = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, leaves, dout), torch.autograd.grad(want, leaves, dout)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@needs_triton
def test_attention_segments_ops_opcheck(triton_backend):
    """The custom ops that read the runs' bounds inside (fakes, autograd registration, schema); tagged
    cudagraph_unsafe (their host read cannot be captured) where torch has the tag."""
    if hasattr(torch.Tag, "cudagraph_unsafe"):
        for op in (torch.ops.llmkern.attention_segments_fwd, torch.ops.llmkern.attention_segments_bwd):
            assert torch.Tag.cudagraph_unsafe in op.default.tags
    ids = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]], device=DEV)
    q, k, v = (torch.randn(10, 2, 16, device=DEV, requires_grad=True) for _ in range(3))
    args = (q, k, v, ids, None, 0.25, True, -1, -1, 0.0, 0.0)
    torch.library.opcheck(torch.ops.llmkern.attention_segments_fwd.default, args)
    out, lse, cu = torch.ops.llmkern.attention_segments_fwd(*args)
    assert cu.tolist() == [0, 2, 5, 6, 8, 10]  # the runs' bounds, handed to the backward
    torch.library.opcheck(torch.ops.llmkern.attention_segments_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None,
                           cu, 5, None, 0.25, True, -1, -1, 0.0, 0.0))


@needs_triton
def test_varlen_strided_cu_seqlens(triton_backend):
    """The kernels read cu_seqlens[b] and [b + 1] as contiguous int32: a strided view (a slice
    with a step) passed validation, then the kernels read the wrong entries (outputs ~1e12)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(10, 2, 16, device=DEV, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 7, 4, 7, 10, 7], dtype=torch.int32, device=DEV)[::2]
    out = llmkern.attention_varlen(q, k, v, cu, cu, causal=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = llmkern.attention_varlen(q, k, v, cu.contiguous(), cu.contiguous(), causal=True)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    assert torch.equal(out, want)
    for g, w in zip(grads, want_grads):
        assert torch.equal(g, w)


@needs_triton
@pytest.mark.parametrize("Tq,Tk,kw", [(40, 50, dict(window=(None, 2**31 - 1))),
                                      (40, 50, dict(window=(2**31 - 1, 2**31 - 1))),
                                      (30, 20, dict(causal=True, window=(2**31 - 1, None)))],
                         ids=["right", "both", "left-causal"])
def test_huge_window_equals_unbounded(triton_backend, Tq, Tk, kw):
    """Window sides near the int32 limit (a common stand-in for 'no limit') used to overflow the
    kernels' index sums: every row came back empty."""
    q, k, v = _qkv(1, 2, 2, Tq, Tk, 32, torch.float32)
    _check(q, k, v, torch.float32, **kw)
    qc = q[:, :, -1:].detach()
    out = llmkern.attention_with_kvcache(qc, k.detach(), v.detach(), Tk, causal=False, window=(None, 2**31 - 1))
    assert_close(out, llmkern.attention_with_kvcache(qc, k.detach(), v.detach(), Tk, causal=False), torch.float32)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_no_keys_still_gives_every_gradient(monkeypatch, backend):
    if backend == "triton" and DEV is None:
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("LLMKERN_BACKEND", backend)
    q, k, v = _qkv(1, 2, 2, 5, 0, 16, torch.float32, device=DEV or "cpu")
    dq, dk, dv = torch.autograd.grad(llmkern.attention(q, k, v, causal=True).sum(), (q, k, v))
    assert (dq == 0).all() and dk.shape == k.shape and dv.shape == v.shape


@needs_triton
@pytest.mark.parametrize("softcap", [1e4, 1e6])
def test_large_softcap_keeps_the_scores(triton_backend, softcap):
    """softcap * tanh(s / softcap) with tanh as 2 * sigmoid(2x) - 1 cancelled near 0 (absolute
    error ~1e-7, times softcap): softcap=1e6 gave errors of 0.08 in the output (1e4: 1e-3), where
    the result is plain attention to 1e-10. Forward, backward and the decode kernel."""
    q, k, v = _qkv(1, 2, 1, 24, 40, 32, torch.float32)
    with torch.no_grad():
        q.mul_(2), k.mul_(2)
    _check(q, k, v, torch.float32, causal=True, softcap=softcap)
    kc, vc = k.detach(), v.detach()
    out = llmkern.attention_with_kvcache(q.detach()[:, :, -2:], kc, vc, 40, softcap=softcap)
    rout = ref.attention_with_kvcache(q.detach()[:, :, -2:].double(), kc.double(), vc.double(),
                                      torch.tensor([40]), softcap=softcap)
    assert_close(out, rout, torch.float32)


def test_window_sides_below_minus_one_raise():
    """-1 is flash-attn's 'unbounded'; any other negative size used to be taken as unbounded too,
    silently (a window computed as `n - something` that went negative attended everywhere)."""
    q, k = torch.randn(1, 2, 6, 16), torch.randn(1, 1, 6, 16)
    assert torch.equal(llmkern.attention(q, k, k, window=(-1, 2)), llmkern.attention(q, k, k, window=(None, 2)))
    for window in [(-2, 2), (3, -5)]:
        with pytest.raises(ValueError, match="window (left|right)"):
            llmkern.attention(q, k, k, window=window)
        with pytest.raises(ValueError, match="window (left|right)"):
            llmkern.attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), k[0].transpose(0, 1),
                                     torch.tensor([0, 6], dtype=torch.int32),
                                     torch.tensor([0, 6], dtype=torch.int32), window=window)
        with pytest.raises(ValueError, match="window (left|right)"):
            llmkern.attention_with_kvcache(q[:, :, :1], k, k, 6, window=window)


def test_causal_must_be_a_bool_in_every_api():
    """attention() rejected causal=None; attention_varlen and attention_with_kvcache took it as
    False (non-causal attention, silently; the KV-cache call defaults to causal)."""
    q, k = torch.randn(6, 2, 16), torch.randn(6, 1, 16)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    for causal in (None, 1):
        with pytest.raises(TypeError, match="causal"):
            llmkern.attention_varlen(q, k, k, cu, cu, causal=causal)
        with pytest.raises(TypeError, match="causal"):
            llmkern.attention_with_kvcache(q[None, :, :1].transpose(1, 2), k[None].transpose(1, 2),
                                           k[None].transpose(1, 2), 6, causal=causal)


@needs_triton
def test_double_backward_raises_instead_of_dropping_terms(triton_backend):
    """The kernels' gradients are not differentiable. Through the eager autograd.Function, dQ came
    back with requires_grad=False under create_graph=True, so a gradient penalty added to the loss
    silently contributed nothing to the weights' gradients; now it raises (as the custom op does)."""
    q, k, v = _qkv(1, 2, 1, 8, 8, 16, torch.float32)
    out = llmkern.attention(q, k, v, causal=True)
    dq, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (out.sum() + dq.square().sum()).backward()


# ---- KV-cache decode ------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("Tq,kw", [(1, dict()), (3, dict(softcap=3.0, window=(20, None))), (2, dict(causal=False))],
                         ids=["decode", "spec3-softcap-window", "noncausal"])
def test_kvcache_vs_reference(triton_backend, num_splits, Tq, kw):
    B, H, Hk, Tmax, D = 3, 8, 2, 100, 32
    kc = torch.randn(B, Hk, Tmax, D, device=DEV)
    vc = torch.randn(B, Hk, Tmax, D, device=DEV)
    q = torch.randn(B, H, Tq, D, device=DEV)
    lens = torch.tensor([1, 57, 100], dtype=torch.int32, device=DEV)
    out, lse = llmkern.attention_with_kvcache(q, kc, vc, lens, num_splits=num_splits, return_lse=True, **kw)
    rout, rlse = ref.attention_with_kvcache(q.double(), kc.double(), vc.double(), lens, return_lse=True, **kw)
    assert_close(out, rout, torch.float32)
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert_close(lse[fin], rlse[fin], torch.float32)


@needs_triton
def test_kvcache_appends_new_tokens_and_matches_dense(triton_backend):
    B, H, Hk, Tmax, D, T0 = 2, 4, 4, 48, 16, 30
    k_all = torch.randn(B, Hk, T0 + 2, D, device=DEV, dtype=torch.float16)
    v_all = torch.randn(B, Hk, T0 + 2, D, device=DEV, dtype=torch.float16)
    kc = torch.zeros(B, Hk, Tmax, D, device=DEV, dtype=torch.float16)
    vc = torch.zeros(B, Hk, Tmax, D, device=DEV, dtype=torch.float16)
    kc[:, :, :T0], vc[:, :, :T0] = k_all[:, :, :T0], v_all[:, :, :T0]
    q = torch.randn(B, H, 2, D, device=DEV, dtype=torch.float16)
    out = llmkern.attention_with_kvcache(q, kc, vc, torch.full((B,), T0, dtype=torch.int32, device=DEV),
                                         k=k_all[:, :, T0:], v=v_all[:, :, T0:])
    assert torch.equal(kc[:, :, :T0 + 2], k_all) and torch.equal(vc[:, :, :T0 + 2], v_all)
    dense = llmkern.attention(q, k_all, v_all, causal=True)
    assert_close(out, dense.double(), torch.float16)


# ---- reference vs PyTorch SDPA (the oracle itself) -------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_sdpa(causal):
    q = torch.randn(2, 4, 33, 16, dtype=torch.float64)
    k = torch.randn(2, 2, 33, 16, dtype=torch.float64)
    v = torch.randn(2, 2, 33, 16, dtype=torch.float64)
    kpm = _kpm(2, 33, device="cpu")
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    mask = kpm[:, None, None, :]
    if causal:
        mask = mask & torch.ones(33, 33, dtype=torch.bool).tril()
    want = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
    got = ref.attention(q, k, v, causal=causal, key_padding_mask=kpm)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("Tq,Tk,kw", [(20, 20, dict(causal=True)), (10, 30, dict(causal=True)),
                                      (30, 10, dict(causal=True)), (25, 25, dict(window=(3, 4))),
                                      (25, 25, dict(causal=True, key_padding_mask="empty-row"))])
def test_cpu_sdpa_path_matches_reference(monkeypatch, Tq, Tk, kw):
    """The default CPU path (SDPA's kernel with our masks) == the plain reference, grads included."""
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    q = torch.randn(2, 4, Tq, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, Tk, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, Tk, 16, dtype=torch.float64, requires_grad=True)
    if kw.get("key_padding_mask") == "empty-row":
        m = torch.rand(2, Tk) > 0.5
        m[1] = False
        kw = dict(kw, key_padding_mask=m)
    out = llmkern.attention(q, k, v, **kw)
    want = ref.attention(q, k, v, **kw)
    torch.testing.assert_close(out, want)
    for g, r in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("kw", [dict(), dict(window=(5, None)), dict(causal=False)], ids=["causal", "window", "noncausal"])
def test_cpu_kvcache_path_matches_reference(monkeypatch, kw):
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    kc, vc = torch.randn(3, 2, 20, 16, dtype=torch.float64), torch.randn(3, 2, 20, 16, dtype=torch.float64)
    q = torch.randn(3, 4, 2, 16, dtype=torch.float64)
    lens = torch.tensor([0, 7, 20], dtype=torch.int32)
    torch.testing.assert_close(llmkern.attention_with_kvcache(q, kc, vc, lens, **kw),
                               ref.attention_with_kvcache(q, kc, vc, lens, **kw))


def test_cpu_default_dispatch_is_reference_and_matches_sdpa(monkeypatch):
    monkeypatch.delenv("LLMKERN_BACKEND", raising=False)
    q, k, v = _qkv(1, 2, 2, 20, 20, 16, torch.float32, device="cpu", requires_grad=False)
    torch.testing.assert_close(llmkern.attention(q, k, v, causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)
    from llmkern import _backend

    assert _backend.OP_DISPATCH["attention"](torch.device("cpu"), torch.float32) == "reference"


# ---- validation -------------------------------------------------------------------------------------

def _bad_cases():
    q = torch.randn(2, 4, 8, 16)
    k = torch.randn(2, 2, 8, 16)
    return [
        (dict(k=torch.randn(2, 3, 8, 16), v=torch.randn(2, 3, 8, 16)), "divide"),
        (dict(k=torch.randn(2, 2, 8, 8), v=torch.randn(2, 2, 8, 8)), "head_dim"),
        (dict(k=torch.randn(3, 2, 8, 16), v=torch.randn(3, 2, 8, 16)), "batch"),
        (dict(v=torch.randn(2, 2, 9, 16)), "v must have the shape"),
        (dict(k=k.half(), v=k.half()), "dtype"),
        (dict(q=q[0]), "q must have shape"),
        (dict(q=q.int(), k=k.int(), v=k.int()), "float16"),
        (dict(q=torch.randn(1, 1, 4, 300), k=torch.randn(1, 1, 4, 300), v=torch.randn(1, 1, 4, 300)), "head_dim"),
        (dict(key_padding_mask=torch.ones(2, 8)), "bool"),
        (dict(key_padding_mask=torch.ones(2, 7, dtype=torch.bool)), "key_padding_mask must have shape"),
        (dict(window=(1, 2, 3)), "window"),
        (dict(window=(1.5, 2)), "window left"),
        (dict(softcap=-1.0), "softcap"),
        (dict(scale=float("nan")), "scale"),
    ]


@pytest.mark.parametrize("bad,match", _bad_cases(), ids=[m for _, m in _bad_cases()])
def test_bad_inputs_raise_value_error(bad, match):
    args = dict(q=torch.randn(2, 4, 8, 16), k=torch.randn(2, 2, 8, 16), v=torch.randn(2, 2, 8, 16))
    kw = {n: bad.pop(n) for n in list(bad) if n in args}
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        llmkern.attention(args["q"], args["k"], args["v"], **bad)


def test_bad_inputs_other_apis():
    q, k = torch.randn(10, 4, 16), torch.randn(12, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    cuk = torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        llmkern.attention_varlen(q, k, k, cu.long(), cuk)
    with pytest.raises(ValueError, match="end at the number"):
        llmkern.attention_varlen(q, k, k, cu, torch.tensor([0, 5, 11], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_k must have the length"):
        llmkern.attention_varlen(q, k, k, cu, torch.tensor([0, 12], dtype=torch.int32))
    with pytest.raises(ValueError, match="q is on|dtype"):
        llmkern.attention(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16, dtype=torch.float64),
                          torch.randn(1, 1, 4, 16, dtype=torch.float64))
    qd, kc = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 10, 16)
    with pytest.raises(ValueError, match="cache_seqlens"):
        llmkern.attention_with_kvcache(qd, kc, kc, torch.tensor([3, 11], dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_seqlens"):
        llmkern.attention_with_kvcache(qd, kc, kc, torch.tensor([3.0, 1.0]))
    with pytest.raises(ValueError, match="together"):
        llmkern.attention_with_kvcache(qd, kc, kc, 3, k=torch.randn(2, 2, 1, 16))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="is on"):
            llmkern.attention(torch.randn(1, 1, 4, 16, device="cuda"), torch.randn(1, 1, 4, 16),
                              torch.randn(1, 1, 4, 16))


# ---- registration ------------------------------------------------------------------------------------

@needs_triton
def test_opcheck(triton_backend):
    q, k, v = _qkv(1, 2, 1, 20, 24, 16, torch.float32)
    torch.library.opcheck(torch.ops.llmkern.attention_fwd.default,
                          (q, k, v, None, None, None, None, -1, -1, 0.25, True, -1, -1, 0.0, 0.0))
    kc = torch.randn(2, 1, 40, 16, device=DEV)
    torch.library.opcheck(torch.ops.llmkern.attention_decode.default,
                          (torch.randn(2, 2, 1, 16, device=DEV), kc, kc.clone(),
                           torch.tensor([5, 40], dtype=torch.int32, device=DEV), None, 0.25, True, -1, -1, 0.0, 0))


@needs_triton
def test_fakes_follow_the_kernels_layout(triton_backend):
    """Inputs whose last dimension is strided are copied by the kernels, whose outputs are then
    contiguous: the fakes must say so (they kept q's layout, and Inductor rejected the real one)."""
    def strided(*shape):  # [.., T, D] with stride(-1) == T
        return torch.randn(*shape[:-2], shape[-1], shape[-2], device=DEV).transpose(-1, -2)
    q, k, v = strided(1, 2, 16, 5), strided(1, 2, 16, 5), strided(1, 2, 16, 5)
    args = (q, k, v, None, None, None, None, -1, -1, 0.25, True, -1, -1, 0.0, 0.0)
    torch.library.opcheck(torch.ops.llmkern.attention_fwd.default, args)
    out, lse = torch.ops.llmkern.attention_fwd(*args)
    torch.library.opcheck(torch.ops.llmkern.attention_bwd.default,
                          (strided(1, 2, 16, 5), q, k, v, out, lse, None) + args[3:])
    kc = torch.randn(2, 1, 40, 16, device=DEV)
    torch.library.opcheck(torch.ops.llmkern.attention_decode.default,
                          (strided(2, 2, 3, 16), kc, kc.clone(), torch.tensor([5, 40], dtype=torch.int32, device=DEV),
                           None, 0.25, True, -1, -1, 0.0, 0))


@pytest.mark.parametrize("backend", ["triton", "default"])
def test_autocast_behaves_like_sdpa(monkeypatch, backend):
    """Under autocast every path gives SDPA's output dtype and a float32 LSE (the CPU path gave
    float32 outputs with softcap or LSE, and a bfloat16 LSE; the kernels ignored autocast)."""
    if backend == "triton":
        if DEV is None:
            pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    device = DEV or "cpu"
    low = torch.float16 if device == "cpu" and backend == "triton" else torch.bfloat16  # (no bf16 interpreter)
    q, k, v = _qkv(1, 2, 1, 6, 9, 16, torch.float32, device=device, requires_grad=False)
    with torch.autocast(torch.device(device).type, dtype=low):
        want = F.scaled_dot_product_attention(q, k.expand(1, 2, 9, 16), v.expand(1, 2, 9, 16)).dtype
        out, lse = llmkern.attention(q, k, v, causal=True, softcap=5.0, return_lse=True)
        assert out.dtype == want == low and lse.dtype == torch.float32
        assert llmkern.attention(q, k, v).dtype == low
        cu = torch.tensor([0, 6], dtype=torch.int32, device=device)
        cuk = torch.tensor([0, 9], dtype=torch.int32, device=device)
        o, l2 = llmkern.attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cuk,
                                         return_lse=True)
        assert o.dtype == low and l2.dtype == torch.float32
        kc, vc = torch.zeros(1, 1, 12, 16, device=device), torch.zeros(1, 1, 12, 16, device=device)
        o, l3 = llmkern.attention_with_kvcache(q[:, :, :1], kc, vc, 0, k=k[:, :, :1], v=v[:, :, :1], return_lse=True)
        assert o.dtype == kc.dtype and l3.dtype == torch.float32  # the cache keeps its dtype
    assert_close(out, llmkern.attention(q.to(low), k.to(low), v.to(low), causal=True, softcap=5.0), low)


def test_autocast_with_keyword_arguments():
    """k / v (and the KV cache) passed by keyword are cast as positional ones are (they raised a dtype error)."""
    q, k, v = _qkv(1, 2, 1, 6, 9, 16, torch.float32, device="cpu", requires_grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = llmkern.attention(q, k, v, causal=True)
        assert torch.equal(llmkern.attention(q, k=k, v=v, causal=True), want)
        assert torch.equal(llmkern.attention(q=q, k=k, v=v, causal=True), want)
        cu, cuk = torch.tensor([0, 6], dtype=torch.int32), torch.tensor([0, 9], dtype=torch.int32)
        t = (q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1))
        assert torch.equal(llmkern.attention_varlen(t[0], k=t[1], v=t[2], cu_seqlens_q=cu, cu_seqlens_k=cuk),
                           llmkern.attention_varlen(*t, cu, cuk))
        kc, vc = torch.randn(1, 1, 12, 16), torch.randn(1, 1, 12, 16)
        got = llmkern.attention_with_kvcache(q[:, :, :1], k_cache=kc, v_cache=vc, cache_seqlens=3)
        assert got.dtype == torch.float32  # the cache's dtype
        assert torch.equal(got, llmkern.attention_with_kvcache(q[:, :, :1], kc, vc, 3))


def test_vmap_runs_through_the_custom_op():
    """Under vmap the eager fast path (an autograd.Function without setup_context) is skipped."""
    q = torch.randn(3, 1, 2, 5, 16)
    k, v = torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    got = torch.func.vmap(lambda qq: llmkern.attention(qq, k, v, causal=True))(q)
    want = torch.stack([llmkern.attention(qq, k, v, causal=True) for qq in q])
    torch.testing.assert_close(got, want)


@needs_triton
def test_torch_compile_fullgraph(triton_backend):
    torch._dynamo.reset()
    q, k, v = _qkv(1, 2, 1, 24, 24, 16, torch.float32)

    def f(a, b, c):
        return llmkern.attention(a, b, c, causal=True, window=(8, None)).sum()

    got = torch.compile(f, fullgraph=True)(q, k, v)
    got.backward()
    g = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want = f(q, k, v)
    want.backward()
    torch.testing.assert_close(got, want)
    for a, t in zip(g, (q, k, v)):
        torch.testing.assert_close(a, t.grad)


# ---- GPU: real sizes, bf16/fp16, error no worse than 2x SDPA's ----------------------------------------

def _rel_err(x, ref64):
    return ((x.double() - ref64).norm() / ref64.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B,H,Hk,T,D", [(2, 16, 16, 1024, 128), (2, 16, 4, 1000, 64), (1, 8, 8, 777, 80),
                                          (1, 4, 4, 512, 256)])
def test_gpu_error_vs_sdpa(dtype, causal, B, H, Hk, T, D):
    q, k, v = _qkv(B, H, Hk, T, T, D, dtype, device="cuda")
    dout = torch.randn(B, H, T, D, device="cuda", dtype=dtype)
    out = llmkern.attention(q, k, v, causal=causal)
    g = torch.autograd.grad(out, (q, k, v), dout)
    kr, vr = (t.detach().repeat_interleave(H // Hk, 1).requires_grad_() for t in (k, v))
    qs = q.detach().requires_grad_()
    sd = F.scaled_dot_product_attention(qs, kr, vr, is_causal=causal)
    gs = torch.autograd.grad(sd, (qs, kr, vr), dout)
    gs = (gs[0], gs[1].unflatten(1, (Hk, H // Hk)).sum(2), gs[2].unflatten(1, (Hk, H // Hk)).sum(2))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    r = ref.attention(qd, kd, vd, causal=causal)
    gr = torch.autograd.grad(r, (qd, kd, vd), dout.double())
    assert _rel_err(out, r) <= 2 * _rel_err(sd, r) + 1e-4
    for a, b, c in zip(g, gs, gr):
        assert _rel_err(a, c) <= 2 * _rel_err(b, c) + 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_features(dtype):
    q, k, v = _qkv(2, 8, 2, 700, 900, 128, dtype, device="cuda")
    kpm = _kpm(2, 900, device="cuda")
    _check(q, k, v, dtype, causal=True, window=(256, None), softcap=30.0, key_padding_mask=kpm)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bhtd", "bthd"])
def test_gpu_tma_and_pointer_kernels_agree(monkeypatch, layout):
    """On sm_90+ dense fp16/bf16 runs the TMA kernels; both paths stay within SDPA-level error."""
    from llmkern.kernels import attention as A

    B, H, Hk, T, D = 2, 8, 2, 1000, 128
    def make(heads):
        if layout == "bthd":
            return torch.randn(B, T, heads, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        return torch.randn(B, heads, T, D, device="cuda", dtype=torch.bfloat16)
    q, k, v, dout = make(H), make(Hk), make(Hk), make(H)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    r = ref.attention(qd, kd, vd, causal=True)
    gr = torch.autograd.grad(r, (qd, kd, vd), dout.double())
    errs = {}
    monkeypatch.setenv("LLMKERN_ATTN_TMA_BWD", "1")
    for mode in ("0", "1"):
        monkeypatch.setenv("LLMKERN_ATTN_TMA", mode)
        assert A.use_tma(q, k, v, q) == (mode == "1" and torch.cuda.get_device_capability() >= (9, 0))
        res = _run_kernels(q, k, v, dout, dict(causal=True))
        errs[mode] = [_rel_err(res[0], r)] + [_rel_err(g, c) for g, c in zip(res[2:], gr)]
    assert not A._TMA.failed, A._TMA.failed
    for e_tma, e_ptr in zip(errs["1"], errs["0"]):
        assert e_tma <= 1.5 * e_ptr + 1e-4, (errs["1"], errs["0"])


@pytest.mark.gpu
def test_gpu_decode_vs_sdpa():
    B, H, Hk, Tmax, D = 32, 32, 8, 8192, 128
    kc = torch.randn(B, Hk, Tmax, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
    lens = torch.randint(1, Tmax + 1, (B,), device="cuda", dtype=torch.int32)
    out = llmkern.attention_with_kvcache(q, kc, vc, lens)
    mask = torch.arange(Tmax, device="cuda")[None, :] < lens[:, None]
    sd = F.scaled_dot_product_attention(q, kc.repeat_interleave(4, 1), vc.repeat_interleave(4, 1),
                                        attn_mask=mask[:, None, None, :])
    r = ref.attention_with_kvcache(q.double(), kc.double(), vc.double(), lens)
    assert _rel_err(out, r) <= 2 * _rel_err(sd, r) + 1e-4


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    torch._dynamo.reset()
    q, k, v = _qkv(2, 8, 2, 256, 256, 64, torch.bfloat16, device="cuda")
    f = torch.compile(lambda a, b, c: llmkern.attention(a, b, c, causal=True), fullgraph=True)
    out = f(q, k, v)
    out.float().sum().backward()
    assert_close(out, ref.attention(q.double(), k.double(), v.double(), causal=True), torch.bfloat16)


def test_scale_default_is_inverse_sqrt_head_dim():
    q, k, v = _qkv(1, 1, 1, 5, 5, 16, torch.float64, device="cpu", requires_grad=False)
    torch.testing.assert_close(llmkern.attention(q, k, v), llmkern.attention(q, k, v, scale=1 / math.sqrt(16)))


def test_eager_fast_path_only_for_plain_eager_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from llmkern.ops._checks import eager_fast_path

    t = torch.randn(2, 3)
    assert eager_fast_path(t, None, torch.nn.Parameter(t))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(t)
        assert not eager_fast_path(fake)
    assert not eager_fast_path(fake)  # a FakeTensor is no plain tensor, mode or not


@needs_triton
def test_eager_calls_skip_the_custom_op_with_the_same_results(triton_backend, monkeypatch):
    """Eager attention runs _AttentionFunction (no torch.library dispatch); the custom op, which
    torch.compile traces, gives the same output and gradients."""
    from llmkern.ops import attention as ops

    q, k, v = _qkv(1, 2, 1, 24, 24, 16, torch.float32)
    dout = torch.randn_like(q)
    eager_out = llmkern.attention(q, k, v, causal=True)
    eager_grads = torch.autograd.grad(eager_out, (q, k, v), dout)
    monkeypatch.setattr(ops._checks, "eager_fast_path", lambda *t: False)
    called = []
    real = ops._attention_fwd_op
    monkeypatch.setattr(ops, "_attention_fwd_op", lambda *a: (called.append(1), real(*a))[1])
    op_out = llmkern.attention(q, k, v, causal=True)
    op_grads = torch.autograd.grad(op_out, (q, k, v), dout)
    assert called
    assert torch.equal(eager_out, op_out)
    for a, b in zip(eager_grads, op_grads):
        assert torch.equal(a, b)


def test_backward_tma_switch_rejects_unknown_values(monkeypatch):
    from llmkern.kernels import attention as A

    monkeypatch.setenv("LLMKERN_ATTN_TMA_BWD", "dkdv")
    with pytest.raises(ValueError, match="LLMKERN_ATTN_TMA_BWD"):
        A.backward_tma_kernels()
    monkeypatch.setenv("LLMKERN_ATTN_TMA_BWD", "ALL")
    assert A.backward_tma_kernels() == {"dkdv", "dq"}


@needs_triton
def test_decode_config_override(triton_backend, monkeypatch):
    """LLMKERN_DECODE_CONFIG (gpu_diag's decode sweep) sets BLOCK_N, warps and stages; bad values raise."""
    from llmkern.kernels import attention_decode as KD

    monkeypatch.setenv("LLMKERN_DECODE_CONFIG", "128,8,3")
    assert KD._decode_config(128, 4) == (16, 128, 8, 3)
    for bad in ("128,8", "100,8,3", "128,3,3", "x,8,3"):
        monkeypatch.setenv("LLMKERN_DECODE_CONFIG", bad)
        with pytest.raises(ValueError, match="LLMKERN_DECODE_CONFIG"):
            KD._decode_config(128, 4)
