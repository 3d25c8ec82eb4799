"""llmkern.parallel.cost_model: sanity of the predictions and the README table."""
import pytest

from llmkern.parallel import cost_model as cm


def test_gpt3_175b_dims_and_params():
    d = cm.dims("gpt3-175b")
    assert (d.n_layer, d.hidden, d.n_head, d.ffn) == (96, 12288, 96, 4 * 12288)
    assert 170e9 < d.params() < 180e9


@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("hw", ["H100", "A100"])
def test_ring_hides_communication(sp, hw):
    none = cm.predict("gpt3-175b", 8, hw, sequence_parallel=sp, overlap="none")
    ring = cm.predict("gpt3-175b", 8, hw, sequence_parallel=sp, overlap="ring")
    assert none["exposed_fraction"] == pytest.approx(1.0)
    # (without SP at 2048 tokens the chunked all-reduces, each paying the whole latency, hide little)
    assert 0.0 <= ring["exposed_fraction"] < (0.5 if sp else 1.0)
    assert ring["step_ms"] < none["step_ms"]
    assert none["step_ms"] == pytest.approx(none["compute_ms"] + none["comm_ms"])
    assert 0.3 < ring["mfu"] < 0.7  # GEMMs at 70% of peak bound the MFU


def test_bandwidth_and_world_size_trends():
    slow = cm.predict("gpt3-175b", 8, "H100", link_gbps=100, overlap="ring")
    fast = cm.predict("gpt3-175b", 8, "H100", overlap="ring")
    assert slow["exposed_ms"] > fast["exposed_ms"] and slow["comm_ms"] > fast["comm_ms"]
    one = cm.predict("gpt3-175b", 1, "H100")
    assert one["comm_ms"] == 0 and one["exposed_ms"] == 0
    assert cm.predict("gpt3-175b", 8, "H100")["compute_ms"] == pytest.approx(one["compute_ms"] / 8)


def test_h100_faster_than_a100_and_zoo_models():
    assert cm.predict("gpt3-175b", 8, "H100")["step_ms"] < cm.predict("gpt3-175b", 8, "A100")["step_ms"]
    r = cm.predict("gpt3-6.7b", 4, "H100", micro_batch=2)
    assert r["tokens"] == 4096 and r["step_ms"] > 0
    try:
        r = cm.predict("llama3-8b", 8, "H100")  # GQA: 8 kv heads shard 8 ways
        assert r["step_ms"] > 0
    except ValueError as exc:  # only when llmkern.models is absent
        assert "unknown model" in str(exc)


def test_errors_and_table():
    with pytest.raises(ValueError, match="shard"):
        cm.predict("gpt3-175b", 7)
    with pytest.raises(ValueError, match="overlap"):
        cm.predict("gpt3-175b", 8, overlap="bogus")
    md = cm.table("gpt3-175b", 8)
    lines = md.splitlines()
    assert lines[0].startswith("| GPU") and len(lines) == 2 + 2 * 2 * 2
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_dims_accepts_a_dims():
    """Regression: dims(Dims) raised (get_config's ValueError came before the Dims branch)."""
    d = cm.Dims("tiny", 2, 1024, 8, 8, 128, 4096, False, 32000, 2048)
    assert cm.dims(d) is d
    r = cm.predict(d, p=8)
    assert r["model"] == "tiny" and r["step_ms"] > 0


@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("latency_us", [0.0, 10.0, 1000.0])
def test_ring_with_free_gemms_exposes_the_plain_collective(sp, latency_us):
    """With free GEMMs and no slowdown nothing hides the transfers: the ring exposes exactly the plain
    collectives' time, never more. Regression: each ring step's latency was counted twice (t_comm holds
    the p - 1 step latencies already), up to 2x the collective's time."""
    kw = dict(sequence_parallel=sp, overlap_slowdown=0.0, latency_us=latency_us, gemm_efficiency=1e12,
              attention_efficiency=1e12)
    none = cm.predict("gpt3-175b", 8, "H100", overlap="none", **kw)
    ring = cm.predict("gpt3-175b", 8, "H100", overlap="ring", **kw)
    if sp:  # the decomposed ring: exactly the collective's time
        assert ring["exposed_ms"] == pytest.approx(none["comm_ms"], rel=1e-6)
        assert ring["exposed_fraction"] <= 1 + 1e-9 and ring["exposed_ms"] <= none["comm_ms"] * (1 + 1e-9)
    else:  # 4 all-reduces per layer, each cut in 4 all-reduces of a quarter of the bytes and all of the latency
        # (the chunks' latency was divided by 4 with their bytes: chunking looked free)
        extra_per_layer = 4 * (4 - 1) * 2 * 7 * latency_us * 1e-6
        assert ring["exposed_ms"] == pytest.approx(none["comm_ms"] + 1e3 * 96 * extra_per_layer, rel=1e-6)
    p, lat = 8, latency_us * 1e-6
    t_ag = 1e-3 + (p - 1) * lat
    assert cm._ring_exposed(0.0, t_ag, p, lat, 0.0) == pytest.approx(t_ag)
    # a GEMM chunk longer than a step hides it
    assert cm._ring_exposed(2 * t_ag * p, t_ag, p, lat, 0.0) == 0.0


