"""Decode attention over a multi-head latent (MLA) KV cache: llmkern.ops.mla_decode.mla_decode.

out = softmax(q kv^T * scale) kv[..., :head_dim_v] over each row's first cache_seqlens[b] keys, query t of row b
at position len_b - Tq + t (causal: it sees keys up to it), kv head h // (H / Hk) for query head h. Checked here,
on the default CPU path (the reference) and on the Triton kernel (interpreter on CPU):
- both against a float64 oracle written below (repeated kv heads, an explicit mask, softmax, matmul) in float32
  and float16, for DeepSeek-like (Hk = 1, rotary channels), Dr = 0 and GQA shapes, Tq 1 and 3, causal or not,
  row lengths 0, Tq (the new tokens alone), Tmax, a non-multiple of 32 and one shorter than Tq;
- paged caches (page sizes 8, 32, 64, a shuffled pool with noise pages, a token-major pool as a view) equal
  the dense cache; key_padding_mask (left pads, a fully masked row -> zeros and LSE -inf);
- the key splits (1, 3, more than the tiles, automatic) agree; the kernel equals attention_with_kvcache with
  v = kv[..., :Dv] where that takes the head dim (D <= 256); wide latents past it (Dv 256 / 512 + 64 rotary,
  Dr = 256), padded (non power of two) channel counts and query rows past one row block against the oracle;
- the launcher's batch slices (same bits) and the kernel's NaN rows for bad lengths / pages (no wild reads);
- output/LSE shapes and dtypes, strided q and kv, no query, an int cache_seqlens;
- argument errors naming the argument; opcheck of torch.ops.llmkern.mla_decode; torch.compile(fullgraph=True);
- under -m gpu: bf16 at DeepSeek-V3's shape (Dv 512 + 64, Hk 1, H 128 / 16, 4096 keys, paged by 64) no further
  from the float64 oracle than twice the bf16 reference path's error.
"""
import pytest
import torch

import llmkern
from llmkern.ops.mla_decode import mla_decode
from llmkern.reference import attention as ref
from llmkern.testing import max_abs_err, triton_device

DEV = triton_device()
needs_triton = pytest.mark.skipif(DEV is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")
BACKENDS = ["default", "triton"]


@pytest.fixture
def backend(request, monkeypatch):
    """The backend a parametrized test runs on: the default CPU path, or the Triton kernels (interpreter)."""
    name = request.param
    if name == "triton":
        if DEV is None:
            pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    return name


def _oracle(q, kv, lens, dv, causal=True, scale=None, key_padding_mask=None):
    """(out, lse) in float64: kv heads repeated per query head, an explicit visibility mask, softmax, matmul;
    a query with no visible key gives zeros and LSE -inf."""
    B, H, Tq, D = q.shape
    Hk, Tmax = kv.shape[1], kv.shape[2]
    k = kv.double().repeat_interleave(H // Hk, dim=1)  # [B, H, Tmax, D]
    v = k[..., :dv]
    scale = D ** -0.5 if scale is None else scale
    s = q.double() @ k.transpose(-1, -2) * scale  # [B, H, Tq, Tmax]
    lens = torch.as_tensor(lens, device=q.device).to(torch.long).reshape(-1).expand(B)
    j = torch.arange(Tmax, device=q.device)
    pos = lens[:, None] - Tq + torch.arange(Tq, device=q.device)[None, :]  # [B, Tq]
    vis = (j[None, None, :] < lens[:, None, None]).expand(B, Tq, Tmax)
    if causal:
        vis = vis & (j[None, None, :] <= pos[:, :, None])
    if key_padding_mask is not None:
        vis = vis & key_padding_mask[:, None, :].to(q.device)
    vis = vis[:, None]  # [B, 1, Tq, Tmax]
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.where(vis, torch.exp(s - safe[..., None]), torch.zeros_like(s))
    return p @ v, lse


def _inputs(B, H, Hk, Tq, Tmax, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g).to(dtype)
    kv = torch.randn(B, Hk, Tmax, D, generator=g).to(dtype)
    return q, kv


def _paged(dense, page_size, extra_pages=3, seed=0):
    """(pool, block_table) holding `dense` [B, Hk, Tmax, D]: every row's pages at shuffled pool indices, plus
    unused pages of noise (a wrong page index reads garbage, not zeros)."""
    B, Hk, Tmax, D = dense.shape
    n = Tmax // page_size
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(B * n + extra_pages, generator=g)
    pool = (torch.randn(B * n + extra_pages, Hk, page_size, D, generator=g) * 3).to(dense.dtype)
    table = order[:B * n].reshape(B, n).to(torch.int32)
    pages = dense.cpu().reshape(B, Hk, n, page_size, D).permute(0, 2, 1, 3, 4)  # [B, n, Hk, ps, D]
    pool[table.reshape(-1).long()] = pages.reshape(B * n, Hk, page_size, D)
    return pool.to(dense.device), table.to(dense.device)


def _check(out, lse, want, want_lse, tol):
    assert out.shape == want.shape and lse.shape == want_lse.shape
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    seen = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), seen), "rows with no visible key: LSE -inf"
    torch.testing.assert_close(lse.double()[seen], want_lse[seen], atol=tol, rtol=tol)
    assert (out[~seen] == 0).all(), "rows with no visible key: zeros"


