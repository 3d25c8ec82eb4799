"""Bottleneck adapters (Houlsby et al., 2019): h <- h + f(h W_down) W_up.

``Adapter`` is the bottleneck itself; ``add_adapters`` places one after each matching sub-layer
(an attention block and/or an FFN block) of a model, applied to the sub-layer's output (the first
element when it returns a tuple, as Hugging Face attention modules do).
"""
import numbers
import re
from typing import List, Sequence, Union

import torch
from torch import nn

_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Adapter(nn.Module):
    """h + f(h W_down + b_down) W_up + b_up with W_down [d, r], W_up [r, d].

    ``up`` starts at zero, so a fresh adapter is the identity (near-identity init of the paper).
    Trainable parameters: 2·r·d + r + d (see llmkern.peft.counts).
    """

    def __init__(self, d: int, r: int, activation: str = "relu", device=None, dtype=None):
        super().__init__()
        for name, v in (("d", d), ("r", r)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        d, r = int(d), int(r)  # (NumPy ints taken, stored as ints)
        if activation not in _ACTS:
            raise ValueError(f"activation must be one of {sorted(_ACTS)}, got {activation!r}")
        self.d, self.r = d, r
        self.down = nn.Linear(d, r, device=device, dtype=dtype)
        self.act = _ACTS[activation]()
        self.up = nn.Linear(r, d, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class AdapterWrapper(nn.Module):
    """Runs ``module`` then an ``Adapter`` on its output (first element of a tuple output)."""

    def __init__(self, module: nn.Module, adapter: Adapter):
        super().__init__()
        self.module = module
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.adapter(out[0]),) + out[1:]
        return self.adapter(out)


def add_adapters(model: nn.Module, targets: Union[str, Sequence[str]], d: int, r: int,
                 activation: str = "relu", freeze_base: bool = True) -> List[str]:
    """Put an Adapter after every sub-module whose name matches ``targets`` (a regex, or names
    such as ("self_attn", "mlp") matched as name suffixes). With ``freeze_base`` every other parameter is frozen
    (the parameter-efficient ones the model already has, LoRA, adapters, prefixes, keep their state). Returns the
    wrapped names."""
    def match(n):
        if isinstance(targets, str):
            return re.fullmatch(targets, n) is not None
        return any(n == t or n.endswith("." + t) for t in targets)

    names = [n for n, _ in model.named_modules() if n and match(n)]
    if not names:
        raise ValueError(f"targets {targets!r} matched no module of the model")
    nested = [(n, o) for n in names for o in names if n.startswith(o + ".")]
    if nested:  # (wrapping the outer one first would hide the inner one's path; nothing changed yet)
        raise ValueError(f"targets {targets!r} matched {nested[0][0]!r} inside another match {nested[0][1]!r}: an "
                         f"adapter after both would apply twice; narrow the targets")
    wrappers = []  # (all built, their arguments checked, before the model changes: a refused call leaves it as it was)
    for n in names:
        mod = model.get_submodule(n)
        ref = next(mod.parameters(), None)
        ad = Adapter(d, r, activation, device=None if ref is None else ref.device,
                     dtype=None if ref is None else ref.dtype)
        wrappers.append((n, AdapterWrapper(mod, ad)))
    if freeze_base:  # (LoRA, adapters and prefixes the model already has keep their state)
        from llmkern.peft.lora import _freeze_non_lora

        _freeze_non_lora(model)
    for n, wrapper in wrappers:
        parent_name, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
    return names
