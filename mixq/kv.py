"""kv-sensitivity: how much each layer's KV cache suffers from quantization, and the per-layer
KV precision that minimizes it within a bit budget.

Which layers carry a per-token KV cache comes from the model's own cache list
(``make_prompt_cache``): a plain ``KVCache`` does and can become mlx-lm's
``QuantizedKVCache``; anything else is skipped with the reason (Qwen3.5's Gated DeltaNet layers
keep a fixed-size ``ArraysCache`` state; a sliding-window ``RotatingKVCache``, as in Gemma 3's
local layers, has no quantized variant, so it stays at the KV dtype and is counted at that
precision in the bytes per token). Candidates that mlx-lm's ``QuantizedKVCache`` cannot hold at
the model's head dims are found by trying them (:func:`kv_cache_error`) and dropped with one log
line; ``kv_config.json`` records them and why.

For each such layer and candidate only that layer's cache is a ``QuantizedKVCache``; long
sequences (calibration windows of several domains joined) are run through the caches in
prefill chunks as generation does, so later chunks attend the quantized keys and values of
earlier ones. KL(unquantized-KV model || quantized-KV model) per token is
:func:`mixq.kl.token_kl` (in slices: :func:`mixq.kl.sliced_kl`) against one recorded
reference pass; blocks before the layer are replayed from it (their input does not change).
Rows are journaled under ``cache_root()/kv/<key>`` so a killed run resumes. The model computes
in float32 (on CPU with its weights dequantized, :func:`mixq.runtime.for_this_device`); the KV
caches are real ``QuantizedKVCache`` objects.

Bits are counted as ``QuantizedKVCache`` stores them: per token and layer, keys and values of
``heads x head_dim`` elements each at ``bits``, plus one scale and one bias per group in the
cache's dtype (the checkpoint's compute dtype, bfloat16 here): 4-bit g64 costs 4.5 bits per
element. ``kv.target_bits`` is that honest average over all per-token KV caches, weighted by their
size, and the allocators of :mod:`mixq.allocate` pick one candidate per layer.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import (
    ArraysCache, KVCache, QuantizedKVCache, RotatingKVCache, make_prompt_cache,
)
from mlx_lm.utils import load_model
from tqdm import tqdm

from mixq.allocate import InfeasibleTargetError, allocate, uniform_plan
from mixq.budget import DTYPE_BITS, candidate_dict
from mixq.artifacts import read_calibration
from mixq.config import Candidate, KVConfig, MeasureConfig, QuantConfig
from mixq.kl import kl_summary, sliced_kl
from mixq.measure import (
    Reference, append_journal, build_reference, cache_root, journal_lock, logits_with_replay,
    measurement_key, read_journal,
)
from mixq.runtime import for_this_device, make_kv_cache

log = logging.getLogger("mixq")

KV_BITS = (2, 3, 4, 5, 6, 8)  # what QuantizedKVCache (mx.quantize, affine) stores


class KVLayer(NamedTuple):
    """A per-token KV cache: its index in the model's cache list and what it stores per token
    (``heads`` KV heads of ``key_dim`` + ``value_dim`` elements)."""

    index: int
    heads: int
    key_dim: int
    value_dim: int

    @property
    def shape(self) -> list[int]:
        """Per-token elements as a weight-like shape for :func:`mixq.budget.layer_bits`, whose
        last axis is grouped: ``[2 * heads, head_dim]`` (keys and values)."""
        if self.key_dim == self.value_dim:
            return [2 * self.heads, self.key_dim]
        return [self.heads, self.key_dim + self.value_dim]

    def fits(self, c: Mapping[str, Any]) -> bool:
        """Whether both head dims split into ``c``'s groups."""
        return self.key_dim % c["group_size"] == 0 and self.value_dim % c["group_size"] == 0


def skip_reason(cache: Any) -> str:
    if isinstance(cache, ArraysCache):
        return "fixed-size state (linear attention / SSM): no per-token KV cache"
    if isinstance(cache, RotatingKVCache):
        return "sliding-window cache: mlx-lm has no quantized RotatingKVCache"
    return "not a plain KVCache: QuantizedKVCache cannot stand in for it"


