"""LoRA adapters in Hugging Face PEFT's on-disk format, both ways.

A PEFT LoRA adapter directory holds ``adapter_config.json`` (peft_type "LORA", r, lora_alpha,
target_modules, use_rslora, rank_pattern, alpha_pattern, ...) and ``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_A.weight`` ([r, in]) and ``...lora_B.weight``
([out, r]), where <module> is the module's name inside the (unwrapped) base model. A DoRA adapter
(``use_dora: true``) also has ``...lora_magnitude_vector`` ([out], no ``.weight`` suffix: PEFT strips it).
LoRA on an embedding layer (llmkern.peft.LoRAEmbedding, PEFT's lora.Embedding) is stored as
``...<module>.lora_embedding_A`` ([r, num_embeddings]) and ``...lora_embedding_B`` ([embedding_dim, r]).
LoRA on a conv layer (llmkern.peft.LoRAConv, PEFT's lora.Conv1d/2d/3d) uses the linear keys with conv kernels:
``...<module>.lora_A.weight`` ([r, in_channels, *kernel_size]) and ``...lora_B.weight`` ([out, r / groups, 1, ...]).
"""
import json
import math
import os
import re
import warnings
from collections import Counter
from types import SimpleNamespace
from typing import Optional, Union

import torch
from torch import nn

from llmkern.ops._checks import is_real
from llmkern.peft.lora import (MAX_RANK, LoRALinear, _freeze_non_lora, _set_submodule, is_base_changing_init,
                               is_hf_conv1d, linear_features, lora_conv_modules, lora_embedding_modules, lora_modules,
                               lora_scaling)
from llmkern.peft._plain_lora import cast_lora_params, check_adapter_dtype, resolve_adapter_dtype
from llmkern.peft.lora_conv import CONV_TYPES, LoRAConv, _check_base as _check_conv_base
from llmkern.peft.lora_embedding import LoRAEmbedding
from llmkern.peft.qlora import NF4Linear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# PEFT saves the base weights of targeted embedding-like layers (lm_head, embed_tokens) next to their
# LoRA weights (save_embedding_layers="auto": the whole base layer, so a biased lm_head's bias too, Phi's)
# and loads them back into the base layer.
_BASE_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.base_layer\.weight$")
_BASE_BIAS_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.base_layer\.bias$")
_EMBED_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_(?P<ab>[AB])(?:\.[^.]+)?$")
# DoRA magnitudes: PEFT writes <module>.lora_magnitude_vector; its state_dict (and older files) say
# <module>.lora_magnitude_vector.<adapter>.weight or <module>.lora_magnitude_vector.weight
_MAG_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")

# LoraConfig fields that change what the saved A/B weights mean (LoRA variants, extra modules,
# quantisation, replicated layers): an adapter using any of them is not plain LoRA.
_UNSUPPORTED = (
    ("lora_bias", "LoRA bias (lora_bias)"),
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


def _pattern_entry(patterns, name):
    r"""PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key k whose regex
    (.*\.)?(k)$ matches the module name `name`, with its value; None when no key matches."""
    for k, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({k})$", name):
            return k, v
    return None


def _config_flag(path, config, key):
    """A true / false entry of adapter_config.json (missing or null: false, LoraConfig's default). PEFT takes the
    value's truthiness, so a string ("false") would switch it on: only a JSON boolean (or 0 / 1) is taken."""
    value = config.get(key)
    if value is None or isinstance(value, bool) or (type(value) is int and value in (0, 1)):
        return bool(value)
    raise ValueError(f"{path}: {CONFIG_NAME}: {key}={value!r} must be true or false")


def _config_dropout(path, config):
    """lora_dropout (missing: 0.0, LoraConfig's default) as a float in [0, 1): what llmkern's LoRA layers take (PEFT
    itself fails on a non-number; 1.0 would drop the whole update in training, a negative value or NaN is no
    probability)."""
    p = config.get("lora_dropout", 0.0)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{path}: {CONFIG_NAME}: lora_dropout={p!r} must be a number in [0, 1) (the probability "
                         f"with which the LoRA branch's inputs are dropped in training)")
    return float(p)


def _config_patterns(path, config):
    """{"rank_pattern": {...}, "alpha_pattern": {...}} of adapter_config.json (missing or null: empty), each a JSON
    object whose keys are valid regexes under PEFT's rule (a bad one would make PEFT's re.match raise). Their values
    are checked where a module uses them (_module_rank / _module_alpha): PEFT ignores the others."""
    out = {}
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key)
        if patterns is None:
            patterns = {}
        if not isinstance(patterns, dict):
            raise ValueError(f"{path}: {CONFIG_NAME}: {key} must be an object {{module regex: value}}, got "
                             f"{patterns!r}")
        for k in patterns:
            try:
                re.compile(rf"(.*\.)?({k})$")
            except re.error as exc:
                raise ValueError(f"{path}: {CONFIG_NAME}: {key} key {k!r} is not a valid regular expression "
                                 f"({exc})") from None
        out[key] = patterns
    return out


def _module_rank(path, config, patterns, name):
    """(key, rank): the rank adapter_config.json gives the checkpoint module `name` (rank_pattern, else r; PEFT's
    lookup) and the key it comes from, checked to be an int (PEFT builds nn.Linear(in, r) layers from it; the caller
    compares it with the checkpoint's rank and refuses a rank below 1)."""
    hit = _pattern_entry(patterns["rank_pattern"], name)
    key, r = (f"rank_pattern[{hit[0]!r}]", hit[1]) if hit else ("r", config.get("r", 8))
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"{path}: {CONFIG_NAME}: {key}={r!r} (module {name}) must be a positive int")
    return key, r


def _module_alpha(path, config, patterns, name):
    """The lora_alpha adapter_config.json gives the checkpoint module `name` (alpha_pattern, else lora_alpha; PEFT's
    lookup), checked: a finite number (the scaling is alpha / r; zero and negative values are PEFT's too)."""
    hit = _pattern_entry(patterns["alpha_pattern"], name)
    key, alpha = (f"alpha_pattern[{hit[0]!r}]", hit[1]) if hit else ("lora_alpha", config.get("lora_alpha", 8))
    if not is_real(alpha):
        raise ValueError(f"{path}: {CONFIG_NAME}: {key}={alpha!r} (module {name}) must be a finite number (the "
                         f"LoRA scaling is lora_alpha / r)")
    return alpha


def _pattern_key(name):
    """A rank_pattern / alpha_pattern key that PEFT's rule matches to the module `name` alone."""
    return "^" + re.escape(name)


def _peft_visible_names(model):
    """Names of the modules PEFT's target_modules are matched against in the base model the adapter is for: every
    module of `model` (a suffix that also names, e.g., an nn.Flatten or a ReLU makes PEFT refuse the adapter:
    "Target module ... is not supported"), less the insides of LoRA wrappers and tensor-parallel layers (the base
    model has plain layers there), and the root."""
    inner = {n for n, m in model.named_modules()
             if n and (isinstance(m, (LoRALinear, LoRAEmbedding, LoRAConv)) or _is_parallel(m))}
    names = set()
    for n, _ in model.named_modules():
        parts = n.split(".")
        if n and not any(".".join(parts[:i]) in inner for i in range(1, len(parts))):
            names.add(n)
    return names


def _hf_embedding_names(model):
    """A zoo model's {zoo embedding name: its name in the equivalent transformers model} (GPT: wte / wpe in
    GPT2LMHeadModel's transformer.; Llama and the families from_hf maps onto it: model.embed_tokens)."""
    from llmkern.models.gpt import GPT
    from llmkern.models.llama import Llama

    if isinstance(model, GPT):
        return {"wte": "transformer.wte", "wpe": "transformer.wpe"}
    if isinstance(model, Llama):
        return {"embed_tokens": "model.embed_tokens"}
    return {}


def _target_modules(candidates, names):
    """PEFT's target_modules: the module-name suffixes when they select exactly `names` among the
    linear layers `candidates`, else a regex (PEFT full-matches a string against module names)
    listing them."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n in candidates if any(n == s or n.endswith("." + s) for s in suffixes)}
    if selected == set(names):
        return suffixes
    return "^(" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def _is_parallel(module):
    """Whether `module` is a ColumnParallelLinear / RowParallelLinear (llmkern.parallel)."""
    try:
        from llmkern.parallel.layers import ColumnParallelLinear, RowParallelLinear
    except ImportError:
        return False
    return isinstance(module, (ColumnParallelLinear, RowParallelLinear))


def _hf_names(model):
    """A zoo model's {zoo linear name: HFModule} (GPT/Llama.hf_module_names), None for other models."""
    fn = getattr(model, "hf_module_names", None)
    return fn() if callable(fn) else None


