"""Guided decoding by regular expression (vLLM's guided_regex, outlines' regex FSM).

    from llmkern.guided import RegexConstraint
    c = RegexConstraint(r"\\d{4}-\\d{2}-\\d{2}", tokenizer, prompt_len=x.shape[1], eos_token_id=eos)
    out = generate(model, x, 16, allowed_tokens=c, eos_token_id=eos)       # any strategy

json_schema_regex(schema) turns a simple JSON Schema into such a pattern (vLLM's guided_json).

The text the row generates (its tokens' strings joined, up to eos) must fullmatch the pattern: each step a
token is allowed iff the text with it is still a prefix of some match, and eos iff the text is a match.
With a byte-level vocabulary (GPT-2 / Llama 3 / Qwen tokenizers, byte-fallback tokens, or a list of bytes) the
walk reads UTF-8 bytes, so characters split across tokens are generated too (TokenVocabulary, _Utf8DFA).

The regex is compiled here (no third-party engine): a parser for the subset below, a Thompson NFA, and a
DFA built lazily by subset construction (a state is made the first time a walk reaches it, so patterns
whose full DFA would be exponential cost only what decoding visits). A DFA state's token mask comes from
walking a trie of the vocabulary's strings through the DFA (tokens sharing a prefix share the walk; a
subtree is cut where the DFA dies), computed once per state and cached.

Supported syntax (Python `re` semantics, without flags; the whole text must match):
  literals; escapes \\\\ \\. \\* ... (any non-alphanumeric character), \\a \\f \\n \\r \\t \\v, \\0, \\xhh,
  \\uhhhh, \\Uhhhhhhhh; . (any character but a newline); classes [abc] [a-z] [^...] with escapes and \\d \\w \\s
  (and \\D \\W \\S) inside; \\d \\w \\s \\D \\W \\S (Unicode, as `re`: str.isdecimal, str.isalnum or _, str.isspace);
  groups (...), (?:...), (?P<name>...); alternation |; quantifiers * + ? {m} {m,} {,n} {m,n} and their lazy
  forms (*? etc.: the same set of matches); a ^ that opens the pattern and a $ that closes it (no-ops: the
  match is anchored anyway). A { that does not start a valid quantifier is a literal, as in `re`.
Unsupported (ValueError naming it): lookaround (?=..) (?!..) (?<=..) (?<!..), backreferences \\1 (?P=name),
  word boundaries \\b \\B, anchors \\A \\Z and ^ $ elsewhere, inline flags (?i) (?i:..), atomic groups and
  possessive quantifiers, conditionals, comments (?#..), \\N{...}.
"""
import bisect
import decimal
import json
import math
import numbers

import torch

__all__ = ["RegexConstraint", "TokenVocabulary", "compile_regex", "json_schema_regex"]

_MAX_NFA_STATES = 200_000  # counted repetitions are expanded: {1000}{1000} would otherwise exhaust memory
_CATEGORIES = {  # \d \w \s as Python's re reads them in str patterns (checked against re over all code points)
    "d": str.isdecimal,
    "w": lambda c: c.isalnum() or c == "_",
    "s": str.isspace,
}
_SIMPLE_ESCAPES = {"a": "\a", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


_MAX_CODE_POINT = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)  # code points UTF-8 cannot encode
_category_cache = {}


def _merge(intervals):
    """Sorted, disjoint, non-adjacent inclusive intervals covering the given ones."""
    out = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [tuple(iv) for iv in out]


def _complement(intervals):
    """The code points outside merged intervals."""
    out, nxt = [], 0
    for lo, hi in intervals:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= _MAX_CODE_POINT:
        out.append((nxt, _MAX_CODE_POINT))
    return out


def _category_intervals(name):
    """A category of _CATEGORIES as code point intervals, by scanning all of Unicode once (~0.1 s, only where a
    byte-level walk or a JSON Schema pattern needs it)."""
    got = _category_cache.get(name)
    if got is None:
        test, ranges, start = _CATEGORIES[name], [], None
        for o in range(_MAX_CODE_POINT + 2):
            inside = o <= _MAX_CODE_POINT and test(chr(o))
            if inside and start is None:
                start = o
            elif not inside and start is not None:
                ranges.append((start, o - 1))
                start = None
        got = _category_cache[name] = ranges
    return got


class _CharSet:
    """A set of characters: code point ranges and \\d \\w \\s categories (upper case: complemented), negated."""
    __slots__ = ("ranges", "cats", "negated", "_intervals")

    def __init__(self, ranges=(), cats=(), negated=False):
        self.ranges, self.cats, self.negated = tuple(ranges), tuple(cats), negated
        self._intervals = None

    def intervals(self):
        """The set as merged code point intervals (what __contains__ decides, computed once)."""
        if self._intervals is None:
            parts = list(self.ranges)
            for k in self.cats:
                base = _category_intervals(k.lower())
                parts += _complement(base) if k.isupper() else base
            merged = _merge(parts)
            self._intervals = _complement(merged) if self.negated else merged
        return self._intervals

    def __contains__(self, c):
        o = ord(c)
        hit = any(lo <= o <= hi for lo, hi in self.ranges) or any(
            _CATEGORIES[k.lower()](c) != k.isupper() for k in self.cats)
        return hit != self.negated

    def surely_empty(self):
        """True for the empty sets one writes on purpose ([^\\s\\S], [^\\x00-\\U0010ffff]); a set this misses is
        only less pruned, never wrong."""
        if not self.negated:
            return False
        cats = set(self.cats)
        return any(k in cats and k.upper() in cats for k in "dws") or any(
            lo == 0 and hi >= 0x10FFFF for lo, hi in self.ranges)


# JSON Schema's regexes are ECMA-262's: \d and \w are ASCII, \s is this table, . stops at these line ends
_ECMA_CATEGORIES = {"d": [(0x30, 0x39)], "w": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
                    "s": [(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                          (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF)]}
_ECMA_LINE_ENDS = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]


def _ecma_category(letter):
    base = _ECMA_CATEGORIES[letter.lower()]
    return _complement(base) if letter.isupper() else base


def _literal(c):
    return ("set", _CharSet([(ord(c), ord(c))]))


