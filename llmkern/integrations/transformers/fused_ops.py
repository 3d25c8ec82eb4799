"""Run a loaded Hugging Face model's norms, RoPE and gated MLPs on llmkern's fused ops.

    import llmkern.integrations.transformers as lt
    lt.use_fused_ops(model)          # a LlamaForCausalLM, Qwen3, Mistral, Gemma, GPT-2, ... (a PeftModel too)
    model._llmkern_fused_ops         # {"rms_norm": 5, "layer_norm": 0, "mlp": 2, "rope": 2}

Patching is per module instance (an instance attribute `forward`: a _BoundForward, which calls like the bound
method types.MethodType(fn, module) but survives torch.save(model) / torch.load and pickling, and which
copy.deepcopy binds to the copy); classes and transformers' module globals are left alone, so other models in
the process are unaffected. What is patched:

- RMSNorm: modules whose class forward is, bytecode for bytecode, transformers' LlamaRMSNorm forward
  (Llama, Mistral, Qwen2, Qwen3 incl. q_norm / k_norm, ...: ``weight * norm(x).to(dtype)``) or
  GemmaRMSNorm's (Gemma, Gemma 2, Gemma 3: ``norm(x) * (1 + weight)``, offset=1.0) -> llmkern.rms_norm with
  the module's eps. Other classes named *RMSNorm are left alone, with a one-time warning. A call whose input
  dtype is not the weight's (transformers then returns the weight's dtype) runs the original forward.
- nn.LayerNorm (exactly that class, 1-D normalized_shape) -> llmkern.layer_norm; the original forward
  runs for mixed dtypes and under autocast unless x is float32 (F.layer_norm runs in float32 there).
- Gated MLPs whose forward is LlamaMLP's, ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, with act_fn
  silu (swiglu) or the torch gelu / tanh gelu (geglu) -> down_proj(swiglu(gate_proj(x), up_proj(x))); and
  those whose forward is Phi3MLP's, one fused ``gate_up_proj`` whose output halves are gate and up
  (``activation_fn``) -> down_proj(swiglu(*gate_up_proj(x).chunk(2, -1))).
- RoPE: transformers 5.x attention classes call the module-global ``apply_rotary_pos_emb(q, k, cos, sin)``
  of their modeling file (``use_kernelized_func`` is a no-op without the `kernels` package and adds no
  per-instance hook the forward reads). The attention instance gets a copy of its class forward whose
  globals are a copy of the modeling module's with that name bound to llmkern.rope, the decorators around
  the forward (deprecate_kwarg) rebuilt around the copy. Before that, the module's function is checked
  numerically against llmkern.rope (float64, random cos / sin); calls the op does not express (unsqueeze_dim
  != 1, partial rotary, cos / sin of another dtype than q, ...) run the original function. The copied
  globals are a snapshot: reassigning another global of that modeling module afterwards does not reach the
  patched instances.

use_fused_ops(model, enable=False) removes the patches again (of the selected kinds): the modules run their class
forward, with none of the patch's attributes left.
"""
import functools
import logging
import types

import torch
from torch import nn

from llmkern._backend import warn_once

_MARK = "_llmkern_fused"          # on a patched module: its kind
_COUNTS = "_llmkern_fused_ops"    # on the model: modules patched per kind
_KINDS = ("rms_norm", "layer_norm", "mlp", "rope")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
logger = logging.getLogger(__name__)


# ---- recognising transformers' classes ----------------------------------------------------------

def _code(fn):
    fn = getattr(fn, "__func__", fn)
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    code = getattr(fn, "__code__", None)
    return None if code is None else (code.co_code, code.co_consts, code.co_names, code.co_argcount,
                                      code.co_kwonlyargcount, code.co_flags)


