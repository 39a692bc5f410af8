"""Helpers of the 2-process CPU DDP tests (gloo).

Lightning's ``strategy="ddp"`` re-launches the running *script* for the other ranks, so a DDP
test runs its training in a subprocess executing the test file itself (its ``__main__``), never
inside pytest: :func:`run_ddp_script` starts it and collects what each rank saved with
:func:`save_rank`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

WORLD_SIZE = 2


def ddp_trainer(**kw: Any) -> L.Trainer:
    """A quiet 2-process CPU DDP Trainer."""
    base = dict(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**base, **kw})


def save_rank(trainer: L.Trainer, state: dict[str, Any], out: Path) -> None:
    torch.save(state, Path(out) / f"rank{trainer.global_rank}.pt")


def run_ddp_script(script: str, out: Path, timeout: float = 300) -> list[dict[str, Any]]:
    """Run ``python script out`` (which trains under DDP and calls :func:`save_rank`) and
    return every rank's saved state, rank 0 first."""
    # the script's sys.path starts at tests/: put this checkout's package first, so that the
    # ranks import the code under test (not another installed copy)
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, script, str(out)], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [Path(out) / f"rank{r}.pt" for r in range(WORLD_SIZE)]
    deadline = time.time() + 60  # rank 1 is a child of rank 0 and may finish a bit later
    while not all(f.exists() for f in files) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(0.5)
    return [torch.load(f) for f in files]
