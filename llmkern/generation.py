"""Decoding loops over a KV cache: greedy, sampling, beam search, guided decoding.

    from llmkern.generation import generate
    out = generate(model, input_ids, 32)                                     # greedy
    out = generate(model, input_ids, 32, strategy="sample", temperature=0.8, top_p=0.95, seed=1)
    out = generate(model, input_ids, 32, strategy="beam", num_beams=4, length_penalty=1.0)
    out = generate(model, input_ids, 32, strategy="beam", num_beams=4,
                   allowed_tokens=mask, scorers=[(0.5, my_feature)])         # guided
    out = generate(model, input_ids, 32, draft_model=small, num_draft_tokens=4)  # speculative

`model` is a zoo model (llmkern.models.GPT / Llama) or anything with `model(ids, cache=...,
last_only=True)` and `model.new_cache(batch, max_len)`; prompts are [B, T], left-padded with
`attention_mask=` when their lengths differ (padding is not counted by the penalties). A sequence
left with no token to choose (allowed_tokens allows none, or the logits have no finite value)
raises instead of emitting token 0.
Returns the prompt followed by the new tokens, [B * num_return_sequences, T + n]; rows that stop
early (eos) are filled with pad_token_id, as transformers' generate does (which, unlike us, fills
finished beams with eos when pad_token_id is 0). eos_token_id, pad_token_id and the knobs transformers'
generate also reads from a checkpoint (repetition_penalty, no_repeat_ngram_size, bad_words_ids, min_new_tokens;
beam search's length_penalty, early_stopping; sampling's temperature, top_k, top_p, min_p) default to the model's
generation_config (GenerationDefaults; from_hf: the checkpoint's), as transformers' generate defaults them; the
strategy does not (greedy unless strategy= says otherwise, whatever the checkpoint's do_sample / num_beams). Its
min_length, suppress_tokens and begin_suppress_tokens (no arguments of generate) ban tokens as transformers' do;
forced_bos_token_id, forced_eos_token_id, sequence_bias, exponential_decay_length_penalty, remove_invalid_values,
renormalize_logits and sampling's typical_p, epsilon_cutoff, eta_cutoff are generate's arguments (FROM_MODEL, the
checkpoint's) applied as transformers' processors (_Processors); so are stop_strings (with tokenizer=, see generate)
and guidance_scale (classifier-free guidance, with negative_prompt_ids; see generate); the keys transformers' generate
applies and generate does not (watermarking_config; sampling's top_h; stop_strings without a tokenizer) warn where
set.

Strategies (the seed deck's decoding slide):
  greedy  argmax of the (biased, penalised, masked) logits — llmkern.sample with temperature=0.
  sample  llmkern.sample: temperature p_i = exp(o_i/T)/Σ_j exp(o_j/T), top-k, top-p, min-p,
          repetition/presence/frequency penalties, logit_bias; reproducible with seed=.
  beam    beam search with transformers' semantics (num_beams, length_penalty, early_stopping in
          {True, False, "never"}, num_return_sequences): the same sequences as HF generate. num_beams=1
          is greedy decoding, as in HF generate (see generate's docstring for its scores).
Penalties and bias (greedy and sample), in HF's and vLLM's order: logit_bias is added first, then
the repetition penalty (HF's; it counts the prompt and the generated tokens, as HF and vLLM), then
presence_penalty and frequency_penalty (OpenAI's; they count the generated tokens only, as vLLM and
OpenAI: llmkern.sample's output_start is the prompt length).
Per-row values: temperature, top_k, top_p, min_p, the penalties and seed take a scalar or a [B] tensor
(one value per prompt), logit_bias [V] or [B, V]; with num_return_sequences = R > 1 a per-prompt value
applies to each of its R sequences (rows B * R, prompt-major; a [B * R] / [B * R, V] tensor gives one
per sequence), and a [B] seed gives sequence j of prompt b the seed seed[b] + j (an int seed s, numpy
integer or 0-dim integer tensor, gives row r the seed s + r; seed tensors must be integer), so a prompt
generated alone with its values draws the same tokens (with a draft model, see below). Beam search
takes logit_bias [V] or [B, V] (added to every beam of the prompt) and repetition_penalty (a float or [B]:
HF's processor on the beams' log-probabilities, the prompt's padding not counted); the other sampling
options raise with it, and greedy decoding raises for temperature, top_k, top_p and min_p (a seed is accepted
and unused by both). early_stopping and length_penalty (a finite number) are beam search's, num_draft_tokens
speculative decoding's: given to another strategy / without draft_model, they raise. Token ids (eos_token_id:
an int, numpy integer, 0-dim integer tensor or a list of them; pad_token_id; stop_sequences) must lie in
[0, model.config.vocab_size).
Guided decoding (any strategy):
  allowed_tokens  bool [V], [1, V], [B, V] (per prompt: each of its sequences / beams) or [N, V] (per
                  sequence, N = B * num_return_sequences, or B * num_beams for beam search; other row
                  counts raise) (True = allowed), or a function (sequences [N, t]) -> bool of those
                  shapes called every step (grammars, tries, vocabulary subsets);
                  ChoiceConstraint(choices, vocab_size, prompt_len, eos_token_id) is one: each row
                  generates exactly one of the given token sequences (vLLM's guided_choice).
  scorers         the seed's scored search: score(x_{t+1}, b_t) = score(b_t) + log p(x_{t+1})
                  + Σ_i α_i f_i(x_{t+1}); each scorer is (α_i, f_i) or f_i (α = 1), where
                  f_i(sequences [N, t], log_probs [N, V]) -> [N, V] feature values. Beam search
                  ranks beams by this score; greedy takes its argmax; sampling adds Σ α_i f_i to
                  the biased, penalised logits.
Speculative decoding (draft_model=, greedy or sample; Leviathan et al. 2023, Chen et al. 2023):
  each step the draft proposes k = num_draft_tokens tokens one by one over its own KV cache, the
  target scores the k + 1 positions in one forward over its cache, llmkern.speculative_accept keeps
  a prefix of the proposals plus one token of its own, and both caches are cut back to the kept
  length (KVCache.crop: a length update, no copy). The output is distributed exactly as the target's
  (processed: temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff, logit_bias,
  allowed_tokens, applied to both models' logits alike); greedy emits the same tokens as plain greedy
  decoding (up to float rounding between a k + 1-token and a 1-token forward deciding a near-tie). The
  draft needs the target's vocabulary.
  Batches: every row keeps its own accepted run. The zoo's KVCache holds a length per row, so each
  cache is cut back per row (crop with a [B] tensor), and the rows' sequences grow by different
  amounts. The forwards stay rectangular: every row feeds the same number of tokens, the target its
  last token and K proposals, the draft its last two tokens (its cache is cut to all but those, so a
  row whose draft cache already held the first one reads it again). K is num_draft_tokens, lowered
  near the end so that the row furthest ahead still fits in T + max_new_tokens and the one furthest
  behind uses all K (a row keeps at most the tokens it has left). Rows that have finished ride along
  at cache length 0, their outputs ignored. What holds per row, whatever the batch: its output is
  distributed exactly as the target's (K is fixed before a step's draws, and every K keeps the
  distribution exact), and greedy rows emit plain greedy's tokens (as above). What does not: a
  sampled row's seeded tokens may differ from those it draws alone. K is shared by the batch, so in
  the last steps (once some row has at most num_draft_tokens tokens left) it depends on how far the
  other rows got, and a different K changes the draws a row makes (a bonus token where a longer run
  would test one more proposal). Plain sampling's seeded rows do not depend on the batch. One host
  sync per step (the loop's stop test).
  Not supported with a draft model (ValueError): beam search, repetition / presence / frequency
  penalties, scorers, allowed_tokens given as a function, use_cache=False. return_dict=True adds
  num_draft_tokens [N] (proposals made while the row ran, those beyond its remaining max_new_tokens
  not counted) and num_accepted_draft_tokens [N] (proposals kept in the output) to the GenerationOutput.
"""
import dataclasses
import math
import numbers
import sys
import warnings
import weakref
from typing import Optional

import torch

from llmkern.ops._checks import bool_arg, is_real, real_arg, with_data
from llmkern.guided import RegexConstraint, TokenVocabulary, json_schema_regex  # noqa: F401  (re-exported)
from llmkern.ops._checks import int_arg as _int_arg

STRATEGIES = ("greedy", "sample", "beam")
_INT64_LIMIT = 2 ** 63  # element counts of the tensors generate makes must stay below it


@dataclasses.dataclass
class GenerationOutput:
    sequences: torch.Tensor            # [N, T + n]
    scores: Optional[torch.Tensor]     # beam: final (length-penalised) scores [N]; else per-token
                                       # log-probabilities of the chosen tokens [N, n]
    # speculative decoding (draft_model=) only, else None: per row, the draft tokens proposed while
    # the row was unfinished and those kept in the output (their ratio: the acceptance rate)
    num_draft_tokens: Optional[torch.Tensor] = None           # int64 [N]
    num_accepted_draft_tokens: Optional[torch.Tensor] = None  # int64 [N]
    # top_logprobs=k > 0 only, else None (OpenAI's logprobs / top_logprobs, vLLM's logprobs=k): per
    # generated position, "raw" log-probabilities of the model's distribution (log_softmax of its
    # logits, before temperature, penalties, bias, masks and filters; llmkern.top_logprobs) - the k
    # most likely ids and their logprobs, the chosen token's logprob and its rank (1 + the number of
    # tokens with a larger logit). Positions after a row finished: ids -1, logprobs 0, rank 0.
    top_logprob_ids: Optional[torch.Tensor] = None  # int64 [N, n, k]
    top_logprobs: Optional[torch.Tensor] = None     # float32 [N, n, k]
    raw_logprobs: Optional[torch.Tensor] = None     # float32 [N, n]
    token_ranks: Optional[torch.Tensor] = None      # int64 [N, n]
    # prompt_logprobs=True only (vLLM's prompt_logprobs, lm-eval's loglikelihood): raw log p(x_t | x_<t) of
    # each prompt token, from the prefill's logits; NaN where there is no such probability (a row's first
    # real token, left padding)
    prompt_logprobs: Optional[torch.Tensor] = None  # float32 [N, T]


def _as_int(v):
    """v as a Python int when it is an integer (Python / numpy, not a bool) or a 0-dim integer tensor with data;
    else None."""
    if torch.is_tensor(v):
        if v.dim() == 0 and v.device.type != "meta" and not (v.dtype == torch.bool or v.is_floating_point()
                                                             or v.is_complex()):
            return int(v)
        return None
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v)
    return None


def _id_list(v):
    """v (an id: int, numpy integer or 0-dim integer tensor; or a list / tuple / 1-D integer tensor of them) as a
    non-empty list of ints >= 0, or None when it is not one."""
    one = _as_int(v)
    if one is not None:
        ids = [one]
    elif (torch.is_tensor(v) and v.dim() == 1) or isinstance(v, (list, tuple)):
        ids = [_as_int(i) for i in v]
    else:
        return None
    return ids if ids and all(i is not None and i >= 0 for i in ids) else None


def _eos_tensor(eos_token_id, device, vocab_size=None):
    """eos_token_id (an id, numpy integer or 0-dim integer tensor, or a list / 1-D integer tensor of them) as an
    int64 tensor of ids in [0, vocab_size) (vocab_size None: not checked), or None."""
    if eos_token_id is None:
        return None
    ids = _id_list(eos_token_id)
    if ids is None:
        raise ValueError(f"eos_token_id must be a token id (an int >= 0) or a list of them, got {eos_token_id!r}")
    if vocab_size is not None and max(ids) >= vocab_size:
        raise ValueError(f"eos_token_id: token {max(ids)} is outside the vocabulary (vocab_size={vocab_size})")
    return torch.tensor(ids, dtype=torch.long, device=device)


class _FromModel:
    """generate's default for eos_token_id / pad_token_id and the knobs of GenerationDefaults (FROM_MODEL): the
    model's generation_config."""

    def __repr__(self):
        return "FROM_MODEL"


FROM_MODEL = _FromModel()


@dataclasses.dataclass
class GenerationDefaults:
    """What generate takes from `model.generation_config` for its arguments left at FROM_MODEL, as transformers'
    generate takes them from its model.generation_config. from_hf sets it from the checkpoint
    (generation_config.json, else config.json: the keys of these names); set a field to None to drop it (generate's
    own default then applies, noted per field); temperature, top_k, top_p and min_p apply to strategy="sample" only,
    length_penalty and early_stopping to strategy="beam" only (as in transformers). The strategy, num_beams and
    num_return_sequences are always generate's arguments (a checkpoint's do_sample / num_beams are not read), and
    so is max_new_tokens (transformers' max_new_tokens, which replaces a checkpoint's max_length there too)."""
    eos_token_id: object = None  # an id or a list of ids (any of them ends a sequence); None: no eos
    pad_token_id: Optional[int] = None  # None: the first eos id, else 0
    repetition_penalty: Optional[float] = None  # None: 1.0
    no_repeat_ngram_size: Optional[int] = None  # None: 0
    bad_words_ids: Optional[list] = None
    min_new_tokens: Optional[int] = None  # None: 0
    length_penalty: Optional[float] = None  # None: 1.0
    early_stopping: object = None  # True, False or "never"; None: False
    temperature: Optional[float] = None  # None: 1.0
    top_k: Optional[int] = None  # None: 0 (off; transformers' generate uses 50 where the checkpoint has none)
    top_p: Optional[float] = None  # None: 1.0
    min_p: Optional[float] = None  # None: 0.0
    # banning rules with no generate argument (set the field to None to drop one), as transformers applies them:
    min_length: Optional[int] = None  # no eos while the sequence (the prompt's padded width included) is shorter;
    # ignored where min_new_tokens is given or set here, as transformers' min_new_tokens takes precedence
    suppress_tokens: Optional[list] = None  # token ids banned at every step (ids past the vocabulary: ignored)
    begin_suppress_tokens: Optional[list] = None  # token ids banned at the first new token
    # transformers' other logits processors, defaults of generate's arguments of these names (see _Processors)
    forced_bos_token_id: Optional[int] = None  # None: off
    forced_eos_token_id: object = None  # an id or a list of ids; None: off
    sequence_bias: object = None  # {(ids...): bias} or [[[ids...], bias], ...]; None: off
    exponential_decay_length_penalty: object = None  # (start, decay factor); None: off
    remove_invalid_values: Optional[bool] = None  # None: False
    renormalize_logits: Optional[bool] = None  # None: False
    typical_p: Optional[float] = None  # sampling only; None: 1.0 (off)
    epsilon_cutoff: Optional[float] = None  # sampling only; None: 0.0 (off)
    eta_cutoff: Optional[float] = None  # sampling only; None: 0.0 (off)
    guidance_scale: Optional[float] = None  # classifier-free guidance (greedy and sample); None or 1: off
    stop_strings: object = None  # applied where generate is given tokenizer=
    # keys transformers' generate applies and generate does not: read so that generate warns (warnings.warn, naming
    # the key) where one is set to a value that changes transformers' output for the strategy, see _IGNORED
    watermarking_config: object = None
    top_h: Optional[float] = None


