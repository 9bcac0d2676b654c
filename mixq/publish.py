"""publish: the Hugging Face repo folder of the quant, and its upload.

The folder is ``outputs/quant`` copied byte for byte (weights, config, tokenizer, ``mixq/``
sidecar) plus, in the sidecar, what the card reports: the source record (with the base model
and license), the calibration manifest, the eval metrics and the params; and the ``README.md``
card rendered from those files (:mod:`mixq.card`). The upload is one ``upload_folder`` commit,
made only after ``whoami`` has accepted the token, on the endpoint huggingface_hub is configured
for (``HF_ENDPOINT``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

import mixq
from mixq.card import render_card
from mixq.config import Config, as_dict
from mixq.io import read_json, write_json
from mixq.prepare import EMBEDDED_MODELS

log = logging.getLogger("mixq")

DEFAULT_NAMESPACE = "mixq"  # of the derived repo id: mixq/<model name>-mixq
# the params that determine the quantized weights (hashed), and those the card shows
HASHED_SECTIONS = ("model", "calibration", "quant", "measure", "refine")
# How the work was split, not what it computed: sharded measure-kl writes the unsharded table.
UNHASHED_KEYS = {"measure": ("shards", "shard_ids")}
CARD_SECTIONS = (*HASHED_SECTIONS, "eval")


class PublishError(RuntimeError):
    """The upload cannot start or was refused (no token, Hub unreachable, token rejected)."""


def params_hash(cfg: Config) -> str:
    """12 hex digits of the sha256 of :data:`HASHED_SECTIONS` of ``cfg`` (less
    :data:`UNHASHED_KEYS`) as canonical JSON."""
    sections = {name: as_dict(getattr(cfg, name)) for name in HASHED_SECTIONS}
    for name, keys in UNHASHED_KEYS.items():
        sections[name] = {k: v for k, v in sections[name].items() if k not in keys}
    text = json.dumps(sections, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def commit_message(cfg: Config) -> str:
    return f"Upload a mixq {mixq.__version__} quant (params hash {params_hash(cfg)})"


def base_model(source: Mapping[str, Any]) -> str | None:
    """The Hub repo the source weights come from; None for a local directory."""
    if source["kind"] == "embedded":
        return EMBEDDED_MODELS[source["id"]].base_model
    return source["id"] if source["kind"] == "hub" else None


def source_license(source: Mapping[str, Any]) -> str | None:
    """The licence the source says: an embedded GGUF's ``general.license``, recorded by
    prepare-model; None (unknown) for anything else."""
    return (source.get("gguf") or {}).get("license")


def publish_repo_id(cfg: Config, source: Mapping[str, Any]) -> str:
    """``publish.repo_id``, or derived from the model: ``mixq/<name>-mixq`` with the name of its
    base model's repo, else of the hub repo or local directory (``mixq/gemma-3-270m-mixq``)."""
    if cfg.publish.repo_id:
        return cfg.publish.repo_id
    name = (base_model(source) or source["id"]).rstrip("/").rsplit("/", 1)[-1]
    return f"{DEFAULT_NAMESPACE}/{name}-mixq"


def copy_files(src: Path, dst: Path) -> None:
    """Copy every file under ``src`` into ``dst`` by content: no links into DVC's cache and no
    read-only modes carried over."""
    for f in sorted(src.rglob("*")):
        if f.is_file():
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)


def build_folder(
    out_dir: Path, cfg: Config, quant_dir: Path, source_file: Path, manifest: Path, metrics: Path,
    kv_config: Path | None = None,
) -> str:
    """Fill ``out_dir`` with the repo: ``quant_dir``'s files, the completed ``mixq/`` sidecar
    (with ``kv_config`` when given) and ``README.md``; returns the repo id
    (:func:`publish_repo_id`)."""
    copy_files(quant_dir, out_dir)
    sidecar = out_dir / "mixq"
    source = read_json(source_file)
    repo = publish_repo_id(cfg, source)
    write_json(
        sidecar / "source.json",
        {**source, "base_model": base_model(source), "license": source_license(source)},
    )
    shutil.copyfile(manifest, sidecar / "calibration.json")
    shutil.copyfile(metrics, sidecar / "eval.json")
    if kv_config is not None:
        shutil.copyfile(kv_config, sidecar / "kv_config.json")
    write_json(sidecar / "params.json", {
        "mixq_version": mixq.__version__,
        "repo_id": repo,
        "params_hash": params_hash(cfg),
        "hashed_sections": list(HASHED_SECTIONS),
        "params": {name: as_dict(getattr(cfg, name)) for name in CARD_SECTIONS},
    })
    (out_dir / "README.md").write_text(render_card(out_dir))
    return repo


def push_folder(
    folder: Path, repo_id: str, private: bool, message: str, token: str | None
) -> str:
    """Upload ``folder`` to the model repo ``repo_id`` (created if missing) as one commit and
    return the commit URL. Nothing is sent without ``token``, and nothing is created before
    ``whoami`` has accepted it as a write token; a private=True upload never goes to an
    existing public repo. Failures raise :class:`PublishError` (the token never in it)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from huggingface_hub import ModelCard
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not token:
        raise PublishError(
            "publish.push is true but HF_TOKEN is not set: export a Hugging Face write token "
            "as HF_TOKEN (nothing was uploaded)"
        )
    try:  # what can be checked locally is, before any request
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PublishError(f"publish.repo_id {repo_id!r}: {err} (nothing was uploaded)") from err
    missing = [n for n in ("config.json", "README.md") if not (folder / n).is_file()]
    if missing or not any(folder.glob("*.safetensors")):
        raise PublishError(f"{folder} lacks {missing or 'weights'} (nothing was uploaded)")
    api = HfApi(token=token)
    try:
        who = api.whoami()
    except HfHubHTTPError as err:
        raise PublishError(
            f"{api.endpoint} refused HF_TOKEN (HTTP {err.response.status_code}): check the "
            "token (nothing was uploaded)"
        ) from err
    except Exception as err:  # refused, DNS, timeout, HF_HUB_OFFLINE: whoami is the probe
        raise PublishError(
            f"cannot reach the Hugging Face Hub at {api.endpoint} ({type(err).__name__}: "
            f"{err}); nothing was uploaded"
        ) from err
    if who.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise PublishError("HF_TOKEN is a read-only token: use a write token (nothing uploaded)")
    try:  # the Hub's own check of the card's metadata, before a repo is created
        ModelCard.load(folder / "README.md").validate()
    except (ValueError, HfHubHTTPError) as err:
        raise PublishError(f"the Hub rejects {folder}/README.md: {err} (nothing was uploaded, "
                           "no repo created)") from err
    existed = False
    try:
        existed = api.repo_exists(repo_id)
        if existed and private and not api.model_info(repo_id).private:
            raise PublishError(
                f"{repo_id} exists and is public but publish.private is true: make it private "
                "or set publish.private=false (nothing was uploaded)"
            )
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message)
    except HfHubHTTPError as err:
        left = (f"{repo_id} existed before and is unchanged (the upload is one commit, which "
                "did not land)" if existed else
                f"{repo_id} was created by this run and holds no files of it: re-run to upload, "
                "or delete the empty repo")
        raise PublishError(f"uploading to {repo_id} on {api.endpoint} failed: {err}; {left}"
                           ) from err
    log.info("uploaded %s to %s as %s (%s)", folder, repo_id, who.get("name"), commit.commit_url)
    return commit.commit_url
