"""llmkern.guided over byte-level vocabularies: a character split across tokens (partial UTF-8 sequences) is
generated too. The oracle: Python's incremental UTF-8 decoder for what a byte string holds (whole characters
plus a pending prefix) and re.fullmatch for whether the characters can still complete a match."""
import codecs
import functools
import re

import pytest
import torch

from llmkern.generation import generate
from llmkern.guided import RegexConstraint, TokenVocabulary
from llmkern.models import build
from test_guided_regex import _tokenizers

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)

# completions are searched over ALPHA; each case lists its classes' interval ends, so that a pending UTF-8 prefix
# is judged by one character of each stretch of code points the pattern cannot tell apart (exact, not sampled)
ALPHA = ["a", "x", '"', "é", "中", "文", "😀"]
CASES = [  # (pattern, interval ends of its classes, completions needed by any viable prefix)
    (r'"[^"\\]{0,2}"', [0x22, 0x5C], 2),
    (r"(?:é|中文|😀)+x?", [0xE9, 0x4E2D, 0x6587, 0x1F600], 2),
    (r"[à-ÿ][^a-zé]|\u4e2d.", [0xE0, 0xFF, 0x61, 0x7A, 0xE9, 0x4E2D, 0x0A], 2),
    (r"[\U0001F600-\U0001F64F]a|😀{2}|[\u0800-\uffff]", [0x1F600, 0x1F64F, 0x800, 0xFFFF], 2),
]


def _synthetic_vocab():
    """Every single byte (ids 0-255), merges that hold whole characters or split one across tokens, str entries
    (their UTF-8), invalid byte runs (never allowed), tokens without text, eos last."""
    merges = ["é".encode(), "中文".encode(), b"\xe4\xb8", b"\xad\xe6", b"\x96\x87x", b"\x9f\x98\x80", b'"\xc3',
              b"\xf0\x9f", b"\x98\x80\xf0", "a\"", "xé", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"", None]
    units = [bytes((b,)) for b in range(256)] + merges
    return units + [None], len(units)


def _decode_partial(data):
    """(the whole characters, the pending bytes) of a byte string, or None where it is not a UTF-8 prefix."""
    dec = codecs.getincrementaldecoder("utf-8")()
    try:
        text = dec.decode(data, final=False)
    except UnicodeDecodeError:
        return None
    return text, dec.getstate()[0]


@functools.lru_cache(maxsize=None)
def _code_point_span(rest):
    """The lowest and highest code points whose UTF-8 starts with `rest` (pending bytes), (None, None) if none
    does: the first valid completion in ascending and in descending byte order (UTF-8 keeps code point order)."""
    def search(prefix, order):
        got = _decode_partial(prefix)
        if got is None:
            return None
        if not got[1]:
            return ord(got[0][-1])
        return next((cp for b in order if (cp := search(prefix + bytes((b,)), order)) is not None), None)
    return search(rest, range(0x80, 0xC0)), search(rest, range(0xBF, 0x7F, -1))


def _oracle(pattern, ends, depth):
    @functools.lru_cache(maxsize=None)
    def good(text, k=depth):
        return bool(re.fullmatch(pattern, text)) or (k > 0 and any(good(text + c, k - 1) for c in ALPHA))

    def viable(data):
        got = _decode_partial(data)
        if got is None:
            return False
        text, rest = got
        if not rest:
            return good(text)
        lo, hi = _code_point_span(rest)
        if lo is None:  # (the decoder may keep bytes no character starts with: e.g. ED A0, a surrogate's)
            return False
        probes = {lo, hi} | {e + d for e in ends + [ord(c) for c in ALPHA] for d in (-1, 0, 1)}
        return any(good(text + chr(cp)) for cp in probes if lo <= cp <= hi and not 0xD800 <= cp <= 0xDFFF)
    return good, viable


