"""Sorting-free top-k / top-p / min-p sampling: public API, validation, dispatch.

Kernels: csrc/cpu/sampling.cpp (C++, OpenMP) and csrc/cuda/sampling.cu (CUDA C++), registered as
torch.ops.llmkern.sample / top_k_top_p_filter in csrc/llmkern.cpp; the plain-PyTorch reference is
llmkern/reference/sampling.py. The algorithm is described in csrc/sampling.h.
top_logprobs (serving-style log-probabilities) has a C++ CPU kernel (torch.ops.llmkern.top_logprobs)
and runs the reference's torch ops on other devices (see its docstring for why).
"""
import math
import numbers
from typing import NamedTuple, Optional, Union

import torch

from llmkern import _backend
from llmkern.ops import _checks
from llmkern import reference as ref
from llmkern.reference import sampling as _ref_sampling

ScalarOrTensor = Union[float, int, torch.Tensor]
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
MAX_VOCAB = 2**24 - 1  # (real vocabularies: up to ~262k)


# Looked up once: the dispatcher query is not traceable by torch.compile.
_COMPILED = {"cpu": _backend.has_kernel("llmkern::sample", "CPU"),
             "cuda": _backend.has_kernel("llmkern::sample", "CUDA")}


def _backend_for(device, dtype=None, op="sample"):
    """"cuda" / "cpu" when llmkern._C has the kernel for this device, else "reference" (said once per op)."""
    dev = torch.device(device)
    available = ["reference"]
    if _COMPILED.get(dev.type, False):
        available.insert(0, dev.type)
    choice = _backend.choose(op, available, ("cuda", "cpu", "reference"))
    if choice == "reference" and available == ["reference"] and _backend.forced() != "reference":
        _backend.warn_once((op, dev.type), f"llmkern.{op}: no compiled kernel for "
                           f"{dev.type} ({_backend.extension_error() or 'not built'}); using the "
                           "PyTorch reference")
    return choice


def _filter_backend_for(device, dtype=None):
    return _backend_for(device, dtype, "top_k_top_p_filter")


_backend.register_op("sample", _backend_for)
_backend.register_op("top_k_top_p_filter", _filter_backend_for)

def _has_logprobs_kernel():
    try:
        return _backend.has_kernel("llmkern::top_logprobs", "CPU")
    except RuntimeError:  # an llmkern._C built before the op existed: the schema is unknown
        return False


_LOGPROBS_COMPILED = _has_logprobs_kernel()


def _logprobs_backend(device, dtype=None):
    """"cpu" (the C++ kernel) for CPU tensors when built, else "reference" (torch ops: the designed
    path on GPUs, where torch.topk and the reductions are already single memory-bound kernels)."""
    dev = torch.device(device)
    available = ["cpu", "reference"] if dev.type == "cpu" and _LOGPROBS_COMPILED else ["reference"]
    choice = _backend.choose("top_logprobs", available, ("cpu", "reference"))
    if dev.type == "cpu" and not _LOGPROBS_COMPILED and _backend.forced() != "reference":
        why = _backend.extension_error() or ("llmkern._C predates the op: rebuild it" if _backend.extension()
                                             else "not built")
        _backend.warn_once(("top_logprobs", "cpu"), f"llmkern.top_logprobs: no compiled CPU kernel ({why}); "
                           "using the PyTorch reference")
    return choice


_backend.register_op("top_logprobs", _logprobs_backend)


# ---- validation ---------------------------------------------------------------------------------

def _check_logits(logits):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [batch, vocab], got {tuple(logits.shape)}")
    if logits.size(1) < 1:
        raise ValueError("logits must have a non-empty vocabulary dimension")
    if logits.size(1) > MAX_VOCAB:  # each token's weight is up to 2^40 in a 64-bit fixed-point sum: 2^24 tied
        # tokens sum to 2^64, which wraps to 0
        raise ValueError(f"logits vocabulary dimension must be below 2^24 (at most {MAX_VOCAB}: the kernels' "
                         f"fixed-point mass sums wrap at 2^24 tokens), got {logits.size(1)}")
    if logits.dtype not in _DTYPES:
        raise ValueError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")


_checking_values = _checks.checking_values


