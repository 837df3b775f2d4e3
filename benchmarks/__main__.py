"""`python -m benchmarks` (or `make bench`): every benchmark, one table each."""

import importlib

import click

MODULES = ("bench_data", "bench_train", "bench_recipes", "bench_tune", "bench_predict", "bench_workers", "bench_cli")

for name in MODULES:
    main = importlib.import_module(f"benchmarks.{name}").main
    if isinstance(main, click.Command):
        main.main(args=[], standalone_mode=False)  # its defaults, and no exit between benchmarks
    else:
        main()
    print()
