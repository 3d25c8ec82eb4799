"""Fused LoRA linear: public API, validation, registration, dispatch, autograd.

    lora_linear(x, W, b, A, B, s, p)        y = x Wᵀ + b + s · (dropout_p(x) Aᵀ) Bᵀ
    lora_linear_multi(x, W, b, A, B, s, ids) the same with a per-token adapter (ids = -1: base only)

Kernels: llmkern/kernels/lora.py (Triton; the low-rank update fused into the base GEMM, dropout
mask regenerated from a seed in the backward, multi-adapter batches in one launch per stage);
reference: llmkern/reference/lora.py. On CUDA the kernels run inside the torch.library ops
`llmkern::lora_fwd` / `llmkern::lora_bwd` (triton_op + register_autograd, so the op works under
torch.compile(fullgraph=True)). CPU tensors use the reference unless LLMKERN_BACKEND=triton, which
runs the same kernels under TRITON_INTERPRET=1 (float32/float16 only).
"""
import functools
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from llmkern import _backend
from llmkern.ops import _checks
from llmkern.ops.nf4 import NF4Weight, nf4_linear
from llmkern import reference as ref

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_RANK = 256


# ---- dispatch -----------------------------------------------------------------------------------

def _backend_for(device, dtype=torch.float32, op_name="lora_linear", *tensors):
    choice = _backend.choose_triton(op_name, device, dtype, _DTYPES)
    # CPU tensors under the interpreter run the kernels only in eager mode: traced (torch.compile, export) the
    # launcher would read fake tensors' data, so the reference (which traces) takes them, as DESIGN says
    if choice == "triton" and torch.device(device).type == "cpu" and not _checks.eager_fast_path(*tensors):
        return "reference"
    return choice


_backend.register_op("lora_linear", lambda device, dtype: _backend_for(device, dtype, "lora_linear"))
_backend.register_op("lora_linear_multi",
                     lambda device, dtype: _backend_for(device, dtype, "lora_linear_multi"))


# ---- validation ---------------------------------------------------------------------------------

_tensor = _checks.tensor_arg


def _check_common(x, weight, bias, lora_A, lora_B, multi):
    _tensor("x", x)
    if not isinstance(weight, NF4Weight):
        _tensor("weight", weight)
    _tensor("lora_A", lora_A)
    _tensor("lora_B", lora_B)
    if not x.is_floating_point() or x.dtype not in _DTYPES + (torch.float64,):
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape [..., in_features] with in_features >= 1, got {tuple(x.shape)}")
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight must have shape [out_features, {K}] (like nn.Linear.weight), "
                         f"got {tuple(weight.shape)}")
    N = weight.shape[0]
    if weight.dtype != x.dtype and not isinstance(weight, NF4Weight):  # NF4: dequantized to x's dtype
        raise ValueError(f"weight must have the dtype of x ({x.dtype}), got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if bias is not None:
        _tensor("bias", bias)
        if bias.shape != (N,):
            raise ValueError(f"bias must have shape [{N}], got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise ValueError(f"bias must have the dtype of x ({x.dtype}), got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    lead = "[n_adapters, " if multi else "["
    adim = 3 if multi else 2
    if lora_A.dim() != adim or lora_A.shape[-1] != K:
        raise ValueError(f"lora_A must have shape {lead}r, {K}], got {tuple(lora_A.shape)}")
    r = lora_A.shape[-2]
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"lora_A rank r must be in 1..{MAX_RANK}, got {r}")
    if lora_B.dim() != adim or lora_B.shape[-2:] != (N, r) or (multi and lora_B.shape[0] != lora_A.shape[0]):
        want = f"[{lora_A.shape[0]}, {N}, {r}]" if multi else f"[{N}, {r}]"
        raise ValueError(f"lora_B must have shape {want}, got {tuple(lora_B.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if multi and lora_A.shape[0] < 1:
        raise ValueError("lora_A must hold at least one adapter")


def _as_scalar(name, v):
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        _no_grad_arg(name, v)
        v = v.item()
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _no_grad_arg(name, t):
    """The ops give no gradient for the LoRA scale(s): a tensor that requires one is refused
    instead of silently getting None (or, on one backend, a gradient and on another none)."""
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} must not require grad (the op computes no gradient for it): pass a "
                         f"float or a detached tensor")


