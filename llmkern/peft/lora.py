"""LoRA modules: LoRALinear (an nn.Linear plus a low-rank update on the fused op) and inject_lora.

    W = W0 + scaling · B A,   A [r, in] kaiming-uniform, B [out, r] zeros (PEFT init),
    scaling = alpha / r, or alpha / sqrt(r) with rsLoRA.
    DoRA (use_dora=True): W = (m / ‖W0 + scaling · B A‖_row) ⊙ (W0 + scaling · B A), magnitude m [out]
    initialised to the row norms of W0 (PEFT init); see llmkern.peft.dora.
    QLoRA: the base layer may be a frozen 4-bit llmkern.peft.NF4Linear (see llmkern.peft.qlora).
"""
import math
import re
from typing import List, Sequence, Union

import torch
from torch import nn

from llmkern.ops.lora import lora_linear
from llmkern.peft.dora import dora_linear, dora_weight_norm
from llmkern.peft.qlora import NF4Linear, nf4_dora_linear

MAX_RANK = 256  # the largest r a LoRALinear takes


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether module's forward is hooked (accelerate's _hf_hook, forward (pre-)hooks): its weights may then be
    what the hooks make them only while its own forward runs (offloading keeps them on the meta device)."""
    return hasattr(module, "_hf_hook") or bool(module._forward_pre_hooks) or bool(module._forward_hooks)


def check_lora_args(r, alpha, dropout, max_rank=None):
    """ValueError naming the argument for a bad rank (a positive int, at most max_rank if given), alpha (finite)
    or dropout (in [0, 1))."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1 or (max_rank is not None and r > max_rank):
        raise ValueError(f"r must be {'a positive int' if max_rank is None else f'an int in 1..{max_rank}'}, "
                         f"got {r!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not -math.inf < alpha < math.inf:
        raise ValueError(f"alpha must be a finite float, got {alpha!r}")


def lora_scaling(alpha, r, use_rslora=False) -> float:
    """PEFT's LoRA scaling: alpha / r, alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(r) if use_rslora else r)


class LoRALinear(nn.Module):
    """An ``nn.Linear`` with a LoRA update computed by ``llmkern.lora_linear`` (one fused op).

    The wrapped layer is kept as ``base_layer`` (PEFT's name) and frozen; ``lora_A`` ``[r, in]`` and
    ``lora_B`` ``[out, r]`` are the trainable parameters. ``merge()`` folds ``scaling · B A`` into
    the base weight (checking the result is finite), ``unmerge()`` takes it out again.

    QLoRA: ``base_layer`` may be a frozen 4-bit ``NF4Linear`` (``quantized`` is then True). A and B take its
    compute_dtype, the forward hands its ``NF4Weight`` to ``lora_linear`` (the kernels read W in 4 bits) and
    the input must have the compute dtype (or run under autocast), as with a dense base. ``weight`` is then
    that NF4Weight. ``merge()`` raises: W + s·B·A cannot be stored in 4 bits without re-quantizing it (a
    new rounding error, and no exact unmerge); ``merged_linear()`` (what ``merge_lora(model, remove=True)``
    puts in the layer's place) returns a dense ``nn.Linear`` of dequant(W) + s·B·A instead. DoRA works: its
    row norms are computed from the dequantized weight (a temporary per call, see nf4_dora_linear).

    ``use_dora=True``: DoRA (``llmkern.peft.dora_linear``, PEFT's semantics): a third trainable parameter
    ``lora_magnitude_vector`` ``[out]`` (PEFT's name), initialised to the row norms of the base weight, and
    ``y = (m / ‖W + s B A‖_row) ⊙ (x Wᵀ + s (x Aᵀ) Bᵀ) + b`` with the norm detached and never forming B A.
    ``merge()`` writes ``(m / ‖W + s B A‖_row) ⊙ (W + s B A)`` into the weight and keeps the norm it used,
    so that ``unmerge()`` can divide it out again (as PEFT does).

    ``disabled = True`` runs the base layer alone (PEFT's disable_adapters); a merged layer is unmerged by its
    next forward, as PEFT does, so the output is the base model's.
    """

    def __init__(self, base_layer: Union[nn.Linear, NF4Linear], r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 use_rslora: bool = False, freeze_base: bool = True, use_dora: bool = False):
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, NF4Linear)):
            raise TypeError(f"base_layer must be an nn.Linear or an llmkern.peft.NF4Linear, got "
                            f"{type(base_layer).__name__}")
        check_lora_args(r, alpha, dropout, MAX_RANK)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.dropout, self.use_rslora = r, float(alpha), float(dropout), bool(use_rslora)
        w = base_layer.nf4_weight() if isinstance(base_layer, NF4Linear) else base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=w.device, dtype=w.dtype))
        self.use_dora = bool(use_dora)
        self.register_parameter("lora_magnitude_vector", None)
        # DoRA: the row norms merge() divided by, which unmerge() needs (the merged weight no longer has them)
        self.register_buffer("_dora_merged_norm", None, persistent=False)
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
    def quantized(self) -> bool:
        """Whether the base layer is a 4-bit NF4Linear (QLoRA)."""
        return isinstance(self.base_layer, NF4Linear)

    @property
    def weight(self):
        """The base weight: a tensor, or for a 4-bit base its NF4Weight (what lora_linear takes)."""
        return self.base_layer.nf4_weight() if self.quantized else self.base_layer.weight

    def _base_dtype(self):
        return self.base_layer.compute_dtype if self.quantized else self.base_layer.weight.dtype

    def _dense_weight(self):
        """The base weight as a dense tensor (a 4-bit one dequantized into a temporary, no autograd)."""
        if self.quantized:
            return self.base_layer.nf4_weight().dequantize()
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def reset_lora_parameters(self):
        """PEFT's default init: A kaiming-uniform(a=√5) like nn.Linear, B zeros (so ΔW = 0); with DoRA
        the magnitude is the row norms of the base weight (so the layer starts as the base layer)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.use_dora:
            self._init_magnitude()

    def _init_magnitude(self):
        m = self.dora_weight_norm().to(self._base_dtype())
        if self.lora_magnitude_vector is None:
            self.lora_magnitude_vector = nn.Parameter(m)
        else:
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(m)

    def set_use_dora(self, use_dora: bool):
        """Switch DoRA on (a new magnitude, initialised to the current ‖W + s B A‖ rows so that the
        output does not change) or off (the magnitude is dropped). Not while merged."""
        if self.merged:
            raise ValueError("set_use_dora: the module is merged; unmerge() it first")
        use_dora = bool(use_dora)
        if use_dora and self.lora_magnitude_vector is None:
            self.use_dora = True
            self._init_magnitude()
        elif not use_dora:
            self.lora_magnitude_vector = None
            self.use_dora = False

    def dora_weight_norm(self) -> torch.Tensor:
        """‖W + scaling · B A‖₂ per output row, [out], float32 (float64 for float64 weights), detached;
        computed without forming B A (llmkern.peft.dora_weight_norm). Only meaningful unmerged."""
        return dora_weight_norm(self._dense_weight(), self.lora_A, self.lora_B, self.scaling)

    def _acc_dtype(self):
        """float32 for 16-bit weights, float64 for float64 ones (a float32 product made the float64
        merge/unmerge round trip lossy)."""
        return torch.float64 if self._base_dtype() == torch.float64 else torch.float32

    def _delta(self):
        dt = self._acc_dtype()
        return self.scaling * (self.lora_B.to(dt) @ self.lora_A.to(dt))

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A, [out, in], computed in float32 (float64 for float64 weights) and returned
        in the weight's dtype. (With DoRA too, as PEFT's get_delta_weight: the magnitude rescaling is
        not part of it.)"""
        return self._delta().to(self._base_dtype())

    def _merged_weight(self, safe_merge, what="merge"):
        """(W + s B A, or with DoRA (m / n) ⊙ (W + s B A), in the accumulation dtype; n or None), checked
        as merge() documents when safe_merge."""
        new = self._dense_weight().to(self._acc_dtype()) + self._delta()
        norm = None
        if self.use_dora:
            norm = self.dora_weight_norm()
            factor = self.lora_magnitude_vector.to(norm.dtype) / norm
            if safe_merge and not bool((factor != 0).all()):
                raise ValueError(f"{what}: lora_magnitude_vector has zero entries (or the ratio underflows): "
                                 "unmerge() could not restore those rows; weight left unchanged")
            new = factor.to(new.dtype)[:, None] * new
        # (checked in the base dtype the weight is stored in: float16 overflows past 65504)
        if safe_merge and not torch.isfinite(new.to(self._base_dtype())).all():
            raise ValueError(f"{what}: the merged weight has non-finite values (NaN/inf) in {self._base_dtype()}; "
                             "the adapter is broken (or the sum overflows the dtype), weight left unchanged")
        return new, norm

    @torch.no_grad()
    def merge(self, safe_merge: bool = True):
        """Fold the update into the base weight: after this, forward is a plain linear.

        DoRA: the weight becomes ``(m / n) ⊙ (W + s B A)`` row-wise with ``n = ‖W + s B A‖_row`` (PEFT's
        merge); n is kept for unmerge(). With ``safe_merge`` a non-finite result, or a zero magnitude
        entry (its merged row would be 0 and unmerge() could not give W back), raises and leaves the
        weight unchanged. A 4-bit base raises ValueError (see the class docstring; ``merged_linear()``)."""
        if self.merged:
            return
        if self.quantized:
            raise ValueError("merge: the base layer is 4-bit (NF4Linear); W + s·B·A cannot be stored in it without "
                             "re-quantizing. Use merge_lora(model, remove=True) (or layer.merged_linear()), which "
                             "gives a dense nn.Linear of dequantized W + s·B·A (quantize_nf4 it again if wanted)")
        new, norm = self._merged_weight(safe_merge)
        self.weight.copy_(new.to(self.weight.dtype))
        self._dora_merged_norm = norm
        self.merged = True

    @torch.no_grad()
    def merged_linear(self, safe_merge: bool = True) -> nn.Linear:
        """A new dense, frozen ``nn.Linear`` computing what this layer computes (the merged weight as merge()
        forms it, the base bias), in the base dtype; this layer is unchanged. For a 4-bit base W is the
        dequantized weight, so the dense layer computes what this one does, up to rounding."""
        w = self.base_layer.weight.detach() if self.merged else self._merged_weight(safe_merge, "merged_linear")[0]
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                          dtype=self._base_dtype())
        dense.weight.copy_(w)
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense.requires_grad_(False)

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        w = self.weight.to(self._acc_dtype())
        if self.use_dora:  # PEFT's unmerge: W = W_merged / (m / n) - s B A, n as merge() computed it
            factor = self.lora_magnitude_vector.to(self._dora_merged_norm.dtype) / self._dora_merged_norm
            w = w / factor.to(w.dtype)[:, None]
        self.weight.copy_((w - self._delta()).to(self.weight.dtype))
        self._dora_merged_norm = None
        self.merged = False

    # the merged layer's state-dict entries as attributes (torch.distributed.checkpoint resolves every key by name)
    @property
    def lora_merged(self):
        return torch.tensor(self.merged, device=self.lora_A.device) if self.merged else None

    @property
    def lora_dora_merged_norm(self):
        return self._dora_merged_norm

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A merged layer's state_dict says so (see _save_merged_state). A checkpoint carrying its base weight
        brings its merged state along; LoRA weights alone into a layer whose merged state differs would apply
        the update twice or not at all, so they are refused."""
        merged = state_dict.pop(prefix + _MERGED_KEY, None) is not None
        norm = state_dict.pop(prefix + _MERGED_NORM_KEY, None)
        name = prefix[:-1] or "the root module"
        if prefix + "base_layer.weight" in state_dict:  # the base weight brings its state (DoRA: and its norms)
            if merged and self.use_dora and norm is None:
                error_msgs.append(f"LoRA layer {name}: a merged DoRA checkpoint without its merged row norms")
            else:
                self.merged = merged
                self._dora_merged_norm = norm.to(self.weight.device) if merged and self.use_dora else None
        elif merged != self.merged:
            error_msgs.append(f"LoRA layer {name} is {'' if self.merged else 'not '}merged but the checkpoint "
                              f"was saved {'' if merged else 'un'}merged and has no base weight for it: "
                              f"{'unmerge' if self.merged else 'merge'}() the layer first")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def num_trainable_parameters(self) -> int:
        n = self.lora_A.numel() + self.lora_B.numel()
        return n + (self.lora_magnitude_vector.numel() if self.lora_magnitude_vector is not None else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled and self.merged:  # the merged weight holds the update: take it out first, as PEFT does
            self.unmerge()
        if self.merged or self.disabled:
            return self.base_layer(x)
        p = self.dropout if self.training else 0.0
        if has_forward_hooks(self.base_layer):
            return self._forward_through_base(x, p)
        if self.quantized:
            return self._forward_nf4(x, p)
        if self.use_dora:
            return dora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B,
                               self.lora_magnitude_vector, self.scaling, p)
        return lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B,
                           self.scaling, p)

    def _forward_through_base(self, x, p):
        """base_layer(x) + the update, unfused: the base layer has forward hooks, e.g. accelerate's offload
        (cpu_offload, device_map with offloading), which keeps its weight on the meta device and loads it only
        inside base_layer's own forward, so the fused op, which reads the weight, cannot run."""
        if self.use_dora:
            raise NotImplementedError("LoRALinear with DoRA needs the base weight's row norms; its base layer has "
                                      "forward hooks (accelerate offloading?) that load the weight only inside its "
                                      "own forward: run it without offloading, or through PEFT")
        h = nn.functional.dropout(x, p, training=p > 0)
        return self.base_layer(x) + self.scaling * nn.functional.linear(nn.functional.linear(h, self.lora_A),
                                                                        self.lora_B)

    def _forward_nf4(self, x, p):
        base = self.base_layer
        base.check_input(x)
        if self.use_dora:
            return nf4_dora_linear(x, base.nf4_weight(), base.bias, self.lora_A, self.lora_B,
                                   self.lora_magnitude_vector, self.scaling, p)
        return lora_linear(x, base.nf4_weight(), base.bias, self.lora_A, self.lora_B, self.scaling, p)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout}, rslora={self.use_rslora}, "
                + ("dora=True, " if self.use_dora else "") + ("nf4=True, " if self.quantized else "")
                + f"merged={self.merged}")


_MERGED_KEY, _MERGED_NORM_KEY = "lora_merged", "lora_dora_merged_norm"


def _save_merged_state(module, state_dict, prefix, local_metadata):
    """A merged LoRALinear's state_dict marks it (its base weight holds W + s B A, and for DoRA the row norms
    unmerge() needs): loading it into an unmerged layer, or an unmerged checkpoint into a merged layer, then
    keeps the right state instead of adding the update twice or dropping it. Unmerged state_dicts are unchanged."""
    for key in (_MERGED_KEY, _MERGED_NORM_KEY):  # (the properties of the same names)
        value = getattr(module, key)
        if value is not None:
            state_dict[prefix + key] = value.detach().clone()
    return state_dict


def _matches(name: str, targets: Union[str, Sequence[str]]) -> bool:
    """PEFT's rule: a string is a full regex match on the module name; a list matches names that
    equal an entry or end with '.' + entry."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model: nn.Module, name: str, module: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject_lora(model: nn.Module, target_modules: Union[str, Sequence[str]] = ("q_proj", "v_proj"),
                r: int = 8, alpha: float = 8.0, dropout: float = 0.0, use_rslora: bool = False,
                freeze_base: bool = True, use_dora: bool = False) -> List[str]:
    """Replace every ``nn.Linear`` (or 4-bit ``NF4Linear``: QLoRA, see quantize_nf4) whose name matches
    ``target_modules`` by a ``LoRALinear`` (``use_dora=True``: DoRA ones, with a trainable magnitude vector
    per layer), every matching ``nn.Embedding`` (e.g. "embed_tokens", "wte") by a ``LoRAEmbedding``
    (PEFT's LoRA on embeddings) and every matching ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` by a
    ``LoRAConv`` (PEFT's LoRA on convs); ``use_dora=True`` with an embedding or conv target raises ValueError.

    With ``freeze_base`` (default) every other parameter of the model is frozen too, so that only
    the LoRA parameters train (parameter-efficient ones the model already has, LoRA, DoRA magnitudes, adapters
    and prefixes, keep their state). Returns the names of the wrapped modules (raises if none matched).
    """
    from llmkern.peft.lora_conv import CONV_TYPES, LoRAConv
    from llmkern.peft.lora_embedding import LoRAEmbedding

    wrapped = {id(m.base_layer) for m in model.modules() if isinstance(m, (LoRALinear, LoRAEmbedding, LoRAConv))}
    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, NF4Linear, nn.Embedding) + CONV_TYPES) and id(m) not in wrapped
             and _matches(n, target_modules)]
    if "" in names:  # (the root: a LoRALinear would become a child of the very layer it wraps)
        raise ValueError(f"target_modules {target_modules!r} matched the model itself, an {type(model).__name__}; "
                         f"wrap a single layer directly: LoRALinear(layer, r=...)")
    mha = _read_in_place(model, names)
    if mha:
        raise ValueError(f"inject_lora: {mha[0]} is the out_proj of an nn.MultiheadAttention, which reads its weight "
                         f"directly (F.multi_head_attention_forward), so a LoRA there would never run; leave it out "
                         f"of target_modules")
    if not names:
        raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear (or NF4Linear, nn.Embedding, "
                         f"nn.Conv1d/2d/3d) in the model")
    embeddings = [n for n in names if isinstance(model.get_submodule(n), nn.Embedding)]
    if use_dora and embeddings:
        raise ValueError(f"inject_lora: use_dora=True is not supported on embedding layers ({embeddings[0]} is an "
                         f"nn.Embedding); leave it out of target_modules, or inject it in a separate call without "
                         f"use_dora")
    convs = [n for n in names if isinstance(model.get_submodule(n), CONV_TYPES)]
    if use_dora and convs:
        raise ValueError(f"inject_lora: use_dora=True is not supported on conv layers ({convs[0]} is an "
                         f"{type(model.get_submodule(convs[0])).__name__}); leave it out of target_modules, or "
                         f"inject it in a separate call without use_dora")
    # every wrapper built (its arguments checked) before the model changes: a refused call leaves it as it was
    new = [(n, LoRAEmbedding(model.get_submodule(n), r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                             freeze_base=False) if n in embeddings else
            LoRAConv(model.get_submodule(n), r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                     freeze_base=False) if n in convs else
            LoRALinear(model.get_submodule(n), r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                       freeze_base=False, use_dora=use_dora)) for n in names]
    if freeze_base:
        _freeze_non_lora(model)  # (the wrapped layers' own parameters included)
    for n, layer in new:
        _set_submodule(model, n, layer)
    return names


def _read_in_place(model, names):
    """The names among `names` of nn.MultiheadAttention's out_proj (a Linear subclass whose forward MHA never calls)."""
    owners = {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
              if isinstance(m, nn.MultiheadAttention)}
    return [n for n in names if n in owners]


def _freeze_non_lora(model: nn.Module):
    """requires_grad=False on every parameter except the model's parameter-efficient ones, which keep their state:
    the LoRA A/B weights (and DoRA magnitudes) of LoRALinear, LoRAEmbedding and LoRAConv modules, and Adapter /
    PrefixTuning parameters (an add_adapters or inject_lora call after another one must not freeze what the first one
    added)."""
    from llmkern.peft.adapter import Adapter
    from llmkern.peft.prefix import PrefixTuning

    # (tensor-parallel layers hold their LoRA shards as lora_A / lora_B parameters too, LoRAConv its conv factors)
    names = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")
    keep = {id(p) for m in model.modules() for p in (getattr(m, n, None) for n in names)
            if isinstance(p, nn.Parameter)}
    keep |= {id(p) for m in model.modules() if isinstance(m, (Adapter, PrefixTuning)) for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in keep:
            p.requires_grad_(False)


def _tied_base_weights(model: nn.Module, mods):
    """{LoRALinear name: name of another parameter of `model` that is the same tensor as its base
    weight} (tied embeddings)."""
    owners = {}
    for n, m in model.named_modules(remove_duplicate=False):
        for pn, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((m, f"{n}.{pn}" if n else pn))
    tied = {}
    for n, mod in mods:
        others = [name for m, name in owners.get(id(mod.base_layer.weight), []) if m is not mod.base_layer]
        if others:
            tied[n] = others[0]
    return tied


def lora_modules(model: nn.Module):
    """(name, LoRALinear) pairs of a model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_embedding_modules(model: nn.Module):
    """(name, LoRAEmbedding) pairs of a model (lora_modules lists the LoRALinear ones only)."""
    from llmkern.peft.lora_embedding import LoRAEmbedding

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAEmbedding)]


def lora_conv_modules(model: nn.Module):
    """(name, LoRAConv) pairs of a model (lora_modules lists the LoRALinear ones only: a LoRAConv's lora_A /
    lora_B are conv kernels, not [r, in] / [out, r] matrices)."""
    from llmkern.peft.lora_conv import LoRAConv

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRAConv)]


def merge_lora(model: nn.Module, safe_merge: bool = True, remove: bool = False) -> nn.Module:
    """Merge every LoRALinear, LoRAEmbedding and LoRAConv; with ``remove`` put the plain nn.Linear /
    nn.Embedding / nn.Conv back in its place. (A LoRAConv over a conv with groups > 1 cannot merge: ValueError,
    nothing merged.)

    Raises ValueError (nothing merged) when a base weight is shared with another module, e.g. an
    lm_head tied to the token embedding: merging would change that module too. LoRA layers over a 4-bit
    NF4Linear (QLoRA) cannot merge in place: without ``remove`` they raise ValueError (nothing merged);
    with ``remove`` each is replaced by ``merged_linear()``, a dense nn.Linear of dequantized W + s·B·A
    (all of them formed before the model is changed)."""
    mods = lora_modules(model)
    quantized = [(n, m) for n, m in mods if m.quantized]
    if quantized and not remove:
        raise ValueError(f"merge_lora: {quantized[0][0]} has a 4-bit base layer (NF4Linear) that cannot hold W + "
                         f"s·B·A; pass remove=True to replace such layers by dense nn.Linear layers of the merged "
                         f"weight (nothing merged)")
    others = lora_embedding_modules(model) + lora_conv_modules(model)  # (embeddings, convs: merge, _merged_weight)
    tied = _tied_base_weights(model, [(n, m) for n, m in mods + others if not m.merged and not m.quantized])
    if tied:
        n, owner = next(iter(tied.items()))
        raise ValueError(f"merge_lora: {n}'s weight is shared with {owner} (tied weights); merging would "
                         f"change {owner} too. Untie the weights first (or keep the adapter unmerged)")
    dense = {n: m.merged_linear(safe_merge=safe_merge) for n, m in quantized}
    for _, m in others:  # (a max_norm embedding, a grouped conv refuse to merge, safe_merge or not)
        if not m.merged:
            m._merged_weight(safe_merge)
    if safe_merge:  # every merge checked before any is done: a broken adapter leaves the model as it was
        for _, m in mods:
            if not m.merged and not m.quantized:
                m._merged_weight(True)
    for n, m in mods + others:
        if n in dense:
            _set_submodule(model, n, dense[n])
            continue
        m.merge(safe_merge=safe_merge)
        if remove:
            _set_submodule(model, n, m.base_layer)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for _, m in lora_modules(model) + lora_embedding_modules(model) + lora_conv_modules(model):
        m.unmerge()
    return model


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
