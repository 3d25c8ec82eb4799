"""stop_strings' device match reads its window at once (a fixed number of kernels per decode step, whatever the
stop strings' length; no host sync); json_schema_regex's {"type": "object"} without properties and
{"type": "array"} without items take any members / items, nested as {} (max_recursion_depth, 2 by default)."""
import json
import random
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llmkern.generation import _StopStrings
from llmkern.guided import compile_regex, json_schema_regex
from test_guided_audit26 import _random_documents
from test_guided_regex import _tokenizers
from test_host_syncs import count_syncs

transformers = pytest.importorskip("transformers")
from transformers.generation.stopping_criteria import StopStringCriteria  # noqa: E402


class _CountOps(TorchDispatchMode):
    """The aten ops a block runs (each a kernel launch on the GPU)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def byte_level():
    return _tokenizers()[0]


LONG = "Hello world, the date is 2024"  # (29 bytes: the window holds up to 29 tokens)


def test_stop_check_costs_fixed_ops_and_no_sync(byte_level):
    """A stop check's ops do not grow with the longest stop string (the per-character loop ran 6 more per unit:
    27 ops for a 2-byte string, 141 for 8, 540 for 29), and it reads nothing on the host."""
    seqs = torch.randint(0, len(byte_level), (4, 40), generator=torch.Generator().manual_seed(0))
    counts = []
    for words in (["ab"], ["the date"], [LONG], [LONG, "12 345", "e"]):
        stops = _StopStrings(words, byte_level, len(byte_level), seqs.device)
        with _CountOps() as c:
            stops(seqs)
        counts.append(c.ops)
        with count_syncs() as s:
            stops(seqs)
        assert s.hits == [], (words, s.hits)
    assert len(set(counts)) == 1 and counts[0] < 40, counts


def _windows(ids, width):
    """Every run of `width` consecutive ids: rows whose last token ends at each position of the stream."""
    ids = torch.tensor(ids)
    return ids.unfold(0, width, 1)


def test_long_stop_strings_equal_transformers_criteria(byte_level):
    """Stop strings longer than a few tokens, split every way over a token stream (one ending inside a token,
    one starting before the row's first token): the rows that stop are StopStringCriteria's, for windows as
    wide as the longest string and narrower ones."""
    text = " ".join(["Hello world, the date is 2024-05-17.", "yes no maybe 12 345 email: ab@cd.org",
                     "naïve café Hello world, the dat", "e is 2024 world, the date is 2024-05"] * 2)
    ids = byte_level(text, add_special_tokens=False)["input_ids"]
    for words in ([LONG], ["world, the date is 202", "12 345 email", "é Hello"], ["o world, th", "ïve"]):
        ours = _StopStrings(words, byte_level, len(byte_level), torch.device("cpu"))
        hits = 0
        for width in (40, 12, 5, 1):
            rows = _windows(ids, width)
            want = StopStringCriteria(byte_level, words)(rows, None)
            assert torch.equal(ours(rows), want), (words, width)
            hits += int(want.sum())
        assert hits > 0, words


def _nesting(doc):
    """How deep arrays / objects nest in a json.loads'ed document (0: a scalar)."""
    if isinstance(doc, dict):
        return 1 + max(map(_nesting, doc.values()), default=0)
    if isinstance(doc, list):
        return 1 + max(map(_nesting, doc), default=0)
    return 0


def _any(depth, kind):
    """JSON Schema's verdict for {"type": kind} without properties / items, its values nested <= depth."""
    return lambda doc: isinstance(doc, kind) and _nesting(doc) <= depth + 1


def _check(schema, valid, yes, no, **kw):
    """The DFA takes exactly `yes` of yes + no (as re does), each valid; random documents of the DFA load and
    validate."""
    pattern = json_schema_regex(schema, **kw)
    dfa = compile_regex(pattern)
    for text in yes + no:
        assert dfa.fullmatch(text) == bool(re.fullmatch(pattern, text)) == (text in yes), (schema, kw, text)
    for text in yes + _random_documents(dfa, random.Random(len(pattern)), 25):
        assert re.fullmatch(pattern, text) and valid(json.loads(text)), (schema, kw, text)


def test_object_without_properties_takes_any_members():
    """{"type": "object"} (and additionalProperties absent or true) took only {}: now any members, values nested
    up to max_recursion_depth (2 by default) deep; declared properties still close the object by default, and
    {"properties": {}} / additionalProperties false take only {}."""
    deep2 = ['{"a": [1, {"b": null}], "c": "s\\n", "d": -1.5e3}', '{"k": {"x": {"y": true}}}', '{"e": [], "f": {}}']
    for schema in ({"type": "object"}, {"type": "object", "additionalProperties": True},
                   {"type": "object", "title": "T", "required": []}):
        _check(schema, _any(2, dict), ['{}', '{"a": 1}'] + deep2,
               ['[]', '{"a": [[[1]]]}', '{"a": {"b": {"c": {}}}}', '{"a" 1}', '{"a": 1,}'])
    _check({"type": "object"}, _any(0, dict), ['{}', '{"a": 1, "b": "x"}'], ['{"a": []}', '{"a": {}}'],
           max_recursion_depth=0)
    _check({"type": "object"}, _any(3, dict), ['{"a": {"b": {"c": [1]}}}'], ['{"a": [[[[1]]]]}'],
           max_recursion_depth=3)
    for closed in ({"type": "object", "properties": {}}, {"type": "object", "additionalProperties": False}):
        _check(closed, lambda doc: doc == {}, ['{}'], ['{"a": 1}'])
    named = {"type": "object", "properties": {"a": {"type": "integer"}}}
    _check(named, lambda doc: isinstance(doc, dict) and set(doc) <= {"a"}, ['{}', '{"a": 2}'], ['{"b": 2}'])
    # (the random walks draw from a small alphabet: the key must be spelt with it)
    nested = {"type": "object", "properties": {"tab": {"type": "object"}}, "required": ["tab"]}
    _check(nested, lambda doc: set(doc) == {"tab"} and _any(2, dict)(doc["tab"]),
           ['{"tab": {}}', '{"tab": {"x": [1, {"y": 2}]}}'], ['{}', '{"tab": []}', '{"tab": {"x": [[[1]]]}}'])


def test_array_without_items_takes_any_items():
    """{"type": "array"} without items raised: now any items (minItems / maxItems honoured), nested up to
    max_recursion_depth (2 by default) deep, as items {}."""
    deep2 = ['[1, "a", true, null, -0.5]', '[[1], {"k": [null]}]', '[[[]], {"a": {"b": 1}}]', '[[], {}]']
    _check({"type": "array"}, _any(2, list), ['[]'] + deep2, ['{}', '[[[[1]]]]', '[{"a": [[1]]}]', '[1,]'])
    _check({"type": "array", "minItems": 1, "maxItems": 2},
           lambda doc: _any(2, list)(doc) and 1 <= len(doc) <= 2, ['[1]', '[[1], {"k": 2}]'], ['[]', '[1, 2, 3]'])
    _check({"type": "array"}, _any(0, list), ['[]', '[1, "x", null]'], ['[[1]]', '[{}]'], max_recursion_depth=0)
    _check({"type": ["array", "null"]}, lambda doc: doc is None or _any(2, list)(doc), ['null', '[[1]]'],
           ['{}', '[[[[]]]]'])
