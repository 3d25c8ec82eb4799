"""QLoRA's 4-bit NF4 base weight: llmkern.nf4_quantize / nf4_dequantize / NF4Weight, and lora_linear /
lora_linear_multi reading an NF4Weight.

- the reference quantization against bitsandbytes (same bytes, same absmax; `from_bnb` dequantizes to
  what bitsandbytes does, double quantization included);
- the round trip within the NF4 grid error;
- the Triton kernels (under TRITON_INTERPRET=1 here, conftest) against the reference: the standalone
  dequantization bit for bit, the LoRA op forward and backward against the reference LoRA on the
  dequantized weight, through both GEMM paths (W dequantized in the main loop for M <=
  LLMKERN_NF4_FUSED_MAX_M, else into a temporary first);
- bad input, and that the backward keeps only the 4-bit codes, never a dense W.
bf16, the realistic shapes and torch.compile are @pytest.mark.gpu.
"""
import contextlib

import pytest
import torch

import llmkern
from llmkern import NF4Weight
from llmkern import reference as ref
from llmkern.kernels import nf4 as KN
from llmkern.reference import nf4 as RN
from llmkern.testing import assert_close, interpreter_dtypes, triton_device

pytestmark = pytest.mark.usefixtures("one_thread")

DEV = triton_device()
needs_triton = pytest.mark.skipif(DEV is None, reason="no CUDA and no TRITON_INTERPRET")
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=3e-2, rtol=3e-2),
       torch.bfloat16: dict(atol=8e-2, rtol=8e-2)}
ENV_MAX_M = "LLMKERN_NF4_FUSED_MAX_M"
# the two GEMM paths: W dequantized tile by tile in the main loop (every M <= a large bound), or into a
# temporary first (every M > 0)
PATHS = {"fused": "1000000", "dequantize_first": "0"}


# ---- helpers ------------------------------------------------------------------------------------

@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")


@pytest.fixture(params=sorted(PATHS))
def gemm_path(request, monkeypatch):
    monkeypatch.setenv(ENV_MAX_M, PATHS[request.param])
    return request.param


@pytest.fixture
def dequant_calls(monkeypatch):
    """Records the dtype of every standalone dequantization pass (llmkern.kernels.nf4.dequantize): the
    dequantize-first GEMM path runs one per forward and one per backward, the fused path none."""
    calls = []
    real = KN.dequantize

    def spy(op, dtype, wrap=None):
        calls.append(dtype)
        return real(op, dtype, wrap)

    monkeypatch.setattr(KN, "dequantize", spy)
    return calls


def _fuses(K, blocksize):
    """Whether the GEMM can dequantize W in its main loop: only rows of whole quantization blocks
    (in_features a multiple of the blocksize, as in LLM layers; llmkern.kernels.nf4.gemm_weight); other
    shapes always take the temporary."""
    return K % blocksize == 0


def _expected_passes(path, K, blocksize, n_calls=2):
    """Standalone dequantization passes of one forward + backward (n_calls GEMMs that read W)."""
    return 0 if path == "fused" and _fuses(K, blocksize) else n_calls


def _weight(N, K, dtype=torch.float32, device="cpu"):
    return (torch.randn(N, K, device=device) * K ** -0.5).to(dtype)


def _lora_inputs(lead, K, N, r, dtype, n=None, device=DEV):
    """x [*lead, K], bias [N], A [(n,) r, K], B [(n,) N, r] in `dtype`, as leaves requiring grad."""
    g = lambda *s, sc=1.0: (torch.randn(*s, device=device) * sc).to(dtype).requires_grad_()  # noqa: E731
    a = () if n is None else (n,)
    return g(*lead, K), g(N), g(*a, r, K, sc=K ** -0.5), g(*a, N, r, sc=r ** -0.5)


def _f64_leaves(*ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


def _grads(*ts):
    return [None if t is None else t.grad for t in ts]


def _check(got, want, dtype, names):
    for name, g, w in zip(names, got, want):
        assert g is not None, f"no gradient for {name}"
        assert_close(g, w, msg=name, **TOL[dtype])


@contextlib.contextmanager
def _eager_bnb():
    """bitsandbytes wraps its CPU fallbacks in torch.compile (about 2.5 s per new shape here): run them
    eagerly; the arithmetic is the same."""
    with torch._dynamo.config.patch(disable=True):
        yield


def _dense(qw, dtype=None):
    """qw's dense weight in float64 through the reference dequantization in `dtype` (default qw's): what
    the kernels multiply, dequantized in fp32 and cast to x's dtype. Plain PyTorch, so it adds no Triton
    pass to `dequant_calls`."""
    w = RN.nf4_dequantize(qw.packed, qw.scales(), qw.shape, qw.blocksize, dtype or qw.dtype)
    return w.double()


def _grid_halfgap():
    lv = torch.tensor(RN.NF4_LEVELS)
    return (lv[1:] - lv[:-1]).max().item() / 2


# ---- 1. the reference quantization against bitsandbytes -------------------------------------------

@pytest.mark.parametrize("shape", [(33, 70), (21, 45), (1, 1), (3, 5), (64, 128), (7, 129)])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_same_bytes_as_bitsandbytes(shape, blocksize, dtype):
    F = pytest.importorskip("bitsandbytes.functional")
    W = torch.randn(*shape).to(dtype)
    with _eager_bnb():
        packed, state = F.quantize_4bit(W, blocksize=blocksize, quant_type="nf4")
    qw = llmkern.nf4_quantize(W, blocksize)
    assert qw.packed.dtype == torch.uint8 and qw.packed.numel() == (W.numel() + 1) // 2
    assert torch.equal(qw.packed, packed.reshape(-1)), "packed codes differ from bitsandbytes'"
    assert torch.equal(qw.absmax, state.absmax.reshape(-1)), "absmax differs from bitsandbytes'"


def test_quantize_ties_and_levels_like_bitsandbytes():
    """Values exactly on the midpoint between two levels (and one ulp either side), and the levels
    themselves, get bitsandbytes' codes (the block's absmax is 1, so w / absmax = w)."""
    F = pytest.importorskip("bitsandbytes.functional")
    lv = RN.nf4_levels()
    mid = (lv[1:] + lv[:-1]) / 2
    vals = torch.cat([mid, torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0)), lv])
    W = torch.cat([torch.ones(1), vals, torch.zeros(128 - 1 - vals.numel())]).view(2, 64)
    with _eager_bnb():
        packed, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
    qw = llmkern.nf4_quantize(W, 64)
    assert torch.equal(qw.packed, packed.reshape(-1))
    # the levels quantize to themselves
    codes = RN.nf4_unpack(qw.packed, 128)
    assert torch.equal(codes[1 + 3 * 15:1 + 3 * 15 + 16], torch.arange(16, dtype=torch.uint8))
    # midpoints scaled by arbitrary block maxima: w / absmax and w · (1 / absmax) differ by an ulp now and then,
    # which decides a tie; bitsandbytes multiplies by the reciprocal, and so does nf4_quantize
    g = torch.Generator().manual_seed(0)
    am = torch.rand(400, generator=g) * 2 + 0.1
    W = mid[torch.randint(0, 15, (400, 64), generator=g)] * am[:, None]
    W[:, 0] = am
    with _eager_bnb():
        packed, _ = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
    assert torch.equal(llmkern.nf4_quantize(W, 64).packed, packed.reshape(-1))


