"""Run an existing Hugging Face PEFT model's LoRA layers on llmkern's fused LoRA op.

    model = peft.get_peft_model(base, LoraConfig(...))      # or PeftModel.from_pretrained
    llmkern.integrations.peft.use_fused_lora(model)         # same outputs, fused kernels
    model(input_ids, adapter_names=["a", "b", "__base__"])  # mixed batch: one launch per layer

Every ``peft.tuners.lora.Linear`` whose base layer is an ``nn.Linear`` (or transformers' GPT-2 ``Conv1D``, PEFT's
``fan_in_fan_out=True`` layers: the kernels read its [in, out] weight as the transposed view) gets a forward that calls
``llmkern.lora_linear`` (one active adapter), ``llmkern.peft.dora_linear`` (one active DoRA adapter,
``use_dora=True``: PEFT's DoRA semantics without forming B A) or ``llmkern.lora_linear_multi`` (PEFT's
``adapter_names`` mixed batches: per-sample adapter names, "__base__" = base model only; PEFT itself
refuses ``adapter_names`` when an adapter in the batch uses DoRA, and that error is kept). Cases
the fused ops do not cover fall back to PEFT's own forward for that call: several active adapters
at once, other LoRA variants (aLoRA, ...), lora_bias, a fan_in_fan_out that does not match the base
layer, other or quantised base layers (except bitsandbytes NF4, below), mismatched dtypes (input vs
base weight, adapter weights vs input: see below), and mixed batches during training with dropout. Dropout
uses llmkern's seeded mask: the same distribution as nn.Dropout but not the same random draws.

Float32 adapters on a 16-bit model (PEFT's default ``autocast_adapter_dtype=True``): PEFT runs them in their
own dtype, which F.linear under ``torch.autocast`` (Trainer's bf16=True / fp16=True) casts to the autocast
dtype, as it does x: the update is computed and added in bf16/fp16, as the fused op does (it rounds A and B
to its compute dtype; their gradients come back float32). So under autocast (checked per call, on x's device)
a layer is fused whatever the adapters' float dtype (also a float32 DoRA magnitude, and in mixed batches).
That includes a float32 model under autocast (classic AMP: Trainer's bf16=True on a model loaded in float32) and
a 16-bit base under the other 16-bit autocast dtype: F.linear casts the base weight to the autocast dtype, as
the fused ops do. DoRA on such a base keeps PEFT's forward under autocast: PEFT forms its DoRA term in float32
from the rounded products and rounds once, dora_linear scales a rounded output by a rounded m / n (measured on an
fp32 tiny Llama: lora_B gradients 2.3x as far from float64 as PEFT's own), and its norm reads the rounded W.
Outside autocast PEFT computes float32 adapters in float32 and sums in float32: those calls keep PEFT's
forward (a warning says so, once) unless the model was fused with ``float32_adapters="round"``, which rounds
them to the input's dtype as autocast would.

QLoRA: a ``peft.tuners.lora.bnb.Linear4bit`` layer (PEFT's LoRA over a bitsandbytes ``Linear4bit`` of
quant_type "nf4", double-quantized or not) runs ``llmkern.lora_linear`` on ``NF4Weight.from_bnb`` of its
weight (the kernels read the 4-bit codes as bitsandbytes stores them), for one active plain-LoRA adapter
when the input has the layer's compute_dtype: bitsandbytes then computes the base product in that dtype and
returns it in the input's, as the fused op does. Otherwise (an input of another dtype, e.g. float32 hidden
states on a bf16-compute layer: bitsandbytes rounds the base product through the compute dtype; DoRA and
other variants; mixed-adapter batches; bitsandbytes' CPU-repacked inference layout; under torch.autocast, an
input not already in the autocast dtype: PEFT then adds the autocast-dtype products in the input's dtype) the
call runs PEFT's forward. The NF4Weight is cached on the layer (from_bnb reads the
quant_state, decodes or wraps a double-quantized absmax and builds the kernels' tables: not per call) and
rebuilt when the weight tensor, its data, its version or its quant_state changes. bitsandbytes is never
imported here: such layers exist only once the model imported it.
"""
import sys

import torch
from torch import nn

