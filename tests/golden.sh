#!/bin/sh
# golden.sh CAKE_PARITY GOLDEN_DIR MODE - replays every golden case (and, in parity mode,
# the adjust_budgets vectors). Exit 77 (ctest: skipped) when GOLDEN_DIR is absent.
tool=$1 dir=$2 mode=$3
if [ ! -d "$dir/cake-parity" ]; then
    echo "SKIP: $dir/cake-parity not found (the shared/ folder beside the clone); golden replay skipped"
    exit 77
fi
set -e
if [ "$mode" = parity ]; then
    "$tool" --adjust "$dir/cake-parity/adjust_budgets.txt" | tail -n 1
fi
"$tool" --mode "$mode" "$dir/cake-parity"
