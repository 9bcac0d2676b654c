"""Calibration data: per-domain documents packed into fixed token windows.

The ``calibration`` windows feed the per-layer sensitivity (KL) measurement; the ``heldout``
windows come from other documents of the same domains and are kept for evaluation. Documents
come from ``CalibrationConfig.source`` (:mod:`mixq.documents`): ``builtin``, ``files`` or ``hf``.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from mixq.chat import PLAIN_FORMAT, chat_tokens
from mixq.config import CalibrationConfig, as_dict
from mixq.documents import (
    CalibrationError,
    check_domain,
    check_source,
    configured_file,
    document_stream,
)

log = logging.getLogger("mixq")

SPLITS = ("calibration", "heldout")
SPLIT_FILES = {"calibration": "calibration.safetensors", "heldout": "heldout.safetensors"}
SPLIT_KEYS = {
    "calibration": ("tokens", "domain_ids"),
    "heldout": ("heldout_tokens", "heldout_domain_ids"),
}
EXCERPT_CHARS = 300


@dataclass
class CalibrationSet:
    """Token windows (int32 ``[n, seq_len]``) and their domain (int32 ``[n]``, an index into
    ``domains``), for both splits, plus what the manifest reports about them."""

    domains: list[str]
    tokens: np.ndarray
    domain_ids: np.ndarray
    heldout_tokens: np.ndarray
    heldout_domain_ids: np.ndarray
    documents: dict[str, dict[str, int]]  # domain -> split -> source documents used
    tokenizer: dict[str, Any]  # vocab_size, eos_token_id, chat_template_sha256
    excerpts: dict[str, str]  # domain -> start of its first decoded calibration window
    renderings: dict[str, dict[str, int]]  # domain -> rendering (mixq.chat) -> documents

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens, domain_ids)`` of the ``calibration`` or ``heldout`` split."""
        if name == "calibration":
            return self.tokens, self.domain_ids
        return self.heldout_tokens, self.heldout_domain_ids


def check_config(cfg: CalibrationConfig, max_context: int) -> None:
    """Raise :class:`CalibrationError` for settings that cannot produce a calibration set."""
    check_source(cfg)
    if not cfg.domains:
        raise CalibrationError("calibration.domains: no domains listed")
    for domain in cfg.domains:
        check_domain(domain)
        if cfg.domains.count(domain) > 1:
            raise CalibrationError(f"calibration.domains: {domain!r} is listed twice")
        if cfg.source != "builtin":
            configured_file(cfg, domain)
    if cfg.samples_per_domain < 1:
        raise CalibrationError(
            f"calibration.samples_per_domain must be >= 1, got {cfg.samples_per_domain}"
        )
    if cfg.heldout_per_domain < 0:
        raise CalibrationError(
            f"calibration.heldout_per_domain must be >= 0, got {cfg.heldout_per_domain}"
        )
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


def build_domain(
    tokenizer: Any, cfg: CalibrationConfig, domain: str, progress: tqdm
) -> tuple[dict, dict, dict]:
    """Windows and document counts per split for one domain, and how many documents were
    rendered each way. Each document goes, whole, to the split that is least filled relative to
    its need, so the splits share no document."""
    needs = {
        "calibration": cfg.samples_per_domain * cfg.seq_len,
        "heldout": cfg.heldout_per_domain * cfg.seq_len,
    }
    streams: dict[str, list[int]] = {split: [] for split in SPLITS}
    documents = dict.fromkeys(SPLITS, 0)
    renderings: dict[str, int] = {}
    progress.set_description(domain)
    for document in document_stream(cfg, domain):
        split = min(
            (s for s in SPLITS if len(streams[s]) < needs[s]),
            key=lambda s: len(streams[s]) / needs[s],
        )
        before = len(streams[split])
        ids, rendering = tokenize(tokenizer, document)
        streams[split] += ids + [tokenizer.eos_token_id]
        documents[split] += 1
        renderings[rendering] = renderings.get(rendering, 0) + 1
        progress.update(min(len(streams[split]), needs[split]) - before)
        if all(len(streams[s]) >= needs[s] for s in SPLITS):
            break
    else:
        have = ", ".join(f"{len(streams[s])}/{needs[s]} {s} tokens" for s in SPLITS)
        raise CalibrationError(
            f"calibration.{domain}: not enough text: {sum(documents.values())} documents give "
            f"{have}; add documents or lower samples_per_domain, heldout_per_domain or seq_len"
        )
    windows = {
        s: np.asarray(streams[s][: needs[s]], dtype=np.int32).reshape(-1, cfg.seq_len)
        for s in SPLITS
    }
    return windows, documents, renderings


