"""Candidate menus: which per-layer quantization options should mixq choose from by default?

One fisher sensitivity pass over a wide menu (affine 2/3/4/5/6/8 bits x group 32/64/128,
mxfp4, nvfp4, mxfp8), then for each sub-menu and target bpw: allocate (mixq's optimal
allocator), convert (bf16 scales) and score on calibrate's held-out splits against the float
model. A sub-menu's plan only depends on its own candidates' rows, so one measurement serves
every menu. Prints a markdown table and adds its rows to benchmarks/results/menu.json.

    python benchmarks/menu.py                      # ~15 min on the 2-core CI machine
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from mixq.allocate import allocate
from mixq.config import Candidate, EvalConfig, MeasureConfig, QuantConfig
from mixq.convert import write_checkpoint
from mixq.evaluate import eval_inputs, evaluate_checkpoints
from mixq.sensitivity import measure_sensitivity

AFFINE = [Candidate(b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128)]
FLOAT = [Candidate(4, 32, "mxfp4"), Candidate(4, 16, "nvfp4"), Candidate(8, 32, "mxfp8")]


def affine(bits: tuple[int, ...], groups: tuple[int, ...] = (64,)) -> list[Candidate]:
    return [Candidate(b, g) for b in bits for g in groups]


MENUS = {
    "3/4/6/8 g64 (old default)": affine((3, 4, 6, 8)),
    "3/4/5/6/8 g64": affine((3, 4, 5, 6, 8)),
    "2/3/4/5/6/8 g64": affine((2, 3, 4, 5, 6, 8)),
    "3/4/5/6/8 g32/64/128": affine((3, 4, 5, 6, 8), (32, 64, 128)),
    "2-8 g32/64/128 + fp": AFFINE + FLOAT,
    "3/4/5/6/8 g64 + fp (default)": affine((3, 4, 5, 6, 8)) + FLOAT,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("outputs/model"))
    parser.add_argument("--calibration", type=Path, default=Path("outputs/calibration"))
    parser.add_argument("--targets", default="4.5,5.0,5.5")
    parser.add_argument("--menus", default=",".join(str(i) for i in range(len(MENUS))),
                        help="indices into the menu list")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/.work/menu"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/menu.json"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    table_file = args.work / "sensitivity.json"
    wide = QuantConfig(candidates=AFFINE + FLOAT)
    if table_file.exists():
        table = json.loads(table_file.read_text())
        fisher_seconds = table["seconds"]
    else:
        t = time.perf_counter()
        table = measure_sensitivity(args.model, args.calibration, wide, MeasureConfig())
        table["seconds"] = fisher_seconds = time.perf_counter() - t
        table_file.write_text(json.dumps(table))

    menus = [list(MENUS.items())[int(i)] for i in args.menus.split(",")]
    quants, rows = {}, []
    for name, candidates in menus:
        for target in map(float, args.targets.split(",")):
            out = args.work / f"{name.split(' ')[0].replace('/', '_')}-{len(candidates)}-{target}"
            plan = allocate(table, QuantConfig(candidates=candidates, target_bpw=target), 16)
            if not out.exists():
                write_checkpoint(args.model, out.with_suffix(".tmp"), plan, table, "bfloat16")
                shutil.move(out.with_suffix(".tmp"), out)
            quants[out.name] = out
            rows.append({"menu": name, "candidates": len(candidates), "target_bpw": target,
                         "bpw": plan["summary"]["bpw"], "predicted_kl": plan["summary"]["predicted_kl"],
                         "used": plan["summary"]["candidates"], "quant": out.name})

    heldout, _, _ = eval_inputs(args.model, args.calibration, EvalConfig(tasks=[]))
    results = evaluate_checkpoints({"reference": args.model, **quants}, heldout, [], [], (),
                                   EvalConfig(tasks=[]))
    print(f"fisher over {len(wide.candidates)} candidates: {fisher_seconds:.0f} s\n")
    print("| menu | target | bpw | KL other | p95 other | KL in-dist | predicted | candidates used |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        m = results[row["quant"]]["metrics"]
        row.update({k: m[k] for k in ("kl_mean", "kl_p95", "ppl", "id_kl_mean", "id_ppl",
                                      "size_bytes")})
        used = ", ".join(f"{n} x{v['layers']}" for n, v in row["used"].items())
        print(f"| {row['menu']} | {row['target_bpw']} | {row['bpw']:.3f} | {row['kl_mean']:.4f} "
              f"| {row['kl_p95']:.3f} | {row['id_kl_mean']:.4f} | {row['predicted_kl']:.4f} "
              f"| {used} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)  # merged with earlier runs' rows
    earlier = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    done = {(r["menu"], r["target_bpw"]) for r in rows}
    rows = [r for r in earlier if (r["menu"], r["target_bpw"]) not in done] + rows
    args.out.write_text(json.dumps({"fisher_seconds": fisher_seconds, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
