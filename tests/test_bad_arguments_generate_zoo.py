"""Bad arguments to llmkern.generate, the model zoo (configs, GPT / Llama forwards, KV caches, from_hf), llmkern.flops
and llmkern.memory: a clear error naming the argument, or the right answer; never a raw error from inside torch, a
silently wrong result, a NaN or a hang. (tests/test_bad_arguments.py is the same sweep for the ops.)

Tiny CPU models (one layer, vocabulary 50, block_size 64, the torch backend) and a few tokens. For every parameter:
wrong types (str, list, numpy, bool for a number, a float for an int), NaN / inf / negative / zero / huge numbers,
wrong shapes / dtypes, meta tensors (a stand-in for another device, and for a tensor without data), empty prompts,
ids outside the vocabulary, batch sizes that disagree, option combinations that do not belong together.

ERR cases expect ValueError / TypeError whose message names the argument; OK cases check the answer. Each case that
was a bug says so (what the old code did) after `# was:`.
"""
import math
import re

import numpy as np
import pytest
import torch

from llmkern import flops, memory
from llmkern.generation import ChoiceConstraint, GenerationOutput, generate
from llmkern.models import GPT, KVCache, Llama, ModelConfig, build, from_hf, get_config
from llmkern.models._attn import LatentKVCache

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)

META = torch.device("meta")
V = 50


def _tiny(cls, name, **kw):
    torch.manual_seed(0)
    return cls(get_config(name, **dict(dict(n_embd=32, n_layer=1, block_size=64, vocab_size=V), **kw)),
               backend="torch").eval()


G = _tiny(GPT, "gpt-tiny")
L = _tiny(Llama, "llama-tiny", intermediate_size=64)
D = _tiny(GPT, "gpt-tiny")  # a draft model (same vocabulary)
X = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))
AM = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padding
POS = torch.arange(5).expand(2, 5)
S = dict(strategy="sample")
B2 = dict(strategy="beam", num_beams=2)
LL = dict(arch="llama", n_layer=1, n_embd=32, n_head=4, vocab_size=V, block_size=64)


def g(*args, **kw):
    return generate(G, X, *args, **kw)


def _scorer(fn):
    return [lambda seqs, lp: fn(lp)]


def _yarn(**kw):
    return dict(LL, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, **kw})


def _windowed():
    return get_config("llama-tiny", sliding_window=2)


def _mask(*shape, dtype=torch.bool, device=None):
    return torch.ones(*shape, dtype=dtype, device=device)


# ---- ERR: (id, call, the name the message must hold) ----------------------------------------------------------------

