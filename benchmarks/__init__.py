"""Reproducible benchmarks of ffc_parallel (run from the repository root; see docs/benchmarks.md)."""
