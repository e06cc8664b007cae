"""Benchmarks (run as scripts, ``python benchmarks/<name>.py``) and the reference oracles in
:mod:`benchmarks.oracles`; not part of the installed library."""
