"""fp8 e4m3fn format: bit-exact against compressed-tensors 0.20, torchao 0.18
and vLLM's torch activation formulas (written out below from its tests)."""

import math

import pytest
import torch
import torch.nn.functional as F
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils import calculate_qparams, compute_dynamic_scales_and_zp
from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8

from torch_moe_quant.formats import fp8
from torch_moe_quant.formats.core import (
    Arithmetic,
    Format,
    PerBlock,
    PerGroup,
    PerRow,
    PerTensor,
    QuantizedTensor,
)

FP8 = torch.float8_e4m3fn
GRANS = [PerTensor(), PerRow(), PerGroup(128), PerBlock(128, 128)]


def bits(t):
    """fp8 codes as bytes (torch.equal on bytes also compares NaN payloads)."""
    return t.view(torch.uint8)


# ------------------------------------------------------------------ oracles


def ct_args(g):
    if isinstance(g, PerTensor):
        return QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=True)
    if isinstance(g, PerRow):
        return QuantizationArgs(num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True)
    if isinstance(g, PerGroup):
        return QuantizationArgs(num_bits=8, type="float", strategy="group", group_size=g.size, dynamic=True)
    return QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=[g.rows, g.cols])


def ct_fp8(x2d, g, scale=None):
    """compressed-tensors 0.20 on one [rows, cols] matrix: (scale [r, c], codes, dequant).

    Dynamic tensor / token / group scales come from its own
    ``compute_dynamic_scales_and_zp`` (token needs a 3-D [1, T, K] value);
    block scales from ``calculate_qparams`` on the observer's per-tile min/max."""
    args = ct_args(g)
    rows, cols = x2d.shape
    value = x2d[None] if isinstance(g, PerRow) else x2d
    if scale is not None:
        s = scale.reshape(-1) if isinstance(g, PerTensor) else scale
        s = s[None] if isinstance(g, PerRow) else s
        zp = torch.zeros_like(s, dtype=FP8)
    elif isinstance(g, PerBlock):
        nr, nc = g.scale_shape(rows, cols)
        xp = F.pad(x2d, (0, nc * g.cols - cols, 0, nr * g.rows - rows))
        tiles = xp.reshape(nr, g.rows, nc, g.cols)
        s, zp = calculate_qparams(tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3)), args)
    else:
        s, zp = compute_dynamic_scales_and_zp(value, args, None)
    codes = ct_quantize(value, s, zp, args, dtype=FP8)
    deq = ct_dequantize(codes, s, zp, args)
    sshape = g.scale_shape(rows, cols)
    return s.reshape(sshape), codes.reshape(rows, cols), deq.reshape(rows, cols)


def vllm_per_token_fp8(x):
    """vLLM tests/kernels/quant_utils.py ``ref_dynamic_per_token_quant`` (fp8 branch)."""
    qmax = torch.tensor(448.0)
    amax = x.abs().max(dim=-1)[0].float()
    scales = (amax / qmax)[:, None]
    scales = scales.clamp(min=1.0 / (qmax * 512.0))
    q = (x.float() / scales).clamp(-448.0, 448.0).to(FP8)
    return q, scales


