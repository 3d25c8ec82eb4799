"""llmkern.guided: regex-guided decoding (vLLM's guided_regex). Python's re is the oracle: the compiled DFA
fullmatches what re does, each mask is exactly the set of tokens that keep the text a viable prefix, and
greedy / sampled / beam outputs fullmatch the pattern."""
import calendar
import itertools
import json
import re
import string
import uuid

import pytest
import torch

from llmkern.generation import generate
from llmkern.guided import RegexConstraint, TokenVocabulary, compile_regex
from llmkern.models import build

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)

# the tiny alphabet of the oracle checks, and patterns whose every viable prefix completes within 3 characters
ALPHABET = "ab1-"
ORACLE_PATTERNS = [r"\d{1,3}(-\d{2})?", r"(a|b1)*-?", r"[^a-][ab]{2,}", r"((ab)?1)+|b*", r"a.b|\w-\d",
                   r"(?:1-|a){2}b?", r"[\w-]{2}|-"]


def _good(pattern, longest):
    """{text: some completion over ALPHABET, up to `longest` characters in all, fullmatches} for every text up
    to that length (brute force over re.fullmatch, shared by the text's prefixes)."""
    good = {}
    for n in range(longest, -1, -1):
        for t in itertools.product(ALPHABET, repeat=n):
            s = "".join(t)
            good[s] = bool(re.fullmatch(pattern, s)) or (n < longest and any(good[s + c] for c in ALPHABET))
    return good


def test_dfa_fullmatch_equals_re():
    """The parser (escapes, classes with ranges / negation / categories, literal { and ], lazy quantifiers,
    {,n}, anchors at the ends, an empty set) and the DFA: fullmatch agrees with re on every short text."""
    patterns = ORACLE_PATTERNS + [r"a{,2}b", r"x{", r"a{1,x}", r"^a\$$", r"[]a]+", r"[a-]+\{", r"[\d-]+?",
                                  r"(?:a|)b*?", r"a||b", r"()", r"[^\s\S]|a", r"\x61\u0062|\0", r"[\x30-\x32]+",
                                  r"(?P<n>a\.)+", r"\\\W\S", r"[^\d\n]", r".\s"]
    alphabet = "ab1-{}]x.\\ \n\x00"
    for p in patterns:
        d = compile_regex(p)
        for n in range(4):
            for t in itertools.product(alphabet, repeat=n):
                s = "".join(t)
                assert d.fullmatch(s) == bool(re.fullmatch(p, s)), (p, s)
    # Unicode categories as re reads them in str patterns
    d = compile_regex(r"\d\w\s")
    for s in ["٣é\u2003", "1_\t", "a1 ", "١ß\x1c"]:
        assert d.fullmatch(s) == bool(re.fullmatch(r"\d\w\s", s)), s


def _tiny_vocab():
    strings = list(ALPHABET) + ["ab", "1-", "b1", "-1a", "", None, "11", "a-"]
    return strings + ["<eos>"], len(strings)  # eos last (its string ignored)


def _ids_for(text, strings):
    return [strings.index(c) for c in text]


@pytest.mark.parametrize("pattern", ORACLE_PATTERNS)
def test_masks_equal_brute_force_oracle(pattern):
    """Every token of every viable prefix (up to 2 characters) is allowed iff the text with it can still be
    completed to a match (a completion of up to 7 characters in all), eos iff it matches; the mask depends
    on the text only (spelled by one-character tokens or by a two-character one); rows that emitted eos get
    eos only, whatever padding follows."""
    strings, eos = _tiny_vocab()
    good = _good(pattern, 7)
    c = RegexConstraint(pattern, strings, prompt_len=1, eos_token_id=eos)
    prefixes = [s for n in range(3) for s in map("".join, itertools.product(ALPHABET, repeat=n)) if good[s]]
    rows = torch.tensor([[0] + _ids_for(s, strings) + [eos] * (2 - len(s)) for s in prefixes])
    # (the padding with eos: rows of one width; the eos rows check finished rows at the same time)
    width = max(len(s) for s in prefixes)
    for s in prefixes:
        row = torch.tensor([[7] + _ids_for(s, strings)])
        mask = c(row)[0]
        want = [bool(tok) and good[s + tok] for tok in strings[:eos]] + [bool(re.fullmatch(pattern, s))]
        assert mask.tolist() == want, (pattern, s)
        if s == "ab":
            assert torch.equal(c(torch.tensor([[7, strings.index("ab")]]))[0], mask)
    masks = c(rows)
    for s, row_mask in zip(prefixes, masks):
        if len(s) < width:  # ends with eos: finished
            assert row_mask.nonzero().flatten().tolist() == [eos], s


