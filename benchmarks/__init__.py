"""Benchmarks: scripts that print their figures (run as ``python -m dmstream.benchmarks.<name>``)."""
