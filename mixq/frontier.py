"""The quality/size Pareto frontier across the workspace, HEAD and every DVC experiment based
on HEAD (what ``dvc exp show`` lists).

Each evaluated point is one quant from an ``outputs/eval/metrics.json``: the ``mixed`` quant of
every experiment (with its ``quant.target_bpw``, candidates and ``kv.target_bits``) and the
``uniform-*`` baselines, deduplicated (the same baseline appears in every experiment). A point
is Pareto-optimal iff no other point has size <= and mean KL <= with one of them strict.

The metrics come from DVC's own experiment collection (``Repo.experiments.show``), which reads
each revision's metrics file through DVC: it must be a cached DVC output (``outputs/`` is not
in git, so a ``cache: false`` metrics file never reaches an experiment commit).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from tqdm import tqdm

from mixq.budget import candidate_name
from mixq.eval_report import fmt, markdown_table, write_csv
from mixq.io import atomic_dir, write_json
from mixq.plots import plot_frontier

log = logging.getLogger("mixq.frontier")

METRICS = "outputs/eval/metrics.json"
VALUES = ("bpw", "size_bytes", "kl_mean", "kl_p95", "ppl", "top1")
COLUMNS = ("name", "kind", "target_bpw", "candidates", "kv_target_bits", *VALUES, "pareto")


def pareto_flags(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For each ``(size, kl)``: True iff no other point has size <= and kl <= with one strict
    (identical points do not dominate each other)."""
    return [
        not any(s <= size and k <= kl and (s < size or k < kl) for s, k in points)
        for size, kl in points
    ]


def param(params: Mapping[str, Any], dotted: str) -> Any:
    """``params["a"]["b"]`` for ``"a.b"``; None where a key is missing."""
    value: Any = params
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def quant_points(metrics: Mapping[str, Any], params: Mapping[str, Any]) -> list[dict]:
    """The mixed quant and the uniform baselines of one metrics.json, as frontier rows (no
    name, no pareto yet). ``params``: that run's params.yaml."""
    candidates = param(params, "quant.candidates")
    mixed = {
        "kind": "mixed",
        "target_bpw": param(params, "quant.target_bpw"),
        "candidates": "+".join(candidate_name(c) for c in candidates) if candidates else None,
        "kv_target_bits": param(params, "kv.target_bits"),
    }
    points = []
    for key, values in metrics.items():
        if key == "mixed" or key.startswith("uniform-"):
            if not all(isinstance(values.get(v), (int, float)) for v in ("size_bytes", "kl_mean")):
                raise ValueError(f"{key} has no numeric size_bytes and kl_mean")
            head = mixed if key == "mixed" else {"kind": "uniform", "quant": key}
            points.append({**head, **{v: values.get(v) for v in VALUES}})
    return points


def exp_states(states: Sequence[Any]) -> Iterator[tuple[str, Any, Optional[str]]]:
    """``(name, ExpState, executor state)`` of every experiment, then every baseline commit,
    then the workspace, from ``Repo.experiments.show()``."""
    for baseline in states:
        for exp_range in baseline.experiments or []:
            state = exp_range.executor.state if exp_range.executor else None
            yield exp_range.name or exp_range.revs[0].rev[:7], exp_range.revs[0], state
    for baseline in states:
        if baseline.rev != "workspace":
            yield baseline.name or baseline.rev[:7], baseline, None
    for baseline in states:
        if baseline.rev == "workspace":
            yield "workspace", baseline, None


