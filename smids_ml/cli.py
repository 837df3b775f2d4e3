"""`smids-ml`: one group over the entry-point modules; each subcommand is imported only when used."""

from __future__ import annotations

import importlib

import click

from smids_ml.console import OneLineUsage, usage_error

# name: (module, attribute, one-line help shown by `smids-ml --help` without importing torch or MLflow)
COMMANDS = {
    "synth": ("smids_ml.synth", "main", "Write a synthetic SMIDS-like data set (for tests and demos)."),
    "explore": ("smids_ml.explore", "main", "Summarise a data root and log the report to MLflow."),
    "train": ("smids_ml.commands", "train", "Train one model and log it to MLflow."),
    "tune": ("smids_ml.commands", "tune", "Search hyperparameters with Optuna; register the best model."),
    "pretrain": ("smids_ml.pretrain", "main", "Pretrain a network on unlabelled crops (SimCLR) for train --init-from."),
    "evaluate": ("smids_ml.evaluate", "main", "Evaluate a logged model on its test split or any labelled folder."),
    "compare": ("smids_ml.evaluate", "compare", "Tabulate the latest test metrics of several models."),
    "cv": ("smids_ml.commands", "cv", "Stratified k-fold cross-validation; optionally register the k-fold ensemble."),
    "predict": ("smids_ml.predict", "main", "Classify images, folders, globs and videos with a logged model."),
    "report": ("smids_ml.report", "main", "Per-sample morphology report: counts, normal share with intervals, overlays."),
    "server": ("smids_ml.server", "main", "Start an MLflow tracking server (SQLite or PostgreSQL, proxied artifacts)."),
    "runs": ("smids_ml.runs", "main", "List RUNNING runs; --fix-stale fails those whose process is gone."),
}


class LazyGroup(OneLineUsage, click.Group):
    """Keeps `smids-ml --help` fast: torch and MLflow load only with the command that needs them."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attribute)

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:  # no such command
            raise usage_error(exc, ctx) from None

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_text) for name, (_, _, help_text) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="smids-ml")
def main():
    """Sperm morphology image classification, tracked with MLflow and tuned with Optuna."""


if __name__ == "__main__":
    main()
