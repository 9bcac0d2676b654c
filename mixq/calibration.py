"""Calibration data: per-domain documents packed into fixed token windows.

Four splits of windows, no document in two of them:

* ``calibration``: feeds the per-layer sensitivity (KL) measurement;
* ``refine``: the training windows of the refine stage (distilled scales and biases), more
  text than the measurement needs (``refine_per_domain``);
* ``heldout``: other documents of the same domains, for evaluation (in-distribution);
* ``heldout_other``: held-out text from **other sources** than the calibration mix, the same
  for every calibration setting: the documentation and source code of pinned packages
  (:func:`mixq.corpus.other_source_documents`). Evaluation's primary numbers come from it.

Domain documents come from ``CalibrationConfig.source`` (:mod:`mixq.documents`): ``builtin``,
``files`` or ``hf``.

A document is ``{"text": str}`` (tokenized as is) or ``{"messages": [...], "tools": [...]}`` (a
chat in the Hugging Face format, rendered by :mod:`mixq.chat`: the tokenizer's chat template, or
a documented plain format where there is none or it rejects the chat; the manifest counts per
domain how its documents were rendered). Each split's
documents are tokenized, joined with the EOS token and cut into windows of ``seq_len`` tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from mixq.artifacts import ALL_SPLITS, SPLIT_FILES, SPLIT_KEYS, SPLITS, CalibrationSet
from mixq.chat import PLAIN_FORMAT, chat_tokens
from mixq.config import CalibrationConfig, as_dict
from mixq.corpus import OTHER_SOURCE_PACKAGES, OTHER_SOURCES, other_source_documents
from mixq.documents import (
    CalibrationError,
    configured_file,
    document_stream,
)

log = logging.getLogger("mixq")

EXCERPT_CHARS = 300


def check_config(cfg: CalibrationConfig, max_context: int) -> None:
    """Raise :class:`CalibrationError` for settings that cannot produce a calibration set."""
    if not cfg.domains:
        raise CalibrationError("calibration.domains: no domains listed")
    for domain in cfg.domains:  # source and domain names: checked by CalibrationConfig
        if cfg.domains.count(domain) > 1:
            raise CalibrationError(f"calibration.domains: {domain!r} is listed twice")
        if cfg.source != "builtin":
            configured_file(cfg, domain)
    if cfg.samples_per_domain < 1:
        raise CalibrationError(
            f"calibration.samples_per_domain must be >= 1, got {cfg.samples_per_domain}"
        )
    for key in ("refine_per_domain", "heldout_per_domain", "heldout_other_per_source"):
        if getattr(cfg, key) < 0:
            raise CalibrationError(f"calibration.{key} must be >= 0, got {getattr(cfg, key)}")
    if not 1 <= cfg.seq_len <= max_context:
        raise CalibrationError(
            f"calibration.seq_len={cfg.seq_len} must be between 1 and the model's context "
            f"length {max_context}"
        )
    if cfg.source == "hf" and not cfg.hf_repo:
        raise CalibrationError("calibration.hf_repo: not set (source=hf needs a dataset repo id)")


def tokenize(tokenizer: Any, document: dict) -> tuple[list[int], str]:
    """``(token ids, rendering)`` of a document: ``encode`` for text (with the tokenizer's own
    special tokens, such as a BOS; rendering ``text``), :func:`mixq.chat.chat_tokens` for
    messages (rendering ``template``, ``template-alternating`` or ``plain``)."""
    if "text" in document:
        return list(tokenizer.encode(document["text"])), "text"
    return chat_tokens(tokenizer, document["messages"], document.get("tools"))


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    template = getattr(tokenizer, "chat_template", None)
    template_hash = hashlib.sha256(str(template).encode()).hexdigest() if template else None
    return {
        "vocab_size": len(tokenizer.get_vocab()),
        "eos_token_id": tokenizer.eos_token_id,
        "chat_template_sha256": template_hash,
    }


def window_counts(cfg: CalibrationConfig) -> dict[str, int]:
    """Windows per domain of each per-domain split (:data:`SPLITS`)."""
    return {"calibration": cfg.samples_per_domain, "refine": cfg.refine_per_domain,
            "heldout": cfg.heldout_per_domain}


def fill_splits(
    tokenizer: Any, documents: Iterator[dict], windows: Mapping[str, int], seq_len: int,
    progress: tqdm, label: str,
) -> tuple[dict, dict, dict]:
    """``windows[split]`` windows of ``seq_len`` tokens per split from ``documents``; returns
    (split -> int32 [windows, seq_len], split -> documents used, rendering -> documents). Each
    document goes, whole, to the split that is least filled relative to its need, so the
    splits share no document; documents are joined with the EOS token. Raises
    :class:`CalibrationError` (naming ``label``) when the documents run out first."""
    needs = {split: n * seq_len for split, n in windows.items()}
    streams: dict[str, list[int]] = {split: [] for split in needs}
    used = dict.fromkeys(needs, 0)
    renderings: dict[str, int] = {}

    def full() -> bool:
        return all(len(streams[s]) >= needs[s] for s in needs)

    for document in () if full() else documents:
        split = min(
            (s for s in needs if len(streams[s]) < needs[s]),
            key=lambda s: len(streams[s]) / needs[s],
        )
        before = len(streams[split])
        ids, rendering = tokenize(tokenizer, document)
        streams[split] += ids + [tokenizer.eos_token_id]
        used[split] += 1
        renderings[rendering] = renderings.get(rendering, 0) + 1
        progress.update(min(len(streams[split]), needs[split]) - before)
        if full():
            break
    if not full():
        have = ", ".join(f"{len(streams[s])}/{needs[s]} {s} tokens" for s in needs)
        raise CalibrationError(
            f"{label}: not enough text: {sum(used.values())} documents give {have}; add "
            "documents or lower the windows asked of it or seq_len"
        )
    packed = {s: np.asarray(streams[s][: needs[s]], dtype=np.int32).reshape(-1, seq_len)
              for s in needs}
    return packed, used, renderings


def build_calibration(tokenizer: Any, cfg: CalibrationConfig, max_context: int) -> CalibrationSet:
    """The windows of every split (see the module docstring): per domain of ``cfg``, and the
    other-source held-out windows.

    ``tokenizer`` is a Hugging Face tokenizer or mlx_lm's ``TokenizerWrapper``; ``max_context``
    is the model's maximum number of positions. Raises :class:`CalibrationError` on bad settings
    or data, before anything is written.
    """
    check_config(cfg, max_context)
    if tokenizer.eos_token_id is None:
        raise CalibrationError("tokenizer: no EOS token to separate documents with")
    started = time.perf_counter()
    counts = window_counts(cfg)
    total = (sum(counts.values()) * len(cfg.domains)
             + cfg.heldout_other_per_source * len(OTHER_SOURCES)) * cfg.seq_len
    windows: dict[str, list[np.ndarray]] = {split: [] for split in ALL_SPLITS}
    documents, excerpts, renderings = {}, {}, {}
    with tqdm(total=total, unit="tok", desc="calibration") as progress:
        for domain in cfg.domains:
            domain_started = time.perf_counter()
            progress.set_description(domain)
            packed, documents[domain], renderings[domain] = fill_splits(
                tokenizer, document_stream(cfg, domain), counts, cfg.seq_len, progress,
                f"calibration.{domain}")
            for split in SPLITS:
                windows[split].append(packed[split])
            excerpts[domain] = tokenizer.decode(packed["calibration"][0].tolist())[:EXCERPT_CHARS]
            log.info("%s: %s windows of %d tokens from %s documents (%.2fs)", domain,
                     " + ".join(f"{n} {s}" for s, n in counts.items()), cfg.seq_len,
                     " + ".join(str(n) for n in documents[domain].values()),
                     time.perf_counter() - domain_started)
        for source in OTHER_SOURCES:
            progress.set_description(f"held-out {source}")
            packed, documents[source], _ = fill_splits(
                tokenizer, other_source_documents(source),
                {"heldout_other": cfg.heldout_other_per_source}, cfg.seq_len, progress,
                f"calibration.heldout_other_per_source ({source})")
            windows["heldout_other"].append(packed["heldout_other"])
    counts["heldout_other"] = cfg.heldout_other_per_source
    sources = {split: list(OTHER_SOURCES if split == "heldout_other" else cfg.domains)
               for split in ALL_SPLITS}
    arrays = {}
    for split, (tokens_key, ids_key) in SPLIT_KEYS.items():
        arrays[tokens_key] = np.concatenate(windows[split])
        arrays[ids_key] = np.repeat(np.arange(len(sources[split]), dtype=np.int32),
                                    counts[split])
    calibration = CalibrationSet(
        domains=list(cfg.domains),
        other_sources=list(OTHER_SOURCES),
        documents=documents,
        tokenizer=tokenizer_info(tokenizer),
        excerpts=excerpts,
        renderings=renderings,
        **arrays,
    )
    log.info("built %s windows in %.1fs",
             ", ".join(f"{len(calibration.split(s)[0])} {s}" for s in ALL_SPLITS),
             time.perf_counter() - started)
    return calibration


def content_hash(*arrays: np.ndarray) -> str:
    """sha256 of the arrays' int32 little-endian bytes."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array, dtype="<i4").tobytes())
    return digest.hexdigest()


