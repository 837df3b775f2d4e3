"""`smids-ml`: one group over the entry-point modules; each subcommand is imported only when used."""

from __future__ import annotations

import importlib

import click

COMMANDS = {
    "synth": ("smids_ml.synth", "main"),
    "explore": ("smids_ml.explore", "main"),
    "train": ("smids_ml.train", "main"),
    "tune": ("smids_ml.tune", "main"),
    "evaluate": ("smids_ml.evaluate", "main"),
    "compare": ("smids_ml.evaluate", "compare"),
    "cv": ("smids_ml.cv", "main"),
    "predict": ("smids_ml.predict", "main"),
}


class LazyGroup(click.Group):
    """Keeps `smids-ml --help` fast: torch and MLflow load only with the command that needs them."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name]
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="smids-ml")
def main():
    """Sperm morphology image classification, tracked with MLflow and tuned with Optuna."""


if __name__ == "__main__":
    main()
