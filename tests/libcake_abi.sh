#!/bin/sh
# libcake_abi.sh LIBCAKE - the shared library exports only cake_* and never links jemalloc
# (Debian's jemalloc replaces malloc process-wide: an engine must not inherit it).
lib=$1
bad=$(nm -D --defined-only "$lib" | awk '$2 ~ /[TDB]/ && $3 !~ /^cake_/ { print $3 }')
if [ -n "$bad" ]; then
    echo "FAIL: libcake exports more than cake_*: $bad"
    exit 1
fi
if ldd "$lib" | grep -q jemalloc; then
    echo "FAIL: libcake links jemalloc"
    exit 1
fi
n=$(nm -D --defined-only "$lib" | grep -c ' T cake_')
echo "libcake exports $n cake_* functions, no jemalloc"
