"""Suite registry and the result row every suite produces.

A suite is a function decorated with @suite(name, description) in a module of
llmkern/bench/suites/ (every module there is imported by the CLI). It receives a Context and
returns or yields Result rows. Each row compares our op with the baseline a user would otherwise
pick, measured in the same run on the same inputs.
"""
import dataclasses
from typing import Callable, Dict, Optional

import torch


@dataclasses.dataclass
class Result:
    op: str                        # what was timed, e.g. "sample top-k+top-p"
    shape: str                     # e.g. "B=32 V=128256 fp32"
    ours_ms: float                 # median time of our op
    baseline: str = ""             # name of the baseline, e.g. "torch sort-based"
    baseline_ms: Optional[float] = None
    throughput: Optional[float] = None  # of our op, in `unit`
    unit: str = ""                 # "TFLOP/s", "GB/s", "tok/s"
    mfu: Optional[float] = None    # fraction of the device peak, where it applies
    notes: str = ""
    suite: str = ""
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def ratio(self):
        """Speed-up over the baseline (> 1: we are faster)."""
        if self.baseline_ms is None or self.ours_ms <= 0:
            return None
        return self.baseline_ms / self.ours_ms

    def as_dict(self):
        d = dataclasses.asdict(self)
        d["ratio"] = self.ratio
        return d


@dataclasses.dataclass
class Context:
    device: torch.device
    quick: bool = True
    progress: Callable = lambda it, **kw: it  # wraps iterables with a progress bar on long runs
    out_dir: Optional[str] = None


@dataclasses.dataclass
class Suite:
    name: str
    description: str
    fn: Callable


SUITES: Dict[str, Suite] = {}


def suite(name, description=""):
    def deco(fn):
        SUITES[name] = Suite(name, description, fn)
        return fn
    return deco


def load_all():
    """Import every module of llmkern.bench.suites so that their suites register."""
    import importlib
    import pkgutil

    from llmkern.bench import suites

    for mod in pkgutil.iter_modules(suites.__path__):
        importlib.import_module(f"llmkern.bench.suites.{mod.name}")
    return SUITES
