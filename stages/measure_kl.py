"""DVC stage measure-kl@<i>: outputs/model + outputs/calibration -> outputs/measure-shards/<i>/
(the shard table of shard i of measure.shards; measure-kl-merge joins the shards)."""

import sys
from pathlib import Path

from mixq.log import setup_stage
from mixq.config import load_params
from mixq.io import atomic_dir, write_json
from mixq.memory import set_budget
from mixq.sensitivity import measure_sensitivity
from mixq.shard import SHARD_FILE

if len(sys.argv) != 2 or not sys.argv[1].isdigit():
    raise SystemExit("usage: python stages/measure_kl.py SHARD_INDEX (dvc.yaml passes it)")
setup_stage()
params = load_params()
set_budget(params.memory.logits_gb)
shard = int(sys.argv[1])
table = measure_sensitivity(
    Path("outputs/model"), Path("outputs/calibration"), params.quant, params.measure, shard
)
with atomic_dir(Path("outputs/measure-shards") / str(shard)) as tmp:
    write_json(tmp / SHARD_FILE, table)
