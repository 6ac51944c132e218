"""Benchmark helpers: interleaved timing, environment records."""
