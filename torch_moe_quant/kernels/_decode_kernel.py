"""The weight-streaming grouped GEMM for small token blocks ("swap-AB").

Imported lazily by ``moe_gemm`` (see ``_gemm_kernel`` for why).

Same contract as ``_gemm_kernel.moe_gemm_kernel`` for weight-only GEMMs
(no activation quantization), but each program computes the transposed
tile ``C^T[BLOCK_N, BLOCK_M] = W[BLOCK_N, K] @ A^T[K, BLOCK_M]``: the decoded
weight tile is the *left* operand of ``tl.dot``, which Hopper's wgmma reads
from registers (no shared-memory round trip of the decoded values), and the
few token rows of a decode block are the narrow N side of the instruction.

Packed codes are never reshaped in a way that moves data. Both formats are
read as int32 words of eight 4-bit codes (int4 nibbles, or two e2m1 codes
per byte in the checkpoint's byte order), ``SUB = BLOCK_K / 8`` words per
row and K tile. Code ``j`` of every word forms a ``[BLOCK_N, SUB]``
sub-tile, decoded in place; the eight sub-tiles are joined side by side
along K (``_cat8``), which on the wgmma register-operand layout only renames
registers (each sub-tile already is one K slice of that layout: SASS shows
no shuffles and no shared-memory staging). Column ``j * SUB + w`` of the
joined tile is natural column ``8w + j``, so the activations come in that
order (``moe_gemm.KOrder(8, SUB)``; GEMM1's epilogue writes GEMM2's order),
one contiguous ``[BLOCK_K, BLOCK_M]`` block per tile, and each K tile is a
single dot. On CUDA the decode is PTX on packed registers
(``_int4_split_asm``: ``lop3`` + packed ``sub.bf16x2``; ``_fp4_words_asm``:
``prmt`` tables); under the interpreter plain shifts and masks (``ASM=False``).

Scales: int4 per column (epilogue) or per K tile (groups that are multiples
of ``BLOCK_K``: the tile's fp32 product is scaled). fp4 block scales (MX
e8m0 per 32 columns, nvfp4 e4m3 per 16: G = 2 or 4 per 64-column tile) are
applied to fp32 partial products too: the dot runs against G copies of the
activation block, copy g zero outside group g's columns, and the G column
blocks of its result are scaled and summed; nvfp4's global scale divides in
the epilogue. All exact, as the reference. (Multiplying the decoded bf16
tile by per-word scales instead made Triton 3.6 stage it through shuffles or
shared memory.)

Instruction counts per K tile and warp (sm_90 SASS, 128 rows, 4 warps):
int4 313 for 8 KiB of codes (was 469 with eight dots of K = 16 per tile and
a wgmma wait after each); fp4 ~370 for 4 KiB (the e2m1 table decode costs
about 2.5 instructions per value against int4's 1.5).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._gemm_kernel import (
    _EL_INT4, _SM_PER_COLUMN, _SM_PER_GROUP, _SM_PER_K_TILE, _decode_scale,
    epilogue_store, tile_cols, tile_rows,
)


#: the PTX of ``_int4_split_asm`` (inputs $8, $9: two words; outputs $0..$7: code j of both as bf16x2);
#: tests/test_decode_ptx.py runs it through a small PTX interpreter on the CPU
_INT4_SPLIT_PTX = tl.constexpr("""
        {
        .reg .b32 lo, hi, t, bias;
        mov.b32 bias, 0x43084308;
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
        sub.bf16x2 $0, $0, bias;
        sub.bf16x2 $1, $1, bias;
        sub.bf16x2 $2, $2, bias;
        sub.bf16x2 $3, $3, bias;
        sub.bf16x2 $4, $4, bias;
        sub.bf16x2 $5, $5, bias;
        sub.bf16x2 $6, $6, bias;
        sub.bf16x2 $7, $7, bias;
        }
        """)


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


#: e2m1 codes -> bf16x2, for the eight codes of a 32-bit ``x`` whose bytes
#: pair two words (``x`` = A.b0 B.b0 A.b1 B.b1: low nibbles A0 A1 B0 B1, high
#: nibbles A2 A3 B2 B3): the 3-bit magnitudes index two 8-byte ``prmt`` tables,
#: the high and low bytes of the bf16 of 0, 0.5, 1, 1.5, 2, 3, 4, 6; the four
#: sign bits of a 16-bit half are moved to their bytes' top bits with one
#: ``prmt`` (bytes of ``x << 4`` and ``x``, whose top bits are exactly those
#: signs) and one ``lop3``; a ``prmt`` per output pairs A's and B's code j.
#: 15 instructions for 8 values (a sign ``prmt`` + ``lop3`` per output pair
#: before: 19).
_E2M1_X8 = """
        and.b32 m, {x}, 0x77777777;
        shr.u32 mh, m, 16;
        shl.b32 s4, {x}, 4;
        prmt.b32 hb, 0x3f3f3f00, 0x40404040, m;
        prmt.b32 lb, 0xc0800000, 0xc0804000, m;
        prmt.b32 sg, s4, {x}, 0x5140;
        lop3.b32 hb, sg, 0x80808080, hb, 0xea;
        prmt.b32 hb2, 0x3f3f3f00, 0x40404040, mh;
        prmt.b32 lb2, 0xc0800000, 0xc0804000, mh;
        prmt.b32 sg, s4, {x}, 0x7362;
        lop3.b32 hb2, sg, 0x80808080, hb2, 0xea;
        prmt.b32 {o0}, lb, hb, 0x6240;
        prmt.b32 {o1}, lb, hb, 0x7351;
        prmt.b32 {o2}, lb2, hb2, 0x6240;
        prmt.b32 {o3}, lb2, hb2, 0x7351;
