"""One checkpoint against the unquantized reference, on held-out tokens and on task probes
(the two eval stages, which compare them, are :mod:`mixq.eval_runs`).

Per model (the float reference, the mixed quant, the uniform baselines):

* calibrate's two held-out splits (never calibration tokens): text from other sources than the
  calibration mix (package docs and library code: the primary ``kl_mean``, ``ppl``, ...) and
  held-out documents of the calibration domains (in-distribution: ``id_kl_mean``, ...);
  per-token KL(reference || quant) (mean, p95, max; :func:`mixq.kl.token_kl`),
  perplexity, top-1 agreement with the reference;
* the probes of :mod:`mixq.probes`, answered greedily through the chat template, or the plain
  chat format of :mod:`mixq.chat` (continuous batching, as ``mlx_lm.batch_generate``); the
  capability score is the mean of the task scores;
* on-disk size (bytes of the safetensors files).

Every model runs in float32 activations. On CPU a quant's layers are dequantized to float32
(``mlx_lm.utils.dequantize_model``: same logits to float rounding, 10-20x faster than CPU
quantized matmuls); on a GPU the real quantized kernels run.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Mapping, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import load_tokenizer
from tqdm import tqdm

from mixq.artifacts import read_calibration
from mixq.chat import chat_tokens
from mixq.config import EvalConfig
from mixq.kl import kl_summary, reference_logits, split_chunks, token_kl
from mixq.memory import FORWARD_COPIES, logit_rows, vocab_size
from mixq.probes import Probe, make_probes, score
from mixq.runtime import for_this_device

log = logging.getLogger("mixq")

CHUNK_TOKENS = 1024  # most held-out tokens per forward pass (memory only, not results)
# calibrate's held-out split -> its metric key prefix: the other-source text gives the primary
# numbers (kl_mean, ...), the in-distribution split the id_ ones (id_kl_mean, ...)
HELDOUT_SPLITS = {"heldout_other": "", "heldout": "id_"}
HELDOUT_KEYS = tuple(f"{prefix}{key}" for prefix in HELDOUT_SPLITS.values()
                     for key in ("kl_mean", "kl_p95", "kl_max", "ppl", "top1"))


def load_for_eval(path: Path) -> tuple[nn.Module, Any, str]:
    """``mlx_lm.load`` a checkpoint in float32; returns (model, tokenizer, kernels), kernels as
    :func:`mixq.runtime.for_this_device` reports them."""
    model, tokenizer = mlx_lm.load(str(path))
    model.set_dtype(mx.float32)  # scales, biases, norms; packed weights stay uint32
    return model, tokenizer, for_this_device(model)


def checkpoint_bytes(path: Path) -> int:
    """On-disk size of a checkpoint's weights: its safetensors files, headers included."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def forward_logits(model: nn.Module, chunks: list[mx.array]) -> Iterator[mx.array]:
    """Float32 logits [B, T, V] of each chunk [B, T]."""
    for chunk in chunks:
        yield model(chunk).astype(mx.float32)


def record_logits(logits: Iterable[mx.array], n_tokens: int, path: Path) -> np.memmap:
    """The logits of every token, [n_tokens, V] float32, memory-mapped at ``path``."""
    rows, row = None, 0
    for z in logits:
        z = np.array(z.reshape(-1, z.shape[-1]))
        if rows is None:
            rows = np.lib.format.open_memmap(path, "w+", np.float32, (n_tokens, z.shape[-1]))
        rows[row : row + len(z)] = z
        row += len(z)
    rows.flush()
    return rows


def stored_logits(rows: np.ndarray, chunks: list[mx.array]) -> Iterator[np.ndarray]:
    """``rows`` of :func:`record_logits` cut back into the chunks' [B*T, V] token rows."""
    start = 0
    for chunk in chunks:
        yield rows[start : start + chunk.size]
        start += chunk.size


