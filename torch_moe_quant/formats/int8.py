"""Symmetric int8 with fp32 scales: per tensor or per row (channel / token).

Contract (``rule=Int8ScaleRule.HALF_RANGE``, ``arithmetic=Arithmetic.FP32``, the defaults)::

    amax  = max |x| over the block                (exact)
    scale = fp32(amax) / 127.5                    (= amax / ((127 - -128) / 2))
    scale = finfo(fp32).eps   where scale == 0    (all-zero block -> codes 0, dequant 0)
    code  = int8(round_half_even(clamp(fp32(x) / scale, -128, 127)))
    dequantize(q) = dtype(fp32(code) * scale)

So ``+amax`` maps to 127.5 -> 127 (clipped) and ``-amax`` to -127.5 -> -128.
A static ``scale=`` is always applied as ``x / scale``.

``rule=Int8ScaleRule.QMAX`` is vLLM's dynamic per-token kernel
(``dynamic_scaled_int8_quant_kernel``): ``scale = amax / 127`` stored, codes
``round_half_even(fp32(x) * (127 / amax))`` saturated to [-128, 127]
(multiplication by ``127 / amax``, not division by the scale). vLLM's torch
reference ``ref_dynamic_per_token_quant`` multiplies by ``1 / (amax / 127)``
instead, which is not always the same fp32 number; the tests measure both.
An all-zero row gives codes 0 and scale ``finfo(fp32).eps`` (vLLM stores 0).

``arithmetic=Arithmetic.INPUT_DTYPE`` (HALF_RANGE only) is compressed-tensors'
arithmetic: scale evaluated in ``x.dtype`` (zero -> ``finfo(x.dtype).eps``),
``x / scale`` evaluated in ``x.dtype`` then rounded; the stored fp32 scale is
that value widened exactly.

References, measured with compressed-tensors 0.20 and torchao 0.18 (torch 2.13 CPU):

* compressed-tensors ``calculate_qparams`` (symmetric: ``amax / (255 / 2)``)
  and ``quantize`` (``round(clamp(x / scale, -128, 127))``, torch.round =
  half to even): bit-exact with ``INPUT_DTYPE`` on every dtype and with
  ``FP32`` on fp32 input.
* torchao ``choose_qparams_affine(SYMMETRIC)`` / ``quantize_affine``: same
  scale ``amax / 127.5`` (evaluated in ``x.dtype``, then fp32), but codes are
  ``round(x * (1 / scale))``: a reciprocal multiply, which differs from the
  division on a few elements next to a .5 tie; and its ``eps`` is a floor
  (``clamp(scale, min=eps)``), not an exact-zero replacement.

Zero points: symmetric only. Asymmetric int8 checkpoints (a nonzero
``weight_zero_point`` / ``input_zero_point``) are **rejected**, not folded:
``reject_zero_point`` raises ``ValueError`` for any nonzero zero point and lets
an all-zero one be dropped (that is the only fold that is exact).

NaN / inf policy: integers have no NaN, so ``quantize`` raises ``ValueError``
on non-finite input (checked eagerly; while torch.compile traces, the check is
skipped and the codes of a row with NaN/inf are unspecified). A static scale
must be finite and > 0.
"""

from __future__ import annotations

import enum
from typing import Optional, Union

import torch

from ._blockwise import (
    block_amax,
    check_finite,
    check_float_dtype,
    check_input,
    check_static_scale,
    eager,
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
    check_tensor,
    expand_scale,
)
from .layout import check_supported, validate

INT8_MIN, INT8_MAX = -128, 127
DEFAULT_GRANULARITY = PerRow()


class Int8ScaleRule(str, enum.Enum):
    """How a dynamic int8 scale is derived from a block's ``amax``."""

    #: ``amax / 127.5`` and ``x / scale`` (compressed-tensors, torchao): checkpoints.
    HALF_RANGE = "half_range"
    #: ``amax / 127`` and ``x * (127 / amax)`` (vLLM's dynamic per-token kernel).
    QMAX = "qmax"


def choose_scale(
    x: torch.Tensor,
    granularity: Granularity,
    rule: Int8ScaleRule = Int8ScaleRule.HALF_RANGE,
    arithmetic: Arithmetic = Arithmetic.FP32,
) -> torch.Tensor:
    """The dynamic fp32 scale ``[..., R, C]`` of every block of ``x``."""
    amax = block_amax(x, granularity)
    div = 127.5 if Int8ScaleRule(rule) is Int8ScaleRule.HALF_RANGE else 127.0
    if Arithmetic(arithmetic) is Arithmetic.FP32:
        return replace_zero_scale(amax.float() / div, torch.float32)
    return replace_zero_scale(amax / div, x.dtype).float()


def _round_clamp(t: torch.Tensor) -> torch.Tensor:
    """Round half to even and saturate to [-128, 127] (clamp first, as compressed-tensors;
    the order does not matter for integer bounds)."""
    return torch.round(t.clamp(INT8_MIN, INT8_MAX)).to(torch.int8)


