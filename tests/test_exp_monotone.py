"""The CPU sampler's top-p search brackets the threshold on e = exp(y - max) and finishes on the
keys of y (csrc/cpu/sampling.cpp), which is exact only if the kernel's exp is non-decreasing. This
checks that property on a float32 replica of simd::exp_nonpos (csrc/cpu/simd.h: same operations in
the same order, no FMA, like the kernel built with -ffp-contract=off), and that the replica is the
kernel's exp (the log-probabilities it returns depend on the exact sum of its e values).

By default every 16th float in [-88, 0] plus a dense window around each range-reduction boundary
is checked (a few seconds); LLMKERN_EXHAUSTIVE=1 checks all 1.1e9 floats (about a minute).
"""
import math
import os

import numpy as np
import pytest
import torch

from llmkern import _backend

f32 = np.float32


def exp_nonpos(x):
    """float32 replica of simd::exp_nonpos (Cephes polynomial, round-to-nearest range reduction)."""
    x = np.maximum(x, f32(-87.0))
    magic = f32(12582912.0)
    n = (x * f32(1.44269504088896341) + magic) - magic
    r = x - n * f32(0.693359375)
    r = r - n * f32(-2.12194440e-4)
    p = r * f32(1.9875691500e-4) + f32(1.3981999507e-3)
    p = p * r + f32(8.3334519073e-3)
    p = p * r + f32(4.1665795894e-2)
    p = p * r + f32(1.6666665459e-1)
    p = p * r + f32(5.0000001201e-1)
    y = p * r * r + r + f32(1.0)
    scale = ((n.astype(np.int32) + 127) << 23).astype(np.int32).view(np.float32)
    return y * scale


def _check_block(bits_lo, bits_hi, stride=1):
    """Negative floats by bit pattern, ascending bits = descending value: e must not increase."""
    u = np.arange(bits_lo, bits_hi, stride, dtype=np.uint64).astype(np.uint32)
    e = exp_nonpos(u.view(np.float32))
    assert np.all(np.diff(e) <= 0), "exp_nonpos is not monotone"
    return e


NEG_ZERO, NEG_88 = 0x80000000, 0xC2B00001  # -0.0 .. just below -88 (below -87 the input is clamped)


def test_monotone_sampled_and_at_range_reduction_boundaries():
    if os.environ.get("LLMKERN_EXHAUSTIVE") == "1":
        step, prev = 1 << 25, None
        for lo in range(NEG_ZERO, NEG_88, step):
            e = _check_block(lo, min(lo + step, NEG_88))
            assert prev is None or e[0] <= prev
            prev = e[-1]
        return
    _check_block(NEG_ZERO, NEG_88, 16)
    # Where the reduction's integer n changes (x = (k + 1/2) ln 2) the polynomial's argument jumps
    # from about +ln2/2 to -ln2/2: the only place a cheap exp can step backwards. Check every float
    # within 2^14 ulps of each such point.
    for k in range(-126, 1):
        x0 = np.array([(k + 0.5) * math.log(2.0)], dtype=np.float32)
        if x0[0] >= 0 or x0[0] < -87.5:
            continue
        b = int(x0.view(np.uint32)[0])
        _check_block(b - (1 << 14), b + (1 << 14))


def test_exp_is_one_at_zero_and_tiny_below_minus_87():
    assert exp_nonpos(np.array([-0.0, 0.0], dtype=np.float32)).tolist() == [1.0, 1.0]
    assert exp_nonpos(np.array([-np.inf, -1e30], dtype=np.float32)).max() < 2.0 ** -120


@pytest.mark.skipif(not _backend.has_kernel("llmkern::sample", "CPU"), reason="CPU kernel not built")
def test_replica_matches_the_kernels_exp():
    import llmkern

    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 3001, generator=g) * 4
    tokens, lp = llmkern.sample(x, seed=1, return_logprobs=True)
    y = x.numpy()
    for r in range(x.shape[0]):
        m = y[r].max()
        e = exp_nonpos((y[r] - m).astype(np.float32))
        s = e * f32(1048576.0)  # the kernel's fixed_mass: floor(e * 2^40) as two 20-bit halves
        hi = s.astype(np.int64)
        lo = ((s - hi.astype(np.float32)) * f32(1048576.0)).astype(np.int64)
        z = int(((hi << 20) + lo).sum())
        # the kernel: logprob = (y_tok - m) - (float) log((double) z / 2^40)
        expected = np.float32(y[r, tokens[r]] - m) - np.float32(math.log(z / 2.0 ** 40))
        assert lp[r].item() == float(expected), f"row {r}: the kernel's normaliser differs from the replica's"
