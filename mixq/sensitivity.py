"""The sensitivity table: measure (exact or fisher) on a prepared model and calibration set,
and read/write it (JSON for tools, CSV for people, a heatmap PNG for eyes)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from mixq.budget import candidate_dict, candidate_name
from mixq.config import MeasureConfig, QuantConfig
from mixq.fisher import measure_fisher
from mixq.layers import quantizable_layers, unquantized_params
from mixq.io import atomic_dir, write_json
from mixq.measure import cache_root, first_block_affected, measure_exact, measurement_key
from mixq.reference import REFERENCE_BITS, FloatWeights, choose_reference, quantize_reference
from mixq.shard import layer_costs, shard_layers

log = logging.getLogger("mixq")


def measure_sensitivity(
    model_dir: Path, calibration_dir: Path, quant: QuantConfig, cfg: MeasureConfig,
    shard: int | None = None,
) -> dict:
    """The sensitivity table (see :func:`write_table`) for every quantizable layer, or with
    ``shard`` the shard table (see :mod:`mixq.shard`) of shard ``shard`` of ``cfg.shards``."""
    from mlx_lm.utils import load_model  # here: the merge stage reads tables without mlx-lm

    if cfg.method not in ("exact", "fisher"):
        raise ValueError(f"measure.method must be 'exact' or 'fisher', not {cfg.method!r}")
    reference = choose_reference(cfg.reference, model_dir)
    if reference != "float" and cfg.method == "fisher":
        raise ValueError("measure.method=fisher needs the float model: set measure.reference=float")
    model, _ = load_model(model_dir, lazy=reference != "float")
    tokens = load_file(str(calibration_dir / "calibration.safetensors"))["tokens"]
    layers = quantizable_layers(model)
    other = unquantized_params(model, layers)
    measured = layers
    if shard is not None:
        starts = [first_block_affected(model, layer) for layer in layers]
        costs = layer_costs(layers, starts, quant.candidates, cfg.method)
        measured = shard_layers(layers, costs, shard, cfg.shards)
        log.info("shard %d of %d: %d of %d layers", shard, cfg.shards, len(measured), len(layers))
    key = measurement_key(model_dir, tokens, quant.candidates, quant.dtype, cfg, reference)
    if cfg.method == "exact":
        floats = weights = None
        if reference != "float":
            floats = quantize_reference(model, layers, REFERENCE_BITS[reference])
            weights = FloatWeights(model_dir)
        work_dir = cache_root() / "measure" / key
        name = "rows" if shard is None else f"rows-{shard}of{cfg.shards}"
        rows = measure_exact(model, tokens, quant.candidates, quant.dtype, cfg, work_dir, measured,
                             floats, weights, name)
    else:
        rows = measure_fisher(model, tokens, measured, quant.candidates, quant.dtype)
    table = {
        "candidates": [candidate_dict(c) for c in quant.candidates],
        "layers": [
            {
                "path": layer.path,
                "kind": layer.kind,
                "block": layer.block,
                "shape": list(layer.shape),
                "params": layer.params,
                "kl": {
                    candidate_name(c): rows[(layer.path, candidate_name(c))]
                    for c in quant.candidates
                    if (layer.path, candidate_name(c)) in rows
                },
            }
            for layer in measured
        ],
        "unquantized_params": other,
        "total_params": other + sum(layer.params for layer in layers),
        "tokens": int(tokens.size),
        "method": cfg.method,
        "reference": reference,
        "dtype": quant.dtype,
    }
    if shard is not None:
        table.update(shard={"index": shard, "count": cfg.shards}, key=key,
                     all_layers=[layer.path for layer in layers])
    return table


def write_table(table: dict, out_dir: Path) -> None:
    """``sensitivity.json``, ``sensitivity.csv`` (one row per layer x candidate) and
    ``heatmap.png`` in ``out_dir`` (written atomically)."""
    from mixq.plots import plot_sensitivity_heatmap

    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "sensitivity.json", table)
        with open(tmp / "sensitivity.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["layer", "kind", "params", "candidate", "kl_mean", "kl_p95", "kl_max"])
            for layer in table["layers"]:
                for name, kl in layer["kl"].items():
                    writer.writerow(
                        [layer["path"], layer["kind"], layer["params"], name]
                        + [kl["mean"], kl["p95"], kl["max"]]
                    )
        plot_sensitivity_heatmap(table, tmp / "heatmap.png")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two 1-D arrays (average ranks for ties)."""

    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average ties
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(np.asarray(a)), ranks(np.asarray(b))
    return float(np.corrcoef(ra, rb)[0, 1])
