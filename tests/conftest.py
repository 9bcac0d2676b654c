"""Shared fixtures: the embedded SmolLM2-135M-Instruct, converted once per test session."""

from __future__ import annotations

from pathlib import Path

import mixq  # noqa: F401  (loads OpenBLAS before mlx.core)
import pytest

from mixq.config import ModelConfig
from mixq.prepare import prepare_model


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MLX dir of the embedded SmolLM2-135M-Instruct GGUF, float32 (read-only for tests)."""
    cfg = ModelConfig(kind="embedded", id="smollm2-135m-instruct")
    return prepare_model(cfg, tmp_path_factory.mktemp("smollm2") / "model")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path):
    """``(model, tokenizer)`` from stock ``mlx_lm.load`` of :func:`smollm2_dir` (don't mutate)."""
    import mlx_lm

    return mlx_lm.load(str(smollm2_dir))