class _RangeChecks:
    """Value checks of tensor arguments, verified together: one host sync per call, not one per
    argument (a decode loop calls sample once per token)."""

    def __init__(self):
        self.pending = []  # (message, bool tensor []: the check failed)

    def add(self, name, t, lo, hi, lo_open, hi_open):
        if t.numel() == 0 or _checks.values_trusted():  # (trusted: the caller had these values checked)
            return
        below = t <= lo if lo_open else t < lo
        above = t >= hi if hi_open else t > hi
        bad = below | above
        if t.is_floating_point():
            bad = bad | torch.isnan(t)
        message = f"{name} values must be in {_interval(lo, hi, lo_open, hi_open)}"
        if _checking_values():
            self.pending.append((message, bad.any()))
        else:  # compiled / captured: no host read, but no garbage either (min_p 1.5 kept no token and drew token
            # 0 with logprob inf; a negative temperature sampled at 1): raises when run, a device assert on CUDA
            _checks.assert_async(~bad.any(), message)

    def add_flag(self, message, bad):
        """A check of the caller's own: bad, a bool tensor [], True when it failed (only where values are read)."""
        self.pending.append((message, bad))

    def verify(self):
        if not self.pending:
            return
        flags = torch.stack([bad for _, bad in self.pending]).tolist()  # the one sync
        self.pending, pending = [], self.pending
        for (message, _), bad in zip(pending, flags):
            if bad:
                raise ValueError(message)


def _row_param(name, value, B, device, dtype, lo, hi, lo_open=False, hi_open=False, checks=None):
    """A Python scalar or [B] tensor -> [B] tensor of `dtype` on `device`, range-checked (tensor
    values are checked when `checks.verify()` runs, or at once without `checks`)."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.expand(B)
        if value.shape != (B,):
            raise ValueError(f"{name} must be a scalar or a tensor of shape [{B}], got {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():  # (a Python bool is refused too)
            kinds = "an integer" if dtype == torch.int64 else "an integer or floating-point"
            raise TypeError(f"{name} must be {kinds} tensor, got {value.dtype}")
        if value.is_floating_point() and dtype == torch.int64:
            raise ValueError(f"{name} must be an integer tensor, got {value.dtype}")
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but logits are on {device}")
        t = value.to(device=device, dtype=dtype)
        if dtype == torch.int64 and lo <= _INT64_MIN and hi >= _INT64_MAX and not (lo_open or hi_open):
            return t  # (every int64 is in range: a check would only cost a host sync, as seeds did per call)
        own = checks is None
        checks = _RangeChecks() if own else checks
        checks.add(name, t, lo, hi, lo_open, hi_open)
        if own:
            checks.verify()
        return t
    if type(value) not in (int, float) and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    # (an int is one: float(value).is_integer() on a traced SymInt would pin it, recompiling per position / seed)
    if dtype == torch.int64 and type(value) is not int and not float(value).is_integer():
        raise ValueError(f"{name} must be an integer, got {value}")
    # an int is compared as an int: float() would round 2**63 - 1 up to 2**63, out of int64's range
    v = int(value) if isinstance(value, numbers.Integral) else float(value)
    # a float past float32's range is +-inf there (as in a float32 tensor of it; torch.full raised its overflow
    # error), checked as such: an infinite penalty is one, a temperature of 1e39 is refused like inf
    rounded = dtype == torch.float32 and v == v and not _checks.float32_finite(v)
    if rounded:
        v = math.copysign(math.inf, v)
    out_of_range = (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi) or v != v
    if out_of_range:
        raise ValueError(f"{name} must be in {_interval(lo, hi, lo_open, hi_open)}, got {value}"
                         + (f" ({v} in float32)" if rounded else ""))
    return _constant_row(v if rounded else value, B, device, dtype)


_CONSTANT_ROWS = {}  # (value, B, device, dtype) -> read-only [B] tensor
_CONSTANT_ROWS_MAX = 256


def _cacheable():
    """Whether parameter tensors may be cached across calls: not while tracing (torch.compile / graph capture
    would bake the cached tensor in as a constant) nor under a dispatch mode (FakeTensorMode would cache a fake
    tensor, and a real call would then get it, or the reverse)."""
    return _checking_values() and torch._C._len_torch_dispatch_stack() == 0 and not _checks._functorch_active()


def _stream(device):
    """The current CUDA stream's id for device (None on CPU): a cached tensor is filled on the stream that made
    it, so another stream could read it before that fill runs (and its memory, freed by the cache's clear,
    could be reused under a reader on another stream); each stream gets its own entries."""
    device = torch.device(device)
    return torch.cuda.current_stream(device).stream_id if device.type == "cuda" else None


def _constant_row(value, B, device, dtype):
    """A [B] tensor filled with `value`, cached: a decode loop passes the same scalars every step, and
    building nine small tensors per call cost more than the kernel at B=1. The ops never write to
    their parameter tensors, so sharing them is safe. Made outside inference mode: an inference tensor in
    the cache could not be saved for backward by a later differentiable call (top_k_top_p_filter)."""
    if not _cacheable():
        return torch.full((B,), value, dtype=dtype, device=device)
    key = (value, B, device, dtype, _stream(device))
    t = _CONSTANT_ROWS.get(key)
    if t is None:
        if len(_CONSTANT_ROWS) >= _CONSTANT_ROWS_MAX:
            _CONSTANT_ROWS.clear()
        with torch.inference_mode(False):
            t = _CONSTANT_ROWS[key] = torch.full((B,), value, dtype=dtype, device=device)
    return t


def _interval(lo, hi, lo_open, hi_open):
    return f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _side_tensor(name, t, B, V, device):
    """logit_bias / allowed_tokens: [V] or [B, V] on the logits' device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape not in ((V,), (B, V)):
        raise ValueError(f"{name} must have shape [{V}] or [{B}, {V}], got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logits are on {device}")
    if name == "logit_bias" and (t.dtype == torch.bool or t.is_complex()):
        raise TypeError(f"logit_bias must be a floating-point or integer tensor, got {t.dtype}")
    return t


