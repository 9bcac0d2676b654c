"""DVC stage kv-sensitivity: outputs/refined + outputs/calibration -> outputs/kv/ (per-layer KV
cache precision kv_config.json, the KV sensitivity table and its plot)."""

from pathlib import Path

from mixq.log import setup_stage
from mixq.config import load_params
from mixq.io import atomic_dir, write_json
from mixq.kv import kv_metrics, kv_sensitivity
from mixq.memory import set_budget
from mixq.plots import plot_kv_sensitivity

setup_stage()
params = load_params()
set_budget(params.memory.logits_gb)
kv = params.kv
table, config = kv_sensitivity(Path("outputs/refined"), Path("outputs/calibration"), kv)
with atomic_dir(Path("outputs/kv")) as out:
    write_json(out / "kv_config.json", config)
    write_json(out / "kv_sensitivity.json", table)
    plot_kv_sensitivity(table, config, out / "kv_sensitivity.png")
write_json(Path("outputs/metrics/kv.json"), kv_metrics(config))
