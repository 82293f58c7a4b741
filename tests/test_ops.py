"""torch.ops.moe_quant: registration, opcheck, agreement with the reference,
fake/meta shapes and trace-time errors."""

import pytest
import torch
from moe_cases import E, H, inputs, make_experts, routing

import torch_moe_quant as tmq
from torch_moe_quant import reference
from torch_moe_quant.ops import EXPERT_OPS, SIGNATURES
from torch_moe_quant.ops.quant import QUANT_OPS

SCHEMES = sorted(tmq.SCHEMES)


def test_namespace_has_one_expert_op_per_scheme_and_helpers():
    names = set(dir(torch.ops.moe_quant))
    for s in tmq.SCHEMES:
        assert f"experts_{s}" in names and f"experts_{s}_backward" in names
    assert {"route", "align"} <= names
    for f in ("fp8", "int8", "mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8", "nvfp4"):
        assert f"quantize_{f}" in names and f"dequantize_{f}" in names


def test_schema_is_derived_from_the_scheme():
    schema = str(torch.ops.moe_quant.experts_nvfp4_w4a4.default._schema)
    assert "Tensor w13, Tensor w13_scale, Tensor w13_global_scale" in schema
    assert "Tensor a13_scale, Tensor a2_scale" in schema
    gptq = str(torch.ops.moe_quant.experts_int4_w4a16_gptq_g128_actorder.default._schema)
    assert "Tensor w2_zero_point, Tensor w2_g_idx" in gptq
    assert "Tensor w13_scale" not in str(torch.ops.moe_quant.experts_bf16.default._schema)


def _has_fp8(args):
    return any(isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn for a in args)


def _op_args(name, M=5, requires_grad=True):
    experts = make_experts(name)
    x = inputs(M).requires_grad_(requires_grad)
    w, ids = routing(M)
    w = w.requires_grad_(requires_grad)
    return experts, (x, w, ids, *SIGNATURES[name].flatten(experts), None, "silu", experts.layout.value, False)


