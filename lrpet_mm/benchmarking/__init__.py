"""Benchmarks of lrpet_mm (``benchmarks/*.py`` are their command lines)."""
