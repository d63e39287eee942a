"""Benchmarks for webhookd, run as ``python -m bench [scenario]``; see ``bench/README.md``."""
