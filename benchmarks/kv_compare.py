"""Compare KV-cache precisions on the pipeline's quant, in one run on one machine:

* unquantized KV (the model's own caches), uniform 2/4/8-bit KV, the pipeline's mixed config
  (outputs/kv/kv_config.json, at kv.target_bits) and a mixed config allocated from the same
  sensitivity table at exactly the bits of uniform 4-bit (the equal-size comparison);
* per config: KL(unquantized KV || config) per token over the held-out windows joined into one
  long sequence, run through real QuantizedKVCaches in prefill chunks (never calibration data);
  the HashHop long-context retrieval probe of mixq.probes (greedy answers through
  mlx_lm.generate with the config's caches: accuracy; and the teacher-forced log-probability of
  the right answer, which moves even when a small model's accuracy does not); KV bytes per
  token as accounted (checkpoint dtype, as on a GPU) and as measured here from the caches' nbytes.

    python benchmarks/kv_compare.py [--probes 8] [--hashhop-tokens 1024] [--hops 1]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import mixq  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx_lm
import numpy as np
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from tqdm import tqdm

from mixq.allocate import uniform_plan
from mixq.budget import DTYPE_BITS
from mixq.artifacts import read_calibration
from mixq.config import KVConfig
from mixq.evaluate import prompt_tokens
from mixq.io import read_json
from mixq.kv import kv_config, kv_plan, kv_sequences, layer_kl, prefill_chunks
from mixq.kl import kl_summary
from mixq.measure import build_reference
from mixq.probes import hashhop_probe, score_hashhop
from mixq.runtime import cache_for, load

CHUNK = 256


def kv_configs(table: dict, pipeline: dict, model_dir: Path) -> dict[str, dict]:
    """name -> kv config: uniform per candidate, the pipeline's, and mixed at uniform-4's bits."""
    dtype_bits = DTYPE_BITS[table["dtype"]]
    configs = {}
    for c in table["candidates"]:
        configs[f"uniform {c['name']}"] = kv_config(table, uniform_plan(table, c, dtype_bits),
                                                     model_dir)
    four = next(c for c in table["candidates"] if c["bits"] == 4)
    same_bits = configs[f"uniform {four['name']}"]["summary"]["bits"]
    kv = KVConfig(candidates=table["candidates"], target_bits=same_bits)
    configs[f"mixed @ {same_bits:.3f} bits"] = kv_config(table, kv_plan(table, kv), model_dir)
    configs[f"mixed @ {pipeline['summary']['target_bits']} (pipeline)"] = pipeline
    return configs


def heldout_kl(model, sequence: np.ndarray, configs: dict, work: Path) -> dict[str, dict]:
    """Per config: KL summary vs the unquantized KV cache over ``sequence`` [1, T], and the KV
    bytes per token measured from caches holding its first 256 tokens (one allocation step of
    KVCache and QuantizedKVCache, so no padding)."""
    ref = build_reference(model, prefill_chunks(sequence, CHUNK), work, make_prompt_cache(model))
    out = {}
    for name, config in tqdm(configs.items(), desc="held-out KL", unit="config"):
        out[name] = kl_summary(layer_kl(model, ref, config["layers"] if config else {}, 0))
        cache = cache_for(model, config)
        model(mx.array(sequence[:, :256]), cache=cache)
        mx.eval([c.state for c in cache])
        out[name]["measured_bytes_per_token"] = sum(c.nbytes for c in cache) / 256
    return out


def answer_then_generate(model, tokenizer, config: dict, prompt: list[int], answer: list[int],
                         max_tokens: int) -> tuple[float, str]:
    """One prefill of ``prompt`` through the config's caches, then (a) log p(answer | prompt)
    [nats], teacher-forced, and (b) the greedy response from stock ``mlx_lm.generate`` on the
    same caches once the answer is trimmed off them."""
    cache = cache_for(model, config)
    for s in range(0, len(prompt) - 1, CHUNK):
        model(mx.array([prompt[s : min(s + CHUNK, len(prompt) - 1)]]), cache=cache)
    logits = model(mx.array([prompt[-1:] + answer[:-1]]), cache=cache)[0].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    logprob = float(logp[mx.arange(len(answer)), mx.array(answer)].sum())
    trim_prompt_cache(cache, len(answer))  # back to prompt[:-1]
    text = mlx_lm.generate(model, tokenizer, prompt[-1:], max_tokens=max_tokens,
                           prompt_cache=cache)
    return logprob, text


def hashhop(model, tokenizer, configs: dict, n: int, tokens: int, hops: int) -> dict[str, dict]:
    """Per config: HashHop accuracy (greedy, mixq.probes' scorer) and the mean log-probability
    of the right answer."""
    rng = random.Random("hashhop:0")
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    probes = [hashhop_probe(rng, tokens, hops, count) for _ in range(n)]
    prompts = [prompt_tokens(tokenizer, p) for p in probes]
    out = {}
    for name, config in tqdm(configs.items(), desc="hashhop", unit="config"):
        right, logps = [], []
        for probe, prompt in zip(probes, prompts):
            answer = tokenizer.encode(probe.target, add_special_tokens=False)
            logp, text = answer_then_generate(model, tokenizer, config, prompt, answer,
                                              probe.max_tokens)
            right.append(score_hashhop(probe, text))
            logps.append(logp)
        out[name] = {"accuracy": float(np.mean(right)), "answer_logprob": float(np.mean(logps)),
                     "prompt_tokens": float(np.mean([len(p) for p in prompts]))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("outputs/refined"))
    parser.add_argument("--kv", type=Path, default=Path("outputs/kv"))
    parser.add_argument("--calibration", type=Path, default=Path("outputs/calibration"))
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--hashhop-tokens", type=int, default=1024)
    parser.add_argument("--hops", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kv_compare.json"))
    args = parser.parse_args()

    table = read_json(args.kv / "kv_sensitivity.json")
    configs = {"unquantized": None,
               **kv_configs(table, read_json(args.kv / "kv_config.json"), args.model)}
    model, tokenizer, _ = load(args.model, "none")
    heldout = read_calibration(args.calibration).heldout_tokens
    sequence = kv_sequences(heldout, heldout.size // 256 * 256, 1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mixq-kv-bench-") as work:
        kl = heldout_kl(model, sequence, configs, Path(work))
    probe = hashhop(model, tokenizer, configs, args.probes, args.hashhop_tokens, args.hops)
    dtype_bits = DTYPE_BITS[table["dtype"]]
    unquantized_bits = sum(x["params"] for x in table["layers"]) * dtype_bits
    result = {"heldout_tokens": int(sequence.size), "seconds": time.perf_counter() - t0,
              "kv_dtype": table["dtype"], "compute": str(mx.default_device()), "configs": {}}
    for name, config in configs.items():
        s = config["summary"] if config else None
        result["configs"][name] = {
            "bits": s["bits"] if s else dtype_bits,
            "bytes_per_token": s["bytes_per_token"] if s else unquantized_bits / 8,
            "predicted_kl": s["predicted_kl"] if s else 0.0,
            "layers_by_bits": {b: sum(e["bits"] == b for e in config["layers"].values())
                               for b in sorted({e["bits"] for e in config["layers"].values()})}
            if config else {},
            "heldout": kl[name], "hashhop": probe[name],
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"| KV cache | bits/elem | B/token (accounted, {table['dtype']}) | B/token measured "
          "here | predicted KL | held-out KL mean | p95 | HashHop acc | log p(answer) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in result["configs"].items():
        h, q = r["heldout"], r["hashhop"]
        print(f"| {name} | {r['bits']:.3f} | {r['bytes_per_token']:.0f} | "
              f"{h['measured_bytes_per_token']:.0f} | {r['predicted_kl']:.4g} | {h['mean']:.4g} | "
              f"{h['p95']:.4g} | {q['accuracy']:.2f} | {q['answer_logprob']:.2f} |")


if __name__ == "__main__":
    main()
