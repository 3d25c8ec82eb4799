"""benchmarks/record_results.py: gpu_check.sh's output folder -> one results page."""
import importlib.util
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _module():
    spec = importlib.util.spec_from_file_location("record_results",
                                                  os.path.join(HERE, "..", "benchmarks", "record_results.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_page_from_a_gpu_check_folder(tmp_path):
    (tmp_path / "env.txt").write_text("name, memory.total [MiB], driver_version\n"
                                      "NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04\n")
    (tmp_path / "build.log").write_text("...\nbuild rc=0 in 80 s\n")
    (tmp_path / "pytest_gpu.log").write_text("..F\nFAILED tests/test_a.py::t - boom\n1 failed, 2 passed in 3s\n")
    (tmp_path / "bench-attention").mkdir()
    row = dict(op="attention fwd", shape="B=4 H=16 T=4096 D=128 causal=True bf16", ours_ms=0.7,
               baseline="sdpa-flash", baseline_ms=0.8, ratio=0.8 / 0.7, throughput=392.0, unit="TFLOP/s",
               mfu=0.396, notes="TMA kernels; pointer kernels 350 TFLOP/s", suite="attention", extra={})
    (tmp_path / "bench-attention" / "results.json").write_text(json.dumps({"environment": {}, "results": [row]}))
    (tmp_path / "diag-host.log").write_text("# section host\n  attention fwd  front : host    0.210 ms/call, "
                                            "device    0.190 ms/call\nnoise\n")
    card, page = _module().build_page(str(tmp_path))
    assert card == "nvidia-h100-80gb-hbm3"
    assert "## Host time per call" in page and "host    0.210 ms/call" in page and "noise" not in page
    assert "NVIDIA H100 80GB HBM3" in page and "build rc=0" in page
    assert "FAILED tests/test_a.py::t" in page and "1 failed, 2 passed" in page
    assert "| attention fwd | B=4 H=16 T=4096 D=128 causal=True bf16 | 0.700 | sdpa-flash | 0.800 | 1.14 |" in page
    assert "39.6%" in page and "pointer kernels 350 TFLOP/s" in page
    assert "Suites that wrote no results" in page and "sampling" in page.split("wrote no results")[1]
