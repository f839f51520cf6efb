"""prunekit's benchmark suite: run ``python benchmarks/run.py`` (see ``run.py --help``).

Not part of the test suite and not installed: timed measurements belong here, never in
``tests/``.
"""
