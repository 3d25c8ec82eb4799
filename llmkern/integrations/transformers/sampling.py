"""Hugging Face `generate()` glue for the sampling op: a logits warper running top-k, top-p and
min-p in one sorting-free pass (llmkern.top_k_top_p_filter)."""
import numbers

import torch

from llmkern.ops.sampling import _sample_params, top_k_top_p_filter
from llmkern.reference.sampling import filter_logits

try:  # subclass HF's LogitsProcessor when transformers is installed, so LogitsProcessorList takes it
    from transformers.generation.logits_process import LogitsProcessor as _Base
except ImportError:  # pragma: no cover - transformers is optional
    _Base = object


class LlmkernSamplingWarper(_Base):
    """Drop-in for HF's TopKLogitsWarper + TopPLogitsWarper + MinPLogitsWarper.

    Use: `model.generate(..., do_sample=True, top_k=0, top_p=1.0,
    logits_processor=LogitsProcessorList([LlmkernSamplingWarper(top_k=50, top_p=0.9)]))`.
    """

    def __init__(self, top_k=0, top_p=1.0, min_p=0.0, filter_value=float("-inf")):
        self.top_k, self.top_p, self.min_p, self.filter_value = top_k, top_p, min_p, filter_value

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        if scores.dtype == torch.float64:
            # The kernels take 32/16-bit logits; float32 rounding would merge distinct scores into
            # ties (both kept by top-k) and move overflowing ones to +-inf. The float64 reference
            # (sorts per row: slower, exact) filters the float64 values themselves.
            B = scores.shape[0]
            _, k, p, mp, _, _, _ = _sample_params(B, scores.device, 1.0, self.top_k, self.top_p,
                                                  self.min_p, 1.0, 0.0, 0.0)
            if not isinstance(self.filter_value, numbers.Real):
                raise TypeError(f"filter_value must be a number, got {type(self.filter_value).__name__}")
            return filter_logits(scores, k, p, mp, float(self.filter_value))
        return top_k_top_p_filter(scores, self.top_k, self.top_p, self.min_p, self.filter_value)