def _bnb_param(W, blocksize, compress_statistics, quant_type="nf4", linear=False):
    bnb = pytest.importorskip("bitsandbytes")
    with _eager_bnb():
        if linear:
            N, K = W.shape
            layer = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=W.dtype, compress_statistics=compress_statistics,
                                      quant_type=quant_type, quant_storage=torch.uint8)
            layer.weight = bnb.nn.Params4bit(W, requires_grad=False, blocksize=blocksize,
                                             compress_statistics=compress_statistics, quant_type=quant_type)
            return layer.to("cpu").weight  # moving it quantizes it
        return bnb.nn.Params4bit(W, requires_grad=False, blocksize=blocksize, compress_statistics=compress_statistics,
                                 quant_type=quant_type).to("cpu")


# bitsandbytes 0.50's native CPU dequantization reads a block as lying within one row; where blocks span
# rows (K not a multiple of the blocksize, K even) it returns wrong values, so those shapes are compared
# with llmkern's own quantization (the bytes are bitsandbytes', test above) instead. Odd K takes
# bitsandbytes' generic path, which handles them.
@pytest.mark.parametrize("compress_statistics", [False, True], ids=["plain", "double_quant"])
@pytest.mark.parametrize("shape,blocksize,dtype,linear", [
    ((160, 256), 64, torch.float32, False),   # 640 blocks: 3 groups of double-quantization scales
    ((48, 128), 32, torch.float16, True),
    ((40, 128), 128, torch.bfloat16, False),
    ((33, 45), 64, torch.float32, True),      # odd K, odd numel: blocks span rows
])
def test_from_bnb_matches_bitsandbytes_dequantize(compress_statistics, shape, blocksize, dtype, linear):
    F = pytest.importorskip("bitsandbytes.functional")
    W = _weight(*shape, dtype=dtype)
    param = _bnb_param(W, blocksize, compress_statistics, linear=linear)
    assert param.quant_state.nested == compress_statistics
    qw = NF4Weight.from_bnb(param)
    assert qw.shape == shape and qw.blocksize == blocksize and qw.dtype == dtype
    assert qw.packed.data_ptr() == param.data.data_ptr(), "the codes should be shared, not copied"
    with _eager_bnb():
        want = F.dequantize_4bit(param.data, param.quant_state)
    got = qw.dequantize()
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)
    assert torch.equal(llmkern.nf4_dequantize(qw, torch.float32), qw.dequantize(torch.float32))
    if not compress_statistics:  # same codes and scales as llmkern's own quantization
        own = llmkern.nf4_quantize(W, blocksize)
        assert torch.equal(own.packed, qw.packed) and torch.equal(own.absmax, qw.absmax)
    else:  # the 8-bit absmax is kept as it is (shared), decoded in the kernels
        assert qw.nested is not None and qw.absmax.dtype == torch.uint8
        assert qw.absmax.data_ptr() == param.quant_state.absmax.data_ptr()


def test_double_quant_map_and_codes_like_bitsandbytes():
    """The dynamic map is bitsandbytes' bit for bit; the absmax codes are the nearest entries, which
    bitsandbytes' own (approximate) search matches except for a few values near a midpoint."""
    F = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(RN.dynamic_map(), F.create_dynamic_map(signed=True).float())
    W = _weight(512, 512)
    with _eager_bnb():
        _, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
    own = llmkern.nf4_quantize(W, 64, double_quant=True)
    code_map, absmax2, offset = own.nested
    assert torch.allclose(offset, state.offset) and torch.equal(absmax2, state.state2.absmax)
    same = (own.absmax == state.absmax.flatten()).float().mean().item()
    assert same > 0.99, same
    # and each of ours is the nearest: its decoding error is never above bitsandbytes'
    exact = RN.nf4_quantize(W, 64)[1]
    ours = (own.scales() - exact).abs()
    theirs = (RN.dequantize_absmax(state.absmax, code_map, absmax2, offset) - exact).abs()
    assert (ours <= theirs + 1e-9).all()


@pytest.mark.parametrize("shape", [(300, 256), (33, 70), (7, 9)])
def test_double_quant_round_trip_and_size(shape):
    W = _weight(*shape)
    plain, dq = llmkern.nf4_quantize(W, 64), llmkern.nf4_quantize(W, 64, double_quant=True)
    assert dq.absmax.dtype == torch.uint8 and "double_quant=True" in repr(dq)
    # the decoded scales are within one map step of the exact ones (relative to their group's max)
    code_map, absmax2, _ = dq.nested
    step = (code_map[1:] - code_map[:-1]).max()
    err = (dq.scales() - plain.absmax).abs()
    assert (err <= step * absmax2.repeat_interleave(RN.BLOCKSIZE2)[:err.numel()] / 2 + 1e-7).all()
    # and the weight error grows by little (the scales lose ~2-3 significant digits, not the codes)
    e_plain = (plain.dequantize() - W).abs().mean()
    e_dq = (dq.dequantize() - W).abs().mean()
    assert e_dq <= e_plain * 1.05
    # 8-bit scales: 4 + 8/64 + 32/(64·256) = 4.127 bits per weight instead of 4.5 at blocksize 64, plus the
    # fixed map and offset (257 floats)
    nb, ng = plain.absmax.numel(), absmax2.numel()
    assert plain.nbytes == plain.packed.numel() + 4 * nb
    assert dq.nbytes == dq.packed.numel() + nb + 4 * (ng + 257)
    moved = dq.to("cpu", torch.float16)
    assert moved.dtype == torch.float16 and torch.equal(moved.dequantize(torch.float32), dq.dequantize())


