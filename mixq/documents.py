"""Calibration documents: where each domain's documents come from and which records count.

``CalibrationConfig.source`` is ``builtin`` (:mod:`mixq.corpus`), ``files`` (one ``.jsonl`` or
``.txt`` file per domain) or ``hf`` (such files in a Hugging Face dataset repo). A document is
``{"text": str}`` or ``{"messages": [...], "tools": [...]}`` (a chat in the Hugging Face format).
Documents come in a seeded order that does not depend on how many are asked for.
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from typing import Any, Iterator

from mixq.config import DOMAINS, CalibrationConfig
from mixq.corpus import builtin_documents

log = logging.getLogger("mixq")

FIRST_FETCH = 16  # documents loaded at first; the count doubles while a domain needs more text


class CalibrationError(ValueError):
    """Invalid calibration settings or data; the message names the key, domain or file."""


def check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise CalibrationError(
            f"calibration.domains: unknown domain {domain!r} (known: {', '.join(DOMAINS)})"
        )


def configured_file(cfg: CalibrationConfig, domain: str) -> str:
    """The file set for ``domain`` in ``calibration.files`` or ``calibration.hf_files``."""
    key = "files" if cfg.source == "files" else "hf_files"
    name = getattr(cfg, key).get(domain)
    if not name:
        raise CalibrationError(
            f"calibration.{key}.{domain}: no file configured for domain {domain!r}"
        )
    return name


def load_documents(cfg: CalibrationConfig, domain: str, count: int) -> list[dict]:
    """The first ``count`` documents of ``domain`` in seeded order (fewer when the source has
    fewer). The order does not depend on ``count``, so a larger count only appends documents."""
    check_domain(domain)
    if cfg.source == "builtin":
        return builtin_documents(domain, cfg.seed, count)
    if cfg.source == "files":
        path = Path(configured_file(cfg, domain))
        label = f"calibration.files.{domain} ({path})"
    else:
        path = download(cfg, domain)
        label = f"calibration.hf_files.{domain} ({cfg.hf_repo}/{configured_file(cfg, domain)})"
    documents = read_documents(path, label)
    random.Random(f"{domain}:{cfg.seed}").shuffle(documents)
    return documents[:count]


def download(cfg: CalibrationConfig, domain: str) -> Path:
    """``hf_files[domain]`` from the ``hf_repo`` dataset (or the local Hugging Face cache)."""
    from huggingface_hub import hf_hub_download

    filename = configured_file(cfg, domain)
    where = f"{filename} from dataset {cfg.hf_repo}@{cfg.hf_revision or 'main'}"
    try:
        return Path(
            hf_hub_download(
                repo_id=cfg.hf_repo,
                repo_type="dataset",
                filename=filename,
                revision=cfg.hf_revision,
            )
        )
    except (OSError, ValueError) as err:  # unreachable/offline, missing repo or file, bad id
        raise CalibrationError(
            f"calibration.hf_files.{domain}: cannot download {where}: {err}"
        ) from err


def read_documents(path: Path, label: str) -> list[dict]:
    """The usable documents of a ``.jsonl`` (one ``{"text"}`` or ``{"messages"}`` object per
    line) or ``.txt`` (paragraphs separated by blank lines) file. Records without usable text are
    skipped with a warning; a file with none is an error."""
    if path.suffix not in (".jsonl", ".txt"):
        raise CalibrationError(
            f"{label}: unsupported file type {path.suffix!r} (use .jsonl or .txt)"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise CalibrationError(f"{label}: cannot read the file ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise CalibrationError(
            f"{label}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start})"
        ) from None
    if not text.strip():
        raise CalibrationError(f"{label}: file is empty")
    if path.suffix == ".txt":
        records: list[Any] = [{"text": p} for p in re.split(r"\n\s*\n", text.strip())]
    else:
        records = [
            parse_line(line, number, label)
            for number, line in enumerate(text.splitlines(), 1)
            if line.strip()
        ]
    documents = [r for r in records if is_document(r)]
    if not documents:
        raise CalibrationError(f"{label}: no usable samples (need non-empty 'text' or 'messages')")
    if len(documents) < len(records):
        log.warning(
            "%s: skipped %d of %d records without usable text",
            label,
            len(records) - len(documents),
            len(records),
        )
    return documents


def parse_line(line: str, number: int, label: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise CalibrationError(f"{label}: line {number} is not valid JSON ({err.msg})") from None


def is_document(record: Any) -> bool:
    """A non-empty ``{"text": str}``, or ``{"messages": [...]}`` whose items all have a string
    role and a string (or missing, for tool calls) content."""
    if not isinstance(record, dict):
        return False
    if isinstance(record.get("text"), str):
        return bool(record["text"].strip())
    messages = record.get("messages")
    return (
        isinstance(messages, list)
        and bool(messages)
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
        and all(isinstance(m.get("content", ""), str) for m in messages)
        and isinstance(record.get("tools", []), list)
    )


def document_stream(cfg: CalibrationConfig, domain: str) -> Iterator[dict]:
    """The distinct documents of ``domain`` in seeded order, loaded in growing batches on demand
    (a repeated document is skipped, so it cannot end up in both splits)."""
    count, done, seen = FIRST_FETCH, 0, set()
    while True:
        documents = load_documents(cfg, domain, count)
        for document in documents[done:]:
            key = json.dumps(document, sort_keys=True)
            if key not in seen:
                seen.add(key)
                yield document
        if len(documents) < count:
            return
        done, count = len(documents), count * 2