class _Parser:
    """Recursive descent over the documented subset; the AST is tuples: ("set", _CharSet), ("cat", [..]),
    ("alt", [..]), ("rep", node, min, max or None)."""

    def __init__(self, pattern, ecma=False):
        # ecma: JSON Schema's reading (ECMA-262): \d \w ASCII, \s and . by ECMA's tables, (?<name>...) groups
        self.p, self.i, self.ecma, self.search, self.depth = pattern, 0, ecma, False, 0

    def error(self, msg, pos=None):
        pos = self.i if pos is None else pos
        return ValueError(f"invalid regex {self.p!r} at position {pos}: {msg}")

    def unsupported(self, what, pos=None):
        pos = self.i if pos is None else pos
        return ValueError(f"regex {self.p!r}: unsupported construct {what} at position {pos} (see "
                          f"llmkern.guided's docstring for the supported subset)")

    def peek(self, k=0):
        j = self.i + k
        return self.p[j] if j < len(self.p) else None

    def parse(self):
        p, start, end = self.p, 0, len(self.p)
        if p.startswith("^"):  # the match is anchored: a leading ^ and trailing $ change nothing
            start = 1
        if p.endswith("$") and end > start and _unescaped_at(p, end - 1):
            end -= 1
        self.p, self.i = p[:end], start
        node = self.parse_alt()
        if self.i < len(self.p):  # only an unbalanced ) stops parse_alt early
            raise self.error("unbalanced parenthesis")
        self.p = p
        return node

    def parse_alt(self):
        items = [self.parse_concat()]
        while self.peek() == "|":
            self.i += 1
            items.append(self.parse_concat())
        return items[0] if len(items) == 1 else ("alt", items)

    def parse_concat(self):
        items = []
        while self.peek() is not None and self.peek() not in "|)":
            if self.search and self.depth == 0 and self.peek() == "$" and self.peek(1) in (None, "|"):
                break  # (an alternative's closing anchor: parse_search reads it)
            items.append(self.parse_repeat())
        return items[0] if len(items) == 1 else ("cat", items)

    def parse_search(self):
        """The pattern as a search (JSON Schema's `pattern`): [(node, anchored at the start, at the end)] for its
        top-level alternatives; ^ may open and $ close each of them, nowhere else."""
        self.search, alts = True, []
        while True:
            head = self.peek() == "^"
            self.i += head
            node = self.parse_concat()
            tail = self.peek() == "$"
            self.i += tail
            alts.append((node, head, tail))
            if self.peek() != "|":
                break
            self.i += 1
        if self.i < len(self.p):
            raise self.error("unbalanced parenthesis")
        return alts

    def parse_repeat(self):
        node = self.parse_atom()
        quantified = False
        while True:
            start = self.i
            q = self.parse_quantifier()
            if q is None:
                return node
            if quantified:
                raise self.error("multiple repeat", start)
            quantified = True
            if self.peek() == "?":  # lazy: the same language
                self.i += 1
            elif self.peek() == "+":
                raise self.unsupported("possessive quantifier", self.i)
            node = ("rep", node, q[0], q[1])

    def parse_quantifier(self):
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        if c != "{":
            return None
        q = self.counted_repeat()
        return q

    def counted_repeat(self):
        """{m} {m,} {,n} {m,n} at self.i (consumed), or None (and nothing consumed) where the { is a literal."""
        close = self.p.find("}", self.i)
        if close < 0:
            return None
        body = self.p[self.i + 1:close]
        lo, comma, hi = body.partition(",")
        if not (lo.isascii() and hi.isascii()) or not (lo.isdigit() or (comma and lo == "")) or (
                hi and not hi.isdigit()) or (not comma and not lo):
            return None
        m = int(lo) if lo else 0
        n = (int(hi) if hi else None) if comma else m
        if n is not None and n < m:
            raise self.error(f"min repeat greater than max repeat in {{{body}}}")
        self.i = close + 1
        return m, n

    def parse_atom(self):
        start, c = self.i, self.peek()
        if c in ("*", "+", "?") or (c == "{" and self.counted_repeat() is not None):
            raise self.error("nothing to repeat", start)
        self.i += 1
        if c == "(":
            return self.parse_group(start)
        if c == "[":
            return ("set", self.parse_class())
        if c == ".":
            return ("set", _CharSet(_ECMA_LINE_ENDS if self.ecma else [(10, 10)], negated=True))
        if c == "\\":
            return self.parse_escape(in_class=False)
        if c == "^" or c == "$":
            raise self.unsupported(f"anchor {c} (only a leading ^ and a trailing $ are accepted)", start)
        return _literal(c)

    def parse_group(self, start):
        if self.peek() == "?":
            nxt = self.peek(1)
            if nxt == ":":
                self.i += 2
            elif (nxt == "P" and self.peek(2) == "<") or (
                    self.ecma and nxt == "<" and self.peek(2) not in ("=", "!", None)):
                close = self.p.find(">", self.i)
                if close < 0 or not self.p[self.i + 2 + (nxt == "P"):close].isidentifier():
                    raise self.error("bad group name", start)
                self.i = close + 1
            else:
                raise self.unsupported(_group_kind(self.p, self.i), start)
        self.depth += 1
        node = self.parse_alt()
        self.depth -= 1
        if self.peek() != ")":
            raise self.error("missing ), unterminated subpattern", start)
        self.i += 1
        return node

    def parse_class(self):
        start = self.i - 1
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        ranges, cats = [], []
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise self.error("unterminated character set", start)
            if c == "]" and not first:
                self.i += 1
                return _CharSet(ranges, cats, negated)
            first = False
            lo = self.class_item()
            if self.peek() == "-" and self.peek(1) not in ("]", None):
                dash = self.i
                self.i += 1
                hi = self.class_item()
                if isinstance(lo, str) or isinstance(hi, str):  # a category as a range end
                    raise self.error("bad character range", dash)
                if hi < lo:
                    raise self.error(f"bad character range {chr(lo)}-{chr(hi)}", dash)
                ranges.append((lo, hi))
            elif isinstance(lo, str) and self.ecma:
                ranges += _ecma_category(lo)
            elif isinstance(lo, str):
                cats.append(lo)
            else:
                ranges.append((lo, lo))

    def class_item(self):
        """A code point, or a category letter (d D w W s S) for a class escape."""
        c = self.peek()
        self.i += 1
        if c != "\\":
            return ord(c)
        node = self.parse_escape(in_class=True)
        return node if isinstance(node, str) else node[1].ranges[0][0]

    def parse_escape(self, in_class):
        start = self.i - 1
        c = self.peek()
        if c is None:
            raise self.error("bad escape (end of pattern)", start)
        self.i += 1
        if c in "dDwWsS":
            if in_class:
                return c
            return ("set", _CharSet(_ecma_category(c)) if self.ecma else _CharSet(cats=[c]))
        if c in _SIMPLE_ESCAPES:
            return _literal(_SIMPLE_ESCAPES[c])
        if c == "b" and in_class:
            return _literal("\b")
        if c in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[c]
            digits = self.p[self.i:self.i + width]
            if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"incomplete escape \\{c}{digits}", start)
            self.i += width
            if int(digits, 16) > 0x10FFFF:
                raise self.error(f"bad escape \\{c}{digits}", start)
            return _literal(chr(int(digits, 16)))
        if c == "0":  # \0 and up to two more octal digits
            j = self.i
            while j < self.i + 2 and j < len(self.p) and self.p[j] in "01234567":
                j += 1
            value, self.i = int("0" + self.p[self.i:j], 8), j
            return _literal(chr(value))
        if c.isdigit():
            raise self.unsupported(f"backreference \\{c}", start)
        if c in "bBAZ":
            raise self.unsupported({"b": "word boundary \\b", "B": "non-boundary \\B", "A": "anchor \\A",
                                    "Z": "anchor \\Z"}[c], start)
        if c == "N":
            raise self.unsupported("escape \\N{...}", start)
        if c.isascii() and c.isalnum():
            raise self.error(f"bad escape \\{c}", start)
        return _literal(c)


def _unescaped_at(p, j):
    """p[j] is not escaped (preceded by an even run of backslashes)."""
    k = j
    while k > 0 and p[k - 1] == "\\":
        k -= 1
    return (j - k) % 2 == 0


def _group_kind(p, i):
    rest = p[i:i + 4]
    for prefix, name in (("?<=", "lookbehind (?<=...)"), ("?<!", "negative lookbehind (?<!...)"),
                         ("?=", "lookahead (?=...)"), ("?!", "negative lookahead (?!...)"),
                         ("?P=", "named backreference (?P=name)"), ("?>", "atomic group (?>...)"),
                         ("?#", "comment (?#...)"), ("?(", "conditional (?(...)...)")):
        if rest.startswith(prefix):
            return name
    return f"inline flags or extension ({p[i:i + 3]}...)"


def _size(node):
    """An upper bound on the NFA states Thompson's construction makes for an AST node."""
    kind = node[0]
    if kind == "set":
        return 2
    if kind in ("cat", "alt"):
        return 2 + sum(_size(item) for item in node[1])
    lo, hi = node[2], node[3]
    return 2 + _size(node[1]) * (lo + 1 if hi is None else hi)


class _NFA:
    """Thompson's construction: state i has epsilon edges eps[i] and at most one character edge
    (charset[i], target[i])."""

    def __init__(self, node, pattern):
        self.pattern = pattern
        if _size(node) > _MAX_NFA_STATES:  # (refused before building: {1000}{1000} would take a while to fail)
            raise ValueError(f"regex {pattern!r} is too large: its expansion (counted repetitions are copied) "
                             f"exceeds {_MAX_NFA_STATES} NFA states")
        self.eps, self.charset, self.target = [], [], []
        self.start, self.accept = self.build(node)
        self.live = self.coreachable()

    def new(self):
        self.eps.append([])
        self.charset.append(None)
        self.target.append(None)
        return len(self.eps) - 1

    def build(self, node):
        kind = node[0]
        if kind == "set":
            s, e = self.new(), self.new()
            self.charset[s], self.target[s] = node[1], e
            return s, e
        if kind == "cat":
            s = e = self.new()
            for item in node[1]:
                a, b = self.build(item)
                self.eps[e].append(a)
                e = b
            return s, e
        if kind == "alt":
            s, e = self.new(), self.new()
            for item in node[1]:
                a, b = self.build(item)
                self.eps[s].append(a)
                self.eps[b].append(e)
            return s, e
        return self.build_repeat(*node[1:])

    def build_repeat(self, item, lo, hi):
        s = cur = self.new()
        for _ in range(lo):
            a, b = self.build(item)
            self.eps[cur].append(a)
            cur = b
        end = self.new()
        if hi is None:  # a loop through one more copy
            a, b = self.build(item)
            self.eps[cur] += [a, end]
            self.eps[b] += [a, end]
            return s, end
        for _ in range(hi - lo):  # nested optionals: each copy may stop the repetition
            a, b = self.build(item)
            self.eps[cur] += [a, end]
            cur = b
        self.eps[cur].append(end)
        return s, end

    def coreachable(self):
        """States from which the accept state can be reached (a DFA state made only of others is dead)."""
        back = [[] for _ in self.eps]
        for i, outs in enumerate(self.eps):
            for j in outs:
                back[j].append(i)
            if self.charset[i] is not None and not self.charset[i].surely_empty():
                back[self.target[i]].append(i)
        live, stack = {self.accept}, [self.accept]
        while stack:
            for i in back[stack.pop()]:
                if i not in live:
                    live.add(i)
                    stack.append(i)
        return live

    def closure(self, states):
        """The live states reachable by epsilon edges, keeping only those that matter to a DFA state (with a
        character edge, or the accept state)."""
        seen, stack, kept = set(), [s for s in states if s in self.live], []
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            if self.charset[s] is not None or s == self.accept:
                kept.append(s)
            stack.extend(t for t in self.eps[s] if t in self.live and t not in seen)
        return frozenset(kept)


DEAD = -1  # the DFA state of a text no continuation can make match