from llmkern._backend import warn_once
from llmkern.ops import _checks
from llmkern.ops._checks import host_to_device
from llmkern.ops.lora import MAX_RANK, lora_linear, lora_linear_multi
from llmkern.ops.nf4 import NF4Weight
from llmkern.peft.dora import dora_linear
from llmkern.peft.lora import has_forward_hooks, is_hf_conv1d

_ORIG = "_llmkern_orig_forward"
_NF4_CACHE = "_llmkern_nf4_cache"
_FP32_MODE = "_llmkern_float32_adapters"  # use_fused_lora's float32_adapters, per layer
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_AUTOCAST_DTYPES = (torch.float32,) + _HALF_DTYPES  # what autocast casts to its dtype


def _lora_linear_classes():
    """PEFT's LoRA Linear class, plus its bitsandbytes Linear4bit class when bitsandbytes is loaded."""
    from peft.tuners.lora.layer import Linear

    classes = [Linear]
    if "bitsandbytes" in sys.modules:  # a model with 4-bit layers has imported it; never import it ourselves
        try:
            from peft.tuners.lora import bnb as peft_bnb
        except ImportError:
            return classes
        if getattr(peft_bnb, "Linear4bit", None) is not None:
            classes.append(peft_bnb.Linear4bit)
    return classes


def _bnb_nf4(base):
    """Whether `base` is a bitsandbytes Linear4bit (its own forward, not a subclass's) holding NF4 codes in
    the layout NF4Weight reads, with its compute dtype fixed."""
    Linear4bit = getattr(getattr(sys.modules.get("bitsandbytes"), "nn", None), "Linear4bit", None)
    if Linear4bit is None or not isinstance(base, Linear4bit) or type(base).forward is not Linear4bit.forward:
        return False
    state = getattr(base.weight, "quant_state", None)
    # not quantized yet (bnb fixes that up in its forward), FP4, or bnb's repacked CPU inference layout
    if state is None or getattr(state, "quant_type", None) != "nf4" or getattr(state, "packing_format_for_cpu", False):
        return False
    # (without a compute dtype, bitsandbytes takes the first input's: let its forward do that)
    return base.compute_dtype is not None and getattr(base, "compute_type_is_set", True)


def _nf4_base(module, x):
    """(NF4Weight, bias) of module's bitsandbytes NF4 Linear4bit base for input x, or None when the fused
    op cannot reproduce bitsandbytes' result (see the module docstring): PEFT's forward then runs."""
    base = module.base_layer
    if not _bnb_nf4(base):
        return None
    if base.compute_dtype != x.dtype:
        warn_once(("peft-nf4-dtype", base.compute_dtype, x.dtype),
                  f"use_fused_lora: {x.dtype} inputs to 4-bit layers with compute_dtype={base.compute_dtype} run on "
                  f"PEFT's own forward (bitsandbytes rounds the base product through {base.compute_dtype}; the "
                  f"fused op computes in the input's dtype). Give the layers inputs of their compute dtype to fuse")
        return None
    qweight = _cached_nf4(module, base.weight, base.weight.quant_state)
    if qweight is None:
        return None
    bias = base.bias
    return qweight, None if bias is None else bias.to(x.dtype)  # (bnb casts the bias to the compute dtype too)


def _cached_nf4(module, weight, state):
    """NF4Weight.from_bnb(weight), cached on `module` under a key that changes when the weight is replaced,
    its data is swapped or written in place, or its quant_state changes. None: layout not readable."""
    key = (id(weight), weight.data_ptr(), weight._version, id(state), state.absmax.data_ptr(), state.absmax._version)
    cached = module.__dict__.get(_NF4_CACHE)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        qweight = NF4Weight.from_bnb(weight)
    except ValueError as e:  # e.g. a non-contiguous quant_storage
        warn_once(("peft-nf4-layout", str(e)), f"use_fused_lora: a 4-bit layer runs on PEFT's own forward: {e}")
        return None
    # the weight and state objects are kept with the key so that their ids cannot be reused while cached
    module.__dict__[_NF4_CACHE] = (key, qweight, weight, state)
    return qweight


def _dropout_p(module, name):
    drop = module.lora_dropout[name]
    if isinstance(drop, nn.Dropout):
        return float(drop.p) if drop.training else 0.0
    return 0.0


