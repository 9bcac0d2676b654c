"""Bit accounting against what MLX really stores (mx.quantize, mlx-lm's compute_bits_per_weight).

``smollm2_table`` (also used by test_allocate) builds a realistic sensitivity table with the
SmolLM2-135M layer shapes and synthetic KLs.
"""

import math

import numpy as np
import pytest

from mixq.budget import (
    MODES,
    bits_range,
    budget_bits,
    candidate_dict,
    candidate_name,
    dtype_bits,
    feasible_bpw_range,
    layer_bits,
    layer_choices,
    model_bpw,
    total_params,
)
from mixq.config import Candidate, ProtectRule

import mlx.core as mx  # after mixq: it loads OpenBLAS before mlx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import llama, mixtral
from mlx_lm.models.switch_layers import SwitchLinear
from mlx_lm.utils import compute_bits_per_weight

AFFINE_4_8 = [candidate_dict(Candidate(4, 64)), candidate_dict(Candidate(8, 64))]
HIDDEN, KV, FFN, VOCAB, BLOCKS = 576, 192, 1536, 49152, 30
SMOLLM2_SHAPES = {
    "self_attn.q_proj": [HIDDEN, HIDDEN],
    "self_attn.k_proj": [KV, HIDDEN],
    "self_attn.v_proj": [KV, HIDDEN],
    "self_attn.o_proj": [HIDDEN, HIDDEN],
    "mlp.gate_proj": [FFN, HIDDEN],
    "mlp.up_proj": [FFN, HIDDEN],
    "mlp.down_proj": [HIDDEN, FFN],
}
SMOLLM2_NORMS = (2 * BLOCKS + 1) * HIDDEN  # input/post-attention norms + final norm
SMOLLM2_PARAMS = 134_515_008  # as published
SENSITIVITY = {"v_proj": 3.0, "down_proj": 2.0, "k_proj": 1.5, "embed_tokens": 0.5}


def synthetic_kl(c: dict, base: float) -> dict:
    """KL ~ quantization noise power: x4 per bit removed, sqrt(group size); fp4 formats a bit
    worse/better than affine 4-bit."""
    kl = base * 4.0 ** (4 - c["bits"]) * math.sqrt(c["group_size"] / 64)
    kl *= {"mxfp4": 1.4, "nvfp4": 0.9}.get(c["mode"], 1.0)
    return {"mean": kl, "p95": 3 * kl, "max": 15 * kl}


def smollm2_table(candidates=AFFINE_4_8, seed: int = 0, blocks: int = BLOCKS) -> dict:
    """A sensitivity table shaped like SmolLM2-135M (tied embedding, 30 llama blocks; more
    blocks for a deeper model) with lognormal per-layer sensitivities, the first and last blocks
    and v/down/k projections more sensitive; a candidate is missing where its group does not
    divide the in-dim (e.g. g128 on 576)."""
    rng = np.random.default_rng(seed)
    paths = [("model.embed_tokens", "embedding", [VOCAB, HIDDEN])] + [
        (f"model.layers.{b}.{name}", "linear", shape)
        for b in range(blocks)
        for name, shape in SMOLLM2_SHAPES.items()
    ]
    layers = []
    for path, kind, shape in paths:
        block_factor = 4.0 if ".layers.0." in path or f".layers.{blocks - 1}." in path else 1.0
        base = 1e-3 * block_factor * SENSITIVITY.get(path.split(".")[-1], 1.0)
        base *= rng.lognormal(0.0, 0.6)
        kl = {
            c["name"]: synthetic_kl(c, base)
            for c in candidates
            if shape[-1] % c["group_size"] == 0
        }
        layers.append(
            {"path": path, "kind": kind, "shape": shape, "params": math.prod(shape), "kl": kl}
        )
    norms = (2 * blocks + 1) * HIDDEN
    return {
        "candidates": list(candidates),
        "layers": layers,
        "unquantized_params": norms,
        "total_params": sum(layer["params"] for layer in layers) + norms,
        "tokens": 4096,
        "method": "exact",
        "reference": "float",
    }


def valid_candidates() -> list:
    return [
        {"mode": mode, "bits": b, "group_size": g}
        for mode, (bits, groups) in MODES.items()
        for b in bits
        for g in groups
    ]


