#!/bin/sh
# ncu-kernels.sh - on a GPU machine with Nsight Compute, after a build (BUILD, default build/;
# tools/device-build.sh builds into /tmp/devbuild): where each hot kernel stands, from the
# hardware counters of one launch each as bench-gpu runs it at Llama-3.1-8B shapes (32 query
# heads, 8 kv heads, d 128, bf16): the two scoring passes at 128K keys, decode attention over
# 32 layers of a full 128K cache and of a CAKE cache of 1056 tokens, a decode step's eviction
# of 32 layers in one launch. Prints, per kernel: time under the profiler, DRAM throughput,
# tensor pipe, SM throughput, achieved occupancy and issue slots, as % of peak; with STALLS=1
# also why warps wait (stall reasons per issued instruction: long/short scoreboard, barrier,
# wait, math pipe, ...) and the special-function pipe's share. A cascading stage's launches over
# one 32K layer (select, gather, scatter) come last. Logs in $OUT.
# Usage: [BUILD=dir] [STALLS=1] [ONLY="score-pass1 evict ..."] sh tools/ncu-kernels.sh
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
b=${BUILD:-build}/tools/bench-gpu
mkdir -p "$out"
m=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed
m=$m,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
m=$m,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active
m=$m,smsp__issue_active.avg.pct_of_peak_sustained_active
[ -n "${STALLS:-}" ] && # (the regex entry first, as ncu was given it when these were read)
    m=regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio,$m,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active
prof() { # name, kernel regex, launches to skip, bench-gpu args
    name=$1 k=$2 skip=$3
    case " ${ONLY:-$name} " in *" $name "*) ;; *) return ;; esac
    shift 3
    ncu --clock-control none -k "regex:$k" --launch-skip "$skip" -c 1 --metrics "$m" "$b" "$@" \
        >"$out/ncu-$name.log" 2>&1 || { echo "$name: ncu failed (see $out/ncu-$name.log)"; return; }
    echo "== $name"
    # the kernel's line and its metrics (stall reasons from 0.05 instructions up)
    grep -E "Context [0-9]+, Stream|gpu__time|__throughput|pipe_tensor|pipe_xu|warps_active|issue_active|_stalled_" \
        "$out/ncu-$name.log" | awk '!/_stalled_/ || $NF + 0 >= 0.05'
}
prof score-pass1 mpass1 0 --sizes 131072 --reps 1 --no-torch --no-attn --no-caked
prof score-pass2 mpass2 0 --sizes 131072 --reps 1 --no-torch --no-attn --no-caked
# bench-gpu's attention: the full cache on the tensor cores (4 launches at --reps 1), in 64 KiB
# pages (4 more), then the CAKE cache
prof attn-full attn_split_tc 0 --sizes 4096 --reps 1 --no-torch --no-caked
prof attn-cake attn_split_tc 8 --sizes 4096 --reps 1 --no-torch --no-caked
prof evict devict 0 --sizes 4096 --reps 1 --no-torch --no-attn --no-caked
# a cascading stage over one layer of 32K: its select, then its gather and scatter (cm_move<0>, <1>)
prof stage-select cm_select 0 --sizes 4096 --reps 1 --no-torch --no-attn --no-caked
prof stage-gather cm_move 0 --sizes 4096 --reps 1 --no-torch --no-attn --no-caked
prof stage-scatter cm_move 1 --sizes 4096 --reps 1 --no-torch --no-attn --no-caked