def collect_points(
    repo_dir: Path, metrics_path: str = METRICS, all_commits: bool = False
) -> tuple[list[dict], list[dict]]:
    """Every evaluated point of the DVC repo at ``repo_dir`` (deduplicated, ``sources`` naming
    where each was found) and the runs skipped for lack of metrics (``name``, ``reason``).
    Experiments of HEAD, or with ``all_commits`` of every commit (and those commits)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo(str(repo_dir))
    except NotDvcRepoError:
        raise SystemExit(f"mixq frontier: {repo_dir} is not a DVC repository")
    points: dict[str, dict] = {}
    skipped = []
    with repo:
        runs = list(exp_states(repo.experiments.show(all_commits=all_commits)))
        for name, state, executor in tqdm(runs, desc="experiments", unit="exp", leave=False):
            if executor not in (None, "success"):
                skipped.append({"name": name, "reason": f"experiment is {executor}"})
                continue
            data = state.data
            found = data.metrics.get(metrics_path, {}).get("data") if data else None
            if not found:
                reason = state.error.msg if state.error else f"no {metrics_path}"
                skipped.append({"name": name, "reason": reason})
                continue
            try:
                quants = quant_points(found, data.params.get("params.yaml", {}).get("data", {}))
            except ValueError as err:
                skipped.append({"name": name, "reason": f"{metrics_path}: {err}"})
                continue
            for point in quants:
                key = json.dumps(point, sort_keys=True)
                points.setdefault(key, {**point, "sources": []})["sources"].append(name)
    for entry in skipped:
        log.warning("skipped %s: %s", entry["name"], entry["reason"])
    return name_points(list(points.values())), skipped


def name_points(points: list[dict]) -> list[dict]:
    """Name each point: a mixed quant by its first source (experiment, commit or workspace),
    a uniform baseline by its quant, with ``@source`` when experiments disagree on it."""
    quants = [p.get("quant") for p in points]
    for point in points:
        quant = point.pop("quant", None)
        point["name"] = point["sources"][0] if quant is None else (
            quant if quants.count(quant) == 1 else f"{quant}@{point['sources'][0]}")
    return points


def frontier_rows(points: list[dict]) -> list[dict]:
    """CSV rows (``COLUMNS``) sorted by size, with ``pareto`` marked over size_bytes, kl_mean."""
    flags = pareto_flags([(p["size_bytes"], p["kl_mean"]) for p in points])
    rows = [{**{c: p.get(c) for c in COLUMNS}, "pareto": f} for p, f in zip(points, flags)]
    return sorted(rows, key=lambda r: (r["size_bytes"], r["kl_mean"], r["name"]))


def frontier_markdown(rows: list[dict]) -> str:
    """The frontier table as markdown, one line per point (sizes in MB)."""
    header = ["point", "kind", "target bpw", "bpw", "size (MB)", "KL mean", "KL p95",
              "perplexity", "top-1", "Pareto"]
    return markdown_table(header, [
        [r["name"], r["kind"], fmt(r["target_bpw"]), fmt(r["bpw"], ".3f"),
         fmt(r["size_bytes"] / 1e6, ".1f"), fmt(r["kl_mean"]), fmt(r["kl_p95"]), fmt(r["ppl"]),
         fmt(r["top1"], ".3f"), "yes" if r["pareto"] else ""]
        for r in rows
    ])


def write_frontier(
    repo_dir: Path, out_dir: Path, metrics_path: str = METRICS, all_commits: bool = False
) -> list[dict]:
    """Collect the points of ``repo_dir`` (:func:`collect_points`) and write
    ``out_dir``/frontier.csv, frontier.json and frontier.png; returns the CSV rows. Fails when
    no run has eval metrics."""
    points, skipped = collect_points(repo_dir, metrics_path, all_commits)
    if not points:
        raise SystemExit(f"mixq frontier: no evaluated point in {repo_dir} (no run has "
                         f"{metrics_path}; run `dvc repro` or `dvc exp run` first)")
    rows = frontier_rows(points)
    sources = {p["name"]: p["sources"] for p in points}
    with atomic_dir(out_dir) as tmp:
        write_csv(tmp / "frontier.csv", rows)
        write_json(tmp / "frontier.json", {
            "metrics": metrics_path,
            "points": [{**r, "sources": sources[r["name"]]} for r in rows],
            "skipped": skipped,
        })
        plot_frontier(rows, tmp / "frontier.png")
    return rows
