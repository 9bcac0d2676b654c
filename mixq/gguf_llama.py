"""GGUF ``llama`` architecture (SmolLM2, Llama 2/3 style) -> ``mlx_lm``'s ``llama`` model.

The q/k rows are un-permuted from llama.cpp's RoPE layout back to the Hugging Face one that
``mlx_lm`` expects; the tokenizer is the embedded byte-level BPE vocabulary and merges.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from mixq.gguf import add_gguf_tokens, post_processor, required, special_token_ids

TOP_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def byte_level() -> pre_tokenizers.ByteLevel:
    """GPT-2's regex split, then bytes -> printable unicode (no space prefix, as llama.cpp)."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


# llama.cpp's ``tokenizer.ggml.pre`` name -> the equivalent Hugging Face pre-tokenizer
PRE_TOKENIZERS = {
    "gpt-2": byte_level,
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level()]
    ),
}


def model_config(meta: dict[str, Any], tie_word_embeddings: bool) -> dict[str, Any]:
    """The ``config.json`` of a llama-architecture GGUF, from its ``llama.*`` metadata."""
    rope_scaling = meta.get("llama.rope.scaling.type", "none")
    if rope_scaling != "none":
        raise ValueError(f"unsupported GGUF RoPE scaling {rope_scaling!r}: only 'none'")
    hidden = required(meta, "llama.embedding_length")
    n_heads = required(meta, "llama.attention.head_count")
    head_dim = meta.get("llama.attention.key_length", hidden // n_heads)
    rope_dim = meta.get("llama.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"unsupported GGUF partial RoPE: {rope_dim} of {head_dim} dims rotate")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": required(meta, "llama.feed_forward_length"),
        "num_hidden_layers": required(meta, "llama.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": required(meta, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0),
        "max_position_embeddings": required(meta, "llama.context_length"),
        "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "tie_word_embeddings": tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    }
    return config | special_token_ids(meta)


def mlx_name(gguf_name: str) -> str:
    """``blk.3.attn_q`` -> ``model.layers.3.self_attn.q_proj`` (names without .weight)."""
    parts = gguf_name.split(".")
    if len(parts) == 1 and parts[0] in TOP_TENSORS:
        return TOP_TENSORS[parts[0]]
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{BLOCK_TENSORS[parts[2]]}"
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r} for the llama architecture")


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head RoPE row interleaving of a q/k projection.

    w: (n_heads * head_dim, in_features); llama.cpp pairs rows (2i, 2i+1) per head, Hugging
    Face / ``mlx_lm`` (non-traditional RoPE) pairs rows (i, i + head_dim/2).
    """
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def convert_tensor(
    name: str, w: np.ndarray, config: dict[str, Any]
) -> tuple[str, np.ndarray]:
    """GGUF tensor ``name`` (``blk.0.attn_q.weight``) and its float32 values -> the ``mlx_lm``
    weight name and values (q/k rows un-permuted)."""
    base = name.removesuffix(".weight")
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    n_heads = heads.get(base.rsplit(".", 1)[-1])
    if n_heads is not None:
        w = unpermute_rope(w, n_heads)
    return f"{mlx_name(base)}.weight", w


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """A ``tokenizers`` byte-level BPE tokenizer equal to llama.cpp's from GGUF metadata."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"unsupported GGUF tokenizer model {model!r} for the llama architecture: only 'gpt2' "
            "(byte-level BPE)"
        )
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(
            f"unsupported GGUF pre-tokenizer {pre!r}: supported are {sorted(PRE_TOKENIZERS)}"
        )
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = post_processor(meta, processors.ByteLevel(trim_offsets=False))
    add_gguf_tokens(tokenizer, meta)
    return tokenizer
