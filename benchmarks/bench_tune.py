"""TPE with median pruning against the original study's improved grid: `python -m benchmarks.bench_tune`.

Both run through `smids_ml.tune.tune` on the same fixed synthetic set and split (a throwaway SQLite
tracking store), ranked on the split (one model a trial, whose epochs are counted). A grid knows its best only once every point has run, so its cost is all its epochs;
TPE's cost is the epochs spent until a trial first reaches the grid's best validation accuracy.
Target: TPE with pruning needs at most half of the grid's epochs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow

from benchmarks.common import machine, synthetic_set, table, timed
from smids_ml.config import TrainConfig
from smids_ml.tune import tune

IMAGES, SIZE, EPOCHS, TPE_TRIALS = 900, 64, 10, 30
TPE_SPACE = "fixed: {model: improved_cnn, optimizer: Adam, weight_decay: 0.0}\n" \
            "params:\n  lr: {low: 0.0003, high: 0.003, log: true}\n  dropout_rate: {low: 0.25, high: 0.45}\n"


def epochs_to_reach(study, target: float) -> tuple[int | None, int]:
    """(epochs spent when a trial first reached `target`, epochs spent in all), in trial order."""
    spent, reached = 0, None
    for trial in sorted(study.trials, key=lambda t: t.number):
        spent += len(trial.intermediate_values)
        if reached is None and trial.value is not None and trial.value >= target - 1e-12:
            reached = spent
    return reached, spent


def main() -> None:
    print(f"bench_tune: improved_cnn, {IMAGES} synthetic images at {SIZE} px, up to {EPOCHS} epochs a trial, "
          f"monitor valid_acc; {machine()}")
    root = synthetic_set(IMAGES)
    # the original recipe around both searches, so that only the search differs
    base = TrainConfig.from_preset("original", data=str(root), image_size=SIZE, epochs=EPOCHS, patience=0,
                                   monitor="valid_acc", lr=5e-4, num_threads=os.cpu_count() or 1).validate()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        experiment = "bench-tune"
        mlflow.create_experiment(experiment, artifact_location=str(tmp / "artifacts"))
        (grid, _), grid_s = timed(tune, base, "improved-grid", "grid", None, None, "none", "grid",
                                  str(tmp / "optuna.journal"), None, None, experiment, finalists=0, ranking="split")
        target = grid.best_value
        space = tmp / "tpe.yaml"
        space.write_text(TPE_SPACE)
        (tpe, _), tpe_s = timed(tune, base, str(space), "tpe", TPE_TRIALS, None, "median", "tpe", str(tmp / "optuna.journal"),
                                None, None, experiment, 2, 3, finalists=0, ranking="split")
        grid_reached, grid_total = epochs_to_reach(grid, target)  # studies read their journal: inside the block
        tpe_reached, tpe_total = epochs_to_reach(tpe, target)
        pruned = sum(t.state.name == "PRUNED" for t in tpe.trials)
        tpe_best, grid_trials, tpe_trials = tpe.best_value, len(grid.trials), len(tpe.trials)
    rows = [["improved-grid (9 points, no pruning)", grid_trials, 0, grid_total, grid_s, f"{target:.4f}",
             grid_reached],
            [f"TPE + median pruner ({TPE_TRIALS} trials)", tpe_trials, pruned, tpe_total, tpe_s, f"{tpe_best:.4f}",
             tpe_reached if tpe_reached is not None else "not reached"]]
    print(table(["search", "trials", "pruned", "epochs", "seconds", "best valid_acc", "epochs until grid best"], rows))
    if tpe_reached is None:
        print(f"target: TPE did not reach the grid's best validation accuracy in {TPE_TRIALS} trials: MISSED")
    else:
        ratio = tpe_reached / grid_total
        print(f"target: TPE reaches the grid's best with <= 50% of the grid's epochs: {ratio:.0%} "
              f"({tpe_reached} vs {grid_total}), {'met' if ratio <= 0.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