def build_calibration(tokenizer: Any, cfg: CalibrationConfig, max_context: int) -> CalibrationSet:
    """Calibration and held-out windows for every domain of ``cfg`` (see the module docstring).

    ``tokenizer`` is a Hugging Face tokenizer or mlx_lm's ``TokenizerWrapper``; ``max_context``
    is the model's maximum number of positions. Raises :class:`CalibrationError` on bad settings
    or data, before anything is written.
    """
    check_config(cfg, max_context)
    if tokenizer.eos_token_id is None:
        raise CalibrationError("tokenizer: no EOS token to separate documents with")
    started = time.perf_counter()
    tokens_per_domain = (cfg.samples_per_domain + cfg.heldout_per_domain) * cfg.seq_len
    windows: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    documents, excerpts, renderings = {}, {}, {}
    with tqdm(
        total=tokens_per_domain * len(cfg.domains), unit="tok", desc="calibration"
    ) as progress:
        for domain in cfg.domains:
            domain_started = time.perf_counter()
            domain_windows, documents[domain], renderings[domain] = build_domain(
                tokenizer, cfg, domain, progress
            )
            for split in SPLITS:
                windows[split].append(domain_windows[split])
            first_window = domain_windows["calibration"][0].tolist()
            excerpts[domain] = tokenizer.decode(first_window)[:EXCERPT_CHARS]
            log.info(
                "%s: %d calibration + %d held-out windows of %d tokens "
                "from %d + %d documents (%.2fs)",
                domain,
                cfg.samples_per_domain,
                cfg.heldout_per_domain,
                cfg.seq_len,
                documents[domain]["calibration"],
                documents[domain]["heldout"],
                time.perf_counter() - domain_started,
            )
    counts = {"calibration": cfg.samples_per_domain, "heldout": cfg.heldout_per_domain}
    ids = {s: np.repeat(np.arange(len(cfg.domains), dtype=np.int32), counts[s]) for s in SPLITS}
    calibration = CalibrationSet(
        domains=list(cfg.domains),
        tokens=np.concatenate(windows["calibration"]),
        domain_ids=ids["calibration"],
        heldout_tokens=np.concatenate(windows["heldout"]),
        heldout_domain_ids=ids["heldout"],
        documents=documents,
        tokenizer=tokenizer_info(tokenizer),
        excerpts=excerpts,
        renderings=renderings,
    )
    log.info(
        "built %d calibration and %d held-out windows (%d tokens) in %.1fs",
        len(calibration.tokens),
        len(calibration.heldout_tokens),
        calibration.tokens.size + calibration.heldout_tokens.size,
        time.perf_counter() - started,
    )
    return calibration


def content_hash(*arrays: np.ndarray) -> str:
    """sha256 of the arrays' int32 little-endian bytes."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array, dtype="<i4").tobytes())
    return digest.hexdigest()


def manifest(cal: CalibrationSet, tokenizer_name: str, cfg: CalibrationConfig) -> dict:
    """What ``manifest.json`` records: counts and hashes per split and per domain, the tokenizer
    and the configuration."""
    splits, per_domain = {}, {domain: {} for domain in cal.domains}
    for split in SPLITS:
        tokens, ids = cal.split(split)
        splits[split] = {
            "file": SPLIT_FILES[split],
            "sequences": len(tokens),
            "tokens": int(tokens.size),
            "sha256": content_hash(tokens, ids),
        }
        for index, domain in enumerate(cal.domains):
            rows = tokens[ids == index]
            per_domain[domain][split] = {
                "sequences": len(rows),
                "tokens": int(rows.size),
                "documents": cal.documents[domain][split],
                "sha256": content_hash(rows),
            }
    return {
        "seq_len": cal.seq_len,
        "domains": cal.domains,
        "splits": splits,
        "per_domain": per_domain,
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
        "| domain | calibration windows | calibration tokens | calibration documents "
        "| held-out windows | held-out tokens | held-out documents | documents rendered as |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for domain, splits in info["per_domain"].items():
        cells = [f"{splits[s][k]}" for s in SPLITS for k in ("sequences", "tokens", "documents")]
        rendered = ", ".join(f"{how} {n}" for how, n in info["renderings"][domain].items())
        lines.append(f"| {domain} | {' | '.join(cells)} | {rendered} |")
    lines += ["", "Chats rendered `plain` (no chat template, or it rejects the chat): "
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
    """Write ``calibration.safetensors``, ``heldout.safetensors``, ``manifest.json`` and
    ``preview.md`` to ``out_dir``, atomically: built in ``<out_dir>.tmp``, renamed at the end."""
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for split in SPLITS:  # no safetensors metadata: its key order varies, the bytes would too
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


def read_calibration(directory: Path) -> CalibrationSet:
    """The :class:`CalibrationSet` that :func:`write_calibration` wrote to ``directory``."""
    directory = Path(directory)
    info = json.loads((directory / "manifest.json").read_text())
    arrays = {}
    for split in SPLITS:
        arrays.update(load_file(str(directory / SPLIT_FILES[split])))
    tokenizer = {k: v for k, v in info["tokenizer"].items() if k != "name"}
    documents = {
        d: {s: splits[s]["documents"] for s in SPLITS} for d, splits in info["per_domain"].items()
    }
    return CalibrationSet(
        domains=info["domains"],
        documents=documents,
        tokenizer=tokenizer,
        excerpts=info["excerpts"],
        renderings=info.get("renderings", {}),  # not in manifests before chat renderings
        **arrays,
    )
