"""DVC stage eval-baselines: outputs/model (reference) and outputs/baselines/* on the held-out
split of outputs/calibration and every probe -> outputs/eval-baselines/results.json (per-model
metrics, probe answers and scores, timings). Independent of the budget, so sweeps reuse it."""

import logging
from pathlib import Path

from mixq.log import setup_stage
from mixq.config import load_params
from mixq.eval_runs import BASELINE_RESULTS, baseline_dirs, run_eval_baselines
from mixq.io import atomic_dir, write_json
from mixq.memory import set_budget

setup_stage()
params = load_params()
set_budget(params.memory.logits_gb)
baselines = baseline_dirs(Path("outputs/baselines"))
result = run_eval_baselines(Path("outputs/model"), baselines, Path("outputs/calibration"),
                            params.eval)
with atomic_dir(Path("outputs/eval-baselines")) as out:
    write_json(out / BASELINE_RESULTS, result)
seconds = sum(sum(m["seconds"].values()) for m in result["models"].values())
logging.getLogger("mixq").info("wrote outputs/eval-baselines in %.0f s", seconds)
