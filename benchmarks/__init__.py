"""Benchmarks: the archiver beside a floor and a naive receiver (`python -m benchmarks.run`).

Not imported by the package, not part of the test suite.
"""
