"""Real checkpoints' shapes through the whole pipeline with the default configs (real `dvc
repro` in a temporary repo): a Gemma-3-shaped model (sliding-window and global layers, head_dim
256, tied embeddings, a base tokenizer without a chat template) and a Qwen3-shaped one
(head_dim 128, q/k norms, a chat template)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import (
    copy_project, executed, run, save_tiny_llama, tiny_gemma3, tiny_qwen3, with_tokenizer,
)

ALL_STAGES = {"prepare-model", "calibrate", "measure-kl@0", "measure-kl-merge", "allocate",
              "convert", "refine", "baselines", "kv-sensitivity", "eval-baselines", "eval", "publish"}
SHAPES = {
    # name: (builder, architecture, chat template, global KV caches, sliding-window caches,
    #        default KV candidates dropped at its head_dim)
    "gemma3": (tiny_gemma3, "Gemma3ForCausalLM", False, ["2", "5"], ["0", "1", "3", "4"],
               ["affine-b3-g64"]),
    "qwen3": (tiny_qwen3, "Qwen3ForCausalLM", True, ["0", "1", "2", "3"], [], []),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pipeline(request, smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``(shape, project)``: `mixq compose model=path model.id=<tiny model>` with every other
    config at its default, then `dvc repro` of the whole pipeline; the log in project/repro.log."""
    build, architecture, template, *_ = SHAPES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model_dir = save_tiny_llama(build(), root / f"tiny-{request.param}", architecture)
    with_tokenizer(model_dir, smollm2_dir, chat_template=template)
    project = copy_project(root / "project")
    run([sys.executable, "-m", "mixq", "compose", "model=path", f"model.id={model_dir}"], project)
    (project / "repro.log").write_text(run(["dvc", "repro"], project))
    return request.param, project


def read(project: Path, path: str):
    return json.loads((project / path).read_text())


def test_every_stage_runs(pipeline):
    _, project = pipeline
    assert executed((project / "repro.log").read_text()) == ALL_STAGES
    assert read(project, "outputs/metrics/convert.json")["smoke_test"] is True
    metrics = read(project, "outputs/eval/metrics.json")
    assert {"reference", "mixed", "uniform-affine-b4-g64"} <= set(metrics)


def test_chats_render_with_the_template_or_the_plain_format(pipeline):
    shape, project = pipeline
    manifest = read(project, "outputs/calibration/manifest.json")
    chats = {"template"} if SHAPES[shape][2] else {"plain"}
    for domain, renderings in manifest["renderings"].items():
        assert set(renderings) == ({"text"} if domain in ("prose", "code") else chats), domain
    assert "Assistant:" in manifest["plain_chat_format"]
    assert "documents rendered as" in (project / "outputs/calibration/preview.md").read_text()


def test_kv_config_counts_sliding_windows_and_drops_what_mlx_lm_cannot_hold(pipeline):
    shape, project = pipeline
    *_, kv_layers, sliding, dropped = SHAPES[shape]
    config = read(project, "outputs/kv/kv_config.json")
    assert sorted(config["layers"]) == kv_layers
    assert sorted(config["skipped"]) == sliding
    assert sorted(config["dropped_candidates"]) == dropped  # 3-bit at head_dim 256 only
    assert ("dropped ['affine-b3-g64']" in (project / "repro.log").read_text()) == bool(dropped)
    s = config["summary"]
    sliding_bytes = len(sliding) * 2 * 256 * 2  # 1 KV head x (256 + 256) x 2 bytes (bf16)
    assert s["sliding_window_bytes_per_token"] == sliding_bytes
    assert s["bytes_per_token"] == pytest.approx(s["bits"] * s["kv_elements_per_token"] / 8
                                                 + sliding_bytes)
    assert all(e["reason"].startswith("sliding-window") for e in config["skipped"].values())


def test_card_has_the_models_identity_and_no_local_paths(pipeline):
    shape, project = pipeline
    card = (project / "outputs/publish/README.md").read_text()
    assert card.splitlines()[card.splitlines().index("---", 1) + 2] == f"# tiny-{shape}-mixq"
    assert str(project.parent) not in card and "model.id=path/to/tiny-" in card
    assert "## KV cache" in card
    assert ("Skipped caches" in card) == bool(SHAPES[shape][4])
    assert ("Candidates dropped" in card) == bool(SHAPES[shape][5])
