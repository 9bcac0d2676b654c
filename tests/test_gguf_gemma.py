"""GGUF -> MLX conversion of the embedded Gemma-3-270M (Q8_0/Q5_0/Q4_K/Q6_K tensors), checked by
its behaviour: config as mlx-lm's gemma3_text and llama.cpp run it, perplexity on standard-library
docstrings, the (1 + w) norms and the absent q/k permutation, and token ids from llama.cpp."""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import math
from pathlib import Path

import mixq  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import gemma3_text
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

from mixq.config import ModelConfig
from mixq.gguf import dequantize, read_gguf
from mixq.gguf_gemma import model_config
from mixq.prepare import embedded_gguf, gguf_cache, prepare_model, sha256_file

MODEL_ID = "gemma3-270m"
# the standard library's own prose, the first MAX_TOKENS tokens of each docstring (7-31 is where
# the first conversion landed; alone they measured 6.0 json, 10.2 argparse, 20.2
# inspect, 31.4 collections); each conversion mistake below must cost a factor of 4 over 31
DOCSTRINGS = [inspect.getdoc(m) for m in (json, argparse, inspect, collections)]
MAX_TOKENS = 512  # logits of 512 tokens x 262k words: 0.5 GB in float32
PERPLEXITY = (7.0, 31.0)

# (text, ids) from llama.cpp itself: `llama-tokenize -m gemma-3-270m-q4_k_m.gguf -f text.txt
# --ids --no-escape` (llama.cpp vendored in llama-cpp-python 0.3.36, built from its sdist), special
# tokens parsed (its default), BOS added as the GGUF says
LLAMA_CPP_IDS = [
    ('12345',
     [2, 236770, 236778, 236800, 236812, 236810]),
    ('In 2024, 1,000,000 people paid $3.50 each.',
     [2, 902, 236743, 236778, 236771, 236778, 236812, 236764, 236743, 236770, 236764, 236771,
      236771, 236771, 236764, 236771, 236771, 236771, 1331, 6382, 609, 236800, 236761,
      236810, 236771, 1546, 236761]),
    ('a  b\t\tc\n\n d   ',
     [2, 236746, 138, 236763, 255969, 236755, 108, 513, 139]),
    ('   leading and trailing   ',
     [2, 139, 26016, 532, 45330, 139]),
    ('line1\r\nline2\n\n\n\tindented',
     [2, 1257, 236770, 251, 107, 1257, 236778, 109, 255968, 724, 16764]),
    ('naïve café 日本語 🙂',
     [2, 1789, 238527, 560, 33443, 33375, 238582, 57235]),
    ('Ünïcödé — “quotes” and ‘apostrophes’ … ©®™ 🇫🇷👩\u200d💻',
     [2, 238194, 236749, 238527, 236755, 55515, 236859, 2192, 999, 52231, 236919, 532, 2141,
      223720, 135453, 236858, 7881, 17761, 238216, 238590, 236743, 246598, 242644,
      243767, 237243, 244862]),
    ('def f(x):\n    return x**2  # square\n',
     [2, 2063, 517, 236769, 236781, 1473, 107, 140, 2060, 1123, 1018, 236778, 138, 236865,
      6281, 107]),
    ('if (a != b && c >= 0) { printf("%d\\n", a); }',
     [2, 584, 568, 236746, 2843, 518, 2732, 505, 6867, 236743, 236771, 236768, 642, 9006,
      13233, 236753, 236785, 236749, 827, 496, 626, 682]),
    ("I'm sure they'll say we've done it, don't you think?",
     [2, 236777, 236789, 236757, 2889, 901, 236789, 859, 1879, 692, 236789, 560, 3028, 625,
      236764, 1537, 236789, 236745, 611, 1751, 236881]),
    ('<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n',
     [2, 105, 2364, 107, 3689, 563, 236743, 236778, 236862, 236778, 236881, 106, 107, 105,
      4368, 107]),
    ('HTTPServer getURLForID snake_case_name CamelCase',
     [2, 65941, 43471, 974, 6738, 2542, 1735, 22825, 236779, 4925, 236779, 1201, 100711, 9818]),
    ('<table><tr><td>x</td></tr></table> <b>bold</b>',
     [2, 168, 173, 175, 236781, 183, 181, 176, 236743, 200, 15640, 209]),
    ('bell \x07 and delete \x7f bytes',
     [2, 11761, 236743, 245, 532, 9311, 236743, 251541, 17234]),
    (' ',
     [2, 236743]),
    ('The quick brown fox jumps over the lazy dog.',
     [2, 818, 3823, 8864, 37423, 38167, 1024, 506, 31770, 4799, 236761]),
]


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_model(ModelConfig(kind="embedded", id=MODEL_ID),
                         tmp_path_factory.mktemp("gemma") / "model")


@pytest.fixture(scope="module")
def gemma(gemma_dir: Path):
    return mlx_lm.load(str(gemma_dir))


@pytest.fixture(scope="module")
def gguf():
    return read_gguf(embedded_gguf(MODEL_ID))


