"""Run a mixq quant with its per-layer KV-cache precision (``kv_config.json``, see :mod:`mixq.kv`).

The cache list is the model's own (``make_prompt_cache``) with each configured layer's
``KVCache`` replaced by mlx-lm's ``QuantizedKVCache(group_size, bits)``: mlx-lm's attention reads
each cache's ``bits`` and runs quantized attention for that layer only. Layers the config leaves
out keep their plain ``KVCache``; linear-attention layers keep their fixed-size ``ArraysCache``.
Generation is stock ``mlx_lm.generate`` with that ``prompt_cache``.

On CPU the model's quantized layers are dequantized and it computes in float32 (CPU quantized
matmuls are ~10x slower than float32 ones, bfloat16 ones as slow), so the quantized KV caches
hold float32 scales and biases there; the config's bit accounting is for the checkpoint's own
dtype, as it runs on a GPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import dequantize_model

from mixq.chat import chat_tokens
from mixq.io import read_json

log = logging.getLogger("mixq")

KV_CONFIG = "kv_config.json"
PIPELINE_KV_CONFIG = Path("outputs/kv") / KV_CONFIG


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
               for _, m in model.named_modules())


def for_this_device(model: nn.Module) -> str:
    """Make ``model`` run well here, in place; returns which kernels it runs: "float" (nothing
    quantized), "quantized" (off CPU: the checkpoint's own kernels) or "dequantized-float32"
    (CPU: float32, quantized layers dequantized with mlx-lm's ``dequantize_model``)."""
    if not is_quantized(model):
        return "float"
    if mx.default_device() != mx.cpu:
        return "quantized"
    model.set_dtype(mx.float32)  # scales and biases first: dequantizing in bf16 rounds
    dequantize_model(model)  # exact q * scale + bias in float32
    return "dequantized-float32"


def find_kv_config(model_path: Path) -> Optional[Path]:
    """``kv_config.json`` beside the weights, else the pipeline's ``outputs/kv/kv_config.json``
    if it was measured for this model directory, else None."""
    beside = Path(model_path) / KV_CONFIG
    if beside.exists():
        return beside
    if PIPELINE_KV_CONFIG.exists():
        measured_for = Path(read_json(PIPELINE_KV_CONFIG)["model"])
        if measured_for.resolve() == Path(model_path).resolve():
            return PIPELINE_KV_CONFIG
    return None


def make_kv_cache(
    model: nn.Module, layers: Mapping[Any, Mapping[str, Any]], caches: Optional[int] = None
) -> list:
    """The model's cache list with ``QuantizedKVCache(group_size, bits)`` at each index of
    ``layers`` (cache index -> {bits, group_size, ...}); ``caches``: the cache count the config
    was made for. Raises ``ValueError`` if a configured index is not a plain ``KVCache``."""
    cache = make_prompt_cache(model)
    if caches is not None and caches != len(cache):
        raise ValueError(
            f"kv config is for a model with {caches} caches, this one has {len(cache)}"
        )
    for key, c in layers.items():
        i = int(key)
        if type(cache[i]) is not KVCache:
            raise ValueError(
                f"kv config quantizes cache {i}, but the model's cache {i} is a "
                f"{type(cache[i]).__name__}, not a per-token KVCache"
            )
        cache[i] = QuantizedKVCache(group_size=c["group_size"], bits=c["bits"])
    return cache


def cache_for(model: nn.Module, kv_config: Optional[Mapping[str, Any]]) -> list:
    """Fresh per-layer caches for one generation: ``kv_config``'s, or the model's own if None."""
    if kv_config is None:
        return make_prompt_cache(model)
    return make_kv_cache(model, kv_config["layers"], kv_config["caches"])


def load(
    model_path: Path, kv_config: Path | str | None = None
) -> tuple[nn.Module, Any, Optional[dict]]:
    """``(model, tokenizer, kv config)``: the model with stock ``mlx_lm.load`` (see
    :func:`for_this_device`) and the KV config at ``kv_config`` (None: :func:`find_kv_config`'s;
    ``"none"``: no config, the model's own caches). The config is checked against the model."""
    model, tokenizer = mlx_lm.load(str(model_path))
    if kv_config is None:
        kv_config = find_kv_config(Path(model_path))
    config = None
    if kv_config not in (None, "none"):
        try:
            config = read_json(Path(kv_config))
        except (OSError, ValueError) as err:
            raise ValueError(f"KV config {kv_config}: cannot read it ({err})") from err
    if config is None:
        log.info("no KV config for %s: unquantized KV cache", model_path)
    else:
        cache_for(model, config)  # fails now, not mid-generation, if it does not fit
        log.info("KV cache: %s (%.2f bits per element)", kv_config, config["summary"]["bits"])
    for_this_device(model)
    return model, tokenizer, config


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    kv_config: Optional[Mapping[str, Any]],
    max_tokens: int = 256,
    temp: float = 0.0,
    verbose: bool = False,
) -> str:
    """The completion of ``prompt`` (one user turn, :func:`mixq.chat.chat_tokens`) by stock
    ``mlx_lm.generate``, with the per-layer caches of ``kv_config`` (None: the model's own)."""
    messages = [{"role": "user", "content": prompt}]
    return mlx_lm.generate(
        model, tokenizer, chat_tokens(tokenizer, messages, add_generation_prompt=True)[0],
        max_tokens=max_tokens,
        sampler=make_sampler(temp=temp), prompt_cache=cache_for(model, kv_config),
        verbose=verbose,
    )