def heldout_metrics(
    logits: Iterable[mx.array], chunks: list[mx.array], reference: np.ndarray,
    groups: Optional[Mapping[str, np.ndarray]] = None,
) -> dict[str, float]:
    """KL(reference || model) per token (mean, p95, max), perplexity of the next tokens and top-1
    agreement with the reference, from the model's ``logits`` of ``chunks`` [B, T], computed in
    slices of :func:`mixq.memory.logit_rows` tokens. ``groups``: metric key prefix -> which
    tokens (bool [n_tokens], in chunk order) it summarizes; default all of them, no prefix."""
    kls, nlls, agree, last = [], [], [], []
    for chunk, z, z_ref in zip(chunks, logits, stored_logits(reference, chunks)):
        z = z.reshape(chunk.size, -1)
        targets = mx.array(np.roll(np.array(chunk).ravel(), -1))  # next token; unused at `last`
        step = logit_rows(z.shape[-1])
        for start in range(0, chunk.size, step):
            rows = slice(start, start + step)
            ref = reference_logits(mx.array(z_ref[rows]))
            kl = token_kl(ref, z[rows])
            logp = z[rows] - mx.logsumexp(z[rows], axis=-1, keepdims=True)
            nll = -mx.take_along_axis(logp, targets[rows, None], axis=-1)[:, 0]
            same = z[rows].argmax(-1) == ref.z.argmax(-1)
            mx.eval(kl, nll, same)
            kls.append(np.array(kl))
            nlls.append(np.array(nll))
            agree.append(np.array(same))
        last.append((np.arange(chunk.size) % chunk.shape[1]) == chunk.shape[1] - 1)
    kl, nll, same, last = map(np.concatenate, (kls, nlls, agree, last))
    metrics = {}
    for prefix, mask in (groups or {"": np.ones(len(kl), bool)}).items():
        summary = kl_summary(kl[mask])
        metrics.update({f"{prefix}kl_{k}": v for k, v in summary.items()})
        metrics[f"{prefix}ppl"] = math.exp(float(nll[mask & ~last].mean()))
        metrics[f"{prefix}top1"] = float(same[mask].mean())
    return metrics


def prompt_tokens(tokenizer: Any, probe: Probe) -> list[int]:
    """A probe's chat ready for the answer, rendered as calibration renders chats
    (:func:`mixq.chat.chat_tokens`: the chat template, else the plain format)."""
    return chat_tokens(tokenizer, probe.messages, probe.tools, add_generation_prompt=True)[0]


def generate_answers(
    model: nn.Module, tokenizer: Any, probes: list[Probe], prompts: list[list[int]],
    max_tokens: int, progress: tqdm,
) -> list[str]:
    """Greedy answers to ``probes`` (token ``prompts``) of at most ``max_tokens`` tokens (or a
    probe's own smaller cap), continuously batched by mlx-lm's ``BatchGenerator`` (the engine of
    ``batch_generate``); ``progress`` advances as each answer ends."""
    gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                         sampler=make_sampler(temp=0.0))
    limits = [min(max_tokens, p.max_tokens or max_tokens) for p in probes]
    uids = gen.insert(prompts, limits)
    tokens: dict[int, list[int]] = {uid: [] for uid in uids}
    try:
        while responses := gen.next_generated():
            for r in responses:
                if r.finish_reason != "stop":  # the EOS token is not part of the answer
                    tokens[r.uid].append(r.token)
                if r.finish_reason is not None:
                    progress.update()
    finally:
        gen.close()
    return [tokenizer.decode(tokens[uid]) for uid in uids]


def task_scores(probes: list[Probe], scores: list[float]) -> dict[str, float]:
    """Mean score per task, in the probes' task order, and ``capability``: their mean."""
    tasks = list(dict.fromkeys(p.task for p in probes))
    means = {t: float(np.mean([s for p, s in zip(probes, scores) if p.task == t])) for t in tasks}
    return {**means, "capability": float(np.mean(list(means.values())))}


@dataclass
class HeldOut:
    """The held-out tokens every model is scored on: ``chunks`` [B, T] of whole windows, and per
    metric key prefix (:data:`HELDOUT_SPLITS`) which of their tokens (bool [n_tokens], in chunk
    order) it summarizes."""

    chunks: list[mx.array]
    groups: dict[str, np.ndarray]

    @property
    def tokens(self) -> int:
        return sum(c.size for c in self.chunks)


def evaluate_model(
    name: str, path: Path, heldout: HeldOut, reference: Optional[np.ndarray],
    probes: list[Probe], prompts: list[list[int]], cfg: EvalConfig, work_dir: Path,
) -> dict[str, Any]:
    """Held-out metrics, probe answers and scores (none without ``probes``) of checkpoint
    ``name`` at ``path``. With ``reference`` None this is the reference: its logits are recorded
    (``work_dir``) first. Returns {"metrics", "answers", "scores", "seconds" (per part),
    "reference" (logits)}."""
    seconds = {}
    t = time.perf_counter()
    model, tokenizer, kernels = load_for_eval(path)
    seconds["load"] = time.perf_counter() - t

    t = time.perf_counter()
    chunks = heldout.chunks
    logits = tqdm(forward_logits(model, chunks), total=len(chunks), desc=f"{name} held-out",
                  unit="chunk")
    if reference is None:
        reference = record_logits(logits, heldout.tokens, work_dir / "reference_logits.npy")
        logits = (mx.array(rows) for rows in stored_logits(reference, chunks))
    metrics = heldout_metrics(logits, chunks, reference, heldout.groups)
    seconds["heldout"] = time.perf_counter() - t

    t = time.perf_counter()
    answers: list[str] = []
    if probes:
        with tqdm(total=len(probes), desc=f"{name} probes", unit="probe") as progress:
            answers = generate_answers(model, tokenizer, probes, prompts, cfg.max_tokens,
                                       progress)
    seconds["generate"] = time.perf_counter() - t

    t = time.perf_counter()
    scores = [score(p, a) for p, a in zip(probes, answers)]
    seconds["score"] = time.perf_counter() - t
    if probes:
        metrics.update(task_scores(probes, scores))
    metrics["size_bytes"] = checkpoint_bytes(path)
    metrics["kernels"] = kernels
    return {"metrics": metrics, "answers": answers, "scores": scores, "seconds": seconds,
            "reference": reference}


