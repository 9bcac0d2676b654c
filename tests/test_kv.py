"""kv-sensitivity and its runtime: per-token KV caches are found from the model's own cache
objects (a hybrid's linear-attention layers skipped), the replayed chunked measurement equals a
plain chunked forward through real QuantizedKVCaches, bits are counted as QuantizedKVCache
stores them, and the config round-trips into the runtime's caches and `mixq generate`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mixq  # noqa: F401
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from conftest import tiny_gemma3, tiny_qwen35_hybrid
from mlx_lm.models.cache import ArraysCache, QuantizedKVCache, make_prompt_cache

from mixq.budget import candidate_dict, layer_bits
from mixq.config import Candidate, KVConfig
from mixq.io import read_json, write_json
from mixq.kv import (
    KVLayer, kv_cache_error, kv_config, kv_layers, kv_plan, kv_sequences, kv_table, measure_kv,
    prefill_chunks, replay_is_exact, skip_reason, usable_candidates,
)
from mixq.kl import reference_logits, token_kl
from mixq.measure import build_reference
from mixq.runtime import cache_for, find_kv_config, make_kv_cache

G32 = [candidate_dict(Candidate(b, 32)) for b in (2, 4, 8)]
G64 = [candidate_dict(Candidate(b, 64)) for b in (2, 4, 8)]


def plain_chunked_kl(model, sequences, chunk_tokens, quantized) -> np.ndarray:
    """Per-token KL of a plain chunked forward with ``quantized`` caches vs one with the model's
    own caches: no replay, no recorded reference, nothing shared with mixq.kv's loop."""
    ref_cache, q_cache = make_prompt_cache(model), make_kv_cache(model, quantized)
    kls = []
    for chunk in prefill_chunks(sequences, chunk_tokens):
        kl = token_kl(reference_logits(model(chunk, cache=ref_cache)), model(chunk, cache=q_cache))
        kls.append(np.array(kl).reshape(-1))
    return np.concatenate(kls)


def random_tokens(vocab: int, batch: int, length: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (batch, length)).astype(np.int32)


@pytest.fixture(scope="module")
def hybrid():
    """The tiny Qwen3.5-style hybrid with full-attention head_dim 32 (so group 32 applies)."""
    return tiny_qwen35_hybrid(head_dim=32)


def test_hybrid_skips_linear_attention_and_config_round_trips(hybrid, tmp_path):
    model = hybrid
    layers, skipped, dtype = kv_layers(model)
    assert [layer.index for layer in layers] == [1, 3]  # every 2nd block is full attention
    assert all(not model.layers[layer.index].is_linear for layer in layers)
    assert set(skipped) == {"0", "2"}
    assert {s["cache"] for s in skipped.values()} == {"ArraysCache"}
    assert all("no per-token KV cache" in s["reason"] for s in skipped.values())
    assert layers[0] == KVLayer(1, heads=2, key_dim=32, value_dim=32) and dtype == "float32"

    tokens = random_tokens(256, 2, 48)
    ref = build_reference(model, prefill_chunks(tokens, 16), tmp_path, make_prompt_cache(model))
    assert replay_is_exact(model, ref, [1, 3])  # so blocks before the measured one are replayed
    rows = measure_kv(model, tokens, layers, G32, 16, tmp_path / "journal")
    for layer in layers:  # replayed blocks (incl. linear-attention ones) change nothing
        for c in G32:
            plain = plain_chunked_kl(model, tokens, 16, {layer.index: c})
            assert rows[(str(layer.index), c["name"])]["mean"] == pytest.approx(
                float(plain.mean()), rel=1e-4, abs=1e-9)

    table = kv_table(layers, rows, G32, skipped, dtype, tokens.size, {})
    kv = KVConfig(candidates=[Candidate(b, 32) for b in (2, 4, 8)], target_bits=5.0)
    config = kv_config(table, kv_plan(table, kv), Path("model"))
    assert config["skipped"] == skipped and set(config["layers"]) == {"1", "3"}
    assert config["summary"]["bits"] <= 5.0
    write_json(tmp_path / "kv_config.json", config)
    loaded = read_json(tmp_path / "kv_config.json")
    cache = cache_for(model, loaded)
    for i, c in enumerate(cache):
        if str(i) in skipped:
            assert type(c) is ArraysCache
        else:
            assert type(c) is QuantizedKVCache
            assert (c.bits, c.group_size) == (loaded["layers"][str(i)]["bits"], 32)
    model(mx.array(tokens[:, :8]), cache=cache)  # the model runs through them
    assert cache[1].offset == 8 and cache[0][0] is not None

    with pytest.raises(ValueError, match="ArraysCache, not a per-token KVCache"):
        make_kv_cache(model, {"0": G32[0]})
    with pytest.raises(ValueError, match="30 caches, this one has 4"):
        cache_for(model, {**loaded, "caches": 30})


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
@pytest.mark.parametrize("c", G32[:2] + G64)
def test_bits_counted_as_quantized_kv_cache_stores_them(dtype, c):
    """nbytes of a QuantizedKVCache holding 256 tokens (one allocation step, no padding) equal
    the table's layer_bits for that layer: packed keys and values, scales and biases."""
    layer = KVLayer(0, heads=3, key_dim=64, value_dim=64)
    cache = QuantizedKVCache(group_size=c["group_size"], bits=c["bits"])
    kv = mx.random.normal((1, layer.heads, 256, 64)).astype(dtype)
    cache.update_and_fetch(kv, kv)
    dtype_bits = 16 if dtype == mx.bfloat16 else 32
    assert cache.nbytes * 8 == 256 * layer_bits(layer.shape, c, dtype_bits)


