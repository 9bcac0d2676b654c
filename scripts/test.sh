#!/usr/bin/env bash
# The test suite (README: `bash scripts/setup.sh && .venv/bin/python -m pytest`).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q "$@"