def _allowed_mask(allowed, B, V, device):
    """Boolean [B, V] / [V] mask, or a packed int32 bitmask [B, ceil(V/32)] (bit j of word w allows
    token 32*w + j, as guided-decoding libraries produce)."""
    if not isinstance(allowed, torch.Tensor):
        raise TypeError(f"allowed_tokens must be a torch.Tensor, got {type(allowed).__name__}")
    if allowed.dtype == torch.bool:
        return _side_tensor("allowed_tokens", allowed, B, V, device)
    words = (V + 31) // 32
    if allowed.dtype == torch.int32 and allowed.shape in ((words,), (B, words)):
        if allowed.device != device:
            raise ValueError(f"allowed_tokens is on {allowed.device} but logits are on {device}")
        bits = torch.arange(32, device=device, dtype=torch.int32)
        unpacked = ((allowed.unsqueeze(-1) >> bits) & 1).bool()
        return unpacked.flatten(-2)[..., :V]
    raise ValueError(f"allowed_tokens must be a bool tensor [{V}] / [{B}, {V}] or a packed int32 "
                     f"bitmask [{words}] / [{B}, {words}], got {allowed.dtype} {tuple(allowed.shape)}")


def _check_prev_tokens(prev_tokens, B, V, device, checks=None):
    """Types and shape at once; the values where they may be read, with `checks` (verified by the caller,
    in the call's one sync) or at once without."""
    if not isinstance(prev_tokens, torch.Tensor) or prev_tokens.dtype != torch.int64:
        raise TypeError("prev_tokens must be an int64 tensor [batch, length] padded with -1")
    if prev_tokens.dim() != 2 or prev_tokens.size(0) != B:
        raise ValueError(f"prev_tokens must have shape [{B}, length], got {tuple(prev_tokens.shape)}")
    if prev_tokens.device != device:
        raise ValueError(f"prev_tokens is on {prev_tokens.device} but logits are on {device}")
    if _checks.reading_values() and prev_tokens.numel():  # (not inside _checks.trusted())
        own = checks is None
        checks = _RangeChecks() if own else checks
        checks.add_flag(f"prev_tokens values must be -1 (padding) or token ids in [0, {V})",
                        ((prev_tokens < -1) | (prev_tokens >= V)).any())
        if own:
            checks.verify()


