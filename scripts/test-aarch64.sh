#!/usr/bin/env bash
# The aarch64 check (the last part of scripts/test.sh, see docs/ARM.md): cross-builds
# fhecam for Debian 12 arm64 (scripts/build-aarch64.sh), runs `fhecam selftest` on the
# aarch64 binary under qemu-aarch64-static with the arm64 sysroot's libraries, then the
# aarch64 integration tests. Leaves the binary at
# target/aarch64-unknown-linux-gnu/release/fhecam (under CARGO_TARGET_DIR when that is
# set). Run as root on Debian 12.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export DEBIAN_FRONTEND=noninteractive
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
SYSROOT="${FHECAM_AARCH64_SYSROOT:-$TARGET_DIR/aarch64-sysroot}"
BIN="$TARGET_DIR/aarch64-unknown-linux-gnu/release/fhecam"

bash scripts/build-aarch64.sh
ls -l "$BIN"
# The camera build carries none of the owner's tools.
owner_tools="$(cargo tree --locked --offline --no-default-features --target aarch64-unknown-linux-gnu -e normal --prefix none | grep -E '^(candle|tract)' | sort -u || true)"
if [[ -n "$owner_tools" ]]; then
    echo "test-aarch64: the camera build depends on owner tools: $owner_tools" >&2
    exit 1
fi
echo "test-aarch64: cargo tree of the camera build has no candle and no tract" >&2

if ! command -v qemu-aarch64-static >/dev/null; then
    echo "test-aarch64: installing qemu-user-static" >&2
    apt-get update
    apt-get install -y --no-install-recommends qemu-user-static
fi

# -L: the arm64 loader, libraries and GStreamer plugins come from the sysroot.
# GST_REGISTRY_FORK=no: scan plugins in-process instead of through gst-plugin-scanner, a
# second aarch64 program qemu-user would not be asked to run.
echo "test-aarch64: qemu-aarch64-static -L $SYSROOT $BIN selftest" >&2
t0=$SECONDS
GST_REGISTRY_FORK=no qemu-aarch64-static -L "$SYSROOT" "$BIN" selftest
echo "test-aarch64: emulated selftest took $((SECONDS - t0)) s" >&2

cargo test --release --locked --test aarch64 -- --ignored