def test_gemm_refuses_rows_of_partial_blocks():
    """The in-loop dequantization reads whole blocks per row; the public ops route other shapes through the
    dequantize-first path, and the launcher itself refuses them rather than reading wrong scales."""
    from llmkern.kernels import lora as KL

    qw = llmkern.nf4_quantize(_weight(8, 70), 64)
    x = torch.randn(3, 70)
    with pytest.raises(ValueError, match="multiple of the blocksize"):
        KL.gemm(x, qw.operand(), None, x.new_zeros(3, 1), x.new_zeros(1, 8, 1))


def test_double_quant_errors():
    packed, absmax = _parts()
    codes, code_map, absmax2, offset = RN.quantize_absmax(absmax)
    assert NF4Weight(packed, codes, (4, 10), 32, nested=(code_map, absmax2, offset)).nested is not None
    with pytest.raises(ValueError, match="absmax must be uint8"):
        NF4Weight(packed, absmax, (4, 10), 32, nested=(code_map, absmax2, offset))
    with pytest.raises(ValueError, match="nested"):
        NF4Weight(packed, codes, (4, 10), 32, nested=(code_map[:-1], absmax2, offset))
    with pytest.raises(ValueError, match="nested"):
        NF4Weight(packed, codes, (4, 10), 32, nested=(code_map, absmax2))
    # the kernels' layout as one tensor: used as it is (in-place writes reach the kernels), views as `nested`
    state2 = torch.cat([code_map, offset.reshape(1), absmax2])
    qw = NF4Weight(packed, codes, (4, 10), 32, nested=state2)
    assert qw.state2 is state2 and qw.nested[0].data_ptr() == state2.data_ptr()
    assert torch.equal(qw.scales(), NF4Weight(packed, codes, (4, 10), 32, nested=(code_map, absmax2, offset)).scales())
    with pytest.raises(ValueError, match="nested"):
        NF4Weight(packed, codes, (4, 10), 32, nested=state2[:-1])
    with pytest.raises(ValueError, match="nested as a tensor must be 1-D float32"):
        NF4Weight(packed, codes, (4, 10), 32, nested=state2.double())


@needs_triton
@pytest.mark.parametrize("dtype", interpreter_dtypes())
def test_double_quant_triton_kernels(triton_backend, gemm_path, dtype):
    """The kernels decode the 8-bit absmax (dequantize pass, LoRA GEMM, nf4_linear) as the reference does."""
    M, K, N, r = 9, 128, 40, 4
    qw = llmkern.nf4_quantize(_weight(300, 256), 64, double_quant=True).to(DEV)
    want = RN.nf4_dequantize(qw.packed, qw.scales(), qw.shape, 64, dtype)
    assert torch.equal(llmkern.nf4_dequantize(qw, dtype), want)
    qw = llmkern.nf4_quantize(_weight(N, K), 32, double_quant=True).to(DEV)
    x, b, A, B = _lora_inputs((M,), K, N, r, dtype)
    y = llmkern.lora_linear(x, qw, b, A, B, 0.5)
    y.float().square().sum().backward()
    xd, bd, Ad, Bd = _f64_leaves(x, b, A, B)
    ref.lora_linear(xd, _dense(qw), bd, Ad, Bd, 0.5).square().sum().backward()
    _check(_grads(x, A, B), _grads(xd, Ad, Bd), dtype, ("dx", "dA", "dB"))
    _check_nf4_linear(qw, x.detach().requires_grad_(), b.detach().requires_grad_(), dtype)


@pytest.mark.parametrize("linear", [False, True])
def test_from_bnb_refuses_fp4(linear):
    fp4 = _bnb_param(_weight(16, 64), 64, False, quant_type="fp4", linear=linear)
    with pytest.raises(ValueError, match="only NF4 weights.*quant_type='fp4'"):
        NF4Weight.from_bnb(fp4)


def test_from_bnb_refuses_a_cpu_repacked_weight():
    """bitsandbytes repacks a CPU Linear4bit's bytes for its own kernel at the first eval forward (its flag
    packing_format_for_cpu): from_bnb misread them as a dtype error of absmax."""
    w = _bnb_param(_weight(16, 64), 64, False)
    w.quant_state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="repacked"):
        NF4Weight.from_bnb(w)


def test_from_bnb_refuses_a_plain_tensor():
    with pytest.raises(ValueError, match="weight must be a bitsandbytes Params4bit"):
        NF4Weight.from_bnb(_weight(16, 64))


# ---- 2. round trip ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,blocksize", [((33, 70), 64), ((21, 45), 32), ((5, 7), 128), ((16, 256), 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_within_grid_error(shape, blocksize, dtype):
    W = (torch.randn(*shape) * torch.logspace(-3, 1, shape[1])).to(dtype)  # scales vary across blocks
    qw = llmkern.nf4_quantize(W, blocksize)
    n = W.numel()
    pad = -n % blocksize
    w = torch.nn.functional.pad(W.reshape(-1).double(), (0, pad)).view(-1, blocksize)  # [blocks, blocksize]
    got = torch.nn.functional.pad(llmkern.nf4_dequantize(qw, torch.float32).reshape(-1).double(), (0, pad))
    got = got.view(-1, blocksize)
    absmax = w.abs().amax(1)
    assert torch.equal(qw.absmax, absmax.float())
    scale = absmax[:, None]
    err = (got - w).abs()
    assert (err <= _grid_halfgap() * scale * (1 + 1e-6)).all(), f"max error / absmax {(err / scale).max().item()}"
    # stronger: each element took its nearest level (up to the fp32 rounding of w / absmax)
    levels = torch.tensor(RN.NF4_LEVELS, dtype=torch.float64)
    nearest = ((w / scale)[..., None] - levels).abs().amin(-1) * scale
    assert (err <= nearest + 1e-6 * scale).all()
    # the largest element of each block comes back exactly (level +-1 times absmax)
    i = w.abs().argmax(1, keepdim=True)
    assert torch.equal(got.gather(1, i), w.gather(1, i))


