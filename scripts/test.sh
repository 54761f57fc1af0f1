#!/usr/bin/env bash
# The project's test command (README, .ci/run): system setup and data, then every test.
# Release: tfhe is only usable optimised, and the demo and the tests share one build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --release --locked --workspace --lib --bins --tests "$@" 2>&1 | tee "$log"
# The ARM camera build: cross-compiled, `fhecam selftest` under qemu, its ELF checked
# (docs/ARM.md; about 11 more minutes cold, 1.5 warm).
bash scripts/test-aarch64.sh 2>&1 | tee -a "$log"
# One closing line over all test binaries (cargo prints one per binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
