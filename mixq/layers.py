"""Model anatomy: which modules are quantizable layers and which block each belongs to.

Works for any mlx-lm model: a layer is any module with ``to_quantized`` (``nn.Linear``,
``nn.Embedding``, mlx-lm's ``SwitchLinear`` for mixture-of-experts), the same rule
``nn.quantize`` uses; blocks are ``model.layers``.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn
from mlx.utils import tree_flatten

from mixq.config import Candidate
from mixq.budget import is_applicable


@dataclass
class Layer:
    """A quantizable layer. ``block`` is its index in ``model.layers`` (None: outside blocks,
    e.g. embeddings and the output head, which affect every block or none)."""

    path: str
    kind: str
    shape: tuple[int, ...]
    block: int | None

    @property
    def params(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted ``path`` ("model.layers.3.mlp.up_proj")."""
    module = model
    for part in path.split("."):
        module = module[int(part)] if isinstance(module, list) else module[part]
    return module


def layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    return type(module).__name__.lower().replace("switchlinear", "switch_linear")


def block_prefixes(model: nn.Module) -> dict[str, int]:
    """Path prefix ("model.layers.3.") -> block index, found by identity, not by name."""
    blocks = {id(b): i for i, b in enumerate(model.layers)}
    return {
        path + ".": blocks[id(m)] for path, m in model.named_modules() if id(m) in blocks
    }


def quantizable_layers(model: nn.Module) -> list[Layer]:
    """Every module ``nn.quantize`` could quantize, in module order."""
    prefixes = block_prefixes(model)
    layers = []
    for path, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if not hasattr(module, "to_quantized") or "weight" not in module:
            continue
        block = next((i for p, i in prefixes.items() if path.startswith(p)), None)
        layers.append(Layer(path, layer_kind(module), tuple(module.weight.shape), block))
    return layers


def unquantized_params(model: nn.Module, layers: list[Layer]) -> int:
    """Parameters outside the layers' weights (norms, biases, ...), stored unquantized."""
    weights = {layer.path + ".weight" for layer in layers}
    return sum(v.size for k, v in tree_flatten(model.parameters()) if k not in weights)


def applicable_candidates(layer: Layer, candidates: list[Candidate]) -> list[Candidate]:
    return [c for c in candidates if is_applicable(layer.shape, c)]