ERR = [
    # generate: model, input_ids, max_new_tokens
    ("generate draft_model int", lambda: g(3, draft_model=3), "draft_model"),
    ("generate input_ids list", lambda: generate(G, X.tolist(), 3), "input_ids"),
    ("generate input_ids int32", lambda: generate(G, X.int(), 3), "input_ids"),
    ("generate input_ids 1-d", lambda: generate(G, X[0], 3), "input_ids"),
    ("generate input_ids no tokens", lambda: generate(G, X[:, :0], 3), "input_ids"),
    ("generate input_ids out of vocabulary", lambda: generate(G, X + V, 3), "input_ids"),
    ("generate input_ids negative", lambda: generate(G, X - V, 3), "input_ids"),
    ("generate max_new_tokens 2.5", lambda: g(2.5), "max_new_tokens"),
    ("generate max_new_tokens True", lambda: g(True), "max_new_tokens"),
    ("generate max_new_tokens -1", lambda: g(-1), "max_new_tokens"),
    ("generate max_new_tokens str", lambda: g("3"), "max_new_tokens"),
    ("generate max_new_tokens 2**70", lambda: g(2**70), "max_new_tokens"),
    ("generate strategy", lambda: g(3, strategy="Greedy"), "strategy"),
    # was: AttributeError "'NoneType' object has no attribute 'training'"
    ("generate model None", lambda: generate(None, X, 3), "model"),
    ("generate model str", lambda: generate("gpt2", X, 3), "model"),
    # was: ValueError "new_cache: batch must be an int >= 1, got 0" (another function's argument)
    ("generate input_ids no rows", lambda: generate(G, X[:0], 3), "input_ids"),
    ("generate input_ids no rows beam", lambda: generate(G, X[:0], 3, **B2), "input_ids"),
    # was: RuntimeError "Tensor on device cpu is not on the expected device meta!"
    ("generate input_ids meta", lambda: generate(G, X.to(META), 3), "input_ids"),
    # eos / pad
    ("generate eos_token_id -1", lambda: g(3, eos_token_id=-1), "eos_token_id"),
    ("generate eos_token_id vocab", lambda: g(3, eos_token_id=V), "eos_token_id"),
    ("generate eos_token_id float", lambda: g(3, eos_token_id=2.0), "eos_token_id"),
    ("generate eos_token_id True", lambda: g(3, eos_token_id=True), "eos_token_id"),
    ("generate eos_token_id []", lambda: g(3, eos_token_id=[]), "eos_token_id"),
    ("generate eos_token_id float tensor", lambda: g(3, eos_token_id=torch.tensor([1.0])), "eos_token_id"),
    ("generate pad_token_id vocab", lambda: g(3, pad_token_id=V), "pad_token_id"),
    ("generate pad_token_id 1.5", lambda: g(3, pad_token_id=1.5), "pad_token_id"),
    # was: RuntimeError "Tensor.item() cannot be called on meta tensors"
    ("generate eos_token_id meta", lambda: g(3, eos_token_id=torch.tensor([1], device=META)), "eos_token_id"),
    # sampling knobs (llmkern.sample checks them; generate must pass their names through)
    ("generate temperature nan", lambda: g(3, **S, temperature=math.nan), "temperature"),
    ("generate temperature 1e39", lambda: g(3, **S, temperature=1e39), "temperature"),
    ("generate temperature str", lambda: g(3, **S, temperature="1"), "temperature"),
    ("generate temperature [3]", lambda: g(3, **S, temperature=torch.ones(3)), "temperature"),
    ("generate temperature meta", lambda: g(3, **S, temperature=torch.ones(2, device=META)), "temperature"),
    ("generate temperature greedy", lambda: g(3, temperature=0.5), "temperature"),
    ("generate top_k 2.5", lambda: g(3, **S, top_k=2.5), "top_k"),
    ("generate top_k 2**70", lambda: g(3, **S, top_k=2**70), "top_k"),
    ("generate top_p 0", lambda: g(3, **S, top_p=0.0), "top_p"),
    ("generate min_p nan", lambda: g(3, **S, min_p=math.nan), "min_p"),
    ("generate repetition_penalty 0", lambda: g(3, repetition_penalty=0.0), "repetition_penalty"),
    ("generate repetition_penalty beam [3]", lambda: g(3, **B2, repetition_penalty=torch.ones(3)),
     "repetition_penalty"),
    ("generate presence_penalty nan", lambda: g(3, **S, presence_penalty=math.nan), "presence_penalty"),
    ("generate frequency_penalty beam", lambda: g(3, **B2, frequency_penalty=0.5), "frequency_penalty"),
    ("generate num_return_sequences 2 temperature [3]",
     lambda: g(3, **S, num_return_sequences=2, temperature=torch.ones(3)), "temperature"),
    # logit_bias
    ("generate logit_bias list", lambda: g(3, logit_bias=[0.0] * V), "logit_bias"),
    ("generate logit_bias wrong V", lambda: g(3, logit_bias=torch.zeros(V - 1)), "logit_bias"),
    ("generate logit_bias 3 rows", lambda: g(3, logit_bias=torch.zeros(3, V)), "logit_bias"),
    ("generate logit_bias bool", lambda: g(3, logit_bias=torch.zeros(V, dtype=torch.bool)), "logit_bias"),
    ("generate logit_bias meta", lambda: g(3, logit_bias=torch.zeros(V, device=META)), "logit_bias"),
    # was: NotImplementedError "Cannot copy out of meta tensor; no data!"
    ("generate logit_bias beam meta", lambda: g(3, **B2, logit_bias=torch.zeros(V, device=META)), "logit_bias"),
    # seed
    ("generate seed 1.5", lambda: g(3, **S, seed=1.5), "seed"),
    ("generate seed 2**64", lambda: g(3, **S, seed=2**64), "seed"),
    ("generate seed float tensor", lambda: g(3, **S, seed=torch.tensor([1.0, 2.0])), "seed"),
    ("generate seed [3]", lambda: g(3, **S, seed=torch.tensor([1, 2, 3])), "seed"),
    # was: RuntimeError "Tensor.item() cannot be called on meta tensors"
    ("generate seed 0-dim meta", lambda: g(3, **S, seed=torch.tensor(1, device=META)), "seed"),
    # was: accepted (greedy refuses them: beam search took any seed, unused)
    ("generate seed beam float", lambda: g(3, **B2, seed=1.5), "seed"),
    ("generate seed beam [3]", lambda: g(3, **B2, seed=torch.tensor([1, 2, 3])), "seed"),
    # beam search options
    ("generate num_beams 2.5", lambda: g(3, strategy="beam", num_beams=2.5), "num_beams"),
    ("generate num_beams 0", lambda: g(3, strategy="beam", num_beams=0), "num_beams"),
    ("generate num_beams greedy", lambda: g(3, num_beams=2), "num_beams"),
    ("generate length_penalty nan", lambda: g(3, **B2, length_penalty=math.nan), "length_penalty"),
    ("generate length_penalty greedy", lambda: g(3, length_penalty=2.0), "length_penalty"),
    ("generate early_stopping 1", lambda: g(3, **B2, early_stopping=1), "early_stopping"),
    ("generate early_stopping 'False'", lambda: g(3, **B2, early_stopping="False"), "early_stopping"),
    ("generate num_return_sequences 0", lambda: g(3, num_return_sequences=0), "num_return_sequences"),
    ("generate num_return_sequences 2.0", lambda: g(3, num_return_sequences=2.0), "num_return_sequences"),
    ("generate num_return_sequences > num_beams", lambda: g(3, **B2, num_return_sequences=3), "num_return_sequences"),
    # was: TypeError "ones(): argument 'size' failed to unpack the object ... Overflow when unpacking long long"
    ("generate num_beams 2**70", lambda: g(3, strategy="beam", num_beams=2**70), "num_beams"),
    # was: OverflowError (34, 'Numerical result out of range') from 4 ** 1e308 (and 4 ** -1e308 divided by 0)
    ("generate length_penalty 1e308", lambda: g(3, **B2, length_penalty=1e308), "length_penalty"),
    ("generate length_penalty -1e308", lambda: g(3, **B2, length_penalty=-1e308), "length_penalty"),
    # was: OverflowError "int too large to convert to float", naming nothing (here and in the 10**400 cases below)
    ("generate length_penalty 10**400", lambda: g(3, **B2, length_penalty=10**400), "length_penalty"),
    # was: ValueError "Overflow when unpacking long long" (no name)
    ("generate num_return_sequences 2**70", lambda: g(3, num_return_sequences=2**70), "num_return_sequences"),
    # flags
    ("generate prompt_logprobs 'True'", lambda: g(3, prompt_logprobs="True", return_dict=True), "prompt_logprobs"),
    ("generate prompt_logprobs without return_dict", lambda: g(3, prompt_logprobs=True), "prompt_logprobs"),
    # was: return_dict="False" returned a GenerationOutput; use_cache="False" / None ran as True / False unchecked
    ("generate return_dict 'False'", lambda: g(3, return_dict="False"), "return_dict"),
    ("generate return_dict draft 'x'", lambda: g(3, draft_model=D, return_dict="x"), "return_dict"),
    ("generate use_cache 'False'", lambda: g(3, use_cache="False"), "use_cache"),
    ("generate use_cache None", lambda: g(3, use_cache=None), "use_cache"),
    # attention_mask
    ("generate attention_mask list", lambda: g(3, attention_mask=AM.tolist()), "attention_mask"),
    ("generate attention_mask shape", lambda: g(3, attention_mask=AM[:, 1:]), "attention_mask"),
    ("generate attention_mask 2", lambda: g(3, attention_mask=AM * 2), "attention_mask"),
    ("generate attention_mask nan", lambda: g(3, attention_mask=torch.full((2, 5), math.nan)), "attention_mask"),
    ("generate attention_mask right padding", lambda: g(3, attention_mask=AM.flip(1)), "attention_mask"),
    # was: RuntimeError "Tensor.item() cannot be called on meta tensors"
    ("generate attention_mask meta", lambda: g(3, attention_mask=AM.to(META)), "attention_mask"),
    # top_logprobs
    ("generate top_logprobs 2.0", lambda: g(3, top_logprobs=2.0, return_dict=True), "top_logprobs"),
    ("generate top_logprobs -1", lambda: g(3, top_logprobs=-1, return_dict=True), "top_logprobs"),
    ("generate top_logprobs > V", lambda: g(3, top_logprobs=V + 1, return_dict=True), "top_logprobs"),
    ("generate top_logprobs without return_dict", lambda: g(3, top_logprobs=2), "top_logprobs"),
    ("generate top_logprobs beam", lambda: g(3, **B2, top_logprobs=2, return_dict=True), "top_logprobs"),
    # HF's masking options, stop sequences
    ("generate min_new_tokens 2.5", lambda: g(3, min_new_tokens=2.5, eos_token_id=1), "min_new_tokens"),
    ("generate min_new_tokens True", lambda: g(3, min_new_tokens=True), "min_new_tokens"),
    ("generate no_repeat_ngram_size -1", lambda: g(3, no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    ("generate bad_words_ids vocab", lambda: g(3, bad_words_ids=[[V]]), "bad_words_ids"),
    ("generate bad_words_ids [[]]", lambda: g(3, bad_words_ids=[[]]), "bad_words_ids"),
    ("generate bad_words_ids str", lambda: g(3, bad_words_ids="ab"), "bad_words_ids"),
    ("generate stop_sequences vocab", lambda: g(3, stop_sequences=[[V]]), "stop_sequences"),
    ("generate stop_sequences [1]", lambda: g(3, stop_sequences=[1]), "stop_sequences"),
    ("generate stop_sequences draft", lambda: g(3, draft_model=D, stop_sequences=[[1]]), "stop_sequences"),
    # allowed_tokens
    ("generate allowed_tokens list", lambda: g(3, allowed_tokens=[True] * V), "allowed_tokens"),
    ("generate allowed_tokens int", lambda: g(3, allowed_tokens=_mask(V, dtype=torch.long)), "allowed_tokens"),
    ("generate allowed_tokens wrong V", lambda: g(3, allowed_tokens=_mask(V - 1)), "allowed_tokens"),
    ("generate allowed_tokens 3 rows", lambda: g(3, allowed_tokens=_mask(3, V)), "allowed_tokens"),
    ("generate allowed_tokens 3-d", lambda: g(3, allowed_tokens=_mask(1, 2, V)), "allowed_tokens"),
    ("generate allowed_tokens none allowed", lambda: g(3, allowed_tokens=torch.zeros(V, dtype=torch.bool)),
     "allowed_tokens"),
    ("generate allowed_tokens function str", lambda: g(3, allowed_tokens=lambda s: "x"), "allowed_tokens"),
    ("generate allowed_tokens draft function", lambda: g(3, draft_model=D, allowed_tokens=lambda s: _mask(V)),
     "allowed_tokens"),
    # was: IndexError "tuple index out of range"
    ("generate allowed_tokens 0-dim", lambda: g(3, allowed_tokens=torch.tensor(True)), "allowed_tokens"),
    # was: NotImplementedError "Cannot copy out of meta tensor; no data!"
    ("generate allowed_tokens meta", lambda: g(3, allowed_tokens=_mask(V, device=META)), "allowed_tokens"),
    ("generate allowed_tokens beam meta", lambda: g(3, **B2, allowed_tokens=_mask(V, device=META)), "allowed_tokens"),
    ("generate allowed_tokens function meta", lambda: g(3, allowed_tokens=lambda s: _mask(V, device=META)),
     "allowed_tokens"),
    # scorers
    ("generate scorers function", lambda: g(3, scorers=lambda s, lp: lp), "scorers"),
    ("generate scorers alpha nan", lambda: g(3, scorers=[(math.nan, lambda s, lp: lp)]), "scorers"),
    ("generate scorers alpha str", lambda: g(3, scorers=[("1", lambda s, lp: lp)]), "scorers"),
    ("generate scorer returns a float", lambda: g(3, scorers=[lambda s, lp: 1.0]), "scorer"),
    ("generate scorer returns wrong V", lambda: g(3, scorers=_scorer(lambda lp: lp[:, :-1])), "scorer"),
    # was: RuntimeError "the model's logits have no finite value" (1e308 is inf in the float32 scores)
    ("generate scorers alpha 1e308", lambda: g(3, scorers=[(1e308, lambda s, lp: lp)]), "scorers"),
    ("generate scorers alpha 10**400", lambda: g(3, scorers=[(10**400, lambda s, lp: lp)]), "scorers"),
    # was: RuntimeError "The size of tensor a (2) must match the size of tensor b (3)"
    ("generate scorer returns 3 rows", lambda: g(3, scorers=_scorer(lambda lp: torch.zeros(3, V))), "scorer"),
    ("generate scorer returns 3 rows beam", lambda: g(3, **B2, scorers=_scorer(lambda lp: torch.zeros(3, V))),
     "scorer"),
    # was: RuntimeError "Tensor on device meta is not on the expected device cpu!"
    ("generate scorer returns meta", lambda: g(3, scorers=_scorer(lambda lp: torch.zeros(2, V, device=META))),
     "scorer"),
    # speculative decoding
    ("generate draft_model vocabulary", lambda: g(3, draft_model=_tiny(GPT, "gpt-tiny", vocab_size=V + 1)),
     "draft_model"),
    ("generate draft_model beam", lambda: g(3, **B2, draft_model=D), "draft_model"),
    ("generate draft_model use_cache False", lambda: g(3, draft_model=D, use_cache=False), "use_cache"),
    ("generate draft_model repetition_penalty", lambda: g(3, draft_model=D, repetition_penalty=1.2),
     "repetition_penalty"),
    ("generate num_draft_tokens 2.5", lambda: g(3, draft_model=D, num_draft_tokens=2.5), "num_draft_tokens"),
    ("generate num_draft_tokens 0", lambda: g(3, draft_model=D, num_draft_tokens=0), "num_draft_tokens"),
    ("generate num_draft_tokens True", lambda: g(3, draft_model=D, num_draft_tokens=True), "num_draft_tokens"),
    ("generate num_draft_tokens without draft_model", lambda: g(3, num_draft_tokens=2), "num_draft_tokens"),
    ("generate draft temperature 0 rows", lambda: g(3, **S, draft_model=D, temperature=torch.tensor([0.0, 1.0])),
     "temperature"),
    ("generate draft seed meta", lambda: g(3, **S, draft_model=D, seed=torch.tensor([1, 2], device=META)), "seed"),
    # ChoiceConstraint
    ("ChoiceConstraint eos_token_id vocab", lambda: ChoiceConstraint([[3]], V, 5, eos_token_id=V), "eos_token_id"),
    ("ChoiceConstraint choice vocab", lambda: ChoiceConstraint([[V]], V, 5), "choice"),
    ("ChoiceConstraint vocab_size 0", lambda: ChoiceConstraint([[3]], 0, 5), "vocab_size"),
    ("ChoiceConstraint prompt_len -1", lambda: ChoiceConstraint([[3]], V, -1), "prompt_len"),
    ("ChoiceConstraint vocab_size mismatch", lambda: g(3, allowed_tokens=ChoiceConstraint([[3]], V + 10, 5)),
     "allowed_tokens"),
    # was: accepted eos_token_id=True as token 1, and choices of floats (1.7 -> 1), bools and strings ("12" -> [1, 2])
    ("ChoiceConstraint eos_token_id True", lambda: ChoiceConstraint([[3]], V, 5, eos_token_id=True), "eos_token_id"),
    ("ChoiceConstraint choice floats", lambda: ChoiceConstraint([[1.7]], V, 5), "choice"),
    ("ChoiceConstraint choice bools", lambda: ChoiceConstraint([[True]], V, 5), "choice"),
    ("ChoiceConstraint choice str", lambda: ChoiceConstraint(["12"], V, 5), "choice"),
    ("ChoiceConstraint choice float tensor", lambda: ChoiceConstraint([torch.tensor([1.7])], V, 5), "choice"),
    # was: TypeError "int() argument must be ... not 'list'" / "'int' object is not iterable"
    ("ChoiceConstraint choice 2-d tensor", lambda: ChoiceConstraint([torch.tensor([[1, 2]])], V, 5), "choice"),
    ("ChoiceConstraint choice int", lambda: ChoiceConstraint([3], V, 5), "choice"),

    # ---- the zoo's forward ----
    ("forward input_ids float", lambda: G(X.float()), "input_ids"),
    ("forward input_ids list", lambda: L(X.tolist()), "input_ids"),
    ("forward input_ids out of vocabulary", lambda: L(X + V), "input_ids"),
    ("forward input_ids past block_size", lambda: G(torch.zeros(1, 65, dtype=torch.long)), "block_size"),
    ("forward labels float", lambda: G(X, X.float()), "labels"),
    ("forward attention_mask list", lambda: G(X, attention_mask=AM.tolist()), "attention_mask"),
    ("forward attention_mask shape", lambda: L(X, attention_mask=AM[:, 1:]), "attention_mask"),
    ("forward position_ids shape", lambda: L(X, position_ids=POS[:, :4]), "position_ids"),
    ("forward cache str", lambda: G(X, cache="x"), "cache"),
    ("forward cache batch", lambda: L(X, cache=L.new_cache(3, 16)), "cache"),
    ("forward cache other model", lambda: G(X, cache=L.new_cache(2, 16)), "cache"),
    ("forward cache too short", lambda: G(X, cache=G.new_cache(2, 4)), "max_len"),
    # was: GPT returned meta logits silently; Llama RuntimeError "Tensor on device cpu is not on the expected device"
    ("forward GPT input_ids meta", lambda: G(X.to(META)), "input_ids"),
    ("forward Llama input_ids meta", lambda: L(X.to(META)), "input_ids"),
    # was: ValueError "Expected input batch_size (10) to match target batch_size (8)." (no name)
    ("forward labels shape", lambda: G(X, X[:, :4]), "labels"),
    ("forward labels batch", lambda: L(X, X[:1]), "labels"),
    # was: IndexError "too many indices for tensor of dimension 1"
    ("forward labels 1-d", lambda: G(X, X[0]), "labels"),
    # was: IndexError "Target 89 is out of bounds." (the torch backend's loss)
    ("forward labels out of vocabulary", lambda: G(X, X + V), "labels"),
    ("forward labels negative", lambda: L(X, X - V), "labels"),
    # was: RuntimeError "Tensor on device cpu is not on the expected device meta!"
    ("forward labels meta", lambda: G(X, X.to(META)), "labels"),
    # was: ValueError "Expected input batch_size (2) to match target batch_size (10)." (no name)
    ("forward labels with last_only", lambda: G(X, X, last_only=True), "last_only"),
    ("forward labels with last_only, no logits", lambda: L(X, X, last_only=True, return_logits=False), "last_only"),
    # was: bool() read last_only="False" as True ([B, 1, V] logits) and return_logits="False" as True; return_logits=
    # False without labels was ignored
    ("forward last_only 'False'", lambda: G(X, last_only="False"), "last_only"),
    ("forward last_only None", lambda: L(X, last_only=None), "last_only"),
    ("forward return_logits 'False'", lambda: G(X, X, return_logits="False"), "return_logits"),
    ("forward return_logits False without labels", lambda: L(X, return_logits=False), "return_logits"),
    # was: NotImplementedError "Cannot copy out of meta tensor; no data!"
    ("forward attention_mask meta", lambda: G(X, attention_mask=AM.to(META)), "attention_mask"),
    # was: accepted, bool() made 2, -1, 0.5 and NaN tokens
    ("forward attention_mask 2", lambda: G(X, attention_mask=AM * 2), "attention_mask"),
    ("forward attention_mask -1", lambda: L(X, attention_mask=AM - 2), "attention_mask"),
    ("forward attention_mask 0.5", lambda: L(X, attention_mask=torch.full((2, 5), 0.5)), "attention_mask"),
    ("forward attention_mask nan", lambda: G(X, attention_mask=torch.full((2, 5), math.nan)), "attention_mask"),
    ("forward attention_mask complex", lambda: G(X, attention_mask=AM.to(torch.complex64)), "attention_mask"),
    # was: AttributeError "'list' object has no attribute 'shape'"
    ("forward position_ids list", lambda: G(X, position_ids=POS.tolist()), "position_ids"),
    # was: RuntimeError "Expected tensor for argument #1 'indices' to have one of the following scalar types"
    ("forward GPT position_ids float", lambda: G(X, position_ids=POS.float()), "position_ids"),
    # was: Llama took bool positions as 0 / 1
    ("forward Llama position_ids bool", lambda: L(X, position_ids=POS.bool()), "position_ids"),
    # was: GPT returned meta logits silently; Llama RuntimeError "... not on the expected device meta!"
    ("forward GPT position_ids meta", lambda: G(X, position_ids=POS.to(META)), "position_ids"),
    ("forward Llama position_ids meta", lambda: L(X, position_ids=POS.to(META)), "position_ids"),
    # was: IndexError "index out of range in self" (GPT's learned positions)
    ("forward GPT position_ids negative", lambda: G(X, position_ids=POS - 3), "position_ids"),
    ("forward GPT position_ids past block_size", lambda: G(X, position_ids=POS + 62), "position_ids"),
    ("forward GPT position_ids 2**40", lambda: G(X, position_ids=POS + 2**40), "position_ids"),
    # was: RuntimeError "Expected query, key, and value to have the same device type ... key.device: meta"
    ("forward cache meta", lambda: G(X, cache=G.new_cache(2, 16, device=META)), "cache"),
    # KV caches
    ("new_cache batch 0", lambda: G.new_cache(0, 16), "batch"),
    ("new_cache batch 2.5", lambda: G.new_cache(2.5, 16), "batch"),
    ("new_cache max_len 0", lambda: G.new_cache(2, 0), "max_len"),
    ("new_cache latent 'False'", lambda: G.new_cache(2, 16, latent="False"), "latent"),
    ("new_cache latent True without MLA", lambda: G.new_cache(2, 16, latent=True), "latent"),
    ("KVCache n_layer 0", lambda: KVCache(0, 2, 2, 16, 8), "n_layer"),
    ("KVCache k_scale nan", lambda: KVCache(1, 2, 2, 16, 8, dtype=torch.float8_e4m3fn, k_scale=math.nan), "k_scale"),
    ("KVCache k_scale without fp8", lambda: KVCache(1, 2, 2, 16, 8, k_scale=2.0), "k_scale"),
    ("KVCache.crop -1", lambda: G.new_cache(2, 16).crop(-1), "crop"),
    ("KVCache.crop float tensor", lambda: G.new_cache(2, 16).crop(torch.zeros(2)), "crop"),
    ("KVCache.reorder list", lambda: G.new_cache(2, 16).reorder([0, 1]), "reorder"),
    # was: an integer dtype accepted (RuntimeError "Expected query, key, and value to have the same dtype" at the
    # forward), a string one TypeError from torch.zeros at the first write
    ("new_cache dtype int64", lambda: G.new_cache(2, 16, dtype=torch.int64), "dtype"),
    ("new_cache dtype bool", lambda: L.new_cache(2, 16, dtype=torch.bool), "dtype"),
    ("KVCache dtype str", lambda: KVCache(1, 2, 2, 16, 8, dtype="float16"), "dtype"),
    # was: RuntimeError "Expected one of cpu, cuda, ... device type at start of device string: bogus"
    ("new_cache device bogus", lambda: G.new_cache(2, 16, device="bogus"), "device"),
    # was: accepted, then TypeError "zeros(): argument 'size' failed to unpack ... Overflow" at the first write
    ("new_cache max_len 2**70", lambda: G.new_cache(2, 2**70), "max_len"),
    # was: accepted (1e39 is inf in float32, 1e-46 is 0: inf / NaN caches)
    ("KVCache k_scale 1e39", lambda: KVCache(1, 2, 2, 16, 8, dtype=torch.float8_e4m3fn, k_scale=1e39), "k_scale"),
    ("KVCache v_scale 1e-46", lambda: KVCache(1, 2, 2, 16, 8, dtype=torch.float8_e4m3fn, v_scale=1e-46), "v_scale"),
    # was: accepted (its width kv_rank + rope_dim = 4 valid): the values were sliced [..., :-4]
    ("LatentKVCache kv_rank -4", lambda: LatentKVCache(1, 2, 16, -4, 8), "kv_rank"),
    # was: NotImplementedError "Cannot copy out of meta tensor; no data!"
    ("KVCache.crop meta", lambda: G.new_cache(2, 16).crop(torch.zeros(2, dtype=torch.long, device=META)), "crop"),
    ("KVCache.reorder meta", lambda: G.new_cache(2, 16).reorder(torch.zeros(2, dtype=torch.long, device=META)),
     "reorder"),
    # constructors, configs
    ("GPT backend", lambda: GPT("gpt-tiny", backend="jax"), "backend"),
    ("Llama with a GPT config", lambda: Llama("gpt-tiny"), "arch"),
    ("build unknown name", lambda: build("gpt5"), "gpt5"),
    ("get_config unknown field", lambda: get_config("gpt2", n_layers=3), "n_layers"),
    ("ModelConfig.replace unknown field", lambda: get_config("gpt-tiny").replace(foo=1), "foo"),
    ("ModelConfig vocab_size 2.5", lambda: ModelConfig(vocab_size=2.5), "vocab_size"),
    ("ModelConfig dropout nan", lambda: ModelConfig(dropout=math.nan), "dropout"),
    ("ModelConfig dropout 10**400", lambda: ModelConfig(dropout=10**400), "dropout"),
    ("ModelConfig norm_eps 10**400", lambda: ModelConfig(norm_eps=10**400), "norm_eps"),
    ("ModelConfig attn_scale 10**400", lambda: ModelConfig(**dict(LL, attn_scale=10**400)), "attn_scale"),
    ("ModelConfig sliding_window True", lambda: ModelConfig(**dict(LL, sliding_window=True)), "sliding_window"),
    ("ModelConfig qk_norm 'False'", lambda: ModelConfig(**dict(LL, qk_norm="False")), "qk_norm"),
    ("from_hf dtype int8", lambda: from_hf("/nonexistent", dtype=torch.int8), "dtype"),
    # was: True accepted as 1 (a head of 1 channel, one key/value head, an FFN of width 1)
    ("ModelConfig n_kv_head True", lambda: ModelConfig(**dict(LL, n_kv_head=True)), "n_kv_head"),
    ("ModelConfig head_dim True", lambda: ModelConfig(n_layer=1, n_embd=32, n_head=4, head_dim=True), "head_dim"),
    ("ModelConfig intermediate_size True", lambda: ModelConfig(**dict(LL, intermediate_size=True)),
     "intermediate_size"),
    # was: NaN / inf gave NaN logits, 1e39 RuntimeError "value cannot be converted to type float without overflow"
    ("ModelConfig norm_offset nan", lambda: ModelConfig(**dict(LL, norm_offset=math.nan)), "norm_offset"),
    ("ModelConfig norm_offset inf", lambda: ModelConfig(**dict(LL, norm_offset=math.inf)), "norm_offset"),
    ("ModelConfig norm_offset 1e39", lambda: ModelConfig(**dict(LL, norm_offset=1e39)), "norm_offset"),
    # was: accepted (0 in float32): attn_scale=1e-50 gave NaN logits; the softcaps below llmkern.attention's least
    ("ModelConfig attn_scale 1e-50", lambda: ModelConfig(**dict(LL, attn_scale=1e-50)), "attn_scale"),
    ("ModelConfig attn_softcap 1e-50", lambda: ModelConfig(**dict(LL, attn_softcap=1e-50)), "attn_softcap"),
    ("ModelConfig logit_softcap 1e-50", lambda: ModelConfig(**dict(LL, logit_softcap=1e-50)), "logit_softcap"),
    # was: TypeError "unhashable type: 'list'"
    ("ModelConfig rope_scaling rope_type list", lambda: ModelConfig(**dict(LL, rope_scaling={
        "rope_type": ["linear"], "factor": 2.0})), "rope_type"),
    # was: accepted: inf made every frequency 0 (linear), 1e-320 inf
    ("ModelConfig rope_scaling factor inf", lambda: ModelConfig(**dict(LL, rope_scaling={
        "rope_type": "linear", "factor": math.inf})), "factor"),
    ("ModelConfig rope_scaling factor 1e-320", lambda: ModelConfig(**dict(LL, rope_scaling={
        "rope_type": "linear", "factor": 1e-320})), "factor"),
    ("ModelConfig rope_scaling llama3 inf", lambda: ModelConfig(**dict(LL, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": math.inf,
        "original_max_position_embeddings": 8192})), "high_freq_factor"),
    # was: ValueError "cannot convert float NaN to integer" / "math domain error" (no name)
    ("ModelConfig yarn beta_fast nan", lambda: ModelConfig(**_yarn(beta_fast=math.nan)), "beta_fast"),
    ("ModelConfig yarn beta_fast inf", lambda: ModelConfig(**_yarn(beta_fast=math.inf)), "beta_fast"),
    ("ModelConfig yarn beta_slow -1", lambda: ModelConfig(**_yarn(beta_slow=-1)), "beta_slow"),
    # was: accepted: inf cos / sin
    ("ModelConfig yarn attention_factor inf", lambda: ModelConfig(**_yarn(attention_factor=math.inf)),
     "attention_factor"),
    ("ModelConfig yarn mscale inf", lambda: ModelConfig(**_yarn(mscale=math.inf, mscale_all_dim=1.0)),
     "attention_factor"),
    # was: bool() read truncate="False" as True
    ("ModelConfig yarn truncate 'False'", lambda: ModelConfig(**_yarn(truncate="False")), "truncate"),
    # was: accepted (an inf loss, inf routing weights: NaN outputs)
    ("ModelConfig router_aux_loss_coef inf",
     lambda: ModelConfig(**dict(LL, n_experts=4, router_aux_loss_coef=math.inf)), "router_aux_loss_coef"),
    ("ModelConfig moe_routed_scaling inf", lambda: ModelConfig(**dict(
        LL, n_experts=4, moe_router="sigmoid", moe_n_group=2, moe_routed_scaling=math.inf)), "moe_routed_scaling"),
    # was: TypeError "expected str, bytes or os.PathLike object, not NoneType"
    ("from_hf path None", lambda: from_hf(None), "path"),
    ("from_hf backend", lambda: from_hf("/nonexistent", backend="jax"), "backend"),
    # was: RuntimeError "Expected one of cpu, cuda, ..." after loading the weights
    ("from_hf device bogus", lambda: from_hf("/nonexistent", device="bogus"), "device"),

    # ---- llmkern.flops ----
    ("flops_per_token attn_dim -1", lambda: flops.flops_per_token(1, 1, 1, -1), "attn_dim"),
    ("flops_per_token convention", lambda: flops.flops_per_token(1, 1, 1, 1, convention="x"), "convention"),
    ("model_flops_per_token seq_len 2.5", lambda: flops.model_flops_per_token("gpt2", 2.5), "seq_len"),
    ("model_flops_per_token config", lambda: flops.model_flops_per_token("gpt5"), "gpt5"),
    ("mfu flops_per_token nan", lambda: flops.mfu(1, math.nan, 1), "flops_per_token"),
    ("mfu peak_flops 0", lambda: flops.mfu(1, 1, 0), "peak_flops"),
    ("mfu peak_flops unknown device", lambda: flops.mfu(1, 1, "v100"), "device"),
    ("peak dtype float64", lambda: flops.peak("a100", torch.float64), "precision"),
    ("peak a100 fp8", lambda: flops.peak("a100", "fp8"), "fp8"),
    ("utilization dtype", lambda: flops.utilization(1, 1, dtype="x"), "precision"),
    # was: TypeError "'>=' not supported between instances of 'str' and 'int'", inf FLOPs, True as 1
    ("flops_per_token n_params str", lambda: flops.flops_per_token("1", 1, 1, 1), "n_params"),
    ("flops_per_token n_params None", lambda: flops.flops_per_token(None, 1, 1, 1), "n_params"),
    ("flops_per_token n_params inf", lambda: flops.flops_per_token(math.inf, 1, 1, 1), "n_params"),
    ("flops_per_token seq_len True", lambda: flops.flops_per_token(1, 1, True, 1), "seq_len"),
    # was: bool() read recompute="False" as True (4/3 of the FLOPs)
    ("flops_per_token recompute 'False'", lambda: flops.flops_per_token(1, 1, 1, 1, recompute="False"), "recompute"),
    ("model_flops_per_token recompute 'False'", lambda: flops.model_flops_per_token("gpt2", recompute="False"),
     "recompute"),
    ("hfu recompute 'False'", lambda: flops.hfu(1, 3, 1, recompute="False"), "recompute"),
    # was: TypeError "'<=' not supported between instances of 'int' and 'str'", True as 1
    ("mfu tokens_per_second str", lambda: flops.mfu("1", 1, 1), "tokens_per_second"),
    ("mfu tokens_per_second True", lambda: flops.mfu(True, 1, 1), "tokens_per_second"),
    ("mfu peak_flops True", lambda: flops.mfu(1, 1, True), "peak_flops"),
    ("mfu peak_flops list", lambda: flops.mfu(1, 1, [1e12]), "peak_flops"),
    # was: () gave the A100's bf16 peak silently, a triple peak()'s TypeError
    ("mfu peak_flops ()", lambda: flops.mfu(1, 1, ()), "peak_flops"),
    ("mfu peak_flops triple", lambda: flops.mfu(1, 1, ("a100", "bf16", "x")), "peak_flops"),
    # was: seq_len=2.5 truncated to 2, -1 taken as shorter than the window, a string TypeError
    ("attention_fraction seq_len 2.5", lambda: flops.attention_fraction(_windowed(), 2.5), "seq_len"),
    ("attention_fraction seq_len -1", lambda: flops.attention_fraction(_windowed(), -1), "seq_len"),
    # was: RuntimeError "Expected one of cpu, cuda, ... device string: bogus"
    ("utilization device bogus", lambda: flops.utilization(1, 1, device="bogus"), "device"),

    # ---- llmkern.memory ----
    ("training_memory batch_size 0", lambda: memory.training_memory("gpt2", 0), "batch_size"),
    ("training_memory batch_size 2.5", lambda: memory.training_memory("gpt2", 2.5), "batch_size"),
    ("training_memory seq_len 0", lambda: memory.training_memory("gpt2", 1, 0), "seq_len"),
    ("training_memory dtype", lambda: memory.training_memory("gpt2", 1, dtype=torch.int8), "dtype"),
    ("training_memory recompute True", lambda: memory.training_memory("gpt2", 1, recompute=True), "recompute"),
    ("training_memory row_stats 1", lambda: memory.training_memory("gpt2", 1, row_stats=1), "row_stats"),
    ("training_memory flash_attention 'no'", lambda: memory.training_memory("gpt2", 1, flash_attention="no"),
     "flash_attention"),
    ("training_memory zero_stage 1.5", lambda: memory.training_memory("gpt2", 1, zero_stage=1.5), "zero_stage"),
    ("training_memory tp 5", lambda: memory.training_memory("gpt2", 1, tp=5), "tp"),
    ("training_memory pp 5", lambda: memory.training_memory("gpt2", 1, pp=5), "pp"),
    ("training_memory stage", lambda: memory.training_memory("gpt2", 1, pp=2, stage=2), "stage"),
    ("training_memory optimizer", lambda: memory.training_memory("gpt2", 1, optimizer="Adam"), "optimizer"),
    ("training_memory mask_bytes 0", lambda: memory.training_memory("gpt2", 1, mask_bytes=0), "mask_bytes"),
    ("training_memory num_microbatches 0", lambda: memory.training_memory("gpt2", 1, num_microbatches=0),
     "num_microbatches"),
    ("training_memory MoE", lambda: memory.training_memory("mixtral-tiny", 1), "mixture-of-experts"),
    ("model_state_bytes n_params nan", lambda: memory.model_state_bytes(math.nan), "n_params"),
    ("model_state_bytes master_weights 'False'", lambda: memory.model_state_bytes(10, master_weights="False"),
     "master_weights"),
    ("layer_activation_bytes t 0", lambda: memory.layer_activation_bytes(1, 1, 1, 1, t=0), "t"),
    ("max_batch_size memory_bytes nan", lambda: memory.max_batch_size("gpt2", math.nan), "memory_bytes"),
    ("max_batch_size memory_bytes str", lambda: memory.max_batch_size("gpt2", "1e9"), "memory_bytes"),
    ("max_batch_size memory_bytes inf", lambda: memory.max_batch_size("gpt2", math.inf), "memory_bytes"),
    ("max_batch_size seq_len 2.5", lambda: memory.max_batch_size("gpt2", 1e12, 2.5), "seq_len"),
]


@pytest.mark.parametrize("call, name", [c[1:] for c in ERR], ids=[c[0] for c in ERR])
def test_bad_argument_is_named(call, name):
    with pytest.raises((ValueError, TypeError), match=re.escape(name)):
        call()


# ---- OK: valid (if unusual) arguments give the right answer ---------------------------------------------------------

def _same(a, b):
    assert torch.equal(a, b), (a, b)


def _generate_numbers():
    """numpy integers and 0/1 / numpy-bool flags are what they say (was: ValueError for numpy num_return_sequences,
    top_logprobs, min_new_tokens, no_repeat_ngram_size and num_draft_tokens); huge counts that cap themselves work."""
    want = g(3)
    _same(g(np.int64(3)), want)
    _same(g(3, num_draft_tokens=np.int64(4)), want)
    _same(generate(G, X, 3, **dict(B2, num_beams=np.int64(2))), g(3, **B2))
    _same(g(3, num_return_sequences=np.int64(2)), g(3, num_return_sequences=2))
    _same(g(3, min_new_tokens=np.int64(2), eos_token_id=1), g(3, min_new_tokens=2, eos_token_id=1))
    _same(g(3, no_repeat_ngram_size=np.int64(2)), g(3, no_repeat_ngram_size=2))
    # a min_new_tokens / no_repeat_ngram_size longer than the run never triggers
    _same(g(3, min_new_tokens=2**70), want)
    _same(g(3, no_repeat_ngram_size=2**70), want)
    out = g(3, top_logprobs=np.int64(2), return_dict=True)
    assert out.top_logprobs.shape == (2, 3, 2)
    for flag in (1, np.True_, torch.tensor(True)):
        assert isinstance(g(3, return_dict=flag), GenerationOutput)
    for flag in (0, np.False_):
        _same(g(3, use_cache=flag), want)
    assert g(3, prompt_logprobs=np.True_, return_dict=True).prompt_logprobs.shape == (2, 5)
    # was: TypeError "full(): argument 'size' failed to unpack ... Overflow" (the token buffer sized by it)
    spec = g(3, draft_model=D, num_draft_tokens=3)
    for k in (2**63, 2**70):
        _same(g(3, draft_model=D, num_draft_tokens=k), spec)
    _same(g(3, draft_model=D, num_draft_tokens=np.int64(3)), spec)
    assert spec.shape == (2, 8)


def _generate_tensors():
    """-inf / +inf biases, int biases, [1, V] / [V] scorer outputs, per-row values by prompt and by sequence."""
    ban = torch.zeros(V)
    ban[g(1)[0, -1]] = -math.inf
    assert g(1, logit_bias=ban)[0, -1] != g(1)[0, -1]
    force = torch.zeros(V)
    force[7] = math.inf
    assert (g(3, logit_bias=force)[:, 5:] == 7).all()
    _same(g(3, logit_bias=torch.zeros(V, dtype=torch.long)), g(3))
    _same(g(3, scorers=_scorer(lambda lp: torch.zeros(1, V))), g(3))
    _same(g(3, scorers=_scorer(lambda lp: torch.zeros(V))), g(3))
    _same(g(3, **S, seed=5, num_return_sequences=2, temperature=torch.ones(4)),
          g(3, **S, seed=5, num_return_sequences=2, temperature=torch.ones(2)))
    _same(g(3, **B2, seed=torch.tensor([1, 2])), g(3, **B2))  # (a valid seed: accepted, unused)
    _same(g(3, **B2, length_penalty=50.0), g(3, **B2, length_penalty=50.0))  # (3 ** 50 is a float)


def _generate_plain_callable():
    """A model that is a plain function (no train / eval modes) decodes: was AttributeError on `.training`."""
    def model(ids, cache=None, last_only=False):
        logits = torch.zeros(ids.shape[0], ids.shape[1], V)
        logits[..., 9] = 1.0
        return logits

    assert (generate(model, X, 3, use_cache=False)[:, 5:] == 9).all()
    want = g(3)
    G.train()
    try:
        _same(g(3), want)  # (decoded in eval mode)
        assert G.training  # (and the mode restored)
    finally:
        G.eval()


def _choice_constraint():
    """numpy ids and 1-D integer tensors are choices; a numpy vocab_size, and an eos given as a numpy integer (was:
    ValueError for both)."""
    c = ChoiceConstraint([[np.int64(3), 4], torch.tensor([5])], np.int64(V), 5, eos_token_id=np.int64(1))
    for row in g(3, allowed_tokens=c, eos_token_id=1)[:, 5:].tolist():
        assert row in ([3, 4, 1], [5, 1, 1]), row


def _forward_checks():
    """Valid forms: int32 labels, -100, float 0/1 masks, float positions (RoPE), 1 as a flag, empty batches."""
    for m in (G, L):
        logits, loss = m(X, X)
        _same(m(X, X.int())[0], logits)
        ignore = X.clone()
        ignore[:, :3] = -100
        assert torch.isfinite(m(X, ignore)[1])
        _same(m(X, attention_mask=AM.float()), m(X, attention_mask=AM))
        _same(m(X, attention_mask=AM.bool()), m(X, attention_mask=AM))
        _same(m(X, last_only=1), m(X, last_only=True))
        torch.testing.assert_close(m(X, last_only=np.True_), logits[:, -1:])
        _same(m(X, position_ids=POS.int()), logits)
        assert m(X[:0]).shape == (0, 5, V)
        assert m(X, X, return_logits=False)[0] is None
    torch.testing.assert_close(L(X, position_ids=POS.float()), L(X))
    assert G(X, position_ids=POS + 59).shape == (2, 5, V)  # (up to block_size - 1)


def _huge_sliding_window():
    """A window of 2**70 keys is no window: was OverflowError "int too big to convert" in the mask arithmetic."""
    torch.manual_seed(0)
    plain = Llama(ModelConfig(**LL), backend="torch").eval()
    torch.manual_seed(0)
    wide = Llama(ModelConfig(**dict(LL, sliding_window=2**70)), backend="torch").eval()
    _same(wide(X), plain(X))
    _same(generate(wide, X, 3), generate(plain, X, 3))


def _caches():
    """A numpy max_len and a numpy-bool latent flag (was: TypeError "new_cache: latent must be a bool, got bool"),
    float8 caches with scales, dtypes and devices as given, per-row crops."""
    c = G.new_cache(2, np.int64(16), latent=np.False_)
    assert c.max_len == 16 and not c.latent
    assert KVCache(1, 2, 2, 16, 8, dtype=torch.float8_e4m3fn, k_scale=2, v_scale=0.5).fp8
    assert G.new_cache(2, 16, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert G.new_cache(2, 16, device="cpu").device == torch.device("cpu")
    c = L.new_cache(2, 16)
    L(X, cache=c)
    c.crop(torch.tensor([3, 4]))
    assert c.lengths.tolist() == [3, 4]


def _configs():
    """Finite values within float32's range keep working; the defaults of the checked fields too."""
    ModelConfig(**dict(LL, norm_offset=1.0, attn_scale=1e-30, attn_softcap=50.0, logit_softcap=30.0))
    # float32's largest number as numpy prints it (np.finfo(np.float32).max), just above it as a Python float, rounds
    # to it in float32: was refused, as llmkern.rms_norm took it
    assert ModelConfig(**dict(LL, attn_scale=3.4028235e38)).attn_scale == 3.4028235e38
    c = ModelConfig(**_yarn(truncate=np.False_, beta_fast=32, beta_slow=1))
    assert c.rope_scaling["truncate"] is False
    assert ModelConfig(**_yarn()).rope_scaling["truncate"] is True
    assert ModelConfig(**dict(LL, rope_scaling={"rope_type": "linear", "factor": 1e30})).rope_scaling["factor"] == 1e30
    ModelConfig(**dict(LL, n_experts=4, router_aux_loss_coef=0.01))
    for name in ("gpt2", "llama3-8b", "deepseek-v3", "mixtral-8x7b", "deepseek-v3-tiny", "deepseek-v2-tiny"):
        get_config(name)


def _flops_numbers():
    """numpy int32 sizes do not wrap (they were multiplied as int32: wrong FLOPs with a RuntimeWarning), 0-dim
    tensors and numpy floats are numbers, a (device,) tuple is that device's bf16 peak."""
    want = flops.flops_per_token(2**30, 100, 2**20, 2**14)
    assert flops.flops_per_token(np.int32(2**30), np.int32(100), np.int32(2**20), np.int32(2**14)) == want
    assert flops.flops_per_token(torch.tensor(2**30), 100, 2**20, 2**14) == want
    assert flops.flops_per_token(2**30, 100, 2**20, 2**14, recompute=np.True_) == want * 4 // 3
    assert flops.mfu(np.float64(1e3), np.int64(2 * 10**9), ("h100",)) == 1e3 * 2e9 / flops.peak("h100")
    assert flops.mfu(torch.tensor(1e3), 1e9, 1e12) == pytest.approx(1e-0)
    assert flops.hfu(1, 3, 4, recompute=False) == flops.mfu(1, 3, 4)
    assert flops.model_flops_per_token("gpt2", np.int64(512), recompute=1) > flops.model_flops_per_token("gpt2", 512)
    assert flops.attention_fraction(get_config("llama-tiny", sliding_window=2), np.int64(8)) < 1
    assert flops.utilization(1e3, 1e9, device="cpu").mfu_device is None


def _memory_numbers():
    """numpy int32 sizes do not wrap: was 65536 * 65536 = 0 in layer_activation_bytes, OverflowError "Python integer
    17179869184 out of bounds for int32" in training_memory's embedding dropout mask."""
    want = memory.layer_activation_bytes(2**16, 2**16, 1024, 16)
    assert memory.layer_activation_bytes(np.int32(2**16), np.int32(2**16), np.int32(1024), np.int32(16)) == want
    want = memory.training_memory("gpt2", 2**20, 2**14, mask_bytes=1, dropout=True).total
    assert memory.training_memory("gpt2", np.int32(2**20), np.int32(2**14), mask_bytes=np.int32(1),
                                  dropout=True).total == want
    assert memory.max_batch_size("gpt2", np.float64(8e10)) == memory.max_batch_size("gpt2", 8e10) > 0
    assert memory.training_memory("gpt2", 1, zero_stage=np.int64(1)).total > 0
    # a one-element bool tensor or array is a flag (bool_arg's): was "must be True or False"
    want = memory.training_memory("gpt2", 2**10, dropout=True, row_stats=False).total
    assert memory.training_memory("gpt2", 2**10, dropout=torch.tensor(True), row_stats=np.array([False])).total == want


OK = [
    ("generate numbers and flags", _generate_numbers),
    ("generate tensors", _generate_tensors),
    ("generate a plain callable model", _generate_plain_callable),
    ("ChoiceConstraint numpy ids", _choice_constraint),
    ("forward valid forms", _forward_checks),
    ("huge sliding_window", _huge_sliding_window),
    ("KV caches", _caches),
    ("configs", _configs),
    ("flops numbers", _flops_numbers),
    ("memory numbers", _memory_numbers),
]


@pytest.mark.parametrize("check", [c[1] for c in OK], ids=[c[0] for c in OK])
def test_valid_input_right_answer(check):
    check()


# ---- one check of the labels' values, one message on both backends ---------------------------------------------------

@pytest.mark.parametrize("cls", [GPT, Llama])
def test_bad_labels_one_message_on_both_backends(monkeypatch, cls):
    """Labels outside the vocabulary: the torch backend's zoo check said "labels must be token ids in
    [0, vocab_size=50) or -100 (ignored), got 50", the llmkern backend's loss op "labels must be in [0, 50) or equal
    ignore_index (-100), got 50". The zoo's check (naming vocab_size) now applies on both backends, with and without
    the logits (llmkern.linear_cross_entropy), and the loss op does not read the labels' values a second time."""
    from llmkern.ops import cross_entropy as ce

    name = "gpt-tiny" if cls is GPT else "llama-tiny"
    models = {b: _tiny(cls, name, intermediate_size=64) for b in ("torch", "llmkern")}
    models["llmkern"].backend = "llmkern"
    for bad, value in ((torch.tensor([[1, 2, V, 3, 4]]), V), (torch.tensor([[1, -5, 2, 3, 4]]), -5)):
        want = f"labels must be token ids in [0, vocab_size={V}) or -100 (ignored), got {value}"
        for backend, m in models.items():
            for return_logits in (True, False):
                with pytest.raises(ValueError) as err:
                    m(X[:1], labels=bad, return_logits=return_logits)
                assert str(err.value) == want, (backend, return_logits)
    # valid labels on the llmkern backend: the op's own read of the values (in ce._check_labels) is skipped
    reads, inside = [], []
    real_check, real_ignored = ce._check_labels, ce.ignored

    def check(*args, **kw):
        inside.append(True)
        try:
            return real_check(*args, **kw)
        finally:
            inside.pop()

    def ignored(*args, **kw):
        if inside:
            reads.append(args[0].shape)
        return real_ignored(*args, **kw)

    monkeypatch.setattr(ce, "_check_labels", check)
    monkeypatch.setattr(ce, "ignored", ignored)
    for return_logits in (True, False):
        loss = models["llmkern"](X, labels=X, return_logits=return_logits)[1]
        torch.testing.assert_close(loss, models["torch"](X, labels=X)[1])
    assert reads == []
    # outside the model the op still checks its labels
    with pytest.raises(ValueError, match=r"labels must be in \[0, 50\)"):
        ce.cross_entropy(torch.randn(2, V), torch.tensor([0, V]))
    assert len(reads) == 1
