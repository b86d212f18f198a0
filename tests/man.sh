#!/bin/sh
# man.sh MANDIR - the man pages render without a warning (groff -ww), and caked(8) names every
# long option `caked --help` lists (exit 77, skipped, without groff).
set -e
dir=$1 caked=$2
command -v groff >/dev/null || { echo "SKIP: groff not found: man pages not checked"; exit 77; }
for f in "$dir"/caked.8 "$dir"/cachectl.1 "$dir"/caked.conf.5; do
    out=$(LC_ALL=C.UTF-8 groff -man -Tutf8 -ww -z "$f" 2>&1)
    [ -z "$out" ] || { echo "FAIL: $f: $out"; exit 1; }
done
for o in $("$caked" --help | grep -o -- '--[a-z-]*' | sort -u); do
    grep -q -- "$(echo "$o" | sed 's/-/\\\\-/g')" "$dir/caked.8" || { echo "FAIL: caked(8) lacks $o"; exit 1; }
done
echo "man pages: caked(8), cachectl(1), caked.conf(5) render cleanly; caked(8) has every option"
