"""Compose-time validation: a setting no stage can use fails `mixq compose` with one line
naming it, before anything runs, and params.yaml is left as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mixq.cli import compose_params

ROOT = Path(__file__).resolve().parents[1]
BAD = {
    "quant.allocator=optimall": "quant.allocator='optimall' is not one of greedy, optimal",
    "quant.candidates=[]": "quant.candidates is empty",
    "quant.candidates=[{bits:7,group_size:64,mode:affine}]": "affine bits=7 is not one of",
    "quant.candidates=[{bits:4,group_size:16,mode:affine}]": "affine-b4 group_size=16",
    "quant.candidates=[{bits:4,group_size:64,mode:mxfp4}]": "mxfp4-b4 group_size=64",
    "quant.candidates=[{bits:4,group_size:64,mode:int4}]": "mode='int4' is not one of",
    "quant.dtype=bf16": "quant.dtype='bf16' is not one of float32, bfloat16, float16",
    "model.dtype=float64": "model.dtype='float64'",
    "model.kind=hubb": "model.kind='hubb' is not one of embedded, hub, path",
    "measure.method=exactt": "measure.method='exactt' is not one of exact, fisher",
    "measure.reference=q5": "measure.reference='q5' is not one of auto, float, q8, q4",
    "kv.candidates=[]": "kv.candidates is empty",
    "kv.allocator=best": "kv.allocator='best'",
    "eval.tasks=[arithmetic,mmlu]": "eval.tasks[]='mmlu' is not one of",
    "calibration.source=s3": "calibration.source='s3' is not one of builtin, files, hf",
    "calibration.domains=[prose,poetry]": "calibration.domains[]='poetry'",
    "quant.targt_bpw=5": "targt_bpw",
}


@pytest.fixture(scope="module")
def conf(tmp_path_factory) -> Path:
    return Path(shutil.copytree(ROOT / "conf", tmp_path_factory.mktemp("conf") / "conf"))


@pytest.mark.parametrize("override", BAD)
def test_a_bad_setting_fails_compose_in_one_line(conf, tmp_path, override, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("unchanged\n")
    with pytest.raises(SystemExit) as failed:
        compose_params([override], conf, params)
    message = str(failed.value)
    assert message.startswith("mixq compose: invalid configuration: ") and "\n" not in message
    assert BAD[override] in message
    assert params.read_text() == "unchanged\n"


def test_the_defaults_compose(conf, tmp_path):
    compose_params([], conf, tmp_path / "params.yaml")
    assert "target_bpw" in (tmp_path / "params.yaml").read_text()
