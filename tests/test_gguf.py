"""GGUF -> MLX conversion of the embedded SmolLM2-135M-Instruct, checked by its behaviour."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mixq  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import pytest
from transformers import AutoTokenizer

import numpy as np

from mixq.gguf import architecture, read_gguf
from mixq.gguf_llama import build_tokenizer, model_config, unpermute_rope
from mixq.prepare import embedded_gguf

ENGLISH_TEXT = "\n\n".join(
    [
        (
            "The history of the city goes back more than two thousand years. It began as a small "
            "fishing village on the banks of the river, where traders stopped to rest and exchange "
            "goods. Over the centuries it grew into an important market town, and later into one of"
            " the largest ports in the country. Today, visitors can walk through the old streets, "
            "see the cathedral and the castle, and enjoy the many museums, parks and restaurants "
            "that make the city a popular destination."
        ),
        (
            "Most people who live in the city work in services, education or health care. The "
            "university, founded in the fifteenth century, is one of the oldest in Europe and "
            "attracts students from all over the world. Every summer the city hosts a music "
            "festival that fills the main square with concerts, street food and dancing until late "
            "at night."
        ),
        (
            "Getting around is easy. A network of buses and trams connects the centre with the "
            "suburbs, and many residents prefer to cycle along the river paths. The main railway "
            "station has fast trains to the capital, which take a little under two hours, and the "
            "airport offers flights to dozens of destinations."
        ),
        (
            "The climate is mild for most of the year. Winters are cool and wet, with occasional "
            "snow in January, while summers are warm and sunny. Spring and autumn are often the "
            "best seasons to visit, when the parks are full of flowers or golden leaves and the "
            "streets are less crowded."
        ),
        (
            "Local food is simple but delicious. Fresh fish from the coast, bread baked in wood "
            "ovens, soft cheese and seasonal vegetables are served in small family restaurants. On "
            "Saturday mornings, farmers from the surrounding villages sell fruit, honey and wine at"
            " the covered market near the old bridge."
        ),
    ]
)
# measured 13.0 for the converted model; llama.cpp's q/k row order left in place gives 166,
# applied twice (wrong direction) 475. Cross-check: on this text, 128-token chunks scored on
# their second half, llama-perplexity on the Q4_1 GGUF gives 10.45 and the converted model 10.43
MAX_PERPLEXITY = 25.0

# (text, ids) from llama.cpp itself: `llama-tokenize -m SmolLM2-135M-Instruct.Q4_1.gguf -f
# text.txt --ids --no-escape` (llama.cpp vendored in llama-cpp-python 0.3.36), special tokens
# parsed (its default)
LLAMA_CPP_IDS = [
    ("12345", [33, 34, 35, 36, 37]),
    (
        "In 2024, 1,000,000 people paid $3.50 each.",
        [788, 216, 34, 32, 34, 36, 28, 216, 33, 28, 32, 32, 32, 28, 32, 32, 32, 701, 5940,
         1885, 35, 30, 37, 32, 971, 30],
    ),
    ("a  b\t\tc\n\n d   ", [81, 216, 278, 197, 197, 83, 1116, 287, 333]),
    ("   leading and trailing   ", [256, 2899, 284, 35079, 333]),
    ("line1\r\nline2\n\n\n\tindented", [1311, 33, 201, 198, 1311, 34, 16506, 197, 526, 6574]),
    ("naïve café 日本語 🙂", [3546, 46494, 37366, 17097, 241, 115, 40993, 179, 120, 248, 47526]),
    (
        "Ünïcödé — “quotes” and ‘apostrophes’ … ©®™ 🇫🇷👩\u200d💻",
        [142, 246, 94, 25972, 83, 7466, 84, 2756, 1841, 619, 385, 2346, 573, 284, 1551, 512,
         474, 41866, 417, 5548, 11435, 10532, 14824, 15107, 225, 121, 10813, 225, 132, 10813,
         235, 119, 321, 231, 10813, 236, 136],
    ),
    (
        "def f(x):\n    return x**2  # square\n",
        [1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 5222, 198],
    ),
    (
        'if (a != b && c >= 0) { printf("%d\\n", a); }',
        [342, 365, 81, 6541, 278, 1456, 22, 265, 10888, 216, 32, 25, 1662, 1628, 86, 23901,
         84, 76, 94, 1002, 253, 4258, 4029],
    ),
    (
        "I'm sure they'll say we've done it, don't you think?",
        [57, 5248, 2090, 502, 3060, 1643, 392, 3543, 2294, 357, 28, 1326, 982, 346, 1510, 47],
    ),
    (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        [1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198],
    ),
    (
        "HTTPServer getURLForID snake_case_name CamelCase",
        [8049, 33635, 10740, 820, 14492, 2193, 2238, 14321, 79, 7544, 79, 1245, 5784, 299,
         10802],
    ),
    ("", []),
    (" ", [216]),
    (
        "The quick brown fox jumps over the lazy dog.",
        [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30],
    ),
]


def perplexity(model: nn.Module, tokenizer, text: str) -> float:
    """exp(mean next-token cross-entropy) of ``text`` under ``model``."""
    ids = mx.array(tokenizer.encode(text))[None]
    logits = model(ids[:, :-1]).astype(mx.float32)
    return math.exp(nn.losses.cross_entropy(logits, ids[:, 1:]).mean().item())


def llama_cpp_permute(w: mx.array, n_heads: int) -> mx.array:
    """llama.cpp's convert_hf_to_gguf.py q/k row permutation (the one the converter undoes)."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def gguf_meta() -> dict:
    return read_gguf(embedded_gguf("smollm2-135m-instruct"))[0]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir: Path):
    return AutoTokenizer.from_pretrained(str(smollm2_dir))