def _real_in(lo, hi, lo_open=False, hi_open=False):
    """A check: v is a finite real number (not a bool: _checks.is_real) in [lo, hi] (open ends with lo_open /
    hi_open)."""
    def ok(v, vocab):
        return is_real(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    return ok


def _count_ok(v, vocab):
    return _as_int(v) is not None and not torch.is_tensor(v) and v >= 0


def _words_ok(v, vocab):
    return _token_lists(v) and (vocab is None or all(i < vocab for w in v for i in w))


def _stopping_ok(v, vocab):
    try:  # (generate's own early_stopping rule)
        _early_stopping(v)
    except ValueError:
        return False
    return True


def _flag_ok(v, vocab):
    return v is True or v is False


def _token_ok(v, vocab):
    i = _as_int(v)
    return i is not None and i >= 0 and (vocab is None or i < vocab)


def _tokens_ok(v, vocab):
    ids = _id_list(v)
    return ids is not None and (vocab is None or max(ids) < vocab)


def _sequence_bias_ok(v, vocab):
    pairs = _bias_pairs(v)
    return pairs is not None and (vocab is None or max(i for ids in pairs for i in ids) < vocab)


def _decay_ok(v, vocab):
    return _decay_pair(v) is not None


def _bias_pairs(v):
    """transformers' sequence_bias ({(ids...): bias} or [[[ids...], bias], ...]) as {ids tuple: float}, or None
    when it is not one (empty; a key not a non-empty tuple / list of ids >= 0; a bias not a real number, or NaN)."""
    if isinstance(v, dict) and all(isinstance(k, tuple) for k in v):
        items = list(v.items())
    elif isinstance(v, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in v):
        items = [(p[0], p[1]) for p in v]
    else:
        return None
    out = {}
    for ids, bias in items:
        ids = _id_list(ids) if isinstance(ids, (list, tuple)) else None
        if ids is None or not isinstance(bias, numbers.Real) or isinstance(bias, bool) or math.isnan(bias):
            return None
        out[tuple(ids)] = float(bias)  # (a list's repeated key: the last one, as transformers' dict of it)
    return out or None


def _decay_pair(v):
    """exponential_decay_length_penalty (start, factor) as (int, float), or None when it is not one."""
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        return None
    start, factor = _as_int(v[0]), v[1]
    if start is None or torch.is_tensor(v[0]) or not is_real(factor):
        return None
    return start, float(factor)


# generate's knobs that default to model.generation_config: name -> (generate's own default, the strategy the
# value applies to (None: any), its check, what the check wants)
_KNOBS = {
    "temperature": (1.0, "sample", _real_in(0.0, math.inf), "a finite float >= 0"),
    "top_k": (0, "sample", _count_ok, "an int >= 0 (0: off)"),
    "top_p": (1.0, "sample", _real_in(0.0, 1.0, lo_open=True), "a float in (0, 1]"),
    "min_p": (0.0, "sample", _real_in(0.0, 1.0), "a float in [0, 1]"),
    "repetition_penalty": (1.0, None, _real_in(0.0, math.inf, lo_open=True), "a finite float > 0"),
    "min_new_tokens": (0, None, _count_ok, "an int >= 0 (0: off)"),
    "no_repeat_ngram_size": (0, None, _count_ok, "an int >= 0 (0: off)"),
    "bad_words_ids": (None, None, _words_ok, "a list of non-empty lists of token ids in [0, vocab_size)"),
    "length_penalty": (1.0, "beam", _real_in(-math.inf, math.inf), "a finite float"),
    "early_stopping": (False, "beam", _stopping_ok, "True, False or 'never'"),
    "forced_bos_token_id": (None, None, _token_ok, "a token id in [0, vocab_size)"),
    "forced_eos_token_id": (None, None, _tokens_ok, "a token id in [0, vocab_size) or a list of them"),
    "sequence_bias": (None, None, _sequence_bias_ok, "a dict {tuple of token ids: float} or a list [[[token ids], "
                      "float], ...] (non-empty, ids in [0, vocab_size), biases not NaN)"),
    "exponential_decay_length_penalty": (None, None, _decay_ok, "a pair (start: int, decay factor: finite float)"),
    "remove_invalid_values": (False, None, _flag_ok, "True or False"),
    "renormalize_logits": (False, None, _flag_ok, "True or False"),
    "typical_p": (1.0, "sample", _real_in(0.0, 1.0, lo_open=True), "a float in (0, 1] (1: off)"),
    # (1 is off too: transformers applies the cutoffs strictly inside (0, 1) and checkpoints hold eta_cutoff=1.0)
    "epsilon_cutoff": (0.0, "sample", _real_in(0.0, 1.0), "a float in [0, 1] (0 or 1: off)"),
    "eta_cutoff": (0.0, "sample", _real_in(0.0, 1.0), "a float in [0, 1] (0 or 1: off)"),
}
_NOT_SPECULATIVE = ("repetition_penalty", "min_new_tokens", "no_repeat_ngram_size", "bad_words_ids",
                    "forced_bos_token_id", "forced_eos_token_id", "sequence_bias", "exponential_decay_length_penalty",
                    "remove_invalid_values")
# sampling's warpers: functions of one position's scores, so speculative decoding applies them to both models'
# distributions (_spec_probs) and stays exact
_WARPERS = ("typical_p", "epsilon_cutoff", "eta_cutoff")
_PROCESSOR_KNOBS = ("forced_bos_token_id", "forced_eos_token_id", "sequence_bias", "exponential_decay_length_penalty",
                    "remove_invalid_values", "renormalize_logits", "typical_p", "epsilon_cutoff", "eta_cutoff")


def _model_knob(cfg, name, strategy, speculative, vocab):
    """generate's value for knob `name` left at FROM_MODEL: cfg.<name> where it is set and the strategy uses it,
    else generate's own default. A malformed value, or one speculative decoding cannot apply, raises naming it."""
    default, strategy_only, ok, wanted = _KNOBS[name]
    v = getattr(cfg, name, None) if strategy_only in (None, strategy) else None
    if v is None:
        return default
    if not ok(v, vocab):
        raise ValueError(f"model.generation_config.{name} must be {wanted} or None, got {v!r}")
    if name in ("epsilon_cutoff", "eta_cutoff"):
        v = float(v) % 1.0  # (1: off, as 0: checkpoints hold eta_cutoff=1.0, which draft_model must not refuse)
    if speculative and name in _NOT_SPECULATIVE and v not in (default, []):
        raise ValueError(f"model.generation_config.{name}={v!r} (generate's default for this model) is not "
                         f"supported with draft_model (speculative decoding); pass {name}={default!r} to decode "
                         f"without it")
    return float(v) if isinstance(default, float) else int(v) if type(default) is int else v


def _model_knobs(model, strategy, speculative, vocab, values):
    """`values` (generate's arguments named in _KNOBS, in its order) with FROM_MODEL replaced (_model_knob)."""
    cfg = getattr(model, "generation_config", None)
    return [_model_knob(cfg, name, strategy, speculative, vocab) if v is FROM_MODEL else v
            for name, v in zip(_KNOBS, values)]


def _is_set(v):
    return v is not None


# checkpoint keys transformers' generate applies and generate does not: name -> (the strategy transformers applies it
# with (None: any; its sampling warpers need do_sample, and renormalize_logits changes no greedy or sampled token,
# only beam search's scores), whether a value is active, as transformers' _get_logits_processor and
# _get_stopping_criteria test it)
_IGNORED = {
    "stop_strings": (None, _is_set),
    "watermarking_config": (None, _is_set),
    "top_h": ("sample", _is_set),
}


def _active(test, v):
    try:
        return bool(test(v))
    except TypeError:  # (a malformed value: transformers would apply or refuse it; generate does neither)
        return True


def _warn_ignored(model, strategy, applied=()):
    """warnings.warn for each key of _IGNORED (but those `applied` this call) that model.generation_config sets to a
    value transformers' generate applies with this strategy (Python's default filter shows each message once per
    call site)."""
    cfg = getattr(model, "generation_config", None)
    for name, (only, test) in _IGNORED.items():
        v = getattr(cfg, name, None)
        if name not in applied and only in (None, strategy) and _active(test, v):
            how = " (pass tokenizer= to apply it)" if name == "stop_strings" else ""
            warnings.warn(f"model.generation_config.{name}={v!r}: llmkern's generate ignores it{how}, where "
                          f"transformers' generate applies it (their outputs may differ); set it to None to silence "
                          f"this", UserWarning, stacklevel=4)


def _model_min_length(model, min_new_tokens):
    """model.generation_config.min_length, 0 without one or where min_new_tokens is given or set there
    (transformers' min_new_tokens then replaces min_length)."""
    cfg = getattr(model, "generation_config", None)
    v = getattr(cfg, "min_length", None)
    if v is None or min_new_tokens is not FROM_MODEL or getattr(cfg, "min_new_tokens", None) is not None:
        return 0
    if not _count_ok(v, None):
        raise ValueError(f"model.generation_config.min_length must be an int >= 0 or None, got {v!r}")
    return int(v)


def _ids_ok(v):
    return isinstance(v, (list, tuple)) and all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0
                                                for i in v)


def _model_rules(model, rules, min_new_tokens, min_length, T, speculative):
    """(rules, min_new_tokens, suppress_tokens, begin_suppress_tokens) with model.generation_config's banning rules:
    min_length (the sequence's width, so min_new_tokens = min_length - T where that is more) and the suppressed
    ids (lists, empty without)."""
    cfg, lists = getattr(model, "generation_config", None), []
    if min_length > T:
        rules, min_new_tokens = rules + ["min_length"], min_length - T
    for name in ("suppress_tokens", "begin_suppress_tokens"):
        v = getattr(cfg, name, None)
        if v is not None and not _ids_ok(v):
            raise ValueError(f"model.generation_config.{name} must be a list of token ids (ints >= 0) or None, "
                             f"got {v!r}")
        lists.append(sorted({int(i) for i in v or ()}))
        rules = rules + [name] if v else rules
    for name in rules if speculative else ():
        if name in ("min_length", "suppress_tokens", "begin_suppress_tokens"):
            fix = "pass min_new_tokens=0" if name == "min_length" else "set it to None"
            raise ValueError(f"model.generation_config.{name}={getattr(cfg, name)!r} (generate's default for this "
                             f"model) is not supported with draft_model (speculative decoding); {fix} to decode "
                             f"without it")
    return rules, min_new_tokens, lists[0], lists[1]


