"""The DAG promise, with real `dvc repro` in a temporary git repo on a small real model:
every stage re-runs only when what it reads changes, and reverting restores from the run
cache with zero executions."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose, copy_project, executed, restored, run  # noqa: F401

STAGES_TO = ["convert", "baselines"]


@pytest.fixture(scope="module")
def project(tiny_llama_dir, tmp_path_factory) -> Path:
    """A fresh git + DVC repo holding this project's tracked files."""
    return copy_project(tmp_path_factory.mktemp("dag") / "project")


def test_params_changes_rerun_only_their_stages(project, tiny_llama_dir):
    compose(project, tiny_llama_dir)
    first = run(["dvc", "repro", *STAGES_TO], project)
    assert executed(first) == {"prepare-model", "calibrate", "measure-kl@0", "measure-kl-merge",
                               "allocate", "convert", "baselines"}

    compose(project, tiny_llama_dir, "calibration.seed=1")
    log = run(["dvc", "repro", *STAGES_TO], project)
    assert "prepare-model" not in executed(log)
    assert "calibrate" in executed(log)

    compose(project, tiny_llama_dir)  # revert: everything comes back from the run cache
    log = run(["dvc", "repro", *STAGES_TO], project)
    assert executed(log) == set()
    assert {"calibrate", "measure-kl@0", "measure-kl-merge"} <= restored(log)

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
    assert "allocate" in executed(log) and "measure-kl@0" not in executed(log)
    by_dvc = (project / "params.yaml").read_text()
    run([sys.executable, "-m", "mixq", "compose", *overrides], project)
    assert (project / "params.yaml").read_text() == by_dvc
    bad = subprocess.run(["dvc", "exp", "run", "-S", "quant.targt_bpw=5", "allocate"],
                         cwd=project, capture_output=True, text=True)
    assert bad.returncode != 0 and "targt_bpw" in bad.stdout + bad.stderr


def test_a_local_model_dir_and_calibration_files_are_deps(project, tiny_llama_dir, tmp_path):
    """model=path and calibration=files: editing the model directory or a data file makes
    `dvc status` report the stage changed (they are deps through model.dep/calibration.files_dep
    derived at compose time), and nothing else."""
    model = Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))
    data = project / "data"
    data.mkdir(exist_ok=True)
    text = "\n\n".join(f"Paragraph {i}: " + "words and more words " * 40 for i in range(40))
    for domain in ("prose", "code"):
        (data / f"{domain}.txt").write_text(text)
    settings = ["calibration=files", "calibration.domains=[prose,code]",
                "calibration.files={prose:data/prose.txt,code:data/code.txt}",
                "calibration.refine_per_domain=1"]
    run([sys.executable, "-m", "mixq", "compose", "model=path", f"model.id={model}",
         "calibration.seq_len=64", "calibration.samples_per_domain=1", *settings], project)
    run(["dvc", "repro", "calibrate"], project)
    assert "up to date" in run(["dvc", "status", "prepare-model", "calibrate"], project)

    (data / "code.txt").write_text(text.replace("words", "tokens"))
    status = run(["dvc", "status", "prepare-model", "calibrate"], project)
    assert "calibrate" in status and "prepare-model" not in status

    (model / "generation_config.json").write_text('{"temperature": 0.5}\n')
    status = run(["dvc", "status", "prepare-model"], project)
    assert "prepare-model" in status and str(model) in status