def vllm_group_fp8(x, group_size, eps=1e-10):
    """vLLM ``native_per_token_group_quant_fp8`` (its fp8 block-quant tests)."""
    x_ = x.reshape(x.numel() // group_size, group_size)
    amax = x_.abs().max(dim=-1, keepdim=True)[0].clamp(min=eps).to(torch.float32)
    x_s = amax / 448.0
    x_q = (x_ / x_s).clamp(min=-448.0, max=448.0).to(FP8)
    return x_q.reshape(x.shape), x_s.reshape(*x.shape[:-1], x.shape[-1] // group_size)


def shape_for(g):
    # odd row count everywhere; PerBlock also gets a partial column tile
    return (2, 200, 300) if isinstance(g, PerBlock) else (2, 72, 256)


def sample(shape, dtype, seed, mag):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * mag).to(dtype)


def ct_signed_zero(q_bits, ct_bits):
    """compressed-tensors adds its all-zero zero point, so a quotient of exactly
    -0.0 becomes +0 (0x00); FP32 mode keeps 0x80. Map that one case."""
    return torch.where((q_bits == 0x80) & (ct_bits == 0x00), ct_bits, q_bits)


def assert_matches_ct(x, g, arithmetic, **kw):
    q = fp8.quantize(x, g, arithmetic=arithmetic, **kw)
    assert q.fmt is Format.FP8_E4M3 and q.data.dtype == FP8 and q.scale.dtype == torch.float32
    deq = fp8.dequantize(q, x.dtype)
    for e in range(x.shape[0]):
        static = None if "scale" not in kw else kw["scale"][e].to(x.dtype)
        s, codes, ref = ct_fp8(x[e], g, static)
        assert torch.equal(q.scale[e], s.float()), "scale"
        ours = bits(q.data[e])
        if arithmetic is Arithmetic.FP32:
            ours = ct_signed_zero(ours, bits(codes))
        assert torch.equal(ours, bits(codes)), "codes"
        torch.testing.assert_close(deq[e], ref.to(x.dtype), rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------ compressed-tensors


@pytest.mark.parametrize("g", GRANS, ids=str)
@pytest.mark.parametrize("seed,mag", [(0, 1.0), (1, 1e-3), (2, 300.0), (3, 1e-6)])
def test_fp32_input_matches_compressed_tensors_in_both_modes(g, seed, mag):
    x = sample(shape_for(g), torch.float32, seed, mag)
    assert_matches_ct(x, g, Arithmetic.FP32)
    assert_matches_ct(x, g, Arithmetic.INPUT_DTYPE)


@pytest.mark.parametrize("g", GRANS, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("seed,mag", [(4, 1.0), (5, 30.0), (6, 1e-2)])
def test_half_input_matches_compressed_tensors_in_input_dtype_mode(g, dtype, seed, mag):
    assert_matches_ct(sample(shape_for(g), dtype, seed, mag), g, Arithmetic.INPUT_DTYPE)


def test_fp32_mode_differs_from_compressed_tensors_on_bf16():
    """The measured corner behind ``Arithmetic``: compressed-tensors rounds the
    scale to bf16 and divides in bf16 (double rounding)."""
    x = sample((1, 64, 256), torch.bfloat16, 0, 1.0)
    q = fp8.quantize(x, PerRow())
    s, codes, _ = ct_fp8(x[0], PerRow())
    assert (q.scale[0] != s.float()).sum() > 0
    assert (bits(q.data[0]) != bits(codes)).sum() > 0
    # ... and the INPUT_DTYPE scale is exactly compressed-tensors' bf16 scale
    assert torch.equal(fp8.quantize(x, PerRow(), arithmetic=Arithmetic.INPUT_DTYPE).scale[0], s.float())


@pytest.mark.parametrize("g", [PerTensor(), PerRow(), PerBlock(128, 128)], ids=str)
@pytest.mark.parametrize("arithmetic", list(Arithmetic), ids=str)
def test_static_scale_matches_compressed_tensors(g, arithmetic):
    x = sample(shape_for(g), torch.float32, 7, 2.0)
    rows, cols = x.shape[-2:]
    gen = torch.Generator().manual_seed(8)
    scale = torch.rand((2, *g.scale_shape(rows, cols)), generator=gen) * 0.01 + 1e-3
    assert_matches_ct(x, g, arithmetic, scale=scale)
    q = fp8.quantize(x, g, scale=scale)
    assert q.scale is scale


# ------------------------------------------------------------------ vLLM / torchao


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_per_token_matches_vllm_torch_formula(dtype):
    x = sample((96, 512), dtype, 9, 3.0)
    q = fp8.quantize(x, "token")
    ref_q, ref_s = vllm_per_token_fp8(x)
    assert torch.equal(q.scale, ref_s) and torch.equal(bits(q.data), bits(ref_q))
    # vLLM floors the scale at 1/(448*512): rows with amax < 1/512 differ (documented)
    tiny = torch.full((1, 512), 1e-4, dtype=dtype)
    ref_q, ref_s = vllm_per_token_fp8(tiny)
    q = fp8.quantize(tiny, "token")
    assert ref_s.item() == pytest.approx(1 / (448 * 512)) and q.scale.item() < ref_s.item()
    assert bits(q.data).max() == 0x7E  # ours: 448 (amax -> max code); vLLM: smaller codes
    assert not torch.equal(bits(q.data), bits(ref_q))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_1x128_group_matches_vllm_torch_formula(dtype):
    x = sample((2, 40, 512), dtype, 10, 5.0)
    q = fp8.quantize(x, PerGroup(128))
    ref_q, ref_s = vllm_group_fp8(x, 128)
    assert torch.equal(q.scale, ref_s) and torch.equal(bits(q.data), bits(ref_q))


@pytest.mark.parametrize("g", [PerTensor(), PerRow(), PerBlock(128, 128), PerGroup(128)], ids=str)
def test_matches_torchao_on_fp32(g):
    x = sample((256, 384), torch.float32, 11, 4.0)
    block = {PerTensor: (256, 384), PerRow: (1, 384), PerBlock: (128, 128), PerGroup: (1, 128)}[type(g)]
    s = _choose_scale_float8(x, list(block), FP8)
    codes = _quantize_affine_float8(x, s, FP8)
    q = fp8.quantize(x, g)
    assert torch.equal(q.scale, s) and torch.equal(bits(q.data), bits(codes))


def test_torchao_on_bf16_rounds_scale_but_divides_in_fp32():
    """torchao's corner, measured: scale = bf16(amax / 448) (our INPUT_DTYPE
    scale), codes = fp32 division by it (our FP32 ``encode``)."""
    x = sample((64, 256), torch.bfloat16, 12, 1.0)
    s = _choose_scale_float8(x, [1, 256], FP8)
    codes = _quantize_affine_float8(x, s, FP8)
    ours_s = fp8.choose_scale(x, PerRow(), Arithmetic.INPUT_DTYPE)
    assert torch.equal(s, ours_s)
    assert torch.equal(bits(codes), bits(fp8.encode(x, ours_s, PerRow(), Arithmetic.FP32)))
    assert not torch.equal(s, fp8.choose_scale(x, PerRow()))


# ------------------------------------------------------------------ edge values


def edge_rows(dtype):
    """Rows of 128 edge values; each row is one PerRow / PerGroup(128) block."""
    fi = torch.finfo(dtype)
    big = min(fi.max / 4, 1e30)
    # at scale 1: ties 1.0625 -> 1.0, 1.1875 -> 1.25, 3.5 * 2^-9 -> 4 * 2^-9 (subnormal),
    # 2^-10 -> 0, 15 * 2^-10 -> 2^-6 (min normal); 2^-9 is the smallest subnormal
    ties = [1.0625, 1.1875, 3.5 * 2**-9, 2**-10, 2**-9, 15 * 2**-10]
    exact = torch.arange(126, dtype=torch.uint8).view(FP8).float()  # codes 0x00..0x7D
    rows = [
        torch.zeros(128),  # all-zero block
        torch.full((128,), 0.3),  # all-equal block
        torch.cat([torch.tensor([448.0, -448.0]), exact]),  # ±max and exact fp8 values at scale 1
        torch.cat([torch.tensor([448.0]), torch.tensor(ties).repeat(22)[:127]]),  # exact fp8 ties
        torch.cat([torch.tensor([448.0]), (torch.arange(127) + 0.5) / 16]),  # x.5 ties in 1/16 steps
        torch.full((128,), -0.0),  # negative zero
        torch.linspace(-1, 1, 128) * big,  # very large
        torch.linspace(-1, 1, 128) * max(fi.tiny * 4, 1e-30),  # very small / subnormal scale
        torch.full((128,), fi.tiny / 2),  # input subnormals
        torch.full((128,), 1e-45),  # fp32: amax / 448 underflows to 0 -> eps rule
        torch.linspace(-1, 1, 128) * 7.0,  # plain
    ]
    return torch.stack(rows).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("g", [PerRow(), PerGroup(64), PerTensor()], ids=str)
def test_edge_values_match_compressed_tensors(dtype, g):
    x = edge_rows(dtype)[None]
    assert_matches_ct(x, g, Arithmetic.INPUT_DTYPE)
    if dtype == torch.float32:
        assert_matches_ct(x, g, Arithmetic.FP32)


def test_edge_value_contract():
    x = edge_rows(torch.float32)
    q = fp8.quantize(x, PerRow())
    deq = fp8.dequantize(q)
    # all-zero row: scale = fp32 eps (compressed-tensors' rule), codes 0, dequant 0 (not NaN)
    assert q.scale[0, 0] == torch.finfo(torch.float32).eps and torch.equal(deq[0], torch.zeros(128))
    assert torch.equal(bits(q.data[5]), torch.full((128,), 0x80, dtype=torch.uint8))  # -0 keeps its sign
    q_ct = fp8.quantize(x, PerRow(), arithmetic=Arithmetic.INPUT_DTYPE)  # ... except in CT's arithmetic
    assert torch.equal(bits(q_ct.data[5]), torch.zeros(128, dtype=torch.uint8))
    tiny_neg = fp8.quantize(torch.tensor([[448.0, -2**-11]]), PerRow(), arithmetic=Arithmetic.INPUT_DTYPE)
    assert bits(tiny_neg.data)[0, 1] == 0x80  # a negative value rounding to zero keeps the sign
    assert q.scale[2, 0] == 1.0 and torch.equal(deq[2], x[2])  # exact fp8 values round-trip
    # ties round to even: 1.0625 -> 1.0, 1.1875 -> 1.25
    assert deq[3, 1] == 1.0 and deq[3, 2] == 1.25 and deq[3, 3] == 4 * 2**-9 and deq[3, 4] == 0
    assert deq[3, 6] == 2**-6 and deq[9, 0] == 0 and q.scale[9, 0] == torch.finfo(torch.float32).eps
    assert torch.isfinite(deq).all()


def test_nan_and_inf_poison_only_their_block():
    x = torch.randn(4, 256)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[2, 9] = -float("inf")
    q = fp8.quantize(x, PerGroup(128))
    deq = fp8.dequantize(q)
    assert q.scale[0, 0].isnan() and q.scale[1, 0] == float("inf") and q.scale[2, 0] == float("inf")
    assert deq[:3, :128].isnan().all()  # the poisoned block: all NaN
    assert torch.isfinite(deq[:3, 128:]).all() and torch.isfinite(deq[3]).all()
    assert bits(q.data[1, 7]) in (0x7F, 0xFF) and bits(q.data[1, 8]) in (0x00, 0x80)
    s, codes, _ = ct_fp8(x, PerGroup(128))  # identical to compressed-tensors, NaN bytes included
    assert torch.equal(ct_signed_zero(bits(q.data), bits(codes)), bits(codes))
    q_ct = fp8.quantize(x, PerGroup(128), arithmetic=Arithmetic.INPUT_DTYPE)
    assert torch.equal(bits(q_ct.data), bits(codes))
    torch.testing.assert_close(q.scale, s, rtol=0, atol=0, equal_nan=True)


def test_static_scale_saturates_inf_and_keeps_nan():
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1e6, 1.0, -0.0]])
    q = fp8.quantize(x, PerTensor(), scale=torch.ones(1, 1))
    assert bits(q.data)[0, 0] in (0x7F, 0xFF)
    assert q.data.float()[0, 1:].tolist() == [448.0, -448.0, 448.0, 1.0, 0.0]


