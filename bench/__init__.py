"""Benchmarks: one script per published claim; each docstring holds its exact command,
and docs/benchmarks.md holds the numbers with the conditions that would make them false."""
