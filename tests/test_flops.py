"""llmkern.flops: the seed deck's parameter table and FLOP formulas, MFU arithmetic, peak table."""
import math

import pytest
import torch

from llmkern import flops
from llmkern.models import build, get_config


def test_gpt3_175b_matches_seed_table():
    p = flops.param_counts("gpt3-175b")
    # seed: | Total 174,597M | PE 25M (0.01%) | TE 617M (0.35%) | Attn 57,982M (33.21%) | FFN 115,970M (66.42%) |
    assert round(p["token_embedding"] / 1e6) == 618 and int(p["token_embedding"] / 1e6) == 617
    assert round(p["position_embedding"] / 1e6) == 25
    assert round(p["attention"] / 1e6) == 57982
    assert round(p["ffn"] / 1e6) == 115970
    assert p["attention"] == 4 * 96 * 12288 ** 2                    # 4Ld²
    assert p["ffn"] == 96 * (12288 * 4 * 12288 + 4 * 12288 + 4 * 12288 * 12288 + 12288)
    s = {k: round(100 * v, 2) for k, v in p["shares"].items()}
    assert s == {"token_embedding": 0.35, "position_embedding": 0.01, "attention": 33.21, "ffn": 66.42}
    assert abs(p["total"] - 174_597e6) / 174_597e6 < 1e-4            # seed's total, within 0.01%


@pytest.mark.parametrize("name, billions", [
    ("gpt3-125m", 0.125), ("gpt3-350m", 0.350), ("gpt3-760m", 0.760), ("gpt3-1.3b", 1.3),
    ("gpt3-2.7b", 2.7), ("gpt3-6.7b", 6.7), ("gpt3-13b", 13.0), ("gpt3-175b", 175.0)])
def test_gpt3_table_2_1_sizes(name, billions):
    total = flops.param_counts(name)["total"] / 1e9
    assert abs(total - billions) / billions < 0.04, (name, total)
    assert get_config(name).block_size == 2048


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_param_counts_equal_model(name):
    assert flops.param_counts(name)["total"] == build(name).num_params()
    assert flops.param_counts(get_config(name, tie_embeddings=not get_config(name).tie_embeddings))["total"] == \
        build(name, tie_embeddings=not get_config(name).tie_embeddings).num_params()


def test_known_totals():
    assert flops.param_counts("gpt2")["total"] == 124_439_808          # HF gpt2
    assert flops.param_counts("llama-7b")["total"] == 6_738_415_616    # LLaMA-7B
    assert flops.param_counts("llama3-8b")["total"] == 8_030_261_248   # Llama-3-8B


def test_flops_per_token_conventions():
    N, L, T, d = 1e9, 24, 2048, 2048
    assert flops.flops_per_token(N, L, T, d, "seed") == 6 * N + 6 * L * T * d
    assert flops.flops_per_token(N, L, T, d, "palm") == 6 * N + 12 * L * d * T
    assert flops.flops_per_token(N, L, T, d, "seed", recompute=True) == 8 * N + 8 * L * T * d
    # the seed's ≈ 6N with N ≈ 12Ld²
    c = get_config("gpt3-175b")
    n = flops.matmul_params(c)
    assert abs(n - 12 * c.n_layer * c.n_embd ** 2) / n < 0.01
    assert flops.model_flops_per_token(c, 2048) == 6 * n + 6 * 96 * 2048 * 12288
    # nanoGPT's estimate for gpt2 at T=1024: 6N + 12LHQT with N = params - wpe
    g = get_config("gpt2")
    assert flops.model_flops_per_token(g, 1024, "palm") == 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 768 * 1024
    with pytest.raises(ValueError, match="convention"):
        flops.flops_per_token(N, L, T, d, "chinchilla")
    with pytest.raises(ValueError, match="seq_len"):
        flops.flops_per_token(N, L, -1, d)


