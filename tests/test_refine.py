"""refine: mlx-lm's DWQ of a mixed checkpoint's scales and biases writes back convert's
checkpoint with only those changed (same files, names, shapes, dtypes, bytes; packed weights bit
for bit), stock mlx-lm loads it, its held-out KL is not worse; steps=0 is a copy; the dense CPU
substitute computes what the quantized layers compute."""

from __future__ import annotations

from pathlib import Path

import mixq  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_tokenizer

from conftest import tiny_llama
from mixq.calibration import build_calibration, write_calibration
from mixq.config import CalibrationConfig, RefineConfig
from mixq.convert import CheckpointMismatchError
from mixq.refine import (
    DenseQuantized, compare_checkpoints, copy_checkpoint, refine_checkpoint, substitute_dense,
)
from test_eval import mixed_quant


def mixed_tiny(seed: int = 0) -> nn.Module:
    """A tiny random Llama (tied embeddings) quantized per layer at 3, 4, 6 and 8 bits (g32,
    g64), scales and biases in float32."""
    model = tiny_llama(vocab_size=512, seed=seed)
    bits = iter([3, 4, 6, 8] * 10)
    nn.quantize(model, class_predicate=lambda p, m: hasattr(m, "to_quantized") and {
        "bits": next(bits), "group_size": 32 if "mlp" in p else 64, "mode": "affine"})
    model.set_dtype(mx.float32)
    return model


def test_dense_substitute_computes_the_quantized_layers():
    model, dense = mixed_tiny(), mixed_tiny()
    assert substitute_dense(dense) == 15  # 2 x 7 linears + the tied embedding
    x = mx.random.randint(0, 512, (2, 24))
    assert mx.allclose(dense(x), model(x), atol=1e-4, rtol=1e-4).item()
    same = lambda m: [(k, v.shape, v.dtype) for k, v in tree_flatten(m.parameters())]
    assert same(dense) == same(model)  # checkpoint names, shapes, dtypes
    # what dwq's `unfreeze` looks for: affine modules with bits < 8 train scales and biases only
    dense.freeze()  # as load_student does (norms stay as converted)
    trainable = {k for k, _ in tree_flatten(dense.trainable_parameters())}
    assert not trainable
    dense.apply_to_modules(lambda _, m: m.unfreeze(keys=["scales", "biases"], recurse=False)
                           if isinstance(m, DenseQuantized) and m.bits < 8 else None)
    trainable = {k for k, _ in tree_flatten(dense.trainable_parameters())}
    assert trainable and all(k.endswith((".scales", ".biases")) for k in trainable)


def test_dense_substitute_gradients_equal_dequantized_ones():
    dense = mixed_tiny()
    substitute_dense(dense)
    layer = dense.model.layers[0].self_attn.q_proj
    x = mx.random.normal((3, 64))

    def loss(scales, biases):
        layer.scales, layer.biases = scales, biases
        return (layer(x) ** 2).sum()

    def loss_dequantized(scales, biases):
        w = mx.dequantize(layer.weight, scales, biases, layer.group_size, layer.bits)
        return ((x @ w.T) ** 2).sum()

    args = (layer.scales, layer.biases)
    for a, b in zip(mx.grad(loss, (0, 1))(*args), mx.grad(loss_dequantized, (0, 1))(*args)):
        assert mx.allclose(a, b, rtol=1e-3, atol=1e-3).item()


@pytest.fixture(scope="module")
def smollm2_inputs(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``(quant, calibration)``: a mixed SmolLM2 checkpoint (8-bit attention, 4-bit g64
    elsewhere) and a calibration set of 64-token windows (8 refine windows per domain in two
    domains, 2 held-out ones, 1 per other source)."""
    root = tmp_path_factory.mktemp("refine")
    quant = mixed_quant(smollm2_dir, root / "quant")
    cfg = CalibrationConfig(domains=["prose", "reasoning"], samples_per_domain=1,
                            refine_per_domain=8, heldout_per_domain=2,
                            heldout_other_per_source=1, seq_len=64)
    write_calibration(build_calibration(load_tokenizer(smollm2_dir), cfg, 2048),
                      root / "calibration", "smollm2", cfg)
    return quant, root / "calibration"


@pytest.fixture(scope="module")
def refined(smollm2_dir: Path, smollm2_inputs, tmp_path_factory: pytest.TempPathFactory):
    quant, calibration = smollm2_inputs
    out = tmp_path_factory.mktemp("refined") / "refined"
    out.mkdir()
    cfg = RefineConfig(steps=6, batch_size=2, learning_rate=1e-5, valid_windows=4)
    return out, refine_checkpoint(quant, smollm2_dir, calibration, out, cfg)


def test_refined_checkpoint_is_convert_s_with_only_scales_and_biases_changed(
        smollm2_inputs, refined):
    quant, _ = smollm2_inputs
    out, report = refined
    assert report["shipped"] == "refined", report
    check = compare_checkpoints(quant, out)  # raises on any other difference
    assert check["changed_tensors"] == report["changed_tensors"] > 0
    assert (out / "config.json").read_bytes() == (quant / "config.json").read_bytes()
    old, new = mx.load(str(quant / "model.safetensors")), mx.load(str(out / "model.safetensors"))
    changed = {k for k in old if not mx.array_equal(old[k], new[k]).item()}
    assert changed and all(k.endswith((".scales", ".biases")) for k in changed)
    # 8-bit layers (attention) are not trained by dwq; 4-bit ones are
    assert not any("self_attn" in k for k in changed)
    assert all(new[k].dtype == mx.bfloat16 for k in changed)


def test_stock_mlx_lm_loads_it_and_held_out_kl_is_not_worse(refined):
    out, report = refined
    model, tokenizer = mlx_lm.load(str(out))
    assert mlx_lm.generate(model, tokenizer, "The capital of France is", max_tokens=4)
    for split in ("validation", "heldout", "heldout_other"):
        kl = report["kl"][split]
        assert kl["after"]["kl_mean"] <= kl["before"]["kl_mean"], (split, kl)
    assert report["seconds"]["per_step"] > 0 and report["train_windows"] == 12


def test_steps_zero_writes_the_convert_checkpoint_unchanged(smollm2_dir, smollm2_inputs,
                                                            tmp_path):
    quant, calibration = smollm2_inputs
    report = refine_checkpoint(quant, smollm2_dir, calibration, tmp_path, RefineConfig(steps=0))
    assert report["shipped"] == "unrefined"
    files = sorted(p.relative_to(quant) for p in quant.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert all((quant / f).read_bytes() == (tmp_path / f).read_bytes() for f in files)


def test_a_changed_packed_weight_or_dtype_fails_loudly(smollm2_inputs, tmp_path):
    quant, _ = smollm2_inputs
    for tamper, match in [
        (lambda w: w.update({"model.norm.weight": w["model.norm.weight"] + 1}), "changed"),
        (lambda w: w.update({k: w[k].astype(mx.float32) for k in w if k.endswith("0.mlp.up_proj.scales")}),
         "float32"),
    ]:
        out = tmp_path / match
        copy_checkpoint(quant, out)
        weights = mx.load(str(out / "model.safetensors"))
        tamper(weights)
        mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
        with pytest.raises(CheckpointMismatchError, match=match):
            compare_checkpoints(quant, out)
