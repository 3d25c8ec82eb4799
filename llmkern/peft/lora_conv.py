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

from llmkern.peft._plain_lora import PlainLoRA

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LoRAConv(PlainLoRA):
    """An ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (kept frozen as ``base_layer``, PEFT's name) plus a
    low-rank update computed the way PEFT's ``lora.Conv1d`` / ``Conv2d`` / ``Conv3d`` compute it, with the
    shapes of PEFT's factors as parameters ``lora_A`` ``[r, in_channels, *kernel_size]`` and ``lora_B``
    ``[out_channels, r / groups, 1, ...]`` (PEFT's checkpoint keys ``<module>.lora_A.weight`` /
    ``<module>.lora_B.weight`` hold exactly these tensors), so that adapters move between the two unchanged.

    Forward: ``base_layer(x) + conv(conv(dropout(x), A, stride, padding), B, groups=base.groups) · scaling``,
    the input cast to A's dtype and the sum to the base output's dtype, as PEFT does. A reads every input
    channel (groups 1), B has the base's groups, so r must be divisible by ``groups`` (PEFT's rule).

    ``adapter_dtype``: as LoRALinear's (default float32 over a float16 / bfloat16 conv, PEFT's
    ``autocast_adapter_dtype=True``; ``"base"`` keeps the conv's dtype).

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
                 use_rslora: bool = False, freeze_base: bool = True, use_dora: bool = False,
                 adapter_dtype=None):
        if not isinstance(base_layer, CONV_TYPES):
            raise TypeError(f"base_layer must be an nn.Conv1d, nn.Conv2d or nn.Conv3d, got {type(base_layer).__name__}")
        super().__init__(base_layer, r, alpha, dropout, use_rslora, use_dora, "conv", adapter_dtype=adapter_dtype)
        _check_base(base_layer, self.r)
        self.in_channels, self.out_channels = base_layer.in_channels, base_layer.out_channels
        self.groups = base_layer.groups
        dev, dt = base_layer.weight.device, self._factor_dtype
        nd = base_layer.weight.dim() - 2
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_channels, *base_layer.kernel_size, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.empty(self.out_channels, self.r // self.groups, *(1,) * nd, device=dev,
                                               dtype=dt))
        self._finish_init(freeze_base)

    def _lora_factors(self):
        return self.lora_A, self.lora_B

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

    def reset_lora_parameters(self):
        """PEFT's default init: A kaiming-uniform(a=√5) (nn.Conv's init), B zeros (so the update starts at 0)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_only = self._base_only()  # (merged or disabled; a disabled merged layer is unmerged first)
        result = self.base_layer(x)
        if base_only:
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
