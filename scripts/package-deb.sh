#!/usr/bin/env bash
# Builds the Debian 12 package of the camera daemon for one architecture:
#   scripts/package-deb.sh amd64|arm64   ->  target/deb/fhecam_<version>_<arch>.deb
# amd64 packages target/release/fhecam, arm64 target/aarch64-unknown-linux-gnu/release/fhecam
# (either is built first if missing). Contents: /usr/bin/fhecam, the systemd unit,
# /etc/fhecam/edge.toml (a conffile: local edits survive upgrades), the README.
# The state directory /var/lib/fhecam is not shipped: the unit's DynamicUser= +
# StateDirectory= make systemd create it (as /var/lib/private/fhecam) on first start, and
# it would move a dpkg-owned directory away. A purge removes it.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
ARCH="${1:-}"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"
case "$ARCH" in
amd64) BIN="$TARGET_DIR/release/fhecam" STRIP=strip LIBDIR=x86_64-linux-gnu ;;
arm64) BIN="$TARGET_DIR/aarch64-unknown-linux-gnu/release/fhecam" STRIP=aarch64-linux-gnu-strip
    LIBDIR=aarch64-linux-gnu ;;
*)
    echo "usage: $0 amd64|arm64" >&2
    exit 2
    ;;
esac
# the project's identity as git records it, unless given
MAINTAINER="${FHECAM_DEB_MAINTAINER:-$(git log -1 --format='%an <%ae>' 2>/dev/null)}"
STAMP="$(git log -1 --format=%ct 2>/dev/null || date +%s)"
VERSION="$(awk -F'"' '/^version *=/ { print $2; exit }' Cargo.toml)"
DEB_CACHE="${FHECAM_AARCH64_DEBS:-$TARGET_DIR/aarch64-debs}"

if [[ ! -x "$BIN" ]]; then
    if [[ "$ARCH" == arm64 ]]; then bash scripts/build-aarch64.sh; else cargo build --release --locked; fi
fi

# The package providing a shared library, and its version, as "package version".
owner_amd64() {
    local pkg
    pkg="$(dpkg-query -S "/usr/lib/$LIBDIR/$1" "/lib/$LIBDIR/$1" 2>/dev/null | head -n 1 | cut -d: -f1)"
    [[ -n "$pkg" ]] && echo "$pkg $(dpkg-query -W -f='${Version}' "$pkg:amd64")"
}
# arm64 libraries are not installed on the build host: look them up in the sysroot's .debs.
owner_arm64() {
    local index="$DEB_CACHE/libraries.index"
    if [[ ! -s "$index" || "$index" -ot "$DEB_CACHE/closure.list" ]]; then
        while read -r file; do
            local pv
            # shellcheck disable=SC2016 # dpkg-deb's fields, not shell variables
            pv="$(dpkg-deb --show --showformat='${Package} ${Version}' "$DEB_CACHE/$file")"
            # only the loader's directories: plugins and private libraries are not linked
            dpkg-deb -c "$DEB_CACHE/$file" |
                awk -v pv="$pv" '$6 ~ "^\\./(usr/)?lib/'"$LIBDIR"'/[^/]+\\.so[.0-9]*$" {
                    n = $6; sub(".*/", "", n); print n, pv }'
        done <"$DEB_CACHE/closure.list" >"$index.tmp"
        mv "$index.tmp" "$index"
    fi
    awk -v so="$1" '$1 == so { print $2, $3; exit }' "$index"
}

# Depends: the package of every library the binary links (DT_NEEDED), at least the upstream
# version it was built against (the camera runs the same Debian release).
depends=()
while read -r so; do
    ov="$(owner_"$ARCH" "$so")" || true
    if [[ -z "$ov" ]]; then
        echo "package-deb: no $ARCH package provides $so (needed by $BIN)" >&2
        exit 1
    fi
    read -r pkg ver <<<"$ov"
    depends+=("$pkg (>= ${ver%-*})")
