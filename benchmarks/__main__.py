"""`python -m benchmarks` (or `make bench`): every benchmark, one table each."""

import importlib

MODULES = ("bench_data", "bench_train", "bench_tune", "bench_predict", "bench_workers")

for name in MODULES:
    importlib.import_module(f"benchmarks.{name}").main()
    print()