def _output_start(output_start, prev_tokens, B, device, checks=None):
    """None, or int64 [B]: where each row's output begins in prev_tokens (0 <= start <= L). A tensor's values
    are checked with `checks` (verified by the caller) or at once without."""
    if output_start is None:
        return None
    if prev_tokens is None:
        raise ValueError("output_start needs prev_tokens (it indexes into them)")
    L = prev_tokens.shape[1]
    if isinstance(output_start, torch.Tensor):
        if output_start.dim() == 0:
            output_start = output_start.expand(B)
        if output_start.shape != (B,):
            raise ValueError(f"output_start must be an int or a tensor of shape [{B}], got "
                             f"{tuple(output_start.shape)}")
        if output_start.dtype == torch.bool or output_start.is_floating_point() or output_start.is_complex():
            raise TypeError(f"output_start must be an integer tensor, got {output_start.dtype}")
        if output_start.device != device and output_start.device.type != "cpu":
            raise ValueError(f"output_start is on {output_start.device} but logits are on {device}")
        t = output_start.to(device=device, dtype=torch.int64)
        msg = f"output_start values must be in [0, {L}] (prev_tokens has {L} columns)"
        if _checks.values_trusted():
            pass
        elif not _checking_values():
            _checks.assert_async(~((t < 0) | (t > L)).any(), msg)
        elif B:
            own = checks is None
            checks = _RangeChecks() if own else checks
            checks.add_flag(msg, ((t < 0) | (t > L)).any())
            if own:
                checks.verify()
        return t
    if isinstance(output_start, bool) or not isinstance(output_start, numbers.Integral):
        raise TypeError(f"output_start must be an int or an integer tensor, got {type(output_start).__name__}")
    if not 0 <= int(output_start) <= L:
        raise ValueError(f"output_start must be in [0, {L}] (prev_tokens has {L} columns), got {output_start}")
    return _constant_row(int(output_start), B, device, torch.int64)


def biased_and_penalised(logits, logit_bias, prev_tokens, rep, pres, freq, output_start):
    """float32 [B, V]: logits + logit_bias (float32 [B or 1, V], or None), then the penalties (rep, pres, freq:
    [B] float32) over prev_tokens, output_start as llmkern.sample takes it: HF's and vLLM's order (the
    repetition penalty divides / multiplies the biased logit). llmkern.sample and generate's scored paths
    (greedy and sampling with scorers) share it."""
    y = logits.float()
    if logit_bias is not None:
        y = y + logit_bias
    return ref.apply_penalties(y, prev_tokens, rep, pres, freq, output_start=output_start)


def _seed_row(seed, B, device):
    """Per-row seeds. Without a seed, fresh seeds come from torch's generator."""
    if seed is None:
        return torch.randint(_INT64_MIN, _INT64_MAX, (B,), dtype=torch.int64, device=device)
    return _row_param("seed", seed, B, device, torch.int64, _INT64_MIN, _INT64_MAX)


def _position_row(position, B, device, checks=None):
    """Per-row positions; a tensor's values are checked with `checks` (verified by the caller) or at once."""
    pos = 0 if position is None else position
    return _row_param("position", pos, B, device, torch.int64, 0, _INT64_MAX, checks=checks)


_PARAM_SETS = {}  # (B, device, scalar values) -> the seven [B] tensors, already validated


def _sample_params(B, dev, *values, checks=None):
    """temperature, top_k, top_p, min_p and the three penalties as [B] tensors, range-checked (tensors: with
    `checks`, verified by the caller, or at once without). When all seven are plain Python numbers (a decode
    loop passes the same ones every step) the validated set is cached, so a call at batch 1 costs
    microseconds in Python, not tens of microseconds."""
    key = None
    if all(type(v) in (int, float) for v in values) and _cacheable():
        key = (B, dev, _stream(dev)) + tuple((type(v), v) for v in values)
        hit = _PARAM_SETS.get(key)
        if hit is not None:
            return hit
        with torch.inference_mode(False):  # (cached: no inference tensors, see _constant_row)
            out = _sample_params_uncached(B, dev, *values)
        if len(_PARAM_SETS) >= _CONSTANT_ROWS_MAX:
            _PARAM_SETS.clear()
        _PARAM_SETS[key] = out
        return out
    return _sample_params_uncached(B, dev, *values, checks=checks)


def _sample_params_uncached(B, dev, *values, checks=None):
    f32, inf, chk = torch.float32, float("inf"), _RangeChecks() if checks is None else checks
    temperature, top_k, top_p, min_p, rep, pres, freq = values
    # (an infinite temperature or repetition penalty divides a +inf logit into NaN)
    out = (_row_param("temperature", temperature, B, dev, f32, 0.0, inf, hi_open=True, checks=chk),
           _row_param("top_k", top_k, B, dev, torch.int64, 0, _INT64_MAX, checks=chk),
           _row_param("top_p", top_p, B, dev, f32, 0.0, 1.0, lo_open=True, checks=chk),
           _row_param("min_p", min_p, B, dev, f32, 0.0, 1.0, checks=chk),
           _row_param("repetition_penalty", rep, B, dev, f32, 0.0, inf, lo_open=True, hi_open=True,
                      checks=chk),
           _row_param("presence_penalty", pres, B, dev, f32, -inf, inf, checks=chk),
           _row_param("frequency_penalty", freq, B, dev, f32, -inf, inf, checks=chk))
    if checks is None:
        chk.verify()
    return out


