#!/bin/sh
# run.sh - the main job: builds everything, starts caked with its embedded defaults, runs
# several engine processes against it (long synthetic prompts with structured attention,
# prefill then decode), shows cachectl's view of tenants and per-layer budgets while the
# engines hold their caches, and stops everything cleanly. Extra arguments go to
# cake-workload (see the top of tools/cake-workload.c).
set -e
cd "$(dirname "$0")/.."
sh tools/build.sh
B=build
"$B/daemon/caked" &
caked_pid=$!
trap 'kill $caked_pid 2>/dev/null || true' EXIT INT TERM
# the default socket path, as caked and cachectl compute it
i=0
until "$B/tools/cachectl" status >/dev/null 2>&1; do
    i=$((i + 1))
    if [ $i -gt 50 ] || ! kill -0 $caked_pid 2>/dev/null; then
        echo "run.sh: caked did not start" >&2
        exit 1
    fi
    sleep 0.1
done
"$B/tools/cake-workload" --engines 3 --seqs 2 --layers 16 --prompt 8192 --cache 512 \
    --decode 64 --hold 120 "$@" & # held until cachectl has looked (SIGUSR1 below)
wl_pid=$!
# wait until every engine has prefilled, then look
i=0
while [ "$("$B/tools/cachectl" --json sequences | tr -cd '{' | wc -c)" -lt 7 ] ||
      "$B/tools/cachectl" sequences | awk 'NR > 1 && $5 != $3 { busy = 1 } END { exit !busy }'; do
    i=$((i + 1))
    [ $i -gt 600 ] && break
    sleep 0.1
done
echo
"$B/tools/cachectl" status
echo
"$B/tools/cachectl" tenants
echo
"$B/tools/cachectl" sequences
first=$("$B/tools/cachectl" sequences | awk 'NR == 2 { print $1 }')
echo
[ -n "$first" ] && "$B/tools/cachectl" seq "$first"
echo
kill -USR1 $wl_pid 2>/dev/null # the engines decode and close
wait $wl_pid
status=$?
kill -TERM $caked_pid
wait $caked_pid || true
trap - EXIT INT TERM
exit $status
