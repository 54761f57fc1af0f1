# Sourced by the project's scripts (setup.sh, build-aarch64.sh, qat-venv.sh):
#   apt_ensure WHO PACKAGE...
# installs those of the Debian packages that are missing (as root, non-interactive) and
# says so on stderr under WHO's name; returns 1 when all were present already.
apt_ensure() {
    local who="$1" pkg
    shift
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$pkg")
    done
    ((${#missing[@]} > 0)) || return 1
    echo "$who: installing apt packages: ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
}
