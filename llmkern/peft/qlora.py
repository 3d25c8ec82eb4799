"""QLoRA modules: frozen 4-bit NF4 base layers (NF4Linear), quantize_nf4, and the ops they run on.

    quantize_nf4(model)                          # every nn.Linear but lm_head -> NF4Linear (~0.56 B/param: 4.5 bits)
    quantize_nf4(model, double_quant=True)       # ... with 8-bit scales (4.127 instead of 4.5 bits/param)
    inject_lora(model, ["q_proj", "v_proj"])     # LoRALinear over NF4Linear: QLoRA (Dettmers et al. 2023)
    merge_lora(model, remove=True)               # LoRA layers -> dense nn.Linear of dequant(W) + s·B·A

NF4Linear keeps bitsandbytes' NF4 layout (llmkern.nf4_quantize) in buffers, ``packed`` (uint8) and
``absmax`` (float32; or, double-quantized, uint8 codes plus the fp32 ``state2``), so ``.to(device)``,
``state_dict()`` and ``load_state_dict`` handle them like any module state; the weight is never a parameter.
Its forward is llmkern.nf4_linear, which keeps only the codes for the backward (no dense copy of W stays alive
between the two: the memory QLoRA saves). A LoRALinear over it hands the NF4Weight to the fused
llmkern.lora_linear (W read in 4 bits by the kernels).
"""
import numbers
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from llmkern.ops import _checks
from llmkern.ops.nf4 import NF4Weight, _check_blocksize, nf4_linear, nf4_quantize
from llmkern.peft.dora import dora_linear
from llmkern.reference import nf4 as ref_nf4

# the dtypes the layer computes in: the kernels' three, and float64 through the PyTorch reference (no kernel)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---- DoRA on an NF4Weight ----------------------------------------------------------------------------

def nf4_dora_linear(x: torch.Tensor, qweight: NF4Weight, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                    lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float, dropout_p: float = 0.0, *,
                    seed: Union[int, torch.Tensor, None] = None) -> torch.Tensor:
    """``llmkern.peft.dora_linear`` (PEFT's DoRA) over a frozen 4-bit weight, which it takes directly: this
    name only insists on the NF4Weight. The row norms ‖W + s·B·A‖ dequantize W into a temporary per call;
    the products read W in 4 bits, so nothing dense is kept for the backward."""
    if not isinstance(qweight, NF4Weight):
        raise TypeError(f"qweight must be an NF4Weight (a dense weight: llmkern.peft.dora_linear), got "
                        f"{type(qweight).__name__}")
    return dora_linear(x, qweight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, seed=seed)


# ---- the module -------------------------------------------------------------------------------------

