"""The weight-streaming grouped GEMM for small token blocks ("swap-AB").

Imported lazily by ``moe_gemm`` (see ``_gemm_kernel`` for why).

Same contract as ``_gemm_kernel.moe_gemm_kernel`` for weight-only GEMMs
(no activation quantization), but each program computes the transposed
tile ``C^T[BLOCK_N, BLOCK_M] = W[BLOCK_N, K] @ A^T[K, BLOCK_M]``: the decoded
weight tile is the *left* operand of ``tl.dot``, which Hopper's wgmma reads
from registers (no shared-memory round trip of the decoded values), and the
few token rows of a decode block are the narrow N side of the instruction.

Packed codes are never reshaped in a way that moves data. The 4-bit formats
are read as int32 words of eight codes (int4 nibbles, or two e2m1 codes per
byte in the checkpoint's byte order), ``SUB = BLOCK_K / 8`` words per row and
K tile; fp8 (e4m3) weights as words of four bytes (``SUB = BLOCK_K / 4``,
joined by ``_cat4`` in ``KOrder(4, SUB)``). Code ``j`` of every word forms a
``[BLOCK_N, SUB]`` sub-tile, decoded in place; the eight sub-tiles are joined
side by side along K (``_cat8``), which on the wgmma register-operand layout
only renames registers (each sub-tile already is one K slice of that layout:
SASS shows no shuffles and no shared-memory staging). Column ``j * SUB + w``
of the joined tile is natural column ``8w + j``, so the activations come in
that order (``moe_gemm.KOrder(8, SUB)``; GEMM1's epilogue writes GEMM2's
order), one contiguous ``[BLOCK_K, BLOCK_M]`` block per tile, and each K tile
is a single dot. On CUDA the decode is PTX on packed registers
(``_int4_split_asm``: ``lop3`` + packed ``sub.bf16x2``; ``_fp4_scaled_asm``:
``prmt`` tables, then the block scale; ``_fp8_split_asm``: the hardware
e4m3x2 conversion); under the interpreter plain shifts and masks
(``ASM=False``).

Scales: int4 per column (epilogue) or per K tile (groups that are multiples
of ``BLOCK_K``: the tile's fp32 product is scaled), both with or without
zero points (the packed subtraction's bias becomes 136 + z); int4 groups of
32 / 64 with bf16 scales multiply the decoded codes in the PTX (rounded once,
like the grouped kernel's fp32 product cast to bf16). fp4 block scales (MX
e8m0 per 32 columns, nvfp4 e4m3 per 16; four per row and K tile: 128
columns for MX, 64 for nvfp4) multiply the decoded bf16 codes in the PTX,
one ``mul.bf16x2`` per two values, exactly (a code has 2 significant bits,
an e4m3 scale 4; bf16 has fp32's exponent range); nvfp4's global scale
divides in the epilogue. (Before: the dot ran against G masked copies of
the activation block and G scaled fp32 partials were summed: G x the MMA
work, ~700 instructions per 8 KiB.)

Activations: float values, or per-row int8 / e4m3 codes (``A_CODES``: the
w4a8 schemes' input after ``act_quant.quantize_rows``), converted to bf16
exactly in the gather; the dot then sums exact code products in fp32 and the
row scale applies in the epilogue.

Instruction counts per K tile and warp (sm_90 SASS, 128 rows, 4 warps, per
8 KiB of codes): int4 315 (g128), 301 (per column), 336 (g128 with zero
points), 404 / 412 (g64 / g32); mxfp4 479 (708 with the G copies); nvfp4 570
(766); fp8 256 (64 rows x 128 columns, per-column scales). int4 as it runs now (64 rows, two
K tiles an iteration: ``UNROLL``): 359 per 8 KiB (g128). The e2m1 table decode costs about 2 instructions per value and the
scale 0.6, against int4's 1.5. Measured at M = 16 (bench/decode_tune.py,
one GEMM, H200): mxfp4 / nvfp4 streamed at 45-51% of the HBM floor on
gpt-oss / mixtral / deepseek shapes, from 25-34% with the G copies.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._gemm_kernel import (
    _e4m3_to_f32, _EL_FP4, _EL_FP8, _EL_INT4, _SC_E8M0, _SM_PER_COLUMN, _SM_PER_GROUP, _SM_PER_K_TILE, _decode_scale,
    epilogue_store, tile_cols, tile_rows,
)


#: ``A_CODES``: what ``a`` holds (float values, or per-row int8 / e4m3 codes with ``a_scale``)
_A_FLOAT = tl.constexpr(0)
_A_INT8 = tl.constexpr(1)
_A_FP8 = tl.constexpr(2)

#: int4 words A ($8), B ($9) -> $0..$7 = code j of both as bf16x2, minus ``bias`` (136 = 128 + 8:
#: ``lop3`` ORs nibble pairs into the mantissas of 128.0; 136 + z with zero points)
_INT4_BODY = """
        prmt.b32 lo, $8, $9, 0x5410;
        prmt.b32 hi, $8, $9, 0x7632;
        lop3.b32 $0, lo, 0x000f000f, 0x43004300, 0xea;
        shr.u32 t, lo, 4;
        lop3.b32 $1, t, 0x000f000f, 0x43004300, 0xea;
        shr.u32 t, lo, 8;
        lop3.b32 $2, t, 0x000f000f, 0x43004300, 0xea;
        shr.u32 t, lo, 12;
        lop3.b32 $3, t, 0x000f000f, 0x43004300, 0xea;
        lop3.b32 $4, hi, 0x000f000f, 0x43004300, 0xea;
        shr.u32 t, hi, 4;
        lop3.b32 $5, t, 0x000f000f, 0x43004300, 0xea;
        shr.u32 t, hi, 8;
        lop3.b32 $6, t, 0x000f000f, 0x43004300, 0xea;
        shr.u32 t, hi, 12;
        lop3.b32 $7, t, 0x000f000f, 0x43004300, 0xea;
