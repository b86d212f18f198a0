#!/bin/sh
# test.sh - builds and runs every test (unit, golden replay; what needs a GPU or the
# shared/ folder beside the clone says it skipped).
set -e
cd "$(dirname "$0")/.."
sh tools/build.sh
cd build
ctest --output-on-failure -j"$(nproc)" "$@"
