#!/usr/bin/env bash
# Trains the recipe's fhecam-friendly CNN (examples/qat/train_digits.py; docs/IMPORT.md,
# "Bringing a model that is cheap to encrypt") on the digits data with Brevitas, exports it
# with and without biases, and records ONNX Runtime's accuracy and test predictions:
#   tests/fixtures/onnx/recipe_cnn_2bit.onnx          (with biases)
#   tests/fixtures/onnx/recipe_cnn_2bit_nobias.onnx   (--no-bias)
#   tests/fixtures/onnx/recipe_predictions.json
# Not part of the tests or CI (the fixtures are committed). Extra arguments go to the
# training script (e.g. --channels 16); OUT=dir writes elsewhere.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="$("$REPO/scripts/qat-venv.sh" | tail -n 1)"
OUT="${OUT:-$REPO/tests/fixtures/onnx}"
DIGITS="${FHECAM_DATA_DIR:-$REPO/.cache/data}/digits.csv.gz"
cd "$REPO"
mkdir -p "$OUT"
rm -f "$OUT/recipe_predictions.json"
for variant in "recipe_cnn_2bit" "recipe_cnn_2bit_nobias --no-bias"; do
    read -r name flags <<<"$variant"
    # shellcheck disable=SC2086
    "$PYTHON" examples/qat/train_digits.py "$DIGITS" --out "$OUT/$name.onnx" $flags \
        --fixtures tests/fixtures/onnx --report "$OUT/recipe_predictions.json" "$@"
done
cat <<MSG
next:
  fhecam import $OUT/recipe_cnn_2bit.onnx --calibration tests/fixtures/onnx/calib_x.npy --out recipe.json
  fhecam plan recipe.json --input-mode device-clear
  fhecam eval recipe.json --data tests/fixtures/onnx/test_x.npy --labels tests/fixtures/onnx/test_y.txt --onnx $OUT/recipe_cnn_2bit.onnx
  fhecam bench --model recipe.json --samples 1 --input-mode device-clear
MSG