def test_rows_reordered_between_steps_keep_their_own_state():
    """Beam search reorders rows: each step's mask is the row's own, whatever the previous step's rows
    were (cache keyed by the tokens, not by the row index)."""
    strings, eos = _tiny_vocab()
    pattern = r"(a|b1)*-?1?"
    c = RegexConstraint(pattern, strings, prompt_len=0, eos_token_id=eos)
    g = torch.Generator().manual_seed(0)
    seqs = torch.zeros(5, 0, dtype=torch.long)
    for _ in range(6):
        masks = c(seqs)
        for row, mask in zip(seqs, masks):  # a fresh constraint sees the row alone
            fresh = RegexConstraint(pattern, strings, prompt_len=0, eos_token_id=eos)
            assert torch.equal(fresh(row[None])[0], mask)
        nxt = torch.multinomial(masks.float(), 1, generator=g)
        seqs = torch.cat([seqs, nxt], 1)[torch.randperm(5, generator=g)]


# the vocabulary of the generation tests: characters, multi-character tokens, an empty and a text-less one
GEN_STRINGS = (list("0123456789") + list("abcde") + ["@", ".", "-", " ", "com", "org", "12", "ab", "yes", "no",
                                                     "maybe", "ma", "ybe", "x", "y", "z", "-0", "20", "c@", "", None,
                                                     "<eos>", "Q", "R", ".c", "o", "r", "g", "m", "s", "n", "e"])
GEN_EOS = GEN_STRINGS.index("<eos>")
V = len(GEN_STRINGS) + 3  # the model's vocabulary is wider than the strings (padded embedding)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build("gpt-tiny", backend="torch", vocab_size=V, n_layer=1, n_embd=32).eval()


def _texts(out, prompt_len, eos=GEN_EOS, strings=GEN_STRINGS):
    """(text up to eos, whether the row emitted eos) per row."""
    rows = []
    for row in out[:, prompt_len:].tolist():
        ended = eos in row
        rows.append((TokenVocabulary(strings).decode(row, eos_token_id=eos), ended))
    return rows


GEN_PATTERNS = [r"\d{2,4}", r"[a-c]{1,4}@[a-e]{1,3}\.(com|org)", r"(19|20)\d{2}-[01]\d-[0-3]\d",
                r"yes|no|maybe", r"((ab|c){1,2}-){1,2}\d", r"[^0-9@.\- ]{3}"]


@pytest.mark.parametrize("pattern", GEN_PATTERNS)
def test_generate_outputs_fullmatch(model, pattern):
    """Greedy, sampling (3 seeds, hot) and beam search: every row ends with eos (each pattern's matches are
    shorter than max_new_tokens) and its text fullmatches; eos is followed by padding only."""
    x = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(1))
    vocab = TokenVocabulary(GEN_STRINGS, vocab_size=V)
    runs = [dict(strategy="greedy")] + [dict(strategy="sample", temperature=2.0, seed=s) for s in range(3)]
    runs.append(dict(strategy="beam", num_beams=3, num_return_sequences=2))
    for kw in runs:
        c = RegexConstraint(pattern, vocab, prompt_len=3, eos_token_id=GEN_EOS)
        out = generate(model, x, 16, allowed_tokens=c, eos_token_id=GEN_EOS, pad_token_id=0, **kw)
        for (text, ended), row in zip(_texts(out, 3), out[:, 3:].tolist()):
            assert ended and re.fullmatch(pattern, text), (pattern, kw, text, row)
            assert all(t == 0 for t in row[row.index(GEN_EOS) + 1:]), row


def test_rows_cut_by_max_new_tokens_are_viable_prefixes(model):
    """A row stopped by max_new_tokens holds a prefix that some completion turns into a match; one that
    matches with nothing left to add ends with eos."""
    pattern = r"\d+-[a-c]{2}|yes"
    x = torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(2))
    c = RegexConstraint(pattern, GEN_STRINGS, prompt_len=4, eos_token_id=GEN_EOS, vocab_size=V)
    for seed in range(3):
        out = generate(model, x, 3, strategy="sample", temperature=3.0, seed=seed, allowed_tokens=c,
                       eos_token_id=GEN_EOS, pad_token_id=0)
        for text, ended in _texts(out, 4):
            if ended:
                assert re.fullmatch(pattern, text), text
            else:
                assert any(re.fullmatch(pattern, text + "".join(w)) for n in range(4)
                           for w in itertools.product("1-ab", repeat=n)) or re.fullmatch(r"\d+", text), text


