"""Bit-exact number formats: ``quantize``, ``dequantize``, ``pack``/``unpack``.

Each format lives in its own module (``fp8``, ``int8``, ``int4``, ``mxfp4``,
``mxfp6``, ``mxfp8``, ``nvfp4``) and exposes the same three names:

* ``DEFAULT_GRANULARITY``
* ``quantize(x, granularity, **options) -> QuantizedTensor``
* ``dequantize(q, dtype) -> torch.Tensor``

This package only dispatches on ``Format`` through a table.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import fp8, int4, int8, mxfp4, mxfp6, mxfp8, nvfp4
from .core import (
    Arithmetic,
    Format,
    Granularity,
    Int4Packing,
    PerBlock,
    PerGroup,
    PerRow,
    PerTensor,
    QuantizedTensor,
    ScaleRounding,
    as_granularity,
)

_MODULES = {
    Format.FP8_E4M3: fp8,
    Format.INT8: int8,
    Format.INT4: int4,
    Format.MXFP4: mxfp4,
    Format.MXFP6_E2M3: mxfp6.E2M3,
    Format.MXFP6_E3M2: mxfp6.E3M2,
    Format.MXFP8: mxfp8,
    Format.NVFP4: nvfp4,
}


def _module(fmt):
    try:
        return _MODULES[Format(fmt)]
    except ValueError:
        raise ValueError(
            f"fmt must be one of {[f.value for f in Format]}, got {fmt!r}"
        ) from None


def quantize(
    x: torch.Tensor,
    fmt: Union[Format, str],
    granularity: Optional[Union[Granularity, str]] = None,
    **options,
) -> QuantizedTensor:
    """Quantize ``x`` (``[..., rows, cols]``, float) to ``fmt``.

    ``granularity`` defaults to the format's ``DEFAULT_GRANULARITY``;
    ``options`` are the format module's keyword arguments (for example
    ``rounding=`` for MX formats, ``scale=`` for a static fp8/int8 scale,
    ``mode=Int4Mode.ASYMMETRIC`` for int4 with zero points, ``arithmetic=`` for
    fp8/int8/int4 (``Arithmetic.INPUT_DTYPE`` = compressed-tensors' bf16 math), ``global_scale=`` for nvfp4).
    """
    mod = _module(fmt)
    g = mod.DEFAULT_GRANULARITY if granularity is None else as_granularity(granularity)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dtype.itemsize < 2:
        raise TypeError(f"x must be float16/bfloat16/float32, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims [..., rows, cols], got {tuple(x.shape)}")
    return mod.quantize(x, g, **options)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode ``q`` to a ``dtype`` tensor of shape ``q.shape``."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    return _module(q.fmt).dequantize(q, dtype)


def fake_quantize(
    x: torch.Tensor,
    fmt: Union[Format, str],
    granularity: Optional[Union[Granularity, str]] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    **options,
) -> torch.Tensor:
    """Quantize then dequantize to ``dtype`` (default ``x.dtype``): activation QDQ."""
    return dequantize(quantize(x, fmt, granularity, **options), dtype or x.dtype)


from .int4 import Int4Mode

__all__ = [
    "Arithmetic",
    "Format",
    "Int4Mode",
    "Granularity",
    "Int4Packing",
    "PerBlock",
    "PerGroup",
    "PerRow",
    "PerTensor",
    "QuantizedTensor",
    "ScaleRounding",
    "dequantize",
    "fake_quantize",
    "quantize",
]