# ---- against the float64 oracle ------------------------------------------------------------------

SHAPES = {
    # H, Hk, Dv, Dr
    "deepseek-like": (4, 1, 32, 16),
    "dr0": (4, 1, 32, 0),
    "gqa": (4, 2, 32, 16),
}


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("Tq,causal", [(1, True), (1, False), (3, True), (3, False)])
def test_vs_float64_oracle(backend, dtype, tol, shape, Tq, causal):
    H, Hk, Dv, Dr = SHAPES[shape]
    Tmax = 70
    q, kv = _inputs(5, H, Hk, Tq, Tmax, Dv + Dr, dtype)
    # 0 keys, the new tokens alone, the whole cache, a non-multiple of 32, one key (fewer than Tq when Tq = 3)
    lens = torch.tensor([0, Tq, Tmax, 45, 1], dtype=torch.int32)
    out, lse = mla_decode(q, kv, lens, head_dim_v=Dv, causal=causal, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    want, want_lse = _oracle(q, kv, lens, Dv, causal)
    _check(out, lse, want, want_lse, tol)
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()  # row 0 has no key at all
    # an explicit scale (DeepSeek passes the per-head scores' own) is the one applied
    out2 = mla_decode(q, kv, lens, head_dim_v=Dv, causal=causal, scale=0.37)
    torch.testing.assert_close(out2.double(), _oracle(q, kv, lens, Dv, causal, scale=0.37)[0], atol=tol, rtol=tol)


@pytest.mark.parametrize("Dv,Dr,H,Hk,Tmax", [
    (256, 64, 2, 1, 40),   # DeepSeek's proportions at half width: D = 320, past attention's 256
    (512, 64, 2, 1, 40),   # DeepSeek-V3's own Dv 512 + 64
    (40, 24, 4, 2, 50),    # neither side a power of two (padded tiles)
    (32, 256, 2, 1, 40),   # the most rotary channels allowed
    (512, 0, 2, 1, 33),    # the widest latent, no rotary channels
])
def test_wide_and_padded_head_dims_vs_oracle(triton_backend, Dv, Dr, H, Hk, Tmax):
    q, kv = _inputs(2, H, Hk, 1, Tmax, Dv + Dr, seed=3)
    lens = torch.tensor([Tmax, 27], dtype=torch.int32)
    out, lse = mla_decode(q, kv, lens, head_dim_v=Dv, return_lse=True)
    assert out.shape == (2, H, 1, Dv)
    _check(out, lse, *_oracle(q, kv, lens, Dv), 1e-5)


@pytest.mark.parametrize("H,Hk,Tq,causal", [(24, 1, 3, True), (48, 2, 3, False)])
def test_packed_rows_past_one_block_vs_oracle(triton_backend, H, Hk, Tq, causal):
    """A kv head's query rows (its heads x the new tokens, 72 here) past one BLOCK_M of 64: two row blocks."""
    q, kv = _inputs(2, H, Hk, Tq, 40, 24, seed=9)
    lens = torch.tensor([40, 2], dtype=torch.int32)
    out, lse = mla_decode(q, kv, lens, head_dim_v=16, causal=causal, return_lse=True)
    _check(out, lse, *_oracle(q, kv, lens, 16, causal), 1e-5)


# ---- paged caches and key padding ----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("page_size", [8, 32, 64])
@pytest.mark.parametrize("Tq,causal", [(1, True), (3, False)])
def test_paged_equals_dense(backend, page_size, Tq, causal):
    q, kv = _inputs(3, 4, 2, Tq, 64, 48)
    lens = torch.tensor([64, 1, 37], dtype=torch.int32)
    kw = dict(head_dim_v=32, causal=causal, return_lse=True)
    want, want_lse = mla_decode(q, kv, lens, **kw)
    pool, table = _paged(kv, page_size)
    got, got_lse = mla_decode(q, pool, lens, block_table=table, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-5, rtol=1e-5)
    _check(got, got_lse, *_oracle(q, kv, lens, 32, causal), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("paged", [False, True])
def test_separate_rotary_cache(backend, paged):
    """kpe_cache (FlashInfer's separate ckv / kpe pools): kv_cache holds the latent only, kpe_cache the rotary
    channels, in tensors of their own strides (here: kpe cut from a wider buffer); the same as the one cache."""
    q, kv = _inputs(3, 4, 1, 2, 64, 48, seed=3)
    lens = torch.tensor([64, 2, 41], dtype=torch.int32)
    want, want_lse = _oracle(q, kv, lens, 32)
    ckv = kv[..., :32].contiguous()
    kpe = torch.cat([kv[..., 32:], torch.randn(3, 1, 64, 8)], dim=-1)[..., :16]  # strided rows
    table = None
    if paged:
        ckv, table = _paged(ckv, 16)
        kpe, _ = _paged(kv[..., 32:].contiguous(), 16)  # (same seed: the same page order as ckv's)
    out, lse = mla_decode(q, ckv, lens, head_dim_v=32, kpe_cache=kpe, block_table=table, return_lse=True)
    _check(out, lse, want, want_lse, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_token_major_pool_as_a_view(backend):
    """FlashAttention's pool layout [num_pages, page_size, Hk, D], passed as .transpose(1, 2)."""
    q, kv = _inputs(3, 4, 2, 2, 64, 48)
    lens = torch.tensor([64, 2, 50], dtype=torch.int32)
    pool, table = _paged(kv, 16)
    token_major = pool.transpose(1, 2).contiguous()  # [num_pages, page_size, Hk, D] storage
    got = mla_decode(q, token_major.transpose(1, 2), lens, head_dim_v=32, block_table=table)
    torch.testing.assert_close(got.double(), _oracle(q, kv, lens, 32)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("Tq,causal", [(1, True), (3, True), (3, False)])
def test_key_padding_mask(backend, paged, Tq, causal):
    """Left pads of different lengths per row: the same as the row's unpadded keys alone; a row whose keys
    are all masked returns zeros and LSE -inf."""
    B, Tmax, Dv = 4, 64, 32
    q, kv = _inputs(B, 4, 1, Tq, Tmax, 48, seed=1)
    lens = torch.tensor([40, 20, 64, 37], dtype=torch.int32)
    pads = torch.tensor([5, 0, 30, 10])
    kpm = torch.arange(Tmax)[None, :] >= pads[:, None]
    kpm[3] = False  # row 3 sees nothing
    cache, table = (_paged(kv, 16) if paged else (kv, None))
    out, lse = mla_decode(q, cache, lens, head_dim_v=Dv, causal=causal, key_padding_mask=kpm, block_table=table,
                          return_lse=True)
    _check(out, lse, *_oracle(q, kv, lens, Dv, causal, key_padding_mask=kpm), 1e-5)
    assert (out[3] == 0).all() and torch.isneginf(lse[3]).all()
    for b in range(3):  # the row alone with its pads dropped (same relative positions)
        p = int(pads[b])
        want, want_lse = _oracle(q[b:b + 1], kv[b:b + 1, :, p:], lens[b:b + 1] - p, Dv, causal)
        torch.testing.assert_close(out[b:b + 1].double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[b:b + 1].double(), want_lse, atol=1e-5, rtol=1e-5)


# ---- splits, and the dense decode it replaces ----------------------------------------------------

@pytest.mark.parametrize("Tq,causal,paged,peak", [(1, True, False, 1.0), (3, True, True, 1.0), (2, False, False, 1.0),
                                                  (1, True, False, 20.0)])
def test_num_splits_agree(triton_backend, Tq, causal, paged, peak):
    """1 split, 3 (the interpreter's 32-key tiles: 96 keys in 3 chunks), more splits than tiles and the
    automatic choice give one result; row 1's last split and row 3's every split see no key. peak: scores
    in the hundreds, each split's maximum far from the others' (the combine's rescaling)."""
    q, kv = _inputs(4, 4, 1, Tq, 96, 48, seed=2)
    q = q * peak
    lens = torch.tensor([96, 50, 1, 0], dtype=torch.int32)
    cache, table = (_paged(kv, 8) if paged else (kv, None))
    res = {s: mla_decode(q, cache, lens, head_dim_v=32, causal=causal, block_table=table, num_splits=s,
                         return_lse=True) for s in (1, 3, 8, 0)}
    for s in (3, 8, 0):
        torch.testing.assert_close(res[s][0], res[1][0], atol=1e-5, rtol=1e-5, msg=f"out, {s} splits")
        torch.testing.assert_close(res[s][1], res[1][1], atol=1e-5, rtol=1e-5, msg=f"lse, {s} splits")
    _check(*res[3], *_oracle(q, kv, lens, 32, causal), 1e-5)


@pytest.mark.parametrize("H,Hk,Dv,Dr", [(4, 1, 32, 16), (4, 2, 32, 0)])
@pytest.mark.parametrize("Tq,causal", [(1, True), (3, True), (3, False)])
def test_equals_attention_with_kvcache(triton_backend, H, Hk, Dv, Dr, Tq, causal):
    """For D <= 256 the latent decode is attention_with_kvcache with v = the cache's first Dv channels."""
    q, kv = _inputs(3, H, Hk, Tq, 64, Dv + Dr, seed=4)
    lens = torch.tensor([64, 2, 45], dtype=torch.int32)
    kpm = torch.arange(64)[None, :] >= torch.tensor([3, 0, 7])[:, None]
    for extra in ({}, dict(key_padding_mask=kpm, scale=0.2)):
        got, got_lse = mla_decode(q, kv, lens, head_dim_v=Dv, causal=causal, return_lse=True, **extra)
        want, want_lse = llmkern.attention_with_kvcache(q, kv, kv[..., :Dv], lens, causal=causal, return_lse=True,
                                                        **extra)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_lse, want_lse, atol=1e-5, rtol=1e-5)


# ---- outputs, layouts, lengths -------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_outputs_and_strided_inputs(backend, dtype):
    B, H, Hk, Tq, Tmax, Dv, Dr = 2, 4, 2, 3, 40, 32, 16
    q, kv = _inputs(B, H, Hk, Tq, Tmax, Dv + Dr, dtype, seed=5)
    lens = torch.tensor([40, 17], dtype=torch.int32)
    out = mla_decode(q, kv, lens, head_dim_v=Dv)
    assert isinstance(out, torch.Tensor) and out.shape == (B, H, Tq, Dv) and out.dtype == dtype
    out2, lse = mla_decode(q, kv, lens, head_dim_v=Dv, return_lse=True)
    assert out2.shape == (B, H, Tq, Dv) and out2.dtype == dtype
    assert lse.shape == (B, H, Tq) and lse.dtype == torch.float32
    torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)
    # q as transformers lays it out ([B, Tq, H, D] memory), kv token-major ([B, Tmax, Hk, D] memory)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    kv_t = kv.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_t.is_contiguous() and not kv_t.is_contiguous()
    got, got_lse = mla_decode(q_t, kv_t, lens, head_dim_v=Dv, return_lse=True)
    torch.testing.assert_close(got, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_lse, lse, atol=1e-5, rtol=1e-5)
    if backend == "triton":  # the kernel's output keeps q's order of dimensions ([B, Tq, H, Dv] memory)
        assert got.transpose(1, 2).is_contiguous()
    # q's head dim not innermost-contiguous, and kv a slice of a wider buffer
    wide = torch.zeros(B, Hk, Tmax, Dv + Dr + 8, dtype=dtype)
    wide[..., :Dv + Dr] = kv
    q_s = torch.zeros(B, H, Tq, 2 * (Dv + Dr), dtype=dtype)
    q_s[..., ::2] = q
    got = mla_decode(q_s[..., ::2], wide[..., :Dv + Dr], lens, head_dim_v=Dv)
    torch.testing.assert_close(got, out, atol=1e-5, rtol=1e-5)
    kv_s = torch.zeros(B, Hk, Tmax, Dv + Dr, 2, dtype=dtype)
    kv_s[..., 0] = kv
    assert kv_s[..., 0].stride(-1) == 2
    got = mla_decode(q, kv_s[..., 0], lens, head_dim_v=Dv)
    torch.testing.assert_close(got, out, atol=1e-5, rtol=1e-5)
    # an empty cache: zeros, LSE -inf
    none, none_lse = mla_decode(q, kv[:, :, :0], 0, head_dim_v=Dv, return_lse=True)
    assert none.shape == (B, H, Tq, Dv) and (none == 0).all() and torch.isneginf(none_lse).all()
    # no query
    empty, empty_lse = mla_decode(q[:, :, :0], kv, lens, head_dim_v=Dv, return_lse=True)
    assert empty.shape == (B, H, 0, Dv) and empty.dtype == dtype and empty_lse.shape == (B, H, 0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_int_cache_seqlens(backend):
    q, kv = _inputs(2, 4, 1, 2, 50, 48, seed=6)
    got, got_lse = mla_decode(q, kv, 37, head_dim_v=32, return_lse=True)
    lens = torch.tensor([37, 37], dtype=torch.int32)
    want, want_lse = mla_decode(q, kv, lens, head_dim_v=32, return_lse=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-5, rtol=1e-5)
    _check(got, got_lse, *_oracle(q, kv, lens, 32), 1e-5)
    # int64 lengths are the same
    torch.testing.assert_close(mla_decode(q, kv, lens.long(), head_dim_v=32), want, atol=1e-5, rtol=1e-5)


@needs_triton
def test_grid_slices(monkeypatch):
    """Batches past the grid limit (B * Hk programs) run in slices: the same bits; a paged pool is shared by
    every slice."""
    from llmkern.kernels import attention as A
    from llmkern.kernels.mla_decode import mla_decode as kernel

    q, kv = (t.to(DEV) for t in _inputs(3, 4, 2, 2, 32, 48, seed=10))
    lens = torch.tensor([32, 3, 20], dtype=torch.int32, device=DEV)
    kpm = torch.arange(32, device=DEV)[None, :] >= torch.tensor([2, 0, 5], device=DEV)[:, None]
    pool, table = _paged(kv, 8)
    kw = dict(head_dim_v=32, scale=0.25, num_splits=2, key_padding_mask=kpm)
    whole = [kernel(q, kv, lens, **kw), kernel(q, pool, lens, block_table=table, **kw)]
    monkeypatch.setattr(A, "MAX_GRID_YZ", 2)  # Hk = 2: one row per launch
    sliced = [kernel(q, kv, lens, **kw), kernel(q, pool, lens, block_table=table, **kw)]
    for w, s in zip(whole, sliced):
        for a, b in zip(w, s):
            assert torch.equal(a, b)
    torch.testing.assert_close(whole[1][0].double(), _oracle(q, kv, lens, 32, scale=0.25, key_padding_mask=kpm)[0],
                               atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max over the NaN rows
@pytest.mark.parametrize("paged", [False, True])
def test_kernel_bad_lengths_and_pages_give_nan_rows(paged):
    """The host checks cache_seqlens and block_table values only on the CPU (a check on CUDA would sync): the
    kernel itself turns a row whose length lies outside 0..capacity, or whose block table names a page outside
    the pool, into NaN (out and LSE) without reading out of bounds, and leaves the other rows exact."""
    from llmkern.kernels.mla_decode import mla_decode as kernel

    q, kv = (t.to(DEV) for t in _inputs(4, 4, 1, 1, 64, 48, seed=11))
    lens = torch.tensor([64, 70, -3, 37], dtype=torch.int32, device=DEV)  # rows 1 and 2 are bad
    kw = dict(head_dim_v=32, scale=0.25, num_splits=3)
    if paged:
        pool, table = _paged(kv, 16)
        table[3, 1] = pool.shape[0] + 7  # row 3 (37 keys: pages 0..2) names a page outside the pool
        out, lse = kernel(q, pool, lens, block_table=table, **kw)
        good = [0]
    else:
        out, lse = kernel(q, kv, lens, **kw)
        good = [0, 3]
    bad = [b for b in range(4) if b not in good]
    assert torch.isnan(out[bad]).all() and torch.isnan(lse[bad]).all()
    ok = torch.tensor(good)
    want, want_lse = _oracle(q[ok], kv[ok], lens[ok], 32, scale=0.25)
    _check(out[ok], lse[ok], want, want_lse, 1e-5)


# ---- errors --------------------------------------------------------------------------------------

def _bad_cases():
    q, kv = torch.randn(2, 4, 1, 48), torch.randn(2, 1, 16, 48)
    lens = torch.tensor([16, 3], dtype=torch.int32)
    ok = dict(head_dim_v=32)
    pool = torch.randn(6, 1, 8, 48)
    table = torch.zeros(2, 2, dtype=torch.int32)
    return [
        # (args, kwargs, exception, match)
        ((q, kv, lens), dict(head_dim_v=49), ValueError, "head_dim_v"),
        ((q, kv, lens), dict(head_dim_v=0), ValueError, "head_dim_v"),
        ((q, kv, lens), dict(head_dim_v=-3), ValueError, "head_dim_v"),
        ((q, kv, lens), dict(head_dim_v=True), TypeError, "head_dim_v"),
        ((q, kv, lens), dict(head_dim_v=32.0), TypeError, "head_dim_v"),
        ((torch.randn(2, 4, 1, 300), torch.randn(2, 1, 16, 300), lens), dict(head_dim_v=40), ValueError,
         "head_dim_v"),  # 260 rotary channels
        ((torch.randn(2, 4, 1, 600), torch.randn(2, 1, 16, 600), lens), dict(head_dim_v=520), ValueError,
         "head_dim_v"),  # a latent past 512
        ((q, kv.half(), lens), ok, ValueError, "kv_cache must share"),
        ((q.double(), kv, lens), ok, ValueError, "kv_cache must share"),
        ((q.long(), kv.long(), lens), ok, ValueError, "q and kv_cache must share a floating dtype"),
        ((q, torch.randn(3, 1, 16, 48), lens), ok, ValueError, "kv_cache must have q's batch size"),
        ((q, torch.randn(2, 1, 16, 40), lens), ok, ValueError, "kv_cache's last dimension"),
        ((q[0], kv, lens), ok, ValueError, "q and kv_cache must be 4-D"),
        ((q, torch.randn(2, 3, 16, 48), lens), ok, ValueError, r"k/v heads \(3\) must divide"),
        ((q, kv, torch.tensor([16, 3, 1], dtype=torch.int32)), ok, ValueError, "cache_seqlens"),
        ((q, kv, torch.tensor([[16, 3]], dtype=torch.int32)), ok, ValueError, "cache_seqlens"),
        ((q, kv, torch.tensor([17, 3], dtype=torch.int32)), ok, ValueError, "cache_seqlens must lie in 0..16"),
        ((q, kv, torch.tensor([16, -1], dtype=torch.int32)), ok, ValueError, "cache_seqlens must lie in 0..16"),
        ((q, kv, 17), ok, ValueError, "cache_seqlens"),
        ((q, kv, torch.tensor([16.0, 3.0])), ok, ValueError, "cache_seqlens"),
        ((q, kv, [16, 3]), ok, TypeError, "cache_seqlens"),
        ((q, kv[..., :32], lens), dict(ok, kpe_cache=torch.randn(2, 1, 16, 8)), ValueError, "kpe_cache"),  # 32 + 8
        ((q, kv[..., :32], lens), dict(ok, kpe_cache=torch.randn(2, 1, 15, 16)), ValueError, "kpe_cache"),
        ((q, kv[..., :32], lens), dict(ok, kpe_cache=torch.randn(2, 1, 16, 16).half()), ValueError, "kpe_cache"),
        ((q, kv, lens), dict(ok, kpe_cache=torch.randn(2, 1, 16, 16)), ValueError, "kpe_cache"),  # kv still 48 wide
        ((q, kv[..., :32], lens), dict(ok, kpe_cache=[1.0]), TypeError, "kpe_cache"),
        ((q, kv, lens), dict(ok, key_padding_mask=torch.ones(2, 16)), ValueError, "key_padding_mask"),
        ((q, kv, lens), dict(ok, key_padding_mask=torch.ones(2, 15, dtype=torch.bool)), ValueError,
         "key_padding_mask"),
        ((q, kv, lens), dict(ok, key_padding_mask=torch.ones(1, 16, dtype=torch.bool)), ValueError,
         "key_padding_mask"),
        ((q, pool, lens), dict(ok, block_table=table.long()), ValueError, "block_table"),
        ((q, pool, lens), dict(ok, block_table=table[:1]), ValueError, "block_table"),
        ((q, pool, lens), dict(ok, block_table=torch.full((2, 2), 6, dtype=torch.int32)), ValueError,
         "block_table"),
        ((q, pool, torch.tensor([17, 3], dtype=torch.int32)), dict(ok, block_table=table), ValueError,
         "cache_seqlens must lie in 0..16"),  # 2 pages of 8 per row
        ((q, kv, lens), dict(ok, num_splits=-1), ValueError, "num_splits"),
        ((q, kv, lens), dict(ok, num_splits=True), ValueError, "num_splits"),
        ((q, kv, lens), dict(ok, num_splits=2.0), ValueError, "num_splits"),
        ((q, kv, lens), dict(ok, causal=1), TypeError, "causal"),
        ((q, kv, lens), dict(ok, causal=None), TypeError, "causal"),
        ((q, kv, lens), dict(ok, return_lse=1), TypeError, "return_lse"),
        ((q, kv, lens), dict(ok, scale=True), TypeError, "scale"),
        ((q, kv, lens), dict(ok, scale=float("nan")), ValueError, "scale"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_arguments_name_the_argument(case):
    args, kwargs, exc, match = _bad_cases()[case]
    with pytest.raises(exc, match=match):
        mla_decode(*args, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_garbage_in_hidden_cache_slots_is_never_read(monkeypatch, backend):
    """Slots past a row's length, hidden by the padding mask or in pages past the length may hold anything (a
    torch.empty cache): NaN there must not reach the output on any path (weight 0 times NaN is NaN)."""
    if backend == "triton" and DEV is None:
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    if backend != "default":
        monkeypatch.setenv("LLMKERN_BACKEND", backend)
    q, kv = _inputs(2, 4, 2, 1, 24, 40, seed=3)
    lens = torch.tensor([9, 24], dtype=torch.int32)
    kpm = torch.ones(2, 24, dtype=torch.bool)
    kpm[1, :4] = False
    want, _ = _oracle(q, kv, lens, 32, key_padding_mask=kpm)
    dirty = kv.clone()
    dirty[0, :, 9:] = float("nan")
    dirty[1, :, :4] = float("nan")
    got = mla_decode(q, dirty, lens, head_dim_v=32, key_padding_mask=kpm)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # paged: row 0's pages past its length are a page of NaN
    pool = torch.cat([kv[0].view(2, 3, 8, 40).transpose(0, 1), kv[1].view(2, 3, 8, 40).transpose(0, 1),
                      torch.full((1, 2, 8, 40), float("nan"))])
    table = torch.tensor([[0, 1, 6], [3, 4, 5]], dtype=torch.int32)
    got = mla_decode(q, pool, lens, head_dim_v=32, key_padding_mask=kpm, block_table=table)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # attention_with_kvcache over the same dirty cache (its CPU path runs SDPA)
    got = llmkern.attention_with_kvcache(q, dirty, dirty[..., :32].contiguous(), lens, key_padding_mask=kpm)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


# ---- torch.library -------------------------------------------------------------------------------

def test_opcheck(triton_backend):
    q, kv = _inputs(2, 4, 1, 2, 32, 48, seed=7)
    lens = torch.tensor([32, 5], dtype=torch.int32)
    torch.library.opcheck(torch.ops.llmkern.mla_decode.default, (q, kv, lens, None, None, 32, 0.2, True, 2))
    # paged, with a padding mask, q in [B, Tq, H, D] memory
    pool, table = _paged(kv, 8)
    kpm = torch.arange(32)[None, :] >= torch.tensor([4, 0])[:, None]
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    torch.library.opcheck(torch.ops.llmkern.mla_decode.default, (q_t, pool, lens, table, kpm, 32, 0.2, False, 0))
    out, lse = torch.ops.llmkern.mla_decode(q_t, pool, lens, table, kpm, 32, 0.2, False, 0)
    want, want_lse = _oracle(q, kv, lens, 32, causal=False, scale=0.2, key_padding_mask=kpm)
    _check(out, lse, want, want_lse, 1e-5)
    # the rotary channels in a cache of their own
    torch.library.opcheck(torch.ops.llmkern.mla_decode.default,
                          (q, kv[..., :32].contiguous(), lens, None, None, 32, 0.2, True, 2, kv[..., 32:].contiguous()))
    # q with a strided last dimension (the kernel reads a contiguous copy: the fake gives its output's layout)
    q_s = q.permute(3, 0, 2, 1).contiguous().permute(1, 3, 2, 0)
    assert q_s.stride(-1) != 1
    torch.library.opcheck(torch.ops.llmkern.mla_decode.default, (q_s, kv, lens, None, None, 32, 0.2, True, 2))
    torch.library.opcheck(torch.ops.llmkern.mla_decode.default, (q_s, kv, lens, None, None, 48, 0.2, True, 2))


def test_torch_compile_fullgraph(triton_backend):
    torch._dynamo.reset()
    q, kv = _inputs(2, 4, 1, 2, 40, 48, seed=8)
    lens = torch.tensor([40, 9], dtype=torch.int32)

    def f(a, cache, n):
        out, lse = mla_decode(a, cache, n, head_dim_v=32, scale=0.3, return_lse=True)
        return out * 2.0 + 1.0, lse.exp()

    got = torch.compile(f, fullgraph=True)(q, kv, lens)
    want = f(q, kv, lens)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0].double(), _oracle(q, kv, lens, 32, scale=0.3)[0] * 2 + 1, atol=1e-5, rtol=1e-5)


# ---- GPU -----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("H", [128, 16])
@pytest.mark.parametrize("Tq", [1, 2])
def test_gpu_bf16_deepseek_v3_shape(H, Tq):
    """DeepSeek-V3 decode in bf16: one latent head of 512 + 64 channels, 4096 keys with ragged lengths, paged by
    64. The kernel's error against the float64 oracle is at most twice the bf16 reference path's."""
    B, Hk, Dv, Dr, T, page = 4, 1, 512, 64, 4096, 64
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Tq, Dv + Dr, generator=g).to(device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(B, Hk, T, Dv + Dr, generator=g).to(device="cuda", dtype=torch.bfloat16)
    # ragged: 4096, 1, 2620 and 777 keys (with Tq = 2, row 1's first query sees none)
    lens = torch.tensor([T, 1, T * 5 // 8 + 60, T * 3 // 16 + 9], dtype=torch.int32, device="cuda")
    scale = 192 ** -0.5  # the per-head scores' own scale: 128 nope + 64 rope channels
    pool, table = _paged(kv, page)
    out, lse = mla_decode(q, pool, lens, head_dim_v=Dv, scale=scale, block_table=table, return_lse=True)
    assert out.shape == (B, H, Tq, Dv) and out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    parts = [_oracle(q[b:b + 1], kv[b:b + 1], lens[b:b + 1], Dv, scale=scale) for b in range(B)]
    want = torch.cat([o for o, _ in parts])
    want_lse = torch.cat([lo for _, lo in parts])
    base = ref.attention_with_kvcache(q, kv, kv[..., :Dv], lens, scale=scale)
    err, base_err = max_abs_err(out, want), max_abs_err(base, want)
    assert err <= 2 * base_err + 1e-4, (err, base_err)
    seen = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    torch.testing.assert_close(lse.double()[seen], want_lse[seen], atol=1e-3, rtol=1e-4)
    assert (out[~seen] == 0).all()
