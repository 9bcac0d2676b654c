"""Allocators: optimality against brute force, budgets, protection, feasibility, plan format."""

import itertools
import json
import math
import re
import time

import numpy as np
import pytest
from test_budget import smollm2_table, synthetic_kl

from mixq.allocate import (
    InfeasibleTargetError,
    allocate,
    allocate_with,
    build_problem,
    predicted_kl,
)
from mixq.budget import (
    budget_bits,
    candidate_dict,
    feasible_bpw_range,
    layer_bits,
    model_bpw,
)
from mixq.config import Candidate, ProtectRule, QuantConfig
from mixq.plots import plot_bit_map, plot_sensitivity_heatmap

CANDIDATES_4_8 = [Candidate(4, 64), Candidate(8, 64)]  # what smollm2_table() measures
FOUR = [candidate_dict(c) for c in
        [Candidate(4, 64), Candidate(8, 64), Candidate(4, 32, "mxfp4"), Candidate(4, 128)]]


def stored_bits(chosen: dict, table: dict) -> int:
    return round(model_bpw({"layers": chosen}, table, 16)["bpw"] * table["total_params"])


def random_table(rng: np.random.Generator, layers: int, candidates: list) -> dict:
    """Small tables with shapes from a few sizes, noisy KLs (some candidates dominated) and
    some candidates not applicable (g128 on in-dim 192)."""
    rows = []
    for i in range(layers):
        shape = [int(rng.choice([64, 128, 192])), int(rng.choice([64, 128, 192, 256]))]
        kl = {
            c["name"]: {"mean": synthetic_kl(c, 1e-3)["mean"] * rng.lognormal(0, 1.0)}
            for c in candidates
            if shape[-1] % c["group_size"] == 0
        }
        rows.append({"path": f"model.layers.{i}.x", "kind": "linear", "shape": shape,
                     "params": math.prod(shape), "kl": kl})
    unquantized = int(rng.integers(0, 2000))
    return {"candidates": candidates, "layers": rows, "unquantized_params": unquantized,
            "total_params": sum(r["params"] for r in rows) + unquantized}


def brute_force(table: dict, target: float) -> float:
    """Least predicted KL over every assignment that fits the budget."""
    budget = budget_bits(table, target) - 16 * table["unquantized_params"]
    options = [
        [(layer_bits(layer["shape"], c, 16), layer["kl"][c["name"]]["mean"])
         for c in table["candidates"] if c["name"] in layer["kl"]]
        for layer in table["layers"]
    ]
    return min(
        sum(kl for _, kl in combo)
        for combo in itertools.product(*options)
        if sum(bits for bits, _ in combo) <= budget
    )


def test_optimal_equals_brute_force_and_beats_greedy():
    rng = np.random.default_rng(0)
    for trial in range(60):
        cands = FOUR[: 2 + trial % 3]
        table = random_table(rng, int(rng.integers(3, 8)), cands)
        lo, hi = feasible_bpw_range(table)
        for target in rng.uniform(lo, hi, 3):
            optimal = allocate_with("optimal", table, target)
            greedy = allocate_with("greedy", table, target)
            assert predicted_kl(optimal, table) == pytest.approx(brute_force(table, target),
                                                                 rel=1e-12)
            assert predicted_kl(optimal, table) <= predicted_kl(greedy, table) * (1 + 1e-12)
            for chosen in (optimal, greedy):
                assert set(chosen) == {layer["path"] for layer in table["layers"]}
                assert stored_bits(chosen, table) <= budget_bits(table, target)


def assert_maximal(chosen: dict, table: dict, target: float) -> None:
    """No layer can move to a dearer (hence lower-KL) option within the bits left."""
    left = budget_bits(table, target) - stored_bits(chosen, table)
    assert left >= 0
    p = build_problem(table, target)
    for path, options, costs in zip(p.paths, p.options, p.costs):
        j = options.index(chosen[path])
        assert all(costs[k] - costs[j] > left for k in range(j + 1, len(costs)))


def test_greedy_stops_only_when_no_upgrade_fits():
    table = smollm2_table(FOUR)
    for target in (4.3, 5.0, 6.5):
        assert_maximal(allocate_with("greedy", table, target), table, target)


def test_optimal_is_monotone_and_fills_the_budget():
    table = smollm2_table()
    lo, hi = feasible_bpw_range(table)
    previous = math.inf
    for target in np.linspace(lo, hi, 12):
        chosen = allocate_with("optimal", table, target)
        kl = predicted_kl(chosen, table)
        assert kl <= previous
        previous = kl
        assert_maximal(chosen, table, target)


def test_infeasible_targets_name_the_feasible_range():
    table = smollm2_table()
    quant = QuantConfig(CANDIDATES_4_8, target_bpw=4.5)  # the norms at bf16 put the floor at 4.5030
    with pytest.raises(InfeasibleTargetError, match=r"4\.5031 to 8\.5019 bits per weight"):
        allocate(table, quant, 16)
    with pytest.raises(InfeasibleTargetError, match="feasible range"):
        allocate_with("optimal", table, 8.6)
    message = ""
    try:
        allocate_with("greedy", table, 3.0, [ProtectRule("*down_proj", 8, 64)])
    except ValueError as err:
        message = str(err)
    lo, hi = map(float, re.search(r"(\d\.\d+) to (\d\.\d+)", message).groups())
    assert lo > 5.0  # the protected down_proj raise the floor
    for edge in (lo, hi):  # the printed bounds are themselves reachable
        allocate_with("greedy", table, edge, [ProtectRule("*down_proj", 8, 64)])


