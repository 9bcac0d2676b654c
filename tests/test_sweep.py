"""Budget sweeps for real on a tiny model: a queued `dvc exp run -S` sweep and a Hydra multirun
(`mixq sweep`, joblib launcher) each re-run only allocate onward per point, and every point is
an experiment `dvc exp show` lists with its bpw, bytes and held-out KL."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import dvc.api
import pytest

from conftest import copy_project, executed, git_commit, run

UPSTREAM = {"prepare-model", "calibrate", "measure-kl@0", "measure-kl-merge", "baselines",
            "eval-baselines"}
POINT = {"allocate", "convert", "refine", "kv-sensitivity", "eval", "publish"}


@pytest.fixture(scope="module")
def project(tiny_llama_dir, tmp_path_factory) -> Path:
    """A project whose conf/ defaults are the tiny-Llama pipeline (what `dvc exp run -S`
    composes from), run once and committed: the base every sweep point starts from."""
    root = copy_project(tmp_path_factory.mktemp("sweep") / "project")
    with open(root / "conf" / "config.yaml", "a") as conf:
        conf.write(
            f"model: {{kind: path, id: {tiny_llama_dir}}}\n"
            "calibration: {seq_len: 64, samples_per_domain: 1}\n"
            "kv: {seq_len: 64, target_bits: 16.0}\n"
            "refine: {steps: 2, batch_size: 1, valid_windows: 2}\n"  # head_dim 16: no KV candidate fits
            "eval: {samples_per_task: 1, max_tokens: 8, hashhop_tokens: 96,"
            " tasks: [arithmetic, hashhop]}\n"
        )
    run([sys.executable, "-m", "mixq", "compose"], root)  # as `dvc exp run` composes it
    assert executed(run(["dvc", "repro"], root)) >= UPSTREAM | POINT
    git_commit(root, "base run")
    return root


def experiments(project: Path) -> dict[str, dict]:
    """Experiment name -> its `dvc exp show` row (params and metrics); "workspace" too."""
    return {row["Experiment"] or row["rev"]: row for row in dvc.api.exp_show(repo=str(project))
            if row["Experiment"] or row["rev"] == "workspace"}


def baselines(row: dict) -> dict:
    """The uniform baselines' eval metrics of a `dvc exp show` row."""
    return {k: v for k, v in row.items() if k.startswith("uniform-")}


def assert_point(row: dict, target_bpw: float) -> None:
    """A finished sweep point: its params and the metrics the frontier needs."""
    assert row["quant.target_bpw"] == target_bpw
    bpw = row["outputs/metrics/allocate.json:bpw"]
    assert target_bpw - 1.0 < bpw <= target_bpw  # coarse: the tiny model is mostly embedding
    assert row["outputs/metrics/convert.json:bpw"] == pytest.approx(bpw)
    assert row["outputs/metrics/convert.json:weight_bytes"] > 0
    assert 0 < row["mixed.kl_mean"] < 1.01 * row["uniform-affine-b3-g64.kl_mean"]


def test_queued_dvc_exp_sweep_reruns_only_allocate_onward(project):
    run(["dvc", "exp", "run", "--queue", "-S", "quant.target_bpw=3.6,4.5"], project)
    run(["dvc", "exp", "run", "--run-all"], project)
    rows = experiments(project)
    points = {row["quant.target_bpw"]: name for name, row in rows.items()
              if row.get("State") == "Success" and row["quant.target_bpw"] in (3.6, 4.5)}
    assert set(points) == {3.6, 4.5}
    for target, name in points.items():
        assert_point(rows[name], target)
        assert baselines(rows[name]) == baselines(rows["workspace"])  # evaluated once, reused
        ran = executed(run(["dvc", "queue", "logs", name], project))
        assert ran == POINT, f"{name} ran {ran}"  # measure-kl ran once: in the base run


def test_hydra_multirun_records_each_point_as_an_experiment(project):
    log = run([sys.executable, "-m", "mixq", "sweep", "-m", "quant.target_bpw=4.0,4.75",
               "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], project)
    assert "Joblib.Parallel(n_jobs=2" in log
    sweep_dir = max((project / "sweeps").iterdir())
    results = [json.loads((sweep_dir / str(i) / "result.json").read_text()) for i in (0, 1)]
    rows = experiments(project)
    for result, target in zip(results, (4.0, 4.75)):
        assert result["overrides"] == [f"quant.target_bpw={target}"]
        assert set(result["stages"]["ran"]) == POINT
        assert UPSTREAM <= set(result["stages"]["unchanged"])
        assert_point(rows[result["experiment"]], target)
        assert re.search(rf"\| quant.target_bpw={target} \| {result['experiment']} \| allocate, "
                         rf"convert, refine, kv-sensitivity, eval, publish \| \d+ \|", log)  # summary


def test_sweep_rejects_a_bad_override_before_running_anything(project):
    before = set(experiments(project))
    proc = subprocess.run([sys.executable, "-m", "mixq", "sweep", "-m", "quant.targt_bpw=5,6"],
                          cwd=project, capture_output=True, text=True)
    assert proc.returncode != 0
    assert re.search(r"targt_bpw", proc.stderr + proc.stdout)
    assert set(experiments(project)) == before