def test_zero_blocks_dequantize_to_zeros():
    W = torch.randn(6, 64)
    W[2] = 0.0  # one whole block of 64
    W[4, :32] = 0.0  # half a block: the other half keeps it non-zero
    qw = llmkern.nf4_quantize(W, 64)
    assert qw.absmax[2] == 0 and qw.absmax[4] > 0
    got = qw.dequantize()
    assert torch.isfinite(got).all()
    assert torch.equal(got[2], torch.zeros(64))
    assert torch.equal(got[4, :32], torch.zeros(32))
    zeros = llmkern.nf4_quantize(torch.zeros(3, 5, dtype=torch.float16), 32)
    assert torch.equal(zeros.dequantize(), torch.zeros(3, 5, dtype=torch.float16))


def test_extreme_block_scales_quantize_finitely():
    """Blocks with absmax below ~2.9e-39 (1 / absmax overflows float32) got sign-only codes (every element ±absmax,
    zeros +absmax); scales near float32's top overflowed the double-quantization offset (their float32 mean) to
    inf: the dequantized weight was NaN / inf."""
    tiny = torch.tensor([[3e-40, 1e-40, -5e-41, 0.0, 2e-41, -3e-40, 0.0, 1.5e-40]])
    got = llmkern.nf4_quantize(tiny, 8).dequantize().double()[0]
    tiny = tiny[0]
    levels = RN.nf4_levels(torch.device("cpu")).double()
    amax = tiny.double().abs().max()
    expect = levels[(tiny.double()[:, None] / amax - levels[None]).abs().argmin(1)] * amax
    torch.testing.assert_close(got, expect, rtol=1e-3, atol=0)  # (subnormal products: fewer digits)
    big = torch.randn(64, 64)
    big = big / big.abs().amax(1, keepdim=True) * 3e38
    qw = llmkern.nf4_quantize(big, 64, double_quant=True)
    back = qw.dequantize()
    assert torch.isfinite(back).all()
    plain = llmkern.nf4_quantize(big, 64).dequantize()
    torch.testing.assert_close(back, plain, rtol=0.02, atol=0)  # (the 8-bit scales' error only)


def test_dequantize_dtypes():
    W = _weight(9, 40, torch.float16)
    qw = llmkern.nf4_quantize(W, 32)
    assert qw.dtype == torch.float16 and qw.dequantize().dtype == torch.float16  # default: W's dtype
    d32 = llmkern.nf4_dequantize(qw, torch.float32)
    assert d32.dtype == torch.float32 and d32.shape == (9, 40)
    for dt in (torch.float16, torch.bfloat16):
        assert torch.equal(llmkern.nf4_dequantize(qw, dt), d32.to(dt))  # computed in fp32, then rounded
    assert qw.to(dtype=torch.bfloat16).dequantize().dtype == torch.bfloat16
    assert llmkern.nf4_quantize(W.float()).dequantize().dtype == torch.float32
    # 0.5 byte per element + 4 bytes per block
    assert qw.nbytes == (9 * 40 + 1) // 2 + 4 * -(-9 * 40 // 32)


# ---- 3. the Triton dequantization kernel -----------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("shape,blocksize", [((33, 45), 32), ((41, 70), 64), ((3, 5), 128), ((1, 1), 64),
                                             ((5, 7), 2), ((48, 50), 16)])  # 2400 elements: several programs
@pytest.mark.parametrize("dtype", interpreter_dtypes())
def test_triton_dequantize_is_bit_exact(triton_backend, dequant_calls, shape, blocksize, dtype):
    W = _weight(*shape, device=DEV) * 3
    qw = llmkern.nf4_quantize(W, blocksize)
    got = llmkern.nf4_dequantize(qw, dtype)
    assert dequant_calls == [dtype], "the Triton kernel did not run"
    want = RN.nf4_dequantize(qw.packed, qw.absmax, qw.shape, blocksize, dtype)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, want)


# ---- 4. lora_linear / lora_linear_multi with an NF4 weight -----------------------------------------

def _run_lora(qw, x, b, A, B, s, p, seed, dy=None):
    """Forward + backward through llmkern and through the float64 reference on the dequantized W."""
    y = llmkern.lora_linear(x, qw, b, A, B, s, p, seed=seed)
    dy = torch.randn_like(y) if dy is None else dy
    y.backward(dy)
    xd, bd, Ad, Bd = _f64_leaves(x, b, A, B)
    yr = ref.lora_linear(xd, _dense(qw, x.dtype), bd, Ad, Bd, s, p, seed=seed)
    yr.backward(dy.double())
    return y, yr, _grads(x, b, A, B), _grads(xd, bd, Ad, Bd)


@needs_triton
@pytest.mark.parametrize("dtype", interpreter_dtypes())
@pytest.mark.parametrize("M,K,N,r,blocksize,p", [
    (37, 64, 33, 5, 32, 0.0),     # N not a multiple of the tiles; two quantization blocks per row
    (19, 128, 50, 8, 128, 0.25),  # a quantization block wider than the interpreter's BLOCK_K (32)
    (21, 96, 45, 3, 16, 0.5),     # several quantization blocks per BLOCK_K; K not a multiple of BLOCK_K
    (19, 45, 50, 8, 32, 0.25),    # odd K: blocks span rows
    (21, 70, 33, 3, 64, 0.5),     # even K, not a multiple of the blocksize
    (13, 45, 33, 2, 64, 0.0),     # odd N·K: a padded last nibble
    (1, 64, 40, 4, 64, 0.0),      # one row (decoding)
])
def test_lora_linear_nf4_matches_reference(triton_backend, gemm_path, dequant_calls, dtype, M, K, N, r, blocksize, p):
    qw = llmkern.nf4_quantize(_weight(N, K, device=DEV), blocksize)
    x, b, A, B = _lora_inputs((M,), K, N, r, dtype)
    y, yr, got, want = _run_lora(qw, x, b, A, B, 1.7, p, seed=1234)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close(y, yr, msg="y", **TOL[dtype])
    _check(got, want, dtype, ("dx", "db", "dA", "dB"))
    assert dequant_calls == [dtype] * _expected_passes(gemm_path, K, blocksize)


