"""Sharing results through a DVC remote, with real `dvc` on the tiny Llama: a fresh clone
restores every output from a local-directory remote without running a stage, a changed param
re-runs only its stages, and hardlink/symlink caches link outputs without corrupting the cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from conftest import compose, copy_project, executed, git_commit, restored, run

STAGES_TO = ["convert", "baselines"]
WEIGHTS = Path("outputs/quant/model.safetensors")


@pytest.fixture(scope="module")
def origin(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project copy that ran the tiny pipeline, committed dvc.lock and pushed its outputs and
    run cache to a local-directory default remote (``<origin>/../store``)."""
    base = tmp_path_factory.mktemp("remote")
    root = copy_project(base / "origin")
    run(["dvc", "remote", "add", "-d", "store", str(base / "store")], root)
    compose(root, tiny_llama_dir)
    run(["dvc", "repro", *STAGES_TO], root)
    git_commit(root, "results")
    run(["dvc", "push", "--run-cache"], root)
    return root


def clone(origin: Path, dest: Path) -> Path:
    """`git clone` of ``origin``: its commits and .dvc/config (the remote), no outputs, no cache."""
    run(["git", "clone", "-q", str(origin), str(dest)], origin.parent)
    assert not (dest / "outputs").exists() and not (dest / ".dvc" / "cache").exists()
    return dest


def output_hashes(root: Path) -> dict[str, str]:
    """sha256 of the content of every file under ``root/outputs`` (links followed), by path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "outputs").rglob("*")) if p.is_file()}


def corrupt_cache_files(root: Path) -> list[str]:
    """Cache objects under ``.dvc/cache/files/md5`` whose content md5 is not their name."""
    bad = []
    for obj in (root / ".dvc" / "cache" / "files" / "md5").glob("*/*"):
        name = obj.parent.name + obj.name.removesuffix(".dir")
        if hashlib.md5(obj.read_bytes()).hexdigest() != name:
            bad.append(str(obj))
    return bad


def test_push_run_cache_uploads_outputs_too(origin: Path):
    assert "Cache and remote 'store' are in sync" in run(["dvc", "status", "--cloud"], origin)
    assert any((origin.parent / "store" / "runs").rglob("*")), "run cache not pushed"


def test_project_links_outputs_into_the_cache_by_default(origin: Path):
    """.dvc/config's cache.type (hardlink,symlink,copy): a checkpoint a stage just wrote is
    moved into the cache and hard-linked back, never left as a second copy."""
    weights = origin / WEIGHTS
    assert weights.is_symlink() or os.stat(weights).st_nlink > 1


def test_fresh_clone_restores_everything_without_running(origin: Path, tmp_path: Path):
    repo = clone(origin, tmp_path / "clone")
    log = run(["dvc", "repro", "--pull", *STAGES_TO], repo)
    assert executed(log) == set(), log
    assert output_hashes(repo) == output_hashes(origin)
    status = run(["dvc", "status", "--with-deps", *STAGES_TO], repo)
    assert "Data and pipelines are up to date" in status, status


def test_param_change_on_a_clone_runs_only_its_stages(origin: Path, tmp_path: Path,
                                                      tiny_llama_dir: Path):
    repo = clone(origin, tmp_path / "clone")
    compose(repo, tiny_llama_dir, "quant.target_bpw=6.0")
    log = run(["dvc", "repro", "--pull", *STAGES_TO], repo)
    assert executed(log) == {"allocate", "convert"}, log
    ours, theirs = output_hashes(repo), output_hashes(origin)
    upstream = ("outputs/model/", "outputs/calibration/", "outputs/sensitivity/",
                "outputs/baselines/")
    pulled = {path: digest for path, digest in theirs.items() if path.startswith(upstream)}
    assert pulled and pulled.items() <= ours.items()
    assert ours["outputs/plan/plan.json"] != theirs["outputs/plan/plan.json"]


@pytest.mark.parametrize("cache_type", ["hardlink", "symlink"])
def test_link_cache_outputs_are_links_and_reruns_keep_the_cache_intact(
        origin: Path, tmp_path: Path, tiny_llama_dir: Path, cache_type: str):
    import mlx.core as mx
    import mlx_lm

    repo = clone(origin, tmp_path / "clone")
    run(["dvc", "config", "--local", "cache.type", cache_type], repo)
    run(["dvc", "repro", "--pull", *STAGES_TO], repo)

    def linked(path: Path) -> bool:
        if cache_type == "symlink":
            return path.is_symlink() and (repo / ".dvc" / "cache") in path.resolve().parents
        return not path.is_symlink() and os.stat(path).st_nlink > 1

    assert linked(repo / WEIGHTS) and linked(repo / "outputs/model/model.safetensors")

    compose(repo, tiny_llama_dir, "quant.target_bpw=6.0")  # re-run stages over linked outputs
    log = run(["dvc", "repro", *STAGES_TO], repo)
    assert executed(log) == {"allocate", "convert"}, log
    assert linked(repo / WEIGHTS)
    assert corrupt_cache_files(repo) == []
    model, _ = mlx_lm.load(str(repo / "outputs/quant"))
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 49152)

    compose(repo, tiny_llama_dir)  # back: restored from the run cache, as pushed by origin
    log = run(["dvc", "repro", *STAGES_TO], repo)
    assert executed(log) == set() and restored(log) == {"allocate", "convert"}, log
    assert output_hashes(repo) == output_hashes(origin)
    assert corrupt_cache_files(repo) == []
