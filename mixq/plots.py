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
from matplotlib.ticker import LogFormatter

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


def plot_per_layer(
    series: Mapping[str, List[Optional[float]]], paths: List[str], ylabel: str, title: str,
    path: str | Path, highlight: Optional[str] = None, log: bool = False,
) -> None:
    """PNG of one value per layer (``paths``, model order) for each named series: thin steps,
    the ``highlight`` series as dots on top; x ticks at the first layer of every few transformer
    blocks. None values are left out."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(paths))
    for name, values in series.items():
        y = np.array([np.nan if v is None else v for v in values], dtype=float)
        if name == highlight:
            ax.plot(x, y, "o", markersize=3.5, label=name, zorder=3, color="black")
        else:
            ax.step(x, y, where="mid", label=name, linewidth=1.0, alpha=0.8)
    firsts: Dict[int, int] = {}
    for i, p in enumerate(paths):
        block = grid_cell(p)[1]
        if block is not None:
            firsts.setdefault(block, i)
    step = max(1, len(firsts) // 10)
    ticks = [(i, str(b)) for b, i in sorted(firsts.items()) if b % step == 0]
    ax.set_xticks([i for i, _ in ticks], [label for _, label in ticks], fontsize=8)
    ax.set_xlabel("transformer block (layers in model order; outside blocks at the ends)")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=9, frameon=False)
    ax.set_title(title, fontsize=11)
    fig.savefig(path, dpi=130)


def plot_kl_vs_size(rows: List[Mapping[str, Any]], path: str | Path) -> None:
    """PNG of measured mean KL (filled) and the plan's predicted KL (hollow, joined by a dashed
    line) against on-disk size, one colour per quant (``rows``: quant, size_bytes, kl_mean,
    predicted_kl)."""
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.add_subplot()
    colours = colormaps["tab10"]
    for i, row in enumerate(rows):
        x, measured, predicted = row["size_bytes"] / 1e6, row["kl_mean"], row["predicted_kl"]
        ax.scatter([x], [measured], color=colours(i), s=60, zorder=3, label=row["quant"])
        if predicted:
            ax.scatter([x], [predicted], facecolors="none", edgecolors=colours(i), s=60, zorder=3)
            ax.plot([x, x], [predicted, measured], color=colours(i), linestyle="--", linewidth=1)
        ax.annotate(f"{measured:.3g}", (x, measured), textcoords="offset points", xytext=(8, -3),
                    fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("on-disk size of the safetensors (MB)")
    ax.set_ylabel("KL(reference || quant) per token")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9, frameon=False, title="filled: measured (held-out)\nhollow: predicted",
              title_fontsize=8)
    ax.set_title("KL vs size of the evaluated quants", fontsize=11)
    fig.savefig(path, dpi=130)


def plot_kv_sensitivity(
    table: Mapping[str, Any], config: Mapping[str, Any], path: str | Path
) -> None:
    """PNG of the KV-cache sensitivity: top, each KV layer's KL (mean per token, log) at every
    candidate with the chosen one ringed; bottom, the chosen bits per cache. Caches without a
    per-token KV cache (skipped) are shaded."""
    fig = Figure(figsize=(max(8.0, 0.28 * table["caches"] + 3.0), 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    x = [layer["block"] for layer in table["layers"]]
    colours = colormaps["viridis"](np.linspace(0.1, 0.85, len(table["candidates"])))
    for c, colour in zip(table["candidates"], colours):
        y = [layer["kl"][c["name"]]["mean"] if c["name"] in layer["kl"] else np.nan
             for layer in table["layers"]]
        top.plot(x, y, "o-", color=colour, markersize=3.5, linewidth=1.2, label=c["name"])
    chosen = config["layers"]
    top.scatter([int(p) for p in chosen], [e["kl"] for e in chosen.values()], s=80,
                facecolors="none", edgecolors="crimson", linewidths=1.4, zorder=3, label="chosen")
    if chosen:  # nothing measured (no candidate fits): an empty linear panel
        top.set_yscale("log")
    top.set_ylabel("KL per token (mean)")
    top.grid(alpha=0.3, which="both")
    top.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    bottom.bar([int(p) for p in chosen], [e["bits"] for e in chosen.values()], color="steelblue")
    for ax in (top, bottom):
        for index in config["skipped"]:
            ax.axvspan(int(index) - 0.5, int(index) + 0.5, color=MISSING, zorder=0)
    bottom.set_ylabel("KV bits")
    bottom.set_xlabel("layer (cache index); grey: no per-token KV cache")
    bottom.set_xlim(-0.5, table["caches"] - 0.5)
    bottom.set_yticks(sorted({c["bits"] for c in table["candidates"]}))
    s = config["summary"]
    fig.suptitle(
        f"KV-cache sensitivity ({table['tokens']} tokens): {s['bits']:.3f} bits per element "
        f"(target {s['target_bits']}), {s['bytes_per_token']:.0f} B/token vs "
        f"{s['unquantized_bytes_per_token']:.0f} unquantized, predicted KL {s['predicted_kl']:.3g}",
        fontsize=10,
    )
    fig.savefig(path, dpi=130)


def plot_frontier(rows: List[Mapping[str, Any]], path: str | Path) -> None:
    """PNG of held-out mean KL against on-disk size (both log) of every evaluated point
    (``rows``: name, kind mixed|uniform, size_bytes, kl_mean, pareto): mixed quants as dots,
    uniform baselines as squares, the Pareto-optimal points joined by a step line and labelled."""
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.add_subplot()
    styles = {"mixed": ("o", "tab:blue", "mixed (mixq)"), "uniform": ("s", "tab:orange",
                                                                      "uniform baseline")}
    for kind, (marker, colour, label) in styles.items():
        points = [r for r in rows if r["kind"] == kind]
        if points:
            ax.scatter([r["size_bytes"] / 1e6 for r in points], [r["kl_mean"] for r in points],
                       marker=marker, color=colour, s=50, zorder=3, label=label)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["size_bytes"])
    ax.step([r["size_bytes"] / 1e6 for r in front], [r["kl_mean"] for r in front], where="post",
            color="black", linewidth=1.0, zorder=2, label="Pareto frontier")
    for r in front:
        target = f" ({r['target_bpw']} bpw target)" if r.get("target_bpw") is not None else ""
        ax.annotate(f"{r['name']}{target}", (r["size_bytes"] / 1e6, r["kl_mean"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
        axis(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))  # 80, not 8x10^1
    ax.set_yscale("log")
    ax.set_xlabel("on-disk size of the safetensors (MB, log)")
    ax.set_ylabel("held-out KL(reference || quant) per token (mean, log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9, frameon=False)
    ax.set_title(f"Quality/size frontier: {len(front)} of {len(rows)} points Pareto-optimal",
                 fontsize=11)
    fig.savefig(path, dpi=130)
