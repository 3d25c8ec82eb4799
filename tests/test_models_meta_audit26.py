"""Zoo models built on the meta device: to_empty / load_state_dict(assign=True) give the normally built model
(RoPE buffers computed again, float32; a tied head still tied), init_weights draws the constructor's init again,
a pipeline stage runs where to_empty put it, and from_hf builds no random float32 model before loading."""
import json
import math
import os

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from llmkern.models import GPT, Llama, build, from_hf, get_config

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
# Gemma-like: embed_scale and the local RoPE frequencies too, tied, a padding row; llama3-scaled global RoPE
LLAMA_FULL = dict(scale_embeddings=True, rope_local_theta=500.0, sliding_window=8, tie_embeddings=True,
                  pad_token_id=3, rope_scaling=LLAMA3)
CASES = {"gpt": ("gpt-tiny", {}), "llama": ("llama-tiny", LLAMA_FULL), "deepseek": ("deepseek-v3-tiny", {})}


def _cfg(case):
    name, overrides = CASES[case]
    return get_config(name, **overrides)


def _on_meta(cfg):
    with torch.device("meta"):
        return build(cfg, backend="torch")


def _ids(cfg, seed=1):
    return torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(seed))


def _same_model(model, ref, ids):
    """Same buffers (dtype and value), tie, and logits (bitwise) as the normally built ref."""
    bufs, ref_bufs = dict(model.named_buffers()), dict(ref.named_buffers())
    assert bufs.keys() == ref_bufs.keys()
    for name, b in bufs.items():
        assert b.device.type == "cpu" and b.dtype == ref_bufs[name].dtype, name
        assert torch.equal(b, ref_bufs[name]), name
    if ref.config.tie_embeddings:
        emb = model.wte if isinstance(model, GPT) else model.embed_tokens
        assert model.lm_head.weight is emb.weight
    assert torch.equal(model.eval()(ids), ref.eval()(ids))


@pytest.mark.parametrize("case", sorted(CASES))
def test_meta_built_model_loads_as_the_normal_one(case):
    cfg = _cfg(case)
    torch.manual_seed(0)
    ref = build(cfg, backend="torch")
    sd, ids = ref.state_dict(), _ids(cfg)
    if case == "llama":
        assert {"inv_freq", "inv_freq_local", "embed_scale"} <= dict(ref.named_buffers()).keys()

    model = _on_meta(cfg).to_empty(device="cpu")  # to_empty, then load (copying)
    model.load_state_dict(sd)
    _same_model(model, ref, ids)

    model = _on_meta(cfg)  # straight from meta: the checkpoint tensors become the parameters
    model.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
    _same_model(model, ref, ids)

    parent = nn.ModuleDict({"lm": _on_meta(cfg)}).to_empty(device="cpu")  # a parent's to_empty (the child's _apply)
    parent["lm"].load_state_dict(sd)
    _same_model(parent["lm"], ref, ids)


def test_meta_model_cast_to_bfloat16_keeps_float32_rope():
    cfg = _cfg("llama")
    torch.manual_seed(0)
    ref = build(cfg, backend="torch").to(torch.bfloat16)
    model = _on_meta(cfg).to(torch.bfloat16).to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    assert model.inv_freq.dtype == model.inv_freq_local.dtype == torch.float32
    assert model.embed_scale.dtype == torch.bfloat16  # (cast with the model, as built normally)
    _same_model(model, ref, _ids(cfg))


@pytest.mark.parametrize("case", sorted(CASES))
def test_init_weights_redraws_the_constructor_init(case):
    cfg = _cfg(case)
    real = build(cfg, backend="torch")
    meta = _on_meta(cfg).to_empty(device="cpu")
    with torch.no_grad():
        for t in list(meta.parameters()) + list(meta.buffers()):  # (to_empty's memory is arbitrary: make it NaN)
            if t.is_floating_point():
                t.fill_(float("nan"))
    torch.manual_seed(5)
    real.init_weights()
    torch.manual_seed(5)
    assert meta.init_weights() is meta
    real_state = dict(real.state_dict(), **dict(real.named_buffers()))
    meta_state = dict(meta.state_dict(), **dict(meta.named_buffers()))
    for name, t in meta_state.items():
        assert torch.equal(t, real_state[name]), name  # (no NaN left: every parameter and buffer drawn or set)
    assert meta.config.tie_embeddings is False or meta.lm_head.weight is (
        meta.wte.weight if case == "gpt" else meta.embed_tokens.weight)
    # the constructor's distributions: normal(0, 0.02) (GPT-2's residual projections 0.02 / sqrt(2 n_layer)),
    # norm gains 1, biases 0, the padding row 0
    emb = meta.wte.weight if case == "gpt" else meta.embed_tokens.weight
    assert abs(emb.std().item() - 0.02) < 0.002
    if case == "gpt":
        w = meta.h[0].attn.o_proj.weight
        assert abs(w.std().item() - 0.02 / math.sqrt(2 * cfg.n_layer)) < 0.003
        assert torch.equal(meta.h[0].ln_1.weight, torch.ones(cfg.n_embd))
        assert not meta.h[0].attn.q_proj.bias.any()
    else:
        assert torch.equal(meta.norm.weight, torch.ones(cfg.n_embd))
    if case == "llama":
        assert not emb[cfg.pad_token_id].any()
    if case == "deepseek":
        gates = [m for m in meta.modules() if type(m).__name__ == "TopkRouter"]
        assert gates and all(g.weight.dtype == torch.float32 and not g.e_score_correction_bias.any() for g in gates)
        assert abs(meta.layers[1].mlp.experts.gate_up_proj.std().item() - 0.02) < 0.002


