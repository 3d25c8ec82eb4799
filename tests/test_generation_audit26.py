"""generate's stop_strings (transformers' generate(stop_strings=..., tokenizer=...)): the rows stop where
transformers' StopStringCriteria stops them, on byte-level, byte-fallback and plain-text tokenizers trained offline."""
import json
import warnings

import pytest
import torch

from llmkern.generation import _StopStrings, generate
from llmkern.models import from_hf
from test_guided_regex import _tokenizers

transformers = pytest.importorskip("transformers")
from transformers.generation.stopping_criteria import StopStringCriteria  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)


def _wordpiece():
    """A WordPiece tokenizer (its decoder neither byte-level nor byte-fallback: stop strings match characters)."""
    tk = pytest.importorskip("tokenizers")
    wp = tk.Tokenizer(tk.models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    wp.decoder = tk.decoders.WordPiece()
    corpus = ["Hello world, the date is 2024", "yes no maybe world order", "abcdef ab@cd.org"] * 4
    wp.train_from_iterator(corpus, tk.trainers.WordPieceTrainer(vocab_size=120, special_tokens=["[UNK]", "[SEP]"],
                                                                show_progress=False))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", eos_token="[SEP]")


@pytest.fixture(scope="module")
def tokenizers():
    return _tokenizers() + [_wordpiece()]


def _near_misses(tok, words, n_rows, width, seed):
    """Rows of token ids drawn from the tokens whose text lies inside a stop string or overlaps one of its ends
    (so that many rows hold a stop string, split every way, ending in or before the last token), plus the
    specials."""
    from llmkern.generation import _stop_string_units, _stop_token_texts

    units, kind = _stop_string_units(tok)
    texts = _stop_token_texts(tok, units, kind)
    targets = [w.encode() if units == "bytes" else w for w in words]
    pool = sorted(i for i, t in texts.items() if any(
        t in w or any(t.endswith(w[:a]) or t.startswith(w[a:]) for a in range(1, len(w))) for w in targets))
    pool += list(tok.all_special_ids)
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(pool)[torch.randint(0, len(pool), (n_rows, width), generator=g)], units


def test_stop_string_matching_equals_transformers_criteria(tokenizers):
    """The device-side match (_StopStrings) against transformers' StopStringCriteria on thousands of rows built to
    hold stop strings split across tokens, overhanging the first token, ending inside the last or earlier: the same
    rows stop, for byte-level (GPT-2), byte-fallback (SentencePiece) and character (WordPiece) tokenizers, with
    rows shorter than the longest stop string, and a multi-byte character split over byte tokens."""
    cases = [["world", "o w", "ab@"], ["ld, th", "12 3", "e"], ["é c"], ["or"]]
    modes, hits = set(), {}
    for t, tok in enumerate(tokenizers):
        for k, words in enumerate(cases):
            rows, units = _near_misses(tok, words, 4000, 6, seed=k)
            modes.add(units)
            want = StopStringCriteria(tok, words)(rows, None)
            ours = _StopStrings(words, tok, len(tok), rows.device)
            assert torch.equal(ours(rows), want), (tok, words)
            assert torch.equal(ours(rows[:, -2:]), StopStringCriteria(tok, words)(rows[:, -2:], None))
            hits[t, k] = int(want.sum())
    assert modes == {"bytes", "text"}
    # (the WordPiece vocabulary holds no é; its decoder puts a space before "@")
    assert all(0 < hits[t, k] < 4000 for t in range(3) for k in range(2)) and hits[0, 2] > 0 and hits[1, 2] > 0, hits


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tokenizers):
    """(byte-level tokenizer, tiny random Llama from_hf, its transformers twin, checkpoint dir)."""
    tok = tokenizers[0]
    path = tmp_path_factory.mktemp("stop_strings")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()
    hf.save_pretrained(path)
    return tok, from_hf(str(path), backend="torch"), hf, path


def _cut(tok, row, first, skip=0):
    """A stop string from the text of row's tokens from index `first` on: the first UTF-8-whole piece of 2-3 bytes,
    past `skip` bytes, that spans two tokens (random tokens of a byte-level vocabulary hold pieces of characters)."""
    from llmkern.generation import _stop_string_units, _stop_token_texts

    texts = _stop_token_texts(tok, *_stop_string_units(tok))
    parts = [texts[i] for i in row[first:]]
    data = b"".join(parts)
    bounds = {sum(len(p) for p in parts[:k]) for k in range(1, len(parts))}
    for a in range(skip, len(data)):
        for n in (3, 2):
            if any(a < b < a + n for b in bounds):
                try:
                    return data[a:a + n].decode("utf-8")
                except UnicodeDecodeError:
                    pass
    raise AssertionError(f"no stop string in {data!r}")