def kv_layers(model: nn.Module) -> tuple[list[KVLayer], dict[str, dict], str]:
    """The per-token KV caches of ``model``, the skipped caches ``{index: {cache, reason}}``
    (a sliding-window cache also with ``heads``, ``head_dims`` and ``window``: it grows per
    token up to ``window`` tokens) and the KV dtype name, from one token run through
    ``make_prompt_cache(model)``."""
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[0]]), cache=cache))
    layers, skipped, dtypes = [], {}, set()
    for i, c in enumerate(cache):
        if type(c) is KVCache:
            layers.append(KVLayer(i, c.keys.shape[1], c.keys.shape[-1], c.values.shape[-1]))
            dtypes.add(str(c.keys.dtype).rsplit(".", 1)[-1])
        else:
            skipped[str(i)] = {"cache": type(c).__name__, "reason": skip_reason(c)}
            if isinstance(c, RotatingKVCache):
                skipped[str(i)] |= {"heads": c.keys.shape[1],
                                    "head_dims": [c.keys.shape[-1], c.values.shape[-1]],
                                    "window": c.max_size}
    if not layers:
        raise ValueError("the model has no per-token KV cache (no plain KVCache in its cache list)")
    if len(dtypes) != 1:
        raise ValueError(f"KV caches of mixed dtypes {sorted(dtypes)}")
    return layers, skipped, dtypes.pop()


def kv_cache_error(c: Mapping[str, Any], head_dim: int) -> str | None:
    """Why mlx-lm's ``QuantizedKVCache`` at candidate ``c`` cannot hold keys and values of
    ``head_dim``, found by trying (a 3-token prefill and a 1-token step through the cache and
    quantized attention); None if it can. mlx-lm 0.32.2 sizes its packed buffer as
    ``head_dim // (32 // bits)`` words, so 5/6-bit fail at head_dim 128, 3/5/6-bit at 256."""
    cache = QuantizedKVCache(group_size=c["group_size"], bits=c["bits"])
    try:
        for n in (3, 1):
            x = mx.ones((1, 1, n, head_dim))
            keys, values = cache.update_and_fetch(x, x)
            mx.eval(scaled_dot_product_attention(x, keys, values, cache, scale=1.0, mask=None))
    except Exception as err:  # noqa: BLE001 (whatever mlx-lm raises means it cannot)
        return f"{type(err).__name__}: {err}"
    return None


def usable_candidates(
    candidates: list[dict], layers: list[KVLayer]
) -> tuple[list[dict], dict[str, str]]:
    """``(kept, dropped)``: the candidates ``QuantizedKVCache`` handles at every head dim of
    ``layers`` they fit, and the others as {name: reason} (logged in one line)."""
    kept, dropped = [], {}
    for c in candidates:
        dims = sorted({d for layer in layers if layer.fits(c)
                       for d in (layer.key_dim, layer.value_dim)})
        errors = {d: kv_cache_error(c, d) for d in dims}
        failing = [d for d, err in errors.items() if err]
        if failing:
            dropped[c["name"]] = (f"mlx-lm's QuantizedKVCache fails at head_dim "
                                  f"{'/'.join(map(str, failing))}: {errors[failing[0]]}")
        else:
            kept.append(c)
    if dropped:
        log.warning("kv.candidates: dropped %s (mlx-lm's QuantizedKVCache cannot hold this "
                    "model's head dims %s at them); measuring %s", sorted(dropped),
                    sorted({d for layer in layers for d in (layer.key_dim, layer.value_dim)}),
                    [c["name"] for c in kept])
    if not kept:
        raise ValueError(f"no kv.candidates works for this model: {dropped}")
    return kept, dropped


