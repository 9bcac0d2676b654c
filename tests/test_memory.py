"""The memory budget for logit-sized work (mixq.memory) sizes slices only: eval's held-out
metrics, measure-kl's reference pass and per-token KL give the same numbers, bit for bit, for a
budget of a few tokens' rows and for a large one."""

from __future__ import annotations

import json

import mixq  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_llama

from mixq.evaluate import forward_logits, heldout_metrics, record_logits
from mixq.kl import sliced_kl, split_chunks, token_kl
from mixq.measure import build_reference
from mixq.memory import KL_COPIES, budget_bytes, logit_rows, set_budget, vocab_size

VOCAB = 256


@pytest.fixture
def budget():
    """Set a budget for one test, back to automatic afterwards."""
    yield set_budget
    set_budget(None)


def rows_budget_gb(rows: int) -> float:
    """The budget (GB) under which KL slices hold ``rows`` tokens of a VOCAB-word model."""
    return rows * KL_COPIES * 4 * VOCAB / 1e9


def test_budget_sets_rows_and_defaults_to_a_tenth_of_mlx_memory(budget):
    assert budget_bytes() == int(0.1 * mx.get_memory_limit())
    budget(rows_budget_gb(7))
    assert logit_rows(VOCAB) == 7 and logit_rows(10**9) == 1
    with pytest.raises(ValueError, match="memory.logits_gb must be positive"):
        budget(0)


def test_vocab_size_from_config_or_text_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"vocab_size": 262144}}))
    assert vocab_size(tmp_path) == 262144


def test_slices_change_no_number(budget, tmp_path):
    model = tiny_llama(vocab_size=VOCAB, layers=2)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (3, 40)).astype(np.int32)
    chunks = split_chunks(tokens, 80)  # 2 sequences, then 1
    reference = record_logits(forward_logits(model, chunks), tokens.size, tmp_path / "ref.npy")
    other = tiny_llama(vocab_size=VOCAB, layers=2, seed=1)
    results = {}
    for rows in (7, 1000):
        budget(rows_budget_gb(rows))
        metrics = heldout_metrics(forward_logits(other, chunks), chunks, reference)
        (tmp_path / str(rows)).mkdir()
        ref = build_reference(model, chunks, tmp_path / str(rows))
        kls = [sliced_kl(lambda s: ref.rows(c, s), other(chunk)) for c, chunk in
               enumerate(chunks)]
        results[rows] = metrics, np.array(ref.p), np.concatenate(kls)
    (m7, p7, kl7), (m1000, p1000, kl1000) = results[7], results[1000]
    assert m7 == m1000 and m7["kl_mean"] > 0 and m7["top1"] < 1
    assert np.array_equal(p7, p1000) and np.array_equal(kl7, kl1000)
    whole = token_kl(ref.rows(0, slice(None)), other(chunks[0]).reshape(80, -1))
    assert np.array_equal(np.array(whole), kl1000[:80])
