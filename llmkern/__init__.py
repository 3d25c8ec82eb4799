"""llmkern: fused kernels for large language models.

Ops (each a torch.library op with autograd where it makes sense):
  sample, top_k_top_p_filter           sorting-free sampling (C++ CPU / CUDA C++)
  top_logprobs                         serving-style top-n / token logprobs and ranks (C++ CPU)
  attention, attention_varlen,         fused attention (Triton)
  attention_with_kvcache, quantize_kv  (float8 KV caches: k_scale / v_scale)
  mla_decode                           decode over a multi-head latent (DeepSeek MLA) KV cache (Triton)
  merge_attention_states               (out, lse) of two key sets -> their union's (cascade decoding) (Triton)
  lora_linear, lora_linear_multi       fused LoRA matmul (Triton); the base weight dense or 4-bit NF4
  nf4_quantize, nf4_dequantize,        QLoRA's 4-bit NormalFloat weights (bitsandbytes layout), and the
  nf4_linear, NF4Weight                frozen 4-bit linear layer that keeps only the codes for its backward
  cross_entropy                        fused cross-entropy loss over logits (Triton)
  linear_cross_entropy                 LM head + loss without materialising the logits
  rms_norm, layer_norm                 fused RMSNorm / LayerNorm (+ residual add) (Triton)
  rope                                 fused rotary embeddings on q and k together (Triton)
  swiglu, geglu                        fused gated activations silu(g) * u, gelu(g) * u (Triton)
  moe_mlp, moe_route, moe_capacity     fused Mixture-of-Experts MLP (grouped GEMMs, Triton), its router, and
                                       token dropping by expert capacity
  speculative_accept                   speculative decoding's exact rejection sampling (PyTorch)
Subpackages: peft, parallel, models, generation, flops, integrations, bench, reference.
"""
import importlib as _importlib

__version__ = "0.1.0"

from llmkern.ops.sampling import TopLogprobs, sample, top_k_top_p_filter, top_logprobs  # noqa: E402,F401

# Public names that live in modules imported on first use (keeps `import llmkern` light).
_LAZY_ATTRS = {
    "attention": "llmkern.ops.attention",
    "attention_varlen": "llmkern.ops.attention",
    "attention_with_kvcache": "llmkern.ops.attention",
    "quantize_kv": "llmkern.ops.attention",
    "mla_decode": "llmkern.ops.mla_decode",
    "merge_attention_states": "llmkern.ops.merge_attention_states",
    "lora_linear": "llmkern.ops.lora",
    "lora_linear_multi": "llmkern.ops.lora",
    "cross_entropy": "llmkern.ops.cross_entropy",
    "linear_cross_entropy": "llmkern.ops.cross_entropy",
    "rms_norm": "llmkern.ops.norm",
    "layer_norm": "llmkern.ops.norm",
    "rope": "llmkern.ops.rope",
    "swiglu": "llmkern.ops.swiglu",
    "geglu": "llmkern.ops.swiglu",
    "moe_mlp": "llmkern.ops.moe",
    "moe_route": "llmkern.ops.moe",
    "moe_capacity": "llmkern.ops.moe",
    "speculative_accept": "llmkern.ops.speculative",
    "NF4Weight": "llmkern.ops.nf4",
    "nf4_quantize": "llmkern.ops.nf4",
    "nf4_dequantize": "llmkern.ops.nf4",
    "nf4_linear": "llmkern.ops.nf4",
    "generate": "llmkern.generation",
}
_SUBMODULES = {"bench", "flops", "generation", "integrations", "kernels", "memory", "models", "ops", "parallel",
               "peft", "reference", "testing", "info"}

# `from llmkern import *`: the ops (the lazy ones import their modules then), not the subpackages
__all__ = ["TopLogprobs", "sample", "top_k_top_p_filter", "top_logprobs", *_LAZY_ATTRS]


def __getattr__(name):
    if name in _LAZY_ATTRS:
        value = getattr(_importlib.import_module(_LAZY_ATTRS[name]), name)
        globals()[name] = value  # later lookups skip this hook (it costs an import_module per call)
        return value
    if name in _SUBMODULES:
        return _importlib.import_module(f"llmkern.{name}")
    raise AttributeError(f"module 'llmkern' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_ATTRS) | _SUBMODULES)