@functools.lru_cache(maxsize=None)
def _references():
    """The bytecode of transformers' reference RMSNorm / MLP implementations."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    try:
        from transformers.models.phi3.modeling_phi3 import Phi3MLP
    except ImportError:  # (an older transformers without Phi-3: nothing matches that reference)
        Phi3MLP = None
    return {"llama_norm": _code(LlamaRMSNorm.forward), "gemma_norm": (_code(GemmaRMSNorm.forward),
                                                                       _code(GemmaRMSNorm._norm)),
            "mlp": _code(LlamaMLP.forward), "gate_up_mlp": Phi3MLP and _code(Phi3MLP.forward)}


def _rms_convention(cls):
    """(offset, eps attribute) of an RMSNorm class computing exactly what Llama's or Gemma's does, else None."""
    ref = _references()
    if _code(cls.forward) == ref["llama_norm"]:
        return 0.0, "variance_epsilon"
    if (_code(cls.forward), _code(getattr(cls, "_norm", None))) == ref["gemma_norm"]:
        return 1.0, "eps"
    return None


def _glu(act):
    """("silu", None) / ("gelu", approximate) when act_fn is exactly one llmkern.swiglu / geglu compute."""
    from transformers import activations as A

    t = type(act)
    if t is nn.SiLU or t is getattr(A, "SiLUActivation", None):
        return "silu", None
    if t is nn.GELU and act.approximate in ("none", "tanh"):
        return "gelu", act.approximate
    fn = getattr(act, "act", None)
    if t is getattr(A, "GELUActivation", None) and fn is nn.functional.gelu:
        return "gelu", "none"
    if (t is getattr(A, "GELUTanh", None) and isinstance(fn, functools.partial) and fn.func is nn.functional.gelu
            and not fn.args and fn.keywords == {"approximate": "tanh"}):
        return "gelu", "tanh"
    return None


# ---- patched forwards (bound to the module instance by _BoundForward) ----------------------------

def _rms_forward(self, hidden_states, *args, **kwargs):
    from llmkern.ops.norm import rms_norm

    w = self.weight
    eps = getattr(self, self._llmkern_eps_attr, None)
    if (args or kwargs or not isinstance(hidden_states, torch.Tensor) or not isinstance(w, torch.Tensor)
            or hidden_states.dtype != w.dtype or hidden_states.dtype not in _FLOATS
            # (transformers' RMSNorms compute float64 inputs in float32: its own forward keeps that result)
            or hidden_states.dtype == torch.float64
            or isinstance(eps, bool) or not isinstance(eps, (float, int)) or not eps > 0):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    return rms_norm(hidden_states, w, float(eps), offset=self._llmkern_offset)


def _ln_forward(self, input, *args, **kwargs):
    from llmkern.ops.norm import layer_norm

    w, b = self.weight, self.bias
    x = input
    if (args or kwargs or not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS
            or len(self.normalized_shape) != 1 or any(p is not None and p.dtype != x.dtype for p in (w, b))
            or (x.dtype != torch.float32 and torch.is_autocast_enabled(x.device.type))
            or not self.eps > 0):
        return type(self).forward(self, input, *args, **kwargs)
    return layer_norm(x, w, b, float(self.eps))


def _glu_op(kind, gate, up):
    """act(gate) * up on llmkern.swiglu / geglu, for kind = _glu(act) (not None)."""
    from llmkern.ops.swiglu import geglu, swiglu

    return swiglu(gate, up) if kind[0] == "silu" else geglu(gate, up, approximate=kind[1])


def _mlp_forward(self, x, *args, **kwargs):
    kind = None if (args or kwargs) else _glu(self.act_fn)
    if kind is None:
        return type(self).forward(self, x, *args, **kwargs)
    gate, up = self.gate_proj(x), self.up_proj(x)
    if not (isinstance(gate, torch.Tensor) and isinstance(up, torch.Tensor) and gate.shape == up.shape
            and gate.dtype == up.dtype and gate.dtype in _FLOATS and gate.device == up.device):
        return self.down_proj(self.act_fn(gate) * up)  # (the original's math on the same projections)
    return self.down_proj(_glu_op(kind, gate, up))


def _gate_up_mlp_forward(self, x, *args, **kwargs):
    """Phi3MLP's forward (gate and up as the halves of one gate_up_proj) on llmkern.swiglu / geglu."""
    kind = None if (args or kwargs) else _glu(self.activation_fn)
    if kind is None:
        return type(self).forward(self, x, *args, **kwargs)
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    if gate.dtype not in _FLOATS or gate.shape != up.shape:  # (the original's math on the same projection)
        return self.down_proj(up * self.activation_fn(gate))
    return self.down_proj(_glu_op(kind, gate, up))


