"""LoRA adapters in Hugging Face PEFT's on-disk format, both ways.

A PEFT LoRA adapter directory holds ``adapter_config.json`` (peft_type "LORA", r, lora_alpha,
target_modules, use_rslora, rank_pattern, alpha_pattern, ...) and ``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_A.weight`` ([r, in]) and ``...lora_B.weight``
([out, r]), where <module> is the module's name inside the (unwrapped) base model.
"""
import json
import os
import re
from collections import Counter
from typing import Optional

import torch
from torch import nn

from llmkern.peft.lora import LoRALinear, _freeze_non_lora, _set_submodule, lora_modules

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# PEFT saves the base weights of targeted embedding-like layers (lm_head, embed_tokens) next to their
# LoRA weights (save_embedding_layers="auto") and loads them back into the base layer.
_BASE_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.base_layer\.weight$")
_EMBED_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_[AB](?:\.[^.]+)?$")

# LoraConfig fields that change what the saved A/B weights mean (LoRA variants, extra modules,
# quantisation, replicated layers): an adapter using any of them is not plain LoRA.
_UNSUPPORTED = (
    ("use_dora", "DoRA (use_dora)"),
    ("lora_bias", "LoRA bias (lora_bias)"),
    ("fan_in_fan_out", "fan_in_fan_out (GPT-2 Conv1D layers)"),
    ("alora_invocation_tokens", "aLoRA (alora_invocation_tokens)"),
    ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
    ("arrow_config", "Arrow routing (arrow_config)"),
    ("velora_config", "VeLoRA (velora_config)"),
    ("monteclora_config", "MonteCLoRA (monteclora_config)"),
    ("kasa_config", "KaSA (kasa_config)"),
    ("use_qalora", "QALoRA (use_qalora)"),
    ("layer_replication", "layer_replication"),
    ("modules_to_save", "modules_to_save"),
    ("trainable_token_indices", "trainable_token_indices"),
    ("target_parameters", "target_parameters (LoRA on nn.Parameter)"),
)
# init_lora_weights values whose adapters only make sense on base weights PEFT modified at init
# (PiSSA, CorDA, OLoRA, LoftQ, LoRA-GA: W_res = W - s·B0 A0; PEFT recomputes it on load) or that
# select a LoRA variant (MiCA).
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga", "mica")


def _pattern_value(patterns, name, default):
    """PEFT's rank_pattern / alpha_pattern lookup: key k matches module names ending in k."""
    for k, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({k})$", name):
            return v
    return default


