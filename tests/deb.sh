#!/bin/sh
# deb.sh SRC WORKDIR - the Debian package: tools/deb.sh builds it; its control names the
# libraries the binaries link; dpkg installs it into a fresh root (its own dpkg database,
# maintainer scripts run with DPKG_ROOT, so this system is untouched) with the files where a
# Debian system looks for them and the caked user made there by systemd-sysusers; caked
# started by the installed unit's ExecStart line (paths moved into the root, the socket into
# a temporary directory) serves the installed cachectl and an engine built with the
# installed cake.pc; SIGTERM stops it with status 0; dpkg removes every file again.
# Exit 77 (skipped) without dpkg-deb or dpkg-shlibdeps.
set -eu
src=$1 work=$2
for t in dpkg dpkg-deb dpkg-shlibdeps; do
    command -v $t >/dev/null 2>&1 || { echo "SKIP: $t not found (apt-get install dpkg-dev)"; exit 77; }
done
fail() { echo "FAIL: $*"; [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null; exit 1; }
CAKE_CUDA=${CAKE_CUDA:-OFF} sh "$src/tools/deb.sh" "$work/pkg" >/dev/null ||
    fail "tools/deb.sh did not build the package: $(tail -n 20 "$work/pkg/deb.log")"
deb=$(ls "$work"/pkg/caked_*.deb)
depends=$(dpkg-deb -f "$deb" Depends)
for lib in libprotobuf-c1 liburing2 libjemalloc2 libsystemd0 libmicrohttpd12 libjansson4 libc6; do
    echo "$depends" | grep -q "$lib" || fail "Depends lacks $lib: $depends"
done
root=$(mktemp -d /tmp/caked-deb-XXXXXX)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates" "$root/etc"
touch "$root/var/lib/dpkg/status"
# the root has no libraries of its own: dependencies are this system's (--force-depends)
dpkg --root="$root" --force-depends --force-script-chrootless --log=/dev/null -i "$deb" \
    >"$root/dpkg.log" 2>&1 || fail "dpkg -i: $(cat "$root/dpkg.log")"
dpkg --root="$root" -s caked | grep -q '^Status: install ok installed' || fail "not installed"
for f in usr/bin/caked usr/bin/cachectl usr/lib/libcake.so.0 usr/include/cake/cake.h \
         usr/lib/pkgconfig/cake.pc usr/lib/systemd/system/caked.service \
         usr/lib/systemd/system/caked.socket usr/lib/sysusers.d/caked.conf \
         usr/share/man/man8/caked.8 usr/share/man/man5/caked.conf.5 usr/share/man/man1/cachectl.1; do
    [ -e "$root/$f" ] || fail "/$f not installed"
done
if command -v systemd-sysusers >/dev/null 2>&1; then
    grep -q '^caked:' "$root/etc/passwd" || fail "postinst made no caked user in the root"
fi
# caked through the unit's command line: ExecStart with $CAKED_OPTS expanded as systemd
# does (word split), the paths moved into the root, the socket into a temporary directory,
# the group one this user is in (no caked group here)
unit=$root/usr/lib/systemd/system/caked.service
line=$(sed -n 's/^ExecStart=//p' "$unit")
case $line in /usr/bin/caked\ *) ;; *) fail "ExecStart runs something else: $line" ;; esac
sock=$root/run/caked.sock
mkdir -p "$root/run"
CAKED_OPTS="--host-pool 64M --workers 2"
cmd=$(echo "$line" | sed -e "s#^/usr/bin/caked#$root/usr/bin/caked#" \
    -e "s#/run/caked/caked.sock#$sock#" -e "s#--socket-group caked#--socket-group $(id -gn)#" \
    -e "s#\$CAKED_OPTS#$CAKED_OPTS#")
# shellcheck disable=SC2086
$cmd >"$root/caked.log" 2>&1 &
pid=$!
i=0
until "$root/usr/bin/cachectl" --socket "$sock" status >/dev/null 2>&1; do
    i=$((i + 1))
    [ $i -gt 200 ] && fail "caked from the package did not start: $(cat "$root/caked.log")"
    kill -0 "$pid" 2>/dev/null || fail "caked exited: $(cat "$root/caked.log")"
    sleep 0.05
done
"$root/usr/bin/cachectl" --socket "$sock" --json status | python3 -c '
import json, sys
d = json.load(sys.stdin)
assert d["pool_bytes"] == 64 << 20, d' || fail "cachectl --json status"
cat >"$root/engine.c" <<'C'
#include <stdio.h>
#include <cake/cake.h>
int main(int argc, char **argv)
{
    cake_ctx *c;
    int rc = cake_create(&c);
    if (!rc)
        rc = cake_connect(c, argv[1], 1);
    if (!rc)
        rc = cake_ping(c);
    printf("engine on the packaged libcake: %s\n", cake_strerror(rc));
    cake_destroy(c);
    return rc != 0;
}
C
# shellcheck disable=SC2046
${CC:-cc} "$root/engine.c" -o "$root/engine" \
    $(PKG_CONFIG_PATH="$root/usr/lib/pkgconfig" PKG_CONFIG_SYSTEM_INCLUDE_PATH= pkg-config --cflags --libs cake) ||
    fail "an engine does not build against the package"
env -u LD_LIBRARY_PATH "$root/engine" "$sock" || fail "the engine could not talk to caked"
used=$(ldd "$root/engine" | sed -n 's/.*libcake.so.0 => \([^ ]*\).*/\1/p')
[ "$(readlink -f "$used")" = "$(readlink -f "$root/usr/lib/libcake.so.0")" ] ||
    fail "the engine runs another libcake: $used"
kill -TERM "$pid"
wait "$pid" || fail "caked exited with $? on SIGTERM"
pid=""
dpkg --root="$root" --force-depends --force-script-chrootless --log=/dev/null -r caked \
    >"$root/dpkg.log" 2>&1 || fail "dpkg -r: $(cat "$root/dpkg.log")"
left=$(cd "$root" && find usr -type f 2>/dev/null | head -5)
[ -z "$left" ] || fail "dpkg -r left files: $left"
echo "caked.deb ($depends) installs into a fresh root, serves through its unit's command line, removes cleanly"
