"""Offline PNG figures of a plan and of a sensitivity table (matplotlib Agg, no pyplot).

Both draw a layer grid: one row per layer type (``self_attn.q_proj``, ``mlp.down_proj``, ...),
one column per transformer block (``layers.N`` in the path); a layer outside the blocks (the
embedding, ``lm_head``) is one bar across the whole row.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from mixq.budget import layer_bits

BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
MISSING = "#dddddd"


def grid_cell(path: str) -> Tuple[str, Optional[int]]:
    """(layer type, block index) of a layer path; block None outside the transformer blocks."""
    m = BLOCK.search(path)
    if m:
        return m.group(2), int(m.group(1))
    return path.removeprefix("model."), None


def layer_grid(paths: List[str]) -> Tuple[List[str], int]:
    """Row names (layer types in model order) and the number of blocks."""
    cells = [grid_cell(p) for p in paths]
    rows = list(dict.fromkeys(kind for kind, _ in cells))
    blocks = max((b for _, b in cells if b is not None), default=-1) + 1
    return rows, blocks


def draw_grid(
    ax: Any, paths: List[str], colours: Mapping[str, Any], hatched: frozenset = frozenset()
) -> None:
    """One rectangle per layer coloured ``colours[path]`` (MISSING if absent) on ``ax``."""
    rows, blocks = layer_grid(paths)
    width = max(blocks, 1)
    for path in paths:
        kind, block = grid_cell(path)
        x, w = (0, width) if block is None else (block, 1)
        ax.add_patch(
            Rectangle(
                (x, rows.index(kind)), w, 1, facecolor=colours.get(path, MISSING),
                edgecolor="white", linewidth=0.8, hatch="///" if path in hatched else None,
            )
        )
    ax.set_xlim(0, width)
    ax.set_ylim(len(rows), 0)
    ax.set_yticks(np.arange(len(rows)) + 0.5, rows, fontsize=9)
    step = 1 if blocks <= 32 else 5 if blocks <= 160 else 10
    ticks = np.arange(0, blocks, step)
    ax.set_xticks(ticks + 0.5, [str(t) for t in ticks], fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)


def plural(layers: int) -> str:
    return f"{layers} layer" + ("" if layers == 1 else "s")


def figure_for(rows: int, blocks: int, panels: int = 1) -> Figure:
    return Figure(
        figsize=(min(max(8.0, 0.3 * blocks + 3.5), 30.0), panels * (0.32 * rows + 1.0) + 1.4),
        layout="constrained",
    )


def plot_bit_map(plan: Mapping[str, Any], table: Mapping[str, Any], path: str | Path) -> None:
    """PNG of the chosen candidate of every layer; protected layers hatched, unquantized grey."""
    paths = [layer["path"] for layer in table["layers"]]
    summary, chosen = plan["summary"], plan["layers"]
    cands = {c["name"]: c for c in table["candidates"]}
    cands.update({e["candidate"]: e for e in chosen.values()})
    per_weight = {  # stored bits per weight, to order candidates cheap -> dear
        n: layer_bits([1, c["group_size"]], c, summary["dtype_bits"]) / c["group_size"]
        for n, c in cands.items()
    }
    names = sorted(per_weight, key=lambda n: (per_weight[n], n))
    shades = np.linspace(0.1, 0.9, len(names)) if len(names) > 1 else [0.4]
    colour = {n: colormaps["viridis"](x) for n, x in zip(names, shades)}
    rows, blocks = layer_grid(paths)
    fig = figure_for(len(rows), blocks)
    ax = fig.add_subplot()
    hatched = frozenset(p for p, entry in chosen.items() if entry["protected"])
    draw_grid(ax, paths, {p: colour[entry["candidate"]] for p, entry in chosen.items()}, hatched)
    ax.set_xlabel("transformer block")
    handles = []
    for n in names:
        used = summary["candidates"].get(n, {"layers": 0, "params": 0})
        share = 100 * used["params"] / summary["total_params"]
        label = f"{n}: {per_weight[n]:.2f} bpw\n{plural(used['layers'])}, {share:.1f}% of params"
        handles.append(Patch(facecolor=colour[n], label=label))
    if hatched:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///",
                             label=f"protected\n{plural(len(hatched))}"))
    if len(chosen) < len(paths):
        handles.append(Patch(facecolor=MISSING, label=f"unquantized ({summary['dtype_bits']}-bit)"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=9, frameon=False,
               labelspacing=1.0)
    ax.set_title(
        f"{summary['bpw']:.3f} bits per weight (target {summary['target_bpw']}), "
        f"predicted KL {summary['predicted_kl']:.4g} ({summary['allocator']} allocator)\n"
        f"quantized layers {summary['quantized_bpw']:.3f} bpw, "
        f"{summary['weight_bytes'] / 2**20:.1f} MiB of weights",
        fontsize=10,
    )
    fig.savefig(path, dpi=130)


def plot_sensitivity_heatmap(
    table: Mapping[str, Any], path: str | Path, metric: str = "mean"
) -> None:
    """PNG of each layer's measured KL (``metric``, log colour), one panel per candidate;
    grey where a candidate does not apply to a layer."""
    paths = [layer["path"] for layer in table["layers"]]
    values = [
        v[metric] for layer in table["layers"] for v in layer["kl"].values() if v[metric] > 0
    ]
    norm = LogNorm(min(values), max(values)) if values else LogNorm(1e-6, 1.0)
    cmap = colormaps["magma_r"]
    rows, blocks = layer_grid(paths)
    cands = table["candidates"]
    fig = figure_for(len(rows), blocks, len(cands))
    axes = fig.subplots(len(cands), 1, squeeze=False)[:, 0]
    for ax, c in zip(axes, cands):
        colours: Dict[str, Any] = {
            layer["path"]: cmap(norm(max(layer["kl"][c["name"]][metric], norm.vmin)))
            for layer in table["layers"]
            if c["name"] in layer["kl"]
        }
        draw_grid(ax, paths, colours)
        ax.set_title(c["name"], fontsize=10, loc="left")
    axes[-1].set_xlabel("transformer block")
    fig.colorbar(ScalarMappable(norm, cmap), ax=list(axes), label=f"KL {metric} per token",
                 shrink=0.9)
    formats = {"method": "{}", "reference": "reference {}", "tokens": "{} tokens"}
    measured = ", ".join(
        form.format(table[key]) for key, form in formats.items() if table.get(key) is not None
    )
    fig.suptitle(
        "Per-layer sensitivity: KL of the model with one layer quantized"
        + (f" ({measured})" if measured else ""),
        fontsize=11,
    )
    fig.savefig(path, dpi=130)
