"""Hugging Face transformers integration: the "llmkern" attention implementation (register) and
the sampling logits warper (LlmkernSamplingWarper)."""
from llmkern.integrations.transformers.sampling import LlmkernSamplingWarper  # noqa: F401
