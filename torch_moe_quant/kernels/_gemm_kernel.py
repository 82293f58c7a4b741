"""The Triton grouped MoE GEMM kernel and its device helpers.

Imported lazily by ``moe_gemm`` at the first launch, never by the package:
``@triton.jit`` reads ``TRITON_INTERPRET`` when this module is imported, so
the interpreter (CPU tensors) is used iff the variable is set before the
first launch. ``moe_gemm.kernel_is_interpreted()`` reports which one it got.

The kernels call Triton builtins only, never the ``@jit`` helpers of
``triton.language.standard`` (``tl.cdiv``, ``tl.zeros``, ``tl.zeros_like``,
...): those were decorated when ``triton.language`` was first imported,
which in a process that imported Triton earlier (a test session that
compiled with Inductor first) was before ``TRITON_INTERPRET`` was set, and
the interpreter cannot call a compiled ``@jit`` function.

Contract of one program (see ``moe_gemm`` for the tensors): tile
``(pid_m, pid_n)`` takes ``BLOCK_M`` entries of ``sorted_ids`` (one expert,
``block_expert_ids[pid_m]``) and ``BLOCK_N`` output columns; it walks K in
``BLOCK_K`` steps, decoding the expert's weight tile in registers, and writes
``C[pair, n]`` for the valid pairs of the block. Out-of-range expert ids,
sentinel pairs and blocks past ``num_padded`` are skipped, so bad alignment
data can give a wrong result but never an out-of-bounds access.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._act_quant_kernel import qdq_tile, quantize_groups
from ._operand import ElementCodec, ScaleCodec, ScaleMode
from ._enums import ActElement, ActScale, ARows, DotKind, EpilogueAct

#: torch compute dtype -> the ``COMPUTE`` constexpr of ``tl.dot`` operands.
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
#: ``input_precision`` of fp32 dots: full fp32 products (not tf32), as the reference.
FP32_DOT_PRECISION = "ieee"

# Enum values as kernel globals (the kernel compares constexprs against names).
_TOKENS = tl.constexpr(ARows.TOKENS.value)
_ACT_NONE = tl.constexpr(EpilogueAct.NONE.value)
_ACT_SILU = tl.constexpr(EpilogueAct.SILU.value)
_ACT_GELU = tl.constexpr(EpilogueAct.GELU.value)
_ACT_GELU_TANH = tl.constexpr(EpilogueAct.GELU_TANH.value)
_ACT_SWIGLUOAI = tl.constexpr(EpilogueAct.SWIGLUOAI.value)
_ACT_SWIGLUSTEP = tl.constexpr(EpilogueAct.SWIGLUSTEP.value)
_ACT_RELU2 = tl.constexpr(EpilogueAct.RELU2.value)
_ACT_SILU_NO_MUL = tl.constexpr(EpilogueAct.SILU_NO_MUL.value)
_ACT_GELU_NO_MUL = tl.constexpr(EpilogueAct.GELU_NO_MUL.value)
#: ``GATE`` constexpr: rows of the gate/up halves (``activations.GateUpLayout``)
_GATE_UP = tl.constexpr(0)
_UP_GATE = tl.constexpr(1)
_INTERLEAVED = tl.constexpr(2)
_SWIGLU_LIMIT = tl.constexpr(7.0)
_EL_FLOAT = tl.constexpr(ElementCodec.FLOAT.value)
_EL_FP8 = tl.constexpr(ElementCodec.FP8_E4M3.value)
_EL_INT8 = tl.constexpr(ElementCodec.INT8.value)
_EL_INT4 = tl.constexpr(ElementCodec.INT4.value)
_EL_FP4 = tl.constexpr(ElementCodec.FP4_E2M1.value)
_EL_FP6_E2M3 = tl.constexpr(ElementCodec.FP6_E2M3.value)
_EL_FP6_E3M2 = tl.constexpr(ElementCodec.FP6_E3M2.value)
_SC_E8M0 = tl.constexpr(ScaleCodec.E8M0.value)
_SC_E4M3 = tl.constexpr(ScaleCodec.E4M3.value)
_SM_PER_COLUMN = tl.constexpr(ScaleMode.PER_COLUMN.value)
_SM_PER_K_TILE = tl.constexpr(ScaleMode.PER_K_TILE.value)
_SM_PER_GROUP = tl.constexpr(ScaleMode.PER_GROUP.value)
_SM_PER_ELEMENT = tl.constexpr(ScaleMode.PER_ELEMENT.value)
_A_NONE = tl.constexpr(ActScale.NONE.value)
_A_STATIC = tl.constexpr(ActScale.STATIC_TENSOR.value)
_A_ROW = tl.constexpr(ActScale.DYNAMIC_ROW.value)
_A_GROUP = tl.constexpr(ActScale.DYNAMIC_GROUP.value)
_A_CODES_GROUP = tl.constexpr(ActScale.GROUP_CODES.value)
_A_NVFP4 = tl.constexpr(ActScale.NVFP4.value)
_A_EL_FP8 = tl.constexpr(ActElement.FP8_E4M3.value)
_DOT_COMPUTE = tl.constexpr(DotKind.COMPUTE.value)
_DOT_FP8 = tl.constexpr(DotKind.FP8.value)
_DOT_INT8 = tl.constexpr(DotKind.INT8.value)
#: int4 codes are stored as the unsigned nibble ``code + 8``.
_INT4_OFFSET = tl.constexpr(8)
#: fp32 bit patterns: 2**-127 (e8m0 byte 0, a subnormal) and a quiet NaN (byte 255).
_F32_2_POW_M127 = tl.constexpr(0x400000)
_F32_QNAN = tl.constexpr(0x7FC00000)


@triton.jit
def _minifloat_to_f32(code, EBITS: tl.constexpr, MBITS: tl.constexpr):
    """int32 codes of a sign-magnitude float with no inf/NaN codes (e2m1,
    e2m3, e3m2) -> fp32, exactly: normal numbers are built from their bits,
    subnormals as ``(1.m * 2**(1 - bias)) - 2**(1 - bias)`` (no fp32 denormal
    is ever formed, so flush-to-zero cannot change the result)."""
    BIAS: tl.constexpr = (1 << (EBITS - 1)) - 1
    sign = (code >> (EBITS + MBITS)) & 1
    exp = (code >> MBITS) & ((1 << EBITS) - 1)
    frac = (code & ((1 << MBITS) - 1)) << (23 - MBITS)
    normal = (((exp + (127 - BIAS)) << 23) | frac).to(tl.float32, bitcast=True)
    base = tl.full(code.shape, (128 - BIAS) << 23, tl.int32)
    sub = (base | frac).to(tl.float32, bitcast=True) - base.to(tl.float32, bitcast=True)
    mag = tl.where(exp == 0, sub, normal)
    return tl.where(sign != 0, -mag, mag)


@triton.jit
def _e4m3_to_f32(bits, FP8_NATIVE: tl.constexpr):
    """uint8 e4m3fn bit patterns -> fp32 (``0x7F``/``0xFF`` are NaN). With
    ``FP8_NATIVE`` (sm89+ and the interpreter) through the hardware fp8 cast,
    else from the bits (sm80 has no fp8 conversion); both exact. The
    interpreter's fp8 cast decodes the NaN codes as +-480, so they are set here."""
    if FP8_NATIVE:
        v = bits.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        v = _minifloat_to_f32(bits.to(tl.int32), 4, 3)
    return tl.where((bits & 0x7F) == 0x7F, float("nan"), v)