def test_plan_honours_protection_and_reports_both_allocators():
    table = smollm2_table(FOUR)
    quant = QuantConfig(
        candidates=[Candidate(4, 64), Candidate(8, 64), Candidate(4, 32, "mxfp4")],
        target_bpw=5.0,
        allocator="greedy",
        protect=[ProtectRule("model.embed_tokens", 6, 64), ProtectRule("*.layers.0.*", 8, 64)],
    )
    plan = json.loads(json.dumps(allocate(table, quant, 16)))
    layers, summary = plan["layers"], plan["summary"]
    assert len(layers) == 211
    assert layers["model.embed_tokens"] == {
        "bits": 6, "group_size": 64, "mode": "affine", "candidate": "affine-b6-g64",
        "protected": True, "kl": None,
    }
    block0 = [entry for path, entry in layers.items() if ".layers.0." in path]
    assert len(block0) == 7 and all(e["candidate"] == "affine-b8-g64" and e["protected"]
                                    for e in block0)
    assert not any(e["candidate"] == "affine-b4-g128" for e in layers.values())  # not in quant
    free = [e for e in layers.values() if not e["protected"]]
    assert {e["candidate"] for e in free} <= {"affine-b4-g64", "affine-b8-g64", "mxfp4-b4-g32"}

    assert summary["allocator"] == "greedy"
    assert summary["predicted_kl"] == summary["objectives"]["greedy"]
    objectives = summary["objectives"]
    assert summary["greedy_gap"] == objectives["greedy"] - objectives["optimal"] >= 0
    assert summary["predicted_kl"] == pytest.approx(
        sum(e["kl"] for e in layers.values() if e["kl"] is not None))
    assert summary["protected_layers"] == 8 and summary["unquantized_layers"] == []
    assert summary["bpw"] <= summary["target_bpw"]
    assert summary["bpw"] * summary["total_params"] <= summary["budget_bits"]
    lo, hi = summary["feasible_bpw"]
    assert lo < summary["target_bpw"] < hi
    assert summary["candidates"]["affine-b6-g64"]["layers"] == 1
    assert sum(c["layers"] for c in summary["candidates"].values()) == 211


def test_allocate_rejects_unmeasured_candidates_and_unknown_allocators():
    table = smollm2_table()
    with pytest.raises(ValueError, match="not measured"):
        allocate(table, QuantConfig(candidates=[Candidate(4, 32, "mxfp4")], target_bpw=5.0), 16)
    with pytest.raises(ValueError, match="quant.allocator"):
        allocate(table, QuantConfig(CANDIDATES_4_8, target_bpw=5.0, allocator="anneal"), 16)


def test_missing_or_nan_kl_is_an_error():
    table = smollm2_table()
    table["layers"][3]["kl"]["affine-b8-g64"]["mean"] = float("nan")
    with pytest.raises(ValueError, match="v_proj affine-b8-g64 mean=nan"):
        allocate_with("optimal", table, 6.0)
    with pytest.raises(ValueError, match="embed_tokens affine-b4-g64 median=None"):
        allocate_with("greedy", table, 6.0, metric="median")


def test_layers_without_candidates_stay_unquantized():
    table = smollm2_table()
    table["layers"][0]["kl"] = {}  # e.g. an embedding no group size divides
    plan = allocate(table, QuantConfig(CANDIDATES_4_8, target_bpw=7.0), 16)
    assert "model.embed_tokens" not in plan["layers"]
    assert plan["summary"]["unquantized_layers"] == ["model.embed_tokens"]
    assert plan["summary"]["feasible_bpw"][0] > 4.5 + 16 * 0.21 - 4.5 * 0.21


def test_optimal_is_fast_on_a_thousand_layers():
    table = smollm2_table(FOUR, blocks=150)
    assert len(table["layers"]) == 1051
    quant = QuantConfig(candidates=[Candidate(4, 64), Candidate(8, 64), Candidate(4, 32, "mxfp4"),
                                    Candidate(4, 128)], target_bpw=6.0)
    start = time.perf_counter()
    plan = allocate(table, quant, 16)  # both allocators
    assert time.perf_counter() - start < 5.0
    assert plan["summary"]["greedy_gap"] >= 0


def test_plots_write_pngs(tmp_path):
    table = smollm2_table(FOUR)
    quant = QuantConfig(CANDIDATES_4_8, target_bpw=5.5, protect=[ProtectRule("*.v_proj", 8, 64)])
    plan = allocate(table, quant, 16)
    plot_bit_map(plan, table, tmp_path / "bits.png")
    plot_sensitivity_heatmap(table, tmp_path / "kl.png")
    for name in ("bits.png", "kl.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