def _has_module(model, name):
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _hf_refusal(model, name):
    """Why a zoo model cannot give LoRA on module `name` (its own name or transformers') under transformers' names
    (NeoX.hf_refused_modules: a GPT-NeoX config with GQA's q / k / v), None if nothing says so."""
    fn = getattr(model, "hf_refused_modules", None)
    return fn().get(name) if callable(fn) else None


def _row_index(h):
    """An HFModule's rows as an index into the HF module's output rows (of B, of a DoRA magnitude): its slice, or its
    row list (GPT-NeoX's q / k / v rows, interleaved per head in query_key_value) as a list, which torch takes as
    advanced indexing (a tuple would index several dimensions)."""
    return h.rows if isinstance(h.rows, slice) else list(h.rows)


def _first_row(h):
    return h.rows.start if isinstance(h.rows, slice) else min(h.rows)


def _row_end(h):
    """One past the HF module's last row that the HFModule `h` covers."""
    return h.rows.stop if isinstance(h.rows, slice) else max(h.rows) + 1


def _row_count(h):
    return h.rows.stop - h.rows.start if isinstance(h.rows, slice) else len(h.rows)


# safetensors metadata entry in which save_peft_adapter records how it packed several zoo LoRAs into one
# HF module's LoRA (GPT-2's c_attn = q, k, v): {HF name: [[zoo name, r, alpha], ...] in column order}, so
# that load_peft_adapter can give back the separate LoRAs. PEFT ignores it.
_FUSED_KEY = "llmkern.fused_lora"