def _penalties_need_prev_tokens(checks, *penalties):
    """A penalty without prev_tokens (the tokens it penalises) changed nothing, silently: refused. Each of
    `penalties` is (the argument, its [B] row, its neutral value, its name); a tensor's values are read with the
    call's other checks (one sync), and only where values are read."""
    for given, row, neutral, name in penalties:
        msg = f"{name} needs prev_tokens (the tokens it penalises): without them it would change nothing"
        if not torch.is_tensor(given):
            if given != neutral:
                raise ValueError(f"{msg}, got {name}={given!r}")
        elif _checks.reading_values() and row.numel():
            checks.add_flag(f"{msg} (its values must be {neutral} without them)", (row != neutral).any())


# ---- public API -------------------------------------------------------------------------------------

def sample(
    logits: torch.Tensor,
    *,
    temperature: ScalarOrTensor = 1.0,
    top_k: ScalarOrTensor = 0,
    top_p: ScalarOrTensor = 1.0,
    min_p: ScalarOrTensor = 0.0,
    repetition_penalty: ScalarOrTensor = 1.0,
    presence_penalty: ScalarOrTensor = 0.0,
    frequency_penalty: ScalarOrTensor = 0.0,
    prev_tokens: Optional[torch.Tensor] = None,
    output_start: Optional[Union[int, torch.Tensor]] = None,
    logit_bias: Optional[torch.Tensor] = None,
    allowed_tokens: Optional[torch.Tensor] = None,
    seed: Optional[Union[int, torch.Tensor]] = None,
    position: Optional[Union[int, torch.Tensor]] = None,
    return_logprobs: bool = False,
    return_valid: bool = False,
):
    """Draw one token per row of `logits` [B, V] (fp32/fp16/bf16) without sorting the vocabulary.

    Order of processing (Hugging Face's generate and vLLM's): `logit_bias`, repetition penalty,
    presence/frequency penalties, `allowed_tokens` mask, temperature, top-k, top-p, min-p. (The bias
    comes before the penalties: the repetition penalty divides / multiplies the biased logit.) Every
    keyword accepts a Python scalar or a [B] tensor (per-row values). `top_k=0`, `top_p=1`,
    `min_p=0` disable a filter; `temperature=0` is greedy for that row (argmax, lowest index on ties).

    prev_tokens: [B, L] int64, -1 padded: the tokens seen so far (prompt, then output), for the
        penalties. The repetition penalty (HF's: a seen token's logit divided by it when positive,
        multiplied when negative) counts all of them. A penalty given without prev_tokens raises.
    output_start: None, an int or an int64 [B] tensor in [0, L]: where each row's output (generated)
        tokens begin in prev_tokens. The presence and frequency penalties (OpenAI's and vLLM's:
        logit -= presence * (count > 0) + frequency * count) count only the output tokens
        prev_tokens[b, output_start[b]:], as vLLM and OpenAI do; None (the default) counts every
        token of prev_tokens as output. Needs prev_tokens.
    logit_bias: [V] or [B, V] float added to the logits.
    allowed_tokens: bool [V] / [B, V] (True = allowed) or packed int32 bitmask [B, ceil(V/32)].
    seed, position: with a seed, row r's draw is a pure function of (its processed logits,
        seed[r], position[r]) - reproducible and independent of the batch's order or makeup.
        A scalar is every row's: rows then draw with the same uniform (identical rows give the same
        token); pass seed=s + torch.arange(B) for independent rows (generate does).
        Without one, fresh seeds come from torch's generator (torch.manual_seed applies).

    Returns tokens (int64 [B]); with return_logprobs also the log-probability of each token under
    the distribution it was drawn from (after filtering; for greedy rows, under the temperature-1
    distribution); with return_valid also a bool [B] mask, False for rows whose logits are all -inf
    (their token is 0 and logprob -inf). NaN logits count as -inf. +inf logits share the row's
    mass equally (the limit of large equal logits; a temperature so small that logits / T
    overflows float32, about 1e-38 for logits of order 1, makes every positive logit +inf).
    """
    _check_logits(logits)
    # (flags: bool("False") is True, and return_logprobs="False" returned a tuple)
    return_logprobs = _checks.bool_arg("return_logprobs", return_logprobs)
    return_valid = _checks.bool_arg("return_valid", return_valid)
    B, V = logits.shape
    dev = logits.device
    filters = not _no_filtering(temperature, top_k, top_p, min_p, V)  # (before the numbers become tensors)
    if seed is None and _all_greedy(temperature):
        seed = 0  # every row greedy: no draw, so no fresh seeds from torch's generator (its state stays as it was)
    # every tensor argument's value checks go into one _RangeChecks: one host sync per call (none with plain
    # numbers, nor inside _checks.trusted()), not one per tensor argument
    checks = _RangeChecks()
    temperature, top_k, top_p, min_p, rep, pres, freq = _sample_params(
        B, dev, temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty,
        checks=checks)
    if logit_bias is not None:
        logit_bias = _side_tensor("logit_bias", logit_bias, B, V, dev).float()
    if allowed_tokens is not None:
        allowed_tokens = _allowed_mask(allowed_tokens, B, V, dev)
    if prev_tokens is not None:
        _check_prev_tokens(prev_tokens, B, V, dev, checks)
    start = _output_start(output_start, prev_tokens, B, dev, checks)
    if prev_tokens is None:
        _penalties_need_prev_tokens(checks, (repetition_penalty, rep, 1.0, "repetition_penalty"),
                                    (presence_penalty, pres, 0.0, "presence_penalty"),
                                    (frequency_penalty, freq, 0.0, "frequency_penalty"))
    pos_t = _position_row(position, B, dev, checks)
    checks.verify()  # (before the penalties: an out-of-range prev_tokens id would index out of bounds)
    if prev_tokens is not None:  # (the bias goes in with them, first: not again in the kernel)
        logits = biased_and_penalised(logits, logit_bias, prev_tokens, rep, pres, freq, start)
        logit_bias = None
    seed_t = _seed_row(seed, B, dev)

    if _backend_for(dev) == "reference":
        tokens, logprobs, valid = ref.sample(logits, temperature, top_k, top_p, min_p, seed_t, pos_t,
                                             logit_bias=logit_bias, allowed=allowed_tokens, filters=filters)
    else:
        # .default: the overload packet's resolution costs several microseconds per call
        tokens, logprobs, valid = torch.ops.llmkern.sample.default(logits, logit_bias, allowed_tokens, temperature,
                                                           top_k, top_p, min_p, seed_t, pos_t)
    out = (tokens,)
    if return_logprobs:
        out += (logprobs,)
    if return_valid:
        out += (valid,)
    return out[0] if len(out) == 1 else out


