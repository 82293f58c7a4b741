"""Bit-exactness of the MX formats (mxfp4, mxfp6 e2m3/e3m2, mxfp8) against
their public references, and our documented behaviour where they differ.

References (test dependencies, imported directly):

* AMD Quark 0.13: ``even_round`` (its default ``even`` shared exponent),
  ``fake_quantize_mx`` (its QDQ), ``Pack_fp4`` / ``Pack_fp6`` (checkpoint
  packing) and ``to_e8m0_uint8`` (checkpoint scale bytes).
* torchao 0.18: ``torchao.prototype.mx_formats.mx_tensor.to_mx`` / ``to_dtype``
  for ``FLOOR``, ``EVEN`` and ``RCEIL``, and its fp4/fp6 element casts.

Every corner where a reference differs is pinned by its own test that says
what the reference does (measured with the versions above).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from quark.torch.kernel.hw_emulation.hw_emulation_interface import fake_quantize_mx
from quark.torch.quantization.utils import even_round
from quark.torch.utils.numerics import to_e8m0_uint8
from quark.torch.utils.pack import Pack_fp4, Pack_fp6
from torchao.prototype.custom_fp_utils import _f32_to_floatx_unpacked, _floatx_unpacked_to_f32
from torchao.prototype.mx_formats.config import ScaleCalculationMode
from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
from torchao.prototype.mx_formats.kernels import pack_uint4
from torchao.prototype.mx_formats.mx_tensor import get_fp_scale, to_dtype, to_mx

from torch_moe_quant.formats import _e8m0, _minifloat, mxfp4, mxfp6, mxfp8
from torch_moe_quant.formats.core import Format, PerGroup, QuantizedTensor, ScaleRounding

FLOOR, EVEN, RCEIL = ScaleRounding.FLOOR, ScaleRounding.EVEN, ScaleRounding.RCEIL
AO_MODE = {FLOOR: ScaleCalculationMode.FLOOR, EVEN: ScaleCalculationMode.EVEN, RCEIL: ScaleCalculationMode.RCEIL}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One MX format and how each reference names it."""

    name: str
    mod: object  # module or mxfp6.E2M3 / E3M2
    fmt: Format
    elem: _minifloat.ElementFormat
    ao_dtype: object
    quark_name: str

    def __repr__(self) -> str:
        return self.name

    def codes(self, q: QuantizedTensor) -> torch.Tensor:
        """Our element codes (uint8, one per element)."""
        return self.mod.unpack(q.data, q.shape[-1])

    def ao_codes(self, data: torch.Tensor) -> torch.Tensor:
        """torchao ``to_mx`` data as one uint8 code per element."""
        if self.fmt is Format.MXFP4:
            return mxfp4.unpack(data.view(torch.uint8), data.shape[-1] * 2)
        return data.view(torch.uint8)

    def quark_pack(self, values: torch.Tensor) -> torch.Tensor:
        """Quark's checkpoint bytes for element values (float32)."""
        if self.fmt is Format.MXFP4:
            return Pack_fp4(None, "fp4").pack(values, False)
        if self.fmt is Format.MXFP8:
            return values.to(torch.float8_e4m3fn).view(torch.uint8)
        return Pack_fp6(None, self.quark_name, self.elem.ebits, self.elem.mbits).pack(values, False)


SPECS = [
    Spec("mxfp4", mxfp4, Format.MXFP4, _minifloat.FP4_E2M1, torch.float4_e2m1fn_x2, "fp4"),
    Spec("mxfp6_e2m3", mxfp6.E2M3, Format.MXFP6_E2M3, _minifloat.FP6_E2M3, DTYPE_FP6_E2M3, "fp6_e2m3"),
    Spec("mxfp6_e3m2", mxfp6.E3M2, Format.MXFP6_E3M2, _minifloat.FP6_E3M2, DTYPE_FP6_E3M2, "fp6_e3m2"),
    Spec("mxfp8", mxfp8, Format.MXFP8, _minifloat.FP8_E4M3, torch.float8_e4m3fn, "fp8_e4m3"),
]
SUB_BYTE = SPECS[:3]


# ---------------------------------------------------------------------------
# Inputs


