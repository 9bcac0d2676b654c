"""awq-scale (mixq/scale.py): mlx-lm's AWQ scales folded into an equivalent float model."""

from __future__ import annotations

import json
from pathlib import Path

import mixq  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import save_tiny_llama, tiny_gemma3, tiny_llama, tiny_moe, tiny_qwen3
from mixq.config import Candidate, ScaleConfig
from mixq.layers import quantizable_layers
from mixq.kl import reference_logits, token_kl
from mixq.quantize import fake_quantize
from mixq.scale import SCALE_REPORT, scale_model, write_scaled_model

FAST = ScaleConfig(bits=4, n_grid=10)


def outlier_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give a random model's norms per-channel gains (as trained models have: outlier input
    channels), so activation-aware scaling has something to find."""
    rng = np.random.default_rng(seed)
    for path, module in model.named_modules():
        if isinstance(module, nn.RMSNorm) or type(module).__name__ == "RMSNorm":
            gains = np.exp(rng.normal(0, 1.0, module.weight.shape)).astype(np.float32)
            module.weight = mx.array(gains)
    mx.eval(model.parameters())
    return model


def tokens(vocab: int, n: int = 4, t: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (n, t)).astype(np.int32)


def logits(model, x: np.ndarray) -> np.ndarray:
    return np.array(model(mx.array(x)).astype(mx.float32))


def fake_quantized(model, bits: int = 4):
    """The model with every quantizable layer quantize->dequantized in place."""
    for layer in quantizable_layers(model):
        module = model
        for part in layer.path.split("."):
            module = module[int(part)] if isinstance(module, list) else module[part]
        module.weight = fake_quantize(module.weight, Candidate(bits, 64), "bfloat16")
    return model


def mean_kl(ref: np.ndarray, z: np.ndarray) -> float:
    ref_rows = reference_logits(mx.array(ref.reshape(-1, ref.shape[-1])))
    return float(np.array(token_kl(ref_rows, mx.array(z.reshape(-1, z.shape[-1])))).mean())


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen3, tiny_gemma3],
                         ids=["llama", "qwen3", "gemma3_text"])
def test_scaled_model_computes_the_same_function(make):
    model = outlier_norms(make(vocab_size=256))
    model_type = model.args.model_type
    calib, held = tokens(256), tokens(256, seed=1)
    before = logits(model, held)
    original = dict(tree_flatten(model.parameters()))
    report = scale_model(model, model_type, calib, FAST, "bfloat16")
    assert report["scaled"] and len(report["blocks"]) == len(model.layers)
    after = logits(model, held)
    changed = [k for k, v in tree_flatten(model.parameters())
               if not np.array_equal(np.array(v), np.array(original[k]))]
    assert changed, "the search found nothing to scale (test model too easy)"
    assert not any("input_feat" in k for k, _ in tree_flatten(model.parameters()))
    assert set(dict(tree_flatten(model.parameters()))) == set(original)
    np.testing.assert_allclose(after, before, rtol=1e-3, atol=1e-3 * np.abs(before).max())
    assert mean_kl(before, after) < 1e-6


def test_scaling_lowers_quantized_kl_on_tiny_llama():
    model = outlier_norms(tiny_llama(vocab_size=256, layers=2))
    calib, held = tokens(256, n=8), tokens(256, n=4, seed=1)
    ref = logits(model, held)
    original = dict(tree_flatten(model.parameters()))
    plain = mean_kl(ref, logits(fake_quantized(model), held))
    model.load_weights(list(original.items()))
    scale_model(model, "llama", calib, FAST, "bfloat16")
    scaled = mean_kl(ref, logits(fake_quantized(model), held))
    assert scaled < plain


def test_clipping_changes_weights_but_not_much(tmp_path: Path):
    model = outlier_norms(tiny_llama(vocab_size=256))
    calib, held = tokens(256), tokens(256, seed=1)
    before = logits(model, held)
    report = scale_model(model, "llama", calib, ScaleConfig(n_grid=10, clip=True), "bfloat16")
    assert report["clip"]
    kl = mean_kl(before, logits(model, held))
    assert 0 < kl < 0.05  # clipped weights: not equivalent, close


def write_tiny(model, out: Path) -> Path:
    out = save_tiny_llama(model, out)
    (out / "tokenizer.json").write_text("{}")  # stands in for the side files
    return out


@pytest.mark.parametrize("case", ["unsupported", "disabled"])
def test_pass_through(tmp_path: Path, case: str, caplog):
    if case == "unsupported":  # qwen3_moe: no AWQ config in mlx-lm
        src, cfg = write_tiny(tiny_moe(), tmp_path / "src"), FAST
    else:
        src, cfg = write_tiny(tiny_llama(vocab_size=256), tmp_path / "src"), ScaleConfig(enabled=False)
    calib = tokens(256)
    with caplog.at_level("INFO", logger="mixq"):
        report = write_scaled_model(src, tmp_path / "out", calib, cfg, "bfloat16")
    assert report["scaled"] is False
    assert "unchanged" in caplog.text
    assert ("qwen3_moe" in report["reason"]) == (case == "unsupported")
    files = {f.name for f in src.iterdir()}
    assert {f.name for f in (tmp_path / "out").iterdir()} == files | {SCALE_REPORT}
    for name in files:
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()


def test_write_scaled_model_round_trips(tmp_path: Path):
    import mlx_lm.utils

    model = outlier_norms(tiny_llama(vocab_size=256))
    src = write_tiny(model, tmp_path / "src")
    report = write_scaled_model(src, tmp_path / "out", tokens(256), FAST, "bfloat16")
    assert report["scaled"] and json.loads((tmp_path / "out" / SCALE_REPORT).read_text())["scaled"]
    assert (tmp_path / "out" / "tokenizer.json").exists()
    scaled, _ = mlx_lm.utils.load_model(tmp_path / "out")
    original, _ = mlx_lm.utils.load_model(src)
    held = tokens(256, seed=3)
    a, b = logits(original, held), logits(scaled, held)
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * np.abs(a).max())
    assert any(not np.array_equal(np.array(v), np.array(dict(tree_flatten(original.parameters()))[k]))
               for k, v in tree_flatten(scaled.parameters()))


def test_smollm2_first_blocks_scaled_quant_kl_lower(smollm2_dir: Path):
    """SmolLM2 cut to its first 4 blocks (a valid smaller network): on held-out-like text the
    scaled model's float logits equal the original's, and its 4-bit quant has lower KL."""
    from mlx_lm.utils import load_model

    from mixq.calibration import build_calibration
    from mixq.config import CalibrationConfig
    from mlx_lm.utils import load_tokenizer

    model, _ = load_model(smollm2_dir)
    model.model.layers = model.model.layers[:4]
    tok = load_tokenizer(smollm2_dir)
    cal = build_calibration(tok, CalibrationConfig(seq_len=128), 2048)
    calib, held = cal.split("calibration")[0][:6], cal.split("heldout")[0]
    ref = logits(model, held)
    original = dict(tree_flatten(model.parameters()))
    plain = mean_kl(ref, logits(fake_quantized(model), held))
    model.load_weights(list(original.items()))
    scale_model(model, "llama", calib, ScaleConfig(n_grid=10), "bfloat16")
    scaled_float = logits(model, held)
    assert mean_kl(ref, scaled_float) < 1e-5
    scaled = mean_kl(ref, logits(fake_quantized(model), held))
    assert scaled < 0.9 * plain, (scaled, plain)
