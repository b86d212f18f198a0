#!/bin/sh
# deb.sh [OUTDIR] - builds the Debian package (caked_VERSION_ARCH.deb) in OUTDIR (default
# build-deb/): a Release build for any x86-64 of the architecture (no -march=native),
# installed under /usr, packed by cpack with dependencies from dpkg-shlibdeps (dpkg-dev).
# CUDA follows nvcc as in any build (CAKE_CUDA=OFF in the environment leaves it out).
set -e
cd "$(dirname "$0")/.."
out=${1:-build-deb}
mkdir -p "$out"
log=$out/deb.log
cmake -S . -B "$out" -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=/usr -DCAKE_NATIVE=OFF \
    -DCAKE_TESTS=OFF -DCAKE_CUDA="${CAKE_CUDA:-ON}" -DCAKE_WERROR=ON >"$log" 2>&1 || { tail -n 30 "$log"; exit 1; }
cmake --build "$out" -j"$(nproc)" >>"$log" 2>&1 || { grep -E "error" -A3 "$log" | head -40; exit 1; }
(cd "$out" && cpack -G DEB) >>"$log" 2>&1 || { tail -n 30 "$log"; exit 1; }
ls "$out"/caked_*.deb