def test_dead_stuck_and_complete_rows():
    """A row whose text cannot match (mask bypassed) gets eos alone, or raises without eos; a complete match
    that cannot go on raises without eos; a live text the vocabulary cannot continue gets eos alone."""
    strings = ["a", "b", "c", None]
    c = RegexConstraint(r"ab?", strings, prompt_len=0, eos_token_id=3)
    assert c(torch.tensor([[2], [0], [3]])).tolist() == [[False] * 3 + [True], [False, True, False, True],
                                                         [False] * 3 + [True]]
    assert c(torch.tensor([[0, 1]]))[0].tolist() == [False, False, False, True]  # complete: eos alone
    no_eos = RegexConstraint(r"ab?", strings, prompt_len=0)
    with pytest.raises(ValueError, match="cannot match the pattern"):
        no_eos(torch.tensor([[2]]))
    with pytest.raises(ValueError, match="nothing may follow"):
        no_eos(torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match=r"row 1.s generated text tokens \[3\]"):
        no_eos(torch.tensor([[0], [3]]))  # (a text-less token: dead)
    # eos ends the row even where its string would continue the text (the string is ignored)
    finished = RegexConstraint(r"[ab]*", strings, prompt_len=0, eos_token_id=0)
    assert finished(torch.tensor([[1, 0], [1, 1]])).tolist() == [[True, False, False, False],
                                                                 [True, True, False, False]]
    stuck = RegexConstraint(r"az|b", strings, prompt_len=0, eos_token_id=3)  # no token holds z
    assert stuck(torch.tensor([[0]]))[0].tolist() == [False, False, False, True]
    assert stuck(torch.tensor(([[1]])))[0].tolist() == [False, False, False, True]
    assert RegexConstraint(r"a*", strings, 0, 3)(torch.zeros(2, 0, dtype=torch.long)).tolist() == [
        [True, False, False, True]] * 2


@pytest.mark.parametrize("pattern, what", [
    (r"a(?=b)", "lookahead"), (r"a(?!b)", "negative lookahead"), (r"(?<=a)b", "lookbehind"),
    (r"(?<!a)b", "negative lookbehind"), (r"(a)\1", "backreference"), (r"(?P<x>a)(?P=x)", "named backreference"),
    (r"a\b", "word boundary"), (r"\Aa", "anchor"), (r"a\Z", "anchor"), (r"a^b", "anchor"), (r"a$b", "anchor"),
    (r"(?i)a", "inline flags"), (r"(?i:a)", "inline flags"), (r"(?>a)", "atomic group"), (r"a*+", "possessive"),
    (r"(?#c)a", "comment"), (r"(a)?(?(1)b|c)", "conditional"), (r"\N{DIGIT ONE}", "escape \\N"),
])
def test_unsupported_syntax_is_named(pattern, what):
    re.compile(pattern)  # (valid in re: refused as outside the subset, never misread)
    with pytest.raises(ValueError, match=f"unsupported construct {re.escape(what)}"):
        compile_regex(pattern)


@pytest.mark.parametrize("pattern, what", [
    ("(a", "missing \\)"), ("a)", "unbalanced parenthesis"), ("*a", "nothing to repeat"), ("a**", "multiple repeat"),
    ("a{3,2}", "min repeat greater"), ("[b-a]", "bad character range"), ("[\\d-z]", "bad character range"),
    ("[ab", "unterminated character set"), ("\\q", "bad escape"), ("\\x4", "incomplete escape"), ("a\\", "bad escape"),
    ("(?P<1>a)", "bad group name"), ("a{2}{3}", "multiple repeat"), ("\\pL", "bad escape"),
])
def test_malformed_patterns_raise_as_re_does(pattern, what):
    with pytest.raises(re.error):
        re.compile(pattern)
    with pytest.raises(ValueError, match=what):
        compile_regex(pattern)


