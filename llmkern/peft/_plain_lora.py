"""PlainLoRA: the state and bookkeeping every llmkern LoRA layer shares, around a base layer whose weight the
update folds into: the arguments (r, alpha, dropout, rsLoRA), the merged / disabled state, merge / unmerge,
the merged state in the state dict. LoRALinear (llmkern.peft.lora: the fused op, DoRA, a 4-bit base),
LoRAEmbedding and LoRAConv derive from it.

A subclass checks its base layer's type, calls ``PlainLoRA.__init__``, creates its factors, calls
``_finish_init(freeze_base)`` and defines ``_lora_factors()`` (A, B), ``_delta()`` (the update in the weight's
shape, in ``_acc_dtype()``), ``reset_lora_parameters()`` and ``forward`` (which starts with ``_base_only()``).
It may refuse a merge in ``_check_mergeable(what)``. LoRALinear also overrides ``weight`` / ``_base_dtype`` /
``_dense_weight`` (a 4-bit base; a transformers Conv1D base, whose ``weight`` is the [out, in] transposed view of
its [in, out] parameter: merge / unmerge write that parameter through the view) and ``_dora_merge`` /
``_dora_unmerge`` (DoRA's row rescaling); without DoRA (``use_dora=True`` is refused unless the class sets
``_supports_dora``) they are the identity.

Adapter dtype (``adapter_dtype``, PEFT's ``autocast_adapter_dtype=True`` default): the factors (and DoRA's magnitude)
are created in ``self._factor_dtype``: float32 over a float16 / bfloat16 base (its compute dtype for a 4-bit one),
so that small optimizer updates are not rounded away, else the base dtype; ``adapter_dtype="base"`` keeps the base
dtype, a torch dtype is taken as given (resolve_adapter_dtype). The forwards compute in the input's dtype (the
fused op casts A / B to it; gradients reach the factors in their own dtype); merge / unmerge work in float32
(float64 if the base or the factors are float64) and round once into the base weight.
"""
import itertools
import math
import numbers
import sys

import torch
from torch import nn


def check_lora_args(r, alpha, dropout, max_rank=None):
    """(r, alpha, dropout) as int, float, float, or ValueError naming the argument for a bad rank (a positive int, at
    most max_rank if given), alpha (finite) or dropout (in [0, 1)). NumPy scalars are taken (a sweep's np.arange /
    np.linspace values: np.float32 was refused where np.float64, a float subclass, was taken)."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1 or (max_rank is not None and r > max_rank):
        raise ValueError(f"r must be {'a positive int' if max_rank is None else f'an int in 1..{max_rank}'}, "
                         f"got {r!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not -math.inf < alpha < math.inf:
        raise ValueError(f"alpha must be a finite float, got {alpha!r}")
    return int(r), float(alpha), float(dropout)


_HALF_DTYPES = (torch.float16, torch.bfloat16)
_ADAPTER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_adapter_dtype(adapter_dtype):
    """ValueError unless adapter_dtype is None, "base" or a floating-point torch dtype LoRA can hold."""
    if adapter_dtype is None or (isinstance(adapter_dtype, str) and adapter_dtype == "base"):
        return
    if not isinstance(adapter_dtype, torch.dtype) or adapter_dtype not in _ADAPTER_DTYPES:
        raise ValueError(f"adapter_dtype must be None (float32 for a 16-bit base, else the base dtype), \"base\" or "
                         f"one of torch.float16, torch.bfloat16, torch.float32, torch.float64; got {adapter_dtype!r}")


def resolve_adapter_dtype(adapter_dtype, base_dtype) -> torch.dtype:
    """The dtype LoRA factors are held in over a base of `base_dtype`, PEFT's rule (autocast_adapter_dtype=True):
    None -> float32 for a float16 / bfloat16 base, else the base dtype; "base" -> the base dtype; a dtype -> itself."""
    check_adapter_dtype(adapter_dtype)
    if adapter_dtype is None:
        return torch.float32 if base_dtype in _HALF_DTYPES else base_dtype
    return base_dtype if isinstance(adapter_dtype, str) else adapter_dtype


def cast_lora_params(params, dtype):
    """Cast parameters in place (``.data``: each stays the same Parameter, so factors tied across layers stay
    tied and references to them stay valid; an optimizer's state for them does not follow)."""
    for p in params:
        if p is not None and p.dtype != dtype:
            p.data = p.data.to(dtype)


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether module's forward is hooked (accelerate's _hf_hook, forward (pre-)hooks): its weights may then be
    what the hooks make them only while its own forward runs (offloading keeps them on the meta device)."""
    return hasattr(module, "_hf_hook") or bool(module._forward_pre_hooks) or bool(module._forward_hooks)


def is_hf_conv1d(module) -> bool:
    """Whether `module` is exactly transformers' Conv1D (GPT-2's c_attn / c_proj / c_fc: y = x W + b, W stored
    [in, out], PEFT's fan_in_fan_out layers). transformers is not imported: such layers exist only once it is."""
    return type(module) is getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def linear_features(layer):
    """(in_features, out_features) of a linear base layer: nn.Linear's (NF4Linear's, a tensor-parallel layer's)
    attributes, or, for transformers' Conv1D, which has none by those names, its [in, out] weight's shape."""
    if is_hf_conv1d(layer):
        return tuple(layer.weight.shape)
    return layer.in_features, layer.out_features