def kv_candidates(kv: KVConfig) -> list[dict]:
    """``kv.candidates`` as dicts; each must be an affine quantization QuantizedKVCache stores."""
    cands = [candidate_dict(c) for c in kv.candidates]
    bad = [c["name"] for c in cands if c["mode"] != "affine" or c["bits"] not in KV_BITS]
    if bad:
        raise ValueError(f"kv.candidates {bad}: QuantizedKVCache stores affine {KV_BITS}-bit only")
    return cands


def kv_sequences(tokens: np.ndarray, seq_len: int, samples: int) -> np.ndarray:
    """``samples`` sequences [samples, seq_len] int32, each of calibration windows (``tokens``
    [N, T]) joined end to end: windows spread evenly over the set (so over its domains), dealt
    out in turn to the sequences."""
    n, t = tokens.shape
    per_seq = -(-seq_len // t)
    if samples * per_seq > n:
        raise ValueError(
            f"kv.samples={samples} x kv.seq_len={seq_len} needs {samples * per_seq} calibration "
            f"windows of {t} tokens, calibrate made {n}"
        )
    picked = np.linspace(0, n - 1, samples * per_seq).round().astype(int)
    return np.stack([tokens[picked[s::samples]].reshape(-1)[:seq_len] for s in range(samples)])


def prefill_chunks(sequences: np.ndarray, chunk_tokens: int) -> list[mx.array]:
    """Consecutive pieces [B, <=chunk_tokens] of ``sequences`` [B, T], in prefill order."""
    return [mx.array(sequences[:, s : s + chunk_tokens])
            for s in range(0, sequences.shape[1], chunk_tokens)]


def layer_kl(
    model: nn.Module, ref: Reference, quantized: Mapping[int, Mapping], start: int
) -> np.ndarray:
    """Per-token KL [n_tokens] of the model with the caches ``quantized`` ({index: candidate})
    against ``ref``, running the chunks through fresh caches; blocks < ``start`` replayed."""
    cache = make_kv_cache(model, quantized)
    kls = []
    for c, chunk in enumerate(ref.chunks):
        logits = logits_with_replay(model, chunk, ref.outputs[c], start, cache)
        kls.append(sliced_kl(lambda rows: ref.rows(c, rows), logits))
    return np.concatenate(kls)


def replay_is_exact(model: nn.Module, ref: Reference, starts: list[int]) -> bool:
    """Whether replaying blocks < ``start`` (their caches left empty) reproduces the reference
    logits for each of ``starts`` (the first and last KV layer: the fewest and the most caches
    left empty): true unless the model reads an earlier layer's cache (Gemma 3 builds its
    sliding-window mask from cache 0, and then fails or computes other logits)."""
    if len(make_prompt_cache(model)) != len(model.layers):
        return False
    try:
        return all(float(layer_kl(model, ref, {}, start).max()) < 1e-7 for start in starts)
    except ValueError:  # e.g. a mask sized from an empty cache against a filled one
        return False


def measure_kv(
    model: nn.Module,
    sequences: np.ndarray,
    layers: list[KVLayer],
    candidates: list[dict],
    chunk_tokens: int,
    work_dir: Path,
) -> dict[tuple[str, str], dict]:
    """KL summary per (cache index, candidate name) over ``sequences`` [B, T], resuming from
    ``work_dir/rows.jsonl``. Returns {(index, candidate): {"mean", "p95", "max"}}."""
    work_dir.mkdir(parents=True, exist_ok=True)
    journal = work_dir / "rows.jsonl"
    with journal_lock(journal):  # a second run waits rather than measure the same rows
        done = read_journal(journal)
        todo = [(layer, c) for layer in layers for c in candidates
                if layer.fits(c) and (str(layer.index), c["name"]) not in done]
        if done:
            log.info("resuming: %d rows in journal %s, %d to go", len(done), journal, len(todo))
        if todo:
            t0 = time.time()
            chunks = prefill_chunks(sequences, chunk_tokens)
            ref = build_reference(model, chunks, work_dir, make_prompt_cache(model))
            replay = replay_is_exact(model, ref, [layers[0].index, layers[-1].index])
            if not replay:
                log.warning("block replay changes this model's logits: running every block")
            for layer, c in tqdm(todo, desc="kv-sensitivity", unit="row"):
                start = layer.index if replay else 0
                kl = kl_summary(layer_kl(model, ref, {layer.index: c}, start))
                append_journal(journal, str(layer.index), c["name"], kl)
                done[(str(layer.index), c["name"])] = kl
            log.info("measured %d rows in %.1fs", len(todo), time.time() - t0)
            for name in ("ref_p.npy", "ref_z.npy"):
                (work_dir / name).unlink(missing_ok=True)
        return done


def kv_table(
    layers: list[KVLayer], rows: Mapping[tuple[str, str], dict], candidates: list[dict],
    skipped: dict, dtype: str, tokens: int, dropped: Mapping[str, str],
) -> dict:
    """The KV sensitivity table in :mod:`mixq.sensitivity`'s format (so :mod:`mixq.allocate`
    and :mod:`mixq.budget` apply): one "layer" per KV cache, path = cache index, params = KV
    elements per token; plus ``skipped``, the KV ``dtype`` and ``dropped_candidates`` (those
    QuantizedKVCache cannot hold here, with the reason)."""
    entries = [
        {
            "path": str(layer.index),
            "kind": "kv_cache",
            "block": layer.index,
            "shape": layer.shape,
            "params": layer.heads * (layer.key_dim + layer.value_dim),
            "heads": layer.heads,
            "head_dims": [layer.key_dim, layer.value_dim],
            "kl": {c["name"]: rows[(str(layer.index), c["name"])]
                   for c in candidates if layer.fits(c)},
        }
        for layer in layers
    ]
    return {
        "candidates": candidates,
        "layers": entries,
        "unquantized_params": 0,
        "total_params": sum(e["params"] for e in entries),
        "skipped": skipped,
        "dropped_candidates": dict(dropped),
        "caches": len(layers) + len(skipped),
        "tokens": tokens,
        "method": "exact",
        "dtype": dtype,
    }


def kv_plan(table: Mapping[str, Any], kv: KVConfig) -> dict:
    """:func:`mixq.allocate.allocate` of ``table`` (its usable candidates) to ``kv.target_bits``
    with ``kv.allocator``."""
    candidates = [Candidate(c["bits"], c["group_size"], c["mode"]) for c in table["candidates"]]
    quant = QuantConfig(candidates=candidates, target_bpw=kv.target_bits,
                        allocator=kv.allocator, protect=[], dtype=table["dtype"])
    try:
        return allocate(table, quant, DTYPE_BITS[table["dtype"]])
    except InfeasibleTargetError as err:
        unfit = "" if any(layer["kl"] for layer in table["layers"]) else (
            f" No candidate fits any KV cache (head dims "
            f"{sorted({d for layer in table['layers'] for d in layer['head_dims']})}, candidate "
            f"group sizes {sorted({c.group_size for c in candidates})}): they stay "
            f"unquantized, so only kv.target_bits={err.hi:g} is reachable."
        )
        dropped = (f" Dropped (QuantizedKVCache fails at this model's head dims): "
                   f"{sorted(table['dropped_candidates'])}." if table["dropped_candidates"] else "")
        raise ValueError(
            f"kv.target_bits={kv.target_bits} is infeasible: the candidates reach {err.lo:.4f} "
            f"to {err.hi:.4f} stored bits per cached element (incl. scales and biases).{unfit}"
            f"{dropped}"
        ) from None


def kv_config(table: Mapping[str, Any], plan: Mapping[str, Any], model_dir: Path) -> dict:
    """The ``kv_config.json`` of ``plan`` (:func:`kv_plan`'s, or a uniform plan of
    :func:`mixq.allocate.uniform_plan`), read by :func:`mixq.runtime.make_kv_cache`:

    ``model`` (the directory measured), ``caches`` (length of the model's cache list),
    ``dtype`` (of the KV cache, for the bit accounting), ``layers`` {cache index: {bits,
    group_size, mode, candidate, kl}}, ``skipped`` {cache index: {cache, reason}} (no per-token
    KV cache), ``unquantized`` (KV layers no candidate fits, kept as plain caches) and
    ``summary``: bits per element of the quantizable KV layers and bytes per token (mixed,
    unquantized, each uniform candidate), predicted KL (sum of the chosen layers' KLs),
    allocator objectives; ``dropped_candidates`` (see :func:`usable_candidates`).

    Bytes per token count every cache that grows per token: the KV layers at their bits, and
    the sliding-window caches (skipped: no quantized variant) at the KV dtype, which is exact up
    to a context of their window (``sliding_window_bytes_per_token``; beyond it they stop
    growing).
    """
    dtype_bits = DTYPE_BITS[table["dtype"]]
    s = plan["summary"]
    elements = s["total_params"]  # KV elements per token
    sliding = sum(e["heads"] * sum(e["head_dims"]) * dtype_bits / 8
                  for e in table["skipped"].values() if "window" in e)
    uniform = {c["name"]: uniform_plan(table, c, dtype_bits)["summary"]
               for c in table["candidates"]}
    return {
        "model": str(model_dir),
        "caches": table["caches"],
        "dtype": table["dtype"],
        "layers": {
            path: {k: e[k] for k in ("bits", "group_size", "mode", "candidate", "kl")}
            for path, e in sorted(plan["layers"].items(), key=lambda item: int(item[0]))
        },
        "skipped": table["skipped"],
        "dropped_candidates": table["dropped_candidates"],
        "unquantized": s["unquantized_layers"],
        "summary": {
            "target_bits": s.get("target_bpw"),
            "bits": s["bpw"],
            "bytes_per_token": s["bpw"] * elements / 8 + sliding,
            "unquantized_bytes_per_token": elements * dtype_bits / 8 + sliding,
            "sliding_window_bytes_per_token": sliding,
            "predicted_kl": s["predicted_kl"],
            "allocator": s["allocator"],
            "objectives": s.get("objectives"),
            "greedy_gap": s.get("greedy_gap"),
            "uniform": {n: {"bits": u["bpw"],
                            "bytes_per_token": u["bpw"] * elements / 8 + sliding,
                            "predicted_kl": u["predicted_kl"]} for n, u in uniform.items()},
            "kv_elements_per_token": elements,
            "tokens": table["tokens"],
        },
    }


def kv_sensitivity(model_dir: Path, calibration_dir: Path, kv: KVConfig) -> tuple[dict, dict]:
    """``(table, kv config)`` for the quant in ``model_dir``: measure every per-token KV cache
    at every ``kv.candidates`` on calibration sequences, then allocate to ``kv.target_bits``."""
    model, _ = load_model(Path(model_dir))
    layers, skipped, dtype = kv_layers(model)
    log.info("%d per-token KV caches (%s), %d skipped", len(layers), dtype, len(skipped))
    candidates, dropped = usable_candidates(kv_candidates(kv), layers)
    model.set_dtype(mx.float32)  # float32 activations (elsewhere than CPU too), as measure-kl
    for_this_device(model)
    tokens = kv_sequences(read_calibration(calibration_dir).tokens, kv.seq_len, kv.samples)
    settings = MeasureConfig(method="kv-cache", chunk_tokens=kv.chunk_tokens)
    # rows are per (layer, candidate): no candidates in the key, so adding one measures only it
    key = measurement_key(Path(model_dir), tokens, [], dtype, settings, "kv-float")
    rows = measure_kv(model, tokens, layers, candidates, kv.chunk_tokens, cache_root() / "kv" / key)
    table = kv_table(layers, rows, candidates, skipped, dtype, int(tokens.size), dropped)
    return table, kv_config(table, kv_plan(table, kv), Path(model_dir))


def kv_metrics(config: Mapping[str, Any]) -> dict:
    """The headline numbers of a KV config, for ``dvc metrics``/``dvc exp show``."""
    s = config["summary"]
    return {k: s[k] for k in ("bits", "bytes_per_token", "unquantized_bytes_per_token",
                              "predicted_kl")}
