"""Per-layer bit allocation: minimize the predicted KL subject to a bits-per-weight budget.

Each layer takes one candidate; stored bits (``mixq.budget``, incl. scales, biases and the
unquantized tensors) must fit ``target_bpw * total_params``. The predicted KL of a plan is the
sum of the measured per-layer KLs (layers measured one at a time are assumed to add). This is a
multiple-choice knapsack: ``greedy`` is the classic KL-per-bit greedy, ``optimal`` solves it
exactly (:func:`allocate_with`).
"""

from __future__ import annotations

import heapq
import logging
import math
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Sequence

import numpy as np

from mixq.budget import (
    bits_range,
    budget_bits,
    candidate_dict,
    is_applicable,
    feasible_bpw_range,
    layer_bits,
    layer_choices,
    model_bpw,
    total_params,
)
from mixq.config import QuantConfig

Assignment = Dict[str, Dict[str, Any]]  # layer path -> candidate dict

log = logging.getLogger("mixq")


class InfeasibleTargetError(ValueError):
    """The target BPW is outside what the candidates and protect rules can reach: ``lo`` to
    ``hi`` bits per weight (rounded inwards to 4 decimals, so both are reachable)."""

    def __init__(self, target: float, lo: float, hi: float):
        super().__init__(
            f"target_bpw={target} is infeasible: with these candidates and protect rules the "
            f"feasible range is {lo:.4f} to {hi:.4f} bits per weight (all stored bits, incl. "
            f"scales, biases and unquantized tensors, per parameter)"
        )
        self.target, self.lo, self.hi = target, lo, hi


class Problem(NamedTuple):
    """The knapsack over the free layers; costs are bits above each layer's cheapest option."""

    paths: List[str]
    options: List[List[Dict[str, Any]]]  # per layer, by cost; KL strictly falls with cost
    costs: List[np.ndarray]  # extra bits (int64), costs[i][0] == 0
    kls: List[np.ndarray]  # predicted KL of each option
    fixed: Assignment  # protected layers
    spare: int  # bits left for upgrades once every free layer takes its cheapest option


def measured_kl(layer: Mapping[str, Any], c: Mapping[str, Any], metric: str) -> float:
    """The table's KL ``metric`` for ``layer`` at candidate ``c``; must be a finite number."""
    kl = layer["kl"][c["name"]].get(metric)
    if not isinstance(kl, (int, float)) or not math.isfinite(kl):
        raise ValueError(f"sensitivity table: {layer['path']} {c['name']} {metric}={kl!r}")
    return float(kl)


def build_problem(
    table: Mapping[str, Any],
    target_bpw: float,
    protect: Sequence[Any] = (),
    dtype_bits: int = 16,
    metric: str = "mean",
) -> Problem:
    """The knapsack for ``target_bpw``; raises :class:`InfeasibleTargetError` outside the
    feasible range. A dominated option (dearer and no lower KL) is dropped: never needed."""
    lo_bits, hi_bits = bits_range(table, protect, dtype_bits)
    total = total_params(table)
    budget = budget_bits(table, target_bpw)
    if not lo_bits <= budget <= hi_bits:
        lo, hi = math.ceil(lo_bits / total * 1e4) / 1e4, math.floor(hi_bits / total * 1e4) / 1e4
        raise InfeasibleTargetError(target_bpw, lo, hi)
    problem = Problem([], [], [], [], {}, budget - lo_bits)
    for layer, cands, protected in layer_choices(table, protect):
        if protected:
            problem.fixed[layer["path"]] = cands[0]
        elif cands:
            priced = sorted(
                (layer_bits(layer["shape"], c, dtype_bits), measured_kl(layer, c, metric), i)
                for i, c in enumerate(cands)
            )
            kept = [o for k, o in enumerate(priced) if all(o[1] < q[1] for q in priced[:k])]
            problem.paths.append(layer["path"])
            problem.options.append([cands[i] for _, _, i in kept])
            problem.costs.append(np.array([b - kept[0][0] for b, _, _ in kept], dtype=np.int64))
            problem.kls.append(np.array([kl for _, kl, _ in kept], dtype=np.float64))
    return problem


def assignment(problem: Problem, choice: Sequence[int]) -> Assignment:
    """The protected layers plus option ``choice[i]`` for each free layer ``i``."""
    chosen = {path: opts[j] for path, opts, j in zip(problem.paths, problem.options, choice)}
    return {**problem.fixed, **chosen}