def test_batch_dims_are_independent_matrices():
    x = sample((3, 2, 130, 256), torch.bfloat16, 13, 2.0)
    for g in GRANS:
        q = fp8.quantize(x, g)
        for i in range(3):
            for j in range(2):
                qi = fp8.quantize(x[i, j], g)
                assert torch.equal(bits(q.data[i, j]), bits(qi.data)) and torch.equal(q.scale[i, j], qi.scale)
        assert q.scale.shape == (3, 2, *g.scale_shape(130, 256))


def test_dequantize_dtypes_and_partial_block():
    x = sample((1, 130, 200), torch.float32, 14, 1.0)
    q = fp8.quantize(x, PerBlock(128, 128))
    assert q.scale.shape == (1, 2, 2) and q.data.shape == (1, 130, 200)
    ref = q.data.float() * q.scale.repeat_interleave(128, -2)[:, :130].repeat_interleave(128, -1)[..., :200]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(fp8.dequantize(q, dtype), ref.to(dtype))
    assert float((fp8.dequantize(q) - x).abs().max()) <= float(q.scale.max()) * 16  # half an ulp at 448


def test_dispatch_through_formats_table():
    from torch_moe_quant import formats

    x = sample((1, 8, 128), torch.bfloat16, 15, 1.0)
    q = formats.quantize(x, Format.FP8_E4M3, "token")
    assert q.granularity == PerRow() and torch.equal(formats.dequantize(q), fp8.dequantize(q))