def random_x(seed: int, dtype: torch.dtype, rows: int = 16, cols: int = 128) -> torch.Tensor:
    """Gaussian rows whose magnitudes span 1e-6 .. 1e6."""
    g = torch.Generator().manual_seed(seed)
    mag = 10.0 ** torch.randint(-6, 7, (rows, 1), generator=g)
    return (torch.randn(rows, cols, generator=g) * mag).to(dtype)


def _next(v: float, toward: float, n: int = 1) -> float:
    t = torch.tensor([v], dtype=torch.float32)
    for _ in range(n):
        t = t.nextafter(torch.tensor([toward], dtype=torch.float32))
    return t.item()


def block(values) -> torch.Tensor:
    """A float32 block of 32: ``values`` then zeros."""
    v = torch.tensor(values, dtype=torch.float32).flatten()[:32]
    return torch.cat([v, torch.zeros(32 - v.numel())])


def tie_block(elem: _minifloat.ElementFormat, k: int, sign: float = 1.0) -> torch.Tensor:
    """``±max_normal * 2**k`` plus midpoints (ties) between consecutive
    representable values and the floats just above and below them, all times
    ``2**k``. With the max in the block every rounding mode picks scale
    ``2**k``, so the other entries land exactly on (or next to) ties."""
    vals = sorted({abs(v) for v in elem.table if not math.isnan(v)})
    mids = [(a + b) / 2 for a, b in zip(vals, vals[1:])]
    picks = [elem.max_normal, elem.max_normal * 1.0625, mids[0], mids[1], mids[-1], mids[len(mids) // 2]]
    for m in (mids[0], mids[2], mids[-1], mids[len(mids) // 3]):
        picks += [_next(m, 0.0), _next(m, math.inf)]
    picks += [vals[1], vals[1] / 2, _next(vals[1] / 2, math.inf), vals[-2], -vals[3], -mids[1]]
    return block([sign * p * 2.0**k for p in picks])


#: Edge blocks on which all references agree with us (corner blocks are
#: tested one by one below).
def common_edges(elem: _minifloat.ElementFormat) -> torch.Tensor:
    rows = [
        torch.full((32,), 3.0),  # all-equal block
        torch.full((32,), -0.7),
        block([4.0, 1.0, 0.5, -0.25]),  # powers of two
        block([_next(4.0, 0.0), 1.0]),  # amax 1 ulp below a power of two
        block([_next(2.0**-20, 0.0, 3), 1e-7]),  # 3 ulps below
        block([1e30, -3e29, 1.0, 7.0]),  # very large
        block([1e-30, -3e-31, 1e-32]),  # very small
        block([2.0**-100, 2.0**-101, 3 * 2.0**-103]),
        tie_block(elem, 0),
        tie_block(elem, -3, -1.0),
        tie_block(elem, 20),
        tie_block(elem, -60),
    ]
    return torch.stack(rows)


# ---------------------------------------------------------------------------
# torchao: FLOOR / EVEN / RCEIL


def _check_torchao(spec: Spec, x: torch.Tensor, mode: ScaleRounding) -> None:
    q = spec.mod.quantize(x, PerGroup(32), rounding=mode)
    scale, data = to_mx(x.contiguous(), spec.ao_dtype, 32, AO_MODE[mode])
    assert torch.equal(q.scale, scale.view(torch.uint8))
    assert torch.equal(spec.codes(q), spec.ao_codes(data))
    ref = to_dtype(data, scale, spec.ao_dtype, 32, torch.float32)
    assert torch.equal(spec.mod.dequantize(q, torch.float32), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", [FLOOR, EVEN, RCEIL])
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_torchao_random(spec, mode, dtype):
    for seed in range(3):
        _check_torchao(spec, random_x(seed, dtype), mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", [FLOOR, EVEN, RCEIL])
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_torchao_edges(spec, mode, dtype):
    _check_torchao(spec, common_edges(spec.elem).to(dtype), mode)


def test_torchao_batched_3d():
    x = random_x(7, torch.bfloat16, rows=24, cols=64).reshape(3, 8, 64)
    q = mxfp4.quantize(x, rounding=RCEIL)
    assert q.data.shape == (3, 8, 32) and q.scale.shape == (3, 8, 2) and q.shape == (3, 8, 64)
    scale, data = to_mx(x, torch.float4_e2m1fn_x2, 32, ScaleCalculationMode.RCEIL)
    assert torch.equal(q.scale, scale.view(torch.uint8)) and torch.equal(q.data, data.view(torch.uint8))
    for e in range(3):
        assert torch.equal(mxfp4.quantize(x[e], rounding=RCEIL).data, q.data[e])


# ---------------------------------------------------------------------------
# AMD Quark: EVEN (its default), fake-quant values, checkpoint bytes


def quark_qdq(spec: Spec, x: torch.Tensor, mode: str = "even") -> torch.Tensor:
    """Quark's MX fake quantization (QDQ) of ``x`` along the last dim."""
    return fake_quantize_mx(
        x, axis=-1, block_size=32, scale_calculation_mode=mode, mx_element_dtype=spec.quark_name
    )


def _clear_negative_zero(spec: Spec, q: QuantizedTensor) -> torch.Tensor:
    """Our packed bytes with ``-0`` codes turned into ``+0`` (Quark stores +0)."""
    if spec.fmt is Format.MXFP8:
        return q.data.view(torch.uint8)
    codes = spec.codes(q)
    codes = torch.where(codes == spec.elem.sign_bit, 0, codes).to(torch.uint8)
    return spec.mod.pack(codes)


def _check_quark(spec: Spec, x: torch.Tensor) -> None:
    q = spec.mod.quantize(x, rounding=EVEN)
    amax = x.unflatten(-1, (-1, 32)).abs().amax(-1, keepdim=True)
    scale = even_round(amax, spec.quark_name)  # float32 powers of two
    # shared exponent: the value, and Quark's checkpoint byte (its exporter
    # clamps the scale to >= 2**-126 first, see test_zero_block_scale_byte)
    assert torch.equal(_e8m0.decode_scale(q.scale), scale.squeeze(-1))
    normal = scale.squeeze(-1) >= 2.0**-126
    assert torch.equal(to_e8m0_uint8(scale.squeeze(-1))[normal], q.scale[normal])
    # elements: Quark's QDQ values divided by its scale (exact), packed by Quark
    fq32 = quark_qdq(spec, x.float())
    values = (fq32.unflatten(-1, (-1, 32)) / scale).flatten(-2)
    assert torch.equal(_clear_negative_zero(spec, q), spec.quark_pack(values))
    # dequantized values in the input dtype
    fq = quark_qdq(spec, x)
    assert torch.equal(spec.mod.dequantize(q, x.dtype), fq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_quark_random(spec, dtype):
    for seed in range(3):
        x = random_x(seed, torch.float32, rows=8)
        if dtype is torch.float16:
            x = x.clamp(-6e4, 6e4) * 1e-2  # keep within float16's range
        _check_quark(spec, x.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_quark_edges(spec, dtype):
    x = common_edges(spec.elem)
    if dtype is torch.float16:  # only the rows that are finite and normal in float16
        x = torch.cat([x[:5], x[8:10]])
    _check_quark(spec, x.to(dtype))


def test_quark_fp6_packing_layout():
    """Pack_fp6 bit order: v0 | v1 << 6 | v2 << 12 | v3 << 18, low byte first."""
    codes = torch.tensor([[0x01, 0x22, 0x3F, 0x15]], dtype=torch.uint8)
    word = 0x01 | 0x22 << 6 | 0x3F << 12 | 0x15 << 18
    expected = torch.tensor([[word & 0xFF, (word >> 8) & 0xFF, word >> 16]], dtype=torch.uint8)
    assert torch.equal(mxfp6.pack(codes), expected)
    assert torch.equal(mxfp6.unpack(expected, 4), codes)
    # every code (negative zero included) against Quark's packer
    g = torch.Generator().manual_seed(0)
    for spec in SPECS[1:3]:
        codes = torch.randint(0, 64, (8, 64), generator=g, dtype=torch.uint8)
        codes[0, :4] = torch.tensor([0x20, 0x00, 0x1F, 0x3F])
        values = _minifloat.decode(codes, spec.elem)
        packed = spec.mod.pack(codes)
        assert torch.equal(packed, spec.quark_pack(values))
        assert torch.equal(spec.mod.unpack(packed, 64), codes)


def test_fp4_packing_layout():
    """Element 2i in the low nibble (OCP / gpt-oss / Quark / torchao)."""
    codes = torch.tensor([[0x1, 0x2, 0x3, 0x4, 0xF, 0x8]], dtype=torch.uint8)
    assert mxfp4.pack(codes).tolist() == [[0x21, 0x43, 0x8F]]
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (4, 64), generator=g, dtype=torch.uint8)
    packed = mxfp4.pack(codes)
    assert torch.equal(packed, pack_uint4(codes))
    assert torch.equal(packed, Pack_fp4(None, "fp4").pack(_minifloat.decode(codes, _minifloat.FP4_E2M1), False))
    assert torch.equal(mxfp4.unpack(packed, 64), codes)


def test_mxfp8_pack_is_a_view():
    codes = torch.arange(256, dtype=torch.uint8).reshape(8, 32)
    packed = mxfp8.pack(codes)
    assert packed.dtype == torch.float8_e4m3fn
    assert torch.equal(mxfp8.unpack(packed, 32), codes)


# ---------------------------------------------------------------------------
# Element codecs and e8m0 bytes


def _sweep(elem: _minifloat.ElementFormat) -> torch.Tensor:
    """Every value, midpoint and the floats next to midpoints, both signs,
    over the element's range, plus out-of-range, subnormal and infinite."""
    vals = sorted({abs(v) for v in elem.table if not math.isnan(v)})
    mids = [(a + b) / 2 for a, b in zip(vals, vals[1:])]
    pts = vals + mids + [_next(m, 0.0) for m in mids] + [_next(m, math.inf) for m in mids]
    pts += [elem.max_normal * 1.5, elem.max_normal * 2.1, 1e30, 1e-40, 1e-45, math.inf]
    t = torch.tensor(pts, dtype=torch.float32)
    return torch.cat([t, -t])


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_element_codec(spec):
    elem = spec.elem
    x = _sweep(elem)
    codes = _minifloat.encode(x, elem)
    if spec.fmt is Format.MXFP8:
        ref = x.to(torch.float8_e4m3fn).view(torch.uint8)  # torch 2.13 saturates
    else:  # torchao: RNE, saturating, sign from the sign bit
        ref = _f32_to_floatx_unpacked(x, elem.ebits, elem.mbits)
    assert torch.equal(codes, ref)
    # decode: every code against torchao / torch
    all_codes = torch.arange(1 << elem.bits, dtype=torch.uint8)
    table = _minifloat.decode(all_codes, elem)
    if spec.fmt is Format.MXFP8:
        ref = all_codes.view(torch.float8_e4m3fn).float()
    else:
        ref = _floatx_unpacked_to_f32(all_codes, elem.ebits, elem.mbits)
    assert torch.allclose(table, ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(table), torch.signbit(ref))  # -0 included
    # round trip, and NaN -> 0 by contract
    finite = all_codes[~table.isnan()]
    assert torch.equal(_minifloat.encode(_minifloat.decode(finite, elem), elem), finite)
    assert _minifloat.encode(torch.tensor([math.nan]), elem).item() == 0


def test_e8m0_decode_all_bytes():
    b = torch.arange(256, dtype=torch.uint8)
    ours = _e8m0.decode_scale(b)
    ref = get_fp_scale(b)
    assert torch.allclose(ours, ref, rtol=0, atol=0, equal_nan=True)
    assert ours[0].item() == 2.0**-127 and ours[254].item() == 2.0**127 and math.isnan(ours[255])
    assert torch.equal(_e8m0.reciprocal_scale(b[:255]) * ours[:255], torch.ones(255))


def test_e8m0_not_a_rounding_cast():
    """PyTorch's float -> float8_e8m0fnu cast rounds up (3.0 -> 4.0, measured
    with torch 2.13); the OCP FLOOR exponent of amax 3 * 4 = 12 is
    floor(log2(12)) - 2 = 1."""
    assert torch.tensor([3.0]).to(torch.float8_e8m0fnu).view(torch.uint8).item() == 129
    q = mxfp4.quantize(block([12.0]).reshape(1, 32))
    assert q.scale.item() == 128


# ---------------------------------------------------------------------------
# Pinned corners where the references differ (measured, see module docstrings)


@pytest.mark.parametrize("spec", SUB_BYTE, ids=repr)
def test_negative_zero_keeps_sign(spec):
    """-0.0 and negatives that round to zero give the -0 code (torchao agrees);
    Quark's element quantizer returns +0.0 there."""
    x = block([-0.0, -1e-3, 1.0]).reshape(1, 32)
    q = spec.mod.quantize(x, rounding=EVEN)
    codes = spec.codes(q)
    assert codes[0, 0].item() == codes[0, 1].item() == spec.elem.sign_bit
    _, data = to_mx(x, spec.ao_dtype, 32, ScaleCalculationMode.EVEN)
    assert torch.equal(codes, spec.ao_codes(data))
    fq = quark_qdq(spec, x)
    assert not torch.signbit(fq[0, :2]).any()  # Quark: +0
    assert torch.signbit(spec.mod.dequantize(q)[0, :2]).all()


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_zero_block_scale_byte(spec):
    """All-zero block -> scale byte 0 (2**-127) in every mode; torchao stores
    0 too; Quark's even_round gives 2**-127 but its exporter writes byte 1."""
    x = torch.zeros(2, 32)
    for mode in ScaleRounding:
        q = spec.mod.quantize(x, rounding=mode)
        assert q.scale.tolist() == [[0], [0]]
        assert spec.codes(q).eq(0).all()
        assert torch.equal(spec.mod.dequantize(q), x)
        assert to_mx(x, spec.ao_dtype, 32, AO_MODE[mode])[0].view(torch.uint8).tolist() == [[0], [0]]
    scale = even_round(torch.zeros(1), spec.quark_name)
    assert scale.item() == 2.0**-127
    assert to_e8m0_uint8(scale).item() == 1


def _encode(spec: Spec, scaled: torch.Tensor) -> torch.Tensor:
    """Element codes of already scaled float32 values."""
    if spec.fmt is Format.MXFP8:
        return scaled.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    return _minifloat.encode(scaled, spec.elem)


def _decode(spec: Spec, codes: torch.Tensor) -> torch.Tensor:
    if spec.fmt is Format.MXFP8:
        return codes.view(torch.float8_e4m3fn).float()
    return _minifloat.decode(codes, spec.elem)


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_tiny_block_scales_by_2pow127(spec):
    """Scale byte 0 with nonzero data: we scale by exactly 2**127 (as Quark
    does). torchao FLOOR/EVEN divide by 2**-126 instead (codes one binade
    lower) and RCEIL does not scale at all (codes flush to 0)."""
    x = torch.stack([block([1e-38, -5e-39, 2e-39]), block([1e-40, -1e-41])])
    ours = {}
    for mode in ScaleRounding:
        q = spec.mod.quantize(x, rounding=mode)
        assert q.scale.eq(0).all()
        ours[mode] = spec.codes(q)
        assert torch.equal(ours[mode], _encode(spec, x * 2.0**127))
    _check_quark(spec, x)  # Quark agrees
    for mode in (FLOOR, EVEN):
        _, data = to_mx(x, spec.ao_dtype, 32, AO_MODE[mode])
        assert torch.equal(spec.ao_codes(data), _encode(spec, x * 2.0**126))
    _, data = to_mx(x, spec.ao_dtype, 32, ScaleCalculationMode.RCEIL)
    assert (spec.ao_codes(data) & ~spec.elem.sign_bit).eq(0).all()
    assert (ours[RCEIL] & ~spec.elem.sign_bit).ne(0).any()


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_rceil_is_an_exact_ceil(spec):
    """RCEIL: ceil(log2(amax / max)) from the bits. For amax / max one ulp
    above 2**k torch.log2 in float32 rounds to k, so torchao picks 2**k (and
    saturates the max element); we pick 2**(k+1) like the hardware's
    cvt.rp.satfinite.ue8m0."""
    m = spec.elem.max_normal
    for k in (4, -10):
        amax = _next(m * 2.0**k, math.inf)
        x = block([amax, 1.0 * 2.0**k]).reshape(1, 32)
        q = spec.mod.quantize(x, rounding=RCEIL)
        assert q.scale.item() == 127 + k + 1
        scale, _ = to_mx(x, spec.ao_dtype, 32, ScaleCalculationMode.RCEIL)
        assert scale.view(torch.uint8).item() == 127 + k
    # exactly 2**k: ceil is k for both
    x = block([m * 2.0**4]).reshape(1, 32)
    assert spec.mod.quantize(x, rounding=RCEIL).scale.item() == 131


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_floor_reads_exponent_bits(spec):
    """amax 1..3 ulps below 2**-20: floor(log2) is -21. float32 torch.log2
    rounds it to -20.0, which Quark's ``floor`` mode uses (doubling the
    scale); torchao FLOOR reads the bits like us."""
    amax = _next(2.0**-20, 0.0)
    x = block([amax, 1e-7]).reshape(1, 32)
    q = spec.mod.quantize(x, rounding=FLOOR)
    assert q.scale.item() == 127 - 21 - spec.elem.emax
    assert to_mx(x, spec.ao_dtype, 32, ScaleCalculationMode.FLOOR)[0].view(torch.uint8).item() == q.scale.item()
    assert torch.log2(torch.tensor([amax])).item() == -20.0
    fq = quark_qdq(spec, x, "floor")
    doubled = 2.0 ** (-20 - spec.elem.emax)  # Quark's scale
    assert torch.equal(fq, _decode(spec, _encode(spec, x / doubled)) * doubled)
    assert not torch.equal(fq, spec.mod.dequantize(q))


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_inf_policy(spec):
    """±inf in a block: scale 254 (2**127); infs saturate to ±max, finite
    neighbours to ±0; dequantize gives ±inf back (max * 2**127 overflows).
    torchao RCEIL agrees bit for bit; torchao FLOOR/EVEN read the inf exponent
    field as 2**128 and store 255 - emax_elem; Quark's even_round gives
    2**127 (its packed codes for inf are meaningless)."""
    x = torch.stack([block([math.inf, 1.0, -2.0]), block([-math.inf, 3.0])])
    smax = spec.elem.max_code
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for mode in ScaleRounding:
            q = spec.mod.quantize(x.to(dtype), rounding=mode)
            assert q.scale.tolist() == [[254], [254]]
            codes = spec.codes(q)
            assert codes[0, 0].item() == smax and codes[1, 0].item() == smax | spec.elem.sign_bit
            assert (codes[:, 1:] & ~spec.elem.sign_bit).eq(0).all()
            for out in (torch.float32, torch.bfloat16, torch.float16):
                d = spec.mod.dequantize(q, out)
                assert d[0, 0].item() == math.inf and d[1, 0].item() == -math.inf
                assert d[:, 1:].eq(0).all()
    scale, data = to_mx(x, spec.ao_dtype, 32, ScaleCalculationMode.RCEIL)
    q = spec.mod.quantize(x, rounding=RCEIL)
    assert torch.equal(q.scale, scale.view(torch.uint8)) and torch.equal(spec.codes(q), spec.ao_codes(data))
    for mode in (FLOOR, EVEN):
        scale, _ = to_mx(x, spec.ao_dtype, 32, AO_MODE[mode])
        assert scale.view(torch.uint8).tolist() == [[255 - spec.elem.emax]] * 2
    assert even_round(torch.tensor([math.inf]), spec.quark_name).item() == 2.0**127


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_even_rounding_past_float32_max(spec):
    """EVEN on a float32 amax that rounds up to 2**128: 128 - emax (torchao
    EVEN agrees); Quark's even_round overflows to inf and clamps to 2**127."""
    x = block([3.4e38, 1.0]).reshape(1, 32)
    q = spec.mod.quantize(x, rounding=EVEN)
    assert q.scale.item() == 127 + 128 - spec.elem.emax
    assert to_mx(x, spec.ao_dtype, 32, ScaleCalculationMode.EVEN)[0].view(torch.uint8).item() == q.scale.item()
    assert even_round(torch.tensor([3.4e38]), spec.quark_name).item() == 2.0**127


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_nan_policy(spec):
    """NaN in a block: scale 255, every code 0, the block dequantizes to NaN;
    other blocks are untouched. All references give scale 255 / NaN output;
    their codes differ (torchao FLOOR/EVEN: garbage or NaN codes for the NaN
    elements; Quark passes NaN through its element quantizer)."""
    x = torch.cat([block([math.nan, 1.0, -2.0]), block([0.5, -0.25])]).reshape(1, 64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for mode in ScaleRounding:
            q = spec.mod.quantize(x.to(dtype), rounding=mode)
            clean = spec.mod.quantize(x[:, 32:].to(dtype), rounding=mode)
            assert q.scale[0, 0].item() == 255 and q.scale[0, 1].item() == clean.scale.item()
            codes = spec.codes(q)
            assert codes[0, :32].eq(0).all() and torch.equal(codes[:, 32:], spec.codes(clean))
            d = spec.mod.dequantize(q)
            assert d[0, :32].isnan().all() and torch.equal(d[:, 32:], spec.mod.dequantize(clean))
    for mode in ScaleRounding:
        scale, data = to_mx(x, spec.ao_dtype, 32, AO_MODE[mode])
        assert scale.view(torch.uint8)[0, 0].item() == 255
        assert to_dtype(data, scale, spec.ao_dtype, 32, torch.float32)[0, :32].isnan().all()
    fq = quark_qdq(spec, x)
    assert fq[0, :32].isnan().all()


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_float16_input_equals_float32(spec):
    """torchao does not take float16; the result only depends on the values."""
    x = random_x(3, torch.float32).clamp(-6e4, 6e4).half()
    for mode in ScaleRounding:
        a, b = spec.mod.quantize(x, rounding=mode), spec.mod.quantize(x.float(), rounding=mode)
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)) and torch.equal(a.scale, b.scale)


# ---------------------------------------------------------------------------
# API contract and errors


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_quantized_tensor_fields(spec):
    x = random_x(0, torch.bfloat16, rows=4, cols=64).reshape(2, 2, 64)
    q = spec.mod.quantize(x, spec.mod.DEFAULT_GRANULARITY, rounding="even")
    assert spec.mod.DEFAULT_GRANULARITY == PerGroup(32)
    assert q.fmt is spec.fmt and q.rounding is EVEN and q.shape == (2, 2, 64)
    assert q.granularity == PerGroup(32) and q.global_scale is None
    num, den = (1, 2) if spec.fmt is Format.MXFP4 else (1, 1) if spec.fmt is Format.MXFP8 else (3, 4)
    assert q.data.shape == (2, 2, 64 * num // den) and q.scale.shape == (2, 2, 2)
    assert q.data.dtype == (torch.float8_e4m3fn if spec.fmt is Format.MXFP8 else torch.uint8)
    assert q.scale.dtype == torch.uint8
    assert spec.mod.dequantize(q, torch.bfloat16).dtype == torch.bfloat16
    assert spec.mod.quantize(x).rounding is FLOOR  # OCP default


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_errors(spec):
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="granularity"):
        spec.mod.quantize(x, PerGroup(16))
    with pytest.raises(ValueError, match=r"x: the last dim \(cols=48\) must be a multiple of 32"):
        spec.mod.quantize(torch.randn(4, 48))
    with pytest.raises(TypeError, match="x must be float16/bfloat16/float32"):
        spec.mod.quantize(x.double())
    with pytest.raises(ValueError, match="rounding must be one of"):
        spec.mod.quantize(x, rounding="nearest")
    q = spec.mod.quantize(x)
    with pytest.raises(TypeError, match=r"q\.data must have dtype"):
        spec.mod.dequantize(dataclasses.replace(q, data=q.data.view(torch.int8)))
    with pytest.raises(TypeError, match=r"q\.scale must have dtype torch.uint8"):
        spec.mod.dequantize(dataclasses.replace(q, scale=q.scale.float()))
    with pytest.raises(ValueError, match=r"q\.scale must have shape"):
        spec.mod.dequantize(dataclasses.replace(q, scale=q.scale[:, :1]))
    with pytest.raises(TypeError, match="dtype must be"):
        spec.mod.dequantize(q, torch.int32)
    with pytest.raises(TypeError, match="packed must be"):
        spec.mod.unpack(q.data.view(torch.int8), 64)
    with pytest.raises(ValueError, match="cols=60"):
        spec.mod.unpack(q.data, 60)
    with pytest.raises(TypeError, match="codes must be a uint8"):
        spec.mod.pack(torch.zeros(4, 64, dtype=torch.int32))
    if spec.fmt is not Format.MXFP8:
        with pytest.raises(ValueError, match=f"codes must be {spec.elem.bits}-bit"):
            spec.mod.pack(torch.full((4, 64), 1 << spec.elem.bits, dtype=torch.uint8))
    other = mxfp8 if spec.mod is not mxfp8 else mxfp4
    with pytest.raises(ValueError, match=r"q\.fmt must be"):
        spec.mod.dequantize(other.quantize(x))