def manifest(cal: CalibrationSet, tokenizer_name: str, cfg: CalibrationConfig) -> dict:
    """What ``manifest.json`` records: counts and hashes per split, per domain and per other
    source, the tokenizer and the configuration."""
    splits = {}
    for split in ALL_SPLITS:
        tokens, ids = cal.split(split)
        splits[split] = {"file": SPLIT_FILES[split], "sequences": len(tokens),
                         "tokens": int(tokens.size), "sha256": content_hash(tokens, ids)}

    def counts(names: list[str], split_names: tuple[str, ...]) -> dict:
        out: dict[str, dict] = {name: {} for name in names}
        for split in split_names:
            tokens, ids = cal.split(split)
            for index, name in enumerate(names):
                rows = tokens[ids == index]
                out[name][split] = {"sequences": len(rows), "tokens": int(rows.size),
                                    "documents": cal.documents[name][split],
                                    "sha256": content_hash(rows)}
        return out

    return {
        "seq_len": cal.seq_len,
        "domains": cal.domains,
        "other_sources": cal.other_sources,
        "other_source_packages": list(OTHER_SOURCE_PACKAGES),
        "splits": splits,
        "per_domain": counts(cal.domains, SPLITS),
        "per_other_source": counts(cal.other_sources, ("heldout_other",)),
        "excerpts": cal.excerpts,
        "renderings": cal.renderings,
        "plain_chat_format": PLAIN_FORMAT,
        "tokenizer": {"name": tokenizer_name, **cal.tokenizer},
        "config": as_dict(cfg),
    }


