"""A Hugging Face causal LM's training loss without its [batch, seq, vocab] logits.

    import llmkern.integrations.transformers as lt
    lt.use_fused_loss(model)   # LlamaForCausalLM, GPT2LMHeadModel, Mistral, Qwen2, ... (a PeftModel too)
    loss = model(input_ids, labels=labels).loss   # in train(): logits=None, same loss and gradients

In training mode, a call with `labels` runs the decoder as usual, but the LM head and the loss are one
llmkern.linear_cross_entropy over the final hidden states (chunked rows: the logits never exist whole),
with transformers' semantics: labels shifted inside (or `shift_labels` given), -100 ignored, mean over the
labelled tokens, or sum / `num_items_in_batch` when the Trainer passes it (gradient accumulation), and
Gemma-2's final_logit_softcapping, and an MoE model's router loss (`coef * aux_loss`, with
output_router_logits). The output's `logits` is None then (the LM head still runs on the last
position only, through `logits_to_keep=1`). In eval mode, or without labels, the model is unchanged.
"""
import inspect

import torch
from torch import nn

from llmkern.integrations.transformers.fused_ops import _BoundForward

_ATTR = "_llmkern_fused_loss"


# What the fused call reads of the model's own forward: the base model's output and the LM head's input and output,
# recorded by hooks installed once (registering hooks per call broke torch.compile's fullgraph: dynamo cannot trace
# the registration) that record only while the fused call is running. Their state lives on each module (a deepcopy
# of the model gets its own).
_CAPTURE = "_llmkern_capture"


def _record_hidden(module, args, output):
    cap = getattr(module, _CAPTURE, None)
    if cap is not None and cap["on"]:
        cap["hidden"] = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state


def _record_head_input(module, args):
    cap = getattr(module, _CAPTURE, None)
    if cap is not None and cap["on"]:
        cap["input"] = args[0]


def _record_head_output(module, args, output):
    cap = getattr(module, _CAPTURE, None)
    if cap is not None and cap["on"]:
        cap["output"] = output


_OURS = (_record_hidden, _record_head_input, _record_head_output)


def _capture(module, head):
    """The module's capture state, its hooks installed first if missing (the model's base model once; an LM head
    that replaced the patched one at its first training call)."""
    if _CAPTURE not in module.__dict__:
        module.__dict__[_CAPTURE] = {"on": False}
        if head:
            module.register_forward_pre_hook(_record_head_input)
            module.register_forward_hook(_record_head_output)
        else:
            module.register_forward_hook(_record_hidden)
    return module.__dict__[_CAPTURE]


def _foreign_hooks(head):
    """Whether the LM head has forward hooks other than the capture's."""
    hooks = list(head._forward_hooks.values()) + list(head._forward_pre_hooks.values())
    return any(h not in _OURS for h in hooks)


def _check_model(model):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        raise ValueError(f"use_fused_loss: the model's LM head must be a plain nn.Linear, got {type(head).__name__} "
                         f"(a LoRA or quantized lm_head is not supported)")
    cfg = model.config
    for key in ("logit_scale", "logits_scaling"):
        if getattr(cfg, key, None) not in (None, 1, 1.0):
            raise ValueError(f"use_fused_loss: config.{key}={getattr(cfg, key)!r} scales the logits; not supported")
    if getattr(cfg, "z_loss_coefficient", None) not in (None, 0, 0.0):
        # Bamba's z-loss is coef * mean(logsumexp(logits)^2) over every position of the batch, labelled or not (the
        # padding and the last position too); llmkern's z_loss (PaLM's, Liger-Kernel's) counts the labelled tokens
        # only, and the fused loss never forms the other positions' logits: passing it on would change the loss
        raise ValueError(f"use_fused_loss: config.z_loss_coefficient={cfg.z_loss_coefficient!r} adds "
                         f"{type(model).__name__}'s z-loss, a mean of logsumexp(logits)^2 over every position, "
                         f"labelled or not; llmkern.linear_cross_entropy(z_loss=...) averages it over the labelled "
                         f"tokens only (PaLM, Liger-Kernel), so it is not passed on: not supported (train without "
                         f"use_fused_loss, or set z_loss_coefficient=0 and call llmkern.linear_cross_entropy "
                         f"yourself)")
    # The fused loss is transformers' causal-LM cross-entropy (ForCausalLMLoss: labels shifted inside): a model
    # computing its loss with code of its own (XLM, CPM-Ant, BartForCausalLM: labels not shifted) or whose
    # loss_function is another (set by the user, another loss_type) would silently get a different loss.
    from transformers.loss.loss_utils import ForCausalLMLoss

    if not _calls_loss_function(type(model)):
        raise ValueError(f"use_fused_loss: {type(model).__name__}.forward computes its loss with code of its own, "
                         f"not transformers' loss_function (ForCausalLMLoss); not supported")
    if getattr(model, "loss_function", ForCausalLMLoss) is not ForCausalLMLoss:
        raise ValueError(f"use_fused_loss: {type(model).__name__}.loss_function is not transformers' "
                         f"ForCausalLMLoss (a custom loss); not supported")
    if not _takes_logits_to_keep(getattr(model, "_llmkern_original_forward", model.forward)):
        raise ValueError(f"use_fused_loss: {type(model).__name__}.forward has no logits_to_keep argument")
    return head