def _scalings_arg(scalings, n, device, dtype=torch.float32):
    """(scalings as a `dtype` [n] tensor on `device`, whether its values were checked here). dtype: float32, float64
    for float64 inputs. Element types are checked here; values (finite, and in float32's range unless float64) here
    too when they are on the host (a sequence, a CPU tensor: copied through pinned memory), else with the ids
    (see _ValueCheck), after the call's kernels are queued."""
    if isinstance(scalings, torch.Tensor):
        _no_grad_arg("scalings", scalings)
        if not (scalings.is_floating_point() or scalings.dtype in _INT_DTYPES):
            raise TypeError(f"scalings must be a real (floating-point or integer) tensor, got {scalings.dtype}")
        if scalings.shape != (n,):
            raise ValueError(f"scalings must have shape [{n}] (one per adapter), got {tuple(scalings.shape)}")
        if scalings.device != device and scalings.device.type != "cpu":
            raise ValueError(f"scalings is on {scalings.device} but x is on {device} (give them on {device}, on "
                             f"the CPU or as floats)")
        if scalings.device.type != "cpu" or not _checks.reading_values() or not _checks.has_values(scalings):
            return scalings.to(device=device, dtype=dtype), False
        items = scalings.tolist()
    else:
        try:
            if isinstance(scalings, (str, bytes)):
                raise TypeError
            items = list(scalings)
        except TypeError:
            raise TypeError(f"scalings must be a tensor or a sequence of floats, got {type(scalings).__name__}")
    vals = []
    for v in items:
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            _no_grad_arg("scalings", v)
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"scalings must hold real numbers, got {type(v).__name__}")
        _check_scale_value("scalings", v, dtype)
        vals.append(float(v))
    out = torch.tensor(vals, dtype=dtype)
    if out.shape != (n,):
        raise ValueError(f"scalings must have shape [{n}] (one per adapter), got {tuple(out.shape)}")
    return _checks.host_to_device(out, device), True


def _check_scale_value(name, v, dtype):
    """A LoRA scale the kernels use in float32 (float64 inputs: in float64) must be finite there: 1e39 became inf
    in float32 and the output inf / NaN. (NaN / inf worded as _as_scalar words them; the rest is real_arg's.)"""
    if not _checks.finite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    _checks.real_arg(name, v, float32=dtype != torch.float64, why=f" for {dtype} inputs")


_INT_DTYPES = (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8)


def _autocast_args(x, weight, bias):
    """Under torch.autocast, cast like F.linear would (to the autocast dtype); an NF4 weight stays as it
    is (the op dequantizes it to x's dtype)."""
    dt = _checks.autocast_dtype(x)
    if dt is None:
        return x, weight, bias
    return tuple(_checks.autocast_cast(dt, t) for t in (x, weight, bias))


_seed_tensor = _checks.dropout_seed


# ---- torch.library ops (CUDA path) -----------------------------------------------------------------

def _kern():
    from llmkern.kernels import lora as K
    return K


try:
    from torch.library import triton_op as _triton_op, wrap_triton as _wrap_triton
except ImportError:  # torch < 2.6: no triton_op; the CUDA path runs through _LoRAFunction
    _triton_op = None
    _wrap_triton = None

def _fwd_impl(x, weight, bias, lora_A, lora_B, scalings, scaling, perm, sorted_ids, seg, dropout_p, seed,
              nf4_absmax=None, nf4_pairs=None, nf4_blocksize=0, nf4_state2=None, wrap=None):
    """(y, xs): the forward kernels (wrap: wrap_triton while the custom op is traced)."""
    W = _weight_operand(weight, nf4_absmax, nf4_pairs, nf4_blocksize, nf4_state2, lora_B.shape[1], x.shape[1])
    return _kern().lora_forward(x, W, bias, lora_A, lora_B, scaling, scalings, perm, sorted_ids, dropout_p, seed,
                                wrap=wrap)


def _bwd_impl(dy, x, weight, lora_A, lora_B, xs, scalings, scaling, perm, sorted_ids, seg, dropout_p, seed,
              nf4_absmax=None, nf4_pairs=None, nf4_blocksize=0, nf4_state2=None, wrap=None):
    """(dx, dA, dB): the backward kernels."""
    W = _weight_operand(weight, nf4_absmax, nf4_pairs, nf4_blocksize, nf4_state2, lora_B.shape[1], x.shape[1])
    return _kern().lora_backward(dy, x, W, lora_A, lora_B, xs, scaling, scalings, perm, sorted_ids, seg,
                                 dropout_p, seed, wrap=wrap)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scalings, scaling, perm, sorted_ids, seg, p, seed, *nf4 = inputs
    absmax, pairs, blocksize, state2 = nf4 if nf4 else (None, None, 0, None)
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], scalings, perm, sorted_ids, seg, seed,
                          absmax, pairs, state2)
    ctx.scaling, ctx.p, ctx.nf4_blocksize = scaling, p, blocksize
    ctx.has_bias = bias is not None