def _prefixes(viable):
    """Viable byte prefixes: texts of up to 2 ALPHA characters, each also followed by a cut multi-byte one."""
    texts = [""] + ALPHA + [a + b for a in ALPHA for b in ALPHA]
    cuts = [b""] + [c.encode()[:n] for c in ALPHA for n in range(1, len(c.encode()))] + [
        b"\xed", b"\xe0", b"\xf4\x8f", b"\xef\xbf"]  # (next to surrogates, overlong forms, U+10FFFF, U+FFFF)
    return [t.encode() + cut for t in texts for cut in cuts if viable(t.encode() + cut)]


@pytest.mark.parametrize("pattern, ends, depth", CASES)
def test_byte_masks_equal_brute_force_oracle(pattern, ends, depth):
    """For every viable byte prefix (spelled by single-byte tokens), a token is allowed iff the prefix with its
    bytes still decodes to characters some completion turns into a match plus a pending prefix of a character
    that can follow; eos iff nothing is pending and the text matches."""
    units, eos = _synthetic_vocab()
    good, viable = _oracle(pattern, ends, depth)
    c = RegexConstraint(pattern, units, prompt_len=0, eos_token_id=eos)
    units = [u.encode() if isinstance(u, str) else u for u in units]
    prefixes = _prefixes(viable)
    assert len(prefixes) > 10 and any(_decode_partial(p)[1] for p in prefixes)
    for prefix in prefixes:
        mask = c(torch.tensor([list(prefix)], dtype=torch.long))[0].tolist()
        want = [bool(u) and viable(prefix + u) for u in units[:eos]]
        got = _decode_partial(prefix)
        want.append(not got[1] and bool(re.fullmatch(pattern, got[0])))
        assert mask == want, (pattern, prefix, [i for i, (m, w) in enumerate(zip(mask, want)) if m != w])


def test_byte_vocabulary_basics():
    """Bytes and str entries mix (str counts as its UTF-8); `strings` holds whole-character text only; decode
    joins bytes and decodes them (strict by default: a cut character raises, as bytes.decode does)."""
    units, eos = _synthetic_vocab()
    v = TokenVocabulary(units)
    assert v.byte_level and v.units[0xE9] == b"\xe9" and v.units[256 + 9] == "a\"".encode()
    assert v.strings[256] == "é" and v.strings[256 + 2] is None and v.strings[0x41] == "A"
    assert v.decode([0x22, 256 + 2, 0xAD, eos, 5], eos_token_id=eos) == '"中'
    with pytest.raises(UnicodeDecodeError):
        v.decode([0x22, 256 + 2])
    assert v.decode([0x22, 256 + 2], errors="replace") == '"\ufffd'
    assert not TokenVocabulary(["a", "é"]).byte_level and TokenVocabulary(v, vocab_size=400).units == v.units
    with pytest.raises(TypeError, match=r"vocab\[1\] must be a str .*bytes"):
        TokenVocabulary([b"a", bytearray(b"b")])


@pytest.fixture(scope="module")
def byte_model():
    units, eos = _synthetic_vocab()
    torch.manual_seed(0)
    return build("gpt-tiny", backend="torch", vocab_size=len(units), n_layer=1, n_embd=32).eval()


@pytest.mark.parametrize("pattern", [r'"[^"\\]{1,4}"', r"(?:é|中文|😀){1,3}x?", r"[à-ÿ][^a-zé]|\u4e2d.",
                                     r"[\U0001F600-\U0001F64F]a|😀{2}|[\u0800-\uffff]{2}"])
def test_byte_level_generation_is_valid_utf8_and_fullmatches(byte_model, pattern):
    """Greedy, hot sampling and beam search over the synthetic byte vocabulary: every row ends with eos, its
    bytes decode strictly and fullmatch; some rows go through a token holding part of a character."""
    units, eos = _synthetic_vocab()
    vocab = TokenVocabulary(units)
    x = torch.zeros(3, 2, dtype=torch.long)
    split = 0
    for kw in [dict()] + [dict(strategy="sample", temperature=2.0, seed=s) for s in range(3)] + [
            dict(strategy="beam", num_beams=3)]:
        c = RegexConstraint(pattern, vocab, prompt_len=2, eos_token_id=eos)
        out = generate(byte_model, x, 24, allowed_tokens=c, eos_token_id=eos, pad_token_id=0, **kw)
        for row in out[:, 2:].tolist():
            assert eos in row, (pattern, kw, row)
            text = vocab.decode(row, eos_token_id=eos)  # (strict UTF-8)
            assert re.fullmatch(pattern, text), (pattern, kw, text)
            split += any(vocab.strings[t] is None for t in row[:row.index(eos)])
    assert split > 0


