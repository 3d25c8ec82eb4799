"""Plain-PyTorch references of every op: the test oracle and the fallback when no kernel exists.

Each op's reference lives in its own module here (reference/<op>.py) and is re-exported below.
"""
from llmkern.reference.sampling import (  # noqa: F401
    apply_penalties,
    filter_logits,
    philox_uniform,
    sample,
    sort_based_sample,
)
# (ops added by later issues append their re-exports below this line)
from llmkern.reference.lora import (  # noqa: E402,F401
    add_lora_multi, dropout_keep_mask, lora_delta, lora_dropout, lora_linear, lora_linear_multi)
from llmkern.reference.attention import attention_varlen, attention_with_kvcache  # noqa: E402,F401  (dense: reference.attention.attention)
# cross entropy: llmkern.reference.cross_entropy.cross_entropy (not re-exported: the name is its module's)
from llmkern.reference.norm import layer_norm, rms_norm  # noqa: E402,F401
# rope, swiglu, geglu: llmkern.reference.rope.rope, llmkern.reference.swiglu.swiglu / .geglu (not re-exported)
# NF4 (QLoRA 4-bit weights): llmkern.reference.nf4.nf4_quantize / nf4_dequantize (not re-exported)
# Mixture-of-Experts MLP: llmkern.reference.moe.moe_mlp / moe_route (not re-exported)
