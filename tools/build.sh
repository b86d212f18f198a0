#!/bin/sh
# build.sh [CMAKE_ARGS...] - configures and builds into build/ (warnings are errors).
set -e
cd "$(dirname "$0")/.."
sh tools/deps.sh
cmake -S . -B build -DCAKE_WERROR=ON "$@" >/dev/null
cmake --build build -j"$(nproc)"
