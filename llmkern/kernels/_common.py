"""Small pieces the Triton kernel files share."""
import triton
import triton.language as tl

from llmkern._backend import triton_interpreting as interpreting  # noqa: F401 (TRITON_INTERPRET=1)


def cdiv(a, b):
    """ceil(a / b) for host-side ints. triton.cdiv does the same, but in Triton 3.8 (not 3.6) it is a
    constexpr function whose wrapper cost about 5 µs per call on the CI machine (cProfile), in the
    launchers' hot path."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of two >= n (1 for n <= 1), host side (see cdiv for why not Triton's)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@triton.jit
def tanh(x):
    """tanh through the sigmoid (tl has no tanh on every Triton version we support)."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0
