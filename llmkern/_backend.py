"""Which implementation an op runs: the compiled extension, Triton, or the PyTorch reference.

Backends: "cuda" (CUDA C++ in llmkern._C), "cpu" (C++ in llmkern._C), "triton" (kernels in
llmkern/kernels, GPU, or CPU under TRITON_INTERPRET=1) and "reference" (llmkern/reference,
plain PyTorch). LLMKERN_BACKEND=<name> forces one for every op that has it.
"""
import os
import warnings

import torch

BACKENDS = ("cuda", "cpu", "triton", "reference")
_ext = None
_ext_error = None
_warned = set()


def warn_once(key, message):
    """A deliberate fallback says so once per process."""
    if key not in _warned and not torch.compiler.is_compiling():  # (Dynamo cannot trace warn: the
        _warned.add(key)                                            # first eager call says it)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def extension():
    """The llmkern._C module, or None when it was not built (the reason is in extension_error())."""
    global _ext, _ext_error
    if _ext is None and _ext_error is None:
        try:
            from llmkern import _C  # noqa: F401  (loading it registers the C++ ops)

            _ext = _C
        except ImportError as exc:  # not built, or built against another torch
            # (first asked while llmkern/__init__ runs, Python words a missing module as "partially initialized
            # module ... circular import": say what it is)
            import glob

            here = os.path.dirname(os.path.abspath(__file__))
            missing = not glob.glob(os.path.join(here, "_C*.so")) and not glob.glob(os.path.join(here, "_C*.pyd"))
            _ext_error = ("llmkern._C is not built (pip install --no-build-isolation . builds it; add -e for a checkout)" if missing
                          else f"llmkern._C does not load: {exc}")
    return _ext


def extension_error():
    extension()
    return _ext_error


def has_kernel(op, dispatch_key):
    """Whether llmkern._C registered `op` (e.g. "llmkern::sample") for CPU or CUDA."""
    if extension() is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)


def forced():
    name = os.environ.get("LLMKERN_BACKEND", "").strip().lower()
    if name and name not in BACKENDS:
        raise ValueError(f"LLMKERN_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name or None


_TRITON = []


def env_count(name, default, meaning=""):
    """The integer >= 0 in environment variable `name`, or `default` when it is unset; a clear
    ValueError naming the variable otherwise (a tuning bound must never be silently ignored)."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{name} must be an integer >= 0{meaning}, got {raw!r}")
    return value


@torch.compiler.assume_constant_result
def triton_available():
    # (a constant to torch.compile: traced, the lazy fill of _TRITON was a guard on the list that the call
    # itself broke, so a process's first compiled call compiled twice)
    if not _TRITON:
        try:
            import triton  # noqa: F401
            _TRITON.append(True)
        except ImportError:
            _TRITON.append(False)
    return _TRITON[0]


def triton_interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose(op_name, available, preferred):
    """Pick a backend among `available` (those this op has for this device and dtype).

    `preferred` is the default order. A forced backend the op lacks is ignored for that op with a
    one-time warning, never silently.
    """
    name = forced()
    if name is not None:
        if name in available:
            return name
        warn_once((op_name, name), f"llmkern: LLMKERN_BACKEND={name} is not available for {op_name} "
                                   f"here; using {next(b for b in preferred if b in available)}")
    for b in preferred:
        if b in available:
            return b
    return "reference"


# op name -> function(device: torch.device, dtype) -> backend name, used by `python -m llmkern.info`.
OP_DISPATCH = {}


def register_op(name, fn):
    OP_DISPATCH[name] = fn
    return fn


def choose_triton(op_name, device, dtype, kernel_dtypes):
    """Backend of a Triton op: "triton" on CUDA; on CPU the reference, or the Triton kernel under
    TRITON_INTERPRET=1 when LLMKERN_BACKEND=triton (the interpreter has no bfloat16)."""
    dev = device if isinstance(device, torch.device) else torch.device(device)
    if dev.type == "cuda" and dtype in kernel_dtypes and not os.environ.get("LLMKERN_BACKEND") and triton_available():
        return "triton"  # the common case, without the general resolution below (host time per call)
    available = ["reference"]
    if dtype in kernel_dtypes and triton_available():
        if dev.type == "cuda":
            available.insert(0, "triton")
        elif dev.type == "cpu" and triton_interpreting() and dtype != torch.bfloat16:
            available.append("triton")
    preferred = ("triton", "reference") if dev.type == "cuda" else ("reference", "triton")
    choice = choose(op_name, available, preferred)
    if dev.type == "cuda" and choice == "reference" and forced() != "reference":
        warn_once((op_name, "cuda", dtype), f"llmkern.{op_name}: no Triton kernel for {dtype} on CUDA "
                                            "here; using the PyTorch reference")
    return choice
