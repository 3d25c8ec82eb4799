"""Audit: pipeline parallelism for the zoo's NeoX (GPT-NeoX / Pythia, Phi), and full checkpoints into stages.

- pipeline_parallelize refused llmkern.models.NeoX with a TypeError ("needs a ... GPT or Llama"): its blocks, its
  final_layernorm and Phi's biased LM head had no stage. Now split as Llama is (embed_tokens on the first stage,
  final_layernorm + lm_head + loss on the last; a tied Phi embedding's two copies get the summed gradient).
- llmkern.parallel.load_full_state_dict(stage_model, the unsharded state_dict) raised ValueError for the other
  stages' keys ("unexpected keys"), and a tied head stored once (under embed_tokens.weight only, as neox_state and
  safetensors save it) was missing on the last stage: now each stage loads its own keys and skips the others', as
  PipelineParallel.load_state_dict does.

One pool of 2 gloo ranks (one spawn); float32, torch backend, against the unsharded model, 1e-5. (TP x PP with
NeoX, the vocabulary-parallel head and LoRA wrappers' checkpoint names needs 4 ranks: proposed for
tests/test_parallel_pipeline.py's 4-rank pool.)
"""
import copy

import torch

from llmkern.testing import call_outcome, collect_close, expect_outcome, raise_failures

TOL = dict(atol=1e-5, rtol=1e-5)
TINY = dict(n_layer=3, n_embd=32, n_head=4, vocab_size=64, block_size=16, intermediate_size=48)
# Pythia: parallel residual, two norms per block, partial RoPE, untied head without bias
PYTHIA = dict(TINY, rotary_dim=4)
# Phi: one shared norm, q/k LayerNorms, GQA, a tied head with a bias, a padding row, tanh GELU
PHI = dict(TINY, family="phi", shared_norm=True, qk_layernorm=True, lm_head_bias=True, n_kv_head=2, rotary_dim=4,
           tie_embeddings=True, pad_token_id=3, activation="gelu_tanh")
EMBEDDING = {"gpt-tiny": "wte", "neox-tiny": "embed_tokens"}  # (the input embedding a tied head shares)


def _batch(vocab, seed):
    ids = torch.randint(0, vocab, (4, 8), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[1, 2:] = -100  # (micro-batches with different numbers of valid tokens)
    return ids, labels


def _reference(name, options, seed=0):
    """A tiny zoo model whose biases and norm gains are not their init's zeros / ones (so each one matters)."""
    from llmkern.models import build, get_config

    torch.manual_seed(seed)
    ref = build(get_config(name, **options), backend="torch")
    with torch.no_grad():
        for prm in ref.parameters():
            prm.add_(torch.randn_like(prm) * 0.05)
    return ref


def _compare(tag, pipe, ref, failures):
    """This stage's parameters and gradients against the unsharded model's of the same name."""
    want = dict(ref.named_parameters(remove_duplicate=False))  # (lm_head.weight: the tied embedding's)
    for name, prm in pipe.named_parameters():
        collect_close(f"{tag}: {name}", prm, want[name], failures, **TOL)
        if prm.grad is None:
            failures.append(f"{tag}: {name} has no gradient")
        else:
            collect_close(f"{tag}: grad of {name}", prm.grad, want[name].grad, failures, **TOL)


def _train_and_eval(tag, options, failures):
    """One 1F1B step (loss, every stage's gradients) and the evaluation logits against the unsharded model."""
    from llmkern.parallel.pipeline import pipeline_parallelize

    ref = _reference("neox-tiny", options)
    pipe = pipeline_parallelize(copy.deepcopy(ref), n_microbatches=2, schedule="1f1b")
    ids, labels = _batch(ref.config.vocab_size, 1)
    loss = pipe.step(ids, labels)
    _, ref_loss = ref(ids, labels, return_logits=False)
    ref_loss.backward()
    if pipe.is_last:
        collect_close(f"{tag}: loss", loss, ref_loss, failures, **TOL)
    _compare(tag, pipe, ref, failures)
    with torch.no_grad():
        logits = pipe.forward(ids)
    if pipe.is_last:
        collect_close(f"{tag}: evaluation logits", logits, ref(ids), failures, **TOL)


def neox_worker(rank, p):
    failures = []
    for tag, options in (("pythia", PYTHIA), ("phi", PHI)):
        _train_and_eval(tag, options, failures)
    raise_failures(rank, failures)
    return rank


def test_neox_pipeline_equals_unsharded(pool2):
    assert pool2.run(neox_worker, timeout=60) == [0, 1]


def _loads_whole(tag, pipe, full, ref, failures):
    """load_full_state_dict(stage, full) reports nothing and leaves the stage equal to ref's part."""
    from llmkern.parallel import load_full_state_dict

    try:
        result = load_full_state_dict(pipe.model, full)
    except ValueError as exc:
        failures.append(f"{tag}: load_full_state_dict of the whole state_dict raised {exc}")
        return
    if list(result.missing_keys) or list(result.unexpected_keys):
        failures.append(f"{tag}: load_full_state_dict of the whole state_dict reported {result}")
    want = ref.state_dict()
    for key, value in pipe.state_dict().items():
        collect_close(f"{tag}: loaded {key}", value, want[key], failures, atol=0, rtol=0)


def _full_load(tag, name, options, last_key, failures):
    """The unsharded model's state_dict (a tied head stored once, under the embedding's key) into each stage of a
    model built from another seed; a key of no stage and a missing key of this stage still raise."""
    from llmkern.parallel import load_full_state_dict
    from llmkern.parallel.pipeline import pipeline_parallelize

    ref = _reference(name, options)
    tied = ref.lm_head.weight is ref.get_submodule(EMBEDDING[name]).weight
    full = {k: v.clone() for k, v in ref.state_dict().items() if not (tied and k == "lm_head.weight")}
    pipe = pipeline_parallelize(_reference(name, options, seed=7), n_microbatches=2, schedule="gpipe")
    _loads_whole(tag, pipe, full, ref, failures)
    typo = dict(full, **{"lm_head.wieght": torch.zeros(1)})
    expect_outcome(f"{tag}: a key of no stage", call_outcome(lambda: load_full_state_dict(pipe.model, typo)),
                   "ValueError", ["unexpected keys", "lm_head.wieght"], failures)
    result = load_full_state_dict(pipe.model, typo, strict=False)
    if list(result.unexpected_keys) != ["lm_head.wieght"] or list(result.missing_keys):
        failures.append(f"{tag}: strict=False reported {result}")
    lacking = {k: v for k, v in full.items() if k != last_key}
    got = call_outcome(lambda: load_full_state_dict(pipe.model, lacking))
    if pipe.is_last:
        expect_outcome(f"{tag}: a key of this stage missing", got, "ValueError", ["missing keys", last_key],
                       failures)
    elif got is not None:
        failures.append(f"{tag}: another stage's key missing raised {got} on the first stage")


def full_load_worker(rank, p):
    failures = []
    _full_load("gpt (tied)", "gpt-tiny", {}, "ln_f.bias", failures)
    _full_load("phi (tied, head bias)", "neox-tiny", PHI, "final_layernorm.bias", failures)
    raise_failures(rank, failures)
    return rank


def test_load_full_state_dict_into_pipeline_stages(pool2):
    assert pool2.run(full_load_worker, timeout=60) == [0, 1]
