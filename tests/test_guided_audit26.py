"""json_schema_regex: bounds on numbers, additionalProperties as a schema (or true), recursive $ref unrolled to
max_recursion_depth. Every match must json.loads and validate (a validator of JSON Schema's own semantics
below: additional members allowed unless additionalProperties is false); the documents the regex documents
it generates must match; random walks through the DFA produce only valid documents."""
import json
import math
import random
import re

import pytest

from llmkern.guided import DEAD, compile_regex, json_schema_regex


def _resolve(ref, root):
    target = root
    for part in ref[2:].split("/"):
        target = target[part]
    return target


def _bounds_ok(doc, s):
    lo, hi, xlo, xhi = (s.get(k) for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"))
    return (lo is None or (doc > lo if xlo is True else doc >= lo)) and (
        hi is None or (doc < hi if xhi is True else doc <= hi)) and (
        xlo is None or isinstance(xlo, bool) or doc > xlo) and (xhi is None or isinstance(xhi, bool) or doc < xhi)


def _valid(doc, s, root):
    """JSON Schema's verdict on a json.loads'ed document (the subset these tests use)."""
    if s is True or not set(s) - {"description", "$defs"}:
        return True
    if "$ref" in s:
        return _valid(doc, _resolve(s["$ref"], root), root)
    if "anyOf" in s:
        return any(_valid(doc, sub, root) for sub in s["anyOf"])
    if "enum" in s:
        return any(doc == v and type(doc) is type(v) for v in s["enum"])
    kinds = s["type"] if isinstance(s["type"], list) else [s["type"]]
    return any(_valid_as(doc, s, kind, root) for kind in kinds)


def _valid_as(doc, s, kind, root):
    if kind == "object":
        props, extra = s.get("properties", {}), s.get("additionalProperties", True)
        return isinstance(doc, dict) and set(s.get("required", ())) <= set(doc) and all(
            _valid(v, props[k], root) if k in props else extra is not False and _valid(v, extra, root)
            for k, v in doc.items())
    if kind == "array":
        return isinstance(doc, list) and s.get("minItems", 0) <= len(doc) <= s.get("maxItems", 1e9) and all(
            _valid(v, s["items"], root) for v in doc)
    if kind in ("integer", "number"):
        return type(doc) in ((int,) if kind == "integer" else (int, float)) and _bounds_ok(doc, s)
    return {"string": lambda v: type(v) is str, "boolean": lambda v: type(v) is bool,
            "null": lambda v: v is None}[kind](doc)


def _check(schema, yes, no, **kw):
    """The regex (and its DFA) takes exactly `yes` of yes + no, and each of those validates."""
    pattern = json_schema_regex(schema, **kw)
    dfa = compile_regex(pattern)
    for text in yes + no:
        hit = dfa.fullmatch(text)
        assert hit == bool(re.fullmatch(pattern, text)) == (text in yes), (schema, text)
        if hit:
            assert _valid(json.loads(text), schema, schema), (schema, text)
    return pattern, dfa


def _random_documents(dfa, rng, count, alphabet='{}[]":, -.0123456789abetlnrsufxyz_\u00e9', cap=300):
    """Texts the DFA accepts, each char drawn uniformly among those that keep the text viable."""
    out = []
    while len(out) < count:
        state, text = dfa.start, []
        while len(text) < cap:
            if dfa.accepting(state) and rng.random() < 0.3:
                break
            nexts = [c for c in alphabet if dfa.step(state, c) != DEAD]
            if not nexts:
                break
            c = rng.choice(nexts)
            text.append(c)
            state = dfa.step(state, c)
        if dfa.accepting(state):
            out.append("".join(text))
    return out


NUMBER_BOUNDS = [
    dict(minimum=0, maximum=1), dict(exclusiveMinimum=0), dict(minimum=-2.5, exclusiveMaximum=10),
    dict(minimum=0.1, maximum=0.25), dict(exclusiveMinimum=-1.5, exclusiveMaximum=-0.125), dict(maximum=-7),
    dict(minimum=99.99), dict(minimum=0.1, exclusiveMinimum=True, maximum=3, exclusiveMaximum=True),
    dict(minimum=-0.0, maximum=0.0), dict(exclusiveMinimum=0.3, maximum=0.30000000000000004)]


def _number_texts(rng):
    texts = ["0", "-0", "0.0", "-0.0", "0.000", "1", "-1", "10", "1.5e1", "1E0", "+1", ".5", "1.", "01", "-01.5",
             "0." + "0" * 400 + "1", "1" * 400, "-" + "9" * 320 + ".5"]
    for i in range(-1600, 1601, 7):  # short decimals well inside the float grid (exact verdicts)
        texts += [str(i), f"{i / 10:.1f}", f"{i / 100:.2f}", f"{i / 1000:.3f}", f"{i / 1000:.4f}"]
    texts += [f"{rng.uniform(-12, 12):.{rng.randint(1, 6)}f}" for _ in range(300)]
    return list(dict.fromkeys(texts))


def _bound_edges(bounds):
    """Texts at and just around each bound, as far as float rounding goes and beyond."""
    out = []
    for v in bounds.values():
        if isinstance(v, bool):
            continue
        for f in (float(v), math.nextafter(float(v), math.inf), math.nextafter(float(v), -math.inf)):
            r = repr(f) if "e" not in repr(f) else format(f, "f")
            out += [r, r + "0000000001", r.rstrip("0").rstrip(".") if "." in r else r]
            if "." in r:
                head, _, tail = r.partition(".")
                out.append(f"{head}.{tail}9999999999")
    return [t for t in dict.fromkeys(out) if re.fullmatch(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?", t)]


@pytest.mark.parametrize("bounds", NUMBER_BOUNDS)
def test_number_bounds_are_sound_and_exact_on_short_decimals(bounds):
    """type number with minimum / maximum / exclusive bounds (draft 6 numbers and draft 4 booleans, float and
    int bounds): every match validates once json.loads reads it as a float or an int (so nothing rounds onto
    an excluded bound); short decimals (<= 4 fraction digits) match iff they are valid; exponents never."""
    schema = dict(type="number", **bounds)
    pattern = json_schema_regex(schema)
    dfa = compile_regex(pattern)
    short = re.compile(r"-?(0|[1-9][0-9]{0,3})(\.[0-9]{1,4})?")
    hits = 0
    for text in _number_texts(random.Random(0)) + _bound_edges(bounds):
        hit = dfa.fullmatch(text)
        assert hit == bool(re.fullmatch(pattern, text)), (bounds, text)
        try:
            valid = _valid(json.loads(text), schema, schema)
        except ValueError:
            valid = False
        if hit:
            assert valid, (bounds, text)
        elif short.fullmatch(text):
            assert not valid, (bounds, text)
        hits += hit
    assert hits >= 1


def test_number_bounds_near_floats_and_errors():
    """An exclusive bound is never reached through rounding ("0.1" + zeros + "1" reads as 0.1), the smallest
    float above it still matches; bad bounds raise naming the problem."""
    regex = json_schema_regex({"type": "number", "exclusiveMinimum": 0.1})
    assert not re.fullmatch(regex, "0.1") and not re.fullmatch(regex, "0.10000000000000000001")
    assert re.fullmatch(regex, repr(math.nextafter(0.1, 1))) and re.fullmatch(regex, "0.11")
    positive = json_schema_regex({"type": "number", "exclusiveMinimum": 0})
    assert not re.fullmatch(positive, "0." + "0" * 330 + "1") and re.fullmatch(positive, "0." + "0" * 300 + "1")
    assert re.fullmatch(json_schema_regex({"type": ["number", "null"], "maximum": 2}), "null")
    for schema, what in [({"type": "number", "minimum": 2, "maximum": 1.5}, "admit no number"),
                         ({"type": "number", "maximum": 2 ** 60}, r"maximum=1152921504606846976 .*2\*\*53"),
                         ({"type": "number", "exclusiveMaximum": True}, "needs maximum"),
                         ({"type": "number", "minimum": float("nan")}, "minimum must be a finite number")]:
        with pytest.raises(ValueError, match=what):
            json_schema_regex(schema)


def test_additional_properties_schema_follows_declared_members():
    """additionalProperties as a schema: extra members after the declared ones, each value under that schema,
    each key an escape-free string other than every declared name; with only additionalProperties (a dict
    type) the object holds any number of them."""
    schema = {"type": "object", "required": ["b"], "additionalProperties": {"type": "integer", "minimum": 0},
              "properties": {"a": {"type": "string"}, "ab": {"type": "null"}, "b": {"type": "integer"}}}
    yes = ['{"b": 1}', '{"b": 1, "x": 2}', '{"a": "s", "b": 1, "x": 2, "abc": 3, "": 4, "b2": 5, "A": 0}',
           '{"b": 1, "a ": 0}', '{"ab": null, "b": -3, "\u00e9": 7}', '{"b":1,"x":2}']
    no = ['{"b": 1, "a": 2}', '{"b": 1, "b": 2}', '{"b": 1, "ab": 2}', '{"b": 1, "x": -1}', '{"b": 1, "x": "s"}',
          '{"x": 1, "b": 1}', '{"b": 1, "\\u0078": 1}', '{"b": 1, "x": 1,}', '{"b": 1 "x": 1}', '{"x": 1}']
    _check(schema, yes, no)
    mapping = {"type": "object", "additionalProperties": {"type": "boolean"}}
    _check(mapping, ['{}', '{"k": true}', '{"k": true, "k": false}', '{ "k": true, "l": false }'],
           ['{"k": 1}', '{, "k": true}', '{"k": true, }'])
    optional = {"type": "object", "properties": {"a": {"type": "null"}, "c": {"type": "null"}},
                "additionalProperties": {"type": "null"}}
    _check(optional, ['{}', '{"a": null}', '{"c": null, "z": null}', '{"z": null}',
                      '{"a": null, "c": null, "y": null}'],
           ['{"z": null, "a": null}', '{"c": null, "a": null}', '{"a": null, "a": null}', '{,}'])


def test_additional_properties_true_or_empty_takes_any_value():
    """additionalProperties true or {} (and {} anywhere): any JSON value, containers nested up to 2 deep by
    default (max_recursion_depth when given)."""
    for extra in (True, {}, {"description": "anything"}):
        schema = {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"],
                  "additionalProperties": extra}
        _check(schema, ['{"id": 1, "x": [1, {"y": null}], "z": "s\\n"}', '{"id": 1, "e": {}, "f": []}'],
               ['{"id": 1, "x": [[[1]]]}', '{"id": 1, "id": 2}', '{"id": 1, "x": tru}'])
    _check({"type": "array", "items": {}}, ['[1, "a", [true], {"k": [null]}]'], ['[[[[1]]]]'])
    _check({"type": "array", "items": {}}, ['[1, "a"]'], ['[[1]]', '[{}]'], max_recursion_depth=0)
    _check({"type": "object", "additionalProperties": False, "properties": {"a": {"type": "null"}}},
           ['{"a": null}', '{}'], ['{"b": null}'])
    with pytest.raises(ValueError, match="additionalProperties must be a bool or a schema"):
        json_schema_regex({"type": "object", "additionalProperties": 1})


NODE = {"$defs": {"Node": {"type": "object", "required": ["v"], "properties": {
    "v": {"type": "integer"}, "next": {"$ref": "#/$defs/Node"}}}}, "$ref": "#/$defs/Node"}
TREE = {"$defs": {"T": {"anyOf": [
    {"type": "integer"}, {"type": "array", "items": {"$ref": "#/$defs/T"}, "minItems": 1}]}}, "$ref": "#/$defs/T"}


def _chain(k):
    return '{"v": 0}' if k == 0 else '{"v": %d, "next": %s}' % (k, _chain(k - 1))


def test_recursive_ref_unrolls_to_max_recursion_depth():
    """A recursive $ref is expanded inside itself at most max_recursion_depth times; past that the recursive
    branch (an optional property, an alternative, the items of an array that may be empty) is not offered;
    a schema whose every document recurses deeper raises naming the $ref; the default still refuses."""
    for depth in (0, 1, 3):
        _check(NODE, [_chain(k) for k in range(depth + 1)], [_chain(k) for k in range(depth + 1, depth + 3)],
               max_recursion_depth=depth)
    _check(TREE, ["1", "[1]", "[1, 2]"], ["[[1]]", "[]"], max_recursion_depth=1)
    _check(TREE, ["[[1], 2]", "[[3]]"], ["[[[3]]]"], max_recursion_depth=2)
    listy = {"$defs": {"L": {"type": "array", "items": {"$ref": "#/$defs/L"}}}, "$ref": "#/$defs/L"}
    _check(listy, ["[]", "[[], [[]]]"], ["[[[[]]]]"], max_recursion_depth=2)
    endless = {"$defs": {"A": {"type": "object", "required": ["a"], "properties": {"a": {"$ref": "#/$defs/A"}}}},
               "$ref": "#/$defs/A"}
    with pytest.raises(ValueError, match=r"every document .*\$ref '#/\$defs/A' more than max_recursion_depth=3"):
        json_schema_regex(endless, max_recursion_depth=3)
    with pytest.raises(ValueError, match=r"recursive \$ref '#/\$defs/Node'.*max_recursion_depth=N"):
        json_schema_regex(NODE)
    for bad in (-1, True, "3", 1.5):
        with pytest.raises(ValueError, match="max_recursion_depth must be None or an int"):
            json_schema_regex(NODE, max_recursion_depth=bad)


def test_random_documents_load_and_validate():
    """Random walks through the DFAs of schemas mixing the three features: every document json.loads and the
    validator accepts it (and re agrees it matches)."""
    schemas = [
        ({"$defs": {"Item": {"type": "object", "required": ["n"], "properties": {
            "n": {"type": "number", "minimum": -1, "exclusiveMaximum": 2.5},
            "kids": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "maxItems": 2}},
            "additionalProperties": {"type": "number", "exclusiveMinimum": 0.5}}}, "$ref": "#/$defs/Item"},
         dict(max_recursion_depth=1)),
        ({"type": "object", "properties": {"a": {"type": "boolean"}}, "additionalProperties": True}, {}),
        (TREE, dict(max_recursion_depth=2))]
    rng = random.Random(0)
    for schema, kw in schemas:
        pattern = json_schema_regex(schema, **kw)
        for text in _random_documents(compile_regex(pattern), rng, 60):
            assert re.fullmatch(pattern, text), text
            assert _valid(json.loads(text), schema, schema), (schema, text)
