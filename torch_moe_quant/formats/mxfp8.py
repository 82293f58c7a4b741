"""MXFP8 (OCP MX v1.0): fp8 e4m3 elements, one e8m0 scale per 32 along K.

Layout of a quantized ``[..., rows, cols]`` tensor:

* ``data``: ``torch.float8_e4m3fn`` ``[..., rows, cols]`` (one code per byte;
  ``pack``/``unpack`` convert between uint8 bit patterns and this dtype).
* ``scale``: uint8 e8m0 ``[..., rows, cols // 32]`` (see ``_e8m0``).

Quantize: shared exponent ``e`` by ``rounding`` (``FLOOR`` default, ``EVEN``,
``RCEIL``; ``emax_elem = 8``); elements ``x * 2**-e`` are clamped to ``±448``
and cast to e4m3 (round to nearest even, subnormals kept, ``-0`` kept).
Dequantize: ``e4m3 value * 2**(scale - 127)`` in float32, cast to ``dtype``.

NaN / inf policy:

* a block holding a NaN gets scale 255 (NaN) and element codes 0 (+0.0); it
  dequantizes to NaN everywhere. (torchao 0.18 ``FLOOR``/``EVEN`` store NaN
  codes for the NaN elements and ``±0`` for the rest; ``RCEIL`` NaN codes for
  all; measured.)
* a block holding ``±inf`` (and no NaN) gets scale 254 (``2**127``): the inf
  elements saturate to ``±448`` (never the NaN code) and the finite ones
  round to ``±0``; it dequantizes to ``±inf`` where the infs were and ``±0``
  elsewhere.
"""

from __future__ import annotations

import torch

from . import _e8m0
from ._minifloat import FP8_E4M3
from .core import Format, PerGroup, QuantizedTensor, ScaleRounding

FMT = Format.MXFP8
ELEMENT = FP8_E4M3
DEFAULT_GRANULARITY = PerGroup(32)


def quantize(
    x: torch.Tensor,
    granularity=DEFAULT_GRANULARITY,
    *,
    rounding: ScaleRounding = ScaleRounding.FLOOR,
) -> QuantizedTensor:
    """Quantize float ``x`` ``[..., rows, cols]`` (cols a multiple of 32) to
    MXFP8. ``granularity`` must be ``PerGroup(32)``."""
    return _e8m0.mx_quantize(
        x, granularity, rounding, fmt=FMT, elem=ELEMENT, encode=_encode, pack=_pack
    )


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode an MXFP8 ``q`` to a ``dtype`` tensor of shape ``q.shape``."""
    return _e8m0.mx_dequantize(q, dtype, fmt=FMT, decode=lambda data, cols: data.float())


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3 bit patterns ``[..., cols]`` -> ``float8_e4m3fn`` ``[..., cols]``."""
    _e8m0.check_codes(codes, 8, 1)
    return _pack(codes)


def unpack(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """``float8_e4m3fn`` ``[..., cols]`` -> uint8 bit patterns ``[..., cols]``."""
    _e8m0.check_packed(packed, cols, torch.float8_e4m3fn, 1, 1)
    return packed.view(torch.uint8)


def _encode(scaled: torch.Tensor) -> torch.Tensor:
    # Clamp first: e4m3fn has no inf, and the cast of an out-of-range value
    # is not saturating on every torch version. clamp keeps NaN, but NaN
    # blocks arrive zeroed (see _e8m0.scale_blocks).
    m = ELEMENT.max_normal
    return scaled.clamp(-m, m).to(torch.float8_e4m3fn).view(torch.uint8)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    return codes.view(torch.float8_e4m3fn)
