"""Benchmark suites: one module per op or topic; each registers with @suite."""
