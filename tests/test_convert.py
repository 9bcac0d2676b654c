"""convert: the checkpoint stock mlx-lm loads matches its plan bit for bit, and a checkpoint
that disagrees with its plan is caught."""

from __future__ import annotations

import json
import shutil

import mixq  # noqa: F401
import mlx_lm
import pytest
from mlx_lm.utils import compute_bits_per_weight

from mixq.allocate import uniform_plan
from mixq.budget import candidate_dict, model_bpw
from mixq.convert import CheckpointMismatchError, verify_checkpoint, write_checkpoint
from mixq.layers import quantizable_layers, unquantized_params


def table_for(model) -> dict:
    """A sensitivity table skeleton (no KLs needed to convert) of ``model``."""
    layers = quantizable_layers(model)
    other = unquantized_params(model, layers)
    return {
        "candidates": [],
        "layers": [{"path": x.path, "kind": x.kind, "shape": list(x.shape),
                    "params": x.params, "kl": {}} for x in layers],
        "unquantized_params": other,
        "total_params": other + sum(x.params for x in layers),
    }


@pytest.fixture(scope="module")
def mixed(smollm2_dir, smollm2, tmp_path_factory):
    """SmolLM2 with a real mixed plan: 4-bit g64 everywhere, 8-bit g64 attention in the first
    and last blocks, mxfp4 MLPs in block 10, 6-bit g32 embeddings."""
    model, _ = smollm2
    table = table_for(model)
    plan = uniform_plan(table, {"bits": 4, "group_size": 64, "mode": "affine"})
    for path, entry in plan["layers"].items():
        if "self_attn" in path and (".0." in path or ".29." in path):
            c = candidate_dict({"bits": 8, "group_size": 64, "mode": "affine"})
        elif "layers.10.mlp" in path:
            c = candidate_dict({"bits": 4, "group_size": 32, "mode": "mxfp4"})
        elif "embed" in path:
            c = candidate_dict({"bits": 6, "group_size": 32, "mode": "affine"})
        else:
            continue
        entry.update(bits=c["bits"], group_size=c["group_size"], mode=c["mode"], candidate=c["name"])
    plan["summary"] = model_bpw(plan, table, 16)
    out = tmp_path_factory.mktemp("quant") / "mixed"
    report = write_checkpoint(smollm2_dir, out, plan, table, "bfloat16")
    return out, plan, table, report


def test_stock_mlx_lm_loads_the_plan_and_chats(mixed):
    out, plan, _, report = mixed
    model, tokenizer = mlx_lm.load(str(out))
    config = json.loads((out / "config.json").read_text())
    for path, c in plan["layers"].items():
        assert config["quantization"][path] == {
            "bits": c["bits"], "group_size": c["group_size"], "mode": c["mode"]}
    assert compute_bits_per_weight(model) == pytest.approx(plan["summary"]["bpw"], rel=1e-9)
    assert report["weight_bytes"] == plan["summary"]["weight_bytes"]
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert "Paris" in mlx_lm.generate(model, tokenizer, prompt, max_tokens=12)
    assert (out / "mixq" / "plan.json").exists() and (out / "tokenizer.json").exists()


def test_a_checkpoint_that_disagrees_with_its_plan_fails(mixed, tmp_path):
    out, plan, table, _ = mixed
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    config = json.loads((tampered / "config.json").read_text())
    config["quantization"]["model.layers.3.mlp.up_proj"]["bits"] = 8  # metadata lies
    (tampered / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="layers.3.mlp.up_proj"):
        verify_checkpoint(tampered, plan, table, "bfloat16")
    claimed = json.loads(json.dumps(plan))  # the plan claims 8-bit, the weights are 4-bit
    claimed["layers"]["model.layers.5.self_attn.q_proj"].update(bits=8, candidate="affine-b8-g64")
    with pytest.raises(CheckpointMismatchError, match="layers.5.self_attn.q_proj"):
        verify_checkpoint(out, claimed, table, "bfloat16")
