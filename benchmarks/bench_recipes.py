"""Compute per recipe: `python -m benchmarks.bench_recipes`.

Trains `--preset long` (the previous defaults), the default recipe and `--preset fast`, or the `--recipes`
given (a preset with optional `+field=value` overrides, as in bench_accuracy), on the same synthetic set in
one run, through the code `smids-ml train` runs, and prints each one's counted training TFLOP
(`smids_ml.compute`) and summed `epoch_seconds`, against the first recipe as the baseline.
Aim (issue 25): the defaults within 0.4 points of `long`'s accuracy in at most a fifth of its training time.
"""

from __future__ import annotations

import tempfile

import click
import mlflow

from benchmarks.common import machine, recipe_config, synthetic_set, table
from smids_ml.train import train

TARGET = 0.2


@click.command()
@click.option("--images", type=click.IntRange(min=30), default=150, show_default=True, help="Synthetic crops.")
@click.option("--recipes", default="long,default,fast", show_default=True, help="Recipes to train (preset+field=value...); the first is the baseline.")
@click.option("--num-threads", type=click.IntRange(min=0), default=0, help="Torch CPU threads (0: torch's default).")
def main(images: int, recipes: str, num_threads: int) -> None:
    names = [r.strip() for r in recipes.split(",") if r.strip()]
    print(f"bench_recipes: {images} synthetic crops, recipes {', '.join(names)}; {machine()}", flush=True)
    data = synthetic_set(images)
    rows, seconds = [], []  # by position: a recipe given twice shows the run-to-run spread in one run
    with tempfile.TemporaryDirectory() as store:
        mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
        for name in names:
            cfg = recipe_config(name, data, {"num_threads": num_threads})
            result = train(cfg, experiment="bench-recipes", run_name=name)
            run = mlflow.get_run(result.run_id)
            seconds.append(sum(e["epoch_seconds"] for e in result.history.epochs))
            rows.append([name, result.cfg.epochs, f"{run.data.metrics['train_tflop']:.2f}", seconds[-1],
                         f"{seconds[-1] / seconds[0]:.3f}"])
    print(table(["recipe", "epochs", "TFLOP", "epoch seconds (sum)", f"vs {names[0]}"], rows))
    for name, spent in zip(names[1:], seconds[1:]):
        share = spent / seconds[0]
        print(f"aim: at most {TARGET:.0%} of {names[0]}'s training time: {name} takes {share:.1%} "
              f"({'met' if share <= TARGET else 'not met'})")


if __name__ == "__main__":
    main()