def test_sequences_join_windows_spread_over_the_set():
    windows = np.arange(12 * 4, dtype=np.int32).reshape(12, 4)
    seqs = kv_sequences(windows, 10, 2)  # 3 windows each, the last cut to 2 tokens
    assert seqs.shape == (2, 10)
    starts = seqs[:, ::4] // 4  # window index of each window in each sequence
    assert starts.tolist() == [[0, 4, 9], [2, 7, 11]]  # spread from first to last, dealt out
    assert (np.diff(seqs.reshape(2, -1)[:, :4], axis=1) == 1).all()  # windows kept whole
    with pytest.raises(ValueError, match="needs 15 calibration windows"):
        kv_sequences(windows, 12, 5)


@pytest.fixture(scope="module")
def smollm2_kv(smollm2, tmp_path_factory):
    """SmolLM2 with its KV caches measured on a short text (first, middle, last layer)."""
    model, tokenizer = smollm2
    text = "The quick brown fox jumps over the lazy dog, then rests by the river. " * 8
    tokens = np.array(tokenizer.encode(text)[:96], dtype=np.int32).reshape(1, 96)
    layers, skipped, dtype = kv_layers(model)
    picked = [layer for layer in layers if layer.index in (0, 15, 29)]
    rows = measure_kv(model, tokens, picked, G64, 32, tmp_path_factory.mktemp("kv") / "journal")
    return model, tokenizer, tokens, layers, skipped, rows, dtype


def test_smollm2_more_bits_less_kl_and_exact(smollm2_kv):
    model, _, tokens, layers, skipped, rows, _ = smollm2_kv
    assert len(layers) == 30 and not skipped  # every Llama layer has a KV cache
    assert layers[0] == KVLayer(0, heads=3, key_dim=64, value_dim=64)
    for index in ("0", "15", "29"):
        kl = [rows[(index, c["name"])]["mean"] for c in G64]
        assert kl[0] > kl[1] > kl[2] > 0, (index, kl)
    plain = plain_chunked_kl(model, tokens, 32, {15: G64[1]})
    assert rows[("15", G64[1]["name"])]["mean"] == pytest.approx(float(plain.mean()), rel=1e-4)
    assert rows[("15", G64[1]["name"])]["max"] == pytest.approx(float(plain.max()), rel=1e-4)