def _vocab_size(model):
    """model.config.vocab_size when it is an int, else None (not checked)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None


def _model_ids(model, name, vocab_size):
    """model.generation_config.<name> as a list of ids, those outside the vocabulary dropped (a checkpoint's eos
    past the vocabulary is never emitted, so transformers never stops on it either), or None."""
    v = getattr(getattr(model, "generation_config", None), name, None)
    if v is None:
        return None
    many = name == "eos_token_id"  # (a pad is one id)
    ids = _id_list(v) if many or _as_int(v) is not None else None
    if ids is None:
        raise ValueError(f"model.generation_config.{name} must be a token id (an int >= 0)"
                         f"{' or a list of them' if many else ''} or None, got {v!r}")
    ids = [i for i in ids if vocab_size is None or i < vocab_size]
    return ids or None


def _token_defaults(model, eos_token_id, pad_token_id, vocab_size):
    """(eos_token_id, pad_token_id) with FROM_MODEL replaced by the model's generation_config values (None where
    it has none): a checkpoint's eos stops generation as it does in transformers' generate."""
    if eos_token_id is FROM_MODEL:
        eos_token_id = _model_ids(model, "eos_token_id", vocab_size)
    if pad_token_id is FROM_MODEL:
        pad = _model_ids(model, "pad_token_id", vocab_size)
        pad_token_id = None if pad is None else pad[0]
    return eos_token_id, pad_token_id


def _pad_id(pad_token_id, vocab_size):
    """pad_token_id as an int in [0, vocab_size) (finished rows feed it to the model)."""
    v = _as_int(pad_token_id)
    if v is None or v < 0:
        raise ValueError(f"pad_token_id must be a token id (an int >= 0), got {pad_token_id!r}")
    if vocab_size is not None and v >= vocab_size:
        raise ValueError(f"pad_token_id: token {v} is outside the vocabulary (vocab_size={vocab_size})")
    return v


def _check_strategy_options(strategy, draft_model, num_draft_tokens, options, penalties, beam_options):
    """Options the strategy would ignore raise (when they differ from their defaults; each dict maps name ->
    (value, default)): greedy and beam search take no temperature / top_k / top_p / min_p (`options`), beam
    search no presence / frequency penalty (`penalties`), only beam search takes early_stopping and
    length_penalty (`beam_options`), and num_draft_tokens needs a draft_model. A seed is accepted by every
    strategy (greedy and beam search draw nothing)."""
    def given(v, default):
        return torch.is_tensor(v) or isinstance(v, bool) != isinstance(default, bool) or v != default

    refused = dict(options, **penalties) if strategy == "beam" else options if strategy == "greedy" else {}
    for name, (v, default) in refused.items():
        if given(v, default):
            raise ValueError(f"{name} is a sampling option; strategy={strategy!r} does not take it")
    if strategy != "beam":
        for name, (v, default) in beam_options.items():
            if given(v, default):
                raise ValueError(f"{name} is a beam search option; strategy={strategy!r} does not take it")
    if draft_model is None and (isinstance(num_draft_tokens, bool) or num_draft_tokens != 4):
        raise ValueError(f"num_draft_tokens applies to speculative decoding (draft_model=) only, "
                         f"got num_draft_tokens={num_draft_tokens!r} without a draft_model")


def _finite(name, v, **kw):
    """real_arg's finite float (kw: its options), from a 0-dim real tensor too; a ValueError for any bad value, as
    generate raises for its other options."""
    if torch.is_tensor(v) and v.dim() == 0 and v.dtype != torch.bool and not v.is_complex():
        v = float(v)
    return real_arg(name, v, type_error=ValueError, **kw)


def _early_stopping(v):
    """early_stopping as True, False or "never": a numpy bool or a 0-dim bool tensor is a bool (beam search tests
    `early_stopping is True`, so np.True_ ran as False); anything else (an int 1 included) raises."""
    if torch.is_tensor(v) and v.dim() == 0 and v.dtype == torch.bool:
        return bool(v)
    if type(v).__module__ == "numpy" and getattr(v, "dtype", None) is not None and v.dtype.kind == "b" \
            and getattr(v, "shape", None) == ():
        return bool(v)
    if v is True or v is False or (isinstance(v, str) and v == "never"):
        return v
    raise ValueError(f"early_stopping must be True, False or 'never', got {v!r}")


def _scorers(scorers):
    if scorers is not None and not isinstance(scorers, (list, tuple)):
        raise ValueError(f"scorers must be a list of scorers (f or (alpha, f)), got {type(scorers).__name__}")
    out = []
    for s in scorers or ():
        if callable(s):
            out.append((1.0, s))
        elif isinstance(s, (tuple, list)) and len(s) == 2 and callable(s[1]):
            # (a NaN alpha made every score NaN: "the model's logits have no finite value"; so did one past
            # float32's range, the dtype of the scores: 1e308 became inf there)
            out.append((_finite("scorers: alpha", s[0], float32=True, why=" for the float32 scores"), s[1]))
        else:
            raise ValueError(f"scorers: each scorer must be f or (alpha, f) with f callable, got {s!r}")
    return out


class _Banned:
    """transformers' masking logits processors on top of allowed_tokens (`base`): min_new_tokens
    (MinNewTokensLengthLogitsProcessor: no eos before that many new tokens; the checkpoint's min_length,
    MinLengthLogitsProcessor, arrives as min_length - T), no_repeat_ngram_size
    (NoRepeatNGramLogitsProcessor: no token that would repeat an n-gram of the sequence, prompt and padding
    included, as HF counts them), bad_words_ids (NoBadWordsLogitsProcessor: a listed sequence's last token
    is banned where the sequence ends with the others; sequences equal to [eos] are dropped, as HF does) and the
    checkpoint's suppress_tokens / begin_suppress_tokens (Suppress[AtBegin]TokensLogitsProcessor: ids banned at
    every step / at the first new token, eos included; ids past the vocabulary ignored). Each bans tokens (logit
    -inf), so their order against each other and the penalties does not matter; transformers runs its forced
    tokens, remove_invalid_values and exponential_decay_length_penalty (_Processors) between the suppressions
    (stage "late") and the others (stage "early"). begin_at: the sequence width at which begin_suppress_tokens
    apply (transformers': one later where forced_bos_token_id forces the first token of a one-token prompt). On the
    device, no host sync."""

    def __init__(self, base, prompt_len, eos, min_new_tokens, ngram, bad_words, suppress=(), begin=(), begin_at=None):
        self.base, self.prompt_len, self.eos, self.min_new, self.ngram = base, prompt_len, eos, min_new_tokens, ngram
        self.suppress, self.begin = list(suppress), list(begin)
        self.begin_at = prompt_len if begin_at is None else begin_at
        eos_ids = set() if eos is None else set(eos.tolist())
        self.eos_ids = sorted(eos_ids)
        words = [list(w) for w in bad_words or () if not (len(w) == 1 and w[0] in eos_ids)]
        self.single = sorted({w[0] for w in words if len(w) == 1})
        self.multi = [w for w in words if len(w) > 1]
        self._index = {}  # (V, device) -> the index tensors on the device, made once (a copy there is a host sync)

    def _indices(self, V, device):
        """(eos ids below V, single bad words, each longer word's prefix) as device tensors, made at the first
        step: per step, a host list as an index (or a mask as one) would cost a host sync on CUDA."""
        key = (V, device)
        if key not in self._index:
            self._index[key] = (  # (an eos id past the vocabulary is never emitted: nothing to ban, as HF)
                torch.tensor([i for i in self.eos_ids if i < V], dtype=torch.long, device=device),
                torch.tensor(self.single, dtype=torch.long, device=device),
                [torch.tensor(w[:-1], dtype=torch.long, device=device) for w in self.multi],
                *(torch.tensor([i for i in ids if i < V], dtype=torch.long, device=device)
                  for ids in (self.suppress, self.begin)))
        return self._index[key]

    def banned(self, seqs, V, stage="all"):
        """bool [N, V], True = banned this step; stage "early": all but the suppressed ids, "late": those only."""
        N, t = seqs.shape
        ban = torch.zeros(N, V, dtype=torch.bool, device=seqs.device)
        top = max(self.single + [i for w in self.multi for i in w], default=-1)  # (every id: HF and stops check all)
        if top >= V:
            raise ValueError(f"bad_words_ids: token {top} is outside the vocabulary (V={V})")
        eos_index, single, prefixes, suppress, begin = self._indices(V, seqs.device)
        if stage != "late":
            self._early_bans(ban, seqs, eos_index, single, prefixes)
        if stage != "early":
            if self.suppress:
                ban[:, suppress] = True
            if self.begin and t == self.begin_at:
                ban[:, begin] = True
        return ban

    def _early_bans(self, ban, seqs, eos_index, single, prefixes):
        """min_new_tokens, no_repeat_ngram_size and bad_words_ids: into ban [N, V]."""
        (N, t), V = seqs.shape, ban.shape[1]
        if self.eos is not None and t - self.prompt_len < self.min_new:
            ban[:, eos_index] = True
        if self.ngram and t >= self.ngram:  # (HF: cur_len + 1 >= n; with t = n - 1 no n-gram is complete)
            n = self.ngram
            grams = seqs.unfold(1, n, 1)  # [N, t - n + 1, n]: every n-gram so far
            hit = (grams[..., :-1] == seqs[:, t - n + 1:][:, None, :]).all(-1)  # starts with the last n - 1 tokens
            count = torch.zeros(N, V, dtype=torch.int32, device=seqs.device)
            count.scatter_add_(1, grams[..., -1], hit.to(torch.int32))  # the tokens that followed those
            ban |= count > 0
        if self.single:
            ban[:, single] = True
        for w, prefix in zip(self.multi, prefixes):
            if t >= len(w) - 1:
                tail = seqs[:, t - len(w) + 1:]
                ban[:, w[-1]] |= (tail == prefix).all(-1)


def _allowed(allowed_tokens, seqs, V, prompts, stage="all"):
    """The bool [N, V] mask for this step (None = all allowed), from 1 row, one per prompt (`prompts` of them:
    each spread over its sequences / beams) or one per sequence (N); any other count would be spread over rows
    of the wrong prompts. A _Banned adds its bans to its base mask. stage: "all", or "early" (allowed_tokens and
    the bans but suppress_tokens / begin_suppress_tokens) and "late" (those), which _Processors runs apart."""
    if isinstance(allowed_tokens, _Banned):
        m = None if stage == "late" else _allowed(allowed_tokens.base, seqs, V, prompts)
        ban = allowed_tokens.banned(seqs, V, stage)
        return ~ban if m is None else m & ~ban
    if allowed_tokens is None or stage == "late":
        return None
    m = allowed_tokens(seqs) if callable(allowed_tokens) else allowed_tokens
    # (dim first: a 0-dim mask raised IndexError reading its shape)
    if not torch.is_tensor(m) or m.dtype != torch.bool or m.dim() not in (1, 2) or m.shape[-1] != V:
        raise ValueError(f"allowed_tokens must be a bool tensor [V] or [N, V] with V={V} (or a function "
                         f"returning one), got {getattr(m, 'dtype', type(m))} {tuple(getattr(m, 'shape', ()))}")
    m, N = with_data("allowed_tokens", m).to(seqs.device), seqs.shape[0]
    if m.dim() == 2 and m.shape[0] not in (1, N):
        if m.shape[0] != prompts:
            raise ValueError(f"allowed_tokens has {m.shape[0]} rows: it takes 1, one per prompt ({prompts}) or one "
                             f"per sequence ({N})")
        m = m.repeat_interleave(N // prompts, dim=0)  # per prompt -> per sequence / beam
    return m.expand(N, V)


class _SequenceBias:
    """transformers' SequenceBiasLogitsProcessor: bias added to a token's logit where the sequence (prompt and
    padding included, as there) ends with the key's other tokens; a one-token key biases its token always."""

    def __init__(self, pairs):
        self.pairs, self._made = pairs, {}

    def _tensors(self, V, device):
        """(one-token biases [V], [(prefixes [G, L], last tokens [G], biases [G]) per prefix length L]), made once
        per vocabulary size and device."""
        if (V, device) not in self._made:
            top = max(i for ids in self.pairs for i in ids)
            if top >= V:
                raise ValueError(f"sequence_bias: token {top} is outside the vocabulary (V={V})")
            single = torch.zeros(V, dtype=torch.float32)
            groups = {}
            for ids, b in self.pairs.items():
                if len(ids) == 1:
                    single[ids[0]] = b
                else:
                    groups.setdefault(len(ids) - 1, []).append((ids, b))
            multi = [(torch.tensor([ids[:-1] for ids, _ in g], device=device),
                      torch.tensor([ids[-1] for ids, _ in g], device=device),
                      torch.tensor([b for _, b in g], dtype=torch.float32, device=device)) for g in groups.values()]
            self._made[(V, device)] = single.to(device), multi
        return self._made[(V, device)]

    def __call__(self, seqs, V):
        """float32 [N, V]: this step's bias."""
        single, multi = self._tensors(V, seqs.device)
        bias = single.expand(seqs.shape[0], V).clone()
        for prefixes, last, b in multi:
            L = prefixes.shape[1]
            if L <= seqs.shape[1]:  # (a prefix longer than the sequence matches nothing)
                hit = (seqs[:, None, -L:] == prefixes).all(-1)  # [N, G]
                bias.index_add_(1, last, torch.where(hit, b, torch.zeros_like(b)))
        return bias


def _typical_keep(z, mass):
    """bool [N, V]: the tokens transformers' TypicalLogitsWarper keeps (min_tokens_to_keep 1): those whose
    surprisal is closest to the entropy, taken by increasing distance until their probability reaches `mass` (the
    token reaching it included, and every token as close as it)."""
    logp = torch.log_softmax(z, -1)
    entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
    distance = (-logp - entropy).abs()
    by_distance, order = distance.sort(-1)
    cum = torch.softmax(z.gather(-1, order), -1).cumsum(-1)
    last = (cum < mass).sum(-1, keepdim=True).clamp(max=z.shape[-1] - 1)
    return distance <= by_distance.gather(-1, last)


def _cutoff_keep(z, epsilon, eta):
    """bool [N, V]: the tokens transformers' EpsilonLogitsWarper (eta False) / EtaLogitsWarper (eta True) keeps:
    probability >= the cutoff (epsilon; eta: min(epsilon, sqrt(epsilon) * exp(-entropy))), or the largest logit."""
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    cut = torch.full_like(p[:, :1], epsilon)
    if eta:  # (torch's Categorical entropy: log-probabilities clamped to the dtype's min, so 0 * -inf is 0)
        entropy = -(p * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1, keepdim=True)
        cut = torch.minimum(cut, math.sqrt(epsilon) * torch.exp(-entropy))
    return (p >= cut) | (z >= z.max(-1, keepdim=True)[0])


class _Processors:
    """transformers' logits processors that llmkern.sample has no filter for, in the order transformers' generate
    runs them (_get_logits_processor): sequence_bias (with logit_bias, before the penalties); after the banning
    rules forced_bos_token_id (the first new token of a one-token prompt), forced_eos_token_id (the last new token),
    remove_invalid_values (NaN -> 0, +-inf -> float32's max / min) and exponential_decay_length_penalty (eos
    logits raised by |logit| * (factor ** (new tokens - start) - 1) after `start` new tokens), then
    suppress_tokens; sampling's warpers typical_p, epsilon_cutoff, eta_cutoff after temperature, top-k, top-p and
    min-p; renormalize_logits last (a log-softmax: beam search's scores; greedy and sampled tokens do not change).
    Widths are transformers' cur_len: the sequence's, prompt padding included."""

    def __init__(self, T, max_new_tokens, eos, values):
        v = values
        self.max_length, self.eos = T + max_new_tokens, eos
        self.bos = v["forced_bos_token_id"]
        self.forced_eos = v["forced_eos_token_id"]
        self.seq_bias = None if v["sequence_bias"] is None else _SequenceBias(v["sequence_bias"])
        self.decay = v["exponential_decay_length_penalty"]
        self.decay_start = None if self.decay is None else self.decay[0] + T
        self.remove_invalid, self.renormalize = v["remove_invalid_values"], v["renormalize_logits"]
        self.typical_p, self.epsilon, self.eta = v["typical_p"], v["epsilon_cutoff"], v["eta_cutoff"]
        self.warps = self.typical_p < 1.0 or self.epsilon > 0.0 or self.eta > 0.0

    def bias(self, seqs, V):
        """float32 [N, V] sequence_bias for this step, or None."""
        return None if self.seq_bias is None else self.seq_bias(seqs, V)

    def forced(self, y, width):
        """forced_bos / forced_eos, remove_invalid_values, exponential_decay_length_penalty on scores y [N, V] at
        sequence width `width` (a Python int: no host sync)."""
        for ids, at in ((self.bos, 1), (self.forced_eos, self.max_length - 1)):
            if ids is not None and width == at:  # (every other token -inf, the forced ones 0, as transformers)
                y = torch.full_like(y, float("-inf"))
                y[:, ids] = 0.0
        if self.remove_invalid:
            y = torch.nan_to_num(y, nan=0.0)  # (+-inf: the dtype's max / min)
        if self.decay is not None and width > self.decay_start:
            try:
                grow = self.decay[1] ** (width - self.decay_start) - 1.0
            except OverflowError:
                grow = math.inf
            eos_logits = y[:, self.eos]
            boost = (eos_logits.abs() * grow).masked_fill(~torch.isfinite(eos_logits), 0.0)
            y = y.clone()
            y[:, self.eos] = eos_logits + boost
        return y

    def warp_filtered(self, z):
        """z [N, V] (scores / temperature after top-k / top-p / min-p) with typical_p, epsilon_cutoff, eta_cutoff's
        removed tokens -inf."""
        if self.typical_p < 1.0:
            z = z.masked_fill(~_typical_keep(z, self.typical_p), float("-inf"))
        for cutoff, eta in ((self.epsilon, False), (self.eta, True)):
            if cutoff > 0.0:
                z = z.masked_fill(~_cutoff_keep(z, cutoff, eta), float("-inf"))
        return z

    def warp(self, y, temperature, top_k, top_p, min_p):
        """Sampling's scores y [N, V] with the tokens transformers' warpers remove set to -inf: temperature, top-k,
        top-p, min-p ([N] tensors, filter_rows), then typical_p, epsilon_cutoff, eta_cutoff on what is left; the
        sampler then runs temperature alone on the result. Rows of temperature 0 (argmax) are filtered at 1."""
        from llmkern.ops.sampling import filter_rows

        y = _as_scores(y.float())  # (llmkern.sample's reading of NaN and +inf logits)
        z = filter_rows(y / torch.where(temperature > 0, temperature, 1.0)[:, None], top_k, top_p, min_p)
        z = self.warp_filtered(z)
        return y.masked_fill(z == float("-inf"), float("-inf"))


def _processors(values, strategy, T, max_new_tokens, eos, vocab, draft_model):
    """values (generate's arguments of _PROCESSOR_KNOBS, FROM_MODEL resolved) checked, as a _Processors, or None
    when none acts on the strategy's tokens or scores (renormalize_logits: beam search's only)."""
    v = {}
    for name in _PROCESSOR_KNOBS:
        default, _, ok, wanted = _KNOBS[name]
        x = v[name] = values[name]
        if not (x is None and default is None) and not ok(x, vocab):
            raise ValueError(f"{name} must be {wanted}" + (" or None" if default is None else "") + f", got {x!r}")
    v = dict(v, forced_bos_token_id=None if v["forced_bos_token_id"] is None else _as_int(v["forced_bos_token_id"]),
             forced_eos_token_id=None if v["forced_eos_token_id"] is None else _id_list(v["forced_eos_token_id"]),
             sequence_bias=None if v["sequence_bias"] is None else _bias_pairs(v["sequence_bias"]),
             exponential_decay_length_penalty=None if v["exponential_decay_length_penalty"] is None
             else _decay_pair(v["exponential_decay_length_penalty"]),
             typical_p=float(v["typical_p"]), epsilon_cutoff=float(v["epsilon_cutoff"]) % 1.0,
             eta_cutoff=float(v["eta_cutoff"]) % 1.0)  # (1: off, as 0)
    on = [n for n in _PROCESSOR_KNOBS if v[n] not in (_KNOBS[n][0], None) and n != "renormalize_logits"]
    refused = [n for n in on if n not in _WARPERS]
    if draft_model is not None and refused:
        raise ValueError(f"{', '.join(refused)}: not supported with draft_model (speculative decoding)")
    if v["exponential_decay_length_penalty"] is not None and eos is None:
        raise ValueError("exponential_decay_length_penalty raises the eos logits: it needs an eos_token_id")
    if not on and not (v["renormalize_logits"] and strategy == "beam"):
        return None
    return _Processors(T, max_new_tokens, eos, v)


class ChoiceConstraint:
    """Guided decoding over a fixed set of token sequences (vLLM's guided_choice): an allowed_tokens function
    that lets each row generate exactly one of `choices` (lists of token ids), then eos_token_id (and then
    nothing but it / pad: the row has finished).

        c = ChoiceConstraint([[12, 7], [12, 9, 4], [30]], vocab_size=V, prompt_len=x.shape[1], eos_token_id=2)
        out = generate(model, x, 4, allowed_tokens=c, eos_token_id=2)       # any strategy

    The choices form a trie; a row's allowed tokens are the children of the node its generated tokens
    (sequences[:, prompt_len:]) lead to, plus eos where a choice ends there (a choice that is a prefix of another
    may stop or go on). Without eos_token_id a completed choice allows only its continuations, and a row that
    completed one with none left gets every token (max_new_tokens should then be the longest choice; a shorter
    max_new_tokens returns a prefix of a choice). With beam search, beams beyond the valid completions come back
    as low-scored fillers (as transformers' beam search gives them). The walk
    starts from the root each step (O(tokens so far) per row, on the host), so it holds under beam search's
    reordering. A row outside the trie (possible only if the function was bypassed) allows eos alone."""

    def __init__(self, choices, vocab_size, prompt_len, eos_token_id=None):
        vocab_size = _int_arg("ChoiceConstraint: vocab_size", vocab_size, 1)
        prompt_len = _int_arg("ChoiceConstraint: prompt_len", prompt_len, 0)
        eos = None if eos_token_id is None else _as_int(eos_token_id)
        # (an int check let True through as token 1)
        if eos_token_id is not None and (torch.is_tensor(eos_token_id) or eos is None or not 0 <= eos < vocab_size):
            raise ValueError(f"ChoiceConstraint: eos_token_id must be None or a token id in [0, {vocab_size}), "
                             f"got {eos_token_id!r}")
        eos_token_id = eos
        if torch.is_tensor(choices) or not isinstance(choices, (list, tuple)) or not choices:
            raise ValueError(f"ChoiceConstraint: choices must be a non-empty list of token sequences (lists or 1-D "
                             f"tensors of ids), got {type(choices).__name__}")
        self.vocab_size, self.prompt_len, self.eos = vocab_size, prompt_len, eos_token_id
        self.root = {}
        for c in choices:
            ids = _choice_ids(c)
            if not ids or any(not 0 <= t < vocab_size for t in ids):
                raise ValueError(f"ChoiceConstraint: each choice must be a non-empty list of token ids in "
                                 f"[0, {vocab_size}), got {c!r}")
            if eos_token_id is not None and eos_token_id in ids[:-1]:  # (generation stops at the first eos)
                raise ValueError(f"ChoiceConstraint: choice {ids} holds eos_token_id={eos_token_id} before its end: "
                                 f"generation stops there, so it could never be produced")
            node = self.root
            for t in ids:
                node = node.setdefault(t, {})
            node[None] = True  # a choice ends here

    def _allowed_ids(self, generated):
        node = self.root
        for t in generated:
            if self.eos is not None and t == self.eos and node.get(None):  # finished: eos (then padding) only
                return [self.eos]
            node = node.get(t)
            if node is None:  # off the trie
                return None if self.eos is None else [self.eos]
        ids = [t for t in node if t is not None]
        if node.get(None) and self.eos is not None:
            ids.append(self.eos)
        return ids or None

    def __call__(self, seqs):
        if seqs.shape[1] < self.prompt_len:  # a wrong prompt_len would walk the trie from the wrong token
            raise ValueError(f"ChoiceConstraint: prompt_len={self.prompt_len} exceeds the sequences' width "
                             f"{seqs.shape[1]}; pass the prompt's width (input_ids.shape[1])")
        mask = torch.zeros(seqs.shape[0], self.vocab_size, dtype=torch.bool)
        for row, generated in enumerate(seqs[:, self.prompt_len:].tolist()):
            ids = self._allowed_ids(generated)
            if ids is None:
                mask[row] = True
            else:
                mask[row, ids] = True
        return mask.to(seqs.device)


def _choice_ids(c):
    """A ChoiceConstraint choice (a list / tuple of token ids, Python or numpy integers, or a 1-D integer tensor) as
    a list of ints, or None: int() truncated 1.7 to 1 and read True as 1 and the string "12" as [1, 2]."""
    if torch.is_tensor(c):
        if c.dim() != 1 or c.dtype == torch.bool or c.is_floating_point() or c.is_complex():
            return None
        return c.tolist()
    if not isinstance(c, (list, tuple)) or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                                   for t in c):
        return None
    return [int(t) for t in c]


def _score_terms(scorers, seqs, log_probs):
    total = torch.zeros_like(log_probs)
    N, V = log_probs.shape
    for alpha, f in scorers:
        v = f(seqs, log_probs)
        # (other row counts failed to broadcast deep in torch; a tensor on another device too)
        if not torch.is_tensor(v) or v.dim() not in (1, 2) or v.shape[-1] != V or (
                v.dim() == 2 and v.shape[0] not in (1, N)):
            raise ValueError(f"scorer {f!r} must return a tensor [N, V] = [{N}, {V}] (or [1, V], [V]), got "
                             f"{tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}")
        if v.device != log_probs.device:
            raise ValueError(f"scorer {f!r} returned a tensor on {v.device}; the log-probabilities are on "
                             f"{log_probs.device}")
        total = total + alpha * v.to(log_probs.dtype)
    return total


class _Stepper:
    """Runs the model one step at a time over a KV cache (or over the whole prefix without one),
    keeping the attention mask of left-padded prompts (None: no padding)."""

    def __init__(self, model, batch, max_len, use_cache, mask=None, prompt_logprobs=False):
        self.model, self.use_cache = model, use_cache
        self.cache = model.new_cache(batch, max_len) if use_cache else None
        self.mask = mask
        self.want_prompt, self.prompt_lp = prompt_logprobs, None  # (the first call's logits, every position)

    def __call__(self, seqs, n_new):
        """Logits (float32) of the last position, given sequences whose last n_new tokens are new."""
        ids = seqs[:, -n_new:] if self.use_cache else seqs
        recompute = getattr(self.model, "longrope_recompute", None)
        if self.cache is not None and self.cache.seqlen and recompute is not None and \
                recompute(self.cache.seqlen, seqs.shape[1]):
            # (LongRoPE switches to its long factors here: the cached keys, rotated with the short ones, are
            # computed again from the whole sequence, as transformers' Phi3ForCausalLM.generate drops its cache)
            self.cache.crop(0)
            ids = seqs
        kw = {}
        if self.mask is not None:
            if self.mask.shape[1] < seqs.shape[1]:  # generated tokens are real tokens
                grow = self.mask.new_ones(self.mask.shape[0], seqs.shape[1] - self.mask.shape[1])
                self.mask = torch.cat([self.mask, grow], 1)
            kw["attention_mask"] = self.mask
        if self.want_prompt:  # the prefill: every position's logits, once
            self.want_prompt = False
            logits = self.model(ids, cache=self.cache, **kw)
            self.prompt_lp = _prompt_logprobs(logits, ids, self.mask)
            return logits[:, -1, :].float()
        return self.model(ids, cache=self.cache, last_only=True, **kw)[:, -1, :].float()

    def output(self, out, input_ids, repeat=1):
        """`out` with the prompt's logprobs (a prefill here first if no step ran), rows repeated `repeat` times."""
        if self.want_prompt:
            self(input_ids, input_ids.shape[1])
        if self.prompt_lp is None:
            return out
        return dataclasses.replace(out, prompt_logprobs=self.prompt_lp.repeat_interleave(repeat, dim=0))

    def reorder(self, idx):
        if self.cache is not None:
            self.cache.reorder(idx)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, idx)


def _prompt_logprobs(logits, ids, mask):
    """float32 [B, T]: log p(ids[:, t] | ids[:, :t]) from the prefill's logits [B, T, V]; NaN at t = 0, at
    left padding and at a row's first real token (no real token before it)."""
    B, T = ids.shape
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    out = torch.cat([lp.new_full((B, 1), float("nan")), lp], dim=1)
    if mask is not None:
        seen = torch.cat([mask.new_zeros(B, 1), mask[:, :-1]], dim=1)
        out = out.masked_fill(~(mask & seen), float("nan"))
    return out