class RegexDFA:
    """A regex (the documented subset) as a DFA built on demand: states are ints (start: 0, DEAD: -1),
    step(state, char) -> state, accepting(state). Use compile_regex(pattern)."""

    def __init__(self, pattern):
        if not isinstance(pattern, str):
            raise TypeError(f"pattern must be a str, got {type(pattern).__name__}")
        self.pattern = pattern
        self.nfa = _NFA(_Parser(pattern).parse(), pattern)
        self._sets, self._index, self._accepting, self._trans = [], {}, [], []
        self._spans = {}  # state -> (starts, ends) of the characters it takes (byte-level walks only)
        self.start = self._intern(self.nfa.closure([self.nfa.start]))

    @property
    def num_states(self):
        return len(self._sets)

    def _intern(self, states):
        if not states:
            return DEAD
        d = self._index.get(states)
        if d is None:
            d = self._index[states] = len(self._sets)
            self._sets.append(states)
            self._accepting.append(self.nfa.accept in states)
            self._trans.append({})
        return d

    def accepting(self, state):
        return state != DEAD and self._accepting[state]

    def step(self, state, c):
        if state == DEAD:
            return DEAD
        trans = self._trans[state]
        nxt = trans.get(c)
        if nxt is None:
            nfa = self.nfa
            moved = [nfa.target[s] for s in self._sets[state] if nfa.charset[s] is not None and c in nfa.charset[s]]
            nxt = trans[c] = self._intern(nfa.closure(moved))
        return nxt

    def walk(self, state, text):
        for c in text:
            state = self.step(state, c)
            if state == DEAD:
                break
        return state

    def fullmatch(self, text):
        return self.accepting(self.walk(self.start, text))

    def takes_any(self, state, lo, hi):
        """Whether some character U+lo..U+hi (a surrogate never counts: UTF-8 cannot hold one) keeps `state`
        alive. Every NFA state of a DFA state is live and a character edge's target is live too, so a character
        keeps the state alive iff some member's set holds it: the members' sets as intervals, bisected."""
        spans = self._spans.get(state)
        if spans is None:
            nfa = self.nfa
            merged = _merge([iv for s in self._sets[state] if nfa.charset[s] is not None
                             for iv in nfa.charset[s].intervals()])
            kept = _intersect(merged, _complement([_SURROGATES]))
            spans = self._spans[state] = ([a for a, _ in kept], [b for _, b in kept])
        starts, ends = spans
        i = bisect.bisect_right(starts, hi) - 1
        return i >= 0 and ends[i] >= lo


def _utf8_length(lead):
    """The length of the UTF-8 sequence a byte starts (0: the byte cannot start one)."""
    return 1 if lead < 0x80 else 0 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4 if lead < 0xF8 \
        else 0


def _utf8_prefix_span(seq):
    """(lo, hi): the code points whose UTF-8 form starts with the bytes `seq` (an incomplete character), or None
    where none does (a stray continuation byte, an overlong form, a lead byte past U+10FFFF)."""
    n = _utf8_length(seq[0])
    if n < 2:
        return None
    value = seq[0] & (0x7F >> n)
    for b in seq[1:]:
        if b & 0xC0 != 0x80:
            return None
        value = value << 6 | (b & 0x3F)
    rest = 6 * (n - len(seq))
    lo = max(value << rest, (0x80, 0x800, 0x10000)[n - 2])  # (the clamps reject overlong and too-large forms)
    hi = min((value << rest) | ((1 << rest) - 1), _MAX_CODE_POINT)
    return (lo, hi) if lo <= hi else None


class _Utf8DFA:
    """A RegexDFA read over the UTF-8 bytes of its text, with the interface the trie walk and RegexConstraint
    use (start, step, _trans, walk, accepting). A state is an int naming a pair (DFA state, the pending bytes
    of an incomplete character, at most 3). A byte that completes a character steps the DFA by it; one that
    leaves a character incomplete survives iff the pending bytes are a valid UTF-8 prefix of some character
    the DFA state takes (RegexDFA.takes_any on the prefix's code point range: a bisection, where trying the
    completions could mean 2^18 characters for a 4-byte lead). Accepting: no pending bytes, DFA accepting."""

    def __init__(self, dfa):
        self.dfa = dfa
        self._pairs, self._index, self._trans = [], {}, []
        self.start = self._intern(dfa.start, b"")

    def _intern(self, state, pending):
        if state == DEAD:
            return DEAD
        key = (state, pending)
        w = self._index.get(key)
        if w is None:
            w = self._index[key] = len(self._pairs)
            self._pairs.append(key)
            self._trans.append({})
        return w

    def accepting(self, w):
        if w < 0:
            return False
        state, pending = self._pairs[w]
        return not pending and self.dfa.accepting(state)

    def step(self, w, b):
        if w == DEAD:
            return DEAD
        trans = self._trans[w]
        nxt = trans.get(b)
        if nxt is None:
            nxt = trans[b] = self._next(w, b)
        return nxt

    def _next(self, w, b):
        state, pending = self._pairs[w]
        if not pending and b < 0x80:
            return self._intern(self.dfa.step(state, chr(b)), b"")
        seq = pending + bytes((b,))
        if len(seq) == _utf8_length(seq[0]):
            try:
                char = seq.decode("utf-8")  # (strict: surrogates and overlong forms fail)
            except UnicodeDecodeError:
                return DEAD
            return self._intern(self.dfa.step(state, char), b"")
        span = _utf8_prefix_span(seq)
        if span is None or not self.dfa.takes_any(state, *span):
            return DEAD
        return self._intern(state, seq)

    def walk(self, w, data):
        for b in data:
            w = self.step(w, b)
            if w == DEAD:
                break
        return w


def compile_regex(pattern):
    """The pattern (see the module docstring for the subset) as a lazily built RegexDFA; ValueError names
    a construct outside the subset or a malformed pattern."""
    return RegexDFA(pattern)


class TokenVocabulary:
    """The text of every token id, and a trie of those texts, shared by the constraints built on it.

    `vocab`: a list indexed by token id of strings, or of bytes (None, "" or b"" for a token that never emits
    text, e.g. a special token: such tokens are never allowed, except as eos), or a Hugging Face tokenizer.
    A list holding any bytes is byte-level (its str entries count as their UTF-8 bytes); so is a tokenizer
    whose decoder (else pre-tokenizer) is byte-level BPE (GPT-2, Llama 3, Qwen: a token's characters map to
    bytes through GPT-2's byte <-> character table; added tokens are their content's UTF-8), or one with
    SentencePiece byte-fallback tokens <0xHH> (Llama 2, Mistral: such a token is the byte HH). A byte-level
    vocabulary is walked over UTF-8 bytes, so a character split across tokens is generated too: a token is
    allowed iff its bytes keep every character they complete in a match and leave a valid UTF-8 prefix of a
    character the pattern can take next (see _Utf8DFA). Otherwise a tokenizer's token i becomes the text it
    adds after other text: convert_tokens_to_string([a, tok_i]) minus convert_tokens_to_string([a]) for a
    fixed ordinary token a. That keeps SentencePiece's leading space ("▁Hello" -> " Hello", which decoding
    alone strips at the start of a text) and WordPiece's "##"; special tokens (tokenizer.all_special_ids) get
    None. `units`: what a token adds (str, or bytes in a byte-level vocabulary; None: never allowed);
    `strings`: its text where it is whole characters (None for the part of a character or no text).
    vocab_size: the model's vocabulary (its masks' width), at least the number of strings (ids past them
    are never allowed); default: the number of strings."""

    def __init__(self, vocab, vocab_size=None):
        if isinstance(vocab, TokenVocabulary) and vocab_size in (None, vocab.vocab_size):
            self.__dict__.update(vocab.__dict__)  # (the trie is shared, never changed)
            return
        byte_level = False
        if isinstance(vocab, TokenVocabulary):
            units, byte_level = vocab.units, vocab.byte_level
        elif hasattr(vocab, "convert_ids_to_tokens") and hasattr(vocab, "convert_tokens_to_string"):
            units, byte_level = _tokenizer_units(vocab)
        elif isinstance(vocab, (list, tuple)):
            units = list(vocab)
            for i, s in enumerate(units):
                if s is not None and not isinstance(s, (str, bytes)):
                    raise TypeError(f"vocab[{i}] must be a str (the token's text), bytes (a byte-level token) or "
                                    f"None, got {type(s).__name__}")
            byte_level = any(isinstance(s, bytes) for s in units)
            if byte_level:
                units = [s.encode("utf-8") if isinstance(s, str) else s for s in units]
        else:
            raise TypeError(f"vocab must be a list of token strings or bytes (indexed by id), a Hugging Face "
                            f"tokenizer or a TokenVocabulary, got {type(vocab).__name__}")
        if not units:
            raise ValueError("vocab is empty")
        if vocab_size is None:
            vocab_size = len(units)
        elif not isinstance(vocab_size, numbers.Integral) or isinstance(vocab_size, bool) or vocab_size < len(
                units):
            raise ValueError(f"vocab_size must be an int >= the number of token strings ({len(units)}), got "
                             f"{vocab_size!r}")
        self.units, self.byte_level, self.vocab_size = units, byte_level, int(vocab_size)
        self.strings = [_whole_text(u) for u in units] if byte_level else units
        self._build_trie()

    def _build_trie(self):
        # node k: children[k] (char -> node), ends[k] (ids whose text ends there); node 0 is the empty text
        self.children, self.ends = [{}], [[]]
        for tok, s in enumerate(self.units):
            if not s:
                continue
            node = 0
            for c in s:  # (characters, or byte values in a byte-level vocabulary)
                nxt = self.children[node].get(c)
                if nxt is None:
                    nxt = self.children[node][c] = len(self.children)
                    self.children.append({})
                    self.ends.append([])
                node = nxt
            self.ends[node].append(tok)

    def decode(self, ids, eos_token_id=None, errors="strict"):
        """The text of token ids, up to eos (excluded); a token without text raises. In a byte-level vocabulary
        the bytes are decoded as UTF-8 with `errors` (bytes.decode's; "strict" raises on a character cut short,
        as a row stopped by max_new_tokens may end)."""
        out = []
        for t in ids:
            t = int(t)
            if t == eos_token_id:
                break
            s = self.units[t] if 0 <= t < len(self.units) else None
            if s is None:
                raise ValueError(f"token {t} has no text in this vocabulary")
            out.append(s)
        return b"".join(out).decode("utf-8", errors) if self.byte_level else "".join(out)

    def allowed_ids(self, dfa, state):
        """Ids whose text keeps `state` alive, walking the trie through the DFA (a dead DFA step cuts the
        subtree: no token with that prefix can be allowed)."""
        allowed, children, ends, step, trans = [], self.children, self.ends, dfa.step, dfa._trans
        stack = [(0, state)]
        while stack:
            node, st = stack.pop()
            cached = trans[st]  # (read directly: the hot loop of a mask)
            for c, child in children[node].items():
                nxt = cached.get(c)
                if nxt is None:
                    nxt = step(st, c)
                if nxt == DEAD:
                    continue
                allowed.extend(ends[child])
                if children[child]:
                    stack.append((child, nxt))
        return allowed