def test_bad_arguments():
    strings = ["a", "b", None]
    with pytest.raises(TypeError, match="pattern must be a str"):
        RegexConstraint(b"a", strings, 0)
    with pytest.raises(TypeError, match="vocab must be"):
        RegexConstraint("a", "ab", 0)
    with pytest.raises(TypeError, match=r"vocab\[1\]"):
        RegexConstraint("a", ["a", 3], 0)
    with pytest.raises(ValueError, match="vocab is empty"):
        RegexConstraint("a", [], 0)
    with pytest.raises(ValueError, match="vocab_size"):
        RegexConstraint("a", strings, 0, vocab_size=2)
    with pytest.raises(ValueError, match="prompt_len"):
        RegexConstraint("a", strings, -1)
    with pytest.raises(ValueError, match="prompt_len"):
        RegexConstraint("a", strings, True)
    for eos in (3, -1, True, 1.0):
        with pytest.raises(ValueError, match="eos_token_id"):
            RegexConstraint("a", strings, 0, eos_token_id=eos)
    with pytest.raises(ValueError, match="matches no text"):
        RegexConstraint(r"[^\s\S]", strings, 0)
    with pytest.raises(ValueError, match="no token of the vocabulary can start"):
        RegexConstraint(r"c", strings, 0, eos_token_id=2)
    with pytest.raises(ValueError, match="only the empty text"):
        RegexConstraint(r"c?", strings, 0)
    with pytest.raises(ValueError, match="too large"):
        compile_regex(r"(a{1000}){1000}")
    c = RegexConstraint("a", strings, 2)
    with pytest.raises(ValueError, match="prompt_len=2 exceeds"):
        c(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        c(torch.zeros(1, 3))
    assert c.vocab_size == 3 and RegexConstraint("a", strings, 0, vocab_size=8)(torch.zeros(1, 0, dtype=int)).shape \
        == (1, 8)


_CORPUS = ["Hello world, the date is 2024-05-17.", "yes no maybe 12 345 email: ab@cd.org", "a  b\tc\nnew line",
           "naïve café"] * 4


def _tokenizers(corpus=_CORPUS, spm_vocab_size=380):
    """A byte-level BPE (GPT-2's scheme) and a SentencePiece-style BPE (Metaspace, byte fallback), trained
    offline on `corpus`, as transformers tokenizers (tests/test_guided_bytes.py uses them too)."""
    tk = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    byte_level = tk.Tokenizer(tk.models.BPE())
    byte_level.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = tk.decoders.ByteLevel()
    byte_level.train_from_iterator(corpus, tk.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    spm = tk.Tokenizer(tk.models.BPE(unk_token="<unk>", byte_fallback=True))
    spm.pre_tokenizer = tk.pre_tokenizers.Metaspace()
    spm.decoder = tk.decoders.Sequence([tk.decoders.Replace("▁", " "), tk.decoders.ByteFallback(),
                                        tk.decoders.Fuse(), tk.decoders.Strip(" ", 1, 0)])
    spm.train_from_iterator(corpus, tk.trainers.BpeTrainer(
        vocab_size=spm_vocab_size, special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)],
        show_progress=False))
    fast = transformers.PreTrainedTokenizerFast
    return [fast(tokenizer_object=byte_level, eos_token="<|endoftext|>"),
            fast(tokenizer_object=spm, eos_token="</s>", unk_token="<unk>", bos_token="<s>")]


def test_tokenizer_vocabulary_text_rule():
    """A tokenizer's token strings are the text each adds after other text: the strings of a text's tokens
    join to the text itself, SentencePiece's leading ▁ kept as a space (decode() strips it at the start),
    byte-level Ġ as a space, byte-fallback <0x0A> as a newline; special tokens and pieces of a multi-byte
    character have no text. A guided generation with such a vocabulary decodes to a match."""
    byte_level, spm = _tokenizers()
    for tok, lead in ((byte_level, ""), (spm, " ")):
        vocab = TokenVocabulary(tok)
        assert vocab.strings[tok.eos_token_id] is None and len(vocab.strings) == len(tok)
        for text in ["Hello world, the date", "yes  no\tmaybe 12\n", "ab@cd.org café"]:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert "".join(vocab.strings[i] for i in ids) == lead + text, (tok, text)
            assert tok.decode(ids) == text
        if tok is spm:
            assert vocab.strings[tok.convert_tokens_to_ids("<0x0A>")] == "\n"
        else:
            assert vocab.strings[tok.convert_tokens_to_ids("Ġ")] == " "
            assert vocab.strings[tok.convert_tokens_to_ids("Ã")] is None  # (the first byte of é / ï)
        pattern = r" ?(yes|no|maybe) \d{2,3}"
        c = RegexConstraint(pattern, vocab, prompt_len=2, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        lm = build("gpt-tiny", backend="torch", vocab_size=len(tok), n_layer=1, n_embd=32).eval()
        out = generate(lm, torch.tensor([[5, 6]]), 12, strategy="sample", seed=0, allowed_tokens=c,
                       eos_token_id=tok.eos_token_id, pad_token_id=0)
        row = out[0, 2:].tolist()
        assert tok.eos_token_id in row
        text = vocab.decode(row, eos_token_id=tok.eos_token_id)
        assert re.fullmatch(pattern, text), text
        assert tok.decode(row[:row.index(tok.eos_token_id)]) == text.removeprefix(" " if tok is spm else "")


SCHEMA = {"type": "object", "title": "person", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 6}, "age": {"type": "integer"}, "score": {"type": "number"},
    "ok": {"type": "boolean"}, "color": {"enum": ["red", "green", 7, None]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 1, "maxItems": 2},
    "nick": {"type": "string", "maxLength": 3}, "pet": {"type": "object", "properties": {"cat": {"const": True}}}},
    "required": ["name", "age", "score", "ok", "color", "tags"]}