def top_k_top_p_filter(logits: torch.Tensor, top_k: ScalarOrTensor = 0, top_p: ScalarOrTensor = 1.0,
                       min_p: ScalarOrTensor = 0.0, filter_value: float = float("-inf")) -> torch.Tensor:
    """The logits that Hugging Face's TopK, TopP and MinP warpers (in that order) would return.

    Removed entries are set to `filter_value`; ties at the k-th value are kept; at least one token
    is kept. One deliberate difference: where the top-p boundary falls inside a group of exactly
    equal logits, the whole group is kept (HF keeps an arbitrary part of it, by sort order). One limit: the
    top-p masses are summed in 40-bit fixed point (each truncated to a multiple of 2^-40), so for top_p within
    ~1e-5 of 1 on a long tail the kept set may stop short of HF's by tail tokens of tiny total mass (README).
    `logits` is [B, V] or [V]; returns a new tensor of the same shape and dtype.
    """
    if isinstance(logits, torch.Tensor) and logits.dim() == 1:
        return top_k_top_p_filter(logits.unsqueeze(0), top_k, top_p, min_p, filter_value).squeeze(0)
    _check_logits(logits)
    B, V = logits.shape
    dev = logits.device
    # the sampler's validated (and, for plain numbers, cached) parameters, neutral where unused
    _, top_k, top_p, min_p, _, _, _ = _sample_params(B, dev, 1.0, top_k, top_p, min_p, 1.0, 0.0, 0.0)
    if not isinstance(filter_value, numbers.Real):
        raise TypeError(f"filter_value must be a number, got {type(filter_value).__name__}")
    return filter_rows(logits, top_k, top_p, min_p, float(filter_value))


def filter_rows(logits, top_k, top_p, min_p, filter_value=float("-inf")):
    """top_k_top_p_filter on [B] parameter tensors that _sample_params already validated: no checks and
    so no host sync (a decoding loop validates its parameters once, not once per token)."""
    if _filter_backend_for(logits.device) == "reference":
        return ref.filter_logits(logits, top_k, top_p, min_p, filter_value)
    return torch.ops.llmkern.top_k_top_p_filter.default(logits, top_k, top_p, min_p, filter_value)