def _target_modules(model, names):
    """PEFT's target_modules: the module-name suffixes when they select exactly `names`, else a
    regex (PEFT full-matches a string against module names) listing them."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    lora_children = {n + ".base_layer" for n in names}
    linears = {n for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, LoRALinear)) and n not in lora_children}
    selected = {n for n in linears if any(n == s or n.endswith("." + s) for s in suffixes)}
    if selected == set(names):
        return suffixes
    return "^(" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def save_peft_adapter(model: nn.Module, path: str, base_model_name_or_path: Optional[str] = None,
                      task_type: Optional[str] = "CAUSAL_LM") -> None:
    """Write the model's LoRALinear adapters as a PEFT adapter directory (loadable by
    ``peft.PeftModel.from_pretrained(base_model, path)``)."""
    from safetensors.torch import save_file

    mods = lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRALinear modules to save (use inject_lora or load_peft_adapter)")
    rslora = {m.use_rslora for _, m in mods}
    if len(rslora) != 1:
        raise ValueError("save_peft_adapter: PEFT's config has one use_rslora for all modules; "
                         "the model mixes rsLoRA and plain LoRA modules")
    r = Counter(m.r for _, m in mods).most_common(1)[0][0]
    alpha = Counter(m.alpha for _, m in mods).most_common(1)[0][0]
    dropout = Counter(m.dropout for _, m in mods).most_common(1)[0][0]
    rank_pattern = {n: m.r for n, m in mods if m.r != r}
    alpha_pattern = {n: m.alpha for n, m in mods if m.alpha != alpha}
    tensors = {}
    for n, m in mods:
        if m.merged:
            raise ValueError(f"module {n} is merged; unmerge() it before saving the adapter")
        tensors[f"{_PREFIX}{n}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"{_PREFIX}{n}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": _target_modules(model, [n for n, _ in mods]),
        "use_rslora": rslora.pop(),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
        "lora_bias": False,
    }
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _read_weights(path):
    st = os.path.join(path, WEIGHTS_NAME)
    if os.path.exists(st):
        from safetensors.torch import load_file

        return load_file(st)
    binf = os.path.join(path, "adapter_model.bin")
    if os.path.exists(binf):
        return torch.load(binf, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or adapter_model.bin) in {path}")


def load_peft_adapter(model: nn.Module, path: str, freeze_base: bool = True) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model`` (a plain model, not a PeftModel).

    Each module named in the checkpoint becomes a LoRALinear (or, if it already is one, gets the
    new weights) with PEFT's r / lora_alpha / use_rslora / rank_pattern / alpha_pattern; base weights
    PEFT saved for a targeted lm_head / embedding layer (``<module>.base_layer.weight``) are copied
    into that layer, as PEFT does. Raises ValueError for adapter kinds other than plain LoRA on
    nn.Linear (DoRA, aLoRA and other variants, LoRA bias, embeddings, fan_in_fan_out Conv1D layers,
    modules_to_save, trainable tokens, PiSSA/OLoRA/CorDA/LoftQ-initialised adapters). With
    ``freeze_base`` every parameter except the LoRA A/B weights is frozen.
    """
    with open(os.path.join(path, CONFIG_NAME)) as f:
        config = json.load(f)
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise ValueError(f"{path}: peft_type must be LORA, got {config.get('peft_type')!r}")
    for flag, what in _UNSUPPORTED:
        if config.get(flag):
            raise ValueError(f"{path}: {flag}={config[flag]!r}: {what} adapters are not supported by "
                             f"llmkern.peft (only plain LoRA on nn.Linear)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(f"{path}: init_lora_weights={init!r} adapters are not supported by llmkern.peft: "
                         f"they apply to base weights PEFT modifies at load time; convert the adapter to plain "
                         f"LoRA with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...)")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={config['bias']!r} is not supported (only 'none')")
    weights = _read_weights(path)
    pairs, base_weights = {}, {}
    for key, t in weights.items():
        m = _KEY.match(key)
        if m is not None:
            pairs.setdefault(m.group("module"), {})[m.group("ab")] = t
        elif _BASE_KEY.match(key):
            base_weights[_BASE_KEY.match(key).group("module")] = t
        elif _EMBED_KEY.match(key):
            raise ValueError(f"{path}: LoRA on embedding layers ({_EMBED_KEY.match(key).group('module')}, key "
                             f"{key!r}) is not supported by llmkern.peft (only nn.Linear)")
        else:
            raise ValueError(f"{path}: unsupported key {key!r} (only LoRA A/B weights of linear layers)")
    for name in base_weights:
        if name not in pairs:
            raise ValueError(f"{path}: unsupported key {_PREFIX}{name}.base_layer.weight (a base weight of a "
                             f"module without LoRA A/B weights)")
    merged = [n for n, m in lora_modules(model) if m.merged and n in pairs]
    if merged:
        raise ValueError(f"{path}: module {merged[0]} is merged; unmerge_lora(model) before loading new adapter "
                         f"weights into it (its weight would keep the old update)")
    if freeze_base:
        _freeze_non_lora(model)
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: module {name} has only lora_{''.join(ab)}")
        A, B = ab["A"], ab["B"]
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: module {name!r} from the checkpoint is not in the model") from None
        r = A.shape[0]
        if r != _pattern_value(config.get("rank_pattern"), name, r_default):
            raise ValueError(f"{path}: {name}.lora_A has rank {r}, config says "
                             f"{_pattern_value(config.get('rank_pattern'), name, r_default)}")
        alpha = _pattern_value(config.get("alpha_pattern"), name, alpha_default)
        if isinstance(mod, LoRALinear):
            if mod.r != r:
                raise ValueError(f"{path}: {name} has rank {mod.r}, checkpoint has {r}")
            mod.alpha, mod.use_rslora = float(alpha), bool(config.get("use_rslora", False))
        elif isinstance(mod, nn.Linear):
            mod = LoRALinear(mod, r=r, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)),
                             use_rslora=bool(config.get("use_rslora", False)), freeze_base=freeze_base)
            _set_submodule(model, name, mod)
        else:
            raise ValueError(f"{path}: module {name} is a {type(mod).__name__}, not an nn.Linear")
        if A.shape != mod.lora_A.shape or B.shape != mod.lora_B.shape:
            raise ValueError(f"{path}: {name}: checkpoint shapes A{tuple(A.shape)} B{tuple(B.shape)} do not "
                             f"fit the layer (A{tuple(mod.lora_A.shape)} B{tuple(mod.lora_B.shape)})")
        W = base_weights.get(name)
        if W is not None and W.shape != mod.base_layer.weight.shape:
            raise ValueError(f"{path}: {name}.base_layer.weight has shape {tuple(W.shape)}, the layer's weight "
                             f"is {tuple(mod.base_layer.weight.shape)}")
        with torch.no_grad():
            mod.lora_A.copy_(A)
            mod.lora_B.copy_(B)
            if W is not None:  # as PEFT does: the saved base weight replaces the layer's
                mod.base_layer.weight.copy_(W)
    return model