def _check_mask(attention_mask, input_ids, name="attention_mask", ids_name="input_ids"):
    """A left-padding mask [B, T] (1 = token, 0 = padding) as bool, or None when there is no padding. name /
    ids_name: the arguments' names for the errors (negative_prompt_attention_mask / negative_prompt_ids too)."""
    if attention_mask is None:
        return None
    if not torch.is_tensor(attention_mask) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"{name} must be a tensor shaped like {ids_name} {tuple(input_ids.shape)}, "
                         f"got {tuple(getattr(attention_mask, 'shape', ()))}")
    with_data(name, attention_mask)
    if attention_mask.is_complex() or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        # (bool() made -1 or 2 a token: positions then differed from transformers', which counts the values)
        raise ValueError(f"{name} values must be 0 (padding) or 1 (token)")
    m = attention_mask.to(input_ids.device).bool()
    if bool(m.all()):
        return None
    if not bool(m[:, -1].all()) or bool((m[:, 1:].long() - m[:, :-1].long() < 0).any()):
        raise ValueError(f"{name}: only left padding is supported for generation (each row: "
                         "zeros, then ones, ending with a real token)")
    return m


def _prefix_positions(model):
    """The prefix-tuning positions a zoo model puts in front of the tokens (they count against block_size)."""
    if getattr(model, "prefix_tuning", None) is None or not callable(getattr(model, "prefix_length", None)):
        return 0
    with torch.no_grad():
        return model.prefix_length(model.prefixes(1))


# ---- classifier-free guidance (transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor) ---------------

def _guidance_arg(model, guidance_scale):
    """(guidance_scale as a float or None, the name to blame): FROM_MODEL takes model.generation_config's."""
    name = "guidance_scale"
    if guidance_scale is FROM_MODEL:
        guidance_scale = getattr(getattr(model, "generation_config", None), "guidance_scale", None)
        name = "model.generation_config.guidance_scale"
    if guidance_scale is None:
        return None, name
    return _finite(name, guidance_scale, float32=True, why=" (the scores are float32)"), name


def _negative_prompt(ids, attention_mask, input_ids, vocab):
    """negative_prompt_ids checked (int64 [B, Tn], ids in the vocabulary), on input_ids' device, and its mask (bool
    [B, Tn], or None without padding)."""
    B = input_ids.shape[0]
    if not torch.is_tensor(ids) or ids.dim() != 2 or ids.dtype != torch.long or ids.shape[0] != B or \
            ids.shape[1] == 0:
        raise ValueError(f"negative_prompt_ids must be an int64 tensor [batch, seq] with one row per prompt ({B}) "
                         f"and at least one token, got {getattr(ids, 'dtype', type(ids))} "
                         f"{tuple(getattr(ids, 'shape', ()))}")
    ids = with_data("negative_prompt_ids", ids).to(input_ids.device)
    lo, hi = (int(v) for v in ids.aminmax())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(f"negative_prompt_ids: token ids must lie in [0, vocab_size={vocab}), got values in "
                         f"[{lo}, {hi}]")
    return ids, _check_mask(attention_mask, ids, "negative_prompt_attention_mask", "negative_prompt_ids")


def _check_guidance(scale, name, negative_ids, negative_mask, input_ids, strategy, num_beams, draft_model, vocab):
    """Classifier-free guidance's (scale, unconditional ids [B, Tn], bool mask [B, Tn] or None), or None where it
    is off: no guidance_scale, or 1 (transformers then adds no processor: not even its log-softmax). Without
    negative_prompt_ids they are each prompt's last token alone, as transformers'."""
    if negative_mask is not None and negative_ids is None:
        raise ValueError("negative_prompt_attention_mask needs negative_prompt_ids (the unconditional prompts it "
                         "masks)")
    if negative_ids is not None:
        if scale is None:
            raise ValueError("negative_prompt_ids need guidance_scale (classifier-free guidance, off without it): "
                             "they would be ignored")
        negative_ids, negative_mask = _negative_prompt(negative_ids, negative_mask, input_ids, vocab)
    if scale is None or scale == 1.0:
        return None
    if draft_model is not None or (strategy == "beam" and num_beams > 1):
        # (transformers' beam search runs the processor without reordering its unconditional cache with the beams,
        # so its rows follow no beam; speculative decoding would need the unconditional rows in the draft's and
        # the verify forwards)
        fix = "" if name == "guidance_scale" else "; pass guidance_scale=1 to decode without it"
        raise ValueError(f"{name}={scale}: classifier-free guidance is supported by strategy='greedy' and 'sample' "
                         f"(and num_beams=1), not by beam search or with draft_model{fix}")
    if negative_ids is None:
        return scale, input_ids[:, -1:], None
    return scale, negative_ids, negative_mask


def _guided(model, guidance, R, max_new_tokens, use_cache):
    """A _Guidance for _check_guidance's (scale, ids, mask) with each prompt's rows repeated R times (its returned
    sequences: transformers would not repeat them), or None."""
    if guidance is None:
        return None
    scale, ids, mask = guidance
    if R != 1:
        ids = ids.repeat_interleave(R, dim=0)
        mask = None if mask is None else mask.repeat_interleave(R, dim=0)
    return _Guidance(model, scale, ids, mask, max_new_tokens, use_cache)


class _Guidance:
    """transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor (the first of its processors): the scores become
    scale * (log_softmax(cond) - log_softmax(uncond)) + log_softmax(uncond), where uncond are the model's logits for
    the unconditional rows (the negative prompt, else the prompt's last token alone) followed by the tokens generated
    so far (pad after a row finished, as there), over a KV cache of their own (use_cache=False: the whole
    unconditional sequence each step, as transformers' processor without a cache). The rest of the processing
    (bias, penalties, masks, warpers) then runs on these scores, as transformers' processors and warpers do."""

    def __init__(self, model, scale, ids, mask, max_new_tokens, use_cache):
        self.scale, self.ids, self.n_new = scale, ids, ids.shape[1]
        self.step = _Stepper(model, ids.shape[0], ids.shape[1] + max_new_tokens, use_cache, mask)

    def __call__(self, seqs, T0, logits):
        """The guided scores [N, V] (float32) from the conditional logits of seqs [N, T0 + generated]."""
        uncond = self.step(torch.cat([self.ids, seqs[:, T0:]], 1), self.n_new)
        self.n_new = 1
        uncond = torch.log_softmax(uncond, dim=-1)
        return self.scale * (torch.log_softmax(logits.float(), dim=-1) - uncond) + uncond


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, *, strategy="greedy", eos_token_id=FROM_MODEL,
             pad_token_id=FROM_MODEL, temperature=FROM_MODEL, top_k=FROM_MODEL, top_p=FROM_MODEL, min_p=FROM_MODEL,
             repetition_penalty=FROM_MODEL, presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None, seed=None,
             num_beams=1, length_penalty=FROM_MODEL, early_stopping=FROM_MODEL, num_return_sequences=1,
             allowed_tokens=None, scorers=None, use_cache=True, return_dict=False, attention_mask=None,
             draft_model=None, num_draft_tokens=4, top_logprobs=0, min_new_tokens=FROM_MODEL,
             no_repeat_ngram_size=FROM_MODEL, bad_words_ids=FROM_MODEL, stop_sequences=None, prompt_logprobs=False,
             forced_bos_token_id=FROM_MODEL, forced_eos_token_id=FROM_MODEL, sequence_bias=FROM_MODEL,
             exponential_decay_length_penalty=FROM_MODEL, remove_invalid_values=FROM_MODEL,
             renormalize_logits=FROM_MODEL, typical_p=FROM_MODEL, epsilon_cutoff=FROM_MODEL, eta_cutoff=FROM_MODEL,
             stop_strings=FROM_MODEL, tokenizer=None, guidance_scale=FROM_MODEL, negative_prompt_ids=None,
             negative_prompt_attention_mask=None):
    """Continue `input_ids` [B, T] by up to `max_new_tokens` tokens (see the module docstring).

    eos_token_id, pad_token_id: FROM_MODEL (the default) takes them from `model.generation_config`, as
    transformers' generate takes model.generation_config's (from_hf sets it from the checkpoint's
    generation_config.json, else config.json; ids outside the vocabulary are dropped); a model without one has
    neither. eos_token_id=None: no eos (as in transformers). A pad still None is the first eos id, else 0.
    temperature, top_k, top_p, min_p (strategy="sample" only), repetition_penalty, min_new_tokens,
    no_repeat_ngram_size, bad_words_ids, length_penalty and early_stopping (strategy="beam" only): FROM_MODEL
    (the default) takes model.generation_config's value where it has one (not None), else the neutral value
    (1.0, 0, 1.0, 0.0, 1.0, 0, 0, None, 1.0, False); a value given here always wins. So a from_hf model decodes
    as transformers' generate(do_sample=strategy == "sample", num_beams=...) on the checkpoint, except for
    top_k: transformers samples with top_k=50 where the checkpoint sets none, generate (as vLLM) with no top-k
    (pass top_k=50 for transformers'). With draft_model, a model default that speculative decoding cannot apply
    (a repetition_penalty != 1, min_new_tokens, no_repeat_ngram_size, bad_words_ids) raises.
    model.generation_config's min_length (transformers': no eos while the sequence, prompt included, is shorter; the
    prompt counts its padded width input_ids.shape[1], as transformers' MinLengthLogitsProcessor compares
    input_ids.shape[-1], so it is min_new_tokens = min_length - T where that is more; dropped where min_new_tokens
    is given or set there, as transformers' min_new_tokens replaces it), suppress_tokens (banned at every step, eos
    included) and begin_suppress_tokens (banned at the first new token) apply to every strategy but speculative
    decoding, which raises; set the field to None to drop one. The keys of GenerationDefaults that generate does not
    apply warn (warnings.warn naming the key) where set to a value that changes transformers' output.
    forced_bos_token_id, forced_eos_token_id (an id or a list), sequence_bias ({(ids...): bias} or
    [[[ids...], bias], ...]), exponential_decay_length_penalty ((start, factor); needs an eos), remove_invalid_values,
    renormalize_logits (beam search's scores; no greedy or sampled token changes) and typical_p, epsilon_cutoff,
    eta_cutoff (strategy="sample" only: given to greedy / beam search they raise): transformers' options of those
    names with its semantics and order (_Processors), FROM_MODEL: the checkpoint's (None / neutral without). All but
    renormalize_logits and the sampling warpers (typical_p, epsilon_cutoff, eta_cutoff: applied to both models'
    distributions, so the output stays exactly the target's) raise with draft_model. Where one acts, the bias,
    penalties and masks run in torch before llmkern.sample (not in its kernel), and with a sampling warper so do
    temperature / top-k / top-p / min-p.
    attention_mask: [B, T], 1 = token, 0 = left padding (batched prompts of different lengths,
    transformers' convention: positions count real tokens only).
    draft_model: a smaller model with the same vocabulary and the same interface (plus
    `model(ids, cache=...)` returning logits of every position, and caches, its and the model's, with
    the zoo KVCache's per-row `crop(n [B], max_n=)`): speculative decoding, num_draft_tokens (k >= 1)
    proposals per step.
    top_logprobs: k > 0 (greedy and sample, with return_dict=True) adds, per generated position, the k
    most likely token ids and the raw log-probabilities of the model (see GenerationOutput).
    num_return_sequences: an int >= 1 (at most num_beams for beam search). Greedy decoding gives each prompt's rows
    the same tokens unless per-sequence values (logit_bias / allowed_tokens / penalties with B * R rows) tell them
    apart (transformers' greedy refuses num_return_sequences > 1).
    min_new_tokens, no_repeat_ngram_size, bad_words_ids: transformers' generate options of those names (any
    strategy but speculative): no eos before min_new_tokens new tokens (vLLM's min_tokens); no n-gram of
    no_repeat_ngram_size tokens twice in a sequence (its prompt and padding included, as HF counts); no
    sequence of bad_words_ids (lists of token ids; a one-token list bans the token, a longer one its last token
    after the others). They ban tokens as allowed_tokens does (and join its mask), so the outputs equal HF's.
    stop_sequences: lists of token ids (greedy, sample and beam search): a sequence stops once its generated tokens
    end with one of them (kept in the output, as HF's stop_strings keep theirs; pad_token_id follows), like an eos
    of several tokens (vLLM's stop, on token ids: no tokenizer here), from the min_new_tokens-th new token on (as
    vLLM's min_tokens, in every strategy; transformers' stop_strings do not wait). Beam search finishes a
    candidate that ends one as one ending with eos (transformers' beam search with a StoppingCriteria of that
    test; ranked by its length-penalised score, the stop sequence counted in its length); with num_beams=1
    (greedy) its score's length counts the new tokens up to the stop. draft_model refuses them.
    stop_strings, tokenizer: transformers' generate(stop_strings=..., tokenizer=...) (greedy and sample): a str or a
    list of them; a row stops (kept, pad_token_id after) once the text of its tokens, prompt included, holds one
    that ends inside its last token's text (it may begin in an earlier token or the prompt), matched on the
    tokenizer's token texts (UTF-8 bytes for byte-level / byte-fallback tokenizers) as transformers'
    StopStringCriteria matches them, from the first new token on (no wait for min_new_tokens). They need the
    tokenizer (ValueError without one); draft_model refuses them. Beam search (as transformers') finishes a candidate
    whose text ends a stop string as one ending with eos (then ranked by its length-penalised score); with
    num_beams=1 (greedy) its score's length counts the new tokens up to the stop. FROM_MODEL: the checkpoint's
    (generation_config.json's stop_strings) where tokenizer= is given; without one they are ignored with a warning
    (transformers raises). Unlike transformers without an eos_token_id, a stopped row is padded while others run.
    Building the match tables reads the whole vocabulary (Python: ~1 s for 128k tokens): they are kept per tokenizer
    object (weakly: they go with it) and its len(), for its 8 most recent stop string lists, so later calls reuse
    them (a tokenizer changed in place without a change of length, e.g. its decoder replaced, is not seen).
    guidance_scale, negative_prompt_ids, negative_prompt_attention_mask: transformers' classifier-free guidance
    (UnbatchedClassifierFreeGuidanceLogitsProcessor; greedy, sample, and beam search with num_beams=1): with a scale
    s != 1 the logits become s * (log_softmax(cond) - log_softmax(uncond)) + log_softmax(uncond) before any other
    processing (bias, penalties, masks, temperature and filters then act on these scores, as transformers' later
    processors and warpers do), uncond the model's logits for the unconditional rows: negative_prompt_ids [B, Tn]
    (int64, one row per prompt, left-padded with negative_prompt_attention_mask) else each prompt's last token alone,
    followed by the tokens generated so far, over a second KV cache (model.new_cache; use_cache=False: the whole
    unconditional sequence each step): one more forward per step. s == 1 or None: off (the negative prompt is then
    unused, as in transformers; given without any guidance_scale it raises). s < 1 weights the negative prompt
    towards a positive one (s = 0: decode from it). FROM_MODEL: the checkpoint's guidance_scale. Beam search with
    num_beams > 1 and draft_model refuse it (transformers' beam search does not reorder the unconditional rows with the
    beams). Differences from transformers: with num_return_sequences R > 1 each prompt's negative prompt is repeated
    for its R rows (transformers does not repeat it), and the unconditional rows' positions count real tokens (as the
    prompt's), where transformers' processor numbers a padded negative prompt's padding too (the same scores for
    rotary models like Llama, not for learned absolute positions, GPT-2). top_logprobs stay the model's raw
    (unguided) distribution.
    prompt_logprobs: True (with return_dict=True; any strategy but speculative) adds the raw log-probability of
    every prompt token given the tokens before it (GenerationOutput.prompt_logprobs [N, T], vLLM's
    prompt_logprobs; NaN at padding and at a row's first token), from the prefill's logits of every position
    (a [B, T, V] float32 log-softmax: memory to match).
    strategy="beam" with num_beams=1 is greedy decoding (transformers' generate(num_beams=1) is greedy
    search: a single beam does not go on past an eos for a better hypothesis), so early_stopping does not
    apply; return_dict=True still gives a beam's scores [B]: the sum of the chosen tokens' log-probabilities
    (greedy's: after logit_bias and allowed_tokens, without the scorers' terms) divided by (new tokens, eos
    included) ** length_penalty.
    Tensor knobs (temperature, top_k, top_p, min_p, the penalties, logit_bias, seed) are copied when generate is
    called: changing the caller's tensors in place while it runs (from a scorer, an allowed_tokens function or
    the model) has no effect, and the values checked at the first step are those used at every step."""
    if "llmkern.parallel" in sys.modules:  # tensor parallelism: every rank's arguments must agree (else a hang)
        sys.modules["llmkern.parallel"].guards.check_generate_agreement(model, locals())
    for name, m in (("model", model), ("draft_model", draft_model)):
        if (m is not None or name == "model") and not callable(m):
            raise TypeError(f"{name} must be a model (a zoo model, or callable as model(ids, cache=..., "
                            f"last_only=True)), got {type(m).__name__}")
    # flags: bool() read "False" as True (return_dict="False" returned a GenerationOutput)
    return_dict, use_cache = bool_arg("return_dict", return_dict), bool_arg("use_cache", use_cache)
    prompt_logprobs = bool_arg("prompt_logprobs", prompt_logprobs)
    top_logprobs = _check_top_logprobs(top_logprobs, strategy, return_dict, draft_model)
    if prompt_logprobs and (not return_dict or draft_model is not None):
        raise ValueError("prompt_logprobs needs return_dict=True and no draft_model")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be an int64 tensor [batch, seq], got "
                         f"{getattr(input_ids, 'dtype', type(input_ids))} {tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.shape[1] == 0:  # the first step conditions on the prompt's last token
        raise ValueError(f"input_ids must hold at least one token per row, got {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0:  # (raised new_cache's "batch must be an int >= 1")
        raise ValueError(f"input_ids must hold at least one row (prompt), got {tuple(input_ids.shape)}")
    with_data("input_ids", input_ids)
    max_new_tokens = _int_arg("max_new_tokens", max_new_tokens, 0)
    num_beams = _int_arg("num_beams", num_beams, 1)
    vocab = _vocab_size(model)
    min_length = _model_min_length(model, min_new_tokens)  # (before min_new_tokens' FROM_MODEL is resolved)
    given = (temperature, top_k, top_p, min_p, repetition_penalty, min_new_tokens, no_repeat_ngram_size, bad_words_ids,
             length_penalty, early_stopping, forced_bos_token_id, forced_eos_token_id, sequence_bias,
             exponential_decay_length_penalty, remove_invalid_values, renormalize_logits, typical_p, epsilon_cutoff,
             eta_cutoff)  # (_KNOBS' order)
    (temperature, top_k, top_p, min_p, repetition_penalty, min_new_tokens, no_repeat_ngram_size, bad_words_ids,
     length_penalty, early_stopping, *processor_values) = _model_knobs(model, strategy, draft_model is not None,
                                                                       vocab, given)
    processor_values = dict(zip(_PROCESSOR_KNOBS, processor_values))
    _warn_ignored(model, strategy, applied=() if tokenizer is None else ("stop_strings",))
    stop_strings, stop_strings_name = _stop_strings_arg(model, stop_strings, tokenizer)
    guidance_scale, guidance_name = _guidance_arg(model, guidance_scale)
    early_stopping = _early_stopping(early_stopping)
    _check_strategy_options(strategy, draft_model, num_draft_tokens,
                            dict(temperature=(temperature, 1.0), top_k=(top_k, 0), top_p=(top_p, 1.0),
                                 min_p=(min_p, 0.0), **{name: (processor_values[name], _KNOBS[name][0])
                                                        for name in ("typical_p", "epsilon_cutoff", "eta_cutoff")}),
                            dict(presence_penalty=(presence_penalty, 0.0), frequency_penalty=(frequency_penalty, 0.0)),
                            dict(early_stopping=(early_stopping, False), length_penalty=(length_penalty, 1.0)))
    if strategy == "beam":
        length_penalty = _length_penalty(length_penalty, max_new_tokens)
    num_return_sequences = _int_arg("num_return_sequences", num_return_sequences, 1)
    seed = _seed_arg(seed)
    block = getattr(getattr(model, "config", None), "block_size", None)
    P = _prefix_positions(model)
    if block is not None and P + input_ids.shape[1] + max_new_tokens > block:
        raise ValueError(f"max_new_tokens: {input_ids.shape[1]} + {max_new_tokens} exceeds the model's "
                         f"block_size={block}" + (f" with its {P} prefix-tuning positions" if P else ""))
    for name, m in (("model", model), ("draft_model", draft_model)):
        if getattr(m, "context_parallel", None) is not None:  # its forward takes sequence shards
            raise NotImplementedError(f"generate: {name} is context-parallel (llmkern.parallel.context_parallelize); "
                                      f"generate with the unsharded model")
    if _expert_parallel_group(model) is not None and (strategy == "beam" or draft_model is not None):
        raise NotImplementedError("generate: the model is expert-parallel (llmkern.parallel.expert_parallelize); "
                                  "beam search and speculative decoding with it are not supported (greedy and "
                                  "sampling are)")
    mask = _check_mask(attention_mask, input_ids)
    guidance = _check_guidance(guidance_scale, guidance_name, negative_prompt_ids, negative_prompt_attention_mask,
                               input_ids, strategy, num_beams, draft_model, vocab)
    if guidance is not None and block is not None and P + guidance[1].shape[1] + max_new_tokens > block:
        raise ValueError(f"negative_prompt_ids: {guidance[1].shape[1]} + max_new_tokens={max_new_tokens} exceeds "
                         f"the model's block_size={block}" + (f" with its {P} prefix-tuning positions" if P else ""))
    eos_token_id, pad_token_id = _token_defaults(model, eos_token_id, pad_token_id, vocab)
    eos = _eos_tensor(eos_token_id, input_ids.device, vocab)
    _check_sizes(input_ids.shape, max_new_tokens, strategy, draft_model, num_beams, num_return_sequences, eos)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if eos is not None else 0
    pad_token_id = _pad_id(pad_token_id, vocab)
    scorers = _scorers(scorers)
    rules, min_new_tokens, no_repeat_ngram_size = _check_rules(min_new_tokens, no_repeat_ngram_size, bad_words_ids)
    rules, min_new_tokens, suppress, begin_suppress = _model_rules(model, rules, min_new_tokens, min_length,
                                                                   input_ids.shape[1], draft_model is not None)
    proc = _processors(processor_values, strategy, input_ids.shape[1], max_new_tokens, eos, vocab, draft_model)
    stops = _check_stops(stop_sequences, strategy, draft_model, input_ids.device, vocab)
    if stops is not None:
        stops = _Stops(stops, min_new_tokens)
    _check_stop_strings(stop_strings, stop_strings_name, draft_model)
    if stop_strings is not None:  # (transformers' stop strings do not wait for min_new_tokens)
        strings = _stop_tables(stop_strings, tokenizer, vocab, input_ids.device)
        stops = strings if stops is None else _EitherStop(stops, strings)
    if torch.is_tensor(allowed_tokens):  # (moved once: a CPU mask's copy to a GPU each step would be a host sync)
        allowed_tokens = with_data("allowed_tokens", allowed_tokens).to(input_ids.device)
    if rules:
        if draft_model is not None:
            raise ValueError(f"{', '.join(rules)} are not supported with draft_model (speculative decoding)")
        # (transformers' begin_suppress_tokens wait for the forced bos of a one-token prompt)
        begin_at = input_ids.shape[1] + (input_ids.shape[1] == 1 and proc is not None and proc.bos is not None)
        allowed_tokens = _Banned(allowed_tokens, input_ids.shape[1], eos, min_new_tokens, no_repeat_ngram_size,
                                 bad_words_ids, suppress, begin_suppress, begin_at)
    if draft_model is not None:
        num_draft_tokens = _check_speculative(
            draft_model, input_ids, max_new_tokens, strategy, num_draft_tokens, num_beams,
            dict(repetition_penalty=(repetition_penalty, 1.0), presence_penalty=(presence_penalty, 0.0),
                 frequency_penalty=(frequency_penalty, 0.0)),
            allowed_tokens, scorers, use_cache, model)
    # generate's own copies of the tensor knobs, taken before any of the caller's code runs (the model, scorers, an
    # allowed_tokens function): the decode loop checks their values at its first step and trusts them from the
    # second on (a host sync per step saved), so the values it checked must be the values it uses. Once per call,
    # no sync: [B] tensors, logit_bias [V] / [B, V].
    temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, logit_bias, seed = (
        v.clone() if torch.is_tensor(v) else v
        for v in (temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty,
                  logit_bias, seed))
    if torch.is_tensor(logit_bias):  # (beam search moves it to the tokens' device: a meta one raised torch's error)
        with_data("logit_bias", logit_bias)
    if strategy != "beam" or draft_model is not None:  # per-prompt tensors -> per returned sequence
        B, R = input_ids.shape[0], num_return_sequences
        temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, logit_bias, \
            seed = (_per_sequence(name, v, B, R) for name, v in (
                ("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p),
                ("repetition_penalty", repetition_penalty), ("presence_penalty", presence_penalty),
                ("frequency_penalty", frequency_penalty), ("logit_bias", logit_bias), ("seed", seed)))
    elif seed is not None:  # (beam search draws nothing, but a seed it cannot take is refused as sampling refuses it)
        from llmkern.ops.speculative import row_seeds

        B, R = input_ids.shape[0], num_return_sequences
        row_seeds(_per_sequence("seed", seed, B, R), B * R, input_ids.device)
    prompts = input_ids.shape[0]  # (a per-prompt allowed_tokens spreads over the prompt's sequences)
    # eval mode while generating (dropout off), each module's mode restored after; a plain callable has none
    modes = [(m, m.training) for m in (model, draft_model) if isinstance(m, torch.nn.Module)]
    for m, _ in modes:
        m.eval()
    try:
        if draft_model is not None:
            if num_return_sequences != 1:
                input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
                mask = None if mask is None else mask.repeat_interleave(num_return_sequences, dim=0)
            out = _speculative_decode(model, draft_model, input_ids, max_new_tokens, strategy, eos, pad_token_id,
                                      dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                           warp=proc if proc is not None and proc.warps else None),
                                      logit_bias, seed, allowed_tokens, mask, num_draft_tokens, prompts)
        elif strategy == "beam":
            if not 1 <= num_return_sequences <= num_beams:
                raise ValueError(f"num_return_sequences must be in [1, num_beams={num_beams}], "
                                 f"got {num_return_sequences!r}")
            if num_beams == 1:  # greedy decoding, as transformers' generate runs for one beam
                out = _one_beam(model, input_ids, max_new_tokens, eos, pad_token_id, float(length_penalty),
                                logit_bias, allowed_tokens, scorers, use_cache, mask, repetition_penalty,
                                prompt_logprobs, proc, stops, _guided(model, guidance, 1, max_new_tokens, use_cache))
            else:
                out = _beam_search(model, input_ids, max_new_tokens, eos, pad_token_id, num_beams,
                                   float(length_penalty), early_stopping, num_return_sequences,
                                   logit_bias, allowed_tokens, scorers, use_cache, mask, repetition_penalty,
                                   prompt_logprobs, proc, stops)
        else:
            if num_beams != 1:
                raise ValueError(f"num_beams={num_beams} needs strategy='beam'")
            if num_return_sequences != 1:
                input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
                mask = None if mask is None else mask.repeat_interleave(num_return_sequences, dim=0)
            out = _decode(model, input_ids, max_new_tokens, strategy, eos, pad_token_id,
                          dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                               repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                               frequency_penalty=frequency_penalty),
                          logit_bias, seed, allowed_tokens, scorers, use_cache, mask, top_logprobs, prompts, stops,
                          prompt_logprobs, proc,
                          _guided(model, guidance, num_return_sequences, max_new_tokens, use_cache))
    finally:
        for m, mode in modes:
            m.train(mode)
    return out if return_dict else out.sequences


