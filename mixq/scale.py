"""awq-scale: AWQ's activation-aware scaling, folded into an equivalent float model.

For each transformer block, mlx-lm's own AWQ search (``mlx_lm.quant.awq.scale_block``: a grid
over ``s = mean|x|^a``, the scale that minimizes the block's output error when its layers are
quantized) picks per-input-channel scales, and ``apply_scale`` folds them into the preceding
RMSNorm or Linear: the layers' weights are multiplied by ``s``, the op before them divided, so
the float model computes the same function (to float rounding) while the weights quantize
better. The per-architecture wiring (which norm precedes which layers) is mlx-lm's
``AWQ_MODEL_CONFIGS``; an architecture without an entry passes through unchanged.

Optional clipping (``mlx_lm.quant.awq.clip_block``) shrinks each weight group's range to
minimize the quantized layer's output error: it changes the float model, so quality must
still be measured against the original float model.

The search quantizes with :func:`mixq.quantize.fake_quantize` (the checkpoint dtype, as
measure-kl and convert do) at ``scale.bits``/``scale.group_size``; the plan that follows may
give a layer other bits. Only the block inputs are captured here; the search and the folding
are mlx-lm's.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, clip_block, run_layer, scale_block

from mixq.config import Candidate, ScaleConfig
from mixq.quantize import fake_quantize

log = logging.getLogger("mixq")

BATCH = 4  # calibration sequences per forward pass (memory only, not results)
SCALE_REPORT = "mixq_scale.json"


def awq_config(model_type: str):
    """mlx-lm's AWQ wiring for ``model_type``, or None when it has none."""
    return AWQ_MODEL_CONFIGS.get(model_type)


