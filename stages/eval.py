"""DVC stage eval: outputs/refined (mixed) against outputs/model (reference) on the held-out split
of outputs/calibration and the probes, merged with the baseline results of
outputs/eval-baselines -> outputs/eval/ (metrics.json, summary.md, samples.jsonl, plot data and
PNGs)."""

import logging
from pathlib import Path

from mixq.log import setup_stage
from mixq.config import load_params
from mixq.eval_report import summary_markdown, write_outputs
from mixq.eval_runs import BASELINE_RESULTS, baseline_dirs, run_eval
from mixq.io import read_json
from mixq.memory import set_budget

setup_stage()
params = load_params()
set_budget(params.memory.logits_gb)
cfg = params.eval
result = run_eval(Path("outputs/model"), Path("outputs/refined"),
                  baseline_dirs(Path("outputs/baselines")),
                  read_json(Path("outputs/eval-baselines") / BASELINE_RESULTS),
                  Path("outputs/calibration"), cfg)
write_outputs(result, cfg, Path("outputs/eval"))
seconds = sum([*result["models"]["mixed"]["seconds"].values(), *result["reference_rerun"].values()])
logging.getLogger("mixq").info("wrote outputs/eval in %.0f s", seconds)
print(summary_markdown(result, cfg))