def opcheck_any(op, args):
    """opcheck with every default test. torch 2.13 cannot compare float8
    tensors on CPU (``allclose`` -> "mul_cpu_reduced_float not implemented for
    Float8_e4m3fn") in opcheck's ``test_schema`` mutation check, so for fp8
    arguments that one test is replaced by a bitwise no-mutation check."""
    if not _has_fp8(args):
        torch.library.opcheck(op, args)
        return
    before = [a.view(torch.uint8).clone() if isinstance(a, torch.Tensor) and a.dtype == torch.float8_e4m3fn else None for a in args]
    torch.library.opcheck(op, args, test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    op(*args)
    for b, a in zip(before, args):
        if b is not None:
            assert torch.equal(b, a.view(torch.uint8)), "op mutated an fp8 input"


@pytest.mark.parametrize("name", SCHEMES)
def test_opcheck_expert_op(name):
    _, args = _op_args(name)
    opcheck_any(EXPERT_OPS[name], args)


@pytest.mark.parametrize("name", SCHEMES)
def test_opcheck_backward_op(name):
    # backward ops are not themselves differentiable (no double backward)
    _, args = _op_args(name, requires_grad=False)
    grad_out = torch.randn(args[0].shape, dtype=args[0].dtype)
    op = getattr(torch.ops.moe_quant, f"experts_{name}_backward").default
    opcheck_any(op, (grad_out, *args))
    gx, gw = op(grad_out, *args)
    assert gx.shape == args[0].shape and gw.shape == args[1].shape


def test_opcheck_route_backward():
    logits = torch.randn(6, 8)
    _, ids = tmq.route(logits, 2, "softmax_topk")
    torch.library.opcheck(
        torch.ops.moe_quant.route_backward.default, (torch.randn(6, 2), logits, ids, "softmax_topk", 1.0)
    )


@pytest.mark.parametrize("name", SCHEMES)
def test_op_equals_reference(name):
    experts, _ = _op_args(name)
    x = inputs(7)
    w, ids = routing(7)
    out = tmq.fused_moe(x, experts, w, ids)
    ref = reference.fused_moe(x, experts, w, ids)
    assert out.dtype == x.dtype and out.shape == (7, H)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", ["bf16", "mxfp4_w4a16", "nvfp4_w4a4", "int4_w4a16_gptq_g128_actorder"])
def test_meta_and_fake_tensor_shapes(name):
    experts = make_experts(name).to("meta")
    x = inputs(9).to("meta")
    w, ids = routing(9)
    out = tmq.fused_moe(x, experts, w.to("meta"), ids.to("meta"))
    assert out.device.type == "meta" and out.shape == (9, H) and out.dtype == torch.bfloat16
    from torch._subclasses.fake_tensor import FakeTensorMode

    experts = make_experts(name)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx = mode.from_tensor(inputs(9))
        out = tmq.fused_moe(fx, experts, *routing(9))
    assert out.shape == (9, H)


def test_fake_impl_raises_the_eager_message():
    experts = make_experts("mxfp4_w4a16")
    w, ids = routing(4)
    bad_ids = ids[:, :1]
    with pytest.raises(ValueError, match="topk_weights must have the shape of topk_ids"):
        tmq.fused_moe(inputs(4), experts, w, bad_ids)
    f = torch.compile(lambda x, w, i: tmq.fused_moe(x, experts, w, i), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="topk_weights must have the shape of topk_ids"):
        f(inputs(4), w, bad_ids)


def test_expert_ids_out_of_range_rejected_by_op():
    experts = make_experts("int8_w8a16_channel")
    w, ids = routing(4)
    ids = ids.clone()
    ids[0, 0] = E
    with pytest.raises(ValueError, match=r"topk_ids must be in \[0, 4\)"):
        tmq.fused_moe(inputs(4), experts, w, ids)


@pytest.mark.parametrize("method", [m.value for m in tmq.RoutingMethod])
def test_route_op(method):
    logits = torch.randn(6, 8)
    kwargs = {}
    if method == "deepseek_v3":
        kwargs = dict(correction_bias=torch.randn(8) * 0.1, num_groups=4, topk_groups=2, routed_scaling_factor=2.0)
    args = (logits, 2, method, kwargs.get("correction_bias"), kwargs.get("num_groups"), kwargs.get("topk_groups"), kwargs.get("routed_scaling_factor", 1.0))
    torch.library.opcheck(torch.ops.moe_quant.route.default, args)
    w, ids = torch.ops.moe_quant.route(*args)
    rw, rids = tmq.route(logits, 2, method, **kwargs)
    assert torch.equal(w, rw) and torch.equal(ids, rids)


def _align_by_hand(topk_ids, num_experts, block, expert_map=None):
    flat = topk_ids.reshape(-1).tolist()
    sorted_ids, blocks = [], []
    for e in range(num_experts):
        pairs = [p for p, g in enumerate(flat) if (g if expert_map is None else int(expert_map[g])) == e]
        if not pairs:
            continue
        n = -(-len(pairs) // block) * block
        sorted_ids += pairs + [len(flat)] * (n - len(pairs))
        blocks += [e] * (n // block)
    return sorted_ids, blocks


@pytest.mark.parametrize("block", [1, 4, 16])
@pytest.mark.parametrize("with_map", [False, True])
def test_align_op(block, with_map):
    ids = torch.randint(0, 8, (11, 3), generator=torch.Generator().manual_seed(block), dtype=torch.int32)
    expert_map = None
    num_local = 8
    if with_map:
        expert_map = torch.tensor([-1, 0, -1, 1, 2, -1, 3, -1], dtype=torch.int32)
        num_local = 4
    args = (ids, num_local, block, expert_map)
    torch.library.opcheck(torch.ops.moe_quant.align.default, args)
    sorted_ids, block_ids, num_padded = torch.ops.moe_quant.align(*args)
    want_ids, want_blocks = _align_by_hand(ids, num_local, block, expert_map)
    n = num_padded.item()
    assert n == len(want_ids)
    assert sorted_ids[:n].tolist() == want_ids
    assert (sorted_ids[n:] == ids.numel()).all()
    assert block_ids[: n // block].tolist() == want_blocks and (block_ids[n // block:] == -1).all()
    # worst-case sized, whatever the data
    assert sorted_ids.numel() == ids.numel() + num_local * (block - 1)


@pytest.mark.parametrize("seed", range(6))
def test_align_sorted_equals_reference(seed):
    from torch_moe_quant.ops.routing import align_reference, align_sorted

    g = torch.Generator().manual_seed(seed)
    M, k, E, block = [(0, 2, 4, 4), (1, 1, 8, 16), (7, 2, 4, 1), (33, 4, 16, 8), (64, 8, 32, 16), (5, 3, 6, 64)][seed]
    ids = torch.randint(0, E, (M, k), generator=g, dtype=torch.int32)
    expert_map = None
    num_local = E
    if seed % 2:
        expert_map = torch.full((E,), -1, dtype=torch.int32)
        keep = torch.randperm(E, generator=g)[: E // 2]
        expert_map[keep] = torch.arange(E // 2, dtype=torch.int32)
        num_local = E // 2
    for a, b in zip(align_sorted(ids, num_local, block, expert_map), align_reference(ids, num_local, block, expert_map)):
        assert torch.equal(a, b)


def test_align_rejects_bad_ids():
    with pytest.raises(ValueError, match=r"topk_ids must be in \[0, 8\)"):
        torch.ops.moe_quant.align(torch.tensor([[9]], dtype=torch.int32), 8, 4)


QUANT_CASES = [
    ("fp8", ("token", 128, None)),
    ("fp8", ("group", 128, None)),
    ("fp8", ("tensor", 128, torch.tensor([[0.02]]))),
    ("int8", ("token", None)),
    ("int8", ("tensor", torch.tensor([[0.05]]))),
    ("mxfp4", ("even",)),
    ("mxfp6_e2m3", ("floor",)),
    ("mxfp6_e3m2", ("rceil",)),
    ("mxfp8", ("floor",)),
    ("nvfp4", (None,)),
    ("nvfp4", (torch.tensor([[300.0]]),)),
]


@pytest.mark.parametrize("fmt,extra", QUANT_CASES, ids=lambda v: str(v) if isinstance(v, str) else None)
def test_quantize_dequantize_ops(fmt, extra):
    x = torch.randn(6, 256)
    qop = getattr(torch.ops.moe_quant, f"quantize_{fmt}").default
    dop = getattr(torch.ops.moe_quant, f"dequantize_{fmt}").default
    outs = qop(x, *extra)
    opcheck_any(qop, (x, *extra))
    opcheck_any(dop, (*outs, torch.float32))
    y = dop(*outs, torch.float32)
    fmt_enum = next(f for f in QUANT_OPS if f.value.replace("fp8_e4m3", "fp8") == fmt)
    from torch_moe_quant.ops.quant import SPECS

    spec = next(s for s in SPECS if s.fmt is fmt_enum)
    g, options = spec.parse(*extra)
    assert torch.equal(y, tmq.formats.fake_quantize(x, fmt_enum, g, **options))


def test_quant_op_bad_granularity():
    with pytest.raises(ValueError, match="granularity must be one of"):
        torch.ops.moe_quant.quantize_fp8(torch.randn(2, 128), "channelwise")
    with pytest.raises(ValueError, match="rounding must be one of"):
        torch.ops.moe_quant.quantize_mxfp4(torch.randn(2, 64), "up")
