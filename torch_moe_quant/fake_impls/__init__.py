"""Shape functions shared by the fake (meta) implementations of the
``moe_quant`` ops and by their real launchers: one source of truth for every
output shape, so a fake can never drift from its kernel.

Nothing here depends on tensor *values*: shapes are worst-case sized where the
true size is data dependent (DESIGN §5).
"""

from .shapes import (
    align_shapes,
    dequantize_shape,
    experts_output_shape,
    quantize_shapes,
    route_shapes,
)

__all__ = [
    "align_shapes",
    "dequantize_shape",
    "experts_output_shape",
    "quantize_shapes",
    "route_shapes",
]
