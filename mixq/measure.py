"""measure-kl: KL(reference || model with one layer quantized) for every layer x candidate.

Exact and fast:
- one reference pass records every block's output per chunk and the reference log-space
  (probabilities p and logits z, kept on disk, read chunk by chunk);
- a layer in block i is measured by replaying the recorded outputs of blocks 0..i-1 and running
  only blocks i.. and the head (the output head alone runs no block at all);
- KL per token is computed chunk by chunk from the logit difference d = z_q - z_ref as
  KL = log E_p[exp d] - E_p[d] (with expm1/log1p), which stays accurate for the ~1e-6 KLs of
  8-bit layers where the textbook sum p (log p - log q) in float32 is dominated by rounding.
The numbers equal a naive full forward per (layer, candidate) with the same KL formula.

Resumable: finished rows are appended to a journal outside the DVC output, keyed by a hash of
everything that determines them; a killed run resumes where it stopped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

import mixq
from mixq.budget import candidate_name
from mixq.config import Candidate, MeasureConfig
from mixq.kl import LogitsRef, kl_summary, reference_logits, sliced_kl, split_chunks
from mixq.layers import Layer, applicable_candidates, quantizable_layers
from mixq.memory import logit_rows
from mixq.reference import FloatWeights, quantized_layer

log = logging.getLogger("mixq")


def cache_root() -> Path:
    """Where resume journals live: ``$MIXQ_CACHE`` or ``.mixq-cache`` (outside DVC outputs)."""
    return Path(os.environ.get("MIXQ_CACHE", ".mixq-cache"))


class Replay(nn.Module):
    """Stands in for a block and returns its recorded output; other attributes (e.g. a hybrid
    model's ``is_linear``) are read from the block it replaces."""

    def __init__(self, block: nn.Module, output: mx.array):
        super().__init__()
        self.block = block
        self.output = output

    def __call__(self, x, *args, **kwargs):
        return self.output

    def __getattr__(self, name):
        if name in self or "block" not in self:
            return super().__getattr__(name)
        return getattr(self["block"], name)


class Record(Replay):
    """Runs its block and records the output (in ``self.output``)."""

    def __call__(self, x, *args, **kwargs):
        self.output = self.block(x, *args, **kwargs)
        return self.output


def first_block_affected(model: nn.Module, layer: Layer) -> int:
    """Index of the first block whose input changes when ``layer`` changes."""
    if layer.block is not None:
        return layer.block
    if layer.path.rsplit(".", 1)[-1] == "lm_head":  # mlx-lm's name for an untied head
        return len(model.layers)
    return 0  # embeddings (also the tied head) and anything else: run everything


def logits_with_replay(
    model: nn.Module, tokens: mx.array, outputs: list[mx.array], start: int,
    cache: list | None = None,
) -> mx.array:
    """Logits [B, T, V] of ``model(tokens, cache=cache)`` with blocks < ``start`` replaying
    ``outputs`` (a replayed block leaves its cache untouched)."""
    blocks = list(model.layers)
    try:
        for i in range(start):
            model.layers[i] = Replay(blocks[i], outputs[i])
        return model(tokens, cache=cache)
    finally:
        for i in range(start):
            model.layers[i] = blocks[i]


def record_block_outputs(
    model: nn.Module, tokens: mx.array, cache: list | None = None
) -> tuple[mx.array, list[mx.array]]:
    """Reference logits [B, T, V] and every block's output [B, T, D] for ``tokens`` [B, T]
    (``cache``: the model's cache list, when ``tokens`` continue cached sequences)."""
    blocks = list(model.layers)
    recorders = [Record(b, mx.array(0)) for b in blocks]
    try:
        for i, r in enumerate(recorders):
            model.layers[i] = r
        logits = model(tokens, cache=cache)
        outputs = [r.output for r in recorders]
    finally:
        for i, b in enumerate(blocks):
            model.layers[i] = b
    return logits, outputs


@dataclass
class Reference:
    """Reference data: per chunk the block outputs (in memory); per token p and z
    (memory-mapped [tokens, V]) and lse, psum (in memory [tokens]), read back by :meth:`rows`."""

    chunks: list[mx.array]
    outputs: list[list[mx.array]]
    p: np.memmap
    z: np.memmap
    lse: np.ndarray
    psum: np.ndarray

    def rows(self, c: int, rows: slice) -> LogitsRef:
        """The :class:`LogitsRef` of the tokens ``rows`` of chunk ``c`` (its tokens in
        row-major order), [n, V] and [n]."""
        start = sum(x.size for x in self.chunks[:c])
        stop = start + self.chunks[c].size
        rows = slice(*[start + i for i in rows.indices(stop - start)[:2]])
        return LogitsRef(*(mx.array(a[rows]) for a in (self.p, self.z, self.lse, self.psum)))


def build_reference(
    model: nn.Module, chunks: list[mx.array], work_dir: Path, cache: list | None = None
) -> Reference:
    """One reference pass: block outputs in memory, p/z on disk under ``work_dir`` (written in
    slices of :func:`mixq.memory.logit_rows` tokens). With a ``cache`` (the model's cache list)
    the chunks are consecutive pieces of the same sequences and run through it in order, as in
    prefill."""
    n_tokens = sum(c.size for c in chunks)
    outputs, p_file, z_file = [], None, None
    lse, psum = np.empty(n_tokens), np.empty(n_tokens)
    row = 0
    for chunk in tqdm(chunks, desc="reference pass", unit="chunk"):
        logits, block_out = record_block_outputs(model, chunk, cache)
        mx.eval(logits, *block_out)
        outputs.append(block_out)
        logits = logits.reshape(chunk.size, -1)
        if p_file is None:
            shape = (n_tokens, logits.shape[-1])
            p_file = np.lib.format.open_memmap(work_dir / "ref_p.npy", "w+", np.float32, shape)
            z_file = np.lib.format.open_memmap(work_dir / "ref_z.npy", "w+", np.float32, shape)
        step = logit_rows(logits.shape[-1])
        for start in range(0, chunk.size, step):
            ref = reference_logits(logits[start : start + step])
            mx.eval(ref)
            rows = slice(row + start, row + start + len(ref.z))
            p_file[rows], z_file[rows] = np.array(ref.p), np.array(ref.z)
            lse[rows], psum[rows] = np.array(ref.lse), np.array(ref.psum)
        row += chunk.size
    p_file.flush()
    z_file.flush()
    return Reference(chunks, outputs, p_file, z_file, lse, psum)


def measure_layer_kl(
    model: nn.Module,
    layer: Layer,
    candidate: Candidate,
    dtype: str,
    ref: Reference,
    floats: dict[str, nn.Module] | None = None,
    weights: FloatWeights | None = None,
) -> np.ndarray:
    """Per-token KL [n_tokens] with only ``layer`` quantized to ``candidate`` (``floats`` and
    ``weights``: a quantized reference's float layers, see :mod:`mixq.reference`)."""
    start = first_block_affected(model, layer)
    kls = []
    with quantized_layer(model, layer, candidate, dtype, floats, weights):
        for c, chunk in enumerate(ref.chunks):
            logits = logits_with_replay(model, chunk, ref.outputs[c], start)
            kls.append(sliced_kl(lambda rows: ref.rows(c, rows), logits))
    return np.concatenate(kls)


def measurement_key(
    model_dir: Path, tokens: np.ndarray, candidates, dtype, cfg, reference: str
) -> str:
    """Hash of everything that determines the table: weights, tokens, candidates, settings."""
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    h.update(np.ascontiguousarray(tokens).tobytes())
    settings = {
        "candidates": [candidate_name(c) for c in candidates],
        "dtype": dtype,
        "method": cfg.method,
        "reference": reference,
        "chunk_tokens": cfg.chunk_tokens,
        "version": mixq.__version__,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def read_journal(path: Path) -> dict[tuple[str, str], dict]:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            rows[(row["path"], row["candidate"])] = row["kl"]
    return rows


@contextmanager
def journal_lock(journal: Path) -> Iterator[None]:
    """Hold ``<journal>.lock`` (an exclusive ``flock``) while a run appends to ``journal``: a
    second run of the same measurement waits, saying which PID holds it, instead of measuring
    the same rows into the same file. The kernel drops the lock when its holder dies."""
    with open(journal.with_name(journal.name + ".lock"), "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            log.warning("%s is in use by PID %s (another run of this measurement): waiting for "
                        "it", journal, fh.read().strip() or "?")
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield


def append_journal(path: Path, layer_path: str, name: str, kl: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps({"path": layer_path, "candidate": name, "kl": kl}) + "\n")
        fh.flush()


def measure_exact(
    model: nn.Module,
    tokens: np.ndarray,
    candidates: list[Candidate],
    dtype: str,
    cfg: MeasureConfig,
    work_dir: Path,
    layers: list[Layer] | None = None,
    floats: dict[str, nn.Module] | None = None,
    weights: FloatWeights | None = None,
    name: str = "rows",
) -> dict[tuple[str, str], dict]:
    """KL summary per (layer path, candidate name) of ``layers``, resuming from the journals
    in ``work_dir``: this run appends to ``<name>.jsonl`` (and keeps its reference pass in
    ``<name>/``) and reuses rows from every ``*.jsonl`` there, so shards of one measurement
    (each its own ``name``) may run at once and share rows without writing the same file.

    ``tokens`` [N, T] int32. Returns {(path, candidate): {"mean", "p95", "max"}}.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    journal = work_dir / f"{name}.jsonl"
    with journal_lock(journal):
        return measure_rows(model, tokens, candidates, dtype, cfg, work_dir, journal, layers,
                            floats, weights)


def measure_rows(
    model: nn.Module, tokens: np.ndarray, candidates: list[Candidate], dtype: str,
    cfg: MeasureConfig, work_dir: Path, journal: Path, layers: list[Layer] | None,
    floats: dict[str, nn.Module] | None, weights: FloatWeights | None,
) -> dict[tuple[str, str], dict]:
    """:func:`measure_exact`'s work, with the journal locked; appends to ``journal``."""
    name = journal.stem
    layers = quantizable_layers(model) if layers is None else layers
    wanted = [(layer, c) for layer in layers for c in applicable_candidates(layer, candidates)]
    keys = {(layer.path, candidate_name(c)) for layer, c in wanted}
    done = {}
    for path in sorted(work_dir.glob("*.jsonl")):
        done.update({k: v for k, v in read_journal(path).items() if k in keys})
    todo = [(layer, c) for layer, c in wanted if (layer.path, candidate_name(c)) not in done]
    if done:
        log.info("resuming: %d rows in journals in %s, %d to go", len(done), work_dir, len(todo))
    if todo:
        t0 = time.time()
        scratch = work_dir / name
        scratch.mkdir(exist_ok=True)
        ref = build_reference(model, split_chunks(tokens, cfg.chunk_tokens), scratch)
        for layer, c in tqdm(todo, desc="measure-kl", unit="row"):
            kl = kl_summary(measure_layer_kl(model, layer, c, dtype, ref, floats, weights))
            append_journal(journal, layer.path, candidate_name(c), kl)
            done[(layer.path, candidate_name(c))] = kl
        log.info("measured %d rows in %.1fs", len(todo), time.time() - t0)
        shutil.rmtree(scratch)
    return done
