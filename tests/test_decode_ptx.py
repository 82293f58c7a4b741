"""The decode kernel's PTX decoders, run on the CPU by a small PTX interpreter.

CI has no GPU, and the Triton interpreter runs the kernel's plain-Triton
decode (``ASM=False``), not the inline PTX. This interprets the PTX text of
``_INT4_SPLIT_PTX`` and the fp4 decoders ``_FP4_MX_PTX`` / ``_FP4_NV_PTX``
instruction by instruction (the few opcodes they use, with PTX ISA semantics:
``prmt`` default mode, ``lop3`` truth tables, packed bf16 arithmetic, the
e4m3 / f16 / bf16 conversions) and checks every output against the format's
own decode times its block scale for exhaustive nibble patterns: an edit
that breaks the bit twiddling fails here, not only on the H200's
``bench/decode_check.py``.
"""

from __future__ import annotations

import importlib
import re
import struct

import pytest
import torch

from torch_moe_quant import formats
from torch_moe_quant.formats import Format, PerGroup, _minifloat
from torch_moe_quant.kernels import _decode_kernel as dk
from torch_moe_quant.kernels._operand import ScaleCodec, WeightOperand

mg = importlib.import_module("torch_moe_quant.kernels.moe_gemm")

MASK = 0xFFFFFFFF


def _prmt(a: int, b: int, sel: int) -> int:
    """``prmt.b32`` default mode: byte i of the result is byte ``sel[i] & 7``
    of {b, a} (a = bytes 0-3), or that byte's sign replicated if ``sel[i] & 8``."""
    pool = (b << 32) | a
    out = 0
    for i in range(4):
        s = (sel >> (4 * i)) & 0xF
        byte = (pool >> (8 * (s & 7))) & 0xFF
        if s & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    """``lop3.b32``: bit k of the result is ``lut[(a_k << 2) | (b_k << 1) | c_k]``
    (the LUT is the function applied to 0xF0, 0xCC, 0xAA)."""
    out = 0
    for k in range(32):
        idx = (((a >> k) & 1) << 2) | (((b >> k) & 1) << 1) | ((c >> k) & 1)
        out |= ((lut >> idx) & 1) << k
    return out


def _bf16_to_f32(h: int) -> float:
    return struct.unpack("<f", struct.pack("<I", h << 16))[0]


def _f32_to_bf16_rn(x: float) -> int:
    return int(torch.tensor(x, dtype=torch.float32).to(torch.bfloat16).view(torch.int16).item()) & 0xFFFF


def _bf16x2(a: int, b: int, op) -> int:
    """A packed bf16 operation, each half computed exactly in fp64 and
    rounded once to bf16 (what ``sub`` / ``mul.rn.bf16x2`` do)."""
    out = 0
    for half in range(2):
        x = op(_bf16_to_f32((a >> (16 * half)) & 0xFFFF), _bf16_to_f32((b >> (16 * half)) & 0xFFFF))
        out |= _f64_to_bf16_rn(x) << (16 * half)
    return out


def _f64_to_bf16_rn(x: float) -> int:
    return int(torch.tensor(x, dtype=torch.float64).to(torch.bfloat16).view(torch.int16).item()) & 0xFFFF


def _max_u16x2(a: int, b: int) -> int:
    return max(a & 0xFFFF, b & 0xFFFF) | (max(a >> 16, b >> 16) << 16)


def _e4m3x2_to_f16x2(a: int) -> int:
    """``cvt.rn.f16x2.e4m3x2``: the low byte to the low half (exact)."""
    halves = [torch.tensor([(a >> (8 * i)) & 0xFF], dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float16)
              .view(torch.int16).item() & 0xFFFF for i in range(2)]
    return halves[0] | (halves[1] << 16)


def _f16_to_f32_bits(h: int) -> int:
    return struct.unpack("<I", struct.pack("<f", struct.unpack("<e", struct.pack("<H", h))[0]))[0]


