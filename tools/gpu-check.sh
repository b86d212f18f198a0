#!/bin/sh
# gpu-check.sh - on a GPU machine: builds the CUDA kernels with their C reference (no other
# dependency), runs the GPU kernel tests, the golden replay on the GPU (cases from
# ../shared/golden, or a copy in .golden), compute-sanitizer memcheck and racecheck, and the
# GPU benchmark. Logs go to $OUT (or ./gpu-out). Usage: sh tools/gpu-check.sh
set -e
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out" /tmp/cakegpu
CUDA=${CUDA_HOME:-/usr/local/cuda}
nvcc --version | tail -n 2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
for k in score attn; do
    nvcc -arch=sm_90 -O3 -lineinfo -std=c++17 -Ikernels -c kernels/$k.cu -o /tmp/cakegpu/$k.o
done
CFLAGS="-O3 -march=native -fopenmp -std=gnu11 -Ikernels -Itools -I$CUDA/include"
LIBS="/tmp/cakegpu/score.o /tmp/cakegpu/attn.o -L$CUDA/lib64 -lcudart -lstdc++ -lm"
KSRC="kernels/dtype.c kernels/score.c kernels/score_ref.c kernels/select.c kernels/compact.c"
gcc $CFLAGS $KSRC tests/gpu/test_gpu_kernels.c $LIBS -o /tmp/cakegpu/test_gpu_kernels
gcc $CFLAGS -DCAKE_TOOLS_DIR="\"$PWD/tools\"" $KSRC tools/bench-gpu.c $LIBS -o /tmp/cakegpu/bench-gpu
gcc $CFLAGS kernels/gpupool.c tests/gpu/test_gpupool.c -L$CUDA/lib64 -lcudart \
    -o /tmp/cakegpu/test_gpupool
gcc $CFLAGS -DCAKE_HAVE_CUDA -Idaemon $KSRC daemon/policy.c daemon/cakeseq.c tools/golden.c \
    tools/cake-parity.c $LIBS -o /tmp/cakegpu/cake-parity
echo "== GPU pool across processes"
/tmp/cakegpu/test_gpupool 2>&1 | tee "$out/pool.log"
echo "== GPU kernel tests"
/tmp/cakegpu/test_gpu_kernels 2>&1 | tee "$out/test.log"
golden=${GOLDEN:-../shared/golden}
[ -d "$golden" ] || golden=.golden # a copy carried to the GPU machine
if [ -d "$golden/cake-parity" ]; then
    echo "== cake-parity --device gpu"
    /tmp/cakegpu/cake-parity --device gpu "$golden/cake-parity" | tail -n 3 | tee "$out/parity.log"
    /tmp/cakegpu/cake-parity --device gpu --mode fixed "$golden/cake-parity" | tail -n 1 | tee -a "$out/parity.log"
else
    echo "== cake-parity --device gpu: skipped (no golden cases: copy ../shared/golden to .golden)"
fi
echo "== compute-sanitizer memcheck"
compute-sanitizer --tool memcheck --error-exitcode 1 /tmp/cakegpu/test_gpu_kernels > "$out/memcheck.log" 2>&1 &&
    echo "memcheck: clean" || { echo "memcheck: ERRORS"; tail -n 30 "$out/memcheck.log"; }
echo "== compute-sanitizer racecheck"
compute-sanitizer --tool racecheck --error-exitcode 1 /tmp/cakegpu/test_gpu_kernels > "$out/racecheck.log" 2>&1 &&
    echo "racecheck: clean" || { echo "racecheck: ERRORS"; tail -n 30 "$out/racecheck.log"; }
[ "${NOBENCH:-0}" = 1 ] && exit 0 # NOBENCH=1: correctness only
echo "== benchmark"
/tmp/cakegpu/bench-gpu "$@" 2>&1 | tee "$out/bench.log"
