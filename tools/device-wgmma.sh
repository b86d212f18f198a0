#!/bin/sh
# device-wgmma.sh - the wgmma passes on a GPU machine (Hopper, sm_90a): the standalone pass-2
# prototype's check and timing (tools/wgp2.cu, its stage/occupancy variants), the GPU kernel
# tests' subset, golden parity, then CAKE_WGMMA=0/1 side by side in bench-gpu and through
# caked, then the GPU sequence tests; NCU=1 adds tools/ncu-kernels.sh for the wgmma kernels;
# SIDES="0 1" runs the kernels' side by side once (default twice), CAKED_SIDES="1" caked's
# with wgmma alone; MPS=1 adds caked's run under MPS, traced; CTEST_S, KTEST_S: the GPU
# tests' and the kernel tests' limits in seconds (a slow host's kernel subset needs ~250);
# TMA_SIDES="1 0": the kernels with CAKE_TMA=1/0 side by side (stages by TMA or cp.async).
# NO_WGP2=1 leaves the prototype out.
# Device tool: carry .debs and .golden; logs under $OUT. Or, without a build there (~150-200
# s saved): `sh tools/device-pack.sh` here (its default targets are this script's) and carry
# .bin/pack.tar.xz and .golden.
t0=$(date +%s)
nvidia-smi --query-gpu=name --format=csv,noheader
if [ -f .bin/pack.tar.xz ]; then # this machine's build, packed (device-pack.sh)
  eval "$(sh tools/device-pack.sh --unpack)" && echo 0 > /tmp/build.rc
else # the project builds (CPU) while the prototype runs (GPU)
  (OUT=/tmp/dbl TARGETS="test_gpu_kernels test_gpu_seq test_gpu_pressure test_gpu_policies test_gpu_daemon test_gpu_share bench-gpu caked cake cachectl cake-parity" sh tools/device-build.sh > /tmp/devbuild.txt 2>&1; echo $? > /tmp/build.rc) &
  B=/tmp/devbuild
fi
[ -n "${NO_WGP2:-}" ] || { nvcc -O2 -std=c++17 -gencode arch=compute_90a,code=sm_90a -o /tmp/wgp2 tools/wgp2.cu && timeout 150 /tmp/wgp2 2>&1 | tee $OUT/wgp2.txt; }
wait
[ "$(cat /tmp/build.rc)" = 0 ] || { cat /tmp/devbuild.txt; tail -30 /tmp/dbl/build.log; echo build failed; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
(CAKE_GPU_TEST_QUICK=1 timeout ${KTEST_S:-200} $B/tests/test_gpu_kernels > $OUT/kernels.log 2>&1; echo "kernels rc=$?"; grep -E "FAIL|subset|illegal|DIFFER|mode=" $OUT/kernels.log | cut -c1-200 | head -12)
for m in parity fixed; do timeout 60 $B/tools/cake-parity --mode $m --device gpu .golden/cake-parity > /tmp/parity-$m.log 2>&1; echo "parity $m rc=$? $(tail -1 /tmp/parity-$m.log)"; done; cat /tmp/parity-*.log > $OUT/parity.log
for v in ${SIDES:-0 1 0 1}; do
  CAKE_WGMMA=$v timeout 90 $B/tools/bench-gpu --sizes 32768,131072 --reps 5 --no-attn --no-torch --no-caked > /tmp/bs-$v.log 2>&1
  echo "== wgmma $v rc=$?"; grep -E "^ +(32768|131072)|one launch \(kern|carrying the rows|filling its holes \(|given the newest row's \(" /tmp/bs-$v.log | cut -c1-190
done
# TMA_SIDES="1 0": pass 2's stages by TMA and by cp.async side by side (CAKE_TMA), wgmma on
for t in ${TMA_SIDES:-}; do
  CAKE_TMA=$t timeout 90 $B/tools/bench-gpu --sizes 32768,131072 --reps 5 --no-attn --no-torch --no-caked > /tmp/bt-$t.log 2>&1
  echo "== tma $t rc=$?"; grep -E "^ +(32768|131072)|one launch \(kern|carrying the rows|filling its holes \(|given the newest row's \(" /tmp/bt-$t.log | cut -c1-190
  cp /tmp/bt-$t.log $OUT/
done
for v in ${CAKED_SIDES:-0 1}; do
  CAKE_WGMMA=$v timeout 100 $B/tools/bench-gpu --sizes 4096 --reps 5 --no-attn --no-torch --decode-lse > /tmp/bc-$v.log 2>&1
  echo "== caked wgmma $v rc=$?"; grep -E "observe round trip|engine's log-sum-exps \(cake|decode step|idle on the GPU" /tmp/bc-$v.log | cut -c1-200
done
# MPS=1: the same through caked with both processes in one GPU context (MPS), traced
if [ -n "${MPS:-}" ]; then
  nvidia-cuda-mps-control -d && sleep 1
  CAKED_TRACE=1 BENCH_CAKED_LOG=$OUT/caked-mps.log timeout 100 $B/tools/bench-gpu --sizes 4096 --reps 5 --no-attn --no-torch --decode-lse > /tmp/bc-mps.log 2>&1
  echo "== caked under MPS, traced rc=$?"; grep -E "observe round trip|account|engine's log-sum-exps \(cake|decode step|idle on the GPU" /tmp/bc-mps.log | cut -c1-200
  echo quit | nvidia-cuda-mps-control
fi
cp /tmp/bs-*.log /tmp/bc-*.log $OUT/
if [ -f $B/CTestTestfile.cmake ]; then
  (cd $B && CACHECTL_BIN=$B/tools/cachectl timeout ${CTEST_S:-150} ctest -R "gpu\.(sequences|pressure|policies|daemon|share)" > /tmp/ctest.log 2>&1; echo "ctest rc=$?"; grep -E "FAIL|tests passed" /tmp/ctest.log | cut -c1-200 | head -6)
else # packed: the same tests' binaries, as ctest runs them (77: skipped)
  for t in seq pressure policies daemon share; do
    CACHECTL_BIN=$B/tools/cachectl timeout ${CTEST_S:-150} $B/tests/test_gpu_$t > /tmp/ctest-$t.log 2>&1; echo "gpu $t rc=$? $(tail -1 /tmp/ctest-$t.log | cut -c1-150)"
  done
fi
# NCU=1: where the wgmma kernels stand (Nsight Compute, stall reasons)
[ -z "${NCU:-}" ] || { OUT=/tmp/ncu BUILD=$B STALLS=1 ONLY="score-pass1 score-pass2 evict" timeout 150 sh tools/ncu-kernels.sh > $OUT/ncu.txt 2>&1; tail -60 $OUT/ncu.txt | cut -c1-160; }
# the logs in one file (a call brings back at most 8)
(cd $OUT && tar czf logs.tgz *.log && rm -f *.log)
echo "all $(( $(date +%s) - t0 )) s"
