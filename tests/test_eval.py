"""eval: held-out metrics of real quants are sane, dequantized float32 equals the quantized
kernels, batched greedy answers equal mlx_lm.generate, eval-baselines + eval give the numbers of
one pass over every model, a whole run writes the expected files, and in dvc a budget change
re-runs eval but not eval-baselines."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import mixq  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
import yaml
from mlx.utils import tree_flatten
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import dequantize_model, load_tokenizer
from test_convert import table_for
from tqdm import tqdm

from mixq.allocate import uniform_plan
from mixq.budget import candidate_dict, model_bpw
from mixq.calibration import build_calibration, write_calibration
from mixq.card import benchmark_section
from mixq.config import CalibrationConfig, EvalConfig
from mixq.convert import write_checkpoint
from mixq.eval_report import write_outputs
from mixq.eval_runs import (
    BASELINE_RESULTS,
    closest_in_size,
    run_eval,
    run_eval_baselines,
    uniform4_name,
)
from mixq.evaluate import (
    HELDOUT_KEYS,
    eval_inputs,
    evaluate_checkpoints,
    forward_logits,
    generate_answers,
    heldout_metrics,
    load_for_eval,
    prompt_tokens,
    record_logits,
    stored_logits,
)
from mixq.io import read_json, write_json
from mixq.kl import split_chunks
from mixq.probes import make_probes

FOUR, EIGHT = (candidate_dict({"bits": b, "group_size": 64, "mode": "affine"}) for b in (4, 8))


def uniform_quants(source: Path, out: Path) -> dict[str, Path]:
    """Uniform 4- and 8-bit g64 checkpoints of ``source``, as the baselines stage writes them."""
    model, _ = mlx_lm.utils.load_model(source)
    table = {**table_for(model), "dtype": "bfloat16"}
    quants = {}
    for c in (FOUR, EIGHT):
        quants[f"uniform-{c['name']}"] = out / f"uniform-{c['name']}"
        write_checkpoint(source, out / f"uniform-{c['name']}", uniform_plan(table, c), table,
                         "bfloat16")
    return quants


@pytest.fixture(scope="module")
def smollm2_quants(smollm2_dir, tmp_path_factory) -> dict[str, Path]:
    return uniform_quants(smollm2_dir, tmp_path_factory.mktemp("smollm2-quants"))


@pytest.fixture(scope="module")
def heldout(smollm2) -> list[mx.array]:
    """Two 96-token windows of real chat text (a worked word problem and a tool call)."""
    _, tokenizer = smollm2
    probes = make_probes(EvalConfig(tasks=["arithmetic", "tool_call"], samples_per_task=1),
                         lambda text: 0)
    rows = [prompt_tokens(tokenizer, p) + tokenizer.encode(p.reference) for p in probes]
    return split_chunks(np.array([r[:96] for r in rows], dtype=np.int32), 1024)


def test_heldout_metrics_of_quants_are_sane(smollm2_dir, smollm2_quants, heldout, tmp_path):
    reference_model, _, kernels = load_for_eval(smollm2_dir)
    assert kernels == "float"
    n_tokens = sum(c.size for c in heldout)
    reference = record_logits(forward_logits(reference_model, heldout), n_tokens,
                              tmp_path / "ref.npy")
    itself = heldout_metrics((mx.array(r) for r in stored_logits(reference, heldout)), heldout,
                             reference)
    assert itself["kl_mean"] == itself["kl_max"] == 0.0 and itself["top1"] == 1.0
    assert 1.0 < itself["ppl"] < 50.0
    rerun = heldout_metrics(forward_logits(reference_model, heldout), heldout, reference)
    assert rerun["kl_max"] < 1e-6 and rerun["top1"] == 1.0
    four, eight = (
        heldout_metrics(forward_logits(load_for_eval(smollm2_quants[f"uniform-{c['name']}"])[0],
                                       heldout), heldout, reference)
        for c in (FOUR, EIGHT)
    )
    assert 0.0 < eight["kl_mean"] < four["kl_mean"] / 20 and four["kl_mean"] < 2.0
    assert eight["kl_p95"] < four["kl_p95"] and eight["top1"] > four["top1"] > 0.5
    assert abs(eight["ppl"] / itself["ppl"] - 1) < 0.02 < four["ppl"] / itself["ppl"] - 1


def test_dequantized_float32_equals_the_quantized_kernels(smollm2_quants, heldout):
    path = smollm2_quants[f"uniform-{FOUR['name']}"]
    tokens = heldout[0][:1, :12]
    quantized, _ = mlx_lm.load(str(path))
    quantized.set_dtype(mx.float32)
    assert isinstance(quantized.model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    dequantized, _, kernels = load_for_eval(path)
    assert kernels == ("dequantized-float32" if mx.default_device() == mx.cpu else "quantized")
    if kernels == "dequantized-float32":
        assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
                       for _, m in dequantized.named_modules())
        assert {v.dtype for _, v in tree_flatten(dequantized.parameters())} == {mx.float32}
    want, got = quantized(tokens), dequantized(tokens)
    tolerance = 2e-5 * mx.abs(want).max().item()  # measured: 3.4e-6
    assert mx.abs(got - want).max().item() < tolerance
    # dequantizing before the cast rounds every weight to bfloat16: far off the kernels
    rounded, _ = mlx_lm.load(str(path))
    dequantize_model(rounded)
    rounded.set_dtype(mx.float32)
    assert mx.abs(rounded(tokens) - want).max().item() > 100 * tolerance


def test_batched_greedy_answers_equal_mlx_lm_generate(smollm2):
    model, tokenizer = smollm2
    probes = make_probes(EvalConfig(tasks=["format", "code"], samples_per_task=1), len)
    prompts = [prompt_tokens(tokenizer, p) for p in probes]
    with tqdm(total=len(probes)) as progress:
        answers = generate_answers(model, tokenizer, probes, prompts, 12, progress)
    assert progress.n == len(probes)
    for prompt, answer in zip(prompts, answers):
        single = mlx_lm.generate(model, tokenizer, prompt, max_tokens=12,
                                 sampler=make_sampler(temp=0.0))
        assert answer == single and answer


def test_same_size_baseline_is_the_closest_within_tolerance():
    assert closest_in_size({"a": 4.5, "b": 8.5}, 5.0) == ("a", pytest.approx(-0.1))
    assert closest_in_size({"a": 4.9, "b": 5.2}, 5.0) == ("a", pytest.approx(-0.02))
    plan = {"layers": {"x": {"mode": "affine", "group_size": 32}, "y": {"mode": "mxfp4",
                                                                     "group_size": 16}}}
    assert uniform4_name(plan) == "uniform-affine-b4-g32"


def mixed_quant(source: Path, out: Path) -> Path:
    """A mixed checkpoint of ``source`` at ``out``: 8-bit attention, 4-bit g64 elsewhere, with a
    predicted KL set by hand (0.01)."""
    model, _ = mlx_lm.utils.load_model(source)
    table = {**table_for(model), "dtype": "bfloat16"}
    plan = uniform_plan(table, FOUR)
    for path, entry in plan["layers"].items():
        if "self_attn" in path:
            entry.update(bits=8, candidate=EIGHT["name"], kl=1e-4)
    plan["summary"] = {**model_bpw(plan, table, 16), "predicted_kl": 0.01}
    write_checkpoint(source, out, plan, table, "bfloat16")
    return out


def small_calibration(source: Path, out: Path) -> Path:
    """calibrate's output at ``out`` for ``source``'s tokenizer: 4 in-distribution held-out
    windows of 48 tokens (reasoning and tool-call chats) and 2 of other sources."""
    cal_cfg = CalibrationConfig(domains=["reasoning", "tool_call"], samples_per_domain=1,
                                refine_per_domain=0, heldout_per_domain=2,
                                heldout_other_per_source=1, seq_len=48)
    write_calibration(build_calibration(load_tokenizer(source), cal_cfg, 2048), out, "smollm2",
                      cal_cfg)
    return out


def run_both_stages(reference: Path, mixed: Path, baselines: dict[str, Path], calibration: Path,
                    cfg: EvalConfig, out: Path) -> dict:
    """eval-baselines, its results through their JSON file in ``out``, then eval: the result of
    :func:`run_eval`."""
    write_json(out / BASELINE_RESULTS, run_eval_baselines(reference, baselines, calibration, cfg))
    return run_eval(reference, mixed, baselines, read_json(out / BASELINE_RESULTS), calibration,
                    cfg)


def test_split_stages_give_the_numbers_of_one_pass(smollm2_dir, smollm2_quants, tmp_path):
    mixed = mixed_quant(smollm2_dir, tmp_path / "mixed")
    calibration = small_calibration(smollm2_dir, tmp_path / "calibration")
    cfg = EvalConfig(tasks=["arithmetic"], samples_per_task=2, max_tokens=6)
    four = f"uniform-{FOUR['name']}"
    baselines = {four: smollm2_quants[four]}  # eval needs no more (and 135M loads take seconds)
    split = run_both_stages(smollm2_dir, mixed, baselines, calibration, cfg, tmp_path)

    chunks, probes, prompts = eval_inputs(smollm2_dir, calibration, cfg)
    everything = {"reference": smollm2_dir, "mixed": mixed, **baselines}
    one_pass = evaluate_checkpoints(everything, chunks, probes, prompts, everything, cfg)
    assert list(split["models"]) == list(one_pass)
    for name, want in one_pass.items():
        got = split["models"][name]
        assert {k: got["metrics"][k] for k in want["metrics"]} == want["metrics"], name
        assert (got["answers"], got["scores"]) == (want["answers"], want["scores"]), name
        asked = [p for p in probes if p.task not in split["metrics"]["skipped_tasks"]]
        assert len(got["answers"]) == len(asked) and all(got["answers"])
    assert split["metrics"]["heldout_tokens"] == 6 * 48
    mixed_metrics = split["metrics"]["mixed"]
    assert mixed_metrics["kl_mean"] > 0.0 and mixed_metrics["id_kl_mean"] > 0.0
    assert mixed_metrics["kl_mean"] != mixed_metrics["id_kl_mean"]  # two splits, two numbers
    assert split["reference_rerun"]["heldout"] > 0


def test_eval_refuses_stale_baseline_results(tiny_run):
    result, root, cfg, paths = tiny_run
    stored = read_json(root / BASELINE_RESULTS)
    baselines = {n: p for n, p in paths.items() if n.startswith("uniform-")}
    other_probes = EvalConfig(samples_per_task=1, max_tokens=6, hashhop_tokens=64, seed=1)
    with pytest.raises(ValueError, match="stale .*other probes.*re-run eval-baselines"):
        run_eval(paths["reference"], paths["mixed"], baselines, stored, root / "calibration",
                 other_probes)
    del stored["models"]["uniform-affine-b8-g64"]
    with pytest.raises(ValueError, match="no results for uniform-affine-b8-g64"):
        run_eval(paths["reference"], paths["mixed"], baselines, stored, root / "calibration", cfg)


@pytest.fixture(scope="module")
def tiny_run(tiny_llama_dir, tmp_path_factory):
    """A whole eval (both stages) of a 2-block random Llama (SmolLM2's tokenizer): uniform
    4/8-bit and a mixed quant (8-bit attention, predicted KL set by hand), one probe per task."""
    root = tmp_path_factory.mktemp("tiny-eval")
    quants = uniform_quants(tiny_llama_dir, root)
    mixed = mixed_quant(tiny_llama_dir, root / "mixed")
    cfg = EvalConfig(samples_per_task=1, max_tokens=6, hashhop_tokens=64, skip_at_chance=False)
    result = run_both_stages(tiny_llama_dir, mixed, quants,
                             small_calibration(tiny_llama_dir, root / "calibration"), cfg, root)
    write_outputs(result, cfg, root / "eval")
    return result, root, cfg, {"reference": tiny_llama_dir, "mixed": mixed, **quants}


def test_eval_writes_flat_metrics_with_deltas_and_predictions(tiny_run):
    result, root, cfg, paths = tiny_run
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result["metrics"]))
    u4, u8 = (f"uniform-{c['name']}" for c in (FOUR, EIGHT))
    assert [k for k, v in metrics.items() if isinstance(v, dict)] == [
        "reference", "mixed", u4, u8, "delta_vs_uniform4", "delta_vs_same_size", "skipped_tasks"]
    assert metrics["skipped_tasks"] == {}  # eval.skip_at_chance=false: every task asked
    heldout = {*HELDOUT_KEYS, "size_bytes", "kernels"}
    for name in ("reference", "mixed", u4, u8):
        m = metrics[name]
        assert heldout <= set(m), name
        assert m["size_bytes"] == sum(f.stat().st_size for f in paths[name].glob("*.safetensors"))
        assert m["capability"] == pytest.approx(np.mean([m[t] for t in cfg.tasks]))
        assert all(0.0 <= m[t] <= 1.0 for t in cfg.tasks)
    assert metrics["reference"]["kl_mean"] == 0.0 and metrics["reference"]["top1"] == 1.0
    assert metrics["reference"]["kernels"] == "float" and "bpw" not in metrics["reference"]
    assert 0.0 < metrics[u8]["kl_mean"] < metrics["mixed"]["kl_mean"] < metrics[u4]["kl_mean"]
    assert metrics[u4]["bpw"] < metrics["mixed"]["bpw"] < metrics[u8]["bpw"]
    assert metrics["mixed"]["predicted_kl"] == 0.01
    assert metrics["mixed"]["measured_over_predicted_kl"] == pytest.approx(
        metrics["mixed"]["kl_mean"] / 0.01)
    assert "predicted_kl" not in metrics[u4]  # a table without KLs predicts nothing
    delta = metrics["delta_vs_uniform4"]
    for key in ("kl_mean", "ppl", "top1", "capability", "size_bytes", "bpw", *cfg.tasks):
        assert delta[key] == pytest.approx(metrics["mixed"][key] - metrics[u4][key])
    # 8-bit attention only: uniform 4-bit is 0.7% smaller, within the 3% of "same size"
    assert metrics["uniform4"] == metrics["same_size"] == metrics["closest_size"] == u4
    assert metrics["delta_vs_same_size"] == delta and -0.03 < metrics["closest_size_bpw_gap"] < 0
    assert metrics["heldout_tokens"] == 6 * 48
    assert metrics["seconds"] > 0


def test_eval_writes_samples_summary_and_plots(tiny_run):
    result, root, cfg, _ = tiny_run
    out = root / "eval"
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["task"] for s in samples] == list(cfg.tasks)
    for s in samples:
        assert set(s["answers"]) == set(s["scores"]) == {"reference", "mixed",
                                                         "uniform-affine-b4-g64",
                                                         "uniform-affine-b8-g64"}
    summary = (out / "summary.md").read_text()
    for name in result["models"]:
        assert f"| {name} |" in summary
    assert "Δ vs `uniform-affine-b4-g64`" in summary and "## Timings" in summary
    assert "| reference (again, for mixed) |" in summary
    with open(out / "kl_per_layer.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["layer_index", "layer", "mixed", "uniform-affine-b4-g64",
                             "uniform-affine-b8-g64"]
    assert len(rows) == len(result["table"]["layers"])
    with open(out / "bits_per_layer.csv") as fh:
        bits = {float(r["uniform-affine-b4-g64"]) for r in csv.DictReader(fh)}
    assert bits == {4.5}
    with open(out / "kl_vs_size.csv") as fh:
        assert [r["quant"] for r in csv.DictReader(fh)] == list(result["plans"])
    for png in ("kl_per_layer.png", "bits_per_layer.png", "kl_vs_size.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dvc_eval_baselines_reads_nothing_of_the_budget():
    stages = yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())["stages"]
    baselines, mixed = stages["eval-baselines"], stages["eval"]
    assert baselines["params"] == ["eval", "memory"]  # memory sizes slices only: no quant.*
    assert baselines["outs"] == ["outputs/eval-baselines"]
    assert {"outputs/model", "outputs/calibration", "outputs/baselines"} <= set(baselines["deps"])
    assert not [d for d in baselines["deps"] if d.startswith(("outputs/quant", "outputs/refined"))
                or d in ("outputs/plan", "outputs/sensitivity", "mixq/eval_report.py")]
    assert {"outputs/refined", "outputs/eval-baselines", "mixq/eval_runs.py"} <= set(mixed["deps"])
    code = {"stages/eval_baselines.py", "mixq/eval_runs.py", "mixq/evaluate.py"}
    assert code <= set(baselines["deps"]) and mixed["params"] == ["eval", "memory"]


def test_tasks_at_chance_for_the_reference_are_not_asked_of_the_quants(tiny_run):
    """A random model scores 0 on every task: with skip_at_chance (the default) the quants
    answer no probe, the metrics, summary and card say which tasks were left out and why, and
    the held-out numbers are those of the run that asked everything."""
    _, root, asked_all, paths = tiny_run
    cfg = replace(asked_all, skip_at_chance=True)
    baselines = {n: p for n, p in paths.items() if n.startswith("uniform-")}
    out = root / "skipping"
    out.mkdir()
    result = run_both_stages(paths["reference"], paths["mixed"], baselines, root / "calibration",
                             cfg, out)
    metrics = result["metrics"]
    assert metrics["skipped_tasks"] == {t: "the float reference scored 0 of 1" for t in cfg.tasks}
    for name in ("mixed", *baselines):
        assert result["models"][name]["answers"] == []
        assert not set(cfg.tasks) & set(metrics[name]) and "capability" not in metrics[name]
        assert metrics[name]["kl_mean"] == json.loads(
            (root / "eval" / "metrics.json").read_text())[name]["kl_mean"]
    write_outputs(result, cfg, out / "eval")
    assert "Not asked of the quants: arithmetic (the float reference scored 0 of 1" in (
        out / "eval" / "summary.md").read_text()
    assert (out / "eval" / "samples.jsonl").read_text() == ""
    card = benchmark_section(metrics)
    assert "Tasks not asked of the quants" in card and "`code`: the float reference" in card
