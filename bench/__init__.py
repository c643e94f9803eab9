"""Benchmarks: `python -m bench.pipeline_bench` (docs/benchmark.md) and bench/gpu_smoke.py."""
