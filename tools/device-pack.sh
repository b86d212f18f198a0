#!/bin/sh
# device-pack.sh - a device call without a build on the device (device-build.sh takes ~150-200
# s of the call there): packs this machine's build of the GPU binaries (build/, configured
# with nvcc for sm_90a, built from a clean tree) into .bin/pack.tar.xz with the commit they
# were built from; the call carries it and unpacks it:
#   here:    sh tools/device-pack.sh [TARGET-PATH ...]   (builds them first)
#   carry:   [".bin/pack.tar.xz", ".golden"]   (64 MiB a call in all)
#   device:  eval "$(sh tools/device-pack.sh --unpack)"; $B/tests/test_gpu_kernels ...
# TARGET-PATHs are paths under build/ (default: device-wgmma.sh's - the GPU tests, bench-gpu,
# cake-parity, caked, cachectl; ~2-5 min here, as xz -9 finds the device code the binaries
# share); each goes stripped (its device code is not a symbol: it stays) with the shared
# libraries it loads from outside the C library, found by ldd. --unpack unpacks to /tmp/pack,
# links this machine's build path there (binaries name caked by it: CAKED_BIN) and ../shared's
# golden cases to a carried .golden, and prints the exports for eval: B (the build) and
# LD_LIBRARY_PATH (the packed libraries first, for the packed binaries' commands only).
set -e
n=
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--unpack" ]; then
    mkdir -p /tmp/pack && tar xJf .bin/pack.tar.xz -C /tmp/pack
    built=$(cat /tmp/pack/BUILD_DIR)
    [ -e "$built" ] || { mkdir -p "$(dirname "$built")" && ln -sfn /tmp/pack/build "$built"; }
    golden=$(dirname "$(dirname "$built")")/shared/golden
    [ -e "$golden" ] || [ ! -d .golden ] || { mkdir -p "$(dirname "$golden")" && ln -sfn "$PWD/.golden" "$golden"; }
    echo "packed at $(cat /tmp/pack/COMMIT)" >&2
    echo "export B=/tmp/pack/build LD_LIBRARY_PATH=/tmp/pack/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
    exit 0
fi
[ -z "$(git status --porcelain --untracked-files=no)" ] || { echo "device-pack: the tree has changes: commit first" >&2; exit 1; }
[ $# -gt 0 ] || set -- tests/test_gpu_kernels tools/bench-gpu tools/cake-parity daemon/caked tools/cachectl \
    tests/test_gpu_seq tests/test_gpu_pressure tests/test_gpu_policies tests/test_gpu_daemon tests/test_gpu_share
for t in "$@"; do n="$n ${t##*/}"; done
cmake --build build -j2 --target $n >/dev/null || { echo "device-pack: the build failed" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/build" "$tmp/lib" .bin
for t in "$@"; do
    [ -x "build/$t" ] || { echo "device-pack: build/$t not built" >&2; exit 1; }
    mkdir -p "$tmp/build/$(dirname "$t")"
    strip -o "$tmp/build/$t" "build/$t"
    # the libraries it loads, but not the C library's own (the device has its own)
    ldd "build/$t" | awk '$3 ~ /^\// {print $3}' | grep -vE '/(libc|libm|libdl|libpthread|librt|ld-linux[^/]*)\.so' |
        while read -r so; do cp -nL "$so" "$tmp/lib/"; done
done
git rev-parse HEAD >"$tmp/COMMIT"
(cd build && pwd) >"$tmp/BUILD_DIR"
XZ_OPT=-9 tar cJf .bin/pack.tar.xz -C "$tmp" .
echo "device-pack: .bin/pack.tar.xz $(du -m .bin/pack.tar.xz | cut -f1) MiB ($*; $(ls "$tmp/lib" | tr '\n' ' '))"
