"""The weight-streaming grouped GEMM for small token blocks ("swap-AB").

Imported lazily by ``moe_gemm`` (see ``_gemm_kernel`` for why).

Same contract as ``_gemm_kernel.moe_gemm_kernel`` for weight-only GEMMs
(no activation quantization), but each program computes the transposed
tile ``C^T[BLOCK_N, BLOCK_M] = W[BLOCK_N, K] @ A^T[K, BLOCK_M]``: the decoded
weight tile is the *left* operand of ``tl.dot``, which Hopper's wgmma reads
from registers (no shared-memory round trip of the decoded values), and the
few token rows of a decode block are the narrow N side of the instruction.

Packed codes are never reshaped. A K tile is split by *nibble position*
instead: nibble ``j`` of every int4 word (``k = 8w + j``) forms a
``[BLOCK_N, BLOCK_K / 8]`` sub-tile, decoded in place, and its dot reads the
activation columns of those ``k``. The activations come in the weight's
packing order (``moe_gemm.KOrder``: natural column ``8w + j`` of a 128-column
span at position ``16j + w``), so each sub-tile's columns are contiguous and
their loads pipeline like any dot operand: ``sum_k W[n, k] a[k] = sum_j sum_w
W[n, 8w + j] a[8w + j]`` is eight dots with no layout change. fp4 bytes split
into their low (even k) and high (odd k) nibbles the same way, per 32-column
chunk (``KOrder(2)``). On CUDA the decode is PTX working on packed registers
(``_int4_split_asm``, ``_fp4_split_asm``: a few ``lop3`` / ``prmt`` per two
values); under the interpreter the same values come from plain shifts and
masks (``ASM=False``).

Scales: int4 with a scale per column or per K tile (groups that are
multiples of ``BLOCK_K``) scales the fp32 partial product of the tile; MX
(e8m0, groups of 32 = one 16-byte chunk) scales the fp32 partial product of
each chunk; nvfp4 (e4m3, groups of 16) multiplies the decoded bf16 sub-tile
by its block scale (exact: e2m1 x e4m3 has at most 6 significant bits) and
divides by the global scale in the epilogue. All exact, as the reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._gemm_kernel import (
    _EL_FP4, _EL_INT4, _SC_E4M3, _SM_PER_COLUMN, _SM_PER_K_TILE, _decode_scale, _e4m3_to_f32,
    epilogue_store, tile_cols, tile_rows,
)


@triton.jit
def _int4_split_asm(words):
    """int32 words -> 8 bf16 tensors of the same shape: output ``j`` holds
    the signed code ``u - 8`` of nibble ``j`` of each word. Two words per
    call: their low / high halves are paired with one ``prmt``, then each
    nibble pair becomes a bf16x2 with one ``lop3`` (``0x4300 | u`` = 128 + u)
    and one packed subtraction of 136."""
    return tl.inline_asm_elementwise(
        asm="""
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
        """,
        constraints="=r,=r,=r,=r,=r,=r,=r,=r,r,r",
        args=[words],
        dtype=(tl.bfloat16,) * 8,
        is_pure=True,
        pack=2,
    )


@triton.jit
def _fp4_split_asm(packed):
    """uint8 bytes (two e2m1 codes, even k in the low nibble) -> (low, high)
    bf16 tensors of the same shape, exact. Four bytes per call: the 3-bit
    magnitudes index two 8-byte ``prmt`` tables (low and high bytes of the
    bf16 of 0, 0.5, 1, 1.5, 2, 3, 4, 6), a ``prmt`` pairs them into bf16x2 of
    two bytes' same nibble, and the sign bit is moved in with one ``prmt``
    and one ``lop3``."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 m, mh, hb, lb, hb2, lb2, s4, sg;
        and.b32 m, $4, 0x77777777;
        shr.u32 mh, m, 16;
        prmt.b32 hb, 0x3f3f3f00, 0x40404040, m;
        prmt.b32 lb, 0xc0800000, 0xc0804000, m;
        prmt.b32 hb2, 0x3f3f3f00, 0x40404040, mh;
        prmt.b32 lb2, 0xc0800000, 0xc0804000, mh;
        shl.b32 s4, $4, 4;
        prmt.b32 $0, lb, hb, 0x6240;
        prmt.b32 sg, s4, 0, 0x1404;
        lop3.b32 $0, sg, 0x80008000, $0, 0xea;
        prmt.b32 $1, lb2, hb2, 0x6240;
        prmt.b32 sg, s4, 0, 0x3424;
        lop3.b32 $1, sg, 0x80008000, $1, 0xea;
        prmt.b32 $2, lb, hb, 0x7351;
        prmt.b32 sg, $4, 0, 0x1404;
        lop3.b32 $2, sg, 0x80008000, $2, 0xea;
        prmt.b32 $3, lb2, hb2, 0x7351;
        prmt.b32 sg, $4, 0, 0x3424;
        lop3.b32 $3, sg, 0x80008000, $3, 0xea;
        }
        """,
        constraints="=r,=r,=r,=r,r",
        args=[packed],
        dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True,
        pack=4,
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
def _int4_sub_tile(words, j: tl.constexpr, COMPUTE: tl.constexpr):
    """Plain-Triton decode of nibble ``j`` (interpreter path of ``_int4_split_asm``)."""
    return (((words >> (4 * j)) & 15) - 8).to(COMPUTE)


@triton.jit
def _gather_a_t(a_ptrs_t, offs_k, K, row_ok, stride_ak):
    """``A^T[offs_k, rows]``: the activation rows of the block at columns
    ``offs_k`` (any stride), zero outside K and for masked rows."""
    mask = (offs_k < K)[:, None] & row_ok[None, :]
    return tl.load(a_ptrs_t + offs_k[:, None] * stride_ak, mask=mask, other=0.0)


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

    for k0 in range(0, K, BLOCK_K):
        if ELEMENT == _EL_INT4:
            # one [BLOCK_N, BLOCK_K / 8] load of words; sub-tile j = nibble j = natural columns k0 + 8w + j
            SUB: tl.constexpr = BLOCK_K // 8
            offs_w = k0 // 8 + tl.arange(0, SUB)
            words = tl.load(w_rows + offs_w[None, :] * stride_wk, mask=n_ok[:, None] & (offs_w < K // 8)[None, :], other=0)
            kk = k0 + tl.arange(0, SUB)  # sub-tile j reads permuted columns k0 + j * SUB + w
            if ASM:
                w0, w1, w2, w3, w4, w5, w6, w7 = _int4_split_asm(words)
            else:
                w0 = _int4_sub_tile(words, 0, COMPUTE)
                w1 = _int4_sub_tile(words, 1, COMPUTE)
                w2 = _int4_sub_tile(words, 2, COMPUTE)
                w3 = _int4_sub_tile(words, 3, COMPUTE)
                w4 = _int4_sub_tile(words, 4, COMPUTE)
                w5 = _int4_sub_tile(words, 5, COMPUTE)
                w6 = _int4_sub_tile(words, 6, COMPUTE)
                w7 = _int4_sub_tile(words, 7, COMPUTE)
            part = tl.dot(w0, _gather_a_t(a_ptrs_t, kk + 0 * SUB, K, row_ok, stride_ak).to(COMPUTE))
            part = tl.dot(w1, _gather_a_t(a_ptrs_t, kk + 1 * SUB, K, row_ok, stride_ak).to(COMPUTE), part)
            part = tl.dot(w2, _gather_a_t(a_ptrs_t, kk + 2 * SUB, K, row_ok, stride_ak).to(COMPUTE), part)
            part = tl.dot(w3, _gather_a_t(a_ptrs_t, kk + 3 * SUB, K, row_ok, stride_ak).to(COMPUTE), part)
            part = tl.dot(w4, _gather_a_t(a_ptrs_t, kk + 4 * SUB, K, row_ok, stride_ak).to(COMPUTE), part)
            part = tl.dot(w5, _gather_a_t(a_ptrs_t, kk + 5 * SUB, K, row_ok, stride_ak).to(COMPUTE), part)
            part = tl.dot(w6, _gather_a_t(a_ptrs_t, kk + 6 * SUB, K, row_ok, stride_ak).to(COMPUTE), part)
            part = tl.dot(w7, _gather_a_t(a_ptrs_t, kk + 7 * SUB, K, row_ok, stride_ak).to(COMPUTE), part)
            if SCALE_MODE == _SM_PER_K_TILE:
                s = _decode_scale(tl.load(s_rows + (k0 // SCALE_BLOCK_K) * stride_sk, mask=n_ok, other=0), SCALE_CODEC, FP8_NATIVE)
                acc += part * s[:, None]
            else:
                acc += part
        elif ELEMENT == _EL_FP4:
            # 16-byte chunks (32 values): low nibbles = even k, high = odd k; one MX group per chunk
            CHUNKS: tl.constexpr = BLOCK_K // 32
            for c in tl.static_range(CHUNKS):
                offs_b = k0 // 2 + c * 16 + tl.arange(0, 16)
                packed = tl.load(w_rows + offs_b[None, :] * stride_wk, mask=n_ok[:, None] & (offs_b < K // 2)[None, :], other=0)
                if ASM:
                    w_lo, w_hi = _fp4_split_asm(packed)
                else:
                    code = packed.to(tl.int32)
                    w_lo = _e2m1_to_f32(code & 15).to(COMPUTE)
                    w_hi = _e2m1_to_f32(code >> 4).to(COMPUTE)
                kk = k0 + c * 32 + tl.arange(0, 16)  # permuted: low nibbles first, then high
                if SCALE_CODEC == _SC_E4M3:
                    # nvfp4: groups of 16 = 8 bytes; fold the block scale into the decoded values (exact)
                    s = tl.load(s_rows[:, None] + (offs_b // 8)[None, :] * stride_sk, mask=n_ok[:, None], other=0)
                    s = _e4m3_to_f32(s, FP8_NATIVE).to(COMPUTE)
                    w_lo = w_lo * s
                    w_hi = w_hi * s
                    acc = tl.dot(w_lo, _gather_a_t(a_ptrs_t, kk, K, row_ok, stride_ak).to(COMPUTE), acc)
                    acc = tl.dot(w_hi, _gather_a_t(a_ptrs_t, kk + 16, K, row_ok, stride_ak).to(COMPUTE), acc)
                else:
                    part = tl.dot(w_lo, _gather_a_t(a_ptrs_t, kk, K, row_ok, stride_ak).to(COMPUTE))
                    part = tl.dot(w_hi, _gather_a_t(a_ptrs_t, kk + 16, K, row_ok, stride_ak).to(COMPUTE), part)
                    g = (k0 + c * 32) // 32
                    s = _decode_scale(tl.load(s_rows + g * stride_sk, mask=n_ok, other=0), SCALE_CODEC, FP8_NATIVE)
                    acc += part * s[:, None]

    if SCALE_MODE == _SM_PER_COLUMN:
        col_scale = _decode_scale(tl.load(s_rows, mask=n_ok, other=0), SCALE_CODEC, FP8_NATIVE)
        acc = acc * col_scale[:, None]
    epilogue_store(
        tl.trans(acc), c_ptr, pair, row_ok, offs_n, n_ok, expert, pid_n, N_OUT,
        gs_ptr, bias_ptr, topk_w_ptr, stride_be, stride_bn, stride_cm, stride_cn,
        BLOCK_M, BLOCK_N, ACT, GATED, OUT_PER_WORD, OUT_WORDS,
    )
