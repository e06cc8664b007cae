"""Per-sample numpy/OpenCV versions of the references' algorithms: the baselines the benchmarks time the
library against, and behavioural oracles for the tests. Not part of the installed library."""