def _token_lists(v):
    """Whether v is a list (or tuple) of non-empty lists of token ids (ints >= 0)."""
    return isinstance(v, (list, tuple)) and all(
        isinstance(w, (list, tuple)) and len(w) > 0 and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in w) for w in v)


def _check_stops(stop_sequences, strategy, draft_model, device, vocab_size=None):
    """stop_sequences as int64 tensors on `device`, or None (ids checked against vocab_size unless None)."""
    if stop_sequences is None:
        return None
    if not _token_lists(stop_sequences):
        raise ValueError(f"stop_sequences must be a list of non-empty lists of token ids (ints >= 0), got "
                         f"{stop_sequences!r}")
    if draft_model is not None:
        raise ValueError("stop_sequences are supported by strategy='greedy', 'sample' and 'beam', not with "
                         "draft_model (speculative decoding)")
    top = max((i for w in stop_sequences for i in w), default=-1)
    if vocab_size is not None and top >= vocab_size:
        raise ValueError(f"stop_sequences: token {top} is outside the vocabulary (vocab_size={vocab_size})")
    return [torch.tensor(w, dtype=torch.long, device=device) for w in stop_sequences] or None


class _Stops:
    """The stop sequences, checked from the min_new_tokens-th generated token on (vLLM's min_tokens holds back
    stop sequences as well as eos: a row asked for at least that many tokens)."""

    def __init__(self, words, min_new_tokens):
        self.words, self.min_new = words, min_new_tokens

    def __call__(self, seqs, T0):
        """bool [N]: the generated tokens of seqs [N, t] (from column T0) end with one of the stop sequences."""
        done = torch.zeros(seqs.shape[0], dtype=torch.bool, device=seqs.device)
        n_new = seqs.shape[1] - T0
        if n_new < self.min_new:
            return done
        for w in self.words:
            if n_new >= w.numel():
                done |= (seqs[:, seqs.shape[1] - w.numel():] == w).all(-1)
        return done


# ---- stop strings (transformers' StopStringCriteria) -------------------------------------------------

_STOP_PREFIX = "abcdef"  # plain text decoded before each token, so a token's own text is what follows it


def _stop_string_units(tokenizer):
    """'bytes' when transformers matches this tokenizer's stop strings on UTF-8 bytes (a fast tokenizer whose decoder
    is or holds ByteLevel or ByteFallback: a token may hold part of a character), else 'text' (characters); and, for
    bytes, how raw-byte tokens read: 'byte_level' (GPT-2's alphabet) or 'byte_fallback' (<0xNN> pieces)."""
    import json

    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return "text", None
    if type(decoder).__name__ == "ByteLevel":
        return "bytes", "byte_level"
    try:
        state = decoder.__getstate__()
        state = json.loads(state.decode() if isinstance(state, bytes) else state)
    except (AttributeError, TypeError, ValueError):
        return "text", None
    from llmkern.guided import _json_has_type

    for kind in ("ByteFallback", "ByteLevel"):  # (both present: the <0xNN> tokens are the raw bytes)
        if _json_has_type(state, kind):
            return "bytes", "byte_fallback" if kind == "ByteFallback" else "byte_level"
    return "text", None


def _raw_byte(token, kind, alphabet):
    """The bytes a raw-byte token stands for (byte_level: every character in GPT-2's alphabet; byte_fallback:
    <0xNN>), else None."""
    if kind == "byte_level":
        return bytes(alphabet[c] for c in token) if all(c in alphabet for c in token) else None
    if kind == "byte_fallback" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        digits = token[3:5]
        if all(c in "0123456789abcdefABCDEF" for c in digits):
            return bytes([int(digits, 16)])
    return None


def _stop_token_texts(tokenizer, units, kind):
    """{token id: the text (str, or UTF-8 bytes) the token adds to decoded text}, for every entry of
    tokenizer.get_vocab() (special and added tokens included, as transformers reads them): raw-byte tokens by their
    bytes, the others decoded after a plain prefix (so a SentencePiece token keeps its leading space), the prefix
    cut off."""
    from llmkern.guided import _byte_alphabet

    alphabet = _byte_alphabet() if kind == "byte_level" else None
    prefix = tokenizer.convert_ids_to_tokens(tokenizer(_STOP_PREFIX, add_special_tokens=False)["input_ids"])
    texts = {}
    for token, idx in tokenizer.get_vocab().items():
        text = _raw_byte(token, kind, alphabet)
        if text is None:
            full = tokenizer.convert_tokens_to_string(list(prefix) + [token])
            if _STOP_PREFIX not in full:  # (transformers' criteria fail on such a tokenizer too)
                raise ValueError(f"stop_strings: the tokenizer does not give back the text {_STOP_PREFIX!r} it "
                                 f"tokenized (it decodes to {full!r}), which reading its tokens' text needs")
            text = full[full.index(_STOP_PREFIX) + len(_STOP_PREFIX):]
            text = text.encode("utf-8") if units == "bytes" else text
        texts[int(idx)] = text
    return texts


def _stop_strings_arg(model, stop_strings, tokenizer):
    """(stop strings as a list of str, the name to blame) or (None, None): stop_strings=FROM_MODEL takes
    model.generation_config.stop_strings where a tokenizer is given (without one it is ignored, with _IGNORED's
    warning); a str is one stop string. An explicit value needs tokenizer= (as transformers)."""
    name = "stop_strings"
    if stop_strings is FROM_MODEL:
        stop_strings = getattr(getattr(model, "generation_config", None), "stop_strings", None)
        if tokenizer is None:
            return None, None
        name = "model.generation_config.stop_strings"
    if stop_strings is None:
        return None, None
    words = [stop_strings] if isinstance(stop_strings, str) else stop_strings
    if not isinstance(words, (list, tuple)) or not words or not all(isinstance(w, str) and w for w in words):
        raise ValueError(f"{name} must be a non-empty string or a non-empty list of them, got {stop_strings!r}")
    if tokenizer is None:
        raise ValueError("stop_strings need the model's tokenizer: pass tokenizer= (a transformers tokenizer) to "
                         "generate; its tokens' text is what the stop strings are matched against")
    return list(words), name


def _check_stop_strings(words, name, draft_model):
    if words is not None and draft_model is not None:
        raise ValueError(f"{name} are supported by strategy='greedy' and 'sample' and by beam search, not with "
                         f"draft_model (speculative decoding)")


# tokenizer -> {(len(tokenizer), stop strings, vocab_size, device): _StopStrings}, the most recent _STOP_TABLES_KEPT
# per tokenizer: building the tables reads every token's text (Python, ~1 s for a 128k vocabulary), so generate does
# it once per tokenizer and stop strings. Weak keys: a tokenizer's entries go with it. Its length is in the key, so
# a token added in place (add_tokens) builds them again; other in-place changes (its decoder replaced) are not seen.
_STOP_TABLES = weakref.WeakKeyDictionary()
_STOP_TABLES_KEPT = 8


def _stop_tables(words, tokenizer, vocab_size, device):
    """_StopStrings(words, tokenizer, vocab_size, device), from _STOP_TABLES where it was built before."""
    key = (len(tokenizer), tuple(words), vocab_size, str(torch.device(device)))
    try:
        built = _STOP_TABLES.setdefault(tokenizer, {})
    except TypeError:  # (a tokenizer that is not weak-referenceable or hashable: built every call)
        return _StopStrings(words, tokenizer, vocab_size, device)
    tables = built.pop(key, None)  # (popped and put back: the dict's order is the use order)
    if tables is None:
        tables = _StopStrings(words, tokenizer, vocab_size, device)
        while len(built) >= _STOP_TABLES_KEPT:
            built.pop(next(iter(built)))
    built[key] = tables
    return tables


