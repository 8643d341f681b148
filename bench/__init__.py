"""Benchmarks: measured, never asserted. serve.py: the serving benchmark over HTTP."""
