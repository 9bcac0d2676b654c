"""The two eval stages, so that a budget sweep re-evaluates only the mixed quant.

* eval-baselines (:func:`run_eval_baselines`): the float reference and every uniform baseline
  on the held-out tokens and on every probe (which baseline is "same size" as the mixed quant
  depends on the budget, so all are probed once). No logits are kept.
* eval (:func:`run_eval`): the mixed quant alone, against reference logits computed again
  (seconds, cheaper than storing them), merged with the stored baseline results and compared:
  Δ vs uniform 4-bit and vs the uniform quant of the same size, predicted vs measured KL.

Every number equals what evaluating all models in one pass gives: each model is evaluated by
:func:`mixq.evaluate.evaluate_model` against the same (deterministic) reference logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from mixq.budget import candidate_name
from mixq.config import EvalConfig
from mixq.evaluate import HELDOUT_KEYS, eval_inputs, evaluate_checkpoints
from mixq.io import read_json
from mixq.probes import Probe

SAME_SIZE_TOLERANCE = 0.03  # a baseline within 3% of the mixed bpw counts as "same size"
BASELINE_RESULTS = "results.json"  # the file of eval-baselines' output folder


def baseline_dirs(folder: Path) -> dict[str, Path]:
    """The uniform baselines the baselines stage wrote in ``folder``: name -> checkpoint dir,
    sorted by name."""
    return {d.name: d for d in sorted(Path(folder).iterdir()) if d.is_dir()}


def read_plan(checkpoint: Path) -> dict[str, Any]:
    """The plan a checkpoint was converted from (its ``mixq/plan.json`` sidecar)."""
    return read_json(Path(checkpoint) / "mixq" / "plan.json")


def uniform4_name(plan: Mapping[str, Any]) -> str:
    """Name of the uniform affine 4-bit baseline at the plan's (smallest affine) group size."""
    groups = [c["group_size"] for c in plan["layers"].values() if c["mode"] == "affine"]
    four = {"mode": "affine", "bits": 4, "group_size": min(groups, default=64)}
    return f"uniform-{candidate_name(four)}"


def closest_in_size(bpw: Mapping[str, float], target: float) -> tuple[str, float]:
    """The model of ``bpw`` (not empty) closest to ``target`` bpw and its relative difference."""
    name = min(bpw, key=lambda n: abs(bpw[n] / target - 1))
    return name, bpw[name] / target - 1


def prediction_metrics(metrics: Mapping[str, Any], plan: Mapping[str, Any]) -> dict[str, float]:
    """The plan's honest bpw and predicted KL (the sum of its per-layer KLs, when it has one)
    next to the measured mean KL."""
    summary = plan["summary"]
    out = {"bpw": summary["bpw"]}
    if summary.get("predicted_kl"):
        out["predicted_kl"] = summary["predicted_kl"]
        out["measured_over_predicted_kl"] = metrics["kl_mean"] / summary["predicted_kl"]
    return out


def deltas(model: Mapping[str, Any], base: Mapping[str, Any], keys: Iterable[str]) -> dict:
    """``model - base`` for the ``keys`` both have."""
    return {k: model[k] - base[k] for k in keys if k in model and k in base}


def probe_records(probes: list[Probe]) -> list[dict[str, str]]:
    """Task and last message of each probe: what eval checks the stored answers were for."""
    return [{"task": p.task, "prompt": p.messages[-1]["content"]} for p in probes]


def run_eval_baselines(
    reference_dir: Path, baselines: Mapping[str, Path], calibration_dir: Path, cfg: EvalConfig
) -> dict[str, Any]:
    """Evaluate the reference and the uniform ``baselines`` (name -> checkpoint dir with a
    ``mixq/`` sidecar) on the held-out tokens and every probe of a task the reference does not
    score 0 on (:func:`mixq.evaluate.evaluate_checkpoints`). Returns (JSON-ready)
    {"heldout_tokens", "probes" (:func:`probe_records`), "models" (name -> {"metrics",
    "answers", "scores", "seconds"}, the baselines' metrics with their plan's bpw)}."""
    if not baselines:
        raise ValueError("eval-baselines: no uniform baselines to evaluate; run baselines")
    heldout, probes, prompts = eval_inputs(reference_dir, calibration_dir, cfg)
    checkpoints = {"reference": reference_dir, **baselines}
    models = evaluate_checkpoints(checkpoints, heldout, probes, prompts, checkpoints, cfg)
    for name, path in baselines.items():
        metrics = models[name]["metrics"]
        metrics.update(prediction_metrics(metrics, read_plan(path)))
    return {"heldout_tokens": heldout.tokens, "probes": probe_records(probes),
            "models": models}