def _whole_text(data):
    """The text of a byte-level token that holds whole characters, else None."""
    try:
        return data.decode("utf-8") if data else None
    except UnicodeDecodeError:
        return None


def _byte_alphabet():
    """GPT-2's byte-level alphabet as {character: byte}: the printable Latin-1 bytes stand for themselves, the
    others (controls, space, DEL, NBSP, soft hyphen) for U+0100 on, in byte order."""
    kept = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    table = {chr(b): b for b in kept}
    moved = [b for b in range(256) if chr(b) not in table]
    table.update({chr(256 + i): b for i, b in enumerate(moved)})
    return table


def _json_has_type(node, name):
    if isinstance(node, dict):
        return node.get("type") == name or any(_json_has_type(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_json_has_type(v, name) for v in node)
    return False


def _is_byte_level(tok):
    """A fast tokenizer whose decoder (else pre-tokenizer) includes ByteLevel, or a slow GPT-2-style one."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return hasattr(tok, "byte_decoder")
    for part in (backend.decoder, backend.pre_tokenizer):
        if part is not None:
            return _json_has_type(json.loads(part.__getstate__()), "ByteLevel")
    return False


def _special_ids(tok):
    special = set(getattr(tok, "all_special_ids", ()) or ())
    added = getattr(tok, "added_tokens_decoder", None) or {}
    return special | {i for i, t in added.items() if getattr(t, "special", False)}, added


def _tokenizer_units(tok):
    """(units, byte_level) of a tokenizer (TokenVocabulary's docstring)."""
    if _is_byte_level(tok):
        special, added = _special_ids(tok)
        table, units = _byte_alphabet(), []
        for i, t in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
            if i in special or t is None:
                units.append(None)
            elif i in added:  # (an added token's content is plain text, not the byte alphabet)
                units.append(getattr(added[i], "content", str(added[i])).encode("utf-8") or None)
            else:
                units.append(bytes(table[c] for c in t) if t and all(c in table for c in t) else None)
        return units, True
    strings = _tokenizer_strings(tok)
    tokens = tok.convert_ids_to_tokens(list(range(len(strings))))
    fallback = {i: int(t[3:5], 16) for i, t in enumerate(tokens) if isinstance(t, str) and len(t) == 6
                and t.startswith("<0x") and t.endswith(">") and all(c in "0123456789ABCDEF" for c in t[3:5])}
    if not any(strings[i] is None and b >= 0x80 for i, b in fallback.items()):
        return strings, False
    return [bytes((fallback[i],)) if i in fallback else None if s is None else s.encode("utf-8")
            for i, s in enumerate(strings)], True


def _tokenizer_strings(tok):
    special = set(getattr(tok, "all_special_ids", ()) or ())
    n = len(tok)
    tokens = tok.convert_ids_to_tokens(list(range(n)))
    anchor = None
    for i, t in enumerate(tokens):  # an ordinary token whose own text is plain (nothing stripped or replaced)
        text = None if i in special or t is None else tok.convert_tokens_to_string([t])
        if text and "\ufffd" not in text and text.strip() == text:
            anchor = t
            break
    if anchor is None:
        raise ValueError("vocab: the tokenizer has no ordinary token to measure the others' text against")
    prefix = tok.convert_tokens_to_string([anchor])
    strings = []
    for i, t in enumerate(tokens):
        s = None
        if i not in special and t is not None:
            full = tok.convert_tokens_to_string([anchor, t])
            if full.startswith(prefix):
                s = full[len(prefix):]
            if s is not None and "\ufffd" in s:  # part of a multi-byte character
                s = None
        strings.append(s or None)
    return strings


FINISHED = -2  # the state of a row that emitted eos


class RegexConstraint:
    """Guided decoding by regular expression: an allowed_tokens function for generate (like
    ChoiceConstraint) under which each row's generated text fullmatches `pattern`.

        c = RegexConstraint(r"[a-z]+@[a-z]+\\.(com|org)", vocab, prompt_len=x.shape[1], eos_token_id=2)
        out = generate(model, x, 24, allowed_tokens=c, eos_token_id=2)

    pattern: the documented subset of Python's re (see llmkern.guided). vocab: the token strings indexed by id,
    a Hugging Face tokenizer or a TokenVocabulary (TokenVocabulary's docstring: how a tokenizer's tokens
    become text; share one TokenVocabulary between constraints to build its trie once). prompt_len: the
    prompt's width (input_ids.shape[1]); the tokens after it are the generated ones. eos_token_id: allowed
    exactly when the text is a complete match (its string in vocab, if any, is ignored). vocab_size: the
    masks' width (the model's vocabulary) when it exceeds the strings.

    Each step, a token is allowed iff the text with its string appended is still a prefix of some match
    (tokens without text never are; in a byte-level vocabulary: iff the UTF-8 bytes with the token's appended
    are a prefix of a match's, so a character may be split across tokens, and eos waits for the character to
    be complete); a row that emitted eos gets eos only (generate then pads it). A row
    whose text matches and can go no further gets eos alone; without eos_token_id it raises (nothing may
    follow), as does a row whose text cannot match (possible only if the mask was bypassed; with eos it gets
    eos alone). A live text the vocabulary cannot continue (the pattern needs a character no token holds)
    also gets eos alone, so its row ends unmatched. A row cut by max_new_tokens holds a prefix of a match.

    Cost: a row's DFA state is derived from its generated tokens (beam search reorders rows) through a cache
    keyed by the token tuple of the previous call, so a step costs one cached (state, token) transition per
    row plus hashing; a DFA state's mask is built once, by one trie walk (measured, 32k tokens of 1-8
    characters: ~0.1 s for a state that lets most of the vocabulary through, far less for narrow ones)."""

    def __init__(self, pattern, vocab, prompt_len, eos_token_id=None, *, vocab_size=None):
        if not isinstance(prompt_len, numbers.Integral) or isinstance(prompt_len, bool) or prompt_len < 0:
            raise ValueError(f"RegexConstraint: prompt_len must be an int >= 0, got {prompt_len!r}")
        self.dfa = compile_regex(pattern)
        self.vocab = TokenVocabulary(vocab, vocab_size)
        # what the trie walk steps through: the DFA over characters, or over UTF-8 bytes (TokenVocabulary)
        self._walker = _Utf8DFA(self.dfa) if self.vocab.byte_level else self.dfa
        V = self.vocab.vocab_size
        if eos_token_id is not None and (not isinstance(eos_token_id, numbers.Integral) or isinstance(
                eos_token_id, bool) or not 0 <= eos_token_id < V):
            raise ValueError(f"RegexConstraint: eos_token_id must be None or a token id in [0, {V}), got "
                             f"{eos_token_id!r}")
        self.pattern, self.prompt_len = pattern, int(prompt_len)
        self.eos = None if eos_token_id is None else int(eos_token_id)
        self._masks, self._token_step, self._rows = {}, {}, {}
        if self.dfa.start == DEAD:
            raise ValueError(f"RegexConstraint: pattern {pattern!r} matches no text")
        start = self._walker.start
        mask, anything = self._mask(start)
        if not self._walker.accepting(start) and int(mask.sum()) == (self.eos is not None and bool(mask[self.eos])):
            raise ValueError(f"RegexConstraint: no token of the vocabulary can start a match of {pattern!r}")
        if not anything:  # only the empty text matches
            raise ValueError(f"RegexConstraint: {pattern!r} matches only the empty text and there is no "
                             f"eos_token_id to end it")

    @property
    def vocab_size(self):
        return self.vocab.vocab_size

    def _mask(self, state):
        """(bool [V] CPU mask, whether it allows anything) for a DFA state, cached."""
        got = self._masks.get(state)
        if got is None:
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            if state == FINISHED or state == DEAD:
                ids = []
            else:
                ids = self.vocab.allowed_ids(self._walker, state)
            if ids:
                mask[torch.tensor(ids, dtype=torch.long)] = True
            if self.eos is not None:
                mask[self.eos] = state == FINISHED or state == DEAD or self._walker.accepting(state)
                if state >= 0 and not bool(mask.any()):  # stuck: the vocabulary cannot go on
                    mask[self.eos] = True
            got = self._masks[state] = (mask, bool(mask.any()))
        return got

    def _advance(self, state, tok):
        if state < 0:
            return state
        if tok == self.eos:
            return FINISHED
        key = (state, tok)
        nxt = self._token_step.get(key)
        if nxt is None:
            s = self.vocab.units[tok] if 0 <= tok < len(self.vocab.units) else None
            nxt = self._token_step[key] = DEAD if not s else self._walker.walk(state, s)
        return nxt

    def _state(self, key, seen):
        state = seen.get(key)
        if state is None:
            state = self._rows.get(key)
        if state is None:
            prev = self._rows.get(key[:-1]) if key else None
            if prev is None:  # not from the last step's rows: walk all the tokens (cached transitions)
                prev, body = self._walker.start, key
            else:
                body = key[-1:]
            state = prev
            for tok in body:
                state = self._advance(state, tok)
        seen[key] = state
        return state

    def __call__(self, seqs):
        if not torch.is_tensor(seqs) or seqs.dim() != 2 or seqs.dtype.is_floating_point or seqs.dtype == torch.bool:
            raise ValueError(f"RegexConstraint: sequences must be an integer tensor [N, T], got "
                             f"{getattr(seqs, 'dtype', type(seqs).__name__)} {tuple(getattr(seqs, 'shape', ()))}")
        if seqs.shape[1] < self.prompt_len:
            raise ValueError(f"RegexConstraint: prompt_len={self.prompt_len} exceeds the sequences' width "
                             f"{seqs.shape[1]}; pass the prompt's width (input_ids.shape[1])")
        seen, masks = {}, []
        for row, generated in enumerate(seqs[:, self.prompt_len:].tolist()):
            state = self._state(tuple(generated), seen)
            mask, any_allowed = self._mask(state)
            if not any_allowed:
                raise self._no_token_error(row, generated, state)
            masks.append(mask)
        self._rows = seen  # the next step's rows extend these by one token
        out = torch.stack(masks) if masks else torch.zeros(0, self.vocab_size, dtype=torch.bool)
        return out.to(seqs.device)

    def _no_token_error(self, row, generated, state):
        try:
            text = repr(self.vocab.decode(generated, errors="backslashreplace"))
        except ValueError:
            text = f"tokens {generated}"
        if state == DEAD:
            why = "cannot match the pattern (the mask was bypassed)"
        elif self._walker.accepting(state):
            why = "matches the pattern and nothing may follow it"
        else:
            why = "needs a character that no token of the vocabulary holds"
        return ValueError(f"RegexConstraint: row {row}'s generated text {text} {why}, and there is no "
                          f"eos_token_id to end it (pass eos_token_id to the constraint and to generate)")


# JSON Schema -> regex (outlines' build_regex_from_schema, for a subset)
_JSON_STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
_JSON_INTEGER = r"-?(?:0|[1-9][0-9]*)"
_JSON_NUMBER = _JSON_INTEGER + r"(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_JSON_IGNORED = {"title", "description", "examples", "default", "$schema", "$id", "$comment", "additionalProperties",
                 "$defs", "definitions", "deprecated", "readOnly", "writeOnly"}
_BOUNDS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}
_ANY_VALUE_DEPTH = 2  # {} / additionalProperties: true without max_recursion_depth: containers nest this deep
_JSON_KEYS = {  # what each type honours; any other key raises (ignoring it could produce invalid documents)
    "string": {"minLength", "maxLength", "pattern", "format"}, "integer": _BOUNDS, "number": _BOUNDS,
    "boolean": set(), "null": set(), "array": {"items", "minItems", "maxItems"}, "object": {"properties", "required"},
}
# format -> the regex of the string's content (RFC 3339 dates and times, RFC 4122 UUIDs, a dot-atom email)
_DAY_31, _DAY_30, _DAY_28 = r"(?:0[1-9]|[12][0-9]|3[01])", r"(?:0[1-9]|[12][0-9]|30)", r"(?:0[1-9]|1[0-9]|2[0-8])"
_LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)"
_DATE = (rf"(?:[0-9]{{4}}-(?:(?:0[13578]|1[02])-{_DAY_31}|(?:0[469]|11)-{_DAY_30}|02-{_DAY_28})"
         rf"|{_LEAP_YEAR}-02-29)")
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]+)?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_EMAIL_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_FORMATS = {
    "date": _DATE, "time": _TIME, "date-time": _DATE + "[Tt]" + _TIME,
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "email": rf"{_EMAIL_ATOM}(?:\.{_EMAIL_ATOM})*@{_DNS_LABEL}(?:\.{_DNS_LABEL})+",
}
# a JSON string's characters that need no escape: what a `pattern` may generate (surrogates: no UTF-8 form)
_JSON_RAW = _complement(_merge([(0, 0x1F), (0x22, 0x22), (0x5C, 0x5C), _SURROGATES]))


