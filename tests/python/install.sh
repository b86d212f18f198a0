#!/bin/sh
# install.sh SRC LIBCAKE - `pip install` of client/python from the source tree into a fresh
# virtual environment works, and the installed package loads libcake.
#
# The build runs offline (--no-build-isolation) with the first Python that has what setuptools
# needs to make a wheel (setuptools >= 70.1, or the `wheel` package) and numpy: python3 on PATH,
# then Debian's /usr/bin/python3 (tools/deps.sh installs python3-wheel and python3-numpy for
# this). A python3 from pyenv has neither, so without Debian's the test does what a user's
# `pip install` does: an isolated build that fetches setuptools (and numpy) from PyPI.
set -eu
src=$1 lib=$2
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
"$venv/bin/python" -m pip install -q --disable-pip-version-check $pipflags \
    "$src/client/python"
# installing from the tree leaves its tracked files as they were (egg-info is not tracked)
[ "$(tracked)" = "$before" ] || { echo "FAIL: pip install changed tracked files: $(tracked)"; exit 1; }
cd "$venv"
CAKE_LIB=$lib "$venv/bin/python" -c '
import caked, os
assert os.path.dirname(caked.__file__).startswith(os.environ["VIRTUAL_ENV"] if "VIRTUAL_ENV" in os.environ else "/tmp"), caked.__file__
try:
    caked.Client("/nonexistent/caked.sock")
except FileNotFoundError:
    pass
print("installed caked from", caked.__file__)'