def eval_inputs(
    reference_dir: Path, calibration_dir: Path, cfg: EvalConfig
) -> tuple[HeldOut, list[Probe], list[list[int]]]:
    """What every model is evaluated on: calibrate's two held-out splits
    (:data:`HELDOUT_SPLITS`) in chunks [B, T] of whole windows, about :data:`CHUNK_TOKENS` tokens
    or fewer if their logits would not fit the memory budget (:mod:`mixq.memory`), the probes
    of ``cfg`` and their prompt tokens (the reference's tokenizer and chat template)."""
    calibration = read_calibration(calibration_dir)
    windows = [calibration.split(split)[0] for split in HELDOUT_SPLITS]
    owner = np.concatenate([np.full(w.size, i) for i, w in enumerate(windows)])
    groups = {prefix: owner == i for i, prefix in enumerate(HELDOUT_SPLITS.values())}
    tokenizer = load_tokenizer(reference_dir)
    probes = make_probes(cfg, lambda text: len(tokenizer.encode(text, add_special_tokens=False)))
    prompts = [prompt_tokens(tokenizer, p) for p in probes]
    per_forward = min(CHUNK_TOKENS, logit_rows(vocab_size(reference_dir), FORWARD_COPIES))
    return HeldOut(split_chunks(np.concatenate(windows), per_forward), groups), probes, prompts


def tasks_at_chance(probes: list[Probe], scores: list[float]) -> dict[str, str]:
    """Tasks the reference scored nothing on (every probe task is generative: chance is 0),
    with the reason: no quant of it can be told apart there, so they are not asked."""
    means = task_scores(probes, scores)
    counts = {t: sum(p.task == t for p in probes) for t in means if t != "capability"}
    return {t: f"the float reference scored 0 of {n}" for t, n in counts.items() if means[t] == 0}


def evaluate_checkpoints(
    checkpoints: Mapping[str, Path], heldout: HeldOut, probes: list[Probe],
    prompts: list[list[int]], probed: Collection[str], cfg: EvalConfig,
) -> dict[str, dict[str, Any]]:
    """:func:`evaluate_model` of every checkpoint (name -> dir) in order, the first being the
    reference whose logits the others are compared with; only the ``probed`` ones answer the
    probes; with ``cfg.skip_at_chance`` (and the reference probed) only those of tasks the
    reference did not score 0 on: the others are listed with the reason as the reference's
    ``skipped_tasks``. Returns name -> result without logits."""
    models: dict[str, dict] = {}
    reference = None
    with tempfile.TemporaryDirectory(prefix="mixq-eval-") as tmp:
        for name, path in checkpoints.items():
            asked = probes if name in probed else []
            result = evaluate_model(name, Path(path), heldout, reference, asked, prompts, cfg,
                                    Path(tmp))
            if reference is None and asked and cfg.skip_at_chance:
                result["skipped_tasks"] = skipped = tasks_at_chance(asked, result["scores"])
                kept = [i for i, p in enumerate(probes) if p.task not in skipped]
                probes, prompts = [probes[i] for i in kept], [prompts[i] for i in kept]
                for key in ("answers", "scores"):  # the probes every model answers, in order
                    result[key] = [result[key][i] for i in kept]
                result["metrics"].pop("capability")  # the mean over the tasks still asked
                if kept:
                    capability = task_scores(probes, result["scores"])["capability"]
                    result["metrics"]["capability"] = capability
                if skipped:
                    log.info("not asked of the quants: %s", skipped)
            reference = result.pop("reference")
            models[name] = result
            log.info("%s: %s", name, {k: v for k, v in result["metrics"].items()
                                       if k in HELDOUT_KEYS + ("capability",)})
        del reference  # the memory map, before its file goes
    return models
