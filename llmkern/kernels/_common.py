"""Small pieces the Triton kernel files share."""
import os

import triton
import triton.language as tl


def interpreting():
    """Whether Triton runs kernels under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def tanh(x):
    """tanh through the sigmoid (tl has no tanh on every Triton version we support)."""
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0
