"""refine: distill a mixed checkpoint's scales and biases against the float model (DWQ).

convert rounds every weight to its layer's grid with the scales and biases of plain affine
quantization. Those are not the best ones for the model's output: mlx-lm's
``mlx_lm.quant.dwq.dwq_quantize`` trains them (the integers stay frozen) to minimize the KL from
the float model's logits (the targets, computed per batch; temperature as dwq's default) on
calibration windows. This module runs it on convert's checkpoint and writes the result back as
the same standard checkpoint: every packed weight bit for bit convert's, only ``*.scales`` and
``*.biases`` changed, cast to the checkpoint's dtype; same ``config.json``, same files, same
tensor names, shapes, dtypes and bytes (checked, and :func:`mixq.convert.verify_checkpoint`
against the plan in the ``mixq/`` sidecar). What is measured is what ships: the held-out KL
before and after is measured on the written checkpoints, loaded as eval loads them.

Devices. On a GPU the quantized model trains as it is (dwq's own path, quantized kernels).
On CPU, quantized matmuls are ~13x slower than float32 ones (34 s against 2.6 s per step
measured on SmolLM2-135M), so each ``QuantizedLinear`` / ``QuantizedEmbedding`` (incl. a tied
head's ``as_linear``) is replaced by :class:`DenseQuantized`: the unpacked integers ``q``
frozen, ``scales`` and ``biases`` parameters, the layer computed as a float32 matmul of
``q * scales + biases``. It exposes ``bits``, ``group_size`` and ``mode`` so dwq's ``unfreeze``
trains it exactly as it would the quantized layer (affine, bits < 8). Other quantized modules
(mlx-lm's ``QuantizedSwitchLinear`` of mixture-of-experts models) keep their quantized kernels.

If the refined checkpoint's KL on the validation windows (refine-split windows not trained on)
is higher than the unrefined one's, the unrefined checkpoint ships and the report says so.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optimizers
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.quant.dwq import dwq_quantize
from mlx_lm.utils import load_model

from mixq.artifacts import ALL_SPLITS, read_calibration
from mixq.config import RefineConfig
from mixq.convert import CheckpointMismatchError, verify_checkpoint
from mixq.evaluate import CHUNK_TOKENS, forward_logits, heldout_metrics, load_for_eval, record_logits
from mixq.io import read_json
from mixq.kl import split_chunks
from mixq.quantize import DTYPES

log = logging.getLogger("mixq")

REFINED = ("scales", "biases")  # the only tensor names refine may change
HELDOUT_SPLITS = ("heldout", "heldout_other")  # reported when the calibration set has them


class DenseQuantized(nn.Module):
    """A quantized linear or embedding layer computed densely in float32.

    Holds the layer's packed ``weight`` (uint32, frozen: the parameter tree keeps the
    checkpoint's names and shapes), ``scales`` and ``biases`` [out, in / group_size] and an
    optional ``bias`` [out]; ``_q`` [out, in / group_size, group_size] float32 are the unpacked
    integers (a private attribute, never a parameter). For affine layers the weight is
    ``q * scales + biases`` recomputed from the current scales and biases each call, so their
    gradients flow; other modes (no biases, never trained by dwq) keep the dequantized weight.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.bits, self.group_size, self.mode = layer.bits, layer.group_size, layer.mode
        self._embedding = isinstance(layer, nn.QuantizedEmbedding)
        self.weight = layer.weight
        self.scales = layer.scales
        if layer.get("biases") is not None:
            self.biases = layer.biases
        if "bias" in layer:
            self.bias = layer.bias
        if self.mode == "affine":
            ones = mx.ones(layer.scales.shape, mx.float32)
            q = mx.dequantize(layer.weight, ones, mx.zeros_like(ones), self.group_size,
                              self.bits, dtype=mx.float32)
            self._q = q.reshape(*ones.shape, self.group_size)
        else:
            self._w = mx.dequantize(layer.weight, layer.scales, layer.get("biases"),
                                    self.group_size, self.bits, self.mode, dtype=mx.float32)
        self.freeze()

    def dense_weight(self, rows: Optional[mx.array] = None) -> mx.array:
        """The float32 weight [out, in], or its ``rows`` (indices [...] -> [..., in])."""
        if self.mode != "affine":
            return self._w if rows is None else self._w[rows]
        q, s, b = self._q, self.scales, self.biases
        if rows is not None:
            q, s, b = q[rows], s[rows], b[rows]
        w = q * s.astype(mx.float32)[..., None] + b.astype(mx.float32)[..., None]
        return w.reshape(*w.shape[:-2], -1)

    def __call__(self, x: mx.array) -> mx.array:
        """Linear layers: ``x`` [..., in] -> [..., out]. Embeddings: ids [...] -> [..., in]."""
        if self._embedding:
            return self.dense_weight(x)
        y = x @ self.dense_weight().T
        return y + self.bias if "bias" in self else y

    def as_linear(self, x: mx.array) -> mx.array:
        """An embedding as the tied output head: ``x`` [..., dims] -> logits [..., vocab]."""
        return x @ self.dense_weight().T


