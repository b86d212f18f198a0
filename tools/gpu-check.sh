#!/bin/sh
# gpu-check.sh - on a GPU machine, after a full build (BUILD, default build/; on the lent
# Ubuntu image tools/device-build.sh builds into /tmp/devbuild): the GPU kernel tests, the
# golden replay on the GPU (cases from ../shared/golden, or a copy in .golden),
# compute-sanitizer memcheck and racecheck over the kernel tests and over GPU sequences
# through caked, and the GPU benchmark. Logs go to $OUT (or ./gpu-out).
# Usage: [BUILD=dir] [NOBENCH=1] sh tools/gpu-check.sh [bench-gpu args]
set -e
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
b=${BUILD:-build}
mkdir -p "$out"
nvcc --version | tail -n 2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "== GPU kernel tests"
"$b/tests/test_gpu_kernels" 2>&1 | tee "$out/test.log"
golden=${GOLDEN:-../shared/golden}
[ -d "$golden" ] || golden=.golden # a copy carried to the GPU machine
if [ -d "$golden/cake-parity" ]; then
    echo "== cake-parity --device gpu"
    "$b/tools/cake-parity" --device gpu "$golden/cake-parity" | tail -n 3 | tee "$out/parity.log"
    "$b/tools/cake-parity" --device gpu --mode fixed "$golden/cake-parity" | tail -n 1 | tee -a "$out/parity.log"
else
    echo "== cake-parity --device gpu: skipped (no golden cases: copy ../shared/golden to .golden)"
fi
for tool in memcheck racecheck; do
    echo "== compute-sanitizer $tool"
    compute-sanitizer --tool $tool --error-exitcode 1 "$b/tests/test_gpu_kernels" > "$out/$tool.log" 2>&1 &&
        echo "$tool (kernels): clean" || { echo "$tool (kernels): ERRORS"; tail -n 30 "$out/$tool.log"; }
done
# caked's own launches (GPU sequences): the daemon under memcheck, an engine against it
echo "== compute-sanitizer memcheck: caked with GPU sequences"
CAKE_TEST_CAKED_WRAP="compute-sanitizer --tool memcheck --error-exitcode 1 --log-file $out/memcheck-caked.log" \
    "$b/tests/test_gpu_seq" > "$out/memcheck-seq.log" 2>&1 &&
    grep -q "ERROR SUMMARY: 0 errors" "$out/memcheck-caked.log" &&
    echo "memcheck (caked): clean" || { echo "memcheck (caked): ERRORS"; tail -n 30 "$out/memcheck-caked.log" "$out/memcheck-seq.log"; }
[ "${NOBENCH:-0}" = 1 ] && exit 0 # NOBENCH=1: correctness only
echo "== benchmark"
"$b/tools/bench-gpu" "$@" 2>&1 | tee "$out/bench.log"