class TopLogprobs(NamedTuple):
    """What llmkern.top_logprobs returns (token_logprobs / token_ranks are None without tokens)."""
    ids: torch.Tensor                       # int64 [B, n], most likely first, lowest id first on ties
    logprobs: torch.Tensor                  # float32 [B, n]
    token_logprobs: Optional[torch.Tensor]  # float32 [B]
    token_ranks: Optional[torch.Tensor]     # int64 [B]: 1 + number of strictly larger logits


def _check_n(n, V):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if not 0 <= n <= V:
        raise ValueError(f"n must be in [0, {V}] (the vocabulary size), got {n}")
    return int(n)


def _check_tokens(tokens, B, V, device):
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tokens must be an int64 or int32 tensor, got {tokens.dtype}")
    if tokens.shape != (B,):
        raise ValueError(f"tokens must have shape [{B}], got {tuple(tokens.shape)}")
    if tokens.device != device:
        raise ValueError(f"tokens is on {tokens.device} but logits are on {device}")
    if _checking_values() and B and bool(((tokens < 0) | (tokens >= V)).any()):
        raise ValueError(f"tokens values must be token ids in [0, {V})")
    return tokens.long()


def top_logprobs(logits: torch.Tensor, n: int, *, tokens: Optional[torch.Tensor] = None,
                 temperature: ScalarOrTensor = 1.0) -> TopLogprobs:
    """Log-probabilities as serving engines report them (vLLM's `logprobs=n`, OpenAI's top_logprobs).

    Per row of `logits` [B, V] (fp32/fp16/bf16), under softmax(logits / temperature) (temperature:
    a scalar or [B] tensor, > 0): the `n` most likely token ids (int64 [B, n], descending, lowest id
    first on ties) and their log-probabilities (float32 [B, n]); with `tokens` [B] (int64/int32, e.g.
    the sampled tokens) also their log-probabilities (float32 [B]) and ranks (int64 [B]: 1 + the
    number of tokens with a strictly larger logit, vLLM's convention; tied tokens share a rank).
    These are "raw" logprobs, vLLM's default: the model's distribution (at this temperature), before
    penalties, logit_bias and top-k / top-p / min-p filtering - not the distribution llmkern.sample
    drew from (its return_logprobs gives that). 0 <= n <= V; n = 0 returns [B, 0] (only the tokens'
    part). NaN logits count as -inf, as in llmkern.sample; +inf logits share the row's mass. A row with
    no finite logit gives logprobs -inf, ids 0..n-1 and rank 1.

    Cost: no [B, V] log-softmax is materialised. The ids are the top-n of the logits themselves
    (log-softmax is monotone); the log-normaliser comes from one max and one sum-exp pass in float32;
    the rank is a count of larger logits. On CPU this is a C++ kernel (csrc/cpu/sampling.cpp): a
    running-threshold top-n filter (the sampler's small top-k path) instead of torch.topk, and no
    float32 [B, V] copy (one row of scratch per thread for half precision): about 1.3-1.9x faster
    than torch's log_softmax + topk + gather at [64, 128256] on a 2-core CPU (the sum-exp pass is
    compute-bound there, so the gain is the passes and the copy saved, see README). Elsewhere (CUDA)
    it runs torch ops on a few rows at a time (llmkern/reference/sampling.py), no CUDA kernel: GPU
    reductions and topk are single bandwidth-bound kernels already, and there was no GPU to tune one
    (that path is unmeasured on a GPU). Not differentiable.
    """
    _check_logits(logits)
    B, V = logits.shape
    dev = logits.device
    n = _check_n(n, V)
    # (an infinite temperature would make every logprob log(1/V) only by dividing inf by inf)
    temperature = _row_param("temperature", temperature, B, dev, torch.float32, 0.0, float("inf"),
                             lo_open=True, hi_open=True)
    if tokens is not None:
        tokens = _check_tokens(tokens, B, V, dev)
    return top_logprobs_rows(logits, n, temperature, tokens)


def _no_filtering(temperature, top_k, top_p, min_p, V):
    """Whether no row is filtered, known from Python numbers alone (no tensor read): every row greedy, or top-k,
    top-p and min-p all off. The reference then skips its keep mask, a float64 sort of every row."""
    if type(temperature) in (int, float) and temperature == 0:
        return True
    return (type(top_k) is int and (top_k == 0 or top_k >= V) and type(top_p) in (int, float) and top_p >= 1.0
            and type(min_p) in (int, float) and min_p <= 0.0)