def check_stored(stored: Mapping[str, Any], names: Iterable[str], heldout_tokens: int,
                 probes: list[Probe]) -> None:
    """Fail unless the eval-baselines result ``stored`` holds the reference and every baseline
    of ``names``, evaluated on as many held-out tokens and on the same probes."""
    missing = sorted({"reference", *names} - set(stored["models"]))
    problems = [f"no results for {', '.join(missing)}"] if missing else []
    if stored["heldout_tokens"] != heldout_tokens:
        problems.append(f"{stored['heldout_tokens']} held-out tokens, not {heldout_tokens}")
    if stored["probes"] != probe_records(probes):
        problems.append("other probes than the eval params give")
    if problems:
        raise ValueError(f"eval: the stored baseline results are stale ({'; '.join(problems)}); "
                         "re-run eval-baselines")


def run_eval(
    reference_dir: Path, mixed_dir: Path, baselines: Mapping[str, Path],
    stored: Mapping[str, Any], calibration_dir: Path, cfg: EvalConfig,
) -> dict[str, Any]:
    """Evaluate the mixed quant (``mixed_dir``) on the held-out tokens and the probes, and
    compare it with the reference and the uniform ``baselines`` (name -> checkpoint dir) as
    evaluated by :func:`run_eval_baselines` (``stored``). Returns {"metrics" (for
    metrics.json: per model, then the comparisons), "models" (name -> result), "probes",
    "prompt_tokens", "plans" (name -> plan), "table" (the sensitivity table),
    "reference_rerun" (seconds per part of computing the reference logits again)}."""
    plans = {name: read_plan(path) for name, path in {"mixed": mixed_dir, **baselines}.items()}
    uniform4 = uniform4_name(plans["mixed"])
    if uniform4 not in baselines:
        raise ValueError(f"eval: no {uniform4} baseline among {sorted(baselines)}; run baselines")
    heldout, probes, prompts = eval_inputs(reference_dir, calibration_dir, cfg)
    heldout_tokens = heldout.tokens
    check_stored(stored, baselines, heldout_tokens, probes)
    skipped = stored["models"]["reference"].get("skipped_tasks", {})
    kept = [i for i, p in enumerate(probes) if p.task not in skipped]
    probes, prompts = [probes[i] for i in kept], [prompts[i] for i in kept]
    run = evaluate_checkpoints({"reference": reference_dir, "mixed": mixed_dir}, heldout, probes,
                               prompts, ["mixed"], cfg)
    mixed = run["mixed"]
    mixed["metrics"].update(prediction_metrics(mixed["metrics"], plans["mixed"]))
    models = {"reference": stored["models"]["reference"], "mixed": mixed,
              **{name: stored["models"][name] for name in baselines}}

    same, gap = closest_in_size({n: plans[n]["summary"]["bpw"] for n in baselines},
                                plans["mixed"]["summary"]["bpw"])
    same_size = same if abs(gap) <= SAME_SIZE_TOLERANCE else None
    metrics: dict[str, Any] = {name: m["metrics"] for name, m in models.items()}
    compared = [*HELDOUT_KEYS, *cfg.tasks, "capability", "size_bytes", "bpw"]
    metrics["delta_vs_uniform4"] = deltas(metrics["mixed"], metrics[uniform4], compared)
    if same_size:
        metrics["delta_vs_same_size"] = deltas(metrics["mixed"], metrics[same_size], compared)
    rerun = run["reference"]["seconds"]
    metrics.update({
        "uniform4": uniform4,
        "same_size": same_size or "none",
        "closest_size": same,
        "closest_size_bpw_gap": gap,
        "heldout_tokens": heldout_tokens,
        "samples_per_task": cfg.samples_per_task,
        "skipped_tasks": skipped,
        "seconds": sum(sum(m["seconds"].values()) for m in models.values()) + sum(rerun.values()),
    })
    return {"metrics": metrics, "models": models, "probes": probes, "plans": plans,
            "table": read_json(Path(mixed_dir) / "mixq" / "sensitivity.json"),
            "prompt_tokens": [len(p) for p in prompts], "reference_rerun": rerun}
