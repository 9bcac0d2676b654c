"""benchmarks/peers.py's comparison logic on synthetic rows (the benchmark itself is not a test)."""

import importlib.util
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "peers_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py")
peers = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = peers  # dataclasses look their module up
spec.loader.exec_module(peers)


def row(name, kind, bpw, kl, split="heldout"):
    return {"name": name, "label": name, "kind": kind, "bpw": bpw, "bytes": int(bpw * 1e7),
            "seconds": 1.0, "series": "3/4/6/8",
            split: {"kl_mean": kl, "kl_p95": 2 * kl, "ppl": 10.0, "top1": 0.9, "tokens": 8}}


ROWS = [
    row("u4", "rtn", 4.503, 0.50),
    row("awq", "awq", 4.608, 0.25),
    row("u5", "rtn", 5.503, 0.12),
    row("m@4.5030", "mixq", 4.5029, 0.40),  # built at u4's bpw: lands just below it
    row("m@4.6080", "mixq", 4.6080, 0.30),
    row("m@3.0", "mixq", 3.0, 0.90),  # smaller than every peer
]


def test_ratio_against_best_peer_at_or_below_its_size():
    got = {r["mixq"]: r for r in peers.ratios(ROWS, "heldout")}
    assert got["m@4.5030"]["best_peer"] == "u4"  # within TOL_BPW of the peer it was built at
    assert abs(got["m@4.5030"]["ratio"] - 0.8) < 1e-12
    assert got["m@4.6080"]["best_peer"] == "awq"  # the better of u4 and awq; never u5
    assert abs(got["m@4.6080"]["ratio"] - 1.2) < 1e-12
    assert got["m@3.0"]["best_peer"] is None and got["m@3.0"]["ratio"] is None


def test_markdown_lists_every_row_and_ratio():
    md = peers.markdown(ROWS, ["heldout_other", "heldout"])  # a split with no rows is left out
    assert "heldout_other" not in md
    assert md.count("\n| ") == 1 + len(ROWS) + 1 + 3  # header, rows, header, mixq ratios
    assert "| m@4.6080 | 4.608 | awq | 4.608 | 0.2500 | 0.3000 | 1.20 |" in md
    assert "| m@3.0 | 3.000 | – |" in md


def test_selection_patterns():
    assert peers.selected("uniform-4-g64", ["uniform-*"], [])
    assert not peers.selected("uniform-8-g64", ["uniform-*"], ["*-8-*"])
    assert not peers.selected("gptq-4", ["uniform-*"], [])
