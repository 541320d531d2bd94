"""Benchmarks: ``pytest bench/ --benchmark-only`` (CPU or GPU) and ``python -m bench.compare`` (GPU)."""