def test_mfu_arithmetic():
    fpt = flops.flops_per_token(124e6, 12, 1024, 768)
    tps = 0.4 * 312e12 / fpt                                   # exactly 40% of an A100
    assert math.isclose(flops.mfu(tps, fpt, 312e12), 0.4)
    assert math.isclose(flops.mfu(tps, fpt, "a100"), 0.4)
    assert math.isclose(flops.mfu(tps, fpt, ("h100", torch.bfloat16)), 0.4 * 312 / 989.4)
    assert math.isclose(flops.hfu(tps, fpt, 312e12), 0.4 * 4 / 3)
    assert math.isclose(flops.hfu(tps, fpt, 312e12, recompute=False), 0.4)
    u = flops.utilization(tps, fpt, "bf16", device="cpu")
    assert math.isclose(u.mfu_a100, 0.4) and u.mfu_device is None and u.device is None
    assert math.isclose(u.tflops, 0.4 * 312)
    with pytest.raises(ValueError, match="peak_flops"):
        flops.mfu(1.0, 1.0, 0)


def test_peak_table_and_detection():
    assert flops.peak("a100", "bf16") == 312e12 and flops.peak("a100", "tf32") == 156e12
    assert flops.peak("a100", torch.float16) == 312e12 and flops.peak("a100", "fp32") == 19.5e12
    assert flops.peak("h100", "bf16") == 989.4e12 and flops.peak("h100", "fp8") == 1979e12
    assert flops.peak("h200", "tf32") == 494.7e12 and flops.peak("h200", "fp32") == 66.9e12
    with pytest.raises(ValueError, match="fp8"):
        flops.peak("a100", "fp8")
    with pytest.raises(ValueError, match="device"):
        flops.peak("tpu-v4")
    assert flops.device_name("NVIDIA H100 80GB HBM3") == "h100"
    assert flops.device_name("NVIDIA H100 PCIe") == "h100-pcie"
    assert flops.device_name("NVIDIA H200") == "h200"
    assert flops.device_name("NVIDIA A100-SXM4-80GB") == "a100"
    assert flops.device_name("NVIDIA GeForce RTX 4090") is None
    assert flops.device_name("NVIDIA RTX A1000 6GB Laptop GPU") is None  # (not an A100: "A100" in its name)
    assert flops.device_name("NVIDIA A100 80GB PCIe") == "a100"
    assert flops.detect_device("cpu") is None and flops.device_peak("cpu") is None


@pytest.mark.gpu
def test_detect_device_gpu():
    name = flops.detect_device()
    if name is not None:
        assert flops.device_peak(dtype=torch.bfloat16) == flops.PEAK_FLOPS[name]["bf16"]


def test_mfu_suite_rows_on_cpu(monkeypatch):
    """The `mfu` bench suite yields rows with tok/s, MFU vs A100 and the torch baseline."""
    from llmkern.bench.registry import Context, load_all
    from llmkern.bench.suites import mfu as mfu_suite

    assert "mfu" in load_all()
    tiny = get_config("gpt-tiny", n_layer=1, n_embd=32, n_head=2, block_size=16, vocab_size=64)
    monkeypatch.setattr(mfu_suite, "_plan", lambda device, quick: [("t", tiny, 2, 16, False), ("t", tiny, 2, 16, True)])
    monkeypatch.setattr(mfu_suite, "time_fn", lambda fn, device=None, quick=False: (fn(), 2.0)[1])
    rows = list(mfu_suite.run(Context(device=torch.device("cpu"), quick=True)))
    assert [r.op for r in rows] == ["t train step", "t LoRA finetune step"]
    r = rows[0]
    assert r.unit == "tok/s" and r.throughput == 2 * 16 / 2e-3 and r.mfu is None and r.ratio == 1.0
    fpt = flops.model_flops_per_token(tiny, 16)
    assert math.isclose(r.extra["mfu_a100"], r.throughput * fpt / 19.5e12)
    lora = rows[1]
    assert lora.extra["lora_params"] == 1 * 2 * (16 * 32 + 32 * 16)      # r=16 on q_proj and v_proj
    assert lora.extra["flops_per_token"] == fpt - 2 * flops.matmul_params(tiny) + 6 * lora.extra["lora_params"]
    assert "4N + 6LTd + 6N_lora" in lora.notes and "4N" not in r.notes   # the LoRA row says what its MFU counts


