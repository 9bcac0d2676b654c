"""Use the system's OpenBLAS for MLX's CPU matmuls on Linux.

MLX's Linux CPU wheel links a bundled reference BLAS (float32 matmul ~2-6 GFLOP/s on our CI
machine). Loading Debian's ``libopenblas0-pthread`` ``libblas.so.3`` into the global symbol
scope *before* ``mlx.core`` is imported makes MLX's ``cblas_*`` calls resolve to OpenBLAS
(~175 GFLOP/s measured on 2 cores), exactly like ``LD_PRELOAD`` but without re-exec.

Set ``MIXQ_BLAS=off`` to keep MLX's own BLAS, or ``MIXQ_BLAS=/path/to/libblas.so`` to choose one.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
)

loaded_blas: str | None = None


def use_openblas() -> str | None:
    """Load OpenBLAS globally if on Linux, available, and mlx is not imported yet.

    Returns the path loaded, or None (not Linux, disabled, not installed, or too late).
    """
    global loaded_blas
    choice = os.environ.get("MIXQ_BLAS", "auto")
    if loaded_blas or choice == "off" or platform.system() != "Linux":
        return loaded_blas
    if "mlx.core" in sys.modules:
        return None
    paths = OPENBLAS_CANDIDATES if choice == "auto" else (choice,)
    for path in paths:
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            loaded_blas = path
            break
    return loaded_blas