def json_schema_regex(schema, whitespace=r"[ ]?", *, max_recursion_depth=None):
    r"""A regex (for RegexConstraint) whose matches are JSON documents valid under `schema`, a dict (or its JSON
    text) in this subset of JSON Schema (vLLM's guided_json; Pydantic's model_json_schema() output):
      {"type": "string"} with minLength / maxLength, or with pattern, or with format;
      {"type": "integer"} with minimum / maximum / exclusiveMinimum / exclusiveMaximum (exact: any integer
        bounds, negative ones included; draft 4's boolean exclusiveMinimum / exclusiveMaximum too);
      {"type": "number"}, with minimum / maximum / exclusive bounds (draft 6 and draft 4): then written
        without an exponent, every such number in range (an exclusive float bound b: from b's neighbouring
        float on, so a document never rounds onto b when parsed as a float); integer bounds beyond 2**53 raise;
      "boolean", "null"; {} (no keyword but annotations): any JSON value, arrays / objects nested at most
        max_recursion_depth deep (2 when it is None);
      {"type": [..]}: a list of those types (e.g. ["string", "null"]; each honours its own keywords);
      {"enum": [...]} / {"const": v} of JSON scalars;
      {"type": "array", "items": <schema>} (with minItems / maxItems); without items, items {} (any values,
        nested at most max_recursion_depth deep, 2 when it is None: the array itself one level more);
      {"type": "object", "properties": {...}, "required": [...]}: the properties in the order given (required
        ones always, the others optionally); no others when additionalProperties is false or absent (closed by
        default, as outlines: JSON Schema would allow any others); when it is a schema (or true / {}: any
        value, as {} above), after the declared ones any number of extra members valued under it, each key
        written without escapes and equal to no declared property name (extra keys may repeat one another:
        json.loads keeps the last, every value is valid anyway); without properties and additionalProperties,
        any members, as additionalProperties true (values nested at most max_recursion_depth deep, 2 when it
        is None), while {"properties": {}} (or additionalProperties false) takes only {}; required keys that
        properties do not declare (all of them, without properties) follow the declared properties, always, in
        required's order, valued under additionalProperties (a schema; true, or absent without properties: any
        value), then any extra members as above (e.g. {"type": "object", "required": ["a"]}: "a" first, then any
        others; JSON Schema allows any order, the regex writes them in this one, as outlines orders declared
        properties); in a closed object (additionalProperties false, or absent beside properties) they raise;
      {"anyOf": [..]} / {"oneOf": [..]}: any of the schemas (oneOf's "exactly one" is not enforced: a document
        valid under two of them matches too); {"allOf": [s]} of one schema;
      {"$ref": "#/$defs/Name"} (or any JSON pointer into the schema: "#/definitions/..." etc.), alone in its
        object; a $ref that reaches itself again raises, naming the chain, unless max_recursion_depth=N is
        given: then a $ref is expanded inside itself at most N times, and past that its branch is not offered
        (an optional property is left out, an anyOf / oneOf alternative dropped, an array's items absent, so
        [] only where minItems allows); a schema whose every document nests deeper raises, naming the $ref.
    Integers are written without fraction or exponent; unbounded numbers and strings as JSON allows (escapes
    included).
    pattern: JSON Schema's reading, an unanchored search of the string's value: each top-level alternative
      gets [^"\\\x00-\x1f]* around it unless it opens with ^ / closes with $; the syntax is llmkern's subset of
      Python's re (see the module docstring) with ECMA-262's classes (\d = [0-9], \w = [A-Za-z0-9_], \s and .
      as ECMA) and (?<name>...) groups; the generated value holds no escape sequence (its classes lose ", \ and
      the controls U+0000-U+001F), so a valid document whose string uses escapes does not match. pattern with
      minLength / maxLength or with format raises (the regex cannot intersect them).
    format (the regex of the value; other formats raise naming them):
      date       YYYY-MM-DD, the month's days exact, Feb 29 in Gregorian leap years only (RFC 3339 full-date)
      time       HH:MM:SS[.frac] then Z/z or +HH:MM/-HH:MM, hours 00-23, seconds 00-60 (RFC 3339 full-time)
      date-time  date, T or t, time (RFC 3339)
      uuid       8-4-4-4-12 hex digits, either case (RFC 4122's text form, any version)
      email      dot-atom local part of letters, digits and !#$%&'*+/=?^_`{|}~- ; "@"; two or more DNS labels
                 (letters, digits, inner hyphens): a subset of RFC 5322 (no quoted local parts, no IP domains)
    title, description, examples, default, deprecated, readOnly, writeOnly, $schema, $id, $comment,
    $defs / definitions (read through $ref), and additionalProperties outside objects, are ignored; any other keyword
    (multipleOf, patternProperties, not, if, uniqueItems, ...) raises ValueError naming it. `whitespace`: the
    regex allowed around punctuation (default: an optional space; "" for compact JSON)."""
    if isinstance(schema, str):
        schema = json.loads(schema)
    if not isinstance(whitespace, str):
        raise TypeError(f"json_schema_regex: whitespace must be a str (a regex), got {type(whitespace).__name__}")
    if max_recursion_depth is not None and (not isinstance(max_recursion_depth, numbers.Integral) or isinstance(
            max_recursion_depth, bool) or max_recursion_depth < 0):
        raise ValueError(f"json_schema_regex: max_recursion_depth must be None or an int >= 0, got "
                         f"{max_recursion_depth!r}")
    compile_regex(whitespace)  # (a bad whitespace pattern is named here, not inside the composed regex)
    conv = _SchemaRegex(schema, f"(?:{whitespace})" if whitespace else "", max_recursion_depth)
    out = conv.build(schema, "schema")
    if out is None:  # (NO_MATCH: every branch went past the depth)
        cut = ", ".join(repr(r) for r in dict.fromkeys(conv.cut))
        raise ValueError(f"json_schema_regex: every document of the schema nests $ref {cut} more than "
                         f"max_recursion_depth={max_recursion_depth} times (each branch recurses: a required "
                         f"property, a non-empty array or every alternative leads back to it)")
    return out


