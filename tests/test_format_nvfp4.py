"""Bit-exactness of NVFP4 against compressed-tensors 0.20 (the convention for
the global scale, and the ``nvfp4-pack-quantized`` checkpoint format) and
torchao 0.18, plus our documented behaviour where they differ.

compressed-tensors reference pipeline (what llm-compressor runs):
``generate_gparam`` -> ``calculate_qparams`` (block scales) ->
``NVFP4PackedCompressor.compress`` (packed codes, e4m3 scales) and
``.decompress`` / ``fake_quantize`` (dequantized values).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.quant_scheme import NVFP4
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, f32_to_f4_unpacked, pack_uint4
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, nvfp4_quantize

from torch_moe_quant.formats import _minifloat, nvfp4
from torch_moe_quant.formats.core import Format, PerGroup

ARGS = NVFP4["weights"]
SCHEME = QuantizationScheme(targets=["Linear"], weights=ARGS)
E4M3_EIGHTH = 0x20  # 0.125 as e4m3: compressed-tensors' eps for a zero scale


def ct_reference(x: torch.Tensor, global_scale=None):
    """compressed-tensors on a 2-D ``x``: (global_scale [1], packed uint8,
    e4m3 scale, decompressed bf16, fake-quantized x.dtype)."""
    gs = generate_gparam(x.amin(), x.amax()) if global_scale is None else global_scale
    groups = x.unflatten(-1, (-1, 16))
    scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), ARGS, global_scale=gs)
    # llm-compressor keeps weight_scale in the weight's dtype
    state = {"weight": x, "weight_scale": scale.to(x.dtype), "weight_global_scale": gs, "weight_zero_point": zp}
    out = NVFP4PackedCompressor.compress(state, SCHEME)
    dec = NVFP4PackedCompressor.decompress(dict(out), SCHEME)["weight"]
    fq = fake_quantize(x, scale.to(x.dtype), zp, ARGS, global_scale=gs)
    return gs, out["weight_packed"], out["weight_scale"], dec, fq


def check_ct(x: torch.Tensor, global_scale=None) -> nvfp4.QuantizedTensor:
    gs, packed, scale, dec, fq = ct_reference(x, global_scale)
    q = nvfp4.quantize(x, global_scale=global_scale)
    assert torch.equal(q.global_scale.reshape(-1), gs.float().reshape(-1).expand(q.global_scale.numel()))
    assert torch.equal(q.data, packed)
    ours, theirs = q.scale.view(torch.uint8), scale.view(torch.uint8)
    zero = ours == 0  # compressed-tensors stores 0.125 there (see test_zero_block)
    assert torch.equal(ours[~zero], theirs[~zero]) and theirs[zero].eq(E4M3_EIGHTH).all()
    assert torch.equal(nvfp4.dequantize(q, torch.bfloat16), dec)
    assert torch.equal(nvfp4.dequantize(q, x.dtype), fq)
    return q


def random_x(seed, dtype, mag=1.0, rows=32, cols=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * mag
    return x.to(dtype)


def _next(v: float, toward: float, n: int = 1) -> float:
    t = torch.tensor([v], dtype=torch.float32)
    for _ in range(n):
        t = t.nextafter(torch.tensor([toward], dtype=torch.float32))
    return t.item()


def block(values) -> torch.Tensor:
    v = torch.tensor(values, dtype=torch.float32).flatten()[:16]
    return torch.cat([v, torch.zeros(16 - v.numel())])


def edge_rows() -> torch.Tensor:
    """Blocks on which compressed-tensors and we agree bit for bit."""
    fp4 = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]  # fp4 ties
    return torch.stack([
        torch.full((16,), 3.0),  # all-equal
        torch.full((16,), -0.7),
        block([6.0] + fp4 + [-t for t in fp4]),  # ties at global scale 448
        block([6.0] + [_next(t, 0.0) for t in fp4] + [_next(t, 9.0) for t in fp4]),
        block([_next(4.0, 0.0), 1.0, -0.5]),
        block([1e-3, -1e-3, 2e-3]),
        block([1e-6, 3e-7]),  # scale rounds to an e4m3 subnormal
        block([-1e-3, 1.0]),  # negative that rounds to zero keeps its sign
        torch.linspace(-6.0, 6.0, 16),
    ])


# ---------------------------------------------------------------------------
# compressed-tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mag", [1e-3, 1.0, 1e3])
def test_ct_random(dtype, mag):
    for seed in range(3):
        check_ct(random_x(seed, dtype, mag))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ct_edges(dtype):
    check_ct(edge_rows().to(dtype))
    for row in edge_rows():  # each block alone: its amax is the matrix amax
        check_ct(row.reshape(1, 16).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ct_large_and_small(dtype):
    for mag in (1e30, 1e-30):
        check_ct(random_x(5, dtype, mag))
    check_ct(torch.cat([random_x(6, dtype, rows=2, cols=16), block([1e-30, -3e-31]).reshape(1, 16).to(dtype)]))


def test_ct_static_global_scale():
    """A static global scale (e.g. a checkpoint's input_global_scale,
    calibrated on other data) in the shapes checkpoints use."""
    calib = random_x(0, torch.bfloat16, mag=4.0)
    gs = generate_gparam(calib.amin(), calib.amax())  # float32 [1]
    x = random_x(1, torch.bfloat16, mag=8.0)  # values beyond the calibrated range saturate
    q = check_ct(x, gs)
    q2 = nvfp4.quantize(x, global_scale=gs.reshape(1, 1))
    assert torch.equal(q.data, q2.data) and q2.global_scale.shape == (1, 1)
    # 3-D (experts): one global scale per expert, [E, 1, 1] or broadcast [1]
    x3 = torch.stack([random_x(s, torch.bfloat16) for s in range(3)])
    g3 = torch.tensor([100.0, 200.0, 300.0]).reshape(3, 1, 1)
    q3 = nvfp4.quantize(x3, global_scale=g3)
    assert q3.global_scale.shape == (3, 1, 1)
    for e in range(3):
        assert torch.equal(q3.data[e], nvfp4.quantize(x3[e], global_scale=g3[e]).data)
    assert nvfp4.quantize(x3, global_scale=gs).global_scale.shape == (3, 1, 1)


def test_per_matrix_global_scale_3d():
    x3 = torch.stack([random_x(s, torch.bfloat16, mag=10.0**s) for s in range(3)])
    q = nvfp4.quantize(x3)
    assert q.global_scale.shape == (3, 1, 1) and q.scale.shape == (3, 32, 4) and q.data.shape == (3, 32, 32)
    for e in range(3):
        qe = check_ct(x3[e])
        assert torch.equal(q.data[e], qe.data) and torch.equal(q.global_scale[e], qe.global_scale)
    assert torch.equal(nvfp4.dequantize(q, torch.bfloat16)[1], nvfp4.dequantize(nvfp4.quantize(x3[1]), torch.bfloat16))


# ---------------------------------------------------------------------------
# torchao


def test_torchao_elements_and_packing():
    """fp4 element codes (RNE, saturating, signed zero) and nibble order."""
    vals = torch.tensor([0.0, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 6.0, 7.0, 1e9, math.inf, 1e-45])
    vals = torch.cat([vals, -vals])
    codes = _minifloat.encode(vals, nvfp4.ELEMENT)
    assert torch.equal(codes, f32_to_f4_unpacked(vals))
    assert torch.equal(nvfp4.pack(codes), pack_uint4(codes))
    assert torch.equal(_minifloat.decode(codes, nvfp4.ELEMENT), f4_unpacked_to_f32(codes))
    assert torch.equal(nvfp4.unpack(nvfp4.pack(codes), codes.numel()), codes)


def test_torchao_power_of_two_global_scale():
    """torchao's per_tensor_scale is 1 / global_scale and it multiplies by
    reciprocals (x * ((1 / pts) / block_scale)) where compressed-tensors
    divides (x / (block_scale / gs)). With a float32 input and a power-of-two
    global scale both are exact and the results agree bit for bit. (Measured:
    with amax-derived global scales about 0.7% of the scales and 0.2% of the
    packed bytes differ, and with bfloat16 input ties are frequent enough that
    the reciprocal changes some codes even with a power-of-two global scale.)"""
    for seed in range(3):
        x = random_x(seed, torch.float32, rows=32, cols=128)
        gs = torch.tensor([[512.0]])
        q = nvfp4.quantize(x, global_scale=gs)
        scale, data = nvfp4_quantize(x, 16, torch.tensor(1 / 512.0))
        assert torch.equal(q.scale.view(torch.uint8), scale.view(torch.uint8))
        assert torch.equal(q.data, data)
        t = NVFP4Tensor(data, scale, 16, torch.float32, torch.tensor(1 / 512.0))
        assert torch.equal(nvfp4.dequantize(q), t.dequantize(torch.float32))


# ---------------------------------------------------------------------------
# Pinned corners (measured)


def test_zero_block():
    """A block whose scale rounds to 0 (all-zero, or tiny next to the matrix
    amax) stores scale 0 and ±0 codes and dequantizes to ±0 (never NaN).
    compressed-tensors stores 0.125 there; its codes are the same."""
    x = torch.stack([block([0.0]), block([1.0, -2.0]), block([1e-7, -1e-7])])
    q = nvfp4.quantize(x)
    assert q.scale.view(torch.uint8)[:, 0].tolist() == [0, 0x7E, 0]  # 0x7E = 448: the amax block
    d = nvfp4.dequantize(q)
    assert d[0].eq(0).all() and d[2].eq(0).all() and not d.isnan().any()
    assert torch.signbit(d[2, 1])
    _, _, scale, _, _ = ct_reference(x)
    assert scale.view(torch.uint8)[[0, 2], 0].tolist() == [E4M3_EIGHTH, E4M3_EIGHTH]
    check_ct(x)
    # an all-zero matrix: global scale 1.0 (as compressed-tensors), scales 0
    qz = nvfp4.quantize(torch.zeros(2, 32))
    assert qz.global_scale.item() == 1.0 and qz.scale.view(torch.uint8).eq(0).all()
    assert nvfp4.dequantize(qz).eq(0).all()


def test_exact_negative_zero():
    """An exact -0.0 input keeps its sign (code 8), as in torchao; compressed-
    tensors' cast_to_fp4 multiplies by torch.sign(-0.0) == +0.0 and stores
    code 0. (Negatives that round to zero get code 8 in both.)"""
    x = block([-0.0, -1e-3, 1.0]).reshape(1, 16)
    q = nvfp4.quantize(x)
    codes = nvfp4.unpack(q.data, 16)
    assert codes[0, :2].tolist() == [8, 8]
    _, packed, _, _, _ = ct_reference(x)
    assert nvfp4.unpack(packed, 16)[0, :2].tolist() == [0, 8]
    _, data = nvfp4_quantize(x, 16, 1.0 / q.global_scale.reshape(()))
    assert nvfp4.unpack(data, 16)[0, :2].tolist() == [8, 8]


def test_float16_global_scale_overflow():
    """The global scale is computed in x.dtype like compressed-tensors: for
    float16 input with amax < 2688 / 65504 the quotient overflows and the
    global scale falls back to 1.0, so small blocks lose their scale
    (pinned, same as compressed-tensors)."""
    x = random_x(0, torch.float16, mag=0.005)
    assert x.abs().max() < 2688 / 65504
    q = check_ct(x)
    assert q.global_scale.item() == 1.0
    assert nvfp4.quantize(x.float()).global_scale.item() != 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nan_policy(dtype):
    """NaN: the global scale ignores it; its block gets scale NaN (0x7F) and
    codes 0 and dequantizes to NaN; other blocks are as without the NaN.
    compressed-tensors gives the whole matrix global scale 1.0 (measured)."""
    clean = random_x(0, dtype, rows=4, cols=32)
    x = clean.clone()
    x[1, 3] = math.nan
    zeroed = clean.clone()
    zeroed[1, :16] = 0
    q, qc = nvfp4.quantize(x), nvfp4.quantize(zeroed)
    assert torch.equal(q.global_scale, nvfp4.global_scale_of(zeroed))
    assert q.scale.view(torch.uint8)[1, 0].item() == 0x7F
    codes = nvfp4.unpack(q.data, 32)
    assert codes[1, :16].eq(0).all()
    d = nvfp4.dequantize(q)
    assert d[1, :16].isnan().all() and d.isnan().sum() == 16
    keep = torch.ones_like(codes, dtype=torch.bool)
    keep[1, :16] = False
    assert torch.equal(codes[keep], nvfp4.unpack(qc.data, 32)[keep])
    assert generate_gparam(x.amin(), x.amax()).item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_inf_policy(dtype):
    """±inf: the global scale ignores it; its block gets the largest scale
    448 (0x7E), the infs saturate to ±6 and dequantize to the finite
    ±2688 / global_scale (e4m3 has no inf; saturating like fp8).
    compressed-tensors computes global scale 2688 / inf = 0 (measured)."""
    x = random_x(1, dtype, rows=2, cols=32)
    x[0, 0], x[1, 17] = math.inf, -math.inf
    q = nvfp4.quantize(x)
    finite = x.clone()
    finite[0, 0] = finite[1, 17] = 0
    assert torch.equal(q.global_scale, nvfp4.global_scale_of(finite))
    assert q.scale.view(torch.uint8)[0, 0].item() == 0x7E and q.scale.view(torch.uint8)[1, 1].item() == 0x7E
    codes = nvfp4.unpack(q.data, 32)
    assert codes[0, 0].item() == 7 and codes[1, 17].item() == 15
    d = nvfp4.dequantize(q)
    gs = q.global_scale.item()
    assert d[0, 0].item() == pytest.approx(2688 / gs) and d[1, 17].item() == pytest.approx(-2688 / gs)
    assert d.isfinite().all()
    assert generate_gparam(x.amin(), x.amax()).item() == 0.0


# ---------------------------------------------------------------------------
# API contract and errors


def test_fields():
    x = random_x(0, torch.bfloat16)
    q = nvfp4.quantize(x)
    assert nvfp4.DEFAULT_GRANULARITY == PerGroup(16)
    assert q.fmt is Format.NVFP4 and q.granularity == PerGroup(16) and q.rounding is None
    assert q.data.dtype == torch.uint8 and q.data.shape == (32, 32)
    assert q.scale.dtype == torch.float8_e4m3fn and q.scale.shape == (32, 4)
    assert q.global_scale.dtype == torch.float32 and q.global_scale.shape == (1, 1)
    assert nvfp4.dequantize(q, torch.float16).dtype == torch.float16


def test_errors():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="granularity"):
        nvfp4.quantize(x, PerGroup(32))
    with pytest.raises(ValueError, match=r"x: the last dim \(cols=40\) must be a multiple of 16"):
        nvfp4.quantize(torch.randn(4, 40))
    with pytest.raises(TypeError, match="x must be"):
        nvfp4.quantize(x.to(torch.int32))
    with pytest.raises(ValueError, match="global_scale must broadcast to"):
        nvfp4.quantize(x, global_scale=torch.ones(4))
    with pytest.raises(TypeError, match="global_scale must be a float tensor"):
        nvfp4.quantize(x, global_scale=torch.ones(1, dtype=torch.int32))
    q = nvfp4.quantize(x)
    with pytest.raises(TypeError, match=r"q\.scale must have dtype torch.float8_e4m3fn"):
        nvfp4.dequantize(dataclasses.replace(q, scale=q.scale.view(torch.uint8)))
    with pytest.raises(TypeError, match=r"q\.data must have dtype torch.uint8"):
        nvfp4.dequantize(dataclasses.replace(q, data=q.data.view(torch.int8)))
    with pytest.raises(ValueError, match=r"q\.global_scale is required"):
        nvfp4.dequantize(dataclasses.replace(q, global_scale=None))
    with pytest.raises(TypeError, match="packed must be"):
        nvfp4.unpack(q.data.view(torch.int8), 64)
    with pytest.raises(ValueError, match="cols=62"):
        nvfp4.unpack(q.data, 62)
    with pytest.raises(ValueError, match="codes must be 4-bit"):
        nvfp4.pack(torch.full((2, 16), 16, dtype=torch.uint8))
