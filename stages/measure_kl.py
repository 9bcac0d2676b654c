"""DVC stage measure-kl: outputs/model + outputs/calibration -> outputs/sensitivity/."""

from pathlib import Path

from mixq.cli import setup_logging
from mixq.config import load_params
from mixq.sensitivity import measure_sensitivity, write_table

setup_logging()
params = load_params()
table = measure_sensitivity(
    Path("outputs/model"), Path("outputs/calibration"), params.quant, params.measure
)
write_table(table, Path("outputs/sensitivity"))
