"""The benchmark harness behind `llmkern-bench` (see cli.py); suites live in bench/suites/."""
from llmkern.bench.registry import Result, suite, SUITES  # noqa: F401
from llmkern.bench.timing import time_fn  # noqa: F401