def test_candidate_names():
    assert candidate_name(Candidate(4, 64)) == "affine-b4-g64"
    assert candidate_name({"mode": "mxfp4", "bits": 4, "group_size": 32}) == "mxfp4-b4-g32"
    assert candidate_dict(ProtectRule("*", 8, 32, "affine")) == {
        "name": "affine-b8-g32", "bits": 8, "group_size": 32, "mode": "affine"
    }
    assert dtype_bits("bfloat16") == 16 and dtype_bits("float32") == 32
    with pytest.raises(ValueError, match="not an MLX quantization"):
        candidate_dict(Candidate(4, 64, "mxfp4"))


def test_modes_table_is_what_mlx_accepts():
    w = mx.zeros((4, 256), dtype=mx.bfloat16)
    for mode in MODES:
        for bits in range(1, 9):
            for group_size in (16, 32, 64, 128):
                try:
                    mx.eval(mx.quantize(w, group_size, bits, mode=mode))
                    accepted = True
                except ValueError:
                    accepted = False
                valid = bits in MODES[mode][0] and group_size in MODES[mode][1]
                assert accepted == valid, (mode, bits, group_size)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("shape", [(24, 384), (3, 8, 256), (KV, HIDDEN), (HIDDEN, FFN)])
def test_layer_bits_equal_mx_quantize_nbytes(dtype, shape):
    w = mx.random.normal(shape).astype(dtype)
    for c in valid_candidates():
        if shape[-1] % c["group_size"]:
            continue
        stored = sum(a.nbytes for a in mx.quantize(w, c["group_size"], c["bits"], mode=c["mode"]))
        assert layer_bits(shape, c, dtype.size * 8) == 8 * stored, c


def test_bits_per_weight_of_each_mode():
    per_weight = {
        candidate_name(c): layer_bits([1, 128], c, 16) / 128
        for c in valid_candidates()
        if c["group_size"] <= 128
    }
    assert per_weight["affine-b4-g64"] == 4.5
    assert per_weight["affine-b4-g32"] == 5.0
    assert per_weight["affine-b8-g64"] == 8.5
    assert per_weight["affine-b2-g128"] == 2.25
    assert per_weight["mxfp4-b4-g32"] == 4.25
    assert per_weight["mxfp8-b8-g32"] == 8.25
    assert per_weight["nvfp4-b4-g16"] == 4.5
    with pytest.raises(ValueError, match="divisible by 128"):
        layer_bits([HIDDEN, HIDDEN], candidate_dict(Candidate(4, 128)))


def table_from_model(model: nn.Module) -> dict:
    """The layer/param part of a sensitivity table for an mlx-lm model (every quantizable leaf)."""
    kinds = {nn.Linear: "linear", nn.Embedding: "embedding", SwitchLinear: "switch_linear"}
    leaves = tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module))
    layers = [
        {"path": path, "kind": kinds[type(m)], "shape": list(m.weight.shape),
         "params": m.weight.size, "kl": {}}
        for path, m in leaves
        if type(m) in kinds
    ]
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    weights = sum(layer["params"] for layer in layers)
    return {"candidates": [], "layers": layers, "unquantized_params": total - weights,
            "total_params": total}


def quantize_as_planned(model: nn.Module, plan: dict) -> None:
    def predicate(path, module):
        c = plan["layers"].get(path)
        return c and {k: c[k] for k in ("group_size", "bits", "mode")}

    nn.quantize(model, class_predicate=predicate)


def mixed_plan(table: dict, cycle: list) -> dict:
    """Assign candidates round robin; every fourth layer stays unquantized."""
    return {"layers": {
        layer["path"]: cycle[i % len(cycle)]
        for i, layer in enumerate(table["layers"])
        if i % 4 != 3
    }}


def test_model_bpw_equals_mlx_lm_on_a_quantized_llama():
    args = llama.ModelArgs(
        model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=512,
        attention_bias=True, tie_word_embeddings=True,
    )
    model = llama.Model(args)
    model.set_dtype(mx.bfloat16)
    table = table_from_model(model)
    assert table["layers"][0]["path"] == "model.embed_tokens"
    cycle = [candidate_dict(Candidate(b, g, m)) for b, g, m in
             [(4, 64, "affine"), (8, 32, "affine"), (4, 32, "mxfp4"), (4, 16, "nvfp4"),
              (3, 128, "affine"), (8, 32, "mxfp8")]]
    plan = mixed_plan(table, cycle)
    quantize_as_planned(model, plan)
    bpw = model_bpw(plan, table, 16)["bpw"]
    assert bpw == pytest.approx(compute_bits_per_weight(model), rel=1e-12)


