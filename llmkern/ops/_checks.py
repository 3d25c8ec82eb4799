"""Argument checks the op files share."""
import contextlib
import contextvars
import functools
import math
import numbers

import torch


def tensor_arg(name, t):
    """t, or a TypeError naming the argument when it is not a tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def checking_values():
    """Whether value checks that read tensor data (a host sync on CUDA tensors) may run: not while
    torch.compile traces, nor while a CUDA graph is captured."""
    if torch.compiler.is_compiling():
        return False
    # is_initialized is a cheap flag (is_available reads the environment); capture needs CUDA up
    return not (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())


# True inside trusted(): see there. A context variable, not a global: other threads (and asyncio tasks) keep
# their own value, so one thread's trusted block never reaches another thread's calls.
_TRUSTED = contextvars.ContextVar("llmkern_values_trusted", default=False)


@contextlib.contextmanager
def trusted():
    """Internal: inside the block, the ops skip the value checks that read their tensor arguments (ranges,
    finiteness: a host sync per call on CUDA), for a library caller that has had the same values checked
    already or built them in range (generate's decode loop from its second step; the PEFT integration's
    adapter ids). Checks of types, shapes and devices still run. Scope it to the library's own calls: code
    of the user's that runs inside (a scorer, a callback, a model) would have its own llmkern calls go
    unchecked."""
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def values_trusted():
    """Whether the caller vouches for the tensor arguments' values (inside trusted()): no check of them at all,
    neither a host read nor, under torch.compile / graph capture, an assert_async."""
    return _TRUSTED.get()


def reading_values():
    """Whether an op checks its tensor arguments' values by reading them: where values may be read
    (checking_values) and not inside trusted()."""
    return checking_values() and not _TRUSTED.get()


def has_values(t):
    """Whether tensor t holds values to read: not a meta tensor nor a FakeTensor (FakeTensorMode: shape inference,
    memory estimation), which have shapes only (reading one raised "Cannot copy out of meta tensor", or
    DataDependentOutputException, where torch's own ops run)."""
    return not (t.is_meta or torch._subclasses.fake_tensor.is_fake(t))


def assert_async(ok, message):
    """The value check for code that cannot read values (torch.compile, CUDA graph capture): ok, a bool
    tensor [], is checked when the graph runs (RuntimeError on CPU, a device-side assert on CUDA, which
    ends the process's CUDA context: loud, where the unchecked value would give a silently wrong answer).
    Inductor keeps the assert from torch 2.9 on; before, its decompositions dropped it (eager and aot_eager
    backends keep it on every version)."""
    torch._assert_async(ok, message)


def autocast_dtype(t):
    """The torch.autocast dtype in effect for t's device (None: autocast off, or t not a tensor)."""
    if not isinstance(t, torch.Tensor) or t.device.type not in ("cuda", "cpu"):
        return None
    if not torch.is_autocast_enabled(t.device.type):
        return None
    return torch.get_autocast_dtype(t.device.type)


def autocast_cast(dtype, t):
    """t cast as autocast casts an eligible input (floating point, not float64); others as they are."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


class DeferredRead:
    """A small tensor's values read on the host without stalling the GPU: on CUDA it is copied to
    pinned memory behind an event when constructed, and `values()` waits only for the work queued
    before that point. A caller builds it, queues its kernels, then reads: the GPU keeps busy with
    the new kernels while the host waits. On CPU the values are there at once."""

    def __init__(self, t):
        self.event = None
        if t.is_cuda:
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(t.device))
        else:
            self.host = t

    @property
    def ready(self):
        """True when values() returns at once (CPU tensors)."""
        return self.event is None

    def values(self):
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def host_to_device(t, device):
    """A small CPU tensor built from host values (a list of ids, of scalings) on `device`. On CUDA the copy
    goes through pinned memory, non-blocking: a copy from pageable memory waits for the work already queued
    on the device (a host sync per call). The caching host allocator keeps the pinned block until the copy
    has run. Not while a CUDA graph is being captured: the graph would keep the pinned block's address and
    read it at every replay, after the allocator has handed the block out again (a plain copy raises there,
    as it did before)."""
    device = torch.device(device)
    if device.type != "cuda" or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def eager_fast_path(*tensors):
    """Whether an op may run its torch.autograd.Function directly instead of through its
    torch.library custom op: plain tensors in eager mode, no torch.compile / export trace and no
    dispatch mode (FakeTensorMode, ...) active. Both paths run the same kernels; the custom op's
    dispatch costs about 0.1 ms of host time per call (measured on the 2-core CI machine), which
    for a 1k-token attention or a LoRA layer is as long as the kernel itself."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or _functorch_active():
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def wants_grad(*tensors):
    """Whether autograd would record a call on these tensors (grad mode on and one of them requires grad): the
    inference-only paths (decode kernels, merge_attention_states) are taken only when it would not."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def op_or_impl(op, impl, *args, **kwargs):
    """Call an inference-only custom op (no autograd: the decode kernels, merge_attention_states): an eager call
    whose tensors need no gradient runs `impl`, the op's own implementation, directly (see eager_fast_path: a
    decode step calls such ops once per layer; the decode op's dispatch measured 16 -> 8 µs of host time per call
    on the 2-core CPU, kernel stubbed); traced calls, dispatch modes and inputs that require grad keep the op and
    its behaviour."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if not wants_grad(*tensors) and eager_fast_path(*tensors):
        return impl(*args, **kwargs)
    return op(*args, **kwargs)


