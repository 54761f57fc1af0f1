#!/usr/bin/env bash
# Prepares a fresh Debian 12 machine (as root, non-interactive) for building and testing
# fhecam: system packages, then the scikit-learn digits data set used for training.
# Idempotent: anything already present is left alone.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA_DIR="${FHECAM_DATA_DIR:-$REPO/.cache/data}"
export DEBIAN_FRONTEND=noninteractive

# System packages the build/tests need; only the missing ones are installed.
# - OpenCV bindings are generated with libclang at build time.
# - GStreamer: the edge daemon's frame source (videotestsrc, filesrc, decoders in -good).
# - mosquitto: the real MQTT broker the integration tests start on a free loopback port.
# - systemd: `systemd-analyze verify` of the shipped unit in the tests.
# - openssl: the CLI makes the CA and certificates of the TLS test (tests/tls.rs).
# - chromium: the cockpit page is loaded in headless Chromium by tests/cockpit.rs.
# - prometheus: its promtool checks the /metrics endpoints (tests/metrics.rs).
APT_PACKAGES=(pkg-config clang libclang-dev libopencv-dev
    libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev
    gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-tools
    mosquitto systemd openssl chromium prometheus)

# shellcheck source=scripts/apt-ensure.sh
source "$REPO/scripts/apt-ensure.sh"
apt_ensure setup "${APT_PACKAGES[@]}" || echo "setup: apt packages present"

# The digits data set (1797 8x8 images) ships inside the scikit-learn wheel; PyPI is the
# only data source reachable from CI, so take it from there rather than from a dataset hub.
DIGITS="$DATA_DIR/digits.csv.gz"
if [[ -s "$DIGITS" ]]; then
    echo "setup: digits data present at $DIGITS"
else
    echo "setup: fetching scikit-learn wheel to extract digits.csv.gz into $DATA_DIR"
    mkdir -p "$DATA_DIR"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" scikit-learn
    wheel="$(find "$tmp" -maxdepth 1 -name '*.whl' | head -n 1)"
    if [[ -z "$wheel" ]]; then
        echo "setup: no scikit-learn wheel downloaded" >&2
        exit 1
    fi
    # Write to a temporary name first so an interrupted run never leaves a truncated file.
    python3 - "$wheel" "$DIGITS.part" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    data = z.read("sklearn/datasets/data/digits.csv.gz")
with open(out, "wb") as f:
    f.write(data)
PY
    mv "$DIGITS.part" "$DIGITS"
    echo "setup: wrote $DIGITS ($(stat -c %s "$DIGITS") bytes)"
fi
