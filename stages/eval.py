"""DVC stage eval: outputs/model (reference), outputs/quant (mixed), outputs/baselines/* and the
held-out split of outputs/calibration -> outputs/eval/ (metrics.json, summary.md, samples.jsonl,
plot data and PNGs)."""

import logging
from pathlib import Path

from mixq.cli import setup_logging
from mixq.config import load_params
from mixq.eval_report import summary_markdown, write_outputs
from mixq.evaluate import run_eval

setup_logging()
cfg = load_params().eval
baselines = sorted(d for d in Path("outputs/baselines").iterdir() if d.is_dir())
quants = {"mixed": Path("outputs/quant"), **{d.name: d for d in baselines}}
result = run_eval(Path("outputs/model"), quants, Path("outputs/calibration"), cfg)
write_outputs(result, cfg, Path("outputs/eval"))
logging.getLogger("mixq").info("wrote outputs/eval in %.0f s", result["metrics"]["seconds"])
print(summary_markdown(result, cfg))
