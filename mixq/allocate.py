"""Per-layer bit allocation: minimize the predicted KL subject to a bits-per-weight budget.

Each layer takes one candidate; stored bits (``mixq.budget``, incl. scales, biases and the
unquantized tensors) must fit ``target_bpw * total_params``. The predicted KL of a plan is the
sum of the measured per-layer KLs (layers measured one at a time are assumed to add). This is a
multiple-choice knapsack: :func:`allocate_greedy` is the classic KL-per-bit greedy,
:func:`allocate_optimal` solves it exactly.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Sequence

import numpy as np

from mixq.budget import (
    bits_range,
    budget_bits,
    feasible_bpw_range,
    candidate_dict,
    layer_bits,
    layer_choices,
    model_bpw,
    total_params,
)
from mixq.config import QuantConfig

Assignment = Dict[str, Dict[str, Any]]  # layer path -> candidate dict


class InfeasibleTargetError(ValueError):
    """The target BPW is outside what the candidates and protect rules can reach."""


class Problem(NamedTuple):
    """The knapsack over the free layers; costs are bits above each layer's cheapest option."""

    paths: List[str]
    options: List[List[Dict[str, Any]]]  # per layer, by cost; KL strictly falls with cost
    costs: List[np.ndarray]  # extra bits (int64), costs[i][0] == 0
    kls: List[np.ndarray]  # predicted KL of each option
    fixed: Assignment  # protected layers
    spare: int  # bits left for upgrades once every free layer takes its cheapest option


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
        raise InfeasibleTargetError(
            f"target_bpw={target_bpw} is infeasible: with these candidates and protect rules "
            f"the feasible range is {lo:.4f} to {hi:.4f} bits per weight (all stored bits, "
            f"incl. scales, biases and unquantized tensors, per parameter)"
        )
    problem = Problem([], [], [], [], {}, budget - lo_bits)
    for layer, cands, protected in layer_choices(table, protect):
        if protected:
            problem.fixed[layer["path"]] = cands[0]
        elif cands:
            priced = sorted(
                (layer_bits(layer["shape"], c, dtype_bits), layer["kl"][c["name"]][metric], i)
                for i, c in enumerate(cands)
            )
            kept = [p for k, p in enumerate(priced) if all(p[1] < q[1] for q in priced[:k])]
            problem.paths.append(layer["path"])
            problem.options.append([cands[i] for _, _, i in kept])
            problem.costs.append(np.array([b - kept[0][0] for b, _, _ in kept], dtype=np.int64))
            problem.kls.append(np.array([kl for _, kl, _ in kept], dtype=np.float64))
    return problem


def assignment(problem: Problem, choice: Sequence[int]) -> Assignment:
    """The protected layers plus option ``choice[i]`` for each free layer ``i``."""
    chosen = {path: opts[j] for path, opts, j in zip(problem.paths, problem.options, choice)}
    return {**problem.fixed, **chosen}


def allocate_greedy(
    table: Mapping[str, Any],
    target_bpw: float,
    protect: Sequence[Any] = (),
    dtype_bits: int = 16,
    metric: str = "mean",
) -> Assignment:
    """Start every free layer at its cheapest candidate, then repeatedly apply the upgrade (of
    any layer to any dearer candidate) with the largest KL reduction per extra bit that still
    fits the budget, until none fits.

    Upgrades live in a heap keyed by that ratio; an entry is stale once its layer moved, and one
    that does not fit is dropped for good since the spare bits only shrink.
    """
    p = build_problem(table, target_bpw, protect, dtype_bits, metric)
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
    return assignment(p, choice)


