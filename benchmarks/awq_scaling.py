"""Does AWQ-style scaling pay inside mixq? Held-out KL against the *original* float model of:

  uniform RTN 4-bit g64 (original weights)          vs   AWQ scales searched at 4/3-bit + RTN 4
  AWQ scales + clipping + RTN 4 (+ the stock embed 4-bit g32 variant, as mlx_lm.awq ships)
  mixq's mix at 4.5 and 5.0 bpw: fisher sensitivities and knapsack on the original vs the
  scaled model (re-measured there)

Weights are fake-quantized (quantize -> dequantize, float32), as measure-kl does. Run after
`dvc repro measure-kl-merge` (outputs/model, outputs/calibration, outputs/sensitivity):

    python benchmarks/awq_scaling.py --variants all     # ~25 min on the shared 2-core machine
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import mixq  # noqa: F401  (first: loads OpenBLAS before MLX)
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import load_model

from mixq.allocate import allocate, uniform_plan
from mixq.budget import dtype_bits
from mixq.artifacts import read_calibration
from mixq.cli import setup_logging
from mixq.config import Candidate, MeasureConfig, QuantConfig, ScaleConfig
from mixq.evaluate import forward_logits, heldout_metrics, record_logits
from mixq.io import read_json
from mixq.kl import split_chunks
from mixq.quantize import fake_quantize
from mixq.scale import write_scaled_model
from mixq.sensitivity import measure_sensitivity

log = logging.getLogger("mixq")
DTYPE = "bfloat16"
OUT = Path("benchmarks/results/awq_scaling.json")


def heldout_splits(cal) -> dict[str, np.ndarray]:
    splits = {"heldout": cal.split("heldout")[0]}
    try:
        other = cal.split("heldout_other")[0]
        if other is not None and len(other) and other is not splits["heldout"]:
            splits["heldout_other"] = other
    except (KeyError, ValueError, AttributeError):
        pass
    return splits


class Scorer:
    """Held-out metrics of fake-quantized weights against the original float model."""

    def __init__(self, model, splits, work: Path):
        self.model = model
        self.original = dict(tree_flatten(model.parameters()))
        self.chunks = {n: split_chunks(t, 1024) for n, t in splits.items()}
        self.reference = {
            n: record_logits(forward_logits(model, c), sum(x.size for x in c), work / f"{n}.npy")
            for n, c in self.chunks.items()
        }

    def score(self, weights: dict, plan_layers: dict) -> dict:
        w = dict(weights)
        for path, c in plan_layers.items():
            cand = Candidate(c["bits"], c["group_size"], c["mode"])
            w[path + ".weight"] = fake_quantize(weights[path + ".weight"], cand, DTYPE)
        self.model.update(tree_unflatten(list(w.items())))
        out = {}
        for n, chunks in self.chunks.items():
            m = heldout_metrics(forward_logits(self.model, chunks), chunks, self.reference[n])
            out[n] = {k: m[k] for k in ("kl_mean", "kl_p95", "ppl", "top1")}
        self.model.update(tree_unflatten(list(self.original.items())))
        return out


def load_weights(model_dir: Path) -> dict:
    model, _ = load_model(model_dir)
    return dict(tree_flatten(model.parameters()))


def clip_scaled(scaled_dir: Path, out: Path, tokens, cfg: ScaleConfig, config: dict) -> dict:
    """Clip an already scaled model (its scale search's time added from its report)."""
    from mlx_lm.utils import save_model

    from mixq.io import write_json
    from mixq.scale import SCALE_REPORT, scale_model

    scaled = read_json(scaled_dir / SCALE_REPORT)
    model, _ = load_model(scaled_dir)
    report = scale_model(model, config["model_type"], tokens, cfg, DTYPE, search_scales=False)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model, donate_model=True)
    for f in scaled_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != SCALE_REPORT:
            (out / f.name).write_bytes(f.read_bytes())
    report = {**report, "clip_seconds": report["seconds"],
              "seconds": report["seconds"] + scaled["seconds"], "scaled_from": str(scaled_dir)}
    write_json(out / SCALE_REPORT, report)
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="outputs/model")
    ap.add_argument("--calibration", default="outputs/calibration")
    ap.add_argument("--sensitivity", default="outputs/sensitivity/sensitivity.json")
    ap.add_argument("--budgets", default="4.5,5.0")
    ap.add_argument("--scale-bits", default="4,3", help="bits the scale search quantizes with")
    ap.add_argument("--clip", action="store_true", help="also the clipped variants")
    ap.add_argument("--mix-on", default="4", help="scaled models (bits[,bits+clip]) to re-run "
                    "fisher on and allocate, e.g. '4,3,4c'")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--work", default=None, help="keep the scaled models here and reuse them")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--clip-scaled", default=None, help="clip this already scaled model (the "
                    "same as scaling and clipping at once) instead of scaling from scratch")
    args = ap.parse_args()
    setup_logging()
    model_dir, cal_dir = Path(args.model), Path(args.calibration)
    cal = read_calibration(cal_dir)
    splits = heldout_splits(cal)
    log.info("held-out splits: %s", {n: t.shape for n, t in splits.items()})
    model, config = load_model(model_dir)
    budgets = [float(b) for b in args.budgets.split(",")]
    quant = QuantConfig()
    dbits = dtype_bits(DTYPE)
    if args.sensitivity == "compute":  # fisher on the original model, this calibration
        t = time.time()
        table0 = measure_sensitivity(model_dir, cal_dir, quant,
                                     MeasureConfig(method="fisher", reference="float"))
        log.info("fisher on the original model in %.0fs", time.time() - t)
    else:
        table0 = read_json(Path(args.sensitivity))
    results: list[dict] = []
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="awq-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.time()
    scorer = Scorer(model, splits, work)
    log.info("reference logits in %.1fs", time.time() - t)

    def record(name, bpw, weights, plan_layers, seconds, **extra):
        t = time.time()
        m = scorer.score(weights, plan_layers)
        row = {"variant": name, "bpw": bpw, **m, "seconds": seconds,
               "score_seconds": time.time() - t, **extra}
        results.append(row)
        log.info("RESULT %s: bpw %.3f %s (%.0fs)", name, bpw,
                 {n: round(v["kl_mean"], 4) for n, v in m.items()}, seconds)
        Path(args.out).write_text(json.dumps(results, indent=1))

    original = scorer.original
    u4 = uniform_plan(table0, Candidate(4, 64), dbits)
    if not args.skip_baselines:
        record("float (sanity)", 32.0, original, {}, 0)
        record("uniform RTN 4-bit g64", u4["summary"]["bpw"], original, u4["layers"], 0)
    for b in ([] if args.skip_baselines else budgets):
        t = time.time()
        plan = allocate(table0, QuantConfig(target_bpw=b), dbits)
        record(f"mixq RTN mix {b}", plan["summary"]["bpw"], original, plan["layers"],
               time.time() - t, predicted_kl=plan["summary"]["predicted_kl"])

    variants = [(int(b), False) for b in args.scale_bits.split(",") if b]
    if args.clip:
        variants.append((4, True))
    mix_on = set(args.mix_on.split(",")) if args.mix_on else set()
    tokens = cal.split("calibration")[0]
    for bits, clip in variants:
        tag = f"{bits}{'c' if clip else ''}"
        cfg = ScaleConfig(bits=bits, clip=clip)
        out = work / f"scaled-{tag}"
        if (out / "mixq_scale.json").exists():
            report = read_json(out / "mixq_scale.json")
            log.info("reusing %s (scaled in %.0fs)", out, report["seconds"])
        elif clip and args.clip_scaled:
            report = clip_scaled(Path(args.clip_scaled), out, tokens, cfg, config)
        else:
            report = write_scaled_model(model_dir, out, tokens, cfg, DTYPE)
        name = f"AWQ scale@{bits}" + (" + clip" if clip else "")
        weights = load_weights(out)
        fell = sum(not b["kept"] for b in report["blocks"])
        record(f"{name}: float", 32.0, weights, {}, report["seconds"], fallbacks=fell)
        record(f"{name} + RTN 4-bit g64", u4["summary"]["bpw"], weights, u4["layers"],
               report["seconds"], fallbacks=fell)
        if clip:  # as mlx_lm.awq ships it: the embedding at 4-bit g32
            stock = {**u4["layers"]}
            for path in stock:
                if "embed" in path:
                    stock[path] = {**stock[path], "group_size": 32}
            t_e = next(x for x in table0["layers"] if "embed" in x["path"])
            extra_bits = t_e["params"] * 16 * 2 * (1 / 32 - 1 / 64)
            bpw = u4["summary"]["bpw"] + extra_bits / table0["total_params"]
            record(f"{name} + RTN 4-bit g64, embed g32 (stock awq)", bpw, weights, stock,
                   report["seconds"])
        if tag in mix_on:
            t = time.time()
            table = measure_sensitivity(out, cal_dir, quant, MeasureConfig(method="fisher",
                                                                           reference="float"))
            fisher_s = time.time() - t
            for b in budgets:
                plan = allocate(table, QuantConfig(target_bpw=b), dbits)
                record(f"{name} + mixq mix {b}", plan["summary"]["bpw"], weights, plan["layers"],
                       report["seconds"] + fisher_s, predicted_kl=plan["summary"]["predicted_kl"],
                       fisher_seconds=fisher_s)
                # the original model's plan applied to the scaled weights (isolates the allocation)
                plan0 = allocate(table0, QuantConfig(target_bpw=b), dbits)
                record(f"{name} + RTN plan {b} (original's plan)", plan0["summary"]["bpw"],
                       weights, plan0["layers"], report["seconds"])
        del weights
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
