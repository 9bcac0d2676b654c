"""DVC stage calibrate: params `calibration` + outputs/model/ -> outputs/calibration/."""

from pathlib import Path

from mlx_lm.utils import load_config, load_tokenizer

from mixq.calibration import build_calibration, write_calibration
from mixq.log import setup_stage
from mixq.config import load_params

setup_stage()
model_dir = Path("outputs/model")
cfg = load_params().calibration
tokenizer = load_tokenizer(model_dir)
max_context = load_config(model_dir)["max_position_embeddings"]
calibration = build_calibration(tokenizer, cfg, max_context)
write_calibration(calibration, Path("outputs/calibration"), str(model_dir), cfg)
