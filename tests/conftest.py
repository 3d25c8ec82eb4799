"""Shared test setup.

- Without CUDA, Triton kernels run under the interpreter (TRITON_INTERPRET=1, set before triton
  is imported): tests call the Triton launchers on small CPU tensors in float32/float16.
- `@pytest.mark.gpu` cases are skipped cleanly without CUDA; run them with `pytest -m gpu`.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The GPU tests run small LoRA layers, which eager calls would send to the cuBLAS composition
# (llmkern.ops.lora.fused_pays): keep them on the fused kernels under test.
os.environ.setdefault("LLMKERN_LORA_FUSED_MIN_MNK", "0")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def triton_backend(monkeypatch):
    """Route CPU tensors through the Triton kernels (under the interpreter); CUDA uses them anyway."""
    from llmkern.testing import triton_device

    if triton_device() is None:
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1")
    monkeypatch.setenv("LLMKERN_BACKEND", "triton")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster than two on a shared 2-core machine (a module marks
    itself with pytestmark = pytest.mark.usefixtures("one_thread"))."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world1():
    """A process group of one rank in this process (gloo on an in-memory store), destroyed after the module."""
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        yield dist.group.WORLD
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def ranks():
    """ranks(p) -> a RankPool of p gloo ranks, started once per test session (starting a pool costs
    3-7 s: importing torch in every rank), restarted after a failure. The ranks outlive a module, so a
    worker that changes process-wide state (module attributes, os.environ) restores it before returning."""
    from llmkern.parallel.launch import RankPool

    pools = {}

    def get(p):
        if p not in pools or pools[p].closed:
            pools[p] = RankPool(p, pg_timeout=30.0)
        return pools[p]

    yield get
    for pool in pools.values():
        pool.close()


@pytest.fixture
def pool2(ranks):
    """The session's RankPool of 2 gloo ranks (see ranks; a fresh one after a failure closed it)."""
    return ranks(2)


@pytest.fixture
def pool4(ranks):
    """The session's RankPool of 4 gloo ranks (see ranks; a fresh one after a failure closed it)."""
    return ranks(4)
