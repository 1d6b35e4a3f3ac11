"""Benchmarks of the whole stack; run with ``python bench/run.py`` (never collected by pytest)."""