class _SchemaRegex:
    """The conversion's context: the root (where $ref points), the $refs being expanded (recursion) and how
    often one may be expanded inside itself. build returns None for a schema no document may take here (a
    recursive $ref past max_depth): its callers drop that branch (an optional property, an alternative, the
    items of an array that may be empty) or are None themselves."""

    def __init__(self, root, ws, max_depth=None):
        self.root, self.ws, self.refs, self.max_depth, self.cut = root, ws, [], max_depth, []

    def build(self, schema, where):
        if not isinstance(schema, dict):
            raise ValueError(f"json_schema_regex: {where} must be a JSON object (dict), got {type(schema).__name__}")
        keys = set(schema) - _JSON_IGNORED
        for combinator in ("$ref", "anyOf", "oneOf", "allOf"):
            if combinator in keys:
                _only(keys, {combinator}, where, f" (beside {combinator})")
                return getattr(self, "_" + combinator.lstrip("$"))(schema[combinator], where)
        if "enum" in schema or "const" in schema:
            values = schema["enum"] if "enum" in schema else [schema["const"]]
            _only(keys, {"enum", "const", "type"}, where)
            if not isinstance(values, list) or not values:
                raise ValueError(f"json_schema_regex: {where}.enum must be a non-empty list")
            return "(?:" + "|".join(_scalar_literal(v, where) for v in values) + ")"
        if not keys:  # {} (annotations at most): any JSON value
            return self._any_value(self._any_depth())
        kinds = schema.get("type")
        names = kinds if isinstance(kinds, list) and kinds else [kinds]
        valid = [k for k in names if isinstance(k, str) and k in _JSON_KEYS]
        honoured = set().union(*(_JSON_KEYS[k] for k in (valid if valid else _JSON_KEYS)))
        _only(keys, honoured | {"type"}, where)  # (unknown keywords first: they are named even beside a bad type)
        if len(set(map(repr, names))) != len(names):
            raise ValueError(f"json_schema_regex: {where}.type lists a type twice: {kinds!r}")
        if len(names) == 1:
            return self._typed(schema, names[0], where)
        return _either([self._typed(schema, k, where) for k in names])

    def _typed(self, schema, kind, where):
        if not isinstance(kind, str) or kind not in _JSON_KEYS:
            raise ValueError(f"json_schema_regex: {where}.type must be one of {sorted(_JSON_KEYS)} or a list of "
                             f"them (or give enum / const / anyOf / oneOf / $ref), got {kind!r}")
        if kind == "string":
            return self._string(schema, where)
        if kind == "integer":
            return _integer_regex(schema, where)
        if kind == "number":
            return _number_regex(schema, where) if _BOUNDS & set(schema) else _JSON_NUMBER
        if kind == "null":
            return "null"
        if kind == "boolean":
            return "(?:true|false)"
        if kind == "array":
            return self._array(schema, where)
        return self._object(schema, where)

    def _ref(self, ref, where):
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise ValueError(f"json_schema_regex: {where}.$ref must point into the schema (start with '#'), got "
                             f"{ref!r}")
        if ref in self.refs and self.max_depth is None:
            chain = " -> ".join(self.refs[self.refs.index(ref):] + [ref])
            raise ValueError(f"json_schema_regex: recursive $ref {ref!r} at {where} ({chain}): recursive schemas "
                             f"have no regex; pass max_recursion_depth=N to unroll the recursion N levels deep")
        if self.refs.count(ref) > (self.max_depth or 0):  # (past the depth: this branch is not offered)
            self.cut.append(ref)
            return None
        target = self.root
        for part in ref[1:].lstrip("/").split("/") if ref not in ("#", "#/") else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise ValueError(f"json_schema_regex: {where}.$ref {ref!r} does not resolve (no {part!r})")
        self.refs.append(ref)
        try:
            return self.build(target, ref)
        finally:
            self.refs.pop()

    def _alternatives(self, name, options, where):
        if not isinstance(options, list) or not options:
            raise ValueError(f"json_schema_regex: {where}.{name} must be a non-empty list of schemas")
        return _either([self.build(sub, f"{where}.{name}[{i}]") for i, sub in enumerate(options)])

    def _anyOf(self, options, where):
        return self._alternatives("anyOf", options, where)

    def _oneOf(self, options, where):  # (exclusivity not enforced: documented)
        return self._alternatives("oneOf", options, where)

    def _allOf(self, options, where):
        if not isinstance(options, list) or len(options) != 1:
            raise ValueError(f"json_schema_regex: {where}.allOf is supported with exactly one schema (an "
                             f"intersection of several has no regex here), got {options!r}")
        return self.build(options[0], f"{where}.allOf[0]")

    def _string(self, schema, where):
        given = sorted(k for k in ("pattern", "format", "minLength", "maxLength") if k in schema)
        if "format" in given and len(given) > 1 or "pattern" in given and len(given) > 1:
            raise ValueError(f"json_schema_regex: {where} combines {given}: pattern and format go alone (the "
                             f"regex cannot intersect them with each other or with lengths)")
        if "format" in schema:
            fmt = schema["format"]
            if fmt not in _FORMATS:
                raise ValueError(f"json_schema_regex: unsupported format {fmt!r} in {where} (supported: "
                                 f"{sorted(_FORMATS)})")
            return f'"{_FORMATS[fmt]}"'
        if "pattern" in schema:
            return '"' + _pattern_regex(schema["pattern"], where) + '"'
        lo, hi = _bounds(schema, "minLength", "maxLength", where)
        return '"' + _JSON_STRING_CHAR + _repeat(lo, hi) + '"'

    def _array(self, schema, where):
        if "items" in schema:
            item = self.build(schema["items"], where + ".items")
        else:  # (JSON Schema: no items keyword, any items; nesting bounded as {}'s)
            item = self._any_value(self._any_depth())
        lo, hi = _bounds(schema, "minItems", "maxItems", where)
        return self._list(item, lo, hi)

    def _list(self, item, lo, hi):
        """A JSON array of lo..hi (None: any number of) items; None where it needs an item and item is None."""
        ws = self.ws
        if item is None or hi == 0:
            return None if lo > 0 else rf"\[{ws}{ws}\]"
        more = f"(?:{ws},{ws}{item})"
        if lo == 0:
            body = f"(?:{item}{more}{_repeat(0, None if hi is None else hi - 1)})?"
        else:
            body = f"{item}{more}{_repeat(lo - 1, None if hi is None else hi - 1)}"
        return rf"\[{ws}{body}{ws}\]"

    def _object(self, schema, where):
        props, required, ws = schema.get("properties", {}), schema.get("required", []), self.ws
        if not isinstance(props, dict) or not isinstance(required, list) or not all(
                isinstance(name, str) for name in required):
            raise ValueError(f"json_schema_regex: {where} needs properties (a dict) and required (a list of key "
                             f"names, str), got properties={props!r}, required={required!r}")
        items = []
        for name, sub in props.items():
            value = self.build(sub, f"{where}.properties.{name}")
            if value is None and name in required:  # (a required member past the recursion depth)
                return None
            if value is not None:  # (an optional one is left out)
                items.append((_scalar_literal(name, where) + f"{ws}:{ws}" + value, name in required))
        undeclared = [name for name in dict.fromkeys(required) if name not in props]
        if undeclared:  # required members that properties do not declare: after the declared ones, in order
            value = self._undeclared_value(schema, undeclared, where)
            if value is None:  # (additionalProperties' schema past the recursion depth)
                return None
            items += [(_scalar_literal(name, where) + f"{ws}:{ws}" + value, True) for name in undeclared]
        extra = self._extra_member(schema, list(props) + undeclared, where)

        def rest(i, first):
            """The members from the i-th on; `first`: none written yet (no comma before the next)."""
            if i == len(items):
                return ""
            member, needed = items[i]
            sep = "" if first else f"{ws},{ws}"
            if needed:
                return sep + member + rest(i + 1, False)
            if not first:  # (both branches continue after a comma: the optional member factors out)
                return f"(?:{sep}{member})?" + rest(i + 1, False)
            return f"(?:{member}{rest(i + 1, False)}|{rest(i + 1, True)})"

        if extra is None:
            return r"\{" + ws + rest(0, True) + ws + r"\}"
        # extra members follow the declared ones: after at least one member, or opening the object
        more = f"(?:{ws},{ws}{extra})*"
        if any(needed for _, needed in items):
            body = rest(0, True) + more
        else:  # the declared members, at least one (the i-th the first written), or none
            firsts = [items[i][0] + rest(i + 1, False) for i in range(len(items))]
            body = "(?:" + "|".join(f"{m}{more}" for m in firsts + [extra]) + ")?"
        return r"\{" + ws + body + ws + r"\}"

    def _extra_member(self, schema, declared, where):
        """The regex of one additional member ("key": value), or None where the schema allows none here."""
        # (absent: closed when properties are declared, as outlines; an object without them takes any members)
        extra = schema.get("additionalProperties", "properties" not in schema)
        if extra is False:
            return None
        value = self._extra_value(extra, where)
        if value is None:
            return None
        return '"' + _raw_string_except(declared) + f'"{self.ws}:{self.ws}' + value

    def _extra_value(self, extra, where):
        """The value regex additionalProperties `extra` (true or a schema) gives a member that properties do not
        declare: any value for true, the schema's (None past the recursion depth) for a dict."""
        if extra is True:
            return self._any_value(self._any_depth())
        if isinstance(extra, dict):
            return self.build(extra, f"{where}.additionalProperties")
        raise ValueError(f"json_schema_regex: {where}.additionalProperties must be a bool or a schema (dict), "
                         f"got {extra!r}")

    def _undeclared_value(self, schema, names, where):
        """The value regex of required members `names` that properties do not declare: additionalProperties'
        (true or a schema; absent without properties: true). A closed object (additionalProperties false, or
        absent beside properties, closed here as outlines closes it) raises: it could hold no such member, and a
        required name missing from properties is more often a typo than a wish for an open object."""
        extra = schema.get("additionalProperties", "properties" not in schema)
        if extra is False:
            why = "false" if "additionalProperties" in schema else "absent (closed, as outlines, beside properties)"
            raise ValueError(f"json_schema_regex: {where}.required names {names!r}, which properties do not declare, "
                             f"and additionalProperties is {why}: declare them in properties, or set "
                             f"additionalProperties to true or to a schema for their values")
        return self._extra_value(extra, where)

    def _any_depth(self):
        return _ANY_VALUE_DEPTH if self.max_depth is None else self.max_depth

    def _any_value(self, depth):
        """Any JSON value, arrays and objects nested at most `depth` deep (then only scalars)."""
        scalar = f'(?:"{_JSON_STRING_CHAR}*"|{_JSON_NUMBER}|true|false|null)'
        if depth == 0:
            return scalar
        inner, ws = self._any_value(depth - 1), self.ws
        member = f'"{_JSON_STRING_CHAR}*"{ws}:{ws}{inner}'
        obj = rf"\{{{ws}(?:{member}(?:{ws},{ws}{member})*)?{ws}\}}"
        return f"(?:{scalar}|{self._list(inner, 0, None)}|{obj})"


