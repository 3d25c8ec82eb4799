"""What LoRAEmbedding and LoRAConv share: plain LoRA (no DoRA, no 4-bit base) around a layer whose weight the
update folds into. A subclass creates its two factors, defines `_lora_factors()` (A, B), `_delta()` (the update
in the weight's shape, in `_acc_dtype()`), `reset_lora_parameters()` and `forward`, and may refuse a merge in
`_check_mergeable(what)`. Merging, unmerging and the merged state in the state dict work as LoRALinear's.
"""
import torch
from torch import nn

from llmkern.peft.lora import _MERGED_KEY, _MERGED_NORM_KEY, _save_merged_state, check_lora_args, lora_scaling


class PlainLoRA(nn.Module):
    quantized = False  # (LoRALinear's flag for a 4-bit base; these bases never are)

    def __init__(self, base_layer: nn.Module, r, alpha, dropout, use_rslora, use_dora, kind):
        super().__init__()
        check_lora_args(r, alpha, dropout)
        if use_dora:
            raise ValueError(f"use_dora=True is not supported on {kind} layers by llmkern.peft ({type(self).__name__} "
                             f"is plain LoRA); leave the {kind} layer out of a DoRA adapter's target_modules")
        self.base_layer = base_layer
        self.r, self.alpha, self.dropout, self.use_rslora = r, float(alpha), float(dropout), bool(use_rslora)
        self.use_dora = False
        self.merged = False
        self.disabled = False
        self._register_state_dict_hook(_save_merged_state)

    def _finish_init(self, freeze_base):
        """After the subclass made its factors: freeze the base, initialise the factors."""
        if freeze_base:
            for p in self.base_layer.parameters():
                p.requires_grad_(False)
        self.reset_lora_parameters()

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.r, self.use_rslora)

    @property
    def weight(self):
        return self.base_layer.weight

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self._lora_factors())

    def _acc_dtype(self):
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32

    def _check_mergeable(self, what):
        """Raise ValueError when the update cannot be folded into the weight (nothing by default)."""

    def _merged_weight(self, safe_merge, what="merge"):
        self._check_mergeable(what)
        new = self.weight.to(self._acc_dtype()) + self._delta()
        if safe_merge and not torch.isfinite(new.to(self.weight.dtype)).all():
            raise ValueError(f"{what}: the merged weight has non-finite values (NaN/inf) in {self.weight.dtype}; "
                             "the adapter is broken (or the sum overflows the dtype), weight left unchanged")
        return new

    @torch.no_grad()
    def merge(self, safe_merge: bool = True):
        """Fold the update into the base weight: after this, forward is the base layer's. With ``safe_merge`` a
        non-finite result raises and leaves the weight unchanged; a layer that cannot merge raises."""
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
        return torch.tensor(self.merged, device=self._lora_factors()[0].device) if self.merged else None

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
