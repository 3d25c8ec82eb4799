"""Hugging Face transformers integration: the "llmkern" attention implementation (register), the
sampling logits warper (LlmkernSamplingWarper) and the fused LM-head loss (use_fused_loss)."""
from llmkern.integrations.transformers.sampling import LlmkernSamplingWarper  # noqa: F401
from llmkern.integrations.transformers.attention import register  # noqa: F401,E402
from llmkern.integrations.transformers.loss import use_fused_loss  # noqa: F401,E402
