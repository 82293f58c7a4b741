"""int8 format: bit-exact against compressed-tensors 0.20; torchao 0.18 and
vLLM's per-token int8 (its CUDA kernel's formula and its torch reference,
written out below) compared with their measured differences."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils import calculate_qparams, compute_dynamic_scales_and_zp
from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

from torch_moe_quant.formats import int8
from torch_moe_quant.formats.core import Arithmetic, Format, PerGroup, PerRow, PerTensor, QuantizedTensor
from torch_moe_quant.formats.int8 import Int8ScaleRule

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def sample(shape, dtype, seed, mag):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * mag).to(dtype)


# ------------------------------------------------------------------ oracles


def ct_int8(x2d, g, scale=None):
    """compressed-tensors 0.20 on one matrix: (scale [r, c], codes int8, dequant).
    Per-tensor: its dynamic path; per-channel: ``calculate_qparams`` on the
    observer's per-row min/max (what llm-compressor computes for weights)."""
    strategy = "tensor" if isinstance(g, PerTensor) else "channel"
    args = QuantizationArgs(num_bits=8, type="int", strategy=strategy, symmetric=True)
    if scale is not None:
        s = scale.reshape(-1) if strategy == "tensor" else scale
        zp = torch.zeros_like(s, dtype=torch.int8)
    elif strategy == "tensor":
        s, zp = compute_dynamic_scales_and_zp(x2d, args, None)
    else:
        s, zp = calculate_qparams(x2d.amin(1, keepdim=True), x2d.amax(1, keepdim=True), args)
    codes = ct_quantize(x2d, s, zp, args, dtype=torch.int8)
    deq = ct_dequantize(codes, s, zp, args)
    return s.reshape(g.scale_shape(*x2d.shape)), codes, deq


def vllm_kernel_per_token(x):
    """vLLM csrc ``dynamic_scaled_int8_quant_kernel``: scale = absmax / 127.f;
    out = float_to_int8_rn(x * (127.f / absmax)) (round half even, saturate)."""
    amax = x.float().abs().amax(-1, keepdim=True)
    q = torch.round(x.float() * (127.0 / amax)).clamp(-128, 127).to(torch.int8)
    return q, amax / 127.0


def vllm_torch_ref_per_token(x):
    """vLLM tests/kernels/quant_utils.py ``ref_dynamic_per_token_quant`` (int8 branch)."""
    amax = x.abs().max(dim=-1)[0].float()
    scales = (amax / torch.tensor(127.0))[:, None]
    iscales = 1.0 / scales
    q = (x.float() * iscales).round().clamp(-128, 127).to(torch.int8)
    return q, scales


def assert_matches_ct(x, g, arithmetic, scale=None):
    q = int8.quantize(x, g, arithmetic=arithmetic, scale=scale)
    assert q.fmt is Format.INT8 and q.data.dtype == torch.int8 and q.scale.dtype == torch.float32
    deq = int8.dequantize(q, x.dtype)
    for e in range(x.shape[0]):
        s, codes, ref = ct_int8(x[e], g, None if scale is None else scale[e].to(x.dtype))
        assert torch.equal(q.scale[e], s.float()), "scale"
        assert torch.equal(q.data[e], codes), "codes"
        assert torch.equal(deq[e], ref.to(x.dtype)), "dequant"
    return q


# ------------------------------------------------------------------ compressed-tensors


@pytest.mark.parametrize("g", [PerTensor(), PerRow()], ids=str)
@pytest.mark.parametrize("seed,mag", [(0, 1.0), (1, 1e-3), (2, 500.0), (3, 1e-7)])
def test_fp32_input_matches_compressed_tensors_in_both_modes(g, seed, mag):
    x = sample((3, 48, 200), torch.float32, seed, mag)
    assert_matches_ct(x, g, Arithmetic.FP32)
    assert_matches_ct(x, g, Arithmetic.INPUT_DTYPE)