# ---- RoPE: a per-class copy of the attention forward whose apply_rotary_pos_emb is llmkern.rope -------

_ROPE_NAME = "apply_rotary_pos_emb"
_rope_checked = {}   # transformers' function -> (the globals it read, (full, partial): whether it is llmkern.rope)
_rope_forwards = {}  # class forward -> (the globals it read, its copy or None: nothing to patch)


def _rope_probe(fn, R):
    """Whether fn(q, k, cos, sin) is llmkern.rope(q, k, cos, sin) for [B, T, R] cos / sin and head dim 8 (in
    float64 on random inputs, cos / sin not of the cat(f, f) form, so any per-channel difference shows)."""
    from llmkern.reference.rope import rope  # what llmkern.rope computes (its CPU path, float64 here)

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64), torch.randn(2, 1, 5, 8, generator=g,
                                                                                 dtype=torch.float64)
    cos, sin = torch.randn(2, 2, 5, R, generator=g, dtype=torch.float64).unbind(0)
    try:
        got = fn(q, k, cos, sin)
        want = rope(q, k, cos, sin)
        return (isinstance(got, tuple) and len(got) == 2
                and all(isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=1e-12,
                                                                                              atol=1e-12)
                        for a, b in zip(got, want)))
    except Exception:  # noqa: BLE001 (another signature or layout: not ours to replace)
        return False


def _rope_agrees(fn):
    """(full, partial): whether fn is llmkern.rope for cos / sin covering the head dim, and for cos / sin
    covering part of it (GPT-NeoX's rotary_pct, Phi's partial_rotary_factor: the rest passes through); checked
    once per function."""
    seen = _globals_read(fn)  # (probed again when a global it reads, e.g. rotate_half, was reassigned since)
    cached = _rope_checked.get(fn)
    if cached is None or len(cached[0]) != len(seen) or any(a is not b for a, b in zip(cached[0], seen)):
        full = _rope_probe(fn, 8)
        cached = _rope_checked[fn] = (seen, (full, full and _rope_probe(fn, 4)))
    return cached[1]