def _kind(module, name, dtype, autocast=False):
    """What adapter `name` of `module` is, for the fused ops on inputs computed in `dtype` (under torch.autocast:
    the autocast dtype): "lora" (plain LoRA, lora_linear), "dora" (PEFT's DoRA on a Linear, dora_linear), or None
    (PEFT's forward). Both need no lora_bias, a rank the kernels take (<= MAX_RANK) and adapter weights the fused
    op computes as PEFT does (see _adapter_dtype_ok)."""
    variant = getattr(module, "lora_variant", {}).get(name)
    dora = _dora_layer(module, name, variant)
    if variant is not None and dora is None:  # another variant (aLoRA, ...), or DoRA we do not cover
        return None
    weights = [module.lora_A[name].weight, module.lora_B[name].weight] + ([dora.weight] if dora is not None else [])
    if not _adapter_dtype_ok(module, weights, dtype, autocast):
        return None
    if getattr(module.lora_B[name], "bias", None) is not None:
        return None
    if module.lora_A[name].weight.shape[0] > MAX_RANK:  # PEFT takes any rank; the fused kernels up to MAX_RANK
        return None
    if dora is not None:
        return "dora"
    return None if getattr(module, "use_dora", {}).get(name, False) else "lora"


def _adapter_dtype_ok(module, weights, dtype, autocast):
    """Whether the fused op, which rounds adapter weights to `dtype`, computes what PEFT does with them. PEFT
    runs the adapters in their own dtype: under torch.autocast F.linear then casts them (and x) to the autocast
    dtype anyway, so any float32 / 16-bit adapters fuse; outside autocast only adapters of the input's dtype, or
    float32 ones on a 16-bit input when the layer was fused with float32_adapters="round" (a warning, once, says
    why the others keep PEFT's forward)."""
    other = next((w.dtype for w in weights if w.dtype != dtype), None)
    if other is None:
        return True
    if autocast:
        return all(w.dtype in _AUTOCAST_DTYPES for w in weights)
    fp32_on_16 = dtype in _HALF_DTYPES and all(w.dtype in (dtype, torch.float32) for w in weights)
    if fp32_on_16 and module.__dict__.get(_FP32_MODE, "peft") == "round":
        return True
    if fp32_on_16:
        warn_once(("peft-adapter-dtype", other, dtype, fp32_on_16),
                  f"use_fused_lora: float32 adapters on {dtype} inputs run on PEFT's own forward outside "
                  f"torch.autocast: PEFT computes them in float32 there (under autocast, e.g. Trainer's bf16=True, "
                  f"it computes them in the autocast dtype, and those calls are fused on 16-bit Linear / Conv1D "
                  f"bases). To fuse them here too, rounded to {dtype} as autocast does, pass "
                  f"use_fused_lora(model, float32_adapters=\"round\"), or create the PEFT model with "
                  f"autocast_adapter_dtype=False")
    else:
        warn_once(("peft-adapter-dtype", other, dtype, fp32_on_16),
                  f"use_fused_lora: {other} adapters on {dtype} inputs run on PEFT's own forward (PEFT computes "
                  f"them in {other}; the fused op computes in the input's dtype)")
    return False


def _dora_layer(module, name, variant):
    """PEFT's DoRA magnitude layer of adapter `name` when its variant is exactly DoRA for Linear layers
    (not a composed or subclassed variant) reading the base weight as the layer does; else None."""
    if variant is None:  # plain LoRA (every call of the fused forward asks: no import for it)
        return None
    try:
        from peft.tuners.lora.variants import DoraLinearVariant
    except ImportError:
        return None
    mags = getattr(module, "lora_magnitude_vector", None)
    if type(variant) is not DoraLinearVariant or mags is None or name not in mags:
        return None
    # (its fan_in_fan_out matching the layer's, which _fused_forward has matched to the base)
    return mags[name] if getattr(mags[name], "fan_in_fan_out", False) == getattr(module, "fan_in_fan_out",
                                                                                 False) else None


def _plain(module, name, dtype, autocast=False):
    """Whether adapter `name` of `module` is plain LoRA (see _kind)."""
    return _kind(module, name, dtype, autocast) == "lora"


def _compute_dtype(x):
    """(dtype, autocast): the dtype the layer's products run in for input x (under torch.autocast on x's device, the
    autocast dtype, as F.linear casts x and the weights to it; else x's) and whether autocast is on. dtype None:
    autocast leaves x as it is (float64) and F.linear would mix dtypes (PEFT's forward says what it does)."""
    if not torch.is_autocast_enabled(x.device.type):
        return x.dtype, False
    return (torch.get_autocast_dtype(x.device.type) if x.dtype in _AUTOCAST_DTYPES else None), True


