"""Sharded measure-kl: shards balanced by cost, merged tables equal to the unsharded one
exactly (fisher and exact, library and real `dvc repro`), journals shared between shards, and
a merge that refuses missing, duplicate or mismatched shards."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from conftest import compose, copy_project, executed, restored, run, save_tiny_llama, tiny_llama
from mixq.config import Candidate, MeasureConfig, QuantConfig
from mixq.io import write_json
from mixq.layers import quantizable_layers
from mixq.measure import first_block_affected
from mixq.sensitivity import measure_sensitivity
from mixq.shard import SHARD_FILE, assign_shards, layer_costs, merge_shards, read_shards
from test_workflow import EXPRESSION, schema_check

QUANT = QuantConfig(candidates=[Candidate(4, 64), Candidate(8, 64)])
SHARDS = 3
WORKFLOW = Path(__file__).resolve().parents[1] / ".github/workflows/measure-shards.yml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A 2-block random Llama with a 512-token vocabulary."""
    return save_tiny_llama(tiny_llama(vocab_size=512), tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory) -> Path:
    """4 random sequences of 32 tokens for :func:`model_dir`."""
    out = tmp_path_factory.mktemp("calibration")
    tokens = np.random.default_rng(0).integers(0, 512, (4, 32)).astype(np.int32)
    save_file({"tokens": tokens}, str(out / "calibration.safetensors"))
    return out


def measure(model_dir, calibration_dir, method, cache, monkeypatch, shard=None, shards=1,
            quant=QUANT):
    monkeypatch.setenv("MIXQ_CACHE", str(cache))
    cfg = MeasureConfig(method=method, reference="float", chunk_tokens=64, shards=shards,
                        shard_ids=list(range(shards)))
    return measure_sensitivity(model_dir, calibration_dir, quant, cfg, shard)


@pytest.fixture(scope="module")
def fisher_shards(model_dir, calibration_dir) -> list[dict]:
    with pytest.MonkeyPatch.context() as mp:
        return [measure(model_dir, calibration_dir, "fisher", "unused", mp, i, SHARDS)
                for i in range(SHARDS)]


def test_shards_are_balanced_by_cost_and_deterministic():
    model = tiny_llama(vocab_size=512, layers=4)
    layers = quantizable_layers(model)
    starts = [first_block_affected(model, layer) for layer in layers]
    exact = layer_costs(layers, starts, QUANT.candidates, "exact")
    q_proj = [c for layer, c in zip(layers, exact) if layer.path.endswith("self_attn.q_proj")]
    assert q_proj == sorted(q_proj, reverse=True) and q_proj[0] > q_proj[-1]  # early blocks cost more
    fisher = layer_costs(layers, starts, QUANT.candidates, "fisher")
    assert fisher == [2 * layer.params for layer in layers]
    for costs in (exact, fisher):
        owner = assign_shards(costs, 3)
        assert owner == assign_shards(list(costs), 3) and set(owner) == {0, 1, 2}
        loads = [sum(c for c, o in zip(costs, owner) if o == s) for s in range(3)]
        assert max(loads) - min(loads) <= max(costs)  # longest-first greedy bound
    with pytest.raises(ValueError, match="number of quantizable layers"):
        assign_shards(exact, len(exact) + 1)


@pytest.mark.parametrize("method", ["fisher", "exact"])
def test_merged_shards_equal_the_unsharded_table(
    method, model_dir, calibration_dir, tmp_path, monkeypatch, caplog
):
    whole = measure(model_dir, calibration_dir, method, tmp_path / "a", monkeypatch)
    shards = [measure(model_dir, calibration_dir, method, tmp_path / "b", monkeypatch, i,
                      SHARDS) for i in range(SHARDS)]
    assert all(s["layers"] for s in shards)
    assert sum(len(s["layers"]) for s in shards) == len(whole["layers"])
    assert json.dumps(merge_shards(shards, SHARDS)) == json.dumps(whole)
    if method == "exact":  # each shard journaled its own rows; a whole run reuses all of them
        journals = sorted(p.name for p in (tmp_path / "b" / "measure").glob("*/*.jsonl"))
        assert journals == [f"rows-{i}of{SHARDS}.jsonl" for i in range(SHARDS)]
        with caplog.at_level(logging.INFO, logger="mixq"):
            again = measure(model_dir, calibration_dir, method, tmp_path / "b", monkeypatch)
        assert again == whole and "0 to go" in caplog.text
        assert not list((tmp_path / "b" / "measure").glob("*/rows.jsonl"))


