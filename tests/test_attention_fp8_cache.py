"""float8 KV caches (vLLM's kv_cache_dtype="fp8", FlashInfer's fp8 decode): llmkern.quantize_kv and
attention_with_kvcache(k_scale=, v_scale=) on float8_e4m3fn / float8_e5m2 caches, and the zoo's fp8 KVCache.

The oracle is float64 attention over the dequantized cache (x * scale): every path (the reference, the CPU SDPA
path, the split-K kernel under the interpreter) must give it, since they all read the same stored bytes.
"""
import pytest
import torch

import llmkern
from llmkern.reference import attention as ref
from llmkern.testing import triton_device

DEV = triton_device()
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _case(B=3, H=4, Hk=2, T=48, D=16, Tq=1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g).to(dtype)
    k = torch.randn(B, Hk, T, D, generator=g) * 3
    v = torch.randn(B, Hk, T, D, generator=g) * 3
    lens = torch.tensor([T, 1, 29][:B], dtype=torch.int32)
    return q, k, v, lens


def _use(monkeypatch, backend):
    if backend == "triton":
        if DEV is None:
            pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    elif backend == "reference":
        monkeypatch.setenv("LLMKERN_BACKEND", "reference")


def _scales(kind, Hk):
    if kind == "none":
        return None, None
    if kind == "float":
        return 0.5, 2.0
    if kind == "0d":
        return torch.tensor(0.25), torch.tensor(1.5)
    return torch.linspace(0.2, 1.0, Hk), torch.linspace(1.0, 3.0, Hk)


def test_quantize_kv_saturates_and_divides_by_the_scale():
    x = torch.tensor([1.0, -3.0, 1000.0, -1e6, float("nan"), 0.0]).view(1, 1, 1, 6).expand(1, 2, 1, 6).clone()
    x[:, 1] *= 4
    y = llmkern.quantize_kv(x, torch.float8_e4m3fn, torch.tensor([1.0, 4.0])).float()
    assert torch.equal(y[0, 0, 0, :4], torch.tensor([1.0, -3.0, 448.0, -448.0]))  # (a plain cast gives NaN)
    assert torch.equal(y[0, 1, 0, :4], y[0, 0, 0, :4])  # head 1: x * 4 / 4
    assert torch.isnan(y[..., 4]).all() and (y[..., 5] == 0).all()
    z = llmkern.quantize_kv(x, torch.float8_e5m2, 2.0).float()
    assert z[0, 0, 0, 2] == 512.0 and z[0, 0, 0, 3] == -57344.0 and torch.isfinite(z[..., 3]).all()


@pytest.mark.parametrize("bad,match", [
    (dict(dtype=torch.float16), "dtype must be torch.float8"),
    (dict(x=torch.randn(2, 3, 4)), "x must be a floating tensor"),
    (dict(scale=-1.0), "finite positive"),
    (dict(scale=torch.ones(3)), r"kv_heads=2"),
    (dict(scale=torch.ones(2, device="meta")), r"scale is on meta but x is on cpu"),
])
def test_quantize_kv_errors(bad, match):
    kw = dict(x=torch.randn(1, 2, 3, 4), dtype=torch.float8_e4m3fn, scale=None)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        llmkern.quantize_kv(kw["x"], kw["dtype"], kw["scale"])


