#!/bin/sh
# deps.sh - installs the Debian 12 packages caked builds and tests with, if any is missing.
# Needs root (or sudo) only when something must be installed.
set -e
pkgs="build-essential cmake pkg-config liburing-dev libprotobuf-c-dev protobuf-c-compiler libsystemd-dev libjansson-dev libmicrohttpd-dev
      libjemalloc-dev libcriterion-dev python3 python3-numpy python3-venv python3-pip
      python3-setuptools python3-wheel curl dpkg-dev"
missing=""
for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
        missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "deps.sh: installing:$missing"
if [ "$(id -u)" -eq 0 ]; then
    sudo=""
elif command -v sudo >/dev/null 2>&1; then
    sudo="sudo"
else
    echo "deps.sh: need root to run: apt-get install -y$missing" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# shellcheck disable=SC2086
$sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
