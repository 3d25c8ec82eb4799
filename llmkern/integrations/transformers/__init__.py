"""Hugging Face transformers integration: the "llmkern" attention and experts implementations (register),
the sampling logits warper (LlmkernSamplingWarper), the fused LM-head loss (use_fused_loss) and the fused
norms / RoPE / gated MLPs of a loaded model (use_fused_ops)."""
from llmkern.integrations.transformers.sampling import LlmkernSamplingWarper  # noqa: F401
from llmkern.integrations.transformers import attention as _attention  # noqa: E402
from llmkern.integrations.transformers.moe import llmkern_experts_forward, register_experts  # noqa: F401,E402
from llmkern.integrations.transformers.loss import use_fused_loss  # noqa: F401,E402
from llmkern.integrations.transformers.fused_ops import use_fused_ops  # noqa: F401,E402


def register(name: str = _attention.NAME):
    """Register `name` ("llmkern") as an attention implementation (AttentionInterface and its mask
    function) and, where transformers has an ExpertsInterface, as an experts implementation for MoE
    models: afterwards `attn_implementation="llmkern"` and `experts_implementation="llmkern"` work in
    from_pretrained / set_attn_implementation / set_experts_implementation. Idempotent."""
    _attention.register(name)
    register_experts(name)
    return name
