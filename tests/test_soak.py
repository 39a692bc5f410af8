"""benchmarks/soak.py, short: resident memory stays flat over clips of random sizes through the
masked and compact paths (after the warm-up that fills the per-shape caches)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmRSS from /proc")
def test_soak_short_run_grows_under_20_mb() -> None:
    path = Path(__file__).parents[1] / "benchmarks" / "soak.py"
    spec = importlib.util.spec_from_file_location("soak", path)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    result = soak.run(soak.parse_args(["--clips", "300", "--report-every", "100"]))
    assert result["clips"] == 300 and len(result["trace"]) == 4
    assert result["growth_mb"] < 20, result["trace"]
