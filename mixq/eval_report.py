"""eval outputs: metrics.json, summary.md, samples.jsonl, plot data (CSV) and PNGs, from the
result of :func:`mixq.eval_runs.run_eval`."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from mixq.budget import dtype_bits, layer_bits
from mixq.config import EvalConfig
from mixq.eval_runs import SAME_SIZE_TOLERANCE, deltas
from mixq.io import write_json
from mixq.plots import plot_kl_vs_size, plot_per_layer
from mixq.sandbox import available_isolation


def layer_series(
    table: Mapping[str, Any], plans: Mapping[str, Mapping]
) -> tuple[list[dict], list[dict]]:
    """Per table layer (model order), per quant: the plan's per-layer KL (its sensitivity at the
    chosen candidate, None if unmeasured) and stored bits per weight (scales included)."""
    bits = dtype_bits(table["dtype"])
    kl_rows, bit_rows = [], []
    for index, layer in enumerate(table["layers"]):
        head = {"layer_index": index, "layer": layer["path"]}
        chosen = {name: plan["layers"].get(layer["path"]) for name, plan in plans.items()}
        kl_rows.append({**head, **{n: c and c["kl"] for n, c in chosen.items()}})
        bit_rows.append({**head, **{
            n: (layer_bits(layer["shape"], c, bits) / layer["params"] if c else bits)
            for n, c in chosen.items()
        }})
    return kl_rows, bit_rows


def size_rows(metrics: Mapping[str, Any], names: Iterable[str]) -> list[dict]:
    """One row per quant: size, bpw, measured and predicted KL, capability."""
    keys = ("size_bytes", "bpw", "kl_mean", "kl_p95", "predicted_kl", "capability")
    return [{"quant": n, **{k: metrics[n].get(k) for k in keys}} for n in names]


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] + ["---:"] * (len(header) - 1), *rows]
    return "\n".join(f"| {' | '.join(cells)} |" for cells in lines)


def fmt(value: Any, spec: str = ".4g", sign: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:{'+' if sign else ''}{spec}}" if isinstance(value, (int, float)) else str(value)


def summary_markdown(result: Mapping[str, Any], cfg: EvalConfig) -> str:
    """``summary.md``: the metrics table, Δ vs uniform 4-bit, predicted vs measured KL, timings
    (the baselines' from eval-baselines, plus eval's second pass of the reference)."""
    metrics, models, tasks = result["metrics"], result["models"], list(cfg.tasks)
    columns = [("size MB", "size_bytes", 1e-6, ".1f"), ("bpw", "bpw", 1, ".3f"),
               ("KL mean", "kl_mean", 1, ".4f"), ("KL p95", "kl_p95", 1, ".4f"),
               ("ppl", "ppl", 1, ".3f"), ("top-1", "top1", 1, ".3f"),
               ("in-dist. KL mean", "id_kl_mean", 1, ".4f"), ("in-dist. ppl", "id_ppl", 1, ".3f"),
               *((t, t, 1, ".3f") for t in tasks), ("capability", "capability", 1, ".3f")]

    keys = [k for _, k, _, _ in columns]

    def cells(m: Mapping, sign: bool = False) -> list[str]:
        return [fmt(m[k] * s if k in m else None, f, sign) for _, k, s, f in columns]

    uniform4 = metrics["uniform4"]
    tokens: dict[str, list[int]] = {}
    for probe, n in zip(result["probes"], result["prompt_tokens"]):
        tokens.setdefault(probe.task, []).append(n)
    lengths = ", ".join(f"{t} {np.mean(n):.0f}" for t, n in tokens.items())
    kernels = {m["metrics"]["kernels"] for n, m in models.items() if n != "reference"}
    probed = ", ".join(f"`{n}`" for n, m in models.items() if m["answers"])
    timings = {**{n: m["seconds"] for n, m in models.items()},
               "reference (again, for mixed)": result["reference_rerun"]}
    gap = metrics["closest_size_bpw_gap"]
    same = (f"`{metrics['same_size']}`" if metrics["same_size"] != "none" else
            f"none within ±{SAME_SIZE_TOLERANCE:.0%} of the mixed bpw (closest: "
            f"`{metrics['closest_size']}`, {gap:+.1%})")
    sandbox = f", sandbox {available_isolation().mode}" if "code" in cfg.tasks else ""
    lines = [
        "# Evaluation", "",
        f"{metrics['heldout_tokens']} held-out tokens: KL, ppl and top-1 on text from other "
        "sources than the calibration mix (package docs and library code), in-dist. on held-out "
        "documents of the calibration domains. Quants run "
        f"as {', '.join(sorted(kernels))}, float32 activations. Probes answered by {probed}: "
        f"{cfg.samples_per_task} per task (seed {cfg.seed}), greedy, at most {cfg.max_tokens} "
        f"new tokens; mean prompt tokens: {lengths}; hashhop {cfg.hashhop_hops} hops; code "
        f"tests time out after {cfg.code_timeout} s{sandbox}."
        + "".join(f" Not asked of the quants: {task} ({why}: at chance, it cannot tell them "
                  "apart)." for task, why in metrics.get("skipped_tasks", {}).items()), "",
        markdown_table(["model", *(c[0] for c in columns)],
                       [[n, *cells(metrics[n])] for n in models]), "",
        f"## Δ vs `{uniform4}`", "",
        markdown_table(["model", *(c[0] for c in columns)],
                       [[n, *cells(deltas(metrics[n], metrics[uniform4], keys), True)]
                        for n in models if n != uniform4]), "",
        f"Uniform quant at the same on-disk size: {same}.", "",
        "## Predicted vs measured KL", "",
        "Predicted: the plan's sum of per-layer KLs (measured one layer at a time on the "
        "calibration tokens; the allocator assumes they add up). Measured: mean KL per held-out "
        "token with every layer quantized.", "",
        markdown_table(["model", "predicted KL", "measured KL", "measured / predicted"], [
            [n, fmt(m.get("predicted_kl")), fmt(m["kl_mean"]),
             fmt(m.get("measured_over_predicted_kl"), ".3f")]
            for n, m in metrics.items() if n in result["plans"]]), "",
        "## Timings (seconds)", "",
        markdown_table(["model", "load", "held-out", "generate", "score", "total"], [
            [n, *(fmt(v, ".1f") for v in seconds.values()), fmt(sum(seconds.values()), ".1f")]
            for n, seconds in timings.items()]),
    ]
    return "\n".join(lines) + "\n"


def write_outputs(result: Mapping[str, Any], cfg: EvalConfig, out_dir: Path) -> None:
    """metrics.json, summary.md, samples.jsonl (every probe, answer and score), the plot data
    (kl_per_layer.csv, bits_per_layer.csv, kl_vs_size.csv) and their PNGs in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics, models, plans = result["metrics"], result["models"], result["plans"]
    write_json(out_dir / "metrics.json", metrics)
    (out_dir / "summary.md").write_text(summary_markdown(result, cfg))
    probed = {name: m for name, m in models.items() if m["answers"]}
    with open(out_dir / "samples.jsonl", "w") as fh:
        for i, (probe, n) in enumerate(zip(result["probes"], result["prompt_tokens"])):
            record = {"task": probe.task, "prompt": probe.messages[-1]["content"],
                      "prompt_tokens": n, "target": probe.target, "reference": probe.reference,
                      "answers": {name: m["answers"][i] for name, m in probed.items()},
                      "scores": {name: m["scores"][i] for name, m in probed.items()}}
            fh.write(json.dumps(record) + "\n")
    kl_rows, bit_rows = layer_series(result["table"], plans)
    sizes = size_rows(metrics, plans)
    write_csv(out_dir / "kl_per_layer.csv", kl_rows)
    write_csv(out_dir / "bits_per_layer.csv", bit_rows)
    write_csv(out_dir / "kl_vs_size.csv", sizes)
    paths = [row["layer"] for row in kl_rows]
    plot_per_layer({n: [r[n] for r in kl_rows] for n in plans}, paths,
                   "KL per token, this layer alone", "Per-layer KL (sensitivity of the layer's "
                   "candidate, calibration tokens)", out_dir / "kl_per_layer.png", "mixed", True)
    plot_per_layer({n: [r[n] for r in bit_rows] for n in plans}, paths,
                   "stored bits per weight", "Bits per layer (scales and biases included)",
                   out_dir / "bits_per_layer.png", "mixed")
    plot_kl_vs_size(sizes, out_dir / "kl_vs_size.png")
