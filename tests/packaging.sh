#!/bin/sh
# packaging.sh BUILD [units] - `cmake --install` puts caked, cachectl, libcake, its header and
# cake.pc, the systemd units and the sysusers file where a system looks for them; with
# "units", systemd-analyze verifies the installed units (exit 77, skipped, without it).
set -e
build=$1
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
cmake --install "$build" --prefix "$root" >/dev/null
for f in bin/caked bin/cachectl lib/libcake.so include/cake/cake.h lib/pkgconfig/cake.pc \
         lib/systemd/system/caked.service lib/systemd/system/caked.socket lib/sysusers.d/caked.conf; do
    [ -e "$root/$f" ] || { echo "FAIL: $f not installed"; exit 1; }
done
grep -q '^Type=notify$' "$root/lib/systemd/system/caked.service" || { echo "FAIL: not Type=notify"; exit 1; }
grep -q '^ListenStream=/run/caked/caked.sock$' "$root/lib/systemd/system/caked.socket" ||
    { echo "FAIL: the socket unit listens elsewhere"; exit 1; }
echo "installed: caked, cachectl, libcake, cake.h, cake.pc, caked.service, caked.socket, sysusers"
[ "$2" = units ] || exit 0
if ! command -v systemd-analyze >/dev/null; then
    echo "SKIP: systemd-analyze not found: the units are not verified"
    exit 77
fi
# the unit names the configured prefix; point it at this install
exe=$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$root/lib/systemd/system/caked.service")
sed -i "s#$exe#$root/bin/caked#" "$root/lib/systemd/system/caked.service"
cd "$root/lib/systemd/system"
systemd-analyze verify ./caked.service ./caked.socket
echo "systemd-analyze verify: caked.service and caked.socket are sound"
