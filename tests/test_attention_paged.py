"""Paged KV caches in llmkern.attention_with_kvcache (block_table, as vLLM / FlashAttention page them).

A dense cache [B, Hk, Tmax, D] is cut into pages of a shuffled pool [num_pages, Hk, page_size, D]; the
paged call must give what the dense call gives, on the CPU paths and in the split-K decode kernel
(interpreter on CPU), with new tokens appended into the right slots, for page sizes below, equal to
and above the kernel's key tile, and for a token-major pool passed as a transposed view.
"""
import pytest
import torch

import llmkern
from llmkern.testing import triton_device

DEV = triton_device()
needs_triton = pytest.mark.skipif(DEV is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


def _paged(dense, page_size, extra_pages=3, seed=0):
    """(pool, block_table) holding `dense` [B, Hk, Tmax, D]: every row's pages at shuffled pool indices,
    plus unused pages of noise (a wrong page index reads garbage, not zeros)."""
    B, Hk, Tmax, D = dense.shape
    n = Tmax // page_size
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(B * n + extra_pages, generator=g)
    pool = torch.randn(B * n + extra_pages, Hk, page_size, D, generator=g).to(dense.dtype)
    table = order[:B * n].reshape(B, n).to(torch.int32)
    pages = dense.reshape(B, Hk, n, page_size, D).permute(0, 2, 1, 3, 4)  # [B, n, Hk, ps, D]
    pool[table.reshape(-1).long()] = pages.reshape(B * n, Hk, page_size, D)
    return pool, table


def _case(B=3, H=4, Hk=2, Tmax=64, D=16, Tq=1, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g).to(dtype)
    kc = torch.randn(B, Hk, Tmax, D, generator=g).to(dtype)
    vc = torch.randn(B, Hk, Tmax, D, generator=g).to(dtype)
    lens = torch.tensor([Tmax, 1, 37][:B], dtype=torch.int32)
    return q, kc, vc, lens


@pytest.mark.parametrize("backend", ["default", "reference", "triton"])
@pytest.mark.parametrize("page_size", [8, 32, 64])
@pytest.mark.parametrize("Tq,kw", [(1, {}), (3, dict(window=(9, None), softcap=5.0))])
def test_paged_equals_dense(monkeypatch, backend, page_size, Tq, kw):
    if backend != "default":
        if backend == "triton" and DEV is None:
            pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
        monkeypatch.setenv("LLMKERN_BACKEND", backend)
    q, kc, vc, lens = _case(Tq=Tq)
    want = llmkern.attention_with_kvcache(q, kc, vc, lens, **kw)
    pk, table = _paged(kc, page_size)
    pv, _ = _paged(vc, page_size)
    got = llmkern.attention_with_kvcache(q, pk, pv, lens, block_table=table, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["default", "triton"])
def test_appending_writes_the_pages(monkeypatch, backend):
    if backend == "triton":
        if DEV is None:
            pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    q, kc, vc, _ = _case(Tq=2)
    lens = torch.tensor([30, 0, 15], dtype=torch.int32)  # row 0's new tokens cross a page boundary (16)
    k_new, v_new = torch.randn(3, 2, 2, 16), torch.randn(3, 2, 2, 16)
    pk, table = _paged(kc, 16)
    pv, _ = _paged(vc, 16)
    got = llmkern.attention_with_kvcache(q, pk, pv, lens, k=k_new, v=v_new, block_table=table, return_lse=True)
    want = llmkern.attention_with_kvcache(q, kc, vc, lens, k=k_new, v=v_new, return_lse=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the pool now holds the dense cache (updated in place by the dense call) in every row's pages
    from llmkern.ops.attention import _gather_pages

    assert torch.equal(_gather_pages(pk, table), kc) and torch.equal(_gather_pages(pv, table), vc)


@needs_triton
def test_token_major_pool_as_a_view(monkeypatch):
    """FlashAttention's pool layout [num_pages, page_size, Hk, D], passed as .transpose(1, 2)."""
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    q, kc, vc, lens = _case()
    want = llmkern.attention_with_kvcache(q, kc, vc, lens)
    pk, table = _paged(kc, 16)
    pv, _ = _paged(vc, 16)
    pk_t, pv_t = pk.transpose(1, 2).contiguous(), pv.transpose(1, 2).contiguous()  # token-major storage
    got = llmkern.attention_with_kvcache(q, pk_t.transpose(1, 2), pv_t.transpose(1, 2), lens, block_table=table)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_triton
def test_paged_grid_slices(monkeypatch):
    """Batches beyond the grid limit run in slices; every slice reads the whole pool."""
    from llmkern.kernels import attention as A
    from llmkern.kernels.attention_decode import attention_decode

    q, kc, vc, lens = _case()
    pk, table = _paged(kc, 16)
    pv, _ = _paged(vc, 16)
    whole = attention_decode(q, pk, pv, lens, scale=0.25, block_table=table)
    monkeypatch.setattr(A, "MAX_GRID_YZ", 2)  # Hk = 2: one row per launch
    sliced = attention_decode(q, pk, pv, lens, scale=0.25, block_table=table)
    for a, b in zip(whole, sliced):
        assert torch.equal(a, b)


@needs_triton
def test_opcheck_paged(monkeypatch):
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    q, kc, vc, lens = _case()
    pk, table = _paged(kc, 16)
    pv, _ = _paged(vc, 16)
    torch.library.opcheck(torch.ops.llmkern.attention_decode.default,
                          (q, pk, pv, lens, table, 0.25, True, -1, -1, 0.0, 0))


@pytest.mark.parametrize("table,match", [
    (torch.zeros(3, 4, dtype=torch.int64), "block_table must be an int32"),
    (torch.zeros(2, 4, dtype=torch.int32), "block_table must be an int32"),
    (torch.zeros(3, dtype=torch.int32), "block_table must be an int32"),
    (torch.full((3, 4), 15, dtype=torch.int32), "page indices in 0..14"),
    (torch.full((3, 4), -1, dtype=torch.int32), "page indices in 0..14"),
])
def test_bad_block_tables_raise(table, match):
    q, kc, vc, lens = _case()
    pool = torch.randn(15, 2, 16, 16)
    with pytest.raises(ValueError, match=match):
        llmkern.attention_with_kvcache(q, pool, pool.clone(), lens, block_table=table)


def test_lengths_beyond_the_table_capacity_raise():
    q, kc, vc, _ = _case()
    pool = torch.randn(15, 2, 16, 16)
    table = torch.zeros(3, 2, dtype=torch.int32)  # 2 pages of 16 = 32 keys per row
    with pytest.raises(ValueError, match="cache_seqlens"):
        llmkern.attention_with_kvcache(q, pool, pool.clone(), torch.tensor([33, 1, 1], dtype=torch.int32),
                                       block_table=table)
    with pytest.raises(ValueError, match="cache_seqlens"):
        llmkern.attention_with_kvcache(q, pool, pool.clone(), torch.tensor([31, 1, 1], dtype=torch.int32),
                                       k=torch.randn(3, 2, 2, 16), v=torch.randn(3, 2, 2, 16), block_table=table)


@pytest.mark.parametrize("backend", ["default", "triton"])
@pytest.mark.parametrize("how", ["block_table", "cache_batch_idx"])
def test_unchecked_negative_pages_raise_not_overwrite_another_sequence(monkeypatch, backend, how):
    """The host-side range check runs on CPU tensors in eager mode only (on CUDA it would sync, under
    torch.compile it cannot read values). Unchecked, a -1 entry (an unallocated page) wrapped to the pool's
    last page as a Python index: the new k/v overwrote another sequence's cache and the CPU paths read it back
    as a finite answer. A negative entry now indexes out of range (a device-side assert on CUDA); the Triton
    append writes nothing through it, and the decode kernel reads the row as NaN."""
    if backend == "triton":
        if DEV is None:
            pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
        monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    import llmkern.ops.attention as ops_attention
    monkeypatch.setattr(ops_attention, "_checking_values", lambda: False)  # as on CUDA / under compile
    pool_k, pool_v = torch.full((3, 1, 4, 8), 7.0), torch.full((3, 1, 4, 8), 7.0)  # page 2: another sequence's
    q, k, v = torch.randn(1, 1, 1, 8), torch.ones(1, 1, 1, 8), torch.ones(1, 1, 1, 8)
    if how == "block_table":
        kw, lens = dict(block_table=torch.tensor([[0, -1]], dtype=torch.int32)), 4  # position 4: page entry -1
    else:
        kw, lens = dict(cache_batch_idx=torch.tensor([-1])), 0
    call = lambda: llmkern.attention_with_kvcache(q, pool_k, pool_v,  # noqa: E731
                                                  torch.tensor([lens], dtype=torch.int32), k=k, v=v, **kw)
    if backend == "triton":
        assert call().isnan().all()
    else:
        with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
            call()
    assert (pool_k[2] == 7.0).all() and (pool_v[2] == 7.0).all()


def test_compiled_paged_read_of_a_negative_page_raises():
    """Under torch.compile (no host-side check) the CPU path's dense copy of the pages read entry -1 as the
    pool's last page and returned a finite, wrong answer."""
    q, kc, vc, lens = _case(B=1, Tmax=32)
    pool = torch.randn(3, 2, 16, 16)
    table = torch.tensor([[0, -1]], dtype=torch.int32)
    f = torch.compile(llmkern.attention_with_kvcache, backend="eager", fullgraph=False)
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        f(q, pool, pool.clone(), torch.tensor([20], dtype=torch.int32), block_table=table)


def test_repeated_cache_batch_idx_with_new_tokens_raises():
    """Two batch rows appending into one cache row overwrote each other's new token (the last write won and
    both rows attended to it)."""
    q, kc, vc, _ = _case(B=2)
    k, v = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
    with pytest.raises(ValueError, match="cache_batch_idx names one cache row for two batch rows"):
        llmkern.attention_with_kvcache(q, kc, vc, torch.tensor([3, 3], dtype=torch.int32), k=k, v=v,
                                       cache_batch_idx=torch.tensor([1, 1]))
    llmkern.attention_with_kvcache(q, kc, vc, torch.tensor([3, 3], dtype=torch.int32),
                                   cache_batch_idx=torch.tensor([1, 1]))  # reading one row twice is fine


@pytest.mark.gpu
def test_gpu_paged_equals_dense():
    q, kc, vc, lens = (t.cuda() for t in _case(B=3, H=32, Hk=8, Tmax=4096, D=128, Tq=1, dtype=torch.bfloat16))
    lens = torch.tensor([4096, 1, 3000], dtype=torch.int32, device="cuda")
    want = llmkern.attention_with_kvcache(q, kc, vc, lens)
    pk, table = _paged(kc.cpu(), 256)
    pv, _ = _paged(vc.cpu(), 256)
    got = llmkern.attention_with_kvcache(q, pk.cuda(), pv.cuda(), lens, block_table=table.cuda())
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@needs_triton
@pytest.mark.parametrize("paged", [False, True])
def test_decode_kernel_bad_lengths_and_pages_give_nan_rows_not_wild_reads(paged):
    """The host checks cache_seqlens only on the CPU (a check on CUDA would sync): the kernel itself reads
    nothing past a row's capacity and turns a row whose length lies outside 0..capacity (or whose block
    table names a page outside the pool) into NaN, leaving the other rows exact. Before, a too-long row
    read the next row's keys (or past the allocation) and returned finite numbers."""
    from llmkern.kernels.attention_decode import attention_decode

    q, kc, vc, lens = (t.to(DEV) for t in _case(B=4, Tmax=64))
    lens = torch.tensor([64, 70, -3, 37], dtype=torch.int32, device=DEV)  # rows 1 and 2 are bad
    kw = dict(scale=0.25, num_splits=3)
    if paged:
        pool_k, table = _paged(kc.cpu(), 16)
        pool_v, _ = _paged(vc.cpu(), 16)
        pool_k, pool_v, table = pool_k.to(DEV), pool_v.to(DEV), table.to(DEV)
        table[3, 1] = pool_k.shape[0] + 7  # row 3 (37 keys: pages 0..2) names a page outside the pool
        out, lse = attention_decode(q, pool_k, pool_v, lens, block_table=table, **kw)
        good = [0]
    else:
        out, lse = attention_decode(q, kc, vc, lens, **kw)
        good = [0, 3]
    bad = [b for b in range(4) if b not in good]
    assert torch.isnan(out[bad]).all() and torch.isnan(lse[bad]).all()
    ok = torch.tensor(good)
    want = llmkern.attention_with_kvcache(q[ok], kc[ok], vc[ok], lens[ok].clamp(0, 64), scale=0.25)
    torch.testing.assert_close(out[ok], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["default", "reference", "triton"])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("Tq,kw", [(1, {}), (3, dict(window=(5, None), softcap=5.0))])
def test_decode_key_padding_mask(monkeypatch, backend, paged, Tq, kw):
    """key_padding_mask hides cache slots (a left-padded prompt's pads): the same as attending to each row's
    unpadded keys alone; a query that sees no key returns zeros."""
    if backend != "default":
        if backend == "triton" and DEV is None:
            pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
        monkeypatch.setenv("LLMKERN_BACKEND", backend)
    q, kc, vc, lens = _case(Tq=Tq)
    B, Tmax = kc.shape[0], kc.shape[2]
    pads = torch.tensor([5, 0, 30])  # row 2: 30 pads before its 7 tokens
    j = torch.arange(Tmax)
    kpm = j[None, :] >= pads[:, None]
    kpm[1] = False  # row 1 sees nothing at all
    k_in, v_in, table = kc, vc, None
    if paged:
        k_in, table = _paged(kc, 16)
        v_in, _ = _paged(vc, 16)
    # (the default CPU path without softcap and LSE is SDPA's kernel: asked for no LSE there)
    sdpa = backend == "default" and not kw
    res = llmkern.attention_with_kvcache(q, k_in, v_in, lens, key_padding_mask=kpm, block_table=table,
                                         return_lse=not sdpa, **kw)
    out, lse = (res, None) if sdpa else res
    for b in range(B):
        p, n = int(pads[b]), int(lens[b])
        if b == 1:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            assert lse is None or torch.isneginf(lse[b]).all()
            continue
        # the row alone, its pads dropped: same relative positions, so the same window
        want = llmkern.attention_with_kvcache(q[b:b + 1], kc[b:b + 1, :, p:], vc[b:b + 1, :, p:],
                                              torch.tensor([n - p], dtype=torch.int32), **kw)
        torch.testing.assert_close(out[b:b + 1], want, atol=1e-5, rtol=1e-5)


def test_decode_key_padding_mask_errors():
    q, kc, vc, lens = _case()
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor"):
        llmkern.attention_with_kvcache(q, kc, vc, lens, key_padding_mask=torch.ones(3, 64))
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor"):
        llmkern.attention_with_kvcache(q, kc, vc, lens, key_padding_mask=torch.ones(3, 63, dtype=torch.bool))


# ---- appending new k / v: one Triton launch (kernels.attention_decode.append_kv) ---------------------------

def _append_both_ways(caches, lens, k, v, **kw):
    """The caches after ops.attention._append on the triton backend (the kernel) and on the CPU indexing ops."""
    import llmkern.ops.attention as ops_attention

    table = kw.get("block_table")
    if "cache_batch_idx" in kw:
        table = kw["cache_batch_idx"].to(torch.int32).view(-1, 1)
    out = {}
    for backend in ("triton", "reference"):
        kc, vc = (c.clone() for c in caches)
        kc, vc = (c.transpose(1, 2) if kw.get("token_major") else c for c in (kc, vc))
        ops_attention._append(kc, vc, table, lens, k, v, backend)
        out[backend] = (kc, vc)
    return out


@needs_triton
@pytest.mark.parametrize("layout", ["dense", "paged", "token_major_pool", "cache_batch_idx"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_append_kernel_writes_what_the_indexing_ops_write(layout, dtype):
    """Raw-bit copies: bfloat16 and float8 caches (which the interpreter cannot compute in) copy exactly; Dv != D,
    two new tokens, a strided k, page size 4 (a row's new tokens straddle pages)."""
    B, Hk, t, D, Dv = 3, 2, 2, 16, 8
    lens = torch.tensor([0, 5, 9], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    k = torch.randn(B, t, Hk, D, generator=g).to(dtype).transpose(1, 2)  # strided
    v = torch.randn(B, Hk, t, Dv, generator=g).to(dtype)
    kw = {}
    if layout == "dense":
        caches = (torch.randn(B, Hk, 12, D, generator=g).to(dtype), torch.randn(B, Hk, 12, Dv, generator=g).to(dtype))
    elif layout == "cache_batch_idx":
        caches = (torch.randn(5, Hk, 12, D, generator=g).to(dtype), torch.randn(5, Hk, 12, Dv, generator=g).to(dtype))
        kw["cache_batch_idx"] = torch.tensor([4, 0, 2])
    else:
        shape = (9, 4, Hk) if layout == "token_major_pool" else (9, Hk, 4)
        caches = (torch.randn(*shape, D, generator=g).to(dtype), torch.randn(*shape, Dv, generator=g).to(dtype))
        kw["block_table"] = torch.tensor([[8, 1, 3], [0, 2, 7], [6, 5, 4]], dtype=torch.int32)
        kw["token_major"] = layout == "token_major_pool"
    out = _append_both_ways(caches, lens, k, v, **kw)
    for a, b, before in zip(out["triton"], out["reference"], caches):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        assert not torch.equal(a.contiguous().view(torch.uint8).sum(), before.view(torch.uint8).sum())  # written


@needs_triton
def test_append_is_one_launch_on_the_kernel_backend(monkeypatch):
    """attention_with_kvcache on the Triton backend appends through append_kv (not the indexing ops: 5 launches per
    layer and step for a dense cache, 10-12 for a paged one) and attends to what it wrote."""
    import llmkern.kernels.attention_decode as AD
    import llmkern.ops.attention as ops_attention

    monkeypatch.setenv("LLMKERN_BACKEND", "triton")
    calls = []
    real = AD.append_kv
    monkeypatch.setattr(AD, "append_kv", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(ops_attention, "_append_paged", lambda *a: pytest.fail("the indexing ops ran"))
    q, kc, vc, lens = _case(Tmax=64)
    lens = torch.tensor([60, 1, 37], dtype=torch.int32)
    k, v = torch.randn(3, 2, 2, 16), torch.randn(3, 2, 2, 16)
    pool_k, table = _paged(kc, 16)
    pool_v, _ = _paged(vc, 16)
    got = llmkern.attention_with_kvcache(q, pool_k, pool_v, lens, k=k, v=v, block_table=table)
    monkeypatch.setenv("LLMKERN_BACKEND", "reference")
    want = llmkern.attention_with_kvcache(q, kc, vc, lens, k=k, v=v)
    assert calls == [1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_gpu_append_kernel_matches_the_indexing_ops(dtype):
    """On CUDA: a paged bf16 / float8 pool of 64 pages, page size 16, 8 rows appending 3 tokens each."""
    import llmkern.ops.attention as ops_attention

    B, Hk, t, D, n = 8, 4, 3, 128, 8
    pool = torch.randn(64, Hk, 16, D, device="cuda").to(dtype)
    table = torch.randperm(64, device="cuda")[:B * n].view(B, n).to(torch.int32)
    lens = torch.randint(0, n * 16 - t, (B,), device="cuda", dtype=torch.int32)
    k = torch.randn(B, Hk, t, D, device="cuda").to(dtype)
    got, want = pool.clone(), pool.clone()
    ops_attention._append(got, got, table, lens, k, k, "triton")
    ops_attention._append(want, want, table, lens, k, k, "reference")
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
