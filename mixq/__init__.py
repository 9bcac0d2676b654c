"""mixq: sensitivity-aware mixed-precision MLX quantization."""

from mixq.blas import use_openblas

__version__ = "0.1.0"

use_openblas()
