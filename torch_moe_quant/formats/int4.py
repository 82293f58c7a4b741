"""int4 weights, per ``PerGroup(32/64/128)`` along K or per row (channel),
symmetric or asymmetric (``Int4Mode``), with optional GPTQ act-order ``g_idx``.

Canonical container (compressed-tensors ``pack-quantized`` layout):

* ``data``: int32 ``[..., rows, cols / 8]``; word ``w`` holds columns
  ``8w .. 8w+7``, column ``8w + j`` in bits ``4j .. 4j+3``, stored as the
  unsigned nibble ``code + 8`` of the signed code in [-8, 7]
  (compressed-tensors ``pack_to_int32``: ``offset = 1 << (num_bits - 1)``).
  ``cols`` must be a multiple of 8.
* ``scale``: ``[..., rows, G]`` (G = cols / g, or 1 per row) in ``scale_dtype``
  (bf16, fp16 or fp32; default ``x.dtype``, as compressed-tensors, whose
  scale parameter takes the observed weight's dtype).
* ``zero_point`` (asymmetric only): int8 ``[..., rows, G]``, compressed-tensors
  convention ``dequant = (code - zero_point) * scale``. Quantization gives
  values in [-8, 7]; a GPTQ v1 checkpoint can also carry 8 (its stored nibble
  15), which dequantizes correctly but cannot be written as pack-quantized.
* ``g_idx`` (optional): int32 ``[..., cols]``, column ``c`` uses group
  ``g_idx[..., c]`` (GPTQ act-order); absent means ``c // g``.

Contract (``arithmetic=Arithmetic.FP32``, the default; ``sd`` = scale dtype)::

    SYMMETRIC:  scale = sd(fp32(amax) / 7.5)                  (= amax / ((7 - -8) / 2))
                code  = round_half_even(clamp(fp32(x) / scale, -8, 7))
    ASYMMETRIC: lo = min(min(x), 0), hi = max(max(x), 0)       (0 stays exact)
                scale = sd(fp32(hi - lo) / 15)
                zero_point = round_half_even(clamp(-8 - lo / scale, -8, 7))
                code  = round_half_even(clamp(fp32(x) / scale + zero_point, -8, 7))
    a scale that is exactly 0 (all-zero group) becomes finfo(sd).eps and its
    zero point 0: codes 0, dequant 0.
    dequantize(q) = dtype(fp32(code - zero_point) * fp32(scale))

``Arithmetic.INPUT_DTYPE`` (needs ``scale_dtype == x.dtype``) evaluates the
scale, ``lo / scale``, ``x / scale`` and ``+ zero_point`` in ``x.dtype`` the
way compressed-tensors does, for bit-exact llm-compressor reproduction.

References, measured with compressed-tensors 0.20 and torchao 0.18 (torch 2.13 CPU):

* compressed-tensors ``calculate_qparams`` (symmetric ``amax / (15 / 2)``;
  asymmetric ``(hi - lo) / 15``, ``zp = -8 - lo / scale`` clamped and rounded
  to int8) and ``quantize`` (``x / scale + zp``, clamp, ``torch.round``):
  bit-exact with ``INPUT_DTYPE`` on every dtype, and with ``FP32`` on fp32
  input with ``scale_dtype=torch.float32``. Its zero-scale rule replaces the
  scale by eps *after* computing ``zp = -8 - 0/0 = NaN``, whose int8 cast is
  0 on x86 and CUDA: we write that 0 deliberately.
* torchao ``choose_qparams_affine`` / ``quantize_affine`` with
  ``quant_min=-8, quant_max=7`` (SYMMETRIC / ASYMMETRIC): the same scale and
  zero point, but codes ``round(x * (1 / scale)) + zp`` (reciprocal multiply)
  and eps as a floor on the scale; codes agree except on a few elements next
  to a .5 tie.
* GPTQ's quantizer uses the same grid (symmetric: scale ``2 * amax / 15``,
  zero 8), AutoAWQ's does not (its min/max are not widened to include 0).

NaN / inf policy: ``quantize`` raises ``ValueError`` on non-finite input,
and on finite input so large that the scale or the decoded grid would
overflow the working precision (symmetric: ``|x| > max * 7.5 / 8``;
asymmetric: ``|x| > max / 2``, where ``hi - lo`` would overflow) (eagerly; under torch.compile tracing the check is skipped and such groups'
codes are unspecified). ``pack_int4`` rejects codes outside [-8, 7].

Checkpoint packings (GPTQ v1/v2, AWQ, pack-quantized names and shapes) are in
``int4_packing``.
"""

