"""Triton device helpers that quantize fp32 activation tiles exactly as
``formats`` does (see ``act_quant`` for the contract), and the
``act_quant_kernel`` launched by ``act_quant.quantize_rows`` /
``quantize_activation``. The GEMM prologue (``_gemm_kernel``) calls the same
helpers.

Imported lazily, like ``_gemm_kernel`` (``TRITON_INTERPRET`` is read at
import), and written with Triton builtins only (no ``triton.language.standard``
helpers; maxima are halving trees of ``tl.split``, see ``_group_abs_max``).

Exactness: every step is an IEEE fp32 operation that ``formats`` performs in
the same order (``amax / qmax``, ``x / scale``, ``x * 2**-e``, ``code *
scale``), or exact integer / power-of-two arithmetic: powers of two are built
from exponent bits, ``floor(log2)`` is read from exponent bits, and rounding
to nearest even of ``|v| <= 2**22`` is ``(v + 1.5 * 2**23) - 1.5 * 2**23``.
Elements are first rounded to their value grid in fp32 (``_to_grid``); codes
are then read off the (exact) grid values (``_grid_code``), so the dot
operands of the native fp8/int8 paths are exact casts of those values.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._enums import ActElement, ActScale

_EL_FP8 = tl.constexpr(ActElement.FP8_E4M3.value)
_EL_INT8 = tl.constexpr(ActElement.INT8.value)
_EL_FP4 = tl.constexpr(ActElement.FP4_E2M1.value)
_EL_FP6_E2M3 = tl.constexpr(ActElement.FP6_E2M3.value)
_EL_FP6_E3M2 = tl.constexpr(ActElement.FP6_E3M2.value)
_AS_STATIC = tl.constexpr(ActScale.STATIC_TENSOR.value)
_AS_ROW = tl.constexpr(ActScale.DYNAMIC_ROW.value)
_AS_GROUP = tl.constexpr(ActScale.DYNAMIC_GROUP.value)
_AS_MX_FLOOR = tl.constexpr(ActScale.MX_FLOOR.value)
_AS_MX_EVEN = tl.constexpr(ActScale.MX_EVEN.value)
_AS_NVFP4 = tl.constexpr(ActScale.NVFP4.value)
#: 1.5 * 2**23: adding and subtracting it rounds |v| <= 2**22 to an integer, half to even
_RNE_MAGIC = tl.constexpr(12582912.0)
#: torch.finfo(torch.float32).eps: the scale of an all-zero fp8/int8 block
_F32_EPS = tl.constexpr(1.1920928955078125e-07)
_F32_SIGN = tl.constexpr(-2147483648)  # 0x80000000 as int32
_F32_MIN_NORMAL = tl.constexpr(1.1754943508222875e-38)
_TWO_POW_64 = tl.constexpr(1.8446744073709552e19)


@triton.jit
def _nan_max(a, b):
    """max that propagates NaN (``torch.amax``)."""
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def _group_abs_max(x3, ROWS: tl.constexpr, NG: tl.constexpr, G: tl.constexpr):
    """``max |x3|`` over the last dim of ``x3 [ROWS, NG, G]`` (``G`` a power
    of two <= 4096), NaN propagating -> ``[ROWS, NG]``. A halving tree of
    ``tl.split`` rather than ``tl.reduce``: the interpreter runs a
    ``tl.reduce`` with a custom combine one element at a time (~1000x slower)."""
    m = tl.abs(x3)
    for i in tl.static_range(12):
        if (G >> i) > 1:
            lo, hi = tl.split(tl.reshape(m, (ROWS, NG, G >> (i + 1), 2)))
            m = _nan_max(lo, hi)
    return tl.reshape(m, (ROWS, NG))


@triton.jit
def _div(x, y):
    """IEEE fp32 division, correctly rounded (``x / y`` compiles to an
    approximate division on NVIDIA GPUs: measured on an H100, int8 codes
    off by one at .5 ties)."""
    return tl.math.div_rn(x, y)


@triton.jit
def _rint(v):
    """Round to nearest integer, ties to even (``torch.round``), for |v| <= 2**22."""
    return (v + _RNE_MAGIC) - _RNE_MAGIC


@triton.jit
def _pow2(e):
    """Exact fp32 ``2**e`` for int32 ``e`` in [-149, 127] (from the bits)."""
    normal = tl.maximum(e + 127, 1) << 23
    sub = tl.full(e.shape, 1, tl.int32) << tl.minimum(tl.maximum(e + 149, 0), 22)
    return tl.where(e >= -126, normal, sub).to(tl.float32, bitcast=True)


@triton.jit
def _exponent(a):
    """``floor(log2(a))`` of normal fp32 ``a > 0`` from its bits (-127 for 0 and subnormals)."""
    return ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _round_minifloat(a, MBITS: tl.constexpr, EMIN: tl.constexpr):
    """Finite ``a >= 0`` within the format's range -> the nearest value of the
    grid of a float with ``MBITS`` mantissa bits and smallest normal exponent
    ``EMIN`` (subnormals included), ties to even (``_minifloat.encode``)."""
    e = tl.maximum(_exponent(a), EMIN)
    return _rint(a * _pow2(MBITS - e)) * _pow2(e - MBITS)


@triton.jit
def _to_grid(t, ELEM: tl.constexpr):
    """Scaled fp32 values ``t`` -> the element values ``formats`` encodes them
    to (fp32): int8 ``round(clamp(t, -128, 127))``; e4m3 clamps to +-448,
    rounds and keeps NaN; fp4/fp6 saturate (inf too), round, and map NaN to
    0; the sign of a value rounding to zero is kept."""
    neg = t.to(tl.int32, bitcast=True) < 0
    if ELEM == _EL_INT8:
        q = _rint(tl.where(t < -128.0, -128.0, tl.where(t > 127.0, 127.0, t)))
    else:
        a = tl.abs(t)
        if ELEM == _EL_FP8:
            a = tl.where(a != a, 0.0, tl.where(a > 448.0, 448.0, a))
            m = _round_minifloat(a, 3, -6)
        elif ELEM == _EL_FP4:
            a = tl.where(a != a, 0.0, tl.where(a > 6.0, 6.0, a))
            m = _round_minifloat(a, 1, 0)
        elif ELEM == _EL_FP6_E2M3:
            a = tl.where(a != a, 0.0, tl.where(a > 7.5, 7.5, a))
            m = _round_minifloat(a, 3, 0)
        else:  # _EL_FP6_E3M2
            a = tl.where(a != a, 0.0, tl.where(a > 28.0, 28.0, a))
            m = _round_minifloat(a, 2, -2)
        # the sign bit ORed in (``-m`` may compile to ``0 - m``, which loses ``-0.0``)
        q = (m.to(tl.int32, bitcast=True) | tl.where(neg, _F32_SIGN, 0)).to(tl.float32, bitcast=True)
        if ELEM == _EL_FP8:
            q = tl.where(t != t, t, q)  # e4m3 has a NaN code
    return q


@triton.jit
def _grid_code(q, EBITS: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr):
    """Grid values ``q`` of a minifloat -> int32 codes (sign bit from ``q``;
    NaN -> all-ones magnitude, e4m3's NaN code)."""
    SIGN: tl.constexpr = 1 << (EBITS + MBITS)
    a = tl.abs(q)
    nan = a != a
    a = tl.where(nan, 0.0, a)
    e = tl.maximum(_exponent(a), EMIN)
    mag = ((e - EMIN) << MBITS) + (a * _pow2(MBITS - e)).to(tl.int32)
    mag = tl.where(nan, SIGN - 1, mag)
    return tl.where(q.to(tl.int32, bitcast=True) < 0, mag | SIGN, mag)


@triton.jit
def _element_code(q, ELEM: tl.constexpr):
    """Grid values -> int32 codes of ``ELEM`` (int8: the integer; fp4/fp6/fp8: bits)."""
    if ELEM == _EL_INT8:
        c = q.to(tl.int32)
    elif ELEM == _EL_FP8:
        c = _grid_code(q, 4, 3, -6)
    elif ELEM == _EL_FP4:
        c = _grid_code(q, 2, 1, 0)
    elif ELEM == _EL_FP6_E2M3:
        c = _grid_code(q, 2, 3, 0)
    else:
        c = _grid_code(q, 3, 2, -2)
    return c


@triton.jit
def _amax_scale(amax, ELEM: tl.constexpr):
    """fp32 dynamic scale ``amax / qmax`` (int8: 127.5, ``Int8ScaleRule.HALF_RANGE``;
    fp8: 448), an exact 0 replaced by fp32 eps."""
    if ELEM == _EL_INT8:
        s = _div(amax, 127.5)
    else:
        s = _div(amax, 448.0)
    return tl.where(s == 0.0, _F32_EPS, s)


@triton.jit
def _mx_exponent(amax, ELEM: tl.constexpr, SCALE: tl.constexpr):
    """Shared exponent (int32 in [-127, 127]) of blocks with fp32 ``amax``
    (``_e8m0.block_exponent``, FLOOR or EVEN; NaN blocks give an arbitrary
    value, the caller marks them)."""
    # emax of the element and the fraction bits from which EVEN's rounding of
    # amax to the element's mantissa carries: (1 << 23) - (1 << (22 - mbits))
    if ELEM == _EL_FP4:
        emax_el = 2
        carry = 6291456
    elif ELEM == _EL_FP6_E2M3:
        emax_el = 2
        carry = 7864320
    elif ELEM == _EL_FP6_E3M2:
        emax_el = 4
        carry = 7340032
    else:  # e4m3
        emax_el = 8
        carry = 7864320
    a = tl.where(amax != amax, 0.0, amax)
    sub = a < _F32_MIN_NORMAL
    an = tl.where(sub, a * _TWO_POW_64, a)
    fl = _exponent(an) - tl.where(sub, 64, 0)
    fl = tl.where(a == float("inf"), 65536, fl)
    if SCALE == _AS_MX_EVEN:
        fl = fl + ((an.to(tl.int32, bitcast=True) & 0x7FFFFF) >= carry).to(tl.int32)
    e = fl - emax_el
    return tl.minimum(tl.maximum(e, -127), 127)


@triton.jit
def quantize_groups(x, s_static, ELEM: tl.constexpr, SCALE: tl.constexpr, GROUP: tl.constexpr,
                    ROWS: tl.constexpr, COLS: tl.constexpr):
    """Quantize an fp32 tile ``x [ROWS, COLS]`` whose scales are local to it
    (``COLS`` a multiple of ``GROUP``; ``STATIC_TENSOR`` uses ``s_static``,
    ``NVFP4`` uses it as the global scale). Returns ``(q, step, stored)``:
    grid values ``q [ROWS, COLS // GROUP, GROUP]``, the fp32 dequantization
    step per group ``[ROWS, COLS // GROUP]`` (``values = q * step``), and the
    scale as ``formats`` stores it (fp32, or the int32 e8m0 / e4m3 byte)."""
    NG: tl.constexpr = COLS // GROUP
    x3 = tl.reshape(x, (ROWS, NG, GROUP))
    if SCALE == _AS_STATIC:
        step = tl.full((ROWS, NG), 0.0, tl.float32) + s_static
        t = _div(x3, s_static)
        stored = step
    elif SCALE == _AS_GROUP:
        step = _amax_scale(_group_abs_max(x3, ROWS, NG, GROUP), ELEM)
        t = _div(x3, step[:, :, None])
        stored = step
    elif SCALE == _AS_NVFP4:
        amax = _group_abs_max(x3, ROWS, NG, GROUP)
        bs = _div(amax, 6.0) * s_static
        bs = tl.where(bs > 448.0, 448.0, bs)  # NaN stays NaN
        bsq = tl.where(bs != bs, bs, _round_minifloat(tl.where(bs != bs, 0.0, bs), 3, -6))
        step = _div(bsq, s_static)
        t = tl.where(step[:, :, None] == 0.0, x3 * 0.0, _div(x3, step[:, :, None]))
        t = tl.where(step[:, :, None] != step[:, :, None], 0.0, t)
        stored = _grid_code(bsq, 4, 3, -6)
    else:  # MX
        amax = _group_abs_max(x3, ROWS, NG, GROUP)
        e = _mx_exponent(amax, ELEM, SCALE)
        nan = amax != amax
        t = tl.where(nan[:, :, None], 0.0, x3 * _pow2(-e)[:, :, None])
        step = tl.where(nan, float("nan"), _pow2(e))
        stored = tl.where(nan, 255, e + 127)
    q = _to_grid(t, ELEM)
    return q, step, stored


@triton.jit
def qdq_tile(x, s_static, ELEM: tl.constexpr, SCALE: tl.constexpr, GROUP: tl.constexpr,
             ROWS: tl.constexpr, COLS: tl.constexpr):
    """fp32 quantize-dequantize of a tile with tile-local scales
    (``formats.fake_quantize``)."""
    q, step, _ = quantize_groups(x, s_static, ELEM, SCALE, GROUP, ROWS, COLS)
    return tl.reshape(q * step[:, :, None], (ROWS, COLS))


@triton.jit
def act_quant_kernel(
    x_ptr, codes_ptr, scale_ptr, values_ptr, s_static_ptr,
    rows, K, k_chunk,
    stride_xm, stride_xk, stride_cm, stride_ck, stride_sm, stride_sk, stride_vm, stride_vk,
    A_ELEM: tl.constexpr,
    A_SCALE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``BLOCK_R`` rows of ``x [rows, K]``: if ``codes_ptr``, codes (int8, or uint8 bits),
    scales (``DYNAMIC_ROW``: fp32 per row; group scales: ``[rows, K // GROUP]``
    fp32 or bytes; ``STATIC_TENSOR``: not written) and, if ``values_ptr``,
    the fp32 QDQ values. ``BLOCK_K`` is a multiple of ``GROUP``. Program
    ``(i, j)`` covers rows ``[i * BLOCK_R, (i + 1) * BLOCK_R)`` and columns
    ``[j * k_chunk, (j + 1) * k_chunk)`` (``k_chunk`` a multiple of
    ``BLOCK_K``); per-row scales need the whole row: one program along K."""
    pid = tl.program_id(0)
    k_lo = tl.program_id(1) * k_chunk
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < rows
    x_rows = x_ptr + offs_r[:, None].to(tl.int64) * stride_xm
    if A_SCALE == _AS_ROW:
        amax = tl.full((BLOCK_R,), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=r_ok[:, None] & (offs_k < K)[None, :], other=0.0)
            row_max = _group_abs_max(tl.reshape(x.to(tl.float32), (BLOCK_R, 1, BLOCK_K)), BLOCK_R, 1, BLOCK_K)
            amax = _nan_max(amax, tl.reshape(row_max, (BLOCK_R,)))
        s = _amax_scale(amax, A_ELEM)
        tl.store(scale_ptr + offs_r * stride_sm, s, mask=r_ok)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask = r_ok[:, None] & (offs_k < K)[None, :]
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
            q = _to_grid(_div(x.to(tl.float32), s[:, None]), A_ELEM)
            if codes_ptr is not None:
                c_ptrs = codes_ptr + offs_r[:, None].to(tl.int64) * stride_cm + offs_k[None, :] * stride_ck
                tl.store(c_ptrs, _element_code(q, A_ELEM).to(codes_ptr.dtype.element_ty), mask=mask)
            if values_ptr is not None:
                v_ptrs = values_ptr + offs_r[:, None].to(tl.int64) * stride_vm + offs_k[None, :] * stride_vk
                tl.store(v_ptrs, q * s[:, None], mask=mask)
    else:
        if s_static_ptr is not None:
            s_static = tl.load(s_static_ptr)
        else:
            s_static = 1.0
        NG: tl.constexpr = BLOCK_K // GROUP
        for k0 in range(k_lo, tl.minimum(K, k_lo + k_chunk), BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask = r_ok[:, None] & (offs_k < K)[None, :]
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
            q3, step, stored = quantize_groups(x, s_static, A_ELEM, A_SCALE, GROUP, BLOCK_R, BLOCK_K)
            q = tl.reshape(q3, (BLOCK_R, BLOCK_K))
            if codes_ptr is not None:
                c_ptrs = codes_ptr + offs_r[:, None].to(tl.int64) * stride_cm + offs_k[None, :] * stride_ck
                tl.store(c_ptrs, _element_code(q, A_ELEM).to(codes_ptr.dtype.element_ty), mask=mask)
            if values_ptr is not None:
                v_ptrs = values_ptr + offs_r[:, None].to(tl.int64) * stride_vm + offs_k[None, :] * stride_vk
                tl.store(v_ptrs, tl.reshape(q3 * step[:, :, None], (BLOCK_R, BLOCK_K)), mask=mask)
            if A_SCALE != _AS_STATIC:
                offs_g = k0 // GROUP + tl.arange(0, NG)
                s_ptrs = scale_ptr + offs_r[:, None].to(tl.int64) * stride_sm + offs_g[None, :] * stride_sk
                g_mask = r_ok[:, None] & (offs_g < K // GROUP)[None, :]
                tl.store(s_ptrs, stored.to(scale_ptr.dtype.element_ty), mask=g_mask)