def _backward(ctx, dy, _dxs, bwd=None):
    x, weight, lora_A, lora_B, xs, scalings, perm, sorted_ids, seg, seed, absmax, pairs, state2 = ctx.saved_tensors
    dy = dy.contiguous()
    dx, dA, dB = (bwd or torch.ops.llmkern.lora_bwd)(dy, x, weight, lora_A, lora_B, xs, scalings, ctx.scaling,
                                                     perm, sorted_ids, seg, ctx.p, seed, absmax, pairs,
                                                     ctx.nf4_blocksize, state2)
    dW = dy.t().mm(x) if ctx.needs_input_grad[1] else None
    db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dW, db, dA, dB, None, None, None, None, None, None, None, None, None, None, None


_HAVE_OPS = False
if _triton_op is not None and _backend.triton_available():
    @_triton_op("llmkern::lora_fwd", mutates_args=())
    def _lora_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     lora_A: torch.Tensor, lora_B: torch.Tensor, scalings: Optional[torch.Tensor],
                     scaling: float, perm: Optional[torch.Tensor], sorted_ids: Optional[torch.Tensor],
                     seg: Optional[torch.Tensor], dropout_p: float, seed: Optional[torch.Tensor],
                     nf4_absmax: Optional[torch.Tensor] = None, nf4_pairs: Optional[torch.Tensor] = None,
                     nf4_blocksize: int = 0, nf4_state2: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        return _fwd_impl(x, weight, bias, lora_A, lora_B, scalings, scaling, perm, sorted_ids, seg, dropout_p, seed,
                         nf4_absmax, nf4_pairs, nf4_blocksize, nf4_state2, wrap=_wrap_triton)

    @_triton_op("llmkern::lora_bwd", mutates_args=())
    def _lora_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                     lora_B: torch.Tensor, xs: torch.Tensor, scalings: Optional[torch.Tensor],
                     scaling: float, perm: Optional[torch.Tensor], sorted_ids: Optional[torch.Tensor],
                     seg: Optional[torch.Tensor], dropout_p: float, seed: Optional[torch.Tensor],
                     nf4_absmax: Optional[torch.Tensor] = None, nf4_pairs: Optional[torch.Tensor] = None,
                     nf4_blocksize: int = 0, nf4_state2: Optional[torch.Tensor] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _bwd_impl(dy, x, weight, lora_A, lora_B, xs, scalings, scaling, perm, sorted_ids, seg, dropout_p,
                         seed, nf4_absmax, nf4_pairs, nf4_blocksize, nf4_state2, wrap=_wrap_triton)

    _lora_fwd_op.register_autograd(_backward, setup_context=_setup_context)
    _HAVE_OPS = True


def _weight_operand(weight, absmax, pairs, blocksize, state2, N, K):
    """What the kernels take as W: the dense weight, or (absmax given) the NF4 codes in `weight`."""
    if absmax is None:
        return weight
    from llmkern.kernels.nf4 import NF4Operand

    return NF4Operand(weight, absmax, pairs, (N, K), blocksize, state2=state2)


# The same kernels without the custom op's dispatch: eager calls, CPU tensors under TRITON_INTERPRET=1,
# torch < 2.6. A double backward raises, as through the op (the kernels' gradients are not differentiable).
_LoRAFunction = _checks.eager_twin("_LoRAFunction", _fwd_impl, _setup_context,
                                   functools.partial(_backward, bwd=_bwd_impl),
                                   "The eager twin of llmkern::lora_fwd / lora_bwd.", materialize_grads=False)


def _gemm_layout(weight):
    """The dense weight as the kernels take it: row-major [out, in], or the transpose of a row-major [in, out]
    tensor (GPT-2's Conv1D weight seen as [out, in]): the GEMM reads W through its strides (the backward
    already reads Wᵀ so), which saves a copy of the weight per call; other layouts are copied."""
    return weight if weight.is_contiguous() or weight.t().is_contiguous() else weight.contiguous()


