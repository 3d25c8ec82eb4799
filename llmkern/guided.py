"""Guided decoding by regular expression (vLLM's guided_regex, outlines' regex FSM).

    from llmkern.guided import RegexConstraint
    c = RegexConstraint(r"\\d{4}-\\d{2}-\\d{2}", tokenizer, prompt_len=x.shape[1], eos_token_id=eos)
    out = generate(model, x, 16, allowed_tokens=c, eos_token_id=eos)       # any strategy

json_schema_regex(schema) turns a simple JSON Schema into such a pattern (vLLM's guided_json).

The text the row generates (its tokens' strings joined, up to eos) must fullmatch the pattern: each step a
token is allowed iff the text with it is still a prefix of some match, and eos iff the text is a match.

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
import json
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


class _CharSet:
    """A set of characters: code point ranges and \\d \\w \\s categories (upper case: complemented), negated."""
    __slots__ = ("ranges", "cats", "negated")

    def __init__(self, ranges=(), cats=(), negated=False):
        self.ranges, self.cats, self.negated = tuple(ranges), tuple(cats), negated

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


def _literal(c):
    return ("set", _CharSet([(ord(c), ord(c))]))


class _Parser:
    """Recursive descent over the documented subset; the AST is tuples: ("set", _CharSet), ("cat", [..]),
    ("alt", [..]), ("rep", node, min, max or None)."""

    def __init__(self, pattern):
        self.p, self.i = pattern, 0

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
            items.append(self.parse_repeat())
        return items[0] if len(items) == 1 else ("cat", items)

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
            return ("set", _CharSet([(10, 10)], negated=True))
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
            elif nxt == "P" and self.peek(2) == "<":
                close = self.p.find(">", self.i)
                if close < 0 or not self.p[self.i + 3:close].isidentifier():
                    raise self.error("bad group name", start)
                self.i = close + 1
            else:
                raise self.unsupported(_group_kind(self.p, self.i), start)
        node = self.parse_alt()
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
            return c if in_class else ("set", _CharSet(cats=[c]))
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


def compile_regex(pattern):
    """The pattern (see the module docstring for the subset) as a lazily built RegexDFA; ValueError names
    a construct outside the subset or a malformed pattern."""
    return RegexDFA(pattern)


class TokenVocabulary:
    """The text of every token id, and a trie of those texts, shared by the constraints built on it.

    `vocab`: a list of strings indexed by token id (None or "" for a token that never emits text, e.g. a
    special token: such tokens are never allowed, except as eos), or a Hugging Face tokenizer. A tokenizer's
    token i becomes the text it adds after other text: convert_tokens_to_string([a, tok_i]) minus
    convert_tokens_to_string([a]) for a fixed ordinary token a. That keeps SentencePiece's leading space
    ("▁Hello" -> " Hello", which decoding alone strips at the start of a text), maps byte-level BPE's
    alphabet back to text ("Ġ" -> " "), reads byte-fallback tokens ("<0x0A>" -> "\\n") and WordPiece's "##".
    Special tokens (tokenizer.all_special_ids) and tokens that are only part of a UTF-8 character (their
    text decodes to U+FFFD) get None: the character-level DFA cannot follow a character split across tokens,
    so such characters are generated only where a single token holds them whole.
    vocab_size: the model's vocabulary (its masks' width), at least the number of strings (ids past them
    are never allowed); default: the number of strings."""

    def __init__(self, vocab, vocab_size=None):
        if isinstance(vocab, TokenVocabulary) and vocab_size in (None, vocab.vocab_size):
            self.strings, self.vocab_size, self.children, self.ends = (
                vocab.strings, vocab.vocab_size, vocab.children, vocab.ends)  # (the trie is shared, never changed)
            return
        if isinstance(vocab, TokenVocabulary):
            strings = vocab.strings
        elif hasattr(vocab, "convert_ids_to_tokens") and hasattr(vocab, "convert_tokens_to_string"):
            strings = _tokenizer_strings(vocab)
        elif isinstance(vocab, (list, tuple)):
            strings = list(vocab)
            for i, s in enumerate(strings):
                if s is not None and not isinstance(s, str):
                    raise TypeError(f"vocab[{i}] must be a str (the token's text) or None, got {type(s).__name__}")
        else:
            raise TypeError(f"vocab must be a list of token strings (indexed by id), a Hugging Face tokenizer or a "
                            f"TokenVocabulary, got {type(vocab).__name__}")
        if not strings:
            raise ValueError("vocab is empty")
        if vocab_size is None:
            vocab_size = len(strings)
        elif not isinstance(vocab_size, numbers.Integral) or isinstance(vocab_size, bool) or vocab_size < len(
                strings):
            raise ValueError(f"vocab_size must be an int >= the number of token strings ({len(strings)}), got "
                             f"{vocab_size!r}")
        self.strings, self.vocab_size = strings, int(vocab_size)
        self._build_trie()

    def _build_trie(self):
        # node k: children[k] (char -> node), ends[k] (ids whose text ends there); node 0 is the empty text
        self.children, self.ends = [{}], [[]]
        for tok, s in enumerate(self.strings):
            if not s:
                continue
            node = 0
            for c in s:
                nxt = self.children[node].get(c)
                if nxt is None:
                    nxt = self.children[node][c] = len(self.children)
                    self.children.append({})
                    self.ends.append([])
                node = nxt
            self.ends[node].append(tok)

    def decode(self, ids, eos_token_id=None):
        """The text of token ids, up to eos (excluded); a token without text raises."""
        out = []
        for t in ids:
            t = int(t)
            if t == eos_token_id:
                break
            s = self.strings[t] if 0 <= t < len(self.strings) else None
            if s is None:
                raise ValueError(f"token {t} has no text in this vocabulary")
            out.append(s)
        return "".join(out)

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
    (tokens without text never are); a row that emitted eos gets eos only (generate then pads it). A row
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
        start = self.dfa.start
        mask, anything = self._mask(start)
        if not self.dfa.accepting(start) and int(mask.sum()) == (self.eos is not None and bool(mask[self.eos])):
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
                ids = self.vocab.allowed_ids(self.dfa, state)
            if ids:
                mask[torch.tensor(ids, dtype=torch.long)] = True
            if self.eos is not None:
                mask[self.eos] = state == FINISHED or state == DEAD or self.dfa.accepting(state)
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
            s = self.vocab.strings[tok] if 0 <= tok < len(self.vocab.strings) else None
            nxt = self._token_step[key] = DEAD if not s else self.dfa.walk(state, s)
        return nxt

    def _state(self, key, seen):
        state = seen.get(key)
        if state is None:
            state = self._rows.get(key)
        if state is None:
            prev = self._rows.get(key[:-1]) if key else None
            if prev is None:  # not from the last step's rows: walk all the tokens (cached transitions)
                prev, body = self.dfa.start, key
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
            text = repr(self.vocab.decode(generated))
        except ValueError:
            text = f"tokens {generated}"
        if state == DEAD:
            why = "cannot match the pattern (the mask was bypassed)"
        elif self.dfa.accepting(state):
            why = "matches the pattern and nothing may follow it"
        else:
            why = "needs a character that no token of the vocabulary holds"
        return ValueError(f"RegexConstraint: row {row}'s generated text {text} {why}, and there is no "
                          f"eos_token_id to end it (pass eos_token_id to the constraint and to generate)")


# JSON Schema -> regex (outlines' build_regex_from_schema, for a simple subset)
_JSON_STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})'
_JSON_INTEGER = r"-?(?:0|[1-9][0-9]*)"
_JSON_NUMBER = _JSON_INTEGER + r"(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_JSON_IGNORED = {"title", "description", "examples", "default", "$schema", "$id", "$comment", "additionalProperties"}
_JSON_KEYS = {  # what each type honours; any other key raises (ignoring it could produce invalid documents)
    "string": {"minLength", "maxLength"}, "integer": set(), "number": set(), "boolean": set(), "null": set(),
    "array": {"items", "minItems", "maxItems"}, "object": {"properties", "required"},
}


def json_schema_regex(schema, whitespace=r"[ ]?"):
    """A regex (for RegexConstraint) whose matches are JSON documents valid under `schema`, a dict (or its JSON
    text) in this subset of JSON Schema:
      {"type": "string"} (with minLength / maxLength), "integer", "number", "boolean", "null";
      {"enum": [...]} / {"const": v} of JSON scalars;
      {"type": "array", "items": <schema>} (with minItems / maxItems);
      {"type": "object", "properties": {...}, "required": [...]}: the properties in the order given (required
        ones always, the others optionally), no others (additionalProperties is not used: none are generated).
    title, description, examples, default, $schema, $id, $comment are ignored; any other keyword ($ref, anyOf,
    pattern, format, minimum, ...) raises ValueError naming it. `whitespace`: the regex allowed around
    punctuation (default: an optional space; "" for compact JSON)."""
    if isinstance(schema, str):
        schema = json.loads(schema)
    if not isinstance(whitespace, str):
        raise TypeError(f"json_schema_regex: whitespace must be a str (a regex), got {type(whitespace).__name__}")
    compile_regex(whitespace)  # (a bad whitespace pattern is named here, not inside the composed regex)
    return _schema_regex(schema, f"(?:{whitespace})" if whitespace else "", "schema")


def _schema_regex(schema, ws, where):
    if not isinstance(schema, dict):
        raise ValueError(f"json_schema_regex: {where} must be a JSON object (dict), got {type(schema).__name__}")
    keys = set(schema) - _JSON_IGNORED
    if "enum" in schema or "const" in schema:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        _only(keys, {"enum", "const", "type"}, where)
        if not isinstance(values, list) or not values:
            raise ValueError(f"json_schema_regex: {where}.enum must be a non-empty list")
        return "(?:" + "|".join(_scalar_literal(v, where) for v in values) + ")"
    kind = schema.get("type")
    if kind not in _JSON_KEYS:
        raise ValueError(f"json_schema_regex: {where}.type must be one of {sorted(_JSON_KEYS)} (or give enum / "
                         f"const), got {kind!r}")
    _only(keys, _JSON_KEYS[kind] | {"type"}, where)
    if kind == "string":
        lo, hi = _bounds(schema, "minLength", "maxLength", where)
        return '"' + _JSON_STRING_CHAR + _repeat(lo, hi) + '"'
    if kind in ("integer", "number", "null"):
        return {"integer": _JSON_INTEGER, "number": _JSON_NUMBER, "null": "null"}[kind]
    if kind == "boolean":
        return "(?:true|false)"
    if kind == "array":
        return _array_regex(schema, ws, where)
    return _object_regex(schema, ws, where)


def _only(keys, allowed, where):
    extra = sorted(keys - allowed)
    if extra:
        raise ValueError(f"json_schema_regex: unsupported keyword(s) {extra} in {where}")


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


def _array_regex(schema, ws, where):
    if "items" not in schema:
        raise ValueError(f"json_schema_regex: {where} (an array) needs items")
    item = _schema_regex(schema["items"], ws, where + ".items")
    lo, hi = _bounds(schema, "minItems", "maxItems", where)
    more = f"(?:{ws},{ws}{item})"
    if hi == 0:
        body = ""
    elif lo == 0:
        body = f"(?:{item}{more}{_repeat(0, None if hi is None else hi - 1)})?"
    else:
        body = f"{item}{more}{_repeat(lo - 1, None if hi is None else hi - 1)}"
    return rf"\[{ws}{body}{ws}\]"


def _object_regex(schema, ws, where):
    props, required = schema.get("properties", {}), schema.get("required", [])
    if not isinstance(props, dict) or not isinstance(required, list) or set(required) - set(props):
        raise ValueError(f"json_schema_regex: {where} needs properties (a dict) and required (a list of its keys), "
                         f"got properties={props!r}, required={required!r}")
    items = [(_scalar_literal(name, where) + f"{ws}:{ws}" + _schema_regex(sub, ws, f"{where}.properties.{name}"),
              name in required) for name, sub in props.items()]

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

    return r"\{" + ws + rest(0, True) + ws + r"\}"
