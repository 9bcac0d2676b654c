"""Honest bit accounting: the bits MLX really stores for a model quantized with a plan.

``mx.quantize`` (MLX 0.32) on a weight of shape ``[..., out, in]`` returns, per group of
``group_size`` consecutive input elements of a row:

* packed weights: ``in * bits / 32`` uint32 words per row, i.e. exactly ``bits`` bits/element;
* ``affine``: one scale and one bias per group, both in the weight's dtype
  (16 bits for bfloat16/float16 weights, 32 for float32);
* ``mxfp4``, ``mxfp8`` (group 32) and ``nvfp4`` (group 16): one uint8 scale per group, no bias.

So affine 4-bit g64 on bf16 costs 4 + 32/64 = 4.5 bits/weight, mxfp4 4.25 and nvfp4 4.5.
Everything else (norms, biases, unquantized layers) is stored at the model dtype. BPW here is
always stored bits / parameters, as ``mlx_lm.utils.compute_bits_per_weight`` computes it.

A candidate is anything with ``bits``, ``group_size`` and ``mode`` (a :class:`Candidate`, a
:class:`ProtectRule` or a dict); tables and plans use dicts with a ``name`` too.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Dict, List, Mapping, Sequence, Tuple

# mode -> (allowed bits, allowed group sizes), as mx.quantize accepts them in MLX 0.32.
MODES: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {
    "affine": ((1, 2, 3, 4, 5, 6, 8), (32, 64, 128)),
    "mxfp4": ((4,), (32,)),
    "mxfp8": ((8,), (32,)),
    "nvfp4": ((4,), (16,)),
}
FP_SCALE_BITS = 8  # e8m0 (mxfp*) or e4m3 (nvfp4) scale, stored as uint8

DTYPE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}


def dtype_bits(dtype: str) -> int:
    """Bits per element of a weight dtype name (``quant.dtype``)."""
    if dtype not in DTYPE_BITS:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BITS)}")
    return DTYPE_BITS[dtype]


def _get(obj: Any, key: str) -> Any:
    """``obj[key]`` for a mapping, ``obj.key`` for a dataclass."""
    return obj[key] if isinstance(obj, Mapping) else getattr(obj, key)


def candidate_name(c: Any) -> str:
    """The canonical name of a candidate, e.g. ``affine-b4-g64`` or ``mxfp4-b4-g32``."""
    return f"{_get(c, 'mode')}-b{_get(c, 'bits')}-g{_get(c, 'group_size')}"


def candidate_dict(c: Any) -> Dict[str, Any]:
    """A candidate as the plain dict used in tables and plans (with its ``name``)."""
    mode, bits, group_size = _get(c, "mode"), _get(c, "bits"), _get(c, "group_size")
    if mode not in MODES or bits not in MODES[mode][0] or group_size not in MODES[mode][1]:
        raise ValueError(
            f"{candidate_name(c)} is not an MLX quantization: "
            + "; ".join(f"{m}: bits {b}, group_size {g}" for m, (b, g) in MODES.items())
        )
    return {"name": candidate_name(c), "bits": bits, "group_size": group_size, "mode": mode}


def is_applicable(shape: Sequence[int], c: Any) -> bool:
    """Whether a weight of ``shape`` splits into ``c``'s groups (in-dim divisible by them)."""
    return shape[-1] % _get(c, "group_size") == 0


def layer_bits(shape: Sequence[int], c: Any, dtype_bits: int = 16) -> int:
    """Bits stored for a weight of ``shape`` (``[..., out, in]``) quantized with candidate ``c``:
    packed weights + scales (+ biases for affine). ``dtype_bits``: the weight dtype's width."""
    mode, bits, group_size = _get(c, "mode"), _get(c, "bits"), _get(c, "group_size")
    if not is_applicable(shape, c):
        raise ValueError(f"{candidate_name(c)} needs in-dim divisible by {group_size}: {shape}")
    elements = math.prod(shape)
    groups = elements // group_size
    if mode == "affine":
        return elements * bits + groups * 2 * dtype_bits
    return elements * bits + groups * FP_SCALE_BITS


def unquantized_bits(shape: Sequence[int], dtype_bits: int) -> int:
    """Bits stored for a tensor of ``shape`` kept at the model dtype."""
    return math.prod(shape) * dtype_bits


def total_params(table: Mapping[str, Any]) -> int:
    """All parameters of the model: quantizable weights + ``unquantized_params``.

    Checks the table's ``total_params`` agrees, so a BPW is never divided by a wrong count."""
    total = sum(layer["params"] for layer in table["layers"]) + table["unquantized_params"]
    if table.get("total_params", total) != total:
        raise ValueError(
            f"sensitivity table: total_params={table['total_params']} but layers + "
            f"unquantized_params = {total}"
        )
    return total


