"""A Hugging Face causal LM's training loss without its [batch, seq, vocab] logits.

    import llmkern.integrations.transformers as lt
    lt.use_fused_loss(model)   # LlamaForCausalLM, GPT2LMHeadModel, Mistral, Qwen2, ... (a PeftModel too)
    loss = model(input_ids, labels=labels).loss   # in train(): logits=None, same loss and gradients

In training mode, a call with `labels` runs the decoder as usual, but the LM head and the loss are one
llmkern.linear_cross_entropy over the final hidden states (chunked rows: the logits never exist whole),
with transformers' semantics: labels shifted inside (or `shift_labels` given), -100 ignored, mean over the
labelled tokens, or sum / `num_items_in_batch` when the Trainer passes it (gradient accumulation), and
Gemma-2's final_logit_softcapping. The output's `logits` is None then (the LM head still runs on the last
position only, through `logits_to_keep=1`). In eval mode, or without labels, the model is unchanged.
"""
import inspect
import types

import torch
from torch import nn

_ATTR = "_llmkern_fused_loss"


def _hidden_hook(store):
    def hook(module, args, output):
        store.append(output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state)
    return hook


def _check_model(model):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        raise ValueError(f"use_fused_loss: the model's LM head must be a plain nn.Linear, got {type(head).__name__} "
                         f"(a LoRA or quantized lm_head is not supported)")
    cfg = model.config
    for key in ("logit_scale", "logits_scaling"):
        if getattr(cfg, key, None) not in (None, 1, 1.0):
            raise ValueError(f"use_fused_loss: config.{key}={getattr(cfg, key)!r} scales the logits; not supported")
    forward = getattr(model, "_llmkern_original_forward", model.forward)
    if "logits_to_keep" not in inspect.signature(forward).parameters:
        raise ValueError(f"use_fused_loss: {type(model).__name__}.forward has no logits_to_keep argument")
    return head


def _root(t):
    return t if t._base is None else t._base


def _fused_forward(self, *args, labels=None, **kwargs):
    """The patched forward, bound to the *ForCausalLM (types.MethodType, so that copy.deepcopy of a
    patched model binds the copy, not the original). Everything is looked up on `self` at call time."""
    from llmkern.ops.cross_entropy import linear_cross_entropy

    original = self._llmkern_original_forward
    if args:  # model(input_ids, ...) -> keywords
        sig = inspect.signature(original)
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
    kwargs["logits_to_keep"] = 1
    hidden, head_io = [], {}

    def head_pre(module, args):
        head_io["input"] = args[0]

    def head_post(module, args, output):
        head_io["output"] = output

    handles = [self.base_model.register_forward_hook(_hidden_hook(hidden)),
               head.register_forward_pre_hook(head_pre), head.register_forward_hook(head_post)]
    try:
        out = original(labels=None, return_dict=True, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    softcap = getattr(self.config, "final_logit_softcapping", None)
    # The loss below is head(h) (and the softcap) for h the base model's output: the model must feed its
    # LM head a slice of that output (no transform in between: RoBERTa's dense + LayerNorm head) and return
    # the head's output as its logits (no multiplier / cap / slicing after it: Falcon-H1, RecurrentGemma).
    if (not hidden or "input" not in head_io or _root(head_io["input"]) is not _root(hidden[-1])
            or (softcap is None and out.logits is not head_io.get("output"))):
        raise ValueError(f"use_fused_loss: {type(self).__name__} does not compute its logits as "
                         f"lm_head(base model output) (a transform before or after the LM head); not supported")
    if shift is None:
        shift = nn.functional.pad(labels, (0, 1), value=ignore)[..., 1:]
    h = hidden[-1]
    reduction = "sum" if n_items is not None else "mean"
    chunk_size = getattr(self, "_llmkern_fused_loss_chunk_size", None)
    loss = linear_cross_entropy(h, head.weight, shift.to(h.device), bias=head.bias, ignore_index=ignore,
                                reduction=reduction, softcap=softcap, chunk_size=chunk_size)
    if n_items is not None:
        loss = loss / (n_items.to(loss.device) if torch.is_tensor(n_items) else n_items)
    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    result = type(out)(loss=loss, logits=None, **fields)
    return result if return_dict else result.to_tuple()


def use_fused_loss(model, chunk_size=None):
    """Patch `model` (a transformers *ForCausalLM, or a PeftModel around one) in place so that training
    calls with labels compute the loss with llmkern.linear_cross_entropy. Returns `model`.
    A model whose logits are not lm_head(base model output) (a transform before or after the head) raises
    ValueError at its first training call with labels."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: the wrapped *ForCausalLM
    if getattr(lm, _ATTR, False):
        return model
    _check_model(lm)
    lm._llmkern_original_forward = lm.forward
    lm._llmkern_fused_loss_chunk_size = chunk_size
    lm.forward = types.MethodType(_fused_forward, lm)
    setattr(lm, _ATTR, True)
    return model


__all__ = ["use_fused_loss"]
