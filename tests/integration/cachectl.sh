#!/bin/sh
# cachectl.sh CAKED CACHECTL WORKLOAD - cachectl against a real caked (configured by a file,
# with a reserved tenant) with engines attached:
# every command's --json parses and carries what the engines hold; the human tables print;
# quota changes a tenant's cap; exit status 0 ok, 1 error, 2 usage.
set -u
caked=$1 ctl=$2 workload=$3
# a path with a quote and a backslash in it: --json must escape it (printf-made JSON did not)
dir=$(mktemp -d '/tmp/cachectl "q\-XXXXXX')
sock=$dir/caked.sock
wpid=""
fail() { echo "FAIL: $*"; kill $wpid "$cpid" 2>/dev/null; rm -rf "$dir"; exit 1; }
printf 'host-pool = 256M\nworkers = 2\ntenant reserved weight=3 min=32M max=100M\n' >"$dir/caked.conf"
"$caked" --socket "$sock" --config "$dir/caked.conf" >"$dir/log" 2>&1 &
cpid=$!
i=0
until "$ctl" --socket "$sock" status >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -gt 100 ] && fail "caked did not start: $(cat "$dir/log")"; sleep 0.05
done
"$workload" --socket "$sock" --engines 2 --seqs 1 --layers 4 --prompt 2048 --cache 128 \
    --decode 4 --hold 300 >"$dir/wl" 2>&1 &  # held until SIGUSR1 below, however slow this machine
wpid=$!
# wait until both sequences are prefilled
i=0
while :; do
    n=$("$ctl" --socket "$sock" --json sequences | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(sum(1 for s in d["sequences"] if s["prefilled_layers"] == s["layers"]))')
    [ "$n" = 2 ] && break
    i=$((i + 1)); [ $i -gt 200 ] && fail "engines did not prefill: $(cat "$dir/wl")"; sleep 0.05
done
"$ctl" --socket "$sock" --json status | python3 -c '
import json, sys
s = json.load(sys.stdin)
assert s["sequences"] == 2 and s["pages_used"] > 0 and s["pool_bytes"] == 256 << 20, s
assert s["io"] in ("io_uring", "epoll"), s
assert s["gpu_pool_bytes"] == 0 and s["gpus"] == [] and "gpu_uuid" not in s, s
assert s["socket"] == sys.argv[1], (s["socket"], sys.argv[1])
# the engines hold (no call in flight): 2 workers (the file), idle
assert s["workers"] == 2 and s["jobs_queued"] == 0 and s["jobs_running"] == 0, s
assert s["longest_running_us"] == 0 and s["oldest_queued_us"] == 0, s' "$sock" || fail "status json"
"$ctl" --socket "$sock" status | grep -q '^workers    2: 0 running, 0 waiting$' || fail "status table: workers"
nt=$("$ctl" --socket "$sock" --json tenants | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["tenants"]))')
ns=$("$ctl" --socket "$sock" --json status | python3 -c 'import json, sys; print(json.load(sys.stdin)["tenants"])')
[ "$nt" = "$ns" ] || fail "status counts $ns tenants, tenants lists $nt"
"$ctl" --socket "$sock" --json tenants | python3 -c '
import json, sys
t = {x["name"]: x for x in json.load(sys.stdin)["tenants"]}
assert t["engine-0"]["sequences"] == 1 and t["engine-0"]["used_bytes"] > 0, t
assert "cachectl" not in t, "control clients are not tenants with shares"
r = t["reserved"]  # from the configuration file
assert r["weight"] == 3 and r["min_bytes"] == 32 << 20 and r["cap_bytes"] == 100 << 20, r' \
    || fail "tenants json"
