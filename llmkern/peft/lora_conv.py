"""LoRA on convolution layers: LoRAConv, compatible with Hugging Face PEFT's LoRA ``Conv1d`` / ``Conv2d`` /
``Conv3d`` layers (PEFT's ``_ConvNd``).

    A = lora_A [r, in_channels, *kernel_size] kaiming-uniform(a=√5), a conv with the base's kernel_size,
        stride and padding (groups 1, no bias),
    B = lora_B [out_channels, r / groups, 1, ...] zeros, a 1x1(x1) conv with the base's groups (PEFT's init),
    scaling = alpha / r, or alpha / sqrt(r) with rsLoRA.

    y = base_layer(x) + scaling · conv_B(conv_A(dropout(x)))
    W = W0 + scaling · Σ_r B[:, r] A[r]          (merge; groups == 1 only)

Plain PyTorch ops (F.conv1d / conv2d / conv3d): the update is two small convolutions, the first with r
output channels; no Triton kernel is involved.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from llmkern.peft.lora import _MERGED_KEY, _MERGED_NORM_KEY, _save_merged_state, lora_scaling

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LoRAConv(nn.Module):
    """An ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (kept frozen as ``base_layer``, PEFT's name) plus a
    low-rank update computed the way PEFT's ``lora.Conv1d`` / ``Conv2d`` / ``Conv3d`` compute it, with the
    shapes of PEFT's factors as parameters ``lora_A`` ``[r, in_channels, *kernel_size]`` and ``lora_B``
    ``[out_channels, r / groups, 1, ...]`` (PEFT's checkpoint keys ``<module>.lora_A.weight`` /
    ``<module>.lora_B.weight`` hold exactly these tensors), so that adapters move between the two unchanged.

    Forward: ``base_layer(x) + conv(conv(dropout(x), A, stride, padding), B, groups=base.groups) · scaling``,
    the input cast to A's dtype and the sum to the base output's dtype, as PEFT does. A reads every input
    channel (groups 1), B has the base's groups, so r must be divisible by ``groups`` (PEFT's rule).

    Refused with ValueError naming the argument, where PEFT's parameterisation does not fit the base layer:

    * ``dilation`` other than 1: PEFT's A conv ignores the base's dilation, so its output has another spatial
      shape than the base's (PEFT fails in the forward, or for padding "same" silently reads another window).
    * ``padding_mode`` other than "zeros": PEFT's A conv zero-pads, a different output at the borders.
    * ``r`` not divisible by ``groups`` (as PEFT); ``use_dora=True`` (DoRA on convs is not supported here);
      a lazy conv whose weight is not materialised yet.

    ``merge()`` folds ``scaling · Σ_r B[:, r] A[r]`` into the base weight (refusing non-finite results with
    ``safe_merge``); with ``groups > 1`` the update is not a grouped conv of the base's shape, so merge()
    raises ValueError (PEFT raises too). ``unmerge()`` takes the update out. ``disabled = True`` runs the base
    layer alone (a merged layer is unmerged by its next forward, as PEFT does). A merged layer's state_dict
    says so (``lora_merged``), as LoRALinear's does.
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 use_rslora: bool = False, freeze_base: bool = True, use_dora: bool = False):
        super().__init__()
        if not isinstance(base_layer, CONV_TYPES):
            raise TypeError(f"base_layer must be an nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not -math.inf < alpha < math.inf:
            raise ValueError(f"alpha must be a finite float, got {alpha!r}")
        if use_dora:
            raise ValueError("use_dora=True is not supported on conv layers by llmkern.peft (LoRAConv is plain "
                             "LoRA); leave the conv layer out of a DoRA adapter's target_modules")
        _check_base(base_layer, r)
        self.base_layer = base_layer
        self.in_channels, self.out_channels = base_layer.in_channels, base_layer.out_channels
        self.groups = base_layer.groups
        self.r, self.alpha, self.dropout, self.use_rslora = r, float(alpha), float(dropout), bool(use_rslora)
        self.use_dora = False
        w = base_layer.weight
        nd = w.dim() - 2
        self.lora_A = nn.Parameter(torch.empty(r, self.in_channels, *base_layer.kernel_size, device=w.device,
                                               dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_channels, r // self.groups, *(1,) * nd, device=w.device,
                                               dtype=w.dtype))
        self.merged = False
        self.disabled = False
        self._register_state_dict_hook(_save_merged_state)
        if freeze_base:
            for p in base_layer.parameters():
                p.requires_grad_(False)
        self.reset_lora_parameters()

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.r, self.use_rslora)

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    # the base conv's geometry, read through the wrapper as PEFT's layers allow (transformers' Whisper encoder
    # reads conv1.stride / conv2.stride of its convs in its forward)
    kernel_size = property(lambda self: self.base_layer.kernel_size)
    stride = property(lambda self: self.base_layer.stride)
    padding = property(lambda self: self.base_layer.padding)
    dilation = property(lambda self: self.base_layer.dilation)
    padding_mode = property(lambda self: self.base_layer.padding_mode)

    quantized = False  # (LoRALinear's flag for a 4-bit base; a conv is never one)

    def reset_lora_parameters(self):
        """PEFT's default init: A kaiming-uniform(a=√5) (nn.Conv's init), B zeros (so the update starts at 0)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def num_trainable_parameters(self) -> int:
        return self.lora_A.numel() + self.lora_B.numel()

    def _acc_dtype(self):
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32

    def _delta(self):
        dt = self._acc_dtype()
        A, B = self.lora_A.to(dt), self.lora_B.to(dt).flatten(1)  # B: [out, r] (groups == 1)
        return self.scaling * torch.einsum("or,ri...->oi...", B, A)

    def _check_mergeable(self, what):
        if self.groups > 1:
            raise ValueError(f"{what}: the base conv has groups={self.groups}: the LoRA update reads every input "
                             f"channel, which a grouped weight cannot hold (PEFT refuses too); keep the adapter "
                             f"unmerged")

    def delta_weight(self) -> torch.Tensor:
        """scaling · Σ_r B[:, r] A[r], the base weight's shape [out, in, *k] (PEFT's get_delta_weight), computed
        in float32 (float64 for float64 weights) and returned in the weight's dtype; groups == 1 only."""
        self._check_mergeable("delta_weight")
        return self._delta().to(self.weight.dtype)

    def _merged_weight(self, safe_merge, what="merge"):
        self._check_mergeable(what)
        new = self.weight.to(self._acc_dtype()) + self._delta()
        if safe_merge and not torch.isfinite(new.to(self.weight.dtype)).all():
            raise ValueError(f"{what}: the merged weight has non-finite values (NaN/inf) in {self.weight.dtype}; "
                             "the adapter is broken (or the sum overflows the dtype), weight left unchanged")
        return new

    @torch.no_grad()
    def merge(self, safe_merge: bool = True):
        """Fold the update into the base weight: after this, forward is the plain conv. With ``safe_merge`` a
        non-finite result raises and leaves the weight unchanged; ``groups > 1`` raises."""
        if self.merged:
            return
        self.weight.copy_(self._merged_weight(safe_merge).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        self.weight.copy_((self.weight.to(self._acc_dtype()) - self._delta()).to(self.weight.dtype))
        self.merged = False

    # the merged layer's state-dict entries as attributes (see LoRALinear; _save_merged_state reads them)
    @property
    def lora_merged(self):
        return torch.tensor(self.merged, device=self.lora_A.device) if self.merged else None

    @property
    def lora_dora_merged_norm(self):
        return None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """As LoRALinear's: a checkpoint with the base weight brings its merged state along; LoRA weights alone
        into a layer whose merged state differs are refused (the update would count twice, or not at all)."""
        merged = state_dict.pop(prefix + _MERGED_KEY, None) is not None
        state_dict.pop(prefix + _MERGED_NORM_KEY, None)
        name = prefix[:-1] or "the root module"
        if prefix + "base_layer.weight" in state_dict:
            self.merged = merged
        elif merged != self.merged:
            error_msgs.append(f"LoRA layer {name} is {'' if self.merged else 'not '}merged but the checkpoint "
                              f"was saved {'' if merged else 'un'}merged and has no base weight for it: "
                              f"{'unmerge' if self.merged else 'merge'}() the layer first")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled and self.merged:  # the merged weight holds the update: take it out first, as PEFT does
            self.unmerge()
        result = self.base_layer(x)
        if self.merged or self.disabled:
            return result
        base = self.base_layer
        conv = _CONV_FN[self.lora_A.dim() - 2]
        p = self.dropout if self.training else 0.0
        h = F.dropout(x, p, training=True) if p > 0 else x
        h = h.to(self.lora_A.dtype)  # (PEFT casts the input to the adapter's dtype)
        after_a = conv(h, self.lora_A, None, base.stride, base.padding)
        update = conv(after_a, self.lora_B, None, 1, 0, 1, base.groups) * self.scaling
        return (result + update).to(result.dtype)

    def extra_repr(self):
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"kernel_size={tuple(self.lora_A.shape[2:])}, groups={self.groups}, r={self.r}, alpha={self.alpha}, "
                f"dropout={self.dropout}, rslora={self.use_rslora}, merged={self.merged}")


def _check_base(base, r):
    """ValueError, naming the argument, for conv layers PEFT's LoRA parameterisation does not fit (see LoRAConv)."""
    name = type(base).__name__
    if isinstance(base.weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"base_layer: the {name}'s weight is not initialised yet (a lazy conv): run one forward "
                         f"through it before adding LoRA")
    if r % base.groups:
        raise ValueError(f"r={r} is not divisible by the base {name}'s groups={base.groups}: LoRA's B conv has the "
                         f"base's groups, so r must be a multiple of them (as PEFT requires)")
    if any(d != 1 for d in base.dilation):
        raise ValueError(f"the base {name} has dilation={tuple(base.dilation)}: PEFT's LoRA A conv ignores dilation "
                         f"(its output would not have the base output's shape); only dilation 1 is supported")
    if base.padding_mode != "zeros":
        raise ValueError(f"the base {name} has padding_mode={base.padding_mode!r}: PEFT's LoRA A conv pads with "
                         f"zeros (a different update at the borders); only padding_mode='zeros' is supported")
