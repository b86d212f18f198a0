#!/bin/sh
# test.sh - builds and runs every test (unit, golden replay, integration, Python including the
# transformers cache on CPU; what needs a GPU or the shared/ folder beside the clone says it
# skipped). The first run installs Python packages (tools/pydeps.sh).
set -e
cd "$(dirname "$0")/.."
sh tools/deps.sh
py=$(sh tools/pydeps.sh)
sh tools/build.sh -DPython3_EXECUTABLE="$py"
cd build
ctest --output-on-failure -j"$(nproc)" "$@"
