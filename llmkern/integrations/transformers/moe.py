"""The "llmkern" experts implementation for Hugging Face transformers MoE models (ExpertsInterface).

    import llmkern.integrations.transformers as lt
    lt.register()                                   # once per process (attention and experts)
    model = AutoModelForCausalLM.from_pretrained(..., experts_implementation="llmkern")
    # or: model.set_experts_implementation("llmkern")

Every experts module that transformers decorates with `@use_experts_implementation` (MixtralExperts,
Qwen2MoeExperts, OlmoeExperts, DeepseekV3Experts, ...) then runs `llmkern_experts_forward`: one
`llmkern.moe_mlp` call on the module's own `gate_up_proj` / `down_proj` parameters, so the gradients
reach them (and the router, through top_k_weights) as with the other implementations.

The op's layout is transformers' default one: [gate; up] concatenated along the output features,
weights [E, out, in], no biases, a gated MLP with silu (-> "swiglu"), tanh-approximated gelu
(-> "geglu": gelu_pytorch_tanh, gelu_new, gelu_fast) or exact erf gelu (-> "geglu_exact": gelu,
gelu_python, nn.GELU()). Transposed weights ([E, in, out], Aria) are passed as transpose views: the
kernels read weights through their strides, so no copy is made. Under expert parallelism
(`_is_expert_parallel`) the EP dispatch hands the module local expert ids with its off-rank slots set
to the sentinel num_experts (weight 0); those become the op's -1 (a dropped slot), which adds nothing,
as grouped_mm's sentinel masking does. Anything else (interleaved gate/up, biases, a custom
`_apply_gate` such as gpt-oss's clamped SwiGLU, other activations, ungated experts, a post-expert norm,
quantized weights) raises NotImplementedError naming what is unsupported; shapes the op itself refuses
(more than 1024 experts, an odd number of gate_up rows) raise its ValueError. It never falls back to
another implementation.
"""
import torch
import torch.nn.functional as F

import llmkern
from llmkern.ops import _checks

NAME = "llmkern"
_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ADVICE = 'use experts_implementation="grouped_mm" (or "eager") for this model'


# ---- what the module computes -------------------------------------------------------------------

def _activation_name(act):
    """The moe_mlp activation of an experts module's act_fn, or None when the op has no such gate.
    Matched by type, not by config.hidden_act: models name that field differently and some (Aria,
    LFM2-MoE) hard-code the activation."""
    from transformers import activations as A

    if act is F.silu or isinstance(act, (A.SiLUActivation, torch.nn.SiLU)):
        return "swiglu"
    # all three are 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), the op's "geglu"
    if isinstance(act, (A.GELUTanh, A.NewGELUActivation, A.FastGELUActivation)):
        return "geglu"
    if isinstance(act, torch.nn.GELU):
        return "geglu" if act.approximate == "tanh" else "geglu_exact"
    # transformers' "gelu" and "gelu_python": F.gelu and x·½(1 + erf(x/√2)), both the exact form (matched
    # by exact type: ClippedGELUActivation and friends compute something else)
    if act is F.gelu or type(act) is A.GELUActivation:
        return "geglu_exact"
    return None


def _describe(act):
    if act is None:
        return "no act_fn attribute"
    return getattr(act, "__name__", type(act).__name__)


def _unsupported(module):
    """Reasons the module's layout or state is not moe_mlp's (empty: supported)."""
    from transformers.integrations.moe import _default_apply_gate

    flag = lambda name, default: getattr(module, name, default)  # noqa: E731
    reasons = []
    if not flag("has_gate", True):
        reasons.append("ungated experts (has_gate=False: up_proj only)")
    if not flag("is_concatenated", True):
        reasons.append("interleaved gate/up rows (is_concatenated=False)")
    if flag("has_bias", False):
        reasons.append("expert biases (has_bias=True)")
    if flag("has_post_expert_norm", False):
        reasons.append("a post-expert norm (has_post_expert_norm=True)")
    if getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
        reasons.append(f"a custom gate ({type(module).__name__}._apply_gate, e.g. a clamped or scaled SwiGLU)")
    elif flag("has_gate", True) and _activation_name(getattr(module, "act_fn", None)) is None:
        reasons.append(f"the activation {_describe(getattr(module, 'act_fn', None))}")
    return reasons + (_weight_problems(module) if flag("has_gate", True) else [])


