"""4-bit NF4 weights (QLoRA): the frozen base weight of a LoRA layer stored in 4 bits.

    qw = llmkern.nf4_quantize(linear.weight, blocksize=64)     # NF4Weight: 0.5 byte/param + 4 B/block
    y = llmkern.lora_linear(x, qw, bias, A, B, scaling)        # the fused LoRA op reads W in 4 bits
    W = llmkern.nf4_dequantize(qw, torch.bfloat16)             # the dense weight, when needed
    y = llmkern.nf4_linear(x, qw, bias)                        # a 4-bit layer without an adapter

The layout is bitsandbytes' (see llmkern/reference/nf4.py), so `NF4Weight.from_bnb(param)` reads a
`bnb.nn.Params4bit` (an NF4 `Linear4bit` weight, double-quantized or not) without copying its codes, and
`nf4_quantize` gives the bytes bitsandbytes' quantize_4bit gives. Kernels: llmkern/kernels/nf4.py (the
dequantization inside the LoRA GEMM's main loop, and a standalone dequantization pass).
"""
import functools
import numbers
from typing import Optional

import torch

from llmkern import _backend
from llmkern.ops import _checks
from llmkern.reference import nf4 as ref

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the kernels'
# what an NF4 weight dequantizes to and computes in: the kernels' dtypes, and float64 through the PyTorch reference
# (no kernel; as lora_linear takes float64: a QLoRA model cast with .double(), e.g. for gradcheck)
_COMPUTE_DTYPES = _DTYPES + (torch.float64,)

for _name in ("nf4_dequantize", "nf4_linear"):
    _backend.register_op(_name, lambda device, dtype, _name=_name: _backend.choose_triton(_name, device, dtype,
                                                                                          _DTYPES))


_MAX_BLOCKSIZE = 2**30


def _check_blocksize(blocksize):
    """blocksize as a Python int, or a ValueError. A power of two, as bitsandbytes' are: the kernels then find an
    element's block with a shift. At most 2**30: the weight is padded to whole blocks (2**40 asked the allocator for
    4 TiB and raised its RuntimeError). Any integer type (a numpy 64 was refused as "not a power of two")."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral) or not 2 <= blocksize <= \
            _MAX_BLOCKSIZE or int(blocksize) & (int(blocksize) - 1):
        raise ValueError(f"blocksize must be a power of two in 2..2**30 (bitsandbytes uses 64), got {blocksize!r}")
    return int(blocksize)


def _shape_arg(shape):
    """shape as two ints (a tuple, torch.Size, list, tensor or array of integers; integral floats, which worked, too),
    or an error naming it: a non-integral 6.5 was truncated to 6, a bool read as 1, and a bare int or a string raised
    Python's own TypeError / ValueError."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be a pair [out_features, in_features], got {type(shape).__name__}") from None
    out = []
    for s in dims:
        if isinstance(s, torch.Tensor) and s.dim() == 0 and s.dtype != torch.bool:
            s = s.item()
        if isinstance(s, (numbers.Integral, torch.SymInt)) and not isinstance(s, bool):
            out.append(int(s))
        elif isinstance(s, numbers.Real) and not isinstance(s, bool) and float(s).is_integer():
            out.append(int(s))
        else:
            raise ValueError(f"shape must be a pair of ints [out_features, in_features], got {shape!r}")
    if len(out) != 2 or min(out) < 1:
        raise ValueError(f"shape must be [out_features, in_features] with both >= 1, got {tuple(out)}")
    return out


