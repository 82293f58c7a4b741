"""The decode kernel's PTX decoders, run on the CPU by a small PTX interpreter.

CI has no GPU, and the Triton interpreter runs the kernel's plain-Triton
decode (``ASM=False``), not the inline PTX. This interprets the PTX text of
``_INT4_SPLIT_PTX`` and ``_FP4_WORDS_PTX`` instruction by instruction (the
few opcodes they use, with PTX ISA semantics: ``prmt`` default mode, ``lop3``
truth tables, packed bf16 subtraction) and checks every output against the
format's own decode for exhaustive nibble patterns: an edit that breaks the
bit twiddling fails here, not only on the H200's ``bench/decode_check.py``.
"""

from __future__ import annotations

import re
import struct

import pytest
import torch

from torch_moe_quant.formats import _minifloat
from torch_moe_quant.kernels import _decode_kernel as dk

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


def _sub_bf16x2(a: int, b: int) -> int:
    out = 0
    for half in range(2):
        x = _bf16_to_f32((a >> (16 * half)) & 0xFFFF) - _bf16_to_f32((b >> (16 * half)) & 0xFFFF)
        out |= _f32_to_bf16_rn(x) << (16 * half)
    return out


def run_ptx(text: str, inputs) -> list:
    """Interpret ``text`` with ``$8, $9 = inputs``; returns (``[$0 .. $7]``, instructions run)."""
    regs = {f"${8 + i}": v & MASK for i, v in enumerate(inputs)}

    def val(tok: str) -> int:
        tok = tok.strip()
        return int(tok, 0) & MASK if re.match(r"^(0x[0-9a-fA-F]+|\d+)$", tok) else regs[tok]

    ops = 0
    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
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
            r = _sub_bf16x2(v[0], v[1])
        else:
            raise AssertionError(f"the interpreter does not know {op!r}: teach it, or the test checks nothing new")
        regs[d] = r
        ops += 1
    return [regs[f"${j}"] for j in range(8)], ops


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


def test_fp4_words_ptx_decodes_every_code():
    # the format's own decode of the 16 e2m1 codes (the checkpoint bytes' low nibble = even k)
    table = _minifloat.decode(torch.arange(16, dtype=torch.uint8), _minifloat.FP4_E2M1).tolist()
    text = dk._FP4_WORDS_PTX.value
    for a, b in _words(1, 64):
        out, ops = run_ptx(text, (a, b))
        for j in range(8):
            lo, hi = _halves(out[j])
            want_a, want_b = table[(a >> (4 * j)) & 15], table[(b >> (4 * j)) & 15]
            # bit-exact, -0.0 for the negative zero code included
            assert struct.pack("<f", lo) == struct.pack("<f", want_a), (hex(a), j, lo, want_a)
            assert struct.pack("<f", hi) == struct.pack("<f", want_b), (hex(b), j, hi, want_b)
    assert ops == 2 + 2 * 15  # two pairing prmt + 15 per 8 values (``_E2M1_X8``)


@pytest.mark.parametrize("name", ["_INT4_SPLIT_PTX", "_FP4_WORDS_PTX"])
def test_interpreter_rejects_what_it_does_not_know(name):
    with pytest.raises(AssertionError, match="does not know"):
        run_ptx(getattr(dk, name).value + "\n        cvt.rn.bf16x2.f32 $0, $8, $9;", (0, 0))
