"""convert: apply a plan with mlx-lm's quantization and write a standard MLX checkpoint.

The checkpoint is what stock ``mlx_lm.load`` reads: safetensors weights and ``config.json``
whose ``quantization`` holds one ``{bits, group_size, mode}`` entry per quantized layer. What
was written is read back and checked against the plan (every layer's bits, group size, mode,
and the tensor bytes), so a checkpoint that disagrees with its plan never leaves this stage.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.utils import load_model, quantize_model, save_config, save_model

from mixq.budget import candidate_dict, dtype_bits, layer_bits, model_bpw
from mixq.chat import chat_tokens
from mixq.config import QuantConfig
from mixq.io import read_json, write_json
from mixq.quantize import DTYPES

log = logging.getLogger("mixq")

SIDE_FILES = ("*.jinja", "tokenizer*", "special_tokens_map.json", "generation_config.json",
              "vocab.json", "merges.txt", "*.model")


class CheckpointMismatchError(RuntimeError):
    """The written checkpoint does not match its plan."""


def quantize_to_plan(model, config: dict, plan_layers: Mapping[str, Mapping], dtype: str):
    """Cast ``model`` to ``dtype`` and quantize each layer in ``plan_layers`` (path ->
    {bits, group_size, mode}) in place with mlx-lm; returns the quantized config."""
    model.update(
        tree_map(
            lambda p: p.astype(DTYPES[dtype]) if mx.issubdtype(p.dtype, mx.floating) else p,
            model.parameters(),
        )
    )
    # mlx-lm skips any layer whose input width is not divisible by the *default* group size,
    # whatever the predicate says: use the smallest group size of the plan as the default.
    smallest = min(plan_layers.values(), key=lambda c: c["group_size"])

    def predicate(path: str, module) -> bool | dict:
        c = plan_layers.get(path)
        return {"bits": c["bits"], "group_size": c["group_size"], "mode": c["mode"]} if c else False

    _, qconfig = quantize_model(
        model,
        {**config, "torch_dtype": dtype},
        group_size=smallest["group_size"],
        bits=smallest["bits"],
        mode=smallest["mode"],
        quant_predicate=predicate,
    )
    return qconfig


def write_checkpoint(
    source_dir: Path, out_dir: Path, plan: Mapping[str, Any], table: Mapping[str, Any], dtype: str
) -> dict:
    """Quantize the model in ``source_dir`` to ``plan`` and write it to ``out_dir`` with a
    ``mixq/`` sidecar (plan, sensitivity table); verify it; return the verification report."""
    model, config = load_model(source_dir)
    qconfig = quantize_to_plan(model, config, plan["layers"], dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(out_dir, model, donate_model=True)
    save_config(qconfig, out_dir / "config.json")
    for pattern in SIDE_FILES:
        for f in source_dir.glob(pattern):
            shutil.copy(f, out_dir / f.name)
    sidecar = out_dir / "mixq"
    sidecar.mkdir()
    write_json(sidecar / "plan.json", plan)
    write_json(sidecar / "sensitivity.json", table)
    return verify_checkpoint(out_dir, plan, table, dtype)


def verify_checkpoint(
    ckpt_dir: Path, plan: Mapping[str, Any], table: Mapping[str, Any], dtype: str
) -> dict:
    """Read ``ckpt_dir`` back: every planned layer stored with its bits, group size and mode,
    nothing else quantized, tensor bytes equal to the plan's prediction. Raises
    :class:`CheckpointMismatchError` listing the first mismatches."""
    config = read_json(ckpt_dir / "config.json")
    weights = {}
    for f in sorted(ckpt_dir.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    quantization = config.get("quantization", {})
    shapes = {layer["path"]: layer["shape"] for layer in table["layers"]}
    errors = []
    for path, c in plan["layers"].items():
        want = {"bits": c["bits"], "group_size": c["group_size"], "mode": c["mode"]}
        got = {k: quantization.get(path, {}).get(k) for k in want}
        if got != want:
            errors.append(f"{path}: config.json says {got}, plan says {want}")
        stored = [weights.get(f"{path}.{n}") for n in ("weight", "scales", "biases")]
        n_bits = sum(x.nbytes * 8 for x in stored if x is not None)
        expected = layer_bits(shapes[path], c, dtype_bits(dtype))
        if stored[1] is None or n_bits != expected:
            errors.append(f"{path}: stores {n_bits} bits, {c['candidate']} needs {expected}")
    extra = [k[: -len(".scales")] for k in weights if k.endswith(".scales")]
    extra = sorted(set(extra) - set(plan["layers"]))
    if extra:
        errors.append(f"quantized but not in the plan: {extra[:5]}")
    total_bytes = sum(x.nbytes for x in weights.values())
    predicted = model_bpw(plan, table, dtype_bits(dtype))
    if total_bytes != predicted["weight_bytes"]:
        errors.append(f"tensor bytes {total_bytes} != planned {predicted['weight_bytes']}")
    if errors:
        raise CheckpointMismatchError(
            f"{ckpt_dir} does not match its plan ({len(errors)} problems): " + "; ".join(errors[:5])
        )
    report = {"weight_bytes": total_bytes, "bpw": predicted["bpw"], "layers": len(plan["layers"])}
    log.info("verified %s: %d layers, %.3f bpw, %d bytes", ckpt_dir, report["layers"],
             report["bpw"], total_bytes)
    return report


def smoke_test(ckpt_dir: Path, prompt: str = "What is the capital of France?") -> bool:
    """Load ``ckpt_dir`` with stock ``mlx_lm.load`` and greedily answer ``prompt`` (one user turn,
    :func:`mixq.chat.chat_tokens`: the chat template or the plain format); logs the answer and
    returns whether it worked. Never raises: the checkpoint was verified already, a failure here
    is reported, not a reason to lose it."""
    import mlx_lm

    try:
        model, tokenizer = mlx_lm.load(str(ckpt_dir))
        chat = [{"role": "user", "content": prompt}]
        ids, rendering = chat_tokens(tokenizer, chat, add_generation_prompt=True)
        answer = mlx_lm.generate(model, tokenizer, ids, max_tokens=8)
    except Exception as err:  # noqa: BLE001 (any failure is reported the same way)
        log.warning("smoke test (stock mlx_lm.load + generate) failed: %s: %s",
                    type(err).__name__, err)
        return False
    log.info("mlx_lm.load + generate (%s chat): %r", rendering, answer)
    return True


def baseline_candidates(quant: QuantConfig) -> list[dict]:
    """Uniform comparison quants: ``quant.baselines``, plus affine 4-bit at the smallest
    affine group size of the mix's candidates (64 if none) when it is not among them."""
    candidates = [candidate_dict(c) for c in quant.baselines]
    groups = [c.group_size for c in quant.candidates if c.mode == "affine"]
    four = candidate_dict({"bits": 4, "group_size": min(groups, default=64), "mode": "affine"})
    return candidates + ([four] if four not in candidates else [])