def _weight_problems(module):
    reasons = []
    weights = [getattr(module, name, None) for name in ("gate_up_proj", "down_proj")]
    for name, w in zip(("gate_up_proj", "down_proj"), weights):
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            reasons.append(f"{name} that is not a 3-D tensor")
        elif w.dtype not in _WEIGHT_DTYPES:
            reasons.append(f"{name} in {w.dtype} (quantized weights)")
    if not reasons and weights[0].dtype != weights[1].dtype:
        reasons.append(f"gate_up_proj in {weights[0].dtype} but down_proj in {weights[1].dtype}")
    return reasons


def _check(module):
    reasons = _unsupported(module)
    if reasons:
        raise NotImplementedError(
            f"llmkern experts implementation does not support {type(module).__name__}: "
            f"{'; '.join(reasons)}. llmkern.moe_mlp takes concatenated [gate; up] weights without bias, "
            f"with a silu or gelu (tanh or exact) gate; {_ADVICE}.")


_FLAGS = ("has_gate", "is_concatenated", "has_bias", "has_post_expert_norm")


def _checked_activation(module):
    """The op's activation name for `module`, after _check; both cached on the module while what they depend on
    stays the same (the checks cost ~10 µs, every layer, every call): its class and layout flags, its weights
    (identity, dtype, number of dims), its act_fn and the expert-parallel flag. The act_fn is keyed on its type
    and its settings (nn.GELU's `approximate`, which can change in place) and compared by identity with the one
    the cache holds (not by id(): the cache keeps it alive, so a replacement cannot reuse its id unseen)."""
    act = getattr(module, "act_fn", None)
    weights = [getattr(module, n, None) for n in ("gate_up_proj", "down_proj")]
    key = (type(module), *(getattr(module, n, None) for n in _FLAGS),
           *(id(w) for w in weights), *(getattr(w, "dtype", None) for w in weights),
           *(getattr(w, "ndim", None) for w in weights),
           type(act), getattr(act, "approximate", None), getattr(module, "_is_expert_parallel", False))
    cached = module.__dict__.get("_llmkern_experts_check")
    if cached is not None and cached[0] == key and cached[2] is act:
        return cached[1]
    _check(module)
    activation = _activation_name(act)
    module.__dict__["_llmkern_experts_check"] = (key, activation, act)
    return activation


# ---- the experts forward ------------------------------------------------------------------------

def _weights(module):
    """(w_gate_up [E, 2F, d], w_down [E, d, F]): transposed layouts as views (no copy: the kernels
    read weights through their strides)."""
    wgu, wd = module.gate_up_proj, module.down_proj
    if getattr(module, "is_transposed", False):
        wgu, wd = wgu.transpose(1, 2), wd.transpose(1, 2)
    return wgu, wd


def _run(x, wgu, wd, top_k_index, top_k_weights, activation):
    """moe_mlp with the dtypes eager's F.linear would use: under autocast the autocast dtype (the op
    itself then runs with autocast off, so the CPU reference's matmuls are not cast again); otherwise
    the weights' dtype, as grouped_mm does."""
    dt = _checks.autocast_dtype(x)
    if dt is None:
        return llmkern.moe_mlp(x.to(wgu.dtype), wgu, wd, top_k_index, top_k_weights, activation)
    x, wgu, wd = (_checks.autocast_cast(dt, t) for t in (x, wgu, wd))
    with torch.autocast(x.device.type, enabled=False):
        return llmkern.moe_mlp(x, wgu, wd, top_k_index, top_k_weights, activation)


def _local_ids(module, top_k_index):
    """top_k_index with expert parallelism's sentinels (ids >= the module's local num_experts, as
    transformers' grouped_mm_experts_forward tests them) as the op's -1; elementwise, no host sync."""
    if not getattr(module, "_is_expert_parallel", False):
        return top_k_index
    return torch.where(top_k_index >= module.num_experts, -1, top_k_index)


def llmkern_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """ExpertsInterface entry: hidden_states [num_tokens, hidden], top_k_index / top_k_weights
    [num_tokens, k] -> [num_tokens, hidden] in hidden_states' dtype (as grouped_mm_experts_forward).
    Raises NotImplementedError for an experts layout llmkern.moe_mlp does not take."""
    activation = _checked_activation(self)
    wgu, wd = _weights(self)
    y = _run(hidden_states, wgu, wd, _local_ids(self, top_k_index), top_k_weights, activation)
    return y.to(hidden_states.dtype)


def register_experts(name: str = NAME):
    """Register `name` ("llmkern") with transformers' ExpertsInterface (idempotent). Returns False, and
    registers nothing, on a transformers release that has no experts interface (the attention
    integration still works there)."""
    from llmkern.integrations.transformers.attention import check_name

    check_name(name)
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:
        return False
    ExpertsInterface.register(name, llmkern_experts_forward)
    return True


__all__ = ["llmkern_experts_forward", "register_experts", "NAME"]