# ------------------------------------------------------------------ errors


def test_errors_name_argument_and_expectation():
    x = torch.randn(4, 256)
    with pytest.raises(TypeError, match="x must be"):
        fp8.quantize(x.to(torch.int32))
    with pytest.raises(TypeError, match="x must be"):
        fp8.quantize(x.double())
    with pytest.raises(ValueError, match="at least 2 dims"):
        fp8.quantize(torch.randn(8))
    with pytest.raises(ValueError, match="divisible"):
        fp8.quantize(x, PerGroup(100))
    with pytest.raises(ValueError, match="granularity"):
        fp8.quantize(x, "nope")
    with pytest.raises(ValueError, match=r"scale must have shape \(4, 1\)"):
        fp8.quantize(x, PerRow(), scale=torch.ones(1, 1))
    with pytest.raises(TypeError, match="scale must have dtype torch.float32"):
        fp8.quantize(x, PerRow(), scale=torch.ones(4, 1, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="finite and > 0"):
        fp8.quantize(x, PerTensor(), scale=torch.zeros(1, 1))
    with pytest.raises(ValueError, match="Arithmetic"):
        fp8.quantize(x, arithmetic="float64")
    q = fp8.quantize(x)
    with pytest.raises(TypeError, match="dtype must be"):
        fp8.dequantize(q, torch.int8)
    with pytest.raises(TypeError, match="q must be a QuantizedTensor"):
        fp8.dequantize(q.data)
    with pytest.raises(ValueError, match="q.scale must have shape"):
        fp8.dequantize(QuantizedTensor(q.data, q.scale[:2], Format.FP8_E4M3, PerRow(), (4, 256)))
    with pytest.raises(TypeError, match="q.data must have dtype"):
        fp8.dequantize(QuantizedTensor(q.data.float(), q.scale, Format.FP8_E4M3, PerRow(), (4, 256)))
    with pytest.raises(ValueError, match="q.fmt"):
        fp8.dequantize(QuantizedTensor(q.data, q.scale, Format.INT8, PerRow(), (4, 256)))
    assert math.isclose(fp8.FP8_MAX, torch.finfo(FP8).max)
