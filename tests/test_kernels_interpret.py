"""Triton kernels on CPU under the Triton interpreter, against their
plain-PyTorch twins (``moe_gemm_ref``) and the reference MoE
(``reference.fused_moe``).

``TRITON_INTERPRET=1`` is set first thing, before anything imports the
kernel module: ``@triton.jit`` reads it when ``kernels._gemm_kernel`` is
imported, which the launcher does lazily at the first launch (so the order
in which pytest collects the suite does not matter; ``test_interpreter_is_used``
checks it). Measured with triton 3.9: the interpreter's ``tl.dot`` on bf16
operands returns garbage (errors ~1e10) while fp16 and fp32 are exact, so
these tests feed fp16 activations (fp32 for the bit-exact decode tests).
Tolerances are relative Frobenius errors, written per case below.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import dataclasses  # noqa: E402
import functools  # noqa: E402
from typing import Optional  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from moe_cases import rel_err  # noqa: E402

import torch_moe_quant as tmq  # noqa: E402
from torch_moe_quant import formats, reference  # noqa: E402
from torch_moe_quant.experts import act_order_g_idx  # noqa: E402
from torch_moe_quant.formats import Format, Int4Mode, PerBlock, PerGroup, PerRow, QuantizedTensor  # noqa: E402
from torch_moe_quant.kernels import (  # noqa: E402
    ARows,
    GemmProblem,
    KernelConfig,
    fused_experts_ref,
    fused_experts_triton,
    kernel_is_interpreted,
    moe_gemm,
    moe_gemm_ref,
    select_config,
    supported_weight_formats,
)
from torch_moe_quant.kernels import _operand  # noqa: E402
from torch_moe_quant.kernels.align import MAX_CHUNKS, align_triton, chunk_for  # noqa: E402
from torch_moe_quant.kernels.combine import combine_topk, combine_topk_ref  # noqa: E402
from torch_moe_quant.kernels.moe_gemm import DroppedRows  # noqa: E402
from torch_moe_quant.ops.routing import align_reference  # noqa: E402
from torch_moe_quant.kernels._operand import ScaleCodec, ScaleMode, WeightOperand  # noqa: E402
from torch_moe_quant.kernels.config import k_group  # noqa: E402
from torch_moe_quant.schemes import ActOrder  # noqa: E402

E, TOP_K, N, K = 4, 2, 64, 128
#: smallest tiles: several N tiles and K steps even on these tiny shapes
TILE = KernelConfig(block_m=16, block_n=32, block_k=32)
#: fused tests: fewer, larger programs (the interpreter's cost is per program)
FUSED_TILE = KernelConfig(block_m=16, block_n=128, block_k=64)
#: fp32 accumulation order only (weight codes enter the dot exactly)
EXACT_TOL = 1e-5
#: the weight tile was scaled by a float scale and rounded to fp16 before the dot
#: (ScaleMode.PER_GROUP / PER_ELEMENT)
ROUNDED_TOL = 1e-3


def _randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _float_weight(e=E, n=N, k=K, seed=0):
    return _randn(e, n, k, seed=seed) / k**0.5


def _q(fmt, gran=None, **kw):
    return lambda w: formats.quantize(w, fmt, gran, **kw)


#: name -> how to build the weight from a float [E, N, K] tensor
WEIGHTS = {
    "bf16": lambda w: w.bfloat16(),
    "fp16": lambda w: w.half(),
    "fp8_channel": _q("fp8_e4m3", "channel"),
    "fp8_tensor": _q("fp8_e4m3", "tensor"),
    "fp8_block32x64": _q("fp8_e4m3", PerBlock(32, 64)),
    "int8_channel": _q("int8", "channel"),
    "int8_tensor": _q("int8", "tensor"),
    "int4_g32": _q("int4", PerGroup(32)),
    "int4_g64_zp": _q("int4", PerGroup(64), mode=Int4Mode.ASYMMETRIC),
    "int4_g128": _q("int4", PerGroup(128)),
    "int4_channel": _q("int4", PerRow()),
    "int4_channel_zp": _q("int4", PerRow(), mode=Int4Mode.ASYMMETRIC),
    "int4_g32_actorder_zp": lambda w: formats.quantize(
        w, "int4", PerGroup(32), mode=Int4Mode.ASYMMETRIC, g_idx=act_order_g_idx(w, 32)
    ),
    "mxfp4": _q("mxfp4"),
    "mxfp6_e2m3": _q("mxfp6_e2m3"),
    "mxfp6_e3m2": _q("mxfp6_e3m2"),
    "mxfp8": _q("mxfp8"),
    "nvfp4": _q("nvfp4"),
    # groups that neither divide nor are a multiple of BLOCK_K: scales gathered per element
    "fp8_g48": _q("fp8_e4m3", PerGroup(48)),
    "int4_g24_zp": _q("int4", PerGroup(24), mode=Int4Mode.ASYMMETRIC),
}
#: reduction size of the weights whose group does not divide K = 128
K_OF = {"fp8_g48": 96, "int4_g24_zp": 96}


def _tolerance(weight, config: KernelConfig) -> float:
    op = WeightOperand.of(weight)
    folded = op.scale_mode(config.block_k) in (ScaleMode.PER_GROUP, ScaleMode.PER_ELEMENT)
    rounds = folded and op.scale_codec is ScaleCodec.FLOAT
    return ROUNDED_TOL if rounds else EXACT_TOL


def _routing(M, num_experts=E, top_k=TOP_K, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(M)]) if M else (
        torch.empty(0, top_k, dtype=torch.int64)
    )
    weights = torch.rand(M, top_k, generator=g)
    return weights, ids.to(torch.int32)


@dataclasses.dataclass(frozen=True)
class GemmCase:
    weight: str
    M: int = 5
    bias: bool = True
    routed: bool = True
    a_rows: ARows = ARows.TOKENS
    expert_map: Optional[tuple] = None
    out_dtype: torch.dtype = torch.float32
    config: KernelConfig = TILE


def _run_gemm_case(case: GemmCase, tol: Optional[float] = None):
    k = K_OF.get(case.weight, K)
    w = WEIGHTS[case.weight](_float_weight(k=k))
    emap = None if case.expert_map is None else torch.tensor(case.expert_map, dtype=torch.int32)
    num_global = E if emap is None else emap.numel()
    topk_w, ids = _routing(case.M, num_global)
    pairs = case.M * TOP_K
    rows = case.M if case.a_rows is ARows.TOKENS else pairs
    a = _randn(rows, k, seed=3).half()
    bias = _randn(E, N, seed=4).bfloat16() if case.bias else None
    aligned = torch.ops.moe_quant.align(ids, E, case.config.block_m, emap)
    kwargs = dict(
        top_k=TOP_K, a_rows=case.a_rows, bias=bias, topk_weights=topk_w if case.routed else None,
        out_dtype=case.out_dtype, config=case.config,
    )
    out = moe_gemm(a, w, *aligned, **kwargs)
    ref = moe_gemm_ref(a, w, *aligned, **kwargs)
    assert out.shape == (pairs, N) and out.dtype == case.out_dtype
    if pairs == 0:
        return out, ref
    tol = tol if tol is not None else _tolerance(w, case.config)
    if case.out_dtype is torch.float16:
        tol = max(tol, 1e-3)  # the output itself is rounded to fp16
    assert rel_err(out, ref) < tol, (case, rel_err(out, ref))
    return out, ref


# ---------------------------------------------------------------- interpreter


def test_interpreter_is_used():
    assert os.environ["TRITON_INTERPRET"] == "1"
    assert kernel_is_interpreted()


def test_kernels_call_only_triton_builtins():
    """``tl.standard`` helpers (``tl.cdiv``, ``tl.zeros``, ...) are ``@jit``
    functions decorated when ``triton.language`` is first imported; in a
    full test session that happens before ``TRITON_INTERPRET`` is set here
    (test_compile imports Triton through Inductor), and the interpreter then
    refuses to call them. The kernel module must use builtins only."""
    import ast

    import triton.language as tl
    from triton.runtime.jit import JITFunction

    from torch_moe_quant.kernels import _act_quant_kernel, _align_kernel, _combine_kernel, _gemm_kernel

    for module in (_gemm_kernel, _align_kernel, _combine_kernel, _act_quant_kernel):
        with open(module.__file__) as f:
            tree = ast.parse(f.read())
        used = {
            node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "tl"
        }
        assert "load" in used
        assert not sorted(n for n in used if isinstance(getattr(tl, n), JITFunction)), module.__name__


def test_every_format_has_a_kernel_path():
    assert supported_weight_formats() == frozenset(Format)


# ---------------------------------------------------------------- moe_gemm vs moe_gemm_ref


@pytest.mark.parametrize("M", [0, 1, 5, 33])
@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_moe_gemm_matches_ref(name, M):
    _run_gemm_case(GemmCase(name, M))


OPTION_CASES = [
    GemmCase("int4_g32_actorder_zp", bias=False, routed=False),
    GemmCase("mxfp4", bias=False),
    GemmCase("bf16", routed=False),
    # expert parallelism: 8 global experts, 4 here; pairs routed elsewhere stay zero
    GemmCase("int4_g32_actorder_zp", M=9, expert_map=(0, -1, 1, -1, 2, -1, 3, -1)),
    GemmCase("fp8_block32x64", M=9, expert_map=(-1, 3, -1, 2, -1, 1, -1, 0)),
    # rows of a are pairs (the second GEMM)
    GemmCase("nvfp4", M=9, a_rows=ARows.PAIRS),
    GemmCase("int4_g64_zp", M=9, a_rows=ARows.PAIRS, bias=False),
    GemmCase("mxfp6_e3m2", out_dtype=torch.float16),
    # scales broadcast over whole groups of the tile (group 32 < BLOCK_K 64): exact for e8m0
    GemmCase("mxfp4", M=9, config=KernelConfig(16, 32, 64)),
    GemmCase("mxfp8", M=9, config=KernelConfig(16, 32, 64)),
    GemmCase("int4_g32", M=9, config=KernelConfig(16, 32, 64)),
    GemmCase("int4_g64_zp", M=9, config=KernelConfig(16, 32, 128)),
    GemmCase("mxfp6_e2m3", M=9, config=KernelConfig(16, 32, 128)),
    # nvfp4 with BLOCK_K = its block (16): scale per K tile
    GemmCase("nvfp4", M=9, config=KernelConfig(16, 32, 16)),
    # larger BLOCK_M and grouped launch order
    GemmCase("fp8_channel", M=33, config=KernelConfig(32, 16, 32, group_m=2)),
]


@pytest.mark.parametrize("case", OPTION_CASES, ids=lambda c: f"{c.weight}-{c.a_rows.name}-M{c.M}-bk{c.config.block_k}")
def test_moe_gemm_options(case):
    out, ref = _run_gemm_case(case)
    if case.expert_map is not None:
        _, ids = _routing(case.M, len(case.expert_map))
        local = torch.tensor(case.expert_map)[ids.long()].reshape(-1)
        dropped = local < 0
        assert dropped.any() and (~dropped).any()
        assert (out[dropped] == 0).all() and (out[~dropped] != 0).any()


def test_out_of_range_g_idx_poisons_its_columns_with_nan():
    w = WEIGHTS["int4_g32_actorder_zp"](_float_weight())
    g_idx = w.g_idx.clone()
    g_idx[1, 5] = 99  # expert 1, column 5: no such group
    w = dataclasses.replace(w, g_idx=g_idx)
    topk_w, ids = _routing(5)
    a = _randn(5, K, seed=3).half()
    aligned = torch.ops.moe_quant.align(ids, E, TILE.block_m)
    out = moe_gemm(a, w, *aligned, top_k=TOP_K, a_rows=ARows.TOKENS, config=TILE)
    to_expert_1 = (ids.reshape(-1) == 1)
    assert out[to_expert_1].isnan().all() and not out[~to_expert_1].isnan().any()


def test_bf16_activations_run_in_fp32_under_the_interpreter():
    # the interpreter's bf16 tl.dot is broken; the launcher multiplies bf16 operands in fp32
    w = WEIGHTS["mxfp4"](_float_weight())
    topk_w, ids = _routing(5)
    a = _randn(5, K, seed=3).bfloat16()
    aligned = torch.ops.moe_quant.align(ids, E, TILE.block_m)
    kw = dict(top_k=TOP_K, a_rows=ARows.TOKENS, topk_weights=topk_w, out_dtype=torch.float32, config=TILE)
    assert rel_err(moe_gemm(a, w, *aligned, **kw), moe_gemm_ref(a, w, *aligned, **kw)) < EXACT_TOL


# ---------------------------------------------------------------- bit-exact decode


def _random_codes(fmt: Format, e, n, k, g, scale_bytes=(0, 255)):
    """A QuantizedTensor with uniformly random codes and scales (no NaN codes)."""

    def rbytes(*shape, lo=0, hi=256):
        return torch.randint(lo, hi, shape, generator=g, dtype=torch.int32).to(torch.uint8)

    def no_nan_e4m3(b):
        return torch.where((b & 0x7F) == 0x7F, torch.zeros_like(b), b).view(torch.float8_e4m3fn)

    def fp32_scale(*shape):
        return torch.rand(*shape, generator=g) + 0.05

    shape = (e, n, k)
    if fmt is Format.FP8_E4M3:
        return QuantizedTensor(no_nan_e4m3(rbytes(e, n, k)), fp32_scale(e, n, 1), fmt, PerRow(), shape)
    if fmt is Format.INT8:
        data = torch.randint(-128, 128, shape, generator=g, dtype=torch.int32).to(torch.int8)
        return QuantizedTensor(data, fp32_scale(e, 1, 1), fmt, formats.PerTensor(), shape)
    if fmt is Format.INT4:
        words = torch.randint(-(2**31), 2**31, (e, n, k // 8), generator=g, dtype=torch.int64).to(torch.int32)
        groups = k // 32
        zp = torch.randint(-8, 8, (e, n, groups), generator=g, dtype=torch.int32).to(torch.int8)
        g_idx = torch.stack([torch.randperm(k, generator=g) % groups for _ in range(e)]).to(torch.int32)
        return QuantizedTensor(
            words, fp32_scale(e, n, groups).bfloat16(), fmt, PerGroup(32), shape, zero_point=zp, g_idx=g_idx
        )
    per_byte = {Format.MXFP4: 2, Format.NVFP4: 2, Format.MXFP6_E2M3: 4 / 3, Format.MXFP6_E3M2: 4 / 3}
    if fmt is Format.MXFP8:
        data = no_nan_e4m3(rbytes(e, n, k))
    else:
        data = rbytes(e, n, int(k / per_byte[fmt]))
    if fmt is Format.NVFP4:
        scale = no_nan_e4m3(rbytes(e, n, k // 16))
        gs = fp32_scale(e, 1, 1) * 100
        return QuantizedTensor(data, scale, fmt, PerGroup(16), shape, global_scale=gs)
    lo, hi = scale_bytes
    return QuantizedTensor(data, rbytes(e, n, k // 32, lo=lo, hi=hi), fmt, PerGroup(32), shape)


# e8m0 byte 254 times a code of 6 overflows to inf on purpose (as in the reference)
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("block_k", [16, 64])
@pytest.mark.parametrize("fmt", list(Format), ids=lambda f: f.value)
def test_kernel_decodes_every_code_bit_exactly(fmt, block_k):
    """With ``a`` the identity (fp32, exact dots) ``C`` is the decoded weight:
    it must equal ``formats.dequantize`` exactly, for uniformly random
    codes (subnormals, -0, max) and scales. BLOCK_K 16 applies MX scales per
    K tile (every e8m0 byte 0..254, 2**-127 and 2**127 included); BLOCK_K 64
    folds them into the weight tile (``PER_GROUP``; bytes kept where products
    stay finite). int4 carries zero points and act-order ``g_idx`` (``PER_ELEMENT``)."""
    e, n, k = 2, 32, 64
    g = torch.Generator().manual_seed(7)
    scale_bytes = (0, 255) if block_k == 16 else (60, 190)
    q = _random_codes(fmt, e, n, k, g, scale_bytes)
    # pair t * e + j is token t (identity row t) sent to expert j
    ids = torch.arange(e, dtype=torch.int32).repeat(k, 1)
    cfg = KernelConfig(16, 32, block_k)
    aligned = torch.ops.moe_quant.align(ids, e, cfg.block_m)
    out = moe_gemm(torch.eye(k), q, *aligned, top_k=e, a_rows=ARows.TOKENS, config=cfg)
    got = out.view(k, e, n).permute(1, 2, 0)  # [e, n, k]
    want = formats.dequantize(q, torch.float32)
    if fmt is Format.NVFP4:
        # kernel: code * scale / global; reference: code * fl(scale / global): 1 ulp apart at most
        torch.testing.assert_close(got, want, rtol=2**-22, atol=0)
    else:
        # value equality: a dot's sum turns a -0.0 weight into +0.0
        assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("fmt", [Format.FP8_E4M3, Format.MXFP8, Format.NVFP4], ids=lambda f: f.value)
def test_sm80_fp8_decode_from_bits_is_exact(fmt, monkeypatch):
    """GPUs without fp8 conversions (sm80) decode e4m3 codes and nvfp4's e4m3
    scales in integer arithmetic (``FP8_NATIVE=False``): random codes
    (subnormals, max, -0) give the same values as the hardware-cast path."""
    import importlib

    moe_gemm_module = importlib.import_module("torch_moe_quant.kernels.moe_gemm")  # not the function
    e, n, k = 2, 32, 64
    q = _random_codes(fmt, e, n, k, torch.Generator().manual_seed(7), (100, 140))
    ids = torch.arange(e, dtype=torch.int32).repeat(k, 1)
    cfg = KernelConfig(16, 32, 16)
    aligned = torch.ops.moe_quant.align(ids, e, cfg.block_m)
    run = lambda: moe_gemm(torch.eye(k), q, *aligned, top_k=e, a_rows=ARows.TOKENS, config=cfg)  # noqa: E731
    native = run()
    monkeypatch.setattr(moe_gemm_module, "fp8_native", lambda device: False)
    from_bits = run()
    assert torch.equal(native.isnan(), from_bits.isnan())
    assert torch.equal(native.nan_to_num(), from_bits.nan_to_num())


def test_nan_scales_and_codes_poison_their_columns():
    g = torch.Generator().manual_seed(9)
    q = _random_codes(Format.MXFP4, 2, 32, 64, g, (100, 140))
    scale = q.scale.clone()
    scale[0, 3, 1] = 255  # e8m0 NaN
    q = dataclasses.replace(q, scale=scale)
    fp8 = _random_codes(Format.FP8_E4M3, 2, 32, 64, g)
    bits = fp8.data.view(torch.uint8).clone()
    bits[1, 5, 7] = 0x7F  # e4m3 NaN
    fp8 = dataclasses.replace(fp8, data=bits.view(torch.float8_e4m3fn))
    topk_w, ids = _routing(5, num_experts=2, top_k=2)
    a = _randn(5, 64, seed=3).half()
    aligned = torch.ops.moe_quant.align(ids, 2, TILE.block_m)
    for w in (q, fp8):
        kw = dict(top_k=2, a_rows=ARows.TOKENS, out_dtype=torch.float32, config=TILE)
        out, ref = moe_gemm(a, w, *aligned, **kw), moe_gemm_ref(a, w, *aligned, **kw)
        assert out.isnan().any()
        assert torch.equal(out.isnan(), ref.isnan())
        assert rel_err(out.nan_to_num(0), ref.nan_to_num(0)) < EXACT_TOL


# ---------------------------------------------------------------- fused experts vs reference

#: scheme -> relative Frobenius error bound vs reference.fused_moe (fp16 activations).
#: Weight-only schemes: GEMM inputs rounded to fp16 (the reference multiplies in fp32).
#: fp8/int8 activation QDQ: those roundings can flip a few quantization steps of the
#: second GEMM's input (one fp8/int8 step each), hence the looser bound.
FUSED_SCHEMES = {
    "bf16": 1e-3,
    "fp8_w8a16_channel": 1e-3,
    "fp8_w8a8_block128": 2e-2,
    "int4_w4a16_g128": 1e-3,
    "int4_w4a16_gptq_g128_actorder": 1e-3,
    "nvfp4_w4a16": 1e-3,
    "int8_w8a8_channel_token": 2e-2,
    "mxfp6_e2m3_w6a6": 1e-3,
}

H, I = 128, 128


def _layer(seed=0, e=E, h=H, inter=I):
    w13 = _randn(e, 2 * inter, h, seed=seed) / h**0.5
    w2 = _randn(e, h, inter, seed=seed + 1) / inter**0.5
    return w13.bfloat16(), w2.bfloat16()


@functools.lru_cache(maxsize=None)
def _experts(name):
    w13, w2 = _layer()
    return tmq.quantize_experts(w13, w2, name)


def _check_fused(experts, x, topk_w, ids, tol, **kw):
    out = fused_experts_triton(x, experts, topk_w, ids, config=FUSED_TILE, **kw)
    ref = reference.fused_moe(x, experts, topk_w, ids, **kw)
    assert out.shape == ref.shape == x.shape and out.dtype == x.dtype
    if x.shape[0]:
        assert rel_err(out, ref) < tol, rel_err(out, ref)
        twin = fused_experts_ref(x, experts, topk_w, ids, config=FUSED_TILE, **kw)
        assert rel_err(twin, ref) < tol
    return out


@pytest.mark.parametrize("M", [0, 1, 33])
@pytest.mark.parametrize("name", sorted(FUSED_SCHEMES))
def test_fused_experts_matches_reference(name, M):
    topk_w, ids = _routing(M)
    x = _randn(M, H, seed=5).half()
    _check_fused(_experts(name), x, topk_w, ids, FUSED_SCHEMES[name])


@pytest.mark.parametrize("M", [1, 33])
def test_fused_experts_gpt_oss_mxfp4(M):
    """mxfp4_w4a16 as gpt-oss: biases, swigluoai, interleaved gate/up rows."""
    w13, w2 = _layer(seed=2)
    b13 = _randn(E, 2 * I, seed=6).bfloat16()
    b2 = _randn(E, H, seed=7).bfloat16()
    experts = tmq.quantize_experts(w13, w2, "mxfp4_w4a16", w13_bias=b13, w2_bias=b2, layout="interleaved")
    topk_w, ids = _routing(M)
    x = _randn(M, H, seed=5).half()
    _check_fused(experts, x, topk_w, ids, 1e-3, activation="swigluoai")


def test_fused_experts_all_tokens_to_one_expert_router_weight_on_input():
    ids = torch.full((17, 1), 2, dtype=torch.int32)
    topk_w = torch.rand(17, 1, generator=torch.Generator().manual_seed(3))
    x = _randn(17, H, seed=5).half()
    _check_fused(_experts("int4_w4a16_g128"), x, topk_w, ids, 1e-3, apply_router_weight_on_input=True)


def test_fused_experts_all_tokens_to_the_same_two_experts():
    ids = torch.tensor([[3, 0]], dtype=torch.int32).repeat(17, 1)
    topk_w = torch.rand(17, 2, generator=torch.Generator().manual_seed(3))
    x = _randn(17, H, seed=5).half()
    _check_fused(_experts("fp8_w8a16_channel"), x, topk_w, ids, 1e-3)


def test_fused_experts_expert_map():
    emap = torch.tensor([0, -1, 1, -1, 2, -1, 3, -1], dtype=torch.int32)
    topk_w, ids = _routing(9, num_experts=8)
    x = _randn(9, H, seed=5).half()
    out = _check_fused(_experts("mxfp4_w4a16"), x, topk_w, ids, 1e-3, expert_map=emap)
    # a token whose experts are all elsewhere gets exact zeros
    elsewhere = (emap[ids.long()] < 0).all(dim=1)
    assert torch.equal(out[elsewhere], torch.zeros_like(out[elsewhere]))


def test_fused_experts_padded_sizes():
    """hidden 100 / intermediate 72 zero-padded to the mxfp4 block: the input
    is padded with zeros and the output cut."""
    w13, w2 = _layer(seed=4, h=100, inter=72)
    experts = tmq.quantize_experts(w13, w2, "mxfp4_w4a16", pad_to=32)
    assert (experts.padded_hidden_size, experts.padded_intermediate_size) == (128, 96)
    topk_w, ids = _routing(9)
    x = _randn(9, 100, seed=5).half()
    _check_fused(experts, x, topk_w, ids, 1e-3)


def test_fused_experts_non_gated_activation():
    w13, w2 = _layer(seed=4)
    experts = tmq.quantize_experts(w13[:, :I], w2, "nvfp4_w4a16")
    topk_w, ids = _routing(9)
    x = _randn(9, H, seed=5).half()
    _check_fused(experts, x, topk_w, ids, 1e-3, activation="relu2")


def test_fused_experts_default_config():
    topk_w, ids = _routing(5)
    x = _randn(5, H, seed=5).half()
    experts = _experts("int4_w4a16_g128")
    out = fused_experts_triton(x, experts, topk_w, ids)  # select_config for the CPU device
    assert rel_err(out, reference.fused_moe(x, experts, topk_w, ids)) < 1e-3


# ---------------------------------------------------------------- epilogue activation, align, combine


EPILOGUES = [(a, l) for a in tmq.Activation for l in tmq.GateUpLayout if a.is_gated] + [
    (a, tmq.GateUpLayout.GATE_UP) for a in tmq.Activation if not a.is_gated
]


@pytest.mark.parametrize("activation, layout", EPILOGUES, ids=lambda v: v.value)
def test_moe_gemm_activation_epilogue(activation, layout):
    """The activation in GEMM1's epilogue (gate/up rows gathered per tile,
    split after the dot) equals ``apply_activation`` on the twin's output;
    fp32 operands, so only the accumulation order differs. Values are scaled
    so the swiglu clamps at +-7 are crossed."""
    w = _float_weight() * 8
    topk_w, ids = _routing(5)
    a = _randn(5, K, seed=3)
    aligned = torch.ops.moe_quant.align(ids, E, TILE.block_m)
    kwargs = dict(
        top_k=TOP_K, a_rows=ARows.TOKENS, bias=_randn(E, N, seed=4), config=TILE,
        activation=activation, layout=layout, out_dtype=torch.float32,
    )
    out = moe_gemm(a, w, *aligned, **kwargs)
    ref = moe_gemm_ref(a, w, *aligned, **kwargs)
    assert out.shape == (5 * TOP_K, N // 2 if activation.is_gated else N)
    assert rel_err(out, ref) < EXACT_TOL, rel_err(out, ref)


def test_moe_gemm_dropped_rows_unwritten_leaves_only_routed_rows():
    emap = torch.tensor([0, -1, 1, -1, 2, -1, 3, -1], dtype=torch.int32)
    topk_w, ids = _routing(6, num_experts=8)
    a = _randn(6, K, seed=3)
    aligned = torch.ops.moe_quant.align(ids, E, TILE.block_m, emap)
    kw = dict(top_k=TOP_K, a_rows=ARows.TOKENS, config=TILE, out_dtype=torch.float32)
    zero = moe_gemm(a, _float_weight(), *aligned, **kw)
    unwritten = moe_gemm(a, _float_weight(), *aligned, dropped=DroppedRows.UNWRITTEN, **kw)
    on_rank = (emap[ids.long()] >= 0).reshape(-1)
    assert torch.equal(zero[on_rank], unwritten[on_rank])
    assert torch.equal(zero[~on_rank], torch.zeros_like(zero[~on_rank]))


ALIGN_CASES = [
    # (tokens, top_k, num_experts, block_size, expert_map)
    (1, 2, 4, 16, None),
    (7, 2, 4, 16, None),
    (33, 4, 8, 16, None),
    (5, 8, 130, 16, None),  # E not a power of two, most experts empty
    (40, 2, 8, 64, None),
    (9, 2, 4, 16, (0, -1, 1, -1, 2, -1, 3, -1)),
    (300, 8, 8, 16, None),  # more pairs than MAX_CHUNKS chunks: align_sorted
]


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("case", ALIGN_CASES, ids=str)
def test_align_triton_equals_align_reference(case, ids_dtype):
    tokens, top_k, num_experts, block, emap = case
    emap = None if emap is None else torch.tensor(emap, dtype=torch.int32)
    num_global = num_experts if emap is None else emap.numel()
    _, ids = _routing(tokens, num_global, top_k, seed=tokens)
    ids = ids.to(ids_dtype)
    got = align_triton(ids, num_experts, block, emap)
    want = align_reference(ids, num_experts, block, emap)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


def test_align_triton_single_program_bound():
    # the largest input the one-program kernel takes, and its chunking, are what the docs say
    assert chunk_for(256) == 32 and chunk_for(8) == 512 and chunk_for(4) == 512
    ids = torch.zeros(MAX_CHUNKS * chunk_for(4), 1, dtype=torch.int32)  # all pairs to expert 0
    got = align_triton(ids, 4, 16)
    want = align_reference(ids, 4, 16)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_align_triton_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"topk_ids must be in \[0, 4\)"):
        align_triton(torch.tensor([[0, 4]], dtype=torch.int32), 4, 16)


@pytest.mark.parametrize("expert_map", [None, (0, -1, 1, -1, 2, -1, 3, -1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_topk_equals_twin(dtype, expert_map):
    emap = None if expert_map is None else torch.tensor(expert_map, dtype=torch.int32)
    num_global = E if emap is None else emap.numel()
    _, ids = _routing(7, num_global)
    y = _randn(7 * TOP_K, 1100, seed=2).to(dtype)  # two h-blocks, the second partial
    kw = dict(num_experts=E, hidden=1030, expert_map=emap)
    got = combine_topk(y, ids, out_dtype=torch.float32, **kw)
    assert got.shape == (7, 1030) and got.dtype == torch.float32
    assert torch.equal(got, combine_topk_ref(y, ids, out_dtype=torch.float32, **kw))  # same fp32 sums
    # the interpreter's fp32 -> bf16 cast truncates (measured: 1 ulp off torch's
    # round-to-nearest on ~half the elements), so bf16 outputs agree to a bf16 ulp
    bf = combine_topk(y, ids, out_dtype=torch.bfloat16, **kw)
    assert bf.dtype == torch.bfloat16
    assert rel_err(bf, got) < 2**-8


# ---------------------------------------------------------------- errors


def test_unsupported_format_raises_not_implemented(monkeypatch):
    monkeypatch.delitem(_operand.CODECS, Format.MXFP4)
    topk_w, ids = _routing(3)
    with pytest.raises(NotImplementedError, match="mxfp4"):
        fused_experts_triton(_randn(3, H).half(), _experts("mxfp4_w4a16"), topk_w, ids, config=FUSED_TILE)


def _gemm_args(M=3, block_m=16):
    w = WEIGHTS["int4_g32"](_float_weight())
    topk_w, ids = _routing(M)
    return _randn(M, K).half(), w, torch.ops.moe_quant.align(ids, E, block_m), topk_w


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (lambda a, w, al, kw: (a.int(), w, al, kw), TypeError, "a must have dtype"),
        (lambda a, w, al, kw: (a[:, :64], w, al, kw), ValueError, "K=128"),
        (lambda a, w, al, kw: (a, w.data, al, kw), TypeError, "weight must have dtype"),
        (lambda a, w, al, kw: (a, w, al, {**kw, "a_rows": 0}), TypeError, "a_rows"),
        (lambda a, w, al, kw: (a, w, al, {**kw, "top_k": 0}), ValueError, "top_k"),
        (lambda a, w, al, kw: (a, w, al, {**kw, "config": KernelConfig(32, 32, 32)}), ValueError, "block_size=config.block_m=32"),
        (lambda a, w, al, kw: (a, w, (al[0].long(),) + al[1:], kw), TypeError, "sorted_ids"),
        (lambda a, w, al, kw: (a, w, al, {**kw, "bias": torch.zeros(E, N + 1)}), ValueError, "bias"),
        (lambda a, w, al, kw: (a, w, al, {**kw, "topk_weights": torch.zeros(7)}), ValueError, "topk_weights"),
        (lambda a, w, al, kw: (a, w, al, {**kw, "out_dtype": torch.int32}), TypeError, "out_dtype"),
        (lambda a, w, al, kw: (a, w, al, {**kw, "config": (16, 32, 32)}), TypeError, "config"),
    ],
)
def test_moe_gemm_rejects_bad_arguments(change, exc, match):
    a, w, al, topk_w = _gemm_args()
    kw = dict(top_k=TOP_K, a_rows=ARows.TOKENS, topk_weights=topk_w, config=TILE)
    a, w, al, kw = change(a, w, al, kw)
    for fn in (moe_gemm, moe_gemm_ref):
        with pytest.raises(exc, match=match):
            fn(a, w, *al, **kw)


def test_moe_gemm_rejects_a_2d_weight():
    a, w, al, _ = _gemm_args()
    with pytest.raises(ValueError, match="3-D"):
        moe_gemm(a, torch.zeros(N, K, dtype=torch.float16), *al, top_k=TOP_K, a_rows=ARows.TOKENS, config=TILE)


def test_fused_experts_rejects_float64():
    topk_w, ids = _routing(3)
    with pytest.raises(TypeError, match="hidden_states"):
        fused_experts_triton(_randn(3, H).double(), _experts("bf16"), topk_w, ids)


# ---------------------------------------------------------------- select_config


def test_select_config_decode_and_prefill():
    decode = select_config(GemmProblem(4, 4096, 2048, 64, 8), tmq.get_scheme("bf16"), "cuda")
    prefill = select_config(GemmProblem(8192, 4096, 2048, 64, 8), tmq.get_scheme("bf16"), "cuda")
    assert decode.block_m == 16 and prefill.block_m == 128
    assert prefill.group_m > 1
    cpu = select_config(GemmProblem(8192, 4096, 2048, 64, 8), tmq.get_scheme("bf16"), torch.device("cpu"))
    assert (cpu.block_m, cpu.block_n, cpu.block_k) == (16, 32, 32)
    small = select_config(GemmProblem(4, 16, 16, 8, 2), tmq.get_scheme("bf16"), "cuda")
    assert (small.block_n, small.block_k) == (16, 16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(tmq.SCHEMES))
def test_select_config_block_k_fits_the_weight_format(name, dtype):
    scheme = tmq.get_scheme(name)
    for M in (1, 64, 4096):
        cfg = select_config(GemmProblem(M, 4096, 4096, 32, 4, dtype), scheme, "cuda")
        spec = scheme.weight
        if spec.fmt is None:
            continue
        assert cfg.block_k % formats.layout.TRAITS[spec.fmt].pack_ratio[1] == 0
        group = k_group(spec)
        codec = _operand.CODECS[spec.fmt][1]
        keeps_codes_exact = codec is ScaleCodec.FLOAT or (codec is ScaleCodec.E8M0 and dtype is torch.float16)
        if group is not None and keeps_codes_exact and spec.act_order is ActOrder.NONE:
            assert group % cfg.block_k == 0, (name, cfg)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_m=8, block_n=32, block_k=32), "block_m"),
        (dict(block_m=16, block_n=48, block_k=32), "block_n"),
        (dict(block_m=16, block_n=32, block_k=32, group_m=0), "group_m"),
        (dict(block_m=16, block_n=32, block_k=32, num_warps=3), "num_warps"),
    ],
)
def test_kernel_config_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KernelConfig(**kwargs)


def test_select_config_rejects_bad_arguments():
    with pytest.raises(TypeError, match="problem"):
        select_config((1, 2, 3), tmq.get_scheme("bf16"), "cuda")
    with pytest.raises(TypeError, match="weight"):
        select_config(GemmProblem(1, 16, 16, 2, 1), "bf16", "cuda")
    with pytest.raises(TypeError, match="dtype"):
        GemmProblem(1, 16, 16, 2, 1, torch.int8)