def substitute_dense(model: nn.Module) -> int:
    """Replace every ``nn.QuantizedLinear`` and ``nn.QuantizedEmbedding`` of ``model`` by a
    :class:`DenseQuantized` of it, in place; returns how many were replaced."""
    swaps = []
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            swaps.append((path, DenseQuantized(module)))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)


def refined_tensors(model: nn.Module) -> dict[str, mx.array]:
    """The ``*.scales`` and ``*.biases`` parameters of ``model`` by checkpoint name."""
    return {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in REFINED}


def copy_checkpoint(src: Path, out: Path) -> None:
    """Copy every file of checkpoint ``src`` into ``out`` byte for byte (weights, config.json,
    the index, tokenizer and side files, the ``mixq/`` sidecar). Plain copies: DVC's read-only
    cache links are not carried over."""
    for f in sorted(Path(src).rglob("*")):
        if f.is_file():
            target = out / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """``(data_start, header)`` of safetensors file ``path``: the byte where the tensor data
    begins (after the 8-byte little-endian header length and the JSON header) and the header
    (name -> dtype, shape, data_offsets relative to data_start; plus ``__metadata__``)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def write_refined(src: Path, out: Path, tensors: dict[str, mx.array]) -> None:
    """Write checkpoint ``src`` to ``out`` with its ``*.scales``/``*.biases`` replaced by
    ``tensors`` (cast to the stored dtype). Each safetensors file is ``src``'s byte for byte with
    only those tensors' data overwritten in place (same header, layout and metadata); every
    other file is copied. Raises :class:`CheckpointMismatchError` when a refined tensor's shape
    differs or the two disagree on which scales and biases exist."""
    copy_checkpoint(src, out)
    seen = set()
    for f in sorted(Path(out).glob("*.safetensors")):
        start, header = safetensors_header(f)
        stored = mx.load(str(Path(src) / f.name))  # shapes and dtypes
        with open(f, "r+b") as fh:
            for name, entry in header.items():
                if name == "__metadata__" or name.rsplit(".", 1)[-1] not in REFINED:
                    continue
                old, new = stored[name], tensors.get(name)
                if new is None or new.shape != old.shape:
                    raise CheckpointMismatchError(
                        f"{name}: refined {None if new is None else new.shape}, stored {old.shape}")
                data = np.array(new.astype(old.dtype).reshape(-1).view(mx.uint8)).tobytes()
                begin, end = entry["data_offsets"]
                if len(data) != end - begin:
                    raise CheckpointMismatchError(f"{name}: {len(data)} bytes, stored {end - begin}")
                fh.seek(start + begin)
                fh.write(data)
                seen.add(name)
    if seen != set(tensors):
        raise CheckpointMismatchError(
            f"refined tensors not in {src}: {sorted(set(tensors) - seen)[:5]}")


def compare_checkpoints(src: Path, out: Path) -> dict[str, int]:
    """Check that ``out`` is checkpoint ``src`` with only scales and biases changed: the same
    files, every non-safetensors file byte-identical, the same safetensors headers (tensor
    names, shapes, dtypes, offsets, metadata) and file sizes, and every tensor but ``*.scales``/``*.biases`` bit-identical.
    Raises :class:`CheckpointMismatchError`; returns counts (tensors, changed, bytes)."""
    src, out = Path(src), Path(out)
    files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    got = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    errors = [f"files differ: {sorted(set(files) ^ set(got))[:5]}"] if files != got else []
    n = changed = nbytes = 0
    for rel in set(files) & set(got):
        a, b = src / rel, out / rel
        if rel.suffix != ".safetensors":
            if a.read_bytes() != b.read_bytes():
                errors.append(f"{rel} differs")
            continue
        if safetensors_header(a) != safetensors_header(b) or a.stat().st_size != b.stat().st_size:
            errors.append(f"{rel}: header or size differ from convert's")
        old, new = mx.load(str(a)), mx.load(str(b))
        if set(old) != set(new):
            errors.append(f"{rel}: tensor names differ: {sorted(set(old) ^ set(new))[:5]}")
        for name in set(old) & set(new):
            x, y = old[name], new[name]
            n, nbytes = n + 1, nbytes + y.nbytes
            if (x.shape, x.dtype) != (y.shape, y.dtype):
                errors.append(f"{name}: {y.shape} {y.dtype}, convert wrote {x.shape} {x.dtype}")
            elif not mx.array_equal(x, y, equal_nan=True).item():
                if name.rsplit(".", 1)[-1] in REFINED:
                    changed += 1
                else:
                    errors.append(f"{name} changed (only scales and biases may)")
    if errors:
        raise CheckpointMismatchError(
            f"{out} is not {src} with refined scales ({len(errors)} problems): "
            + "; ".join(errors[:5]))
    return {"tensors": n, "changed_tensors": changed, "tensor_bytes": nbytes}


def verify_refined(src: Path, out: Path) -> dict[str, Any]:
    """:func:`compare_checkpoints` and :func:`mixq.convert.verify_checkpoint` of ``out``
    against the plan and sensitivity table in its ``mixq/`` sidecar."""
    report = compare_checkpoints(src, out)
    plan, table = (read_json(out / "mixq" / f) for f in ("plan.json", "sensitivity.json"))
    dtype = read_json(out / "config.json")["torch_dtype"]
    return {**report, **verify_checkpoint(out, plan, table, dtype)}


def training_windows(tokens: np.ndarray, cfg: RefineConfig) -> tuple[list, list]:
    """dwq's ``(train, valid)`` data from token windows [n, seq_len] (ordered by domain):
    ``cfg.valid_windows`` evenly spaced windows are the validation set (every domain's), the
    others are dealt in shuffled epochs (seed ``cfg.seed``) until ``cfg.steps *
    cfg.batch_size`` training windows; each item is ``(tokens [seq_len], 0)`` as
    ``mlx_lm.tuner.trainer.iterate_batches`` takes them."""
    n_train = len(tokens) - cfg.valid_windows
    if n_train < cfg.batch_size or cfg.valid_windows < cfg.batch_size:
        raise ValueError(
            f"refine: {len(tokens)} windows in split {cfg.split!r}; need at least "
            f"refine.batch_size={cfg.batch_size} for training and as many for validation "
            f"(refine.valid_windows={cfg.valid_windows})")
    valid = np.linspace(0, len(tokens) - 1, cfg.valid_windows).round().astype(int)
    train_ids = np.setdiff1d(np.arange(len(tokens)), valid)
    rng = np.random.default_rng(cfg.seed)
    order: list[int] = []
    while len(order) < cfg.steps * cfg.batch_size:
        order += train_ids[rng.permutation(len(train_ids))].tolist()
    train = [(tokens[i], 0) for i in order[: cfg.steps * cfg.batch_size]]
    return train, [(tokens[i], 0) for i in valid]


def load_student(quant_dir: Path) -> tuple[nn.Module, str]:
    """The quantized model of ``quant_dir``, frozen, ready for dwq; returns (model, kernels):
    on CPU in float32 with :func:`substitute_dense` layers ("dense-float32"), elsewhere as
    loaded ("quantized")."""
    model, _ = load_model(Path(quant_dir))
    model.freeze()
    if mx.default_device() != mx.cpu:
        return model, "quantized"
    model.set_dtype(mx.float32)  # norms, scales, biases: their bf16 values, exactly
    n = substitute_dense(model)
    log.info("CPU: %d quantized layers computed as dense float32 matmuls", n)
    return model, "dense-float32"


def run_dwq(student: nn.Module, reference: nn.Module, train: list, valid: list,
            cfg: RefineConfig, seq_len: int, dtype: mx.Dtype,
            opt: Optional[optimizers.Optimizer] = None) -> optimizers.Optimizer:
    """Train ``student``'s scales and biases in place with ``dwq_quantize`` against the
    logits of ``reference`` (computed per batch), one step per ``cfg.batch_size`` windows of
    ``train``, Adam at ``cfg.learning_rate`` (or ``opt``, to continue its state); the
    parameters are kept in ``dtype`` (the checkpoint's) in every forward, as they ship.
    Returns the optimizer."""
    mx.random.seed(cfg.seed)
    opt = opt or optimizers.Adam(learning_rate=cfg.learning_rate, bias_correction=True)
    dwq_quantize(
        student,
        lambda batch, idx, split: mx.stop_gradient(reference(batch).astype(mx.float32)),
        opt, train, valid,
        batch_size=cfg.batch_size, max_seq_length=seq_len, seed=cfg.seed, dtype=dtype,
        temperature=cfg.temperature,
    )
    return opt


def reference_rows(reference: nn.Module, splits: dict[str, np.ndarray],
                   work_dir: Path) -> dict[str, tuple[list[mx.array], np.ndarray]]:
    """Per split (name -> token windows [n, T]): its chunks (:func:`mixq.measure.split_chunks`)
    and ``reference``'s logits of them, [n * T, V] float32 memory-mapped under ``work_dir``."""
    out = {}
    for name, tokens in splits.items():
        chunks = split_chunks(tokens, CHUNK_TOKENS)
        out[name] = chunks, record_logits(forward_logits(reference, chunks), tokens.size,
                                          Path(work_dir) / f"{name}.npy")
    return out


def checkpoint_metrics(path: Path, refs: dict[str, tuple[list[mx.array], np.ndarray]]
                       ) -> dict[str, dict[str, float]]:
    """:func:`mixq.evaluate.heldout_metrics` of checkpoint ``path`` (loaded as eval loads it)
    on every split of :func:`reference_rows`."""
    model, _, _ = load_for_eval(path)
    return {name: heldout_metrics(forward_logits(model, chunks), chunks, rows)
            for name, (chunks, rows) in refs.items()}


def kl_before_after(before: Path, after: Path, reference: nn.Module,
                    splits: dict[str, np.ndarray]) -> dict[str, dict[str, dict[str, float]]]:
    """Per split (name -> token windows [n, T]): ``{"before": ..., "after": ...}``, the
    :func:`checkpoint_metrics` of checkpoints ``before`` and ``after``."""
    with tempfile.TemporaryDirectory(prefix="mixq-refine-") as tmp:
        refs = reference_rows(reference, splits, Path(tmp))
        b, a = checkpoint_metrics(before, refs), checkpoint_metrics(after, refs)
    return {name: {"before": b[name], "after": a[name]} for name in splits}


def refine_checkpoint(quant_dir: Path, model_dir: Path, calibration_dir: Path, out_dir: Path,
                      cfg: RefineConfig) -> dict[str, Any]:
    """Refine the checkpoint in ``quant_dir`` against the float model in ``model_dir`` on the
    ``cfg.split`` windows of ``calibration_dir`` and write what ships to ``out_dir`` (an empty
    directory); returns the report (settings, seconds, KL before/after per split, what
    shipped). ``cfg.steps == 0`` copies ``quant_dir`` unchanged."""
    quant_dir, out_dir = Path(quant_dir), Path(out_dir)
    settings = {"steps": cfg.steps, "batch_size": cfg.batch_size,
                "learning_rate": cfg.learning_rate, "temperature": cfg.temperature,
                "split": cfg.split, "valid_windows": cfg.valid_windows, "seed": cfg.seed}
    if cfg.steps == 0:
        copy_checkpoint(quant_dir, out_dir)
        verify_refined(quant_dir, out_dir)
        log.info("refine.steps=0: %s written unchanged", quant_dir)
        return {**settings, "shipped": "unrefined", "reason": "refine.steps=0"}
    if cfg.split not in ALL_SPLITS:
        raise ValueError(f"refine.split={cfg.split!r}: calibrate writes the splits {ALL_SPLITS}")
    cal = read_calibration(Path(calibration_dir))
    tokens = cal.split(cfg.split)[0]
    train, valid = training_windows(tokens, cfg)
    dtype = read_json(quant_dir / "config.json")["torch_dtype"]
    reference, _ = mlx_lm.load(str(model_dir))
    reference.set_dtype(mx.float32)
    student, kernels = load_student(quant_dir)
    tic, cpu = time.perf_counter(), time.process_time()
    # dwq's own validation loss (before and after, logged) on one batch only: it costs two
    # forwards per window; the KL on every validation window is measured below
    run_dwq(student, reference, train, valid[: cfg.batch_size], cfg, cal.seq_len,
            DTYPES[dtype])
    train_seconds, cpu = time.perf_counter() - tic, time.process_time() - cpu
    write_refined(quant_dir, out_dir, refined_tensors(student))
    del student
    check = verify_refined(quant_dir, out_dir)
    splits = {"validation": np.stack([w for w, _ in valid])}
    splits.update({s: cal.split(s)[0] for s in HELDOUT_SPLITS if s != cfg.split})
    tic = time.perf_counter()
    kl = kl_before_after(quant_dir, out_dir, reference, splits)
    kl_seconds = time.perf_counter() - tic
    before, after = kl["validation"]["before"]["kl_mean"], kl["validation"]["after"]["kl_mean"]
    report = {
        **settings, "kernels": kernels, "train_windows": len(train),
        "train_tokens": int(sum(len(w) for w, _ in train)),
        "distinct_train_windows": len(tokens) - cfg.valid_windows,
        "seconds": {"train": train_seconds, "per_step": train_seconds / cfg.steps,
                    "cpu_per_step": cpu / cfg.steps, "kl": kl_seconds},
        "kl": kl, "changed_tensors": check["changed_tensors"],
    }
    if after > before:
        log.warning("refined validation KL %.4f > unrefined %.4f: shipping the unrefined "
                    "checkpoint", after, before)
        shutil.rmtree(out_dir)
        out_dir.mkdir()
        copy_checkpoint(quant_dir, out_dir)
        verify_refined(quant_dir, out_dir)
        return {**report, "shipped": "unrefined",
                "reason": f"validation KL {after:.4f} after refine > {before:.4f} before"}
    log.info("refined: validation KL %.4f -> %.4f%s", before, after, "".join(
        f", {s} {kl[s]['before']['kl_mean']:.4f} -> {kl[s]['after']['kl_mean']:.4f}"
        for s in HELDOUT_SPLITS if s in kl))
    return {**report, "shipped": "refined"}

