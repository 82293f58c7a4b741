"""MXFP6 (OCP MX v1.0): fp6 e2m3 or e3m2 elements, one e8m0 scale per 32
along K. ``E2M3`` and ``E3M2`` are the two formats; each exposes
``DEFAULT_GRANULARITY``, ``quantize``, ``dequantize``, ``pack``, ``unpack``.

Layout of a quantized ``[..., rows, cols]`` tensor:

* ``data``: uint8 ``[..., rows, cols * 3 // 4]``. Four consecutive codes
  ``v0..v3`` form the 24-bit word ``v0 | v1 << 6 | v2 << 12 | v3 << 18``,
  stored low byte first: the layout of AMD Quark's ``Pack_fp6`` (no inline
  scales), which AMD's ``mfma_scale_f32_16x16x128_f8f6f4`` reads. Code = sign
  bit 5, then exponent, then mantissa bits (e2m3: max 7.5, e3m2: max 28).
* ``scale``: uint8 e8m0 ``[..., rows, cols // 32]`` (see ``_e8m0``).

Quantize: shared exponent ``e`` by ``rounding`` (``FLOOR`` default; Quark
checkpoints use ``EVEN``); elements ``x * 2**-e`` round to nearest even and
saturate to ``±max``; negative values that round to zero keep the sign
(code 0x20; AMD Quark 0.13 stores +0 there, measured).
Dequantize: ``value(code) * 2**(scale - 127)`` in float32, cast to ``dtype``.

NaN / inf policy (as mxfp4):

* a block holding a NaN gets scale 255 (NaN) and element codes 0; it
  dequantizes to NaN everywhere.
* a block holding ``±inf`` (and no NaN) gets scale 254 (``2**127``): the inf
  elements saturate to ``±max`` and the finite ones round to ``±0``; it
  dequantizes to ``±inf`` where the infs were (``max * 2**127`` overflows)
  and ``±0`` elsewhere.
"""

from __future__ import annotations

import dataclasses

import torch

from . import _e8m0
from ._minifloat import FP6_E2M3, FP6_E3M2, ElementFormat, decode, encode
from .core import Format, PerGroup, QuantizedTensor, ScaleRounding


@dataclasses.dataclass(frozen=True)
class MXFP6:
    """One MXFP6 variant: its ``Format`` and element format."""

    fmt: Format
    element: ElementFormat
    DEFAULT_GRANULARITY: PerGroup = PerGroup(32)

    def quantize(
        self,
        x: torch.Tensor,
        granularity=PerGroup(32),
        *,
        rounding: ScaleRounding = ScaleRounding.FLOOR,
    ) -> QuantizedTensor:
        """Quantize float ``x`` ``[..., rows, cols]`` (cols a multiple of 32).
        ``granularity`` must be ``PerGroup(32)``."""
        return _e8m0.mx_quantize(
            x, granularity, rounding, fmt=self.fmt, elem=self.element,
            encode=lambda v: encode(v, self.element), pack=_pack,
        )

    def dequantize(self, q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decode ``q`` to a ``dtype`` tensor of shape ``q.shape``."""
        return _e8m0.mx_dequantize(
            q, dtype, fmt=self.fmt,
            decode=lambda data, cols: decode(_unpack(data), self.element),
        )

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 6-bit codes ``[..., cols]`` (cols a multiple of 4) -> uint8
        ``[..., cols * 3 // 4]`` (Quark ``Pack_fp6`` order)."""
        _e8m0.check_codes(codes, 6, 4)
        return _pack(codes)

    def unpack(self, packed: torch.Tensor, cols: int) -> torch.Tensor:
        """uint8 ``[..., cols * 3 // 4]`` -> uint8 6-bit codes ``[..., cols]``."""
        _e8m0.check_packed(packed, cols, torch.uint8, 3, 4)
        return _unpack(packed)


E2M3 = MXFP6(Format.MXFP6_E2M3, FP6_E2M3)
E3M2 = MXFP6(Format.MXFP6_E3M2, FP6_E3M2)

DEFAULT_GRANULARITY = PerGroup(32)
pack = E2M3.pack  # the packing is the same for both variants
unpack = E2M3.unpack


def _pack(codes: torch.Tensor) -> torch.Tensor:
    v = codes.to(torch.int32).unflatten(-1, (codes.shape[-1] // 4, 4))
    word = v[..., 0] | (v[..., 1] << 6) | (v[..., 2] << 12) | (v[..., 3] << 18)
    out = torch.stack((word & 0xFF, (word >> 8) & 0xFF, word >> 16), dim=-1)
    return out.flatten(-2).to(torch.uint8)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    b = packed.to(torch.int32).unflatten(-1, (packed.shape[-1] // 3, 3))
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    v = torch.stack([(word >> s) & 0x3F for s in (0, 6, 12, 18)], dim=-1)
    return v.flatten(-2).to(torch.uint8)
