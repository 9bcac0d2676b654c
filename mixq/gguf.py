"""Convert a llama-architecture GGUF file into an MLX model directory that ``mlx_lm.load`` reads.

``mx.load`` unpacks GGUF block quants (Q4_0, Q4_1, Q8_0) into MLX affine triplets
(``weight`` uint32, ``scales``/``biases`` float16, group size 32); they are dequantized and
stored unquantized in ``dtype``. The q/k rows are un-permuted from llama.cpp's RoPE layout back
to the Hugging Face one that ``mlx_lm`` expects, and the tokenizer is rebuilt from the embedded
byte-level BPE vocabulary with the ``tokenizers`` library.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

log = logging.getLogger("mixq")

DTYPES = ("float32", "float16", "bfloat16")
GGUF_GROUP_SIZE = 32  # the block size of every GGUF quant that mx.load unpacks
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
GGUF_TOKEN_ROLES = {"bos": "bos", "eos": "eos", "pad": "padding", "unk": "unknown"}

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


def scalar(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    """A GGUF metadata value as a plain Python value (MLX 0-d arrays -> int/float/bool)."""
    value = meta.get(key, default)
    if isinstance(value, mx.array):
        value = value.item()
        if isinstance(value, float):  # GGUF stores float32: keep its shortest repr (1e-05)
            value = float(str(np.float32(value)))
    return value


def required(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise ValueError(f"GGUF metadata lacks {key!r}")
    return scalar(meta, key)


def llama_config(meta: dict[str, Any], tie_word_embeddings: bool) -> dict[str, Any]:
    """The ``config.json`` of a llama-architecture GGUF, from its ``llama.*`` metadata."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}: only 'llama' is supported")
    rope_scaling = scalar(meta, "llama.rope.scaling.type", "none")
    if rope_scaling != "none":
        raise ValueError(f"unsupported GGUF RoPE scaling {rope_scaling!r}: only 'none'")
    hidden = required(meta, "llama.embedding_length")
    n_heads = required(meta, "llama.attention.head_count")
    head_dim = scalar(meta, "llama.attention.key_length", hidden // n_heads)
    rope_dim = scalar(meta, "llama.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"unsupported GGUF partial RoPE: {rope_dim} of {head_dim} dims rotate")
    vocab_size = scalar(meta, "llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": required(meta, "llama.feed_forward_length"),
        "num_hidden_layers": required(meta, "llama.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": scalar(meta, "llama.attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "rms_norm_eps": required(meta, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": scalar(meta, "llama.rope.freq_base", 10000.0),
        "max_position_embeddings": required(meta, "llama.context_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    }
    return config | special_token_ids(meta)


def special_token_ids(
    meta: dict[str, Any], roles: tuple[str, ...] = ("bos", "eos", "pad")
) -> dict[str, int]:
    """``{role}_token_id`` for each role the metadata names (``bos``, ``eos``, ``pad``, ``unk``)."""
    ids = {}
    for role in roles:
        token_id = scalar(meta, f"tokenizer.ggml.{GGUF_TOKEN_ROLES[role]}_token_id")
        if token_id is not None:
            ids[f"{role}_token_id"] = token_id
    return ids


def mlx_name(gguf_name: str) -> str:
    """``blk.3.attn_q`` -> ``model.layers.3.self_attn.q_proj`` (names without .weight)."""
    parts = gguf_name.split(".")
    if len(parts) == 1 and parts[0] in TOP_TENSORS:
        return TOP_TENSORS[parts[0]]
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{BLOCK_TENSORS[parts[2]]}"
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r} for the llama architecture")


def unpermute_rope(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's per-head RoPE row interleaving of a q/k projection.

    w: (n_heads * head_dim, in_features); llama.cpp pairs rows (2i, 2i+1) per head, Hugging
    Face / ``mlx_lm`` (non-traditional RoPE) pairs rows (i, i + head_dim/2).
    """
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def dequantized(tensors: dict[str, mx.array], name: str) -> mx.array:
    """Tensor ``name`` (no suffix) as float32, dequantizing an affine triplet if it is one."""
    weight = tensors[f"{name}.weight"]
    if f"{name}.scales" not in tensors:
        return weight.astype(mx.float32)
    scales = tensors[f"{name}.scales"].astype(mx.float32)
    biases = tensors[f"{name}.biases"].astype(mx.float32)
    bits = weight.shape[-1] // scales.shape[-1]  # (in/32 * bits/32 words) / (in/32 groups)
    return mx.dequantize(weight, scales, biases, group_size=GGUF_GROUP_SIZE, bits=bits)


def convert_weights(
    tensors: dict[str, mx.array], config: dict[str, Any], dtype: str
) -> dict[str, mx.array]:
    """GGUF tensors -> ``mlx_lm`` llama weights (``...weight``), unquantized, in ``dtype``."""
    names = sorted({key.rsplit(".", 1)[0] for key in tensors})
    heads = {
        "attn_q": config["num_attention_heads"],
        "attn_k": config["num_key_value_heads"],
    }
    weights = {}
    for name in tqdm(names, desc="gguf tensors", unit="tensor", leave=False):
        target = mlx_name(name)
        w = dequantized(tensors, name)
        n_heads = heads.get(name.rsplit(".", 1)[-1])
        if n_heads is not None:
            w = unpermute_rope(w, n_heads)
        weights[f"{target}.weight"] = w.astype(getattr(mx, dtype))
        mx.eval(weights[f"{target}.weight"])
    return weights


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """A ``tokenizers`` byte-level BPE tokenizer equal to llama.cpp's from GGUF metadata.

    Control tokens (token_type 3) become special added tokens, user-defined ones (4) plain
    added tokens.
    """
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"unsupported GGUF tokenizer model {model!r}: only 'gpt2' (byte-level BPE)"
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
    tokenizer.post_processor = post_processor(meta)

    token_types = np.array(meta["tokenizer.ggml.token_type"])
    tokenizer.add_special_tokens(
        [
            AddedToken(tokens[i], special=True, normalized=False)
            for i in np.flatnonzero(token_types == TOKEN_TYPE_CONTROL)
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(tokens[i], special=False, normalized=False)
            for i in np.flatnonzero(token_types == TOKEN_TYPE_USER_DEFINED)
        ]
    )
    return tokenizer


def post_processor(meta: dict[str, Any]) -> processors.PostProcessor:
    """Adds BOS/EOS where the GGUF says so (``tokenizer.ggml.add_bos_token``/``add_eos_token``)."""
    tokens = meta["tokenizer.ggml.tokens"]
    ids = special_token_ids(meta)
    roles = [r for r in ("bos", "eos") if scalar(meta, f"tokenizer.ggml.add_{r}_token", False)]
    if not roles:
        return processors.ByteLevel(trim_offsets=False)
    added = {role: tokens[ids[f"{role}_token_id"]] for role in roles}
    bos = [added["bos"]] if "bos" in added else []
    eos = [added["eos"]] if "eos" in added else []
    return processors.TemplateProcessing(
        single=" ".join(bos + ["$A"] + eos),
        pair=" ".join(bos + ["$A"] + eos + bos + ["$B:1"] + eos),
        special_tokens=[(added[role], ids[f"{role}_token_id"]) for role in roles],
    )


def tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer_config.json`` for ``transformers``' PreTrainedTokenizerFast."""
    tokens = meta["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(scalar(meta, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(scalar(meta, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": scalar(meta, "llama.context_length"),
    }
    for key, token_id in special_token_ids(meta, ("bos", "eos", "pad", "unk")).items():
        config[key.removesuffix("_id")] = tokens[token_id]
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> Path:
    """Write an MLX model directory for ``gguf_path`` into ``out_dir`` (created if needed).

    Files: ``model.safetensors`` (unquantized, ``dtype``), ``config.json``,
    ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: choose one of {DTYPES}")
    start = time.perf_counter()
    tensors, meta = mx.load(str(gguf_path), return_metadata=True)
    config = llama_config(meta, tie_word_embeddings="output.weight" not in tensors)
    tokenizer = build_tokenizer(meta)  # fails early on an unsupported tokenizer
    weights = convert_weights(tensors, config, dtype)

    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "generation_config.json", special_token_ids(meta))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(meta))

    n_params = sum(w.size for w in weights.values())
    n_bytes = sum(w.nbytes for w in weights.values())
    log.info(
        "converted %s: %d GGUF tensors -> %d weights, %.1fM params, %.0f MB %s, %.1f s",
        gguf_path.name,
        len(tensors),
        len(weights),
        n_params / 1e6,
        n_bytes / 1e6,
        dtype,
        time.perf_counter() - start,
    )
    return out_dir
