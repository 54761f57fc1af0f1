#!/usr/bin/env bash
# The project's test command (README, .ci/run): system setup and data, then every test.
# Dev profile with dependencies at opt-level 3 (Cargo.toml): tfhe runs at full speed and
# the demo shares the same build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cargo test --locked "$@"
