"""measure.method=fisher: a fast proxy for the per-layer KL table.

Around the reference, KL(p_theta || p_theta+dW) ~= 1/2 dW^T F dW with F the Fisher information
of the model's own predictive distribution. With a diagonal F estimated from per-sequence
gradients of log p(y) at labels *sampled from the model* (an unbiased Monte-Carlo Fisher, cf.
SqueezeLLM's Fisher weighting and ModelOpt AutoQuantize's gradient score), the predicted mean
per-token KL of quantizing one layer is sum(F * (Q(W) - W)^2) / (2 * tokens): one forward and
backward pass per sequence scores every layer and candidate at once.
"""

from __future__ import annotations

import logging
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from mixq.budget import candidate_name
from mixq.config import Candidate
from mixq.layers import Layer, applicable_candidates, get_module
from mixq.quantize import fake_quantize

log = logging.getLogger("mixq")


def fisher_diagonal(
    model: nn.Module, tokens: np.ndarray, layers: list[Layer], seed: int = 0
) -> dict[str, mx.array]:
    """Diagonal Fisher per layer weight (same shape), summed over ``tokens`` [N, T] sequences."""
    paths = {layer.path for layer in layers}
    model.freeze()
    for layer in layers:
        get_module(model, layer.path).unfreeze(keys=["weight"], recurse=False)

    def sampled_log_likelihood(x, y):
        logits = model(x).astype(mx.float32)
        return -nn.losses.cross_entropy(logits, y, reduction="sum")

    grad_fn = nn.value_and_grad(model, sampled_log_likelihood)
    key = mx.random.key(seed)
    fisher: dict[str, mx.array] = {}
    try:
        for i in tqdm(range(len(tokens)), desc="fisher", unit="seq"):
            x = mx.array(tokens[i : i + 1])
            key, sub = mx.random.split(key)
            y = mx.random.categorical(model(x).astype(mx.float32), key=sub)
            _, grads = grad_fn(x, y)
            for name, g in tree_flatten(grads):
                path = name.rsplit(".", 1)[0]
                if path in paths:
                    fisher[path] = fisher[path] + g * g if path in fisher else g * g
            mx.eval(fisher)
    finally:
        model.unfreeze()
    return fisher


def measure_fisher(
    model: nn.Module,
    tokens: np.ndarray,
    layers: list[Layer],
    candidates: list[Candidate],
    dtype: str,
    seed: int = 0,
) -> dict[tuple[str, str], dict]:
    """Predicted mean per-token KL per (layer path, candidate name); p95/max are None."""
    t0 = time.time()
    fisher = fisher_diagonal(model, tokens, layers, seed)
    n_tokens = tokens.size
    rows = {}
    for layer in layers:
        w = get_module(model, layer.path).weight
        for c in applicable_candidates(layer, candidates):
            err = fake_quantize(w, c, dtype) - w
            score = (fisher[layer.path] * err * err).sum() / (2 * n_tokens)
            rows[(layer.path, candidate_name(c))] = {"mean": score.item(), "p95": None, "max": None}
    log.info("fisher scores for %d rows in %.1fs", len(rows), time.time() - t0)
    return rows
