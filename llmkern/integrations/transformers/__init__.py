"""Hugging Face transformers integration: the "llmkern" attention implementation (register) and
the sampling logits warper (LlmkernSamplingWarper)."""
from llmkern.integrations.transformers.sampling import LlmkernSamplingWarper  # noqa: F401
from llmkern.integrations.transformers.attention import register  # noqa: F401,E402
