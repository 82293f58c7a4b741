"""``moe_quant.moe_<scheme>`` (routing + experts in one op) and the lowering
that fuses a ``route`` call feeding an experts call into it
(``lowerings.block_fusion``)."""

import pytest
import torch
from moe_cases import E, H, MoEBlock, inputs, make_experts, rel_err
from test_ops import opcheck_any
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import torch_moe_quant as tmq
from torch_moe_quant.ops import BLOCK_OPS, SIGNATURES, block_op_for, op_for

SCHEMES = sorted(tmq.SCHEMES)
M = 6
#: (method, extra route arguments, top_k)
ROUTINGS = {
    "softmax_topk_renormalize": ((None, None, None, 1.0), 2),
    "topk_softmax": ((None, None, None, 1.0), 2),
    "deepseek_v3": ((torch.linspace(-0.1, 0.1, E), 2, 1, 2.5), 2),
    "llama4": ((None, None, None, 1.0), 1),
}


def _logits(seed=5):
    return torch.randn(M, E, generator=torch.Generator().manual_seed(seed))


def block_args(name, method="softmax_topk_renormalize", routing_dtype=None, requires_grad=False):
    experts = make_experts(name)
    x = inputs(M).requires_grad_(requires_grad)
    logits = _logits().requires_grad_(requires_grad)
    extra, top_k = ROUTINGS[method]
    args = (
        x, logits, top_k, method, *extra, routing_dtype,
        *SIGNATURES[name].flatten(experts), None, "silu", experts.layout.value, False,
    )
    return experts, args


def route_then_experts(name, args):
    """What the block op replaces: the route op, the cast, the experts op."""
    x, logits, top_k, method, bias, groups, topk_groups, scaling, routing_dtype, *rest = args
    w, ids = torch.ops.moe_quant.route(logits, top_k, method, bias, groups, topk_groups, scaling)
    if routing_dtype is not None:
        w = w.to(routing_dtype)
    return op_for(tmq.get_scheme(name))(x, w, ids, *rest)


def test_one_block_op_per_scheme():
    names = set(dir(torch.ops.moe_quant))
    assert set(BLOCK_OPS) == set(tmq.SCHEMES)
    assert all(f"moe_{s}" in names for s in tmq.SCHEMES)
    schema = str(block_op_for("nvfp4_w4a4")._schema)
    assert "Tensor router_logits, int top_k, str method, Tensor? correction_bias" in schema
    assert "ScalarType? routing_dtype, Tensor w13, Tensor w13_scale, Tensor w13_global_scale" in schema
    assert "Tensor a13_scale, Tensor a2_scale" in schema


@pytest.mark.parametrize("name", SCHEMES)
def test_opcheck_block_op(name):
    _, args = block_args(name)
    opcheck_any(block_op_for(name), args)


@pytest.mark.parametrize("method", sorted(ROUTINGS))
@pytest.mark.parametrize("name", ["bf16", "int4_w4a16_g128", "fp8_w8a8_channel_token", "mxfp4_w4a4"])
def test_block_op_is_route_then_experts(name, method):
    for routing_dtype in (None, torch.bfloat16):
        _, args = block_args(name, method, routing_dtype)
        out = block_op_for(name)(*args)
        assert torch.equal(out, route_then_experts(name, args)), (method, routing_dtype)


def test_block_op_gradients_match_route_then_experts():
    _, args = block_args("int4_w4a16_g128", "deepseek_v3", torch.bfloat16, requires_grad=True)
    x, logits = args[:2]
    out = block_op_for("int4_w4a16_g128")(*args)
    gx, gl = torch.autograd.grad(out.float().square().sum(), (x, logits))
    ref = route_then_experts("int4_w4a16_g128", args)
    rx, rl = torch.autograd.grad(ref.float().square().sum(), (x, logits))
    assert torch.equal(gx, rx) and torch.equal(gl, rl)
    assert gl.abs().sum() > 0  # the routing weights did receive a gradient


def test_block_op_errors_name_the_argument():
    _, args = block_args("bf16")
    bad = list(args)
    bad[3] = "softmax_top2"
    with pytest.raises(ValueError, match="method must be one of"):
        block_op_for("bf16")(*bad)
    bad = list(args)
    bad[1] = _logits()[:3]  # 3 routed tokens for 6 hidden states
    with pytest.raises(ValueError, match="topk_ids must have shape"):
        block_op_for("bf16")(*bad)


