"""Benchmarks: commands that print figures (not tests)."""