id=$("$ctl" --socket "$sock" --json sequences | python3 -c '
import json, sys
print(json.load(sys.stdin)["sequences"][0]["id"])')
"$ctl" --socket "$sock" --json seq "$id" | python3 -c '
import json, sys
q = json.load(sys.stdin)
L = q["layer"]
assert len(L) == 4 and q["prefilled_layers"] == 4, q
# fixed mode, cascading: the budgets share exactly (C - w) * L scored tokens
assert sum(l["budget"] for l in L) == (128 - 32) * 4, [l["budget"] for l in L]
assert all(l["prefix"] == l["budget"] and l["tokens"] == l["budget"] + 32 for l in L), L
assert q["components"] == ("alloc preference (tau 1/1, gamma 200), indicator mean+var, "
                           "pool avg 5, decode evict, window 32"), q["components"]' \
    || fail "seq json"
"$ctl" --socket "$sock" seq "$id" | grep -q "PREFERENCE" || fail "seq table"
"$ctl" --socket "$sock" seq "$id" | grep -qx "alloc preference (tau 1/1, gamma 200), indicator mean+var, pool avg 5, decode evict, window 32" \
    || fail "seq components"
"$ctl" --socket "$sock" --json sequences | python3 -c '
import json, sys
assert all("components" not in q for q in json.load(sys.stdin)["sequences"])' \
    || fail "the list carries no components (seq ID does)"
"$ctl" --socket "$sock" tenants | grep -q "engine-1" || fail "tenants table"
"$ctl" --socket "$sock" metrics | grep -q '^caked_requests_total{type="prefill_observe"} [1-9]' \
    || fail "metrics"
"$ctl" --socket "$sock" --json metrics | python3 -c '
import json, sys
m = json.load(sys.stdin)
assert m["types"]["caked_pool_bytes"] == "gauge" and m["types"]["caked_requests_total"] == "counter", m["types"]
obs = [x for x in m["samples"] if x["name"] == "caked_requests_total" and x["labels"].get("type") == "prefill_observe"]
assert len(obs) == 1 and obs[0]["value"] >= 1, obs
pool = [x for x in m["samples"] if x["name"] == "caked_pool_bytes"]
assert pool and pool[0]["value"] == 256 << 20 and pool[0]["labels"] == {}, pool' || fail "metrics json"
"$ctl" --socket "$sock" quota engine-0 --max 64M >/dev/null || fail "quota"
"$ctl" --socket "$sock" --json tenants | python3 -c '
import json, sys
t = {x["name"]: x for x in json.load(sys.stdin)["tenants"]}
assert t["engine-0"]["cap_bytes"] == 64 << 20, t["engine-0"]' || fail "quota not applied"
# GPU quotas: without a GPU pool no GPU minimum can be guaranteed (refused with the reason)
"$ctl" --socket "$sock" quota engine-0 --gpu-min 1M >/dev/null 2>"$dir/err"; [ $? = 1 ] &&
    grep -q "GPU" "$dir/err" || fail "a GPU minimum without GPU pools: $(cat "$dir/err")"
"$ctl" --socket "$sock" quota engine-0 --gpu-max 1G >/dev/null || fail "gpu-max"
"$ctl" --socket "$sock" --json tenants | python3 -c '
import json, sys
t = {x["name"]: x for x in json.load(sys.stdin)["tenants"]}
assert t["engine-0"]["gpu_cap_bytes"] == 0 and t["engine-0"]["gpu_used_bytes"] == 0, t' ||
    fail "tenants --json GPU fields"
"$ctl" --socket "$sock" seq 0x12345 >/dev/null 2>&1; [ $? = 1 ] || fail "unknown sequence must exit 1"
"$ctl" --socket "$sock" frobnicate >/dev/null 2>&1; [ $? = 2 ] || fail "bad usage must exit 2"
"$ctl" -V | grep -q "^cachectl .* (protocol" || fail "cachectl -V"
# options go before or after the command, and nothing is silently ignored
"$ctl" status --json --socket "$sock" | python3 -c 'import json, sys; json.load(sys.stdin)' \
    || fail "status --json after the command"
"$ctl" --socket "$sock" status extra >/dev/null 2>&1; [ $? = 2 ] || fail "an extra word must exit 2"
"$ctl" --socket "$sock" status --weight 3 >/dev/null 2>&1; [ $? = 2 ] || fail "quota options elsewhere must exit 2"
"$caked" -V | grep -q "^caked .* (protocol" || fail "caked -V"
"$ctl" --socket "$dir/nothing.sock" status >/dev/null 2>&1; [ $? = 1 ] || fail "no daemon must exit 1"
# a server that never answers: cachectl gives up after --timeout (it used to wait forever)
python3 -c '
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(4)
c, _ = s.accept(); time.sleep(30)' "$dir/mute.sock" &
mpid=$!
i=0; until [ -S "$dir/mute.sock" ]; do i=$((i + 1)); [ $i -gt 100 ] && fail "mute server"; sleep 0.05; done
t0=$(date +%s)
out=$(timeout 20 "$ctl" --socket "$dir/mute.sock" --timeout 1 status 2>&1); rc=$?
kill $mpid 2>/dev/null
[ $rc = 1 ] && [ $(( $(date +%s) - t0 )) -le 5 ] || fail "a mute server must time out: rc $rc, $out"
echo "$out" | grep -q "no reply" || fail "timeout message: $out"
kill -USR1 $wpid # end the hold: the engines decode and close
wait $wpid || fail "workload failed: $(cat "$dir/wl")"
kill -TERM $cpid
wait $cpid || fail "caked did not exit cleanly"
rm -rf "$dir"
echo "cachectl: status, tenants, sequences, seq, metrics (and their --json, by a JSON parser, with a quote in the socket path), quota, timeout and exit codes ok"
