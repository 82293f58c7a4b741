"""fp8 e4m3fn with fp32 scales: per tensor, per row (channel / token), per
``PerGroup(g)`` along K (the 1x128 activation group) and per ``PerBlock``
tile (128x128 weights; partial tiles at the edges are allowed).

Contract (``arithmetic=Arithmetic.FP32``, the default)::

    amax  = max |x| over the block                  (exact, in x.dtype)
    scale = fp32(amax) / 448                        (one fp32 division, no rounding of the scale)
    scale = finfo(fp32).eps   where scale == 0      (all-zero block -> codes 0, dequant 0)
    code  = fp8_e4m3fn(clamp(fp32(x) / scale, -448, 448))   (divide, not multiply by 1/scale;
                                                     round to nearest even; saturate)
    dequantize(q) = dtype(fp32(code) * scale)

``arithmetic=Arithmetic.INPUT_DTYPE`` is compressed-tensors' arithmetic:
``scale = amax / 448`` evaluated in ``x.dtype`` (zero -> ``finfo(x.dtype).eps``)
and ``x / scale + 0`` evaluated in ``x.dtype`` before the fp8 cast; the stored
fp32 scale is that ``x.dtype`` value, widened exactly. The ``+ 0`` is
compressed-tensors adding its all-zero ``zero_point`` (dynamic activations and
weights alike carry one): it turns an exact ``-0.0`` input into code 0x00,
where ``FP32`` keeps 0x80 as torchao and vLLM do. A negative value that
rounds to zero keeps its sign in both modes.

References, measured with compressed-tensors 0.20 and torchao 0.18 on torch 2.13 CPU:

* compressed-tensors ``calculate_qparams`` + ``quantize`` (FP8 W8A8 tensor /
  channel / block, dynamic token and group): scale ``amax / (896 / 2)``
  computed in the observed dtype, never rounded to another dtype, an exact-0
  scale replaced by ``finfo(scale dtype).eps``; codes ``(x / scale).clamp(-448,
  448).to(fp8)``, a true division. Bit-exact with ``INPUT_DTYPE`` for every
  input dtype and with ``FP32`` for fp32 input. For bf16 input the two modes
  differ: on N(0,1) 64x256 bf16 per-channel, 57/64 scales and 508/16384 codes
  differ between ``FP32`` and compressed-tensors.
* vLLM's torch formulas for activations (``ref_dynamic_per_token_quant`` and
  ``native_per_token_group_quant_fp8`` in its tests): fp32 scale ``amax / 448``,
  codes ``(fp32(x) / scale).clamp(-448, 448).to(fp8)``: bit-exact with ``FP32``
  except for their floors on tiny blocks: per token the scale is floored at
  ``1 / (448 * 512)`` (so rows with ``amax < 1/512`` differ), per group ``amax``
  is floored at ``1e-10``. We keep compressed-tensors' exact-zero replacement.
* torchao ``_choose_scale_float8`` / ``_quantize_affine_float8``: fp32 division
  and saturation as ours; bit-exact with ``FP32`` on fp32 input. Differences:
  its scale ``amax / 448`` is evaluated in ``x.dtype`` (bf16-rounded for bf16
  input) while the division is fp32 (neither of our modes), and an all-zero
  block gets scale 0 and NaN codes (no zero-scale rule).

NaN / inf policy (dynamic scales, same as compressed-tensors): a block
containing NaN gets a NaN scale and all-NaN codes; a block containing ±inf gets
scale +inf, its finite elements code 0 and the inf elements NaN. Either way
every element of that block dequantizes to NaN, and other blocks are
unaffected. With a static ``scale=``: NaN -> NaN code, ±inf -> ±448 (saturated).
Finite overflow always saturates to ±448; no code is ever ±inf (e4m3fn has none).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ._blockwise import (
    block_amax,
    check_float_dtype,
    check_input,
    check_static_scale,
    from_blocks,
    per_block,
    replace_zero_scale,
    to_blocks,
)
from .core import (
    Arithmetic,
    Format,
    Granularity,
    PerRow,
    QuantizedTensor,
    as_granularity,
    expand_scale,
)
from .layout import check_supported, validate

#: Largest finite e4m3fn value.
FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
DEFAULT_GRANULARITY = PerRow()


def choose_scale(
    x: torch.Tensor, granularity: Granularity, arithmetic: Arithmetic = Arithmetic.FP32
) -> torch.Tensor:
    """The dynamic fp32 scale ``[..., R, C]`` of every block of ``x`` (see module docstring)."""
    amax = block_amax(x, granularity)
    if Arithmetic(arithmetic) is Arithmetic.FP32:
        return replace_zero_scale(amax.float() / FP8_MAX, torch.float32)
    return replace_zero_scale(amax / FP8_MAX, x.dtype).float()


def encode(
    x: torch.Tensor,
    scale: torch.Tensor,
    granularity: Granularity,
    arithmetic: Arithmetic = Arithmetic.FP32,
) -> torch.Tensor:
    """fp8 codes of ``x`` for a given fp32 ``scale`` ``[..., R, C]``: divide, saturate, cast."""
    rows, cols = x.shape[-2:]
    xb = to_blocks(x, granularity)
    if Arithmetic(arithmetic) is Arithmetic.FP32:
        t = xb.float() / per_block(scale)
    else:
        # compressed-tensors adds its (all-zero) zero point: -0.0 + 0.0 = +0.0
        t = xb / per_block(scale).to(x.dtype) + 0.0
    # clamp maps ±inf and finite overflow to ±448 and keeps NaN; the cast rounds
    # to nearest even (torch 2.13 would also saturate, we do not rely on it).
    codes = t.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return from_blocks(codes, rows, cols).contiguous()


def quantize(
    x: torch.Tensor,
    granularity: Union[Granularity, str] = DEFAULT_GRANULARITY,
    *,
    scale: Optional[torch.Tensor] = None,
    arithmetic: Arithmetic = Arithmetic.FP32,
) -> QuantizedTensor:
    """Quantize ``x`` ``[..., rows, cols]`` (bf16/fp16/fp32) to fp8 e4m3fn.

    ``scale``: optional static fp32 scale of shape ``[..., *scale_shape]``
    (finite, > 0), used as given (static activation quantization); under
    ``INPUT_DTYPE`` it is first rounded to ``x.dtype`` and stored rounded.
    Returns codes ``float8_e4m3fn [..., rows, cols]`` and the fp32 scale.
    """
    check_input(x)
    g = as_granularity(granularity)
    arithmetic = Arithmetic(arithmetic)
    *batch, rows, cols = x.shape
    check_supported(Format.FP8_E4M3, g, cols, "fp8.quantize")
    if scale is None:
        s = choose_scale(x, g, arithmetic)
    else:
        check_static_scale("scale", scale, (*batch, *g.scale_shape(rows, cols)), torch.float32)
        s = scale if arithmetic is Arithmetic.FP32 else scale.to(x.dtype).float()
    return QuantizedTensor(
        data=encode(x, s, g, arithmetic),
        scale=s,
        fmt=Format.FP8_E4M3,
        granularity=g,
        shape=tuple(x.shape),
    )


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dtype(fp32(code) * scale)`` with the scale repeated over its block."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    if q.fmt is not Format.FP8_E4M3:
        raise ValueError(f"q.fmt must be {Format.FP8_E4M3.value}, got {q.fmt.value}")
    validate(q, "q")
    check_float_dtype("dtype", dtype)
    rows, cols = q.shape[-2:]
    s = expand_scale(q.scale, q.granularity, rows, cols)
    return (q.data.float() * s).to(dtype)


__all__ = [
    "Arithmetic",
    "DEFAULT_GRANULARITY",
    "FP8_DTYPE",
    "FP8_MAX",
    "choose_scale",
    "dequantize",
    "encode",
    "quantize",
]
