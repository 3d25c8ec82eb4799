"""Hugging Face transformers integration: the "llmkern" attention implementation (register), the
sampling logits warper (LlmkernSamplingWarper), the fused LM-head loss (use_fused_loss) and the fused
norms / RoPE / gated MLPs of a loaded model (use_fused_ops)."""
from llmkern.integrations.transformers.sampling import LlmkernSamplingWarper  # noqa: F401
from llmkern.integrations.transformers.attention import register  # noqa: F401,E402
from llmkern.integrations.transformers.loss import use_fused_loss  # noqa: F401,E402
from llmkern.integrations.transformers.fused_ops import use_fused_ops  # noqa: F401,E402