class _StopStrings:
    """transformers' StopStringCriteria: a row stops once the text of its tokens (prompt and padding included)
    holds a stop string that ends inside the text of its last token (it may start in an earlier token, even in the
    prompt, and run past the start of the earliest one). Texts are the tokenizer's (_stop_token_texts): characters,
    or UTF-8 bytes for byte-level / byte-fallback tokenizers. Only the last W tokens are read, W the longest stop
    string's length (as transformers: a token of empty text counts among them). Ids without text (outside the
    tokenizer's vocabulary) match nothing.

    On the device, per stop string s of n units, read backwards from the last token: the last token's text gives
    the numbers of s's last units it holds (s ends in it), each earlier token extends a partial match of p units
    when its text ends at s's unit n - p (or, running past s's start, ends with s's first n - p units), by its
    length. A match reaches n. Tables of bool: `ends` [R, S, M + 1] (which counts m in [1, n] a token's text
    starts a match with, M the longest n) and `fits` [R, S, D] (which partial counts p in [1, n) it extends),
    D = 2M + 1 (a count p < M plus a length clamped to M stays below D). A match started with m units has,
    when it reaches the k-th earlier token, m plus the lengths of the tokens between: known up front, so the
    whole window is read at once (a fixed number of kernels per step, whatever the stop strings' length).
    No host sync."""

    def __init__(self, words, tokenizer, vocab_size, device):
        units, kind = _stop_string_units(tokenizer)
        texts = _stop_token_texts(tokenizer, units, kind)
        targets = [w.encode("utf-8") if units == "bytes" else w for w in words]
        M = max(len(t) for t in targets)
        self.window, D, S = M, 2 * M + 1, len(targets)
        R = max(vocab_size or 0, max(texts, default=-1) + 1)  # row R: any id past both (no text)
        ends = torch.zeros(R + 1, S, D, dtype=torch.bool)
        fits = torch.zeros(R + 1, S, D, dtype=torch.bool)
        length = torch.zeros(R + 1, dtype=torch.long)
        marks = {"ends": ([], [], []), "fits": ([], [], [])}  # (rows, strings, counts), set at once below
        for idx, text in texts.items():
            length[idx] = min(len(text), M)
            for j, s in enumerate(targets):
                for table, counts in (("ends", _end_counts(text, s)), ("fits", _fit_counts(text, s))):
                    rows, js, cols = marks[table]
                    rows += [idx] * len(counts)
                    js += [j] * len(counts)
                    cols += counts
        for table, (rows, js, cols) in ((ends, marks["ends"]), (fits, marks["fits"])):
            table[torch.tensor(rows, dtype=torch.long), torch.tensor(js, dtype=torch.long),
                  torch.tensor(cols, dtype=torch.long)] = True
        if not ends.any():  # (as transformers: one that no token can end is let through while another can be)
            raise ValueError(f"stop_strings: no token of the tokenizer can end any of {words!r} (characters the "
                             f"vocabulary does not hold?), so they could never stop a row")
        # (a match starts with at most M units: ends' columns past M are empty)
        self.ends, self.fits, self.length = ends[:, :, :M + 1].to(device), fits.to(device), length.to(device)
        self.needed = torch.tensor([len(t) for t in targets], device=device)  # [S]: n
        self.strings = torch.arange(S, device=device)
        self.starts = torch.arange(M + 1, device=device)  # m

    def __call__(self, seqs, T0=None):
        """bool [N]: the rows of seqs [N, t] whose last token ends a stop string."""
        w = min(self.window, seqs.shape[1])
        ids = seqs[:, seqs.shape[1] - w:].flip(1).clamp(0, self.ends.shape[0] - 1)  # [N, w], the last token first
        start = self.ends[ids[:, 0]]  # [N, S, M + 1]: the counts m the last token starts
        earlier = ids[:, 1:]  # [N, w - 1]
        length = self.length[earlier]
        after = length.cumsum(1)  # [N, w - 1]: the lengths of the earlier tokens up to the k-th
        # the count a match started with m units has on reaching the k-th earlier token (clamped: the column
        # D - 1 = 2M fits nothing, as no count past it could)
        count = (self.starts + (after - length)[:, :, None]).clamp(max=self.fits.shape[-1] - 1)  # [N, w - 1, M + 1]
        fit = self.fits[earlier[:, :, None, None], self.strings[:, None], count[:, :, None, :]]  # [N, w - 1, S, M + 1]
        alive = fit.cummin(1).values  # every earlier token up to the k-th fits
        reached = (self.starts + after[:, :, None])[:, :, None, :] >= self.needed[:, None]  # [N, w - 1, S, M + 1]
        done = (self.starts >= self.needed[:, None]) | (alive & reached).any(1)  # [N, S, M + 1]
        return (start & done).flatten(1).any(1)


def _end_counts(text, s):
    """The numbers m in [1, len(s)] of s's last units that `text` holds with s ending inside it: s ends at some
    unit e of text (1-based), and text's units up to e are s's last min(e, len(s))."""
    n, counts = len(s), set()
    e = text.find(s[-1:])
    while e >= 0:
        m = min(e + 1, n)
        if text[e + 1 - m:e + 1] == s[n - m:]:
            counts.add(m)
        e = text.find(s[-1:], e + 1)
    return sorted(counts)


def _fit_counts(text, s):
    """The partial match counts p in [1, len(s)) that `text` extends: it ends where s's unmatched first n - p units
    end, and equals the units before that, or (longer) ends with all of them. An empty text fits every count."""
    n, counts = len(s), []
    if text and text[-1:] not in s:  # (it must end on one of s's units)
        return counts
    for p in range(1, n):
        rest = n - p
        if len(text) <= rest:
            ok = s[rest - len(text):rest] == text
        else:
            ok = text[len(text) - rest:] == s[:rest]
        if ok:
            counts.append(p)
    return counts


class _EitherStop:
    """Several stop tests (each (seqs, T0) -> bool [N]) as one: a row stops when any says so."""

    def __init__(self, *tests):
        self.tests = tests

    def __call__(self, seqs, T0):
        done = self.tests[0](seqs, T0)
        for test in self.tests[1:]:
            done = done | test(seqs, T0)
        return done


def _check_rules(min_new_tokens, no_repeat_ngram_size, bad_words_ids):
    """Validate generate's HF masking options; returns the names of those in use, min_new_tokens and
    no_repeat_ngram_size (as ints)."""
    min_new_tokens = _int_arg("min_new_tokens", min_new_tokens, 0, " (0: off)")
    no_repeat_ngram_size = _int_arg("no_repeat_ngram_size", no_repeat_ngram_size, 0, " (0: off)")
    if bad_words_ids is not None:
        if not _token_lists(bad_words_ids):
            raise ValueError(f"bad_words_ids must be a list of non-empty lists of token ids (ints >= 0), got "
                             f"{bad_words_ids!r}")
    rules = [name for name, on in (("min_new_tokens", min_new_tokens), ("no_repeat_ngram_size", no_repeat_ngram_size),
                                   ("bad_words_ids", bad_words_ids)) if on]
    return rules, min_new_tokens, no_repeat_ngram_size


def _per_sequence(name, v, B, R):
    """A per-prompt tensor (first dimension B) -> one row per returned sequence (B * R rows, prompt-major,
    as input_ids.repeat_interleave(R) and a per-prompt allowed_tokens): the prompt's value repeated, except
    seeds: sequence j of prompt b gets seed[b] + j (distinct sequences; an int seed s gives row r s + r, so
    a prompt run alone with seed[b] draws the same). Scalars, 0-dim tensors, a [V] logit_bias and tensors
    already per sequence (B * R rows) are returned as they are."""
    if R == 1 or not torch.is_tensor(v) or v.dim() == 0 or (name == "logit_bias" and v.dim() == 1):
        return v
    if v.shape[0] == B * R:
        return v
    if v.shape[0] != B:
        shape = "[B]" if name != "logit_bias" else "[B, V]"
        raise ValueError(f"{name} must be a scalar, a {shape} tensor with one row per prompt ({B}) or per returned "
                         f"sequence ({B * R}, num_return_sequences={R}), got {tuple(v.shape)}")
    if name == "seed":
        from llmkern.ops.speculative import row_seeds

        v = row_seeds(v, B, v.device)  # refuses bool / float seeds and other shapes
        return v.repeat_interleave(R) + torch.arange(R, device=v.device, dtype=v.dtype).repeat(B)
    return v.repeat_interleave(R, dim=0)


def _seed_arg(seed):
    """generate's seed as an int, a tensor or None: a 0-dim integer tensor and numpy's integers are ints (row r
    then draws with s + r; a 0-dim tensor spread over the rows gave every sequence of a prompt the same seed).
    row_seeds checks the rest where the seeds are made (a float or bool tensor would be truncated silently)."""
    from llmkern.ops.speculative import row_seeds

    if torch.is_tensor(seed) and seed.dim() == 0:  # (a meta one has no value to read)
        return int(row_seeds(with_data("seed", seed).reshape(1), 1, seed.device)[0])  # (refuses bool / float seeds)
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        return int(seed)
    return seed


def _length_penalty(length_penalty, max_new_tokens):
    """length_penalty as a finite float whose power of every new-token count up to max_new_tokens is a positive
    finite float (beam search divides the scores by it: a Python float power past 1e308 raised OverflowError,
    one below 5e-324 divided by 0)."""
    lp = _finite("length_penalty", length_penalty)
    try:
        ok = 0.0 < float(max(max_new_tokens, 1)) ** lp < math.inf
    except OverflowError:
        ok = False
    if not ok:
        raise ValueError(f"length_penalty={length_penalty!r}: max_new_tokens ** length_penalty ({max_new_tokens} ** "
                         f"{lp}) must be a positive finite float")
    return lp


def _check_sizes(shape, max_new_tokens, strategy, draft_model, num_beams, num_return_sequences, eos):
    """The rows generate makes (beam search: [B, keep beams, T + n] candidates, keep = max(2, 1 + eos ids) times
    num_beams; else B * num_return_sequences) times their length must count below 2**63: past that torch raised
    its "Overflow when unpacking long long" without naming the argument."""
    B, T = shape
    beam = strategy == "beam" and draft_model is None
    rows = B * num_beams * max(2, 1 + (0 if eos is None else eos.numel())) if beam else B * num_return_sequences
    if rows * (T + max_new_tokens) >= _INT64_LIMIT:
        name, v = ("num_beams", num_beams) if beam else ("num_return_sequences", num_return_sequences)
        raise ValueError(f"{name}={v} is too large: {rows} rows of {T + max_new_tokens} tokens exceed 2**63 elements")


def _check_top_logprobs(k, strategy, return_dict, draft_model):
    """top_logprobs as an int (0: off), checked against the other options."""
    k = _int_arg("top_logprobs", k, 0)
    if k == 0:
        return k
    if not return_dict:
        raise ValueError("top_logprobs needs return_dict=True (they are fields of the GenerationOutput)")
    if strategy == "beam":
        raise ValueError("top_logprobs is supported for strategy='greedy' and 'sample', not beam search")
    if draft_model is not None:
        raise ValueError("top_logprobs is not supported with draft_model (speculative decoding)")
    return k


class _TopLogprobs:
    """Collects top_logprobs per step for _decode (k > 0 only: the default path does none of this)."""

    def __init__(self, k):
        self.k, self.steps = k, []

    def add(self, logits, tok, unfinished):
        from llmkern.ops.sampling import _constant_row, top_logprobs_rows

        B, V = logits.shape
        if self.k > V:
            raise ValueError(f"top_logprobs={self.k} exceeds the vocabulary size {V}")
        # raw: temperature 1; tok comes from the sampler (in range), so no validation sync per step
        r = top_logprobs_rows(logits, self.k, _constant_row(1.0, B, logits.device, torch.float32), tok)
        live = unfinished[:, None]
        self.steps.append((torch.where(live, r.ids, -1), torch.where(live, r.logprobs, 0.0),
                           torch.where(unfinished, r.token_logprobs, 0.0), torch.where(unfinished, r.token_ranks, 0)))

    def fill(self, out, B, dev):
        if self.steps:
            ids, lps, tok_lps, ranks = (torch.stack(parts, 1) for parts in zip(*self.steps))
        else:
            ids, lps = torch.zeros(B, 0, self.k, dtype=torch.long, device=dev), torch.zeros(B, 0, self.k, device=dev)
            tok_lps, ranks = torch.zeros(B, 0, device=dev), torch.zeros(B, 0, dtype=torch.long, device=dev)
        return dataclasses.replace(out, top_logprob_ids=ids, top_logprobs=lps, raw_logprobs=tok_lps, token_ranks=ranks)


def _expert_parallel_group(model):
    """The process group of `model`'s expert-parallel layers, or None. Their all-to-all runs at every forward, so
    every rank of it must take the same number of decode steps (see _decode)."""
    import sys

    expert = sys.modules.get("llmkern.parallel.expert")  # (never imported: no such layer exists)
    if expert is None or not isinstance(model, torch.nn.Module):
        return None
    return next((m.group for m in model.modules() if isinstance(m, expert.ExpertParallelMoE)), None)


class _StepsAgreed:
    """Expert parallelism: each rank decodes its own prompts, but every forward exchanges tokens with the other
    ranks, so a rank whose rows have all finished keeps stepping (its rows padded) until every rank's have, and
    its output is cut back to where its own rows finished: the same as decoding alone. max_new_tokens must agree."""

    def __init__(self, group, max_new_tokens):
        from llmkern.parallel import comm

        self.group, self.done_at = group, None
        rows = comm.gather_ints([max_new_tokens], group)
        if any(r != rows[0] for r in rows):
            raise ValueError(f"generate: max_new_tokens differs across the expert-parallel ranks "
                             f"({[r[0] for r in rows]}): every rank must decode the same number of steps")

    def flags(self, stuck, unfinished, length):
        """(any row stuck on any rank, any row unfinished on any rank); notes where this rank's rows ended."""
        from llmkern.parallel import comm

        f = torch.stack([stuck.any(), unfinished.any()]).to(torch.int64)
        f = f.to(comm._meta_device(f, self.group))
        every = f.new_empty(comm.world_size(self.group) * 2)
        comm.all_gather_into(every, f, self.group)  # every rank's flags, read in one sync (this rank's among them)
        rows = every.view(-1, 2).tolist()
        if self.done_at is None and not rows[comm.rank(self.group)][1]:
            self.done_at = length
        return [max(r[0] for r in rows), max(r[1] for r in rows)]


def _decode(model, input_ids, max_new_tokens, strategy, eos, pad, knobs, logit_bias, seed,
            allowed_tokens, scorers, use_cache, mask, top_logprobs, prompts, stops=None, prompt_logprobs=False,
            proc=None, guidance=None, return_lengths=False):
    """Greedy or sampled decoding of input_ids [N, T] (each prompt's rows repeated: `prompts` of them); stops:
    token sequences (int64 tensors) that end a row as an eos does; proc: a _Processors or None; guidance: a
    _Guidance (classifier-free guidance: the first processing of the logits) or None. return_lengths: (output,
    int64 [N] new tokens per row up to and including the one that stopped it), counted while decoding."""
    from llmkern.ops.speculative import row_seeds

    B, T0 = input_ids.shape
    dev = input_ids.device
    seqs = input_ids
    # the tokens the penalties count: left padding is not a token (-1, as transformers skips it).
    # The repetition penalty counts the prompt and the output (HF, vLLM), presence / frequency
    # penalties the output only (vLLM, OpenAI): it starts at column T0 of prev.
    prev = input_ids if mask is None else input_ids.masked_fill(~mask, -1)
    # the sampler's position per row counts real tokens, so a row draws the same tokens whatever
    # padding its batch needs
    position = torch.full((B,), T0, dtype=torch.long, device=dev) if mask is None else mask.sum(-1).long()
    step = _Stepper(model, B, T0 + max_new_tokens, use_cache, mask, prompt_logprobs)
    unfinished = torch.ones(B, dtype=torch.bool, device=dev)
    lengths = torch.zeros(B, dtype=torch.long, device=dev) if return_lengths else None
    logps = []
    tops = _TopLogprobs(top_logprobs) if top_logprobs else None
    seeds = None if seed is None else row_seeds(seed, B, dev)  # int s: row r gets s + r
    # without a penalty (scalars at their neutral values) the sampler gets no prev_tokens: no [B, V] count
    # pass per step, and the bias stays in its kernel
    neutral = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    penalised = any(torch.is_tensor(knobs[k]) or knobs[k] != v for k, v in neutral.items())
    ep = _expert_parallel_group(model)
    agreed = None if ep is None else _StepsAgreed(ep, max_new_tokens)
    n_new = T0
    checked_V = None  # the vocabulary size the first step's sample call checked the tensor arguments against
    for _ in range(max_new_tokens):
        raw = logits = step(seqs, n_new)  # (top_logprobs: the model's own distribution, unguided)
        if guidance is not None:
            logits = guidance(seqs, T0, logits)
        n_new = 1
        V = logits.shape[-1]
        allow = _allowed(allowed_tokens, seqs, V, prompts, "all" if proc is None else "early")
        kw = dict(knobs, prev_tokens=prev if penalised else None, output_start=T0 if penalised else None,
                  logit_bias=logit_bias, allowed_tokens=allow, return_logprobs=True)
        if proc is not None:  # (the bias and penalties then run here, not in the sampler)
            kw = dict(kw, prev_tokens=prev, output_start=T0, late=_allowed(allowed_tokens, seqs, V, prompts, "late"))
        # The first step's sample call checks the values of the tensor arguments (per-row knobs, seeds,
        # positions, prev_tokens: the prompt); later steps pass the same knobs and seeds (generate's own copies:
        # the caller's code cannot change them), positions one higher
        # and prev_tokens grown by sampled tokens (in [0, V)) or pad (in range when pad < V): their checks
        # could not fail, and each would cost a host sync per step on CUDA (see tests/test_host_syncs.py).
        trusted = checked_V == V and pad < V
        checked_V = V
        tok, lp_tok, valid = _decode_draw(strategy, logits, prev, T0, kw, scorers, seqs, allow, seeds, position,
                                          trusted, proc)
        stuck = unfinished & ~valid
        if tops is not None:
            tops.add(raw, tok, unfinished)
        tok = torch.where(unfinished, tok, torch.full_like(tok, pad))
        logps.append(torch.where(unfinished, lp_tok.float(), torch.zeros_like(lp_tok.float())))
        seqs = torch.cat([seqs, tok[:, None]], dim=1)
        prev = torch.cat([prev, tok[:, None]], dim=1)
        position = position + 1
        if lengths is not None:  # (this step's token is the row's while it was unfinished: its eos / stop too)
            lengths += unfinished
        if eos is not None:
            unfinished &= ~torch.isin(tok, eos)
        if stops is not None:
            unfinished &= ~stops(seqs, T0)
        if agreed is None:
            any_stuck, any_left = torch.stack([stuck.any(), unfinished.any()]).tolist()  # one sync
        else:
            any_stuck, any_left = agreed.flags(stuck, unfinished, seqs.shape[1])
            if any_stuck and not bool(stuck.any()):
                raise RuntimeError("generate: another expert-parallel rank has a sequence with no token to choose")
        if any_stuck:
            _raise_stuck(stuck, allow, seqs.shape[1] - 1 - T0)
        if not any_left:
            break
    if agreed is not None and agreed.done_at is not None:  # (this rank's rows ended before the others')
        seqs, logps = seqs[:, :agreed.done_at], logps[:agreed.done_at - T0]
        if tops is not None:
            tops.steps = tops.steps[:agreed.done_at - T0]
    scores = torch.stack(logps, 1) if logps else torch.zeros(B, 0, device=dev)
    out = step.output(GenerationOutput(seqs, scores), input_ids)
    out = out if tops is None else tops.fill(out, B, dev)
    return (out, lengths) if return_lengths else out


