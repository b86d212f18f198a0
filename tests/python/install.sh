#!/bin/sh
# install.sh SRC LIBCAKE - `pip install` of client/python from the source tree into a fresh
# virtual environment works offline, and the installed package loads libcake.
set -eu
src=$1 lib=$2
venv=$(mktemp -d /tmp/caked-venv-XXXXXX)
trap 'rm -rf "$venv"' EXIT
python3 -m venv --system-site-packages "$venv" # numpy from the system
# where python3 is itself a virtual environment (the GPU image), see its packages too
python3 -c 'import site; print("\n".join(site.getsitepackages()))' \
    >"$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/parent.pth"
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation "$src/client/python"
cd "$venv"
CAKE_LIB=$lib "$venv/bin/python" -c '
import caked, os
assert os.path.dirname(caked.__file__).startswith(os.environ["VIRTUAL_ENV"] if "VIRTUAL_ENV" in os.environ else "/tmp"), caked.__file__
try:
    caked.Client("/nonexistent/caked.sock")
except FileNotFoundError:
    pass
print("installed caked from", caked.__file__)'
