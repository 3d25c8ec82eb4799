"""Run an existing Hugging Face PEFT model's LoRA layers on llmkern's fused LoRA op.

    model = peft.get_peft_model(base, LoraConfig(...))      # or PeftModel.from_pretrained
    llmkern.integrations.peft.use_fused_lora(model)         # same outputs, fused kernels
    model(input_ids, adapter_names=["a", "b", "__base__"])  # mixed batch: one launch per layer

Every ``peft.tuners.lora.Linear`` whose base layer is an ``nn.Linear`` gets a forward that calls
``llmkern.lora_linear`` (one active adapter) or ``llmkern.lora_linear_multi`` (PEFT's
``adapter_names`` mixed batches: per-sample adapter names, "__base__" = base model only). Cases
the fused op does not cover fall back to PEFT's own forward for that call: several active adapters
at once, LoRA variants (DoRA, aLoRA, ...), lora_bias, fan_in_fan_out, non-Linear or quantised base
layers, autocast, mismatched dtypes (input vs base weight, or adapter weights vs input: PEFT's default
``autocast_adapter_dtype=True`` keeps a bf16/fp16 model's adapters in float32 and computes them in
float32, so such layers stay on PEFT's forward; create the model with ``autocast_adapter_dtype=False``
or cast the adapters to the model's dtype to fuse them), and mixed batches during training with dropout. Dropout uses
llmkern's seeded mask: the same distribution as nn.Dropout but not the same random draws.
"""
import types

import torch
from torch import nn

from llmkern._backend import warn_once
from llmkern.ops.lora import lora_linear, lora_linear_multi

_ORIG = "_llmkern_orig_forward"


def _lora_linear_cls():
    from peft.tuners.lora.layer import Linear

    return Linear


def _dropout_p(module, name):
    drop = module.lora_dropout[name]
    if isinstance(drop, nn.Dropout):
        return float(drop.p) if drop.training else 0.0
    return 0.0


def _plain(module, name, dtype):
    """Whether adapter `name` of `module` is plain LoRA the fused op computes exactly: no variant,
    no lora_bias, and weights in the input's dtype (PEFT computes float32 adapters of a 16-bit
    model, its autocast_adapter_dtype default, in float32; the fused op would use the input's dtype)."""
    adapter_dtype = module.lora_A[name].weight.dtype
    if adapter_dtype != dtype or module.lora_B[name].weight.dtype != dtype:
        warn_once(("peft-adapter-dtype", adapter_dtype, dtype),
                  f"use_fused_lora: {adapter_dtype} adapters on {dtype} inputs run on PEFT's own forward "
                  f"(PEFT computes them in {adapter_dtype}; the fused op would round them to {dtype}). To fuse "
                  f"them, create the PEFT model with autocast_adapter_dtype=False or cast the adapters to {dtype}")
        return False
    return (name not in getattr(module, "lora_variant", {})
            and getattr(module.lora_B[name], "bias", None) is None
            and not getattr(module, "use_dora", {}).get(name, False))


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
        if len(active) > 1 or not _plain(self, active[0], x.dtype):
            return orig(x, *args, **kwargs)
        a = active[0]
        return lora_linear(x, base.weight, base.bias, self.lora_A[a].weight, self.lora_B[a].weight,
                           float(self.scaling[a]), _dropout_p(self, a) if self.training else 0.0)

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