def test_model_bpw_equals_mlx_lm_on_a_quantized_moe():
    args = mixtral.ModelArgs(
        model_type="mixtral", vocab_size=256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
    )
    model = mixtral.Model(args)
    model.set_dtype(mx.float16)
    table = table_from_model(model)
    assert any(layer["kind"] == "switch_linear" for layer in table["layers"])
    cycle = [candidate_dict(Candidate(4, 32)), candidate_dict(Candidate(4, 16, "nvfp4"))]
    plan = mixed_plan(table, cycle)
    quantize_as_planned(model, plan)
    stats = model_bpw(plan, table, 16)
    assert stats["bpw"] == pytest.approx(compute_bits_per_weight(model), rel=1e-12)
    assert stats["weight_bytes"] == sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def test_smollm2_accounting():
    table = smollm2_table()
    assert total_params(table) == SMOLLM2_PARAMS
    quantized = SMOLLM2_PARAMS - SMOLLM2_NORMS
    lo, hi = feasible_bpw_range(table, (), 16)
    assert lo == pytest.approx((4.5 * quantized + 16 * SMOLLM2_NORMS) / SMOLLM2_PARAMS)
    assert hi == pytest.approx((8.5 * quantized + 16 * SMOLLM2_NORMS) / SMOLLM2_PARAMS)
    assert 4.5 < lo < 4.504  # the norms at bf16 cost 0.003 bpw: 4.5 itself is out of reach

    plan = {"layers": {layer["path"]: AFFINE_4_8[0] for layer in table["layers"]}}
    stats = model_bpw(plan, table, 16)
    assert stats["bpw"] == pytest.approx(lo)
    assert stats["quantized_bpw"] == 4.5
    assert stats["quantized_params"] == quantized
    assert stats["weight_bytes"] * 8 == bits_range(table, (), 16)[0]
    assert stats["candidates"] == {
        "affine-b4-g64": {"layers": 211, "params": quantized, "bits": int(4.5 * quantized)}
    }
    assert budget_bits(table, lo) == bits_range(table, (), 16)[0]


def test_protect_rules_and_applicability():
    cands = AFFINE_4_8 + [candidate_dict(Candidate(4, 128))]
    table = smollm2_table(cands)
    down = next(layer for layer in table["layers"] if layer["path"].endswith("down_proj"))
    assert "affine-b4-g128" in down["kl"]  # in-dim 1536 = 12 x 128
    assert "affine-b4-g128" not in table["layers"][0]["kl"]  # in-dim 576

    rules = [ProtectRule("model.embed_tokens", 6, 64), ProtectRule("*.layers.0.*", 8, 64)]
    choices = {
        layer["path"]: (cands, protected) for layer, cands, protected in layer_choices(table, rules)
    }
    assert choices["model.embed_tokens"] == ([candidate_dict(Candidate(6, 64))], True)
    assert choices["model.layers.0.mlp.up_proj"] == ([AFFINE_4_8[1]], True)
    assert [c["name"] for c in choices["model.layers.1.mlp.down_proj"][0]] == [
        "affine-b4-g64", "affine-b8-g64", "affine-b4-g128"
    ]
    lo, hi = feasible_bpw_range(table, rules, 16)
    assert lo > feasible_bpw_range(table, (), 16)[0] and hi < 8.6

    with pytest.raises(ValueError, match="does not apply to model.layers.0.self_attn.q_proj"):
        layer_choices(table, [ProtectRule("*q_proj", 4, 128)])
    with pytest.raises(ValueError, match="match no layer"):
        layer_choices(table, [ProtectRule("lm_head", 8, 64)])


def test_inconsistent_total_params_is_an_error():
    table = {**smollm2_table(), "total_params": SMOLLM2_PARAMS + 1}
    with pytest.raises(ValueError, match="total_params"):
        feasible_bpw_range(table)
