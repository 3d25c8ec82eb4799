"""generate's stop_sequences in beam search (a candidate that ends one finishes as with eos: transformers' beam
search with a StoppingCriteria of the same test, on a tiny random Llama loaded with from_hf), and
json_schema_regex's required keys that properties do not declare (JSON Schema: the object must hold them)."""
import json
import random
import re
import warnings

import pytest
import torch

from llmkern.generation import generate
from llmkern.guided import compile_regex, json_schema_regex
from llmkern.models import from_hf
from test_generation_cfg_audit26 import _tiny_llama
from test_guided_audit26 import _check, _random_documents, _valid

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)
V, T0 = 61, 4


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(tiny random Llama from_hf, its transformers twin)."""
    path = tmp_path_factory.mktemp("beam_stops")
    hf = _tiny_llama(path, V)
    return from_hf(str(path), backend="torch"), hf


class _StopOn(transformers.StoppingCriteria):
    """A row (a beam candidate) is done once its generated tokens, from the min_new-th on, end with a sequence."""

    def __init__(self, seqs, min_new=0):
        self.seqs, self.min_new = [torch.tensor(s) for s in seqs], min_new

    def __call__(self, input_ids, scores, **kw):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        n_new = input_ids.shape[1] - T0
        for s in self.seqs:
            if n_new >= max(len(s), self.min_new):
                done |= (input_ids[:, -len(s):] == s).all(-1)
        return done


def _hf_beams(hf, x, stops, min_new=0, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False, num_beams=3,
                           pad_token_id=0, eos_token_id=0, min_new_tokens=min_new,
                           stopping_criteria=transformers.StoppingCriteriaList([_StopOn(stops, min_new)]), **kw)


def test_beam_search_stop_sequences_equal_transformers(llama):
    """Beam search (num_beams=3) with a two-token and a one-token stop sequence cut from its free beams gives
    transformers' sequences with a StoppingCriteria of the same test, for the best beam and all three returned;
    min_new_tokens holds the stop sequences back (as in greedy / sample, vLLM's min_tokens), as a criterion that
    waits does in transformers. The old generate refused stop_sequences with beam search."""
    m, hf = llama
    x = torch.randint(1, V, (2, T0), generator=torch.Generator().manual_seed(7))
    beam = dict(strategy="beam", num_beams=3, eos_token_id=0, pad_token_id=0)
    free = generate(m, x, 10, **beam)
    rows = free[:, T0:].tolist()
    stops = [rows[0][2:4], rows[1][4:5]]
    ours = generate(m, x, 10, stop_sequences=stops, **beam)
    assert torch.equal(ours, _hf_beams(hf, x, stops)), stops
    assert ours.shape != free.shape or not torch.equal(ours, free), stops  # (the stops changed the search)
    three = generate(m, x, 10, stop_sequences=stops, num_return_sequences=3, **beam)
    assert torch.equal(three, _hf_beams(hf, x, stops, num_return_sequences=3))
    waited = generate(m, x, 10, stop_sequences=stops, min_new_tokens=6, **beam)
    assert torch.equal(waited, _hf_beams(hf, x, stops, min_new=6))
    assert not torch.equal(waited[:, :ours.shape[1]], ours) or waited.shape != ours.shape
    assert bool((waited[:, T0:T0 + 6] != 0).all()) and bool((ours[:, T0 + 5:] == 0).any())  # (stopped before)


def test_one_beam_stop_sequences_are_greedy(llama):
    """num_beams=1 is greedy decoding: stop_sequences stop its rows as greedy's do (min_new_tokens included), and
    its scores' length counts the new tokens up to the stop; draft_model still refuses them."""
    m, _ = llama
    x = torch.randint(1, V, (2, T0), generator=torch.Generator().manual_seed(7))
    plain = generate(m, x, 10, eos_token_id=0, pad_token_id=0)
    stops = [plain[0, T0 + 2:T0 + 4].tolist()]
    one = dict(strategy="beam", num_beams=1, eos_token_id=0, pad_token_id=0, stop_sequences=stops, return_dict=True)
    greedy = generate(m, x, 10, eos_token_id=0, pad_token_id=0, stop_sequences=stops)
    summed, per_token = generate(m, x, 10, length_penalty=0.0, **one), generate(m, x, 10, length_penalty=1.0, **one)
    assert torch.equal(summed.sequences, greedy)
    lengths = (greedy[:, T0:] != 0).sum(-1).float()
    assert lengths.min() == 4, (greedy, stops)  # (row 0 stopped at its 4th new token)
    torch.testing.assert_close(summed.scores / per_token.scores, lengths)
    waited = generate(m, x, 10, min_new_tokens=5, **one).sequences
    assert torch.equal(waited, generate(m, x, 10, eos_token_id=0, pad_token_id=0, stop_sequences=stops,
                                        min_new_tokens=5))
    assert bool((waited[0, T0:T0 + 5] != 0).all())
    with pytest.raises(ValueError, match="stop_sequences .*draft_model"):
        generate(m, x, 2, draft_model=m, stop_sequences=stops)


def _has_keys(keys, value_ok=lambda v: True, declared=None):
    """JSON Schema's verdict for an object that must hold `keys` (values under value_ok), declared properties
    `declared` ({name: check}) optional."""
    declared = declared or {}

    def valid(doc):
        return isinstance(doc, dict) and set(keys) <= set(doc) and all(
            declared[k](v) if k in declared else value_ok(v) for k, v in doc.items())
    return valid


def test_required_keys_without_properties():
    """{"type": "object", "required": [...]} without properties raised: now any object holding those keys, written
    first in required's order, then any extra members; with additionalProperties a schema their values (and the
    extras') follow it; beside declared properties they follow them. Every match json.loads and validates (re and
    the DFA agree), and random documents of the DFA do too."""
    cases = [
        ({"type": "object", "required": ["a"]}, _has_keys(["a"]),
         ['{"a": 1}', '{"a": {"k": [1]}, "b": "x", "c": null}', '{"a":"s","":2}'],
         ['{}', '{"b": 1}', '{"b": 1, "a": 2}', '{"a": 1, "a": 2}', '{"a": [[[1]]]}', '{"a" 1}']),
        ({"type": "object", "required": ["a", "b", "a"], "additionalProperties": {"type": "integer"}},
         _has_keys(["a", "b"], lambda v: type(v) is int),
         ['{"a": 1, "b": -2}', '{"a": 0, "b": 0, "c": 3, "ab": 4}'],
         ['{"a": 1}', '{"b": 1, "a": 2}', '{"a": 1, "b": "x"}', '{"a": 1, "b": 2, "c": true}']),
        ({"type": "object", "required": ["z", "x"], "additionalProperties": True,
          "properties": {"x": {"type": "null"}, "y": {"type": "boolean"}}},
         _has_keys(["x", "z"], declared={"x": lambda v: v is None, "y": lambda v: type(v) is bool}),
         ['{"x": null, "z": 1}', '{"x": null, "y": true, "z": [], "q": {}}'],
         ['{"z": 1, "x": null}', '{"x": null}', '{"x": 1, "z": 1}', '{"x": null, "z": 1, "y": true}']),
    ]
    for schema, valid, yes, no in cases:
        pattern, dfa = _check(schema, yes, no)
        for text in yes:
            assert valid(json.loads(text)), (schema, text)
        for text in _random_documents(dfa, random.Random(3), 15):
            doc = json.loads(text)
            assert re.fullmatch(pattern, text) and valid(doc) and _valid(doc, schema, schema), (schema, text)
    for closed in ({"type": "object", "properties": {"a": {"type": "null"}}, "required": ["b"]},
                   {"type": "object", "required": ["b"], "additionalProperties": False}):
        with pytest.raises(ValueError, match=r"required names \['b'\].*additionalProperties"):
            json_schema_regex(closed)
    for bad in ([1], [["a"]], "a"):
        with pytest.raises(ValueError, match="required"):
            json_schema_regex({"type": "object", "required": bad})
    nested = compile_regex(json_schema_regex({"type": "array", "items": {"type": "object", "required": ["id"]}}))
    assert nested.fullmatch('[{"id": 1}, {"id": 2, "n": "x"}]') and not nested.fullmatch('[{"n": 1}]')