def _f32_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def run_ptx(text: str, inputs, first_input: int = 8) -> list:
    """Interpret ``text`` with ``$8, $9, ... = inputs`` (``$first_input`` on); returns
    (``[$0 .. $(first_input - 1)]``, instructions run)."""
    regs = {f"${first_input + i}": v & MASK for i, v in enumerate(inputs)}

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok, 0) & MASK if re.match(r"^(0x[0-9a-fA-F]+|\d+)$", tok) else regs[tok]

    ops = 0
    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        unpack = re.match(r"^\{(\w+),\s*(\w+)\},\s*(\S+)$", args)
        if op == "mov.b32" and unpack:  # mov.b32 {lo, hi}, x: the two 16-bit halves
            lo, hi, x = unpack.groups()
            regs[lo], regs[hi] = val(x) & 0xFFFF, val(x) >> 16
            ops += 1
            continue
        d, *src = [t.strip() for t in args.split(",")]
        v = [val(t) for t in src]
        if op == "mov.b32":
            r = v[0]
        elif op == "prmt.b32":
            r = _prmt(v[0], v[1], v[2])
        elif op == "lop3.b32":
            r = _lop3(v[0], v[1], v[2], v[3])
        elif op == "and.b32":
            r = v[0] & v[1]
        elif op == "shr.u32":
            r = v[0] >> v[1]
        elif op == "shl.b32":
            r = (v[0] << v[1]) & MASK
        elif op == "sub.bf16x2":
            r = _bf16x2(v[0], v[1], lambda x, y: x - y)
        elif op == "mul.rn.bf16x2":
            r = _bf16x2(v[0], v[1], lambda x, y: x * y)
        elif op == "max.u16x2":
            r = _max_u16x2(v[0], v[1])
        elif op == "cvt.rn.f16x2.e4m3x2":
            r = _e4m3x2_to_f16x2(v[0] & 0xFFFF)
        elif op == "cvt.f32.f16":
            r = _f16_to_f32_bits(v[0] & 0xFFFF)
        elif op == "cvt.rn.bf16x2.f32":  # d = {a (high half), b (low half)}
            r = _f64_to_bf16_rn(_f32_bits(v[0])) << 16 | _f64_to_bf16_rn(_f32_bits(v[1]))
        else:
            raise AssertionError(f"the interpreter does not know {op!r}: teach it, or the test checks nothing new")
        regs[d] = r
        ops += 1
    return [regs[f"${j}"] for j in range(first_input)], ops


def _halves(reg: int):
    return _bf16_to_f32(reg & 0xFFFF), _bf16_to_f32(reg >> 16)


def _words(seed: int, n: int):
    """``n`` pairs of words covering every nibble value at every position."""
    g = torch.Generator().manual_seed(seed)
    pairs = [(sum(v << (4 * j) for j in range(8)), sum(((v + 3) & 15) << (4 * j) for j in range(8))) for v in range(16)]
    rnd = torch.randint(0, 2**32, (n, 2), generator=g, dtype=torch.int64).tolist()
    return pairs + [tuple(p) for p in rnd]


def test_int4_split_ptx_decodes_every_nibble():
    text = dk._INT4_SPLIT_PTX.value
    for a, b in _words(0, 64):
        out, ops = run_ptx(text, (a, b))
        for j in range(8):
            lo, hi = _halves(out[j])
            assert lo == ((a >> (4 * j)) & 15) - 8 and hi == ((b >> (4 * j)) & 15) - 8, (hex(a), hex(b), j)
    assert ops == 25  # the instruction count the kernel's docstring quotes (lop3 + shr + sub per pair)


def test_fp8_split_ptx_decodes_every_byte():
    """Every e4m3 byte (subnormals, both zeros, NaN patterns) at every
    position of a word, bit-exact against the format's decode in bf16."""
    text = dk._FP8_SPLIT_PTX.value
    table = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().tolist()
    pairs = [(sum(((v + 37 * j) & 255) << (8 * j) for j in range(4)), sum(((v * 7 + j) & 255) << (8 * j) for j in range(4)))
             for v in range(256)]
    for a, b in pairs:
        out, ops = run_ptx(text, (a, b), first_input=4)
        for j in range(4):
            lo, hi = _halves(out[j])
            for got, word in ((lo, a), (hi, b)):
                want = table[(word >> (8 * j)) & 0xFF]
                if want != want:  # NaN: any NaN
                    assert got != got
                else:
                    assert struct.pack("<f", got) == struct.pack("<f", want), (hex(word), j, got, want)
    assert ops == 4 * 7


def test_int4_zp_ptx_subtracts_each_rows_zero_point():
    """Zero points: the pair's bias is 136 + z of A's row (low half) and of
    B's row (high half); every code and every centred z in [-8, 7]."""
    text = dk._INT4_ZP_PTX.value
    for i, (a, b) in enumerate(_words(3, 32)):
        za, zb = (i % 16) - 8, ((5 * i + 3) % 16) - 8
        out, ops = run_ptx(text, (a, b, (0x4308 + za) * 0x10001, (0x4308 + zb) * 0x10001))
        for j in range(8):
            lo, hi = _halves(out[j])
            assert lo == ((a >> (4 * j)) & 15) - 8 - za and hi == ((b >> (4 * j)) & 15) - 8 - zb, (hex(a), j, za, zb)
    assert ops == 25