@pytest.mark.parametrize("g", [PerTensor(), PerRow()], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("seed,mag", [(4, 1.0), (5, 40.0), (6, 1e-2)])
def test_half_input_matches_compressed_tensors_in_input_dtype_mode(g, dtype, seed, mag):
    assert_matches_ct(sample((2, 48, 200), dtype, seed, mag), g, Arithmetic.INPUT_DTYPE)


def test_scale_is_amax_over_127_5_and_amax_clips_to_127():
    x = torch.tensor([[127.5, -127.5, 0.5, 1.5, 2.5, -0.5, 126.5, 0.0]])
    q = int8.quantize(x, PerRow())
    assert q.scale.item() == 1.0
    # round half to even (torch.round), +amax -> 127.5 -> 128 -> clipped to 127
    assert q.data.tolist() == [[127, -128, 0, 2, 2, 0, 126, 0]]
    assert torch.equal(q.data, ct_int8(x, PerRow())[1])


@pytest.mark.parametrize("arithmetic", list(Arithmetic), ids=str)
@pytest.mark.parametrize("g", [PerTensor(), PerRow()], ids=str)
def test_static_scale_matches_compressed_tensors(g, arithmetic):
    x = sample((2, 16, 64), torch.float32, 7, 3.0)
    gen = torch.Generator().manual_seed(8)
    scale = torch.rand((2, *g.scale_shape(16, 64)), generator=gen) * 0.02 + 1e-3
    q = assert_matches_ct(x, g, arithmetic, scale=scale)
    assert q.scale is scale or arithmetic is Arithmetic.INPUT_DTYPE
    # a static scale is applied as x / scale whatever the dynamic rule
    assert torch.equal(int8.quantize(x, g, scale=scale, rule=Int8ScaleRule.QMAX).data, q.data)


# ------------------------------------------------------------------ torchao / vLLM


@pytest.mark.parametrize("g,block", [(PerTensor(), (64, 256)), (PerRow(), (1, 256))], ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torchao_same_scale_codes_differ_only_by_reciprocal(g, block, seed):
    """torchao: same scale; codes round(x * (1 / s)), so they differ from
    round(x / s) exactly where the two fp32 quotients round differently."""
    x = sample((64, 256), torch.float32, seed, 2.0)
    s, zp = choose_qparams_affine(
        x, MappingType.SYMMETRIC, block, torch.int8, scale_dtype=torch.float32,
        zero_point_dtype=torch.int8, eps=torch.finfo(torch.float32).eps, keepdim=True,
    )
    codes = quantize_affine(x, block, s, zp, torch.int8)
    q = int8.quantize(x, g)
    assert torch.equal(q.scale, s.reshape(q.scale.shape))
    se = s.expand(64, 256) if s.numel() == 1 else s
    recip = torch.round(x * (1.0 / se)).clamp(-128, 127).to(torch.int8)
    assert torch.equal(codes, recip)  # torchao == reciprocal formula, exactly
    differ = q.data != codes
    assert torch.equal(differ, recip != torch.round(x / se).clamp(-128, 127).to(torch.int8))
    # measured: 79 of 163840 elements (0.05%) over 10 seeds of N(0, 2) rows
    assert differ.sum() <= 0.002 * x.numel()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_qmax_rule_matches_vllm_kernel_formula(dtype, seed):
    x = sample((128, 512), dtype, seed, 3.0)
    q = int8.quantize(x, "token", rule=Int8ScaleRule.QMAX)
    ref_q, ref_s = vllm_kernel_per_token(x)
    assert torch.equal(q.data, ref_q) and torch.equal(q.scale, ref_s)
    # vLLM's torch reference multiplies by 1 / (amax / 127): same scale, and
    # codes that differ only where that multiplier is not 127 / amax
    tq, ts = vllm_torch_ref_per_token(x)
    assert torch.equal(ts, ref_s)
    mult_differs = (1.0 / ref_s) != (127.0 / x.float().abs().amax(-1, keepdim=True))
    assert ((tq != ref_q) & ~mult_differs).sum() == 0
    # and HALF_RANGE is a different grid altogether
    assert not torch.equal(int8.quantize(x, "token").data, q.data)


def test_qmax_all_zero_row_and_arithmetic_conflict():
    x = torch.zeros(2, 64)
    x[1] = torch.linspace(-3, 3, 64)
    q = int8.quantize(x, PerRow(), rule=Int8ScaleRule.QMAX)
    assert q.data[0].abs().sum() == 0 and q.scale[0, 0] == torch.finfo(torch.float32).eps
    assert q.data[1].abs().max() == 127
    with pytest.raises(ValueError, match="QMAX"):
        int8.quantize(x, PerRow(), rule=Int8ScaleRule.QMAX, arithmetic=Arithmetic.INPUT_DTYPE)


# ------------------------------------------------------------------ edge values


def edge_rows(dtype):
    fi = torch.finfo(dtype)
    big = min(fi.max / 4, 1e30)
    rows = [
        torch.zeros(64),
        torch.full((64,), -0.7),  # all-equal (negative): -amax -> -128
        torch.cat([torch.tensor([127.5]), torch.arange(63) - 31.5]),  # exact .5 ties at scale 1
        torch.cat([torch.tensor([127.5]), torch.arange(63) - 31.5 + 2**-7]),  # just above ties
        torch.cat([torch.tensor([127.5]), torch.arange(63) - 31.5 - 2**-7]),  # just below ties
        torch.linspace(-1, 1, 64) * big,
        torch.linspace(-1, 1, 64) * 1e-30,
        torch.full((64,), fi.tiny / 2),  # subnormal input
        torch.full((64,), 1e-45),  # fp32: scale underflows to 0 -> eps rule
        torch.linspace(-5, 5, 64),
    ]
    return torch.stack(rows).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("g", [PerRow(), PerTensor()], ids=str)
def test_edge_values_match_compressed_tensors(dtype, g):
    x = edge_rows(dtype)[None]
    assert_matches_ct(x, g, Arithmetic.INPUT_DTYPE)
    if dtype == torch.float32:
        assert_matches_ct(x, g, Arithmetic.FP32)


def test_edge_value_contract():
    x = edge_rows(torch.float32)
    q = int8.quantize(x, PerRow())
    deq = int8.dequantize(q)
    assert q.scale[0, 0] == torch.finfo(torch.float32).eps and torch.equal(deq[0], torch.zeros(64))
    assert (q.data[1] == -128).all()
    assert q.scale[2, 0] == 1.0
    ties = torch.arange(63) - 31.5
    assert torch.equal(q.data[2, 1:], torch.round(ties).to(torch.int8))  # half to even
    assert torch.equal(q.data[3, 1:], torch.floor(ties + 1).to(torch.int8))  # just above -> up
    assert torch.equal(q.data[4, 1:], torch.floor(ties).to(torch.int8))  # just below -> down
    assert (q.data[8] == 0).all() and q.scale[8, 0] == torch.finfo(torch.float32).eps
    assert torch.isfinite(deq).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_rejected(bad):
    x = torch.randn(4, 32)
    x[2, 5] = bad
    with pytest.raises(ValueError, match="x must be finite"):
        int8.quantize(x)
    with pytest.raises(ValueError, match="x must be finite"):
        int8.quantize(x, scale=torch.ones(4, 1))


def test_batch_dims_are_independent_matrices():
    x = sample((2, 3, 40, 96), torch.bfloat16, 9, 2.0)
    for g in (PerTensor(), PerRow()):
        q = int8.quantize(x, g)
        assert q.scale.shape == (2, 3, *g.scale_shape(40, 96))
        for i in range(2):
            for j in range(3):
                qi = int8.quantize(x[i, j], g)
                assert torch.equal(q.data[i, j], qi.data) and torch.equal(q.scale[i, j], qi.scale)


def test_reject_zero_point():
    int8.reject_zero_point("weight_zero_point", None)
    int8.reject_zero_point("weight_zero_point", torch.zeros(8, 1, dtype=torch.int8))
    with pytest.raises(ValueError, match="input_zero_point has nonzero"):
        int8.reject_zero_point("input_zero_point", torch.tensor([3], dtype=torch.int8))
    with pytest.raises(TypeError, match="integer"):
        int8.reject_zero_point("weight_zero_point", torch.zeros(1))


def test_dispatch_through_formats_table():
    from torch_moe_quant import formats

    x = sample((1, 8, 64), torch.float16, 10, 1.0)
    q = formats.quantize(x, Format.INT8, "channel")
    assert torch.equal(formats.dequantize(q, torch.float16), int8.dequantize(q, torch.float16))


def test_errors_name_argument_and_expectation():
    x = torch.randn(4, 64)
    with pytest.raises(TypeError, match="x must be"):
        int8.quantize(x.to(torch.int8))
    with pytest.raises(ValueError, match="granularities"):
        int8.quantize(x, PerGroup(32))
    with pytest.raises(ValueError, match=r"scale must have shape \(1, 1\)"):
        int8.quantize(x, PerTensor(), scale=torch.ones(4, 1))
    with pytest.raises(TypeError, match="scale must have dtype torch.float32"):
        int8.quantize(x, PerTensor(), scale=torch.ones(1, 1, dtype=torch.float16))
    with pytest.raises(ValueError, match="finite and > 0"):
        int8.quantize(x, PerTensor(), scale=torch.full((1, 1), -1.0))
    with pytest.raises(ValueError, match="Int8ScaleRule"):
        int8.quantize(x, rule="max")
    q = int8.quantize(x)
    with pytest.raises(ValueError, match="zero_point must be None"):
        bad = QuantizedTensor(q.data, q.scale, Format.INT8, PerRow(), (4, 64), zero_point=q.data[:, :1])
        int8.dequantize(bad)
    with pytest.raises(TypeError, match="q.scale must have dtype"):
        int8.dequantize(QuantizedTensor(q.data, q.scale.half(), Format.INT8, PerRow(), (4, 64)))
    with pytest.raises(TypeError, match="dtype must be"):
        int8.dequantize(q, torch.float64)