class _Recorder(nn.Module):
    """Stands in for a block during one forward pass: keeps its input and mask."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.inputs: list[mx.array] = []
        self.mask: Any = None

    def __getattr__(self, key):  # the model may read block attributes (llama: use_sliding)
        try:
            return super().__getattr__(key)
        except AttributeError:
            if "block" not in self:
                raise
            return getattr(self["block"], key)

    def __call__(self, x, *args, **kwargs):
        self.inputs.append(x)
        self.mask = args[0] if args else kwargs.get("mask")
        out = self.block(x, *args, **kwargs)
        mx.eval(x, out)
        return out


def block_inputs(lm: nn.Module, tokens: np.ndarray) -> list[tuple[mx.array, Any]]:
    """Each block's float input [N, T, D] and attention mask for ``tokens`` [N, T], from
    ordinary forward passes of the model (so embedding scaling, per-layer masks and the like
    are the model's own)."""
    blocks = lm.layers
    recorders = [_Recorder(b) for b in blocks]
    for i, r in enumerate(recorders):
        blocks[i] = r
    try:
        for start in range(0, len(tokens), BATCH):
            mx.eval(lm(mx.array(tokens[start : start + BATCH])))
    finally:
        for i, r in enumerate(recorders):
            blocks[i] = r.block
    return [(mx.concatenate(r.inputs, axis=0), r.mask) for r in recorders]


def _capture_layer_inputs(block: nn.Module, x: mx.array, mask: Any) -> mx.array:
    """Run ``block`` on ``x``; every Linear in it keeps its input as ``input_feat`` (what
    mlx-lm's ``search_best_scale``/``search_best_clip`` read). Returns the block's output."""
    leaves = block.leaf_modules()

    def catcher(module):
        if not isinstance(module, (nn.Linear, SwitchLinear)):
            return module

        class Catcher(nn.Module):
            def __call__(self, h, *args, **kwargs):
                module.input_feat = (
                    mx.concatenate([module.input_feat, h], axis=0) if "input_feat" in module else h
                )
                return module(h, *args, **kwargs)

        return Catcher()

    block.update_modules(tree_map(catcher, leaves, is_leaf=nn.Module.is_module))
    try:
        out = run_layer(block, x, mask=mask, batch_size=BATCH)
    finally:
        block.update_modules(leaves)
    return out


def _drop_layer_inputs(block: nn.Module) -> None:
    for _, module in block.named_modules():
        if "input_feat" in module:
            del module["input_feat"]


def _quantized_error(block: nn.Module, x: mx.array, mask: Any, target: mx.array, quantize) -> float:
    """Mean squared error of the block's output with every Linear fake-quantized."""
    params = tree_flatten(block.parameters())
    for _, module in block.named_modules():
        if isinstance(module, (nn.Linear, SwitchLinear)):
            module.weight = quantize(module.weight)
    out = run_layer(block, x, mask=mask, batch_size=BATCH)
    err = ((out - target).astype(mx.float32) ** 2).mean().item()
    block.load_weights(params)
    return err


def scale_model(
    model: nn.Module, model_type: str, tokens: np.ndarray, cfg: ScaleConfig, dtype: str,
    search_scales: bool = True,
) -> dict:
    """Scale (and with ``cfg.clip`` clip) ``model`` in place with mlx-lm's AWQ search on
    calibration ``tokens`` [N, T]. Returns a report: whether it ran, per block the output error
    of the block quantized at ``cfg.bits`` before and after, blocks that fell back (as mlx-lm's
    ``awq_quantize``, a block whose error grew keeps its original weights), seconds.
    ``search_scales=False`` only clips (an already scaled model: the same as both at once)."""
    t0 = time.time()
    awq = awq_config(model_type)
    if not cfg.enabled or awq is None:
        reason = "disabled (scale.enabled=false)" if not cfg.enabled else (
            f"no AWQ config for model_type {model_type!r} in mlx-lm (has {sorted(AWQ_MODEL_CONFIGS)})")
        log.info("awq-scale: passing the model through unchanged: %s", reason)
        return {"scaled": False, "reason": reason}
    lm = model[awq.lm_key] if awq.lm_key else model
    candidate = Candidate(cfg.bits, cfg.group_size, cfg.mode)

    def quantize(w: mx.array) -> mx.array:
        return fake_quantize(w, candidate, dtype)

    if cfg.samples is not None:
        tokens = tokens[: cfg.samples]
    inputs = block_inputs(lm, tokens)
    blocks = []
    for i, block in enumerate(lm.layers):
        x, mask = inputs[i]
        inputs[i] = None
        target = _capture_layer_inputs(block, x, mask)
        original = tree_flatten(block.parameters())
        before = _quantized_error(block, x, mask, target, quantize)
        if search_scales:
            scale_block(block, awq.scale_configs, quantize, {"mask": mask}, cfg.n_grid)
        if cfg.clip:
            clip_block(block, awq.no_clip, quantize, cfg.group_size, cfg.n_grid)
        _drop_layer_inputs(block)
        after = _quantized_error(block, x, mask, target, quantize)
        kept = after <= before
        if not kept:
            block.load_weights([(k, v) for k, v in original if not k.endswith("input_feat")])
            _drop_layer_inputs(block)
        mx.eval(block.parameters())
        blocks.append({"block": i, "error_before": before, "error_after": after, "kept": kept})
        log.info("awq-scale block %d: quantized-output error %.4g -> %.4g%s", i, before, after,
                 "" if kept else " (worse: original weights kept)")
    seconds = time.time() - t0
    log.info("awq-scale: %d blocks in %.1fs, %d fell back", len(blocks), seconds,
             sum(not b["kept"] for b in blocks))
    return {"scaled": True, "clip": cfg.clip, "bits": cfg.bits, "group_size": cfg.group_size,
            "n_grid": cfg.n_grid, "sequences": int(len(tokens)), "blocks": blocks,
            "seconds": seconds}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copy2(src, dst)


def write_scaled_model(source_dir: Path, out_dir: Path, tokens: np.ndarray, cfg: ScaleConfig,
                       dtype: str) -> dict:
    """``source_dir`` (an MLX model directory) scaled by :func:`scale_model` into ``out_dir``
    (weights in the source's dtype, every other file copied); a model that is not scaled is
    linked (or copied) file by file. Writes and returns the report (``mixq_scale.json``)."""
    from mlx_lm.utils import load_model, save_model

    from mixq.io import read_json, write_json

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    config = read_json(source_dir / "config.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.enabled and awq_config(config.get("model_type", "")) is not None:
        model, _ = load_model(source_dir)
        report = scale_model(model, config["model_type"], tokens, cfg, dtype)
        save_model(out_dir, model, donate_model=True)
        weights = ("*.safetensors", "model.safetensors.index.json")
    else:
        report = scale_model(None, config.get("model_type", ""), tokens, cfg, dtype)
        weights = ()
    for f in sorted(source_dir.iterdir()):
        if f.is_file() and not any(f.match(p) for p in weights) and f.name != SCALE_REPORT:
            _link_or_copy(f, out_dir / f.name)
    write_json(out_dir / SCALE_REPORT, report)
    return report