@pytest.mark.parametrize("group", [32, 64])
def test_int4_scaled_ptx_applies_each_words_group_scale(group):
    """Groups of 32 / 64: each word's bf16 scale, picked from its row's two
    scale words by the selectors ``decode_table`` builds (any pair of words,
    rows with different scales), times the code, rounded once: bit-exact
    against the fp32 product rounded to bf16."""
    text = dk._INT4_SCALED_PTX.value
    w = formats.quantize(torch.randn(1, 8, 128).bfloat16(), Format.INT4, PerGroup(group))
    sel = mg.decode_table(WeightOperand.of(w), torch.device("cpu")).tolist()
    assert len(sel) == 16
    g = torch.Generator().manual_seed(4)
    for a, b in _words(5, 48):
        wa, wb = torch.randint(0, 16, (2,), generator=g).tolist()
        # two rows' four bf16 scales (random finite values, both signs, incl. subnormal-free tiny ones)
        sc = (torch.randn(2, 4, generator=g) * 2.0 ** torch.randint(-20, 20, (2, 4), generator=g)).bfloat16()
        bits = sc.view(torch.int16).to(torch.int64) & 0xFFFF
        sw0 = [int(bits[r, 0] | (bits[r, 1] << 16)) for r in range(2)]
        sw1 = [int(bits[r, 2] | (bits[r, 3] << 16)) for r in range(2)]
        out, ops = run_ptx(text, (a, b, sw0[0], sw0[1], sw1[0], sw1[1], sel[wa], sel[wb]))
        for j in range(8):
            lo, hi = _halves(out[j])
            for got, word, w_, r in ((lo, a, wa, 0), (hi, b, wb, 1)):
                scale = sc[r, w_ // (group // 8)].float().item()
                want = _f32_bits_bf16(float(torch.tensor((((word >> (4 * j)) & 15) - 8) * scale, dtype=torch.float32)))
                assert struct.pack("<f", got) == struct.pack("<f", want), (hex(word), j, w_, scale, got, want)
    assert ops == 25 + 3 + 8


@pytest.mark.parametrize("codec", [ScaleCodec.E8M0, ScaleCodec.E4M3])
def test_fp4_scaled_ptx_decodes_every_code(codec):
    """Every e2m1 code at every position times the block scale its selector
    picks (any pair of words, any pair of groups), bit-exact against the
    format's decode x the scale's decode in fp32 (exact in bf16)."""
    table = _minifloat.decode(torch.arange(16, dtype=torch.uint8), _minifloat.FP4_E2M1).tolist()
    text = (dk._FP4_MX_PTX if codec is ScaleCodec.E8M0 else dk._FP4_NV_PTX).value
    words = 16 if codec is ScaleCodec.E8M0 else 8
    op = WeightOperand.of(_fp4_weight(codec))
    tab = mg.decode_table(op, torch.device("cpu")).tolist()
    assert len(tab) == 5 * words
    sel, lut = tab[:words], tab[words::words]
    assert [v & MASK for v in lut] == list(dk.E2M1_LUT)
    g = torch.Generator().manual_seed(2)
    # scale bytes: every valid one (e8m0 0..254; e4m3 the positive finite ones, subnormals included)
    valid = list(range(255)) if codec is ScaleCodec.E8M0 else list(range(0x7F))
    for i, (a, b) in enumerate(_words(1, 64)):
        wa, wb = torch.randint(0, words, (2,), generator=g).tolist()
        sw = [sum(valid[(i * 4 + 5 * k + 7 * r) % len(valid)] << (8 * k) for k in range(4)) for r in range(2)]
        out, ops = run_ptx(text, (a, b, sw[0], sw[1], sel[wa], sel[wb], *[v for t in lut for v in (t, t)]))
        for j in range(8):
            lo, hi = _halves(out[j])
            for got, word, w, swd in ((lo, a, wa, sw[0]), (hi, b, wb, sw[1])):
                byte = (swd >> (8 * (w * 4 // words))) & 0xFF
                scale = _scale_value(byte, codec)
                want = _f32_bits_bf16(table[(word >> (4 * j)) & 15] * scale)
                assert struct.pack("<f", got) == struct.pack("<f", want), (hex(word), j, w, byte, got, want)
    scale_ops = 6 if codec is ScaleCodec.E8M0 else 8
    assert ops == scale_ops + 2 + 2 * 15 + 8  # the counts the kernel's comments quote


def _fp4_weight(codec):
    fmt = Format.MXFP4 if codec is ScaleCodec.E8M0 else Format.NVFP4
    return formats.quantize(torch.randn(1, 8, 128), fmt, PerGroup(32 if codec is ScaleCodec.E8M0 else 16))


def _scale_value(byte: int, codec) -> float:
    if codec is ScaleCodec.E8M0:
        return 2.0 ** (byte - 127)
    return torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float().item()


def _f32_bits_bf16(x: float) -> float:
    """``x`` (exactly representable) as the bf16 the kernel holds, read back as a float."""
    return _bf16_to_f32(_f64_to_bf16_rn(x))


@pytest.mark.parametrize("name", [
    "_INT4_SPLIT_PTX", "_INT4_ZP_PTX", "_INT4_SCALED_PTX", "_FP4_MX_PTX", "_FP4_NV_PTX", "_FP8_SPLIT_PTX",
])
def test_interpreter_rejects_what_it_does_not_know(name):
    with pytest.raises(AssertionError, match="does not know"):
        run_ptx(getattr(dk, name).value + "\n        fma.rn.bf16x2 $0, $8, $9, $8;", (0,) * 14,
                first_input=4 if name == "_FP8_SPLIT_PTX" else 8)