def allocate_optimal(
    table: Mapping[str, Any],
    target_bpw: float,
    protect: Sequence[Any] = (),
    dtype_bits: int = 16,
    metric: str = "mean",
) -> Assignment:
    """The exact minimum-KL assignment within the budget (multiple-choice knapsack).

    Dynamic programming over the layers keeping only Pareto states (extra bits, KL): after each
    layer a state survives if no other state has no more bits and lower KL, and if the
    cheapest completion of the remaining layers still fits. Any optimal solution extends an
    optimal Pareto state, so the best final state is optimal. Costs are exact integer bits; the
    frontier stays small because LLM layers come in a few shapes (few distinct cost sums).
    """
    p = build_problem(table, target_bpw, protect, dtype_bits, metric)
    cost, kl = np.zeros(1, np.int64), np.zeros(1, np.float64)
    parents = []  # per layer: flat (state, option) index of each kept state
    for costs_i, kls_i in zip(p.costs, p.kls):
        cost_all = (cost[:, None] + costs_i[None, :]).ravel()
        kl_all = (kl[:, None] + kls_i[None, :]).ravel()
        fits = np.flatnonzero(cost_all <= p.spare)  # remaining layers' cheapest options cost 0
        order = fits[np.lexsort((kl_all[fits], cost_all[fits]))]
        kl_sorted = kl_all[order]
        best_before = np.minimum.accumulate(kl_sorted)
        keep = np.concatenate(([True], kl_sorted[1:] < best_before[:-1]))
        parents.append(order[keep])
        cost, kl = cost_all[order[keep]], kl_sorted[keep]
    choice = [0] * len(p.paths)
    state = int(np.argmin(kl))
    for i in reversed(range(len(p.paths))):
        state, choice[i] = divmod(int(parents[i][state]), len(p.costs[i]))
    return assignment(p, choice)


ALLOCATORS: Dict[str, Callable[..., Assignment]] = {
    "greedy": allocate_greedy,
    "optimal": allocate_optimal,
}


def predicted_kl(chosen: Assignment, table: Mapping[str, Any], metric: str = "mean") -> float:
    """Sum of the measured KLs of the chosen candidates (a protected layer at an unmeasured
    candidate adds nothing)."""
    kl = {layer["path"]: layer["kl"] for layer in table["layers"]}
    return sum(kl[path][c["name"]][metric] for path, c in chosen.items() if c["name"] in kl[path])


def allocate(
    table: Mapping[str, Any], quant_cfg: QuantConfig, dtype_bits: int = 16, metric: str = "mean"
) -> Dict[str, Any]:
    """The plan for ``quant_cfg``: run both allocators, keep ``quant_cfg.allocator``'s.

    Only ``quant_cfg.candidates`` are used (each must be in the table). Returns
    ``{"layers": {path: {bits, group_size, mode, candidate, protected, kl}}, "summary": {...}}``;
    layers with no applicable candidate are left out (kept at the model dtype).
    """
    if quant_cfg.allocator not in ALLOCATORS:
        raise ValueError(f"quant.allocator={quant_cfg.allocator!r}: use one of {list(ALLOCATORS)}")
    measured = {c["name"]: c for c in table["candidates"]}
    wanted = [candidate_dict(c)["name"] for c in quant_cfg.candidates]
    missing = [name for name in wanted if name not in measured]
    if missing:
        raise ValueError(f"candidates {missing} were not measured (table has {list(measured)})")
    table = {**table, "candidates": [measured[name] for name in wanted]}
    protect, target = quant_cfg.protect, quant_cfg.target_bpw
    results = {
        name: fn(table, target, protect, dtype_bits, metric) for name, fn in ALLOCATORS.items()
    }
    objectives = {name: predicted_kl(chosen, table, metric) for name, chosen in results.items()}
    chosen = results[quant_cfg.allocator]
    choices = layer_choices(table, protect)
    kl = {layer["path"]: layer["kl"] for layer in table["layers"]}
    layers = {
        layer["path"]: {
            "bits": c["bits"],
            "group_size": c["group_size"],
            "mode": c["mode"],
            "candidate": c["name"],
            "protected": protected,
            "kl": kl[layer["path"]].get(c["name"], {}).get(metric),
        }
        for layer, _, protected in choices
        if (c := chosen.get(layer["path"])) is not None
    }
    plan: Dict[str, Any] = {"layers": layers}
    summary = {
        "allocator": quant_cfg.allocator,
        "metric": metric,
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
    return plan
