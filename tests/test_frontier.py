"""`mixq frontier`: Pareto marking on hand-checkable points, and the whole report from real
`dvc exp run` experiments in a temporary git + DVC repo (with this project's .gitignore, so
outputs/ is gitignored and the metrics file declared exactly as in the real pipeline)."""

from __future__ import annotations

import csv
import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import yaml

from mixq.frontier import pareto_flags, write_frontier
from conftest import REPO, git_commit, run

# target_bpw -> (mixed kl_mean, kl_p95); size_bytes = target_bpw * 1e6. 5.0 is dominated by
# 4.5 (bigger, worse); uniform b4 ties mixed 4.5 in size with a worse KL.
MIXED = {4.25: (0.30, 0.9), 4.5: (0.20, 0.6), 5.0: (0.25, 0.7), 5.5: (0.10, 0.3)}
UNIFORM = {"uniform-affine-b4-g64": (4.5e6, 0.40), "uniform-affine-b8-g64": (8.5e6, 0.003)}
EVAL_SCRIPT = f"""
import json, os, sys, yaml
quant = yaml.safe_load(open("params.yaml"))["quant"]
target = quant["target_bpw"]
if target not in {list(MIXED)}:
    sys.exit(f"no metrics for {{target}}")
kl, p95 = {MIXED}[target]
metrics = {{"reference": {{"kl_mean": 0.0, "size_bytes": 9e7, "ppl": 9.0}},
           "mixed": {{"size_bytes": int(target * 1e6), "bpw": target, "kl_mean": kl,
                      "kl_p95": p95, "ppl": 9.0 + kl, "top1": 1 - kl, "predicted_kl": kl}},
           "uniform4": "uniform-affine-b4-g64"}}
for name, (size, kl) in {UNIFORM}.items():
    metrics[name] = {{"size_bytes": int(size), "bpw": size / 1e6, "kl_mean": kl,
                      "kl_p95": 3 * kl, "ppl": 9.0 + kl, "top1": 1 - kl}}
os.makedirs("outputs/eval", exist_ok=True)
json.dump(metrics, open("outputs/eval/metrics.json", "w"))
"""


def test_pareto_flags_by_hand():
    points = [(1, 5), (2, 3), (3, 3), (3, 1), (4, 1), (2, 3), (0.5, 9), (5, 0.5)]
    assert pareto_flags(points) == [True, True, False, True, False, True, True, True]
    assert pareto_flags([(3, 2), (3, 2)]) == [True, True]  # duplicates do not dominate
    assert pareto_flags([(3, 2), (3, 1)]) == [False, True]  # same size, lower KL wins
    assert pareto_flags([(2, 1), (3, 1)]) == [True, False]  # same KL, smaller wins
    assert pareto_flags([(1, 1)]) == [True]
    assert pareto_flags([]) == []


