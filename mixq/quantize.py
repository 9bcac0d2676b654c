"""The one quantize function mixq uses: measure-kl simulates with it, convert ships it.

Both paths cast the float weight to the checkpoint dtype (``quant.dtype``, e.g. bfloat16) and
call ``mx.quantize`` with the candidate's bits, group size and mode, exactly as mlx-lm's
``nn.quantize``/``to_quantized`` does on the cast model.
"""

from __future__ import annotations

import mlx.core as mx

from mixq.config import Candidate

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def quantize_weight(weight: mx.array, candidate: Candidate, dtype: str) -> tuple[mx.array, ...]:
    """``mx.quantize`` of ``weight`` cast to ``dtype``: (packed, scales[, biases])."""
    return mx.quantize(
        weight.astype(DTYPES[dtype]),
        group_size=candidate.group_size,
        bits=candidate.bits,
        mode=candidate.mode,
    )


def fake_quantize(weight: mx.array, candidate: Candidate, dtype: str) -> mx.array:
    """Quantize then dequantize ``weight`` [..., in]; returns the original dtype, same shape.

    This is the simulated weight: matmuls with it equal (to float rounding) matmuls with the
    real quantized layer, and run fast on CPUs where quantized kernels are slow.
    """
    packed, scales, *biases = quantize_weight(weight, candidate, dtype)
    return mx.dequantize(
        packed,
        scales,
        biases[0] if biases else None,
        group_size=candidate.group_size,
        bits=candidate.bits,
        mode=candidate.mode,
    ).astype(weight.dtype)