def encode(
    x: torch.Tensor,
    scale: torch.Tensor,
    granularity: Granularity,
    arithmetic: Arithmetic = Arithmetic.FP32,
) -> torch.Tensor:
    """int8 codes of ``x`` for a given fp32 ``scale``: ``round(clamp(x / scale))``."""
    rows, cols = x.shape[-2:]
    xb = to_blocks(x, granularity)
    if Arithmetic(arithmetic) is Arithmetic.FP32:
        t = xb.float() / per_block(scale)
    else:
        t = xb / per_block(scale).to(x.dtype)
    return from_blocks(_round_clamp(t), rows, cols).contiguous()


def _encode_qmax(x: torch.Tensor, granularity: Granularity) -> tuple:
    """vLLM's dynamic kernel: ``scale = amax / 127``, codes ``round(x * (127 / amax))``."""
    rows, cols = x.shape[-2:]
    amax = block_amax(x, granularity).float()
    mult = torch.where(amax == 0, torch.zeros_like(amax), 127.0 / amax)
    codes = _round_clamp(to_blocks(x, granularity).float() * per_block(mult))
    scale = replace_zero_scale(amax / 127.0, torch.float32)
    return from_blocks(codes, rows, cols).contiguous(), scale


def quantize(
    x: torch.Tensor,
    granularity: Union[Granularity, str] = DEFAULT_GRANULARITY,
    *,
    scale: Optional[torch.Tensor] = None,
    rule: Int8ScaleRule = Int8ScaleRule.HALF_RANGE,
    arithmetic: Arithmetic = Arithmetic.FP32,
) -> QuantizedTensor:
    """Quantize ``x`` ``[..., rows, cols]`` (bf16/fp16/fp32, finite) to symmetric int8.

    ``scale``: optional static fp32 scale ``[..., *scale_shape]`` (finite, > 0),
    applied as ``x / scale`` whatever ``rule`` says (``rule`` only chooses a
    dynamic scale). ``rule=QMAX`` needs ``arithmetic=FP32`` (vLLM computes in fp32).
    """
    check_input(x)
    g = as_granularity(granularity)
    rule, arithmetic = Int8ScaleRule(rule), Arithmetic(arithmetic)
    *batch, rows, cols = x.shape
    check_supported(Format.INT8, g, cols, "int8.quantize")
    # 128 * amax / 127.5 <= max keeps the decoded grid finite
    check_finite("x", x, limit=torch.finfo(torch.float32 if arithmetic is Arithmetic.FP32 else x.dtype).max * 127.5 / 128)
    if rule is Int8ScaleRule.QMAX and arithmetic is not Arithmetic.FP32:
        raise ValueError("rule=Int8ScaleRule.QMAX (vLLM's kernel) needs arithmetic=Arithmetic.FP32")
    if scale is not None:
        check_static_scale("scale", scale, (*batch, *g.scale_shape(rows, cols)), torch.float32)
        s = scale if arithmetic is Arithmetic.FP32 else scale.to(x.dtype).float()
        data = encode(x, s, g, arithmetic)
    elif rule is Int8ScaleRule.QMAX:
        data, s = _encode_qmax(x, g)
    else:
        s = choose_scale(x, g, rule, arithmetic)
        data = encode(x, s, g, arithmetic)
    return QuantizedTensor(data=data, scale=s, fmt=Format.INT8, granularity=g, shape=tuple(x.shape))


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dtype(fp32(code) * scale)``; an int8 container has no zero point."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    if q.fmt is not Format.INT8:
        raise ValueError(f"q.fmt must be {Format.INT8.value}, got {q.fmt.value}")
    if q.zero_point is not None:
        raise ValueError("q.zero_point must be None: int8 is symmetric (see reject_zero_point)")
    validate(q, "q")
    check_float_dtype("dtype", dtype)
    rows, cols = q.shape[-2:]
    s = expand_scale(q.scale, q.granularity, rows, cols)
    return (q.data.float() * s).to(dtype)


def reject_zero_point(name: str, zero_point: Optional[torch.Tensor]) -> None:
    """Checkpoint side of the symmetric-only rule: ``None`` or an all-zero
    integer zero point passes (it can be dropped exactly); anything else raises
    ``ValueError`` naming ``name`` (asymmetric int8 is not supported)."""
    if zero_point is None:
        return
    check_tensor(name, zero_point)
    if zero_point.is_floating_point():
        raise TypeError(f"{name} must be an integer tensor, got {zero_point.dtype}")
    if eager(zero_point) and bool((zero_point != 0).any()):
        raise ValueError(
            f"{name} has nonzero entries: asymmetric int8 is not supported "
            "(symmetric only; an all-zero zero point is dropped)"
        )


__all__ = [
    "Arithmetic",
    "DEFAULT_GRANULARITY",
    "Int8ScaleRule",
    "INT8_MAX",
    "INT8_MIN",
    "choose_scale",
    "dequantize",
    "encode",
    "quantize",
    "reject_zero_point",
]
