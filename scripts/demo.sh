#!/usr/bin/env bash
# The README's demo: system setup and data, then owner -> edge -> owner on the reference model.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cargo run --release --locked -- demo "$@"
