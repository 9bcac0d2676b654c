"""DVC stage allocate: outputs/sensitivity + params quant -> outputs/plan/ (plan + bit map)."""

from pathlib import Path

from mixq.allocate import allocate, plan_metrics
from mixq.budget import dtype_bits
from mixq.cli import setup_logging
from mixq.config import load_params
from mixq.io import atomic_dir, write_json
from mixq.plots import plot_bit_map
from mixq.sensitivity import read_table

setup_logging()
quant = load_params().quant
table = read_table(Path("outputs/sensitivity/sensitivity.json"))
plan = allocate(table, quant, dtype_bits(quant.dtype))
with atomic_dir(Path("outputs/plan")) as out:
    write_json(out / "plan.json", plan)
    plot_bit_map(plan, table, out / "bitmap.png")
write_json(Path("outputs/metrics/allocate.json"), plan_metrics(plan))