@pytest.mark.parametrize("backend", ["default", "reference", "triton"])
@pytest.mark.parametrize("fp8", FP8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("scales", ["none", "float", "0d", "per_head"])
def test_fp8_cache_equals_float64_over_the_dequantized_cache(monkeypatch, backend, fp8, scales):
    _use(monkeypatch, backend)
    q, k, v, lens = _case()
    ks, vs = _scales(scales, k.shape[1])
    k8, v8 = llmkern.quantize_kv(k, fp8, ks), llmkern.quantize_kv(v, fp8, vs)
    assert k8.dtype == fp8 and k8.element_size() == 1
    ks_t = None if ks is None else torch.as_tensor(ks, dtype=torch.float32).expand(k.shape[1])
    vs_t = None if vs is None else torch.as_tensor(vs, dtype=torch.float32).expand(k.shape[1])
    want = ref.attention_with_kvcache(q.double(), ref.dequantize_kv(k8, ks_t, torch.float64),
                                      ref.dequantize_kv(v8, vs_t, torch.float64), lens)
    got = llmkern.attention_with_kvcache(q, k8, v8, lens, k_scale=ks, v_scale=vs)
    assert got.dtype == q.dtype
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    # and it approximates attention over the unquantized cache (3 or 2 mantissa bits per stored number)
    exact = ref.attention_with_kvcache(q.double(), k.double(), v.double(), lens)
    # (sharp softmaxes here: scores of std 3; a missing or inverted scale is off by far more)
    assert (got.double() - exact).abs().max() < (0.3 if fp8 == torch.float8_e5m2 else 0.2) * exact.abs().max()


@pytest.mark.parametrize("backend", ["default", "triton"])
@pytest.mark.parametrize("Tq,kw", [(3, dict(softcap=4.0, window=(20, None))), (2, dict(return_lse=True))])
def test_fp8_cache_options_paged_and_padding(monkeypatch, backend, Tq, kw):
    """Softcap (the K scale joins the tanh's input), windows, the LSE, GQA with Tq > 1, a paged pool and a key
    padding mask: each as over the dequantized cache."""
    _use(monkeypatch, backend)
    q, k, v, lens = _case(Tq=Tq, H=6, Hk=2)
    ks, vs = torch.tensor([0.3, 0.7]), torch.tensor([2.0, 0.5])
    k8, v8 = llmkern.quantize_kv(k, torch.float8_e4m3fn, ks), llmkern.quantize_kv(v, torch.float8_e4m3fn, vs)
    kpm = torch.ones(3, 48, dtype=torch.bool)
    kpm[0, :5] = False
    kw = dict(kw, key_padding_mask=kpm)
    want = ref.attention_with_kvcache(q.double(), ref.dequantize_kv(k8, ks, torch.float64),
                                      ref.dequantize_kv(v8, vs, torch.float64), lens, **kw)
    got = llmkern.attention_with_kvcache(q, k8, v8, lens, k_scale=ks, v_scale=vs, **kw)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=2e-5)
    # the same cache cut into shuffled pages of 8 slots
    B, Hk, T, D = k8.shape
    perm = torch.randperm(B * T // 8)
    table = perm.view(B, T // 8).to(torch.int32)
    pk = torch.empty(B * T // 8, Hk, 8, D, dtype=k8.dtype)
    pv = torch.empty_like(pk)
    pk[perm] = k8.view(B, Hk, T // 8, 8, D).transpose(1, 2).reshape(-1, Hk, 8, D)
    pv[perm] = v8.view(B, Hk, T // 8, 8, D).transpose(1, 2).reshape(-1, Hk, 8, D)
    paged = llmkern.attention_with_kvcache(q, pk, pv, lens, k_scale=ks, v_scale=vs, block_table=table, **kw)
    for a, b in zip(paged if isinstance(paged, tuple) else (paged,), got):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["default", "triton"])
@pytest.mark.parametrize("paged", [False, True])
def test_fp8_cache_appends_quantized_tokens(monkeypatch, backend, paged):
    """New k/v (q's dtype) are written as quantize_kv writes them, at each row's offset, and attended."""
    _use(monkeypatch, backend)
    q, k, v, lens = _case(Tq=2)
    ks, vs = torch.tensor([0.5, 1.5]), 0.75
    kc = torch.zeros(3, 2, 48, 16, dtype=torch.float8_e4m3fn)
    vc = torch.zeros_like(kc)
    starts = torch.tensor([10, 0, 30], dtype=torch.int32)
    kn, vn = k[:, :, :2] * 50, v[:, :, :2]  # (past e4m3's 448 after the scale: saturated, never NaN)
    if paged:
        table = torch.arange(3 * 6, dtype=torch.int32).flip(0).view(3, 6)
        pool_k = torch.zeros(18, 2, 8, 16, dtype=kc.dtype)
        pool_v = torch.zeros_like(pool_k)
        out = llmkern.attention_with_kvcache(q, pool_k, pool_v, starts, k=kn, v=vn, k_scale=ks, v_scale=vs,
                                             block_table=table)
        kc = pool_k[table.long()].permute(0, 2, 1, 3, 4).reshape(3, 2, 48, 16)
        vc = pool_v[table.long()].permute(0, 2, 1, 3, 4).reshape(3, 2, 48, 16)
    else:
        out = llmkern.attention_with_kvcache(q, kc, vc, starts, k=kn, v=vn, k_scale=ks, v_scale=vs)
    want_k = llmkern.quantize_kv(kn, torch.float8_e4m3fn, ks).view(torch.uint8)
    want_v = llmkern.quantize_kv(vn, torch.float8_e4m3fn, vs).view(torch.uint8)
    for b in range(3):
        s = int(starts[b])
        assert torch.equal(kc[b, :, s:s + 2].view(torch.uint8), want_k[b])
        assert torch.equal(vc[b, :, s:s + 2].view(torch.uint8), want_v[b])
    assert torch.isfinite(kc.float()).all()
    ks_t, vs_t = ks, torch.full((2,), vs)
    want = ref.attention_with_kvcache(q.double(), ref.dequantize_kv(kc, ks_t, torch.float64),
                                      ref.dequantize_kv(vc, vs_t, torch.float64), starts + 2)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["default", "reference", "triton"])
def test_fp8_cache_one_scale_given(monkeypatch, backend):
    """A scale left out is 1, the other applies (the kernel read cache_seqlens as the missing V scale)."""
    _use(monkeypatch, backend)
    q, k, v, lens = _case(B=2, H=8, Hk=4)  # (more kv heads than rows: the wrong read ran past the lengths)
    k8, v8 = llmkern.quantize_kv(k), llmkern.quantize_kv(v)
    for ks, vs in ((0.5, None), (None, 2.0), (torch.linspace(0.5, 1, 4), None)):
        kt = None if ks is None else torch.as_tensor(ks, dtype=torch.float32).expand(4)
        vt = None if vs is None else torch.full((4,), vs)
        want = ref.attention_with_kvcache(q.double(), ref.dequantize_kv(k8, kt, torch.float64),
                                          ref.dequantize_kv(v8, vt, torch.float64), lens)
        got = llmkern.attention_with_kvcache(q, k8, v8, lens, k_scale=ks, v_scale=vs)
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_fp8_cache_errors():
    q, k, v, lens = _case()
    k8, v8 = llmkern.quantize_kv(k), llmkern.quantize_kv(v)
    with pytest.raises(ValueError, match="k_scale is for a float8 cache"):
        llmkern.attention_with_kvcache(q, k, v, lens, k_scale=0.5)
    with pytest.raises(ValueError, match=r"v_cache must have k_cache's float8 dtype"):
        llmkern.attention_with_kvcache(q, k8, v, lens)
    with pytest.raises(ValueError, match=r"v_cache must have k_cache's float8 dtype"):
        llmkern.attention_with_kvcache(q, k8, v.to(torch.float8_e5m2), lens)
    with pytest.raises(ValueError, match="q must be float16"):
        llmkern.attention_with_kvcache(q.to(torch.float8_e4m3fn), k8, v8, lens)
    with pytest.raises(ValueError, match=r"k_scale must be a positive float or a float tensor \[\] or \[kv_heads=2\]"):
        llmkern.attention_with_kvcache(q, k8, v8, lens, k_scale=torch.ones(4))
    with pytest.raises(ValueError, match="v_scale must be finite and positive"):
        llmkern.attention_with_kvcache(q, k8, v8, lens, v_scale=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="k_scale must be a finite positive float"):
        llmkern.attention_with_kvcache(q, k8, v8, lens, k_scale=float("inf"))
    for bad in (torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), torch.tensor([float("nan"), 1.0])):
        with pytest.raises(ValueError, match="scale must be finite and positive"):  # (float32 [Hk] too)
            llmkern.quantize_kv(k, torch.float8_e4m3fn, bad)
    with pytest.raises(ValueError, match="k must be torch.float32"):  # new tokens come in q's dtype
        llmkern.attention_with_kvcache(q, k8, v8, lens - 1, k=k8[:, :, :1], v=v8[:, :, :1])


def test_fp8_cache_under_autocast_keeps_q_in_the_autocast_dtype():
    q, k, v, lens = _case()
    k8, v8 = llmkern.quantize_kv(k), llmkern.quantize_kv(v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = llmkern.attention_with_kvcache(q, k8, v8, lens)
    assert out.dtype == torch.bfloat16
    want = ref.attention_with_kvcache(q.bfloat16().double(), ref.dequantize_kv(k8, None, torch.float64),
                                      ref.dequantize_kv(v8, None, torch.float64), lens)
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(DEV is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
def test_opcheck_fp8_decode(monkeypatch):
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    q, k, v, lens = _case(B=2, T=32)
    k8, v8 = llmkern.quantize_kv(k), llmkern.quantize_kv(v, torch.float8_e4m3fn, 2.0)
    sk, sv = torch.tensor([0.5, 1.0]), torch.tensor([2.0, 2.0])
    torch.library.opcheck(torch.ops.llmkern.attention_decode.default,
                          (q.to(DEV), k8.to(DEV), v8.to(DEV), lens[:2].to(DEV), None, 0.25, True, -1, 0, 0.0, 0),
                          dict(k_scale=sk.to(DEV), v_scale=sv.to(DEV)),
                          # (test_schema multiplies the inputs, which CPU float8 tensors cannot do)
                          test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", FP8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fp8_cache(fp8, dtype):
    q, k, v, lens = _case(B=4, H=8, Hk=2, T=1000, D=128, dtype=dtype)
    q, k, v, lens = q.cuda(), k.cuda(), v.cuda(), torch.tensor([1000, 1, 517, 64], dtype=torch.int32).cuda()
    ks, vs = torch.tensor([0.3, 0.7], device="cuda"), 1.5
    k8, v8 = llmkern.quantize_kv(k, fp8, ks), llmkern.quantize_kv(v, fp8, vs)
    want = ref.attention_with_kvcache(q.double(), ref.dequantize_kv(k8, ks, torch.float64),
                                      ref.dequantize_kv(v8, torch.full((2,), vs, device="cuda"), torch.float64), lens)
    got = llmkern.attention_with_kvcache(q, k8, v8, lens, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)


# ---- the zoo's fp8 KVCache ------------------------------------------------------------------------

def _model(name, backend):
    from llmkern.models import build

    torch.manual_seed(0)
    return build(name, backend=backend).eval()


@pytest.mark.parametrize("name", ["llama-tiny", "gpt-tiny"])
def test_zoo_fp8_cache_decode_kernel_equals_the_dequantized_path(monkeypatch, name):
    """Decode logits over an fp8 cache: the llmkern backend (split-K kernel reading the fp8 tiles, under the
    interpreter) equals the torch backend (SDPA over the dequantized cache): both read the stored bytes."""
    if DEV is None:
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    logits = {}
    for backend in ("llmkern", "torch"):
        m = _model(name, backend)
        m.kv_cache_dtype, m.kv_cache_scales = torch.float8_e4m3fn, (0.5, 2.0)
        cache = m.new_cache(2, 16)
        assert cache.fp8 and (cache.k_scale, cache.v_scale) == (0.5, 2.0)
        with torch.no_grad():
            m(ids[:, :7], cache=cache)
            logits[backend] = torch.cat([m(ids[:, 7:8], cache=cache), m(ids[:, 8:9], cache=cache)], 1)
        assert all(t.dtype == torch.float8_e4m3fn for t in cache.k + cache.v)
    torch.testing.assert_close(logits["llmkern"], logits["torch"], atol=1e-4, rtol=1e-4)
    # close to the 16-bit cache's (e4m3: about 6% per stored number)
    m = _model(name, "torch")
    with torch.no_grad():
        full = m(ids)[:, 7:9]
    assert (logits["torch"] - full).abs().max() < 0.1 * full.abs().max()


def test_zoo_fp8_cache_generation_beams_and_speculation():
    """generate() over fp8 caches: greedy, beam search (reorder) and speculative decoding (per-row crops:
    the scattered appends) run and agree with the dequantized semantics' greedy tokens; the cache is a
    quarter of the float32 one's bytes."""
    from llmkern.generation import generate

    m = _model("llama-tiny", "torch")
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    c32, c8 = m.new_cache(2, 8), m.new_cache(2, 8, dtype=torch.float8_e5m2)
    with torch.no_grad():
        m(ids, cache=c32)
        m(ids, cache=c8)
    assert c8.nbytes * 4 == c32.nbytes > 0
    m.kv_cache_dtype = torch.float8_e4m3fn
    with torch.no_grad():
        greedy = generate(m, ids, 6)
        beams = generate(m, ids, 6, strategy="beam", num_beams=3)
        draft = _model("llama-tiny", "torch")
        draft.kv_cache_dtype = torch.float8_e4m3fn
        torch.nn.init.normal_(draft.lm_head.weight)  # a poor draft: rejections, per-row rollbacks
        spec = generate(m, ids, 6, draft_model=draft, num_draft_tokens=3)
    assert beams.shape == greedy.shape
    assert torch.equal(spec, greedy)  # greedy speculation is exact for the target's own (fp8) semantics


def test_zoo_fp8_cache_errors():
    from llmkern.models._attn import KVCache, LatentKVCache

    with pytest.raises(ValueError, match="k_scale / v_scale are for a float8 cache"):
        KVCache(1, 1, 1, 4, 8, dtype=torch.float16, k_scale=2.0)
    with pytest.raises(ValueError, match="v_scale must be a finite positive float"):
        KVCache(1, 1, 1, 4, 8, dtype=torch.float8_e4m3fn, v_scale=0.0)
    with pytest.raises(ValueError, match="k_scale / v_scale are for a float8 cache"):
        LatentKVCache(1, 1, 4, 8, 4, dtype=torch.float32, kv_scale=2.0)


@pytest.mark.parametrize("name", ["deepseek-v3-tiny", "deepseek-v2-tiny"])
def test_zoo_fp8_latent_cache(monkeypatch, name):
    """DeepSeek's latent cache stored as float8 (one scale per latent row): decode logits through mla_decode (the
    llmkern backend, kernel under the interpreter) equal SDPA over the dequantized latent (the torch backend),
    and the latent buffers are float8; greedy generation and speculation (per-row crops) run on it."""
    if DEV is None:
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    from llmkern.generation import generate

    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(4))
    logits = {}
    for backend in ("llmkern", "torch"):
        m = _model(name, backend)
        m.latent_cache, m.kv_cache_dtype, m.kv_cache_scales = True, torch.float8_e4m3fn, (0.5, 1.0)
        cache = m.new_cache(2, 16)
        assert cache.latent and cache.fp8 and cache.k_scale == cache.v_scale == 0.5
        with torch.no_grad():
            m(ids[:, :5], cache=cache)
            logits[backend] = torch.cat([m(ids[:, 5:6], cache=cache), m(ids[:, 6:7], cache=cache)], 1)
        assert all(t.dtype == torch.float8_e4m3fn for t in cache.k)
    torch.testing.assert_close(logits["llmkern"], logits["torch"], atol=1e-4, rtol=1e-4)
    m = _model(name, "torch")
    m.latent_cache, m.kv_cache_dtype = True, torch.float8_e4m3fn
    with torch.no_grad():
        greedy = generate(m, ids[:, :4], 5)
        spec = generate(m, ids[:, :4], 5, draft_model=m, num_draft_tokens=2)
    assert torch.equal(spec, greedy)


# ---- mla_decode over a float8 latent cache --------------------------------------------------------

@pytest.mark.parametrize("backend", ["default", "reference", "triton"])
@pytest.mark.parametrize("fp8", FP8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("layout", ["joined", "kpe_cache", "paged"])
def test_mla_decode_fp8_latent_cache(monkeypatch, backend, fp8, layout):
    """The latent (and the rotary part, one scale for both) stored as float8: mla_decode equals float64
    attention over the dequantized cache, with the values its first head_dim_v channels."""
    _use(monkeypatch, backend)
    g = torch.Generator().manual_seed(3)
    B, H, Tq, R, Dr, T = 2, 8, 2, 64, 16, 40
    q = torch.randn(B, H, Tq, R + Dr, generator=g)
    kv = torch.randn(B, 1, T, R + Dr, generator=g) * 2
    lens = torch.tensor([T, 13], dtype=torch.int32)
    kv8 = llmkern.quantize_kv(kv, fp8, 0.25)
    deq = ref.dequantize_kv(kv8, torch.tensor([0.25]), torch.float64)
    want = ref.attention_with_kvcache(q.double(), deq, deq[..., :R], lens, scale=0.1)
    kw = dict(head_dim_v=R, scale=0.1, kv_scale=0.25)
    if layout == "joined":
        got = llmkern.mla_decode(q, kv8, lens, **kw)
    elif layout == "kpe_cache":
        got = llmkern.mla_decode(q, kv8[..., :R].contiguous(), lens, kpe_cache=kv8[..., R:].contiguous(), **kw)
    else:
        perm = torch.randperm(B * T // 8, generator=g)
        pool = torch.empty(B * T // 8, 1, 8, R + Dr, dtype=fp8)
        pool[perm] = kv8.view(B, 1, T // 8, 8, R + Dr).transpose(1, 2).reshape(-1, 1, 8, R + Dr)
        got = llmkern.mla_decode(q, pool, lens, block_table=perm.view(B, T // 8).to(torch.int32), **kw)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_mla_decode_fp8_errors():
    q = torch.randn(1, 4, 1, 48)
    kv8 = llmkern.quantize_kv(torch.randn(1, 1, 8, 48))
    with pytest.raises(ValueError, match="kv_scale is for a float8 cache"):
        llmkern.mla_decode(q, kv8.float(), 8, head_dim_v=32, kv_scale=2.0)
    with pytest.raises(ValueError, match="kpe_cache must be torch.float8_e4m3fn"):
        llmkern.mla_decode(q, kv8[..., :32], 8, head_dim_v=32, kpe_cache=kv8[..., 32:].float())
    with pytest.raises(ValueError, match="kv_scale must be finite and positive"):
        llmkern.mla_decode(q, kv8, 8, head_dim_v=32, kv_scale=torch.tensor(-1.0))


@pytest.mark.skipif(DEV is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
def test_fp8_dequantize_first_path(monkeypatch):
    """Where Triton cannot convert the cache's float8 in registers (e4m3 before sm_89), the launchers read a
    dequantized copy: the same results, one scale or both."""
    import llmkern.kernels.attention_decode as dec
    import llmkern.kernels.mla_decode as mla

    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    q, k, v, lens = _case(Tq=2)
    k8, v8 = llmkern.quantize_kv(k, torch.float8_e4m3fn, 0.5), llmkern.quantize_kv(v)
    for ks, vs in ((0.5, 1.0), (0.5, None)):
        want = llmkern.attention_with_kvcache(q, k8, v8, lens, k_scale=ks, v_scale=vs)
        monkeypatch.setattr(dec, "fp8_in_registers", lambda dtype, device: False)
        got = llmkern.attention_with_kvcache(q, k8, v8, lens, k_scale=ks, v_scale=vs)
        monkeypatch.undo()
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    kv8 = llmkern.quantize_kv(torch.randn(3, 1, 48, 40), torch.float8_e4m3fn, 2.0)
    qm = torch.randn(3, 4, 1, 40)
    want = llmkern.mla_decode(qm, kv8, lens, head_dim_v=32, kv_scale=2.0)
    monkeypatch.setattr(mla, "fp8_in_registers", lambda dtype, device: False)
    torch.testing.assert_close(llmkern.mla_decode(qm, kv8, lens, head_dim_v=32, kv_scale=2.0), want,
                               atol=1e-5, rtol=1e-5)
