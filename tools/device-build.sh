#!/bin/sh
# device-build.sh - builds and tests the whole project on a GPU machine that lacks the Debian
# build dependencies (the lent Ubuntu image): Debian 12 packages fetched beforehand with
#   mkdir .debs && (cd .debs && apt-get download liburing2 liburing-dev libprotobuf-c1 \
#     libprotobuf-c-dev protobuf-c-compiler libprotoc32 libprotobuf32 libjemalloc2 \
#     libjemalloc-dev libcriterion3 libcriterion-dev libnanomsg5 libgit2-1.5 libhttp-parser2.9 \
#     libmbedtls14 libmbedx509-1 libmbedcrypto7 libssh2-1 libsystemd-dev libsystemd0 libjansson-dev libjansson4 \
#     libmicrohttpd12 libmicrohttpd-dev)
# are unpacked into a private sysroot (never into /), and the build uses it. Then runs ctest,
# GPU tests included. Logs under $OUT.
set -e
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
root=/tmp/sysroot
mkdir -p "$out" "$root"
out=$(cd "$out" && pwd)
# the golden cases: ../shared/golden here, or a carried copy in .golden
shared=$(cd .. && pwd)/shared
if [ ! -d "$shared/golden" ] && [ -d .golden ]; then
    shared=/tmp/shared && mkdir -p $shared && ln -sfn "$PWD/.golden" $shared/golden
fi
for f in .debs/*.deb; do dpkg -x "$f" "$root"; done
lib=$root/usr/lib/x86_64-linux-gnu
# criterion.pc names private requirements (boxfort, nanomsg, ...) whose .pc files we do not
# carry; the shared library needs none of them at link time
mkdir -p "$root/pc"
printf 'prefix=/usr\nlibdir=${prefix}/lib/x86_64-linux-gnu\nincludedir=${prefix}/include\nName: criterion\nDescription: criterion\nVersion: 2.4.1\nLibs: -L${libdir} -lcriterion\nCflags: -I${includedir}\n' >"$root/pc/criterion.pc"
# the same for libmicrohttpd (its .pc requires gnutls.pc; the shared library finds gnutls itself)
printf 'prefix=/usr\nlibdir=${prefix}/lib/x86_64-linux-gnu\nincludedir=${prefix}/include\nName: libmicrohttpd\nDescription: libmicrohttpd\nVersion: 0.9.75\nLibs: -L${libdir} -lmicrohttpd\nCflags: -I${includedir}\n' >"$root/pc/libmicrohttpd.pc"
export PKG_CONFIG_SYSROOT_DIR=$root PKG_CONFIG_PATH=$root/pc:$lib/pkgconfig:$root/usr/share/pkgconfig
export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} PATH=$root/usr/bin:$PATH
export CFLAGS="-I$root/usr/include" LDFLAGS="-L$lib -Wl,-rpath,$lib"
cmake -S . -B /tmp/devbuild -DCAKE_WERROR=ON -DPython3_EXECUTABLE="$(command -v python3)" \
    -DCAKE_SHARED_DIR="$shared" >"$out/cmake.log" 2>&1 ||
    { tail -n 30 "$out/cmake.log"; exit 1; }
# TARGETS="caked cake": build only those and run no test (what a tool run needs)
cmake --build /tmp/devbuild -j16 ${TARGETS:+--target $TARGETS} >"$out/build.log" 2>&1 ||
    { grep -E "error" -A3 "$out/build.log" | head -40; exit 1; }
[ -z "$TARGETS" ] || exit 0
cd /tmp/devbuild
ctest --output-on-failure -j8 "$@" 2>&1 | tee "$out/ctest.log" | tail -n 40