def test_merge_refuses_missing_duplicate_and_mismatched_shards(
    fisher_shards, model_dir, calibration_dir, monkeypatch, tmp_path
):
    a, b, c = fisher_shards
    with pytest.raises(ValueError, match=r"missing measure-kl shards \[1\]"):
        merge_shards([a, c], SHARDS)
    with pytest.raises(ValueError, match=r"duplicate measure-kl shards \[0\]"):
        merge_shards([a, a, c], SHARDS)
    other = measure(model_dir, calibration_dir, "fisher", "unused", monkeypatch, 1, SHARDS,
                    QuantConfig(candidates=[Candidate(4, 64)]))
    with pytest.raises(ValueError, match="different models, calibration, candidates"):
        merge_shards([a, other, c], SHARDS)
    of_two = measure(model_dir, calibration_dir, "fisher", "unused", monkeypatch, 1, 2)
    with pytest.raises(ValueError, match="one of 2 shards, not 3"):
        merge_shards([a, of_two, c], SHARDS)
    for i, table in enumerate([a, b, c, of_two]):
        write_json(tmp_path / str(i) / SHARD_FILE, table)
    assert read_shards(tmp_path, SHARDS) == [a, b, c]  # folder 3: a stale shard, ignored
    shutil.rmtree(tmp_path / "1")
    with pytest.raises(FileNotFoundError, match=r"`dvc repro measure-kl@1`"):
        read_shards(tmp_path, SHARDS)


def test_dvc_sharded_run_writes_the_unsharded_table(tiny_llama_dir, tmp_path):
    project = copy_project(tmp_path / "project")
    compose(project, tiny_llama_dir)
    log = run(["dvc", "repro", "measure-kl-merge"], project)
    assert {"measure-kl@0", "measure-kl-merge"} <= executed(log)
    sensitivity = project / "outputs" / "sensitivity"
    whole = {name: (sensitivity / name).read_text() for name in ("sensitivity.json",
                                                                  "sensitivity.csv")}

    compose(project, tiny_llama_dir, f"measure.shards={SHARDS}")
    log = run(["dvc", "repro", "measure-kl-merge"], project)
    assert executed(log) == {f"measure-kl@{i}" for i in range(SHARDS)} | {"measure-kl-merge"}
    for name, text in whole.items():
        assert (sensitivity / name).read_text() == text

    log = run(["dvc", "repro", f"measure-kl@{SHARDS - 1}"], project)  # one machine's share
    assert executed(log) == set()
    compose(project, tiny_llama_dir)  # back to one shard: from the run cache, except the
    log = run(["dvc", "repro", "measure-kl-merge"], project)  # merge (stale shard folders)
    assert restored(log) == {"measure-kl@0"} and executed(log) == {"measure-kl-merge"}
    assert "ignoring ['1', '2']" in log
    assert (sensitivity / "sensitivity.json").read_text() == whole["sensitivity.json"]


def test_shard_workflow_template_is_valid():
    """A matrix job per shard (list from the composed params), then the merge, via a remote."""
    result = schema_check(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    assert jobs["shard"]["strategy"]["matrix"]["shard"] == (
        "${{ fromJSON(needs.prepare.outputs.shard_ids) }}")
    assert jobs["merge"]["needs"] == "shard"
    scripts = {name: "\n".join(s.get("run", "") for s in job["steps"]) for name, job in jobs.items()}
    assert 'dvc repro --pull "measure-kl@$SHARD"' in scripts["shard"]
    assert "dvc repro --pull measure-kl-merge" in scripts["merge"]
    for script in scripts.values():
        assert "dvc push --run-cache" in script and not EXPRESSION.search(script)
        check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
        assert check.returncode == 0, check.stderr
