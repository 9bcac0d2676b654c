"""`mixq sweep`: a Hydra app whose every job is one recorded DVC experiment.

    mixq sweep -m quant.target_bpw=4.25,4.5,5.0                       # one point at a time
    mixq sweep -m quant.target_bpw=4.25,4.5,5.0 hydra/launcher=joblib  # points in parallel

Hydra composes conf/ (the same config and schema `mixq compose` and `dvc exp run -S` use), so a
bad override fails before anything runs. Each job then runs ``dvc exp run --temp -S <its
overrides>``: the point lands in `dvc exp show` with the others, in its own temporary copy of
the repo, sharing the project's DVC cache and run cache, so a point re-runs only the stages its
overrides reach (a budget: allocate onward). DVC's output for the job is kept in the job's Hydra
directory (``dvc.log``) next to a ``result.json`` naming the experiment and which stages ran.
Any Hydra launcher works (``hydra/launcher=submitit_slurm`` or ``ray`` with the optional
extras); a launcher that runs jobs elsewhere needs that machine to see the same DVC cache or
remote.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mixq.eval_report import markdown_table
from mixq.io import read_json, write_json

log = logging.getLogger("mixq")

CONF_DIR = Path("conf")


def dvc_exp_run_command(overrides: list[str], message: str | None = None) -> list[str]:
    """``dvc exp run --temp`` with one ``-S`` per Hydra override (group overrides included)."""
    cmd = ["dvc", "exp", "run", "--temp"]
    for override in overrides:
        cmd += ["-S", override]
    return cmd + (["-m", message] if message else [])


def stages_in_log(log_text: str) -> dict[str, list[str]]:
    """Which stages a DVC log shows as run, restored from the run cache, or unchanged."""
    patterns = {
        "ran": r"Running stage '([^']+)'",
        "restored": r"Stage '([^']+)' is cached - skipping run",
        "unchanged": r"Stage '([^']+)' didn't change, skipping",
    }
    return {kind: re.findall(p, log_text) for kind, p in patterns.items()}


def run_point(overrides: list[str], job_dir: Path) -> dict[str, Any]:
    """Run one sweep point as a DVC experiment; returns {overrides, experiment, stages, seconds}
    (also written to ``job_dir/result.json``, DVC's output to ``job_dir/dvc.log``). Raises
    ``RuntimeError`` naming the log if ``dvc exp run`` fails."""
    job_dir.mkdir(parents=True, exist_ok=True)
    cmd = dvc_exp_run_command(overrides, "mixq sweep: " + " ".join(overrides))
    log.info("sweep point %s: %s (follow: tail -f %s)", overrides, " ".join(cmd),
             job_dir / "dvc.log")
    start = time.perf_counter()
    with open(job_dir / "dvc.log", "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    text = (job_dir / "dvc.log").read_text()
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise RuntimeError(f"dvc exp run failed for {overrides} (log: {job_dir / 'dvc.log'}):\n"
                           f"{tail}")
    names = re.findall(r"Ran experiment\(s\): (\S+)", text)
    result = {"overrides": overrides, "experiment": names[-1] if names else None,
              "stages": stages_in_log(text), "seconds": time.perf_counter() - start}
    write_json(job_dir / "result.json", result)
    log.info("sweep point %s: experiment %s, ran %s in %.0f s", overrides, result["experiment"],
             result["stages"]["ran"] or "nothing", result["seconds"])
    return result


def sweep_job(cfg: DictConfig) -> dict[str, Any]:
    """The Hydra job: ``cfg`` is already composed and validated; run its overrides as one
    experiment from the project root."""
    hydra_cfg = HydraConfig.get()
    return run_point(list(hydra_cfg.overrides.task), Path(hydra_cfg.runtime.output_dir))


def sweep_summary(results: list[dict[str, Any]]) -> str:
    """A markdown table of the points' ``result.json``: overrides, experiment, stages run,
    seconds."""
    rows = [[" ".join(r["overrides"]) or "(defaults)", r["experiment"] or "?",
             ", ".join(r["stages"]["ran"]) or "nothing (all restored or unchanged)",
             f"{r['seconds']:.0f}"] for r in results]
    return markdown_table(["point", "experiment", "stages run", "seconds"], rows)


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): after a multirun, print one line
    per finished point and where the results are."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        done = sorted(sweep_dir.glob("*/result.json"), key=lambda p: int(p.parent.name))
        print(sweep_summary([read_json(p) for p in done]))
        print(f"\nlogs: {sweep_dir}/<job>/dvc.log; compare: `dvc exp show`, `mixq frontier`")


def main(argv: list[str]) -> None:
    """`mixq sweep [hydra args]`, run from the project root (where conf/ and dvc.yaml are)."""
    if not (CONF_DIR.is_dir() and Path("dvc.yaml").exists()):
        raise SystemExit("mixq sweep: run it from the project root (conf/ and dvc.yaml)")
    app = hydra.main(config_path=str(CONF_DIR.resolve()), config_name="config",
                     version_base=None)(sweep_job)
    sys.argv = ["mixq-sweep", *argv]
    app()
