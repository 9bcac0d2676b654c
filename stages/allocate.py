"""DVC stage allocate: outputs/sensitivity + params quant -> outputs/plan/ (plan + bit map)."""

from pathlib import Path

from mixq.allocate import allocate, plan_metrics
from mixq.budget import dtype_bits
from mixq.log import setup_stage
from mixq.config import load_params
from mixq.io import atomic_dir, read_json, write_json
from mixq.plots import plot_bit_map

setup_stage()
quant = load_params().quant
table = read_json(Path("outputs/sensitivity/sensitivity.json"))
plan = allocate(table, quant, dtype_bits(quant.dtype))
with atomic_dir(Path("outputs/plan")) as out:
    write_json(out / "plan.json", plan)
    plot_bit_map(plan, table, out / "bitmap.png")
write_json(Path("outputs/metrics/allocate.json"), plan_metrics(plan))