@needs_triton
@pytest.mark.parametrize("K", [64, 45])
def test_lora_linear_nf4_leading_dims_and_expanded_grad(triton_backend, gemm_path, dequant_calls, K):
    """x [2, 9, K]; .sum().backward() feeds a stride-0 gradient; dropout with a fixed seed."""
    N, r = 33, 4
    qw = llmkern.nf4_quantize(_weight(N, K, device=DEV), 32)
    x, b, A, B = _lora_inputs((2, 9), K, N, r, torch.float32)
    y = llmkern.lora_linear(x, qw, b, A, B, 0.5, 0.2, seed=11)
    assert y.shape == (2, 9, N)
    y.sum().backward()
    xd, bd, Ad, Bd = _f64_leaves(x, b, A, B)
    ref.lora_linear(xd, _dense(qw), bd, Ad, Bd, 0.5, 0.2, seed=11).sum().backward()
    _check(_grads(x, b, A, B), _grads(xd, bd, Ad, Bd), torch.float32, ("dx", "db", "dA", "dB"))
    assert dequant_calls == [torch.float32] * _expected_passes(gemm_path, K, 32)


@needs_triton
def test_lora_linear_nf4_dropout_mask_is_the_references(triton_backend, gemm_path):
    """W = 0 (all-zero blocks), B = I: y is exactly dropout(x) Aᵀ with the reference mask for the seed;
    another seed gives another mask, the same seed the same output."""
    M, K, r, p = 24, 64, 16, 0.4
    qw = llmkern.nf4_quantize(torch.zeros(r, K, device=DEV), 32)
    x = torch.randn(M, K, device=DEV)
    A, B = torch.eye(r, K, device=DEV), torch.eye(r, device=DEV)
    y = llmkern.lora_linear(x, qw, None, A, B, 1.0, p, seed=7)
    keep = ref.dropout_keep_mask(M, K, p, 7, device=DEV)
    torch.testing.assert_close(y, torch.where(keep, x / (1 - p), torch.zeros_like(x))[:, :r])
    assert torch.equal(llmkern.lora_linear(x, qw, None, A, B, 1.0, p, seed=7), y)
    assert not torch.equal(llmkern.lora_linear(x, qw, None, A, B, 1.0, p, seed=8), y)


@needs_triton
@pytest.mark.parametrize("dtype", interpreter_dtypes())
@pytest.mark.parametrize("K", [64, 45])
def test_lora_linear_multi_nf4_matches_reference(triton_backend, gemm_path, dequant_calls, dtype, K):
    M, N, r, n = 45, 28, 8, 3
    qw = llmkern.nf4_quantize(_weight(N, K, device=DEV), 32)
    x, b, A, B = _lora_inputs((M,), K, N, r, dtype, n=n)
    ids = torch.randint(-1, n, (M,), device=DEV)
    ids[:5] = -1
    ids[5] = n - 1
    scal = torch.tensor([0.5, 2.0, 1.0])
    y = llmkern.lora_linear_multi(x, qw, b, A, B, scal, ids)
    dy = torch.randn_like(y)
    y.backward(dy)
    xd, bd, Ad, Bd = _f64_leaves(x, b, A, B)
    yr = ref.lora_linear_multi(xd, _dense(qw, dtype), bd, Ad, Bd, scal.double(), ids)
    yr.backward(dy.double())
    assert_close(y, yr, msg="y", **TOL[dtype])
    _check(_grads(x, b, A, B), _grads(xd, bd, Ad, Bd), dtype, ("dx", "db", "dA", "dB"))
    assert dequant_calls == [dtype] * _expected_passes(gemm_path, K, 32)


@needs_triton
def test_fused_max_m_is_the_row_bound(triton_backend, monkeypatch, dequant_calls):
    """M <= LLMKERN_NF4_FUSED_MAX_M dequantizes in the main loop, M above it into a temporary; both
    give the same result (up to fp32 summation order)."""
    M, K, N = 20, 64, 28
    qw = llmkern.nf4_quantize(_weight(N, K, device=DEV), 32)
    x = torch.randn(M, K, device=DEV)
    A, B = torch.randn(4, K, device=DEV), torch.randn(N, 4, device=DEV)
    with torch.no_grad():
        monkeypatch.setenv(ENV_MAX_M, str(M))
        y_fused = llmkern.lora_linear(x, qw, None, A, B, 0.5)
        assert dequant_calls == []
        monkeypatch.setenv(ENV_MAX_M, str(M - 1))
        y_first = llmkern.lora_linear(x, qw, None, A, B, 0.5)
        assert dequant_calls == [torch.float32]
        monkeypatch.delenv(ENV_MAX_M)
        assert KN.fused_max_m() == KN.NF4_FUSED_MAX_M
    torch.testing.assert_close(y_fused, y_first, atol=1e-5, rtol=1e-5)


