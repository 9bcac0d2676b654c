"""How much memory logit-sized work may take, and the chunk sizes that follow from it.

Logit-sized work is every array of one row per token and one column per vocabulary entry:
the logits of a forward pass, the reference probabilities, the float64 terms of the KL
(:func:`mixq.kl.token_kl`). With a 262k vocabulary (Gemma 3) one token's row is 1 MB in
float32, so eval, measure-kl (exact) and kv-sensitivity work through tokens in slices sized from
a budget: ``memory.logits_gb`` in params.yaml, or by default :data:`AUTO_FRACTION` of the memory
MLX may use on this device (``mx.get_memory_limit()``: a share of RAM on CPU, the recommended
working set on Apple silicon). The slicing changes only memory, never a number: every quantity
is computed per token, and the forward passes give the same logits for any batch of sequences
(tested).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx

AUTO_FRACTION = 0.1
# peak float32 [tokens, vocab] copies alive at once, measured on CPU with mx.get_peak_memory
KL_COPIES = 12  # reference_logits + token_kl of one slice (float64 sums count twice)
FORWARD_COPIES = 3  # a forward's logits, the reference rows it is compared with, their output

_budget_gb: Optional[float] = None


def set_budget(gb: Optional[float]) -> None:
    """Use ``gb`` (10^9 bytes) for logit-sized work in this process; None: the automatic one."""
    global _budget_gb
    if gb is not None and gb <= 0:
        raise ValueError(f"memory.logits_gb must be positive (or null for automatic), got {gb}")
    _budget_gb = gb


def budget_bytes() -> int:
    """The bytes logit-sized work may take (see the module docstring)."""
    if _budget_gb is not None:
        return int(_budget_gb * 1e9)
    return int(AUTO_FRACTION * mx.get_memory_limit())


def logit_rows(vocab_size: int, copies: int = KL_COPIES) -> int:
    """Tokens per slice so that ``copies`` float32 rows of ``vocab_size`` fit the budget (>= 1)."""
    return max(1, budget_bytes() // (copies * 4 * vocab_size))


def vocab_size(model_dir: Path) -> int:
    """The vocabulary size in a model directory's ``config.json`` (or its ``text_config``)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get("vocab_size") or config["text_config"]["vocab_size"]
