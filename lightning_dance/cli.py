"""The ``lightning-dance`` command.

- ``lightning-dance fit|validate|test|predict ...``: Lightning's ``LightningCLI`` over
  :class:`~lightning_dance.classifier.VideoClassifier` and any LightningDataModule (the synthetic
  data by default; ``--data VideoFolderDataModule --data.root ...`` for real videos). Every
  argument can also come from a YAML file (``--config cfg.yaml``; ``--print_config`` writes one).
- ``lightning-dance demo``: the whole pipeline on the built-in synthetic data (see
  :mod:`lightning_dance.demo`).

Example:
    $ lightning-dance fit --model.model tiny_c3d --data.frames 8 --trainer.max_epochs 2
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning_dance.classifier import VideoClassifier

__all__ = ["DanceCLI", "main"]


class DanceCLI(LightningCLI):
    """LightningCLI with the synthetic data as default and ``num_classes`` taken from the data."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def _cli(args: Sequence[str] | None) -> DanceCLI:
    return DanceCLI(
        VideoClassifier,
        L.LightningDataModule,
        subclass_mode_data=True,
        parser_kwargs={
            "default_env": False,
            "parser_mode": "omegaconf" if _has_omegaconf() else "yaml",
        },
        args=args,
        save_config_kwargs={"overwrite": True},
    )


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-dance`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from lightning_dance.demo import main as demo_main

        demo_main(argv[1:])
        return
    _cli(_with_default_data(argv))


def _with_default_data(argv: list[str]) -> list[str]:
    """Use the synthetic data unless ``--data`` is given (a ``--config`` file still overrides it)."""
    if not argv or argv[0] not in {"fit", "validate", "test", "predict"}:
        return argv
    if any(a == "--data" or a.startswith("--data=") for a in argv):
        return argv
    return argv[:1] + ["--data", "lightning_dance.data.SyntheticVideoDataModule"] + argv[1:]


if __name__ == "__main__":
    main()
