"""The model card (``README.md``) of a published quant, rendered from the repo folder alone.

:func:`render_card` reads the folder's ``mixq/`` sidecar (source, params, plan, sensitivity
table, calibration manifest, eval metrics) and its file sizes: every number in the card comes
from those files, so the card is a pure function of what is uploaded next to it. The eval
metrics are shown as found (every numeric key), whatever keys the eval stage writes.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml
from huggingface_hub import ModelCardData

from mixq.io import read_json

TAGS = ["mlx", "mixq", "mixed-precision", "quantized"]
WEIGHTS = "*.safetensors"
# strings Hydra reads back as themselves without quotes (and not as a bool, null or number)
HYDRA_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
HYDRA_KEYWORDS = {"true", "false", "null", "nan", "inf"}


def without_local_paths(obj: Any) -> Any:
    """``obj`` with every absolute path string (a local model directory, a calibration file)
    shown as ``path/to/<its name>``: the card never carries the publishing machine's paths."""
    if isinstance(obj, str) and (os.path.isabs(obj) or obj.startswith("~")):
        return f"path/to/{Path(obj).name}"
    if isinstance(obj, Mapping):
        return {k: without_local_paths(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [without_local_paths(v) for v in obj]
    return obj


def num(x: float | int) -> str:
    """A number as the card shows it: integers in full, floats to 5 significant digits."""
    return str(x) if isinstance(x, int) else f"{x:.5g}"


def megabytes(n: int) -> str:
    return f"{n} bytes ({n / 1e6:.2f} MB)"


def row(*cells: Any) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = [row(*header), row(*["---"] * len(header)), *(row(*r) for r in rows)]
    return "\n".join(lines)


def numeric_leaves(obj: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(dotted.key, value)`` for every number in a nested mapping (bools and lists skipped)."""
    for key, value in obj.items():
        if isinstance(value, Mapping):
            yield from numeric_leaves(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


def hydra_value(v: Any) -> str:
    """``v`` in Hydra's override grammar, so that ``key=<it>`` sets exactly ``v``."""
    if v is None or isinstance(v, bool):
        return {None: "null", True: "true", False: "false"}[v]
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        plain = HYDRA_PLAIN.fullmatch(v) and v.lower() not in HYDRA_KEYWORDS
        return v if plain else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    return "[" + ",".join(hydra_value(x) for x in v) + "]"


def compose_overrides(params: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One ``section.key=value`` override per key: ``mixq compose`` with them writes these
    sections exactly (``++`` for mappings: Hydra adds their keys to conf/'s empty ones)."""
    return [
        f"{'++' if isinstance(value, Mapping) else ''}{section}.{key}={hydra_value(value)}"
        for section, values in params.items()
        for key, value in values.items()
    ]


def front_matter(source: Mapping[str, Any], candidates: list[Mapping[str, Any]]) -> str:
    bits = sorted({c["bits"] for c in candidates})
    data = ModelCardData(
        library_name="mlx",
        base_model=source["base_model"],
        base_model_relation="quantized" if source["base_model"] else None,
        license=source["license"],
        pipeline_tag="text-generation",
        tags=TAGS + [f"{b}-bit" for b in bits],
    )
    return f"---\n{data.to_yaml()}\n---\n"


def source_lines(source: Mapping[str, Any], version: str) -> list[str]:
    base = source["base_model"]
    origin = f"[{base}](https://huggingface.co/{base})" if base else "a model with no Hub repo"
    details = ", ".join(
        f"{key} `{without_local_paths(source[key])}`"
        for key in ("kind", "id", "revision", "commit", "file", "sha256")
        if source.get(key) is not None
    )
    license_line = (
        f"License: `{source['license']}`, inherited from the source model."
        if source["license"]
        else "License: **unknown**: mixq could not read the source model's license; "
        "check its terms before using or sharing this model."
    )
    return [
        f"A sensitivity-aware mixed-precision MLX quantization of {origin}, made with mixq "
        f"{version}: each layer gets the quantization candidate chosen to minimize the model's "
        "predicted KL divergence within a bits-per-weight budget. It loads with stock `mlx_lm`.",
        f"Source weights: {details}, converted to {source['dtype']} before quantization.",
        license_line,
    ]


def quantization_section(plan: Mapping[str, Any], sensitivity: Mapping[str, Any]) -> str:
    s = plan["summary"]
    specs = {c["name"]: c for c in sensitivity["candidates"]}
    rows = [
        [f"`{name}`", specs[name]["bits"], specs[name]["group_size"], specs[name]["mode"],
         used["layers"], used["params"]]
        for name, used in s["candidates"].items()
    ]
    low, high = s["feasible_bpw"]
    unquantized = ", ".join(f"`{p}`" for p in s["unquantized_layers"]) or "none"
    return "\n".join([
        "## Quantization",
        "",
        table(["candidate", "bits", "group size", "mode", "layers", "parameters"], rows),
        "",
        f"- Bits per weight: **{num(s['bpw'])}** over all {s['total_params']} parameters "
        f"(every stored bit: weights, scales, biases and unquantized tensors; target "
        f"{num(s['target_bpw'])}, feasible {num(low)} to {num(high)}); {num(s['quantized_bpw'])} "
        f"over the {s['quantized_params']} quantized ones. Tensor bytes: {s['weight_bytes']}.",
        f"- Allocation: `{s['allocator']}` allocator, minimizing the summed per-layer predicted "
        f"KL (`{s['metric']}`): {num(s['predicted_kl'])}; the greedy allocator's gap to it: "
        f"{num(s['greedy_gap'])}.",
        f"- Protected layers: {s['protected_layers']}. Left unquantized: {unquantized}.",
        f"- Sensitivity: `{sensitivity['method']}` estimate of each layer's KL divergence from "
        f"the `{sensitivity['reference']}` reference, per candidate, on {sensitivity['tokens']} "
        f"calibration tokens; unquantized tensors, scales and biases in {sensitivity['dtype']}.",
        "- Per-layer choices: `quantization` in `config.json`; with each layer's predicted KL in "
        "`mixq/plan.json`, the full sensitivity table in `mixq/sensitivity.json`.",
    ])


def calibration_section(manifest: Mapping[str, Any]) -> str:
    cal, held = manifest["splits"]["calibration"], manifest["splits"]["heldout"]
    rows = [
        [f"`{domain}`", d["calibration"]["sequences"], d["calibration"]["tokens"],
         d["calibration"]["documents"], d["heldout"]["sequences"], d["heldout"]["tokens"]]
        for domain, d in manifest["per_domain"].items()
    ]
    return "\n".join([
        "## Calibration mix",
        "",
        f"Source `{manifest['config']['source']}` (seed {manifest['config']['seed']}), sequences "
        f"of {manifest['seq_len']} tokens: {cal['sequences']} calibration sequences "
        f"({cal['tokens']} tokens) measure the sensitivities; {held['sequences']} held-out "
        f"sequences ({held['tokens']} tokens), from other documents, are kept for evaluation. "
        "Manifest with hashes: `mixq/calibration.json`.",
        "",
        table(["domain", "sequences", "tokens", "documents", "held-out sequences",
               "held-out tokens"], rows),
    ])


def split_metrics(metrics: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(per-quant mappings, the rest)`` of the eval metrics: ``metrics["quants"]`` if there
    is one, else the file's top-level mappings."""
    if "quants" in metrics:
        return dict(metrics["quants"]), {k: v for k, v in metrics.items() if k != "quants"}
    quants = {k: v for k, v in metrics.items() if isinstance(v, Mapping) and k != "skipped_tasks"}
    return quants, {k: v for k, v in metrics.items() if k not in quants}


def cell(key: str, value: float | int) -> str:
    """A metric value; differences (keys naming a ``delta``) carry their sign."""
    sign = "+" if "delta" in key else ""
    return f"{value:{sign}d}" if isinstance(value, int) else f"{value:{sign}.5g}"


def benchmark_section(metrics: Mapping[str, Any]) -> str:
    """One column per quant of the eval metrics, one row per numeric key any of them has;
    the file's other numbers and strings, in order, as settings."""
    quants, rest = split_metrics(metrics)
    columns = {name: dict(numeric_leaves(m)) for name, m in quants.items()}
    keys = list(dict.fromkeys(k for values in columns.values() for k in values))
    rows = [
        [f"`{key}`", *(cell(key, v[key]) if key in v else "–" for v in columns.values())]
        for key in keys
    ]
    skipped = rest.pop("skipped_tasks", {})
    settings = [
        f"{k} `{v}`" if isinstance(v, str) else f"{k} `{num(v)}`"
        for key, value in rest.items()
        for k, v in ([(key, value)] if isinstance(value, str) else numeric_leaves({key: value}))
    ]
    lines = [
        "## Benchmarks",
        "",
        "From the eval stage (`mixq/eval.json`), columns named as there; `delta` rows are the "
        "differences to uniform 4-bit that it reports.",
        "",
        table(["metric", *(f"`{name}`" for name in columns)], rows)
        if rows else "The eval metrics hold no per-quant numbers.",
    ]
    if skipped:
        lines += ["", "Tasks not asked of the quants (at chance for the float reference, they "
                  "cannot tell quants apart): "
                  + "; ".join(f"`{task}`: {why}" for task, why in skipped.items()) + "."]
    if settings:
        lines += ["", f"Evaluation settings: {', '.join(settings)}."]
    return "\n".join(lines)


def size_section(folder: Path) -> str:
    files = [f for f in folder.rglob("*") if f.is_file() and f.name != "README.md"]
    weights = sum(f.stat().st_size for f in files if f.match(WEIGHTS))
    total = sum(f.stat().st_size for f in files)
    return "\n".join([
        "## Size on disk",
        "",
        f"- Weights (`{WEIGHTS}`): {megabytes(weights)}.",
        f"- The whole repo but this card: {megabytes(total)}.",
    ])


def kv_section(kv: Mapping[str, Any]) -> str:
    """The KV-cache precision of ``mixq/kv_config.json`` (kv-sensitivity): what is quantized,
    what was skipped or dropped and why."""
    s = kv["summary"]
    lines = [
        "## KV cache",
        "",
        f"`mixq/kv_config.json` sets the KV-cache precision per layer (mlx-lm's "
        f"`QuantizedKVCache`, used by `mixq generate`): {len(kv['layers'])} of {kv['caches']} "
        f"caches quantized at {num(s['bits'])} stored bits per element on average (target "
        f"{s['target_bits']}), {num(s['bytes_per_token'])} bytes per token against "
        f"{num(s['unquantized_bytes_per_token'])} unquantized ({kv['dtype']}).",
    ]
    if s.get("sliding_window_bytes_per_token"):
        lines += ["", f"The bytes per token include the sliding-window caches at {kv['dtype']} "
                  f"({num(s['sliding_window_bytes_per_token'])} bytes per token, up to their "
                  "window; they stop growing beyond it)."]
    if kv["skipped"]:
        lines += ["", "Skipped caches:", "",
                  table(["cache", "type", "reason"],
                        [[i, e["cache"], e["reason"]] for i, e in kv["skipped"].items()])]
    if kv.get("dropped_candidates"):
        lines += ["", "Candidates dropped (mlx-lm cannot hold them at this model's head dims): "
                  + "; ".join(f"`{n}`: {why}" for n, why in kv["dropped_candidates"].items())]
    return "\n".join(lines)


def recipe_section(run: Mapping[str, Any]) -> str:
    params = without_local_paths(run["params"])
    overrides = " \\\n  ".join(shlex.quote(o) for o in compose_overrides(params))
    hashed = ", ".join(run["hashed_sections"])
    local = params != run["params"]
    return "\n".join([
        "## How it was made",
        "",
        f"With mixq {run['mixq_version']}, in a checkout of it (params hash "
        f"`{run['params_hash']}`: the sha256 of the {hashed} params, which determine the "
        "weights):",
        "",
        "```bash",
        "bash scripts/setup.sh && . .venv/bin/activate",
        f"mixq compose \\\n  {overrides}",
        "dvc repro publish  # prepare-model, calibrate, measure-kl, allocate, convert, refine, "
        "baselines, eval, publish",
        "```",
        *(["", "Local paths are shown as `path/to/<name>`: point them at your own copies."]
          if local else []),
        "",
        "<details><summary>The params (params.yaml sections)</summary>",
        "",
        "```yaml",
        yaml.safe_dump(params, sort_keys=False).rstrip(),
        "```",
        "",
        "</details>",
    ])


def usage_section(repo_id: str) -> str:
    prompt = "What is the capital of France?"
    return "\n".join([
        "## Use with mlx-lm",
        "",
        "```bash",
        "pip install mlx-lm",
        f'mlx_lm.generate --model {repo_id} --prompt "{prompt}"',
        "```",
        "",
        "```python",
        "from mlx_lm import generate, load",
        "",
        f'model, tokenizer = load("{repo_id}")',
        f'messages = [{{"role": "user", "content": "{prompt}"}}]',
        "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)",
        "print(generate(model, tokenizer, prompt=prompt, verbose=True))",
        "```",
    ])


def render_card(folder: Path) -> str:
    """The ``README.md`` for the repo folder ``folder`` (see the module docstring)."""
    sidecar = Path(folder) / "mixq"
    source = read_json(sidecar / "source.json")
    run = read_json(sidecar / "params.json")
    plan = read_json(sidecar / "plan.json")
    sensitivity = read_json(sidecar / "sensitivity.json")
    used = [c for c in sensitivity["candidates"] if c["name"] in plan["summary"]["candidates"]]
    title = run["repo_id"].split("/")[-1]
    body = [
        f"# {title}",
        *source_lines(source, run["mixq_version"]),
        quantization_section(plan, sensitivity),
        calibration_section(read_json(sidecar / "calibration.json")),
        benchmark_section(read_json(sidecar / "eval.json")),
        size_section(Path(folder)),
        *([kv_section(read_json(sidecar / "kv_config.json"))]
          if (sidecar / "kv_config.json").exists() else []),
        recipe_section(run),
        usage_section(run["repo_id"]),
    ]
    return front_matter(source, used) + "\n" + "\n\n".join(body) + "\n"
