"""The MX shared exponent: e8m0 block scales and the blockwise scaling shared
by ``mxfp4``, ``mxfp6`` and ``mxfp8``.

e8m0 byte ``b`` (OCP MX v1.0 §5.4.1): unsigned, bias 127, value ``2**(b-127)``
for ``b`` in ``[0, 254]`` (so byte 0 is ``2**-127``, a float32 subnormal), and
``b == 255`` is NaN. There is no zero and no infinity.

Block exponent ``e`` from the block's ``amax`` (all exact, from the float's
exponent bits; never ``torch.log2`` in float32, which rounds ``2**k - ulp``
up to ``k`` for some ``k``, and never a cast to ``torch.float8_e8m0fnu``,
which rounds up: 3.0 -> 4.0):

* ``FLOOR`` (OCP, torchao ``FLOOR``): ``floor(log2(amax)) - emax_elem``.
  (Quark's ``floor`` mode uses float32 ``torch.log2`` and doubles the scale
  for e.g. ``amax = 2**-20 - ulp``; measured.)
* ``EVEN`` (AMD Quark default, torchao ``EVEN``): ``amax`` is first rounded to
  the element's mantissa width (half to even; only the carry into the next
  power of two matters), then as ``FLOOR``. (A float32 amax that rounds up
  to ``2**128`` gives ``128 - emax_elem`` like torchao; Quark overflows to
  inf and clamps to 127.)
* ``RCEIL`` (NVIDIA ``cvt.rp.satfinite.ue8m0``, torchao ``RCEIL``):
  ``ceil(log2(amax / max_elem))`` with the division rounded in float32 and the
  ceiling exact. (torchao takes ``torch.log2``, which rounds ``2**k + ulp``
  to ``k`` for some ``k``, 4 and -10 among them, and so picks one binade too
  low there; measured.)

Then ``e`` is clamped to ``[-127, 127]``. Special blocks:

* all-zero block: ``log2(0) = -inf`` clamps to ``-127`` -> byte 0 (the OCP
  scale for a zero block; torchao stores 0 too; AMD Quark computes ``2**-127``
  in memory but its exporter clamps the scale to ``2**-126`` first, so Quark
  checkpoints hold byte 1 for zero blocks, measured with amd-quark 0.13).
* ``±inf`` in the block (no NaN): ``log2(inf) = inf`` clamps to 127 -> byte 254.
  (torchao 0.18 ``RCEIL`` also gives 254; its ``FLOOR``/``EVEN`` read the
  exponent field 255 as ``2**128`` and give ``255 - emax_elem``; Quark's
  ``even_round`` gives ``2**127``.)
* NaN in the block -> byte 255 (all references agree).

Elements are scaled by ``2**-e`` exactly (a power of two built from bits), so
``x * 2**-e`` equals ``x / 2**e``; byte 0 really scales by ``2**127``
(torchao 0.18 divides by ``2**-126`` there for ``FLOOR``/``EVEN`` and does not
scale at all for ``RCEIL``).

The second half of the module is the quantize/dequantize skeleton and the
argument checks that the three MX format modules share.
"""

from __future__ import annotations

import math
from typing import Callable, Tuple

import torch

from ._minifloat import ElementFormat, exponent_of, pow2
from .core import Format, PerGroup, QuantizedTensor, ScaleRounding, values_available
from .layout import validate

E8M0_BIAS = 127
E8M0_NAN = 255
#: Smallest and largest finite shared exponent.
EMIN, EMAX = -127, 127

_BIG = 1 << 16  # stands for log2(inf)
_F32_MIN_NORMAL = 2.0**-126
_PRESCALE = 64  # subnormals are scaled by 2**64 to read their exponent