def test_config_loads_in_runtime_and_generates(smollm2_dir, smollm2_kv, tmp_path):
    model, tokenizer, tokens, layers, skipped, rows, dtype = smollm2_kv
    full = {(str(layer.index), c["name"]): rows.get((str(layer.index), c["name"]),
                                                     rows[("15", c["name"])])
            for layer in layers for c in G64}  # unmeasured layers: reuse layer 15's rows
    table = kv_table(layers, full, G64, skipped, dtype, tokens.size, {})
    kv = KVConfig(candidates=[Candidate(b, 64) for b in (2, 4, 8)], target_bits=6.0)
    config = kv_config(table, kv_plan(table, kv), smollm2_dir)
    assert {e["bits"] for e in config["layers"].values()} <= {2, 4, 8}
    assert config["summary"]["bits"] <= 6.0  # float32 model: 4-bit g64 costs 5 bits
    assert config["summary"]["unquantized_bytes_per_token"] == 30 * 3 * 128 * 4  # float32

    cache = cache_for(model, config)
    text = mlx_lm.generate(model, tokenizer, "Name a colour.", max_tokens=4, prompt_cache=cache)
    assert text.strip()
    assert all(type(c) is QuantizedKVCache and c.offset > 0 for c in cache)
    assert [c.bits for c in cache] == [config["layers"][str(i)]["bits"] for i in range(30)]

    write_json(tmp_path / "kv_config.json", config)
    proc = subprocess.run(
        [sys.executable, "-m", "mixq", "generate", str(smollm2_dir), "What is 2 + 2?",
         "--max-tokens", "8", "--kv-config", str(tmp_path / "kv_config.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "kv_config.json" in proc.stderr


def test_kv_config_found_beside_the_model_or_in_outputs_kv(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_dir, other = tmp_path / "quant", tmp_path / "other"
    model_dir.mkdir(), other.mkdir()
    assert find_kv_config(model_dir) is None
    write_json(tmp_path / "outputs" / "kv" / "kv_config.json", {"model": "quant"})
    assert find_kv_config(model_dir) == Path("outputs/kv/kv_config.json")
    assert find_kv_config(other) is None  # measured for another model
    write_json(model_dir / "kv_config.json", {"model": "quant"})
    assert find_kv_config(model_dir) == model_dir / "kv_config.json"


def test_quantized_kv_cache_fails_where_mlx_lm_packs_too_few_words():
    """mlx-lm 0.32.2's QuantizedKVCache, tried at every bit width and the common head dims:
    the failures are exactly where head_dim // (32 // bits) != head_dim * bits / 32, and the
    default candidates work at all of them."""
    failing = {(d, b) for d in (64, 128, 256) for b in (2, 3, 4, 5, 6, 8)
               if kv_cache_error(candidate_dict(Candidate(b, 64)), d)}
    assert failing == {(128, 5), (128, 6), (256, 3), (256, 5), (256, 6)}
    assert failing == {(d, b) for d in (64, 128, 256) for b in (2, 3, 4, 5, 6, 8)
                       if d // (32 // b) != d * b // 32}
    defaults = {(d, c.bits) for d in (64, 128, 256) for c in KVConfig().candidates}
    assert defaults & failing == {(256, 3)}  # dropped there; 2/4/8 remain: 2.5 to 8.5 bits


def test_gemma_shaped_model_counts_sliding_windows_and_drops_what_fails(tmp_path, caplog):
    model = tiny_gemma3(vocab_size=256)
    layers, skipped, dtype = kv_layers(model)
    assert [layer.index for layer in layers] == [2, 5] and layers[0].key_dim == 256
    assert sorted(skipped) == ["0", "1", "3", "4"]
    assert skipped["0"] == {"cache": "RotatingKVCache", "heads": 1, "head_dims": [256, 256],
                            "window": 64, "reason": skip_reason(make_prompt_cache(model)[0])}
    with caplog.at_level("WARNING", logger="mixq"):
        kept, dropped = usable_candidates(
            [candidate_dict(Candidate(b, 64)) for b in (3, 4, 6)], layers)
    assert [c["bits"] for c in kept] == [4] and sorted(dropped) == ["affine-b3-g64",
                                                                    "affine-b6-g64"]
    assert "head_dim 256" in dropped["affine-b3-g64"]
    assert "dropped ['affine-b3-g64', 'affine-b6-g64']" in caplog.text

    tokens = random_tokens(256, 1, 160)  # longer than the 64-token windows, and the chunks
    ref = build_reference(model, prefill_chunks(tokens, 96), tmp_path, make_prompt_cache(model))
    assert replay_is_exact(model, ref, [5])  # only global layers after it: still exact
    assert not replay_is_exact(model, ref, [2, 5])  # sliding layers after 2 read cache 0
    rows = measure_kv(model, tokens, layers, G64, 96, tmp_path / "journal")
    plain = plain_chunked_kl(model, tokens, 96, {5: G64[0]})
    assert rows[("5", G64[0]["name"])]["mean"] == pytest.approx(float(plain.mean()), rel=1e-4)
    table = kv_table(layers, rows, G64, skipped, dtype, tokens.size, dropped)
    config = kv_config(table, kv_plan(table, KVConfig(target_bits=9.0)), Path("model"))
    sliding = 4 * 2 * 256 * 4  # 4 caches, keys + values of 256, float32
    assert config["summary"]["sliding_window_bytes_per_token"] == sliding
    assert config["summary"]["unquantized_bytes_per_token"] == 2 * 2 * 256 * 4 + sliding
    assert config["dropped_candidates"] == dropped