def perplexity(model: nn.Module, tokenizer, texts: list[str]) -> float:
    """exp(mean next-token cross-entropy) over the first MAX_TOKENS tokens of each text."""
    nll, n = 0.0, 0
    for text in texts:
        ids = mx.array(tokenizer.encode(text)[:MAX_TOKENS])[None]
        logits = model(ids[:, :-1]).astype(mx.float32)
        nll += nn.losses.cross_entropy(logits, ids[:, 1:], reduction="sum").item()
        n += ids.shape[1] - 1
    return math.exp(nll / n)


def test_config_is_what_llama_cpp_runs_and_mlx_lm_expects(gemma_dir: Path, gemma):
    config = json.loads((gemma_dir / "config.json").read_text())
    defaults = gemma3_text.ModelArgs(model_type="gemma3_text")  # Gemma 3's own values
    for key in ("head_dim", "rms_norm_eps", "num_key_value_heads", "rope_theta",
                "rope_local_base_freq", "query_pre_attn_scalar", "sliding_window",
                "sliding_window_pattern", "vocab_size", "max_position_embeddings"):
        assert config[key] == getattr(defaults, key), key
    assert {k: config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                   "num_attention_heads", "tie_word_embeddings")} == {
        "hidden_size": 640, "num_hidden_layers": 18, "intermediate_size": 2048,
        "num_attention_heads": 4, "tie_word_embeddings": True}
    model, _ = gemma
    caches = make_prompt_cache(model)
    assert [i for i, c in enumerate(caches) if type(c) is KVCache] == [5, 11, 17]
    assert sum(isinstance(c, RotatingKVCache) and c.max_size == 512 for c in caches) == 15
    weights = mx.load(str(gemma_dir / "model.safetensors"))
    assert "lm_head.weight" not in weights
    assert weights["model.embed_tokens.weight"].shape == (262144, 640)
    assert sum(w.size for w in weights.values()) == 268_098_176


def test_27b_query_scale_and_unsupported_variants_fail_clearly(gguf):
    meta, _ = gguf
    big = meta | {"gemma3.block_count": 62, "gemma3.embedding_length": 5376,
                  "gemma3.attention.head_count": 32}
    assert model_config(big, tie_word_embeddings=True)["query_pre_attn_scalar"] == 168
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        model_config(meta | {"gemma3.final_logit_softcapping": 30.0}, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="untied output head"):
        model_config(meta, tie_word_embeddings=False)


def test_norms_are_llama_cpp_minus_one(gemma_dir: Path, gguf):
    _, tensors = gguf
    stored = {t.name: t for t in tensors}
    weights = mx.load(str(gemma_dir / "model.safetensors"))
    for gguf_name, name in [("blk.3.attn_q_norm.weight", "model.layers.3.self_attn.q_norm"),
                            ("blk.0.post_ffw_norm.weight",
                             "model.layers.0.post_feedforward_layernorm"),
                            ("output_norm.weight", "model.norm")]:
        assert np.array_equal(np.array(weights[f"{name}.weight"]),
                              dequantize(stored[gguf_name]) - np.float32(1))
    assert np.array_equal(np.array(weights["model.layers.0.self_attn.q_proj.weight"]),
                          dequantize(stored["blk.0.attn_q.weight"]))  # no q/k permutation


def test_perplexity_on_standard_library_docstrings(gemma):
    low, high = PERPLEXITY
    assert low < perplexity(*gemma, DOCSTRINGS) < high


@pytest.mark.parametrize("mistake", ["norms-left-at-1+w", "llama-qk-permutation"])
def test_conversion_mistakes_fail_the_perplexity_check(gemma, mistake: str):
    model, tokenizer = gemma
    original = dict(tree_flatten(model.parameters()))
    for layer in model.model.layers:
        attn = layer.self_attn
        if mistake == "norms-left-at-1+w":
            for norm in (layer.input_layernorm, layer.post_attention_layernorm,
                         layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm,
                         attn.q_norm, attn.k_norm):
                norm.weight = norm.weight + 1
        else:
            for proj, heads in ((attn.q_proj, attn.n_heads), (attn.k_proj, attn.n_kv_heads)):
                w = proj.weight
                proj.weight = w.reshape(heads, 2, -1, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
    try:
        assert perplexity(model, tokenizer, DOCSTRINGS) > 4 * PERPLEXITY[1]
    finally:
        model.update(tree_unflatten(list(original.items())))  # the fixture is shared


def test_base_model_continues_a_sentence(gemma):
    model, tokenizer = gemma
    assert tokenizer.chat_template is None  # a base model: the GGUF has no template
    answer = mlx_lm.generate(model, tokenizer, "The capital of France is", max_tokens=8)
    assert "France" in answer or "Paris" in answer


@pytest.mark.parametrize("text,ids", LLAMA_CPP_IDS)
def test_tokenizer_matches_llama_cpp_and_round_trips(gemma, text: str, ids: list[int]):
    _, tokenizer = gemma
    assert tokenizer.encode(text) == ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == text


def test_assembled_gguf_is_cached_and_repaired(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = embedded_gguf(MODEL_ID)
    assert path.parent.parent == gguf_cache() == tmp_path / "mixq" / "gguf"
    expected = path.parent.name
    assert sha256_file(path) == expected and path.name == "gemma-3-270m-q4_k_m.gguf"
    with open(path, "r+b") as f:  # a damaged cached copy is assembled again
        f.write(b"junk")
    assert embedded_gguf(MODEL_ID) == path and sha256_file(path) == expected
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial files left