def lora_scaling(alpha, r, use_rslora=False) -> float:
    """PEFT's LoRA scaling: alpha / r, alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(r) if use_rslora else r)


_MERGED_KEY, _MERGED_NORM_KEY = "lora_merged", "lora_dora_merged_norm"


def _save_merged_state(module, state_dict, prefix, local_metadata):
    """A merged LoRA layer's state_dict marks it (its base weight holds W + s B A, and for DoRA the row norms
    unmerge() needs): loading it into an unmerged layer, or an unmerged checkpoint into a merged layer, then
    keeps the right state instead of adding the update twice or dropping it. Unmerged state_dicts are unchanged."""
    for key in (_MERGED_KEY, _MERGED_NORM_KEY):  # (the properties of the same names)
        value = getattr(module, key)
        if value is not None:
            state_dict[prefix + key] = value.detach().clone()
    return state_dict


class PlainLoRA(nn.Module):
    quantized = False  # (LoRALinear's flag for a 4-bit base; the others' bases never are)
    _supports_dora = False  # (LoRALinear: use_dora=True is taken)

    def __init__(self, base_layer: nn.Module, r, alpha, dropout, use_rslora, use_dora, kind, max_rank=None,
                 adapter_dtype=None):
        super().__init__()
        r, alpha, dropout = check_lora_args(r, alpha, dropout, max_rank)
        check_adapter_dtype(adapter_dtype)
        if use_dora and not self._supports_dora:
            raise ValueError(f"use_dora=True is not supported on {kind} layers by llmkern.peft ({type(self).__name__} "
                             f"is plain LoRA); leave the {kind} layer out of a DoRA adapter's target_modules")
        self.base_layer = base_layer
        self._factor_dtype = resolve_adapter_dtype(adapter_dtype, self._base_dtype())  # (what the factors start in)
        self.r, self.alpha, self.dropout, self.use_rslora = r, float(alpha), float(dropout), bool(use_rslora)
        self.use_dora = bool(use_dora)
        # DoRA: the row norms merge() divided by, which unmerge() needs (the merged weight no longer has them)
        self.register_buffer("_dora_merged_norm", None, persistent=False)
        self.merged = False
        self.disabled = False
        self._register_state_dict_hook(_save_merged_state)

    def _finish_init(self, freeze_base):
        """After the subclass made its factors: initialise them, then freeze the base (last: an init that raises,
        e.g. a DoRA magnitude of an offloaded weight, leaves the caller's layer as it was)."""
        self.reset_lora_parameters()
        if freeze_base:
            for p in self.base_layer.parameters():
                p.requires_grad_(False)

    def _offloaded(self) -> bool:
        """Whether the layer is offloaded: tensors on the meta device behind forward hooks (accelerate's
        cpu_offload, a device_map with offloading), which load the real ones only inside the hooked forward. There
        is then no weight here to read or to merge into (a merge "into" the meta tensor lost the update)."""
        hooked = has_forward_hooks(self) or has_forward_hooks(self.base_layer)
        return hooked and any(t.is_meta for t in itertools.chain(self.parameters(), self.buffers()))

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.r, self.use_rslora)

    @property
    def weight(self):
        return self.base_layer.weight

    def _base_dtype(self):
        """The dtype the base weight is stored (or for a 4-bit base computed) in."""
        return self.weight.dtype

    def _dense_weight(self):
        """The base weight as a dense tensor."""
        return self.weight

    def num_trainable_parameters(self) -> int:
        """How many of the layer's parameters train (requires_grad), as Adapter / PrefixTuning and
        count_trainable_parameters count: the LoRA factors (and DoRA's magnitude) by default, the base layer's too
        with freeze_base=False, a factor frozen by hand not (the factors were counted whatever their state)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype the LoRA factors are held in now (they follow module casts such as .to(dtype), .half())."""
        return self._lora_factors()[0].dtype

    def _adapter_params(self):
        """The trainable LoRA parameters (the factors; LoRALinear adds DoRA's magnitude)."""
        return list(self._lora_factors())

    def set_adapter_dtype(self, adapter_dtype):
        """Cast the LoRA parameters to ``resolve_adapter_dtype(adapter_dtype, base dtype)`` in place (each stays
        the same Parameter; an optimizer's state for them does not follow: cast before building the optimizer).
        Not while merged: unmerge() would take out another update than merge() put in."""
        if self.merged:
            raise ValueError("set_adapter_dtype: the layer is merged; unmerge() it first")
        cast_lora_params(self._adapter_params(), resolve_adapter_dtype(adapter_dtype, self._base_dtype()))

    def _acc_dtype(self):
        """float32 for 16-bit weights, float64 when the weight or the factors are float64 (a float32 product made
        the float64 merge/unmerge round trip lossy)."""
        f64 = torch.float64 in (self._base_dtype(), self._lora_factors()[0].dtype)
        return torch.float64 if f64 else torch.float32

    def _check_mergeable(self, what):
        """Raise ValueError when the update cannot be folded into the weight (nothing by default)."""

    def _check_merge_possible(self, what):
        """Raise ValueError when no merge can be done, whatever the values: an offloaded base weight, or what the
        subclass refuses (_check_mergeable)."""
        if self._offloaded():
            raise ValueError(f"{what}: the base layer's weight is offloaded (on the meta device behind accelerate's "
                             f"hooks): the update cannot be merged into it; merge before offloading, or keep the "
                             f"adapter unmerged")
        self._check_mergeable(what)

    def _dora_merge(self, new, safe_merge, what):
        """(DoRA's merged weight from ``new`` = W + s B A, the row norms unmerge() needs); (new, None) without DoRA."""
        return new, None

    def _dora_unmerge(self, w):
        """The merged weight ``w`` with DoRA's rescaling taken out (``w`` itself without DoRA)."""
        return w

    def _base_only(self) -> bool:
        """Whether forward is the base layer's alone: merged (the weight holds the update) or disabled (PEFT's
        disable_adapters). A disabled merged layer is unmerged first, as PEFT does, so that the output is the
        base model's."""
        if self.disabled and self.merged:
            self.unmerge()
        return self.merged or self.disabled

    def _merged_weight(self, safe_merge, what="merge"):
        """(the merged weight W + s B A, or with DoRA (m / n) ⊙ (W + s B A), in the accumulation dtype; n or None),
        checked as merge() documents when safe_merge."""
        self._check_merge_possible(what)
        new, norm = self._dora_merge(self._dense_weight().to(self._acc_dtype()) + self._delta(), safe_merge, what)
        # (checked in the base dtype the weight is stored in: float16 overflows past 65504)
        if safe_merge and not torch.isfinite(new.to(self._base_dtype())).all():
            raise ValueError(f"{what}: the merged weight has non-finite values (NaN/inf) in {self._base_dtype()}; "
                             "the adapter is broken (or the sum overflows the dtype), weight left unchanged")
        return new, norm

    @torch.no_grad()
    def merge(self, safe_merge: bool = True):
        """Fold the update into the base weight: after this, forward is the base layer's. With ``safe_merge`` a
        non-finite result raises and leaves the weight unchanged; a layer that cannot merge raises."""
        if self.merged:
            return
        new, norm = self._merged_weight(safe_merge)
        self.weight.copy_(new.to(self.weight.dtype))
        self._dora_merged_norm = norm
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        w = self._dora_unmerge(self.weight.to(self._acc_dtype()))
        self.weight.copy_((w - self._delta()).to(self.weight.dtype))
        self._dora_merged_norm = None
        self.merged = False

    # the merged layer's state-dict entries as attributes (torch.distributed.checkpoint resolves every key by name;
    # _save_merged_state reads them)
    @property
    def lora_merged(self):
        return torch.tensor(self.merged, device=self._lora_factors()[0].device) if self.merged else None

    @property
    def lora_dora_merged_norm(self):
        return self._dora_merged_norm

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A merged layer's state_dict says so (see _save_merged_state). A checkpoint carrying its base weight
        brings its merged state along; LoRA weights alone into a layer whose merged state differs would apply
        the update twice or not at all, so they are refused (and not loaded into the layer, which stays as it was)."""
        merged = state_dict.pop(prefix + _MERGED_KEY, None) is not None
        norm = state_dict.pop(prefix + _MERGED_NORM_KEY, None)
        name = prefix[:-1] or "the root module"
        if prefix + "base_layer.weight" in state_dict:  # the base weight brings its state (DoRA: and its norms)
            if merged and self.use_dora and norm is None:
                error_msgs.append(f"LoRA layer {name}: a merged DoRA checkpoint without its merged row norms "
                                  f"(the layer and its base layer were left as they were)")
                for key in [k for k in state_dict if k.startswith(prefix)]:  # (the base layer is loaded after
                    del state_dict[key]                                      # this, from the same dict)
                return
            self.merged = merged
            self._dora_merged_norm = norm.to(self.weight.device) if merged and self.use_dora else None
        elif merged != self.merged:
            error_msgs.append(f"LoRA layer {name} is {'' if self.merged else 'not '}merged but the checkpoint "
                              f"was saved {'' if merged else 'un'}merged and has no base weight for it: "
                              f"{'unmerge' if self.merged else 'merge'}() the layer first")
            return  # (nor are its factors loaded: others than those merged into the weight would unmerge wrongly)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
