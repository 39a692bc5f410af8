"""benchmarks/device_check.sh: its CPU part (parity of the compact path and the ONNX export)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_cpu_part(tmp_path):
    pytest.importorskip("onnxruntime")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--cpu"],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads((tmp_path / "device_check.json").read_text())
    assert out["ok"] and out["device"] == "cpu" and "median_ms" not in out
    assert out["compact_rel_err"] < 1e-3 and out["onnx_rel_err"] < 1e-3
    assert out["materialized_rel_err"] < 1e-3
    assert out["onnx_provider"] == "CPUExecutionProvider"
    assert 0 < out["onnx_mac_ratio"] < 0.5
    assert out["traffic"]["dense_bytes"] > 0
