"""DVC stage baselines: uniform comparison quants (quant.baselines, and affine 4-bit) ->
outputs/baselines/uniform-<candidate>/. Independent of the budget, so sweeps reuse it."""

from pathlib import Path

from mixq.allocate import uniform_plan
from mixq.budget import dtype_bits
from mixq.log import setup_stage
from mixq.config import load_params
from mixq.convert import baseline_candidates, write_checkpoint
from mixq.io import atomic_dir, read_json

setup_stage()
quant = load_params().quant
table = read_json(Path("outputs/sensitivity/sensitivity.json"))
with atomic_dir(Path("outputs/baselines")) as out:
    for c in baseline_candidates(quant):
        plan = uniform_plan(table, c, dtype_bits(quant.dtype))
        write_checkpoint(Path("outputs/model"), out / f"uniform-{c['name']}", plan, table, quant.dtype)
