#!/bin/sh
# sanitize.sh [--long] - the C tests under AddressSanitizer + UndefinedBehaviorSanitizer, and
# caked under ThreadSanitizer while the integration tests drive it. CI runs it after
# tools/test.sh (which built build/); --long adds 200 chaos rounds per event loop under
# ASan and, with clang, 300 s each of the frame, server and configuration fuzzers. Builds in build/asan, build/tsan (inside the ignored build/).
# Exit status 0 only if every test passed and TSan reported nothing.
set -e
cd "$(dirname "$0")/.."
root=$(pwd)
long=0
[ "${1:-}" = "--long" ] && long=1
jobs=$(nproc)

echo "== ASan + UBSan: building"
cmake -S . -B build/asan -DCAKE_SANITIZE=address -DCAKE_CUDA=OFF -DCAKE_WERROR=ON >/dev/null
cmake --build build/asan -j"$jobs" >build/asan.log 2>&1 || { tail -n 30 build/asan.log; exit 1; }
echo "== ASan + UBSan: unit and integration tests (tests and caked instrumented)"
(cd build/asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
    ctest --output-on-failure -j"$jobs" -R "^(unit|integration|fuzz|client)\.")
# requests waiting for room, re-slice jobs, parking's refusals: the Python test drives an
# instrumented caked (a report makes caked exit non-zero, which the test asserts)
py=$(sed -n 's/^Python3_EXECUTABLE:[A-Z]*=//p' build/CMakeCache.txt)
pytests() { # pytests CAKED: python.pressure, python.policies (every policy, the engine's
    # log-sum-exps and their refusal), python.hf_cache (batched decode steps, split over
    # the workers) and python.metrics_http (the HTTP endpoint, the metrics and the workers'
    # load read on the loop) against that caked
    for t in test_pressure test_policies test_hf_cache test_metrics_http; do
        CAKE_LIB=$root/build/client/libcake.so CAKED_BIN=$1 CACHECTL_BIN=$root/build/tools/cachectl \
            "$py" "$root/tests/python/$t.py" || return 1
    done
}
if [ -n "$py" ]; then
    echo "== ASan + UBSan: caked under pressure, every policy, batched decode (tests/python)"
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 pytests "$root/build/asan/daemon/caked"
fi

# Criterion cannot run under TSan (its arena collides with TSan's shadow memory): the normal
# build's tests drive a TSan caked instead (CAKE_TEST_CAKED_WRAP runs it in their caked's place)
echo "== TSan: building caked"
cmake -S . -B build/tsan -DCAKE_SANITIZE=thread -DCAKE_CUDA=OFF >/dev/null
cmake --build build/tsan -j"$jobs" --target caked >build/tsan.log 2>&1 || { tail -n 30 build/tsan.log; exit 1; }
logs=$(mktemp -d "$root/build/tsan-logs.XXXXXX")
wrap=$logs/wrap.sh
printf '#!/bin/sh\nshift\nexec '"$root"'/build/tsan/daemon/caked "$@"\n' >"$wrap"
chmod +x "$wrap"
echo "== TSan: caked under the integration tests"
# OMP_NUM_THREADS=1: libgomp is not instrumented, TSan would report every OpenMP region;
# integration.daemon compares preferences bit for bit with an in-process core that sums in
# another order at another thread count (the ASan run covers it)
(cd build && OMP_NUM_THREADS=1 CAKE_TEST_CAKED_WRAP="$wrap" TSAN_OPTIONS="log_path=$logs/caked" \
    ctest --output-on-failure -j"$jobs" -R "^integration\." -E "^integration\.daemon")
if [ -n "$py" ]; then
    echo "== TSan: caked under pressure, every policy, batched decode"
    OMP_NUM_THREADS=1 TSAN_OPTIONS="log_path=$logs/caked" pytests "$root/build/tsan/daemon/caked"
fi
if ls "$logs"/caked.* >/dev/null 2>&1; then
    echo "TSan reported:"
    cat "$logs"/caked.*
    exit 1
fi
echo "TSan: no report"
rm -rf "$logs"

if [ $long = 1 ]; then
    for io in uring epoll; do
        echo "== ASan: 200 chaos rounds ($io)"
        CAKE_CHAOS_ROUNDS=200 CAKE_TEST_IO=$io build/asan/tests/test_chaos --jobs 1
    done
    if command -v clang >/dev/null; then
        CC=clang cmake -S . -B build/fuzz -DCAKE_FUZZ=ON -DCAKE_CUDA=OFF >/dev/null
        cmake --build build/fuzz -j"$jobs" --target fuzz_frame fuzz_server fuzz_config >/dev/null
        for t in frame server config; do
            echo "== libFuzzer: $t, 300 s"
            mkdir -p build/fuzz/corpus-$t && cp "$root"/tests/fuzz/corpus/$t/* build/fuzz/corpus-$t/
            build/fuzz/tests/fuzz_$t -max_total_time=300 -timeout=30 build/fuzz/corpus-$t
        done
    fi
fi
