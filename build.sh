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
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -e ".[test]"
        # data-only wheels for tests: the real Llama-3 tokenizer file and real photographs
        "$VENV/bin/python" -m pip install -q --no-deps llama-models==0.3.0 scikit-image==0.25.2
        rm -f "$VENV"/.installed-*
        touch "$stamp"
    fi
}

cmd="${1:-help}"
shift || true
case "$cmd" in
    setup) setup ;;
    test)  setup; exec "$VENV/bin/python" -m pytest -q "$@" ;;
    demo)  setup; exec "$VENV/bin/cogvlm2-lite" demo "$@" ;;
    bench) setup; exec "$VENV/bin/cogvlm2-lite" bench-suite "$@" ;;
    *) echo "usage: ./build.sh {setup|test|demo|bench} [args...]"; exit 2 ;;
esac