def budget_bits(table: Mapping[str, Any], target_bpw: float) -> int:
    """The whole model's bit budget: ``target_bpw * total_params``, rounded down (with a
    tolerance for the float product, so a target printed from an exact BPW reaches it)."""
    return math.floor(target_bpw * total_params(table) + 1e-6)


def layer_choices(
    table: Mapping[str, Any], protect: Sequence[Any] = ()
) -> List[Tuple[Dict[str, Any], List[Dict[str, Any]], bool]]:
    """Per table layer: ``(layer, candidates it may take, protected)``.

    A layer matching a ``protect`` rule (fnmatch on its path; the first matching rule wins) is
    fixed at that rule's candidate; other layers may take any table candidate measured for them
    (a candidate missing from ``layer["kl"]`` is not applicable). A layer with no choice is kept
    unquantized. Raises ``ValueError`` for a rule matching no layer or an inapplicable rule.
    """
    rules = [(_get(rule, "pattern"), candidate_dict(rule)) for rule in protect]
    used = set()
    choices = []
    for layer in table["layers"]:
        path, shape = layer["path"], layer["shape"]
        rule = next((r for r in rules if fnmatch.fnmatchcase(path, r[0])), None)
        if rule is None:
            measured = [c for c in table["candidates"] if c["name"] in layer["kl"]]
            choices.append((layer, measured, False))
            continue
        pattern, c = rule
        used.add(pattern)
        known = any(t["name"] == c["name"] for t in table["candidates"])
        if not is_applicable(shape, c) or (known and c["name"] not in layer["kl"]):
            raise ValueError(
                f"protect rule {pattern!r} -> {c['name']} does not apply to {path} {shape}"
            )
        choices.append((layer, [c], True))
    unused = [pattern for pattern, _ in rules if pattern not in used]
    if unused:
        example = table["layers"][0]["path"] if table["layers"] else "-"
        raise ValueError(f"protect patterns {unused} match no layer (paths look like {example!r})")
    return choices


def bits_range(
    table: Mapping[str, Any], protect: Sequence[Any] = (), dtype_bits: int = 16
) -> Tuple[int, int]:
    """(fewest, most) bits the whole model can be stored in: every free layer at its cheapest /
    dearest candidate, protected layers at theirs, everything else at ``dtype_bits``."""
    lo = hi = table["unquantized_params"] * dtype_bits
    for layer, cands, _ in layer_choices(table, protect):
        bits = [layer_bits(layer["shape"], c, dtype_bits) for c in cands] or [
            unquantized_bits(layer["shape"], dtype_bits)
        ]
        lo, hi = lo + min(bits), hi + max(bits)
    return lo, hi


def feasible_bpw_range(
    table: Mapping[str, Any], protect: Sequence[Any] = (), dtype_bits: int = 16
) -> Tuple[float, float]:
    """(lowest, highest) honest BPW reachable, see :func:`bits_range`."""
    lo, hi = bits_range(table, protect, dtype_bits)
    total = total_params(table)
    return lo / total, hi / total


def model_bpw(
    plan: Mapping[str, Any], table: Mapping[str, Any], dtype_bits: int = 16
) -> Dict[str, Any]:
    """Storage figures of ``table``'s model quantized as ``plan["layers"]`` (path -> candidate);
    table layers absent from the plan are kept at ``dtype_bits``.

    Returns ``bpw`` (all stored bits incl. scales, biases and unquantized tensors / all
    parameters), ``quantized_bpw`` (quantized layers only), ``weight_bytes`` (tensor bytes of
    the safetensors files: weights only, no headers, config or tokenizer), ``total_params``,
    ``quantized_params`` and per-candidate ``{"layers", "params", "bits"}``.
    """
    assigned = plan["layers"]
    paths = {layer["path"] for layer in table["layers"]}
    unknown = sorted(set(assigned) - paths)
    if unknown:
        raise ValueError(f"plan layers not in the sensitivity table: {unknown[:5]}")
    stored = table["unquantized_params"] * dtype_bits
    quant_bits = quant_params = 0
    per_candidate: Dict[str, Dict[str, int]] = {}
    for layer in table["layers"]:
        c = assigned.get(layer["path"])
        if c is None:
            stored += unquantized_bits(layer["shape"], dtype_bits)
            continue
        bits = layer_bits(layer["shape"], c, dtype_bits)
        stored += bits
        quant_bits += bits
        quant_params += layer["params"]
        entry = per_candidate.setdefault(
            candidate_name(c), {"layers": 0, "params": 0, "bits": 0}
        )
        entry["layers"] += 1
        entry["params"] += layer["params"]
        entry["bits"] += bits
    total = total_params(table)
    return {
        "bpw": stored / total,
        "quantized_bpw": quant_bits / quant_params if quant_params else None,
        "weight_bytes": stored // 8,
        "total_params": total,
        "quantized_params": quant_params,
        "candidates": dict(sorted(per_candidate.items())),
    }
