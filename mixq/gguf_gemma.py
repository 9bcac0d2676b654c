"""GGUF ``gemma3`` architecture (Gemma 3 text models) -> ``mlx_lm``'s ``gemma3_text`` model.

llama.cpp stores every Gemma RMSNorm weight as ``1 + w`` (its ``Gemma3RMSNorm`` folds the 1 in,
``mlx_lm`` adds it at run time), so 1 is subtracted back; Gemma's q/k rows are not permuted.
Config values that llama.cpp hard-codes rather than stores are set as it runs them:
``sliding_window_pattern`` 6 (every 6th layer global, the rest sliding-window),
``rope_local_base_freq`` 10000 for the sliding layers, and ``query_pre_attn_scalar`` = head_dim
(llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B's hidden/heads). Embeddings are
tied when the file has no ``output`` tensor.

The tokenizer is SentencePiece BPE: spaces become "▁", the pair whose merged piece has the
highest score merges first, unknown characters fall back to ``<0xXX>`` byte tokens. The GGUF
stores no merges, so they are recovered from the vocabulary: every split of a piece into two
pieces that are both in the vocabulary, ranked by the piece's score (llama.cpp's SPM order).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers

from mixq.gguf import add_gguf_tokens, post_processor, required, special_token_ids

SLIDING_WINDOW_PATTERN = 6  # llama.cpp's default for gemma3 (load_swa_pattern(ml, 6))
ROPE_LOCAL_BASE_FREQ = 10000.0  # llama.cpp's rope_freq_base_train_swa default
TOKEN_TYPE_NORMAL = 1
TOP_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
}
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def sliding_window_pattern(meta: dict[str, Any]) -> int:
    """Every how many layers one is global: the metadata's number, else llama.cpp's 6 (a
    per-layer list of flags has no ``mlx_lm`` gemma3_text equivalent)."""
    pattern = meta.get("gemma3.attention.sliding_window_pattern", SLIDING_WINDOW_PATTERN)
    if not isinstance(pattern, int):
        raise ValueError(
            "unsupported gemma3 GGUF with a per-layer sliding-window list: mlx_lm's gemma3_text "
            "needs one global layer every N layers"
        )
    return pattern


def model_config(meta: dict[str, Any], tie_word_embeddings: bool) -> dict[str, Any]:
    """The ``config.json`` of a gemma3 GGUF (``mlx_lm``'s gemma3_text ``ModelArgs``)."""
    if not tie_word_embeddings:
        raise ValueError("unsupported gemma3 GGUF with an untied output head (mlx_lm ties it)")
    for key in ("gemma3.rope.scaling.type", "gemma3.final_logit_softcapping"):
        if meta.get(key, "none") not in ("none", 0.0):
            raise ValueError(f"unsupported gemma3 GGUF: {key}={meta[key]!r}")
    hidden = required(meta, "gemma3.embedding_length")
    n_heads = required(meta, "gemma3.attention.head_count")
    head_dim = required(meta, "gemma3.attention.key_length")
    n_layers = required(meta, "gemma3.block_count")
    if meta.get("gemma3.attention.value_length", head_dim) != head_dim:
        raise ValueError("unsupported gemma3 GGUF: key and value head dims differ")
    query_scale = hidden // n_heads if n_layers == 62 else head_dim  # 27B: llama.cpp's rule
    config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": hidden,
        "intermediate_size": required(meta, "gemma3.feed_forward_length"),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": meta.get("gemma3.attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": required(meta, "gemma3.attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.get("gemma3.rope.freq_base", 1_000_000.0),
        "rope_local_base_freq": meta.get("gemma3.rope.freq_base_swa", ROPE_LOCAL_BASE_FREQ),
        "query_pre_attn_scalar": query_scale,
        "sliding_window": required(meta, "gemma3.attention.sliding_window"),
        "sliding_window_pattern": sliding_window_pattern(meta),
        "max_position_embeddings": required(meta, "gemma3.context_length"),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
    }
    return config | special_token_ids(meta)


def mlx_name(gguf_name: str) -> str:
    """``blk.3.post_ffw_norm`` -> ``model.layers.3.post_feedforward_layernorm``."""
    parts = gguf_name.split(".")
    if len(parts) == 1 and parts[0] in TOP_TENSORS:
        return TOP_TENSORS[parts[0]]
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{BLOCK_TENSORS[parts[2]]}"
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r} for the gemma3 architecture")


def convert_tensor(
    name: str, w: np.ndarray, config: dict[str, Any]
) -> tuple[str, np.ndarray]:
    """GGUF tensor ``name`` and its float32 values -> the ``mlx_lm`` weight name and values
    (norms: llama.cpp's ``1 + w`` back to ``w``)."""
    base = name.removesuffix(".weight")
    if base.endswith("norm"):
        w = w - np.float32(1.0)
    return f"{mlx_name(base)}.weight", w


def spm_merges(tokens: list[str], scores: list[float], mergeable: np.ndarray) -> list[tuple]:
    """BPE merges equivalent to SentencePiece's score order: for every ``mergeable`` piece, each
    split into two pieces of the vocabulary, best piece score first (ties: lower id first)."""
    vocab = {token: i for i, token in enumerate(tokens)}
    ranked = []
    for i in np.flatnonzero(mergeable):
        piece = tokens[i]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, vocab[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """A ``tokenizers`` SentencePiece-BPE tokenizer equal to llama.cpp's from GGUF metadata."""
    model = meta.get("tokenizer.ggml.model")
    if model != "llama":
        raise ValueError(
            f"unsupported GGUF tokenizer model {model!r} for gemma3: only 'llama' (SentencePiece)"
        )
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        raise ValueError("unsupported gemma3 GGUF tokenizer with add_space_prefix")
    tokens = meta["tokenizer.ggml.tokens"]
    token_types = np.array(meta["tokenizer.ggml.token_type"])
    merges = spm_merges(tokens, meta["tokenizer.ggml.scores"], token_types == TOKEN_TYPE_NORMAL)
    vocab = {token: i for i, token in enumerate(tokens)}
    unk = tokens[special_token_ids(meta, ("unk",))["unk_token_id"]]
    tokenizer = Tokenizer(
        models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer.post_processor = post_processor(meta)
    add_gguf_tokens(tokenizer, meta)
    return tokenizer
