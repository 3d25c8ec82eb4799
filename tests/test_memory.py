"""llmkern.memory: the seed deck's 350 GB, ZeRO's worked figures, Korthikanti et al.'s Table 2 and what follows from
it, and the estimate against what autograd really saves in the zoo's models (byte for byte on the torch backend)."""
import math

import pytest
import torch

from llmkern.flops import param_counts
from llmkern.memory import (TrainingMemory, layer_activation_bytes, layer_activation_terms, max_batch_size,
                            model_state_bytes, saved_activation_bytes, saved_activations, stage_params,
                            training_memory)
from llmkern.models import build, get_config

pytestmark = pytest.mark.usefixtures("one_thread")

PAPER = dict(dtype="bf16", mask_bytes=1, dropout=True, flash_attention=False, row_stats=False)  # Megatron's accounting


# -- model states -------------------------------------------------------------------------------------------------
def test_deck_175b_is_350_gb_in_fp16():
    n = param_counts("gpt3-175b")["total"]
    params, grads, states = model_state_bytes(n, dtype="fp16", optimizer=None)
    assert round(params / 1e9, 1) == 349.2 and grads == params and states == 0
    mem = training_memory("gpt3-175b", 1, dtype="fp16", optimizer=None)
    assert mem.parameters == 2 * n  # one stage, no sharding: every parameter once
    # ZeRO's mixed-precision Adam, 16 bytes per parameter: 8 x the deck's 350 GB, not "~3 x"
    p, g, s = model_state_bytes(n, dtype="fp16")
    assert (p + g + s) == 16 * n and round((p + g + s) / 1e12, 2) == 2.79
    # the deck's ~3 x: 16-bit parameters, gradients and one 16-bit state (SGD momentum, no master copy)
    p, g, s = model_state_bytes(n, dtype="fp16", optimizer="sgd", master_weights=False, state_dtype="fp16")
    assert p + g + s == 3 * params
    # its "momentum, variance" in 16-bit without a master copy: 4 x
    assert sum(model_state_bytes(n, dtype="fp16", master_weights=False, state_dtype="fp16")) == 4 * params


def test_zero_paper_figure_1():
    """ZeRO Figure 1: Ψ = 7.5B, Nd = 64, K = 12: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB per device."""
    want = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}
    for stage, gb in want.items():
        got = sum(model_state_bytes(7.5e9, dtype="fp16", optimizer="adam", zero_stage=stage, dp=64)) / 1e9
        assert round(got, 1) == gb, (stage, got)
    assert model_state_bytes(7.5e9, zero_stage=1, dp=64)[2] == 12 * 7.5e9 / 64  # K Ψ / Nd


def test_precisions_and_optimizers():
    n = 1000
    assert model_state_bytes(n, dtype="fp32") == (4 * n, 4 * n, 8 * n)  # fp32 Adam: no master copy
    assert model_state_bytes(n, dtype="fp32", master_weights=True) == (4 * n, 4 * n, 8 * n)
    assert model_state_bytes(n, dtype="bf16", optimizer="sgd") == (2 * n, 2 * n, 8 * n)  # master + momentum
    assert model_state_bytes(n, dtype="bf16", optimizer=None) == (2 * n, 2 * n, 0)
    assert model_state_bytes(n, dtype=torch.bfloat16, grad_dtype="fp32") == (2 * n, 4 * n, 12 * n)
    assert model_state_bytes(n, zero_stage=3, dp=3) == (2 * 334, 2 * 334, 12 * 334)  # ceil(1000 / 3) each


def test_tensor_and_pipeline_split():
    c = get_config("gpt3-175b")
    p = param_counts(c)
    assert stage_params(c) == p["total"]
    # pp stages add up to the model, plus the tied word embedding's copy on the last stage
    assert sum(stage_params(c, pp=8, stage=i) for i in range(8)) == p["total"] + p["token_embedding"]
    # tp: everything but the replicated norms, row-parallel biases and position embedding is divided
    d, L = c.n_embd, c.n_layer
    replicated = p["norm"] + 2 * L * d + p["position_embedding"]  # norms, o_proj / down_proj biases, wpe
    V = c.vocab_size  # the vocabulary-parallel embedding: ceil(V / tp) rows per GPU
    want = (p["total"] - replicated - V * d) / 8 + replicated + math.ceil(V / 8) * d
    assert stage_params(c, tp=8) == pytest.approx(want, rel=1e-12)
    llama = get_config("llama-7b")  # untied: the head on the last stage, the embedding on the first
    first, last = stage_params(llama, pp=4, stage=0), stage_params(llama, pp=4, stage=3)
    assert last - first == llama.n_embd  # V·d on each end; the final norm's d gains on the last
    Vd, d7 = llama.vocab_size * llama.n_embd, llama.n_embd
    assert first == (param_counts(llama)["total"] - 2 * Vd - d7) / 4 + Vd  # 8 of 32 layers + the embedding
    mem = training_memory("gpt3-175b", 1, tp=8, pp=8, dp=8, zero_stage=1)
    assert mem.parameters == 2 * math.ceil(stage_params(c, tp=8, pp=8, stage=mem.stage))


