#!/usr/bin/env bash
# One script for set-up, tests, the demo and benchmarks. Everything starts from nothing:
# a local venv, pinned dependencies, the package in editable mode.
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY=python3.11

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    local stamp="$VENV/.installed-$(sha256sum pyproject.toml build.sh | sha256sum | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        echo "setting up $VENV (pinned dependencies; a few minutes the first time; log: $VENV/setup.log)" >&2
        {
            "$VENV/bin/python" -m pip install --upgrade pip &&
            "$VENV/bin/python" -m pip install -e ".[test]" &&
            # data-only wheels for tests: the real Llama-3 tokenizer file and real photographs
            "$VENV/bin/python" -m pip install --no-deps llama-models==0.3.0 scikit-image==0.25.2
        } > "$VENV/setup.log" 2>&1 || { tail -n 30 "$VENV/setup.log" >&2; echo "set-up failed: see $VENV/setup.log" >&2; exit 1; }
        rm -f "$VENV"/.installed-*
        touch "$stamp"
    fi
    setup_lite
}

# MindSpore Lite for the `lite` backend: PyPI's only mindspore-lite (2.0.0) is built for CPython 3.7, so it
# lives in its own venv that the runtime talks to through a worker process (runtime/lite_worker.py).
setup_lite() {
    if [ -f .venv-lite/.installed-mslite-2.0.0 ]; then return; fi
    local py37="${LITE_PYTHON37:-}"
    if [ -z "$py37" ]; then  # a real interpreter, not a pyenv shim that refuses to run
        for candidate in "$HOME"/.pyenv/versions/3.7*/bin/python3.7 "$(command -v python3.7 || true)"; do
            if [ -n "$candidate" ] && "$candidate" -c "import sys" >/dev/null 2>&1; then py37="$candidate"; break; fi
        done
    fi
    if [ -z "$py37" ]; then
        echo "note: no CPython 3.7 found: the lite backend and its tests are skipped" >&2; return
    fi
    [ -x .venv-lite/bin/python ] || "$py37" -m venv .venv-lite
    if .venv-lite/bin/python -m pip install -q "mindspore-lite==2.0.0" "numpy==1.21.6" > .venv-lite/setup.log 2>&1; then
        touch .venv-lite/.installed-mslite-2.0.0
    else
        echo "note: installing mindspore-lite 2.0.0 failed: the lite backend and its tests are skipped" >&2
    fi
}

cmd="${1:-help}"
shift || true
case "$cmd" in
    setup) setup ;;
    test)  setup; exec "$VENV/bin/python" -m pytest -q "$@" ;;
    demo)  setup; exec "$VENV/bin/cogvlm2-lite" demo "$@" ;;
    bench) setup; "$VENV/bin/cogvlm2-lite" bench-suite "$@" && exec "$VENV/bin/cogvlm2-lite" quant-bench --suite ;;
    *) echo "usage: ./build.sh {setup|test|demo|bench} [args...]"; exit 2 ;;
esac