def test_reference_path_uses_the_dequantized_weight():
    """CPU default (the reference): an NF4 weight is the dense dequantized weight in x's dtype, whatever
    dtype it was quantized from."""
    K, N, r = 30, 20, 4
    qw = llmkern.nf4_quantize(_weight(N, K, torch.float16), 32)
    for dtype in (torch.float32, torch.bfloat16):
        x, b, A, B = _lora_inputs((3, 5), K, N, r, dtype, device="cpu")
        y = llmkern.lora_linear(x, qw, b, A, B, 0.7, 0.3, seed=3)
        want = ref.lora_linear(x, qw.dequantize(dtype), b, A, B, 0.7, 0.3, seed=3)
        assert y.dtype == dtype
        torch.testing.assert_close(y, want, atol=0, rtol=0)
        ids = torch.tensor([[0, -1, 1, 1, 0]] * 3)
        A2, B2 = torch.stack([A, 2 * A]).detach(), torch.stack([B, -B]).detach()
        ym = llmkern.lora_linear_multi(x, qw, b, A2, B2, [0.5, 1.0], ids)
        wantm = ref.lora_linear_multi(x, qw.dequantize(dtype), b, A2, B2, [0.5, 1.0], ids)
        torch.testing.assert_close(ym, wantm, atol=0, rtol=0)


# ---- 5. bad input -----------------------------------------------------------------------------------

def _parts(N=4, K=10, blocksize=32):
    qw = llmkern.nf4_quantize(torch.randn(N, K), blocksize)
    return qw.packed, qw.absmax


@pytest.mark.parametrize("make,exc,match", [
    (lambda p, a: NF4Weight(p.to(torch.int8), a, (4, 10), 32), ValueError, "packed must be uint8"),
    (lambda p, a: NF4Weight(p[:-1], a, (4, 10), 32), ValueError, "packed must be uint8 with"),
    (lambda p, a: NF4Weight(p.float(), a, (4, 10), 32), ValueError, "packed"),
    (lambda p, a: NF4Weight(p, a[:-1], (4, 10), 32), ValueError, "absmax must be float32 with"),
    (lambda p, a: NF4Weight(p, a.half(), (4, 10), 32), ValueError, "absmax must be float32"),
    (lambda p, a: NF4Weight(p, a, (4, 10), 48), ValueError, "blocksize must be a power of two"),
    (lambda p, a: NF4Weight(p, a, (4, 10), 1), ValueError, "blocksize must be a power of two"),
    (lambda p, a: NF4Weight(p, a, (4, 10), True), ValueError, "blocksize"),
    (lambda p, a: NF4Weight(p, a, (40,), 32), ValueError, "shape must be"),
    (lambda p, a: NF4Weight(p, a, (2, 2, 10), 32), ValueError, "shape must be"),
    (lambda p, a: NF4Weight(p, a, (0, 10), 32), ValueError, "shape must be"),
    (lambda p, a: NF4Weight(p, a, (5, 10), 32), ValueError, "packed"),  # 25 bytes needed, 20 given
    (lambda p, a: NF4Weight(p, a, (4, 10), 32, dtype=torch.int32), ValueError, "dtype"),
    (lambda p, a: NF4Weight(p.numpy(), a, (4, 10), 32), TypeError, "packed must be a torch.Tensor"),
    (lambda p, a: NF4Weight(p, a.tolist(), (4, 10), 32), TypeError, "absmax must be a torch.Tensor"),
    (lambda p, a: NF4Weight(p, a.to("meta"), (4, 10), 32), ValueError, "absmax is on meta"),
])
def test_nf4weight_constructor_errors(make, exc, match):
    packed, absmax = _parts()
    assert NF4Weight(packed, absmax, (4, 10), 32).shape == (4, 10)  # the valid one
    assert NF4Weight(packed.view(-1, 1), absmax, (4, 10), 32).packed.shape == (20,)  # bnb's [n, 1]
    with pytest.raises(exc, match=match):
        make(packed, absmax)


@pytest.mark.parametrize("W,kw,exc,match", [
    (torch.randn(64), {}, ValueError, "weight must be a non-empty \\[out_features, in_features\\]"),
    (torch.randn(2, 3, 64), {}, ValueError, "weight must be a non-empty"),
    (torch.randn(0, 64), {}, ValueError, "weight must be a non-empty"),
    (torch.tensor([[1.0, float("nan")]]), {}, ValueError, "weight must be finite"),
    (torch.tensor([[1.0, float("inf")]]), {}, ValueError, "weight must be finite"),
    (torch.ones(4, 8, dtype=torch.int32), {}, ValueError, "weight must be float32, float16 or bfloat16"),
    (torch.ones(4, 8, dtype=torch.float64), {}, ValueError, "weight must be float32"),
    (torch.randn(4, 8), dict(blocksize=100), ValueError, "blocksize"),
    ([[1.0, 2.0]], {}, TypeError, "weight must be a torch.Tensor"),
])
def test_nf4_quantize_errors(W, kw, exc, match):
    with pytest.raises(exc, match=match):
        llmkern.nf4_quantize(W, **kw)