# -- Korthikanti et al. --------------------------------------------------------------------------------------------
CASES = [(2048, 1, 12288, 96, 8), (2048, 4, 6144, 64, 8), (1024, 2, 2048, 16, 4), (512, 3, 1024, 16, 2)]


@pytest.mark.parametrize("s,b,h,a,t", CASES)
def test_table_2(s, b, h, a, t):
    sbh = s * b * h
    assert layer_activation_bytes(s, b, h, a) == pytest.approx(sbh * (34 + 5 * a * s / h))
    assert layer_activation_bytes(s, b, h, a, t=t) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    assert layer_activation_bytes(s, b, h, a, t=t, sequence_parallel=True) == pytest.approx(
        sbh * (34 / t + 5 * a * s / (h * t)))
    assert layer_activation_bytes(s, b, h, a, t=t, recompute="selective") == pytest.approx(sbh * (10 + 24 / t))
    assert layer_activation_bytes(s, b, h, a, t=t, sequence_parallel=True, recompute="selective") == \
        pytest.approx(sbh * 34 / t)
    assert layer_activation_bytes(s, b, h, a, t=t, recompute="full") == 2 * sbh


@pytest.mark.parametrize("s,b,h,a,t", CASES)
@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_term_breakdown_sums_to_table_2(s, b, h, a, t, sp, recompute):
    """The per-term accounting for a GPT config, in Megatron's conventions, is Table 2 exactly."""
    c = get_config("gpt-tiny", n_embd=h, n_head=a, block_size=s)
    terms = layer_activation_terms(c, s, b, tp=t, sequence_parallel=sp, recompute=recompute, **PAPER)
    want = layer_activation_bytes(s, b, h, a, t=t, sequence_parallel=sp, recompute=recompute)
    if recompute == "full" and sp:
        assert want == 2 * s * b * h / t
    assert sum(terms.values()) == pytest.approx(want, rel=1e-12)


def test_flash_attention_and_no_dropout():
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    c = get_config("gpt3-175b")
    kw = dict(PAPER, flash_attention=True)
    flash = sum(layer_activation_terms(c, s, b, tp=t, **kw).values())
    assert flash == pytest.approx(s * b * h * (10 + 24 / t) + 4 * a * s * b / t)  # scores gone, fp32 LSE kept
    nodrop = sum(layer_activation_terms(c, s, b, **dict(kw, dropout=False)).values())
    assert nodrop == pytest.approx(s * b * h * 32 + 4 * a * s * b)  # the two hidden-size masks gone


def test_llama_constant():
    """The docstring's derivation for llama-7b (fused kernels, flash, bf16): s·b·h·(8 + 8 + 6f/h) = 32.125 sbh."""
    c = get_config("llama-7b")
    s, b, h = 2048, 1, c.n_embd
    terms = layer_activation_terms(c, s, b, row_stats=False)
    lse = terms.pop("attention_lse")
    assert lse == 4 * c.n_head * s * b
    assert sum(terms.values()) / (s * b * h) == pytest.approx(8 + 8 + 6 * 11008 / 4096) == 32.125
    torch_impl = layer_activation_terms(c, s, b, row_stats=False, impl="torch")
    torch_impl.pop("attention_lse")
    assert sum(torch_impl.values()) / (s * b * h) == pytest.approx(32.125 + 2 * 4 + 2 * 11008 / 4096)  # 45.5
    gqa = get_config("llama3-8b")  # 8 of 32 KV heads: K and V a quarter as wide
    t3 = layer_activation_terms(gqa, s, b, row_stats=False)
    assert t3["k"] == t3["v"] == t3["q"] / 4