""" + "".join(f"        sub.bf16x2 ${j}, ${j}, bias;\n" for j in range(8))

_INT4_REGS = """
        {
        .reg .b32 lo, hi, t, bias, tA, tB, s;"""

#: the PTX of ``_int4_split_asm`` (inputs $8, $9: two words; outputs $0..$7: code j of both as
#: bf16x2); tests/test_decode_ptx.py runs it and the two below through a small PTX interpreter
_INT4_SPLIT_PTX = tl.constexpr(_INT4_REGS + """
        mov.b32 bias, 0x43084308;""" + _INT4_BODY + "        }")

#: ``_int4_split_asm`` with zero points: $10 / $11 hold A's / B's ``(136 + z)`` as bf16x2 (their
#: rows' zero point ``z`` of the K tile, ``moe_gemm`` stores it centred: w = (u - 8 - z) * s); the
#: low half of A's and the high half of B's make the pair's bias (one ``prmt``)
_INT4_ZP_PTX = tl.constexpr(_INT4_REGS + """
        prmt.b32 bias, $10, $11, 0x7610;""" + _INT4_BODY + "        }")

#: ``_int4_split_asm`` times bf16 group scales (groups of 32 / 64, smaller than the K tile): $10 /
#: $11 and $12 / $13 are A's / B's rows' two int32 of the tile's bf16 scales (up to four), $14 /
#: $15 their selectors (``moe_gemm.decode_table``: nibbles 0-1 pick A's scale's bytes, 2-3 B's);
#: three ``prmt`` make the pair (sA, sB), one ``mul.bf16x2`` per output applies it: the code is
#: exact in bf16, so the product is rounded once, as the grouped kernel's fp32 product cast to bf16
_INT4_SCALED_PTX = tl.constexpr(_INT4_REGS + """
        mov.b32 bias, 0x43084308;
        prmt.b32 tA, $10, $12, $14;
        prmt.b32 tB, $11, $13, $15;
        prmt.b32 s, tA, tB, 0x7610;""" + _INT4_BODY
    + "".join(f"        mul.rn.bf16x2 ${j}, ${j}, s;\n" for j in range(8)) + "        }")


#: e4m3 bytes -> bf16x2: byte j of words A ($4) and B ($5) into the low half (``prmt``), the
#: hardware pair conversion to f16x2, each f16 widened to f32 and the pair packed to bf16x2 -
#: all exact (4 significant bits), subnormals and NaN codes included. (Moving the bits into
#: place and multiplying by 2^120 costs the same 5 instructions a pair but turns the NaN code
#: 0x7F into 480.)
_FP8_SPLIT_PTX = tl.constexpr("""
        {
        .reg .b32 x, h;
        .reg .b16 lo, hi, h0, h1;
        .reg .f32 f0, f1;
""" + "".join(f"""        prmt.b32 x, $4, $5, {hex(j | ((4 + j) << 4))};
        mov.b32 {{lo, hi}}, x;
        cvt.rn.f16x2.e4m3x2 h, lo;
        mov.b32 {{h0, h1}}, h;
        cvt.f32.f16 f0, h0;
        cvt.f32.f16 f1, h1;
        cvt.rn.bf16x2.f32 ${j}, f1, f0;
""" for j in range(4)) + "        }")


@triton.jit
def _fp8_split_asm(words):
    """int32 words of four e4m3 weight codes -> 4 bf16 tensors of the same
    shape: output ``j`` holds byte ``j`` of each word, exactly (``_FP8_SPLIT_PTX``)."""
    return tl.inline_asm_elementwise(
        asm=_FP8_SPLIT_PTX, constraints="=r,=r,=r,=r,r,r",
        args=[words], dtype=(tl.bfloat16,) * 4, is_pure=True, pack=2,
    )


@triton.jit
def _int4_split_asm(words):
    """int32 words -> 8 bf16 tensors of the same shape: output ``j`` holds
    the signed code ``u - 8`` of nibble ``j`` of each word. Two words per
    call: their low / high halves are paired with one ``prmt``, then each
    nibble pair becomes a bf16x2 with one ``lop3`` (``0x4300 | u`` = 128 + u)
    and one packed subtraction of 136."""
    return tl.inline_asm_elementwise(
        asm=_INT4_SPLIT_PTX,
        constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r",
        args=[words],
        dtype=(tl.bfloat16,) * 8,
        is_pure=True,
        pack=2,
    )


@triton.jit
def _int4_zp_asm(words, zwords):
    """``_int4_split_asm`` minus per-word zero points: ``zwords`` holds
    ``(0x4308 + z) * 0x10001`` (136 + z as bf16x2) for each word's row."""
    return tl.inline_asm_elementwise(
        asm=_INT4_ZP_PTX, constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r",
        args=[words, zwords], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2,
    )


@triton.jit
def _int4_scaled_asm(words, sw0, sw1, sel):
    """``_int4_split_asm`` times each word's bf16 group scale, picked from its
    row's two scale words ``sw0``, ``sw1`` by ``sel`` (see ``_INT4_SCALED_PTX``)."""
    return tl.inline_asm_elementwise(
        asm=_INT4_SCALED_PTX, constraints="=r,=r,=r,=r,=r,=r,=r,=r" + ",r" * 8,
        args=[words, sw0, sw1, sel], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2,
    )


#: The two 8-byte ``prmt`` tables of ``_E2M1_X8``: the high and the low bytes
#: of the bf16 of 0, 0.5, 1, 1.5, 2, 3, 4, 6 (entries 0-3 in the first word of
#: each pair). The kernel loads them (``moe_gemm.decode_table``) rather
#: than writing them as PTX immediates: ptxas kept immediates in uniform
#: registers and copied one into a register before each lookup (58 IMAD per
#: 8 KiB tile, 576 -> 536 - 58 instructions once they are loaded values).
E2M1_LUT = (0x3F3F3F00, 0x40404040, 0xC0800000, 0xC0804000)

#: e2m1 codes -> bf16x2, for the eight codes of a 32-bit ``x`` whose bytes
#: pair two words (``x`` = A.b0 B.b0 A.b1 B.b1: low nibbles A0 A1 B0 B1, high
#: nibbles A2 A3 B2 B3): the 3-bit magnitudes index the ``E2M1_LUT`` tables
#: ($14 $16: high bytes, $18 $20: low bytes); the four
#: sign bits of a 16-bit half are moved to their bytes' top bits with one
#: ``prmt`` (bytes of ``x << 4`` and ``x``, whose top bits are exactly those
#: signs) and one ``lop3``; a ``prmt`` per output pairs A's and B's code j.
#: 15 instructions for 8 values (a sign ``prmt`` + ``lop3`` per output pair
#: before: 19).
_E2M1_X8 = """
        and.b32 m, {x}, 0x77777777;
        shr.u32 mh, m, 16;
        shl.b32 s4, {x}, 4;
        prmt.b32 hb, $14, $16, m;
        prmt.b32 lb, $18, $20, m;
        prmt.b32 sg, s4, {x}, 0x5140;
        lop3.b32 hb, sg, 0x80808080, hb, 0xea;
        prmt.b32 hb2, $14, $16, mh;
        prmt.b32 lb2, $18, $20, mh;
        prmt.b32 sg, s4, {x}, 0x7362;
        lop3.b32 hb2, sg, 0x80808080, hb2, 0xea;
        prmt.b32 {o0}, lb, hb, 0x6240;
        prmt.b32 {o1}, lb, hb, 0x7351;
        prmt.b32 {o2}, lb2, hb2, 0x6240;
        prmt.b32 {o3}, lb2, hb2, 0x7351;
"""

#: the scale pair of ``_FP4_SCALED_PTX`` from e8m0 bytes: byte ``g_A`` of A's row scale word ($10)
#: into bits 15..8 and byte ``g_B`` of B's ($11) into bits 31..24 (``prmt`` selector: A's nibble 1
#: from $12, B's nibble 3 from $13), shifted to the bf16 exponent fields: ``e << 7`` is the bf16 of
#: 2^(e - 127); ``max.u16x2`` turns e = 0 into 2^-127's subnormal 0x0040 (byte 255, NaN in the
#: format, is refused when scales are built; here it would read as inf)
_SCALE_E8M0 = """
    lop3.b32 sel, $12, $13, 0xff, 0xe4;
    prmt.b32 s, $10, $11, sel;
    and.b32 s, s, 0xff00ff00;
    shr.u32 s, s, 1;
    mov.b32 lim, 0x00400040;
    max.u16x2 s, s, lim;
"""
#: the same from e4m3 bytes (nvfp4): bytes ``g_A`` / ``g_B`` into the low 16 bits (selector nibbles
#: 0 and 1), two e4m3 -> f16x2 (exact), each f16 -> f32 -> the bf16x2 pair (exact: 4 significant bits)
_SCALE_E4M3 = """
    lop3.b32 sel, $12, $13, 0xf, 0xe4;
    prmt.b32 s, $10, $11, sel;
    mov.b32 {s16, hi16}, s;
    cvt.rn.f16x2.e4m3x2 h, s16;
    mov.b32 {h0, h1}, h;
    cvt.f32.f16 f0, h0;
    cvt.f32.f16 f1, h1;
    cvt.rn.bf16x2.f32 s, f1, f0;
"""


def _fp4_scaled_ptx(scale: str) -> tl.constexpr:
    """The PTX of ``_fp4_scaled_asm``: $8, $9 two words A, B; $10, $11 their rows' scale words;
    $12, $13 their scale selectors; $14 $16 $18 $20 the ``E2M1_LUT`` words (A's copies; $15 ...
    B's, the same values); outputs $0..$7 code j of A and B, times the block scales."""
    return tl.constexpr(
        """
    {
    .reg .b32 x, y, m, mh, hb, lb, hb2, lb2, s4, sg, sel, s, h, lim;
    .reg .b16 s16, hi16, h0, h1;
    .reg .f32 f0, f1;
    """
        + scale
        + """
    prmt.b32 x, $8, $9, 0x5140;
    prmt.b32 y, $8, $9, 0x7362;
    """
        + _E2M1_X8.format(x="x", o0="$0", o1="$1", o2="$2", o3="$3")
        + _E2M1_X8.format(x="y", o0="$4", o1="$5", o2="$6", o3="$7")
        + "".join(f"    mul.rn.bf16x2 ${j}, ${j}, s;\n" for j in range(8))
        + "    }"
    )


#: ``_fp4_scaled_asm``'s PTX for mxfp4 (e8m0 scales) and nvfp4 (e4m3 scales); tests/test_decode_ptx.py
#: interprets both
_FP4_MX_PTX = _fp4_scaled_ptx(_SCALE_E8M0)
_FP4_NV_PTX = _fp4_scaled_ptx(_SCALE_E4M3)


@triton.jit
def _fp4_scaled_asm(words, swords, sel, t0, t1, t2, t3, SCALE_CODEC: tl.constexpr):
    """int32 words of eight e2m1 codes (code ``j`` in nibble ``j``, the
    checkpoint's byte order), their rows' scale words (the K tile's block
    scale bytes as one int32), per-word selectors and the four ``E2M1_LUT``
    words (both from ``moe_gemm.decode_table``)
    -> 8 bf16 tensors of the words' shape: output ``j`` holds code ``j`` of
    each word times its block scale, exact (an e2m1 value has 2 significant
    bits, an e4m3 scale 4: the product fits bf16, whose exponent range is
    fp32's). Two words A, B per call: one ``prmt`` pairs their bytes 0, 1 and
    one their bytes 2, 3, each decoded as ``_E2M1_X8`` says (32 instructions
    per 16 values); the scale pair costs 5 (e8m0) or 6 (e4m3) more and its
    product 8 ``mul.bf16x2``."""
    return tl.inline_asm_elementwise(
        asm=_FP4_MX_PTX if SCALE_CODEC == _SC_E8M0 else _FP4_NV_PTX,
        constraints="=r,=r,=r,=r,=r,=r,=r,=r" + ",r" * 14,
        args=[words, swords, sel, t0, t1, t2, t3], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=2,
    )


@triton.jit
def _e2m1_to_f32(code):
    """int32 e2m1 codes (4 bits) -> fp32, exactly (the interpreter's decode)."""
    mag = code & 7
    e = mag >> 1
    m = (mag & 1).to(tl.float32)
    normal = tl.exp2((e - 1).to(tl.float32)) * (1.0 + 0.5 * m)
    v = tl.where(e == 0, 0.5 * m, normal)
    return tl.where((code & 8) != 0, -v, v)


@triton.jit
def _code(words, j: tl.constexpr, bias, scales, COMPUTE: tl.constexpr):
    """Plain-Triton decode of int4 code ``j`` of each word, ``(u - bias) * scales``
    in fp32 then rounded once (the interpreter's path, and the PTX's twin)."""
    return ((((words >> (4 * j)) & 15) - bias).to(tl.float32) * scales).to(COMPUTE)


@triton.jit
def _codes8(words, bias, scales, COMPUTE: tl.constexpr):
    return (
        _code(words, 0, bias, scales, COMPUTE), _code(words, 1, bias, scales, COMPUTE),
        _code(words, 2, bias, scales, COMPUTE), _code(words, 3, bias, scales, COMPUTE),
        _code(words, 4, bias, scales, COMPUTE), _code(words, 5, bias, scales, COMPUTE),
        _code(words, 6, bias, scales, COMPUTE), _code(words, 7, bias, scales, COMPUTE),
    )


@triton.jit
def _int4_word_scales(sw0, sw1, SUB: tl.constexpr, WPS: tl.constexpr):
    """``[BLOCK_N, SUB]`` fp32: the bf16 group scale of each word of a K tile
    (scale ``g = w // WPS`` is half ``g % 2`` of ``sw0`` (g < 2) or ``sw1``)."""
    g = (tl.arange(0, SUB) // WPS)[None, :]
    pair = tl.where(g < 2, sw0[:, None], sw1[:, None])
    bits = (pair >> (16 * (g % 2))) & 0xFFFF
    return (bits << 16).to(tl.float32, bitcast=True)


@triton.jit
def _cat4(w0, w1, w2, w3, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``_cat8`` for 8-bit codes: four ``[BLOCK_N, SUB]`` tiles side by side along K."""
    t = tl.join(tl.join(w0, w1), tl.join(w2, w3))
    return tl.reshape(tl.permute(t, (0, 3, 2, 1)), (BLOCK_N, BLOCK_K))


@triton.jit
def _fp8_codes4(words, FP8_NATIVE: tl.constexpr, COMPUTE: tl.constexpr):
    """Plain-Triton decode of the four e4m3 bytes of each word (exact in bf16)."""
    return (
        _e4m3_to_f32((words & 0xFF).to(tl.uint8), FP8_NATIVE).to(COMPUTE),
        _e4m3_to_f32(((words >> 8) & 0xFF).to(tl.uint8), FP8_NATIVE).to(COMPUTE),
        _e4m3_to_f32(((words >> 16) & 0xFF).to(tl.uint8), FP8_NATIVE).to(COMPUTE),
        _e4m3_to_f32(((words >> 24) & 0xFF).to(tl.uint8), FP8_NATIVE).to(COMPUTE),
    )


@triton.jit
def _cat8(w0, w1, w2, w3, w4, w5, w6, w7, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Eight ``[BLOCK_N, SUB]`` tiles side by side along K (``w_j`` at columns
    ``j * SUB ...``). On the wgmma register-operand layout this is a renaming
    of registers: each sub-tile already holds one K = SUB slice of the
    operand's layout, so the joins and the reshape compile to no data movement
    (no shared-memory round trip in the SASS)."""
    t = tl.join(tl.join(tl.join(w0, w1), tl.join(w2, w3)), tl.join(tl.join(w4, w5), tl.join(w6, w7)))
    return tl.reshape(tl.permute(t, (0, 4, 3, 2, 1)), (BLOCK_N, BLOCK_K))


@triton.jit
def _word_scales(swords, SUB: tl.constexpr, WPS: tl.constexpr, SCALE_CODEC: tl.constexpr, FP8_NATIVE: tl.constexpr):
    """``[BLOCK_N, SUB]`` fp32: the block scale of each word of a K tile
    (byte ``w // WPS`` of its row's scale word; the interpreter's path)."""
    g = tl.arange(0, SUB) // WPS
    return _decode_scale(((swords[:, None] >> (8 * g[None, :])) & 0xFF).to(tl.uint8), SCALE_CODEC, FP8_NATIVE)


@triton.jit
def _code_scaled(words, j: tl.constexpr, scales, COMPUTE: tl.constexpr):
    return (_e2m1_to_f32((words >> (4 * j)) & 15) * scales).to(COMPUTE)


@triton.jit
def _codes8_scaled(words, scales, COMPUTE: tl.constexpr):
    """Plain-Triton twin of ``_fp4_scaled_asm`` (fp32 products, exact in bf16 as there)."""
    return (
        _code_scaled(words, 0, scales, COMPUTE), _code_scaled(words, 1, scales, COMPUTE),
        _code_scaled(words, 2, scales, COMPUTE), _code_scaled(words, 3, scales, COMPUTE),
        _code_scaled(words, 4, scales, COMPUTE), _code_scaled(words, 5, scales, COMPUTE),
        _code_scaled(words, 6, scales, COMPUTE), _code_scaled(words, 7, scales, COMPUTE),
    )


@triton.jit
def _opaque(x):
    """``x`` unchanged (fp32), through an ``inline_asm`` the compiler cannot see into."""
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _gather_a_t(a_ptrs_t, offs_k, ok, stride_ak):
    """``A^T[offs_k, rows]``: the activation rows of the block at columns
    ``offs_k`` (any stride), zero where ``ok`` (``[1 or BLOCK_K, BLOCK_M]``) is false."""
    return tl.load(a_ptrs_t + offs_k[:, None] * stride_ak, mask=ok, other=0.0)


@triton.jit
def _k_tile(
    acc, k0, w_rows, stride_wk, n_ok, s_rows, z_rows, stride_sk, a_ptrs_t, row_ok, stride_ak,
    sel4, sel, lut0, lut1, lut2, lut3,
    ELEMENT: tl.constexpr, SCALE_CODEC: tl.constexpr, SCALE_MODE: tl.constexpr, SCALE_BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, COMPUTE: tl.constexpr, FP8_NATIVE: tl.constexpr,
    ASM: tl.constexpr, CUDA: tl.constexpr, A_CODES: tl.constexpr, EVEN_N: tl.constexpr, HAS_ZP: tl.constexpr,
):
    """``acc`` plus the product of K tile ``k0`` (columns ``k0 ... k0 + BLOCK_K``, inside K):
    load its words, decode them, gather the activation block, one dot (see the module docstring)."""
    CPW: tl.constexpr = 4 if ELEMENT == _EL_FP8 else 8  # codes per int32 word
    SUB: tl.constexpr = BLOCK_K // CPW  # int32 words per row and K tile
    WPS: tl.constexpr = SCALE_BLOCK_K // 8  # int4 groups of 32 / 64, fp4 blocks: words per scale
    SPT: tl.constexpr = BLOCK_K // SCALE_BLOCK_K // 2  # int4 groups of 32 / 64: int32 scale words per row and tile
    offs_w = k0 // CPW + tl.arange(0, SUB)
    if EVEN_N:
        words = tl.load(w_rows + offs_w[None, :] * stride_wk)
    else:
        words = tl.load(w_rows + offs_w[None, :] * stride_wk, mask=n_ok[:, None], other=0)
    # sub-tile j = code j of every word (natural column k0 + CPW * w + j)
    if ELEMENT == _EL_FP8:
        if ASM:
            u0, u1, u2, u3 = _fp8_split_asm(words)
        else:
            u0, u1, u2, u3 = _fp8_codes4(words, FP8_NATIVE, COMPUTE)
        wt = _cat4(u0, u1, u2, u3, BLOCK_N, BLOCK_K)
    elif ELEMENT == _EL_INT4:
        if HAS_ZP:
            # zero points (groups that are multiples of the tile, or one per row): the bias of
            # the packed subtraction becomes 136 + z, exact; the scale stays on the fp32 product
            zk = k0 // SCALE_BLOCK_K if SCALE_MODE == _SM_PER_K_TILE else 0
            z = tl.load(z_rows + zk * stride_sk, mask=n_ok, other=0).to(tl.int32)
            if ASM:
                v0, v1, v2, v3, v4, v5, v6, v7 = _int4_zp_asm(words, ((0x4308 + z) * 0x10001)[:, None])
            else:
                v0, v1, v2, v3, v4, v5, v6, v7 = _codes8(words, 8 + z[:, None], 1.0, COMPUTE)
        elif SCALE_MODE == _SM_PER_GROUP:
            t = (k0 // BLOCK_K) * SPT
            if EVEN_N:
                sw0 = tl.load(s_rows + t * stride_sk)
                sw1 = tl.load(s_rows + (t + SPT - 1) * stride_sk)
            else:
                sw0 = tl.load(s_rows + t * stride_sk, mask=n_ok, other=0)
                sw1 = tl.load(s_rows + (t + SPT - 1) * stride_sk, mask=n_ok, other=0)
            if ASM:
                v0, v1, v2, v3, v4, v5, v6, v7 = _int4_scaled_asm(words, sw0[:, None], sw1[:, None], sel4)
            else:
                v0, v1, v2, v3, v4, v5, v6, v7 = _codes8(words, 8, _int4_word_scales(sw0, sw1, SUB, WPS), COMPUTE)
        elif ASM:
            v0, v1, v2, v3, v4, v5, v6, v7 = _int4_split_asm(words)
        else:
            v0, v1, v2, v3, v4, v5, v6, v7 = _codes8(words, 8, 1.0, COMPUTE)
    else:
        if EVEN_N:
            swords = tl.load(s_rows + (k0 // BLOCK_K) * stride_sk)
        else:
            swords = tl.load(s_rows + (k0 // BLOCK_K) * stride_sk, mask=n_ok, other=0)
        if ASM:
            # per-word scale selectors, loaded (moe_gemm.decode_table) rather than computed
            # from tl.arange: with an arange operand Triton 3.6 did not give the asm the dot's
            # register layout and moved the decoded tile through shared memory (SASS: 16 STS,
            # 708 -> 576 instructions per 8 KiB tile once loaded)
            v0, v1, v2, v3, v4, v5, v6, v7 = _fp4_scaled_asm(
                words, swords[:, None], sel, lut0, lut1, lut2, lut3, SCALE_CODEC)
        else:
            v0, v1, v2, v3, v4, v5, v6, v7 = _codes8_scaled(
                words, _word_scales(swords, SUB, WPS, SCALE_CODEC, FP8_NATIVE), COMPUTE)
    if ELEMENT != _EL_FP8:
        # the eight sub-tiles side by side along K (column j * SUB + w = code j of word w: the
        # KOrder(8, SUB) position of natural column 8w + j): one dot per K tile
        wt = _cat8(v0, v1, v2, v3, v4, v5, v6, v7, BLOCK_N, BLOCK_K)
    a_t = _gather_a_t(a_ptrs_t, k0 + tl.arange(0, BLOCK_K), row_ok, stride_ak)
    if A_CODES == _A_FP8:
        a_t = _e4m3_to_f32(a_t, FP8_NATIVE)  # e4m3 codes (as bytes), exact in bf16
    a_t = a_t.to(COMPUTE)  # int8 codes too: exact, and int8 x int4 products sum exactly in fp32
    if SCALE_MODE == _SM_PER_K_TILE:
        # (this load, which does not feed the dot, stays synchronous: Triton pipelines the dot's
        # operands. Loading the next iteration's scales and zero points into registers instead
        # ran slower on the H200: g128 3-6%, zero points 25-50%, bench/results/h200_decode_rows.md)
        s = _decode_scale(tl.load(s_rows + (k0 // SCALE_BLOCK_K) * stride_sk, mask=n_ok, other=0), SCALE_CODEC, FP8_NATIVE)
        acc += tl.dot(wt, a_t) * s[:, None]
    else:
        # not ``tl.dot(wt, a_t, acc)``: with a loop-carried accumulator Triton 3.6 splits the
        # register-operand dot into 8 wgmma of K = 16 kept in flight together (``pendings =
        # 7``), and the decoded registers of the next tile raced them: deepseek-v3 w13 at M = 256
        # (BLOCK_M 32, gated) gave run-to-run different outputs in a few weight rows. One dot per
        # tile into a fresh accumulator, added in fp32 (as the int4 per-K-tile path), is exact
        # and deterministic (and 40 instructions a tile shorter: no wgmma fences); on CUDA
        # ``_opaque`` keeps Triton from folding the add back into the dot.
        part = tl.dot(wt, a_t)
        if CUDA:
            part = _opaque(part)
        acc += part
    return acc


@triton.jit
def moe_decode_kernel(
    a_ptr, w_ptr, c_ptr,
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    scale_ptr, zp_ptr, gs_ptr, bias_ptr, topk_w_ptr, tab_ptr, a_scale_ptr,
    N, N_OUT, K, num_pairs, max_padded, num_experts,
    stride_am, stride_ak,
    stride_we, stride_wn, stride_wk,
    stride_se, stride_sn, stride_sk,
    stride_be, stride_bn,
    stride_cm, stride_cn,
    TOP_K: tl.constexpr,
    A_ROWS: tl.constexpr,
    ELEMENT: tl.constexpr,
    SCALE_CODEC: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    SCALE_BLOCK_N: tl.constexpr,
    SCALE_BLOCK_K: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    GATE: tl.constexpr,
    FP8_NATIVE: tl.constexpr,
    ASM: tl.constexpr,
    CUDA: tl.constexpr,
    A_CODES: tl.constexpr,
    OUT_PER_WORD: tl.constexpr,
    OUT_WORDS: tl.constexpr,
    EVEN_N: tl.constexpr,
    UNROLL: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # ---- tile coordinates: the N tiles of one row block are neighbours (its A rows stay in L1/L2)
    pid = tl.program_id(0)
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    num_padded = tl.minimum(tl.load(num_padded_ptr), max_padded)
    if pid_m * BLOCK_M >= num_padded:
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if (expert < 0) | (expert >= num_experts):
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair, row_ok, a_row = tile_rows(sorted_ids_ptr, offs_m, num_padded, num_pairs, TOP_K, A_ROWS)
    offs_n, n_ok = tile_cols(pid_n, N, N_OUT, BLOCK_N, GATED, GATE)

    a_ptrs_t = a_ptr + a_row[None, :] * stride_am  # [1, BLOCK_M]: A^T columns
    w_rows = w_ptr + expert * stride_we + offs_n[:, None] * stride_wn  # [BLOCK_N, 1]
    s_rows = scale_ptr + expert * stride_se + (offs_n // SCALE_BLOCK_N) * stride_sn  # [BLOCK_N]
    acc = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)
    HAS_ZP: tl.constexpr = zp_ptr is not None

    CPW: tl.constexpr = 4 if ELEMENT == _EL_FP8 else 8  # codes per int32 word
    SUB: tl.constexpr = BLOCK_K // CPW  # int32 words per row and K tile
    if HAS_ZP:
        z_rows = zp_ptr + expert * stride_se + (offs_n // SCALE_BLOCK_N) * stride_sn  # same strides as the scales
    if ELEMENT == _EL_INT4:
        if SCALE_MODE == _SM_PER_GROUP:
            # bf16 group scales of 32 / 64 columns (4 / 2 a tile) multiply the decoded codes; a row's
            # tile scales are two int32 (g32) or one (g64, read twice); word w takes scale w // WPS
            if ASM:
                sel4 = tl.load(tab_ptr + tl.arange(0, SUB))[None, :]
    elif ELEMENT == _EL_FP4:
        # fp4 block scales (MX: e8m0 per 32 columns, nvfp4: e4m3 per 16) multiply the decoded bf16
        # codes (exact), so each K tile is one plain dot. The tile's scale bytes of a row are one
        # int32 (``_launch_decode`` views the scales so); word w takes byte w // WPS.
        WPS: tl.constexpr = SCALE_BLOCK_K // 8
        tl.static_assert(SUB // WPS == 4)
        if ASM:
            # loaded once, as [SUB] tensors like the selectors (scalars broadcast into the asm
            # also cost the dot's register layout: 32 STS + 16 LDSM per tile), and from one copy
            # per word column: from a single address ptxas kept them in uniform registers and
            # still copied one into a register before each lookup
            offs_t = tl.arange(0, SUB)
            sel = tl.load(tab_ptr + offs_t)[None, :]
            lut0 = tl.load(tab_ptr + SUB + offs_t)[None, :]
            lut1 = tl.load(tab_ptr + 2 * SUB + offs_t)[None, :]
            lut2 = tl.load(tab_ptr + 3 * SUB + offs_t)[None, :]
            lut3 = tl.load(tab_ptr + 4 * SUB + offs_t)[None, :]
    # UNROLL K tiles per iteration, each loaded in its own ``tl.load`` but issued together, so every
    # weight row streams UNROLL x BLOCK_K codes' bytes at once (``moe_gemm._decode_unroll``).
    # Measured on the H200 (bench/results/h200_decode_rows.md, int4 per column, M = 16, one GEMM):
    # 64 B a row per tile streamed at 50-57% of the floor on mixtral / gpt-oss / deepseek, 128 B at
    # 64-76% (fp8's 128 B rows already ran at ~80%): a row's 64-byte halves, requested a pipeline
    # stage apart, cost DRAM efficiency. K tiles past the last whole iteration (K is a multiple of
    # BLOCK_K, not always of the iteration) run one by one in a second loop: masking them in the
    # first (per-word compares) cost the loads their 16-byte vectors (gpt-oss w13: 0.1182 ms masked,
    # 0.1054 with the tail loop, 0.110-0.117 with one tile an iteration).
    if EVEN_K:
        K_MAIN = K
    else:
        K_MAIN = K - K % (BLOCK_K * UNROLL)
    if not HAS_ZP:
        z_rows = s_rows  # (unused)
    if not (ELEMENT == _EL_INT4 and SCALE_MODE == _SM_PER_GROUP and ASM):
        sel4 = 0  # (unused)
    if not (ELEMENT == _EL_FP4 and ASM):
        sel, lut0, lut1, lut2, lut3 = 0, 0, 0, 0, 0  # (unused)
    for k_it in range(0, K_MAIN, BLOCK_K * UNROLL):
        for u in tl.static_range(UNROLL):
            acc = _k_tile(
                acc, k_it + u * BLOCK_K, w_rows, stride_wk, n_ok, s_rows, z_rows, stride_sk, a_ptrs_t, row_ok, stride_ak,
                sel4, sel, lut0, lut1, lut2, lut3, ELEMENT, SCALE_CODEC, SCALE_MODE, SCALE_BLOCK_K, BLOCK_N, BLOCK_K,
                COMPUTE, FP8_NATIVE, ASM, CUDA, A_CODES, EVEN_N, HAS_ZP)
    if not EVEN_K:
        for k0 in tl.range(K_MAIN, K, BLOCK_K, num_stages=1):
            acc = _k_tile(
                acc, k0, w_rows, stride_wk, n_ok, s_rows, z_rows, stride_sk, a_ptrs_t, row_ok, stride_ak,
                sel4, sel, lut0, lut1, lut2, lut3, ELEMENT, SCALE_CODEC, SCALE_MODE, SCALE_BLOCK_K, BLOCK_N, BLOCK_K,
                COMPUTE, FP8_NATIVE, ASM, CUDA, A_CODES, EVEN_N, HAS_ZP)

    if SCALE_MODE == _SM_PER_COLUMN:
        col_scale = _decode_scale(tl.load(s_rows, mask=n_ok, other=0), SCALE_CODEC, FP8_NATIVE)
        acc = acc * col_scale[:, None]
    if A_CODES != _A_FLOAT:
        # per-row activation codes (``act_quant.quantize_rows``): the dot ran on the codes, the
        # row's fp32 scale applies to its column of C^T here
        acc = acc * tl.load(a_scale_ptr + a_row, mask=row_ok, other=0.0)[None, :]
    epilogue_store(
        tl.trans(acc), c_ptr, pair, row_ok, offs_n, n_ok, expert, pid_n, N_OUT,
        gs_ptr, bias_ptr, topk_w_ptr, stride_be, stride_bn, stride_cm, stride_cn,
        BLOCK_M, BLOCK_N, ACT, GATED, OUT_PER_WORD, OUT_WORDS,
    )
