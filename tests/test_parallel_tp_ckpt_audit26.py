"""Full (unsharded) checkpoints of tensor-parallel models: full_state_dict and load_full_state_dict.

Was: a tensor_parallelize'd model's state_dict held each rank's shards under the unsharded names, and nothing turned
them into the unsharded model's state_dict or back: a model built on the meta device and sharded could not load a
full checkpoint (load_state_dict raised size mismatches), and a sharded model could not write one. tensor_parallelize
(check_weights=True) on a meta model compared no values, and nothing compared them later.

One spawn of 2 gloo ranks: for gpt-tiny (vocabulary-parallel, tied head), llama-tiny (GQA), mixtral-tiny (sharded
experts, vocabulary-parallel) and a GPT-2-style block of transformers Conv1D layers with LoRA (fused qkv): the
gathered state_dict equals the unsharded model's bit for bit; a meta-built model, sharded, to_empty, loaded from it
holds the same shards as the model sharded from real weights and computes the same logits. Then the errors, raised on
every rank without a hang.
"""
import copy

import torch
import torch.nn as nn

from llmkern.testing import call_outcome as _outcome, expect_outcome as _expect, raise_failures


def _same_dicts(tag, got, want, failures):
    """Same keys in the same order, every tensor of the same dtype, shape and bits."""
    if list(got) != list(want):
        failures.append(f"{tag}: keys differ: {sorted(set(got) ^ set(want))} (order: {list(got) == sorted(want)})")
        return
    for k, v in want.items():
        g = got[k]
        if g.dtype != v.dtype or g.shape != v.shape or not torch.equal(g, v):
            failures.append(f"{tag}: {k} differs ({g.dtype} {tuple(g.shape)} vs {v.dtype} {tuple(v.shape)})")


def _logits(model, ids):
    out = model(ids)
    return out[0] if isinstance(out, tuple) else out


def _zoo_roundtrip(rank, name, vocab_parallel, failures):
    from llmkern.models import build, get_config
    from llmkern.parallel.tensor_parallel import full_state_dict, load_full_state_dict, tensor_parallelize

    cfg = get_config(name)
    torch.manual_seed(0)
    ref = build(cfg, backend="torch")
    full = ref.state_dict()
    sharded = tensor_parallelize(copy.deepcopy(ref), vocab_parallel=vocab_parallel)
    gathered = full_state_dict(sharded)  # (rank 0 only)
    if rank == 0:
        _same_dicts(f"{name}: full_state_dict", gathered, full, failures)
        if cfg.tie_embeddings and vocab_parallel and gathered["lm_head.weight"] is not gathered["wte.weight"]:
            failures.append(f"{name}: the tied head's gathered weight is not the embedding's tensor")
    elif gathered:
        failures.append(f"{name}: rank0_only=True returned {len(gathered)} keys on rank {rank}")
    _same_dicts(f"{name}: full_state_dict(rank0_only=False)", full_state_dict(sharded, rank0_only=False), full,
                failures)

    with torch.device("meta"):
        meta = build(cfg, backend="torch")
    tensor_parallelize(meta, vocab_parallel=vocab_parallel)  # (check_weights: nothing to compare, no error)
    meta.to_empty(device="cpu")
    result = load_full_state_dict(meta, full)
    if list(result.missing_keys) or list(result.unexpected_keys):
        failures.append(f"{name}: load_full_state_dict reported {result}")
    _same_dicts(f"{name}: this rank's shards after load_full_state_dict", meta.state_dict(), sharded.state_dict(),
                failures)
    if cfg.tie_embeddings:  # (a checkpoint holding the tied weight once, as safetensors' save_model writes it)
        result = load_full_state_dict(meta, {k: v for k, v in full.items() if k != "lm_head.weight"})
        if list(result.missing_keys) or meta.lm_head.weight is not meta.wte.weight:
            failures.append(f"{name}: the tied head's key missing from the checkpoint: {result}, tied: "
                            f"{meta.lm_head.weight is meta.wte.weight}")
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    got, want = _logits(meta, ids), _logits(sharded, ids)
    if not torch.equal(got, want):
        failures.append(f"{name}: logits differ from the model sharded from real weights by "
                        f"{(got - want).abs().max().item()}")
    torch.testing.assert_close(got, _logits(ref, ids), atol=1e-5, rtol=1e-5)
    return meta, full


class _Attention(nn.Module):
    """GPT-2's attention names: a fused qkv c_attn and c_proj, transformers Conv1D layers (weights [in, out])."""

    def __init__(self, d, n_head):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.n_head, self.head_dim, self.split_size = n_head, d // n_head, d
        self.c_attn, self.c_proj = Conv1D(3 * d, d), Conv1D(d, d)

    def forward(self, x):
        q, k, v = self.c_attn(x).split(self.split_size, dim=2)
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