def _base_operands(self, x, dtype, autocast):
    """(weight, bias, quantized) the fused ops take for this layer's base on input x computed in `dtype` (see
    _compute_dtype), or None. A Conv1D's weight goes in as its [out, in] transposed view: the kernels read either
    layout, so nothing is copied. Under autocast a base of any dtype autocast casts (float32, bf16, fp16): F.linear
    and the fused ops both cast it to the autocast dtype."""
    base = self.base_layer
    if type(base) is nn.Linear or is_hf_conv1d(base):
        if base.weight.dtype != dtype and not (autocast and base.weight.dtype in _AUTOCAST_DTYPES):
            return None
        return (base.weight.t() if is_hf_conv1d(base) else base.weight), base.bias, False
    if autocast and x.dtype != dtype:  # (4 bits under autocast: only inputs autocast leaves as they are, see above)
        return None
    nf4 = _nf4_base(self, x)
    return None if nf4 is None else (*nf4, True)


def _hooked(self, names):
    """Whether the modules of adapters `names` have forward hooks (the base layer's are checked first, once):
    accelerate's offloading keeps their weights on the meta device and loads them inside their own forwards,
    which PEFT's forward calls and the fused ops, reading the weights, would not. (Only the adapters a call uses:
    a server's hundred adapters would cost a check each, per layer and call.)"""
    return any(has_forward_hooks(d[a]) for a in names for d in (self.lora_A, self.lora_B))


def _fused_forward(self, x, *args, **kwargs):
    orig = getattr(self, _ORIG)
    base = self.base_layer
    # fan_in_fan_out must say what the base is (PEFT sets it so; DoRA's norms read the base weight by it)
    if (args or bool(getattr(self, "fan_in_fan_out", False)) != is_hf_conv1d(base) or self.disable_adapters
            or self.merged or not isinstance(x, torch.Tensor)):
        return orig(x, *args, **kwargs)
    other = {k: v for k, v in kwargs.items() if k != "adapter_names" and v is not None}
    if other or has_forward_hooks(self.base_layer):  # (the adapters' once known, below)
        return orig(x, *args, **kwargs)
    dtype, autocast = _compute_dtype(x)
    operands = None if dtype is None else _base_operands(self, x, dtype, autocast)
    if operands is None:
        return orig(x, *args, **kwargs)
    weight, bias, quantized = operands
    adapter_names = kwargs.get("adapter_names")
    if adapter_names is None:
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return base(x)
        kind = _kind(self, active[0], dtype, autocast) if len(active) == 1 else None
        # DoRA on 4 bits, or on a base autocast rounds (a float32 model): PEFT's forward (see the module docstring)
        if kind is None or (kind == "dora" and (quantized or weight.dtype != dtype)) or _hooked(self, active):
            return orig(x, *args, **kwargs)
        a = active[0]
        p = _dropout_p(self, a) if self.training else 0.0
        if kind == "dora":
            return dora_linear(x, weight, bias, self.lora_A[a].weight, self.lora_B[a].weight,
                               self.lora_magnitude_vector[a].weight, float(self.scaling[a]), p)
        return lora_linear(x, weight, bias, self.lora_A[a].weight, self.lora_B[a].weight,
                           float(self.scaling[a]), p)
    if quantized:  # mixed-adapter batches on a 4-bit base: PEFT's forward
        return orig(x, *args, **kwargs)

    self._check_forward_args(x, *args, **kwargs)
    known = [a for a in self.lora_A.keys()]
    used = {a for a in adapter_names if a in self.lora_A}
    if not used:
        return base(x)
    if any(not _plain(self, a, dtype, autocast) for a in used) or _hooked(self, used) or (
            self.training and any(_dropout_p(self, a) > 0 for a in used)):
        return orig(x, *args, **kwargs)
    names = sorted(used, key=known.index)
    index = {a: i for i, a in enumerate(names)}
    r = max(self.lora_A[a].weight.shape[0] for a in names)

    def pad(w, dim):
        extra = r - w.shape[dim]
        if extra == 0:
            return w
        shape = list(w.shape)
        shape[dim] = extra
        return torch.cat([w, w.new_zeros(shape)], dim=dim)

    A = torch.stack([pad(self.lora_A[a].weight, 0) for a in names])
    B = torch.stack([pad(self.lora_B[a].weight, 1) for a in names])
    scalings = [float(self.scaling[a]) for a in names]
    ids = torch.tensor([index.get(a, -1) for a in adapter_names], dtype=torch.int32)
    ids = host_to_device(ids, x.device).view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
    A, B = A.to(dtype), B.to(dtype)  # (under autocast the op casts x and the base to dtype too)
    # trusted: the ids are in [-1, n) by construction and the scalings Python floats (checked on the host), so
    # lora_linear_multi skips its value check (on CUDA a wait for each layer's queued work); the block holds that
    # one call only, its arguments made before it
    with _checks.trusted():
        return lora_linear_multi(x, weight, bias, A, B, scalings, ids)


