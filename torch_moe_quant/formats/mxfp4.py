"""MXFP4 (OCP MX v1.0): fp4 e2m1 elements, one e8m0 scale per 32 along K.

Layout of a quantized ``[..., rows, cols]`` tensor:

* ``data``: uint8 ``[..., rows, cols // 2]``; element ``2i`` in the low
  nibble, ``2i + 1`` in the high nibble (gpt-oss, OCP, AMD Quark
  ``Pack_fp4``, torchao ``pack_uint4``). Code = sign bit 3, exponent bits
  2..1, mantissa bit 0: ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` and negatives.
* ``scale``: uint8 e8m0 ``[..., rows, cols // 32]`` (see ``_e8m0``).

Quantize: shared exponent ``e`` by ``rounding`` (``FLOOR`` default, ``EVEN``,
``RCEIL``); elements ``x * 2**-e`` round to nearest even and saturate to
``±6``; negative values that round to zero keep the sign (code 8; torchao
agrees, AMD Quark 0.13 stores +0, measured).
Dequantize: ``value(code) * 2**(scale - 127)`` in float32, cast to ``dtype``.

NaN / inf policy:

* a block holding a NaN gets scale 255 (NaN) and element codes 0; it
  dequantizes to NaN everywhere.
* a block holding ``±inf`` (and no NaN) gets scale 254 (``2**127``): the inf
  elements saturate to ``±6`` and the finite ones round to ``±0``; it
  dequantizes to ``±inf`` where the infs were (``6 * 2**127`` overflows
  float32/bfloat16/float16) and ``±0`` elsewhere.
"""

from __future__ import annotations

import torch

from . import _e8m0
from ._minifloat import FP4_E2M1, decode, encode
from .core import Format, PerGroup, QuantizedTensor, ScaleRounding

FMT = Format.MXFP4
ELEMENT = FP4_E2M1
DEFAULT_GRANULARITY = PerGroup(32)


def quantize(
    x: torch.Tensor,
    granularity=DEFAULT_GRANULARITY,
    *,
    rounding: ScaleRounding = ScaleRounding.FLOOR,
) -> QuantizedTensor:
    """Quantize float ``x`` ``[..., rows, cols]`` (cols a multiple of 32) to
    MXFP4. ``granularity`` must be ``PerGroup(32)``."""
    return _e8m0.mx_quantize(
        x, granularity, rounding, fmt=FMT, elem=ELEMENT,
        encode=lambda v: encode(v, ELEMENT), pack=_pack,
    )


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode an MXFP4 ``q`` to a ``dtype`` tensor of shape ``q.shape``."""
    return _e8m0.mx_dequantize(
        q, dtype, fmt=FMT, decode=lambda data, cols: decode(_unpack(data), ELEMENT)
    )


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 4-bit codes ``[..., cols]`` (cols even) -> uint8 ``[..., cols // 2]``,
    even element in the low nibble."""
    _e8m0.check_codes(codes, 4, 2)
    return _pack(codes)


def unpack(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 ``[..., cols // 2]`` -> uint8 4-bit codes ``[..., cols]``."""
    _e8m0.check_packed(packed, cols, torch.uint8, 1, 2)
    return _unpack(packed)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    pairs = codes.unflatten(-1, (codes.shape[-1] // 2, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
