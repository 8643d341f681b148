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
    setup_kernels
}

# The quantized matmul kernels (kernels/, onnxruntime custom operators): compiled against onnxruntime's C/C++
# API headers from Debian trixie's libonnxruntime-dev (PyPI's onnxruntime ships none), fetched once into
# .cache/ through a private apt sources list (the system's apt set-up is left as it is). Without apt, the
# headers or g++, set-up still succeeds and the runtime uses onnxruntime's own kernels.
ORT_DEV_VERSION="1.21.0+dfsg-1"   # API 21: the headers' API is versioned, newer onnxruntimes serve it
KERNELS_LIB=kernels/build/libcogvlm2_kernels.so

setup_kernels() {
    local stamp
    stamp="kernels/build/.built-$(cat kernels/*.cpp kernels/*.h build.sh | sha256sum | cut -c1-16)"
    if [ -f "$stamp" ] && [ -f "$KERNELS_LIB" ]; then return; fi
    local note="the quantized kernels are not built: onnxruntime's own kernels run the quantized bundles"
    if ! command -v g++ >/dev/null 2>&1; then echo "note: no g++: $note" >&2; return; fi
    local include
    if ! include="$(onnxruntime_headers)"; then
        echo "note: onnxruntime's headers (libonnxruntime-dev $ORT_DEV_VERSION) could not be fetched: $note" >&2; return
    fi
    mkdir -p kernels/build
    rm -f kernels/build/.built-* "$KERNELS_LIB"
    local flags=(-O3 -std=c++17 -fPIC -fvisibility=hidden -ffp-contract=off -Wall -Wno-uninitialized -Wno-maybe-uninitialized)
    local avx2=(-mavx2 -mfma) avx512=(-mavx2 -mfma -mavx512f -mavx512bw -mavx512vl -mavx512dq)
    if { g++ "${flags[@]}" -DQMM_AVX2 "${avx2[@]}" -c kernels/qmatmul_isa.cpp -o kernels/build/avx2.o &&
       g++ "${flags[@]}" -DQMM_AVXVNNI "${avx2[@]}" -mavxvnni -c kernels/qmatmul_isa.cpp -o kernels/build/avxvnni.o &&
       g++ "${flags[@]}" -DQMM_AVX512 "${avx512[@]}" -c kernels/qmatmul_isa.cpp -o kernels/build/avx512.o &&
       g++ "${flags[@]}" -DQMM_AVX512VNNI "${avx512[@]}" -mavx512vnni -c kernels/qmatmul_isa.cpp -o kernels/build/avx512vnni.o &&
       g++ "${flags[@]}" -DQMM_AMX "${avx512[@]}" -mavx512vnni -mamx-tile -mamx-int8 -c kernels/qmatmul_isa.cpp -o kernels/build/amx.o &&
       g++ "${flags[@]}" -DQMM_AVX2 "${avx2[@]}" -c kernels/attention_isa.cpp -o kernels/build/attention_avx2.o &&
       g++ "${flags[@]}" -DQMM_AVX512 "${avx512[@]}" -c kernels/attention_isa.cpp -o kernels/build/attention_avx512.o &&
       g++ "${flags[@]}" -I"$include" -c kernels/ops.cpp -o kernels/build/ops.o &&
       g++ -shared -o "$KERNELS_LIB" kernels/build/{avx2,avxvnni,avx512,avx512vnni,amx,attention_avx2,attention_avx512,ops}.o -lpthread; } \
            > kernels/build/build.log 2>&1; then
        touch "$stamp"
    else
        echo "note: compiling kernels/ failed: $note" >&2
    fi
}

# -> the folder of onnxruntime's headers, fetched and cached on first use
onnxruntime_headers() {
    local dir=".cache/libonnxruntime-dev-$ORT_DEV_VERSION" apt="$PWD/.cache/apt-trixie"
    local headers="$dir/usr/include/onnxruntime"
    if [ ! -f "$headers/onnxruntime_cxx_api.h" ]; then
        command -v apt-get >/dev/null 2>&1 || return 1
        local uri
        uri="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
        mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${uri:-http://deb.debian.org/debian} trixie main" \
            > "$apt/sources.list"
        local options=(-o "Dir::Etc::sourcelist=$apt/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$apt/lists"
                       -o "Dir::Cache=$apt/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
        { apt-get "${options[@]}" update &&
          (cd "$apt" && apt-get "${options[@]}" download "libonnxruntime-dev=$ORT_DEV_VERSION") &&
          dpkg-deb -x "$apt"/libonnxruntime-dev_*.deb "$dir"; } > .cache/apt-trixie.log 2>&1 || return 1
    fi
    echo "$headers"
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
