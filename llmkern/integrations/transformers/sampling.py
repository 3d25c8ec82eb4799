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
    """Drop-in for HF's TemperatureLogitsWarper + TopKLogitsWarper + TopPLogitsWarper + MinPLogitsWarper.

    Use: `model.generate(..., do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
    logits_processor=LogitsProcessorList([LlmkernSamplingWarper(temperature=0.7, top_k=50, top_p=0.9)]))`.
    Give the temperature here, not to generate(): transformers runs custom processors before its own
    warpers, so its temperature would come after our filters (HF's order is temperature first).
    min_tokens_to_keep: as HF's warpers' (beam sampling keeps 1 + the number of eos tokens): top-k keeps at
    least that many, top-p and min-p never cut below the min_tokens_to_keep-th largest score.
    """

    def __init__(self, top_k=0, top_p=1.0, min_p=0.0, filter_value=float("-inf"), temperature=1.0,
                 min_tokens_to_keep=1):
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
            raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
        if isinstance(min_tokens_to_keep, bool) or not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
            raise ValueError(f"min_tokens_to_keep must be an int >= 1, got {min_tokens_to_keep!r}")
        # (a negative top_k, vLLM's "disabled", became max(top_k, min_tokens_to_keep) = 1: near-greedy, silently)
        if not torch.is_tensor(top_k) and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)
                                           or top_k < 0):
            raise ValueError(f"top_k must be an int >= 0 (0: no top-k) or a [batch] tensor, got {top_k!r}")
        self.top_k, self.top_p, self.min_p, self.filter_value = top_k, top_p, min_p, filter_value
        self.temperature, self.min_tokens_to_keep = float(temperature), min_tokens_to_keep

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        if torch.is_tensor(scores) and scores.dim() > 2 and not any(map(torch.is_tensor, (self.top_k, self.top_p,
                                                                                          self.min_p))):
            # (HF's warpers take [..., V]: rows of any leading shape, filtered as a batch of rows)
            return self(input_ids, scores.reshape(-1, scores.shape[-1])).reshape(scores.shape)
        if self.temperature != 1.0:
            scores = scores / self.temperature
        m = min(self.min_tokens_to_keep, scores.shape[-1])
        if torch.is_tensor(self.top_k):  # (negative entries reach the filter's check as they are)
            top_k = torch.where(self.top_k > 0, self.top_k.clamp_min(m), self.top_k)
        else:
            top_k = max(self.top_k, m) if self.top_k > 0 else 0
        top_p = self.top_p
        if not torch.is_tensor(top_p) and isinstance(top_p, numbers.Real) and top_p == 0:
            # HF's TopPLogitsWarper(0) keeps min_tokens_to_keep tokens (llmkern.sample's top_p is vLLM's (0, 1])
            top_k, top_p = m, 1.0
        out = self._filter(scores, top_k, top_p)
        if m > 1:  # (top-p / min-p never cut below the m-th largest score, as HF's warpers)
            kth = scores.topk(m, dim=-1).values[..., -1:]
            out = torch.where(scores >= kth, scores, out)
        return out

    def _filter(self, scores, top_k, top_p):
        if scores.dtype == torch.float64:
            # The kernels take 32/16-bit logits; float32 rounding would merge distinct scores into
            # ties (both kept by top-k) and move overflowing ones to +-inf. The float64 reference
            # (sorts per row: slower, exact) filters the float64 values themselves.
            B = scores.shape[0]
            _, k, p, mp, _, _, _ = _sample_params(B, scores.device, 1.0, top_k, top_p,
                                                  self.min_p, 1.0, 0.0, 0.0)
            if not isinstance(self.filter_value, numbers.Real):
                raise TypeError(f"filter_value must be a number, got {type(self.filter_value).__name__}")
            return filter_logits(scores, k, p, mp, float(self.filter_value))
        return top_k_top_p_filter(scores, top_k, top_p, self.min_p, self.filter_value)