# Korthikanti et al. Table 3's configurations as we reconstruct them (heads, hidden, layers, t, p; s = 2048,
# micro-batch 1). The paper reports its memory totals only graphically (Figures 1 and 7, % of 80 GB); we could
# not check a total number here, so these tests assert what its formulas and its text's ratios imply.
PAPER_MODELS = {"22B": (64, 6144, 48, 8, 1), "175B": (96, 12288, 96, 8, 8), "530B": (128, 20480, 105, 8, 35),
                "1T": (160, 25600, 128, 8, 64)}


def test_paper_ratios():
    s = 2048
    # §4.2 (selective recomputation): 5as/h = 80 for GPT-3, 64 for MT-NLG: ~70% and ~65% of a layer's activations
    for name, share in (("175B", 0.70), ("530B", 0.65)):
        a, h, *_ = PAPER_MODELS[name]
        full = layer_activation_bytes(s, 1, h, a)
        assert 1 - layer_activation_bytes(s, 1, h, a, recompute="selective") / full == pytest.approx(share, abs=0.005)
    # abstract: sequence parallelism + selective recomputation cut activation memory ~5x against tensor parallelism
    for name, (a, h, L, t, p) in PAPER_MODELS.items():
        ratio = layer_activation_bytes(s, 1, h, a, t=t) / layer_activation_bytes(
            s, 1, h, a, t=t, sequence_parallel=True, recompute="selective")
        assert 4.9 < ratio < 6.3, (name, ratio)


def test_pipeline_first_stage_and_extra_terms():
    """§4.2: 1F1B's first stage holds L layers of one micro-batch whatever p is; §4.3: the extra terms
    sbhL/t·(p/L + δ(p=1)·4/L·(1 + v/h)) (embedding dropout masks; final norm, head input and fp32 logits)."""
    s, b = 2048, 1
    a, h, L, t, p = PAPER_MODELS["175B"]
    c = get_config("gpt3-175b")
    v = c.vocab_size
    small = ("input_ids", "position_ids", "labels")

    def acts(pp, stage):
        m = training_memory(c, b, s, tp=t, pp=pp, sequence_parallel=True, recompute="selective", loss="torch",
                            stage=stage, **PAPER)
        return sum(x for k, x in m.terms().items() if k not in small)

    layers = L * layer_activation_bytes(s, b, h, a, t=t, sequence_parallel=True, recompute="selective")
    sbh = s * b * h
    assert acts(p, 0) == pytest.approx(layers + sbh * L / t * (p / L))
    assert acts(1, 0) == pytest.approx(layers + sbh * L / t * (1 / L + 4 / L * (1 + v / h)))
    assert acts(p, p - 1) == pytest.approx(layers / p + 4 * sbh / t * (1 + v / h))  # one micro-batch in flight
    assert training_memory(c, b, s, tp=t, pp=p, sequence_parallel=True, recompute="selective").stage == 0
    # fewer micro-batches than stages: only those are in flight
    few = training_memory(c, b, s, tp=t, pp=p, num_microbatches=2, stage=0, sequence_parallel=True, **PAPER)
    many = training_memory(c, b, s, tp=t, pp=p, stage=0, sequence_parallel=True, **PAPER)
    assert few.activations < many.activations / 3


# -- measured: what autograd saves in the zoo's models ----------------------------------------------------------------
def _measure(cfg, B, T, dtype=torch.float32, recompute=False):
    torch.manual_seed(0)
    model = build(cfg, backend="torch").train().to(dtype)
    if recompute:
        model.gradient_checkpointing_enable()
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    return saved_activation_bytes(model, ids, ids)


# (name, dropout, dtype, recompute, flash). Conventions of the torch backend on CPU: PyTorch's CPU dropout keeps a
# mask of the activation dtype (mask_bytes = 4 in fp32, 2 in bf16; CUDA's is a 1-byte bool); SDPA takes its fused
# (flash) CPU kernel without attention dropout and its math path, which keeps the scores, with it; the zoo's torch
# RMSNorm is impl="torch". Measured (B=2, T=32): gpt-tiny 904,964 / 628,484 / 149,252 bytes, llama-tiny
# 778,500 / 1,005,828 / 152,836 (fp32) and 465,156 (bf16): the estimate is equal to the byte. Agreement is
# asserted exactly: the estimate counts the very tensors autograd keeps; any difference means the zoo or PyTorch
# changed what it saves, and the formulas should be revisited.
MEASURED = [("gpt-tiny", 0.1, "fp32", "none", False), ("gpt-tiny", 0.0, "fp32", "none", True),
            ("gpt-tiny", 0.1, "fp32", "full", False), ("llama-tiny", 0.0, "fp32", "none", True),
            ("llama-tiny", 0.1, "fp32", "none", False), ("llama-tiny", 0.0, "fp32", "full", True),
            ("llama-tiny", 0.0, "bf16", "none", True)]


