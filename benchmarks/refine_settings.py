"""Held-out KL after the refine stage's DWQ against steps, learning rate and batch size, with
wall and CPU seconds per step.

For each ``learning_rate:batch_size`` setting, one student (convert's checkpoint, loaded as
:func:`mixq.refine.load_student` loads it) is trained with the stage's own functions in chunks
of steps ending at every ``--steps`` value (the same Adam state throughout, so step N is the
state a ``refine.steps=N`` run reaches, up to the order of its shuffled batches); after each
chunk the checkpoint is written back (:func:`mixq.refine.write_refined`, verified) and its KL
measured on the validation windows and held-out splits, against reference logits computed once.
Prints one markdown row per (setting, steps).

``--build-samples N`` builds a separate calibration set (the builtin mix, seed 1, N training
windows per domain of 256 tokens, ``--build-heldout`` held-out ones disjoint by document) for
comparing settings when the pipeline's calibration has no refine split.

    python benchmarks/refine_settings.py 1e-5:4 2e-5:4 --steps 10 25 50 --split refine
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import mixq  # noqa: F401  (OpenBLAS before mlx)
import mlx_lm
import mlx.core as mx
import numpy as np
from mlx_lm.utils import load_tokenizer

from mixq.artifacts import read_calibration
from mixq.calibration import build_calibration, write_calibration
from mixq.log import setup_logging
from mixq.config import CalibrationConfig, RefineConfig
from mixq.io import read_json
from mixq.quantize import DTYPES
from mixq.refine import (
    HELDOUT_SPLITS, checkpoint_metrics, load_student, reference_rows, refined_tensors, run_dwq,
    training_windows, verify_refined, write_refined,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("settings", nargs="+", help="learning_rate:batch_size")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument("--quant", type=Path, default=Path("outputs/quant"))
    p.add_argument("--model", type=Path, default=Path("outputs/model"))
    p.add_argument("--calibration", type=Path, default=Path("outputs/calibration"))
    p.add_argument("--split", default="refine")
    p.add_argument("--valid-windows", type=int, default=8)
    p.add_argument("--build-samples", type=int, default=0)
    p.add_argument("--build-heldout", type=int, default=1)
    p.add_argument("--json", type=Path, help="append every row to this JSONL file")
    args = p.parse_args()
    setup_logging()
    tmp = Path(tempfile.mkdtemp(prefix="mixq-refine-bench-"))
    calibration = args.calibration
    if args.build_samples:
        cfg = CalibrationConfig(samples_per_domain=args.build_samples,
                                heldout_per_domain=args.build_heldout, seed=1)
        calibration = tmp / "calibration"
        write_calibration(build_calibration(load_tokenizer(args.model), cfg, 8192),
                          calibration, "bench", cfg)
    cal = read_calibration(calibration)
    tokens = cal.split(args.split)[0]
    dtype = DTYPES[read_json(args.quant / "config.json")["torch_dtype"]]
    reference, _ = mlx_lm.load(str(args.model))
    reference.set_dtype(mx.float32)
    steps = sorted(args.steps)
    header = None
    rows = []
    for setting in args.settings:
        lr, batch = setting.split(":")
        cfg = RefineConfig(steps=steps[-1], learning_rate=float(lr), batch_size=int(batch),
                           split=args.split, valid_windows=args.valid_windows)
        train, valid = training_windows(tokens, cfg)
        if header is None:  # the reference and the unrefined KL, once
            splits = {"validation": np.stack([w for w, _ in valid])}
            splits.update({s: cal.split(s)[0] for s in HELDOUT_SPLITS if s != args.split})
            refs = reference_rows(reference, splits, tmp)
            before = checkpoint_metrics(args.quant, refs)
            header = ("| lr | batch | steps | train tokens | "
                      + " | ".join(f"KL {s}" for s in splits) + " | s/step | CPU s/step |")
            rows.append(f"| – | – | 0 | 0 | "
                        + " | ".join(f"{before[s]['kl_mean']:.4f}" for s in splits) + " | | |")
        student, _ = load_student(args.quant)
        opt = None
        done, wall, cpu = 0, 0.0, 0.0
        for n in steps:
            chunk = train[done * cfg.batch_size: n * cfg.batch_size]
            tic, c0 = time.perf_counter(), time.process_time()
            opt = run_dwq(student, reference, chunk, valid[: cfg.batch_size], cfg, cal.seq_len,
                          dtype, opt)
            wall += time.perf_counter() - tic
            cpu += time.process_time() - c0
            done = n
            out = tmp / f"out-{setting}-{n}"
            out.mkdir()
            write_refined(args.quant, out, refined_tensors(student))
            verify_refined(args.quant, out)
            after = checkpoint_metrics(out, refs)
            record = {"learning_rate": float(lr), "batch_size": int(batch), "steps": n,
                      "train_tokens": n * cfg.batch_size * (cal.seq_len - 1),
                      "before": before, "after": after, "seconds_per_step": wall / n,
                      "cpu_seconds_per_step": cpu / n}
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            rows.append(f"| {lr} | {batch} | {n} | {record['train_tokens']:,} | "
                        + " | ".join(f"{after[s]['kl_mean']:.4f}" for s in splits)
                        + f" | {wall / n:.1f} | {cpu / n:.1f} |")
            rule = "|---" * (header.count("|") - 1) + "|"
            print("\n".join([header, rule, *rows]), flush=True)


if __name__ == "__main__":
    main()
