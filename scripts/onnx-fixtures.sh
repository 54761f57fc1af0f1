#!/usr/bin/env bash
# Regenerates the ONNX test fixtures (tests/fixtures/onnx) the way model owners make them:
# PyTorch training on the digits data, then torch.onnx.export. Not part of the tests (the
# fixtures are committed); run it after changing scripts/onnx-fixtures.py.
# Uses Debian's PyTorch (python3-torch, CPU-only) with the system Python.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO/scripts/setup.sh"
missing=()
for pkg in python3-torch python3-numpy; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]} > 0)); then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
cd "$REPO"
/usr/bin/python3 scripts/onnx-fixtures.py "${FHECAM_DATA_DIR:-$REPO/.cache/data}/digits.csv.gz" tests/fixtures/onnx
