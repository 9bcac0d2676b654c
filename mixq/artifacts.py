"""The artifacts that pass between stages, with their readers, so a stage that reads a file
does not import the module that writes it.

* ``outputs/calibration``: a :class:`CalibrationSet` (written by :mod:`mixq.calibration`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

SPLITS = ("calibration", "refine", "heldout")  # per domain; heldout_other is per other source
ALL_SPLITS = (*SPLITS, "heldout_other")
SPLIT_FILES = {split: f"{split}.safetensors" for split in ALL_SPLITS}
SPLIT_KEYS = {  # the CalibrationSet fields (and safetensors keys) of each split
    "calibration": ("tokens", "domain_ids"),
    "refine": ("refine_tokens", "refine_domain_ids"),
    "heldout": ("heldout_tokens", "heldout_domain_ids"),
    "heldout_other": ("heldout_other_tokens", "heldout_other_source_ids"),
}

@dataclass
class CalibrationSet:
    """Token windows (int32 ``[n, seq_len]``) of every split and where each came from (int32
    ``[n]``: an index into ``domains``, or into ``other_sources`` for ``heldout_other``), plus
    what the manifest reports about them."""

    domains: list[str]
    tokens: np.ndarray
    domain_ids: np.ndarray
    refine_tokens: np.ndarray
    refine_domain_ids: np.ndarray
    heldout_tokens: np.ndarray
    heldout_domain_ids: np.ndarray
    heldout_other_tokens: np.ndarray
    heldout_other_source_ids: np.ndarray
    other_sources: list[str]
    documents: dict[str, dict[str, int]]  # domain or other source -> split -> documents used
    tokenizer: dict[str, Any]  # vocab_size, eos_token_id, chat_template_sha256
    excerpts: dict[str, str]  # domain -> start of its first decoded calibration window
    renderings: dict[str, dict[str, int]]  # domain -> rendering (mixq.chat) -> documents

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens, source ids)`` of a split (:data:`ALL_SPLITS`)."""
        tokens, ids = SPLIT_KEYS[name]
        return getattr(self, tokens), getattr(self, ids)


def read_calibration(directory: Path) -> CalibrationSet:
    """The :class:`CalibrationSet` that :func:`write_calibration` wrote to ``directory``."""
    directory = Path(directory)
    info = json.loads((directory / "manifest.json").read_text())
    arrays = {}
    for split in ALL_SPLITS:
        arrays.update(load_file(str(directory / SPLIT_FILES[split])))
    tokenizer = {k: v for k, v in info["tokenizer"].items() if k != "name"}
    documents = {name: {s: counts["documents"] for s, counts in splits.items()}
                 for group in ("per_domain", "per_other_source")
                 for name, splits in info[group].items()}
    return CalibrationSet(
        domains=info["domains"],
        other_sources=info["other_sources"],
        documents=documents,
        tokenizer=tokenizer,
        excerpts=info["excerpts"],
        renderings=info["renderings"],
        **arrays,
    )
