"""Guided decoding costs on the CPU (llmkern.guided): the quantities README quotes for RegexConstraint.

    python benchmarks/guided_masks.py                       # 32k string vocabulary, 50k byte-level one
    python benchmarks/guided_masks.py --vocab-size 32000 --byte-vocab-size 50000 --walks 4 --seed 0

Vocabularies are synthetic (no tokenizer download): pseudo-words with and without a leading space,
capitalised forms, numbers, punctuation runs as BPE vocabularies hold them; the byte-level one adds
the 256 single bytes, non-ASCII words and tokens that cut a UTF-8 character in two. For each
vocabulary and pattern the table gives:
  trie s       building the TokenVocabulary (its trie), once per vocabulary;
  new states   how many DFA states the random walks reached;
  new state ms a call that meets a state for the first time (its mask is one trie walk): min / median / max;
  8-row step   a decode step of 8 rows whose states and transitions are cached (what a long generation
               pays per step), median and max.
The walks pick a uniformly random allowed token each step (eos only when nothing else is allowed), so
they wander through the states a sampler could reach.
"""
import argparse
import random
import statistics
import time

import torch

from llmkern.guided import RegexConstraint, TokenVocabulary, json_schema_regex

_LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
_WEIGHTS = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5,
            1.0, 0.8, 0.2, 0.2, 0.1, 0.1]
_PUNCT = ['"', '":', '",', '{"', '"}', '},', '],', '["', ' "', ', ', '.', ',', '\n', '\n\n', '  ', '    ', '://',
          '()', ');', ' =', ' ==', '--', '...', "'s", ' (', ' -', '-', '/', ':', ';', '!', '?']
_NON_ASCII = "éèüößçñåøæ中文日本語한국어абвгдежзийклмнопрстуфхцчшщъыьэюя€…–—“”😀🚀"


def _word(rng):
    n = rng.choice([1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 6, 6, 7, 8])
    return "".join(rng.choices(_LETTERS, _WEIGHTS, k=n))


def string_vocab(size, seed=0):
    """`size` distinct token strings shaped like a BPE vocabulary's (printable ASCII first)."""
    rng = random.Random(seed)
    seen = {chr(i) for i in range(32, 127)} | set(_PUNCT) | {str(i) for i in range(1000)}
    tokens = sorted(seen)
    while len(tokens) < size:
        w = _word(rng)
        form = rng.random()
        w = (" " + w) if form < 0.5 else (" " + w.capitalize()) if form < 0.6 else w.capitalize() if form < 0.65 \
            else w
        if w not in seen:
            seen.add(w)
            tokens.append(w)
    return tokens[:size]


def byte_vocab(size, seed=0):
    """`size` distinct byte strings: the 256 bytes, ASCII tokens as string_vocab's, non-ASCII words and
    tokens holding part of a multi-byte character (what GPT-2 style byte-level BPE vocabularies hold)."""
    rng = random.Random(seed + 1)
    tokens, seen = [], set()

    def add(b):
        if b and b not in seen:
            seen.add(b)
            tokens.append(b)

    for b in range(256):
        add(bytes((b,)))
    for s in string_vocab(int(size * 0.8), seed):
        add(s.encode("utf-8"))
    while len(tokens) < size:
        word = "".join(rng.choice(_NON_ASCII) for _ in range(rng.randint(1, 3)))
        data = ((" " if rng.random() < 0.4 else "") + word).encode("utf-8")
        if rng.random() < 0.3:  # cut inside a character: a fragment as byte-level merges make them
            data = data[:rng.randint(1, len(data))] if rng.random() < 0.5 else data[rng.randint(0, len(data) - 1):]
        add(data)
    return tokens[:size]


SCHEMA = {"type": "object", "required": ["name", "age", "tags"], "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}}}
PATTERNS = [("date", r"20\d{2}-[01]\d-[0-3]\d"), ("email", r"[a-z0-9.]{1,20}@[a-z]{1,12}\.(com|org|net)"),
            ("json schema", json_schema_regex(SCHEMA)), ("free text", r"[^\n]{0,60}\n")]


def _pick(mask, eos, rng):
    ids = mask.nonzero().flatten().tolist()
    choices = [i for i in ids if i != eos] or ids
    return rng.choice(choices)


def random_rows(constraint, eos, rows, length, rng, new_state_ms):
    """`rows` token rows of up to `length` tokens walked through the constraint one call per token; the time of
    each call that built a new state's mask goes to new_state_ms."""
    out = []
    for _ in range(rows):
        seq = []
        while len(seq) < length:
            before = len(constraint._masks)  # (private: the only way to tell a new state's call from a cached one)
            t = time.perf_counter()
            mask = constraint(torch.tensor([seq], dtype=torch.long))[0]
            dt = time.perf_counter() - t
            if len(constraint._masks) > before:
                new_state_ms.append(dt * 1e3)
            tok = _pick(mask, eos, rng)
            if tok == eos:
                break
            seq.append(tok)
        out.append(seq)
    return out


def cached_step_ms(constraint, rows, eos, repeats=3):
    """Per-call ms of decode steps over the rows (states and transitions cached: the walks are replayed). A row
    that ended holds eos then more eos, as generate pads a finished row (the constraint gives it eos only)."""
    width = max(len(r) for r in rows) + 1
    padded = torch.tensor([r + [eos] * (width - len(r)) for r in rows], dtype=torch.long)
    times = []
    for _ in range(repeats):
        for t in range(width):
            start = time.perf_counter()
            constraint(padded[:, :t])
            times.append((time.perf_counter() - start) * 1e3)
    return times


def bench(name, vocab_list, eos, walks, seed):
    t = time.perf_counter()
    vocab = TokenVocabulary(vocab_list)
    trie_s = time.perf_counter() - t
    lines = []
    for label, pattern in PATTERNS:
        rng = random.Random(seed)
        c = RegexConstraint(pattern, vocab, prompt_len=0, eos_token_id=eos)
        new_ms = []
        random_rows(c, eos, walks, 48, rng, new_ms)
        rows8 = random_rows(c, eos, 8, 48, rng, new_ms)
        step = cached_step_ms(c, rows8, eos)
        lines.append((name, label, trie_s, len(c._masks), new_ms, step))
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=32000, help="string vocabulary size")
    ap.add_argument("--byte-vocab-size", type=int, default=50000, help="byte-level vocabulary size")
    ap.add_argument("--walks", type=int, default=4, help="random walks per pattern before the 8 timed rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the masks are built in Python)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    strings = string_vocab(args.vocab_size, args.seed) + [None]  # (eos: a token without text)
    results += bench(f"str {args.vocab_size // 1000}k", strings, len(strings) - 1, args.walks, args.seed)
    data = byte_vocab(args.byte_vocab_size, args.seed) + [None]
    results += bench(f"bytes {args.byte_vocab_size // 1000}k", data, len(data) - 1, args.walks, args.seed)
    print("| vocabulary | pattern | trie s | new states | new state ms min / median / max | 8-row step ms median "
          "/ max |")
    print("|---|---|---|---|---|---|")
    for name, label, trie_s, states, new_ms, step in results:
        ms = f"{min(new_ms):.1f} / {statistics.median(new_ms):.1f} / {max(new_ms):.1f}" if new_ms else "-"
        steps = f"{statistics.median(step):.2f} / {max(step):.2f}" if step else "-"
        print(f"| {name} | {label} | {trie_s:.2f} | {states} | {ms} | {steps} |")


if __name__ == "__main__":
    main()
