"""Benchmark measure-kl on the embedded default model, in one run on one machine:

1. exact (block replay + chunked stable KL) vs naive (one full forward per (layer, candidate),
   the same KL): total time, ratio, and the max relative difference of the two tables;
2. fisher vs exact: time ratio and Spearman rank correlation of the KL predictions.

Rows are timed alternately (exact row, naive row) so machine load hits both alike. By default
a stratified subset of layers (every layer type of every 10th block, the last block, and the
embeddings) keeps the run under half an hour on 2 cores; --all measures every layer.

    python benchmarks/measure_speed.py [--sequences 12] [--seq-len 256] [--block-stride 10] [--all]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import mixq  # noqa: F401  (OpenBLAS before mlx)
import numpy as np
from mlx_lm.utils import load_model, load_tokenizer
from tqdm import tqdm

from mixq.budget import candidate_name
from mixq.calibration import build_calibration
from mixq.config import CalibrationConfig, Candidate, ModelConfig
from mixq.fisher import measure_fisher
from mixq.layers import applicable_candidates, get_module, quantizable_layers
from mixq.kl import kl_summary, sliced_kl, split_chunks
from mixq.measure import build_reference, measure_layer_kl
from mixq.prepare import prepare_model
from mixq.quantize import fake_quantize
from mixq.sensitivity import spearman


def naive_layer_kl(model, layer, candidate, dtype, ref) -> np.ndarray:
    """One full forward per chunk with the layer quantized, nothing replayed."""
    module = get_module(model, layer.path)
    original = module.weight
    module.weight = fake_quantize(original, candidate, dtype)
    try:
        kls = [sliced_kl(lambda rows: ref.rows(c, rows), model(chunk))
               for c, chunk in enumerate(ref.chunks)]
    finally:
        module.weight = original
    return np.concatenate(kls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sequences", type=int, default=12, help="calibration sequences (default run: 12)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--block-stride", type=int, default=10,
                        help="measure every layer of every N-th block, the last block and the embeddings")
    parser.add_argument("--all", action="store_true", help="every layer, not the stratified subset")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/measure_speed.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mixq-bench-"))
    model_dir = prepare_model(ModelConfig(kind="embedded", id="smollm2-135m-instruct"), work / "model")
    model, _ = load_model(model_dir)
    per_domain = -(-args.sequences // 6)
    cal = build_calibration(load_tokenizer(model_dir),
                            CalibrationConfig(samples_per_domain=per_domain, seq_len=args.seq_len),
                            8192)
    tokens = cal.tokens[: args.sequences]
    cands, dtype = [Candidate(4, 64), Candidate(8, 64)], "bfloat16"
    all_layers = quantizable_layers(model)
    all_rows = sum(len(applicable_candidates(x, cands)) for x in all_layers)
    layers = all_layers
    if not args.all:
        blocks = set(range(0, len(model.layers), args.block_stride)) | {len(model.layers) - 1}
        layers = [x for x in layers if x.block is None or x.block in blocks]
    rows = [(x, c) for x in layers for c in applicable_candidates(x, cands)]

    t0 = time.perf_counter()
    ref = build_reference(model, split_chunks(tokens, 512), work)
    t_reference = time.perf_counter() - t0
    t_exact, t_naive, exact, naive = t_reference, 0.0, {}, {}
    for layer, c in tqdm(rows, desc="exact vs naive", unit="row"):
        key = f"{layer.path}|{candidate_name(c)}"
        t = time.perf_counter()
        exact[key] = kl_summary(measure_layer_kl(model, layer, c, dtype, ref))
        t_exact += time.perf_counter() - t
        t = time.perf_counter()
        naive[key] = kl_summary(naive_layer_kl(model, layer, c, dtype, ref))
        t_naive += time.perf_counter() - t
    t = time.perf_counter()
    fisher = measure_fisher(model, tokens, all_layers, cands, dtype)  # always every layer
    t_fisher = time.perf_counter() - t
    # the stratified rows sample every depth evenly: their mean cost stands for all rows
    t_exact_all = t_reference + (t_exact - t_reference) / len(rows) * all_rows

    keys = sorted(exact)
    max_rel = max(abs(exact[k][s] - naive[k][s]) / abs(naive[k][s])
                  for k in keys for s in ("mean", "p95", "max") if naive[k][s])
    def rank_agreement(subset):
        return spearman(np.array([exact[k]["mean"] for k in subset]),
                        np.array([fisher[tuple(k.split("|"))]["mean"] for k in subset]))

    rho = rank_agreement(keys)
    rho_per_candidate = {
        candidate_name(c): rank_agreement([k for k in keys if k.endswith(candidate_name(c))])
        for c in cands
    }
    result = {
        "tokens": int(tokens.size), "rows": len(rows), "layers": len(layers),
        "exact_seconds": t_exact, "exact_reference_seconds": t_reference,
        "naive_seconds": t_naive, "exact_speedup_vs_naive": t_naive / t_exact,
        "max_relative_difference": max_rel,
        "all_rows": all_rows, "exact_all_rows_seconds_estimate": t_exact_all,
        "fisher_all_rows_seconds": t_fisher, "fisher_speedup_vs_exact": t_exact_all / t_fisher,
        "spearman_fisher_vs_exact": rho, "spearman_per_candidate": rho_per_candidate,
        "exact_rows": exact, "fisher_rows": {k: fisher[tuple(k.split("|"))] for k in keys},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{len(rows)} rows x {tokens.size} tokens")
    print(f"exact  {t_exact:8.1f} s (reference pass {t_reference:.1f} s)")
    print(f"naive  {t_naive:8.1f} s  -> exact is {t_naive / t_exact:.2f}x faster, "
          f"max relative difference {max_rel:.2e}")
    print(f"fisher {t_fisher:8.1f} s for all {all_rows} rows -> {t_exact_all / t_fisher:.1f}x "
          f"faster than exact ({t_exact_all:.0f} s for all rows), Spearman rho {rho:.3f}, "
          f"within one candidate {rho_per_candidate}")


if __name__ == "__main__":
    main()
