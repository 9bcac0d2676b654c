"""measure-kl: the fast exact path equals a naive full forward per (layer, candidate); the
journal resumes a killed run; hybrid and MoE models work; the fisher proxy ranks layers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mixq  # noqa: F401
import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_moe, tiny_qwen35_hybrid

from mixq.budget import candidate_name
from mixq.config import Candidate, MeasureConfig
from mixq.fisher import measure_fisher
from mixq.layers import quantizable_layers
from mixq.layers import get_module
from mixq.kl import reference_logits, token_kl
from mixq.measure import measure_exact
from mixq.quantize import fake_quantize
from mixq.sensitivity import spearman

CANDIDATES = [Candidate(2, 64), Candidate(4, 64), Candidate(8, 64)]


def textbook_kl(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """sum p (log p - log q) in float64: the independent ground truth."""
    a = ref_logits.astype(np.float64)
    b = logits.astype(np.float64)
    la = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
    lb = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
    return (np.exp(la) * (la - lb)).sum(-1).reshape(-1)


def naive_rows(model, tokens, layers, candidates, dtype="bfloat16"):
    """One full forward per (layer, candidate), nothing cached: per-token KL arrays."""
    x = mx.array(tokens)
    ref = np.array(model(x).astype(mx.float32))
    rows = {}
    for layer in layers:
        module = get_module(model, layer.path)
        w = module.weight
        for c in candidates:
            module.weight = fake_quantize(w, c, dtype)
            rows[(layer.path, candidate_name(c))] = np.array(model(x).astype(mx.float32))
            module.weight = w
    return ref, rows


def sample_tokens(vocab: int, n: int, t: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (n, t)).astype(np.int32)


def test_exact_equals_naive_full_forward_on_smollm2(smollm2, tmp_path):
    """Block replay + chunked KL give the numbers of a naive full forward, on the real model:
    embeddings (tied head), first, middle and last blocks; 2/4/8-bit."""
    model, tokenizer = smollm2
    text = "The quick brown fox jumps over the lazy dog. " * 12
    tokens = np.array(tokenizer.encode(text)[:96], dtype=np.int32).reshape(2, 48)
    all_layers = quantizable_layers(model)
    paths = ["model.embed_tokens", "model.layers.0.self_attn.q_proj",
             "model.layers.15.mlp.down_proj", "model.layers.29.self_attn.v_proj"]
    layers = [layer for layer in all_layers if layer.path in paths]
    fast = measure_exact(model, tokens, CANDIDATES, "bfloat16", MeasureConfig(chunk_tokens=48),
                         tmp_path / "journal", layers)
    ref, naive = naive_rows(model, tokens, layers, CANDIDATES)
    ref_side = reference_logits(mx.array(ref))
    for key, logits in naive.items():
        same_formula = np.array(token_kl(ref_side, mx.array(logits)))
        assert fast[key]["mean"] == pytest.approx(float(same_formula.mean()), rel=1e-4), key
        assert fast[key]["max"] == pytest.approx(float(same_formula.max()), rel=1e-4), key
        truth = textbook_kl(ref, logits).mean()
        assert fast[key]["mean"] == pytest.approx(truth, rel=1e-4), (key, truth)
    kl = {k: v["mean"] for k, v in fast.items()}
    for path in paths:  # fewer bits, more KL
        assert kl[(path, "affine-b2-g64")] > kl[(path, "affine-b4-g64")] > kl[(path, "affine-b8-g64")]


@pytest.mark.parametrize("build", [tiny_qwen35_hybrid, tiny_moe], ids=["qwen3.5-hybrid", "moe"])
def test_exact_equals_naive_on_hybrid_and_moe(build, tmp_path):
    """Replay works through linear-attention blocks and mixture-of-experts SwitchLinear layers."""
    model = build()
    layers = quantizable_layers(model)
    tokens = sample_tokens(256, 4, 32)
    cands = [Candidate(4, 64), Candidate(8, 64)]
    fast = measure_exact(model, tokens, cands, "bfloat16", MeasureConfig(chunk_tokens=64),
                         tmp_path, layers)
    ref, naive = naive_rows(model, tokens, layers, cands)
    ref_side = reference_logits(mx.array(ref))
    assert len(fast) == len(naive) == 2 * len(layers)
    for key, logits in naive.items():
        expected = float(np.array(token_kl(ref_side, mx.array(logits))).mean())
        assert fast[key]["mean"] == pytest.approx(expected, rel=1e-4, abs=1e-9), key
    if build is tiny_moe:
        assert any(layer.kind == "switch_linear" for layer in layers)


RESUMABLE_RUN = textwrap.dedent(
    """
    import json, logging, sys
    from pathlib import Path
    logging.basicConfig(level=logging.INFO)
    sys.path.insert(0, {tests!r})
    import numpy as np
    import mixq.measure as measure
    from conftest import tiny_llama
    from mixq.config import Candidate, MeasureConfig

    model = tiny_llama(vocab_size=512, layers=3)
    tokens = np.random.default_rng(0).integers(0, 512, (4, 32)).astype(np.int32)
    rows = measure.measure_exact(model, tokens, [Candidate(4, 64), Candidate(8, 64)],
                                 "bfloat16", MeasureConfig(chunk_tokens=64), Path(sys.argv[1]))
    print(json.dumps({{"|".join(k): v for k, v in rows.items()}}))
    """
)


def test_killed_run_resumes_without_redoing_rows(tmp_path):
    """Kill a measure run after some rows; the rerun computes only the missing rows and the
    table equals an uninterrupted run's."""
    script = tmp_path / "run.py"
    script.write_text(RESUMABLE_RUN.format(tests=str(Path(__file__).parent)))
    journal = tmp_path / "journal"
    proc = subprocess.Popen([sys.executable, str(script), str(journal)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rows_file = journal / "rows.jsonl"
    while proc.poll() is None and (
        not rows_file.exists() or len(rows_file.read_text().splitlines()) < 5
    ):
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    done_before = len(rows_file.read_text().splitlines())
    assert 5 <= done_before < 2 * 22, "the run finished before it could be killed"
    with open(rows_file, "a") as fh:
        fh.write('{"path": "cut short')  # a line half-written by the crash
    resumed = subprocess.run([sys.executable, str(script), str(journal)],
                             capture_output=True, text=True, check=True)
    assert f"resuming: {done_before} rows" in resumed.stderr
    fresh = subprocess.run([sys.executable, str(script), str(tmp_path / "fresh")],
                           capture_output=True, text=True, check=True)
    assert json.loads(resumed.stdout) == json.loads(fresh.stdout)


def test_fisher_ranks_layers_like_exact(smollm2, tmp_path):
    """The fisher proxy's KL predictions rank (layer, candidate) rows like the exact KLs."""
    model, tokenizer = smollm2
    text = "def add(a, b):\n    return a + b\n\nThe capital of France is Paris. " * 8
    tokens = np.array(tokenizer.encode(text)[:128], dtype=np.int32).reshape(2, 64)
    layers = [layer for layer in quantizable_layers(model)
              if layer.block in (0, 10, 20, 29) and "mlp" in layer.path]
    cands = [Candidate(4, 64), Candidate(8, 64)]
    exact = measure_exact(model, tokens, cands, "bfloat16", MeasureConfig(chunk_tokens=128),
                          tmp_path, layers)
    fisher = measure_fisher(model, tokens, layers, cands, "bfloat16")
    keys = sorted(exact)
    rho = spearman(np.array([exact[k]["mean"] for k in keys]),
                   np.array([fisher[k]["mean"] for k in keys]))
    assert rho > 0.8
    assert all(fisher[k]["p95"] is None for k in keys)


def test_quantized_reference_measures_one_float_layer_at_a_time(tiny_llama_dir, tmp_path):
    """measure.reference=q8: every other layer stays 8-bit while one is measured; equals a
    naive model built that way, and the float weights are not kept in memory."""
    import mlx.nn as nn
    from mlx_lm.utils import load_model

    from mixq.reference import FloatWeights, quantize_reference

    model, _ = load_model(tiny_llama_dir, lazy=True)
    layers = quantizable_layers(model)
    floats = quantize_reference(model, layers, 8)
    assert all(m.weight.size == 1 for m in floats.values())  # float copies dropped
    tokens = sample_tokens(49152, 2, 32)
    cands = [Candidate(4, 64)]
    fast = measure_exact(model, tokens, cands, "bfloat16", MeasureConfig(chunk_tokens=64),
                         tmp_path, layers, floats, FloatWeights(tiny_llama_dir))
    reference, _ = load_model(tiny_llama_dir)
    nn.quantize(reference, 64, 8)
    ref_side = reference_logits(reference(mx.array(tokens)))
    for layer in layers[:4]:
        naive, _ = load_model(tiny_llama_dir)
        module = get_module(naive, layer.path)
        module.weight = fake_quantize(module.weight, cands[0], "bfloat16")
        nn.quantize(naive, 64, 8, class_predicate=lambda p, m: p != layer.path
                    and hasattr(m, "to_quantized"))
        expected = float(np.array(token_kl(ref_side, naive(mx.array(tokens)))).mean())
        assert fast[(layer.path, "affine-b4-g64")]["mean"] == pytest.approx(expected, rel=1e-4)