def _valid(doc, schema, root=None):
    """A validator for the subset json_schema_regex takes (jsonschema is not a dependency), written from JSON
    Schema's text: $ref into the root, anyOf / oneOf (exactly one) / allOf, type lists, integer bounds (draft 6
    and draft 4's boolean exclusives), pattern as an ECMA search (re.ASCII: \\d \\w ASCII), formats by hand.
    Objects keep the schema's property order (the regex's documented choice)."""
    root = schema if root is None else root
    if "$ref" in schema:
        target = root
        for part in schema["$ref"][2:].split("/"):
            target = target[part]
        return _valid(doc, target, root)
    for key, need in (("anyOf", lambda n: n >= 1), ("oneOf", lambda n: n == 1), ("allOf", None)):
        if key in schema:
            hits = sum(_valid(doc, sub, root) for sub in schema[key])
            return need(hits) if need else hits == len(schema[key])
    if "enum" in schema or "const" in schema:
        values = schema.get("enum", [schema.get("const")])
        return any(doc == v and type(doc) is type(v) for v in values)
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    return any(_valid_as(doc, schema, kind, root) for kind in kinds)


def _valid_as(doc, schema, kind, root):
    if kind == "object":
        props = schema.get("properties", {})
        return isinstance(doc, dict) and set(schema.get("required", ())) <= set(doc) <= set(props) and list(
            doc) == [k for k in props if k in doc] and all(_valid(doc[k], props[k], root) for k in doc)
    if kind == "array":
        return isinstance(doc, list) and schema.get("minItems", 0) <= len(doc) <= schema.get("maxItems", 1e9) and all(
            _valid(v, schema["items"], root) for v in doc)
    if kind == "string":
        return isinstance(doc, str) and schema.get("minLength", 0) <= len(doc) <= schema.get("maxLength", 1e9) and (
            "pattern" not in schema or re.search(schema["pattern"], doc, re.ASCII) is not None) and (
            "format" not in schema or _FORMAT_CHECKS[schema["format"]](doc))
    if kind == "integer":
        if type(doc) is not int:
            return False
        lo, hi, xlo, xhi = (schema.get(k) for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"))
        return (lo is None or (doc > lo if xlo is True else doc >= lo)) and (
            hi is None or (doc < hi if xhi is True else doc <= hi)) and (
            xlo is None or isinstance(xlo, bool) or doc > xlo) and (xhi is None or isinstance(xhi, bool) or doc < xhi)
    return {"number": lambda v: type(v) in (int, float), "boolean": lambda v: type(v) is bool,
            "null": lambda v: v is None}[kind](doc)


def _date_ok(s):
    m = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)", s, re.ASCII)
    if not m:
        return False
    y, mo, d = map(int, m.groups())
    days = [31, 29 if calendar.isleap(y) else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    return 1 <= mo <= 12 and 1 <= d <= days[mo - 1]


def _time_ok(s):
    m = re.fullmatch(r"(\d\d):(\d\d):(\d\d)(\.\d+)?([zZ]|[+-](\d\d):(\d\d))", s, re.ASCII)
    return bool(m) and int(m[1]) < 24 and int(m[2]) < 60 and int(m[3]) <= 60 and (
        m[6] is None or (int(m[6]) < 24 and int(m[7]) < 60))


def _email_ok(s):
    local, at, domain = s.rpartition("@")
    atom = set(string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-")
    labels = domain.split(".")
    return bool(at) and all(part and set(part) <= atom for part in local.split(".")) and len(labels) >= 2 and all(
        label and set(label) <= set(string.ascii_letters + string.digits + "-") and label[0] != "-" != label[-1]
        for label in labels)


def _uuid_ok(s):
    try:
        return len(s) == 36 and str(uuid.UUID(s)) == s.lower()
    except ValueError:
        return False


_FORMAT_CHECKS = {"date": _date_ok, "time": _time_ok, "uuid": _uuid_ok, "email": _email_ok,
                  "date-time": lambda s: len(s) > 11 and s[10] in "Tt" and _date_ok(s[:10]) and _time_ok(s[11:])}


def test_json_schema_regex_matches_valid_documents_only():
    from llmkern.guided import json_schema_regex

    pattern = json_schema_regex(SCHEMA)
    dfa = compile_regex(pattern)
    good = ['{"name": "ab", "age": 3, "score": -1.5e3, "ok": true, "color": null, "tags": ["x"]}',
            '{"name":"a\\u00e9\\"","age":-10,"score":0,"ok":false,"color":7,"tags":["","abc"],"nick":"n","pet":{}}',
            '{"name": "ab", "age": 3, "score": 2.25, "ok": true, "color": "red", "tags": ["x"], "pet": {"cat": true}}']
    bad = ['{"age": 3, "name": "ab", "score": 1, "ok": true, "color": null, "tags": ["x"]}',  # order
           '{"name": "ab", "age": 3, "score": 1, "ok": true, "color": null}',  # missing
           '{"name": "abcdefg", "age": 3, "score": 1, "ok": true, "color": null, "tags": ["x"]}',  # maxLength
           '{"name": "ab", "age": 03, "score": 1, "ok": true, "color": null, "tags": ["x"]}',  # leading zero
           '{"name": "ab", "age": 3, "score": 1, "ok": true, "color": "blue", "tags": ["x"]}',  # enum
           '{"name": "ab", "age": 3, "score": 1, "ok": true, "color": null, "tags": []}',  # minItems
           '{"name": "ab", "age": 3, "score": 1, "ok": true, "color": null, "tags": ["x"], "x": 1}']  # extra
    for doc in good + bad:
        want = doc in good
        try:
            valid = _valid(json.loads(doc), SCHEMA)
        except ValueError:
            valid = False
        assert want == valid == dfa.fullmatch(doc) == bool(re.fullmatch(pattern, doc)), doc
    assert json_schema_regex({"type": "integer"}, whitespace="") == json_schema_regex('{"type": "integer"}')
    for schema, what in [({"$ref": "#/x"}, "does not resolve"), ({"type": "string", "multipleOf": 2}, "'multipleOf'"),
                         ({"anyOf": []}, "non-empty list"),
                         ({"not": {}}, "'not'"), ({"type": "strin"}, "type must be"),
                         ({"type": "string", "maxLength": -1}, "maxLength"),
                         ({"type": "string", "minLength": 3, "maxLength": 2}, "below"), ({"enum": []}, "enum"),
                         ({"type": "object", "properties": {"a": {"type": "null"}}, "required": ["b"]}, "required"),
                         ({"enum": [[1]]}, "scalars"), ({"type": "object", "properties": {"a": 3}}, "properties.a"),
                         ({"type": "object", "properties": {}, "$ref": "#"}, r"\$ref")]:
        with pytest.raises(ValueError, match=what):
            json_schema_regex(schema)
    with pytest.raises(ValueError, match="missing"):
        json_schema_regex({"type": "null"}, whitespace="(")


def test_json_schema_guided_generation_loads_and_validates(model_json):
    """Greedy, sampling and beam search under json_schema_regex: every row ends, json.loads reads it and the
    document is valid under the schema."""
    from llmkern.guided import json_schema_regex

    m, strings, eos = model_json
    pattern = json_schema_regex(SCHEMA)
    x = torch.randint(0, len(strings), (2, 3), generator=torch.Generator().manual_seed(4))
    vocab = TokenVocabulary(strings)
    bias = torch.zeros(len(strings))  # (numbers are unbounded: a random model lets them run past max_new_tokens)
    bias[[strings.index(d) for d in "0123456789"] + [strings.index("12")]] = -4.0
    for kw in [dict(), dict(strategy="sample", seed=0), dict(strategy="sample", seed=1, top_k=8),
               dict(strategy="beam", num_beams=2)]:
        c = RegexConstraint(pattern, vocab, prompt_len=3, eos_token_id=eos)
        out = generate(m, x, 120, allowed_tokens=c, eos_token_id=eos, pad_token_id=0, logit_bias=bias, **kw)
        for text, ended in _texts(out, 3, eos, strings):
            assert ended and _valid(json.loads(text), SCHEMA), (kw, text)


@pytest.fixture(scope="module")
def model_json():
    """A tiny model over printable ASCII, JSON's punctuation runs and key names as tokens, an eos."""
    strings = [chr(i) for i in range(32, 127)] + ['{"', '": ', '", "', ", ", "true", "false", "null", '"name"',
                                                  '"tags": ["', "12", "ab", "\\u00", "\\n", "", None, "<eos>"]
    torch.manual_seed(1)
    return build("gpt-tiny", backend="torch", vocab_size=len(strings), n_layer=1, n_embd=32).eval(), strings, \
        len(strings) - 1


@pytest.mark.parametrize("bounds", [
    dict(minimum=-7, maximum=123), dict(exclusiveMinimum=-120, exclusiveMaximum=-9), dict(minimum=0),
    dict(maximum=0), dict(exclusiveMinimum=99), dict(maximum=-100), dict(minimum=-1000, maximum=1000),
    dict(minimum=-2.5, maximum=17.5), dict(minimum=5, exclusiveMinimum=True, maximum=50, exclusiveMaximum=True),
    dict(minimum=42, maximum=42), dict(exclusiveMinimum=9.5, exclusiveMaximum=10.5)])
def test_json_schema_integer_bounds_are_exact(bounds):
    """Integer bounds (draft 6 numbers, draft 4 booleans, float bounds) give exactly the integers in range, in
    JSON's spelling (no leading zeros; -0 iff 0 is in range), checked on every integer of -1200..1200."""
    from llmkern.guided import json_schema_regex

    schema = dict(type="integer", **bounds)
    pattern = json_schema_regex(schema)
    dfa = compile_regex(pattern)
    for text in [str(n) for n in range(-1200, 1201)] + ["-0", "007", "-01", "1.0", "+5", ""]:
        try:
            want = _valid(json.loads(text), schema) and not re.search(r"\.|^\+|^-?0\d", text)
        except ValueError:
            want = False
        assert bool(re.fullmatch(pattern, text)) == want == dfa.fullmatch(text), (bounds, text)


RICH = {
    "$defs": {"Point": {"type": "object", "required": ["x", "y"], "properties": {
        "x": {"type": "integer", "minimum": -10, "maximum": 10}, "y": {"type": "integer", "exclusiveMinimum": 0}}},
        "Code": {"type": "string", "pattern": r"^[A-Z]{2}-\d{3}$"}},
    "type": "object", "additionalProperties": False, "required": ["p", "code", "tag", "n", "v"],
    "properties": {
        "p": {"$ref": "#/$defs/Point"}, "code": {"$ref": "#/$defs/Code"},
        "tag": {"type": "string", "pattern": "ab|^c|d$"},
        "when": {"type": "string", "format": "date-time"}, "day": {"type": "string", "format": "date"},
        "at": {"type": "string", "format": "time"}, "id": {"type": "string", "format": "uuid"},
        "mail": {"type": "string", "format": "email"}, "n": {"type": ["integer", "null"], "maximum": -5},
        "v": {"anyOf": [{"type": "boolean"}, {"type": "integer", "minimum": 100, "exclusiveMaximum": 200}]},
        "w": {"oneOf": [{"type": "string", "maxLength": 2}, {"type": "null"}]}}}
RICH_BASE = {"p": {"x": 1, "y": 2}, "code": "AB-123", "tag": "xaby", "when": "2024-02-29T12:00:00Z",
             "day": "2024-12-31", "at": "08:30:00+01:00", "id": "123e4567-e89b-12d3-a456-426614174000",
             "mail": "a.b+c@ex-ample.com", "n": None, "v": True, "w": "ab"}
RICH_EDITS = {  # values tried in place of the base's (each once)
    "p": [{"x": -10, "y": 1}, {"x": 10, "y": 12345}, {"x": 11, "y": 1}, {"x": 0, "y": 0}, {"x": -11, "y": 5},
          {"y": 1, "x": 1}, {"x": 1}],
    "code": ["ZZ-000", "AB-1234", "ab-123", "AB-\u0661\u0662\u0663", "xAB-123"],
    "tag": ["ab", "cat", "xd", "xc", "dx", "", "a\u00e9b", "c", "\u00e9abc\u4e2d"],
    "when": ["2000-02-29T23:59:60.5-01:00", "1999-12-31t00:00:00z", "2023-02-29T12:00:00Z", "1900-02-29T00:00:00Z",
             "2024-13-01T00:00:00Z", "2024-04-31T00:00:00Z", "2024-04-30T24:00:00Z", "2024-04-30 10:00:00Z"],
    "day": ["2400-02-29", "2100-02-29", "2024-1-31", "2023-11-30", "2023-11-31", "2024-00-10"],
    "at": ["23:59:59.123Z", "08:30:00", "08:60:00Z", "08:30:00+24:00"],
    "id": ["123E4567-E89B-12D3-A456-426614174000", "123e4567e89b12d3a456426614174000",
           "{123e4567-e89b-12d3-a456-426614174000}", "123e4567-e89b-12d3-a456-42661417400g"],
    "mail": ["x@a.b.co", "a..b@x.com", "ab@x", "ab@-x.com", ".a@x.com", "a@b@c.com", "o'k@x1.org"],
    "n": [-5, -4, -1000, 0, "x"], "v": [False, 100, 199, 200, 99, None, 150.5], "w": [None, "abc", 1, ""],
}


def _rich_documents():
    docs = [RICH_BASE]
    for key, values in RICH_EDITS.items():
        docs += [{**RICH_BASE, key: v} for v in values]
    docs.append({k: v for k, v in RICH_BASE.items() if k != "code"})  # a required member missing
    docs.append({k: v for k, v in RICH_BASE.items() if k not in ("when", "at", "w")})  # optional ones left out
    docs.append({**RICH_BASE, "extra": 1})  # additionalProperties: false
    return [json.dumps(d, ensure_ascii=False) for d in docs]


def test_json_schema_keywords_agree_with_a_validator():
    """$defs / $ref, anyOf, oneOf, type lists, integer bounds, pattern (an unanchored search with anchored
    alternatives, ECMA's ASCII \\d), every format: the regex accepts a document iff the validator does."""
    from llmkern.guided import json_schema_regex

    pattern = json_schema_regex(RICH)
    dfa = compile_regex(pattern)
    verdicts = []
    for doc in _rich_documents():
        valid = _valid(json.loads(doc), RICH)
        assert bool(re.fullmatch(pattern, doc)) == valid == dfa.fullmatch(doc), doc
        verdicts.append(valid)
    assert 25 <= sum(verdicts) <= len(verdicts) - 30  # (both verdicts well represented)
    compact = json_schema_regex(RICH, whitespace="")
    assert re.fullmatch(compact, json.dumps(RICH_BASE, separators=(",", ":")))


def test_json_schema_pattern_reads_ecma_and_searches():
    """pattern as JSON Schema reads it: an unanchored search (^ / $ per top-level alternative), ECMA-262's ASCII
    \\d and \\w, its . (not U+2028), (?<name>...) groups; the value is generated without escapes."""
    from llmkern.guided import json_schema_regex

    for pat, yes, no in [(r"^(?<yy>[0-9]{2})\w$", ["12a", "12_"], ["12\u00e9", "123 ", "x12a"]),
                         (r"a.b", ["a b", "xa\u00e9by"], ["a\u2028b", "ab"]),
                         (r"\d|^$", ["", "x1y"], ["\u0663", "x"]), (r"[^a]", ["ab", "\u4e2d"], ["a", "aa"]),
                         (r"\W+$", ["a-", "a\u00e9"], ["a_", ""])]:
        regex = json_schema_regex({"type": "string", "pattern": pat})
        for value in yes + no:
            assert bool(re.fullmatch(regex, json.dumps(value, ensure_ascii=False))) == (value in yes), (pat, value)
    assert not re.fullmatch(json_schema_regex({"type": "string", "pattern": "a"}), '"a\\""')  # (escape: no)


def test_json_schema_keyword_errors_name_the_problem():
    from llmkern.guided import json_schema_regex

    node = {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}
    for schema, what in [
            ({"$defs": {"Node": node}, "$ref": "#/$defs/Node"}, r"recursive \$ref '#/\$defs/Node'.*Node -> "),
            ({"type": "string", "format": "ipv4"}, "unsupported format 'ipv4'"),
            ({"type": "string", "pattern": "a", "maxLength": 3}, "combines"),
            ({"type": "string", "pattern": "a(?=b)"}, "pattern: .*lookahead"),
            ({"type": "string", "pattern": "a$b"}, "anchor"),
            ({"type": "integer", "minimum": 3, "maximum": 2.5}, "admit no integer"),
            ({"type": "integer", "exclusiveMinimum": True}, "needs minimum"),
            ({"type": "integer", "minimum": "1"}, "minimum must be a finite number"),
            ({"$ref": "#/$defs/X", "description": "ok", "minimum": 1}, r"'minimum'\] in schema \(beside \$ref"),
            ({"$ref": "other.json#/x"}, "must point into the schema"),
            ({"allOf": [{"type": "null"}, {"type": "null"}]}, "exactly one"),
            ({"type": ["string", "string"]}, "twice"), ({"type": ["string", "nul"]}, "type must be"),
            ({"type": []}, "type must be"), ({"type": {"a": 1}}, "type must be"),
            ({"type": ["integer", "null"], "maxLength": 2}, "'maxLength'"), ({"oneOf": {}}, "non-empty list"),
            ({"type": "object", "properties": {}, "patternProperties": {}}, "'patternProperties'")]:
        with pytest.raises(ValueError, match=what):
            json_schema_regex(schema)
    # a $ref reached twice without a cycle is fine; allOf of one schema is that schema
    shared = {"$defs": {"N": {"type": "null"}}, "type": "array", "items": {"anyOf": [{"$ref": "#/$defs/N"}, {
        "allOf": [{"$ref": "#/$defs/N"}]}]}}
    assert re.fullmatch(json_schema_regex(shared), "[null, null]")


GEN_SCHEMA = {"$defs": {"Id": {"type": "integer", "exclusiveMinimum": 0, "maximum": 999}},
              "type": "object", "required": ["id", "n", "code", "day", "kind"], "properties": {
                  "id": {"$ref": "#/$defs/Id"}, "n": {"type": ["integer", "null"], "minimum": -50, "maximum": 50},
                  "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                  "day": {"type": "string", "format": "date"},
                  "kind": {"anyOf": [{"const": "a"}, {"type": "boolean"}]}}}


def test_json_schema_rich_guided_generation_validates(model_json):
    """Greedy, sampling and beam search under a schema with $ref, bounds, a type list, pattern, a format and
    anyOf: every row ends, json.loads reads it and the validator accepts it."""
    from llmkern.guided import json_schema_regex

    m, strings, eos = model_json
    pattern = json_schema_regex(GEN_SCHEMA)
    x = torch.randint(0, len(strings), (2, 3), generator=torch.Generator().manual_seed(5))
    vocab = TokenVocabulary(strings)
    for kw in [dict(), dict(strategy="sample", seed=0), dict(strategy="sample", seed=1, temperature=2.0),
               dict(strategy="beam", num_beams=2)]:
        c = RegexConstraint(pattern, vocab, prompt_len=3, eos_token_id=eos)
        out = generate(m, x, 120, allowed_tokens=c, eos_token_id=eos, pad_token_id=0, **kw)
        for text, ended in _texts(out, 3, eos, strings):
            assert ended and _valid(json.loads(text), GEN_SCHEMA), (kw, text)
