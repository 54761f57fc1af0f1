#!/usr/bin/env bash
# The project's test command (README, .ci/run): system setup and data, then every test.
# Release: tfhe is only usable optimised, and the demo and the tests share one build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cargo test --release --locked "$@"