def _hf_generate(hf, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False, pad_token_id=0,
                           eos_token_id=0, **kw)


def test_greedy_stop_strings_equal_transformers_generate(llama):
    """Greedy decoding with stop_strings (stop strings cut from the free continuation's text: one ending inside a
    token, one starting in the prompt) gives transformers' generate(stop_strings=..., tokenizer=...)'s tokens:
    rows stop (padded after) where transformers' stop. Sampling's rows are its free rows cut where transformers'
    criteria fire first. The old generate had no stop_strings argument."""
    tok, m, hf, _ = llama
    x = torch.randint(3, len(tok), (3, 4), generator=torch.Generator().manual_seed(2))
    free = generate(m, x, 10, eos_token_id=0, pad_token_id=0)
    assert torch.equal(free, _hf_generate(hf, x))
    rows = free.tolist()
    words = [_cut(tok, rows[0], 3), _cut(tok, rows[1], 6, skip=2)]  # (row 0: from the prompt's last token on)
    ours = generate(m, x, 10, eos_token_id=0, pad_token_id=0, stop_strings=words, tokenizer=tok)
    assert torch.equal(ours, _hf_generate(hf, x, stop_strings=words, tokenizer=tok)), words
    assert (ours[:, -1] == 0).sum() >= 2, words  # (rows 0 and 1 stopped early)
    one = generate(m, x, 10, eos_token_id=0, pad_token_id=0, stop_strings=words[1], tokenizer=tok)  # (a str)
    assert torch.equal(one, _hf_generate(hf, x, stop_strings=words[1], tokenizer=tok))
    sampled = generate(m, x, 10, strategy="sample", seed=3, eos_token_id=0, pad_token_id=0)
    rows = sampled.tolist()
    words = [_cut(tok, rows[0], 5), _cut(tok, rows[2], 6)]
    stopped = generate(m, x, 10, strategy="sample", seed=3, eos_token_id=0, pad_token_id=0, stop_strings=words,
                       tokenizer=tok)
    crit = StopStringCriteria(tok, words)
    for r in range(3):
        ends = [t for t in range(5, 15) if crit(sampled[r:r + 1, :t], None)[0]]
        cut = ends[0] if ends else 14
        assert torch.equal(stopped[r, :cut], sampled[r, :cut]) and (stopped[r, cut:] == 0).all(), r
    assert (stopped[[0, 2], -1] == 0).all()


def test_stop_strings_errors_and_checkpoint_default(llama):
    """stop_strings without a tokenizer raise (as transformers), malformed ones and those of beam search /
    speculative decoding raise naming stop_strings; generation_config.json's stop_strings apply when a tokenizer
    is given (as transformers' generate reads them from there) and warn as ignored without one."""
    tok, m, hf, path = llama
    x = torch.tensor([[39, 99, 173, 57]])
    with pytest.raises(ValueError, match="tokenizer="):
        generate(m, x, 2, stop_strings=["ab"])
    for bad in ([], [""], "", ["a", 3], 5):
        with pytest.raises(ValueError, match="stop_strings must be"):
            generate(m, x, 2, stop_strings=bad, tokenizer=tok)
    with pytest.raises(ValueError, match="stop_strings are supported by .* not with draft_model"):
        generate(m, x, 2, stop_strings=["ab"], tokenizer=tok, draft_model=m)
    free = generate(m, x, 10, eos_token_id=0, pad_token_id=0)
    word = _cut(tok, free[0].tolist(), 3)
    with open(path / "generation_config.json") as f:
        cfg = json.load(f)
    with open(path / "generation_config.json", "w") as f:
        json.dump(dict(cfg, stop_strings=[word]), f)
    m2 = from_hf(str(path), backend="torch")
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    ours = generate(m2, x, 10, eos_token_id=0, pad_token_id=0, tokenizer=tok)
    assert torch.equal(ours, _hf_generate(hf2, x, tokenizer=tok))
    assert ours.shape[1] < free.shape[1] and torch.equal(ours, free[:, :ours.shape[1]])
    assert torch.equal(generate(m2, x, 10, eos_token_id=0, pad_token_id=0, tokenizer=tok, stop_strings=None),
                       free)
    with pytest.warns(UserWarning, match="generation_config.stop_strings=.*pass tokenizer="):
        assert torch.equal(generate(m2, x, 10, eos_token_id=0, pad_token_id=0), free)
