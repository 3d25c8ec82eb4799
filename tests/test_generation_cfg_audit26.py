"""generate's classifier-free guidance (transformers' generate(guidance_scale=..., negative_prompt_ids=...)) and
stop_strings with beam search (transformers' StopStringCriteria in its beam search), against transformers' generate
on tiny random Llamas loaded with from_hf."""
import copy
import json
import warnings

import pytest
import torch

import llmkern
from llmkern.generation import generate
from llmkern.models import from_hf
from test_generation_audit26 import _cut
from test_guided_regex import _tokenizers

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py: tiny models)
V = 61


def _tiny_llama(path, vocab_size):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).eval()
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(tiny random Llama from_hf, its transformers twin, checkpoint dir)."""
    path = tmp_path_factory.mktemp("cfg")
    hf = _tiny_llama(path, V)
    return from_hf(str(path), backend="torch"), hf, path


def _hf_generate(hf, x, n=8, mask=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.generate(x, attention_mask=torch.ones_like(x) if mask is None else mask, max_new_tokens=n,
                           do_sample=False, pad_token_id=0, eos_token_id=0, **kw)


def test_guidance_greedy_equals_transformers(llama):
    """Greedy decoding with guidance_scale gives transformers' tokens: without a negative prompt (the unconditional
    rows are the prompts' last tokens), with one, with a left-padded one (negative_prompt_attention_mask) and a
    left-padded prompt, with a repetition penalty (it acts on the guided scores, after the mix, as transformers'
    processor order has it); use_cache=False decodes the same. guidance_scale=0 decodes from the negative prompt alone
    (the tokens of plain greedy decoding of it), and 1 is off. The old generate had no guidance_scale argument."""
    m, hf, _ = llama
    g = torch.Generator().manual_seed(3)
    x = torch.randint(1, V, (2, 5), generator=g)
    neg = torch.randint(1, V, (2, 3), generator=g)
    neg_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    x_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    plain = generate(m, x, 8, eos_token_id=0, pad_token_id=0)
    cases = [(1.5, {}, None), (2.0, dict(negative_prompt_ids=neg), None),
             (1.7, dict(negative_prompt_ids=neg, repetition_penalty=1.3), None),  # (the penalty acts on the mix)
             (-0.5, dict(negative_prompt_ids=neg, negative_prompt_attention_mask=neg_mask), x_mask)]
    for scale, kw, mask in cases:
        ours = generate(m, x, 8, eos_token_id=0, pad_token_id=0, guidance_scale=scale, attention_mask=mask, **kw)
        assert torch.equal(ours, _hf_generate(hf, x, mask=mask, guidance_scale=scale, **kw)), (scale, kw)
        assert not torch.equal(ours, plain), scale  # (the guidance changed the tokens)
        slow = generate(m, x, 8, eos_token_id=0, pad_token_id=0, guidance_scale=scale, attention_mask=mask,
                        use_cache=False, **kw)
        assert torch.equal(slow, ours), scale
    from_neg = generate(m, x, 8, eos_token_id=0, pad_token_id=0, guidance_scale=0.0, negative_prompt_ids=neg)
    assert torch.equal(from_neg[:, 5:], generate(m, neg, 8, eos_token_id=0, pad_token_id=0)[:, 3:])
    assert torch.equal(generate(m, x, 8, eos_token_id=0, pad_token_id=0, guidance_scale=1.0,
                                negative_prompt_ids=neg), plain)


def test_guidance_sampling_draws_from_the_guided_scores(llama):
    """Seeded sampling with guidance draws what llmkern.sample draws from the guided scores computed by hand
    (conditional and unconditional forwards, their log-softmaxes mixed), temperature applied after the mix; with
    num_return_sequences=2 each prompt's negative prompt serves both of its rows."""
    m, _, _ = llama
    g = torch.Generator().manual_seed(5)
    x = torch.randint(1, V, (2, 4), generator=g)
    neg = torch.randint(1, V, (2, 2), generator=g)
    out = generate(m, x, 6, strategy="sample", temperature=0.7, seed=11, guidance_scale=2.5, negative_prompt_ids=neg,
                   num_return_sequences=2, eos_token_id=None, use_cache=False)
    seqs, uncond = x.repeat_interleave(2, 0), neg.repeat_interleave(2, 0)
    with torch.no_grad():
        for i in range(6):
            cond = torch.log_softmax(m(seqs, last_only=True)[:, -1].float(), -1)
            unc = torch.log_softmax(m(uncond, last_only=True)[:, -1].float(), -1)
            tok = llmkern.sample(2.5 * (cond - unc) + unc, temperature=0.7, seed=torch.arange(11, 15),
                                 position=torch.full((4,), 4 + i))
            seqs, uncond = torch.cat([seqs, tok[:, None]], 1), torch.cat([uncond, tok[:, None]], 1)
    assert torch.equal(out, seqs)
    assert not torch.equal(out, generate(m, x, 6, strategy="sample", temperature=0.7, seed=11, eos_token_id=None,
                                         num_return_sequences=2))