def test_unpermute_rope_inverts_llama_cpp_permutation():
    w = mx.arange(3 * 8 * 5).reshape(3 * 8, 5)
    assert np.array_equal(unpermute_rope(np.array(llama_cpp_permute(w, 3)), 3), np.array(w))
    assert not mx.array_equal(llama_cpp_permute(w, 3), w)


def test_config_and_weights_come_from_metadata(smollm2_dir: Path):
    config = json.loads((smollm2_dir / "config.json").read_text())
    expected = {
        "model_type": "llama",
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "eos_token_id": 2,
    }
    assert {k: config[k] for k in expected} == expected
    weights = mx.load(str(smollm2_dir / "model.safetensors"))
    assert len(weights) == 30 * 9 + 2 and "lm_head.weight" not in weights
    assert {w.dtype for w in weights.values()} == {mx.float32}
    assert weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert sum(w.size for w in weights.values()) == 134_515_008


def test_chat_answers_capital_of_france(smollm2):
    model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=20)  # greedy by default
    assert "Paris" in answer


def test_perplexity_is_sane(smollm2):
    assert 1.0 < perplexity(*smollm2, ENGLISH_TEXT) < MAX_PERPLEXITY


@pytest.mark.parametrize("times", [1, 2], ids=["not-undone", "wrong-direction"])
def test_llama_cpp_rope_row_order_fails_the_perplexity_check(smollm2_dir: Path, times: int):
    model, tokenizer = mlx_lm.load(str(smollm2_dir))
    for layer in model.model.layers:
        attn = layer.self_attn
        for _ in range(times):
            attn.q_proj.weight = llama_cpp_permute(attn.q_proj.weight, attn.n_heads)
            attn.k_proj.weight = llama_cpp_permute(attn.k_proj.weight, attn.n_kv_heads)
    assert perplexity(model, tokenizer, ENGLISH_TEXT) > 4 * MAX_PERPLEXITY


@pytest.mark.parametrize("text,ids", LLAMA_CPP_IDS)
def test_tokenizer_matches_llama_cpp_and_round_trips(hf_tokenizer, text: str, ids: list[int]):
    assert hf_tokenizer.encode(text) == ids
    assert hf_tokenizer.decode(ids) == text


def test_digits_are_split_one_per_token(hf_tokenizer):
    tokens = hf_tokenizer.convert_ids_to_tokens(hf_tokenizer.encode("x = 9876543210"))
    assert tokens[-10:] == list("9876543210")


def test_control_tokens_are_single_special_ids(hf_tokenizer, gguf_meta: dict):
    control = [i for i, t in enumerate(gguf_meta["tokenizer.ggml.token_type"]) if t == 3]
    assert len(control) == 17
    for token_id in control:
        token = hf_tokenizer.convert_ids_to_tokens(token_id)
        assert hf_tokenizer.encode(token) == [token_id]
        assert token in hf_tokenizer.added_tokens_encoder
        assert hf_tokenizer.decode([token_id], skip_special_tokens=True) == ""


def test_chat_template_and_special_tokens(hf_tokenizer, smollm2):
    messages = [{"role": "user", "content": "Hi there"}]
    text = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (hf_tokenizer.pad_token, hf_tokenizer.unk_token) == ("<|im_end|>", "<|endoftext|>")
    _, mlx_tokenizer = smollm2
    assert mlx_tokenizer.apply_chat_template(messages, add_generation_prompt=True) == (
        hf_tokenizer.encode(text)
    )
    assert mlx_tokenizer.eos_token_ids == {2}


def test_add_bos_token_metadata_prepends_bos(gguf_meta: dict):
    tokenizer = build_tokenizer(gguf_meta | {"tokenizer.ggml.add_bos_token": True})
    assert tokenizer.encode("Hello").ids == [1, 19556]


def test_unsupported_architecture_and_tokenizer_fail_clearly(gguf_meta: dict):
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'qwen2'"):
        architecture(gguf_meta | {"general.architecture": "qwen2"})
    with pytest.raises(ValueError, match="unsupported GGUF RoPE scaling 'yarn'"):
        model_config(gguf_meta | {"llama.rope.scaling.type": "yarn"}, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'llama'"):
        build_tokenizer(gguf_meta | {"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer 'llama-bpe'"):
        build_tokenizer(gguf_meta | {"tokenizer.ggml.pre": "llama-bpe"})