@pytest.mark.parametrize("name,dropout,dtype,recompute,flash", MEASURED)
def test_estimate_equals_measurement(name, dropout, dtype, recompute, flash):
    cfg = get_config(name, dropout=dropout)
    td = torch.float32 if dtype == "fp32" else torch.bfloat16
    got = _measure(cfg, 2, 32, td, recompute == "full")
    est = training_memory(cfg, 2, 32, dtype=dtype, impl="torch", mask_bytes=td.itemsize, flash_attention=flash,
                          recompute=recompute, loss="torch")
    assert got == est.activations, (got, est.activations, est.terms())


def test_gpt_bf16_on_cpu_layer_norm_statistics():
    """The one difference we see: on CPU, F.layer_norm keeps a bf16 input's mean / rstd in bf16 (CUDA: fp32). 5
    LayerNorms x 64 tokens x 2 statistics x 2 bytes = 1,280 bytes under the estimate's fp32 statistics."""
    cfg = get_config("gpt-tiny")
    got = _measure(cfg, 2, 32, torch.bfloat16)
    est = training_memory(cfg, 2, 32, dtype="bf16", flash_attention=True).activations
    assert est - got == 5 * 64 * 2 * 2


def test_measured_scaling_with_batch_and_sequence():
    """The s² term: gpt-tiny with attention dropout (math path, scores kept) measured at two sequence lengths."""
    cfg = get_config("gpt-tiny", dropout=0.1, n_layer=1)
    for B, T in ((1, 64), (3, 16)):
        est = training_memory(cfg, B, T, dtype="fp32", mask_bytes=4, flash_attention=False).activations
        assert _measure(cfg, B, T) == est


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_fused_loss_terms_equal_what_linear_cross_entropy_saves(dtype):
    """loss="fused": the input gradient (2·s·b·h in 16 bits) and the head's weight gradient that
    linear_cross_entropy keeps until the backward: 2·V·h in bf16 (the weight's dtype), 4·V·h in fp16 (fp32: its
    range) and fp32; measured, plus the int64 labels (the 4 bytes of the loss scalar are the model's)."""
    import llmkern

    cfg = get_config("llama-tiny")
    B, T, V, h = 2, 32, cfg.vocab_size, cfg.n_embd
    td = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    hidden = torch.randn(B, T, h).to(td).requires_grad_()
    weight = (torch.randn(V, h) * 0.02).to(td).requires_grad_()
    labels = torch.randint(0, V, (B, T))
    got = saved_activation_bytes(llmkern.linear_cross_entropy, hidden, weight, labels)
    terms = training_memory(cfg, B, T, dtype=dtype, loss="fused").terms()
    assert terms["loss_weight_grad"] == (2 if dtype == "bf16" else 4) * V * h
    assert got == terms["loss_input_grad"] + terms["loss_weight_grad"] + 8 * B * T, (got, terms)
    # a head sharded over tp ranks runs the vocabulary-parallel loss (llmkern.parallel.vocab), which keeps its shard's
    # dW as linear_cross_entropy does (bf16 for bf16, else fp32) and the whole dh, sequence parallel or not (measured
    # on 2 ranks: tests/test_parallel_vocab.py::test_vocab_parallel_loss_keeps_a_bfloat16_weight_gradient_in_bfloat16)
    for sp in (False, True):
        sharded = training_memory(cfg, B, T, dtype=dtype, loss="fused", tp=2, sequence_parallel=sp).terms()
        assert sharded["loss_weight_grad"] == (2 if dtype == "bf16" else 4) * math.ceil(V / 2) * h
        assert sharded["loss_input_grad"] == terms["loss_input_grad"]


def test_saved_activation_bytes_counts_storages_once_and_skips_parameters():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)
    assert saved_activation_bytes(lin, x) == 4 * 8 * 4  # the input only, not the weight
    w = torch.randn(8, 8, requires_grad=True)  # a trainable leaf: a parameter, not an activation
    y = torch.randn(4, 8)

    def f(y, w):
        z = y @ w  # saves y (w needs the gradient: y is saved; w is excluded)
        return (z * z).sum() + (y @ w.t()).sum()  # z saved by the product (once); y again (not counted twice)

    assert saved_activation_bytes(f, y, w) == 2 * 4 * 8 * 4
    with saved_activations(exclude=lin) as saved:
        lin(x).relu().sum()
    assert saved.bytes == 2 * 4 * 8 * 4 and len(saved.tensors) == 2  # x and relu's output
    with saved_activations() as saved:  # (a leaf that requires grad is taken for a parameter: excluded)
        lin(x.requires_grad_()).relu().sum()
    assert saved.bytes == 4 * 8 * 4


