#!/usr/bin/env bash
# Cross-compiles fhecam for aarch64 Debian 12 (bookworm) cameras without docker:
#   target/aarch64-unknown-linux-gnu/release/fhecam
# The arm64 GStreamer/OpenCV libraries come from Debian's own arm64 packages, unpacked into
# a sysroot under target/ (FHECAM_AARCH64_SYSROOT): installing them through multiarch would
# remove the amd64 -dev packages (they are not Multi-Arch: same) and break the native build.
# Idempotent: cached .debs, the unpacked sysroot and cargo's build are reused on reruns.
# Run as root on Debian 12 (apt-get, dpkg --add-architecture). Extra args go to cargo build.
# `source scripts/build-aarch64.sh --env-only` sets up the environment without building.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET=aarch64-unknown-linux-gnu
TRIPLET=aarch64-linux-gnu
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
SYSROOT="${FHECAM_AARCH64_SYSROOT:-$TARGET_DIR/aarch64-sysroot}"
DEB_CACHE="${FHECAM_AARCH64_DEBS:-$TARGET_DIR/aarch64-debs}"
export DEBIAN_FRONTEND=noninteractive

# What the build links against and what `fhecam selftest` needs at run time under qemu
# (videotestsrc/videoconvert/appsink are in gstreamer1.0-plugins-base). libc6-dev: crt
# files and libc for the linker; libstdc++6: OpenCV's C++ runtime.
ARM_PACKAGES=(libc6-dev libstdc++6 libgcc-s1
    libopencv-core-dev libopencv-imgproc-dev libopencv-imgcodecs-dev
    libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev gstreamer1.0-plugins-base)
# Host side: the cross toolchain; clang generates the OpenCV bindings on the host.
HOST_PACKAGES=(gcc-"$TRIPLET" g++-"$TRIPLET" pkg-config clang libclang-dev dpkg-dev)

log() { echo "build-aarch64: $*" >&2; }
# shellcheck source=scripts/apt-ensure.sh
source "$REPO/scripts/apt-ensure.sh"

install_host_packages() {
    apt_ensure build-aarch64 "${HOST_PACKAGES[@]}" || true
    rustup target list --installed | grep -qx "$TARGET" || rustup target add "$TARGET"
}

enable_arm64_lists() {
    if ! dpkg --print-foreign-architectures | grep -qx arm64; then
        log "adding the arm64 architecture to dpkg (package lists only; nothing arm64 is installed)"
        dpkg --add-architecture arm64
    fi
    if ! apt-cache show libc6:arm64 >/dev/null 2>&1; then
        apt-get update
    fi
}

# Every arm64 (or architecture-independent) package the roots depend on, recursively.
# apt-get download does not follow dependencies; Recommends are left out as apt would.
package_closure() {
    local roots=() p names
    for p in "${ARM_PACKAGES[@]}"; do roots+=("$p:arm64"); done
    mapfile -t names < <(apt-cache depends --recurse --no-recommends --no-suggests \
        --no-conflicts --no-breaks --no-replaces --no-enhances "${roots[@]}" |
        grep -E '^[a-z0-9]' | sort -u)
    printf '%s\n' "${names[@]}" | grep ':arm64$' || true
    # A bare name is an amd64 package satisfying a Multi-Arch: foreign dependency (tools
    # such as perl or dpkg, not needed in a sysroot) or an architecture-independent one.
    printf '%s\n' "${names[@]}" | grep -v ':' | xargs -r apt-cache show --no-all-versions 2>/dev/null |
        awk '/^Package:/ { p = $2 } /^Architecture: all/ { print p }' | sort -u
}

# apt-get download --print-uris as "name[:arch] file" lines (nothing for cached files).
deb_files() {
    (cd "$DEB_CACHE" && apt-get download --print-uris "$@") |
        awk '{ gsub("\x27", "", $2); f = $2; n = f; sub("_.*", "", n);
               a = f; sub(".*_", "", a); sub("\\.deb$", "", a);
               print (a == "all" ? n : n ":" a), f }'
}

