#!/usr/bin/env bash
# Device check (< 8 minutes): parity of the compact path and the exported ONNX (topk), and, with
# CUDA, batch-1 GPU latency of dense vs compact vs exported topk (onnxruntime CUDA provider if
# installed, else the JSON says so). Without CUDA: the CPU part only (parity, tiny sizes), as
# tests/test_device_check.py runs it in CI. Details: benchmarks/device_check.py.
#
# Usage (from the repository root):
#   bash benchmarks/device_check.sh            # results: stdout, and $OUT/device_check.json if $OUT is set
#   PYTHON=.venv/bin/python bash benchmarks/device_check.sh --cpu
# Exit status: 0 when every relative error is <= 1e-3, 1 otherwise, 124 on the 7.5-minute timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
args=("$@")
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  args+=(--json "$OUT/device_check.json")
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
"$PYTHON" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" \
  || echo "onnxruntime not installed: the ONNX parity check will fail"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec timeout 450 "$PYTHON" benchmarks/device_check.py "${args[@]}"