def _hf_tokenizers():
    tk = pytest.importorskip("tokenizers")
    corpus = ["Hello world, naïve café", "yes no maybe 12 345", "ab@cd.org"] * 4
    return (tk,) + tuple(_tokenizers(corpus, spm_vocab_size=360))


def test_hf_byte_level_tokenizers_round_trip_and_generate_non_ascii():
    """A byte-level BPE (GPT-2's scheme) and a SentencePiece BPE with byte fallback, trained offline: both are
    read as byte-level; the tokens of non-ASCII text (CJK and emoji the training never saw: split into byte
    tokens) join to its UTF-8; guided generation of such text decodes (by the tokenizer too) to a match."""
    tk, byte_level, spm = _hf_tokenizers()
    for tok, lead in ((byte_level, ""), (spm, " ")):
        vocab = TokenVocabulary(tok)
        assert vocab.byte_level and vocab.units[tok.eos_token_id] is None
        for text in ["naïve café", "日本語 😀!", "ab@cd.org ü"]:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert b"".join(vocab.units[i] for i in ids) == (lead + text).encode(), (tok, text)
            assert any(vocab.strings[i] is None for i in ids) or "日" not in text, (tok, text)  # (split)
            assert tok.decode(ids) == text
        pattern = r" ?(?:日本|café|😀) [^\x00-\x7f]{2}"
        c = RegexConstraint(pattern, vocab, prompt_len=2, eos_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        lm = build("gpt-tiny", backend="torch", vocab_size=len(tok), n_layer=1, n_embd=32).eval()
        for seed in range(2):
            out = generate(lm, torch.tensor([[5, 6]]), 24, strategy="sample", seed=seed, allowed_tokens=c,
                           eos_token_id=tok.eos_token_id, pad_token_id=0)
            row = out[0, 2:].tolist()
            assert tok.eos_token_id in row, row
            text = vocab.decode(row, eos_token_id=tok.eos_token_id)
            assert re.fullmatch(pattern, text), text
            assert tok.decode(row[:row.index(tok.eos_token_id)]) == text.removeprefix(" " if tok is spm else "")
    # an added token's content is plain text (not the byte alphabet); a special added one has none
    byte_level.add_tokens(["<tool>", "çà"])
    byte_level.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    vocab = TokenVocabulary(byte_level)
    assert [vocab.units[byte_level.convert_tokens_to_ids(t)] for t in ["<tool>", "çà", "<|im_end|>"]] == [
        b"<tool>", "çà".encode(), None]
    # the byte <-> character table derived here is the one the tokenizers library uses
    from llmkern.guided import _byte_alphabet
    table = _byte_alphabet()
    assert sorted(table) == sorted(tk.pre_tokenizers.ByteLevel.alphabet()) and sorted(table.values()) == list(
        range(256))
    assert table["Ġ"] == 0x20 and table["Ċ"] == 0x0A and table["Ã"] == 0xC3 and table["!"] == 0x21


def test_json_schema_pattern_that_needs_escapes_is_refused_at_once():
    """A `pattern` every match of which needs a quote, a backslash or a control character compiled to a regex
    that matches nothing: the failure came at decode time as a "no token" error. It is a ValueError naming it."""
    from llmkern.guided import json_schema_regex

    with pytest.raises(ValueError, match=r'pattern .*matches no string content'):
        json_schema_regex({"type": "string", "pattern": '^"$'})
    assert json_schema_regex({"type": "string", "pattern": '^a"?$'})  # (a match without the quote exists)