def test_init_weights_seed_is_per_parameter_and_checked():
    cfg = _cfg("gpt")
    a, b = build(cfg, backend="torch"), _on_meta(cfg).to_empty(device="cpu")
    torch.manual_seed(1)
    a.init_weights(seed=7)
    torch.manual_seed(2)  # (the default generator plays no part)
    b.init_weights(seed=7)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert b.lm_head.weight is b.wte.weight
    w = b.h[1].mlp.up_proj.weight.clone()
    assert not torch.equal(b.init_weights(seed=8).h[1].mlp.up_proj.weight, w)
    for bad in (-1, True, 1.5, "7"):
        with pytest.raises(ValueError, match="init_weights: seed"):
            b.init_weights(seed=bad)


def test_pipeline_stage_of_a_meta_model_runs_where_to_empty_put_it(world1):
    from llmkern.parallel.pipeline import pipeline_parallelize

    cfg = _cfg("llama")
    torch.manual_seed(0)
    ref = build(cfg, backend="torch").eval()
    model = _on_meta(cfg)
    pipe = pipeline_parallelize(model, world1, n_microbatches=2, schedule="gpipe")
    model.to_empty(device="cpu")
    assert pipe.device == torch.device("cpu")
    pipe.load_state_dict(ref.state_dict())
    pipe.eval()
    ids = _ids(cfg)
    assert torch.equal(pipe.forward(ids), ref(ids))
    with pytest.raises(ValueError, match="pipeline stage needs seed"):
        model.init_weights()
    ref.init_weights(seed=3)
    model.init_weights(seed=3)
    for name, p in model.state_dict().items():
        assert torch.equal(p, ref.state_dict()[name]), name


# ---- from_hf: the checkpoint tensors become the parameters -------------------------------------------------------

def _llama_checkpoint(path, dtype):
    """A tied Llama checkpoint (HF names) of llama-tiny's shapes, stored in `dtype`; returns the source model."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = get_config("llama-tiny", tie_embeddings=True)
    src = Llama(cfg, backend="torch")
    sd = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v.to(dtype).contiguous()
          for k, v in src.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, os.path.join(path, "model.safetensors"))
    hf = {"model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "num_hidden_layers":
          cfg.n_layer, "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.n_head,
          "num_key_value_heads": cfg.n_kv_head, "max_position_embeddings": cfg.block_size, "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": True}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    return cfg


class _Float32Allocations(TorchDispatchMode):
    """Records the float32 tensors of at least `least` elements that ops create off the meta device."""

    def __init__(self, least):
        super().__init__()
        self.least, self.seen = least, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if torch.is_tensor(t) and t.dtype == torch.float32 and not t.is_meta and t.numel() >= self.least:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def test_from_hf_builds_no_random_float32_model(tmp_path, monkeypatch):
    cfg = _llama_checkpoint(str(tmp_path), torch.bfloat16)
    drawn = []
    real_normal = nn.init.normal_

    def normal_(tensor, *args, **kwargs):
        drawn.append(tensor.device.type)
        return real_normal(tensor, *args, **kwargs)

    monkeypatch.setattr(nn.init, "normal_", normal_)
    with _Float32Allocations(least=cfg.n_embd) as mode:
        model = from_hf(str(tmp_path), backend="torch", dtype=torch.bfloat16)
    assert set(drawn) <= {"meta"}, drawn  # (the constructor ran on the meta device: no random numbers drawn)
    assert mode.seen == []  # (no float32 weight materialised on the way to bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.inv_freq.dtype == torch.float32 and model.lm_head.weight is model.embed_tokens.weight
    # the values the float32 load cast to bfloat16 gives (what from_hf computed before)
    ref = from_hf(str(tmp_path), backend="torch").to(torch.bfloat16)
    assert {p.dtype for p in from_hf(str(tmp_path), backend="torch").parameters()} == {torch.float32}
    assert torch.equal(model.inv_freq, ref.inv_freq)
    ids = _ids(cfg)
    assert torch.equal(model(ids), ref(ids))
    # the parameters own their memory: safetensors maps the file, which a later save may rewrite in place
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with open(os.path.join(str(tmp_path), "model.safetensors"), "r+b") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
        f.seek(header)
        f.write(bytes(os.path.getsize(f.name) - header))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