def test_readme_table_is_the_model_output():
    """The README's cost-model table is what `python -m llmkern.parallel.cost_model` prints now."""
    import pathlib

    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    if not readme.exists():
        pytest.skip("no README.md next to tests/")
    lines = readme.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| GPU | SP | tokens"))
    table = cm.table("gpt3-175b", 8).splitlines()
    assert lines[start:start + len(table)] == table


def test_pipeline_bubble_fraction():
    assert cm.pipeline_bubble_fraction(1, 8) == 0.0
    assert cm.pipeline_bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert cm.pipeline_bubble_fraction(2, 1) == pytest.approx(0.5)  # one micro-batch: stages take turns
    # more micro-batches hide it: (p - 1) / (m + p - 1) falls towards 0 like (p - 1) / m
    fr = [cm.pipeline_bubble_fraction(8, m) for m in (1, 8, 64, 1024)]
    assert fr == sorted(fr, reverse=True) and fr[-1] < 0.01
    for p, m in ((0, 4), (4, 0), (2.0, 4), (True, 4)):
        with pytest.raises(ValueError, match="positive int"):
            cm.pipeline_bubble_fraction(p, m)
    # interleaved 1F1B: v chunks per rank shrink the ramp to (p - 1) chunk passes of 1/v of a stage's work
    assert cm.pipeline_bubble_fraction(4, 4, virtual_stages=1) == cm.pipeline_bubble_fraction(4, 4)
    assert cm.pipeline_bubble_fraction(4, 8, virtual_stages=2) == pytest.approx(3 / 19)
    assert cm.pipeline_bubble_fraction(1, 8, virtual_stages=4) == 0.0
    # the paper's bubble time fraction (1 / v) (p - 1) / m, of the ideal time: bubble / (1 - bubble)
    f = cm.pipeline_bubble_fraction(8, 16, virtual_stages=4)
    assert f / (1 - f) == pytest.approx((1 / 4) * 7 / 16)
    fr = [cm.pipeline_bubble_fraction(4, 8, virtual_stages=v) for v in (1, 2, 4, 8)]
    assert fr == sorted(fr, reverse=True)
    for v in (0, 1.0, True):
        with pytest.raises(ValueError, match="virtual_stages must be a positive int"):
            cm.pipeline_bubble_fraction(4, 4, virtual_stages=v)
    # (interleaving needs m a multiple of p, as pipeline_parallelize requires: it returned 0.43 for (4, 2, 2))
    with pytest.raises(ValueError, match="multiple of p"):
        cm.pipeline_bubble_fraction(4, 2, virtual_stages=2)


def test_mfu_counts_model_flops_not_the_recompute():
    """MFU counts model FLOPs (the seed convention, causal-halved attention): attention's backward is 2x its
    forward; the flash backward's recompute (2.5x in the time model) is not model FLOPs."""
    d = cm.dims("gpt3-175b")
    r = cm.predict("gpt3-175b", 8, "H100")
    T = 2048
    flops = 6 * T * d.params() + d.n_layer * 3 * 4 * d.n_head * T * T * d.head_dim / 2
    assert r["mfu"] == pytest.approx(flops / 8 / (r["step_ms"] * 1e-3 * 989.4e12), rel=1e-9)


def test_moe_and_latent_attention_models_are_refused_and_windows_counted():
    """dims() modelled a mixture of experts as one dense FFN (Mixtral's expert compute halved) and MLA as
    multi-head attention, silently; a sliding window's layers did full causal attention."""
    from llmkern.models.configs import get_config

    for name in ("mixtral-8x7b", "deepseek-v2-lite"):
        with pytest.raises(ValueError, match="mixture-of-experts or latent-attention"):
            cm.predict(name, 8, "H100")
    full = cm.predict(get_config("llama3-8b"), 8, "H100", seq=32768)
    win = cm.predict(get_config("llama3-8b", sliding_window=4096), 8, "H100", seq=32768)
    assert win["layer"]["attn_core_fwd_ms"] == pytest.approx(full["layer"]["attn_core_fwd_ms"] * 0.2343, rel=1e-3)


def test_a_dims_window_without_a_layer_count_covers_every_layer():
    import dataclasses

    from llmkern.models.configs import get_config

    cfg = get_config("llama3-8b", sliding_window=4096)
    from_cfg = cm.predict(cfg, 8, "H100", seq=32768)
    by_hand = cm.predict(dataclasses.replace(cm.dims("llama3-8b"), sliding_window=4096), 8, "H100", seq=32768)
    assert by_hand["layer"]["attn_core_fwd_ms"] == pytest.approx(from_cfg["layer"]["attn_core_fwd_ms"])
    with pytest.raises(ValueError, match="n_windowed"):
        cm.predict(dataclasses.replace(cm.dims("llama3-8b"), sliding_window=4096, n_window_layers=64), 8, "H100")