def preview(info: dict) -> str:
    """``preview.md``: a table of counts per domain and the start of each domain's first window."""
    lines = [
        "# Calibration preview",
        "",
        f"Tokenizer `{info['tokenizer']['name']}`, {info['seq_len']} tokens per window, "
        f"source `{info['config']['source']}`, seed {info['config']['seed']}.",
        "",
        "Windows / documents per split:",
        "",
        f"| domain | {' | '.join(SPLITS)} | documents rendered as |",
        f"|---|{'---:|' * len(SPLITS)}---|",
    ]
    for domain, splits in info["per_domain"].items():
        cells = [f"{splits[s]['sequences']} / {splits[s]['documents']}" for s in SPLITS]
        rendered = ", ".join(f"{how} {n}" for how, n in info["renderings"][domain].items())
        lines.append(f"| {domain} | {' | '.join(cells)} | {rendered} |")
    other = ", ".join(f"{name} {splits['heldout_other']['sequences']} windows / "
                      f"{splits['heldout_other']['documents']} documents"
                      for name, splits in info["per_other_source"].items())
    lines += ["", f"Held-out text from other sources (`heldout_other`, the docs and code of "
              f"{', '.join(info['other_source_packages'])}): {other}.",
              "", "Chats rendered `plain` (no chat template, or it rejects the chat): "
              f"{info['plain_chat_format']}."]
    for domain, excerpt in info["excerpts"].items():
        lines += [
            "",
            f"## {domain}",
            "",
            f"First {EXCERPT_CHARS} characters of the first calibration window:",
            "",
            "~~~~text",
            excerpt,
            "~~~~",
        ]
    return "\n".join(lines) + "\n"


def write_calibration(
    cal: CalibrationSet, out_dir: Path, tokenizer_name: str, cfg: CalibrationConfig
) -> None:
    """Write ``<split>.safetensors`` of every split, ``manifest.json`` and ``preview.md`` to
    ``out_dir``, atomically: built in ``<out_dir>.tmp``, renamed at the end."""
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for split in ALL_SPLITS:  # no safetensors metadata: its key order varies, the bytes would too
            save_file(
                dict(zip(SPLIT_KEYS[split], cal.split(split))), str(staging / SPLIT_FILES[split])
            )
        info = manifest(cal, tokenizer_name, cfg)
        (staging / "manifest.json").write_text(json.dumps(info, indent=2) + "\n")
        (staging / "preview.md").write_text(preview(info))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    sizes = ", ".join(f"{p.name} {p.stat().st_size:,} B" for p in sorted(out_dir.iterdir()))
    log.info("wrote %s: %s", out_dir, sizes)