def use_fused_lora(peft_model: nn.Module, enable: bool = True, *, float32_adapters: str = "peft") -> nn.Module:
    """Switch every PEFT LoRA Linear layer of ``peft_model`` (and every 4-bit bitsandbytes one: QLoRA) to the
    fused op (``enable=False`` restores the forward each had: PEFT's own, or an instance-level one such as
    accelerate's hooks). Returns the model; outputs are unchanged up to rounding.

    float32_adapters: float32 adapters on a 16-bit model (PEFT's default ``autocast_adapter_dtype=True``).
    "peft" (default): fused where PEFT itself computes them in the 16-bit dtype, i.e. under ``torch.autocast``
    (F.linear casts them); outside autocast PEFT computes them in float32 and those calls keep PEFT's forward
    (a warning says so, once). "round": fused in every call, rounded to the input's dtype as autocast would.
    Gradients reach the float32 weights as float32 either way. Calling again on a fused model changes it."""
    from llmkern.integrations.transformers.fused_ops import _BoundForward

    if float32_adapters not in ("peft", "round"):
        raise ValueError(f'use_fused_lora: float32_adapters must be "peft" or "round", got {float32_adapters!r}')
    classes = tuple(_lora_linear_classes())
    if not enable:
        _restore_forwards(peft_model, classes)
        return peft_model
    n = 0
    for m in peft_model.modules():
        if type(m) in classes and not hasattr(m, _ORIG):
            setattr(m, _ORIG, m.forward)
            # (not types.MethodType: a bound method pickles as getattr(m, "_fused_forward"), so torch.load of a
            # saved model failed; _BoundForward pickles and deep-copies bound to the loaded / copied layer)
            m.forward = _BoundForward(_fused_forward, m)
            n += 1
        if type(m) in classes:
            m.__dict__[_FP32_MODE] = float32_adapters
    if n == 0 and not any(hasattr(m, _ORIG) for m in peft_model.modules()):
        raise ValueError("use_fused_lora: the model has no PEFT LoRA Linear layers")
    return peft_model


def _restore_forwards(peft_model, classes):
    """use_fused_lora(enable=False): every fused layer gets back the forward it had, the class's or an instance-level
    one (accelerate's hooks wrap a module's forward so; deleting the fused one dropped it). Checked for every layer
    before any changes: a layer whose fused forward was itself wrapped since cannot be restored without dropping
    that wrapper."""
    from llmkern.integrations.transformers.fused_ops import _BoundForward

    layers = [(n, m) for n, m in peft_model.named_modules() if type(m) in classes and hasattr(m, _ORIG)]
    for name, m in layers:
        fwd = m.__dict__.get("forward")
        if fwd is not None and not (type(fwd) is _BoundForward and fwd.__func__ is _fused_forward):
            raise ValueError(f"use_fused_lora(enable=False): the forward of {name or 'the model'} was replaced after "
                             f"use_fused_lora (by {type(fwd).__name__}, e.g. accelerate's hooks), around the fused "
                             f"one; restoring PEFT's forward would drop that patch too: remove it first (nothing "
                             f"was changed)")
    for _, m in layers:
        orig = m.__dict__.pop(_ORIG)
        m.__dict__.pop(_NF4_CACHE, None)
        m.__dict__.pop(_FP32_MODE, None)
        if getattr(orig, "__self__", None) is m and getattr(orig, "__func__", None) is type(m).forward:
            m.__dict__.pop("forward", None)  # (the class forward it had)
        else:
            m.forward = orig
