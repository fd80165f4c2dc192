"""Benchmarks: each prints a table and writes JSON (and a PNG plot where a picture helps)."""