def _fused_rope(original, partial):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if _rope_fits(q, k, cos, sin, args, kwargs, partial):
            from llmkern.ops.rope import rope

            return rope(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.__wrapped__ = original
    apply_rotary_pos_emb._llmkern_fused = True
    return apply_rotary_pos_emb


def _rope_fits(q, k, cos, sin, args, kwargs, partial):
    """The calls the probe vouches for: q [B, Hq, T, D], k [B, Hk, T, D], cos / sin [B or 1, T, D] (or
    [B or 1, T, R], R < D even, when the partial probe agreed), all of one float dtype and device,
    unsqueeze_dim=1."""
    if args not in ((), (1,)) or kwargs not in ({}, {"unsqueeze_dim": 1}):
        return False
    if not all(isinstance(t, torch.Tensor) for t in (q, k, cos, sin)):
        return False
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or q.dtype not in _FLOATS:
        return False
    B, _, T, D = q.shape
    return (k.shape[0] == B and k.shape[2:] == (T, D) and cos.shape == sin.shape and cos.shape[0] in (1, B)
            and cos.shape[1] == T and (cos.shape[2] == D or partial and 0 < cos.shape[2] < D)
            and D % 2 == 0 and cos.shape[2] % 2 == 0 and k.dtype == cos.dtype == sin.dtype == q.dtype
            and k.device == cos.device == sin.device == q.device)


def _cells(fn, old, new):
    """fn's closure with the cell holding `old` replaced by one holding `new` (None if there is none)."""
    cells, found = [], False
    for c in fn.__closure__ or ():
        try:
            hit = c.cell_contents is old
        except ValueError:  # an empty cell
            hit = False
        cells.append(types.CellType(new) if hit else c)
        found |= hit
    return tuple(cells) if found else None


def _copy_function(fn, globals_, closure):
    new = types.FunctionType(fn.__code__, globals_, fn.__name__, fn.__defaults__, closure)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__qualname__ = fn.__qualname__
    new.__doc__ = fn.__doc__
    return new


def _rebuild(fn):
    """A copy of fn (and of the decorator wrappers around it) whose innermost function sees a fused
    apply_rotary_pos_emb; None when fn does not call a verified one."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is not None and getattr(fn, "__closure__", None):
        new_inner = _rebuild(inner)
        if new_inner is None:
            return None
        closure = _cells(fn, inner, new_inner)
        if closure is None:  # a wrapper that does not call what it says it wraps: leave it
            return None
        new = _copy_function(fn, fn.__globals__, closure)
        new.__wrapped__ = new_inner
        return new
    code = getattr(fn, "__code__", None)
    if code is None or _ROPE_NAME not in code.co_names:
        return None
    original = fn.__globals__.get(_ROPE_NAME)
    if not callable(original) or getattr(original, "_llmkern_fused", False) or not _rope_agrees(original)[0]:
        return None
    scope = dict(fn.__globals__)
    scope[_ROPE_NAME] = _fused_rope(original, _rope_agrees(original)[1])
    return _copy_function(fn, scope, fn.__closure__)


def _innermost(fn):
    while getattr(fn, "__wrapped__", None) is not None and getattr(fn, "__closure__", None):
        fn = fn.__wrapped__
    return fn


def _globals_read(fn):
    """The module globals fn's innermost function names (apply_rotary_pos_emb, eager_attention_forward, ...), as
    they are now: a copy made from other values is stale."""
    fn = _innermost(fn)
    code = getattr(fn, "__code__", None)
    return () if code is None else tuple(fn.__globals__.get(name) for name in code.co_names)


def _rope_forward_for(cls):
    """The class forward's copy, rebuilt (and its RoPE probed again) when a global it reads was reassigned since
    (a new apply_rotary_pos_emb: the old copy ran llmkern.rope in place of a function never checked)."""
    fwd = cls.forward
    seen = _globals_read(fwd)
    rope = _innermost(fwd).__globals__.get(_ROPE_NAME) if hasattr(_innermost(fwd), "__globals__") else None
    seen += _globals_read(rope) if callable(rope) else ()  # (and what the RoPE function reads: rotate_half)
    cached = _rope_forwards.get(fwd)
    if cached is None or len(cached[0]) != len(seen) or any(a is not b for a, b in zip(cached[0], seen)):
        cached = _rope_forwards[fwd] = (seen, _rebuild(fwd))
    return cached[1]


def _calls_rope(cls):
    code = _code(cls.forward)
    return code is not None and _ROPE_NAME in code[2]


# ---- the patching -------------------------------------------------------------------------------

class _BoundForward:
    """`module.forward` of a patched module: calls fn(module, ...), like the bound method
    types.MethodType(fn, module) (same __func__ / __self__, other attributes read from fn), but pickles.
    A bound method pickles as getattr(module, fn.__name__), which on the loaded module names nothing
    (AttributeError) or the class forward (the patch silently lost, its markers left claiming it). This
    pickles as _BoundForward(fn, module), fn by reference (a module-level function) and module through the
    pickler's memo, so torch.save(model) / torch.load gives a model patched the same way; copy.deepcopy copies
    it the same way, binding the copy to the copied module. Also used by the PEFT and fused-loss patches."""

    def __init__(self, fn, module):
        self.__func__ = fn
        self.__self__ = module

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __getattr__(self, name):  # as a bound method: the function's attributes (__name__, __wrapped__, ...)
        try:
            fn = self.__dict__["__func__"]
        except KeyError:
            raise AttributeError(name) from None
        return getattr(fn, name)

    @property
    def __signature__(self):
        import inspect

        return inspect.signature(types.MethodType(self.__func__, self.__self__))

    def __reduce__(self):
        return type(self), (self.__func__, self.__self__)

    def __repr__(self):
        name = getattr(self.__func__, "__qualname__", self.__func__)
        return f"<llmkern patched forward {name} of {type(self.__self__).__name__}>"


class _RopeForward(_BoundForward):
    """The RoPE patch: its function is a runtime copy of the class forward (_rope_forward_for), which pickle
    cannot name, so it pickles (and deep-copies) as "the RoPE patch of this module", rebuilt from the
    module's class when loaded."""

    def __reduce__(self):
        return _rope_bound, (self.__self__,)


def _rope_bound(module):
    """The _RopeForward of `module` (a loaded or copied patched attention module)."""
    cls = type(module)
    fwd = _rope_forward_for(cls)
    if fwd is None:  # (the modeling code changed since the model was saved: it is no longer llmkern.rope's)
        warn_once(("use_fused_ops-rope-load", cls.__module__, cls.__qualname__),
                  f"use_fused_ops: a loaded {cls.__name__} was patched for RoPE, but its class's "
                  f"apply_rotary_pos_emb is not llmkern.rope's computation any more; it runs its class forward")
        fwd = cls.forward
    return _RopeForward(fwd, module)


def _bind(module, kind, fn, **attrs):
    for name, value in attrs.items():
        object.__setattr__(module, name, value)
    module.forward = (_RopeForward if kind == "rope" else _BoundForward)(fn, module)
    object.__setattr__(module, _MARK, kind)


def _plan(module, enabled):
    """(kind, forward, attributes) of the patch for one module if it is of a kind in `enabled`, else None."""
    cls = type(module)
    if "forward" in module.__dict__:  # another instance-level patch (ours is marked): do not stack on it
        return None
    if cls is nn.LayerNorm:
        if "layer_norm" in enabled and len(module.normalized_shape) == 1:
            return "layer_norm", _ln_forward, {}
        return None
    if "rmsnorm" in cls.__name__.lower():
        if "rms_norm" not in enabled:
            return None
        conv = _rms_convention(cls)
        if conv is None or not isinstance(getattr(module, "weight", None), torch.Tensor):
            warn_once(("use_fused_ops", cls.__module__, cls.__qualname__),
                      f"use_fused_ops: {cls.__name__} is not a known RMSNorm convention (neither LlamaRMSNorm's "
                      f"nor GemmaRMSNorm's forward); left unpatched")
            return None
        return "rms_norm", _rms_forward, dict(_llmkern_offset=conv[0], _llmkern_eps_attr=conv[1])
    if "mlp" in enabled and _code(cls.forward) == _references()["mlp"]:
        if _glu(getattr(module, "act_fn", None)) is None:
            return None
        return "mlp", _mlp_forward, {}
    if "mlp" in enabled and _references()["gate_up_mlp"] is not None \
            and _code(cls.forward) == _references()["gate_up_mlp"]:
        if _glu(getattr(module, "activation_fn", None)) is None:
            return None
        return "mlp", _gate_up_mlp_forward, {}
    if "rope" in enabled and _calls_rope(cls):
        fwd = _rope_forward_for(cls)
        if fwd is None:
            warn_once(("use_fused_ops-rope", cls.__module__, cls.__qualname__),
                      f"use_fused_ops: {cls.__name__} calls an apply_rotary_pos_emb that is not llmkern.rope's "
                      f"computation (or behind a decorator that cannot be rebuilt); left unpatched")
            return None
        return "rope", fwd, {}
    return None


def _ours(module):
    """The kind of the use_fused_ops patch `module` runs (its instance forward is ours), else None."""
    fwd = module.__dict__.get("forward")
    return module.__dict__.get(_MARK) if isinstance(fwd, _BoundForward) else None


def _unpatch(root, kinds):
    """Remove the patches of `kinds` from root's modules: each runs its class forward again, with none of the
    attributes the patch added. A module whose patched forward was wrapped since by another instance-level
    patch (accelerate's hooks keep ours inside theirs) keeps both, with a warning: removing ours would break
    the outer one."""
    for module in root.modules():
        kind = module.__dict__.get(_MARK)
        if kind not in kinds:
            continue
        if "forward" in module.__dict__ and _ours(module) is None:
            cls = type(module)
            warn_once(("use_fused_ops-unpatch", cls.__module__, cls.__qualname__),
                      f"use_fused_ops(enable=False): a {cls.__name__}'s patched forward was wrapped by another "
                      f"instance-level forward since; left patched")
            continue
        for name in ("forward", _MARK, "_llmkern_offset", "_llmkern_eps_attr"):
            module.__dict__.pop(name, None)


def _count(root):
    counts = dict.fromkeys(_KINDS, 0)
    for module in root.modules():
        kind = module.__dict__.get(_MARK) if "forward" in module.__dict__ else None
        if kind is not None:
            counts[kind] += 1
    return counts


def use_fused_ops(model, *, rms_norm=True, rope=True, mlp=True, layer_norm=True, enable=True):
    """Patch `model` (a transformers model, or a PeftModel around one) in place so that its RMSNorm,
    LayerNorm, gated MLP and RoPE computations run on llmkern's fused ops (see the module docstring for
    what is recognised and when a call falls back to the original code). Returns `model`.

    Per module instance, nothing global; idempotent (patched modules are skipped; calling it again with more
    kinds enabled patches those too); copy.deepcopy of a patched model gives a patched copy using its own
    parameters, and so does pickling (torch.save(model) / torch.load(..., weights_only=False)).
    `model._llmkern_fused_ops` then holds the number of modules running each fused op, e.g.
    {"rms_norm": 5, "layer_norm": 0, "mlp": 2, "rope": 2}.

    enable=False undoes it for the selected kinds (all by default): those modules run their class forward
    again, exactly the unpatched model's computation."""
    flags = dict(rms_norm=rms_norm, layer_norm=layer_norm, mlp=mlp, rope=rope, enable=enable)
    for name, value in flags.items():  # (a string such as "off" is truthy: it switched the kind on)
        if not isinstance(value, bool):
            raise TypeError(f"use_fused_ops: {name} must be a bool, got {value!r}")
    root = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the wrapped model
    if not isinstance(root, nn.Module):
        raise TypeError(f"use_fused_ops: model must be a torch.nn.Module (a transformers model or a PeftModel), "
                        f"got {type(model).__name__}")
    enabled = {k for k, on in zip(_KINDS, (rms_norm, layer_norm, mlp, rope)) if on}
    if not enable:
        _unpatch(root, enabled)
        object.__setattr__(root, _COUNTS, _count(root))
        return model
    counts = dict.fromkeys(_KINDS, 0)
    plans = []
    for module in root.modules():
        kind = getattr(module, _MARK, None) if "forward" in module.__dict__ else None
        plan = None if kind is not None else _plan(module, enabled)
        if plan is not None:
            kind = plan[0]
            plans.append((module, plan))
        if kind is not None:
            counts[kind] += 1
    # every module looked at before any is patched: what raises on the way (a fallback warning under
    # warnings.simplefilter("error"), transformers' modeling code failing to import) leaves the model as it was
    for module, (kind, fn, attrs) in plans:
        _bind(module, kind, fn, **attrs)
    object.__setattr__(root, _COUNTS, counts)
    logger.info("use_fused_ops: %s", ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return model


__all__ = ["use_fused_ops"]
