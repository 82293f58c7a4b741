"""Activation quantization on the Triton path, on CPU under the Triton
interpreter (set first thing, as in ``test_kernels_interpret``):

* the device helpers (``kernels.act_quant.quantize_activation`` /
  ``quantize_rows``) against ``formats`` bit for bit, on edge values;
* the GEMM prologue / row-quant / native-dot paths of ``moe_gemm`` against
  ``moe_gemm_ref`` (which quantizes with ``formats``);
* the fused pipeline of every activation-quantizing scheme against
  ``fused_experts_ref`` and ``reference.fused_moe``.

Measured with triton 3.9's interpreter: ``tl.dot`` on fp8 e4m3 operands
(fp32 out) and on int8 operands (int32 out) is exact, so the native-dot
paths run here as on the GPU (bf16 dots are not: fp16 activations, as in
``test_kernels_interpret``).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import functools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from act_quant_cases import edge_rows as _edge_rows, nan_rows as _nan_rows, same_codes as _same_codes, same_values as _same_values  # noqa: E402
from moe_cases import make_experts, rel_err  # noqa: E402

from torch_moe_quant import reference  # noqa: E402
from torch_moe_quant.kernels import (  # noqa: E402
    ARows,
    KernelConfig,
    fused_experts_ref,
    fused_experts_triton,
    moe_gemm,
    moe_gemm_ref,
)
import dataclasses  # noqa: E402
import importlib  # noqa: E402

moe_gemm_module = importlib.import_module("torch_moe_quant.kernels.moe_gemm")
fused_experts_module = importlib.import_module("torch_moe_quant.kernels.fused_experts")
act_quant_module = importlib.import_module("torch_moe_quant.kernels.act_quant")
from torch_moe_quant.kernels._operand import WeightOperand  # noqa: E402
from torch_moe_quant.kernels.config import fit_activation  # noqa: E402
from torch_moe_quant.kernels.fused_experts import ActInput  # noqa: E402
from torch_moe_quant.kernels.moe_gemm import DotKind, DotPreference, choose_dot  # noqa: E402
from torch_moe_quant.kernels.act_quant import (  # noqa: E402
    ActPlacement,
    ActQuant,
    ActScale,
    qdq_rows,
    quantize_activation,
    quantize_activation_ref,
    quantize_rows,
    quantize_rows_ref,
)
from torch_moe_quant.schemes import SCHEMES  # noqa: E402

#: every activation spec of the registry, with a static scale where it needs one
ACT_SCHEMES = sorted(n for n, s in SCHEMES.items() if s.activation is not None)
SPECS = {}
for _n in ACT_SCHEMES:
    SPECS.setdefault(str(SCHEMES[_n].activation), SCHEMES[_n].activation)


def _static(spec):
    if spec.mode.value != "static":
        return None
    return torch.tensor([744.7273 if spec.fmt.value == "nvfp4" else 0.0123], dtype=torch.float32)


def _check_exact(x: torch.Tensor, act: ActQuant):
    got, want = quantize_activation(x, act), quantize_activation_ref(x, act)
    assert _same_codes(got.codes, want.codes), (act.spec, (got.codes != want.codes).nonzero()[:5])
    if act.scale is ActScale.NVFP4:
        assert _same_codes(got.scale, want.scale), act.spec
    else:
        assert _same_values(got.scale.float(), want.scale.float()) if got.scale.is_floating_point() else (
            torch.equal(got.scale, want.scale)
        ), act.spec
    assert _same_values(got.values, want.values), (act.spec, (got.values != want.values).nonzero()[:5])


@pytest.mark.parametrize("key", sorted(SPECS))
def test_device_helpers_are_bit_exact(key):
    spec = SPECS[key]
    act = ActQuant.of(spec, _static(spec))
    x = _edge_rows(256)
    if spec.fmt.value == "int8":
        x = x[torch.isfinite(x).all(1) & (x.abs().amax(1) < 1e30)]  # formats rejects non-finite int8 input
        if act.static_scale is not None:
            x = x[(x.abs() / act.static_scale).amax(1) < 1e6]
    _check_exact(x, act)
    if spec.fmt.value != "int8":  # NaN / inf as formats defines them
        _check_exact(_nan_rows(256), act)


@pytest.mark.parametrize("key", [k for k in sorted(SPECS) if "per-row" not in k])
def test_qdq_rows_matches_formats(key):
    spec = SPECS[key]
    act = ActQuant.of(spec, _static(spec))
    x = _edge_rows(128, seed=5)
    if spec.fmt.value == "int8":
        x = x[torch.isfinite(x).all(1) & ((x.abs() / act.static_scale).amax(1) < 1e6)]
    want = quantize_activation_ref(x, act).values
    assert _same_values(qdq_rows(x, act, torch.float32), want)
    assert _same_values(qdq_rows(x, act, torch.float16), want.to(torch.float16))
    with pytest.raises(ValueError, match="quantize_rows"):
        qdq_rows(x, ActQuant.of(SPECS[next(k for k in SPECS if "per-row" in k)]), torch.float32)


@pytest.mark.parametrize("key", [k for k in sorted(SPECS) if "per-tensor" in k])
def test_quantize_rows_static_matches_formats(key):
    spec = SPECS[key]
    act = ActQuant.of(spec, _static(spec))
    x = _edge_rows(96, seed=4)
    x = x[torch.isfinite(x).all(1) & ((x.abs() / act.static_scale).amax(1) < 1e6)]
    codes, scale = quantize_rows(x, act)
    rcodes, rscale = quantize_rows_ref(x, act)
    assert _same_codes(codes, rcodes) and torch.equal(scale, rscale)
    assert torch.equal(scale, act.static_scale.expand(x.shape[0]))
    row = act.as_row_codes()
    assert row.scale is ActScale.DYNAMIC_ROW and row.placement is ActPlacement.ROW_KERNEL and row.element is act.element


def test_row_codes_refuse_other_activations():
    mx = ActQuant.of(SPECS[next(k for k in SPECS if "mxfp4" in k)])
    with pytest.raises(ValueError, match="row codes"):
        mx.as_row_codes()
    with pytest.raises(ValueError, match="quantize_rows is for fp8 / int8"):
        quantize_rows(torch.zeros(2, 64), mx)


#: how the default pipeline (ActInput.QDQ_KERNEL) quantizes GEMM1's input
QDQ_KERNEL_INPUT = {"fp8_w8a8_tensor_static": "quantize_rows", "int8_w8a8_tensor_static": "quantize_rows",
                    "mxfp4_w4a8_fp8": "qdq_rows", "fp8_w8a8_block128": "qdq_rows", "mxfp4_w4a4": "qdq_rows",
                    "fp8_w8a8_channel_token": "quantize_rows"}


#: ActInput.CODES: group fp8 too goes to quantize_rows (codes); MX groups stay qdq_rows
CODES_INPUT = dict(QDQ_KERNEL_INPUT, fp8_w8a8_block128="quantize_rows")


@pytest.mark.parametrize("act_input", [ActInput.QDQ_KERNEL, ActInput.CODES])
@pytest.mark.parametrize("name", sorted(QDQ_KERNEL_INPUT))
def test_pipeline_quantizer_choice(name, act_input, torch_align, monkeypatch):
    # static fp8 / int8 with natively dottable weights become exact codes; the
    # rest of the tile-local specs go through qdq_rows
    calls = []
    steps = fused_experts_module._TRITON
    record = lambda fn, tag: lambda *a, **k: (calls.append(tag), fn(*a, **k))[1]  # noqa: E731
    monkeypatch.setattr(fused_experts_module, "_TRITON", dataclasses.replace(
        steps, quantize_rows=record(steps.quantize_rows, "quantize_rows"), qdq_rows=record(steps.qdq_rows, "qdq_rows")))
    experts = _experts(name)
    topk_w, ids = _routing(5)
    out = fused_experts_triton(_x(5), experts, topk_w, ids, config=FUSED_TILE, act_input=act_input)
    assert calls == [(QDQ_KERNEL_INPUT if act_input is ActInput.QDQ_KERNEL else CODES_INPUT)[name]] * 2
    assert rel_err(out, reference.fused_moe(_x(5), experts, topk_w, ids)) < max(FUSED_BOUNDS[name], QDQ_VALUES_BOUND)


@pytest.mark.parametrize("key", [k for k in sorted(SPECS) if "per-row" in k])
def test_quantize_rows_matches_formats(key):
    act = ActQuant.of(SPECS[key])
    x = _edge_rows(160, seed=3)[:, :160]  # K not a multiple of the kernel's chunk
    x = x[torch.isfinite(x).all(1) & (x.abs().amax(1) < 1e30)]
    for dtype in (torch.float32, torch.float16):
        xd = x.to(dtype)
        xd = xd[torch.isfinite(xd).all(1)]
        codes, scale = quantize_rows(xd, act)
        rcodes, rscale = quantize_rows_ref(xd, act)
        assert _same_codes(codes, rcodes) and _same_values(scale, rscale)


#: one spec per scale kind: per-row (whole-row programs), group, static per-tensor
TILE_SPECS = [next(k for k in sorted(SPECS) if tag in k) for tag in ("per-row", "mxfp4", "per-tensor")]


@pytest.mark.parametrize("key", TILE_SPECS)
@pytest.mark.parametrize("rows, k", [(300, 256), (3, 2304), (16, 384)])
def test_launch_tiles_are_bit_exact(key, rows, k):
    # every launch shape of the row kernel: 16-row whole-row programs from
    # WIDE_ROWS rows on; below, K split one tile per program (group / static)
    # or 2-row programs striding up to 1024 columns (per-row; 2304 = 2 * 1024
    # + a masked tail)
    spec = SPECS[key]
    act = ActQuant.of(spec, _static(spec))
    tiles = act_quant_module.launch_tiles(act, rows, k)
    if rows >= act_quant_module.WIDE_ROWS:
        assert (tiles.block_r, tiles.grid(rows, k)[1]) == (16, 1)
    elif act.scale is ActScale.DYNAMIC_ROW:
        assert (tiles.block_r, tiles.block_k) == (2, min(1024, 1 << (k - 1).bit_length()))
        assert tiles.grid(rows, k) == (-(-rows // 2), 1)
    else:
        assert tiles.k_chunk == tiles.block_k and tiles.grid(rows, k)[1] == -(-k // tiles.block_k) > 1
    g = torch.Generator().manual_seed(rows + k)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-3, 3, rows)[:, None]
    x[:, ::97] *= 50.0  # outliers in a few columns: per-row scales come from far along the row
    _check_exact(x, act)


def test_act_quant_placement_and_errors():
    by_name = {n: ActQuant.of(SCHEMES[n].activation, _static(SCHEMES[n].activation)) for n in ACT_SCHEMES}
    rows = {n for n, a in by_name.items() if a.placement is ActPlacement.ROW_KERNEL}
    assert rows == {
        "fp8_w8a8_tensor_token", "fp8_w8a8_channel_token", "int8_w8a8_channel_token",
        "int4_w4a8_channel", "int4_w4a8_g128", "int4_w4afp8_g128",
    }
    with pytest.raises(ValueError, match="a13_scale"):
        ActQuant.of(SCHEMES["fp8_w8a8_tensor_static"].activation, None, "a13_scale")
    with pytest.raises(ValueError, match="K=48"):
        quantize_activation(torch.zeros(2, 48), by_name["mxfp4_w4a4"])
    with pytest.raises(ValueError, match="per-row"):
        quantize_rows(torch.zeros(2, 64), by_name["mxfp4_w4a4"])


# ---------------------------------------------------------------- fused pipeline, every scheme


#: fused tests: few, large programs (the interpreter's cost is per program)
FUSED_TILE = KernelConfig(block_m=16, block_n=128, block_k=64)
H = 128


@functools.lru_cache(maxsize=None)
def _experts(name):
    return make_experts(name)


def _routing(M, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(M)]).to(torch.int32)
    return torch.rand(M, 2, generator=g), ids


def _x(M, seed=5):
    return torch.randn(M, H, generator=torch.Generator().manual_seed(seed)).half()


#: scheme -> relative Frobenius bound vs reference.fused_moe (fp16 activations). The
#: Triton pipeline quantizes the reference's fp32 values bit for bit; what differs is
#: the fp16 rounding of dot operands on the compute path and the accumulation
#: order, which can move a value of GEMM2's input across a quantization step
#: (one step of a 4-bit element is ~10% of the group's amax).
#: floor of the bound when ``qdq_rows`` writes the QDQ values in fp16
QDQ_VALUES_BOUND = 1e-2
FUSED_BOUNDS = {
    "fp8_w8a8_block128": 2e-3,
    "fp8_w8a8_channel_token": 2e-3,
    "fp8_w8a8_tensor_static": 2e-3,
    "fp8_w8a8_tensor_token": 2e-3,
    "int4_w4a8_channel": 2e-3,
    "int4_w4a8_g128": 2e-3,
    "int4_w4afp8_g128": 2e-3,
    "int8_w8a8_channel_token": 2e-3,
    "int8_w8a8_tensor_static": 2e-3,
    "mxfp4_w4a4": 2e-2,
    "mxfp4_w4a6_e2m3": 1e-2,
    "mxfp4_w4a6_e3m2": 1e-2,
    "mxfp4_w4a8_fp8": 2e-3,
    "mxfp4_w4a8_mxfp8": 2e-3,
    "mxfp6_e2m3_w6a6": 1e-2,
    "mxfp6_e2m3_w6a8_fp8": 2e-3,
    "mxfp6_e3m2_w6a6": 1e-2,
    "mxfp6_e3m2_w6a8_fp8": 2e-3,
    "nvfp4_w4a4": 2e-2,
}


#: scheme -> (GEMM1 path, DotKind) on an fp8-capable GPU and under the interpreter
PATHS = {
    "fp8_w8a8_block128": ("prologue", "FP8"),
    "fp8_w8a8_channel_token": ("row_kernel", "FP8"),
    "fp8_w8a8_tensor_static": ("prologue", "FP8"),
    "fp8_w8a8_tensor_token": ("row_kernel", "FP8"),
    "int4_w4a8_channel": ("row_kernel", "INT8"),
    "int4_w4a8_g128": ("row_kernel", "INT8"),
    "int4_w4afp8_g128": ("row_kernel", "FP8"),
    "int8_w8a8_channel_token": ("row_kernel", "INT8"),
    "int8_w8a8_tensor_static": ("prologue", "INT8"),
    "mxfp4_w4a4": ("prologue", "COMPUTE"),
    "mxfp4_w4a6_e2m3": ("prologue", "COMPUTE"),
    "mxfp4_w4a6_e3m2": ("prologue", "COMPUTE"),
    "mxfp4_w4a8_fp8": ("prologue", "COMPUTE"),
    "mxfp4_w4a8_mxfp8": ("prologue", "COMPUTE"),
    "mxfp6_e2m3_w6a6": ("prologue", "COMPUTE"),
    "mxfp6_e2m3_w6a8_fp8": ("prologue", "COMPUTE"),
    "mxfp6_e3m2_w6a6": ("prologue", "COMPUTE"),
    "mxfp6_e3m2_w6a8_fp8": ("prologue", "COMPUTE"),
    "nvfp4_w4a4": ("prologue", "COMPUTE"),
}


@pytest.mark.parametrize("name", ACT_SCHEMES)
def test_scheme_paths(name):
    experts = _experts(name)
    act = ActQuant.of(experts.scheme.activation, experts.a13_scale)
    op = WeightOperand.of(experts.w13)
    cfg = fit_activation(FUSED_TILE, act)
    kind = choose_dot(act, op, cfg.block_k, torch.device("cpu"), DotPreference.AUTO)
    assert (act.placement.value, kind.name) == PATHS[name]


def test_every_activation_scheme_has_a_bound():
    assert sorted(FUSED_BOUNDS) == ACT_SCHEMES


@pytest.fixture
def torch_align(monkeypatch):
    """The Triton pipeline with the ``moe_quant.align`` op in place of the
    Triton align kernel: the interpreter spends ~4 s per call in that
    kernel's ``tl.reduce`` / ``tl.associative_scan`` (it runs custom combines
    element by element), which is independent of activation quantization and
    is tested in ``test_kernels_interpret`` (alone and in the pipeline)."""
    steps = fused_experts_module._TRITON
    monkeypatch.setattr(fused_experts_module, "_TRITON", dataclasses.replace(steps, align=fused_experts_module._align_ref))


PIPELINE_CASES = [(n, ActInput.QDQ_KERNEL) for n in ACT_SCHEMES]
PIPELINE_CASES += [(n, ActInput.PROLOGUE) for n in ACT_SCHEMES if PATHS[n][0] == "prologue"]
#: ActInput.CODES: fp8 block128 as group codes; mxfp4 activations fall back to qdq_rows
PIPELINE_CASES += [(n, ActInput.CODES) for n in ("fp8_w8a8_block128", "mxfp4_w4a4")]


@pytest.mark.parametrize("name,act_input", PIPELINE_CASES, ids=[f"{n}-{a.value}" for n, a in PIPELINE_CASES])
def test_fused_pipeline_matches_reference(name, act_input, torch_align):
    experts = _experts(name)
    topk_w, ids = _routing(9)
    x = _x(9)
    out = fused_experts_triton(x, experts, topk_w, ids, config=FUSED_TILE, act_input=act_input)
    twin = fused_experts_ref(x, experts, topk_w, ids, config=FUSED_TILE, act_input=act_input)
    ref = reference.fused_moe(x, experts, topk_w, ids)
    bound = FUSED_BOUNDS[name]
    values = act_input is ActInput.QDQ_KERNEL or (act_input is ActInput.CODES and "block128" not in name)
    if values and PATHS[name][0] == "prologue" and "tensor_static" not in name:
        # the QDQ values are rounded to fp16 before a compute-dtype dot (the
        # prologue keeps fp32 / feeds exact fp8 codes), and that rounding can
        # move an intermediate value across a rounding boundary of GEMM2's
        # quantizer (one code step): measured 2.5e-3 (fp8 block128); static
        # fp8 / int8 go through exact codes instead (test_pipeline_quantizer_choice)
        bound = max(bound, QDQ_VALUES_BOUND)
    assert rel_err(out, ref) < bound, rel_err(out, ref)
    assert rel_err(out, twin) < bound, rel_err(out, twin)


# ---------------------------------------------------------------- moe_gemm: native dot vs fallback


#: (weight scheme, M): every native-dot combination and its compute-dtype fallback
GEMM_CASES = [
    "fp8_w8a8_tensor_static", "fp8_w8a8_block128", "fp8_w8a8_channel_token", "int4_w4afp8_g128",
    "int8_w8a8_tensor_static", "int8_w8a8_channel_token", "int4_w4a8_g128", "mxfp4_w4a4",
]


def _gemm_inputs(name, M=5):
    experts = _experts(name)
    act = ActQuant.of(experts.scheme.activation, experts.a13_scale)
    topk_w, ids = _routing(M)
    cfg = fit_activation(KernelConfig(block_m=16, block_n=128, block_k=64), act)
    aligned = torch.ops.moe_quant.align(ids, 4, cfg.block_m, None)
    x = _x(M)
    kw = dict(top_k=2, a_rows=ARows.TOKENS, out_dtype=torch.float32, config=cfg, act=act, compute_dtype=torch.float16)
    if act.placement is ActPlacement.ROW_KERNEL:
        codes, scale = quantize_rows(x, act)
        return experts, (codes, experts.w13, *aligned), dict(kw, a_scale=scale)
    return experts, (x, experts.w13, *aligned), kw


def test_group_codes_gemm_matches_ref():
    # fp8 block128 activations as codes + [rows, K / 128] scales (ActInput.CODES):
    # the native dot with the activation scale per K tile, and its compute fallback
    experts, (x, w, *aligned), kw = _gemm_inputs("fp8_w8a8_block128")
    act = kw["act"]
    codes, scale = quantize_rows(x, act)
    rcodes, rscale = quantize_rows_ref(x, act)
    assert _same_codes(codes, rcodes) and _same_values(scale, rscale) and scale.shape == (x.shape[0], x.shape[1] // 128)
    kw = dict(kw, act=act.as_group_codes(), a_scale=scale)
    ref = moe_gemm_ref(codes, w, *aligned, **kw)
    native = moe_gemm(codes, w, *aligned, dot=DotPreference.NATIVE, **kw)
    fallback = moe_gemm(codes, w, *aligned, dot=DotPreference.COMPUTE, **kw)
    assert rel_err(native, ref) < 1e-5, rel_err(native, ref)
    assert rel_err(fallback, ref) < 2e-3, rel_err(fallback, ref)
    # the same GEMM with the prologue quantizing the float input: the same codes and scales
    prologue = moe_gemm(x, w, *aligned, dot=DotPreference.NATIVE, **dict(kw, act=act, a_scale=None))
    assert rel_err(native, prologue) < 1e-6, rel_err(native, prologue)
    with pytest.raises(ValueError, match=r"a_scale must have shape"):
        moe_gemm(codes, w, *aligned, **dict(kw, a_scale=scale[:1]))
    with pytest.raises(ValueError, match="must equal the activation group 128 for group codes"):
        moe_gemm(codes, w, *aligned, **dict(kw, config=dataclasses.replace(kw["config"], block_k=256)))
    with pytest.raises(ValueError, match="only fp8 / int8 dynamic group"):
        ActQuant.of(SPECS[next(k for k in SPECS if "per-row" in k)]).as_group_codes()


@pytest.mark.parametrize("name", GEMM_CASES)
def test_moe_gemm_native_and_fallback_match_ref(name):
    experts, args, kw = _gemm_inputs(name)
    ref = moe_gemm_ref(*args, **kw)
    native = moe_gemm(*args, **kw)  # AUTO
    fallback = moe_gemm(*args, dot=DotPreference.COMPUTE, **kw)
    # native: exact codes, fp32 (or exact int32) accumulation; fallback: QDQ values rounded to fp16
    assert rel_err(native, ref) < 1e-5, rel_err(native, ref)
    assert rel_err(fallback, ref) < 2e-3, rel_err(fallback, ref)
    if PATHS[name][1] != "COMPUTE":
        assert not torch.equal(native, fallback)  # the two paths really differ


def test_native_dot_without_fp8_tensor_cores(monkeypatch):
    """sm80 (no fp8 dot): AUTO falls back to the compute-dtype dot, NATIVE raises
    a RuntimeError naming the architecture; int8 dots are unaffected."""
    monkeypatch.setattr(moe_gemm_module, "fp8_native", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    experts, args, kw = _gemm_inputs("fp8_w8a8_channel_token")
    act, op = kw["act"], WeightOperand.of(experts.w13)
    assert choose_dot(act, op, 64, torch.device("cpu"), DotPreference.AUTO) is DotKind.COMPUTE
    with pytest.raises(RuntimeError, match="8.9.*A100"):
        moe_gemm(*args, dot=DotPreference.NATIVE, **kw)
    int8 = ActQuant.of(SCHEMES["int8_w8a8_channel_token"].activation)
    op8 = WeightOperand.of(_experts("int8_w8a8_channel_token").w13)
    assert choose_dot(int8, op8, 64, torch.device("cpu"), DotPreference.AUTO) is DotKind.INT8


def test_native_dot_refusals_name_the_reason():
    experts, args, kw = _gemm_inputs("mxfp4_w4a4")
    with pytest.raises(ValueError, match="MXFP4|FP4_E2M1"):
        moe_gemm(*args, dot=DotPreference.NATIVE, **kw)
    with pytest.raises(TypeError, match="dot"):
        moe_gemm(*args, dot="native", **kw)
    _, args, kw = _gemm_inputs("fp8_w8a8_block128")
    with pytest.raises(ValueError, match="block_k"):
        moe_gemm(*args, **dict(kw, config=KernelConfig(block_m=16, block_n=128, block_k=64)))
    _, args, kw = _gemm_inputs("fp8_w8a8_channel_token")
    with pytest.raises(TypeError, match="a_scale"):
        moe_gemm(*args, **dict(kw, a_scale=None))