def _fused_records(metadata):
    """The _FUSED_KEY record of a file's safetensors metadata: {HF name: record}; {} when there is none or it is not
    a JSON object (PEFT ignores it; load_peft_adapter then splits the fused LoRAs as it does PEFT's own, exactly;
    each record is checked where it is used, _split_by_record)."""
    try:
        records = json.loads(metadata.get(_FUSED_KEY, "{}"))
    except (TypeError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def _magnitude(m):
    """A LoRA module's DoRA magnitude (detached), None without DoRA."""
    mag = getattr(m, "lora_magnitude_vector", None) if getattr(m, "use_dora", False) else None
    return None if mag is None else mag.detach()


def _to_hf(model, mods, hf, use_rslora):
    """The zoo model's LoRAs as PEFT LoRAs of the equivalent transformers model:
    [(HF name, r, alpha, dropout, A, B, DoRA magnitude or None)], the fused-module record, and whether
    a target is a Conv1D.

    A zoo layer that is a whole HF module keeps its A, B, r and alpha. Zoo layers that are output rows
    of one HF module (GPT-2's q/k/v in c_attn) become one LoRA of rank R = sum of their ranks:
    A = concat(A_q, A_k, A_v) [R, in], B block-diagonal [out, R] (the rows of a projection without LoRA
    are zero). PEFT applies one scaling s to it, taken as the first part's (the first nonzero one: a part with
    alpha 0 adds nothing, its block is written as zeros); each other block is
    multiplied by its own scaling / s, so that every output row gets exactly its zoo update
    s_p · B_p A_p x. alpha is set so that PEFT computes s for rank R (R·s, or sqrt(R)·s with rsLoRA).
    DoRA is row-wise, so this stays exact: row i's norm ‖W_i + s B_i A‖ is its zoo layer's, and the
    magnitudes are concatenated in row order; the rows of a projection without LoRA get their base row
    norms as magnitude (a factor of 1: they stay the base layer's). Parts that cover every row of the HF module
    with one A, rank and scaling (a PEFT LoRA load_peft_adapter split, its A tied) are written as PEFT had
    them instead: that A, rank r, the B blocks stacked (_shared_a_entry).
    """
    groups = {}
    for n, m in mods:
        if n not in hf:
            why = _hf_refusal(model, n)
            if why:
                raise ValueError(f"save_peft_adapter: module {n}: {why}")
            raise ValueError(f"save_peft_adapter: module {n} has no counterpart in the Hugging Face model; "
                             f"save with hf_names=False to write the zoo's own module names")
        groups.setdefault(hf[n].name, []).append((n, hf[n], m))
    entries, fused = [], {}
    for name, parts in groups.items():
        if len(parts) == 1 and parts[0][1].rows is None:
            _, _, m = parts[0]
            entries.append((name, m.r, m.alpha, m.dropout, m.lora_A.detach(), m.lora_B.detach(), _magnitude(m)))
            continue
        parts.sort(key=lambda p: _first_row(p[1]))
        out = max(_row_end(h) for h in hf.values() if h.name == name)
        shared = _shared_a_entry(name, parts, hf, out)
        if shared is not None:
            entries.append(shared)
            continue
        R = sum(m.r for _, _, m in parts)
        s = next((m.scaling for _, _, m in parts if m.scaling != 0), 0.0)  # (s = 0: every block is 0 · B A)
        alpha = s * (math.sqrt(R) if use_rslora else R)
        A = torch.cat([m.lora_A.detach() for _, _, m in parts])
        B = A.new_zeros(out, R)
        col = 0
        for _, h, m in parts:
            block = m.lora_B.detach()
            if m.scaling != s:
                block = (block.double() * (m.scaling / s)).to(B.dtype)
            B[_row_index(h), col:col + m.r] = block
            col += m.r
        M = None
        if any(_magnitude(m) is not None for _, _, m in parts):
            M = A.new_zeros(out)
            with_lora = {zn for zn, _, _ in parts}
            for zn, h in hf.items():  # rows of projections without LoRA: their base row norms
                if h.name == name and zn not in with_lora:
                    weight = _dense_weight(model.get_submodule(zn))
                    M[_row_index(h)] = torch.linalg.vector_norm(weight.to(torch.float32), dim=1).to(M.dtype)
            for _, h, m in parts:
                M[_row_index(h)] = _magnitude(m)
        dropout = Counter(m.dropout for _, _, m in parts).most_common(1)[0][0]
        entries.append((name, R, alpha, dropout, A, B, M))
        fused[name] = [[n, m.r, m.alpha] for n, _, m in parts]
    return entries, fused, any(hf[n].conv1d for n, _ in mods)


def _shared_a_entry(name, parts, hf, out):
    """The HF module `name`'s LoRA as PEFT holds it, (name, r, alpha, dropout, A, B, magnitude or None), when its
    zoo row blocks `parts` (sorted by row) all carry LoRA with the same A, rank and scaling (what load_peft_adapter
    makes of a PEFT LoRA on it, A tied): one A [r, in] and the parts' B blocks stacked [out, r], exact; else None
    (_to_hf's block-diagonal rank-sum form then)."""
    if {zn for zn, h in hf.items() if h.name == name} != {zn for zn, _, _ in parts}:
        return None  # (a row block without LoRA: its rows need the block-diagonal form's zero block)
    first = parts[0][2]
    A = first.lora_A.detach()
    for _, _, m in parts[1:]:
        a = m.lora_A.detach()
        if m.r != first.r or m.scaling != first.scaling or a.device != A.device or not torch.equal(a, A):
            return None
    B = A.new_zeros(out, first.r)
    for _, h, m in parts:
        B[_row_index(h)] = m.lora_B.detach()
    M = None
    if _magnitude(first) is not None:  # (one use_dora for every module: all of them have one)
        M = _magnitude(first).new_zeros(out)
        for _, h, m in parts:
            M[_row_index(h)] = _magnitude(m)
    dropout = Counter(m.dropout for _, _, m in parts).most_common(1)[0][0]
    return name, first.r, first.alpha, dropout, A, B, M


def _dense_weight(module):
    """The [out, in] weight of a base layer, detached: an nn.Linear's, or a 4-bit NF4Linear's dequantized."""
    if hasattr(module, "nf4_weight"):
        return module.nf4_weight().dequantize(torch.float32)
    return module.weight.detach()


def _write_atomically(dest, write):
    """write(tmp) into a temporary file in dest's folder, then rename it over dest (atomic on POSIX). (A plain
    new file, not mkstemp's: that one is private, 0600, and the rename would keep it so.)"""
    import uuid

    tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _dump_json(obj, dest):
    with open(dest, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def _unwrap_peft_model(model):
    """The model inside a peft.PeftModel (its LoRA layers sharded by tensor_parallelize): PEFT names the saved
    modules from there, so the wrapper's base_model.model. prefix must not be written twice (PEFT's
    from_pretrained would find none of the keys and load nothing, with a warning only)."""
    if type(model).__module__.startswith("peft.") and hasattr(model, "peft_config"):
        inner = getattr(getattr(model, "base_model", None), "model", None)
        if isinstance(inner, nn.Module):
            return inner
    return model


def _auto_task_type(model):
    """save_peft_adapter's task_type="auto": the PEFT task whose PeftModel class can run `model`. PEFT's
    PeftModelForCausalLM / PeftModelForSeq2SeqLM call the model with an explicit input_ids argument (Whisper,
    whose main input is input_features, then fails with "got multiple values for keyword argument 'input_ids'"),
    so only models that take input_ids get one; the rest get None, a plain PeftModel that passes every argument
    through."""
    if hasattr(model, "hf_module_names"):  # a zoo model: a causal LM
        return "CAUSAL_LM"
    takes_ids = getattr(model, "main_input_name", "input_ids") == "input_ids"
    if not hasattr(model, "prepare_inputs_for_generation") or not takes_ids:
        return None
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    return "SEQ_2_SEQ_LM" if encoder_decoder else "CAUSAL_LM"


def _converted_to_original_base(name, m):
    """A PiSSA / OLoRA LoRALinear's adapter as plain LoRA on the base weight it was built on (PEFT's save_pretrained(
    path_initial_model_for_weight_conversion=...)): the layer computes W_res + s·B A with W_res = W - s·B0 A0, so
    relative to W its update is s·(B A - B0 A0) = s·[B, -B0] [A; A0], a rank-2r LoRA with the same scaling (alpha
    doubled, or times √2 with rsLoRA). A record like a LoRALinear for the writers; the layer is unchanged."""
    if m.lora_A_init is None or m.lora_B_init is None:
        raise ValueError(f"save_peft_adapter: convert_to_original_base=True needs {name}'s initial factors "
                         f"(lora_A_init / lora_B_init), which were set to None")
    A, B = m.lora_A.detach(), m.lora_B.detach()
    A = torch.cat([A, m.lora_A_init.to(A.device, A.dtype)])
    B = torch.cat([B, -m.lora_B_init.to(B.device, B.dtype)], dim=1)
    alpha = m.alpha * (math.sqrt(2) if m.use_rslora else 2)
    return SimpleNamespace(r=2 * m.r, alpha=alpha, scaling=lora_scaling(alpha, 2 * m.r, m.use_rslora),
                           use_rslora=m.use_rslora, dropout=m.dropout, merged=False, lora_A=A, lora_B=B,
                           use_dora=m.use_dora, lora_magnitude_vector=m.lora_magnitude_vector, conv1d=m.conv1d)


def _resolve_base_changing(mods, convert):
    """mods with every PiSSA / OLoRA LoRALinear (its base weight rewritten at init) as save_peft_adapter writes it:
    converted to the original base (convert=True), as it is, relative to the rewritten base (False); None, or
    another value, with such layers raises ValueError naming convert_to_original_base."""
    if convert is not None and not isinstance(convert, bool):
        raise ValueError(f"convert_to_original_base must be None, True or False, got {convert!r}")
    changing = [(n, m) for n, m in mods if is_base_changing_init(getattr(m, "init_lora_weights", True))]
    if changing and convert is None:
        n, m = changing[0]
        raise ValueError(f"save_peft_adapter: {n} has init_lora_weights={m.init_lora_weights!r}, which rewrote its "
                         f"base weight to W - s·B0 A0: its A, B alone are no adapter of the original model. Pass "
                         f"convert_to_original_base=True (a rank-2r plain LoRA on the original weights, PEFT's "
                         f"conversion) or False (A, B as they are, for the rewritten base weights, which you then "
                         f"save with the model)")
    if not convert:
        return mods
    names = {n for n, _ in changing}
    return [(n, _converted_to_original_base(n, m) if n in names else m) for n, m in mods]


def save_peft_adapter(model: nn.Module, path: str, base_model_name_or_path: Optional[str] = None,
                      task_type: Optional[str] = "auto", hf_names: bool = True,
                      convert_to_original_base: Optional[bool] = None) -> None:
    """Write the model's LoRALinear, LoRAEmbedding and LoRAConv adapters as a PEFT adapter directory (loadable by
    ``peft.PeftModel.from_pretrained(base_model, path)``; embeddings as PEFT's ``lora_embedding_A`` /
    ``lora_embedding_B``, named in target_modules; a zoo model's wte / wpe / embed_tokens get their
    transformers names; convs as PEFT's conv ``lora_A.weight`` / ``lora_B.weight`` kernels, under the model's
    own names).

    For a zoo model (GPT, Llama) the modules are named as in the equivalent transformers model
    (``hf_module_names()``: Llama's ``layers.0...`` is ``model.layers.0...``; GPT's q/k/v LoRAs become
    one exact LoRA on GPT-2's fused ``c_attn``, with fan_in_fan_out=True for its Conv1D layers; NeoX's on
    GPT-NeoX's ``query_key_value``, whose rows interleave them per head), so the adapter loads into PEFT on
    ``LlamaForCausalLM`` / ``GPT2LMHeadModel`` / ``GPTNeoXForCausalLM``; ``hf_names=False`` writes the
    zoo's own names. Other models: their own module names, with fan_in_fan_out=True when LoRA is on transformers'
    Conv1D layers (a plain GPT2LMHeadModel; PEFT takes an nn.Linear such as lm_head beside them as nn.Linear).

    base_model_name_or_path: the config's (what ``peft.AutoPeftModelForCausalLM.from_pretrained(path)`` loads the
    base model from); None: a transformers model's own ``name_or_path`` (the directory or hub id it was loaded from,
    as PEFT writes it), else none.

    task_type: the config's (PEFT picks its PeftModel class by it). "auto" (default): "CAUSAL_LM" for zoo
    models and generative models (those with ``prepare_inputs_for_generation``), "SEQ_2_SEQ_LM" for
    encoder-decoder ones (T5, BART), else None (a plain PeftModel: PeftModelForCausalLM needs that method, so
    CAUSAL_LM on an encoder or a classifier fails to load in PEFT); also None for a generative model whose main
    input is not ``input_ids`` (Whisper's ``input_features``: PEFT's task wrappers pass ``input_ids`` to it).

    DoRA (``use_dora=True`` LoRALinear modules) is written as PEFT writes it: ``use_dora: true`` and a
    ``<module>.lora_magnitude_vector`` per module. PEFT's config has one use_dora for all modules, so a
    model that mixes DoRA and plain LoRA modules raises ValueError. It has one lora_dropout too (and, unlike r and
    lora_alpha, no per-module pattern for it): the most common dropout of the LoRALinear / LoRAConv layers is written
    (LoRAEmbedding ignores dropout, as PEFT's embedding LoRA does, and tensor-parallel layers have none, so neither
    counts), with a UserWarning naming the layers whose own dropout differs (they load with the written one; the
    saved weights are exact either way).

    Tensor parallelism (``llmkern.parallel.tensor_parallelize``): on a model whose layers are
    ColumnParallelLinear / RowParallelLinear with LoRA shards this is a collective. EVERY rank of the
    layers' process group must call it (same model structure, same path); a rank that does not leaves
    the others waiting until the group's timeout. Each layer's shards are all-gathered over its group
    (lora_B rows of column layers, lora_A columns of row layers), and only global rank 0 of the group
    writes: the same files the unsharded model with the same LoRA writes. Every rank returns once they
    are written (or raises if rank 0 failed), so a following load on any rank sees them. The sharded
    layers keep only their scaling s; r comes from the shapes; lora_alpha / use_rslora are the LoRA
    wrapper's (recorded by ``from_linear`` / ``load_peft_adapter``) while they still give s exactly,
    otherwise use_rslora is that of the model's other LoRA modules (False if none) and alpha is s·r
    (s·sqrt(r) with rsLoRA), nudged to a neighbouring float if needed so that PEFT's alpha / r gives
    back exactly s. Layers sharded without LoRA are not part of the adapter. A peft.PeftModel is saved from the
    model it wraps (named as PEFT names its modules).

    convert_to_original_base: for LoRALinear layers built with a base-changing init (init_lora_weights="pissa",
    "pissa_niter_K", "olora": their base weight became W - s·B0 A0). True: each is written as PEFT's
    save_pretrained(path_initial_model_for_weight_conversion=...) writes it, a plain rank-2r LoRA on the ORIGINAL
    weights, A' = [A; A0], B' = [B, -B0], alpha doubled (times √2 with rsLoRA; in rank_pattern / alpha_pattern
    where the other modules differ), so that PEFT (or load_peft_adapter) on the original model gives the fine-tuned
    one; the layer's lora_A_init / lora_B_init must still be held. False: A, B as they are, an adapter for the
    rewritten base weights (save those with the model). None (default): such a layer raises ValueError. Other
    layers are written as they are either way; the config says init_lora_weights true (plain LoRA).
    """
    from safetensors.torch import save_file

    wrapper, model = model, _unwrap_peft_model(model)
    mods = lora_modules(model)
    embs = lora_embedding_modules(model)
    convs = lora_conv_modules(model)
    rslora = {m.use_rslora for _, m in mods + embs + convs} | _parallel_rslora(model)
    if len(rslora) > 1:
        raise ValueError("save_peft_adapter: PEFT's config has one use_rslora for all modules; "
                         "the model mixes rsLoRA and plain LoRA modules")
    use_rslora = rslora.pop() if rslora else False
    dora = {bool(m.use_dora) for _, m in mods + embs + convs}  # (LoRAEmbedding, LoRAConv: plain LoRA)
    if len(dora) > 1:
        raise ValueError("save_peft_adapter: PEFT's config has one use_dora for all modules; the model mixes "
                         "DoRA and plain LoRA modules")
    use_dora = dora.pop() if dora else False
    parallel, write, group = _parallel_lora(model, use_rslora)
    if parallel and use_dora:
        raise ValueError("save_peft_adapter: the model mixes DoRA LoRALinear modules and tensor-parallel LoRA "
                         "layers (plain LoRA); PEFT's config has one use_dora for all modules")
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    mods = sorted(mods + parallel, key=lambda nm: order[nm[0]])  # model order, as before
    if not mods and not embs and not convs:
        hint = (" (a peft.PeftModel: PEFT's own LoRA layers are saved by peft_model.save_pretrained(path))"
                if wrapper is not model else "")
        raise ValueError("model has no LoRALinear modules to save (nor LoRAEmbedding, LoRAConv ones; use inject_lora "
                         "or load_peft_adapter; under tensor parallelism inject_lora before tensor_parallelize)" + hint)
    for n, m in mods + embs + convs:
        if m.merged:
            raise ValueError(f"module {n} is merged; unmerge() it before saving the adapter")
    mods = _resolve_base_changing(mods, convert_to_original_base)
    if task_type == "auto":
        task_type = _auto_task_type(model)
    if base_model_name_or_path is None:  # (PEFT records it too; AutoPeftModel* cannot load the adapter without it)
        name = getattr(model, "name_or_path", None)
        base_model_name_or_path = name if isinstance(name, str) and name else None
    hf = _hf_names(model) if hf_names else None
    metadata = {"format": "pt"}
    hf_emb = _hf_embedding_names(model) if hf is not None else {}
    for n, _ in embs:
        if hf is not None and n not in hf_emb:
            raise ValueError(f"save_peft_adapter: embedding {n} has no counterpart in the Hugging Face model; "
                             f"save with hf_names=False to write the zoo's own module names")
    if hf is not None and convs:
        raise ValueError(f"save_peft_adapter: conv layer {convs[0][0]} has no counterpart in the Hugging Face model; "
                         f"save with hf_names=False to write the zoo's own module names")
    # (convs: PEFT's lora_A.weight / lora_B.weight keys, with their conv kernel shapes)
    conv_entries = [(n, m.r, m.alpha, m.dropout, m.lora_A.detach(), m.lora_B.detach(), None) for n, m in convs]
    # (embeddings: A / B are lora_embedding_A [r, num_embeddings] / lora_embedding_B [dim, r], PEFT's keys)
    emb_entries = [(hf_emb.get(n, n), m.r, m.alpha, m.dropout, m.lora_embedding_A.detach(),
                    m.lora_embedding_B.detach(), None) for n, m in embs]
    if hf is None:
        entries = [(n, m.r, m.alpha, m.dropout, m.lora_A.detach(), m.lora_B.detach(), _magnitude(m))
                   for n, m in mods]
        # (every module name counts: PEFT matches a suffix against all of them and refuses an adapter whose suffix
        # also selects a module it cannot wrap, e.g. a CNN's nn.Sequential index "0" naming an nn.Flatten elsewhere)
        candidates = _peft_visible_names(model)
        # GPT-2's Conv1D layers: True. PEFT sets each layer's layout by its type (flipping the flag, with a warning,
        # for an nn.Linear such as lm_head), so one flag serves a mix too
        fan_in_fan_out = any(getattr(m, "conv1d", False) for _, m in mods)
    else:
        entries, fused, fan_in_fan_out = _to_hf(model, mods, hf, use_rslora)
        candidates = {h.name for h in hf.values()} | set(hf_emb.values())
        if fused:
            metadata[_FUSED_KEY] = json.dumps(fused)
    emb_names = {e[0] for e in emb_entries}
    entries = entries + conv_entries + emb_entries
    r = Counter(e[1] for e in entries).most_common(1)[0][0]
    alpha = Counter(e[2] for e in entries).most_common(1)[0][0]
    dropout = _config_dropout_value(lora_modules(model) + convs + embs, entries)
    # PEFT matches a pattern key k against module names as the regex (.*\.)?(k)$: a bare name would also pick
    # every module whose name ends in it (vision.layers.0 for layers.0), and its dots match any character.
    # Anchored and escaped, a key names one module (_pattern_entry reads them with PEFT's rule).
    rank_pattern = {_pattern_key(n): er for n, er, *_ in entries if er != r}
    alpha_pattern = {_pattern_key(n): ea for n, _, ea, *_ in entries if ea != alpha}
    tensors = {}
    for n, _, _, _, A, B, M in entries:
        if n in emb_names:
            tensors[f"{_PREFIX}{n}.lora_embedding_A"] = A.contiguous().cpu()
            tensors[f"{_PREFIX}{n}.lora_embedding_B"] = B.contiguous().cpu()
            continue
        tensors[f"{_PREFIX}{n}.lora_A.weight"] = A.contiguous().cpu()
        tensors[f"{_PREFIX}{n}.lora_B.weight"] = B.contiguous().cpu()
        if M is not None:
            tensors[f"{_PREFIX}{n}.lora_magnitude_vector"] = M.contiguous().cpu()
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": _target_modules(candidates, [e[0] for e in entries]),
        "use_rslora": use_rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        # GPT-2's Conv1D layers store their weight [in, out]; the LoRA A/B shapes are as for nn.Linear
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": use_dora,
        "lora_bias": False,
    }
    error = None
    if write:
        try:
            os.makedirs(path, exist_ok=True)
            # each file written beside its place and renamed into it: a reader (another data-parallel replica's
            # load, whose tensor-parallel group has its own writer of the same files) never sees a half file
            _write_atomically(os.path.join(path, WEIGHTS_NAME),
                              lambda tmp: save_file(tensors, tmp, metadata=metadata))
            _write_atomically(os.path.join(path, CONFIG_NAME),
                              lambda tmp: _dump_json(config, tmp))
        except Exception as exc:
            if group is None:
                raise
            error = exc
    if group is not None:  # every rank returns once the files are there (or raises if the write failed)
        from llmkern.parallel import lora_state

        lora_state.finish_write(group, error)


def _config_dropout_value(layers, entries):
    """The lora_dropout to write. PEFT's config has one for all modules (no per-module pattern, unlike r and alpha),
    so it is the most common among the layers that apply one: LoRALinear and LoRAConv, not LoRAEmbedding (which
    ignores it, as PEFT's embedding LoRA does) nor tensor-parallel layers (which have no LoRA dropout: their 0.0 is
    no choice of the user's). When those disagree, a warning names the layers that will load with another dropout
    than they trained with (the saved weights are exact either way: dropout only matters in training)."""
    applied = [(n, m.dropout) for n, m in layers if not isinstance(m, LoRAEmbedding)]
    if not applied:
        return Counter(e[3] for e in entries).most_common(1)[0][0]
    counts = Counter(p for _, p in applied)
    dropout = counts.most_common(1)[0][0]
    if len(counts) > 1:
        others = {}
        for n, p in applied:
            if p != dropout:
                others.setdefault(p, []).append(n)
        listed = "; ".join(f"{p}: {', '.join(ns[:3])}{' ...' if len(ns) > 3 else ''} ({len(ns)} layers)"
                           for p, ns in others.items())
        warnings.warn(f"save_peft_adapter: PEFT's adapter_config.json has one lora_dropout for all modules, but the "
                      f"LoRA layers use {len(counts)} values; writing the most common, {dropout}. These layers will "
                      f"load with it instead of their own dropout: {listed}", UserWarning, stacklevel=3)
    return dropout


def _parallel_rslora(model):
    """{use_rslora} recorded by the model's tensor-parallel LoRA layers (those whose record still holds)."""
    try:
        from llmkern.parallel import lora_state
    except ImportError:
        return set()
    flags = {lora_state.recorded_rslora(m) for _, m in lora_state.parallel_layers(model)}
    return flags - {None}


def _parallel_lora(model, use_rslora):
    """The LoRA of a tensor-parallel model's sharded layers, gathered (a collective: every rank of
    their group calls save_peft_adapter): ([(name, record like a LoRALinear)], whether this
    process writes the files, the group). alpha: lora_state.alpha_for (PEFT's alpha / r, or
    alpha / sqrt(r), gives back the layer's scaling exactly)."""
    try:
        from llmkern.parallel import lora_state
    except ImportError:  # torch.distributed unavailable: no parallel layers either
        return [], True, None
    layers = lora_state.parallel_layers(model)
    if not layers:
        return [], True, None
    write, group = lora_state.writer(layers)
    with_lora = [(n, layer) for n, layer in layers if layer.lora_A is not None]
    # (alphas first: an error raises on every rank before any collective)
    alphas = [lora_state.alpha_for(layer, layer.lora_A.shape[0], use_rslora) for _, layer in with_lora]
    out = []
    for (n, layer), alpha in zip(with_lora, alphas):
        A, B = lora_state.gathered_lora(layer)
        out.append((n, SimpleNamespace(r=A.shape[0], alpha=alpha, scaling=float(layer.lora_scaling),
                                       use_rslora=use_rslora, dropout=0.0, merged=False, lora_A=A, lora_B=B,
                                       use_dora=False, lora_magnitude_vector=None, conv1d=layer.conv1d)))
    return out, write, group


def _once(path, key, module, seen, what):
    """A second weight for the same module and role: the file holds several named adapters (PEFT's
    ``lora_A.<name>.weight`` keys of a multi-adapter state_dict); loading one over the other with the config's
    single alpha would give neither adapter."""
    if what in seen:
        raise ValueError(f"{path}: module {module} has a second weight of the same kind, {key!r} (several named "
                         f"adapters in one file?); save each adapter on its own (PEFT's save_pretrained does)")


def _read_weights(path):
    """(tensors, safetensors metadata)."""
    st = os.path.join(path, WEIGHTS_NAME)
    if os.path.exists(st):
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(st, framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(st), metadata
    binf = os.path.join(path, "adapter_model.bin")
    if os.path.exists(binf):
        return torch.load(binf, map_location="cpu", weights_only=True), {}
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or adapter_model.bin) in {path}")


def _split_fused(path, name, A, B, alpha, use_rslora, parts, record, M=None):
    """One HF module's LoRA (A [R, in], B [out, R], alpha, DoRA magnitude M [out] or None) as LoRAs of
    the zoo layers that are row blocks of it (parts: [(zoo name, HFModule)]):
    [(zoo name, A, B, r, alpha, M rows or None)], exact (DoRA is row-wise: each part gets its rows of M).

    With save_peft_adapter's record of how it packed them (and B still block-diagonal that way), each
    zoo layer gets back its own A rows, B block, r and alpha. Otherwise (e.g. a LoRA PEFT trained on
    GPT-2's c_attn; or a record that is not well-formed [[zoo name, r >= 1, finite alpha], ...], which PEFT
    ignores too) every part gets the whole A, its rows of B, rank R and the same alpha:
    B[rows] · A x is exactly what PEFT adds to those output rows (load_peft_adapter then ties the parts' A into
    one Parameter, _tie_lora_a).
    """
    out = max(_row_end(h) for _, h in parts)
    if B.shape[0] != out:
        raise ValueError(f"{path}: {name}.lora_B has {B.shape[0]} output rows, but {name} has {out} "
                         f"({' + '.join(f'{zn}: {_row_count(h)}' for zn, h in parts)})")
    if M is not None and tuple(M.shape) != (out,):
        raise ValueError(f"{path}: {name}.lora_magnitude_vector has shape {tuple(M.shape)}, {name} has {out} "
                         f"output rows")
    R = A.shape[0]
    s = lora_scaling(alpha, R, use_rslora)
    split = _split_by_record(A, B, s, use_rslora, dict(parts), record, M)
    if split is not None:
        return split
    return [(zn, A, B[_row_index(h)], R, alpha, None if M is None else M[_row_index(h)]) for zn, h in parts]


def _split_by_record(A, B, s, use_rslora, rows, record, M):
    """_split_fused's split by save_peft_adapter's record: [(zoo name, A rows, B block, r, alpha, M rows or None)],
    or None when the record is missing, not well-formed or does not fit B (block-diagonal, each part's update
    exactly representable with its own alpha)."""
    def entry_ok(p):
        return (isinstance(p, (list, tuple)) and len(p) == 3 and isinstance(p[0], str) and p[0] in rows
                and not isinstance(p[1], bool) and isinstance(p[1], int) and p[1] >= 1 and is_real(p[2]))

    if not isinstance(record, list) or not record or not all(entry_ok(p) for p in record):
        return None
    names = [p[0] for p in record]
    if len(set(names)) != len(names) or sum(p[1] for p in record) != A.shape[0]:
        return None
    off_block = torch.ones(B.shape, dtype=torch.bool)
    col = 0
    for zn, r, _ in record:
        off_block[_row_index(rows[zn]), col:col + r] = False
        col += r
    if B[off_block].any():
        return None
    split, col = [], 0
    for zn, r, a in record:
        Bp = B[_row_index(rows[zn]), col:col + r]
        sp = lora_scaling(a, r, use_rslora)
        if sp == 0:  # the part adds nothing with its alpha 0: exact only if PEFT's block adds nothing either
            if s != 0 and Bp.any():
                return None
        elif sp != s:
            scaled = (Bp.double() * (s / sp)).to(B.dtype)
            if not bool(torch.isfinite(scaled).all()) and bool(torch.isfinite(Bp).all()):
                return None  # (the ratio overflows B's dtype)
            Bp = scaled
        split.append((zn, A[col:col + r], Bp, r, a, None if M is None else M[_row_index(rows[zn])]))
        col += r
    return split


def _check_base_bias(path, source, where, bias, layer):
    """A base bias the checkpoint holds for the linear layer `where` (`source` in the checkpoint): PEFT saves the
    whole base layer of a targeted lm_head / embed_tokens (save_embedding_layers, default "auto"), a biased lm_head's
    bias too (Phi's), and its load copies it into the layer; it must fit the layer's bias."""
    have = getattr(layer, "bias", None)
    if have is None:
        raise ValueError(f"{path}: {source}.base_layer.bias: {where} has no bias")
    if bias.shape != have.shape:
        raise ValueError(f"{path}: {source}.base_layer.bias has shape {tuple(bias.shape)}, the layer's bias is "
                         f"{tuple(have.shape)}")


def _check_fan_in_fan_out(model, path, targets):
    """fan_in_fan_out=True (a plain model): PEFT sets each layer's layout by its type, not by this flag (a Conv1D is
    read [in, out], an nn.Linear [out, in]; it flips the flag with a warning), and LoRALinear does the same, so GPT-2
    adapters load whatever value they hold (PEFT saves the one its last layer left: False with lm_head targeted).
    PEFT never saves True for an adapter without a Conv1D, though: one whose linear layers are all nn.Linear here
    was not made for this model, and is refused, naming a layer. A tensor-parallel layer sharded from a Conv1D
    counts as one (tensor_parallelize replaced GPT-2's, and refused the adapter)."""
    bases = {n: model.get_submodule(n) for n in targets}
    bases = {n: getattr(m, "base_layer", m) for n, m in bases.items()}
    if bases and not any(is_hf_conv1d(m) or (_is_parallel(m) and m.conv1d) for m in bases.values()):
        name, mod = next(iter(bases.items()))
        raise ValueError(f"{path}: fan_in_fan_out=True is for transformers' Conv1D layers (GPT-2: weight [in, "
                         f"out]), but the adapter's layers are not Conv1D here ({name} is a {type(mod).__name__}): "
                         f"an adapter for another model? (PEFT writes fan_in_fan_out=false for nn.Linear layers)")


def _check_no_stale_lora(model, targets, path):
    """LoRA the checkpoint does not name would stay active beside the loaded adapter (the model would not be
    the checkpoint's): refused, unless it is inert (a fresh LoRALinear: lora_B zero, not merged, not DoRA).
    Tensor-parallel layers are refused either way (their B shards differ by rank: a per-rank verdict could
    leave the other ranks waiting in a collective)."""
    stale = []
    for name, mod in model.named_modules():
        if name in targets:
            continue
        if isinstance(mod, LoRALinear):
            if mod.merged or mod.use_dora or bool(mod.lora_B.detach().ne(0).any()):
                stale.append(name)
        elif isinstance(mod, LoRAEmbedding):  # (inert when A is zero: PEFT's embedding init)
            if mod.merged or bool(mod.lora_embedding_A.detach().ne(0).any()):
                stale.append(name)
        elif isinstance(mod, LoRAConv):  # (inert when B is zero, as LoRALinear)
            if mod.merged or bool(mod.lora_B.detach().ne(0).any()):
                stale.append(name)
        elif _is_parallel(mod) and mod.lora_A is not None:
            stale.append(name)
    if stale:
        raise ValueError(f"{path}: the model carries LoRA on {', '.join(stale)}, which the checkpoint does not name: "
                         f"those updates would stay active beside the loaded adapter; load it into a model "
                         f"without LoRA there (or with fresh, zero lora_B factors)")


def _lora_target(model, path, name, where, wrapper_type, r, taken=()):
    """(module, its base layer) for the model's module `name` that rank-r checkpoint LoRA goes to. A `wrapper_type`
    (LoRALinear, LoRAEmbedding, LoRAConv) is checked here (not merged, rank r); a plain layer comes with base layer
    None, for the caller to check (its kind, the ranks its wrapper takes). `where` names the module in errors (with
    its checkpoint name when that differs); `taken`: dicts of the modules already given LoRA weights."""
    if any(name in t for t in taken):
        raise ValueError(f"{path}: module {name} gets LoRA weights twice in the checkpoint")
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{path}: module {where!r} from the checkpoint is not in the model") from None
    if not isinstance(mod, wrapper_type):
        return mod, None
    if mod.merged:
        raise ValueError(f"{path}: module {name} is merged; unmerge_lora(model) before loading new adapter "
                         f"weights into it (its weight would keep the old update)")
    if mod.r != r:
        raise ValueError(f"{path}: {where} has rank {mod.r}, checkpoint has {r}")
    return mod, mod.base_layer


def _untie_lora_a(mod, owners):
    """Give the LoRALinear `mod` an A Parameter of its own when it shares one with other layers (_tie_lora_a; owners:
    {id(A): how many LoRALinear layers hold it}), so that copying new values into it leaves their A alone."""
    if owners.get(id(mod.lora_A), 0) > 1:
        mod.lora_A = nn.Parameter(mod.lora_A.detach().clone(), requires_grad=mod.lora_A.requires_grad)


def _tie_lora_a(model, names):
    """Make the LoRALinear layers `names`, the row blocks of one HF module whose PEFT LoRA was split into them
    (GPT-2's c_attn, Phi-3's qkv_proj / gate_up_proj), share one A Parameter, as PEFT's single A serves every row
    of that module: a training step then gives A the sum of the parts' gradients, PEFT's dA (separate copies
    would drift apart), and save_peft_adapter writes the LoRA back as PEFT's rank-r one. Tensor-parallel layers
    (their own shards) are left as they are."""
    mods = [model.get_submodule(n) for n in names]
    if not all(isinstance(m, LoRALinear) for m in mods):
        return
    a = mods[0].lora_A
    if all(m.lora_A.shape == a.shape and m.lora_A.dtype == a.dtype and m.lora_A.device == a.device for m in mods):
        for m in mods[1:]:
            m.lora_A = a


def _check_no_peft_layers(path, model):
    """load_peft_adapter into a peft.PeftModel: refused while the wrapped model holds PEFT's own layers (its LoRA
    layers are not llmkern's, which the checkpoint's modules would have to become: the names did not even resolve,
    "module ... is not in the model"). One whose layers llmkern replaced (tensor_parallelize) loads as its model."""
    for name, m in model.named_modules():
        if type(m).__module__.startswith("peft."):
            raise ValueError(f"{path}: the model is a peft.PeftModel, whose {name} is PEFT's own "
                             f"{type(m).__name__} layer: load the adapter with PEFT (peft_model.load_adapter(path, "
                             f"adapter_name=...)), or into the plain model (peft_model.unload(), or the base model "
                             f"before get_peft_model)")


def load_peft_adapter(model: nn.Module, path: str, freeze_base: bool = True,
                      adapter_dtype: Union[None, str, torch.dtype] = None) -> nn.Module:
    """Load a PEFT LoRA adapter directory into ``model`` (a plain model; a peft.PeftModel holding PEFT's own layers
    is refused with ValueError: PeftModel.load_adapter loads into those).

    Each module named in the checkpoint becomes a LoRALinear (or, if it already is one, gets the
    new weights) with PEFT's r / lora_alpha / lora_dropout / use_rslora / rank_pattern / alpha_pattern (a module
    that already has LoRA takes the config's alpha, dropout and rsLoRA too, as PEFT builds every loaded adapter's
    layers from its config: the model is the checkpoint's whether or not LoRA was injected first; so a loaded layer
    that was ``disabled`` is enabled again, where PEFT's load_adapter leaves a layer it disabled off); base weights
    PEFT saved for a targeted lm_head / embedding layer (``<module>.base_layer.weight``, and a biased lm_head's
    ``<module>.base_layer.bias``, Phi's) are copied into that layer, as PEFT does. DoRA adapters (``use_dora:
    true``, a ``lora_magnitude_vector`` per module) load as DoRA LoRALinear modules (an existing LoRALinear is
    switched to DoRA, or back to plain LoRA for a plain adapter). LoRA on an embedding layer (``lora_embedding_A`` /
    ``lora_embedding_B``) loads as a LoRAEmbedding (a zoo model takes transformers' names for it, e.g.
    model.embed_tokens).
    LoRA on a conv layer (``lora_A.weight`` / ``lora_B.weight`` with conv kernel shapes) loads as a LoRAConv
    into the nn.Conv1d/2d/3d of that name (its kernel, channels and groups checked against the shapes; a conv
    LoRAConv refuses, e.g. dilation != 1, is refused too).
    transformers' GPT-2 Conv1D layers (a plain GPT2LMHeadModel) load as LoRALinear modules over them, whatever the
    config's fan_in_fan_out: as in PEFT each layer's layout follows its type (PEFT's own GPT-2 adapters that also
    target lm_head say false); fan_in_fan_out=True for an adapter none of whose linear layers is a Conv1D here is
    refused (PEFT never writes that).
    Raises ValueError for adapter kinds other than LoRA / DoRA on nn.Linear (and Conv1D) and plain LoRA on
    nn.Embedding and nn.Conv (aLoRA and other variants, LoRA bias, DoRA on embeddings or convs, modules_to_save,
    trainable tokens, PiSSA/OLoRA/CorDA/LoftQ-initialised adapters, DoRA on tensor-parallel layers). With
    ``freeze_base`` every parameter except the LoRA A/B weights (and DoRA magnitudes, and adapters / prefixes the
    model has) is frozen.

    A zoo model (GPT, Llama) also takes adapters written for the equivalent transformers model
    (``hf_module_names()``): PEFT on LlamaForCausalLM, or on GPT2LMHeadModel, whose ``c_attn`` LoRA
    goes to the q/k/v layers exactly (each gets its rows of B; the three share A as one Parameter, PEFT's single
    A: a training step gives it PEFT's gradient, and save_peft_adapter writes PEFT's rank-r LoRA back; a later
    load into them unties it first) and whose fan_in_fan_out=True only concerns the Conv1D base weight layout
    (A/B are as for nn.Linear). Phi-3's qkv_proj / gate_up_proj LoRAs split the same way, and GPT-NeoX's
    query_key_value's (each of q / k / v gets its rows of B, interleaved per head there).

    Nothing is changed unless the whole checkpoint fits: every check, of the weights and of every config value the
    load uses, runs before the first module is changed (or frozen). Config values are checked as PEFT's
    LoraConfig means them, raising ValueError naming the path, the key and (for a per-module value) the module:
    ``lora_dropout`` a number in [0, 1) (llmkern's LoRA layers refuse 1.0, which would drop the whole update in
    training); ``lora_alpha`` / ``alpha_pattern`` values finite numbers (zero and negative ones load, as in PEFT);
    ``r`` / ``rank_pattern`` values positive ints; ``use_rslora`` / ``use_dora`` true or false (PEFT would take the
    string "false" as true); ``rank_pattern`` / ``alpha_pattern`` objects whose keys are valid regexes. Pattern and
    default values no checkpoint module uses are not looked at (PEFT does not use them either).

    Tensor parallelism: a ColumnParallelLinear / RowParallelLinear named in the checkpoint must already
    carry LoRA parameters of the checkpoint's rank (``inject_lora`` before ``tensor_parallelize``); each
    rank copies its shard of A and B into it (no communication: call it on every rank, each reads the
    files) and sets its scaling from lora_alpha / r / use_rslora / rank_pattern / alpha_pattern.
    lora_dropout is not applied by sharded layers (they have no LoRA dropout; it is still checked). A sharded
    layer without LoRA, another rank, or shapes that do not fit raise ValueError naming the module, before
    anything is changed.

    LoRA the model already carries on modules the checkpoint does not name is refused (it would stay active),
    unless it is a fresh LoRALinear (lora_B zero, not merged).

    ``adapter_dtype``: the dtype the loaded LoRA parameters are held in, as inject_lora's. None (default, PEFT's
    ``autocast_adapter_dtype=True``): new LoRA layers are float32 over float16 / bfloat16 bases (a float32 file
    loads unrounded), else in the base dtype, and LoRA layers (tensor-parallel shards included) the model already
    has keep their dtype; ``"base"`` or a torch dtype: every loaded layer's parameters take it (existing ones are
    cast in place).
    """
    # a peft.PeftModel: its modules are named as in the model it wraps (as save_peft_adapter names them)
    check_adapter_dtype(adapter_dtype)
    wrapper, model = model, _unwrap_peft_model(model)
    if model is not wrapper:
        _check_no_peft_layers(path, model)
    # (every config value the load uses is checked here or in step 1, before the first change to the model)
    with open(os.path.join(path, CONFIG_NAME)) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: {CONFIG_NAME} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: {CONFIG_NAME} must hold a JSON object, got {type(config).__name__}")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise ValueError(f"{path}: peft_type must be LORA, got {config.get('peft_type')!r}")
    hf = _hf_names(model)
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
    use_dora = _config_flag(path, config, "use_dora")
    use_rslora = _config_flag(path, config, "use_rslora")
    fan_in_fan_out = _config_flag(path, config, "fan_in_fan_out")  # (checked against the modules: step 1)
    dropout = _config_dropout(path, config)
    patterns = _config_patterns(path, config)
    weights, metadata = _read_weights(path)
    pairs, base_weights, base_biases, magnitudes, emb_pairs = {}, {}, {}, {}, {}
    for key, t in weights.items():
        m = _KEY.match(key)
        if m is not None:
            pair = pairs.setdefault(m.group("module"), {})
            _once(path, key, m.group("module"), pair, m.group("ab"))
            pair[m.group("ab")] = t
        elif _MAG_KEY.match(key):
            if not use_dora:
                raise ValueError(f"{path}: key {key!r} is a DoRA magnitude, but the config says use_dora=False")
            _once(path, key, _MAG_KEY.match(key).group("module"), magnitudes, _MAG_KEY.match(key).group("module"))
            magnitudes[_MAG_KEY.match(key).group("module")] = t
        elif _BASE_KEY.match(key):
            base_weights[_BASE_KEY.match(key).group("module")] = t
        elif _BASE_BIAS_KEY.match(key):
            base_biases[_BASE_BIAS_KEY.match(key).group("module")] = t
        elif _EMBED_KEY.match(key):
            m = _EMBED_KEY.match(key)
            pair = emb_pairs.setdefault(m.group("module"), {})
            _once(path, key, m.group("module"), pair, m.group("ab"))
            pair[m.group("ab")] = t
        else:
            raise ValueError(f"{path}: unsupported key {key!r} (only LoRA A/B weights of linear layers)")
    if use_dora and emb_pairs:
        raise ValueError(f"{path}: use_dora=True on embedding layers ({next(iter(emb_pairs))}) is not supported by "
                         f"llmkern.peft (LoRAEmbedding is plain LoRA); DoRA loads on nn.Linear modules only")
    # conv LoRA (PEFT's lora.Conv1d/2d/3d) shares the linear keys; its kernels have more than 2 dimensions
    conv_pairs = {n: ab for n, ab in pairs.items() if any(t.dim() > 2 for t in ab.values())}
    for name in conv_pairs:
        del pairs[name]
    if use_dora and conv_pairs:
        raise ValueError(f"{path}: use_dora=True on conv layers ({next(iter(conv_pairs))}) is not supported by "
                         f"llmkern.peft (LoRAConv is plain LoRA); DoRA loads on nn.Linear modules only")
    for name in base_weights:
        if name not in pairs and name not in emb_pairs and name not in conv_pairs:
            raise ValueError(f"{path}: unsupported key {_PREFIX}{name}.base_layer.weight (a base weight of a "
                             f"module without LoRA A/B weights)")
    for name in base_biases:  # (PEFT saves base layers of targeted lm_head / embed_tokens; only a Linear has a bias)
        if name not in pairs:
            raise ValueError(f"{path}: unsupported key {_PREFIX}{name}.base_layer.bias (a base bias of a module "
                             f"without linear LoRA A/B weights)")
    for name in magnitudes:
        if name not in pairs:
            raise ValueError(f"{path}: {_PREFIX}{name}.lora_magnitude_vector belongs to a module without LoRA A/B "
                             f"weights")
    if use_dora:  # (embeddings refused above)
        for name in pairs:
            if name not in magnitudes:
                raise ValueError(f"{path}: use_dora=True but module {name} has no lora_magnitude_vector")
    records = _fused_records(metadata) if hf is not None else {}
    by_hf = {}  # HF module name -> [(zoo name, HFModule)]
    for zn, h in (hf or {}).items():
        by_hf.setdefault(h.name, []).append((zn, h))

    # 1. every checkpoint module -> (model module name, A, B, r, alpha, base weight), all checked
    targets = {}
    shared_a = []  # groups of zoo layers split from one HF module's LoRA that share its A (see _tie_lora_a)
    shards = {}  # tensor-parallel layers: name -> this rank's (A, B) shard

    def add(name, source, A, B, r, alpha, W, M):
        if name in targets:
            raise ValueError(f"{path}: module {name} gets LoRA weights from both {targets[name][0]} and "
                             f"{source} in the checkpoint")
        targets[name] = (source, A, B, r, alpha, W, M)

    def factors(what, name, ab, key="lora_"):
        """A checkpoint module's (A, B, r, alpha): its rank checked against the config's, its alpha checked."""
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: {what} {name} has only {key}{''.join(ab)}")
        r = ab["A"].shape[0]
        # rank_pattern / alpha_pattern name the modules as the checkpoint does
        rank_key, want = _module_rank(path, config, patterns, name)
        if r != want:
            raise ValueError(f"{path}: {name}.{key}A has rank {r}, {CONFIG_NAME} says {want} ({rank_key})")
        if r < 1:  # (a rank-0 pair: here, not in the wrappers, which would raise with other modules already loaded)
            raise ValueError(f"{path}: {name}: rank {r} must be positive")
        return ab["A"], ab["B"], r, _module_alpha(path, config, patterns, name)

    for name, ab in pairs.items():
        A, B, r, alpha = factors("module", name, ab)
        W = base_weights.get(name)
        M = magnitudes.get(name)
        if hf is None or name in hf or name not in by_hf:  # the model's own name
            why = None if hf is None else _hf_refusal(model, name)
            if why and not _has_module(model, name):  # (the zoo's own q_proj name loads: it is a module here)
                raise ValueError(f"{path}: module {name}: {why}")
            add(name, name, A, B, r, alpha, W, M)
            continue
        parts = by_hf[name]  # an HF name
        base_key = "weight" if W is not None else "bias" if name in base_biases else None
        if len(parts) == 1 and parts[0][1].rows is None:
            if base_key and parts[0][1].conv1d:
                raise ValueError(f"{path}: {name}.base_layer.{base_key}: a base {base_key} for a Conv1D module is "
                                 f"not supported")
            add(parts[0][0], name, A, B, r, alpha, W, M)
            continue
        if base_key:
            raise ValueError(f"{path}: {name}.base_layer.{base_key}: {name} is split into "
                             f"{', '.join(p[0] for p in parts)} in this model; its base {base_key} cannot be loaded")
        split = _split_fused(path, name, A, B, alpha, use_rslora, parts, records.get(name), M)
        for zn, Ap, Bp, rp, ap, Mp in split:
            add(zn, name, Ap, Bp, rp, ap, None, Mp)
        if len(split) > 1 and all(e[1] is A for e in split):  # (the whole A each: PEFT's one shared A)
            shared_a.append([e[0] for e in split])

    for name, (source, A, B, r, alpha, W, M) in targets.items():
        where = name if source == name else f"{name} (from {source} in the checkpoint)"
        mod, layer = _lora_target(model, path, name, where, LoRALinear, r)  # (add refused duplicates)
        if layer is None:
            # (QLoRA: quantize_nf4 first, then load the adapter; GPT-2: Conv1D layers, any fan_in_fan_out, as PEFT)
            if isinstance(mod, (nn.Linear, NF4Linear)) or is_hf_conv1d(mod):
                if not 1 <= r <= MAX_RANK:
                    raise ValueError(f"{path}: {where}: rank {r} is outside LoRALinear's 1..{MAX_RANK}")
            elif _is_parallel(mod):  # a tensor-parallel layer: whole shapes checked, this rank's shard loaded
                if mod.lora_A is None:
                    raise ValueError(f"{path}: {where} is a {type(mod).__name__} without LoRA parameters; inject "
                                     f"LoRA (inject_lora) before tensor_parallelize, then load the adapter")
                if mod.lora_A.shape[0] != r:
                    raise ValueError(f"{path}: {where} has rank {mod.lora_A.shape[0]}, checkpoint has {r}")
                if W is not None or source in base_biases:
                    raise ValueError(f"{path}: {source}.base_layer.{'weight' if W is not None else 'bias'}: base "
                                     f"weights of tensor-parallel layers cannot be loaded")
                if M is not None:
                    raise ValueError(f"{path}: {where}: DoRA (use_dora) is not supported on tensor-parallel layers")
            else:
                raise ValueError(f"{path}: module {name} is a {type(mod).__name__}, not an nn.Linear (or NF4Linear, "
                                 f"transformers Conv1D)")
            layer = mod
        n_in, n_out = linear_features(layer)
        if tuple(A.shape) != (r, n_in) or tuple(B.shape) != (n_out, r):
            raise ValueError(f"{path}: {where}: checkpoint shapes A{tuple(A.shape)} B{tuple(B.shape)} do not "
                             f"fit the layer (A{(r, n_in)} B{(n_out, r)})")
        if M is not None and tuple(M.shape) != (n_out,):
            raise ValueError(f"{path}: {where}: lora_magnitude_vector has shape {tuple(M.shape)}, the layer has "
                             f"{n_out} output features")
        if _is_parallel(mod):
            from llmkern.parallel import lora_state

            A_shard, B_shard = lora_state.shard_of(mod, A, B)
            if A_shard.shape != mod.lora_A.shape or B_shard.shape != mod.lora_B.shape:
                raise ValueError(f"{path}: {where}: this rank's shards A{tuple(A_shard.shape)} B{tuple(B_shard.shape)} "
                                 f"of the checkpoint do not fit the {type(mod).__name__}'s LoRA parameters "
                                 f"A{tuple(mod.lora_A.shape)} B{tuple(mod.lora_B.shape)}")
            shards[name] = (A_shard, B_shard)
        if (W is not None or source in base_biases) and isinstance(layer, NF4Linear):
            raise ValueError(f"{path}: {source}.base_layer.{'weight' if W is not None else 'bias'}: {where} is a "
                             f"4-bit NF4Linear; a saved base layer cannot be loaded into it (load the adapter before "
                             f"quantize_nf4)")
        if W is not None and W.shape != layer.weight.shape:
            raise ValueError(f"{path}: {name}.base_layer.weight has shape {tuple(W.shape)}, the layer's weight "
                             f"is {tuple(layer.weight.shape)}")
        if source in base_biases:
            _check_base_bias(path, source, where, base_biases[source], layer)

    emb_targets = {}  # embeddings: model module name -> (checkpoint name, A, B, r, alpha, base weight)
    hf_emb = {v: k for k, v in _hf_embedding_names(model).items()} if hf is not None else {}
    for name, ab in emb_pairs.items():
        A, B, r, alpha = factors("embedding", name, ab, "lora_embedding_")
        zn = hf_emb.get(name, name)
        where = name if zn == name else f"{zn} (from {name} in the checkpoint)"
        mod, layer = _lora_target(model, path, zn, where, LoRAEmbedding, r, (targets, emb_targets))
        if layer is None:
            if not isinstance(mod, nn.Embedding):
                raise ValueError(f"{path}: module {zn} is a {type(mod).__name__}, but the checkpoint has embedding "
                                 f"LoRA weights (lora_embedding_A / B) for it: not an nn.Embedding")
            layer = mod
        if (tuple(A.shape) != (r, layer.num_embeddings) or tuple(B.shape) != (layer.embedding_dim, r)):
            raise ValueError(f"{path}: {where}: checkpoint shapes lora_embedding_A{tuple(A.shape)} "
                             f"lora_embedding_B{tuple(B.shape)} do not fit the embedding "
                             f"(A{(r, layer.num_embeddings)} B{(layer.embedding_dim, r)})")
        W = base_weights.get(name)
        if W is not None and W.shape != layer.weight.shape:
            raise ValueError(f"{path}: {name}.base_layer.weight has shape {tuple(W.shape)}, the embedding's weight "
                             f"is {tuple(layer.weight.shape)}")
        emb_targets[zn] = (name, A, B, r, alpha, W)

    conv_targets = {}  # convs: model module name -> (A, B, r, alpha, base weight); the model's own names
    for name, ab in conv_pairs.items():
        A, B, r, alpha = factors("conv", name, ab)
        mod, layer = _lora_target(model, path, name, name, LoRAConv, r, (targets, emb_targets))
        if layer is None:
            if not isinstance(mod, CONV_TYPES):
                raise ValueError(f"{path}: module {name} is a {type(mod).__name__}, but the checkpoint has conv LoRA "
                                 f"weights (lora_A {tuple(A.shape)}) for it: not an nn.Conv1d/2d/3d")
            try:  # (what LoRAConv refuses: dilation, padding_mode, r not divisible by groups, ...)
                _check_conv_base(mod, r)
            except ValueError as exc:
                raise ValueError(f"{path}: {name}: {exc}") from None
            layer = mod
        nd = layer.weight.dim() - 2
        want_a = (r, layer.in_channels, *layer.kernel_size)
        want_b = (layer.out_channels, r // layer.groups, *(1,) * nd)
        if tuple(A.shape) != want_a or tuple(B.shape) != want_b:
            raise ValueError(f"{path}: {name}: checkpoint shapes lora_A{tuple(A.shape)} lora_B{tuple(B.shape)} do "
                             f"not fit the {type(layer).__name__} (A{want_a} B{want_b})")
        W = base_weights.get(name)
        if W is not None and W.shape != layer.weight.shape:
            raise ValueError(f"{path}: {name}.base_layer.weight has shape {tuple(W.shape)}, the conv's weight "
                             f"is {tuple(layer.weight.shape)}")
        conv_targets[name] = (A, B, r, alpha, W)

    if fan_in_fan_out and hf is None:
        _check_fan_in_fan_out(model, path, targets)
    _check_no_stale_lora(model, {**targets, **emb_targets, **conv_targets}, path)

    # 2. load
    if freeze_base:
        _freeze_non_lora(model)
    owners = Counter(id(m.lora_A) for _, m in lora_modules(model))  # (A Parameters _tie_lora_a shared)
    for name, (source, A, B, r, alpha, W, M) in targets.items():
        mod = model.get_submodule(name)
        if name in shards:  # a tensor-parallel layer: this rank's shard
            A_shard, B_shard = shards[name]
            if adapter_dtype is not None:
                cast_lora_params([mod.lora_A, mod.lora_B], resolve_adapter_dtype(adapter_dtype, mod.weight.dtype))
            with torch.no_grad():
                mod.lora_A.copy_(A_shard)
                mod.lora_B.copy_(B_shard)
            mod.lora_scaling = lora_scaling(alpha, r, use_rslora)
            mod.lora_alpha, mod.lora_use_rslora = alpha, use_rslora
            continue
        if isinstance(mod, LoRALinear):  # (as a new wrapper: the config's alpha, rsLoRA, dropout and DoRA; enabled)
            mod.alpha, mod.use_rslora, mod.dropout = float(alpha), use_rslora, dropout
            mod.disabled = False
            _untie_lora_a(mod, owners)  # (an A an earlier load tied to other layers: this load may give it another)
            if adapter_dtype is not None:
                mod.set_adapter_dtype(adapter_dtype)
            mod.set_use_dora(M is not None)
        else:
            mod = LoRALinear(mod, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, freeze_base=freeze_base,
                             use_dora=M is not None, adapter_dtype=adapter_dtype)
            _set_submodule(model, name, mod)
        with torch.no_grad():
            mod.lora_A.copy_(A)
            mod.lora_B.copy_(B)
            if M is not None:
                mod.lora_magnitude_vector.copy_(M)
            if W is not None:  # as PEFT does: the saved base weight replaces the layer's
                mod.base_layer.weight.copy_(W)
            if source in base_biases:  # (and its bias: PEFT saved and loads the whole base layer)
                mod.base_layer.bias.copy_(base_biases[source])
    for group in shared_a:
        _tie_lora_a(model, group)
    for name, (source, A, B, r, alpha, W) in emb_targets.items():
        mod = model.get_submodule(name)
        if isinstance(mod, LoRAEmbedding):
            mod.alpha, mod.use_rslora, mod.dropout = float(alpha), use_rslora, dropout
            mod.disabled = False
            if adapter_dtype is not None:
                mod.set_adapter_dtype(adapter_dtype)
        else:
            mod = LoRAEmbedding(mod, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                freeze_base=freeze_base, adapter_dtype=adapter_dtype)
            _set_submodule(model, name, mod)
        with torch.no_grad():
            mod.lora_embedding_A.copy_(A)
            mod.lora_embedding_B.copy_(B)
            if W is not None:  # as PEFT does: the saved base weight replaces the layer's
                mod.base_layer.weight.copy_(W)
    for name, (A, B, r, alpha, W) in conv_targets.items():
        mod = model.get_submodule(name)
        if isinstance(mod, LoRAConv):
            mod.alpha, mod.use_rslora, mod.dropout = float(alpha), use_rslora, dropout
            mod.disabled = False
            if adapter_dtype is not None:
                mod.set_adapter_dtype(adapter_dtype)
        else:
            mod = LoRAConv(mod, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, freeze_base=freeze_base,
                           adapter_dtype=adapter_dtype)
            _set_submodule(model, name, mod)
        with torch.no_grad():
            mod.lora_A.copy_(A)
            mod.lora_B.copy_(B)
            if W is not None:  # as PEFT does: the saved base weight replaces the layer's
                mod.base_layer.weight.copy_(W)
    return wrapper