def _decode_draw(strategy, logits, prev, T0, kw, scorers, seqs, allow, seeds, position, trusted=False, proc=None):
    """One step's (tokens, their log-probabilities, valid rows) for _decode. trusted: the library's own calls
    (sample, the penalties) skip the value checks of their tensor arguments (_checks.trusted); the scorers run
    outside that block: they are the caller's code, which may call llmkern.sample or generate itself, and
    those calls must be checked."""
    from llmkern.ops import _checks
    from llmkern.ops.sampling import sample

    def lib(fn, /, *args, **kwargs):
        """fn(*args, **kwargs), a call into the library, trusted when this step is; its arguments are made
        before (outside the block)."""
        if not trusted:
            return fn(*args, **kwargs)
        with _checks.trusted():
            return fn(*args, **kwargs)

    late = kw.pop("late", None)
    if proc is not None:  # transformers' processors in its order; the sampler then gets processed logits
        logits = lib(_processed, logits, prev, T0, kw, proc, seqs, late)
        kw.update(prev_tokens=None, output_start=None, logit_bias=None, allowed_tokens=None, repetition_penalty=1.0,
                  presence_penalty=0.0, frequency_penalty=0.0)
        allow = None
    if strategy == "greedy":
        kw["temperature"] = 0.0
        if scorers:  # argmax of log p + Σ α f over the processed (biased, penalised, masked) distribution
            lp = lib(_processed_logprobs, logits, prev, T0, kw)
            score = _as_scores(lp + _score_terms(scorers, seqs, lp))
            tok = score.argmax(-1)
            lp_tok = lp.gather(1, tok[:, None])[:, 0]
            valid = (score > float("-inf")).any(-1)
            return tok, lp_tok, valid
        return lib(sample, logits, **kw, return_valid=True)
    kw["seed"] = seeds
    kw["position"] = position if seeds is not None else None
    if scorers:  # Σ α f added to the biased, penalised logits (as greedy adds it after them), f given
        # the processed log-probabilities, as greedy and beam search give them
        y = lib(_penalised, logits, prev, T0, kw)
        terms = _score_terms(scorers, seqs, _log_softmax(y if allow is None else
                                                         y.masked_fill(~allow, float("-inf"))))
        kw.update(prev_tokens=None, output_start=None, logit_bias=terms, repetition_penalty=1.0,
                  presence_penalty=0.0, frequency_penalty=0.0)  # (the penalties are in y)
        logits = y
    if proc is not None and proc.warps:  # (top-k / top-p / min-p run in the warp, before typical / epsilon / eta)
        logits = lib(_warped, logits if kw["logit_bias"] is None else logits + kw["logit_bias"], kw, proc)
        kw.update(logit_bias=None, top_k=0, top_p=1.0, min_p=0.0)
    return lib(sample, logits, **kw, return_valid=True)


def _processed(logits, prev, T0, kw, proc, seqs, late):
    """float32 [N, V]: greedy's and sampling's scores through transformers' processors (_Processors' order):
    logit_bias + sequence_bias, the penalties, allowed_tokens and the early bans, the forced tokens /
    remove_invalid_values / exponential_decay_length_penalty, the suppressed ids."""
    N, V = logits.shape
    bias = proc.bias(seqs, V)
    if bias is not None and kw["logit_bias"] is not None:
        from llmkern.ops.sampling import _side_tensor

        bias = bias + _side_tensor("logit_bias", kw["logit_bias"], N, V, logits.device).float()
    y = _penalised(logits, prev, T0, dict(kw, logit_bias=bias if bias is not None else kw["logit_bias"]))
    if kw["allowed_tokens"] is not None:
        y = y.masked_fill(~kw["allowed_tokens"], float("-inf"))
    y = proc.forced(y, seqs.shape[1])
    return y if late is None else y.masked_fill(~late, float("-inf"))


def _warped(y, kw, proc):
    """Sampling's scores y [N, V] through temperature, top-k, top-p, min-p and the warpers (_Processors.warp)."""
    from llmkern.ops.sampling import _sample_params

    t, k, p, m = _sample_params(y.shape[0], y.device, kw["temperature"], kw["top_k"], kw["top_p"], kw["min_p"],
                                1.0, 0.0, 0.0)[:4]
    return proc.warp(y, t, k, p, m)


# ---- speculative decoding ------------------------------------------------------------------------------

def _check_speculative(draft, input_ids, max_new_tokens, strategy, k, num_beams, penalties, allowed_tokens,
                       scorers, use_cache, model):
    if strategy == "beam" or num_beams != 1:
        raise ValueError("draft_model: speculative decoding runs strategy='greedy' or 'sample', not beam search")
    k = _int_arg("num_draft_tokens", k, 1)
    for name, (v, default) in penalties.items():
        if torch.is_tensor(v) or v != default:
            raise ValueError(f"{name} is not supported with draft_model (speculative decoding)")
    if scorers:
        raise ValueError("scorers are not supported with draft_model (speculative decoding)")
    if callable(allowed_tokens):
        raise ValueError("allowed_tokens as a function is not supported with draft_model (speculative decoding); "
                         "pass a bool tensor [V] or [B, V]")
    if not use_cache:
        raise ValueError("draft_model needs use_cache=True (speculative decoding cuts the KV caches back)")
    for name, m in (("model", model), ("draft_model", draft)):
        if not callable(getattr(m, "new_cache", None)):
            raise ValueError(f"{name} must have new_cache(batch, max_len) (a zoo model) for speculative decoding")
        crosses = getattr(m, "longrope_recompute", None)  # (some step n in [T0, T0 + max_new) has n <= original < n + 1)
        if crosses is not None and crosses(input_ids.shape[1], input_ids.shape[1] + max_new_tokens):
            raise ValueError(f"max_new_tokens: {name}'s LongRoPE switches to its long factors during this generation "
                             f"(its cached keys would need computing again): not supported with draft_model")
    cfg, draft_cfg = getattr(model, "config", None), getattr(draft, "config", None)
    block = getattr(draft_cfg, "block_size", None)
    P = _prefix_positions(draft)
    if block is not None and P + input_ids.shape[1] + max_new_tokens > block:
        raise ValueError(f"max_new_tokens: {input_ids.shape[1]} + {max_new_tokens} exceeds the draft model's "
                         f"block_size={block}" + (f" with its {P} prefix-tuning positions" if P else ""))
    v, v_draft = getattr(cfg, "vocab_size", None), getattr(draft_cfg, "vocab_size", None)
    if v is not None and v_draft is not None and v != v_draft:
        raise ValueError(f"draft_model must share the model's vocabulary: vocab_size {v_draft} != {v}")
    for name, c in (("model", cfg), ("draft_model", draft_cfg)):
        if getattr(c, "n_experts", 0) and getattr(c, "moe_capacity_factor", None) is not None:
            # an expert's capacity counts the tokens of one forward: the target's K + 1 verified positions would
            # drop other pairs than one-token decoding, changing the distribution speculation must reproduce
            raise ValueError(f"{name}: a MoE with moe_capacity_factor={c.moe_capacity_factor} is not supported with "
                             f"draft_model (speculative decoding); build it with moe_capacity_factor=None")
    # a step proposes at most the tokens left: more is the same decoding (a huge k sized the token buffer past
    # int64, torch's "Overflow when unpacking long long")
    return min(k, max(max_new_tokens, 1))


def _spec_scores(logits, bias, allow):
    """[B, n, V] float32: logits + logit_bias, disallowed tokens -inf, NaN -inf (llmkern.sample's order)."""
    y = logits.float()
    if bias is not None:
        y = y + (bias.float() if bias.dim() == 1 else bias.float()[:, None])
    if allow is not None:
        y = y.masked_fill(~allow[:, None], float("-inf"))
    return torch.nan_to_num(y, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))


def _spec_probs(y, knobs):
    """The distribution llmkern.sample draws from, [B, n, V]: scores / temperature, top-k, top-p, min-p
    (top_k_top_p_filter on knobs["filter_rows"], validated once by _speculative_decode), then typical_p /
    epsilon_cutoff / eta_cutoff (knobs["warp"], a _Processors, as plain sampling's _Processors.warp), softmax;
    +inf scores share their row's mass."""
    from llmkern.ops.sampling import filter_rows

    B, n, V = y.shape
    t = knobs["temperature"]
    y = y / (t.to(device=y.device, dtype=y.dtype).view(B, 1, 1) if torch.is_tensor(t) else float(t))
    flat = y.reshape(B * n, V)
    pinf = torch.isposinf(flat)
    flat = torch.where(pinf.any(-1, keepdim=True),
                       torch.where(pinf, torch.zeros_like(flat), torch.full_like(flat, float("-inf"))), flat)
    if knobs["filter_rows"] is not None:  # per-sequence [B] values -> per (sequence, position) row
        flat = filter_rows(flat, *(v.repeat_interleave(n) for v in knobs["filter_rows"]))
    if knobs.get("warp") is not None:
        flat = knobs["warp"].warp_filtered(flat)
    return torch.softmax(flat, -1).view(B, n, V)


def _speculative_decode(model, draft, input_ids, max_new_tokens, strategy, eos, pad, knobs, logit_bias, seed,
                        allowed_tokens, mask, k, prompts):
    """Speculative decoding (module docstring): each step the draft proposes K tokens per row, the target
    scores K + 1 per row in one forward, every row keeps its own accepted run, and both caches are cut
    back per row."""
    from llmkern.ops.sampling import _sample_params

    B, T0 = input_ids.shape
    dev = input_ids.device
    _, top_k, top_p, min_p = _sample_params(B, dev, knobs["temperature"], knobs["top_k"], knobs["top_p"],
                                            knobs["min_p"], 1.0, 0.0, 0.0)[:4]
    neutral = not any(torch.is_tensor(knobs[n]) for n in ("top_k", "top_p", "min_p")) \
        and (knobs["top_k"], knobs["top_p"], knobs["min_p"]) == (0, 1.0, 0.0)
    # the validated [B] tensors: the filter runs twice a step and must not re-check (a host sync) each time
    t = knobs["temperature"]
    if torch.is_tensor(t) and t.dim() == 0:  # (one temperature for every row, as a number)
        t = float(t)
    knobs = dict(knobs, temperature=t, filter_rows=None if neutral else (top_k, top_p, min_p))
    greedy = strategy == "greedy" or (not torch.is_tensor(t) and t == 0)
    if not greedy and torch.is_tensor(t) and not bool((t > 0).all()):
        raise ValueError("temperature: rows with temperature 0 (greedy) are not supported with draft_model and "
                         "strategy='sample'; use strategy='greedy'")
    if max_new_tokens == 0:
        zeros = torch.zeros(B, dtype=torch.long, device=dev)
        return GenerationOutput(input_ids, torch.zeros(B, 0, device=dev), zeros, zeros.clone())
    s = _Speculation(model, draft, input_ids, max_new_tokens, greedy, eos, pad, knobs, logit_bias, seed,
                     allowed_tokens, mask, k, prompts)
    K = min(k, max_new_tokens - 1)  # proposals per row this step (the same for every row)
    while True:
        stats = s.step(K)
        if stats is None:
            break
        lo, hi = stats  # the fewest / most tokens generated by an unfinished row
        # a row's caches hold its tokens but the last one or two, and it reads K + 1 more: every row must
        # fit in max_len, and K = (room of the row furthest behind) - 1 is all that row can use
        K = min(k, max_new_tokens - hi, max_new_tokens - lo - 1)
    return s.output()


class _Speculation:
    """Speculative decoding's state. Per row: its tokens buf [B, width] (prompt, then generated tokens,
    then padding), gen (tokens generated), unfinished. Row b's sequence is buf[b, :T0 + gen[b]]; between
    steps the target's cache holds all of it but the last token, the draft's all but the last two (so
    that every row feeds the same number of tokens, whether or not the draft had proposed its last token)."""

    def __init__(self, model, draft, input_ids, max_new_tokens, greedy, eos, pad, knobs, logit_bias, seed,
                 allowed_tokens, mask, k, prompts):
        from llmkern.ops.speculative import row_seeds

        B, T0 = input_ids.shape
        dev = self.dev = input_ids.device
        self.model, self.draft, self.greedy, self.eos, self.pad, self.knobs = model, draft, greedy, eos, pad, knobs
        self.T0, self.max_new = T0, max_new_tokens
        self.seeds = None if greedy else row_seeds(seed, B, dev)
        max_len = T0 + max_new_tokens
        self.tcache, self.dcache = model.new_cache(B, max_len), draft.new_cache(B, max_len)
        for name, c in (("model", self.tcache), ("draft_model", self.dcache)):
            if not callable(getattr(c, "crop", None)):
                raise ValueError(f"{name}.new_cache() must return a cache with crop(n) taking per-row lengths "
                                 f"for speculative decoding (the zoo's KVCache)")
        width = max_len + k + 1  # a step writes k + 1 columns after a row's end (the rejected ones: padding)
        self.full_mask = None if mask is None else torch.cat([mask, mask.new_ones(B, width - T0)], 1)
        self.buf = torch.full((B, width), pad, dtype=torch.long, device=dev)
        self.buf[:, :T0] = input_ids
        self.logps = torch.zeros(B, width - T0, device=dev)
        self.gen = torch.zeros(B, dtype=torch.long, device=dev)
        self.unfinished = torch.ones(B, dtype=torch.bool, device=dev)
        self.proposed, self.kept = self.gen.clone(), self.gen.clone()
        # the sampler's position per row counts real tokens (as in _decode)
        self.position = torch.full((B,), T0, dtype=torch.long, device=dev) if mask is None else mask.sum(-1).long()
        self.side = dict(bias=logit_bias, allowed=allowed_tokens, input_ids=input_ids, prompts=prompts)
        self.t_len = self.d_len = 0  # host bounds (max over rows) of the target's / draft's cache lengths
        self.first = True
        self.top = 0  # the most tokens generated by a row

    def forward(self, m, cache, start, ids, last_only):
        kw = {} if self.full_mask is None else {"attention_mask": self.full_mask[:, :start + ids.shape[1]]}
        return m(ids, cache=cache, last_only=last_only, **kw).float()

    def scores(self, logits, who):
        from llmkern.ops.sampling import _side_tensor

        V, side = logits.shape[-1], self.side
        if "V" not in side:  # logit_bias and the allowed mask, checked once the vocabulary is known
            B = logits.shape[0]
            side["V"] = V
            side["bias"] = None if side["bias"] is None else _side_tensor("logit_bias", side["bias"], B, V, self.dev)
            side["allow"] = _allowed(side["allowed"], side["input_ids"], V, side["prompts"])
        elif V != side["V"]:
            raise ValueError(f"draft_model must share the model's vocabulary: its logits have {V} entries, "
                             f"the other model's {side['V']} ({who})")
        return _spec_scores(logits, side["bias"], side["allow"])

    def step(self, K):
        """One step for every row; None once no row is left, else (lo, hi) of the unfinished rows' gen."""
        L, pos = self.T0 + self.gen, self.position + self.gen
        drafts, qs, draft_ok = self.propose(K, L, pos)
        y, valid = self.verify(K, L, drafts)
        out, n, logp = self.accept(K, y, drafts, qs, pos)
        stuck, draft_stuck = self.unfinished & ~valid, self.unfinished & ~draft_ok
        gen_before = self.gen
        self.commit(K, L, out, n, logp)
        u, g = self.unfinished, self.gen
        stats = torch.stack([stuck.any().long(), draft_stuck.any().long(), u.any().long(),
                             torch.where(u, g, self.max_new).min(), torch.where(u, g, 0).max(), g.max()])
        any_stuck, any_draft_stuck, any_left, lo, hi, self.top = stats.tolist()  # the step's one sync
        if any_stuck:
            _raise_stuck(stuck, self.side["allow"], _new_token_index(gen_before, stuck))
        if any_draft_stuck:
            rows = draft_stuck.nonzero()[:, 0].tolist()
            raise RuntimeError(f"generate: the draft model's logits have no finite value for sequence(s) {rows} "
                               f"at new token {_new_token_index(gen_before, draft_stuck)}")
        if not any_left:
            return None
        self.rollback(hi)
        return lo, hi

    def propose(self, K, L, pos):
        """The draft's K proposals per row [B, K] (one forward each), their distributions (sampling) and
        whether each row's draft logits had a finite value."""
        from llmkern.ops.speculative import STREAM_DRAFT, draw, philox_uniform

        B = L.shape[0]
        drafts, qs = [], []
        ok = torch.ones(B, dtype=torch.bool, device=self.dev)
        if self.first:  # the whole prompt into the empty cache
            ids = self.buf[:, :self.T0]
        else:  # each row's last two tokens (rollback)
            ids = self.buf.gather(1, L[:, None] + torch.arange(-2, 0, device=self.dev))
        for i in range(K):
            ids = ids if i == 0 else drafts[-1][:, None]
            y = self.scores(self.forward(self.draft, self.dcache, self.d_len, ids, True)[:, -1:], "draft_model")
            self.d_len += ids.shape[1]
            ok &= (y[:, 0] > float("-inf")).any(-1)
            if self.greedy:
                tok = y[:, 0].argmax(-1)
            else:
                q = _spec_probs(y, self.knobs)[:, 0]
                tok = draw(q, philox_uniform(self.seeds, pos + i, STREAM_DRAFT))
                qs.append(q)
            drafts.append(tok)
        drafts = torch.stack(drafts, 1) if drafts else self.buf.new_zeros(B, 0)
        return drafts, (torch.stack(qs, 1) if qs else None), ok

    def verify(self, K, L, drafts):
        """The target's scores [B, K + 1, V] of each row's last token and its K proposals, in one forward
        (the prompt first), and whether every position of a row had a finite score."""
        if self.first and self.T0 > 1:
            self.forward(self.model, self.tcache, 0, self.buf[:, :self.T0 - 1], True)
            self.t_len = self.T0 - 1
        self.first = False
        ids = torch.cat([self.buf.gather(1, L[:, None] - 1), drafts], 1)
        y = self.scores(self.forward(self.model, self.tcache, self.t_len, ids, False)[:, -(K + 1):], "model")
        self.t_len += K + 1
        return y, (y > float("-inf")).any(-1).all(-1)

    def accept(self, K, y, drafts, qs, pos):
        """out [B, K + 1]: per row its accepted proposals, then one token of the target's; n [B] accepted;
        the log-probabilities [B, K + 1, V] the scores report (greedy: of the temperature-1 distribution)."""
        from llmkern.ops.speculative import STREAM_RESIDUAL, draw, philox_uniform, speculative_accept

        if self.greedy:
            if K:
                out, n = speculative_accept(drafts, None, y, greedy=True)
            else:
                out, n = y[:, 0].argmax(-1)[:, None], torch.zeros_like(pos)
            return out, n, _log_softmax(y)  # (+inf scores share the mass, as plain greedy's)
        p = _spec_probs(y, self.knobs)
        if K:
            out, n = speculative_accept(drafts, qs, p, seed=self.seeds, position=pos)
        else:
            out, n = draw(p[:, 0], philox_uniform(self.seeds, pos, STREAM_RESIDUAL))[:, None], torch.zeros_like(pos)
        return out, n, p.log()

    def commit(self, K, L, out, n, logp):
        """Append each unfinished row's run to its sequence: at most the tokens left to max_new_tokens, none
        after an eos."""
        room = (self.max_new - self.gen - 1).clamp(min=0)  # proposals a row can still keep
        n = torch.minimum(n, room)
        j = torch.arange(K + 1, device=self.dev)
        keep = (j < n[:, None] + 1) & self.unfinished[:, None]
        hit = None
        if self.eos is not None:  # tokens after a row's eos become padding
            hit = torch.isin(out, self.eos) & keep
            keep = keep & (hit.long().cumsum(1) - hit.long() == 0)
        count = keep.sum(1)
        lp = logp.gather(-1, out.clamp(min=0)[..., None]).squeeze(-1)
        # every row writes its K + 1 columns (the buffer has room): kept tokens, then padding
        self.buf.scatter_(1, L[:, None] + j, torch.where(keep, out, self.pad))
        self.logps.scatter_(1, self.gen[:, None] + j, torch.where(keep, lp, torch.zeros_like(lp)))
        self.proposed += torch.where(self.unfinished, room.clamp(max=K), 0)
        self.kept += torch.where(self.unfinished, torch.minimum(n, count), 0)
        self.gen = self.gen + count
        self.unfinished = self.unfinished & (self.gen < self.max_new)
        if hit is not None:
            self.unfinished = self.unfinished & ~hit.any(1)

    def rollback(self, hi):
        """Cut both caches back per row (a length update): the target's to all of a row's tokens but the
        last, the draft's to all but the last two (it re-reads one token it may hold already, so that every
        row feeds it two). Finished rows go back to length 0: they still ride along in the batch (their
        outputs are ignored) and must fit in the cache."""
        L = self.T0 + self.gen
        self.t_len, self.d_len = self.T0 + hi - 1, self.T0 + hi - 2
        self.tcache.crop(torch.where(self.unfinished, L - 1, 0), max_n=self.t_len)
        self.dcache.crop(torch.where(self.unfinished, L - 2, 0), max_n=self.d_len)

    def output(self):
        return GenerationOutput(self.buf[:, :self.T0 + self.top], self.logps[:, :self.top], self.proposed, self.kept)