def eager_twin(name, impl, setup_context, backward, doc, *, once_differentiable=True, materialize_grads=True):
    """The eager twin of a custom op: a torch.autograd.Function whose forward runs `impl` (the op's own
    implementation) and `setup_context`, and whose backward is the op's registered `backward` (bind its
    backward implementation with functools.partial), so that eager calls skip the torch.library dispatch
    (see eager_fast_path) and save exactly what the op saves. once_differentiable: a double backward
    raises (the kernels' gradients are not differentiable), as it does through the op (see
    _once_differentiable); materialize_grads=False: gradients of unused outputs stay None, as under the op."""

    def forward(ctx, *inputs):
        output = impl(*inputs)
        if not materialize_grads:
            ctx.set_materialize_grads(False)
        setup_context(ctx, inputs, output)
        return output

    def run_backward(ctx, *grads):
        return backward(ctx, *grads)

    if once_differentiable:
        run_backward = _once_differentiable(run_backward)
    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(run_backward), "__doc__": doc})


def _once_differentiable(backward):
    """torch.autograd.function.once_differentiable, but also when the incoming gradients do not require grad.
    Under create_graph=True the gradients a kernel returns depend on the saved inputs (logits, x, weights),
    which require grad, so the custom op's gradient requires grad and a backward through it raises. PyTorch's
    decorator looks at the incoming gradients only: for a loss's own gradient (ones) it returned plain tensors,
    and a gradient penalty built on them silently counted as a constant. Here every gradient made under
    create_graph raises when differentiated."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return outputs
        many = isinstance(outputs, tuple)
        outs = outputs if many else (outputs,)
        err = torch._C._functions.DelayedError(b"trying to differentiate twice a function that was marked with "
                                               b"@once_differentiable (llmkern's kernels give first-order "
                                               b"gradients only)", len(outs))

        def fake_requires_grad(t):
            if t is None:
                return None
            t = t.detach()
            t.requires_grad = True
            return t

        wrapped = err(*[fake_requires_grad(t) for t in outs])
        wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
        wrapped = tuple(None if o is None else w for o, w in zip(outs, wrapped))
        return wrapped if many else wrapped[0]
    return wrapper


_PLAIN = (torch.Tensor, torch.nn.Parameter)
# vmap / grad wrap tensors that still look like plain ones: they go to the custom op, not to the eager
# autograd.Function twin (no setup_context). The ops' CPU paths (plain torch) run under torch.func; the custom
# ops' kernel paths do not (torch.func.grad raises PyTorch's setup_context error through them).
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def int_arg(name, v, least, hint=""):
    """v as a Python int >= least (Python or numpy integers, not bools), else ValueError naming it (hint: what the
    least value means, e.g. " (0: off)")."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < least:
        raise ValueError(f"{name} must be an int >= {least}{hint}, got {v!r}")
    return int(v)


def positive_int(name, v):
    """v as an int >= 1 (Python or numpy integers, not bools), else ValueError naming it."""
    return int_arg(name, v, 1)


def with_data(name, t):
    """t, or a ValueError naming it when it is a meta tensor: it has no values to read or to copy to another device
    (torch's own error there names no argument). Anything else passes as it is."""
    if isinstance(t, torch.Tensor) and t.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (no data); give it on a device with its values")
    return t


def bool_arg(name, v, *, allow_none=False, ints=True, type_error=TypeError):
    """v as a bool: a bool, a numpy bool, the int 0 or 1 (unless not `ints`, where an int is no flag), or a one-element
    bool tensor (what bool() reads as meant); None too where allow_none. Anything else is a `type_error` (ValueError
    where the caller raises it for every bad argument) naming it: bool() would read a string "False" or "no", or a
    list [False], as True, and None as False."""
    if isinstance(v, bool) or (v is None and allow_none):
        return v
    if ints and isinstance(v, numbers.Integral) and v in (0, 1):
        return bool(v)
    if type(v).__module__ == "numpy" and getattr(getattr(v, "dtype", None), "kind", None) == "b" and v.size == 1:
        return bool(v)
    if isinstance(v, torch.Tensor) and v.dtype == torch.bool and v.numel() == 1:
        return bool(v)
    shown = repr(v) if v is None or isinstance(v, (str, numbers.Number)) else type(v).__name__
    raise type_error(f"{name} must be a bool{' or None' if allow_none else ''}, got {shown}")


