"""Benchmark harness for the two-tower AlexNet: ``python -m benchmarks.run --help``."""