def test_nf4_dequantize_errors():
    W = torch.randn(4, 8)
    with pytest.raises(TypeError, match="qweight must be an NF4Weight"):
        llmkern.nf4_dequantize(W)
    with pytest.raises(ValueError, match="dtype must be float32"):
        llmkern.nf4_dequantize(llmkern.nf4_quantize(W), torch.int32)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_float64_through_the_reference(double_quant):
    """float64 (as lora_linear and the other ops take it: the PyTorch reference, no kernel): nf4_dequantize gives the
    float32 dequantized weight exactly, and nf4_linear / lora_linear / lora_linear_multi on an NF4Weight compute in
    float64 (gradcheck). was: refused by nf4_dequantize / nf4_linear / NF4Weight, so lora_linear, which takes float64
    x, raised "x must be float32, float16 or bfloat16" from inside for an NF4 weight."""
    torch.manual_seed(0)
    W = torch.randn(12, 40)
    qw = llmkern.nf4_quantize(W, 32, double_quant)
    W64 = llmkern.nf4_dequantize(qw, torch.float64)
    assert W64.dtype == torch.float64 and torch.equal(W64, llmkern.nf4_dequantize(qw).double())
    q64 = qw.to(dtype=torch.float64)
    assert q64.dtype == torch.float64 and torch.equal(q64.dequantize(), W64)
    x, b = torch.randn(3, 40, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    A, B = torch.randn(4, 40, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64)
    y = llmkern.nf4_linear(x, qw, b)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, x @ W64.t() + b, atol=1e-12, rtol=0)
    torch.testing.assert_close(llmkern.lora_linear(x, q64, b, A, B, 0.5), x @ W64.t() + b + 0.5 * (x @ A.t()) @ B.t(),
                               atol=1e-12, rtol=0)
    ids = torch.tensor([0, 1, 0])
    y2 = llmkern.lora_linear_multi(x, qw, b, torch.stack([A, 2 * A]), torch.stack([B, B]), torch.tensor([0.5, 1.0]),
                                   ids)
    torch.testing.assert_close(y2[1], (x @ W64.t() + b + 2 * (x @ A.t()) @ B.t())[1], atol=1e-12, rtol=0)
    leaves = [t.clone().requires_grad_() for t in (x, b, A, B)]
    assert torch.autograd.gradcheck(lambda xx, bb: llmkern.nf4_linear(xx, qw, bb), tuple(leaves[:2]))
    assert torch.autograd.gradcheck(lambda xx, bb, aa, BB: llmkern.lora_linear(xx, qw, bb, aa, BB, 0.5), tuple(leaves))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_lora_linear_nf4_wrong_in_features(monkeypatch, backend):
    if backend == "triton" and DEV is None:
        pytest.skip("no CUDA and no TRITON_INTERPRET")
    monkeypatch.setenv("LLMKERN_BACKEND", backend)
    dev = "cpu" if backend == "reference" else DEV
    qw = llmkern.nf4_quantize(_weight(12, 16, device=dev), 32)
    x = torch.randn(3, 20, device=dev)
    A, B = torch.randn(2, 20, device=dev), torch.randn(12, 2, device=dev)
    with pytest.raises(ValueError, match=r"weight must have shape \[out_features, 20\].*\(12, 16\)"):
        llmkern.lora_linear(x, qw, None, A, B, 1.0)
    with pytest.raises(ValueError, match=r"weight must have shape \[out_features, 20\]"):
        llmkern.lora_linear_multi(x, qw, None, A[None], B[None], [1.0], torch.zeros(3, dtype=torch.long))


@needs_triton
@pytest.mark.parametrize("value", ["-1", "abc", "1.5"])
def test_bad_fused_max_m_env_raises(triton_backend, monkeypatch, value):
    monkeypatch.setenv(ENV_MAX_M, value)
    qw = llmkern.nf4_quantize(_weight(12, 16, device=DEV), 32)
    x = torch.randn(3, 16, device=DEV)
    A, B = torch.randn(2, 16, device=DEV), torch.randn(12, 2, device=DEV)
    with pytest.raises(ValueError, match=f"{ENV_MAX_M} must be an integer >= 0.*{value}"):
        llmkern.lora_linear(x, qw, None, A, B, 1.0)


# ---- 6. no dense W kept for the backward --------------------------------------------------------------

@needs_triton
def test_backward_keeps_only_the_codes(triton_backend, gemm_path):
    M, K, N, r = 19, 64, 24, 4
    qw = llmkern.nf4_quantize(_weight(N, K, device=DEV), 32)
    x, b, A, B = _lora_inputs((M,), K, N, r, torch.float32)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = llmkern.lora_linear(x, qw, b, A, B, 0.5, 0.1, seed=2)
    assert saved, "nothing saved for the backward?"
    dense = [s for s in saved if s[1].is_floating_point and (s[0] in ((N, K), (K, N)) or s[2] == N * K)]
    assert not dense, f"a dense copy of W is kept for the backward: {dense}"
    assert (tuple(qw.packed.shape), torch.uint8, qw.packed.numel()) in saved
    y.sum().backward()  # and the backward still works from what was saved
    xd, bd, Ad, Bd = _f64_leaves(x, b, A, B)
    ref.lora_linear(xd, _dense(qw), bd, Ad, Bd, 0.5, 0.1, seed=2).sum().backward()
    _check(_grads(x, A, B), _grads(xd, Ad, Bd), torch.float32, ("dx", "dA", "dB"))


def test_reference_backward_keeps_only_the_codes():
    """The CPU reference path of lora_linear (no LLMKERN_BACKEND) runs its base through nf4_linear too."""
    M, K, N, r = 7, 64, 24, 4
    qw = llmkern.nf4_quantize(_weight(N, K), 32)
    x, b, A, B = _lora_inputs((M,), K, N, r, torch.float32, device="cpu")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = llmkern.lora_linear(x, qw, b, A, B, 0.5)
    assert not [t for t in saved if t.is_floating_point() and t.numel() == N * K]
    y.sum().backward()
    xd, bd, Ad, Bd = _f64_leaves(x, b, A, B)
    ref.lora_linear(xd, _dense(qw), bd, Ad, Bd, 0.5).sum().backward()
    _check(_grads(x, A, B, b), _grads(xd, Ad, Bd, bd), torch.float32, ("dx", "dA", "dB", "db"))


# ---- 6b. nf4_linear: a 4-bit layer without an adapter --------------------------------------------------

def _nf4_linear_case(lead, K, N, blocksize, dtype, bias, device):
    qw = llmkern.nf4_quantize(_weight(N, K, device=device), blocksize)
    x = torch.randn(*lead, K, device=device).to(dtype).requires_grad_()
    b = torch.randn(N, device=device).to(dtype).requires_grad_() if bias else None
    return qw, x, b


def _check_nf4_linear(qw, x, b, dtype):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = llmkern.nf4_linear(x, qw, b)
    assert not [t for t in saved if t.is_floating_point() and t.numel() == qw.shape.numel()], "dense W saved"
    dy = torch.randn_like(y)
    y.backward(dy)
    xd = x.detach().double().requires_grad_()
    bd = None if b is None else b.detach().double().requires_grad_()
    yr = torch.nn.functional.linear(xd, _dense(qw), bd)
    yr.backward(dy.double())
    names = ("y", "dx") + (("db",) if b is not None else ())
    _check((y, x.grad) + ((b.grad,) if b is not None else ()),
           (yr, xd.grad) + ((bd.grad,) if b is not None else ()), dtype, names)


