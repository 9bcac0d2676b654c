"""DVC stage prepare-model: params `model` -> outputs/model/ (an MLX model directory)."""

from pathlib import Path

from mixq.log import setup_stage
from mixq.config import load_params
from mixq.prepare import prepare_model

setup_stage()
prepare_model(load_params().model, Path("outputs/model"))