# _check_model runs on every training call (the head may have been replaced since the patch): what depends
# only on the class's code is looked up once per class / function
_CODE_CHECKS = {}


def _calls_loss_function(cls):
    if cls not in _CODE_CHECKS:
        fn = cls.forward
        while hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
        _CODE_CHECKS[cls] = "loss_function" in getattr(getattr(fn, "__code__", None), "co_names", ())
    return _CODE_CHECKS[cls]


def _takes_logits_to_keep(forward):
    key = getattr(forward, "__func__", None)  # (a wrapper of the instance's forward - accelerate's hooks,
    if key is None:                           # torch.compile, a partial - holds the model: not cached, or the
        return "logits_to_keep" in inspect.signature(forward).parameters  # cache would keep every model alive)
    if key not in _CODE_CHECKS:
        _CODE_CHECKS[key] = "logits_to_keep" in inspect.signature(forward).parameters
    return _CODE_CHECKS[key]


_AUX_COEFS = ("router_aux_loss_coef", "aux_loss_coef")  # what MoE *ForCausalLM multiply their aux_loss by


def _aux_loss_term(model, out):
    """coef * out.aux_loss, which an MoE model with output_router_logits adds to its loss when it gets labels
    (the fused call runs it without labels, so the term is added here), or None without an aux_loss."""
    aux = out.get("aux_loss") if hasattr(out, "get") else None
    if aux is None:
        return None
    coefs = [getattr(model, name) for name in _AUX_COEFS if isinstance(getattr(model, name, None), (int, float))]
    if len(coefs) != 1:
        raise ValueError(f"use_fused_loss: {type(model).__name__} returns a router aux_loss (output_router_logits) "
                         f"but has no single coefficient for it among {_AUX_COEFS}; not supported")
    return coefs[0] * aux


def _root(t):
    return t if t._base is None else t._base


_SIGNATURES = {}


def _signature(bound):
    """inspect.signature of a bound forward, looked up once per underlying function (not per call); a forward that
    is no bound method (a wrapper holding its model) is not cached (the cache would keep every model alive)."""
    fn = getattr(bound, "__func__", None)
    if fn is None:
        return inspect.signature(bound)
    sig = _SIGNATURES.get(fn)
    if sig is None:
        sig = _SIGNATURES[fn] = inspect.signature(bound)
    return sig


