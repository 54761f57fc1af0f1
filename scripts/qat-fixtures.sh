#!/usr/bin/env bash
# Regenerates the quantization-aware-trained ONNX fixtures (tests/fixtures/onnx/qat_*.onnx,
# ort_qdq_bn.onnx, qat_accuracy.json) the way model owners make them: Brevitas QAT on the
# digits data exported with export_onnx_qcdq, and ONNX Runtime static quantization (QDQ) of
# a float fixture. Not part of the tests (the fixtures are committed); run it after changing
# scripts/qat-fixtures.py. Needs the float fixtures' calib_x.npy / test_x.npy / digits_bn.onnx
# (scripts/onnx-fixtures.sh).
#
# The Python environment (Debian's PyTorch, pinned Brevitas / ONNX / ONNX Runtime in
# .cache/qat-venv) is scripts/qat-venv.sh's.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="$("$REPO/scripts/qat-venv.sh" | tail -n 1)"

cd "$REPO"
"$PYTHON" scripts/qat-fixtures.py "${FHECAM_DATA_DIR:-$REPO/.cache/data}/digits.csv.gz" tests/fixtures/onnx