def _either(options):
    """Alternatives, the None ones (branches not offered) left out; None where all are."""
    kept = [o for o in options if o is not None]
    if not kept:
        return None
    return "(?:" + "|".join(kept) + ")"


def _raw_string_except(names):
    """The content of a JSON string written without escapes, other than the given strings (a key that would
    duplicate a declared property): a walk of the names' trie where each node may end (unless a name ends
    there), take a character that leaves the trie (then anything), or go on along the trie."""
    trie = {}
    for name in names:
        node = trie
        for c in name:
            node = node.setdefault(c, {})
        node[None] = True  # (a name ends here)
    any_char = _intervals_regex(_JSON_RAW)

    def walk(node):
        chars = [c for c in node if c is not None and _intersect([(ord(c), ord(c))], _JSON_RAW)]  # (else: unreachable)
        alts = [] if None in node else [""]
        others = _intersect(_JSON_RAW, _complement(_merge((ord(c), ord(c)) for c in chars)))
        if others:
            alts.append(_intervals_regex(others) + any_char + "*")
        alts += [_escape_char(c) + walk(node[c]) for c in chars]
        return "(?:" + "|".join(alts) + ")"

    return walk(trie)


def _escape_char(c):
    return _intervals_regex([(ord(c), ord(c))])


def _schema_bounds(schema, where):
    """(minimum, maximum, exclusiveMinimum, exclusiveMaximum) as given (None where absent; the exclusives a
    number, or draft 4's bool beside minimum / maximum)."""
    def bound(name):
        v = schema.get(name)
        if v is None or isinstance(v, bool):
            return v
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"json_schema_regex: {where}.{name} must be a finite number, got {v!r}")
        return v

    lo, hi = bound("minimum"), bound("maximum")
    ex_lo, ex_hi = bound("exclusiveMinimum"), bound("exclusiveMaximum")
    for flag, base, name in ((ex_lo, lo, "exclusiveMinimum"), (ex_hi, hi, "exclusiveMaximum")):
        if isinstance(flag, bool) and flag and base is None:
            raise ValueError(f"json_schema_regex: {where}.{name}=true (draft 4) needs "
                             f"{'minimum' if name.endswith('Minimum') else 'maximum'}")
    return lo, hi, ex_lo, ex_hi


def _integer_regex(schema, where):
    """The integers within the schema's bounds (JSON Schema draft 6+, or draft 4's boolean exclusives)."""
    lo, hi, ex_lo, ex_hi = _schema_bounds(schema, where)
    low = [math.ceil(lo) + (ex_lo is True and lo == math.ceil(lo))] if lo is not None else []
    high = [math.floor(hi) - (ex_hi is True and hi == math.floor(hi))] if hi is not None else []
    if ex_lo is not None and not isinstance(ex_lo, bool):
        low.append(math.floor(ex_lo) + 1)
    if ex_hi is not None and not isinstance(ex_hi, bool):
        high.append(math.ceil(ex_hi) - 1)
    first, last = (max(low) if low else None), (min(high) if high else None)
    if first is not None and last is not None and first > last:
        raise ValueError(f"json_schema_regex: {where}'s bounds admit no integer ({schema!r})")
    if first is None and last is None:
        return _JSON_INTEGER
    return _int_range_regex(first, last)


def _int_range_regex(lo, hi):
    """JSON integers n with lo <= n <= hi (None: unbounded), exactly; "-0" counts as 0."""
    parts = []
    if lo is None or lo < 0:
        neg_lo = 1 if hi is None or hi >= 0 else -hi
        parts.append("-" + _natural_range(neg_lo, None if lo is None else -lo))
    if (lo is None or lo <= 0) and (hi is None or hi >= 0):
        parts.append("-?0")
    if hi is None or hi > 0:
        parts.append(_natural_range(1 if lo is None or lo < 1 else lo, hi))
    return "(?:" + "|".join(parts) + ")"


def _natural_range(a, b):
    """Decimal numbers without leading zeros in [a, b] (a >= 1; b None: unbounded)."""
    width_a = len(str(a))
    width_b = width_a if b is None else len(str(b))
    alts, full = [], []  # full: widths every number of which is in range (one alternative for a run of them)
    for width in range(width_a, width_b + 1):
        lo = max(a, 10 ** (width - 1))
        hi = 10 ** width - 1 if b is None else min(b, 10 ** width - 1)
        if lo == 10 ** (width - 1) and hi == 10 ** width - 1 and width > 1:
            full.append(width)
        else:
            alts.append(_same_width_range(str(lo), str(hi)))
    if full:  # (consecutive: only the first and the last width can be partial)
        alts.append("[1-9][0-9]{%d,%d}" % (full[0] - 1, full[-1] - 1))
    if b is None:  # every longer number exceeds a
        alts.append("[1-9][0-9]{%d,}" % width_a)
    return "(?:" + "|".join(alts) + ")"


def _same_width_range(lo, hi):
    """Digit strings of one width between lo and hi (a concatenable regex)."""
    if lo == hi:
        return lo
    if lo[0] == hi[0]:
        return lo[0] + _same_width_range(lo[1:], hi[1:])
    n = len(lo) - 1
    tail = "[0-9]{%d}" % n if n else ""
    first, last, alts = int(lo[0]), int(hi[0]), []
    if lo[1:] != "0" * n:  # lo's leading digit with the tails from lo's on
        alts.append(lo[0] + _same_width_range(lo[1:], "9" * n))
        first += 1
    middle_last = last if hi[1:] == "9" * n else last - 1
    if first <= middle_last:
        alts.append((str(first) if first == middle_last else f"[{first}-{middle_last}]") + tail)
    if hi[1:] != "9" * n:
        alts.append(hi[0] + _same_width_range("0" * n, hi[1:]))
    return "(?:" + "|".join(alts) + ")"