# -- API -------------------------------------------------------------------------------------------------------------
def test_result_and_max_batch_size():
    mem = training_memory("gpt3-1.3b", 4)
    assert isinstance(mem, TrainingMemory)
    assert mem.total == mem.parameters + mem.gradients + mem.optimizer_states + mem.activations
    assert mem.gib("activations") == mem.activations / 2 ** 30 and mem.gb() == mem.total / 1e9
    assert "activations" in str(mem) and "GiB" in str(mem)
    with pytest.raises(dataclasses_error()):
        mem.total = 0
    budget = 80e9
    b = max_batch_size("gpt3-1.3b", budget, recompute="selective")
    assert b >= 1
    assert training_memory("gpt3-1.3b", b, recompute="selective").total <= budget
    assert training_memory("gpt3-1.3b", b + 1, recompute="selective").total > budget
    assert max_batch_size("gpt3-175b", 80e9) == 0  # 2.8 TB of model states on one GPU
    # the fused loss drops the logits: less memory than the fp32 log-probs
    assert training_memory("gpt2", 8, loss="fused").activations < training_memory("gpt2", 8).activations


def dataclasses_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("kwargs,name", [
    (dict(batch_size=-1), "batch_size"), (dict(zero_stage=4), "zero_stage"), (dict(tp=5), "tp"),
    (dict(optimizer="lion"), "optimizer"), (dict(recompute="some"), "recompute"), (dict(pp=5), "pp"),
    (dict(dtype="int8"), "dtype"), (dict(loss="mse"), "loss"), (dict(dp=0), "dp"), (dict(seq_len=0), "seq_len"),
    (dict(stage=3, pp=2), "stage"), (dict(impl="cuda"), "impl")])
def test_bad_arguments(kwargs, name):
    kw = dict(batch_size=2)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=name):
        training_memory("gpt2", **kw)  # 12 heads, 12 layers


def test_refusals():
    with pytest.raises(ValueError, match="mixture-of-experts"):
        training_memory("mixtral-tiny", 1)
    with pytest.raises(ValueError, match="n_params"):
        model_state_bytes(-5)
    with pytest.raises(ValueError, match="memory_bytes"):
        max_batch_size("gpt2", 0)
    with pytest.raises(ValueError, match="exclude"):
        saved_activations(exclude="model")


@pytest.mark.parametrize("fn,kwargs,name", [
    ("training_memory", dict(dropout="no"), "dropout"), ("training_memory", dict(flash_attention="no"), "flash_attention"),
    ("training_memory", dict(sequence_parallel="no", tp=2), "sequence_parallel"),
    ("training_memory", dict(master_weights="no"), "master_weights"), ("training_memory", dict(row_stats=0), "row_stats"),
    ("layer_activation_terms", dict(dropout="no"), "dropout"),
    ("layer_activation_terms", dict(sequence_parallel=1, tp=2), "sequence_parallel"),
    ("layer_activation_bytes", dict(sequence_parallel="no"), "sequence_parallel"),
    ("model_state_bytes", dict(master_weights="no"), "master_weights")])
def test_flags_must_be_bools(fn, kwargs, name):
    """The boolean options were taken by truthiness: sequence_parallel="no" (or dropout="no") switched them ON and
    gave another estimate without a word; a flag must be True or False (a numpy bool too; dropout: or None)."""
    import numpy as np

    call = {"training_memory": lambda **kw: training_memory("gpt2", 2, **kw),
            "layer_activation_terms": lambda **kw: layer_activation_terms("gpt2", 64, 2, **kw),
            "layer_activation_bytes": lambda **kw: layer_activation_bytes(64, 2, 768, 12, **kw),
            "model_state_bytes": lambda **kw: model_state_bytes(1e6, **kw)}[fn]
    with pytest.raises(ValueError, match=name):
        call(**kwargs)
    ok = {k: (np.bool_(False) if k == name else v) for k, v in kwargs.items()}
    assert call(**ok) == call(**{k: (False if k == name else v) for k, v in kwargs.items()})