def test_nvl_cards_have_their_own_peak():
    """H100 NVL / H200 NVL run at 835.5 dense bf16 TFLOP/s, not the SXM's 989.4 (MFU was 18% low)."""
    assert flops.device_name("NVIDIA H100 NVL") == "h100-nvl"
    assert flops.device_name("NVIDIA H200 NVL") == "h200-nvl"
    assert flops.device_name("NVIDIA GH200 480GB") == "h200" and flops.device_name("NVIDIA GH200 NVL2") == "h200"
    assert flops.device_name("NVIDIA H100 PCIe") == "h100-pcie"
    assert flops.device_name("NVIDIA H100 80GB HBM3") == "h100" and flops.device_name("NVIDIA H200") == "h200"
    for name in ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe"):
        assert flops.peak(flops.device_name(name), "bf16") == 312e12
    for key in ("h100-nvl", "h200-nvl"):
        assert flops.peak(key, "bf16") == 835.5e12 and flops.peak(key, "fp8") == 1670.5e12
        assert flops.peak(key, "tf32") == 417.5e12 and flops.peak(key, "fp32") == 60e12
    assert flops.peak("h100-pcie", "bf16") == 756.5e12


def test_unknown_gpu_says_so(monkeypatch):
    """A CUDA card missing from the table gives no device peak and a warning naming it (no silent guess)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    monkeypatch.setattr(flops, "_WARNED", set(), raising=False)
    with pytest.warns(UserWarning, match="unknown GPU 'NVIDIA L40S'"):
        assert flops.detect_device("cuda") is None
    assert flops.device_peak("cuda") is None
    u = flops.utilization(1e4, 1e9, "bf16", device="cuda")
    assert u.mfu_device is None and u.device is None and math.isclose(u.mfu_a100, 1e13 / 312e12)


def test_moe_param_counts_and_active_flops():
    """Mixture of experts: total counts every expert (equal to the model), active k of E per MoE layer,
    and the FLOP formulas use the active ones."""
    c = get_config("mixtral-tiny")
    p = flops.param_counts(c)
    assert p["total"] == build(c).num_params()
    L, d, E, k, F = c.n_layer, c.n_embd, c.n_experts, c.n_experts_per_tok, c.moe_ffn_dim
    assert p["experts"] == L * E * 3 * d * F and p["router"] == L * d * E
    assert p["total"] - p["active"] == L * (E - k) * 3 * d * F
    assert flops.matmul_params(c) == p["active"] - c.vocab_size * d  # untied: the input embedding is a lookup
    dense_ffn = c.replace(n_experts=0, n_experts_per_tok=None, moe_ffn_dim=None, intermediate_size=k * F)
    # a top-k MoE costs what a dense model of k experts' width costs, plus the router
    assert flops.model_flops_per_token(c, 64) - flops.model_flops_per_token(dense_ffn, 64) == 6 * L * d * E
    m8 = flops.param_counts("mixtral-8x7b")
    assert round(m8["total"] / 1e9, 1) == 46.7 and round(m8["active"] / 1e9, 1) == 12.9


def test_recompute_flops_are_megatrons_hardware_flops():
    """model_flops_per_token(recompute=True): the model's FLOPs plus one more forward of the blocks, not of
    the LM head (the zoo checkpoints its blocks): with PaLM's attention term this is Korthikanti et al.'s
    (Megatron-LM) full-recomputation count, 96·l·h²·(1 + s/6h + V/16lh) per token, against their model
    FLOPs 72·l·h²·(1 + s/6h + V/12lh)."""
    c, s_ = get_config("gpt3-175b"), 2048
    l, h, V = c.n_layer, c.n_embd, c.vocab_size
    hw = flops.model_flops_per_token(c, s_, "palm", recompute=True)
    model = flops.model_flops_per_token(c, s_, "palm")
    assert abs(hw / (96 * l * h * h * (1 + s_ / (6 * h) + V / (16 * l * h))) - 1) < 2e-3
    assert abs(model / (72 * l * h * h * (1 + s_ / (6 * h) + V / (12 * l * h))) - 1) < 2e-3
    g = get_config("gpt2")
    assert flops.model_flops_per_token(g, 1024, recompute=True) == (
        flops.model_flops_per_token(g, 1024) + 2 * (flops.matmul_params(g) - g.vocab_size * g.n_embd)
        + 2 * g.n_layer * 1024 * g.n_embd)


def test_sliding_window_layers_count_the_keys_they_see():
    """Query i of a layer with window W sees min(i, W) keys: the attention term counted full causal attention
    (MFU overstated 40 % for a Mistral-like model at 32k tokens)."""
    from llmkern.models.configs import get_config

    full, T, W = get_config("llama3-8b"), 32768, 4096
    win = get_config("llama3-8b", sliding_window=W)
    kept = sum(min(i, W) for i in range(1, T + 1)) / (T * (T + 1) / 2)
    attn = 6 * full.n_layer * T * full.n_embd  # the seed's attention term
    got = flops.model_flops_per_token(win, T)
    assert got == pytest.approx(flops.model_flops_per_token(full, T) - attn * (1 - kept), rel=1e-12)
    half = get_config("llama3-8b", sliding_window=W, sliding_window_layers=range(0, full.n_layer, 2))
    assert flops.model_flops_per_token(half, T) == pytest.approx((got + flops.model_flops_per_token(full, T)) / 2)
    assert flops.model_flops_per_token(win, W) == flops.model_flops_per_token(full, W)  # (no row is cut)


def test_bad_counts_raise():
    """seq_len=0 gave block_size's count; negative or fractional PEFT counts and NaN rates gave numbers."""
    from llmkern.peft import counts

    assert flops.model_flops_per_token("gpt2", 0) == flops.flops_per_token(flops.matmul_params("gpt2"), 12, 0, 768)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="seq_len"):
            flops.model_flops_per_token("gpt2", bad)
    for call in (lambda: counts.lora_params(-2, 64, 8), lambda: counts.adapter_params(2, 64, -3),
                 lambda: counts.prefix_params(2, 64.5, 3), lambda: counts.lora_params(True, 64, 8),
                 lambda: counts.prefix_params_reparam(2, 64, 3, -1), lambda: counts.adapter_params_exact(1, 2, 3, -1)):
        with pytest.raises(ValueError, match="must be an int >= 0"):
            call()
    for args in ((-1e5, 1e9), (1e5, float("nan")), (float("inf"), 1e9)):
        with pytest.raises(ValueError, match="mfu"):
            flops.mfu(*args, "a100")


def test_numpy_int32_arguments_do_not_wrap():
    """Integral arguments of any type: numpy int32 ones wrapped in the products (a window fraction of 7936,
    negative LoRA counts)."""
    import numpy as np
    from llmkern.models.configs import get_config
    from llmkern.parallel import cost_model
    from llmkern.peft import counts

    cfg = get_config("llama3-8b", sliding_window=4096)
    assert flops.model_flops_per_token(cfg, np.int32(65536)) == flops.model_flops_per_token(cfg, 65536)
    assert counts.lora_params(np.int32(80), 8192, 256, n_matrices=7) == 2348810240
    assert counts.adapter_params_exact(np.int32(96), 12288, 1024, 2) == 4834394112
    assert cost_model.predict("llama3-8b", 8, seq=np.int32(65536))["step_ms"] == pytest.approx(
        cost_model.predict("llama3-8b", 8, seq=65536)["step_ms"])
    for args in ((4, 0, 4, 16), (4, 8, 5, 16)):
        with pytest.raises(ValueError, match="window_fraction"):
            flops.window_fraction(*args)
    for peak in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="peak_flops"):
            flops.mfu(1e5, 1e9, peak)
