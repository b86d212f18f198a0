#!/bin/sh
# install.sh SRC CAKED - the wheel of client/python carries libcake: `pip wheel` from the
# source tree builds libcake with CMake into a platform wheel (caked/_lib/libcake.so.0);
# installed into a fresh virtual environment, `import caked` works with no CAKE_LIB and no
# LD_LIBRARY_PATH and talks to a real caked (ping, a sequence opened, prefilled, closed);
# building leaves the tree's tracked files as they were.
#
# The build runs offline (--no-build-isolation) with the first Python that has what setuptools
# needs to make a wheel (setuptools >= 70.1, or the `wheel` package) and numpy: python3 on PATH,
# then Debian's /usr/bin/python3 (tools/deps.sh installs python3-wheel and python3-numpy for
# this). A python3 from pyenv has neither, so without Debian's the test does what a user's
# `pip install` does: an isolated build that fetches setuptools (and numpy) from PyPI.
set -eu
src=$1 caked_bin=$2
can_build='import numpy, setuptools, sys
v = tuple(int(x) for x in setuptools.__version__.split(".")[:2])
if v < (70, 1):
    import wheel'
py="" pipflags="--no-deps --no-build-isolation"
for cand in python3 /usr/bin/python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "$can_build" 2>/dev/null &&
        "$cand" -c 'import venv, ensurepip' 2>/dev/null; then
        py=$cand
        break
    fi
done
if [ -z "$py" ]; then
    py=python3 pipflags=""
    echo "install.sh: no Python here builds wheels offline; pip fetches setuptools and numpy" >&2
fi
venv=$(mktemp -d /tmp/caked-venv-XXXXXX)
trap 'rm -rf "$venv"' EXIT
"$py" -m venv --system-site-packages "$venv" # numpy (and wheel) from the system
# where the Python is itself a virtual environment (the GPU image), see its packages too
"$py" -c 'import site; print("\n".join(site.getsitepackages()))' \
    >"$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/parent.pth"
tracked() { git -C "$src" status --porcelain --untracked-files=no -- client/python 2>/dev/null || true; }
before=$(tracked)
# shellcheck disable=SC2086
env -u CAKE_LIBCAKE "$venv/bin/python" -m pip wheel -q --disable-pip-version-check $pipflags \
    -w "$venv/wheels" "$src/client/python" >"$venv/wheel.log" 2>&1 ||
    { tail -n 30 "$venv/wheel.log"; echo "FAIL: pip wheel"; exit 1; }
whl=$(ls "$venv"/wheels/caked-*.whl)
case $whl in *-linux_*.whl) ;; *) echo "FAIL: not a platform wheel: $whl"; exit 1 ;; esac
"$venv/bin/python" -m zipfile -l "$whl" | grep -q 'caked/_lib/libcake.so.0' ||
    { echo "FAIL: the wheel carries no libcake"; exit 1; }
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "$whl"
# building from the tree leaves its tracked files as they were (egg-info is not tracked)
[ "$(tracked)" = "$before" ] || { echo "FAIL: pip changed tracked files: $(tracked)"; exit 1; }
cd "$venv"
env -u CAKE_LIB -u LD_LIBRARY_PATH CAKED_BIN="$caked_bin" "$venv/bin/python" -c '
import os, subprocess, tempfile, time
import caked
here = os.path.dirname(caked.__file__)
assert here.startswith(os.environ["VIRTUAL_ENV"] if "VIRTUAL_ENV" in os.environ else "/tmp"), here
lib = caked._L()._name
assert lib == os.path.join(here, "_lib", "libcake.so.0"), lib
d = tempfile.mkdtemp()
sock = os.path.join(d, "caked.sock")
p = subprocess.Popen([os.environ["CAKED_BIN"], "--socket", sock, "--host-pool", "32M",
                      "--workers", "1"], stderr=subprocess.DEVNULL)
try:
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.02)
    with caked.Client(sock, service="wheel") as c:
        c.ping()
        s = c.open_sequence(2, 4, 2, 32, 64, dtype="f32", cache_size=32, window=8)
        for l in range(2):
            s.reserve(l)
            s.observe(l)
        assert s.tokens(0) == 32, s.tokens(0)
        s.close()
finally:
    p.terminate()
    assert p.wait(10) == 0
print("libcake from the wheel:", lib)'
