#!/bin/sh
# ncu-kernels.sh - on a GPU machine with Nsight Compute, after a build (BUILD, default build/;
# tools/device-build.sh builds into /tmp/devbuild): where each hot kernel stands, from the
# hardware counters of one launch each as bench-gpu runs it at Llama-3.1-8B shapes (32 query
# heads, 8 kv heads, d 128, bf16): the two scoring passes at 128K keys, decode attention over
# 32 layers of a full 128K cache and of a CAKE cache of 1056 tokens, a decode step's eviction
# of 32 layers in one launch. Prints, per kernel: time under the profiler, DRAM throughput,
# tensor pipe, SM throughput, achieved occupancy and issue slots, as % of peak. Logs in $OUT.
# Usage: [BUILD=dir] sh tools/ncu-kernels.sh
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
b=${BUILD:-build}/tools/bench-gpu
mkdir -p "$out"
m=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed
m=$m,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
m=$m,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active
m=$m,smsp__issue_active.avg.pct_of_peak_sustained_active
prof() { # name, kernel regex, launches to skip, bench-gpu args
    name=$1 k=$2 skip=$3
    shift 3
    ncu --clock-control none -k "regex:$k" --launch-skip "$skip" -c 1 --metrics "$m" "$b" "$@" \
        >"$out/ncu-$name.log" 2>&1 || { echo "$name: ncu failed (see $out/ncu-$name.log)"; return; }
    echo "== $name"
    grep -E "^  void |duration|throughput|pipe_tensor|warps_active|issue_active" "$out/ncu-$name.log"
}
prof score-pass1 mpass1 0 --sizes 131072 --reps 1 --no-torch --no-attn --no-caked
prof score-pass2 mpass2 0 --sizes 131072 --reps 1 --no-torch --no-attn --no-caked
# bench-gpu's attention: the full cache on the tensor cores (4 launches at --reps 1), in 64 KiB
# pages (4 more), then the CAKE cache
prof attn-full attn_split_tc 0 --sizes 4096 --reps 1 --no-torch --no-caked
prof attn-cake attn_split_tc 8 --sizes 4096 --reps 1 --no-torch --no-caked
prof evict devict 0 --sizes 4096 --reps 1 --no-torch --no-attn --no-caked
