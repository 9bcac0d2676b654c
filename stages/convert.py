"""DVC stage convert: outputs/model + outputs/plan -> outputs/quant/ (the mixed checkpoint)."""

import logging
from pathlib import Path

from mixq.cli import setup_logging
from mixq.config import load_params
from mixq.convert import smoke_generate, write_checkpoint
from mixq.io import atomic_dir, read_json, write_json

setup_logging()
plan = read_json(Path("outputs/plan/plan.json"))
table = read_json(Path("outputs/sensitivity/sensitivity.json"))
with atomic_dir(Path("outputs/quant")) as out:
    report = write_checkpoint(Path("outputs/model"), out, plan, table, load_params().quant.dtype)
    logging.getLogger("mixq").info("mlx_lm.load + generate: %r", smoke_generate(out))
write_json(Path("outputs/metrics/convert.json"), report)
