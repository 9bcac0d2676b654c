"""Convert a GGUF file into an MLX model directory that ``mlx_lm.load`` reads.

Tensors and metadata are read with llama.cpp's own Python reader (``gguf.GGUFReader``) and every
quantized tensor (Q4_0/Q4_1/Q5_0/Q8_0, the K-quants, ...) is dequantized with
``gguf.quants.dequantize`` and stored unquantized in ``dtype``. What depends on the architecture
(``general.architecture``) lives in one module each: the ``config.json`` built from the metadata,
the tensor names and the inverse of llama.cpp's tensor transforms, and the tokenizer
(:mod:`mixq.gguf_llama`: ``llama``; :mod:`mixq.gguf_gemma`: ``gemma3``). The tokenizer is rebuilt
from the embedded vocabulary with the ``tokenizers`` library (no torch, no sentencepiece model).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import gguf
import mlx.core as mx
import numpy as np
from tokenizers import AddedToken, Tokenizer, processors
from tqdm import tqdm

log = logging.getLogger("mixq")

DTYPES = ("float32", "float16", "bfloat16")
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
GGUF_TOKEN_ROLES = {"bos": "bos", "eos": "eos", "pad": "padding", "unk": "unknown"}


def read_gguf(path: Path) -> tuple[dict[str, Any], list[gguf.ReaderTensor]]:
    """``(metadata, tensors)`` of a GGUF file: metadata as plain Python values (floats at their
    shortest float32 spelling, 1e-05 rather than 9.99999974737875e-06), tensors memory-mapped."""
    reader = gguf.GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        value = field.contents()
        if isinstance(value, float):
            value = float(str(np.float32(value)))
        meta[key] = value
    return meta, list(reader.tensors)


def dequantize(tensor: gguf.ReaderTensor) -> np.ndarray:
    """A GGUF tensor as float32 [rows, columns] (llama.cpp's row-major layout, as MLX's)."""
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def required(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise ValueError(f"GGUF metadata lacks {key!r}")
    return meta[key]


def special_token_ids(
    meta: dict[str, Any], roles: tuple[str, ...] = ("bos", "eos", "pad")
) -> dict[str, int]:
    """``{role}_token_id`` for each role the metadata names (``bos``, ``eos``, ``pad``, ``unk``)."""
    ids = {}
    for role in roles:
        token_id = meta.get(f"tokenizer.ggml.{GGUF_TOKEN_ROLES[role]}_token_id")
        if token_id is not None:
            ids[f"{role}_token_id"] = token_id
    return ids


def add_gguf_tokens(tokenizer: Tokenizer, meta: dict[str, Any]) -> None:
    """Control tokens (token_type 3) as special added tokens, user-defined ones (4) as plain
    added tokens: both are matched whole in the raw text, as llama.cpp does."""
    tokens = meta["tokenizer.ggml.tokens"]
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


def post_processor(
    meta: dict[str, Any], fallback: processors.PostProcessor | None = None
) -> processors.PostProcessor | None:
    """Adds BOS/EOS where the GGUF says so (``tokenizer.ggml.add_bos_token``/``add_eos_token``);
    ``fallback`` when it adds neither."""
    tokens = meta["tokenizer.ggml.tokens"]
    ids = special_token_ids(meta)
    roles = [r for r in ("bos", "eos") if meta.get(f"tokenizer.ggml.add_{r}_token", False)]
    if not roles:
        return fallback
    added = {role: tokens[ids[f"{role}_token_id"]] for role in roles}
    bos = [added["bos"]] if "bos" in added else []
    eos = [added["eos"]] if "eos" in added else []
    return processors.TemplateProcessing(
        single=" ".join(bos + ["$A"] + eos),
        pair=" ".join(bos + ["$A"] + eos + bos + ["$B:1"] + eos),
        special_tokens=[(added[role], ids[f"{role}_token_id"]) for role in roles],
    )


def tokenizer_config(meta: dict[str, Any], context_length: int) -> dict[str, Any]:
    """``tokenizer_config.json`` for ``transformers``' PreTrainedTokenizerFast."""
    tokens = meta["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }
    for key, token_id in special_token_ids(meta, ("bos", "eos", "pad", "unk")).items():
        config[key.removesuffix("_id")] = tokens[token_id]
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


def model_info(meta: dict[str, Any]) -> dict[str, Any]:
    """What the GGUF says about the model itself (``general.*``): name, base name, size label,
    organization, fine-tune, licence; None where it says nothing."""
    keys = ("name", "basename", "size_label", "organization", "finetune", "license")
    return {key: meta.get(f"general.{key}") for key in keys}


def architecture(meta: dict[str, Any]) -> ModuleType:
    """The module that converts this GGUF's ``general.architecture``."""
    from mixq import gguf_gemma, gguf_llama

    modules = {"llama": gguf_llama, "gemma3": gguf_gemma}
    arch = meta.get("general.architecture")
    if arch not in modules:
        raise ValueError(f"unsupported GGUF architecture {arch!r}: supported are {sorted(modules)}")
    return modules[arch]


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> dict[str, Any]:
    """Write an MLX model directory for ``gguf_path`` into ``out_dir`` (created if needed);
    returns what the GGUF says about the model (:func:`model_info`).

    Files: ``model.safetensors`` (unquantized, ``dtype``), ``config.json``,
    ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}: choose one of {DTYPES}")
    start = time.perf_counter()
    meta, tensors = read_gguf(gguf_path)
    arch = architecture(meta)
    names = {t.name for t in tensors}
    config = arch.model_config(meta, tie_word_embeddings="output.weight" not in names)
    tokenizer = arch.build_tokenizer(meta)  # fails early on an unsupported tokenizer
    weights = {}
    for tensor in tqdm(sorted(tensors, key=lambda t: t.name), desc="gguf tensors", unit="tensor",
                       leave=False):
        name, w = arch.convert_tensor(tensor.name, dequantize(tensor), config)
        weights[name] = mx.array(w).astype(getattr(mx, dtype))
        mx.eval(weights[name])

    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "generation_config.json", special_token_ids(meta))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    write_json(out_dir / "tokenizer_config.json",
               tokenizer_config(meta, config["max_position_embeddings"]))

    n_params = sum(w.size for w in weights.values())
    n_bytes = sum(w.nbytes for w in weights.values())
    log.info(
        "converted %s (%s): %d GGUF tensors -> %d weights, %.1fM params, %.0f MB %s, %.1f s",
        gguf_path.name,
        meta["general.architecture"],
        len(tensors),
        len(weights),
        n_params / 1e6,
        n_bytes / 1e6,
        dtype,
        time.perf_counter() - start,
    )
    return model_info(meta)