def greedy_choice(p: Problem) -> List[int]:
    """Option per free layer: start at the cheapest, then repeatedly apply the upgrade (of any
    layer to any dearer option) with the largest KL reduction per extra bit that still fits the
    spare bits, until none fits.

    Upgrades live in a heap keyed by that ratio; an entry is stale once its layer moved, and one
    that does not fit is dropped for good since the spare bits only shrink.
    """
    choice = [0] * len(p.paths)
    heap: List[tuple] = []

    def push_upgrades(i: int) -> None:
        cur = choice[i]
        for j in range(cur + 1, len(p.costs[i])):
            ratio = (p.kls[i][cur] - p.kls[i][j]) / (p.costs[i][j] - p.costs[i][cur])
            heapq.heappush(heap, (-ratio, i, j, cur))

    for i in range(len(p.paths)):
        push_upgrades(i)
    spare = p.spare
    while heap:
        _, i, j, cur = heapq.heappop(heap)
        extra = int(p.costs[i][j] - p.costs[i][cur])
        if choice[i] != cur or extra > spare:
            continue
        choice[i] = j
        spare -= extra
        push_upgrades(i)
    return choice


def dual_price(p: Problem, iterations: int = 100) -> float:
    """The price of a bit (KL/bit) maximizing the Lagrangian lower bound
    ``sum_i min_j (kl_ij + price * cost_ij) - price * spare`` (bisection on its slope)."""
    width = max((len(c) for c in p.costs), default=1)
    cost = np.zeros((len(p.costs), width))
    kl = np.full((len(p.costs), width), np.inf)  # padding options are never the minimum
    for i, (costs_i, kls_i) in enumerate(zip(p.costs, p.kls)):
        cost[i, : len(costs_i)], kl[i, : len(kls_i)] = costs_i, kls_i
    rows = np.arange(len(p.costs))
    ratios = [((k[0] - k[1:]) / c[1:]).max() for c, k in zip(p.costs, p.kls) if len(c) > 1]
    lo, hi = 0.0, max(ratios, default=0.0)  # at hi every layer prefers its cheapest option
    for _ in range(iterations):
        price = (lo + hi) / 2
        spent = cost[rows, np.argmin(kl + price * cost, axis=1)].sum()
        lo, hi = (price, hi) if spent > p.spare else (lo, price)
    return hi


def optimal_choice(p: Problem) -> List[int]:
    """Option per free layer minimizing the summed KL within the spare bits, exactly.

    Dynamic programming over the layers on states (extra bits, KL) of the layers so far. A state
    is dropped if another has no more bits and lower KL (Pareto), if it exceeds the spare bits,
    or if even its Lagrangian lower bound (any completion costs at least
    ``rest_i - price * bits left``, :func:`dual_price`) exceeds the greedy solution's KL. None of
    these can remove every optimal solution, so the best final state is optimal. Costs are exact
    integer bits; LLM layers come in few shapes, so there are few distinct bit sums.
    """
    greedy_kl = sum(float(k[j]) for k, j in zip(p.kls, greedy_choice(p)))
    price = dual_price(p)
    reduced = [float(np.min(k + price * c)) for c, k in zip(p.costs, p.kls)]
    rest = np.append(np.cumsum(reduced[::-1])[::-1], 0.0)  # bound of layers i.. at this price
    limit = greedy_kl + 1e-9 * abs(greedy_kl) + 1e-15  # slack: never prune on float rounding
    cost, kl = np.zeros(1, np.int64), np.zeros(1, np.float64)
    parents = []  # per layer: flat (state, option) index of each kept state
    for i, (costs_i, kls_i) in enumerate(zip(p.costs, p.kls)):
        cost_all = (cost[:, None] + costs_i[None, :]).ravel()
        kl_all = (kl[:, None] + kls_i[None, :]).ravel()
        bound = kl_all + rest[i + 1] - price * (p.spare - cost_all)
        alive = np.flatnonzero((cost_all <= p.spare) & (bound <= limit))
        order = alive[np.lexsort((kl_all[alive], cost_all[alive]))]
        kl_sorted = kl_all[order]
        best_before = np.minimum.accumulate(kl_sorted)
        keep = np.concatenate(([True], kl_sorted[1:] < best_before[:-1]))
        parents.append(order[keep])
        cost, kl = cost_all[order[keep]], kl_sorted[keep]
    choice = [0] * len(p.paths)
    state = int(np.argmin(kl))
    for i in reversed(range(len(p.paths))):
        state, choice[i] = divmod(int(parents[i][state]), len(p.costs[i]))
    return choice


CHOICES: Dict[str, Callable[[Problem], List[int]]] = {
    "greedy": greedy_choice,  # fast, usually within a fraction of a percent
    "optimal": optimal_choice,  # the minimum-KL plan within the budget, exact
}


def allocate_with(
    allocator: str,
    table: Mapping[str, Any],
    target_bpw: float,
    protect: Sequence[Any] = (),
    dtype_bits: int = 16,
    metric: str = "mean",
) -> Assignment:
    """The ``allocator``'s (``greedy`` or ``optimal``) choice of candidate per layer."""
    p = build_problem(table, target_bpw, protect, dtype_bits, metric)
    return assignment(p, CHOICES[allocator](p))


