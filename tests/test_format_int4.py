"""int4 format and its checkpoint packings: bit-exact against compressed-tensors
0.20 (quantize, pack_to_int32, PackedQuantizationCompressor), torchao 0.18
where it has the same format, and the GPTQ / AWQ dequant formulas written out
below from AutoGPTQ's and AutoAWQ's published conventions."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

from torch_moe_quant.formats import int4
from torch_moe_quant.formats.core import Arithmetic, Format, PerGroup, PerRow, PerTensor, QuantizedTensor
from torch_moe_quant.formats.int4 import Int4Mode
from torch_moe_quant.formats.int4_packing import (
    AWQ_ORDER,
    GPTQFormat,
    from_awq,
    from_gptq,
    from_pack_quantized,
    to_awq,
    to_gptq,
    to_pack_quantized,
)

SYM, ASYM = Int4Mode.SYMMETRIC, Int4Mode.ASYMMETRIC
GRANS = [PerGroup(32), PerGroup(64), PerGroup(128), PerRow()]


def sample(shape, dtype, seed, mag=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * mag).to(dtype)


def codes_of(q):
    return int4.unpack_int4(q.data, q.shape[-1])


def assert_same(a: QuantizedTensor, b: QuantizedTensor):
    assert a.fmt == b.fmt and a.granularity == b.granularity and tuple(a.shape) == tuple(b.shape)
    for name in ("data", "scale", "zero_point", "g_idx"):
        ta, tb = getattr(a, name), getattr(b, name)
        assert (ta is None) == (tb is None), name
        if ta is not None:
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), name


# ------------------------------------------------------------------ oracles


def ct_args(g, mode):
    if isinstance(g, PerRow):
        return QuantizationArgs(num_bits=4, type="int", strategy="channel", symmetric=mode is SYM)
    return QuantizationArgs(
        num_bits=4, type="int", strategy="group", group_size=g.size, symmetric=mode is SYM
    )


def ct_int4(x2d, g, mode):
    """compressed-tensors on one [N, K] weight: scale, zero point, int8 codes, dequant
    (min/max per group or row as llm-compressor's observer reduces them)."""
    args = ct_args(g, mode)
    if isinstance(g, PerRow):
        lo, hi = x2d.amin(1, keepdim=True), x2d.amax(1, keepdim=True)
    else:
        xg = x2d.unflatten(-1, (x2d.shape[-1] // g.size, g.size))
        lo, hi = xg.amin(-1), xg.amax(-1)
    s, zp = calculate_qparams(lo, hi, args)
    codes = ct_quantize(x2d, s, zp, args, dtype=torch.int8)
    return s, zp, codes, ct_dequantize(codes, s, zp, args)


def gptq_dequant(qweight, qzeros, scales, g_idx, v1):
    """AutoGPTQ's convention: u[k, n] = nibble k % 8 of qweight[k // 8, n];
    zero[g, n] = nibble n % 8 of qzeros[g, n // 8] (+ 1 in v1);
    W[k, n] = scales[g_idx[k], n] * (u[k, n] - zero[g_idx[k], n]). Returns [N, K] fp32."""
    kk, n = qweight.shape[0] * 8, qweight.shape[1]
    k, c = torch.arange(kk), torch.arange(n)
    u = (qweight[k // 8, :] >> (4 * (k % 8))[:, None]) & 15
    z = ((qzeros[:, c // 8] >> (4 * (c % 8))[None, :]) & 15) + (1 if v1 else 0)
    g = g_idx.long()
    return (scales[g, :].float() * (u - z[g, :]).float()).t()


AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # vLLM awq_triton: column j sits in nibble REV[j]


def awq_dequant(qweight, qzeros, scales):
    """AutoAWQ GEMM convention: column n of word c = nibble AWQ_REVERSE_ORDER[n % 8];
    W[k, n] = scales[k // g, n] * (u[k, n] - zero[k // g, n]). Returns [N, K] fp32."""
    kk, n = qweight.shape[0], qweight.shape[1] * 8
    c = torch.arange(n)
    shift = 4 * torch.tensor(AWQ_REVERSE_ORDER)[c % 8]
    u = (qweight[:, c // 8] >> shift) & 15
    z = (qzeros[:, c // 8] >> shift) & 15
    g = torch.arange(kk) // (kk // scales.shape[0])
    return (scales[g, :].float() * (u - z[g, :]).float()).t()


def act_order_g_idx(k, group, seed):
    """GPTQ desc_act: columns visited in a permuted order, group = position // group."""
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // group).to(torch.int32)
    return g_idx


# ------------------------------------------------------------------ compressed-tensors


def assert_matches_ct(x, g, mode, arithmetic, scale_dtype=None):
    q = int4.quantize(x, g, mode=mode, arithmetic=arithmetic, scale_dtype=scale_dtype)
    for e in range(x.shape[0]):
        s, zp, codes, ref = ct_int4(x[e], g, mode)
        assert torch.equal(q.scale[e], s), "scale"
        assert torch.equal(codes_of(q)[e], codes), "codes"
        assert torch.equal(q.data[e], pack_to_int32(codes, 4)), "packed"
        if mode is ASYM:
            assert q.zero_point.dtype == torch.int8 and torch.equal(q.zero_point[e], zp), "zero point"
        else:
            assert q.zero_point is None
        assert torch.equal(int4.dequantize(q, s.dtype)[e], ref), "dequant"


@pytest.mark.parametrize("g", GRANS, ids=str)
@pytest.mark.parametrize("mode", [SYM, ASYM], ids=str)
@pytest.mark.parametrize("seed,mag", [(0, 1.0), (1, 1e-3), (2, 200.0)])
def test_fp32_input_matches_compressed_tensors_in_both_modes(g, mode, seed, mag):
    x = sample((2, 24, 256), torch.float32, seed, mag)
    assert_matches_ct(x, g, mode, Arithmetic.FP32)
    assert_matches_ct(x, g, mode, Arithmetic.INPUT_DTYPE)


@pytest.mark.parametrize("g", [PerGroup(32), PerGroup(128), PerRow()], ids=str)
@pytest.mark.parametrize("mode", [SYM, ASYM], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("seed", [3, 4])
def test_half_input_matches_compressed_tensors_in_input_dtype_mode(g, mode, dtype, seed):
    assert_matches_ct(sample((2, 24, 256), dtype, seed, 2.0), g, mode, Arithmetic.INPUT_DTYPE)


def test_fp32_mode_on_bf16_keeps_ct_symmetric_scale_but_not_its_codes():
    """Measured: bf16 ``amax / 7.5`` is computed in fp32 and rounded once, so the
    symmetric scale equals compressed-tensors'; its bf16 division (double
    rounding) changes some codes."""
    x = sample((1, 64, 256), torch.bfloat16, 5)
    q = int4.quantize(x, PerGroup(32))
    s, _, codes, _ = ct_int4(x[0], PerGroup(32), SYM)
    assert torch.equal(q.scale[0], s) and q.scale.dtype == torch.bfloat16
    assert (codes_of(q)[0] != codes).sum() > 0


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_scale_dtype_rounds_the_scale_once_and_codes_use_it(scale_dtype):
    x = sample((2, 8, 128), torch.float32, 6)
    for mode in (SYM, ASYM):
        q = int4.quantize(x, PerGroup(32), mode=mode, scale_dtype=scale_dtype)
        ref = int4.quantize(x, PerGroup(32), mode=mode)  # fp32 scale
        if mode is SYM:
            assert torch.equal(q.scale, ref.scale.to(scale_dtype))
        sw = q.scale.float().repeat_interleave(32, -1)
        zp = 0 if mode is SYM else q.zero_point.float().repeat_interleave(32, -1)
        want = torch.round((x / sw + zp).clamp(-8, 7)).to(torch.int8)
        assert q.scale.dtype == scale_dtype and torch.equal(codes_of(q), want)
    with pytest.raises(ValueError, match="scale_dtype must be torch.float32"):
        int4.quantize(x, mode=SYM, scale_dtype=torch.bfloat16, arithmetic=Arithmetic.INPUT_DTYPE)


@pytest.mark.parametrize("mode", [SYM, ASYM], ids=str)
@pytest.mark.parametrize("n", [24, 20])
def test_pack_quantized_matches_compressed_tensors_compressor(mode, n):
    """MoE 3-D weight [E, N, K] through PackedQuantizationCompressor.compress /
    decompress; N = 20 exercises the zero-point padding along N."""
    w = sample((3, n, 128), torch.bfloat16, 7)
    g = PerGroup(32)
    q = int4.quantize(w, g, mode=mode, arithmetic=Arithmetic.INPUT_DTYPE)
    sd = {"weight": w, "weight_scale": q.scale}
    if mode is ASYM:
        sd["weight_zero_point"] = q.zero_point
    scheme = QuantizationScheme(targets=["Linear"], weights=ct_args(g, mode))
    ct = PackedQuantizationCompressor.compress(sd, scheme)
    ours = to_pack_quantized(q).state_dict()
    assert sorted(ours) == sorted(ct)
    for name in ct:
        assert ours[name].dtype == ct[name].dtype and torch.equal(ours[name], ct[name]), name
    if mode is ASYM:
        assert ct["weight_zero_point"].shape == (3, -(-n // 8), 4)
    back = from_pack_quantized(**ct)
    assert_same(back, q)
    ref = PackedQuantizationCompressor.decompress(ct, scheme)["weight"]
    assert torch.equal(int4.dequantize(back, torch.bfloat16), ref)


def test_pack_unpack_match_compressed_tensors_helpers():
    gen = torch.Generator().manual_seed(8)
    for n in (8, 64, 13, 1):
        codes = torch.randint(-8, 8, (5, n), generator=gen, dtype=torch.int8)
        packed = int4.pack_int4(codes)
        assert torch.equal(packed, pack_to_int32(codes, 4))
        assert torch.equal(int4.unpack_int4(packed, n), unpack_from_int32(packed, 4, codes.shape))
        assert torch.equal(int4.unpack_int4(packed, n), codes)
    word = int4.pack_int4(torch.tensor([[-8, -7, -6, -5, 4, 5, 6, 7]], dtype=torch.int8))
    assert word.item() == 0xFEDC3210 - 2**32  # element j in bits 4j, nibble = code + 8


# ------------------------------------------------------------------ torchao


@pytest.mark.parametrize("mode", [SYM, ASYM], ids=str)
@pytest.mark.parametrize("group", [32, 128])
def test_torchao_same_qparams_codes_differ_only_by_reciprocal(mode, group):
    x = sample((64, 256), torch.float32, 9, 1.5)
    mt = MappingType.SYMMETRIC if mode is SYM else MappingType.ASYMMETRIC
    block = (1, group)
    s, zp = choose_qparams_affine(
        x, mt, block, torch.int8, quant_min=-8, quant_max=7,
        scale_dtype=torch.float32, zero_point_dtype=torch.int8, keepdim=True,
    )
    codes = quantize_affine(x, block, s, zp, torch.int8, -8, 7)
    q = int4.quantize(x, PerGroup(group), mode=mode, scale_dtype=torch.float32)
    assert torch.equal(q.scale, s)
    if mode is ASYM:
        assert torch.equal(q.zero_point, zp)
    else:
        assert not zp.any()
    se, ze = s.repeat_interleave(group, -1), zp.float().repeat_interleave(group, -1)
    ours_recip = (torch.round(x * (1.0 / se)) + ze).clamp(-8, 7).to(torch.int8)
    assert torch.equal(codes, ours_recip)  # torchao == reciprocal-multiply formula, exactly
    differ = codes != codes_of(q)
    if mode is ASYM:
        assert not differ.any()  # measured: 0 of 163840 over 10 seeds
    else:
        # symmetric puts -amax on the -7.5 tie, and x / s vs x * (1/s) decide it
        # differently: measured 498 (g=32) / 108 (g=128) of 163840 elements over
        # 10 seeds, every one of them the group's |x| == amax element
        xg = x.reshape(64, -1, group).abs()
        at_amax = (xg == xg.amax(-1, keepdim=True)).reshape(64, 256)
        assert differ.any() and not (differ & ~at_amax).any()


# ------------------------------------------------------------------ edge values


def edge_groups(dtype):
    """Groups of 32 edge values (PerGroup(32))."""
    fi = torch.finfo(dtype)
    ties = torch.arange(-3.5, 4.0, 1.0)  # x.5 ties at scale 1 (amax 7.5)
    groups = [
        torch.zeros(32),
        torch.full((32,), 0.25),  # all-equal positive: asym zero point -8
        torch.full((32,), -3.0),  # all-equal negative: asym zero point 7
        torch.cat([torch.tensor([7.5, -7.5]), ties.repeat(4)[:30]]),
        torch.cat([torch.tensor([7.5, -7.5]), ties.repeat(4)[:30] + 2**-10]),
        torch.cat([torch.tensor([7.5, -7.5]), ties.repeat(4)[:30] - 2**-10]),
        torch.linspace(-1, 1, 32) * min(fi.max / 4, 1e30),
        torch.linspace(-1, 1, 32) * 1e-30,
        torch.full((32,), fi.tiny / 2),
        torch.full((32,), 1e-45),
        torch.linspace(0, 9, 32),  # positive ramp
        torch.linspace(-9, 1, 32),
    ]
    return torch.cat(groups).reshape(3, 128).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", [SYM, ASYM], ids=str)
def test_edge_values_match_compressed_tensors(dtype, mode):
    x = torch.cat([edge_groups(dtype), edge_groups(dtype).flip(-1)])[None]
    assert_matches_ct(x, PerGroup(32), mode, Arithmetic.INPUT_DTYPE)
    if dtype == torch.float32:
        assert_matches_ct(x, PerGroup(32), mode, Arithmetic.FP32)


def test_edge_value_contract():
    x = edge_groups(torch.float32).reshape(1, 12, 32)[0]
    qs = int4.quantize(x, PerRow(), mode=SYM, scale_dtype=torch.float32)
    qa = int4.quantize(x, PerRow(), mode=ASYM, scale_dtype=torch.float32)
    eps = torch.finfo(torch.float32).eps
    # all-zero group: scale eps, codes 0, zero point 0 (compressed-tensors' 0/0 -> int8 0)
    assert qs.scale[0, 0] == eps and qa.scale[0, 0] == eps and qa.zero_point[0, 0] == 0
    assert not codes_of(qs)[0].any() and not codes_of(qa)[0].any()
    assert qa.zero_point[1, 0] == -8 and (codes_of(qa)[1] == 7).all()
    assert qa.zero_point[2, 0] == 7 and (codes_of(qa)[2] == -8).all()
    assert torch.equal(int4.dequantize(qa)[2], x[2])
    assert qs.scale[3, 0] == 1.0 and codes_of(qs)[3, 0] == 7 and codes_of(qs)[3, 1] == -8
    ties = torch.arange(-3.5, 4.0, 1.0).repeat(4)[:30]
    assert torch.equal(codes_of(qs)[3, 2:], torch.round(ties).to(torch.int8))
    assert torch.equal(codes_of(qs)[4, 2:], torch.floor(ties + 1).to(torch.int8))
    assert torch.equal(codes_of(qs)[5, 2:], torch.floor(ties).to(torch.int8))
    for q in (qs, qa):
        assert torch.isfinite(int4.dequantize(q)).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_rejected(bad):
    x = torch.randn(4, 64)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="x must be finite"):
        int4.quantize(x, PerGroup(32))


def test_batch_dims_are_independent_matrices():
    x = sample((2, 3, 16, 128), torch.bfloat16, 10)
    for mode in (SYM, ASYM):
        q = int4.quantize(x, PerGroup(64), mode=mode)
        for i in range(2):
            for j in range(3):
                qi = int4.quantize(x[i, j], PerGroup(64), mode=mode)
                assert torch.equal(q.data[i, j], qi.data) and torch.equal(q.scale[i, j], qi.scale)
                if mode is ASYM:
                    assert torch.equal(q.zero_point[i, j], qi.zero_point)


# ------------------------------------------------------------------ act-order g_idx


@pytest.mark.parametrize("mode", [SYM, ASYM], ids=str)
def test_g_idx_groups_columns_and_dequantize_honours_it(mode):
    x = sample((2, 16, 256), torch.float32, 11)
    g_idx = torch.stack([act_order_g_idx(256, 64, 12), act_order_g_idx(256, 64, 13)])
    q = int4.quantize(x, PerGroup(64), mode=mode, g_idx=g_idx)
    assert torch.equal(q.g_idx, g_idx)
    deq = int4.dequantize(q)
    for e in range(2):
        p = torch.argsort(g_idx[e], stable=True)  # columns of group 0, then group 1, ...
        qs = int4.quantize(x[e][:, p], PerGroup(64), mode=mode)
        assert torch.equal(q.scale[e], qs.scale)
        assert torch.equal(codes_of(q)[e][:, p], codes_of(qs))
        assert torch.equal(deq[e][:, p], int4.dequantize(qs))
    # a trivial g_idx quantizes exactly like no g_idx
    q0 = int4.quantize(x, PerGroup(64), mode=mode, g_idx=int4.trivial_g_idx((2,), 256, 64))
    assert torch.equal(q0.data, int4.quantize(x, PerGroup(64), mode=mode).data)


def test_g_idx_validation():
    x = torch.randn(4, 128)
    with pytest.raises(ValueError, match="exactly 32 columns"):
        int4.quantize(x, PerGroup(32), g_idx=torch.zeros(128, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"g_idx values must lie in \[0, 4\)"):
        int4.quantize(x, PerGroup(32), g_idx=torch.full((128,), 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="g_idx must have dtype torch.int32"):
        int4.quantize(x, PerGroup(32), g_idx=torch.zeros(128, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"g_idx must have shape \(128,\)"):
        int4.quantize(x, PerGroup(32), g_idx=torch.zeros(64, dtype=torch.int32))
    with pytest.raises(ValueError, match="PerGroup"):
        int4.quantize(x, PerRow(), g_idx=torch.zeros(128, dtype=torch.int32))


# ------------------------------------------------------------------ GPTQ


@pytest.mark.parametrize("mode", [SYM, ASYM], ids=str)
@pytest.mark.parametrize("fmt", list(GPTQFormat), ids=str)
@pytest.mark.parametrize(
    "g,act_order",
    [(PerGroup(32), False), (PerGroup(128), False), (PerRow(), False)]
    + [(PerGroup(32), True), (PerGroup(128), True)],
    ids=str,
)
def test_gptq_round_trips_and_dequantizes_like_gptq(mode, fmt, g, act_order):
    e, n, k = 2, 16, 256
    x = sample((e, n, k), torch.float16, 14)
    g_idx = None
    if act_order:
        g_idx = torch.stack([act_order_g_idx(k, g.size, 15 + i) for i in range(e)])
    q = int4.quantize(x, g, mode=mode, g_idx=g_idx)
    t = to_gptq(q, checkpoint_format=fmt)
    groups = q.scale.shape[-1]
    assert t.qweight.shape == (e, k // 8, n) and t.qzeros.shape == (e, groups, n // 8)
    assert t.scales.shape == (e, groups, n) and t.scales.dtype == torch.float16
    assert t.g_idx.shape == (e, k) and t.g_idx.dtype == torch.int32
    back = from_gptq(t.qweight, t.qzeros, t.scales, t.g_idx, mode=mode, checkpoint_format=fmt)
    assert_same(back, q)
    deq = int4.dequantize(back)
    for i in range(e):
        ref = gptq_dequant(t.qweight[i], t.qzeros[i], t.scales[i], t.g_idx[i], fmt is GPTQFormat.V1)
        assert torch.equal(deq[i], ref)
    if mode is SYM:
        stored = 7 if fmt is GPTQFormat.V1 else 8
        assert (t.qzeros == stored * 0x11111111 - (2**32 if stored >= 8 else 0)).all()
        assert_same(from_gptq(t.qweight, None, t.scales, t.g_idx, mode=SYM), q)


@pytest.mark.parametrize("fmt", list(GPTQFormat), ids=str)
def test_gptq_checkpoint_round_trip_with_random_tensors(fmt):
    """gptq -> int4 -> gptq is the identity on arbitrary nibbles, act-order included;
    v1 nibble 15 decodes to zero 16 (zero point 8)."""
    gen = torch.Generator().manual_seed(16)
    k, n, gs = 256, 32, 64
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), generator=gen, dtype=torch.int32)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (k // gs, n // 8), generator=gen, dtype=torch.int32)
    scales = torch.rand(k // gs, n, generator=gen).half()
    g_idx = act_order_g_idx(k, gs, 17)
    q = from_gptq(qweight, qzeros, scales, g_idx, mode=ASYM, checkpoint_format=fmt)
    t = to_gptq(q, checkpoint_format=fmt)
    for a, b in ((t.qweight, qweight), (t.qzeros, qzeros), (t.scales, scales), (t.g_idx, g_idx)):
        assert torch.equal(a, b)
    assert torch.equal(int4.dequantize(q), gptq_dequant(qweight, qzeros, scales, g_idx, fmt is GPTQFormat.V1))
    if fmt is GPTQFormat.V1:
        assert q.zero_point.max() == 8 and q.zero_point.min() == -7
        with pytest.raises(ValueError, match=r"q.zero_point must lie in \[-8, 7\]"):
            to_pack_quantized(q)
    # the trivial g_idx is dropped on the way in and regenerated on the way out
    trivial = torch.arange(k, dtype=torch.int32) // gs
    q2 = from_gptq(qweight, qzeros, scales, trivial, mode=ASYM, checkpoint_format=fmt)
    assert q2.g_idx is None and torch.equal(to_gptq(q2, checkpoint_format=fmt).g_idx, trivial)


def test_gptq_v1_cannot_store_zero_0():
    x = torch.rand(8, 64) + 0.1  # all-positive rows: zero point -8, unsigned zero 0
    q = int4.quantize(x, PerGroup(32), mode=ASYM)
    assert (q.zero_point == -8).all()
    with pytest.raises(ValueError, match="GPTQ v1"):
        to_gptq(q)
    t = to_gptq(q, checkpoint_format=GPTQFormat.V2)
    assert not t.qzeros.any()
    back = from_gptq(t.qweight, t.qzeros, t.scales, t.g_idx, mode=ASYM, checkpoint_format=GPTQFormat.V2)
    assert_same(back, q)


def test_gptq_qweight_is_pack_quantized_transposed():
    q = int4.quantize(sample((16, 128), torch.float32, 18), PerGroup(32))
    assert torch.equal(to_gptq(q).qweight, to_pack_quantized(q).weight_packed.t())


def test_from_gptq_symmetric_rejects_non_8_zeros():
    q = int4.quantize(sample((8, 64), torch.float32, 19), PerGroup(32), mode=ASYM)
    t = to_gptq(q)
    with pytest.raises(ValueError, match="mode=SYMMETRIC"):
        from_gptq(t.qweight, t.qzeros, t.scales, t.g_idx, mode=SYM)
    with pytest.raises(ValueError, match="qzeros is required"):
        from_gptq(t.qweight, None, t.scales, t.g_idx, mode=ASYM)


# ------------------------------------------------------------------ AWQ


def test_awq_interleave_order():
    """Columns 0..7 holding unsigned 0..7 pack to 0x75316420 (AutoAWQ order_map)."""
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    codes = (torch.arange(8, dtype=torch.int8) - 8).reshape(8, 1).expand(8, 8).contiguous()
    q = QuantizedTensor(int4.pack_int4(codes), torch.ones(8, 1), Format.INT4, PerRow(), (8, 8))
    t = to_awq(q)  # qweight [K=8, N/8=1]: row k holds u[k, n] = n for n = 0..7
    assert t.qweight.shape == (8, 1) and (t.qweight == 0x75316420).all()
    assert (t.qzeros == 0x88888888 - 2**32).all()  # symmetric -> unsigned zero 8


@pytest.mark.parametrize("mode", [SYM, ASYM], ids=str)
@pytest.mark.parametrize("g", [PerGroup(32), PerGroup(128), PerRow()], ids=str)
def test_awq_round_trips_and_dequantizes_like_awq(mode, g):
    e, n, k = 2, 24, 256
    q = int4.quantize(sample((e, n, k), torch.float16, 20), g, mode=mode)
    t = to_awq(q)
    groups = q.scale.shape[-1]
    assert t.qweight.shape == (e, k, n // 8) and t.qzeros.shape == (e, groups, n // 8)
    assert t.scales.shape == (e, groups, n)
    back = from_awq(t.qweight, t.qzeros, t.scales, mode=mode)
    assert_same(back, q)
    deq = int4.dequantize(back)
    for i in range(e):
        assert torch.equal(deq[i], awq_dequant(t.qweight[i], t.qzeros[i], t.scales[i]))


def test_awq_checkpoint_round_trip_with_random_tensors():
    gen = torch.Generator().manual_seed(21)
    k, n = 128, 32
    qweight = torch.randint(-(2**31), 2**31 - 1, (2, k, n // 8), generator=gen, dtype=torch.int32)
    qzeros = torch.randint(-(2**31), 2**31 - 1, (2, 1, n // 8), generator=gen, dtype=torch.int32)
    scales = torch.rand(2, 1, n, generator=gen).half()
    q = from_awq(qweight, qzeros, scales)
    assert q.granularity == PerRow()
    t = to_awq(q)
    assert torch.equal(t.qweight, qweight) and torch.equal(t.qzeros, qzeros) and torch.equal(t.scales, scales)
    for i in range(2):
        assert torch.equal(int4.dequantize(q)[i], awq_dequant(qweight[i], qzeros[i], scales[i]))
    with pytest.raises(ValueError, match="mode=SYMMETRIC"):
        from_awq(qweight, qzeros, scales, mode=SYM)


def test_awq_rejects_act_order():
    x = sample((8, 64), torch.float32, 22)
    q = int4.quantize(x, PerGroup(32), g_idx=act_order_g_idx(64, 32, 23))
    with pytest.raises(ValueError, match="AWQ has no act-order"):
        to_awq(q)


# ------------------------------------------------------------------ pack-quantized converters


def test_pack_quantized_round_trip_with_g_idx_and_shape_checks():
    x = sample((2, 8, 128), torch.float32, 24)
    g_idx = torch.stack([act_order_g_idx(128, 32, 25), act_order_g_idx(128, 32, 26)])
    q = int4.quantize(x, PerGroup(32), mode=ASYM, g_idx=g_idx)
    t = to_pack_quantized(q)
    assert torch.equal(t.weight_g_idx, g_idx) and t.weight_shape.tolist() == [2, 8, 128]
    assert t.weight_shape.dtype == torch.int64
    assert_same(from_pack_quantized(**t.state_dict()), q)
    assert_same(from_pack_quantized(t.weight_packed, t.weight_scale, t.weight_zero_point, g_idx), q)
    with pytest.raises(ValueError, match="weight_shape"):
        from_pack_quantized(t.weight_packed, t.weight_scale, weight_shape=(2, 8, 120))
    with pytest.raises(ValueError, match=r"weight_zero_point must have shape \(2, 1, 4\)"):
        from_pack_quantized(t.weight_packed, t.weight_scale, t.weight_zero_point[:, :, :2])
    with pytest.raises(TypeError, match="weight_packed must have dtype torch.int32"):
        from_pack_quantized(t.weight_packed.to(torch.int64), t.weight_scale)


# ------------------------------------------------------------------ errors


def test_errors_name_argument_and_expectation():
    x = torch.randn(4, 128)
    with pytest.raises(ValueError, match="granularities"):
        int4.quantize(x, PerTensor())
    with pytest.raises(ValueError, match="divisible by the block size 48"):
        int4.quantize(x, PerGroup(48))
    with pytest.raises(ValueError, match="multiple of 8"):
        int4.quantize(torch.randn(4, 12), PerRow())
    with pytest.raises(TypeError, match="scale_dtype must be"):
        int4.quantize(x, scale_dtype=torch.float64)
    with pytest.raises(ValueError, match="Int4Mode"):
        int4.quantize(x, mode="sym")
    with pytest.raises(ValueError, match=r"codes must lie in \[-8, 7\]"):
        int4.pack_int4(torch.tensor([[8]], dtype=torch.int8))
    with pytest.raises(TypeError, match="codes must have dtype torch.int8"):
        int4.pack_int4(torch.tensor([[1]], dtype=torch.int32))
    q = int4.quantize(x, PerGroup(32), mode=ASYM)
    with pytest.raises(TypeError, match="q.zero_point must have dtype torch.int8"):
        bad = QuantizedTensor(q.data, q.scale, Format.INT4, q.granularity, q.shape, zero_point=q.zero_point.int())
        int4.dequantize(bad)
    with pytest.raises(ValueError, match="q.data must have shape"):
        int4.dequantize(QuantizedTensor(q.data[:, :8], q.scale, Format.INT4, q.granularity, q.shape))
    t = to_gptq(int4.quantize(torch.randn(8, 128), PerGroup(32)))
    with pytest.raises(TypeError, match="qweight must have dtype torch.int32"):
        from_gptq(t.qweight.to(torch.int64), t.qzeros, t.scales, t.g_idx)
    with pytest.raises(TypeError, match="scales must have dtype"):
        from_gptq(t.qweight, t.qzeros, t.scales.double(), t.g_idx)
    with pytest.raises(ValueError, match="scales must have shape"):
        from_gptq(t.qweight, t.qzeros, t.scales[:, :2], t.g_idx)
    with pytest.raises(ValueError, match=r"qzeros must have shape \(4, 1\)"):
        from_gptq(t.qweight, t.qzeros[:2], t.scales, t.g_idx)
    with pytest.raises(ValueError, match="multiple of the number of groups 3"):
        from_gptq(t.qweight, None, t.scales[:3], None)
    with pytest.raises(ValueError, match="N=12 must be a multiple of 8"):
        to_gptq(int4.quantize(torch.randn(12, 64), PerGroup(32)))