def _fused_forward(self, *args, labels=None, **kwargs):
    """The patched forward, bound to the *ForCausalLM by a _FusedLossForward (copy.deepcopy of a patched model
    binds the copy, not the original; pickling keeps the patch). Everything is looked up on `self` at call
    time."""
    from llmkern.ops.cross_entropy import linear_cross_entropy

    original = self._llmkern_original_forward
    if args:  # model(input_ids, ...) -> keywords
        sig = _signature(original)
        bound = sig.bind_partial(*args, **kwargs).arguments
        kwargs = {}
        for name, value in bound.items():
            if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                kwargs.update(value)
            else:
                kwargs[name] = value
        labels = kwargs.pop("labels", labels)
    if labels is None or not self.training:
        return original(labels=labels, **kwargs)
    head = _check_model(self)  # again: a LoRA wrapper or a new lm_head may have replaced the patched one
    shift = kwargs.pop("shift_labels", None)
    n_items = kwargs.pop("num_items_in_batch", None)
    ignore = kwargs.pop("ignore_index", -100)
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    keep = kwargs.pop("logits_to_keep", 0)  # the caller's: the loss covers the kept positions, as transformers'
    kwargs["logits_to_keep"] = 1
    if _foreign_hooks(head):
        raise ValueError(f"use_fused_loss: {type(self).__name__}'s LM head has forward hooks; the fused loss never "
                         f"forms the logits they would see or change: remove them, or train without the patch")
    base_cap, head_cap = _capture(self.base_model, head=False), _capture(head, head=True)
    base_cap["on"] = head_cap["on"] = True
    try:
        out = original(labels=None, return_dict=True, **kwargs)
    finally:
        base_cap["on"] = head_cap["on"] = False
    hidden, head_in, head_out = base_cap.pop("hidden", None), head_cap.pop("input", None), head_cap.pop("output", None)
    softcap = getattr(self.config, "final_logit_softcapping", None)
    # The loss below is head(h) (and the softcap) for h the base model's output: the model must feed its
    # LM head a slice of that output (no transform in between: RoBERTa's dense + LayerNorm head) and return
    # the head's output as its logits (no multiplier / cap / slicing after it: Falcon-H1, RecurrentGemma).
    if (hidden is None or head_in is None or _root(head_in) is not _root(hidden)
            or (softcap is None and out.logits is not head_out)):
        raise ValueError(f"use_fused_loss: {type(self).__name__} does not compute its logits as "
                         f"lm_head(base model output) (a transform before or after the LM head); not supported")
    if shift is None:
        shift = nn.functional.pad(labels, (0, 1), value=ignore)[..., 1:]
    h = hidden
    if isinstance(keep, torch.Tensor) or keep:  # transformers: lm_head(hidden[:, slice(-k, None)]) or [:, indices]
        h = h[:, keep if isinstance(keep, torch.Tensor) else slice(-keep, None)]
    reduction = "sum" if n_items is not None else "mean"
    chunk_size = getattr(self, "_llmkern_fused_loss_chunk_size", None)
    loss = linear_cross_entropy(h, head.weight, shift.to(h.device), bias=head.bias, ignore_index=ignore,
                                reduction=reduction, softcap=softcap, chunk_size=chunk_size)
    if n_items is not None:
        loss = loss / (n_items.to(loss.device) if torch.is_tensor(n_items) else n_items)
    aux = _aux_loss_term(self, out)
    if aux is not None:
        loss = loss + aux.to(loss.device)
    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    if not return_dict:  # (the model's own tuple with None in the logits' slot: to_tuple() drops None, shifting the
        return (loss, None) + tuple(fields.values())  # fields after it, so `loss, logits = out[:2]` got the cache)
    return type(out)(loss=loss, logits=None, **fields)


class _FusedLossForward(_BoundForward):
    """`model.forward` of a patched model: _fused_forward bound to it (pickles and deep-copies as such, see
    _BoundForward), under the signature of the forward it replaces. generate() reads the forward's
    signature to decide what to pass (position_ids built from the attention mask, attention_mask,
    logits_to_keep): with a bare (*args, **kwargs) it silently dropped position_ids, so a left-padded batch
    decoded with positions counted from the padding (other logits for absolute-position models, GPT-2)."""

    def __init__(self, module):
        super().__init__(_fused_forward, module)

    @property
    def __signature__(self):
        return _signature(self.__self__._llmkern_original_forward)

    def __reduce__(self):
        return type(self), (self.__self__,)


def use_fused_loss(model, chunk_size=None):
    """Patch `model` (a transformers *ForCausalLM, or a PeftModel around one) in place so that training
    calls with labels compute the loss with llmkern.linear_cross_entropy. Returns `model`.
    A model whose logits are not lm_head(base model output) (a transform before or after the head) raises
    ValueError at its first training call with labels, as does an LM head with forward hooks (they would see
    logits the fused loss never forms). logits_to_keep=k scores the last k positions (labels [B, k]), as
    transformers does. chunk_size: rows per chunk of the fused loss (None: automatic), checked here (it was first
    read at the first training call, the model long patched by then).

    Calling it again on a patched model keeps the patch (the forward is not wrapped twice) and applies this call's
    chunk_size: the latest call's value holds, None making it automatic again. (A second call used to return the
    model unchanged, silently keeping the first call's chunk_size.)"""
    from llmkern.ops.cross_entropy import check_chunk_size

    check_chunk_size(chunk_size, "use_fused_loss: ")
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the wrapped *ForCausalLM
    if getattr(lm, _ATTR, False):
        lm._llmkern_fused_loss_chunk_size = chunk_size
        return model
    head = _check_model(lm)
    _capture(lm.base_model, head=False)
    _capture(head, head=True)
    lm._llmkern_original_forward = lm.forward
    lm._llmkern_fused_loss_chunk_size = chunk_size
    lm.forward = _FusedLossForward(lm)
    setattr(lm, _ATTR, True)
    return model


__all__ = ["use_fused_loss"]
