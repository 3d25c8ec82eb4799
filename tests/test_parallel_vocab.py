"""Vocabulary-parallel embedding, LM head and loss (tensor_parallelize(..., vocab_parallel=True)).

Two gloo ranks on 127.0.0.1; tiny zoo models (GPT: tied head; Llama: untied), a vocabulary that the
world size does not divide; against the unsharded model: logits, the loss with and without logits,
and the gradients of the embedding / LM head shards (the rows of the unsharded gradients) and of a
replicated parameter; greedy generation gives the same tokens.
"""
import copy

import pytest
import torch

from llmkern.parallel.launch import RankPool


def vocab_worker(rank, world_size):
    from llmkern.models import GPT, Llama, get_config
    from llmkern.parallel import tensor_parallelize
    from llmkern.parallel.vocab import VocabParallelEmbedding, VocabParallelLMHead, shard_rows

    out = {}
    for arch, cls in (("gpt-tiny", GPT), ("llama-tiny", Llama)):
        cfg = get_config(arch).replace(vocab_size=101)  # not divisible by 2
        torch.manual_seed(0)
        ref = cls(cfg, backend="torch")
        ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
        labels = ids.clone()
        labels[0, :2] = -100
        logits_ref, loss_ref = ref(ids, labels)
        loss_ref.backward()
        model = tensor_parallelize(copy.deepcopy(ref), vocab_parallel=True)
        emb = next(m for m in model.modules() if isinstance(m, VocabParallelEmbedding))
        head = model.lm_head
        tied = head.weight is emb.weight
        logits, loss_full = model(ids, labels)
        none, loss = model(ids, labels, return_logits=False)
        model.zero_grad()
        loss.backward()
        from llmkern.generation import generate

        with torch.no_grad():
            same_tokens = torch.equal(generate(model, ids[:, :4], 5), generate(ref, ids[:, :4], 5))
        lo, hi, S = shard_rows(101, None)
        ref_emb = ref.wte if arch.startswith("gpt") else ref.embed_tokens
        norm = "ln_f" if arch.startswith("gpt") else "norm"
        out[arch] = dict(
            is_head=isinstance(head, VocabParallelLMHead), tied=tied, ref_tied=ref.lm_head.weight is ref_emb.weight,
            shard=tuple(emb.weight.shape), none=none is None, same_tokens=same_tokens,
            logits=(logits - logits_ref).abs().max().item(),
            loss_full=abs(loss_full.item() - loss_ref.item()), loss=abs(loss.item() - loss_ref.item()),
            emb_grad=(emb.weight.grad[:hi - lo] - ref_emb.weight.grad[lo:hi]).abs().max().item(),
            pad_grad=emb.weight.grad[hi - lo:].abs().max().item() if hi - lo < S else 0.0,
            head_grad=0.0 if tied else (head.weight.grad[:hi - lo] - ref.lm_head.weight.grad[lo:hi]).abs().max().item(),
            norm_grad=(getattr(model, norm).weight.grad - getattr(ref, norm).weight.grad).abs().max().item())
    return out


@pytest.fixture(scope="module")
def pool():
    p = RankPool(2, pg_timeout=30.0)
    yield p
    p.close()


def test_vocab_parallel_zoo_models_equal_the_unsharded_ones(pool):
    results = pool.run(vocab_worker, timeout=120)
    for rank, res in enumerate(results):
        for arch, r in res.items():
            assert r["is_head"] and r["none"] and r["same_tokens"], r
            assert r["tied"] == r["ref_tied"] == arch.startswith("gpt"), r  # a tied head shares the shard
            assert r["shard"][0] == 51, r  # ceil(101 / 2) rows; rank 1 holds 50 real + 1 padding
            for key in ("logits", "loss_full", "loss", "emb_grad", "head_grad", "norm_grad"):
                assert r[key] < 1e-5, (rank, arch, key, r)
            assert r["pad_grad"] == 0.0, r


def test_vocab_parallel_needs_a_process_group():
    from llmkern.models import GPT, get_config
    from llmkern.parallel import tensor_parallelize

    model = GPT(get_config("gpt-tiny"))
    with pytest.raises(RuntimeError, match="no process group"):
        tensor_parallelize(model, vocab_parallel=True)
