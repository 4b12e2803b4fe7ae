#!/usr/bin/env bash
# The llama.cpp peer for bench/edge_vs_llamacpp.py, built from the source vendored in the
# llama-cpp-python sdist (PyPI is the only registry this machine reaches):
#   DIR/llama.cpp/build/bin/{llama-bench,llama-quantize}  (Release, native CPU flags)
#   DIR/venv  (torch 2.13.0+cpu, transformers, sentencepiece: what convert_hf_to_gguf.py imports)
# Usage: bash bench/llamacpp_setup.sh [DIR]   (default /tmp/llamacpp; ~5 min on 2 cores)
set -euo pipefail
DIR=${1:-/tmp/llamacpp}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
mkdir -p "$DIR"
cd "$DIR"
if [ ! -d llama.cpp ]; then
  python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d sdist
  tar xzf "sdist/llama_cpp_python-$VERSION.tar.gz"
  mv "llama_cpp_python-$VERSION/vendor/llama.cpp" llama.cpp
  rm -rf "llama_cpp_python-$VERSION"
fi
# Native flags, but no AMX: on the Intel Xeon VM (AMX in its CPU flags) ggml's AMX path dies with
# SIGILL/SIGSEGV in Q4_0 prefill and decode, so llama.cpp is built as it can run there (AVX-512 VNNI).
NO_AMX=""
if grep -qw amx_tile /proc/cpuinfo; then NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"; fi
if [ ! -x llama.cpp/build/bin/llama-bench ] || [ ! -x llama.cpp/build/bin/llama-quantize ]; then
  cmake -S llama.cpp -B llama.cpp/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  cmake --build llama.cpp/build -j "$(nproc)" --target llama-bench llama-quantize
fi
if [ ! -x venv/bin/python ]; then
  python3 -m venv venv
  # torch first: 2.13.0 is the CPU build on this machine's disk; unpinned torch pulls CUDA.
  venv/bin/pip install -q torch==2.13.0
  venv/bin/pip install -q 'numpy<3' 'sentencepiece<0.3' safetensors transformers==4.57.6 'protobuf<5'
fi
echo "llama.cpp ready: $DIR (llama-bench, llama-quantize, venv for convert_hf_to_gguf.py)"
