"""The DAG promise, with real `dvc repro` in a temporary git repo on a small real model:
every stage re-runs only when what it reads changes, and reverting restores from the run
cache with zero executions."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES_TO = ["convert", "baselines"]


def run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MIXQ_CACHE": str(cwd / ".mixq-cache")}
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def executed(log: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", log))


def restored(log: str) -> set[str]:
    return set(re.findall(r"Stage '([^']+)' is cached - skipping run", log))


@pytest.fixture(scope="module")
def project(tiny_llama_dir, tmp_path_factory) -> Path:
    """A fresh git + DVC repo holding this project's tracked files."""
    root = tmp_path_factory.mktemp("dag") / "project"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        if name.startswith(("tests/", "benchmarks/")) or name == "dvc.lock":
            continue
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    run(["git", "init", "-q"], root)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], root)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], root)
    return root


def compose(project: Path, tiny_llama_dir: Path, *overrides: str) -> None:
    run([sys.executable, "-m", "mixq", "compose", "model=path", f"model.id={tiny_llama_dir}",
         "calibration.seq_len=64", "calibration.samples_per_domain=1", *overrides], project)


def test_params_changes_rerun_only_their_stages(project, tiny_llama_dir):
    compose(project, tiny_llama_dir)
    first = run(["dvc", "repro", *STAGES_TO], project)
    assert executed(first) == {"prepare-model", "calibrate", "measure-kl", "allocate",
                               "convert", "baselines"}

    compose(project, tiny_llama_dir, "calibration.seed=1")
    log = run(["dvc", "repro", *STAGES_TO], project)
    assert "prepare-model" not in executed(log)
    assert "calibrate" in executed(log)

    compose(project, tiny_llama_dir)  # revert: everything comes back from the run cache
    log = run(["dvc", "repro", *STAGES_TO], project)
    assert executed(log) == set()
    assert {"calibrate", "measure-kl"} <= restored(log)

    compose(project, tiny_llama_dir, "quant.target_bpw=6.0")
    log = run(["dvc", "repro", *STAGES_TO], project)
    assert executed(log) == {"allocate", "convert"}

    compose(project, tiny_llama_dir)
    log = run(["dvc", "repro", *STAGES_TO], project)
    assert executed(log) == set()
    assert restored(log) == {"allocate", "convert"}
    assert (project / "outputs" / "quant" / "config.json").exists()


def test_dvc_exp_run_composes_conf_like_mixq_compose(project, tiny_llama_dir):
    """`dvc exp run -S` (DVC's own Hydra composition, .dvc/config hydra.enabled) writes the
    params.yaml `mixq compose` writes, schema validation included."""
    overrides = ["model=path", f"model.id={tiny_llama_dir}", "calibration.seq_len=64",
                 "calibration.samples_per_domain=1", "quant.target_bpw=5.5"]
    log = run(["dvc", "exp", "run", *[a for o in overrides for a in ("-S", o)], "allocate"],
              project)
    assert "allocate" in executed(log) and "measure-kl" not in executed(log)
    by_dvc = (project / "params.yaml").read_text()
    run([sys.executable, "-m", "mixq", "compose", *overrides], project)
    assert (project / "params.yaml").read_text() == by_dvc
    bad = subprocess.run(["dvc", "exp", "run", "-S", "quant.targt_bpw=5", "allocate"],
                         cwd=project, capture_output=True, text=True)
    assert bad.returncode != 0 and "targt_bpw" in bad.stdout + bad.stderr