_SHAPE_KEY = "weight_shape"


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in 4-bit NF4 (bitsandbytes' layout): QLoRA's base layer.

    Buffers ``packed`` (uint8 ``[ceil(out·in / 2)]``) and ``absmax`` (the scale of each block of ``blocksize``
    weights, ``[ceil(out·in / blocksize)]``) hold the weight. ``absmax`` is float32, or with double
    quantization (``double_quant``: QLoRA's 8-bit scales, 0.127 instead of 0.5 bits per weight at blocksize
    64) uint8 codes decoded by the float32 buffer ``state2`` = ``[code_map (256) | offset (1) | absmax2]``
    (NF4Weight.state2's layout; None without double quantization). ``bias`` is an ordinary (frozen by LoRA
    injection) parameter or None. ``compute_dtype`` is the dtype the layer computes in, as an ``nn.Linear``
    whose weight had that dtype: the input must have it (under torch.autocast, the autocast dtype is used, as
    F.linear's). Casting the module (``.half()``, ``.to(torch.bfloat16)``, ``.double()``) changes ``compute_dtype``
    (float64: computed by the PyTorch reference, no kernel); the codes stay 4-bit and the float32 scales
    (``absmax`` or ``state2``) float32.

    ``NF4Linear(in, out)`` holds zeros until a state dict is loaded into it (a state dict of the other layout
    is taken too: the buffers follow it); ``from_linear(linear)`` quantizes an ``nn.Linear``;
    ``dequantize()`` gives the dense ``nn.Linear`` back (with the quantization error); ``nf4_weight()`` is
    the ``NF4Weight`` view that ``llmkern.lora_linear`` takes.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, blocksize: int = 64,
                 compute_dtype: torch.dtype = torch.float32, device=None, double_quant: bool = False):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:  # (numpy ints: as nn.Linear)
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        in_features, out_features, blocksize = int(in_features), int(out_features), _check_blocksize(blocksize)
        if compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype must be float32, float16, bfloat16 or float64, got {compute_dtype}")
        _check_double_quant(double_quant)
        self.in_features, self.out_features, self.blocksize = in_features, out_features, blocksize
        self.compute_dtype = compute_dtype
        n = in_features * out_features
        self.register_buffer("packed", torch.zeros(-(-n // 2), dtype=torch.uint8, device=device))
        self._set_layout(double_quant, device)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._nf4 = None  # (packed, absmax, state2, compute_dtype, NF4Weight): see nf4_weight
        # the weight's (out, in) in the state dict, as nn.Linear's weight carries its shape: the flat buffers of
        # another layer with the same out·in fit, so a load checks it (a buffer: torch.distributed.checkpoint
        # resolves every state-dict key as a module attribute)
        self.register_buffer(_SHAPE_KEY, torch.tensor([out_features, in_features], dtype=torch.int64,
                                                      device="cpu" if device is None else device))

    @property
    def n_blocks(self) -> int:
        return -(-self.in_features * self.out_features // self.blocksize)

    @property
    def double_quant(self) -> bool:
        """Whether the block scales are double-quantized (uint8 ``absmax`` + ``state2``)."""
        return self.state2 is not None

    def _set_layout(self, double_quant: bool, device=None):
        """(Re)make ``absmax`` / ``state2`` as zeros of the plain or the double-quantized layout."""
        nb = self.n_blocks
        if double_quant:
            self.register_buffer("absmax", torch.zeros(nb, dtype=torch.uint8, device=device))
            self.register_buffer("state2", torch.zeros(_state2_numel(nb), dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax", torch.zeros(nb, dtype=torch.float32, device=device))
            self.register_buffer("state2", None)

    @classmethod
    def from_nf4(cls, qweight: NF4Weight, bias: Optional[torch.Tensor] = None,
                 compute_dtype: Optional[torch.dtype] = None) -> "NF4Linear":
        """A layer over the codes and scales of `qweight` (shared, not copied; double-quantized scales stay in
        8 bits); compute_dtype defaults to qweight.dtype. `bias` is copied (a frozen parameter of
        compute_dtype)."""
        if not isinstance(qweight, NF4Weight):
            raise TypeError(f"qweight must be an NF4Weight, got {type(qweight).__name__}")
        dt = compute_dtype or qweight.dtype
        nested = qweight.nested is not None
        layer = cls(qweight.in_features, qweight.out_features, bias=False, blocksize=qweight.blocksize,
                    compute_dtype=dt, device="meta", double_quant=nested)
        layer.packed, layer.absmax = qweight.packed, qweight.absmax
        setattr(layer, _SHAPE_KEY, torch.tensor([qweight.out_features, qweight.in_features], device=qweight.device))
        if nested:  # NF4Weight.state2 is [code_map | offset | absmax2], the layer's layout
            layer.state2 = qweight.state2
        layer.nf4_weight()
        if bias is not None:
            _checks.tensor_arg("bias", bias)
            if bias.shape != (qweight.out_features,):
                raise ValueError(f"bias must have shape [{qweight.out_features}], got {tuple(bias.shape)}")
            layer.bias = nn.Parameter(bias.detach().to(device=qweight.device, dtype=dt, copy=True),
                                      requires_grad=False)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = False) -> "NF4Linear":
        """Quantize an ``nn.Linear`` (float32/float16/bfloat16 weight; its dtype becomes compute_dtype), with
        8-bit block scales if `double_quant`. The bias is copied and keeps its requires_grad."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        _check_double_quant(double_quant)
        layer = cls.from_nf4(nf4_quantize(linear.weight.detach(), blocksize, double_quant), linear.bias)
        if linear.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer

    @classmethod
    def from_bnb(cls, layer: nn.Module) -> "NF4Linear":
        """The same layer from a bitsandbytes ``Linear4bit`` of quant_type "nf4" (codes and scales shared, not
        copied; a double-quantized absmax stays in 8 bits). compute_dtype: the layer's, else its weight's."""
        if getattr(getattr(layer, "weight", None), "quant_state", None) is None:
            raise TypeError(f"layer must be a quantized bitsandbytes Linear4bit (moved to its device), got "
                            f"{type(layer).__name__}")
        qw = NF4Weight.from_bnb(layer.weight)
        return cls.from_nf4(qw, layer.bias, getattr(layer, "compute_dtype", None) or qw.dtype)

    def nf4_weight(self) -> NF4Weight:
        """The weight as an NF4Weight over this layer's buffers (no copy), default dtype compute_dtype.

        Made once and kept while the buffers and compute_dtype stay the same objects (an NF4Weight builds its
        kernels' level table on the device when made: not per call, and not while torch.compile traces one).
        In-place writes (load_state_dict) reach it through the shared storage."""
        if self.compute_dtype not in _DTYPES:  # a module cast to, e.g., float8 (taken: see _apply)
            raise ValueError(f"NF4Linear computes in float32, float16, bfloat16 or float64, not its compute_dtype "
                             f"{self.compute_dtype} (from a module cast): cast the module back, e.g. .float()")
        c = self._nf4
        if (c is None or c[0] is not self.packed or c[1] is not self.absmax or c[2] is not self.state2
                or c[3] != self.compute_dtype):
            s2 = self.state2  # (NF4Weight's own layout: used as it is, so in-place loads reach the kernels)
            qw = NF4Weight(self.packed, self.absmax, (self.out_features, self.in_features), self.blocksize,
                           self.compute_dtype, nested=s2)
            self._nf4 = c = (self.packed, self.absmax, s2, self.compute_dtype, qw)
        return c[4]

    @torch.no_grad()
    def dequantize(self) -> nn.Linear:
        """A dense, frozen ``nn.Linear`` (compute_dtype, same device) holding the dequantized weight."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.packed.device, dtype=self.compute_dtype)
        dense.weight.copy_(self.nf4_weight().dequantize())
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense.requires_grad_(False)

    def check_input(self, x: torch.Tensor):
        """A clear error for an input the layer cannot compute on (as nn.Linear would refuse it)."""
        _checks.tensor_arg("x", x)
        if _checks.autocast_dtype(x) is None and x.dtype != self.compute_dtype:
            raise ValueError(f"x must have the layer's compute_dtype ({self.compute_dtype}), got {x.dtype} (cast the "
                             f"input, cast the module with .to(dtype), or run under torch.autocast)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return nf4_linear(x, self.nf4_weight(), self.bias)

    def _apply(self, fn, *args, **kwargs):
        # Module casts (.half(), .double(), .to(dtype), .type(dtype)) convert the buffers: the weight's storage
        # keeps its dtypes (the uint8 codes and a double-quantized absmax stay 4 / 8 bits, the scales float32: the
        # NF4 layout's, and bf16 scales would add error to every element; the int64 shape), while the cast is
        # taken as the new compute dtype (the bias follows), as bitsandbytes' Linear4bit keeps its codes. Never
        # refused here: Module._apply casts the modules before this one in the model first, so raising here left
        # the model half-converted (.double() did); a dtype the layer cannot compute in is refused by the forward
        # (nf4_weight), as F.linear refuses one for a dense layer. fn applied to an empty tensor tells which dtype
        # a cast leads to.
        keep = {n: getattr(self, n) for n in ("packed", "absmax", "state2", _SHAPE_KEY)
                if getattr(self, n) is not None}
        cast = fn(torch.empty(0, dtype=self.compute_dtype, device=self.packed.device)).dtype
        super()._apply(fn, *args, **kwargs)
        for name, old in keep.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        if cast.is_floating_point:
            self.compute_dtype = cast
        if self.compute_dtype in _DTYPES:
            self.nf4_weight()  # made now, outside any later compiled forward
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The layout follows the state dict (state2 present: double-quantized), so that a checkpoint of either
        # layout loads into a layer made with the default one; a mismatched absmax dtype is an error (copy_
        # would cast float scales to uint8 codes silently).
        absmax = state_dict.get(prefix + "absmax")
        n_errors = len(error_msgs)
        # the flat buffers of any layer with out·in elements fit: the saved shape tells a [in, out] layer's apart
        # (older checkpoints have none)
        shape = state_dict.pop(prefix + _SHAPE_KEY, None)  # (older checkpoints have none: accepted)
        if shape is not None and tuple(shape.tolist()) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {prefix}weight (NF4Linear): the checkpoint's is "
                              f"{tuple(shape.tolist())}, this layer's is ({self.out_features}, {self.in_features})")
            return
        n_missing = len(missing_keys)
        if absmax is not None:
            nested = prefix + "state2" in state_dict
            if absmax.is_floating_point() == nested:
                error_msgs.append(f"NF4Linear {prefix}absmax: a state dict {'with' if nested else 'without'} "
                                  f"{prefix}state2 (double-quantized scales) must hold "
                                  f"{'uint8 codes' if nested else 'float32 scales'} in absmax, got {absmax.dtype}")
                return
            if self._layout_mismatch(state_dict, prefix, nested, error_msgs):
                return
            if nested != self.double_quant:
                self._set_layout(nested, self.packed.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        missing_keys[n_missing:] = [k for k in missing_keys[n_missing:] if k != prefix + _SHAPE_KEY]
        if len(error_msgs) == n_errors:
            self.nf4_weight()  # (assign=True may have replaced the buffers)

    def _layout_mismatch(self, state_dict, prefix, nested, error_msgs):
        """Whether the state dict's packed / absmax / state2 do not have this layer's sizes (in the layout the state
        dict has): an error each, checked before the layout changes, so that a refused load leaves the layer as it
        was (switching first left zeroed scales behind a size-mismatch error; loading the buffers that fit gave
        codes of one weight with the scales of another)."""
        nb = self.n_blocks
        want = {"packed": -(-self.in_features * self.out_features // 2), "absmax": nb}
        if nested:
            want["state2"] = _state2_numel(nb)
        bad = [(k, tuple(state_dict[prefix + k].shape), (n,)) for k, n in want.items()
               if isinstance(state_dict.get(prefix + k), torch.Tensor) and tuple(state_dict[prefix + k].shape) != (n,)]
        error_msgs.extend(f"size mismatch for {prefix}{k} (NF4Linear): the checkpoint's is {got}, this layer's is "
                          f"{size} (another weight shape or blocksize)" for k, got, size in bad)
        return bool(bad)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, compute_dtype={self.compute_dtype}"
                + (", double_quant=True" if self.double_quant else ""))


def _check_double_quant(double_quant):
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {double_quant!r}")


def _state2_numel(n_blocks: int) -> int:
    """Entries of state2 for `n_blocks` block scales: the 256-entry code map, the offset, one absmax2 per
    group of ref_nf4.BLOCKSIZE2 scales."""
    return 256 + 1 + -(-n_blocks // ref_nf4.BLOCKSIZE2)


# ---- model surgery ------------------------------------------------------------------------------------

def _targets(model, target_modules, skip):
    """{id: (module, [paths], match name)} of the exact nn.Linear modules to quantize. A LoRALinear's base
    layer is matched by the LoRALinear's name (its base_layer child is the same layer)."""
    from llmkern.peft.lora import LoRALinear, _matches

    found = {}
    parents = dict(model.named_modules(remove_duplicate=False))
    for name, m in model.named_modules(remove_duplicate=False):
        if type(m) is not nn.Linear or not name:
            continue
        owner, _, child = name.rpartition(".")
        lora = isinstance(parents.get(owner), LoRALinear) and child == "base_layer"
        key = owner if lora else name
        if (target_modules is not None and not _matches(key, target_modules)) or _skipped(key, skip, _matches):
            continue
        if lora and parents[owner].merged:
            raise ValueError(f"quantize_nf4: {owner} is merged (its base weight holds W + s·B·A); unmerge() it "
                             f"first")
        found.setdefault(id(m), (m, [], key))[1].append(name)
    return found


def _skipped(key, skip, matches):
    """Whether the layer named `key` is left dense: its name or the name of a module it sits in matches `skip`
    (transformers' modules_to_not_convert / llm_int8_skip_modules leave a named block's layers dense: skip=
    ("vision_tower",) or ("layers.0",) kept every nn.Linear inside quantized, silently, when only the layer's own
    name was matched)."""
    if not skip:
        return False
    parts = key.split(".")
    return any(matches(".".join(parts[:i]), skip) for i in range(len(parts), 0, -1))


def _names_arg(name, value):
    """target_modules / skip: None, a regex string, or a sequence of module names (strings); anything else raised
    Python's own TypeError from the name matching (an int: "'int' object is not iterable"), naming neither."""
    if value is None or isinstance(value, str):
        return value
    try:
        entries = list(value)
    except TypeError:
        entries = None
    if entries is None or isinstance(value, (bytes, dict)) or not all(isinstance(e, str) for e in entries):
        raise TypeError(f"{name} must be None, a regex string or a list of module names (strings), got {value!r}")
    return entries


def _check_untied(model, found):
    """A weight shared with another module (tied embeddings) would end up dense there and 4-bit here."""
    weights = {id(lin.weight): (lin, paths) for lin, paths, _ in found.values()}
    for n, m in model.named_modules(remove_duplicate=False):
        for pn, p in m.named_parameters(recurse=False):
            lin, paths = weights.get(id(p), (m, None))
            if m is not lin:
                raise ValueError(f"quantize_nf4: {paths[0]}.weight is shared with {n}.{pn} (tied weights); "
                                 f"quantizing it would untie them. Leave it out (skip=...) or untie first")


def _check_zoo_heads(model, found):
    """A llmkern zoo model (llmkern.models) reads ``lm_head.weight`` as a dense tensor: head_logits (the padded
    logits GEMM) and the loss path (linear cross-entropy, tied embeddings) use it, and an NF4Linear has no
    ``.weight``: refused, whether the head is a bare nn.Linear or a LoRALinear's base."""
    from llmkern.models._attn import ZooModel

    for name, zoo in model.named_modules(remove_duplicate=False):
        head = getattr(zoo, "lm_head", None) if isinstance(zoo, ZooModel) else None
        hit = found.get(id(getattr(head, "base_layer", head)))
        if hit is not None:
            where = f" at {name!r}" if name else ""
            raise ValueError(f"quantize_nf4: {hit[1][0]} is the LM head of the llmkern zoo model "
                             f"{type(zoo).__name__}{where}, whose head_logits / loss path reads lm_head.weight as a "
                             f"dense weight (tied to the embedding or not), which a 4-bit NF4Linear does not have. "
                             f"Leave it dense: skip=('lm_head',), the default")


def quantize_nf4(model: nn.Module, target_modules: Union[str, Sequence[str], None] = None, blocksize: int = 64,
                 skip: Union[str, Sequence[str], None] = ("lm_head",), double_quant: bool = False) -> List[str]:
    """Replace ``nn.Linear`` modules of `model` in place by frozen 4-bit ``NF4Linear`` ones; returns the
    names of the replaced modules.

    target_modules: PEFT's rule (a list: names equal to an entry or ending in "." + entry; a string: a
    full-match regex), or None for every nn.Linear. Layers matching `skip` (the same rule), or sitting in a
    module that matches it (``skip=("vision_tower",)``: every layer inside it, as transformers'
    ``llm_int8_skip_modules``), are left dense (default: the LM head, as bitsandbytes/transformers do). A
    LoRALinear's base layer counts under the LoRALinear's name (so a model with a loaded adapter can be
    quantized); merged ones are refused. Only exact nn.Linear modules are replaced (subclasses may be read by
    their parent, as nn.MultiheadAttention reads its out_proj). Weights
    tied to another module are refused, and so is the lm_head of a llmkern zoo model (its loss path reads
    lm_head.weight). `double_quant`: QLoRA's 8-bit block scales (NF4Linear.double_quant). Everything is
    checked and quantized before the model is changed. Each layer keeps its weight's dtype as compute_dtype
    and its bias (and requires_grad).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    blocksize = _check_blocksize(blocksize)
    _check_double_quant(double_quant)
    target_modules, skip = _names_arg("target_modules", target_modules), _names_arg("skip", skip)
    found = _targets(model, target_modules, skip)
    if not found:
        raise ValueError(f"quantize_nf4: target_modules {target_modules!r} (skip {skip!r}) matched no nn.Linear "
                         f"in the model (a bare nn.Linear: use NF4Linear.from_linear)")
    _check_untied(model, found)
    _check_zoo_heads(model, found)
    layers = {}
    for key, (lin, paths, _) in found.items():
        try:
            layers[key] = NF4Linear.from_linear(lin, blocksize, double_quant)
        except ValueError as e:
            raise ValueError(f"quantize_nf4: {paths[0]}: {e}") from None
    from llmkern.peft.lora import _set_submodule

    names = []
    for key, (_, paths, _) in found.items():
        for path in paths:
            _set_submodule(model, path, layers[key])
            names.append(path)
    return names