def _all_greedy(temperature):
    """Whether temperature is 0 for every row: a Python 0, or a CPU tensor of zeros (read where values may be
    read; a CUDA tensor would cost a device sync, so its rows still get seeds from torch's generator)."""
    if type(temperature) in (int, float):
        return temperature == 0
    return (isinstance(temperature, torch.Tensor) and temperature.device.type == "cpu" and temperature.numel() > 0
            and not temperature.requires_grad and _checking_values() and bool((temperature == 0).all()))


def top_logprobs_rows(logits, n, temperature, tokens=None):
    """top_logprobs on arguments already validated (temperature a [B] float32 tensor, tokens int64 [B]
    in range): no checks, so no host sync (generate calls it every step with the tokens it sampled)."""
    dev = logits.device
    if _logprobs_backend(dev) == "cpu":
        ids, lps, tok_lps, ranks = torch.ops.llmkern.top_logprobs.default(logits, n, temperature, tokens)
    else:
        ids, lps, tok_lps, ranks = _ref_sampling.top_logprobs(logits, n, temperature, tokens)
    if tokens is None:
        return TopLogprobs(ids, lps, None, None)
    return TopLogprobs(ids, lps, tok_lps, ranks)


# ---- torch.compile support: shapes of the C++ ops' outputs ------------------------------------------

def _register_fakes():
    if _backend.extension() is None:
        return

    @torch.library.register_fake("llmkern::sample")
    def _sample_fake(logits, logit_bias, allowed, temperature, top_k, top_p, min_p, seed, position):
        B = logits.shape[0]
        return (logits.new_empty((B,), dtype=torch.int64), logits.new_empty((B,), dtype=torch.float32),
                logits.new_empty((B,), dtype=torch.bool))

    @torch.library.register_fake("llmkern::top_k_top_p_filter")
    def _filter_fake(logits, top_k, top_p, min_p, filter_value):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    # Autograd (without it a backward silently gave no gradient): the filter passes the gradient of
    # the kept logits through, like HF's masked_fill; the sampler's logprobs are not differentiable.
    def _filter_setup(ctx, inputs, output):
        logits, top_k, top_p, min_p, _ = inputs
        ctx.save_for_backward(logits, top_k, top_p, min_p)

    def _filter_backward(ctx, grad):
        logits, top_k, top_p, min_p = ctx.saved_tensors
        # kept <=> not replaced by a NaN filter value (a kept value equal to filter_value is still kept)
        marked = torch.ops.llmkern.top_k_top_p_filter.default(logits.detach(), top_k, top_p, min_p,
                                                              float("nan"))
        kept = ~marked.isnan() | logits.isnan()
        return torch.where(kept, grad, torch.zeros_like(grad)), None, None, None, None

    def _sample_setup(ctx, inputs, output):
        # tokens and logprobs carry no gradient: marked so, torch.compile's AOT autograd (which traces the
        # backward at compile time, called or not) does not run the raising backward below on logits that
        # require grad (an RL rollout's, say), and a backward through them says they need no grad
        outs = output if isinstance(output, (tuple, list)) else (output,)
        ctx.mark_non_differentiable(*[o for o in outs if torch.is_tensor(o)])

    def _sample_backward(ctx, *grads):
        raise RuntimeError("llmkern.sample: the logprobs it returns are not differentiable; compute "
                           "log_softmax of the processed logits at the sampled tokens for a gradient")

    torch.library.register_autograd("llmkern::top_k_top_p_filter", _filter_backward, setup_context=_filter_setup)
    torch.library.register_autograd("llmkern::sample", _sample_backward, setup_context=_sample_setup)
    if not _LOGPROBS_COMPILED:  # an extension built before the op existed
        return

    @torch.library.register_fake("llmkern::top_logprobs")
    def _logprobs_fake(logits, n, temperature, tokens):
        B = logits.shape[0]
        nt = 0 if tokens is None else B  # the token outputs are empty without tokens
        return (logits.new_empty((B, n), dtype=torch.int64), logits.new_empty((B, n), dtype=torch.float32),
                logits.new_empty((nt,), dtype=torch.float32), logits.new_empty((nt,), dtype=torch.int64))

    def _logprobs_backward(ctx, *grads):
        raise RuntimeError("llmkern.top_logprobs is not differentiable; use torch.log_softmax for a gradient")

    torch.library.register_autograd("llmkern::top_logprobs", _logprobs_backward, setup_context=_sample_setup)


_register_fakes()
