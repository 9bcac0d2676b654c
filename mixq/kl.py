"""KL(reference || model) per token, exact enough for 8-bit layers, from logits [..., V].

Used by measure-kl (per layer), kv-sensitivity (per KV cache) and eval (per quant). Sums run
in float64 (:func:`token_kl`), which MLX has on the CPU only, so these two functions run on the
CPU stream whatever the default device (on Apple silicon its memory is the GPU's: no copy).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import mlx.core as mx
import numpy as np

from mixq.memory import logit_rows

LARGE_SHIFT = 40.0  # logit shifts beyond this need the direct form (see token_kl)


class LogitsRef(NamedTuple):
    """The reference side of the KL for some tokens: probabilities ``p`` and logits ``z``
    [..., V] float32; logsumexp ``lse`` and the sum of the stored ``p`` ``psum`` [...] float64
    (MLX's float32 softmax sums to 1 only within ~4e-5, far above 8-bit KLs)."""

    p: mx.array
    z: mx.array
    lse: mx.array
    psum: mx.array


def reference_logits(logits: mx.array) -> LogitsRef:
    with mx.stream(mx.cpu):
        z = logits.astype(mx.float32)
        lse = mx.logsumexp(z.astype(mx.float64), axis=-1)
        p = mx.exp(z - lse.astype(mx.float32)[..., None])
        return LogitsRef(p, z, lse, p.astype(mx.float64).sum(-1))


def token_kl(ref: LogitsRef, z: mx.array) -> mx.array:
    """KL(p_ref || softmax(z)) per token [...] for perturbed logits ``z`` [..., V].

    With d = z - z_ref and any shift m: KL = log E_p[exp(d - m)] - (E_p[d] - m). Taking m =
    E_p[d] (rounded to float32) makes E_p[expm1(d - m)] ~ KL small, so log1p keeps the ~1e-6
    KLs of 8-bit layers accurate; sums accumulate in float64 and are normalized by the exact
    sum of p. Tokens the perturbation changes drastically (E_p[exp(d - m)] < 1/2, or a shift
    > LARGE_SHIFT where a word's float32 p may have underflowed) use log E_p[exp d] =
    logsumexp(z) - lse_ref instead.
    """
    with mx.stream(mx.cpu):
        z = z.astype(mx.float32)
        d = z - ref.z
        mean_d = (ref.p * d).astype(mx.float64).sum(-1) / ref.psum
        m = mean_d.astype(mx.float32)
        s = (ref.p * mx.expm1(d - m[..., None])).astype(mx.float64).sum(-1) / ref.psum
        kl = mx.log1p(mx.maximum(s, -0.5)) - (mean_d - m)
        drastic = (s < -0.5) | (d.max(-1) > LARGE_SHIFT)
        if mx.any(drastic).item():
            direct = mx.logsumexp(z.astype(mx.float64), axis=-1) - ref.lse - mean_d
            kl = mx.where(drastic, direct, kl)
        return mx.maximum(kl, 0.0).astype(mx.float32)


def kl_summary(kl: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(kl.mean()),
        "p95": float(np.percentile(kl, 95)),
        "max": float(kl.max()),
    }


def sliced_kl(ref_rows: Callable[[slice], LogitsRef], z: mx.array) -> np.ndarray:
    """Per-token KL [n] of logits ``z`` [..., V] (n tokens) against ``ref_rows(s)``, the
    reference of the tokens ``s``, one slice of :func:`mixq.memory.logit_rows` tokens at a time
    (bounded memory; the same numbers as one :func:`token_kl` of all tokens)."""
    z = z.reshape(-1, z.shape[-1])
    step = logit_rows(z.shape[-1])
    kls = []
    for start in range(0, len(z), step):
        rows = slice(start, start + step)
        kl = token_kl(ref_rows(rows), z[rows])
        mx.eval(kl)
        kls.append(np.array(kl))
    return np.concatenate(kls)


def split_chunks(tokens: np.ndarray, chunk_tokens: int) -> list[mx.array]:
    """Whole sequences [B, T] grouped so each chunk holds about ``chunk_tokens`` tokens."""
    per_chunk = max(1, chunk_tokens // tokens.shape[1])
    return [mx.array(tokens[i : i + per_chunk]) for i in range(0, len(tokens), per_chunk)]