def _conv1d_lora_roundtrip(failures):
    """Conv1D layout ([in, out] whole, [out/p, in] sharded) and LoRA wrappers' names (base_layer.weight, lora_A)."""
    from llmkern.peft import inject_lora
    from llmkern.parallel.tensor_parallel import full_state_dict, load_full_state_dict, tensor_parallelize

    torch.manual_seed(0)
    ref = nn.Sequential(_Attention(16, 4))
    for prm in ref.parameters():  # (nonzero biases: their cut shows)
        nn.init.normal_(prm)
    inject_lora(ref, ["c_attn", "c_proj"], r=2, init_lora_weights=False)
    full = ref.state_dict()
    if "0.c_attn.base_layer.weight" not in full:
        failures.append(f"conv1d + LoRA: unexpected unsharded keys {list(full)}")
    sharded = tensor_parallelize(copy.deepcopy(ref))
    _same_dicts("conv1d + LoRA: full_state_dict", full_state_dict(sharded, rank0_only=False), full, failures)
    other = copy.deepcopy(sharded)
    for prm in other.parameters():
        prm.data.zero_()
    load_full_state_dict(other, full)
    _same_dicts("conv1d + LoRA: shards after load_full_state_dict", other.state_dict(), sharded.state_dict(),
                failures)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(other(x), ref(x), atol=1e-5, rtol=1e-5)


def _errors(rank, model, full, failures):
    """Every rank raises (no hang); each error names the key or argument."""
    from llmkern.models import build, get_config
    from llmkern.parallel.tensor_parallel import full_state_dict, load_full_state_dict, tensor_parallelize

    def load(sd, **kw):
        return lambda: load_full_state_dict(model, sd, **kw)

    missing = {k: v for k, v in full.items() if k != "layers.0.mlp.up_proj.weight"}
    _expect("missing key", _outcome(load(missing)), "ValueError", ["missing", "layers.0.mlp.up_proj.weight"],
            failures)
    extra = dict(full, **{"layers.0.mlp.bogus": torch.zeros(1)})
    _expect("unexpected key", _outcome(load(extra)), "ValueError", ["unexpected", "layers.0.mlp.bogus"], failures)
    result = load_full_state_dict(model, dict(missing, **{"layers.0.mlp.bogus": torch.zeros(1)}), strict=False)
    if list(result.missing_keys) != ["layers.0.mlp.up_proj.weight"] or list(result.unexpected_keys) != \
            ["layers.0.mlp.bogus"]:
        failures.append(f"strict=False returned {result}")
    # a rank's own shards are not a full checkpoint
    _expect("shards as a full checkpoint", _outcome(load(model.state_dict())), "ValueError",
            ["shapes differ", "q_proj.weight", "(32, 64)", "(64, 64)"], failures)
    # one rank's checkpoint lacks a key: it says which, the other names the rank
    words = ["missing", "up_proj"] if rank == 1 else ["failed on rank(s) [1]"]
    _expect("one rank's checkpoint", _outcome(load(missing if rank == 1 else full)), "ValueError", words, failures)
    # ranks that loaded different files: meta-built models are checked here (tensor_parallelize had no values)
    other = dict(full)
    if rank == 1:
        other["layers.1.self_attn.v_proj.weight"] = full["layers.1.self_attn.v_proj.weight"] + 1
    _expect("different checkpoints", _outcome(load(other)), "ValueError",
            ["different checkpoints", "layers.1.self_attn.v_proj.weight"], failures)
    load_full_state_dict(model, other, check_weights=False)  # (skipped on request: each rank loads its own)
    _expect("not a mapping", _outcome(load([("a", 1)])), "TypeError", ["state_dict must be a mapping"], failures)
    _expect("strict", _outcome(load(full, strict="no")), "TypeError", ["strict"], failures)

    with torch.device("meta"):
        meta = tensor_parallelize(build(get_config("llama-tiny"), backend="torch"))
    _expect("load into meta", _outcome(lambda: load_full_state_dict(meta, full)), "ValueError",
            ["meta device", "to_empty"], failures)
    _expect("gather from meta", _outcome(lambda: full_state_dict(meta)), "ValueError", ["meta device"], failures)
    _expect("rank0_only", _outcome(lambda: full_state_dict(model, rank0_only="yes")), "TypeError", ["rank0_only"],
            failures)


def checkpoint_worker(rank, p):
    failures = []
    _zoo_roundtrip(rank, "gpt-tiny", True, failures)
    _zoo_roundtrip(rank, "mixtral-tiny", True, failures)
    _zoo_roundtrip(rank, "deepseek-v3-tiny", False, failures)  # (MLA, sharded routed and shared experts)
    llama, full = _zoo_roundtrip(rank, "llama-tiny", False, failures)
    _conv1d_lora_roundtrip(failures)
    _errors(rank, llama, full, failures)
    raise_failures(rank, failures)
    return rank


def test_full_state_dict_and_load_full_state_dict(pool2):
    assert pool2.run(checkpoint_worker, (), timeout=90) == [0, 1]


def test_unsharded_model_full_state_dict_is_its_state_dict():
    """Without tensor-parallel layers (no process group needed) both are the plain state_dict's."""
    from llmkern.models import build, get_config
    from llmkern.parallel.tensor_parallel import full_state_dict, load_full_state_dict

    torch.manual_seed(0)
    model = build(get_config("gpt-tiny"), backend="torch")
    full = full_state_dict(model)
    want = model.state_dict()
    assert list(full) == list(want) and all(torch.equal(full[k], want[k]) for k in want)
    torch.manual_seed(1)
    other = build(get_config("gpt-tiny"), backend="torch")
    load_full_state_dict(other, full)
    assert all(torch.equal(v, want[k]) for k, v in other.state_dict().items())
