"""The reference model of measure-kl (``measure.reference``): the float model, or, when that
does not fit in memory, a uniformly quantized one (q8 / q4, affine, group 64).

With a quantized reference, every other layer stays quantized while one layer is measured;
that layer is rebuilt from its float weight, read lazily from the checkpoint on demand, so
memory holds the quantized model plus one float layer at a time.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mixq.config import Candidate
from mixq.layers import Layer, get_module
from mixq.quantize import fake_quantize

log = logging.getLogger("mixq")

REFERENCE_BITS = {"q8": 8, "q4": 4}
REFERENCE_GROUP = 64


def choose_reference(setting: str, model_dir: Path) -> str:
    """``float``, ``q8`` or ``q4``; ``auto`` is float when twice the checkpoint's bytes (the
    float weights plus working memory) fit in MLX's memory limit, else q8."""
    if setting in ("float", *REFERENCE_BITS):
        return setting
    if setting != "auto":
        raise ValueError(f"measure.reference={setting!r}: use auto, float, q8 or q4")
    weight_bytes = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    limit = mx.get_memory_limit()
    choice = "float" if 2 * weight_bytes < limit else "q8"
    log.info("reference: %s (weights %.2f GB, memory limit %.2f GB)", choice,
             weight_bytes / 1e9, limit / 1e9)
    return choice


class FloatWeights:
    """Float weights read lazily from the checkpoint's safetensors, one tensor on demand."""

    def __init__(self, model_dir: Path):
        self.files = sorted(Path(model_dir).glob("*.safetensors"))

    def __getitem__(self, name: str) -> mx.array:
        for f in self.files:
            tensors = mx.load(str(f))  # parses the header only; tensors load on eval
            if name in tensors:
                return tensors[name]
        raise KeyError(name)


def quantize_reference(model: nn.Module, layers: list[Layer], bits: int) -> dict[str, nn.Module]:
    """Quantize ``layers`` of ``model`` in place (affine, ``bits``, group 64 where it applies);
    return the replaced float modules by path (their weights are dropped: see
    :func:`quantized_layer`)."""
    floats = {
        path: m
        for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
        if path in {x.path for x in layers} and m.weight.shape[-1] % REFERENCE_GROUP == 0
    }
    nn.quantize(model, REFERENCE_GROUP, bits, class_predicate=lambda p, _: p in floats)
    mx.eval(model.parameters())
    for m in floats.values():
        m.weight = mx.array(0)  # free the float copy; reloaded per measurement
    return floats


@contextlib.contextmanager
def quantized_layer(
    model: nn.Module,
    layer: Layer,
    candidate: Candidate,
    dtype: str,
    floats: dict[str, nn.Module] | None = None,
    weights: FloatWeights | None = None,
) -> Iterator[None]:
    """Inside the block, ``model`` has ``layer`` fake-quantized to ``candidate`` and every
    other layer as in the reference; restored on exit."""
    if floats and layer.path in floats:
        shell, current = floats[layer.path], get_module(model, layer.path)
        shell.weight = fake_quantize(weights[layer.path + ".weight"], candidate, dtype)
        model.update_modules(tree_unflatten([(layer.path, shell)]))
        try:
            yield
        finally:
            model.update_modules(tree_unflatten([(layer.path, current)]))
            shell.weight = mx.array(0)
    else:
        module = get_module(model, layer.path)
        original = module.weight
        module.weight = fake_quantize(original, candidate, dtype)
        try:
            yield
        finally:
            module.weight = original