@pytest.mark.parametrize("K,N,blocksize,bias", [(64, 24, 32, True), (45, 10, 64, False), (128, 33, 128, True)])
def test_nf4_linear_reference(K, N, blocksize, bias):
    _check_nf4_linear(*_nf4_linear_case((2, 5), K, N, blocksize, torch.float32, bias, "cpu"), torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", interpreter_dtypes())
@pytest.mark.parametrize("K,N,blocksize,bias", [(64, 24, 32, True), (45, 10, 64, False)])
def test_nf4_linear_triton(triton_backend, gemm_path, dequant_calls, dtype, K, N, blocksize, bias):
    qw, x, b = _nf4_linear_case((3, 6), K, N, blocksize, dtype, bias, DEV)
    _check_nf4_linear(qw, x, b, dtype)
    assert len(dequant_calls) == _expected_passes(gemm_path, K, blocksize)


def test_nf4_linear_opcheck_and_compile():
    qw, x, b = _nf4_linear_case((6,), 64, 16, 32, torch.float32, True, "cpu")
    torch.library.opcheck(torch.ops.llmkern.nf4_linear_fwd.default,
                          (x.detach().requires_grad_(), qw.packed, qw.absmax, qw.pairs, qw.state2, b, 16, 32))
    torch._dynamo.reset()
    f = torch.compile(lambda x: llmkern.nf4_linear(x, qw, b), fullgraph=True)
    assert_close(f(x), llmkern.nf4_linear(x, qw, b), atol=1e-5, rtol=1e-5)


def test_nf4_linear_errors():
    qw, x, b = _nf4_linear_case((3,), 64, 16, 32, torch.float32, True, "cpu")
    with pytest.raises(TypeError, match="qweight"):
        llmkern.nf4_linear(x, qw.dequantize(), b)
    with pytest.raises(ValueError, match="x must have shape"):
        llmkern.nf4_linear(x[:, :32], qw, b)
    with pytest.raises(ValueError, match="bias"):
        llmkern.nf4_linear(x, qw, b[:8])
    with pytest.raises(ValueError, match="bias"):
        llmkern.nf4_linear(x, qw, b.double())
    with pytest.raises(ValueError, match="x must be"):
        llmkern.nf4_linear(x.int(), qw)


# ---- 7. GPU -------------------------------------------------------------------------------------------

@pytest.fixture
def fixed_config(monkeypatch):
    """One kernel configuration instead of autotuning: keeps `pytest -m gpu` short."""
    monkeypatch.setenv("LLMKERN_LORA_AUTOTUNE", "0")


def _rel(a, e):
    return ((a.double() - e).norm() / e.norm()).item()


@pytest.mark.gpu
def test_gpu_dequantize_bf16_bit_exact():
    W = _weight(4096, 4096, torch.bfloat16, device="cuda")
    qw = llmkern.nf4_quantize(W, 64)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        want = RN.nf4_dequantize(qw.packed, qw.absmax, qw.shape, 64, dt)
        assert torch.equal(llmkern.nf4_dequantize(qw, dt), want)


@pytest.mark.gpu
def test_gpu_lora_linear_nf4_bf16_realistic(fixed_config, gemm_path, dequant_calls):
    M, K, N, r = 512, 4096, 4096, 16
    qw = llmkern.nf4_quantize(_weight(N, K, torch.bfloat16, device="cuda"), 64)
    x, b, A, B = _lora_inputs((M,), K, N, r, torch.bfloat16, device="cuda")
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    y, yr, got, want = _run_lora(qw, x, b, A, B, 2.0, 0.1, seed=3, dy=dy)
    assert y.dtype == torch.bfloat16
    assert _rel(y, yr) < 2e-2
    for name, g, w in zip(("dx", "db", "dA", "dB"), got, want):
        assert _rel(g, w) < 2e-2, name
    assert dequant_calls == [torch.bfloat16] * _expected_passes(gemm_path, K, 64)


@pytest.mark.gpu
def test_gpu_lora_linear_nf4_torch_compile_fullgraph(fixed_config):
    """Both GEMM paths inside a compiled graph: M = 64 is below the default row bound (256), M = 320
    above it."""
    torch._dynamo.reset()
    K, N, r = 512, 384, 8
    qw = llmkern.nf4_quantize(_weight(N, K, torch.bfloat16, device="cuda"), 64)
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    f = torch.compile(lambda x, A, B: llmkern.lora_linear(x, qw, b, A, B, 0.5, 0.1, seed=5), fullgraph=True,
                      dynamic=False)
    for M in (64, 320):
        x, _, A, B = _lora_inputs((M,), K, N, r, torch.bfloat16, device="cuda")
        y = f(x, A, B)
        y.float().sum().backward()
        xd, Ad, Bd = _f64_leaves(x, A, B)
        yr = ref.lora_linear(xd, _dense(qw), b.double(), Ad, Bd, 0.5, 0.1, seed=5)
        yr.sum().backward()
        assert _rel(y, yr) < 2e-2, M
        for name, g, w in (("dx", x.grad, xd.grad), ("dA", A.grad, Ad.grad), ("dB", B.grad, Bd.grad)):
            assert g is not None and _rel(g, w) < 2e-2, (M, name)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [16, 512])
def test_gpu_nf4_linear_bf16_eager_and_compiled(fixed_config, M):
    """Both paths (M = 16 dequantizes in the GEMM's main loop, 512 first), eager and under
    torch.compile(fullgraph=True), against the float64 product with the dequantized weight."""
    torch._dynamo.reset()
    K, N = 1024, 768
    qw = llmkern.nf4_quantize(_weight(N, K, torch.bfloat16, device="cuda"), 64)
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    f = torch.compile(lambda x: llmkern.nf4_linear(x, qw, b), fullgraph=True, dynamic=False)
    for fn in (lambda x: llmkern.nf4_linear(x, qw, b), f):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = fn(x)
        dy = torch.randn_like(y)
        y.backward(dy)
        xd = x.detach().double().requires_grad_()
        yr = torch.nn.functional.linear(xd, _dense(qw), b.double())
        yr.backward(dy.double())
        assert _rel(y, yr) < 1e-2 and _rel(x.grad, xd.grad) < 1e-2
