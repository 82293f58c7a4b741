"""Small floating-point element formats of the MX / NVFP4 families.

An element format is described by an :class:`ElementFormat` (exponent and
mantissa widths, bias, largest normal, largest finite code). This module maps
values to codes and codes to values, bit-exactly:

* :func:`encode`: float32 values -> uint8 codes. Round to nearest, ties to
  even; magnitudes above ``max_normal`` (``inf`` included) saturate to
  ``±max_normal``; the sign bit is taken from the input's sign bit, so a
  negative value that rounds to zero (and ``-0.0`` itself) gives the ``-0``
  code. NaN inputs give the code 0: the MX and NVFP4 formats mark NaN through
  their block scale, and fp4/fp6 have no NaN code (see the format modules).
* :func:`decode`: uint8 codes -> float32 values through a lookup table
  (codes above ``max_code`` in magnitude, e.g. e4m3's ``0x7F``, decode to NaN).

The fp4 / fp6 formats of the OCP MX spec v1.0 use every exponent code for
finite numbers (no inf/NaN), so ``max_code`` is all ones; e4m3 (``fn``) keeps
its all-ones code for NaN, so its ``max_code`` is ``0x7E`` (448).

Only exact operations are used: scaling by powers of two (built from exponent
bits, never ``torch.log2``/``exp2``) and ``torch.round`` (half to even) on
values that are exact in float32.
"""

from __future__ import annotations

import functools

import dataclasses
import math
from typing import Tuple

import torch

_F32_MANT_BITS = 23
_F32_BIAS = 127


@dataclasses.dataclass(frozen=True)
class ElementFormat:
    """A sign-magnitude binary float format of ``1 + ebits + mbits`` bits.

    ``emax`` is the exponent of the largest power of two below ``max_normal``
    (``floor(log2(max_normal))``): the "emax_elem" of the OCP MX spec that the
    shared exponent subtracts. ``max_code`` is the largest finite magnitude
    code (``max_normal``'s code).
    """

    name: str
    ebits: int
    mbits: int
    max_normal: float
    max_code: int
    #: value of every code (Python floats), filled in by ``__post_init__``
    table: Tuple[float, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        table = tuple(self.code_value(c) for c in range(1 << self.bits))
        object.__setattr__(self, "table", table)

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def bias(self) -> int:
        return (1 << (self.ebits - 1)) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number (``1 - bias``)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """``floor(log2(max_normal))``."""
        return (self.max_code >> self.mbits) - self.bias

    @property
    def sign_bit(self) -> int:
        return 1 << (self.ebits + self.mbits)

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mbits)

    def code_value(self, code: int) -> float:
        """The value of one code (Python float; NaN above ``max_code``)."""
        mag = code & (self.sign_bit - 1)
        sign = -1.0 if code & self.sign_bit else 1.0
        if mag > self.max_code:
            return math.copysign(math.nan, sign)
        exp_field, mant = mag >> self.mbits, mag & ((1 << self.mbits) - 1)
        if exp_field == 0:
            return sign * mant * self.min_subnormal
        return sign * (1.0 + mant / (1 << self.mbits)) * 2.0 ** (exp_field - self.bias)


#: fp4 e2m1 (OCP MX): 0, 0.5, 1, 1.5, 2, 3, 4, 6.
FP4_E2M1 = ElementFormat("fp4_e2m1", ebits=2, mbits=1, max_normal=6.0, max_code=0x7)
#: fp6 e2m3 (OCP MX): max 7.5, min subnormal 0.125.
FP6_E2M3 = ElementFormat("fp6_e2m3", ebits=2, mbits=3, max_normal=7.5, max_code=0x1F)
#: fp6 e3m2 (OCP MX): max 28, min subnormal 0.0625.
FP6_E3M2 = ElementFormat("fp6_e3m2", ebits=3, mbits=2, max_normal=28.0, max_code=0x1F)
#: fp8 e4m3fn (OCP / torch.float8_e4m3fn): max 448, 0x7F is NaN.
FP8_E4M3 = ElementFormat("fp8_e4m3", ebits=4, mbits=3, max_normal=448.0, max_code=0x7E)


def pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exact ``2.0 ** exponent`` as float32 for integer ``exponent`` in
    ``[-149, 127]``, built from the bit pattern (subnormals included)."""
    e = exponent.to(torch.int32)
    normal = ((e + _F32_BIAS).clamp(min=1) << _F32_MANT_BITS)
    # 2^e for e in [-149, -127] is the subnormal with bit (149 + e) set.
    sub = torch.ones_like(e) << (e + 149).clamp(min=0, max=22)
    return torch.where(e >= -126, normal, sub).view(torch.float32)


def exponent_of(a: torch.Tensor) -> torch.Tensor:
    """``floor(log2(a))`` (int32) of finite float32 ``a > 0`` read from the
    exponent bits (the biased exponent minus 127). Subnormals and zero give
    ``-127``; callers that need more clamp or prescale first."""
    return ((a.view(torch.int32) >> _F32_MANT_BITS) & 0xFF) - _F32_BIAS


def encode(x: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """float32 ``x`` -> uint8 codes of ``fmt`` (RNE, saturating, signed zero).

    Contract: every finite ``x`` maps to the nearest representable value (ties
    to the even code), magnitudes above ``fmt.max_normal`` and ``±inf`` to
    ``±max_normal``; the code's sign bit is ``x``'s sign bit; NaN -> code 0.
    """
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32, got {x.dtype}")
    sign = (x.view(torch.int32) < 0).to(torch.int32) * fmt.sign_bit
    # Saturate first: max_normal is representable, so clamping before the
    # (monotone) rounding equals rounding then saturating. NaN becomes 0 here.
    a = x.abs()
    a = torch.where(torch.isnan(a), 0.0, a).clamp(max=fmt.max_normal)
    # Quantum of a's binade (subnormal binade below 2^emin).
    e = exponent_of(a).clamp(min=fmt.emin)
    m = torch.round(a * pow2(fmt.mbits - e)).to(torch.int32)  # exact, RNE
    # code = (e - emin) * 2^mbits + m covers subnormals (e == emin, m < 2^mbits)
    # and a mantissa carry into the next binade (m == 2^(mbits+1)).
    mag = ((e - fmt.emin) << fmt.mbits) + m
    return (mag | sign).to(torch.uint8)


def value_table(fmt: ElementFormat, device=None) -> torch.Tensor:
    """float32 ``[2**bits]``: the value of every code (``-0.0`` for the
    negative zero code, NaN for codes above ``max_code``). Cached per device
    (a host-to-device copy is not allowed inside CUDA graph capture); callers
    must not modify it."""
    if torch.compiler.is_compiling():
        return torch.tensor(fmt.table, dtype=torch.float32, device=device)
    return _cached_table(fmt, torch.device(device) if device is not None else torch.device("cpu"))


@functools.lru_cache(maxsize=None)
def _cached_table(fmt: ElementFormat, device: torch.device) -> torch.Tensor:
    return torch.tensor(fmt.table, dtype=torch.float32, device=device)


def decode(codes: torch.Tensor, fmt: ElementFormat) -> torch.Tensor:
    """uint8 codes of ``fmt`` -> float32 values (exact). Bits above
    ``fmt.bits`` are ignored."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    idx = (codes & ((1 << fmt.bits) - 1)).to(torch.int64)
    return value_table(fmt, codes.device)[idx]
