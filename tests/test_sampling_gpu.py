"""CUDA kernel of torch.ops.llmkern.sample / top_k_top_p_filter vs the C++ CPU kernel.

The two kernels run the same algorithm with exact integer (fixed-point) masses and IEEE float
arithmetic, so on the same inputs they must agree exactly: same tokens for seeded draws, same
valid flags, same filtered logits, and logprobs equal up to the last bit of a double `log`.
All cases need a CUDA device (`pytest -m gpu`).
"""
import zlib

import pytest
import torch

from llmkern import _backend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not (_backend.has_kernel("llmkern::sample", "CUDA")
                            and _backend.has_kernel("llmkern::sample", "CPU")),
                       reason="llmkern._C built without the CUDA or CPU sampling kernel"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (7, 5), (64, 1000), (3, 1001), (7, 32000), (1, 128256), (7, 128256)]


def seeded(*key):
    """A generator seeded by a stable hash of the test's parameters."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_rows(kind, B, V, gen, dtype):
    if kind == "normal":
        x = torch.randn(B, V, generator=gen) * 3
    elif kind == "heavy":  # a few dominant tokens, long flat tail
        x = torch.randn(B, V, generator=gen)
        x[:, : min(3, V)] += 12
        x = x[:, torch.randperm(V, generator=gen)]
    elif kind == "ties":  # many exact ties
        x = torch.randint(-5, 5, (B, V), generator=gen).float()
    elif kind == "flat":  # all equal: one radix bucket holds the whole row (candidate overflow)
        x = torch.full((B, V), 0.25)
    elif kind == "neginf":
        x = torch.randn(B, V, generator=gen)
        x[torch.rand(B, V, generator=gen) < 0.5] = float("-inf")
        x[:, 0] = 1.0
    elif kind == "special":  # -inf, NaN, +inf, huge and tiny values mixed in
        x = torch.randn(B, V, generator=gen)
        x[torch.rand(B, V, generator=gen) < 0.2] = float("-inf")
        x[torch.rand(B, V, generator=gen) < 0.05] = float("nan")
        x[:, V // 2] = 1e4 if V > 1 else x[:, V // 2]
        x[0, -1] = float("inf")
        x[0, 0] = float("inf")  # two +inf: the draw picks between them, logprob log(1/2)
        x[-1, :] = float("-inf")  # a row with no finite logit
    else:
        raise ValueError(kind)
    return x.to(dtype)


def per_row(B, gen):
    """Per-row parameters mixing every filter combination, greedy rows included."""
    def some(frac):
        return torch.rand(B, generator=gen) < frac

    temperature = torch.rand(B, generator=gen) * 1.5 + 0.2
    temperature[some(0.15)] = 0.0  # greedy
    temperature[some(0.15)] = 1.0
    top_k = torch.randint(1, 80, (B,), generator=gen)
    top_k[some(0.35)] = 0
    top_k[some(0.1)] = 1
    top_p = torch.rand(B, generator=gen) * 0.99 + 0.01
    top_p[some(0.3)] = 1.0
    min_p = torch.rand(B, generator=gen) * 0.2
    min_p[some(0.5)] = 0.0
    seed = torch.randint(0, 2**62, (B,), generator=gen)
    position = torch.randint(0, 2**40, (B,), generator=gen)
    return temperature, top_k, top_p, min_p, seed, position


def run_both(x, bias, allowed, temperature, top_k, top_p, min_p, seed, position):
    args = (temperature, top_k, top_p, min_p, seed, position)
    cpu = torch.ops.llmkern.sample(x, bias, allowed, *args)
    dev = torch.device("cuda")
    gpu = torch.ops.llmkern.sample(
        x.to(dev), None if bias is None else bias.to(dev), None if allowed is None else allowed.to(dev),
        *(a.to(dev) for a in args))
    return cpu, tuple(t.cpu() for t in gpu)


def assert_same(cpu, gpu):
    tok_c, lp_c, ok_c = cpu
    tok_g, lp_g, ok_g = gpu
    assert torch.equal(ok_c, ok_g)
    assert torch.equal(tok_c, tok_g), (tok_c != tok_g).nonzero().flatten()[:10]
    assert ((tok_g >= 0) & (tok_g < 2**62)).all()
    torch.testing.assert_close(lp_g, lp_c, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,V", SHAPES)
@pytest.mark.parametrize("kind", ["normal", "heavy", "ties", "neginf"])
def test_sample_matches_cpu(kind, B, V, dtype):
    gen = seeded((kind, B, V, str(dtype)))
    x = make_rows(kind, B, V, gen, dtype)
    cpu, gpu = run_both(x, None, None, *per_row(B, gen))
    assert_same(cpu, gpu)
    assert (gpu[0] < V).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,V", [(7, 5), (64, 1000), (7, 32000), (1, 128256)])
@pytest.mark.parametrize("kind", ["flat", "special"])
def test_sample_adversarial_rows(kind, B, V, dtype):
    gen = seeded((kind, B, V, str(dtype)))
    x = make_rows(kind, B, V, gen, dtype)
    cpu, gpu = run_both(x, None, None, *per_row(B, gen))
    assert_same(cpu, gpu)
    assert not gpu[1][gpu[2]].isnan().any()  # valid rows (+inf ones included) have a logprob


@pytest.mark.parametrize("B,V", [(1, 1000), (7, 32000), (64, 1000)])
@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (1, 1.0, 0.0), (50, 1.0, 0.0),
                                               (0, 0.9, 0.0), (0, 1e-6, 0.0), (20, 0.8, 0.0),
                                               (0, 1.0, 0.1), (40, 0.95, 0.05)])
def test_sample_filters_many_seeds(B, V, top_k, top_p, min_p):
    gen = seeded((B, V, top_k, top_p, min_p))
    x = make_rows("normal", B, V, gen, torch.float32)
    for trial in range(4):
        temperature = torch.full((B,), 0.7 + 0.3 * trial)
        seed = torch.randint(0, 2**62, (B,), generator=gen)
        position = torch.arange(B) + 1000 * trial
        cpu, gpu = run_both(x, None, None, temperature, torch.full((B,), top_k), torch.full((B,), top_p),
                            torch.full((B,), min_p), seed, position)
        assert_same(cpu, gpu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,V", [(7, 5), (64, 1000), (7, 32000), (1, 128256)])
@pytest.mark.parametrize("side", ["row", "shared"])
def test_sample_bias_and_allowed(side, B, V, dtype):
    gen = seeded((side, B, V, str(dtype)))
    x = make_rows("normal", B, V, gen, dtype)
    shape = (B, V) if side == "row" else (V,)
    bias = torch.randn(shape, generator=gen) * 2
    allowed = torch.rand(shape, generator=gen) < 0.3
    allowed[..., 0] = True
    cpu, gpu = run_both(x, bias, allowed, *per_row(B, gen))
    assert_same(cpu, gpu)
    tok = gpu[0]
    ok = allowed[tok] if side == "shared" else allowed[torch.arange(B), tok]
    assert ok.all()


def test_sample_all_disallowed_and_all_neginf():
    B, V = 7, 1000
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(B, V, generator=gen)
    x[2] = float("-inf")
    x[4] = float("nan")
    allowed = torch.ones(B, V, dtype=torch.bool)
    allowed[5] = False
    params = per_row(B, gen)
    cpu, gpu = run_both(x, None, allowed, *params)
    assert_same(cpu, gpu)
    assert not gpu[2][[2, 4, 5]].any()
    assert (gpu[0][[2, 4, 5]] == 0).all()
    assert torch.isneginf(gpu[1][[2, 4, 5]]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1000, 32000])
def test_signed_zeros_are_one_value(V, dtype):
    """-0 and +0 are one logit value on both backends (ties at the top-k / top-p boundary keep
    both). -0 comes from the input, or from a division: temperature=inf sends every negative
    logit to -0, every positive one to +0."""
    B = 6
    gen = seeded(("zeros", V, str(dtype)))
    x = torch.randn(B, V, generator=gen)
    x[0] = -x[0].abs()  # row 0: the zeros are the largest logits
    x[:3, : V // 2] = 0.0
    x[:3, V // 4: V // 2] = -0.0
    x = x.to(dtype)
    temperature = torch.tensor([1.0, 0.7, 1.0, float("inf"), float("inf"), 0.0])
    top_k = torch.tensor([1, 1, 0, 1, 0, 0])
    top_p = torch.tensor([1.0, 0.5, 0.3, 1.0, 0.5, 1.0])
    min_p = torch.zeros(B)
    seed = torch.arange(B, dtype=torch.int64) + 11
    position = torch.zeros(B, dtype=torch.int64)
    for shift in range(8):  # several draws: -0 and +0 tokens both get picked
        cpu, gpu = run_both(x, None, None, temperature, top_k, top_p, min_p, seed + 100 * shift, position)
        assert_same(cpu, gpu)
    cpu = torch.ops.llmkern.top_k_top_p_filter(x, top_k, top_p, min_p, float("-inf"))
    gpu = torch.ops.llmkern.top_k_top_p_filter(x.cuda(), top_k.cuda(), top_p.cuda(), min_p.cuda(), float("-inf"))
    assert torch.equal(cpu.isinf(), gpu.cpu().isinf())
    assert not cpu[0, : V // 2].isinf().any()  # top_k=1 over a row whose max is 0: all zeros kept


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_sample_and_filter_unaligned_rows(offset, dtype):
    """Rows that start off 16-byte boundaries (the kernels' vector loads need a scalar head)."""
    gen = seeded(5, offset, str(dtype))
    big = (torch.randn(9, 33001, generator=gen) * 2).to(dtype)
    x = big[:, offset:offset + 32003]  # row stride 33001, odd length
    cpu, gpu = run_both(x, None, None, *per_row(9, gen))
    assert_same(cpu, gpu)
    _, top_k, top_p, min_p, _, _ = per_row(9, gen)
    f_cpu = torch.ops.llmkern.top_k_top_p_filter(x, top_k, top_p, min_p, float("-inf"))
    f_gpu = torch.ops.llmkern.top_k_top_p_filter(x.cuda(), top_k.cuda(), top_p.cuda(), min_p.cuda(),
                                                 float("-inf"))
    assert torch.equal(f_cpu, f_gpu.cpu())


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_deterministic_and_batch_invariant(dtype):
    B, V = 64, 32000
    gen = torch.Generator().manual_seed(11)
    x = make_rows("normal", B, V, gen, dtype).cuda()
    params = [p.cuda() for p in per_row(B, gen)]
    first = torch.ops.llmkern.sample(x, None, None, *params)
    for _ in range(3):
        again = torch.ops.llmkern.sample(x, None, None, *params)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    perm = torch.randperm(B, generator=gen).cuda()
    shuffled = torch.ops.llmkern.sample(x[perm], None, None, *(p[perm] for p in params))
    for a, b in zip(first, shuffled):
        assert torch.equal(a[perm], b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,V", SHAPES)
@pytest.mark.parametrize("kind", ["normal", "heavy", "ties", "flat", "special"])
def test_filter_matches_cpu(kind, B, V, dtype):
    gen = seeded(("f", kind, B, V, str(dtype)))
    x = make_rows(kind, B, V, gen, dtype)
    _, top_k, top_p, min_p, _, _ = per_row(B, gen)
    for fv in (float("-inf"), -1e4):
        cpu = torch.ops.llmkern.top_k_top_p_filter(x, top_k, top_p, min_p, fv)
        gpu = torch.ops.llmkern.top_k_top_p_filter(x.cuda(), top_k.cuda(), top_p.cuda(), min_p.cuda(), fv)
        assert gpu.dtype == x.dtype and gpu.shape == x.shape
        # bitwise equal (NaN entries included)
        assert torch.equal(cpu.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           gpu.cpu().view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_filter_deterministic():
    gen = torch.Generator().manual_seed(2)
    x = make_rows("heavy", 64, 32000, gen, torch.float32).cuda()
    _, top_k, top_p, min_p, _, _ = per_row(64, gen)
    args = (top_k.cuda(), top_p.cuda(), min_p.cuda(), float("-inf"))
    a = torch.ops.llmkern.top_k_top_p_filter(x, *args)
    b = torch.ops.llmkern.top_k_top_p_filter(x, *args)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,V", [(1, 128256), (3, 65537), (16, 151936)])
@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
def test_split_prepass_changes_nothing(kind, B, V, dtype, monkeypatch):
    """At small batch the CUDA launch splits each row's first passes over several blocks
    (csrc/cuda/sampling.cu, split_max_kernel / split_exp_kernel); LLMKERN_SAMPLE_SPLIT=0 turns
    that off. Both must give the same tokens, logprobs and filtered logits, bit for bit."""
    gen = seeded(("split", kind, B, V, str(dtype)))
    x = make_rows(kind, B, V, gen, dtype)[:, 1:]  # unaligned rows (odd offset, odd length)
    args = tuple(t.cuda() for t in per_row(B, gen))
    bias = (torch.randn(V - 1, generator=gen) * 0.5).cuda()
    xc = x.cuda()
    out = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LLMKERN_SAMPLE_SPLIT", flag)
        out[flag] = (torch.ops.llmkern.sample(xc, None, None, *args),
                     torch.ops.llmkern.sample(xc, bias, None, *args),
                     torch.ops.llmkern.top_k_top_p_filter(xc, args[1], args[2], args[3], float("-inf")))
    def bits(t):  # NaN != NaN: compare bit patterns
        t = t.cpu()
        return t.view({4: torch.int32, 2: torch.int16}[t.element_size()]) if t.is_floating_point() else t

    for a, b in zip(out["1"][:2], out["0"][:2]):
        for t, u in zip(a, b):
            assert torch.equal(bits(t), bits(u))
    assert torch.equal(bits(out["1"][2]), bits(out["0"][2]))