def predicted_kl(chosen: Assignment, table: Mapping[str, Any], metric: str = "mean") -> float:
    """Sum of the measured KLs of the chosen candidates (a protected layer at an unmeasured
    candidate adds nothing)."""
    kl = {layer["path"]: layer["kl"] for layer in table["layers"]}
    return sum(kl[path][c["name"]][metric] for path, c in chosen.items() if c["name"] in kl[path])


def plan_entry(
    layer: Mapping[str, Any], c: Mapping[str, Any], protected: bool, metric: str
) -> Dict[str, Any]:
    """One layer of a plan: the candidate's fields, whether it was pinned, its measured KL."""
    return {
        "bits": c["bits"],
        "group_size": c["group_size"],
        "mode": c["mode"],
        "candidate": c["name"],
        "protected": protected,
        "kl": layer["kl"].get(c["name"], {}).get(metric),
    }


def allocate(
    table: Mapping[str, Any], quant_cfg: QuantConfig, dtype_bits: int, metric: str = "mean"
) -> Dict[str, Any]:
    """The plan for ``quant_cfg``: run both allocators, keep ``quant_cfg.allocator``'s.

    Only ``quant_cfg.candidates`` are used (each must be in the table). Returns
    ``{"layers": {path: {bits, group_size, mode, candidate, protected, kl}}, "summary": {...}}``;
    layers with no applicable candidate are left out (kept at the model dtype).
    """
    if quant_cfg.allocator not in CHOICES:
        raise ValueError(f"quant.allocator={quant_cfg.allocator!r}: use one of {list(CHOICES)}")
    measured = {c["name"]: c for c in table["candidates"]}
    wanted = [candidate_dict(c)["name"] for c in quant_cfg.candidates]
    missing = [name for name in wanted if name not in measured]
    if missing:
        raise ValueError(f"candidates {missing} were not measured (table has {list(measured)})")
    table = {**table, "candidates": [measured[name] for name in wanted]}
    protect, target = quant_cfg.protect, quant_cfg.target_bpw
    results = {
        name: allocate_with(name, table, target, protect, dtype_bits, metric) for name in CHOICES
    }
    objectives = {name: predicted_kl(chosen, table, metric) for name, chosen in results.items()}
    chosen = results[quant_cfg.allocator]
    choices = layer_choices(table, protect)
    layers = {
        layer["path"]: plan_entry(layer, c, protected, metric)
        for layer, _, protected in choices
        if (c := chosen.get(layer["path"])) is not None
    }
    plan: Dict[str, Any] = {"layers": layers}
    summary = {
        "allocator": quant_cfg.allocator,
        "metric": metric,
        "dtype_bits": dtype_bits,
        "target_bpw": target,
        "feasible_bpw": list(feasible_bpw_range(table, protect, dtype_bits)),
        "budget_bits": budget_bits(table, target),
        "predicted_kl": objectives[quant_cfg.allocator],
        "objectives": objectives,
        "greedy_gap": objectives["greedy"] - objectives["optimal"],
        "protected_layers": sum(protected for _, _, protected in choices),
        "unquantized_layers": [layer["path"] for layer, cands, _ in choices if not cands],
    }
    plan["summary"] = {**summary, **model_bpw(plan, table, dtype_bits)}
    log.info(
        "%s plan: %.4f bpw (target %s), predicted KL %.5g (greedy gap %.3g), %s",
        quant_cfg.allocator, plan["summary"]["bpw"], target, summary["predicted_kl"],
        summary["greedy_gap"],
        ", ".join(f"{n} x{v['layers']}" for n, v in plan["summary"]["candidates"].items()),
    )
    return plan


def uniform_plan(table: Mapping[str, Any], candidate: Any, dtype_bits: int = 16) -> Dict[str, Any]:
    """Every layer the candidate applies to at ``candidate`` (the uniform baselines); same
    format as :func:`allocate`'s plan."""
    c = candidate_dict(candidate)
    layers = {
        layer["path"]: plan_entry(layer, c, False, "mean")
        for layer in table["layers"]
        if is_applicable(layer["shape"], c)
    }
    plan: Dict[str, Any] = {"layers": layers}
    known = [v["kl"] for v in layers.values()]
    summary = {
        "allocator": f"uniform {c['name']}",
        "predicted_kl": sum(known) if None not in known else None,
        "unquantized_layers": sorted({layer["path"] for layer in table["layers"]} - set(layers)),
    }
    plan["summary"] = {**summary, **model_bpw(plan, table, dtype_bits)}
    return plan


def plan_metrics(plan: Mapping[str, Any]) -> Dict[str, Any]:
    """The headline numbers of a plan, for ``dvc metrics``/``dvc exp show``."""
    s = plan["summary"]
    keys = ("bpw", "quantized_bpw", "weight_bytes", "predicted_kl", "greedy_gap")
    return {k: s[k] for k in keys if k in s}