def _new_token_index(gen, rows):
    """The new-token index of the given rows, for an error message: one int, or a list when they differ."""
    ts = sorted(set(gen[rows].tolist()))
    return ts[0] if len(ts) == 1 else ts


def _raise_stuck(stuck, allow, t):
    """A row left with no token to choose: an error, not a silent token 0."""
    rows = stuck.nonzero()[:, 0].tolist()
    if allow is not None and not bool(allow[rows].any(-1).all()):
        raise ValueError(f"allowed_tokens allows no token for sequence(s) {rows} at new token {t}")
    # (the logits as processed: a -inf / NaN logit_bias, a penalty, a masking rule or a scorer's term removes tokens
    # as well; the message names them, not only the model)
    raise RuntimeError(f"generate: the model's logits have no finite value for sequence(s) {rows} "
                       f"at new token {t} (after logit_bias, the penalties, min_new_tokens / bad_words_ids / "
                       f"no_repeat_ngram_size and the scorers' terms, where -inf or NaN removes a token too)")


def _log_softmax(y):
    """log-softmax with llmkern.sample's conventions: NaN counts as -inf, +inf logits share the row's mass
    (plain torch.log_softmax turns a row with a NaN or a +inf into NaN)."""
    return torch.log_softmax(_as_scores(y.float()), -1)


def _as_scores(y):
    """Scores (log-probabilities plus bias / scorer terms) with llmkern.sample's conventions: NaN counts as
    -inf, and a row with +inf entries keeps only those, equally likely (log 1/count). topk / argmax rank NaN
    first, and an infinite running score broke beam search's comparisons (it stopped after one token)."""
    y = torch.nan_to_num(y, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    pinf = torch.isposinf(y)
    count = pinf.sum(-1, keepdim=True).clamp_min(1).to(y.dtype)
    forced = torch.where(pinf, -torch.log(count), torch.full_like(y, float("-inf")))
    return torch.where(pinf.any(-1, keepdim=True), forced, y)


def _penalised(logits, prev, output_start, kw):
    """float32 [B, V]: logits + logit_bias, then the penalties (llmkern.sample's order: HF's and vLLM's);
    the repetition penalty counts all of prev, presence / frequency prev[:, output_start:]."""
    from llmkern.ops.sampling import _sample_params, _side_tensor, biased_and_penalised

    B, V = logits.shape
    dev = logits.device
    _, _, _, _, rep, pres, freq = _sample_params(B, dev, 1.0, 0, 1.0, 0.0, kw["repetition_penalty"],
                                                 kw["presence_penalty"], kw["frequency_penalty"])
    bias = None if kw["logit_bias"] is None else _side_tensor("logit_bias", kw["logit_bias"], B, V, dev).float()
    return biased_and_penalised(logits, bias, prev, rep, pres, freq, output_start)


def _processed_logprobs(logits, prev, output_start, kw):
    """log-softmax of the logits after bias, penalties and the allowed mask (what greedy ranks), with
    llmkern.sample's treatment of NaN (-inf) and +inf logits, so that greedy with scorers ranks what plain
    greedy ranks."""
    y = _penalised(logits, prev, output_start, kw)
    if kw["allowed_tokens"] is not None:
        y = y.masked_fill(~kw["allowed_tokens"], float("-inf"))
    return _log_softmax(y)


def _beam_penalty(repetition_penalty, B, K, dev):
    """The repetition penalty per beam, float32 [B * K], or None when it is 1 for every prompt."""
    if not torch.is_tensor(repetition_penalty) and repetition_penalty == 1.0:
        return None
    from llmkern.ops.sampling import _sample_params

    rep = _sample_params(B, dev, 1.0, 0, 1.0, 0.0, repetition_penalty, 0.0, 0.0)[4]  # (validated, [B])
    return rep.repeat_interleave(K)


def _one_beam(model, input_ids, max_new_tokens, eos, pad, length_penalty, logit_bias, allowed_tokens, scorers,
              use_cache, mask, repetition_penalty=1.0, prompt_logprobs=False, proc=None, stops=None, guidance=None):
    """num_beams=1: greedy decoding, as transformers' generate runs it (a lone beam would go on past an eos
    looking for a better hypothesis, which greedy does not). The scores stay a beam's, [B]: the sum of the
    tokens' log-probabilities / (new tokens, eos or stop string included) ** length_penalty."""
    knobs = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=repetition_penalty,
                 presence_penalty=0.0, frequency_penalty=0.0)
    B = input_ids.shape[0]
    # (n: each row's new tokens up to its eos / stop, counted as it decodes; a check of the stops per generated
    # token afterwards cost max_new_tokens more stop tests)
    out, n = _decode(model, input_ids, max_new_tokens, "greedy", eos, pad, knobs, logit_bias, None, allowed_tokens,
                     scorers, use_cache, mask, 0, B, stops=stops, prompt_logprobs=prompt_logprobs, proc=proc,
                     guidance=guidance, return_lengths=True)
    return dataclasses.replace(out, scores=out.scores.sum(-1) / n.clamp(min=1).float() ** length_penalty)


def _beam_processed(log_probs, proc, allowed_tokens, flat, B):
    """Beam search's scores after the early bans through the rest of transformers' processors: the forced tokens,
    remove_invalid_values, exponential_decay_length_penalty, the suppressed ids, renormalize_logits."""
    log_probs = proc.forced(log_probs, flat.shape[1])
    late = _allowed(allowed_tokens, flat, log_probs.shape[-1], B, "late")
    if late is not None:
        log_probs = log_probs.masked_fill(~late, float("-inf"))
    return torch.log_softmax(log_probs, -1) if proc.renormalize else log_probs


def _beam_search(model, input_ids, max_new_tokens, eos, pad, num_beams, length_penalty, early_stopping,
                 num_return_sequences, logit_bias, allowed_tokens, scorers, use_cache, mask, repetition_penalty=1.0,
                 prompt_logprobs=False, proc=None, stops=None):
    """transformers' (>= 4.50) vectorised beam search, with our masks and scorers added to the
    log-probabilities before the beams are ranked. repetition_penalty (a float or [B] per prompt) acts on the
    (biased) log-probabilities, as HF's processor does in beam search: a seen token's log-probability (<= 0)
    is multiplied by it; the prompt's padding is not counted (as in greedy). stops: a stop test (seqs, T0) -> bool
    [N] (_StopStrings, _Stops, _EitherStop) or None: a candidate it says ends a stop string or a stop sequence
    finishes as one ending with eos does (transformers' stopping criteria in beam search)."""
    B, T0 = input_ids.shape
    dev = input_ids.device
    K = num_beams
    max_length = T0 + max_new_tokens
    n_eos = 0 if eos is None else eos.numel()
    keep = max(2, 1 + n_eos) * K
    top_mask = torch.cat([torch.ones(K, dtype=torch.bool), torch.zeros(keep - K, dtype=torch.bool)]).to(dev)

    running = torch.full((B, K, max_length), pad, dtype=torch.long, device=dev)
    running[:, :, :T0] = input_ids[:, None, :]
    sequences = running.clone()
    running_scores = torch.zeros(B, K, device=dev)
    running_scores[:, 1:] = -1e9
    beam_scores = torch.full((B, K), -1e9, device=dev)
    finished = torch.zeros(B, K, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    gen_len = torch.zeros(B, K, dtype=torch.long, device=dev)          # generated tokens of `sequences`
    running_len = torch.zeros(B, K, dtype=torch.long, device=dev)
    running_open = torch.ones(B, K, dtype=torch.bool, device=dev)     # not an eos-ended placeholder

    # prefill once per prompt, then copy the cache to every beam
    step = _Stepper(model, B, max_length, use_cache, mask, prompt_logprobs)
    cur_len = T0
    if max_new_tokens == 0:
        return step.output(GenerationOutput(input_ids.repeat_interleave(num_return_sequences, 0),
                                            torch.zeros(B * num_return_sequences, device=dev)),
                           input_ids, num_return_sequences)
    logits = step(input_ids, T0).repeat_interleave(K, dim=0)
    step.reorder(torch.arange(B, device=dev).repeat_interleave(K))
    batch_offset = torch.arange(B, device=dev).view(-1, 1) * K
    if logit_bias is not None:  # [V] or per prompt [B, V] -> per beam, as a per-prompt allowed_tokens
        from llmkern.ops.sampling import _side_tensor

        logit_bias = logit_bias.to(dev) if torch.is_tensor(logit_bias) else logit_bias
        logit_bias = _side_tensor("logit_bias", logit_bias, B, logits.shape[-1], dev).float()
        if logit_bias.dim() == 2:
            logit_bias = logit_bias.repeat_interleave(K, dim=0)
    rep = _beam_penalty(repetition_penalty, B, K, dev)
    prompt_real = None if mask is None else mask.repeat_interleave(K, dim=0)  # the prompt's real tokens, per beam
    while True:
        flat = running[:, :, :cur_len].reshape(B * K, cur_len)
        V = logits.shape[-1]
        log_probs = torch.log_softmax(logits, dim=-1)
        if logit_bias is not None:
            log_probs = log_probs + logit_bias
        seq_bias = None if proc is None else proc.bias(flat, V)
        if seq_bias is not None:
            log_probs = log_probs + seq_bias
        if rep is not None:
            from llmkern.reference.sampling import apply_penalties

            prev = flat if prompt_real is None else torch.cat([flat[:, :T0].masked_fill(~prompt_real, -1),
                                                               flat[:, T0:]], 1)
            zero = torch.zeros_like(rep)
            log_probs = apply_penalties(log_probs.float(), prev, rep, zero, zero)
        allow = _allowed(allowed_tokens, flat, V, B, "all" if proc is None else "early")
        if allow is not None:
            log_probs = log_probs.masked_fill(~allow, float("-inf"))
        if proc is not None:
            log_probs = _beam_processed(log_probs, proc, allowed_tokens, flat, B)
        if scorers:
            log_probs = log_probs + _score_terms(scorers, flat, log_probs)
        log_probs = _as_scores(log_probs)
        acc = (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        # no beam of the prompt can go on: an error if one of them is a real hypothesis; if they are all
        # placeholders (eos-ended, or scored -inf) every real one has finished and the prompt is done
        # (allowed_tokens may allow nothing after eos; improvable can stay True under early_stopping="never")
        can_go_on = torch.isfinite(acc).any(-1)
        real = (running_open & (running_scores > float("-inf"))).any(-1)
        stuck = improvable[:, 0] & ~can_go_on & real
        improvable = improvable & can_go_on[:, None]

        # top-`keep` continuations over all beams
        topk_scores, topk_idx = torch.topk(acc, keep)
        src_beam = topk_idx // V
        topk_ids = topk_idx % V
        topk_seqs = running.gather(1, src_beam[:, :, None].expand(B, keep, max_length)).clone()
        topk_seqs[:, :, cur_len] = topk_ids
        topk_len = running_len.gather(1, src_beam) + 1
        hits = torch.zeros(B, keep, dtype=torch.bool, device=dev) if eos is None else torch.isin(topk_ids, eos)
        if stops is not None:  # (a candidate that ends a stop string / sequence finishes as an eos does, as HF's)
            hits = hits | stops(topk_seqs[:, :, :cur_len + 1].reshape(B * keep, cur_len + 1), T0).view(B, keep)
        if cur_len + 1 >= max_length:
            hits = torch.ones_like(hits)

        # next running beams: the best K that did not stop
        run_scores = topk_scores + hits.float() * -1e9
        nxt = torch.topk(run_scores, K)[1]
        running = topk_seqs.gather(1, nxt[:, :, None].expand(B, K, max_length))
        running_scores = run_scores.gather(1, nxt)
        running_len = topk_len.gather(1, nxt)
        running_open = (~hits).gather(1, nxt)
        beam_src_flat = (src_beam.gather(1, nxt) + batch_offset).view(-1)

        # finished hypotheses: only among the top K candidates, with the length penalty
        just_done = hits & top_mask[None, :]
        fin_scores = topk_scores / ((cur_len + 1 - T0) ** length_penalty)
        full = finished.all(-1, keepdim=True) & (early_stopping is True)
        fin_scores = fin_scores + full.float() * -1e9 + (~improvable).float() * -1e9 + (~just_done).float() * -1e9
        merged_seqs = torch.cat([sequences, topk_seqs], 1)
        merged_scores = torch.cat([beam_scores, fin_scores], 1)
        merged_fin = torch.cat([finished, just_done], 1)
        merged_len = torch.cat([gen_len, topk_len], 1)
        best = torch.topk(merged_scores, K)[1]
        sequences = merged_seqs.gather(1, best[:, :, None].expand(B, K, max_length))
        beam_scores = merged_scores.gather(1, best)
        finished = merged_fin.gather(1, best)
        gen_len = merged_len.gather(1, best)

        cur_len += 1
        # can a running beam still beat the worst finished one? (transformers' heuristic)
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = max_length - T0
        else:
            best_len = cur_len - T0
        best_running = running_scores[:, :1] / (best_len ** length_penalty)
        worst_done = torch.where(finished, beam_scores.min(1, keepdim=True)[0], torch.full_like(beam_scores, -1e9))
        improvable = improvable & (best_running > worst_done).any(-1, keepdim=True)
        any_improvable, all_finished, all_hit, any_stuck = torch.stack(
            [improvable.any(), finished.all(), hits.all(), stuck.any()]).tolist()  # one sync
        if any_stuck:
            _raise_stuck(stuck, None if allow is None else allow.reshape(B, K * V), cur_len - 1 - T0)
        if not any_improvable or (all_finished and early_stopping is True) or all_hit:
            break
        step.reorder(beam_src_flat)
        logits = step(running[:, :, :cur_len].reshape(B * K, cur_len), 1)

    R = num_return_sequences
    out_len = T0 + int(gen_len[:, :R].max())
    seqs = sequences[:, :R, :out_len].reshape(B * R, out_len)
    return step.output(GenerationOutput(seqs, beam_scores[:, :R].reshape(-1)), input_ids, R)
