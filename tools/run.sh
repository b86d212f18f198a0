#!/bin/sh
# run.sh - the main job: builds caked and runs CAKE on a synthetic multi-layer prompt.
set -e
cd "$(dirname "$0")/.."
sh tools/build.sh
exec build/tools/cake-demo "$@"
