"""Run an existing Hugging Face PEFT model's LoRA layers on llmkern's fused LoRA op.

    model = peft.get_peft_model(base, LoraConfig(...))      # or PeftModel.from_pretrained
    llmkern.integrations.peft.use_fused_lora(model)         # same outputs, fused kernels
    model(input_ids, adapter_names=["a", "b", "__base__"])  # mixed batch: one launch per layer

Every ``peft.tuners.lora.Linear`` whose base layer is an ``nn.Linear`` gets a forward that calls
``llmkern.lora_linear`` (one active adapter), ``llmkern.peft.dora_linear`` (one active DoRA adapter,
``use_dora=True``: PEFT's DoRA semantics without forming B A) or ``llmkern.lora_linear_multi`` (PEFT's
``adapter_names`` mixed batches: per-sample adapter names, "__base__" = base model only; PEFT itself
refuses ``adapter_names`` when an adapter in the batch uses DoRA, and that error is kept). Cases
the fused ops do not cover fall back to PEFT's own forward for that call: several active adapters
at once, other LoRA variants (aLoRA, ...), lora_bias, fan_in_fan_out, non-Linear or quantised base
layers, autocast, mismatched dtypes (input vs base weight, or adapter weights vs input: PEFT's default
``autocast_adapter_dtype=True`` keeps a bf16/fp16 model's adapters in float32 and computes them in
float32, so such layers stay on PEFT's forward; create the model with ``autocast_adapter_dtype=False``
or cast the adapters to the model's dtype to fuse them; the same for a DoRA magnitude), and mixed batches
during training with dropout. Dropout uses llmkern's seeded mask: the same distribution as nn.Dropout but
not the same random draws.
"""
import types

import torch
from torch import nn

from llmkern._backend import warn_once
from llmkern.ops.lora import lora_linear, lora_linear_multi
from llmkern.peft.dora import dora_linear

_ORIG = "_llmkern_orig_forward"


def _lora_linear_cls():
    from peft.tuners.lora.layer import Linear

    return Linear


def _dropout_p(module, name):
    drop = module.lora_dropout[name]
    if isinstance(drop, nn.Dropout):
        return float(drop.p) if drop.training else 0.0
    return 0.0


def _kind(module, name, dtype):
    """What adapter `name` of `module` is, for the fused ops: "lora" (plain LoRA, lora_linear computes
    it exactly), "dora" (PEFT's DoRA on a Linear, dora_linear), or None (PEFT's forward). Both need no
    lora_bias and weights in the input's dtype (PEFT computes float32 adapters of a 16-bit model, its
    autocast_adapter_dtype default, in float32; the fused op would use the input's dtype)."""
    variant = getattr(module, "lora_variant", {}).get(name)
    dora = _dora_layer(module, name, variant)
    if variant is not None and dora is None:  # another variant (aLoRA, ...), or DoRA we do not cover
        return None
    weights = [module.lora_A[name].weight, module.lora_B[name].weight] + ([dora.weight] if dora is not None else [])
    adapter_dtype = next((w.dtype for w in weights if w.dtype != dtype), None)
    if adapter_dtype is not None:
        warn_once(("peft-adapter-dtype", adapter_dtype, dtype),
                  f"use_fused_lora: {adapter_dtype} adapters on {dtype} inputs run on PEFT's own forward "
                  f"(PEFT computes them in {adapter_dtype}; the fused op would round them to {dtype}). To fuse "
                  f"them, create the PEFT model with autocast_adapter_dtype=False or cast the adapters to {dtype}")
        return None
    if getattr(module.lora_B[name], "bias", None) is not None:
        return None
    if dora is not None:
        return "dora"
    return None if getattr(module, "use_dora", {}).get(name, False) else "lora"


def _dora_layer(module, name, variant):
    """PEFT's DoRA magnitude layer of adapter `name` when its variant is exactly DoRA for Linear layers
    (not a composed or subclassed variant) on a layer without fan_in_fan_out; else None."""
    try:
        from peft.tuners.lora.variants import DoraLinearVariant
    except ImportError:
        return None
    mags = getattr(module, "lora_magnitude_vector", None)
    if type(variant) is not DoraLinearVariant or mags is None or name not in mags:
        return None
    return None if getattr(mags[name], "fan_in_fan_out", False) else mags[name]


def _plain(module, name, dtype):
    """Whether adapter `name` of `module` is plain LoRA (see _kind)."""
    return _kind(module, name, dtype) == "lora"


def _fused_forward(self, x, *args, **kwargs):
    orig = getattr(self, _ORIG)
    base = self.base_layer
    if (args or type(base) is not nn.Linear or getattr(self, "fan_in_fan_out", False)
            or self.disable_adapters or self.merged or not isinstance(x, torch.Tensor)
            or x.dtype != base.weight.dtype or torch.is_autocast_enabled()):
        return orig(x, *args, **kwargs)
    other = {k: v for k, v in kwargs.items() if k != "adapter_names" and v is not None}
    if other:
        return orig(x, *args, **kwargs)
    adapter_names = kwargs.get("adapter_names")
    if adapter_names is None:
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active:
            return base(x)
        kind = _kind(self, active[0], x.dtype) if len(active) == 1 else None
        if kind is None:
            return orig(x, *args, **kwargs)
        a = active[0]
        p = _dropout_p(self, a) if self.training else 0.0
        if kind == "dora":
            return dora_linear(x, base.weight, base.bias, self.lora_A[a].weight, self.lora_B[a].weight,
                               self.lora_magnitude_vector[a].weight, float(self.scaling[a]), p)
        return lora_linear(x, base.weight, base.bias, self.lora_A[a].weight, self.lora_B[a].weight,
                           float(self.scaling[a]), p)

    self._check_forward_args(x, *args, **kwargs)
    known = [a for a in self.lora_A.keys()]
    used = {a for a in adapter_names if a in self.lora_A}
    if not used:
        return base(x)
    if any(not _plain(self, a, x.dtype) for a in used) or (
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
    ids = ids.to(x.device).view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
    return lora_linear_multi(x, base.weight, base.bias, A.to(x.dtype), B.to(x.dtype), scalings, ids)


def use_fused_lora(peft_model: nn.Module, enable: bool = True) -> nn.Module:
    """Switch every PEFT LoRA Linear layer of ``peft_model`` to the fused op (``enable=False``
    restores PEFT's own forward). Returns the model; outputs are unchanged up to rounding."""
    Linear = _lora_linear_cls()
    n = 0
    for m in peft_model.modules():
        if type(m) is not Linear:
            continue
        if enable and not hasattr(m, _ORIG):
            setattr(m, _ORIG, m.forward)
            m.forward = types.MethodType(_fused_forward, m)
            n += 1
        elif not enable and hasattr(m, _ORIG):
            del m.forward
            delattr(m, _ORIG)
            n += 1
    if enable and n == 0 and not any(hasattr(m, _ORIG) for m in peft_model.modules()):
        raise ValueError("use_fused_lora: the model has no PEFT LoRA Linear layers")
    return peft_model
