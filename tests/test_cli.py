"""`mixq generate` with bad arguments: one line naming what is wrong, no traceback."""

from __future__ import annotations

import subprocess
import sys


def generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixq", "generate", *args], capture_output=True,
                          text=True, timeout=300)


def one_line(run: subprocess.CompletedProcess) -> str:
    assert run.returncode != 0 and "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1, run.stderr
    return lines[0]


def test_missing_model_directory(tmp_path):
    assert one_line(generate(str(tmp_path / "nope"), "hi")) == (
        f"mixq generate: model directory {tmp_path / 'nope'} does not exist")
    assert one_line(generate(str(tmp_path), "hi")) == (
        f"mixq generate: model directory {tmp_path} has no config.json")


def test_max_tokens_must_be_positive(tiny_llama_dir):
    assert one_line(generate(str(tiny_llama_dir), "hi", "--max-tokens", "-1")) == (
        "mixq generate: --max-tokens must be at least 1, not -1")


def test_corrupt_kv_config_names_the_file(tiny_llama_dir, tmp_path):
    bad = tmp_path / "kv_config.json"
    bad.write_text('{"layers": {')
    line = one_line(generate(str(tiny_llama_dir), "hi", "--kv-config", str(bad)))
    assert line.startswith(f"mixq generate: KV config {bad}: cannot read it (Expecting")