# ------------------------------------------------------------ the lowering


def compile_code(fn, *args):
    with torch.no_grad():
        out, (code,) = run_and_get_code(torch.compile(fn, fullgraph=True, dynamic=True), *args)
        return out, fn(*args), code


def _rewrites():
    return dict(counters["moe_quant"])


@pytest.mark.parametrize("name", ["bf16", "int4_w4a16_g128", "fp8_w8a8_channel_token"])
def test_route_then_experts_calls_are_fused(lowered, name):
    block = MoEBlock(make_experts(name))
    out, ref, code = compile_code(block, inputs(M))
    assert _rewrites() == {"route_experts": 1}
    assert f"torch.ops.moe_quant.moe_{name}.default(" in code
    assert "moe_quant.route" not in code and "moe_quant.experts_" not in code
    assert torch.equal(out, ref)


class Routed(torch.nn.Module):
    """Router + route op + experts op, with ``tail`` between the routing and
    the experts call (``tail(w, ids) -> (w, ids, extra outputs)``)."""

    def __init__(self, tail, name="bf16", method="softmax_topk_renormalize"):
        super().__init__()
        self.experts, self.tail, self.method = make_experts(name), tail, method
        self.router = torch.nn.Parameter(torch.randn(E, H, generator=torch.Generator().manual_seed(3)) / 8)

    def forward(self, x):
        logits = x.float() @ self.router.T
        w, ids = torch.ops.moe_quant.route(logits, 2, self.method)
        w, ids, *extra = self.tail(w, ids)
        return (tmq.fused_moe(x, self.experts, w, ids), *extra)


FUSED_TAILS = {
    "bf16_weights": (lambda w, ids: (w.to(torch.bfloat16), ids), torch.bfloat16),
    "int64_ids": (lambda w, ids: (w, ids.long()), None),
    "reshaped_ids": (lambda w, ids: (w, ids.reshape(-1).long().view(-1, 2)), None),
}


@pytest.mark.parametrize("tail", sorted(FUSED_TAILS))
def test_value_preserving_steps_are_fused(lowered, tail):
    fn, routing_dtype = FUSED_TAILS[tail]
    out, ref, code = compile_code(Routed(fn), inputs(M))
    assert _rewrites() == {"route_experts": 1}
    (call,) = [line for line in code.splitlines() if "torch.ops.moe_quant.moe_bf16.default(" in line]
    assert f"1.0, {routing_dtype}, " in call  # routing_dtype is the weights' one cast
    assert torch.equal(out[0], ref[0])


NEAR_MISSES = {
    # routing outputs with another user
    "weights_returned": lambda w, ids: (w, ids, w),
    "ids_returned": lambda w, ids: (w, ids, ids),
    # not value-preserving
    "scaled_weights": lambda w, ids: (w * 2.0, ids),
    "renormalized": lambda w, ids: (w / w.sum(-1, keepdim=True), ids),
    "shifted_ids": lambda w, ids: (w, (ids + 1) % E),
    "swapped_slots": lambda w, ids: (w.flip(-1), ids.flip(-1)),
}


@pytest.mark.parametrize("tail", sorted(NEAR_MISSES))
def test_near_misses_are_not_fused(lowered, tail):
    out, ref, code = compile_code(Routed(NEAR_MISSES[tail]), inputs(M))
    assert "route_experts" not in _rewrites()
    assert "torch.ops.moe_quant.route.default(" in code and "torch.ops.moe_quant.experts_bf16.default(" in code
    assert "moe_quant.moe_" not in code
    for o, r in zip(out, ref):
        assert rel_err(o, r) <= 1e-6


def test_fused_block_on_real_model_code_matches_eager(lowered):
    # transformers Qwen3-MoE: the routing and grouped_mm rewrites, then the fusion
    from test_lowerings_experts import moe_block, tokens

    block = moe_block("qwen3_moe", "grouped_mm", torch.bfloat16)
    out, ref, code = compile_code(block, tokens(7, torch.bfloat16))
    assert _rewrites() == {"grouped_mm": 1, "softmax_topk_renormalize": 1, "route_experts": 1}
    assert "torch.ops.moe_quant.moe_bf16.default(" in code
    assert rel_err(out[0], ref[0]) <= 1.2e-2
