"""DVC stage refine: outputs/quant + outputs/model + outputs/calibration -> outputs/refined/ (the
mixed checkpoint with its scales and biases distilled against the float model by mlx-lm's DWQ,
or convert's unchanged when that is not better); outputs/metrics/refine.json."""

from pathlib import Path

from mixq.config import load_params
from mixq.log import setup_stage
from mixq.io import atomic_dir, write_json
from mixq.memory import set_budget
from mixq.refine import refine_checkpoint

setup_stage()
params = load_params()
set_budget(params.memory.logits_gb)
cfg = params.refine
with atomic_dir(Path("outputs/refined")) as out:
    report = refine_checkpoint(Path("outputs/quant"), Path("outputs/model"),
                               Path("outputs/calibration"), out, cfg)
write_json(Path("outputs/metrics/refine.json"), report)
