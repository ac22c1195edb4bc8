"""`kvserve bench`: the installed load-test client (serve benchmark, datasets, statistics, the
attention-variant report). Scripts run from a checkout live in the top-level benchmarks/ folder."""