@pytest.fixture(scope="module")
def exp_repo(tmp_path_factory) -> Path:
    """A git + DVC repo with a one-stage eval writing metrics.json from quant.target_bpw, the
    project's .gitignore, metrics declaration and top-level plots; experiments: 4.25, 4.5, 5.0 in the workspace, 5.5
    in a temporary dir (as `mixq sweep` runs them), 6.0 queued and never run."""
    root = tmp_path_factory.mktemp("frontier") / "repo"
    root.mkdir()
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    (root / "eval.py").write_text(EVAL_SCRIPT)
    params = {"quant": {"target_bpw": 4.25, "candidates": [
        {"bits": 4, "group_size": 64, "mode": "affine"},
        {"bits": 8, "group_size": 64, "mode": "affine"}]}, "kv": {"target_bits": 4.5}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    project = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stage = {"cmd": "python eval.py", "deps": ["eval.py"], "params": ["quant", "kv"],
             "metrics": project["stages"]["eval"]["metrics"]}  # declared as the project does
    (root / "dvc.yaml").write_text(
        yaml.safe_dump({"stages": {"eval": stage}, "plots": project["plots"]}))
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    git_commit(root, "init")
    for target in (4.25, 4.5, 5.0):
        run(["dvc", "exp", "run", "-S", f"quant.target_bpw={target}", "-n", f"t{target}"], root)
    run(["dvc", "exp", "run", "--temp", "-S", "quant.target_bpw=5.5", "-n", "t5.5"], root)
    run(["dvc", "exp", "run", "--queue", "-S", "quant.target_bpw=6.0", "-n", "t6.0"], root)
    return root


def test_frontier_over_real_experiments(exp_repo):
    log = run([sys.executable, "-m", "mixq", "frontier"], exp_repo)
    out = exp_repo / "outputs" / "frontier"
    with open(out / "frontier.csv") as fh:
        rows = {r["name"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"t4.25", "t4.5", "t5.0", "t5.5", *UNIFORM}  # baselines once each
    assert {n: rows[n]["pareto"] for n in rows} == {
        "t4.25": "True", "t4.5": "True", "t5.0": "False", "t5.5": "True",
        "uniform-affine-b4-g64": "False", "uniform-affine-b8-g64": "True"}
    for target, (kl, p95) in MIXED.items():
        row = rows[f"t{target}"]
        assert (row["kind"], float(row["target_bpw"]), int(row["size_bytes"])) == (
            "mixed", target, int(target * 1e6))
        assert (float(row["kl_mean"]), float(row["kl_p95"])) == (kl, p95)
        assert row["candidates"] == "affine-b4-g64+affine-b8-g64"
        assert float(row["kv_target_bits"]) == 4.5
    assert rows["uniform-affine-b8-g64"]["kind"] == "uniform"
    assert rows["uniform-affine-b8-g64"]["target_bpw"] == ""
    assert [r for r in rows] == sorted(rows, key=lambda n: float(rows[n]["size_bytes"]))

    report = json.loads((out / "frontier.json").read_text())
    sources = {p["name"]: p["sources"] for p in report["points"]}
    assert sources["t5.0"] == ["t5.0", "workspace"]  # the workspace holds the last exp run
    assert sorted(sources["uniform-affine-b8-g64"]) == sorted(
        ["t4.25", "t4.5", "t5.0", "t5.5", "workspace"])
    skipped = {s["name"]: s["reason"] for s in report["skipped"]}
    assert skipped["t6.0"] == "experiment is queued"
    assert "skipped t6.0: experiment is queued" in log
    assert "| t5.5 | mixed | 5.5 | 5.500 | 5.5 | 0.1 | 0.3 |" in log  # the markdown table

    png = (out / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (1040, 715)  # 8 x 5.5 in at 130 dpi

    plots = json.loads(run(["dvc", "plots", "show", "--json"], exp_repo))["data"]
    values = plots["outputs/frontier/frontier.csv"][0]["content"]["data"]["values"]
    assert len(values) == len(rows)


def test_all_commits_reaches_experiments_of_earlier_commits(exp_repo):
    """After a commit lands, the sweep's experiments hang off the previous commit: only
    --all-commits (like `dvc exp show --all-commits`) still finds them."""
    (exp_repo / "NOTES.md").write_text("a commit after the sweep\n")
    git_commit(exp_repo, "later")
    names = {}
    for flags in ([], ["--all-commits"]):
        run([sys.executable, "-m", "mixq", "frontier", *flags], exp_repo)
        with open(exp_repo / "outputs" / "frontier" / "frontier.csv") as fh:
            names[tuple(flags)] = {r["name"] for r in csv.DictReader(fh) if r["kind"] == "mixed"}
    sweep = {"t4.25", "t4.5", "t5.0", "t5.5"}
    assert len(names[()]) == 1 and not names[()] & sweep  # the new commit's own point only
    assert sweep <= names[("--all-commits",)]


def test_frontier_without_eval_metrics_fails_clearly(tmp_path):
    run(["git", "init", "-q"], tmp_path)
    run(["dvc", "init", "-q"], tmp_path)
    with pytest.raises(SystemExit, match="no evaluated point"):
        write_frontier(tmp_path, tmp_path / "frontier")
    assert not (tmp_path / "frontier").exists()
    with pytest.raises(SystemExit, match="is not a DVC repository"):
        write_frontier(tmp_path / "missing", tmp_path / "frontier")
