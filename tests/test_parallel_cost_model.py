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
    assert 0.0 <= ring["exposed_fraction"] < 0.5
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
