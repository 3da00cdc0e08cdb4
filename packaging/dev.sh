#!/usr/bin/env bash
# Sets up a development machine (Debian 12) and runs the demo or the whole test suite.
#   packaging/dev.sh demo [lampyre demo options]   simulated cabinet + agent + buffering + MQTT
#   packaging/dev.sh test [pytest options]         lint, type checks and the whole test suite
# Installs what is missing: Debian packages (python3-venv, mosquitto, mosquitto-clients, and for
# the BLE tests' mock BlueZ dbus, python3-dbus, python3-gi), a virtual env in .venv, the project
# with its test dependencies, and python-dbusmock in .venv/dbusmock (run by Debian's python,
# which has dbus-python; the venv cannot build it). Safe to run again.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
venv="$here/.venv"
# The mock BlueZ (firmware_sim.ble) runs `python3 -m dbusmock` with Debian's python and this
# folder on its PYTHONPATH. >= 0.32.1 is needed for the passive-scanning (monitor) API.
dbusmock_dir="$venv/dbusmock"
dbusmock_version=0.38.1

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_debian_packages() {
    local missing=()
    command -v python3 >/dev/null || missing+=(python3)
    python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
    command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
    command -v mosquitto_sub >/dev/null || missing+=(mosquitto-clients)
    command -v dbus-daemon >/dev/null || [ -x /usr/bin/dbus-daemon ] || missing+=(dbus)
    # Checked for Debian's own python, which runs the mock BlueZ, not for the venv's.
    [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import dbus' 2>/dev/null || missing+=(python3-dbus)
    [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import gi' 2>/dev/null || missing+=(python3-gi)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "installing Debian packages: ${missing[*]}"
        apt_install "${missing[@]}"
    fi
}

ensure_venv() {
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    # Reinstall only when the project's metadata changed since the last install.
    local stamp="$venv/.lampyre-installed" want
    want=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$venv/bin/python" -c 'import agent, drivers, firmware_sim' 2>/dev/null; then
        "$venv/bin/python" -m pip install -q --upgrade pip
        "$venv/bin/python" -m pip install -q -e ".[test]"
        echo "$want" >"$stamp"
    fi
}

ensure_dbusmock() {
    if [ ! -f "$dbusmock_dir/dbusmock/__init__.py" ] ||
        [ ! -d "$dbusmock_dir/python_dbusmock-$dbusmock_version.dist-info" ]; then
        rm -rf "$dbusmock_dir"
        "$venv/bin/python" -m pip install -q --no-deps --target "$dbusmock_dir" \
            "python-dbusmock==$dbusmock_version"
    fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    demo)
        ensure_debian_packages
        ensure_venv
        ensure_dbusmock
        exec "$venv/bin/lampyre" demo "$@"
        ;;
    test)
        ensure_debian_packages
        ensure_venv
        ensure_dbusmock
        echo "== ruff"
        "$venv/bin/ruff" check .
        echo "== mypy"
        "$venv/bin/mypy"
        echo "== pytest"
        exec "$venv/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: packaging/dev.sh demo|test [options]" >&2
        exit 2
        ;;
esac
