#!/usr/bin/env bash
# Sets up the Python environment of the quantization-aware-training scripts
# (scripts/qat-fixtures.sh, scripts/qat-recipe.sh) and prints the venv's python on stdout's
# last line. Idempotent: what is present is left alone.
#
# Debian's PyTorch (python3-torch 1.13, CPU-only) with the system Python; Brevitas, ONNX and
# ONNX Runtime from PyPI, pinned, into a venv under .cache/qat-venv that sees the system
# packages. Brevitas is installed without its declared dependencies (its torch>=1.13 does not
# accept Debian's 1.13.0a0 version string, and pip must not pull a second torch from PyPI).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$REPO/scripts/setup.sh" >&2
# shellcheck source=scripts/apt-ensure.sh
source "$REPO/scripts/apt-ensure.sh"
apt_ensure qat-venv python3-torch python3-numpy python3-venv || true

VENV="$REPO/.cache/qat-venv"
if [[ ! -x "$VENV/bin/python" ]]; then
    /usr/bin/python3 -m venv --system-site-packages "$VENV" >&2
fi
# Keep Debian's numpy (torch is built against it): pip may not replace it in the venv.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
/usr/bin/python3 -c 'import numpy; print("numpy==" + numpy.__version__)' >"$constraints"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints")
"${pip[@]}" --no-deps brevitas==0.13.4 >&2
# Brevitas' runtime dependencies (sympy and typing-extensions come from Debian with torch),
# onnx + onnxoptimizer for its ONNX export, onnxruntime for the exported models' accuracy
# and for static quantization.
"${pip[@]}" dependencies==2.0.1 packaging==26.4 unfoldNd==0.2.3 sympy typing-extensions \
    onnx==1.17.0 onnxoptimizer==0.4.2 protobuf==7.36.2 \
    onnxruntime==1.20.1 coloredlogs==15.0.1 flatbuffers==25.12.19 humanfriendly==10.0 >&2
echo "$VENV/bin/python"
