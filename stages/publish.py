"""DVC stage publish: outputs/refined + card inputs -> outputs/publish/ (the Hub repo folder with
its model card); uploads it when publish.push is true, with the token in HF_TOKEN."""

import logging
import os
from pathlib import Path

from mixq.log import setup_stage
from mixq.config import load_params
from mixq.io import atomic_dir
from mixq.publish import PublishError, build_folder, commit_message, push_folder

setup_stage()
log = logging.getLogger("mixq")
cfg = load_params()
out = Path("outputs/publish")
with atomic_dir(out) as tmp:
    repo_id = build_folder(
        tmp, cfg,
        quant_dir=Path("outputs/refined"),
        source_file=Path("outputs/model/mixq_source.json"),
        manifest=Path("outputs/calibration/manifest.json"),
        metrics=Path("outputs/eval/metrics.json"),
        kv_config=Path("outputs/kv/kv_config.json"),
    )
if not cfg.publish.push:
    log.info("built %s; publish.push is false, so nothing was uploaded", out)
else:
    try:
        push_folder(out, repo_id, cfg.publish.private, commit_message(cfg),
                    os.environ.get("HF_TOKEN"))
    except PublishError as err:
        raise SystemExit(f"publish: {err}")
