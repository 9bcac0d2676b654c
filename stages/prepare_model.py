"""DVC stage prepare-model: params `model` -> outputs/model/ (an MLX model directory)."""

from pathlib import Path

from mixq.cli import setup_logging
from mixq.config import load_params
from mixq.prepare import prepare_model

setup_logging()
prepare_model(load_params().model, Path("outputs/model"))
