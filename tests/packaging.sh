#!/bin/sh
# packaging.sh BUILD [units] - `cmake --install` puts caked, cachectl, libcake, its header and
# cake.pc, the systemd units and the sysusers file where a system looks for them, and an
# engine built with `pkg-config --cflags --libs cake` against that prefix starts; with
# "units", systemd-analyze verifies the installed units (exit 77, skipped, without it).
set -e
build=$1
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
cmake --install "$build" --prefix "$root" >/dev/null
for f in bin/caked bin/cachectl lib/libcake.so include/cake/cake.h lib/pkgconfig/cake.pc \
         lib/systemd/system/caked.service lib/systemd/system/caked.socket lib/sysusers.d/caked.conf \
         share/man/man8/caked.8 share/man/man5/caked.conf.5 share/man/man1/cachectl.1; do
    [ -e "$root/$f" ] || { echo "FAIL: $f not installed"; exit 1; }
done
grep -q '^Type=notify$' "$root/lib/systemd/system/caked.service" || { echo "FAIL: not Type=notify"; exit 1; }
grep -q '^ListenStream=/run/caked/caked.sock$' "$root/lib/systemd/system/caked.socket" ||
    { echo "FAIL: the socket unit listens elsewhere"; exit 1; }
# a program built with pkg-config against the installed prefix starts (it did not find
# libcake.so.0 where ldconfig had not been run: cake.pc carries the rpath)
cat >"$root/engine.c" <<'C'
#include <stdio.h>
#include <cake/cake.h>
int main(void)
{
    cake_ctx *c;
    if (cake_create(&c))
        return 1;
    int rc = cake_connect(c, "/nonexistent/caked.sock", 0);
    printf("engine linked against the installed libcake: connect says %s\n", cake_strerror(rc));
    cake_destroy(c);
    return rc ? 0 : 1;
}
C
PKG_CONFIG_PATH="$root/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
export PKG_CONFIG_PATH
# shellcheck disable=SC2046
${CC:-cc} "$root/engine.c" -o "$root/engine" $(pkg-config --cflags --libs cake)
env -u LD_LIBRARY_PATH "$root/engine" || { echo "FAIL: an engine built with pkg-config does not start"; exit 1; }
echo "installed: caked, cachectl, libcake, cake.h, cake.pc, caked.service, caked.socket, sysusers, man pages"
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