def test_guidance_checkpoint_default_and_errors(llama):
    """generation_config.json's guidance_scale applies (transformers' tokens) and guidance_scale=None / 1 turns it
    off; beam search (num_beams > 1) and draft_model refuse guidance, the checkpoint's with the way out; bad
    negative prompts, a mask without one, a negative prompt without guidance_scale and a non-finite scale raise
    naming the argument."""
    m, hf, path = llama
    x = torch.tensor([[9, 40, 2, 21]])
    plain = generate(m, x, 8, eos_token_id=0, pad_token_id=0)
    with open(path / "generation_config.json") as f:
        cfg = json.load(f)
    with open(path / "generation_config.json", "w") as f:
        json.dump(dict(cfg, guidance_scale=1.5), f)
    try:
        m2 = from_hf(str(path), backend="torch")
        hf2 = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    finally:
        with open(path / "generation_config.json", "w") as f:
            json.dump(cfg, f)
    ours = generate(m2, x, 8, eos_token_id=0, pad_token_id=0)
    assert torch.equal(ours, _hf_generate(hf2, x)) and not torch.equal(ours, plain)
    for off in (None, 1):
        assert torch.equal(generate(m2, x, 8, eos_token_id=0, pad_token_id=0, guidance_scale=off), plain)
    with pytest.raises(ValueError, match="model.generation_config.guidance_scale=1.5: .*beam search.*"
                                         "pass guidance_scale=1"):
        generate(m2, x, 2, strategy="beam", num_beams=2)
    assert torch.equal(generate(m2, x, 8, strategy="beam", num_beams=1, eos_token_id=0, pad_token_id=0), ours)
    for kw in (dict(strategy="beam", num_beams=2), dict(draft_model=m)):
        with pytest.raises(ValueError, match="guidance_scale=2.0: classifier-free guidance is supported"):
            generate(m, x, 2, guidance_scale=2.0, **kw)
    bad = [(dict(negative_prompt_ids=x), "negative_prompt_ids need guidance_scale"),
           (dict(guidance_scale=2, negative_prompt_attention_mask=torch.ones_like(x)),
            "negative_prompt_attention_mask needs negative_prompt_ids"),
           (dict(guidance_scale=2, negative_prompt_ids=x.repeat(2, 1)), "negative_prompt_ids must be an int64"),
           (dict(guidance_scale=2, negative_prompt_ids=x.float()), "negative_prompt_ids must be an int64"),
           (dict(guidance_scale=2, negative_prompt_ids=x + V), r"negative_prompt_ids: token ids must lie in \[0, "),
           (dict(guidance_scale=2, negative_prompt_ids=x, negative_prompt_attention_mask=torch.ones(1, 3)),
            "negative_prompt_attention_mask must be a tensor shaped like negative_prompt_ids"),
           (dict(guidance_scale=2, negative_prompt_ids=x, negative_prompt_attention_mask=torch.tensor([[1, 1, 0, 1]])),
            "negative_prompt_attention_mask: only left padding"),
           (dict(guidance_scale=float("nan")), "guidance_scale must be a finite float"),
           (dict(guidance_scale="2"), "guidance_scale must be a float"),
           (dict(guidance_scale=2, negative_prompt_ids=torch.ones(1, 60, dtype=torch.long)),
            "negative_prompt_ids: 60 \\+ max_new_tokens=8 exceeds the model's block_size=64")]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            generate(m, x, 8, **kw)


