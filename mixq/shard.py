"""Sharding measure-kl by layers (``measure.shards``): which layers shard i of n measures,
balanced by cost and deterministic, and the merge of the shards' partial tables into the one
sensitivity table an unsharded run writes.

A shard table is a sensitivity table (see :func:`mixq.sensitivity.write_table`) holding only
its own layers, plus ``shard`` ({"index", "count"}), ``key`` (the measurement key: a hash of
weights, tokens, candidates and settings) and ``all_layers`` (every layer path, model order).
"""

from __future__ import annotations

import logging
from pathlib import Path

from mixq.config import Candidate
from mixq.io import read_json
from mixq.layers import Layer, applicable_candidates

log = logging.getLogger("mixq")

SHARD_FIELDS = ("shard", "key", "all_layers")  # in shard tables only, dropped by the merge
SHARD_FILE = "shard.json"


def layer_costs(
    layers: list[Layer], starts: list[int], candidates: list[Candidate], method: str
) -> list[int]:
    """Estimated cost of measuring each layer, in weights touched (multiply-adds per token).

    ``starts``: per layer, the first block its quantization affects
    (:func:`mixq.measure.first_block_affected`). ``exact`` runs blocks ``start..`` and the
    head once per candidate; ``fisher`` shares one gradient pass between all layers and then
    quantizes the layer's own weight once per candidate.
    """
    head = max((layer.params for layer in layers if layer.block is None), default=0)
    costs = []
    for layer, start in zip(layers, starts):
        if method == "exact":
            work = head + sum(
                other.params for other in layers if other.block is not None and other.block >= start
            )
        else:
            work = layer.params
        costs.append(work * len(applicable_candidates(layer, candidates)))
    return costs


def assign_shards(costs: list[int], count: int) -> list[int]:
    """Shard index per layer: longest-processing-time-first (each layer, by descending cost,
    goes to the least-loaded shard; ties go to the lower layer and shard index)."""
    if not 1 <= count <= len(costs):
        raise ValueError(f"measure.shards={count} must be between 1 and the number of "
                         f"quantizable layers ({len(costs)})")
    loads = [0] * count
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        shard = min(range(count), key=lambda s: (loads[s], s))
        owner[i] = shard
        loads[shard] += costs[i]
    return owner


def shard_layers(layers: list[Layer], costs: list[int], index: int, count: int) -> list[Layer]:
    """The layers (model order) shard ``index`` of ``count`` measures."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index} does not exist: measure.shards={count} has shards "
                         f"0..{count - 1}")
    owner = assign_shards(costs, count)
    return [layer for layer, shard in zip(layers, owner) if shard == index]


def read_shards(shards_dir: Path, count: int) -> list[dict]:
    """The shard tables ``shards_dir/<i>/shard.json`` for i in 0..count-1 (other folders, e.g.
    left by an earlier run with more shards, are ignored with a warning)."""
    expected = {str(i) for i in range(count)}
    present = {p.name for p in Path(shards_dir).iterdir()} if Path(shards_dir).is_dir() else set()
    missing = sorted(expected - present, key=int)
    if missing:
        raise FileNotFoundError(
            f"missing measure-kl shards {missing} of {count} in {shards_dir}: run "
            + " ".join(f"`dvc repro measure-kl@{i}`" for i in missing)
            + " (or `dvc pull` them)"
        )
    if present - expected:
        log.warning("ignoring %s in %s: not shards of measure.shards=%d",
                    sorted(present - expected), shards_dir, count)
    return [read_json(Path(shards_dir) / str(i) / SHARD_FILE) for i in range(count)]


def merge_shards(tables: list[dict], count: int) -> dict:
    """The sensitivity table of all layers from the ``count`` shard tables, exactly as an
    unsharded run writes it. Fails on a missing, duplicate or foreign shard, or on shards
    measured from different models, calibration tokens, candidates or settings."""
    indices = [t.get("shard", {}).get("index") for t in tables]
    for table, index in zip(tables, indices):
        if table.get("shard", {}).get("count") != count:
            raise ValueError(f"shard {index} was measured as one of "
                             f"{table.get('shard', {}).get('count')} shards, not {count}")
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise ValueError(f"duplicate measure-kl shards {duplicates}")
    missing = sorted(set(range(count)) - set(indices))
    if missing:
        raise ValueError(f"missing measure-kl shards {missing} of {count}")
    first = tables[0]
    for table, index in zip(tables[1:], indices[1:]):
        differing = [k for k in first if k not in ("layers", "shard") and table.get(k) != first[k]]
        if differing:
            raise ValueError(
                f"shard {index} does not match shard {indices[0]} in {differing}: the shards "
                "were measured from different models, calibration, candidates or settings"
            )
    by_path: dict[str, dict] = {}
    for table, index in zip(tables, indices):
        for layer in table["layers"]:
            if layer["path"] in by_path:
                raise ValueError(f"layer {layer['path']} is in more than one shard ({index})")
            by_path[layer["path"]] = layer
    order = first["all_layers"]
    if set(by_path) != set(order):
        raise ValueError(f"the shards cover {len(by_path)} layers, the model has {len(order)}: "
                         f"missing {sorted(set(order) - set(by_path))[:5]}")
    merged = {k: v for k, v in first.items() if k not in SHARD_FIELDS}
    merged["layers"] = [by_path[path] for path in order]
    return merged
