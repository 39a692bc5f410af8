"""The ``lightning-dance`` command.

- ``lightning-dance fit|validate|test|predict ...``: Lightning's ``LightningCLI`` over any
  LightningModule (model selection: ``--model DANCEWrapper``; the default is
  :class:`~lightning_dance.classifier.VideoClassifier`) and any LightningDataModule (the
  synthetic data by default; ``--data VideoFolderDataModule --data.root ...`` for real videos).
  The data's ``num_classes`` is linked into the model's. Every argument can also come from a
  YAML file (``--config cfg.yaml``; ``--print_config`` writes one).

  - the dense model: ``--model.model tiny_c3d`` (a :class:`VideoClassifier`);
  - AVA fine-tuning: ``--trainer.callbacks+=AVACallback`` (with ``--trainer.callbacks.lam 2.0``
    and the callback's other arguments), on any model;
  - the DANCE controller (AAP): ``--model DANCEWrapper --model.model PATH.ckpt`` (a trained
    dense model's checkpoint) or ``--model.model tiny_c3d`` (a fresh factory model), with the
    wrapper's options (``--model.budget 0.4 --model.policy topk --model.dims '[channel]'``).
- ``lightning-dance export --ckpt PATH --format onnx --out DIR``: parity-checked deployment
  artifacts from a dense or a DANCE checkpoint
  (:func:`~lightning_dance.export.from_checkpoint.export_checkpoint`).
- ``lightning-dance demo``: the whole pipeline on the built-in synthetic data (see
  :mod:`lightning_dance.demo`).

Example:
    $ lightning-dance fit --model.model tiny_c3d --data.frames 8 --trainer.max_epochs 2
    $ lightning-dance fit --model DANCEWrapper --model.model dense.ckpt --model.budget 0.5
    $ lightning-dance export --ckpt dance.ckpt --format onnx --out export
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.cli import LightningCLI

# imported so that jsonargparse resolves their short names (--model DANCEWrapper,
# --trainer.callbacks+=AVACallback)
from lightning_dance.ava_callback import AVACallback  # noqa: F401
from lightning_dance.classifier import VideoClassifier  # noqa: F401
from lightning_dance.wrapper import DANCEWrapper  # noqa: F401

__all__ = ["DanceCLI", "main"]

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
DEFAULT_MODEL = "lightning_dance.VideoClassifier"
DEFAULT_DATA = "lightning_dance.data.SyntheticVideoDataModule"


class DanceCLI(LightningCLI):
    """LightningCLI with model selection and the data's ``num_classes`` linked into the model."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 (jsonargparse parser)
        # applied when the chosen model takes num_classes (VideoClassifier, DANCEWrapper)
        parser.link_arguments(
            "data.num_classes", "model.init_args.num_classes", apply_on="instantiate"
        )


def _cli(args: Sequence[str] | None) -> DanceCLI:
    return DanceCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
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
    if argv and argv[0] == "export":
        export_main(argv[1:])
        return
    with warnings.catch_warnings():
        # main() hands LightningCLI the command line with the default classes added
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        _cli(_with_defaults(argv))


def _with_defaults(argv: list[str]) -> list[str]:
    """The VideoClassifier and the synthetic data unless ``--model`` / ``--data`` is given.

    They are inserted right after the subcommand, so a ``--config`` file (or a later option)
    still overrides them; as command-line values (not parser defaults) their init arguments do
    not leak into another class a config selects.
    """
    if not argv or argv[0] not in TRAINER_COMMANDS:
        return argv
    added = []
    for key, default in (("--model", DEFAULT_MODEL), ("--data", DEFAULT_DATA)):
        if not any(a == key or a.startswith(f"{key}=") for a in argv):
            added += [key, default]
    return argv[:1] + added + argv[1:]


def _export_parser() -> argparse.ArgumentParser:
    from lightning_dance.export.from_checkpoint import AUTO_MODE
    from lightning_dance.export.modes import MODES

    parser = argparse.ArgumentParser(
        prog="lightning-dance export",
        description="Export a dense or DANCE Lightning checkpoint for Jetson / Snapdragon, each "
        "artifact checked against the eager model (manifest.json lists them).",
    )
    parser.add_argument("--ckpt", required=True, help="the .ckpt file (dense or DANCE)")
    parser.add_argument(
        "--format",
        action="append",
        dest="formats",
        metavar="NAME",
        help="an export format (repeatable): onnx, torchscript, qnn, nnapi, executorch or any "
        "registered one; named formats must succeed. Default: every format of --target",
    )
    parser.add_argument(
        "--target",
        action="append",
        dest="targets",
        metavar="NAME",
        help="jetson or snapdragon (repeatable). Default: the targets of --format, else all",
    )
    parser.add_argument(
        "--mode",
        default=AUTO_MODE,
        help=f"{AUTO_MODE} (dense for a dense checkpoint, topk for a topk controller, else "
        f"masked) or one of {', '.join(MODES)}",
    )
    parser.add_argument(
        "--clip-shape",
        type=int,
        nargs=4,
        metavar=("C", "T", "H", "W"),
        help="the exported input shape (batch 1); default: the frames and size of the data "
        "the checkpoint was trained on",
    )
    parser.add_argument("--out", default="export", help="the folder to write (default: export)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (<= 20 for TensorRT)")
    return parser


def export_main(argv: Sequence[str]) -> None:
    """``lightning-dance export``: see :func:`_export_parser` (``--help``)."""
    from lightning_dance.errors import DanceError
    from lightning_dance.export.from_checkpoint import export_checkpoint

    parser = _export_parser()
    args = parser.parse_args(list(argv))
    try:
        result = export_checkpoint(
            args.ckpt,
            formats=args.formats,
            targets=args.targets,
            mode=args.mode,
            clip_shape=args.clip_shape,
            out_dir=args.out,
            overwrite=args.overwrite,
            opset=args.opset,
        )
    except (DanceError, ValueError, FileNotFoundError, FileExistsError) as exc:
        parser.error(str(exc))
    manifest = result.manifest
    print(f"exported {args.ckpt} ({manifest['mode']} mode) to {result.out_dir}")
    for art in manifest["artifacts"]:
        name = f"{art['target']}/{art['format']}"
        if art["status"] == "ok":
            error = art["parity_max_abs_error"]
            parity = "not run here" if error is None else f"max abs error {error:.2e}"
            print(f"  {name}: {art['file']} (parity vs eager: {parity})")
        else:
            print(f"  {name}: skipped ({art['reason']})")


if __name__ == "__main__":
    main()
