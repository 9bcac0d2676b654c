"""DVC stage convert: outputs/model + outputs/plan -> outputs/quant/ (the mixed checkpoint)."""

from pathlib import Path

from mixq.log import setup_stage
from mixq.config import load_params
from mixq.convert import smoke_test, write_checkpoint
from mixq.io import atomic_dir, read_json, write_json

setup_stage()
plan = read_json(Path("outputs/plan/plan.json"))
table = read_json(Path("outputs/sensitivity/sensitivity.json"))
with atomic_dir(Path("outputs/quant")) as out:
    report = write_checkpoint(Path("outputs/model"), out, plan, table, load_params().quant.dtype)
report["smoke_test"] = smoke_test(Path("outputs/quant"))  # after the verified quant is in place
write_json(Path("outputs/metrics/convert.json"), report)
