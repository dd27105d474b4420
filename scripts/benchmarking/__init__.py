"""The parts of ``scripts/benchmark.py``, one job each (see that script's docstring)."""
