"""DVC stage awq-scale: outputs/model + outputs/calibration -> outputs/scaled-model/ (the float
model with mlx-lm's AWQ scales folded in, computing the same function; or, with
scale.enabled=false or an architecture mlx-lm has no AWQ config for, outputs/model unchanged).
measure-kl and convert read it; baselines and eval's reference stay on outputs/model."""

from pathlib import Path

from mixq.artifacts import read_calibration
from mixq.config import load_params
from mixq.io import atomic_dir
from mixq.log import setup_stage
from mixq.scale import write_scaled_model

setup_stage()
params = load_params()
tokens = read_calibration(Path("outputs/calibration")).split("calibration")[0]
with atomic_dir(Path("outputs/scaled-model")) as out:
    write_scaled_model(Path("outputs/model"), out, tokens, params.scale, params.quant.dtype)