class NF4Weight:
    """A frozen linear weight ``[out_features, in_features]`` in 4-bit NormalFloat (bitsandbytes layout).

    packed: uint8, ``ceil(N·K / 2)`` bytes (two codes per byte, the first in the high nibble; bnb's
    ``[n, 1]`` shape is accepted); absmax: the scale of each block of ``blocksize`` consecutive elements,
    ``[ceil(N·K / blocksize)]``: float32, or with double quantization (``nested``) uint8 codes;
    nested: None, or ``(code_map [256] fp32, absmax2 fp32 [ceil(n_blocks / 256)], offset)`` decoding
    them (see llmkern.reference.nf4), or those three as one float32 tensor ``[code_map | offset | absmax2]``
    (the kernels' layout, ``.state2``: used as it is, not copied); dtype: the dtype ``dequantize()`` returns by
    default (the original weight's). Not a tensor and not trainable: it is the frozen base of a (Q)LoRA layer.
    """

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64,
                 dtype: torch.dtype = torch.float32, *, nested=None):
        _checks.tensor_arg("packed", packed)
        _checks.tensor_arg("absmax", absmax)
        N, K = _shape_arg(shape)
        blocksize = _check_blocksize(blocksize)
        if dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype}")
        if packed.dtype != torch.uint8 or packed.numel() != -(-N * K // 2):
            raise ValueError(f"packed must be uint8 with ceil({N}·{K} / 2) = {-(-N * K // 2)} elements, got "
                             f"{packed.dtype} with {packed.numel()}")
        nblocks = -(-N * K // blocksize)
        want = torch.uint8 if nested is not None else torch.float32
        if absmax.dtype != want or absmax.numel() != nblocks:
            kind = "uint8 (double-quantized codes)" if nested is not None else "float32"
            raise ValueError(f"absmax must be {kind} with ceil({N}·{K} / {blocksize}) = {nblocks} elements, got "
                             f"{absmax.dtype} with {absmax.numel()}")
        if absmax.device != packed.device:
            raise ValueError(f"absmax is on {absmax.device} but packed is on {packed.device}")
        self.packed = packed.reshape(-1).contiguous()
        self.absmax = absmax.reshape(-1).contiguous()
        # the double-quantization state as one fp32 tensor [code_map | offset | absmax2] (what the kernels
        # read), and `nested` as views of it
        # (the tables made here outside inference mode: a weight built under it, e.g. use_fused_lora's cache at an
        # evaluation, is kept for later training steps, which save them for the backward)
        with torch.inference_mode(False):
            self.state2 = None if nested is None else _state2_arg(nested, nblocks, packed.device)
            # the kernels' level-pair table, made here (not per call, and not while torch.compile traces a call)
            self.pairs = ref.level_pairs(self.packed.device)
        self.nested = None if nested is None else (self.state2[:256], self.state2[257:], self.state2[256])
        self.shape = torch.Size((N, K))
        self.blocksize = blocksize
        self.dtype = dtype

    out_features = property(lambda self: self.shape[0])
    in_features = property(lambda self: self.shape[1])
    device = property(lambda self: self.packed.device)
    requires_grad = False

    def dim(self):
        return 2

    @property
    def nbytes(self):
        """Bytes of the codes and scales (the shared level tables not counted)."""
        extra = 0 if self.state2 is None else 4 * self.state2.numel()
        return self.packed.numel() + self.absmax.numel() * self.absmax.element_size() + extra

    def scales(self) -> torch.Tensor:
        """The fp32 absmax of every block (double quantization decoded)."""
        return ref.block_scales(self.absmax, self.state2)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weight ``[N, K]`` in `dtype` (default: self.dtype). See nf4_dequantize."""
        return nf4_dequantize(self, dtype)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "NF4Weight":
        """The same codes on `device` (dtype: the default dequantization dtype)."""
        return NF4Weight(self.packed.to(device), self.absmax.to(device), self.shape, self.blocksize,
                         dtype or self.dtype, nested=None if self.state2 is None else self.state2.to(device))

    def operand(self):
        """The LoRA launchers' view of this weight (llmkern.kernels.nf4.NF4Operand)."""
        from llmkern.kernels.nf4 import NF4Operand

        return NF4Operand(self.packed, self.absmax, self.pairs, self.shape, self.blocksize, state2=self.state2)

    @classmethod
    def from_bnb(cls, weight, dtype: Optional[torch.dtype] = None) -> "NF4Weight":
        """An NF4Weight over a bitsandbytes ``Params4bit`` (``Linear4bit.weight``) of quant_type "nf4": the
        codes and scales are shared, not copied (a double-quantized absmax stays in 8 bits)."""
        state = getattr(weight, "quant_state", None)
        if state is None:
            raise ValueError("weight must be a bitsandbytes Params4bit with a quant_state (quantized: moved to "
                             "its device), got " + type(weight).__name__)
        if getattr(state, "quant_type", "nf4") != "nf4":
            raise ValueError(f"only NF4 weights are supported, got quant_type={state.quant_type!r}")
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError("weight was repacked by bitsandbytes for its CPU inference kernel (packing_format_for_cpu;"
                             " a Linear4bit run in eval mode on CPU): its bytes are not the NF4 layout; take the "
                             "layer before its first CPU forward in eval mode")
        nested = None
        if getattr(state, "nested", False):
            inner = state.state2
            if int(inner.blocksize) != ref.BLOCKSIZE2:
                raise ValueError(f"double quantization with {inner.blocksize} scales per group is not supported "
                                 f"(only {ref.BLOCKSIZE2}, bitsandbytes' default)")
            nested = (inner.code, inner.absmax, state.offset)
        return cls(_bnb_code_bytes(weight.data), state.absmax, tuple(state.shape), int(state.blocksize),
                   dtype or state.dtype, nested=nested)

    def __repr__(self):
        dq = ", double_quant=True" if self.nested is not None else ""
        return (f"NF4Weight(shape={tuple(self.shape)}, blocksize={self.blocksize}{dq}, dtype={self.dtype}, "
                f"device={self.device})")


def _bnb_code_bytes(data):
    """The packed NF4 bytes of a Params4bit's data. bitsandbytes' `quant_storage` (bnb_4bit_quant_storage, e.g.
    bfloat16 so that FSDP can shard 4-bit weights with the 16-bit ones) stores the same bytes reinterpreted as that
    dtype; they are read back through a uint8 view (no copy), as bitsandbytes' own dequantization does. (Refused
    before as "packed must be uint8", naming neither the storage dtype nor a way out.)"""
    if not isinstance(data, torch.Tensor) or data.dtype == torch.uint8:
        return data
    if data.is_complex() or data.dtype == torch.bool or not data.is_contiguous():
        raise ValueError(f"weight's quant_storage must be a contiguous uint8 or float/int tensor holding the packed "
                         f"NF4 bytes, got {data.dtype} (contiguous: {data.is_contiguous()})")
    return data.reshape(-1).view(torch.uint8)


def _state2_arg(nested, nblocks, device):
    """The float32 [code_map (256) | offset (1) | absmax2] tensor of `nested` (a tensor of that layout, used as
    it is, or a (code_map, absmax2, offset) tuple, concatenated), checked."""
    groups = -(-nblocks // ref.BLOCKSIZE2)
    if isinstance(nested, torch.Tensor):
        state2 = nested
        if state2.dtype != torch.float32 or state2.dim() != 1 or state2.device != device:
            raise ValueError(f"nested as a tensor must be 1-D float32 on {device}, got {state2.dtype} "
                             f"{tuple(state2.shape)} on {state2.device}")
    else:
        try:
            code_map, absmax2, offset = nested
        except (TypeError, ValueError):
            raise ValueError("nested must be (code_map, absmax2, offset) or their float32 concatenation "
                             "[code_map | offset | absmax2]") from None
        code_map, absmax2, offset = (torch.as_tensor(t, dtype=torch.float32, device=device).reshape(-1)
                                     for t in (code_map, absmax2, offset))
        if code_map.numel() != 256 or offset.numel() != 1:
            raise ValueError(f"nested: code_map must have 256 entries and offset 1, got {code_map.numel()} and "
                             f"{offset.numel()}")
        state2 = torch.cat([code_map, offset, absmax2])
    if state2.numel() != 257 + groups:
        raise ValueError(f"nested: 256 map entries, the offset and ceil({nblocks} / {ref.BLOCKSIZE2}) = {groups} "
                         f"second-level scales make {257 + groups} values, got {state2.numel()}")
    return state2


def nf4_quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """Quantize a linear weight ``[out, in]`` to NF4 (round to the nearest of 16 levels, one absmax per
    `blocksize` consecutive elements): the same bytes as bitsandbytes' ``quantize_4bit(w, blocksize,
    quant_type="nf4")``. ``double_quant=True`` stores the absmax in 8 bits too (QLoRA's double
    quantization: 4.127 bits per weight instead of 4.5 at blocksize 64). Any device; the dtype of `weight`
    becomes the default dequantization dtype."""
    _checks.tensor_arg("weight", weight)
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty [out_features, in_features] tensor, got shape "
                         f"{tuple(weight.shape)}")
    if weight.dtype not in _DTYPES:
        raise ValueError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    blocksize = _check_blocksize(blocksize)
    if not torch.isfinite(weight).all():
        raise ValueError("weight must be finite to quantize it (it holds inf or NaN)")
    double_quant = _checks.bool_arg("double_quant", double_quant)  # (a string "False" was read as True)
    packed, absmax = ref.nf4_quantize(weight, blocksize)
    if not double_quant:
        return NF4Weight(packed, absmax, weight.shape, blocksize, weight.dtype)
    codes, code_map, absmax2, offset = ref.quantize_absmax(absmax)
    return NF4Weight(packed, codes, weight.shape, blocksize, weight.dtype, nested=(code_map, absmax2, offset))


def nf4_dequantize(qweight: NF4Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The dense weight ``[N, K]`` of an NF4Weight in `dtype` (default: its own): one Triton pass on CUDA
    (reads 0.5 B, writes 2 B per element), the reference on CPU."""
    if not isinstance(qweight, NF4Weight):
        raise TypeError(f"qweight must be an NF4Weight (llmkern.nf4_quantize), got {type(qweight).__name__}")
    dtype = qweight.dtype if dtype is None else dtype  # (not `dtype or`: a falsy 0 or "" took the default)
    if dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype}")
    if _backend.choose_triton("nf4_dequantize", qweight.device, dtype, _DTYPES) == "reference":
        return ref.nf4_dequantize(qweight.packed, qweight.scales(), qweight.shape, qweight.blocksize, dtype)
    from llmkern.kernels.nf4 import dequantize

    return dequantize(qweight.operand(), dtype)


# ---- nf4_linear: a frozen 4-bit layer without an adapter --------------------------------------------

def _matmul_impl(x2, packed, absmax, pairs, state2, bias, shape, blocksize, transposed):
    """x2 Wᵀ + bias (or, transposed, x2 W: the backward's dx) with W [N, K] = shape in NF4."""
    if _backend.choose_triton("nf4_linear", x2.device, x2.dtype, _DTYPES) != "triton":
        W = ref.nf4_dequantize(packed, ref.block_scales(absmax, state2), shape, blocksize, x2.dtype)
        return torch.nn.functional.linear(x2, W.t() if transposed else W, bias)
    from llmkern.kernels.lora import base_matmul
    from llmkern.kernels.nf4 import NF4Operand

    return base_matmul(x2, NF4Operand(packed, absmax, pairs, shape, blocksize, transposed, state2), bias)


@torch.library.custom_op("llmkern::nf4_linear_fwd", mutates_args=())
def _nf4_fwd_op(x2: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, pairs: torch.Tensor,
                state2: Optional[torch.Tensor], bias: Optional[torch.Tensor], out_features: int,
                blocksize: int) -> torch.Tensor:
    return _fwd_impl(x2, packed, absmax, pairs, state2, bias, out_features, blocksize)


@_nf4_fwd_op.register_fake
def _(x2, packed, absmax, pairs, state2, bias, out_features, blocksize):
    return x2.new_empty((x2.shape[0], out_features))


@torch.library.custom_op("llmkern::nf4_linear_bwd", mutates_args=())
def _nf4_bwd_op(dy: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, pairs: torch.Tensor,
                state2: Optional[torch.Tensor], in_features: int, blocksize: int) -> torch.Tensor:
    return _bwd_impl(dy, packed, absmax, pairs, state2, in_features, blocksize)


@_nf4_bwd_op.register_fake
def _(dy, packed, absmax, pairs, state2, in_features, blocksize):
    return dy.new_empty((dy.shape[0], in_features))


def _setup_context(ctx, inputs, output):
    x2, packed, absmax, pairs, state2, bias, _, blocksize = inputs
    ctx.save_for_backward(packed, absmax, pairs, state2)  # the codes, never a dense W
    ctx.in_features, ctx.blocksize, ctx.has_bias = x2.shape[1], blocksize, bias is not None


def _backward(ctx, dy, bwd=None):
    packed, absmax, pairs, state2 = ctx.saved_tensors
    dy = dy.contiguous()
    dx = (bwd or _nf4_bwd_op)(dy, packed, absmax, pairs, state2, ctx.in_features, ctx.blocksize)
    db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[5] else None
    return dx, None, None, None, None, db, None, None


_nf4_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _bwd_impl(dy, packed, absmax, pairs, state2, in_features, blocksize):
    return _matmul_impl(dy, packed, absmax, pairs, state2, None, (dy.shape[1], in_features), blocksize, True)


def _fwd_impl(x2, packed, absmax, pairs, state2, bias, out_features, blocksize):
    return _matmul_impl(x2, packed, absmax, pairs, state2, bias, (out_features, x2.shape[1]), blocksize, False)


_NF4LinearFunction = _checks.eager_twin("_NF4LinearFunction", _fwd_impl, _setup_context,
                                        functools.partial(_backward, bwd=_bwd_impl),
                                        "The eager twin of llmkern::nf4_linear_fwd / _bwd.")


def nf4_linear(x: torch.Tensor, qweight: NF4Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y = x Wᵀ + b`` with a frozen 4-bit weight (an NF4Weight): the base layers of a QLoRA model that
    carry no adapter. Differentiable in x and bias; W has no gradient.

    What autograd keeps for the backward is the 4-bit codes (``F.linear(x, nf4_dequantize(qw), b)`` would
    keep a dense copy of W per layer until the backward: the memory QLoRA exists to save). The backward
    dequantizes again. On CUDA: the LoRA GEMM kernel with an empty rank for few rows (W dequantized in its
    main loop), one dequantization pass + cuBLAS for many (see llmkern/kernels/nf4.py); on CPU the
    reference. x: ``[..., in]`` float32 / float16 / bfloat16, or float64 (the reference: no kernel) (under
    autocast: cast to its dtype);
    bias: ``[out]`` in x's dtype or None. Returns ``[..., out]`` in x's dtype.
    """
    _checks.tensor_arg("x", x)
    if not isinstance(qweight, NF4Weight):
        raise TypeError(f"qweight must be an NF4Weight (llmkern.nf4_quantize), got {type(qweight).__name__}")
    dt = _checks.autocast_dtype(x)
    if dt is not None:
        x, bias = _checks.autocast_cast(dt, x), _checks.autocast_cast(dt, bias)
    N, K = qweight.shape
    if x.dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must have shape [..., {K}] (qweight's in_features), got {tuple(x.shape)}")
    if x.device != qweight.device:
        raise ValueError(f"x is on {x.device} but qweight is on {qweight.device}")
    if bias is not None:
        _checks.tensor_arg("bias", bias)
        if bias.shape != (N,) or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"bias must be a [{N}] tensor of x's dtype ({x.dtype}) on {x.device}, got "
                             f"{bias.dtype} {tuple(bias.shape)} on {bias.device}")
    x2 = x.reshape(-1, K)
    args = (x2, qweight.packed, qweight.absmax, qweight.pairs, qweight.state2, bias, N, qweight.blocksize)
    if _checks.eager_fast_path(x2, bias):
        y = _NF4LinearFunction.apply(*args)
    else:
        y = torch.ops.llmkern.nf4_linear_fwd(*args)
    return y.reshape(*x.shape[:-1], N)
