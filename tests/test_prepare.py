"""prepare_model: embedded, path (MLX and Hugging Face layouts) and hub sources."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mixq  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import mlx_lm
import pytest

from mixq.config import ModelConfig
from mixq.prepare import SOURCE_FILE, prepare_model

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]


def read_source(model_dir: Path) -> dict:
    return json.loads((model_dir / SOURCE_FILE).read_text())


def test_embedded_records_its_source(smollm2_dir: Path):
    source = read_source(smollm2_dir)
    assert source["kind"] == "embedded" and source["id"] == "smollm2-135m-instruct"
    assert source["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert len(source["sha256"]) == 64 and source["dtype"] == "float32"
    assert source["gguf"]["license"] == "apache-2.0"  # the GGUF's general.*, for the card
    assert not smollm2_dir.with_name(smollm2_dir.name + ".tmp").exists()


def test_path_round_trip_keeps_weights_and_tokenizer(smollm2_dir: Path, tmp_path: Path):
    out = prepare_model(ModelConfig(kind="path", id=str(smollm2_dir)), tmp_path / "copy")
    assert read_source(out)["path"] == str(smollm2_dir.resolve())
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (smollm2_dir / name).read_bytes()
    original = mx.load(str(smollm2_dir / "model.safetensors"))
    copied = mx.load(str(out / "model.safetensors"))
    assert copied.keys() == original.keys()
    assert all(mx.array_equal(copied[k], original[k]) for k in original)
    _, tokenizer = mlx_lm.load(str(out))
    assert tokenizer.encode("<|im_start|>user\n12345") == [1, 4093, 198, 33, 34, 35, 36, 37]


def test_hugging_face_layout_is_converted_and_cast(smollm2_dir: Path, tmp_path: Path):
    """An HF checkpoint (bf16, format=pt, rotary inv_freq, tied lm_head) -> MLX float32."""
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(smollm2_dir / name, hf_dir / name)
    config = json.loads((smollm2_dir / "config.json").read_text()) | {"torch_dtype": "bfloat16"}
    (hf_dir / "config.json").write_text(json.dumps(config))
    weights = {
        k: v.astype(mx.bfloat16) for k, v in mx.load(str(smollm2_dir / "model.safetensors")).items()
    }
    extra = {
        "lm_head.weight": weights["model.embed_tokens.weight"],
        "model.layers.0.self_attn.rotary_emb.inv_freq": mx.ones((32,), mx.float32),
    }
    mx.save_safetensors(str(hf_dir / "model.safetensors"), weights | extra, {"format": "pt"})

    out = prepare_model(ModelConfig(kind="path", id=str(hf_dir), dtype="float32"), tmp_path / "m")
    converted = mx.load(str(out / "model.safetensors"))
    assert converted.keys() == weights.keys()
    assert {w.dtype for w in converted.values()} == {mx.float32}
    assert all(mx.array_equal(converted[k], weights[k].astype(mx.float32)) for k in weights)
    assert (out / "tokenizer.json").exists()
    mlx_lm.load(str(out))


def test_bad_path_fails_clearly_and_keeps_previous_output(tmp_path: Path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "previous.txt").write_text("kept")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_model(ModelConfig(kind="path", id=str(tmp_path / "missing")), out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        prepare_model(ModelConfig(kind="path", id=str(tmp_path / "empty")), out)
    assert (out / "previous.txt").read_text() == "kept"
    assert not (tmp_path / "model.tmp").exists()


def test_hub_offline_fails_with_one_clear_error(tmp_path: Path):
    script = (
        "from pathlib import Path; from mixq.config import ModelConfig; "
        "from mixq.prepare import prepare_model; "
        f"prepare_model(ModelConfig(kind='hub', id='HuggingFaceTB/SmolLM2-135M-Instruct'), "
        f"Path({str(tmp_path / 'model')!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("RuntimeError: the Hugging Face Hub is unreachable")
    assert "model.kind=path" in last_line
    assert list(tmp_path.iterdir()) == []


def test_unknown_embedded_id_lists_known_ids(tmp_path: Path):
    with pytest.raises(ValueError,
                       match="known ids are \\['gemma3-270m', 'smollm2-135m-instruct'\\]"):
        prepare_model(ModelConfig(kind="embedded", id="tinyllama"), tmp_path / "model")


def test_unknown_kind_and_dtype_fail_before_anything_runs():
    with pytest.raises(ValueError, match="model.kind='ftp' is not one of embedded, hub, path"):
        ModelConfig(kind="ftp", id="x")
    with pytest.raises(ValueError, match="model.dtype='int8' is not one of"):
        ModelConfig(id="smollm2-135m-instruct", dtype="int8")
