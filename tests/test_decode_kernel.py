"""The decode kernel (``moe_gemm`` with ``GemmKernel.DECODE``, the swap-AB
weight-streaming GEMM of ``kernels._decode_kernel``) under the Triton
interpreter, against ``moe_gemm_ref``, the grouped kernel and the reference
MoE; and its input order (``KOrder``).

On CPU the kernel decodes with plain shifts and masks (``ASM=False``); the
PTX decoders (``lop3`` / ``prmt``) run on CUDA only, where
``bench/decode_check.py`` checks them bit for bit against the same plain
decode. fp16 activations (the interpreter's bf16 ``tl.dot`` is broken, see
``test_kernels_interpret``); tolerances are relative Frobenius errors.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from moe_cases import rel_err  # noqa: E402

import torch_moe_quant as tmq  # noqa: E402
from torch_moe_quant import formats, reference  # noqa: E402
from torch_moe_quant.activations import Activation, GateUpLayout  # noqa: E402
from torch_moe_quant.formats import Format, Int4Mode, PerBlock, PerGroup, PerRow  # noqa: E402
from torch_moe_quant.kernels import ARows, KernelConfig, fused_experts_triton  # noqa: E402
from torch_moe_quant.kernels._operand import WeightOperand  # noqa: E402
from torch_moe_quant.kernels.align import align_triton  # noqa: E402
from torch_moe_quant.kernels.act_quant import ActPlacement, ActQuant, quantize_rows  # noqa: E402

mg = importlib.import_module("torch_moe_quant.kernels.moe_gemm")

E, TOP_K, N, K = 4, 2, 128, 256
TILE = KernelConfig(block_m=16, block_n=64, block_k=64)
#: fp32 accumulation order only (codes enter the dot exactly, scales in fp32 or exact in fp16)
EXACT_TOL = 1e-5


def _weight(name, seed=0, n=N, k=K):
    w = torch.randn(E, n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    return {
        "int4_g128": lambda: formats.quantize(w, Format.INT4, PerGroup(128)),
        "int4_g256": lambda: formats.quantize(w, Format.INT4, PerGroup(256)),
        "int4_channel": lambda: formats.quantize(w, Format.INT4, PerRow()),
        "int4_g32": lambda: formats.quantize(w.bfloat16(), Format.INT4, PerGroup(32)),
        "int4_g64": lambda: formats.quantize(w.bfloat16(), Format.INT4, PerGroup(64)),
        "int4_g128_zp": lambda: formats.quantize(w, Format.INT4, PerGroup(128), mode=Int4Mode.ASYMMETRIC),
        "int4_channel_zp": lambda: formats.quantize(w.bfloat16(), Format.INT4, PerRow(), mode=Int4Mode.ASYMMETRIC),
        "fp8_channel": lambda: formats.quantize(w, Format.FP8_E4M3, PerRow()),
        "fp8_block128": lambda: formats.quantize(w, Format.FP8_E4M3, PerBlock(128, 128)),
        "mxfp4": lambda: formats.quantize(w, Format.MXFP4),
        "nvfp4": lambda: formats.quantize(w, Format.NVFP4),
    }[name]()


def _routing(M, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(M)]).int()
    return ids, torch.rand(M, TOP_K, generator=g)


def _gemm(kernel, a, w, M, a_rows=ARows.TOKENS, **kw):
    ids, _ = _routing(M)
    al = align_triton(ids, E, TILE.block_m)
    return mg.moe_gemm(a, w, *al, top_k=TOP_K, a_rows=a_rows, config=TILE, kernel=kernel, **kw), al


@pytest.mark.parametrize("per_word", [2, 8])
def test_korder_permute_positions_and_round_trip(per_word):
    order = mg.KOrder(per_word)
    t = torch.arange(3 * order.span * 2, dtype=torch.float32).reshape(3, -1)
    p = order.permute(t)
    span = order.span
    for k in range(t.shape[1]):
        w, j = divmod(k % span, per_word)
        assert p[0, (k // span) * span + j * order.words + w] == t[0, k]
    assert torch.equal(order.unpermute(p), t)
    assert mg.NATURAL.permute(t) is t


@pytest.mark.parametrize("name, M", [
    ("int4_g128", 1), ("int4_g256", 24), ("int4_channel", 5), ("mxfp4", 24), ("nvfp4", 5),
    ("int4_g32", 3), ("int4_g64", 24), ("int4_g128_zp", 5), ("int4_channel_zp", 2), ("fp8_channel", 4),
    ("fp8_block128", 9),
])
def test_decode_matches_ref_and_grouped(name, M):
    w = _weight(name)
    a = torch.randn(M, K, generator=torch.Generator().manual_seed(2)).half()
    out, al = _gemm(mg.GemmKernel.DECODE, a, w, M)
    ref = mg.moe_gemm_ref(a, w, *al, top_k=TOP_K, a_rows=ARows.TOKENS, config=TILE)
    grouped, _ = _gemm(mg.GemmKernel.GROUPED, a, w, M)
    assert rel_err(out, ref) < 2e-3  # fp16 output rounding
    assert rel_err(out, grouped) < 2e-3


@pytest.mark.parametrize("name", ["int4_g128", "int4_g128_zp", "int4_g32"])
def test_decode_unrolled_k_tiles_and_tail(name, monkeypatch):
    """int4 runs two K tiles an iteration (``moe_gemm._decode_unroll``); a K that
    is an odd number of tiles leaves one for the tail loop. Same result as one
    tile an iteration (the same dots in the same order: bit-identical), and as
    the reference."""
    M, k = 5, 384  # one iteration of two tiles, one tile in the tail loop
    w = _weight(name, k=k)
    a = torch.randn(M, k, generator=torch.Generator().manual_seed(8)).half()
    assert mg._decode_unroll(WeightOperand.of(w), TILE.block_m) == 2
    out, al = _gemm(mg.GemmKernel.DECODE, a, w, M)
    monkeypatch.setattr(mg, "DECODE_UNROLL", 1)
    one, _ = _gemm(mg.GemmKernel.DECODE, a, w, M)
    assert torch.equal(out, one)
    ref = mg.moe_gemm_ref(a, w, *al, top_k=TOP_K, a_rows=ARows.TOKENS, config=TILE)
    assert rel_err(out, ref) < 2e-3  # fp16 output rounding


@pytest.mark.parametrize(
    "name, layout",
    [("int4_g128", GateUpLayout.UP_GATE), ("mxfp4", GateUpLayout.INTERLEAVED), ("nvfp4", GateUpLayout.GATE_UP),
     ("int4_g32", GateUpLayout.INTERLEAVED), ("int4_g128_zp", GateUpLayout.GATE_UP),
     ("fp8_block128", GateUpLayout.UP_GATE)],
)
def test_decode_gated_epilogue_bias_and_routing_weights(name, layout):
    M = 7
    w = _weight(name)
    a = torch.randn(M, K, generator=torch.Generator().manual_seed(3)).half()
    bias = torch.randn(E, N, generator=torch.Generator().manual_seed(4))
    ids, tw = _routing(M)
    al = align_triton(ids, E, TILE.block_m)
    kw = dict(top_k=TOP_K, a_rows=ARows.TOKENS, config=TILE, bias=bias, topk_weights=tw,
              activation=Activation.SWIGLUOAI, layout=layout, out_dtype=torch.float32)
    out = mg.moe_gemm(a, w, *al, kernel=mg.GemmKernel.DECODE, **kw)
    ref = mg.moe_gemm_ref(a, w, *al, **kw)
    assert out.shape == (M * TOP_K, N // 2)
    assert rel_err(out, ref) < EXACT_TOL


@pytest.mark.parametrize("name", ["int4_g128", "mxfp4"])
def test_decode_reads_and_writes_permuted_orders(name):
    """a_order: a given in the decode order is read as is (no copy) and gives
    the natural-order result; out_order: the output is written permuted."""
    M = 6
    w = _weight(name)
    order = mg._decode_k_order(WeightOperand.of(w))
    a = torch.randn(M * TOP_K, K, generator=torch.Generator().manual_seed(5)).half()
    ids, tw = _routing(M)
    al = align_triton(ids, E, TILE.block_m)
    kw = dict(top_k=TOP_K, a_rows=ARows.PAIRS, config=TILE, topk_weights=tw, out_dtype=torch.float32)
    natural = mg.moe_gemm(a, w, *al, kernel=mg.GemmKernel.DECODE, **kw)
    permuted_in = mg.moe_gemm(order.permute(a), w, *al, kernel=mg.GemmKernel.DECODE, a_order=order, **kw)
    assert torch.equal(natural, permuted_in)
    out_perm = mg.moe_gemm(a, w, *al, kernel=mg.GemmKernel.DECODE, out_order=mg.KOrder(8), **kw)
    assert torch.equal(mg.KOrder(8).unpermute(out_perm), natural)
    # the grouped kernel takes the same orders (converting a, permuting its store)
    grouped = mg.moe_gemm(order.permute(a), w, *al, kernel=mg.GemmKernel.GROUPED, a_order=order,
                          out_order=mg.KOrder(8), **kw)
    assert rel_err(mg.KOrder(8).unpermute(grouped), natural) < EXACT_TOL
    ref = mg.moe_gemm_ref(order.permute(a), w, *al, a_order=order, out_order=mg.KOrder(8), **kw)
    assert rel_err(ref, out_perm) < EXACT_TOL


def test_order_span_must_divide_k():
    w = _weight("int4_g128")
    a = torch.randn(3, K).half()
    with pytest.raises(ValueError, match="multiple of the KOrder span 384"):
        _gemm(mg.GemmKernel.DECODE, a, w, 3, a_order=mg.KOrder(8, 48))
    with pytest.raises(TypeError, match="a_order must be a KOrder"):
        _gemm(mg.GemmKernel.DECODE, a, w, 3, a_order=8)


@pytest.mark.parametrize(
    "weight, act, dtype, match",
    [
        (lambda: formats.quantize(torch.randn(E, N, K), Format.INT4, PerGroup(64)), None, torch.float16, "bf16 scales"),
        (lambda: formats.quantize(torch.randn(E, N, K).bfloat16(), Format.INT4, PerGroup(64), mode=Int4Mode.ASYMMETRIC),
         None, torch.float16, "zero points"),
        (lambda: formats.quantize(torch.randn(E, N, K), Format.INT4, PerGroup(16)), None, torch.float16, "groups of 16"),
        (lambda: formats.quantize(torch.randn(E, N, K), Format.INT8, PerRow()), None, torch.float16, "INT8"),
        (lambda: torch.randn(E, N, K).half(), None, torch.float16, "FLOAT"),
        (lambda: _weight("mxfp4"), None, torch.float32, "compute dtype"),
    ],
)
def test_decode_blocker_names_the_reason(weight, act, dtype, match):
    op = WeightOperand.of(weight())
    assert match in mg.decode_blocker(op, act, dtype, torch.device("cpu"))
    with pytest.raises(ValueError, match="GemmKernel.DECODE"):
        mg.decode_order(op, act, TILE, dtype, torch.device("cpu"), mg.GemmKernel.DECODE)
    assert mg.decode_order(op, act, TILE, dtype, torch.device("cpu")) == mg.NATURAL


def test_auto_takes_decode_only_at_decode_sizes():
    op = WeightOperand.of(_weight("mxfp4"))
    cpu = torch.device("cpu")
    assert mg.decode_order(op, None, TILE, torch.float16, cpu) == mg.KOrder(8, 16)
    big = KernelConfig(block_m=64, block_n=64, block_k=64)
    assert mg.decode_order(op, None, big, torch.float16, cpu) == mg.NATURAL
    assert mg.decode_order(op, None, big, torch.float16, cpu, mg.GemmKernel.DECODE) == mg.KOrder(8, 16)
    with pytest.raises(TypeError, match="kernel must be a GemmKernel"):
        mg.decode_order(op, None, TILE, torch.float16, cpu, "decode")


@pytest.mark.parametrize("scheme", [
    # (AWQ and g128_zp reach the kernel as GPTQ's canonical codes + zero points; g64 as g32 with
    # two scales a tile: test_decode_matches_ref_and_grouped covers both layouts)
    "int4_w4a16_g128", "mxfp4_w4a16", "nvfp4_w4a16", "int4_w4a16_g32", "int4_w4a16_gptq_g128",
    "fp8_w8a16_block128",
])
def test_fused_experts_on_the_decode_kernel(scheme, monkeypatch):
    """Both GEMMs on the decode kernel (GEMM1 writes GEMM2's input order),
    against the reference MoE."""
    launches = []
    real = mg._launch_decode
    monkeypatch.setattr(mg, "_launch_decode", lambda *a, **kw: (launches.append(1), real(*a, **kw))[1])
    H, I, M = 128, 256, 5
    g = torch.Generator().manual_seed(6)
    # groups of 32 / 64 run on the decode kernel with bf16 scales (a bf16 model's)
    dt = torch.bfloat16 if scheme.endswith(("g32", "g64")) else torch.float32
    ex = tmq.quantize_experts((torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dt),
                              (torch.randn(E, H, I, generator=g) / I**0.5).to(dt), scheme)
    x = torch.randn(M, H, generator=g).half()
    w, ids = tmq.route(torch.randn(M, E, generator=g), TOP_K, "softmax_topk_renormalize")
    out = fused_experts_triton(x, ex, w, ids)
    assert len(launches) == 2
    assert rel_err(out, reference.fused_moe(x, ex, w, ids)) < 2e-3


@pytest.mark.parametrize("scheme, name, M", [
    ("int4_w4a8_g128", "int4_g128", 5), ("int4_w4a8_channel", "int4_channel", 3), ("int4_w4afp8_g128", "int4_g128", 7),
    ("int4_w4afp8_g128", "mxfp4", 4),
])
def test_decode_reads_row_codes(scheme, name, M):
    """Per-row fp8 / int8 activation codes (the w4a8 schemes' GEMM input) on
    the decode kernel: the dot runs on the codes, the row scale in the
    epilogue; same result as the grouped kernel and the reference."""
    act = ActQuant.of(tmq.SCHEMES[scheme].activation)
    assert act.placement is ActPlacement.ROW_KERNEL
    w = _weight(name)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(7))
    codes, a_scale = quantize_rows(x, act)
    op = WeightOperand.of(w)
    assert mg.decode_blocker(op, act, torch.bfloat16, torch.device("cpu")) is None
    ids, tw = _routing(M)
    al = align_triton(ids, E, TILE.block_m)
    kw = dict(top_k=TOP_K, a_rows=ARows.TOKENS, config=TILE, topk_weights=tw, act=act, a_scale=a_scale,
              out_dtype=torch.float32, compute_dtype=torch.bfloat16)
    out = mg.moe_gemm(codes, w, *al, kernel=mg.GemmKernel.DECODE, **kw)
    grouped = mg.moe_gemm(codes, w, *al, kernel=mg.GemmKernel.GROUPED, **kw)
    ref = mg.moe_gemm_ref(codes, w, *al, **kw)
    assert rel_err(out, ref) < 1e-5  # exact code products summed in fp32
    assert rel_err(out, grouped) < 1e-5


@pytest.mark.parametrize("scheme", ["int4_w4a8_g128", "int4_w4a8_channel", "int4_w4afp8_g128"])
def test_fused_w4a8_on_the_decode_kernel(scheme, monkeypatch):
    """Both GEMMs of a w4a8 MoE on the decode kernel (GEMM1 writes GEMM2's
    order, the row quantizer keeps it), against the reference MoE."""
    launches = []
    real = mg._launch_decode
    monkeypatch.setattr(mg, "_launch_decode", lambda *a, **kw: (launches.append(1), real(*a, **kw))[1])
    H, I, M = 128, 256, 5
    g = torch.Generator().manual_seed(8)
    ex = tmq.quantize_experts(torch.randn(E, 2 * I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5,
                              scheme)
    x = torch.randn(M, H, generator=g).bfloat16()
    w, ids = tmq.route(torch.randn(M, E, generator=g), TOP_K, "softmax_topk_renormalize")
    out = fused_experts_triton(x, ex, w, ids)
    assert len(launches) == 2
    assert rel_err(out.float(), reference.fused_moe(x, ex, w, ids).float()) < 1e-2  # bf16 output


def test_w8a8_keeps_the_grouped_kernel():
    """fp8 weights take the decode kernel weight-only; with fp8 activation
    codes (w8a8) they keep the grouped kernel's native fp8 dot."""
    op = WeightOperand.of(_weight("fp8_channel"))
    assert mg.decode_blocker(op, None, torch.bfloat16, torch.device("cpu")) is None
    act = ActQuant.of(tmq.SCHEMES["fp8_w8a8_channel_token"].activation)
    assert "native fp8 dot" in mg.decode_blocker(op, act, torch.bfloat16, torch.device("cpu"))
    assert mg.decode_order(op, act, TILE, torch.bfloat16, torch.device("cpu")) == mg.NATURAL