download_packages() {
    mkdir -p "$DEB_CACHE"
    local pkgs
    mapfile -t pkgs < <(package_closure)
    log "${#pkgs[@]} packages in the arm64 closure"
    # the exact file names of this closure (older versions may linger in the cache)
    # (apt-get download's naming: the epoch's colon is written %3a)
    apt-cache show --no-all-versions "${pkgs[@]}" |
        awk '/^Package:/ { p = $2 } /^Version:/ { v = $2; sub(":", "%3a", v) }
             /^Architecture:/ { print p "_" v "_" $2 ".deb" }' | sort -u >"$DEB_CACHE/closure.list"
    local want=() name file
    while read -r name file; do
        want+=("$name")
    done < <(deb_files "${pkgs[@]}")
    if ((${#want[@]} > 0)); then
        log "downloading ${#want[@]} packages into $DEB_CACHE"
        # -o: the cache is root's, apt's sandbox user could not write it
        (cd "$DEB_CACHE" && apt-get download -o APT::Sandbox::User=root "${want[@]}")
    fi
    local missing
    missing="$(cd "$DEB_CACHE" && while read -r file; do [[ -s "$file" ]] || echo "$file"; done \
        <closure.list)"
    if [[ -n "$missing" ]]; then
        log "not downloaded (check apt's sources and network): $missing"
        return 1
    fi
}

build_sysroot() {
    local stamp="$SYSROOT/.fhecam-closure"
    if [[ -f "$stamp" ]] && cmp -s "$stamp" "$DEB_CACHE/closure.list"; then
        log "sysroot $SYSROOT is up to date"
        return
    fi
    log "unpacking $(wc -l <"$DEB_CACHE/closure.list") packages into $SYSROOT"
    rm -rf "$SYSROOT.tmp"
    mkdir -p "$SYSROOT.tmp"
    while read -r file; do
        dpkg -x "$DEB_CACHE/$file" "$SYSROOT.tmp"
    done <"$DEB_CACHE/closure.list"
    # Absolute symlinks (/usr/lib/x/libfoo.so -> /lib/x/libfoo.so.1) would point into the
    # host; make them relative so they resolve inside the sysroot, wherever it lives.
    local link dest
    while IFS= read -r -d '' link; do
        dest="$(readlink "$link")"
        if [[ "$dest" == /* ]]; then
            ln -sfn "$(realpath -m --relative-to="$(dirname "$link")" "$SYSROOT.tmp$dest")" "$link"
        fi
    done < <(find "$SYSROOT.tmp" -type l -print0)
    # libblas.so.3/liblapack.so.3 are update-alternatives links made by maintainer scripts,
    # which dpkg -x does not run: point them at the reference implementations.
    local libdir="$SYSROOT.tmp/usr/lib/$TRIPLET" alt
    for alt in blas/libblas.so.3 lapack/liblapack.so.3; do
        if [[ -e "$libdir/$alt" && ! -e "$libdir/${alt#*/}" ]]; then
            ln -sfn "$alt" "$libdir/${alt#*/}"
        fi
    done
    cp "$DEB_CACHE/closure.list" "$SYSROOT.tmp/.fhecam-closure"
    rm -rf "$SYSROOT"
    mv "$SYSROOT.tmp" "$SYSROOT"
}

# The environment cargo needs to cross-compile against the sysroot.
cross_env() {
    # next to the sysroot it names, so two sysroots never share a wrapper
    local wrapper="$SYSROOT.linker"
    # The linker resolves libraries and the libc linker script inside the sysroot. The C/C++
    # compilers keep their default sysroot: Debian's cross g++ looks for its C++ headers
    # relative to it.
    cat >"$wrapper.tmp" <<EOF
#!/bin/sh
exec $TRIPLET-gcc --sysroot="$SYSROOT" "\$@"
EOF
    chmod +x "$wrapper.tmp"
    mv "$wrapper.tmp" "$wrapper"
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER="$wrapper"
    export CC_aarch64_unknown_linux_gnu="$TRIPLET-gcc"
    export CXX_aarch64_unknown_linux_gnu="$TRIPLET-g++"
    export AR_aarch64_unknown_linux_gnu="$TRIPLET-ar"
    export PKG_CONFIG_ALLOW_CROSS=1
    export PKG_CONFIG_SYSROOT_DIR="$SYSROOT"
    export PKG_CONFIG_LIBDIR="$SYSROOT/usr/lib/$TRIPLET/pkgconfig:$SYSROOT/usr/share/pkgconfig"
    # The opencv crate takes these instead of pkg-config: only the three modules fhecam
    # uses (Debian's opencv4.pc lists all of them, pulling in VTK, Qt and ffmpeg).
    export OPENCV_LINK_LIBS="opencv_imgcodecs,opencv_imgproc,opencv_core"
    export OPENCV_LINK_PATHS="$SYSROOT/usr/lib/$TRIPLET"
    export OPENCV_INCLUDE_PATHS="$SYSROOT/usr/include/opencv4,$SYSROOT/usr/include/$TRIPLET/opencv4"
    # Host clang must parse the headers as it would natively: no target/sysroot overrides.
    unset OPENCV_CLANG_ARGS
}

main() {
    install_host_packages
    enable_arm64_lists
    # stale package lists name versions the mirror no longer has: refresh them once
    download_packages || { apt-get update && download_packages; }
    build_sysroot
    cross_env
    if [[ "${1:-}" == --env-only ]]; then
        return 0
    fi
    cd "$REPO"
    local t0=$SECONDS
    # The camera's binary: no training (candle) or ONNX import (tract), the owner's tools.
    cargo build --release --locked --target "$TARGET" --no-default-features "$@"
    local bin="$TARGET_DIR/$TARGET/release/fhecam"
    log "built $bin in $((SECONDS - t0)) s ($(stat -c %s "$bin") bytes)"
}

main "$@"