done < <(readelf -d "$BIN" | awk '/\(NEEDED\)/ { gsub(/[][]/, "", $5); print $5 }')
# GStreamer plugins are loaded at run time, not linked: videoconvert (-base), v4l2src (-good).
DEPENDS="$(printf '%s\n' "${depends[@]}" gstreamer1.0-plugins-base | sort -u | paste -sd, | sed 's/,/, /g')"

STAGE="target/deb/fhecam_${VERSION}_${ARCH}"
rm -rf "$STAGE"
install -d -m 0755 "$STAGE/DEBIAN" "$STAGE/usr/bin" "$STAGE/lib/systemd/system" \
    "$STAGE/etc/fhecam" "$STAGE/usr/share/doc/fhecam"
"$STRIP" --strip-unneeded -o "$STAGE/usr/bin/fhecam" "$BIN"
chmod 0755 "$STAGE/usr/bin/fhecam"
install -m 0644 systemd/fhecam.service "$STAGE/lib/systemd/system/fhecam.service"
install -m 0644 config/edge.example.toml "$STAGE/etc/fhecam/edge.toml"
# the unit's Documentation= points here
install -m 0644 README.md "$STAGE/usr/share/doc/fhecam/README.md"
cat >"$STAGE/usr/share/doc/fhecam/copyright" <<COPY
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: fhecam

Files: *
Copyright: $(date -u -d "@$STAMP" +%Y) fhecam authors
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPY
printf 'fhecam (%s) stable; urgency=medium\n\n  * Package built by scripts/package-deb.sh.\n\n -- %s  %s\n' \
    "$VERSION" "$MAINTAINER" "$(date -R -d "@$STAMP")" |
    gzip -9n >"$STAGE/usr/share/doc/fhecam/changelog.gz"
chmod 0644 "$STAGE/usr/share/doc/fhecam/"*

echo /etc/fhecam/edge.toml >"$STAGE/DEBIAN/conffiles"
cat >"$STAGE/DEBIAN/control" <<CONTROL
Package: fhecam
Version: $VERSION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
Depends: $DEPENDS
Recommends: gstreamer1.0-plugins-good
Section: video
Priority: optional
Description: encrypted-model CNN inference for city cameras
 The camera daemon of fhecam: frames from a GStreamer pipeline run through a
 neural network whose every weight is encrypted with TFHE; encrypted results are
 published over MQTT. Configure /etc/fhecam/edge.toml, install the owner's
 model.bundle and owner.pub, check with \`fhecam validate\` and \`fhecam selftest\`,
 then \`systemctl enable --now fhecam\`.
CONTROL
# Not started on install: the daemon needs the owner's bundle and key first. An upgrade
# restarts a running daemon on the new binary.
cat >"$STAGE/DEBIAN/postinst" <<'SH'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
    if [ -n "$2" ]; then
        deb-systemd-invoke try-restart fhecam.service >/dev/null || true
    else
        echo "fhecam: configure /etc/fhecam/edge.toml and its bundle, run 'fhecam selftest', then 'systemctl enable --now fhecam'"
    fi
fi
SH
cat >"$STAGE/DEBIAN/prerm" <<'SH'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    deb-systemd-invoke stop fhecam.service >/dev/null || true
fi
SH
cat >"$STAGE/DEBIAN/postrm" <<'SH'
#!/bin/sh
set -e
if [ "$1" = purge ]; then
    # the outbox systemd created for the DynamicUser= service, and `systemctl enable`'s link
    rm -rf /var/lib/private/fhecam /var/lib/fhecam
    rm -f /etc/systemd/system/multi-user.target.wants/fhecam.service
fi
if [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
SH
chmod 0755 "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/prerm" "$STAGE/DEBIAN/postrm"

mkdir -p target/deb
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "target/deb/fhecam_${VERSION}_${ARCH}.deb" >/dev/null
echo "target/deb/fhecam_${VERSION}_${ARCH}.deb ($(stat -c %s "target/deb/fhecam_${VERSION}_${ARCH}.deb") bytes)"
echo "Depends: $DEPENDS"