def _pattern_regex(pattern, where):
    """A string `pattern` (JSON Schema: ECMA-262, unanchored) as the regex of a JSON string's raw content."""
    if not isinstance(pattern, str):
        raise ValueError(f"json_schema_regex: {where}.pattern must be a str, got {type(pattern).__name__}")
    try:
        alts = _Parser(pattern, ecma=True).parse_search()
    except ValueError as e:
        raise ValueError(f"json_schema_regex: {where}.pattern: {e}") from None
    anything = _intervals_regex(_JSON_RAW) + "*"
    out = "(?:" + "|".join(("" if head else anything) + _node_regex(node) + ("" if tail else anything)
                           for node, head, tail in alts) + ")"
    if compile_regex(out).start == DEAD:  # (else a "no token" error at decode time, far from the schema)
        raise ValueError(f"json_schema_regex: {where}.pattern {pattern!r} matches no string content written "
                         f"without escapes (every match needs a quote, a backslash or a control character)")
    return out


def _node_regex(node):
    """An AST of _Parser as regex text, every class cut to the characters a JSON string holds unescaped."""
    kind = node[0]
    if kind == "set":
        return _intervals_regex(_intersect(node[1].intervals(), _JSON_RAW))
    if kind == "cat":
        return "".join(_node_regex(item) for item in node[1])
    if kind == "alt":
        return "(?:" + "|".join(_node_regex(item) for item in node[1]) + ")"
    _, item, lo, hi = node
    return f"(?:{_node_regex(item)}){_repeat(lo, hi)}"


def _intersect(a, b):
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _intervals_regex(intervals):
    def char(o):
        return "\\x%02x" % o if o < 0x100 else "\\u%04x" % o if o < 0x10000 else "\\U%08x" % o
    if not intervals:
        return r"[^\s\S]"
    return "[" + "".join(char(lo) if lo == hi else f"{char(lo)}-{char(hi)}" for lo, hi in intervals) + "]"


def _only(keys, allowed, where, why=""):
    extra = sorted(keys - allowed)
    if extra:
        raise ValueError(f"json_schema_regex: unsupported keyword(s) {extra} in {where}{why}")


def _bounds(schema, lo_key, hi_key, where):
    lo, hi = schema.get(lo_key, 0), schema.get(hi_key)
    for name, v in ((lo_key, lo), (hi_key, hi)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            raise ValueError(f"json_schema_regex: {where}.{name} must be an int >= 0, got {v!r}")
    if hi is not None and hi < lo:
        raise ValueError(f"json_schema_regex: {where}.{hi_key}={hi} is below {lo_key}={lo}")
    return lo, hi


def _repeat(lo, hi):
    return "{%d,%s}" % (lo, "" if hi is None else hi)


def _scalar_literal(v, where):
    if isinstance(v, (dict, list)) or (isinstance(v, float) and v != v):
        raise ValueError(f"json_schema_regex: {where}.enum values must be JSON scalars, got {v!r}")
    text = json.dumps(v)
    return "".join("\\" + c if not c.isalnum() and c not in ' "' else c for c in text)


def _number_regex(schema, where):
    """JSON numbers within the schema's bounds, written without an exponent. Each bound becomes an inclusive
    decimal D that float rounding cannot cross: a float bound b reads as repr(b) (the shortest decimal that
    rounds to b; rounding is monotone, so x >= repr(b) gives float(x) >= b); an exclusive one as repr of b's
    next float inward (x >= repr(nextafter(b, +inf)) gives float(x) > b), so a validator that parses the
    document's number as a float (json.loads) and one that reads it exactly both accept every match."""
    lo, hi, ex_lo, ex_hi = _schema_bounds(schema, where)
    lower, upper = [], []
    for value, flag, name, out, inward in ((lo, ex_lo, "minimum", lower, math.inf),
                                           (hi, ex_hi, "maximum", upper, -math.inf)):
        exclusive = "exclusiveM" + name[1:]
        if value is not None:
            out.append(_decimal_bound(value, flag is True, inward, f"{where}.{name}"))
        if flag is not None and not isinstance(flag, bool):
            out.append(_decimal_bound(flag, True, inward, f"{where}.{exclusive}"))
    first, last = (max(lower) if lower else None), (min(upper) if upper else None)
    if first is not None and last is not None and first > last:
        raise ValueError(f"json_schema_regex: {where}'s bounds admit no number ({schema!r})")
    return _decimal_range_regex(first, last)


def _decimal_bound(value, exclusive, inward, where):
    """An inclusive decimal bound for `value` (module docstring of _number_regex)."""
    if isinstance(value, int) and abs(value) > 2 ** 53:  # (a float document near it compares inexactly)
        raise ValueError(f"json_schema_regex: {where}={value} on a number: integer bounds beyond 2**53 are not "
                         f"supported (write the bound as a float, or use type integer)")
    if exclusive:
        value = math.nextafter(float(value), inward)
    return decimal.Decimal(repr(value)) if isinstance(value, float) else decimal.Decimal(value)


def _decimal_range_regex(lo, hi):
    """Numbers -?(0|[1-9][0-9]*)(\\.[0-9]+)? whose value lies in [lo, hi] (Decimals; None: unbounded); a minus
    sign with a zero value ("-0", "-0.0") is allowed iff 0 is."""
    parts = []
    if hi is None or hi >= 0:
        parts.append(_magnitude_regex(max(lo, 0) if lo is not None else decimal.Decimal(0), hi))
    if lo is None or lo <= 0:
        parts.append("-" + _magnitude_regex(max(-hi, 0) if hi is not None else decimal.Decimal(0),
                                            None if lo is None else -lo))
    return "(?:" + "|".join(parts) + ")"


def _split_decimal(d):
    """A Decimal >= 0 as (integer part, fraction digits without trailing zeros)."""
    whole, _, frac = format(d, "f").partition(".")
    return int(whole), frac.rstrip("0")


def _magnitude_regex(a, b):
    """Unsigned numbers (0|[1-9][0-9]*)(\\.[0-9]+)? with a <= value <= b (b None: unbounded), 0 <= a <= b."""
    a_int, a_frac = _split_decimal(a)
    if b is not None:
        b_int, b_frac = _split_decimal(b)
        if a_int == b_int:
            return str(a_int) + _fraction_regex(a_frac, b_frac)
    alts = [str(a_int) + _fraction_regex(a_frac, None)]
    middle_hi = None if b is None else b_int - 1
    if middle_hi is None or middle_hi >= a_int + 1:  # integer parts strictly inside: any fraction
        middle = _natural_range(a_int + 1, middle_hi)
        alts.append(middle + _fraction_regex("", None))
    if b is not None:
        alts.append(str(b_int) + _fraction_regex("", b_frac))
    return "(?:" + "|".join(alts) + ")"


def _fraction_regex(lo, hi):
    """The optional fraction \\.[0-9]+ whose value 0.d lies in [0.lo, 0.hi] (digit strings without trailing
    zeros, "" for 0; hi None: below 1). No fraction counts as 0."""
    body = _digits_at_least(lo) if hi is None else _digits_between(lo, hi)
    return rf"(?:\.{body})?" if lo == "" else rf"\.{body}"


def _digits_at_least(f, nonempty=True):
    """Digit strings d with 0.d >= 0.f (f: no trailing zeros); the empty one too iff f is "" and not nonempty.
    A run of leading zeros in f is one counted repeat (bounds like 5e-324 have hundreds)."""
    if not f:
        return "[0-9]+" if nonempty else "[0-9]*"
    k = len(f) - len(f.lstrip("0"))
    first = int(f[k])
    beyond = [f"[{first + 1}-9][0-9]*"] if first < 9 else []
    tail = "(?:" + "|".join(beyond + [f[k] + _digits_at_least(f[k + 1:], False)]) + ")"
    if not k:
        return tail
    return "(?:0{%d}%s|0{0,%d}[1-9][0-9]*)" % (k, tail, k - 1)  # (or a nonzero digit before f's first)


def _digits_at_most(g, nonempty):
    """Digit strings d with 0.d <= 0.g (g: no trailing zeros); the empty one too unless nonempty."""
    if not g:
        return "0+" if nonempty else "0*"
    k = len(g) - len(g.lstrip("0"))
    first = int(g[k])
    zeros = "0{%d}" % k if k else ""
    alts = [f"{zeros}[0-{first - 1}][0-9]*", zeros + g[k] + _digits_at_most(g[k + 1:], False)]
    if k or not nonempty:  # d = up to k zeros and nothing more (value 0)
        alts.append("0{%d,%d}" % (1 if nonempty else 0, k) if k else "")
    return "(?:" + "|".join(alts) + ")"


def _digits_between(f, g):
    """Non-empty digit strings d with 0.f <= 0.d <= 0.g (f <= g as fractions, no trailing zeros)."""
    if not f:
        return _digits_at_most(g, True)
    p = 0
    while p < len(f) and p < len(g) and f[p] == g[p]:
        p += 1
    if p == len(f):  # f is a prefix of g: d extends f by at most g's rest
        return f + _digits_at_most(g[p:], False)
    a, b = int(f[p]), int(g[p])  # (a < b: f <= g and they differ here)
    alts = [f[p] + _digits_at_least(f[p + 1:], False)]
    if b - a >= 2:
        alts.append(f"[{a + 1}-{b - 1}][0-9]*")
    alts.append(g[p] + _digits_at_most(g[p + 1:], False))
    return f[:p] + "(?:" + "|".join(alts) + ")"
