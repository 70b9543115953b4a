"""Benchmark scripts: each prints figures; none asserts on time."""