from __future__ import annotations

import enum
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ._blockwise import (
    block_amax,
    block_min_max,
    check_finite,
    check_float_dtype,
    check_input,
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
    PerGroup,
    QuantizedTensor,
    as_granularity,
    check_tensor,
    expand_scale,
)
from .layout import check_supported, validate

INT4_MIN, INT4_MAX = -8, 7
#: Unsigned nibble = signed code + OFFSET (compressed-tensors, GPTQ, AWQ all use 8).
OFFSET = 8
DEFAULT_GRANULARITY = PerGroup(128)
#: Nibble order of a plain packed word: nibble i holds element i.
IDENTITY_ORDER = (0, 1, 2, 3, 4, 5, 6, 7)


class Int4Mode(str, enum.Enum):
    """Symmetric (no zero point, zero at code 0) or asymmetric (int8 zero point per group)."""

    SYMMETRIC = "symmetric"
    ASYMMETRIC = "asymmetric"


# ---------------------------------------------------------------- nibble packing


def pack_nibbles(u: torch.Tensor, order: Sequence[int] = IDENTITY_ORDER) -> torch.Tensor:
    """Pack unsigned 4-bit values ``u`` (any int dtype, values 0..15) along the
    last dim into int32 words: nibble ``i`` (bits ``4i..4i+3``) of word ``w``
    holds element ``8w + order[i]``. A last partial word is padded with raw 0
    nibbles (compressed-tensors' padding). The word is the two's-complement
    int32 of the unsigned 32-bit value (computed in int64: no shift overflow)."""
    n = u.shape[-1]
    words = -(-n // 8)
    v = u.to(torch.int64)
    if words * 8 != n:
        v = F.pad(v, (0, words * 8 - n))
    v = v.reshape(*u.shape[:-1], words, 8)[..., list(order)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=u.device)
    w = (v << shifts).sum(dim=-1)
    w = torch.where(w >= 2**31, w - 2**32, w)
    return w.to(torch.int32)


def unpack_nibbles(
    packed: torch.Tensor, n: int, order: Sequence[int] = IDENTITY_ORDER
) -> torch.Tensor:
    """Inverse of ``pack_nibbles``: int32 ``[..., words]`` -> int32 values 0..15 ``[..., n]``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nib = (packed.unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift; the mask drops the sign
    if tuple(order) != tuple(IDENTITY_ORDER):
        # element j sits in nibble inverse[j]; the index lives on packed's device
        # (a Python-list index is a host->device copy, illegal in CUDA graph capture)
        inverse = sorted(range(8), key=lambda i: order[i])
        nib = nib.index_select(-1, torch.tensor(inverse, device=packed.device))
    vals = nib.reshape(*packed.shape[:-1], packed.shape[-1] * 8)
    return vals[..., :n]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed int8 codes in [-8, 7] ``[..., n]`` -> int32 ``[..., ceil(n / 8)]``
    (nibble = code + 8, element ``8w + j`` in bits ``4j``): compressed-tensors'
    ``pack_to_int32(codes, 4)``."""
    check_tensor("codes", codes, dtype=torch.int8)
    if eager(codes) and bool(((codes < INT4_MIN) | (codes > INT4_MAX)).any()):
        raise ValueError(f"codes must lie in [{INT4_MIN}, {INT4_MAX}] to pack as int4")
    return pack_nibbles(codes.to(torch.int32) + OFFSET)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """int32 ``[..., words]`` -> signed int8 codes ``[..., n]`` (``unpack_from_int32``)."""
    check_tensor("packed", packed, dtype=torch.int32)
    if not 0 <= n <= packed.shape[-1] * 8:
        raise ValueError(f"n must be in [0, {packed.shape[-1] * 8}] for {packed.shape[-1]} words, got {n}")
    return (unpack_nibbles(packed, n) - OFFSET).to(torch.int8)


# ---------------------------------------------------------------- quantize


def _round_clamp(t: torch.Tensor) -> torch.Tensor:
    return torch.round(t.clamp(INT4_MIN, INT4_MAX)).to(torch.int8)


def _quantize_contiguous(
    x: torch.Tensor, g: Granularity, mode: Int4Mode, sdtype: torch.dtype, arithmetic: Arithmetic
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Codes int8 ``[..., rows, cols]``, scale ``[..., rows, G]`` (sdtype), zero point or None."""
    rows, cols = x.shape[-2:]
    fp32 = arithmetic is Arithmetic.FP32
    xb = to_blocks(x.float() if fp32 else x, g)
    if mode is Int4Mode.SYMMETRIC:
        amax = block_amax(x, g)
        s = (amax.float() / 7.5).to(sdtype) if fp32 else amax / 7.5
        s = replace_zero_scale(s, sdtype)
        t = xb / per_block(s.float() if fp32 else s)
        return from_blocks(_round_clamp(t), rows, cols), s, None
    lo, hi = block_min_max(x, g)
    lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
    if fp32:
        lo, hi = lo.float(), hi.float()
        s = ((hi - lo) / 15).to(sdtype)
        sw = s.float()  # the working scale: the stored one, widened exactly
    else:
        s = sw = (hi - lo) / 15
    zero = sw == 0
    zp = (INT4_MIN - lo / sw).clamp(INT4_MIN, INT4_MAX)  # 0/0 = NaN where zero: replaced below
    zp = torch.where(zero, torch.zeros_like(zp), zp)
    zp = torch.round(zp).to(torch.int8)
    s = replace_zero_scale(s, sdtype)
    sw = s.float() if fp32 else s
    t = xb / per_block(sw) + per_block(zp.to(sw.dtype))
    return from_blocks(_round_clamp(t), rows, cols), s, zp


def check_g_idx(name: str, g_idx: torch.Tensor, batch: Tuple[int, ...], cols: int, groups: int) -> None:
    """``g_idx`` is int32 ``[*batch, cols]`` with values in ``[0, groups)`` (values checked eagerly)."""
    check_tensor(name, g_idx, dtype=torch.int32, shape=(*batch, cols))
    if eager(g_idx) and g_idx.numel() and bool(((g_idx < 0) | (g_idx >= groups)).any()):
        raise ValueError(f"{name} values must lie in [0, {groups})")


def trivial_g_idx(batch: Tuple[int, ...], cols: int, group: int, device=None) -> torch.Tensor:
    """The g_idx of plain grouping: ``c // group`` for every column, int32 ``[*batch, cols]``."""
    g = torch.arange(cols, dtype=torch.int32, device=device) // group
    return g.expand(*batch, cols).contiguous()


def _group_perm(g_idx: torch.Tensor, group: int, groups: int) -> torch.Tensor:
    """Stable column order that makes every act-order group contiguous; each
    group must have exactly ``group`` columns."""
    if eager(g_idx):
        counts = torch.zeros(*g_idx.shape[:-1], groups, dtype=torch.int64, device=g_idx.device)
        counts.scatter_add_(-1, g_idx.long(), torch.ones_like(g_idx, dtype=torch.int64))
        if bool((counts != group).any()):
            raise ValueError(f"g_idx must assign exactly {group} columns to each of its {groups} groups")
    return torch.argsort(g_idx, dim=-1, stable=True)


def quantize(
    x: torch.Tensor,
    granularity: Union[Granularity, str] = DEFAULT_GRANULARITY,
    *,
    mode: Int4Mode = Int4Mode.SYMMETRIC,
    scale_dtype: Optional[torch.dtype] = None,
    g_idx: Optional[torch.Tensor] = None,
    arithmetic: Arithmetic = Arithmetic.FP32,
) -> QuantizedTensor:
    """Quantize ``x`` ``[..., rows, cols]`` (bf16/fp16/fp32, finite; cols % 8 == 0) to int4.

    ``scale_dtype``: bf16 / fp16 / fp32 (default ``x.dtype``).
    ``g_idx``: optional int32 ``[..., cols]`` act-order groups (PerGroup only):
    group ``j`` is the set of columns with ``g_idx == j`` (exactly ``g`` each);
    it is stored in the container and ``dequantize`` honours it.
    """
    check_input(x)
    g = as_granularity(granularity)
    mode, arithmetic = Int4Mode(mode), Arithmetic(arithmetic)
    *batch, rows, cols = x.shape
    batch = tuple(batch)
    check_supported(Format.INT4, g, cols, "int4.quantize")
    # magnitudes that keep the scale and the decoded grid finite in the working
    # precision: symmetric, 8 * amax / 7.5 <= max; asymmetric, hi - lo <= max
    work = torch.finfo(torch.float32 if arithmetic is Arithmetic.FP32 else x.dtype).max
    check_finite("x", x, limit=work * 7.5 / 8 if mode is Int4Mode.SYMMETRIC else work / 2)
    sdtype = x.dtype if scale_dtype is None else scale_dtype
    check_float_dtype("scale_dtype", sdtype)
    if arithmetic is Arithmetic.INPUT_DTYPE and sdtype != x.dtype:
        raise ValueError(
            f"arithmetic=INPUT_DTYPE computes the scale in x.dtype ({x.dtype}); "
            f"scale_dtype must be {x.dtype}, got {sdtype}"
        )
    if g_idx is None:
        codes, s, zp = _quantize_contiguous(x, g, mode, sdtype, arithmetic)
    else:
        if not isinstance(g, PerGroup):
            raise ValueError(f"g_idx needs a PerGroup granularity, got {g!r}")
        groups = cols // g.size
        check_g_idx("g_idx", g_idx, batch, cols, groups)
        perm = _group_perm(g_idx, g.size, groups)[..., None, :].expand(*batch, rows, cols)
        codes_sorted, s, zp = _quantize_contiguous(torch.gather(x, -1, perm), g, mode, sdtype, arithmetic)
        codes = torch.empty_like(codes_sorted).scatter_(-1, perm, codes_sorted)
    return QuantizedTensor(
        data=pack_int4(codes.contiguous()),
        scale=s,
        fmt=Format.INT4,
        granularity=g,
        shape=tuple(x.shape),
        zero_point=zp,
        g_idx=g_idx,
    )


def column_params(q: QuantizedTensor, t: torch.Tensor) -> torch.Tensor:
    """A per-group tensor ``t`` (``q.scale`` or ``q.zero_point``, ``[..., rows, G]``)
    repeated to one value per column ``[..., rows, cols]``, honouring ``q.g_idx``."""
    rows, cols = q.shape[-2:]
    if q.g_idx is None:
        return expand_scale(t, q.granularity, rows, cols)
    idx = q.g_idx.long()[..., None, :].expand(*q.shape[:-2], rows, cols)
    return torch.gather(t, -1, idx)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dtype(fp32(code - zero_point) * fp32(scale))``, the group of column ``c``
    being ``g_idx[c]`` when present. Equals compressed-tensors' ``dequantize``
    (which multiplies in the scale dtype) whenever ``dtype`` is the scale dtype
    or the scale is fp32: the fp32 product is exact for bf16/fp16 scales."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor, got {type(q).__name__}")
    if q.fmt is not Format.INT4:
        raise ValueError(f"q.fmt must be {Format.INT4.value}, got {q.fmt.value}")
    validate(q, "q")
    check_float_dtype("dtype", dtype)
    cols = q.shape[-1]
    v = unpack_nibbles(q.data, cols).float() - OFFSET
    if q.zero_point is not None:
        v = v - column_params(q, q.zero_point).float()
    return (v * column_params(q, q.scale).float()).to(dtype)


__all__ = [
    "Arithmetic",
    "DEFAULT_GRANULARITY",
    "INT4_MAX",
    "INT4_MIN",
    "Int4Mode",
    "OFFSET",
    "check_g_idx",
    "column_params",
    "dequantize",
    "pack_int4",
    "pack_nibbles",
    "quantize",
    "trivial_g_idx",
    "unpack_int4",
    "unpack_nibbles",
]