@triton.jit
def _unpack(words, BITS: tl.constexpr, PER_WORD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """``[BLOCK_K // PER_WORD, BLOCK_N]`` int32 words -> ``[BLOCK_K, BLOCK_N]``
    codes: code ``j`` of word ``i`` (bits ``j * BITS``) is row ``i * PER_WORD + j``."""
    shifts = tl.arange(0, PER_WORD) * BITS
    codes = (words[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (BLOCK_K, BLOCK_N))


@triton.jit
def _load_weight(
    w_ptr, k0, K, offs_n, n_ok, stride_wn, stride_wk,
    ELEMENT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, FP8_NATIVE: tl.constexpr,
):
    """The ``[BLOCK_K, BLOCK_N]`` tile ``W[offs_n, k0:k0 + BLOCK_K]^T`` before
    scaling: raw values for ``FLOAT``, fp32 codes otherwise. Packed formats
    load each word or byte once and unpack it in registers.

    Measured alternative (H100, triton 3.6): loading, for every element, the
    word that holds it and shifting its code out (vLLM's int4 style, no
    reshape) was 1.4-7x slower: int4 g128 mixtral M=1 0.36 -> 2.58 ms, M=4096
    18.7 -> 131 ms; mxfp4 M=1 0.64 -> 0.90 ms."""
    col = offs_n[None, :] * stride_wn
    if ELEMENT == _EL_INT4:
        offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        mask = (offs_w < K // 8)[:, None] & n_ok[None, :]
        words = tl.load(w_ptr + col + offs_w[:, None] * stride_wk, mask=mask, other=0)
        w = (_unpack(words, 4, 8, BLOCK_K, BLOCK_N) - _INT4_OFFSET).to(tl.float32)
    elif ELEMENT == _EL_FP4:
        offs_w = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        mask = (offs_w < K // 2)[:, None] & n_ok[None, :]
        byte = tl.load(w_ptr + col + offs_w[:, None] * stride_wk, mask=mask, other=0).to(tl.int32)
        w = _minifloat_to_f32(_unpack(byte, 4, 2, BLOCK_K, BLOCK_N), 2, 1)
    elif (ELEMENT == _EL_FP6_E2M3) or (ELEMENT == _EL_FP6_E3M2):
        offs_w = k0 // 4 + tl.arange(0, BLOCK_K // 4)  # 3-byte words of 4 codes
        mask = (offs_w < K // 4)[:, None] & n_ok[None, :]
        first = w_ptr + col + offs_w[:, None] * 3 * stride_wk
        b0 = tl.load(first, mask=mask, other=0).to(tl.int32)
        b1 = tl.load(first + stride_wk, mask=mask, other=0).to(tl.int32)
        b2 = tl.load(first + 2 * stride_wk, mask=mask, other=0).to(tl.int32)
        code = _unpack(b0 | (b1 << 8) | (b2 << 16), 6, 4, BLOCK_K, BLOCK_N)
        if ELEMENT == _EL_FP6_E2M3:
            w = _minifloat_to_f32(code, 2, 3)
        else:
            w = _minifloat_to_f32(code, 3, 2)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_k < K)[:, None] & n_ok[None, :]
        raw = tl.load(w_ptr + col + offs_k[:, None] * stride_wk, mask=mask, other=0)
        if ELEMENT == _EL_FP8:
            w = _e4m3_to_f32(raw, FP8_NATIVE)
        elif ELEMENT == _EL_INT8:
            w = raw.to(tl.float32)
        else:  # _EL_FLOAT
            w = raw
    return w


@triton.jit
def _weight_codes(
    w_ptr, k0, K, offs_n, n_ok, stride_wn, stride_wk,
    ELEMENT: tl.constexpr, DOT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The ``[BLOCK_K, BLOCK_N]`` weight codes as operands of a native dot:
    e4m3 bytes reinterpreted as fp8, int8 as is, int4 codes (exact in both)
    cast to int8 or e4m3."""
    if ELEMENT == _EL_INT4:
        w = _load_weight(w_ptr, k0, K, offs_n, n_ok, stride_wn, stride_wk, ELEMENT, BLOCK_K, BLOCK_N, True)
        if DOT == _DOT_INT8:
            out = w.to(tl.int8)
        else:
            out = w.to(tl.float8e4nv)
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_k < K)[:, None] & n_ok[None, :]
        raw = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk, mask=mask, other=0)
        if ELEMENT == _EL_FP8:
            out = raw.to(tl.float8e4nv, bitcast=True)
        else:  # int8
            out = raw
    return out


@triton.jit
def _a_operand(
    a, a_static, a_row_scale,
    A_ELEM: tl.constexpr, A_SCALE: tl.constexpr, A_GROUP: tl.constexpr, DOT: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, FP8_NATIVE: tl.constexpr,
):
    """The A tile as a dot operand and its per-row scale for this K tile
    (``DOT`` native with ``DYNAMIC_GROUP`` / ``GROUP_CODES``; 1 otherwise).
    ``a`` holds codes for ``DYNAMIC_ROW`` and ``GROUP_CODES`` (``a_row_scale``:
    the row's scale, of this K tile for ``GROUP_CODES``; dequantized with it
    on the compute path) and float values otherwise (quantized here: the
    prologue)."""
    tile_scale = 1.0
    if A_SCALE == _A_NONE:
        op = a.to(COMPUTE)
    elif (A_SCALE == _A_ROW) | (A_SCALE == _A_CODES_GROUP):
        if (A_SCALE == _A_CODES_GROUP) & (DOT != _DOT_COMPUTE):
            tile_scale = a_row_scale
        if DOT == _DOT_FP8:
            op = a.to(tl.float8e4nv, bitcast=True)
        elif DOT == _DOT_INT8:
            op = a
        else:
            if A_ELEM == _A_EL_FP8:
                av = _e4m3_to_f32(a, FP8_NATIVE)
            else:
                av = a.to(tl.float32)
            op = (av * a_row_scale[:, None]).to(COMPUTE)
    elif DOT == _DOT_COMPUTE:
        op = qdq_tile(a.to(tl.float32), a_static, A_ELEM, A_SCALE, A_GROUP, BLOCK_M, BLOCK_K).to(COMPUTE)
    else:
        q, step, _ = quantize_groups(a.to(tl.float32), a_static, A_ELEM, A_SCALE, A_GROUP, BLOCK_M, BLOCK_K)
        q = tl.reshape(q, (BLOCK_M, BLOCK_K))
        if DOT == _DOT_FP8:
            op = q.to(tl.float8e4nv)  # exact: q is on the e4m3 grid
        else:
            op = q.to(tl.int8)
        if A_SCALE == _A_GROUP:
            tile_scale = tl.reshape(step, (BLOCK_M,))  # A_GROUP == BLOCK_K
    return op, tile_scale


@triton.jit
def _decode_scale(raw, SCALE_CODEC: tl.constexpr, FP8_NATIVE: tl.constexpr):
    """Stored scales -> fp32: e8m0 bytes as exact powers of two (255 = NaN),
    e4m3 bytes through ``_e4m3_to_f32``, float scales widened."""
    if SCALE_CODEC == _SC_E8M0:
        b = raw.to(tl.int32)
        bits = tl.where(b == 0, _F32_2_POW_M127, b << 23)
        s = tl.where(b == 255, _F32_QNAN, bits).to(tl.float32, bitcast=True)
    elif SCALE_CODEC == _SC_E4M3:
        s = _e4m3_to_f32(raw, FP8_NATIVE)
    else:
        s = raw.to(tl.float32)
    return s


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_tanh(x):
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (2.0 * _sigmoid(2.0 * inner))  # 1 + tanh(t) = 2 sigmoid(2t)


@triton.jit
def _min_nan(x, limit):
    """``torch.clamp(x, max=limit)``: NaN stays NaN."""
    return tl.where(x > limit, limit, x)


@triton.jit
def _clamp_nan(x, limit):
    """``torch.clamp(x, -limit, limit)``: NaN stays NaN."""
    return tl.where(x < -limit, -limit, _min_nan(x, limit))


@triton.jit
def _gated(gate, up, ACT: tl.constexpr):
    """``activations.apply_activation`` of a gated ``ACT`` on fp32 halves."""
    if ACT == _ACT_SILU:
        out = gate * _sigmoid(gate) * up
    elif ACT == _ACT_GELU:
        out = _gelu(gate) * up
    elif ACT == _ACT_GELU_TANH:
        out = _gelu_tanh(gate) * up
    elif ACT == _ACT_SWIGLUOAI:
        g = _min_nan(gate, _SWIGLU_LIMIT)
        out = (_clamp_nan(up, _SWIGLU_LIMIT) + 1.0) * (g * _sigmoid(g * 1.702))  # alpha = activations.SWIGLUOAI_ALPHA
    else:  # _ACT_SWIGLUSTEP
        out = _min_nan(gate * _sigmoid(gate), _SWIGLU_LIMIT) * _clamp_nan(up, _SWIGLU_LIMIT)
    return out


@triton.jit
def _ungated(x, ACT: tl.constexpr):
    """A non-gated ``ACT`` on fp32 values."""
    if ACT == _ACT_RELU2:
        r = tl.where(x < 0.0, 0.0, x)  # relu; NaN stays NaN
        out = r * r
    elif ACT == _ACT_SILU_NO_MUL:
        out = x * _sigmoid(x)
    else:  # _ACT_GELU_NO_MUL
        out = _gelu(x)
    return out


@triton.jit
def tile_rows(sorted_ids_ptr, offs_m, num_padded, num_pairs, TOP_K: tl.constexpr, A_ROWS: tl.constexpr):
    """``(pair, row_ok, a_row)`` of the block rows ``offs_m``: the pair of
    each row (0 where masked: sentinel, padding or past ``num_padded``),
    whether it is a real pair, and the row of ``a`` it reads."""
    pair = tl.load(sorted_ids_ptr + offs_m, mask=offs_m < num_padded, other=num_pairs)
    row_ok = (pair >= 0) & (pair < num_pairs)
    pair = tl.where(row_ok, pair, 0).to(tl.int64)
    if A_ROWS == _TOKENS:
        a_row = pair // TOP_K
    else:
        a_row = pair
    return pair, row_ok, a_row


@triton.jit
def tile_cols(pid_n, N, N_OUT, BLOCK_N: tl.constexpr, GATED: tl.constexpr, GATE: tl.constexpr):
    """``(offs_n, n_ok)``: the weight rows of output tile ``pid_n``. Gated:
    column j of the tile is output column o(j) = first + j // 2, its gate
    row for even j and its up row for odd j (``GATE`` says where they live)."""
    if GATED:
        HALF_N: tl.constexpr = BLOCK_N // 2
        j = tl.arange(0, BLOCK_N)
        out_j = pid_n * HALF_N + j // 2
        is_up = j % 2
        if GATE == _INTERLEAVED:
            offs_n = 2 * out_j + is_up
        elif GATE == _GATE_UP:
            offs_n = out_j + is_up * N_OUT
        else:
            offs_n = out_j + (1 - is_up) * N_OUT
        n_ok = out_j < N_OUT
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
    return offs_n, n_ok


@triton.jit
def epilogue_store(
    acc, c_ptr, pair, row_ok, offs_n, n_ok, expert, pid_n, N_OUT,
    gs_ptr, bias_ptr, topk_w_ptr, stride_be, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr,
    OUT_PER_WORD: tl.constexpr, OUT_WORDS: tl.constexpr,
):
    """The shared epilogue of an fp32 ``[BLOCK_M, BLOCK_N]`` tile whose
    weight scales are applied: global scale, bias, activation, routing
    weight, store of the valid rows and columns. ``OUT_PER_WORD > 1``
    stores column ``o`` at its position in ``moe_gemm.KOrder(OUT_PER_WORD,
    OUT_WORDS)`` (the input order the next GEMM's decode kernel reads)."""
    if gs_ptr is not None:
        acc = acc / tl.load(gs_ptr + expert)
    if bias_ptr is not None:
        bias = tl.load(bias_ptr + expert * stride_be + offs_n * stride_bn, mask=n_ok, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    if GATED:
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
        acc = _gated(gate, up, ACT)
        out_n = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        out_ok = out_n < N_OUT
    else:
        if ACT != _ACT_NONE:
            acc = _ungated(acc, ACT)
        out_n = offs_n
        out_ok = n_ok
    if topk_w_ptr is not None:
        rw = tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)
        acc = acc * rw.to(tl.float32)[:, None]
    if OUT_PER_WORD > 1:
        SPAN: tl.constexpr = OUT_PER_WORD * OUT_WORDS
        col = (out_n // SPAN) * SPAN + (out_n % OUT_PER_WORD) * OUT_WORDS + (out_n % SPAN) // OUT_PER_WORD
    else:
        col = out_n
    c_ptrs = c_ptr + pair[:, None] * stride_cm + col[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & out_ok[None, :])


@triton.jit
def moe_gemm_kernel(
    a_ptr, w_ptr, c_ptr,
    sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    scale_ptr, zp_ptr, g_idx_ptr, gs_ptr, bias_ptr, topk_w_ptr, a_scale_ptr,
    N, N_OUT, K, num_pairs, max_padded, num_experts, num_k_groups,
    stride_am, stride_ak,
    stride_we, stride_wn, stride_wk,
    stride_se, stride_sn, stride_sk,
    stride_ge, stride_gk,
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
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ACT: tl.constexpr,
    GATED: tl.constexpr,
    GATE: tl.constexpr,
    FP8_NATIVE: tl.constexpr,
    A_ELEM: tl.constexpr,
    A_SCALE: tl.constexpr,
    A_GROUP: tl.constexpr,
    DOT: tl.constexpr,
    OUT_PER_WORD: tl.constexpr,
    OUT_WORDS: tl.constexpr,
):
    # ---- tile coordinates: grouped order, GROUP_M row tiles share weight columns
    pid = tl.program_id(0)
    num_pid_m = (max_padded + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m

    num_padded = tl.minimum(tl.load(num_padded_ptr), max_padded)
    if pid_m * BLOCK_M >= num_padded:
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if (expert < 0) | (expert >= num_experts):
        return

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair, row_ok, a_row = tile_rows(sorted_ids_ptr, offs_m, num_padded, num_pairs, TOP_K, A_ROWS)
    offs_n, n_ok = tile_cols(pid_n, N, N_OUT, BLOCK_N, GATED, GATE)

    a_ptrs = a_ptr + a_row[:, None] * stride_am
    w_base = w_ptr + expert * stride_we
    s_col = (offs_n // SCALE_BLOCK_N) * stride_sn  # scale offset of each column
    if SCALE_MODE == _SM_PER_COLUMN:
        col_scale = _decode_scale(
            tl.load(scale_ptr + expert * stride_se + s_col, mask=n_ok, other=0), SCALE_CODEC, FP8_NATIVE
        )
        if zp_ptr is not None:
            col_zp = tl.load(zp_ptr + expert * stride_se + s_col, mask=n_ok, other=0).to(tl.float32)

    # ---- activation scales: static (per tensor, nvfp4 global) or per row (codes)
    if (A_SCALE == _A_STATIC) | (A_SCALE == _A_NVFP4):
        a_static = tl.load(a_scale_ptr)
    else:
        a_static = 1.0
    if A_SCALE == _A_ROW:
        a_row_scale = tl.load(a_scale_ptr + a_row, mask=row_ok, other=1.0)
    else:
        a_row_scale = 1.0

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(a_ptrs + offs_k[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0)
        if A_SCALE == _A_CODES_GROUP:  # [rows, K / A_GROUP] scales, A_GROUP == BLOCK_K
            a_scales = tl.load(a_scale_ptr + a_row * (K // A_GROUP) + k0 // A_GROUP, mask=row_ok, other=1.0)
        else:
            a_scales = a_row_scale
        a_op, a_tile_scale = _a_operand(
            a, a_static, a_scales, A_ELEM, A_SCALE, A_GROUP, DOT, COMPUTE, BLOCK_M, BLOCK_K, FP8_NATIVE
        )
        if DOT != _DOT_COMPUTE:
            # native fp8 / int8 tensor-core dot on codes; scales in fp32 per K tile or in the epilogue
            w_op = _weight_codes(w_base, k0, K, offs_n, n_ok, stride_wn, stride_wk, ELEMENT, DOT, BLOCK_K, BLOCK_N)
            if DOT == _DOT_INT8:
                part = tl.dot(a_op, w_op, out_dtype=tl.int32).to(tl.float32)
            else:
                part = tl.dot(a_op, w_op, out_dtype=tl.float32)
            if SCALE_MODE == _SM_PER_K_TILE:
                s_off = expert * stride_se + s_col + (k0 // SCALE_BLOCK_K) * stride_sk
                tile_scale = _decode_scale(tl.load(scale_ptr + s_off, mask=n_ok, other=0), SCALE_CODEC, FP8_NATIVE)
                part = part * tile_scale[None, :]
            if (A_SCALE == _A_GROUP) | (A_SCALE == _A_CODES_GROUP):
                part = part * a_tile_scale[:, None]
            acc += part
        else:
            w = _load_weight(w_base, k0, K, offs_n, n_ok, stride_wn, stride_wk, ELEMENT, BLOCK_K, BLOCK_N, FP8_NATIVE)
            if SCALE_MODE == _SM_PER_COLUMN:
                if zp_ptr is not None:
                    w = w - col_zp[None, :]
            elif SCALE_MODE == _SM_PER_K_TILE:
                s_off = expert * stride_se + s_col + (k0 // SCALE_BLOCK_K) * stride_sk
                tile_scale = _decode_scale(tl.load(scale_ptr + s_off, mask=n_ok, other=0), SCALE_CODEC, FP8_NATIVE)
                if zp_ptr is not None:
                    w = w - tl.load(zp_ptr + s_off, mask=n_ok, other=0).to(tl.float32)[None, :]
            elif SCALE_MODE == _SM_PER_GROUP:
                # BLOCK_K holds GROUPS whole scale groups: one [GROUPS, BLOCK_N] scale load, broadcast
                GROUPS: tl.constexpr = BLOCK_K // SCALE_BLOCK_K
                offs_g = k0 // SCALE_BLOCK_K + tl.arange(0, GROUPS)
                g_mask = (offs_g < num_k_groups)[:, None] & n_ok[None, :]
                s_off = expert * stride_se + s_col[None, :] + offs_g[:, None] * stride_sk
                s = _decode_scale(tl.load(scale_ptr + s_off, mask=g_mask, other=0), SCALE_CODEC, FP8_NATIVE)
                w3 = tl.reshape(w, (GROUPS, SCALE_BLOCK_K, BLOCK_N))
                if zp_ptr is not None:
                    w3 = w3 - tl.load(zp_ptr + s_off, mask=g_mask, other=0).to(tl.float32)[:, None, :]
                w = tl.reshape(w3 * s[:, None, :], (BLOCK_K, BLOCK_N))
            elif SCALE_MODE == _SM_PER_ELEMENT:
                # the group of each column: g_idx (act-order) or k // SCALE_BLOCK_K; gathered per element
                if g_idx_ptr is not None:
                    grp = tl.load(g_idx_ptr + expert * stride_ge + offs_k * stride_gk, mask=k_ok, other=0)
                    bad_grp = k_ok & ((grp < 0) | (grp >= num_k_groups))
                    grp = tl.where(bad_grp, 0, grp)
                else:
                    grp = offs_k // SCALE_BLOCK_K
                    bad_grp = offs_k < 0  # all False
                w_mask = k_ok[:, None] & n_ok[None, :]
                s_off = expert * stride_se + s_col[None, :] + grp[:, None] * stride_sk
                s = _decode_scale(tl.load(scale_ptr + s_off, mask=w_mask, other=0), SCALE_CODEC, FP8_NATIVE)
                if zp_ptr is not None:
                    w = w - tl.load(zp_ptr + s_off, mask=w_mask, other=0).to(tl.float32)
                # a g_idx entry outside [0, groups) poisons its column with NaN (loud, never silent)
                w = tl.where(bad_grp[:, None], float("nan"), w * s)
            if SCALE_MODE == _SM_PER_K_TILE:
                part = tl.dot(a_op, w.to(COMPUTE), input_precision=INPUT_PRECISION, out_dtype=tl.float32)
                acc += part * tile_scale[None, :]
            else:
                acc = tl.dot(a_op, w.to(COMPUTE), acc, input_precision=INPUT_PRECISION, out_dtype=tl.float32)

    # ---- epilogue: activation scale of the native dot, column scale, global scale, bias, routing weight
    if DOT != _DOT_COMPUTE:
        if A_SCALE == _A_ROW:
            acc = acc * a_row_scale[:, None]
        elif A_SCALE == _A_STATIC:
            acc = acc * a_static
    if SCALE_MODE == _SM_PER_COLUMN:
        acc = acc * col_scale[None, :]
    epilogue_store(
        acc, c_ptr, pair, row_ok, offs_n, n_ok, expert, pid_n, N_OUT,
        gs_ptr, bias_ptr, topk_w_ptr, stride_be, stride_bn, stride_cm, stride_cn,
        BLOCK_M, BLOCK_N, ACT, GATED, OUT_PER_WORD, OUT_WORDS,
    )