@pytest.fixture(scope="module")
def byte_llama(tmp_path_factory):
    """(byte-level tokenizer, tiny random Llama over its vocabulary from_hf, its transformers twin)."""
    tok, path = _tokenizers()[0], tmp_path_factory.mktemp("beam_stop")
    hf = _tiny_llama(path, len(tok))
    return tok, from_hf(str(path), backend="torch"), hf


def _hf_beams(hf, x, **kw):
    return _hf_generate(hf, x, n=10, num_beams=3, **kw)


def test_beam_search_stop_strings_equal_transformers(byte_llama):
    """Beam search (num_beams=3) with stop strings cut from its free beams' text gives transformers' sequences (a
    beam that ends a stop string finishes as with eos), for the best beam and all three returned; the old generate
    refused stop_strings with beam search. num_beams=1 (greedy) scores its rows over the tokens up to the stop."""
    tok, m, hf = byte_llama
    x = torch.randint(3, len(tok), (2, 4), generator=torch.Generator().manual_seed(2))
    beam = dict(strategy="beam", num_beams=3, eos_token_id=0, pad_token_id=0)
    free = generate(m, x, 10, **beam)
    assert torch.equal(free, _hf_beams(hf, x))
    rows = free.tolist()
    words = [_cut(tok, rows[0], 5), _cut(tok, rows[1], 7)]
    ours = generate(m, x, 10, stop_strings=words, tokenizer=tok, **beam)
    assert torch.equal(ours, _hf_beams(hf, x, stop_strings=words, tokenizer=tok)), words
    assert not torch.equal(ours, free[:, :ours.shape[1]]) or ours.shape != free.shape, words
    three = generate(m, x, 10, stop_strings=words, tokenizer=tok, num_return_sequences=3, **beam)
    assert torch.equal(three, _hf_beams(hf, x, stop_strings=words, tokenizer=tok, num_return_sequences=3))
    words = [_cut(tok, generate(m, x, 10, eos_token_id=0, pad_token_id=0)[0].tolist(), 6)]
    one = dict(strategy="beam", num_beams=1, eos_token_id=0, pad_token_id=0, stop_strings=words, tokenizer=tok,
               return_dict=True)
    greedy = generate(m, x, 10, eos_token_id=0, pad_token_id=0, stop_strings=words, tokenizer=tok)
    summed, per_token = generate(m, x, 10, length_penalty=0.0, **one), generate(m, x, 10, length_penalty=1.0, **one)
    assert torch.equal(summed.sequences, greedy)
    lengths = (greedy[:, 4:] != 0).sum(-1).float()  # (the stopped row is padded with 0 after its stop)
    assert lengths.min() < 10, words
    torch.testing.assert_close(summed.scores / per_token.scores, lengths)


def test_stop_string_tables_are_built_once_per_tokenizer(byte_llama, monkeypatch):
    """The stop-string tables (a pass over the whole vocabulary) are built once per tokenizer and stop strings, not
    per generate call; a token added to the tokenizer (its length changes) builds them again."""
    import llmkern.generation as gen

    tok, m, _ = byte_llama
    tok = copy.deepcopy(tok)
    built = []
    real = gen._StopStrings

    def counting(*args):
        built.append(args[0])
        return real(*args)

    monkeypatch.setattr(gen, "_StopStrings", counting)
    x = torch.tensor([[39, 99, 173, 57]])
    first = generate(m, x, 3, stop_strings=["ab"], tokenizer=tok)
    assert torch.equal(generate(m, x, 3, stop_strings=["ab"], tokenizer=tok), first) and len(built) == 1
    generate(m, x, 3, strategy="beam", num_beams=2, stop_strings=["ab"], tokenizer=tok)
    assert len(built) == 1
    generate(m, x, 3, stop_strings=["xy"], tokenizer=tok)
    assert len(built) == 2
    tok.add_tokens(["qqzz"])
    generate(m, x, 3, stop_strings=["ab"], tokenizer=tok)
    assert len(built) == 3