FLOAT32_MAX = 3.4028234663852886e38  # float32's largest finite number
FLOAT32_TINY = 2.0 ** -149  # float32's smallest positive (subnormal) number
_F32_ZERO = 2.0 ** -150  # a magnitude up to this rounds to 0 in float32 (2**-150 itself too: ties to even)
_F32_INF = 2.0 ** 128 - 2.0 ** 103  # and from this on to inf (FLOAT32_MAX plus half its ulp)


def float32_finite(v, nonzero=False):
    """Whether the finite float v stays finite (and, with nonzero, non-zero) rounded to float32, the dtype the
    kernels and the float32 statistics use it in: eps = 1e-50 becomes 0, and 1e39 inf."""
    v = abs(float(v))  # (a numpy float32 would compare in float32)
    return v < _F32_INF and not (nonzero and v <= _F32_ZERO)


def finite(v):
    """math.isfinite for a float that may be symbolic (a SymFloat under torch.compile, where math.isfinite breaks
    the graph): comparisons trace, and NaN fails them."""
    return -math.inf < v < math.inf


def real_arg(name, v, *, positive=False, float32=False, why="", type_error=TypeError):
    """v as a float: a real number (Python or numpy; not a bool, which float() reads as 1.0 or 0.0), finite (an int
    past float's range too: float() raised OverflowError, naming nothing), > 0 with `positive`, and with `float32`
    also finite (and, positive, non-zero) rounded to float32, the dtype the kernels use it in (why: the note that says
    so, e.g. " for torch.float16 x"). A non-number is a `type_error` (ValueError where the caller raises it for every
    bad argument), a bad value a ValueError, each naming it."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise type_error(f"{name} must be a float, got {type(v).__name__}")
    try:
        f = float(v)
    except OverflowError:
        raise ValueError(f"{name} must be a finite float, got an int past float's range") from None
    if not finite(f) or (positive and f <= 0):
        raise ValueError(f"{name} must be a finite float{' > 0' if positive else ''}, got {v}")
    if float32 and not float32_finite(f, nonzero=positive):
        lo = f"{FLOAT32_TINY:.4g}.." if positive else "+-"
        raise ValueError(f"{name} must be within float32's range ({lo}{FLOAT32_MAX:.4g}){why}, got {v}")
    return f


def is_real(v, *, positive=False, float32=False):
    """Whether real_arg takes v: for a caller that words its own error (a config's field, a checkpoint's entry)."""
    try:
        real_arg("v", v, positive=positive, float32=float32)
    except (TypeError, ValueError):
        return False
    return True


def softcap_arg(softcap):
    """The tanh soft-capping value as a float (0.0: none), or an error naming `softcap`."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a float or None, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not (softcap >= 0 and finite(softcap)):
        raise ValueError(f"softcap must be a finite value >= 0 (0 or None: no capping), got {softcap}")
    if 0 < softcap < _MIN_SOFTCAP:  # (the kernels multiply by 1 / softcap: inf below it, then inf * 0 = NaN)
        raise ValueError(f"softcap must be 0 (no capping) or at least {_MIN_SOFTCAP:.3g} (float32's smallest normal "
                         f"number), got {softcap}")
    if softcap > _MAX_SOFTCAP:  # (inf in float32: tanh(s / inf) * inf = 0 * inf = NaN)
        raise ValueError(f"softcap must be at most {_MAX_SOFTCAP:.4g} (float32's largest number; 0 or None: no "
                         f"capping), got {softcap}")
    return softcap


_MIN_SOFTCAP = 2.0 ** -126
_MAX_SOFTCAP = FLOAT32_MAX


def dropout_p_arg(dropout_p):
    """dropout_p as a float in [0, 1), or an error naming it."""
    if isinstance(dropout_p, torch.Tensor) and dropout_p.numel() == 1:
        dropout_p = dropout_p.item()
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return p


def dropout_seed(seed, p, device):
    """The dropout seed as the int32 [2] device tensor the kernels read (None without dropout).

    None draws it with torch.randint on the device (no host sync; reproducible under
    torch.manual_seed; fine inside torch.compile and CUDA graphs); an int is split into two
    32-bit words; a tensor must hold the two words."""
    if isinstance(seed, torch.Tensor):  # (checked without dropout too: a bad seed is a bug either way)
        if seed.numel() != 2 or seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
            raise ValueError(f"seed must be an int or an integer tensor of 2 words, got {seed.dtype} "
                             f"{tuple(seed.shape)}")
    elif seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"seed must be an int or a tensor, got {type(seed).__name__}")
    if p <= 0:
        return None
    if seed is None:
        return torch.randint(0, 2**31 - 1, (2,), device=device, dtype=torch.int32)
    if isinstance(seed, torch.Tensor):
        return seed.reshape(2).to(device=device, dtype=torch.int32)
    from llmkern.reference.lora import seed_words_tensor

    return seed_words_tensor(seed, device)