"""

#: the PTX of ``_fp4_words_asm`` (same register contract as ``_INT4_SPLIT_PTX``)
_FP4_WORDS_PTX = tl.constexpr(
    """
    {
    .reg .b32 x, y, m, mh, hb, lb, hb2, lb2, s4, sg;
    prmt.b32 x, $8, $9, 0x5140;
    prmt.b32 y, $8, $9, 0x7362;
    """
    + _E2M1_X8.format(x="x", o0="$0", o1="$1", o2="$2", o3="$3")
    + _E2M1_X8.format(x="y", o0="$4", o1="$5", o2="$6", o3="$7")
    + "}"
)

@triton.jit
def _fp4_words_asm(words):
    """int32 words of eight e2m1 codes (code ``j`` in nibble ``j``, the
    checkpoint's byte order) -> 8 bf16 tensors of the same shape, exact:
    output ``j`` holds code ``j`` of each word. Two words A, B per call: one
    ``prmt`` pairs their bytes 0, 1 (``x`` = A.b0 B.b0 A.b1 B.b1, whose low
    nibbles are codes A0 A1 B0 B1) and one their bytes 2, 3; each then
    decodes as ``_E2M1_X8`` says (16 instructions per 8 values in all)."""
    return tl.inline_asm_elementwise(
        asm=_FP4_WORDS_PTX,
        constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r",
        args=[words],
        dtype=(tl.bfloat16,) * 8,
        is_pure=True,
        pack=2,
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
def _code(words, j: tl.constexpr, ELEMENT: tl.constexpr, COMPUTE: tl.constexpr):
    """Plain-Triton decode of code ``j`` of each word (the interpreter's path)."""
    c = (words >> (4 * j)) & 15
    if ELEMENT == _EL_INT4:
        return (c - 8).to(COMPUTE)
    return _e2m1_to_f32(c).to(COMPUTE)


@triton.jit
def _codes8(words, ELEMENT: tl.constexpr, COMPUTE: tl.constexpr):
    return (
        _code(words, 0, ELEMENT, COMPUTE), _code(words, 1, ELEMENT, COMPUTE), _code(words, 2, ELEMENT, COMPUTE),
        _code(words, 3, ELEMENT, COMPUTE), _code(words, 4, ELEMENT, COMPUTE), _code(words, 5, ELEMENT, COMPUTE),
        _code(words, 6, ELEMENT, COMPUTE), _code(words, 7, ELEMENT, COMPUTE),
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
def _scale_byte(sword, g: tl.constexpr, SCALE_CODEC: tl.constexpr, FP8_NATIVE: tl.constexpr):
    """Scale byte ``g`` of each row's packed scale word, decoded to fp32: ``[BLOCK_N, 1]``."""
    return _decode_scale(((sword >> (8 * g)) & 0xFF).to(tl.uint8), SCALE_CODEC, FP8_NATIVE)[:, None]


@triton.jit
def _scaled_group_sum(part, sword, G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                      SCALE_CODEC: tl.constexpr, FP8_NATIVE: tl.constexpr):
    """``sum_g part[:, g * BLOCK_M + m] * scale_g[n]`` for G = 2 or 4 groups
    (splits, not ``tl.sum``: that is a ``triton.language.standard`` function
    the interpreter cannot call from here)."""
    p = tl.permute(tl.reshape(part, (BLOCK_N, G, BLOCK_M)), (0, 2, 1))  # [BLOCK_N, BLOCK_M, G]
    if G == 2:
        p0, p1 = tl.split(p)
        out = p0 * _scale_byte(sword, 0, SCALE_CODEC, FP8_NATIVE) + p1 * _scale_byte(sword, 1, SCALE_CODEC, FP8_NATIVE)
    else:
        tl.static_assert(G == 4)
        p_even, p_odd = tl.split(tl.reshape(p, (BLOCK_N, BLOCK_M, 2, 2)))  # groups (0, 2) and (1, 3)
        p0, p2 = tl.split(p_even)
        p1, p3 = tl.split(p_odd)
        out = (p0 * _scale_byte(sword, 0, SCALE_CODEC, FP8_NATIVE) + p1 * _scale_byte(sword, 1, SCALE_CODEC, FP8_NATIVE)
               + p2 * _scale_byte(sword, 2, SCALE_CODEC, FP8_NATIVE) + p3 * _scale_byte(sword, 3, SCALE_CODEC, FP8_NATIVE))
    return out


@triton.jit
def _gather_a_t(a_ptrs_t, offs_k, row_ok, stride_ak):
    """``A^T[offs_k, rows]``: the activation rows of the block at columns
    ``offs_k`` (any stride; inside K, a multiple of the tile), zero for masked rows."""
    return tl.load(a_ptrs_t + offs_k[:, None] * stride_ak, mask=row_ok[None, :], other=0.0)


@triton.jit
def moe_decode_kernel(
    a_ptr, w_ptr, c_ptr,
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    scale_ptr, gs_ptr, bias_ptr, topk_w_ptr,
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
    OUT_PER_WORD: tl.constexpr,
    OUT_WORDS: tl.constexpr,
    EVEN_N: tl.constexpr,
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

    SUB: tl.constexpr = BLOCK_K // 8  # int32 words of 8 codes per row and K tile
    G: tl.constexpr = BLOCK_K // SCALE_BLOCK_K if SCALE_MODE == _SM_PER_GROUP else 1  # block scales per row and K tile
    if G > 1:
        # Block scales smaller than the K tile (mxfp4: 2 per 64 columns, nvfp4: 4): the dot runs
        # against G copies of the activation block side by side, copy g zero outside group g's
        # columns, so its [BLOCK_N, G * BLOCK_M] result holds each group's partial product apart;
        # they are scaled in fp32 and summed. Scaling the decoded bf16 values instead (a scale per
        # word, a [BLOCK_N, SUB] tensor) made Triton 3.6 move the tile through shuffles or shared
        # memory (SASS); this keeps the decoded tile the dot's register operand untouched.
        offs_g = tl.arange(0, G * BLOCK_M)
        _, row_ok_g, a_row_g = tile_rows(sorted_ids_ptr, pid_m * BLOCK_M + offs_g % BLOCK_M, num_padded, num_pairs, TOP_K, A_ROWS)
        a_ptrs_g = a_ptr + a_row_g[None, :] * stride_am
        WPS: tl.constexpr = SCALE_BLOCK_K // 8  # words per block scale
        in_group = (((tl.arange(0, BLOCK_K) % SUB) // WPS)[:, None] == (offs_g // BLOCK_M)[None, :]) & row_ok_g[None, :]
    for k0 in range(0, K, BLOCK_K):
        offs_w = k0 // 8 + tl.arange(0, SUB)
        if EVEN_N:
            words = tl.load(w_rows + offs_w[None, :] * stride_wk)
        else:
            words = tl.load(w_rows + offs_w[None, :] * stride_wk, mask=n_ok[:, None], other=0)
        # sub-tile j = code j of every word (natural column k0 + 8w + j)
        if ASM:
            if ELEMENT == _EL_INT4:
                v0, v1, v2, v3, v4, v5, v6, v7 = _int4_split_asm(words)
            else:
                v0, v1, v2, v3, v4, v5, v6, v7 = _fp4_words_asm(words)
        else:
            v0, v1, v2, v3, v4, v5, v6, v7 = _codes8(words, ELEMENT, COMPUTE)
        # the eight sub-tiles side by side along K (column j * SUB + w = code j of word w: the
        # KOrder(8, SUB) position of natural column 8w + j): one dot per K tile
        wt = _cat8(v0, v1, v2, v3, v4, v5, v6, v7, BLOCK_N, BLOCK_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if G > 1:
            a_g = tl.load(a_ptrs_g + offs_k[:, None] * stride_ak, mask=in_group, other=0.0)
            part = tl.dot(wt, a_g.to(COMPUTE))  # [BLOCK_N, G * BLOCK_M]: group g's product in columns g * BLOCK_M ...
            # the tile's G scale bytes are one int16 / int32 per row (``scale_ptr`` is that view)
            if EVEN_N:
                sword = tl.load(s_rows + (k0 // BLOCK_K) * stride_sk).to(tl.int32)
            else:
                sword = tl.load(s_rows + (k0 // BLOCK_K) * stride_sk, mask=n_ok, other=0).to(tl.int32)
            acc += _scaled_group_sum(part, sword, G, BLOCK_N, BLOCK_M, SCALE_CODEC, FP8_NATIVE)
        else:
            a_t = _gather_a_t(a_ptrs_t, offs_k, row_ok, stride_ak).to(COMPUTE)
            if SCALE_MODE == _SM_PER_K_TILE:
                s = _decode_scale(tl.load(s_rows + (k0 // SCALE_BLOCK_K) * stride_sk, mask=n_ok, other=0), SCALE_CODEC, FP8_NATIVE)
                acc += tl.dot(wt, a_t) * s[:, None]
            else:
                acc = tl.dot(wt, a_t, acc)

    if SCALE_MODE == _SM_PER_COLUMN:
        col_scale = _decode_scale(tl.load(s_rows, mask=n_ok, other=0), SCALE_CODEC, FP8_NATIVE)
        acc = acc * col_scale[:, None]
    epilogue_store(
        tl.trans(acc), c_ptr, pair, row_ok, offs_n, n_ok, expert, pid_n, N_OUT,
        gs_ptr, bias_ptr, topk_w_ptr, stride_be, stride_bn, stride_cm, stride_cn,
        BLOCK_M, BLOCK_N, ACT, GATED, OUT_PER_WORD, OUT_WORDS,
    )
