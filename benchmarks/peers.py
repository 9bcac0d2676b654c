"""Does mixq beat what a user can build with stock mlx-lm at the same size?

One run, one source model, the same held-out tokens, bfloat16 scales everywhere:

* peers built with mlx-lm's own tools: uniform RTN (``mlx_lm.convert``) 3/4/5/6/8-bit g64 and
  4-bit g32, the ``mixed_3_6`` / ``mixed_4_6`` quant-predicate recipes, ``dynamic_quant`` at
  target 4.5/5.0/5.5 bpw, ``gptq`` 4-bit, ``awq`` 4-bit; ``dwq`` only with ``--dwq-steps``
  (one step is timed on every run, to say why it is left out on a CPU);
* mixq (its library, not DVC) at each peer's own bits per weight: the sensitivity table, then
  ``mixq.allocate.allocate`` at ``target_bpw = <peer bpw>`` and ``mixq.convert.write_checkpoint``,
  for each candidate menu given (``--candidates 3,4,6,8``; repeatable), optionally followed by
  ``--mixq-refine`` (``mixq.refine.refine_checkpoint`` with params.yaml's ``refine``,
  when importable).

Every calibrated tool gets the same text: mixq's calibration windows decoded to text, written
to ``~/.cache/mlx-lm/calibration_v5.txt`` (what ``mlx_lm.quant.utils.load_data`` reads) and
tokenized by mlx-lm's own ``load_data`` for gptq, awq and dynamic_quant.

Scoring is mixq's: every quant is loaded with ``mlx_lm.load``, its bits per weight taken with
``mlx_lm.utils.compute_bits_per_weight`` and its size from the safetensors bytes, then it is
dequantized to float32 (``mixq.runtime.for_this_device``) and compared with the float32
reference on each held-out split (``mixq.evaluate.heldout_metrics``: KL mean/p95/max,
perplexity, top-1 agreement), other-source split first when the calibration has one.

Every quant, reference and score is cached under ``--work`` (``benchmarks/.work``,
git-ignored), so a re-run only builds and scores what is missing. Results:
``benchmarks/results/peers.json``, ``benchmarks/results/peers.png`` and a markdown table on
stdout.

    python benchmarks/peers.py                                  # everything
    python benchmarks/peers.py --only 'uniform-*' --skip uniform-8-g64
    python benchmarks/peers.py --candidates 3,4,6,8 --candidates 3,4,5,6,8
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import fnmatch
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("peers")

CALIBRATION_TEXT = Path.home() / ".cache/mlx-lm/calibration_v5.txt"
SPLIT_ORDER = ("heldout_other", "heldout")  # other-source first
SEED = 123  # the seed mlx-lm's quant CLIs default to
CACHED_ONLY = False  # --cached-only: build nothing, score nothing, report what is stored
TOL_BPW = 1e-3  # peers "at <= a size": up to 0.001 bpw larger (17 kB on SmolLM2-135M)


# ----------------------------------------------------------------------------- peers


@dataclasses.dataclass
class Peer:
    name: str
    kind: str  # rtn | recipe | dynamic_quant | gptq | awq | dwq
    label: str
    args: dict


def peer_specs(dwq_steps: int = 0) -> list[Peer]:
    peers = [Peer(f"uniform-{b}-g64", "rtn", f"uniform {b}-bit g64", {"bits": b, "group_size": 64})
             for b in (3, 4, 5, 6, 8)]
    peers.append(Peer("uniform-4-g32", "rtn", "uniform 4-bit g32", {"bits": 4, "group_size": 32}))
    peers += [Peer(r, "recipe", r, {"recipe": r}) for r in ("mixed_3_6", "mixed_4_6")]
    peers += [Peer(f"dynamic_quant-{t}", "dynamic_quant", f"dynamic_quant {t}",
                   {"target_bpw": t, "low_bits": 4, "high_bits": 5, "group_size": 64})
              for t in (4.5, 5.0, 5.5)]
    peers.append(Peer("gptq-4", "gptq", "gptq 4-bit", {"bits": 4, "group_size": 64,
                                                       "fallback_bits": 6,
                                                       "fallback_group_size": 64}))
    # gptq's default leaves what it cannot GPTQ (a tied embedding) at 6-bit RTN; the same at
    # 4-bit is the like-for-like point against uniform 4-bit
    peers.append(Peer("gptq-4-fallback4", "gptq", "gptq 4-bit, fallback 4", {
        "bits": 4, "group_size": 64, "fallback_bits": 4, "fallback_group_size": 64}))
    peers.append(Peer("awq-4", "awq", "awq 4-bit", {"bits": 4, "group_size": 64, "embed_bits": 4,
                                                    "embed_group_size": 32, "n_grid": 20}))
    if dwq_steps > 0:
        peers.append(Peer("dwq-4", "dwq", "dwq 4-bit", {"bits": 4, "group_size": 64,
                                                        "steps": dwq_steps}))
    return peers


def selected(name: str, only: Sequence[str], skip: Sequence[str]) -> bool:
    if only and not any(fnmatch.fnmatch(name, p) for p in only):
        return False
    return not any(fnmatch.fnmatch(name, p) for p in skip)


def cast_floats(model, dtype):
    """Every floating parameter of ``model`` to ``dtype`` (packed uint32 weights untouched)."""
    import mlx.core as mx
    from mlx.utils import tree_map

    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating)
                          else p, model.parameters()))


class Context:
    """What the producers share: the source model, the calibration, the work dir."""

    def __init__(self, model_dir: Path, calibration_dir: Path, work: Path,
                 mixq_model_dir: Optional[Path] = None):
        self.model_dir, self.calibration_dir, self.work = model_dir, calibration_dir, work
        # what mixq measures and converts: the awq-scale stage's equivalent scaled model
        # when given; the peers and every KL's reference stay on model_dir
        self.mixq_model_dir = mixq_model_dir or model_dir

    def load(self):
        from mlx_lm.utils import load

        return load(str(self.model_dir), return_config=True)

    def calibration_data(self, tokenizer, sequence_length: int = 512):
        """mlx-lm's own ``load_data`` on the shared calibration text (all chunks, seeded as
        the CLIs seed)."""
        import mlx.core as mx
        from mlx_lm.quant.utils import load_data

        mx.random.seed(SEED)
        return load_data(tokenizer, num_samples=-1, sequence_length=sequence_length)


def produce_rtn(peer: Peer, ctx: Context, out: Path) -> dict:
    from mlx_lm.convert import convert

    a = peer.args
    convert(str(ctx.model_dir), str(out), quantize=True, q_group_size=a.get("group_size", 64),
            q_bits=a.get("bits", 4), dtype="bfloat16", quant_predicate=a.get("recipe"))
    return {}


def dq_sensitivities(ctx: Context, a: Mapping[str, Any]) -> tuple[dict, float, bool]:
    """dynamic_quant's per-layer sensitivities (independent of the target: computed once,
    cached) on the float32 model, the seconds they took, and whether they came from the
    cache."""
    from mlx_lm.quant.dynamic_quant import estimate_sensitivities

    path = ctx.work / f"dq-sensitivities-{a['low_bits']}-{a['high_bits']}-g{a['group_size']}.json"
    if path.exists():  # computed by an earlier target: its time is added to this one's
        record = json.loads(path.read_text())
        return dict(record["sensitivities"]), record["seconds"], True
    t = time.perf_counter()
    model, tokenizer, _ = ctx.load()
    data = ctx.calibration_data(tokenizer)
    sens = estimate_sensitivities(model, data, a["low_bits"], a["group_size"], a["high_bits"],
                                  a["group_size"])
    seconds = time.perf_counter() - t
    path.write_text(json.dumps({"sensitivities": sens, "seconds": seconds}))
    return dict(sens), seconds, False  # computed now: inside this target's own timing


def produce_dynamic_quant(peer: Peer, ctx: Context, out: Path) -> dict:
    import mlx.core as mx
    from mlx_lm.quant.dynamic_quant import estimate_threshold
    from mlx_lm.utils import quantize_model, save

    a = peer.args
    sens, sens_seconds, cached = dq_sensitivities(ctx, a)
    t = time.perf_counter()
    model, tokenizer, config = ctx.load()
    cast_floats(model, mx.bfloat16)  # so the threshold search counts bf16 scales and norms
    g = a["group_size"]
    threshold = estimate_threshold(model, sens, a["target_bpw"], a["low_bits"], g,
                                   a["high_bits"], g)

    def predicate(p, m):
        if not hasattr(m, "to_quantized"):
            return False
        if sens[p] > threshold:
            return {"bits": a["high_bits"], "group_size": g}
        return True

    model, config = quantize_model(model, {**config, "torch_dtype": "bfloat16"}, group_size=g,
                                   bits=a["low_bits"], quant_predicate=predicate)
    save(str(out), str(ctx.model_dir), model, tokenizer, config)
    high = sum(1 for p in sens if sens[p] > threshold)
    return {"shared_seconds": sens_seconds if cached else 0.0,
            "own_seconds": time.perf_counter() - t,
            "note": f"{high} of {len(sens)} layers at {a['high_bits']}-bit; sensitivities "
                    f"({sens_seconds:.0f} s, shared by every target) included in the time"}


def produce_gptq(peer: Peer, ctx: Context, out: Path) -> dict:
    import mlx.core as mx
    from mlx_lm.quant.gptq import gptq_quantize
    from mlx_lm.utils import save

    a = peer.args
    model, tokenizer, config = ctx.load()
    data = ctx.calibration_data(tokenizer)
    # Hessians and the column updates in float32 (the source's dtype), then bf16 scales: the
    # same rounding gptq itself applies on a bf16 model (`layer.set_dtype(orig_type)`).
    model, config["quantization"] = gptq_quantize(
        model, data, a["bits"], a["group_size"], a["fallback_bits"], a["fallback_group_size"])
    cast_floats(model, mx.bfloat16)
    config["torch_dtype"] = "bfloat16"
    fallback = [k for k, v in config["quantization"].items() if isinstance(v, dict)]
    save(str(out), str(ctx.model_dir), model, tokenizer, config)
    return {"note": f"calibration {data.shape[0]}x{data.shape[1]} tokens; fallback "
                    f"{a['fallback_bits']}-bit g{a['fallback_group_size']} (RTN) for "
                    f"{', '.join(fallback) or 'nothing'}"}


def produce_awq(peer: Peer, ctx: Context, out: Path) -> dict:
    import mlx.core as mx
    from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config
    from mlx_lm.utils import save

    a = peer.args
    model, tokenizer, config = ctx.load()
    awq_config = AWQ_MODEL_CONFIGS.get(config["model_type"])
    if awq_config is None:
        raise NotImplementedError(f"mlx_lm.awq has no config for {config['model_type']}")
    data = ctx.calibration_data(tokenizer)
    awq_quantize(model, data, awq_config, group_size=a["group_size"], bits=a["bits"],
                 embed_group_size=a["embed_group_size"], embed_bits=a["embed_bits"],
                 n_grid=a["n_grid"])
    cast_floats(model, mx.bfloat16)
    config = update_config(model, {**config, "torch_dtype": "bfloat16"})
    save(str(out), str(ctx.model_dir), model, tokenizer, config)
    return {"note": f"calibration {data.shape[0]}x{data.shape[1]} tokens; embedding "
                    f"{a['embed_bits']}-bit g{a['embed_group_size']}"}


def dwq_setup(ctx: Context, bits: int, group_size: int):
    """The float teacher and a uniform bf16 student, data as dwq wants it ((tokens, 0) pairs
    of the calibration windows), for :func:`produce_dwq` and :func:`dwq_probe`."""
    import mlx.core as mx
    from mlx_lm.utils import quantize_model

    model, tokenizer, config = ctx.load()
    student = copy.deepcopy(model)
    cast_floats(student, mx.bfloat16)
    _, config = quantize_model(student, {**config, "torch_dtype": "bfloat16"},
                               group_size=group_size, bits=bits)
    windows = split_tokens(ctx.calibration_dir, "calibration")
    data = [(w.tolist(), 0) for w in windows]
    return model, student, tokenizer, config, data


def produce_dwq(peer: Peer, ctx: Context, out: Path) -> dict:
    import mlx.optimizers as optimizers
    from mlx_lm.quant.dwq import dwq_quantize
    from mlx_lm.utils import save

    a = peer.args
    model, student, tokenizer, config, data = dwq_setup(ctx, a["bits"], a["group_size"])
    train = (data * math.ceil(4 * a["steps"] / len(data)))[: 4 * a["steps"]]
    opt = optimizers.Adam(learning_rate=1e-6, bias_correction=True)  # dwq's CLI defaults
    dwq_quantize(student, lambda batch, i, split: model(batch), opt, train, data[:4],
                 batch_size=4, max_seq_length=1025, seed=SEED)
    save(str(out), str(ctx.model_dir), student, tokenizer, config)
    return {"note": f"{a['steps']} steps of 4 calibration windows, lr 1e-6"}


def dwq_probe(ctx: Context) -> dict:
    """Seconds of one dwq training step here (4 x 256 tokens, a uniform 4-bit bf16 student
    whose quantized matmuls run on this CPU), against one float forward of the same batch."""
    path = ctx.work / "dwq-probe.json"
    if path.exists():
        return json.loads(path.read_text())
    import mlx.core as mx
    import mlx.optimizers as optimizers
    from mlx_lm.quant.dwq import dwq_quantize

    model, student, _, _, data = dwq_setup(ctx, 4, 64)
    batch = mx.array([d[0] for d in data[:4]])
    t = time.perf_counter()
    mx.eval(model(batch))
    forward = time.perf_counter() - t
    opt = optimizers.Adam(learning_rate=1e-6, bias_correction=True)
    t = time.perf_counter()
    # one training step + two validation passes (before and after) over one batch of 4
    dwq_quantize(student, lambda b, i, split: model(b), opt, data[:4], data[4:8], batch_size=4,
                 max_seq_length=1025, seed=SEED)
    total = time.perf_counter() - t
    record = {"float_forward_s": forward, "one_step_plus_two_validations_s": total,
              "batch": [4, int(batch.shape[1])]}
    path.write_text(json.dumps(record, indent=1))
    return record


PRODUCERS: dict[str, Callable[[Peer, Context, Path], dict]] = {
    "rtn": produce_rtn, "recipe": produce_rtn, "dynamic_quant": produce_dynamic_quant,
    "gptq": produce_gptq, "awq": produce_awq, "dwq": produce_dwq,
}


def build(name: str, work: Path, make: Callable[[Path], dict]) -> dict:
    """``work/name`` built by ``make(tmp_dir)`` unless it exists; returns its build record
    (``build.json``: seconds, notes) — the stored one on a re-run."""
    out = work / name
    record_path = out / "build.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    if CACHED_ONLY:
        raise FileNotFoundError(f"{out} was not built (--cached-only)")
    tmp = work / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    extra = make(tmp) or {}
    seconds = time.perf_counter() - t + extra.get("shared_seconds", 0.0)
    record = {"seconds": seconds, **extra}
    (tmp / "build.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("built %s in %.0f s", name, seconds)
    return record


# ----------------------------------------------------------------------------- mixq


FLOAT_MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}  # MLX's float formats


def parse_menu(text: str, params_quant) -> list:
    """``3,4,6,8`` (affine, g64), ``4g32`` for another group size, ``mxfp4``/``nvfp4``/``mxfp8``
    (their own group size), or ``params`` (params.yaml's quant.candidates)."""
    from mixq.config import Candidate

    if text == "params":
        return list(params_quant.candidates)
    menu = []
    for item in text.split(","):
        item = item.strip()
        if item in FLOAT_MODES:
            menu.append(Candidate(*FLOAT_MODES[item], item))
            continue
        bits, _, group = item.partition("g")
        menu.append(Candidate(int(bits), int(group or 64), "affine"))
    return menu


def menu_tag(menu) -> str:
    """``3/4/6/8`` for affine g64, ``4g32`` for another group size, the mode for float ones."""
    def one(c):
        if c.mode != "affine":
            return c.mode if FLOAT_MODES.get(c.mode) == (c.bits, c.group_size) else \
                f"{c.mode}-{c.bits}g{c.group_size}"
        return f"{c.bits}" + (f"g{c.group_size}" if c.group_size != 64 else "")
    return "/".join(one(c) for c in menu)


def sensitivity_table(ctx: Context, menu, params, existing: Optional[Path]) -> tuple[dict, float]:
    """A sensitivity table covering ``menu``: ``existing`` (outputs/sensitivity) when it was
    measured with every candidate of the menu on this calibration, else measured now with the
    project's measure config (cached in the work dir). Returns (table, seconds to measure)."""
    from mixq.budget import candidate_name
    from mixq.sensitivity import measure_sensitivity

    want = {candidate_name(c) for c in menu}
    tokens = int(split_tokens(ctx.calibration_dir, "calibration").size)
    if existing and existing.exists():
        table = json.loads(existing.read_text())
        have = {c["name"] for c in table["candidates"]}
        if want <= have and table.get("tokens") == tokens and \
                table.get("method") == params.measure.method:
            log.info("sensitivity: %s (has %s)", existing, sorted(have))
            return table, 0.0
    key = hashlib.sha256(json.dumps([sorted(want), params.quant.dtype,
                                     dataclasses.asdict(params.measure), tokens]
                                    + ([str(ctx.mixq_model_dir)]
                                       if ctx.mixq_model_dir != ctx.model_dir else [])).encode())
    path = ctx.work / f"sensitivity-{key.hexdigest()[:12]}.json"
    if path.exists():
        record = json.loads(path.read_text())
        return record["table"], record["seconds"]
    quant = dataclasses.replace(params.quant, candidates=list(menu))
    t = time.perf_counter()
    table = measure_sensitivity(ctx.mixq_model_dir, ctx.calibration_dir, quant, params.measure)
    seconds = time.perf_counter() - t
    path.write_text(json.dumps({"table": table, "seconds": seconds}))
    log.info("sensitivity for %s measured in %.0f s", sorted(want), seconds)
    return table, seconds


def refine_available() -> Optional[Callable]:
    """``mixq.refine.refine_checkpoint`` when that module exists, else None."""
    try:
        from mixq.refine import refine_checkpoint
    except ImportError:
        return None
    return refine_checkpoint


def produce_mixq(ctx: Context, table: dict, menu, target: float, params, refine: bool,
                 out: Path) -> dict:
    from mixq.allocate import allocate
    from mixq.budget import dtype_bits
    from mixq.convert import write_checkpoint

    quant = dataclasses.replace(params.quant, candidates=list(menu), target_bpw=target)
    plan = allocate(table, quant, dtype_bits(quant.dtype))
    refine_fn = refine_available() if refine else None
    converted = out.parent / f"{out.name}.unrefined" if refine_fn else out
    shutil.rmtree(converted, ignore_errors=True)
    report = write_checkpoint(ctx.mixq_model_dir, converted, plan, table, quant.dtype)
    s = plan["summary"]
    extra = {"predicted_kl": s["predicted_kl"], "plan_bpw": s["bpw"], "verified": report,
             "layers": {n: v["layers"] for n, v in s["candidates"].items()}}
    if refine and refine_fn is None:
        extra["refine"] = "not available: no mixq.refine.refine_checkpoint (no-op)"
    elif refine_fn:  # the refine stage's own call: converted checkpoint -> out
        out.mkdir(parents=True, exist_ok=True)
        extra["refine"] = refine_fn(converted, ctx.model_dir, ctx.calibration_dir, out,
                                    params.refine)
        shutil.rmtree(converted)
    return extra


# ----------------------------------------------------------------------------- scoring


def split_tokens(calibration_dir: Path, split: str):
    """The token windows [n, seq_len] of one split of a calibration directory, or None when it
    has no such split: read from the split's own file, so calibrations written before a split
    existed (no refine/heldout_other files) still read."""
    from safetensors.numpy import load_file

    from mixq.artifacts import SPLIT_FILES, SPLIT_KEYS

    path = Path(calibration_dir) / SPLIT_FILES[split]
    return load_file(str(path))[SPLIT_KEYS[split][0]] if path.exists() else None


def available_splits(calibration_dir: Path) -> list[str]:
    """The held-out splits this calibration holds (non-empty), other-source first."""
    return [s for s in SPLIT_ORDER if (t := split_tokens(calibration_dir, s)) is not None
            and t.size]


class Scorer:
    """Held-out metrics of checkpoints against the float32 reference, per split; reference
    logits are recorded once per split (memory-mapped in the work dir)."""

    def __init__(self, model_dir: Path, sources: Mapping[str, Path], work: Path):
        """``sources``: split name -> the calibration directory to read it from."""
        import numpy as np

        from mixq.evaluate import CHUNK_TOKENS
        from mixq.kl import split_chunks
        from mixq.memory import FORWARD_COPIES, logit_rows, vocab_size

        per_forward = min(CHUNK_TOKENS, logit_rows(vocab_size(model_dir), FORWARD_COPIES))
        self.model_dir, self.work = model_dir, work
        self.chunks, self.keys, self.tokens = {}, {}, {}
        for split, directory in sources.items():
            tokens = np.asarray(split_tokens(directory, split))
            self.chunks[split] = split_chunks(tokens, per_forward)
            self.keys[split] = hashlib.sha256(tokens.tobytes()).hexdigest()[:16]
            self.tokens[split] = int(tokens.size)
        self._reference: dict[str, Any] = {}
        self.cached_only = False  # report stored scores only: score nothing new

    def reference(self, split: str):
        import numpy as np

        from mixq.evaluate import forward_logits, load_for_eval, record_logits

        if split not in self._reference:
            path = self.work / f"reference-{split}-{self.keys[split]}.npy"
            if not path.exists():
                model, _, _ = load_for_eval(self.model_dir)
                tmp = path.with_suffix(".tmp.npy")
                record_logits(forward_logits(model, self.chunks[split]), self.tokens[split], tmp)
                tmp.rename(path)
            self._reference[split] = np.load(path, mmap_mode="r")
        return self._reference[split]

    def score(self, ckpt: Path) -> dict:
        """``{"bytes", "bpw", "kernels", "<split>": metrics...}``, cached in ``ckpt/scores.json``
        per split content hash."""
        import mlx_lm
        from mlx_lm.utils import compute_bits_per_weight

        from mixq.evaluate import checkpoint_bytes, forward_logits, heldout_metrics
        from mixq.runtime import for_this_device

        cache_path = ckpt / "scores.json"
        cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
        todo = [s for s in self.chunks if self.keys[s] not in cache.get("splits", {})]
        if self.cached_only:
            if "bpw" not in cache:
                raise FileNotFoundError(f"{ckpt} was never scored (--cached-only)")
            todo = []
        if todo or "bpw" not in cache:
            model, _ = mlx_lm.load(str(ckpt))
            cache["bpw"] = float(compute_bits_per_weight(model))  # as stored: bf16 scales
            cache["bytes"] = checkpoint_bytes(ckpt)
            cache["kernels"] = for_this_device(model)
            for split in todo:
                t = time.perf_counter()
                m = heldout_metrics(forward_logits(model, self.chunks[split]), self.chunks[split],
                                    self.reference(split))
                m["seconds"] = time.perf_counter() - t
                m["tokens"] = self.tokens[split]
                cache.setdefault("splits", {})[self.keys[split]] = {"split": split, **m}
            cache_path.write_text(json.dumps(cache, indent=1))
        result = {k: cache[k] for k in ("bpw", "bytes", "kernels")}
        for split in self.chunks:
            if self.keys[split] in cache["splits"]:  # all of them unless --cached-only
                result[split] = {k: v for k, v in cache["splits"][self.keys[split]].items()
                                 if k != "split"}
        return result


# ----------------------------------------------------------------------------- report


def best_peer_at_or_below(rows: Sequence[Mapping], bpw: float, split: str,
                          tol: float = TOL_BPW) -> Optional[Mapping]:
    """The peer row with the lowest KL mean on ``split`` among peers no larger than ``bpw``
    (+ ``tol``: a mixq point built at a peer's bpw lands up to 1e-4 below it)."""
    peers = [r for r in rows if r["kind"] != "mixq" and split in r and r["bpw"] <= bpw + tol]
    return min(peers, key=lambda r: r[split]["kl_mean"], default=None)


def ratios(rows: Sequence[Mapping], split: str) -> list[dict]:
    """For each mixq row: mixq KL ÷ the best peer KL at ≤ its bits per weight on ``split``."""
    out = []
    for r in rows:
        if r["kind"] != "mixq" or split not in r:
            continue
        best = best_peer_at_or_below(rows, r["bpw"], split)
        out.append({"mixq": r["name"], "bpw": r["bpw"], "kl": r[split]["kl_mean"],
                    "best_peer": best["name"] if best else None,
                    "best_peer_bpw": best["bpw"] if best else None,
                    "best_peer_kl": best[split]["kl_mean"] if best else None,
                    "ratio": r[split]["kl_mean"] / best[split]["kl_mean"] if best else None})
    return out


def fmt(x, spec):
    return "–" if x is None else format(x, spec)


def markdown(rows: Sequence[Mapping], splits: Sequence[str]) -> str:
    lines = []
    for split in splits:
        have = [r for r in rows if split in r]
        if not have:
            continue
        tokens = have[0][split]["tokens"]
        lines += [f"\n#### {split} ({tokens:,} tokens)\n",
                  "| quant | size MB | bpw | KL mean | KL p95 | ppl | top-1 | build s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(have, key=lambda r: (r["bpw"], r["kind"] == "mixq")):
            m = r[split]
            name = f"**{r['label']}**" if r["kind"] == "mixq" else r["label"]
            lines.append(f"| {name} | {r['bytes'] / 1e6:.1f} | {r['bpw']:.3f} | "
                         f"{m['kl_mean']:.4f} | {m['kl_p95']:.3f} | {m['ppl']:.2f} | "
                         f"{m['top1']:.3f} | {r['seconds']:.0f} |")
        lines += ["", "| mixq point | bpw | best peer at ≤ its size | its bpw | its KL | mixq KL "
                  "| mixq ÷ peer |", "|---|---:|---|---:|---:|---:|---:|"]
        for q in ratios(rows, split):
            lines.append(f"| {q['mixq']} | {q['bpw']:.3f} | {q['best_peer'] or '–'} | "
                         f"{fmt(q['best_peer_bpw'], '.3f')} | {fmt(q['best_peer_kl'], '.4f')} | "
                         f"{q['kl']:.4f} | {fmt(q['ratio'], '.2f')} |")
    return "\n".join(lines)


KIND_STYLE = {  # kind -> marker, colour, legend name: the same in every panel
    "rtn": ("^", "tab:red", "uniform RTN (mlx_lm.convert)"),
    "recipe": ("D", "tab:green", "mixed_3_6 / mixed_4_6 recipe"),
    "dynamic_quant": ("o", "tab:purple", "dynamic_quant"),
    "gptq": ("s", "tab:orange", "gptq"),
    "awq": ("P", "tab:brown", "awq"),
    "dwq": ("X", "tab:pink", "dwq"),
}
LABEL_OFFSETS = [(7, 3), (7, -10), (-7, 3), (-7, -10), (7, 13), (7, -20), (-7, 13),
                 (-7, -20), (7, 23), (7, -30), (-7, 23), (-7, -30), (20, 33), (20, -40)]


def label_points(ax, points) -> None:
    """Label each (text, x, y) at the first offset whose text box overlaps no earlier label
    (with a leader line when it is moved away from the point)."""
    from matplotlib.text import Text

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    placed = []
    for text, x, y in points:
        right = ax.transAxes.inverted().transform(ax.transData.transform((x, y)))[0] > 0.8
        for dx, dy in LABEL_OFFSETS:
            dx = -abs(dx) if right else dx
            far = abs(dy) > 12
            a = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points",
                            fontsize=7, ha="left" if dx > 0 else "right", va="center",
                            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"}
                            if far else None)
            a.update_positions(renderer)
            box = Text.get_window_extent(a, renderer).expanded(1.05, 1.2)  # text, no leader
            if not any(box.overlaps(b) for b in placed):
                placed.append(box)
                break
            a.remove()
        else:
            a = ax.annotate(text, (x, y), xytext=LABEL_OFFSETS[0], textcoords="offset points",
                            fontsize=7)
            a.update_positions(renderer)
            placed.append(Text.get_window_extent(a, renderer))


def plot(rows: Sequence[Mapping], splits: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [s for s in splits if any(s in r for r in rows)]
    fig, axes = plt.subplots(1, len(splits), figsize=(9 * len(splits), 7.5), squeeze=False)
    for ax, split in zip(axes[0], splits):
        peers = [r for r in rows if r["kind"] != "mixq" and split in r]
        for k, (marker, color, name) in KIND_STYLE.items():
            pts = [r for r in peers if r["kind"] == k]
            if pts:
                ax.scatter([r["bytes"] / 1e6 for r in pts], [r[split]["kl_mean"] for r in pts],
                           marker=marker, color=color, s=40, label=name, zorder=3)
        series = sorted({r["series"] for r in rows if r["kind"] == "mixq"}, key=len)
        for s, color in zip(series, ("tab:blue", "tab:cyan", "tab:olive", "tab:gray")):
            pts = sorted((r for r in rows if r["kind"] == "mixq" and r.get("series") == s
                          and split in r), key=lambda r: r["bytes"])
            if pts:
                ax.plot([r["bytes"] / 1e6 for r in pts], [r[split]["kl_mean"] for r in pts],
                        "-", marker=".", lw=1.8, color=color, label=f"mixq {s}", zorder=2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("size on disk (MB, log)")
        ax.set_ylabel("KL(float32 ‖ quant) per token, mean (log)")
        tokens = peers[0][split]["tokens"] if peers else 0
        ax.set_title(f"{split}: {tokens:,} held-out tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle("mixq vs stock mlx-lm quants (bf16 scales)")
    fig.tight_layout()  # before labelling: the labels are placed in final pixels
    for ax, split in zip(axes[0], splits):
        ax.set_xlim(ax.get_xlim())
        ax.set_ylim(ax.get_ylim())
        peers = sorted((r for r in rows if r["kind"] != "mixq" and split in r),
                       key=lambda r: r["bpw"])
        label_points(ax, [(r["label"], r["bytes"] / 1e6, r[split]["kl_mean"]) for r in peers])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def write_calibration_text(calibration_dir: Path, model_dir: Path, force: bool) -> str:
    """mixq's calibration windows decoded to text, one window per paragraph, at the path
    mlx-lm's quant tools read; refuses to replace a different file unless ``force``."""
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    windows = split_tokens(calibration_dir, "calibration")
    text = "\n\n".join(tokenizer.decode(w.tolist()) for w in windows)
    if CALIBRATION_TEXT.exists() and CALIBRATION_TEXT.read_text() != text and not force:
        raise SystemExit(f"{CALIBRATION_TEXT} exists with other text; pass "
                         "--force-calibration-text to replace it with mixq's calibration")
    CALIBRATION_TEXT.parent.mkdir(parents=True, exist_ok=True)
    CALIBRATION_TEXT.write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path("outputs/model"))
    p.add_argument("--calibration", type=Path, default=Path("outputs/calibration"))
    p.add_argument("--params", type=Path, default=Path("params.yaml"),
                   help="quant (dtype, allocator, protect, default candidates) and measure")
    p.add_argument("--heldout-other", type=Path,
                   help="a calibration directory to take the other-source split from when "
                        "--calibration has none")
    p.add_argument("--sensitivity", type=Path, default=Path("outputs/sensitivity/sensitivity.json"),
                   help="reused when it covers the menu; else measured (cached)")
    p.add_argument("--candidates", action="append",
                   help="mixq candidate menu, e.g. 3,4,6,8 or 3,4g32,6 or 'params' (default); "
                        "repeat for several mixq lines")
    p.add_argument("--mixq-refine", action="store_true",
                   help="after each mixq convert, mixq.refine.refine_checkpoint(converted, "
                        "model_dir, calibration_dir, out_dir, params.refine) when importable "
                        "(no-op otherwise)")
    p.add_argument("--mixq-targets", type=float, nargs="*",
                   help="extra mixq targets (bpw) besides every peer's")
    p.add_argument("--only", nargs="*", default=[], help="fnmatch patterns of names to build")
    p.add_argument("--skip", nargs="*", default=[], help="fnmatch patterns of names to skip")
    p.add_argument("--no-mixq", action="store_true")
    p.add_argument("--mixq-model", type=Path, default=None,
                   help="the model mixq measures and converts, e.g. outputs/scaled-model (the "
                        "awq-scale stage's; default: --model); KLs stay against --model")
    p.add_argument("--dwq-steps", type=int, default=0,
                   help="build dwq with this many steps (0: only time one step)")
    p.add_argument("--force-calibration-text", action="store_true")
    p.add_argument("--cached-only", action="store_true",
                   help="build and score nothing: report what the work dir holds (a quant "
                        "not yet scored on a split is left out of that split's table)")
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks/.work")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/peers.json")
    args = p.parse_args(argv)

    from mixq.cli import setup_logging

    setup_logging()
    logging.getLogger("peers").setLevel(logging.INFO)
    from mixq.config import load_params

    from mixq.memory import set_budget

    t_all = time.perf_counter()
    params = load_params(args.params)
    set_budget(params.memory.logits_gb)
    args.work.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.model, args.calibration, args.work, args.mixq_model)
    text_sha = write_calibration_text(args.calibration, args.model, args.force_calibration_text)
    sources = {s: args.calibration for s in available_splits(args.calibration)}
    if args.heldout_other and "heldout_other" not in sources:
        # other-source text is disjoint from any builtin calibration by source, so it can
        # come from a newer calibration directory than the one the quants were built from
        sources = {"heldout_other": args.heldout_other, **sources}
    splits = [s for s in SPLIT_ORDER if s in sources]
    scorer = Scorer(args.model, {s: sources[s] for s in splits}, args.work)
    global CACHED_ONLY
    CACHED_ONLY = scorer.cached_only = args.cached_only
    log.info("splits: %s", {s: scorer.tokens[s] for s in splits})

    rows: list[dict] = []
    skipped: dict[str, str] = {}
    not_built: list[str] = []  # --cached-only: mixq points not in the work dir
    for peer in peer_specs(args.dwq_steps):
        if not selected(peer.name, args.only, args.skip):
            continue
        try:
            record = build(peer.name, args.work,
                           lambda out, peer=peer: PRODUCERS[peer.kind](peer, ctx, out))
            scores = scorer.score(args.work / peer.name)
        except FileNotFoundError as e:
            if not args.cached_only:
                raise
            skipped[peer.name] = f"not built or not scored when this report was made ({e})"
            continue
        except Exception as e:  # a tool that fails here is a result, not a crash
            log.exception("%s failed", peer.name)
            skipped[peer.name] = f"failed: {type(e).__name__}: {e}"
            continue
        rows.append({"name": peer.name, "label": peer.label, "kind": peer.kind,
                     "args": peer.args, **record, **scores})
        log.info("%s: %.3f bpw, %s", peer.name, rows[-1]["bpw"],
                 {s: round(rows[-1][s]["kl_mean"], 4) for s in splits if s in rows[-1]})

    dwq = None
    if args.dwq_steps == 0 and selected("dwq-probe", args.only, args.skip) and not (
            args.cached_only and not (args.work / "dwq-probe.json").exists()):
        dwq = dwq_probe(ctx)
        skipped["dwq-4"] = dwq["what"] + ": not run (--dwq-steps N to run it)" if \
            not dwq.get("finished", True) else (
            f"one training step on this CPU (4x256 tokens, quantized student) plus two "
            f"validation passes took {dwq['one_step_plus_two_validations_s']:.0f} s (a float "
            f"forward of the batch {dwq['float_forward_s']:.1f} s); mlx_lm.dwq's defaults are "
            "2048 samples x 1025 tokens (512 steps of batch 4), and the 12 calibration windows "
            "give 3 steps: not run (--dwq-steps N to run it)")

    if not args.no_mixq:
        # each peer's exact bpw (allocate stays at or below it); equal sizes once
        wanted = [r["bpw"] for r in rows] + list(args.mixq_targets or [])
        targets = sorted({f"{t:.4f}": t for t in sorted(wanted, reverse=True)}.values())
        for text in args.candidates or ["params"]:
            menu = parse_menu(text, params.quant)
            tag = menu_tag(menu)
            series_name = "mixq-" + tag.replace("/", "-") if any(
                c.mode != "affine" or c.group_size != 64 for c in menu) else \
                "mixq-" + tag.replace("/", "")  # mixq-3468 for the affine g64 menus
            if ctx.mixq_model_dir != ctx.model_dir:
                series_name += "-awq"
                tag += " +awq-scale"
            if not selected(series_name, args.only, args.skip):
                continue
            table, table_seconds = sensitivity_table(ctx, menu, params, args.sensitivity)
            for target in targets:
                name = f"{series_name}{'-refine' if args.mixq_refine else ''}@{target:.4f}"
                try:
                    record = build(name, args.work, lambda out, target=target: produce_mixq(
                        ctx, table, menu, target, params, args.mixq_refine, out))
                    scores = scorer.score(args.work / name)
                except FileNotFoundError:
                    if not args.cached_only:
                        raise
                    not_built.append(name)
                    continue
                except Exception as e:
                    skipped[name] = f"{type(e).__name__}: {e}".split("\n")[0]
                    log.warning("%s: %s", name, skipped[name])
                    continue
                rows.append({"name": name, "label": f"mixq {tag} @{target:.3f}", "kind": "mixq",
                             "series": tag + (" +refine" if args.mixq_refine else ""),
                             "target_bpw": target, "sensitivity_seconds": table_seconds,
                             **record, **scores})
                log.info("%s: %.3f bpw, %s", name, rows[-1]["bpw"],
                         {s: round(rows[-1][s]["kl_mean"], 4) for s in splits if s in rows[-1]})

    table_md = markdown(rows, splits)
    print(table_md)
    for name, why in skipped.items():
        print(f"- not run: {name}: {why}")
    wall = time.perf_counter() - t_all
    result = {
        "model": str(args.model), "calibration": str(args.calibration),
        "calibration_text_sha256": text_sha,
        "splits": {s: {"tokens": scorer.tokens[s], "from": str(sources[s])} for s in splits},
        "rows": rows, "ratios": {s: ratios(rows, s) for s in splits}, "not_run": skipped,
        "mixq_not_built": not_built, "dwq_probe": dwq, "wall_seconds_this_run": wall, "argv": sys.argv[1:],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(rows, splits, args.out.with_suffix(".png"))
    log.info("wrote %s and %s in %.0f s", args.out, args.out.with_suffix(".png"), wall)


if __name__ == "__main__":
    main()
