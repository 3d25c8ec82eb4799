"""Shared plumbing of the TMA (tensor-descriptor) kernel variants of sm_90+: whether a call may
take them, host descriptors, and the warn-once fallback to the pointer kernels.

Each op owns one `Switch` (attention: LLMKERN_ATTN_TMA, LoRA: LLMKERN_LORA_TMA). Its variable
reads "0" (off), "force" (on under the Triton interpreter too: the CPU tests) or anything else
(on for CUDA tensors on sm_90+). A variant that fails to build or launch turns its switch off for
the rest of the process, with one warning; the caller reruns the step on the pointer kernels.
"""
import functools
import os
import warnings

import torch

from llmkern._backend import triton_interpreting

try:  # host-side tensor descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

DTYPES = (torch.float16, torch.bfloat16)


def addressable(t):
    """The copy engine can address t: non-empty, 16-byte aligned base, last stride 1, every other
    stride positive and a multiple of 16 bytes."""
    return (t.numel() > 0 and t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(st > 0 and (st * t.element_size()) % 16 == 0 for st in t.stride()[:-1]))


def _field_defaults():
    """TensorDescriptor's defaulted fields, or None when its fields are not the ones `descriptor` knows
    (base, shape, strides, block_shape and plain defaults): then the constructor runs."""
    if TensorDescriptor is None:
        return None
    import dataclasses

    defaults = {}
    for f in dataclasses.fields(TensorDescriptor):
        if f.name in ("base", "shape", "strides", "block_shape"):
            continue
        if f.default is dataclasses.MISSING:
            return None
        defaults[f.name] = f.default
    return defaults


_DEFAULTS = _field_defaults()


def descriptor(t):
    """Host descriptor of t; its box (block_shape) is set per config by the kernel's pre-hook.

    Built without TensorDescriptor.__post_init__, whose checks (alignment, strides, rank) `addressable`
    has made already: 1.7 instead of 5.6 µs per descriptor on the CI machine, and an attention
    forward makes four of them per call."""
    shape, strides, box = list(t.shape), list(t.stride()), [1] * (t.dim() - 2) + [16, 16]
    if _DEFAULTS is None:
        return TensorDescriptor(t, shape, strides, box)
    d = object.__new__(TensorDescriptor)
    d.__dict__.update(_DEFAULTS)
    d.base, d.shape, d.strides, d.block_shape = t, shape, strides, box
    return d


@functools.lru_cache(maxsize=None)
def _capability(index):
    """Compute capability of a CUDA device (cached: querying it each call costs host time)."""
    return torch.cuda.get_device_capability(index)


class Switch:
    def __init__(self, env, what):
        self.env, self.what = env, what
        self.failed = []  # what turned the variant off (the error message), if anything

    def allowed(self, t):
        """Mode, dtype and device of a call whose tensors look like t (alignment is the caller's)."""
        mode = os.environ.get(self.env, "1")
        if mode == "0" or self.failed or TensorDescriptor is None or t.dtype not in DTYPES:
            return False
        if triton_interpreting():
            return mode == "force"
        return t.is_cuda and _capability(t.device.index) >= (9, 0)

    def run(self, launch):
        """launch(); False (after one warning, and for good) if it raised."""
        if self.failed:
            return False
        try:
            launch()
        except torch.OutOfMemoryError:  # (not the kernels' fault: the pointer kernels would need the memory too)
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the optional fast path
            # the message only: the exception's traceback would keep the failing call's frames, and every tensor
            # on them (the model's activations), alive for good
            self.failed.append(f"{type(e).__name__}: {e}")
            warnings.warn(f"{self.what}: the TMA kernels failed ({type(e).__name__}: {e}); using the pointer "
                          f"kernels from now on ({self.env}=0 skips them)", RuntimeWarning)
            return False
        return True