def _log2_parts(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """For float32 ``a >= 0`` (no NaN): ``(floor(log2(a)), mantissa_bits)``
    exactly, subnormals included. ``a == 0`` gives a floor far below -127 and
    ``a == inf`` gives ``_BIG``; ``mantissa_bits`` is the 23-bit fraction
    field of ``a`` normalised (0 iff ``a`` is a power of two)."""
    sub = a < _F32_MIN_NORMAL
    an = torch.where(sub, a * (2.0**_PRESCALE), a)  # exact
    floor = exponent_of(an) - torch.where(sub, _PRESCALE, 0)
    floor = torch.where(torch.isinf(a), _BIG, floor)
    mant = an.view(torch.int32) & 0x7FFFFF
    return floor, mant


def block_exponent(
    amax: torch.Tensor, elem: ElementFormat, rounding: ScaleRounding
) -> torch.Tensor:
    """Unbiased shared exponent (int32, in ``[-127, 127]``) of blocks whose
    absolute maximum is ``amax`` (any float dtype, ``>= 0``; NaN entries give
    an unspecified value: :func:`encode_scale` maps them to 255)."""
    a = amax.float()
    a = torch.where(torch.isnan(a), 0.0, a)
    rounding = ScaleRounding(rounding)
    if rounding is ScaleRounding.RCEIL:
        floor, mant = _log2_parts(a / elem.max_normal)
        e = floor + (mant != 0).to(torch.int32)
    else:
        floor, mant = _log2_parts(a)
        if rounding is ScaleRounding.EVEN:
            # Rounding amax to mbits mantissa bits carries into the exponent iff
            # the fraction is >= 1 - 2**-(mbits+1) (the tie rounds up: even).
            carry_from = (1 << 23) - (1 << (22 - elem.mbits))
            floor = floor + (mant >= carry_from).to(torch.int32)
        e = floor - elem.emax
    return e.clamp(EMIN, EMAX).to(torch.int32)


def encode_scale(
    amax: torch.Tensor, elem: ElementFormat, rounding: ScaleRounding
) -> torch.Tensor:
    """uint8 e8m0 scale bytes for blocks with absolute maximum ``amax``:
    ``block_exponent + 127``, or 255 where ``amax`` is NaN."""
    byte = block_exponent(amax, elem, rounding) + E8M0_BIAS
    return torch.where(torch.isnan(amax), E8M0_NAN, byte).to(torch.uint8)


def decode_scale(scale: torch.Tensor) -> torch.Tensor:
    """uint8 e8m0 bytes -> float32 ``2**(b-127)`` (exact; 255 -> NaN)."""
    b = scale.to(torch.int32)
    return torch.where(b == E8M0_NAN, float("nan"), pow2(b - E8M0_BIAS))


def reciprocal_scale(scale: torch.Tensor) -> torch.Tensor:
    """uint8 e8m0 bytes -> float32 ``2**(127-b)`` (exact; 255 -> NaN)."""
    b = scale.to(torch.int32)
    return torch.where(b == E8M0_NAN, float("nan"), pow2(E8M0_BIAS - b))


def scale_blocks(
    x: torch.Tensor, block: int, elem: ElementFormat, rounding: ScaleRounding
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Shared MX quantization step for ``x`` ``[..., cols]`` (cols divisible by
    ``block``): returns ``(scaled, scale)`` where ``scale`` is the uint8 e8m0
    byte per block ``[..., cols // block]`` and ``scaled`` is
    ``x * 2**-e`` in float32 ``[..., cols // block, block]``, with NaN blocks
    (scale 255) zeroed so that every element code of a NaN block is 0."""
    blocks = x.unflatten(-1, (x.shape[-1] // block, block))
    amax = blocks.abs().amax(dim=-1)  # propagates NaN
    scale = encode_scale(amax, elem, rounding)
    recip = reciprocal_scale(scale).unsqueeze(-1)
    scaled = blocks.float() * recip
    scaled = torch.where(recip.isnan(), 0.0, scaled)
    return scaled, scale


# --------------------------------------------------------------------------
# Glue shared by the mxfp4 / mxfp6 / mxfp8 modules: argument checks and the
# quantize / dequantize skeleton (each module supplies its element codec and
# packing).

BLOCK = 32


def check_input(x: torch.Tensor, fmt: Format) -> None:
    """``x`` must be a float16/bfloat16/float32 tensor ``[..., rows, cols]``
    with ``cols`` a multiple of the 32-element MX block."""
    check_float_input(x)
    if x.shape[-1] % BLOCK:
        raise ValueError(
            f"x: the last dim (cols={x.shape[-1]}) must be a multiple of {BLOCK}, "
            f"the {fmt.value} block size (pad K to a multiple of {BLOCK})"
        )


def check_float_input(x: torch.Tensor) -> None:
    """TypeError/ValueError naming ``x`` unless it is a float16/bfloat16/
    float32 tensor with at least 2 dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be float16/bfloat16/float32, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims [..., rows, cols], got {tuple(x.shape)}")


def check_granularity(granularity, fmt: Format, block: int) -> None:
    """The block formats fix their granularity: only ``PerGroup(block)``."""
    if granularity != PerGroup(block):
        raise ValueError(
            f"granularity: {fmt.value} uses blocks of {block} along K "
            f"(PerGroup({block})), got {granularity!r}"
        )


def as_rounding(rounding) -> ScaleRounding:
    """A ``ScaleRounding`` or its string value, else ValueError naming ``rounding``."""
    try:
        return ScaleRounding(rounding)
    except ValueError:
        raise ValueError(
            f"rounding must be one of {[r.value for r in ScaleRounding]}, got {rounding!r}"
        ) from None


def check_dequantize_args(q: QuantizedTensor, dtype: torch.dtype, fmt: Format) -> None:
    """``q`` must be a valid ``fmt`` QuantizedTensor and ``dtype`` a float dtype."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    if q.fmt != fmt:
        raise ValueError(f"q.fmt must be {fmt.value}, got {q.fmt}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        raise TypeError(f"dtype must be a float16/bfloat16/float32 torch.dtype, got {dtype!r}")
    validate(q, "q")


def check_codes(codes: torch.Tensor, bits: int, multiple: int) -> None:
    """``codes`` for ``pack``: uint8 ``[..., cols]`` with ``cols`` a multiple of
    ``multiple`` and (outside torch.compile) every code below ``2**bits``."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"codes must be a uint8 tensor, got {getattr(codes, 'dtype', type(codes))}")
    if codes.dim() < 1 or codes.shape[-1] % multiple:
        raise ValueError(
            f"codes: the last dim ({tuple(codes.shape)[-1:]}) must be a multiple of {multiple}"
        )
    if values_available(codes) and codes.numel() and int(codes.max()) >= (1 << bits):
        raise ValueError(f"codes must be {bits}-bit codes (< {1 << bits}), got {int(codes.max())}")


def check_packed(packed: torch.Tensor, cols: int, dtype: torch.dtype, num: int, den: int) -> None:
    """``packed`` for ``unpack``: ``dtype`` ``[..., cols * num // den]``."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != dtype:
        raise TypeError(f"packed must be a {dtype} tensor, got {getattr(packed, 'dtype', type(packed))}")
    if cols < 0 or (cols * num) % den or packed.dim() < 1 or packed.shape[-1] != cols * num // den:
        raise ValueError(
            f"cols={cols} does not match packed's last dim {tuple(packed.shape)[-1:]} "
            f"(expected cols * {num} / {den}, cols a multiple of {den // math.gcd(num, den)})"
        )


def mx_quantize(
    x: torch.Tensor,
    granularity,
    rounding,
    *,
    fmt: Format,
    elem: ElementFormat,
    encode: Callable[[torch.Tensor], torch.Tensor],
    pack: Callable[[torch.Tensor], torch.Tensor],
) -> QuantizedTensor:
    """Quantize ``x`` ``[..., rows, cols]`` to an MX format: e8m0 scale per 32
    elements along cols (see module docstring), elements ``encode``d from
    ``x * 2**-e`` (float32) to uint8 codes, then ``pack``ed."""
    check_granularity(granularity, fmt, BLOCK)
    check_input(x, fmt)
    rounding = as_rounding(rounding)
    scaled, scale = scale_blocks(x, BLOCK, elem, rounding)
    codes = encode(scaled.flatten(-2))
    return QuantizedTensor(
        data=pack(codes),
        scale=scale,
        fmt=fmt,
        granularity=granularity,
        shape=tuple(x.shape),
        rounding=rounding,
    )


def mx_dequantize(
    q: QuantizedTensor,
    dtype: torch.dtype,
    *,
    fmt: Format,
    decode: Callable[[torch.Tensor, int], torch.Tensor],
) -> torch.Tensor:
    """``decode(q.data, cols)`` (float32 element values ``[..., rows, cols]``)
    times ``2**(scale - 127)`` per block, in float32 (exact, or ``±inf`` on
    overflow; NaN for scale 255), then cast to ``dtype``."""
    check_dequantize_args(q, dtype, fmt)
    cols = q.shape[-1]
    values = decode(q.data, cols).unflatten(-1, (cols // BLOCK, BLOCK))
    out = values * decode_scale(q.scale).unsqueeze(-1)
    return out.flatten(-2).to(dtype)