def _run_triton(x2, weight, bias, A3, B3, scalings, scaling, perm, sorted_ids, seg, p, seed):
    if isinstance(weight, NF4Weight):  # the codes go in weight's place, with the scales after the seed
        nf4 = (weight.absmax, weight.pairs, weight.blocksize, weight.state2)
        weight = weight.packed.contiguous()
    else:
        nf4 = (None, None, 0, None)
        weight = _gemm_layout(weight)
    args = (x2, weight, None if bias is None else bias.contiguous(), A3.contiguous(),
            B3.contiguous(), scalings, scaling, perm, sorted_ids, seg, p, seed, *nf4)
    # the custom op where torch.compile traces; eager calls skip its dispatch (see eager_fast_path)
    if x2.device.type == "cuda" and _HAVE_OPS and not _checks.eager_fast_path(*args[:6]):
        return torch.ops.llmkern.lora_fwd(*args)[0]
    return _LoRAFunction.apply(*args)[0]


# ---- public API ---------------------------------------------------------------------------------

def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                dropout_p: float = 0.0, *, seed: Union[int, torch.Tensor, None] = None) -> torch.Tensor:
    """LoRA linear layer, fused: ``y = x Wᵀ + b + scaling · (dropout(x) Aᵀ) Bᵀ``.

    Args:
        x: ``[..., in]`` float32 / float16 / bfloat16.
        weight: ``[out, in]`` (nn.Linear layout), dtype of x. Its gradient is computed only when
            ``weight.requires_grad`` (the usual frozen base gives none). Or an ``NF4Weight``
            (``llmkern.nf4_quantize``, QLoRA's frozen 4-bit base): the kernels then read W in 4 bits and
            dequantize it on chip (or, for many rows, in one pass into a temporary that is freed at once;
            see llmkern/kernels/nf4.py); no dense copy is kept for the backward.
        bias: ``[out]`` or None.
        lora_A: ``[r, in]``, lora_B: ``[out, r]`` (PEFT layout), 1 <= r <= 256. Cast to x's dtype
            when they differ.
        scaling: the LoRA scale (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA): a finite float or a
            one-element tensor that does not require grad (the op gives no gradient for it).
        dropout_p: dropout on the LoRA branch input, in [0, 1). The mask is a hash of
            (seed, row, column), regenerated in the backward rather than stored.
        seed: dropout seed: an int, or an int32 tensor of two words (default: drawn on x's device
            with torch.randint, so torch.manual_seed makes runs reproducible and no host sync
            happens). ``llmkern.reference.lora_dropout(x, p, seed)`` gives the same mask.

    Returns ``[..., out]`` in x's dtype (accumulated in float32). Never forms ``B A``. Under
    ``torch.autocast`` the inputs are cast to the autocast dtype first, as ``F.linear`` would be.
    """
    x, weight, bias = _autocast_args(x, weight, bias)
    _check_common(x, weight, bias, lora_A, lora_B, multi=False)
    scaling = _as_scalar("scaling", scaling)
    _check_scale_value("scaling", scaling, torch.float64 if x.dtype == torch.float64 else torch.float32)
    p = _as_scalar("dropout_p", dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    seed_t = _seed_tensor(seed, p, x.device)
    lora_A = lora_A.to(x.dtype)
    lora_B = lora_B.to(x.dtype)
    backend = _backend_for(x.device, x.dtype, "lora_linear", x)
    if backend == "reference" or x.numel() == 0:
        if isinstance(weight, NF4Weight):  # the base through nf4_linear: only the codes kept for the backward
            return nf4_linear(x, weight, bias) + ref.lora_delta(x, lora_A, lora_B, scaling, p,
                                                                0 if seed_t is None else seed_t)
        return ref.lora_linear(x, weight, bias, lora_A, lora_B, scaling, p, 0 if seed_t is None else seed_t)
    shape = x.shape
    nf4 = isinstance(weight, NF4Weight)  # always fused: the cuBLAS path would keep a dense copy for the backward
    if not nf4 and not fused_pays(x.numel() // shape[-1], weight.shape[0], shape[-1], x.device):
        return lora_linear_cublas(x, weight, bias, lora_A, lora_B, scaling, p, seed_t)
    x2 = x.reshape(-1, shape[-1])
    y = _run_triton(x2, weight, bias, lora_A.unsqueeze(0), lora_B.unsqueeze(0), None, scaling,
                    None, None, None, p, seed_t)
    return y.reshape(*shape[:-1], weight.shape[0])


FUSED_MIN_MNK = 2 ** 35


def fused_pays(M, N, K, device):
    """Whether an eager CUDA call runs the fused Triton kernels rather than `lora_linear_cublas`.

    A fused forward+backward makes six Triton launches, whose host time (Python, launcher) was
    measured at several hundred µs per layer on an H100 machine; a small layer's kernels finish
    sooner than that, so the step waits on the host (a GPT-2 124M LoRA step, M=8192, K=N=768, took
    57 ms against 28 ms for plain PyTorch LoRA). The bound M·N·K = 2^35 is an estimate, not yet a
    measurement: there the fused kernels' GPU time (about 6·M·N·K / 600 TFLOP/s) is some 0.35 ms, the
    order of that host time; above it the fused kernels' fewer memory passes should win
    (`benchmarks/gpu_diag.py host` times a GPT-2-size layer both ways). Under torch.compile the op is
    always fused (Inductor launches it, with CUDA graphs at no host cost). LLMKERN_LORA_FUSED_MIN_MNK
    overrides the bound (0: always fused)."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return True
    return M * N * K >= fused_min_mnk()


def fused_min_mnk():
    """The bound of fused_pays: LLMKERN_LORA_FUSED_MIN_MNK, or FUSED_MIN_MNK."""
    return _backend.env_count("LLMKERN_LORA_FUSED_MIN_MNK", FUSED_MIN_MNK, " (0: always fused)")


def lora_linear_cublas(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, seed=None):
    """The same layer as three cuBLAS products under autograd (``addmm`` folds the low-rank term into
    the base output: no extra pass over y), with the fused op's dropout mask (see lora_dropout).
    What small layers run (see fused_pays); any device."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    y = F.linear(x2, weight, bias)
    xd = x2 if dropout_p <= 0 else ref.lora_dropout(x2, dropout_p, seed)
    y = torch.addmm(y, F.linear(xd, lora_A), lora_B.t(), alpha=scaling)
    return y.reshape(*shape[:-1], weight.shape[0])


def lora_linear_multi(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      lora_A: torch.Tensor, lora_B: torch.Tensor,
                      scalings: Union[torch.Tensor, Sequence[float]],
                      adapter_ids: torch.Tensor) -> torch.Tensor:
    """Mixed-adapter LoRA linear: token m uses adapter ``adapter_ids[m]`` (-1: base model only).

    Args:
        x: ``[..., in]``; weight ``[out, in]`` or an ``NF4Weight`` (see lora_linear); bias ``[out]`` or None.
        lora_A: ``[n, r, in]``, lora_B: ``[n, out, r]`` (adapters stacked; pad smaller ranks
            with zeros), scalings: ``[n]`` tensor on x's device or the CPU (not requiring grad: the
            op gives no gradient for it) or sequence of floats, all finite (within float32's range
            unless x is float64).
        adapter_ids: integer tensor with one id per token (shape ``x.shape[:-1]`` or ``[M]``),
            values in ``[-1, n)``, on x's device or on the CPU. The values of ids and of a scalings
            tensor are checked (ValueError) except while compiling or capturing a CUDA graph
            (out-of-range ids then act as -1). Ids on x's CUDA device are read after this call's
            kernels are queued: still one host wait per call, so the GPU queue never runs more than
            one layer ahead. Ids on the CPU (what a serving loop builds on the host) are checked
            there, before any launch, and copied asynchronously: no wait; likewise scalings given as
            floats, checked on the host.

    One launch per stage for the whole mixed batch (tokens are processed in adapter-sorted order,
    sorted on the device). Differentiable in x, weight, bias, lora_A and lora_B.
    """
    x, weight, bias = _autocast_args(x, weight, bias)
    _check_common(x, weight, bias, lora_A, lora_B, multi=True)
    n = lora_A.shape[0]
    M = x.numel() // x.shape[-1]
    # (float64 inputs run the reference in float64: a float32 scale cost them 1e-8 relative)
    scalings, scalings_checked = _scalings_arg(scalings, n, x.device,
                                               torch.float64 if x.dtype == torch.float64 else torch.float32)
    _tensor("adapter_ids", adapter_ids)
    if adapter_ids.dtype not in _INT_DTYPES:
        raise ValueError(f"adapter_ids must be an integer tensor, got {adapter_ids.dtype}")
    # exactly x's token dims or flat: ids [T, B] for x [B, T, in] has the right count but maps
    # every id to the wrong token
    if adapter_ids.shape != x.shape[:-1] and adapter_ids.shape != (M,):
        raise ValueError(f"adapter_ids must hold one id per token: shape {tuple(x.shape[:-1])} or [{M}], "
                         f"got shape {tuple(adapter_ids.shape)}")
    host_ids = adapter_ids.device != x.device and adapter_ids.device.type == "cpu"
    if adapter_ids.device != x.device and not host_ids:
        raise ValueError(f"adapter_ids is on {adapter_ids.device} but x is on {x.device}"
                         + ("" if x.device.type == "cpu" else f" (give them on {x.device} or on the CPU)"))
    ids = adapter_ids.reshape(-1)
    # The value checks (skipped inside _checks.trusted(): the PEFT integration builds its ids in [-1, n) on the
    # host and passes floats). Reading device values waits for the layer's queued work on CUDA, once per call:
    # host ids are checked on the host, before any launch, and host scalings (floats, a CPU tensor) by _scalings_arg.
    check = None
    if _checks.reading_values():
        check = _ValueCheck(None if host_ids else ids, n, None if scalings_checked else scalings)
        if host_ids and ids.numel() and _checks.has_values(ids):
            _check_id_range(*torch.aminmax(ids), n)
    if host_ids:
        ids = _checks.host_to_device(ids, x.device)
    y = _lora_multi(x, weight, bias, lora_A, lora_B, scalings, ids, n, M)
    if check is not None:
        check.finish()
    return y


def _check_id_range(lo, hi, n):
    lo, hi = int(lo), int(hi)
    if lo < -1 or hi >= n:
        raise ValueError(f"adapter_ids must be in [-1, {n}), got values in [{lo}, {hi}]")


class _ValueCheck:
    """The range check of device adapter_ids and the finiteness check of a scalings tensor without
    stalling the GPU (see _checks.DeferredRead): the values are read after the call's kernels are
    queued. Out-of-range ids act as -1 in the kernels, so reading the result late never touches
    memory out of bounds; the call still raises instead of returning. ids / scalings: None when
    checked on the host already (see lora_linear_multi)."""

    def __init__(self, ids, n, scalings):
        # (meta and fake tensors have no values to read: .tolist() raised "Cannot copy out of meta tensor")
        ids = None if ids is not None and not _checks.has_values(ids) else ids
        scalings = None if scalings is not None and not _checks.has_values(scalings) else scalings
        self.n, self.scalings, self.read = n, scalings, None
        parts = [] if scalings is None else [(~torch.isfinite(scalings)).sum().reshape(1)]
        self.has_ids = ids is not None and ids.numel() > 0
        if self.has_ids:
            parts.append(torch.stack(torch.aminmax(ids)).to(torch.int64))
        if parts:
            self.read = _checks.DeferredRead(torch.cat(parts))
            if self.read.ready:
                self.finish()

    def finish(self):
        if self.read is None:
            return
        vals = self.read.values()
        if self.scalings is not None and vals[0]:
            raise ValueError(f"scalings must be finite, got {self.scalings.tolist()}")
        if self.has_ids:
            _check_id_range(vals[-2], vals[-1], self.n)


def _lora_multi(x, weight, bias, lora_A, lora_B, scalings, ids, n, M):
    lora_A = lora_A.to(x.dtype)
    lora_B = lora_B.to(x.dtype)
    backend = _backend_for(x.device, x.dtype, "lora_linear_multi", x)
    if backend == "reference" or M == 0:
        if isinstance(weight, NF4Weight):  # as in lora_linear: the base keeps only the codes
            y = nf4_linear(x, weight, bias).reshape(M, weight.shape[0])
            # (out_features named: reshape(..., -1) of an empty batch is ambiguous and raised)
            return ref.add_lora_multi(y, x, lora_A, lora_B, scalings, ids).reshape(*x.shape[:-1], weight.shape[0])
        return ref.lora_linear_multi(x, weight, bias, lora_A, lora_B, scalings, ids)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    from llmkern.kernels._common import sort_segments  # (Triton is imported only on the Triton path)

    sorted_ids, perm, seg = sort_segments(ids, n)
    y = _run_triton(x2, weight, bias, lora_A, lora_B, scalings, 1.0, perm, sorted_ids, seg, 0.0, None)
    return y.reshape(*shape[:-1], weight.shape[0])
