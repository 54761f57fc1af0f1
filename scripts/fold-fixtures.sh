#!/usr/bin/env bash
# Regenerates the constant-folding fixtures (tests/fixtures/onnx/{qcdq_nobias_pow2,float_folds,
# ort_qdq_nobias,fold_bad_perm}.onnx and fold_predictions.json) with scripts/fold-fixtures.py: ONNX graphs
# built node by node with the `onnx` package, ONNX Runtime's predictions recorded. Not part
# of the tests (the fixtures are committed). Pinned packages in .cache/gen-venv.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.cache/gen-venv"
if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q onnx==1.17.0 onnxruntime==1.20.1 numpy==2.4.6
cd "$REPO"
"$VENV/bin/python" scripts/fold-fixtures.py "${FHECAM_DATA_DIR:-$REPO/.cache/data}/digits.csv.gz" tests/fixtures/onnx
