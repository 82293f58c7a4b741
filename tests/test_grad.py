"""Backward of the expert ops w.r.t. hidden_states and topk_weights (frozen
quantized experts), and of route w.r.t. the router logits."""

import pytest
import torch
from moe_cases import MoEBlock, inputs, layer_weights, make_experts, rel_err, routing

import torch_moe_quant as tmq
from torch_moe_quant import reference

# Weight-only schemes dequantize exactly to float64, so the op is a smooth
# function of (hidden_states, topk_weights) and gradcheck applies in float64.
GRADCHECK_SCHEMES = ["bf16", "fp8_w8a16_channel", "fp8_w8a16_block128", "int4_w4a16_g128", "int4_w4a16_gptq_g128_actorder", "mxfp4_w4a16"]


@pytest.mark.parametrize("name", GRADCHECK_SCHEMES)
@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
def test_gradcheck_float64(name, activation):
    experts = make_experts(name)
    x = (inputs(3, dtype=torch.float64) * 0.5).requires_grad_()
    w, ids = routing(3)
    w = w.double().requires_grad_()

    def f(x, w):
        return tmq.fused_moe(x, experts, w, ids, activation=activation)

    assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-5, rtol=1e-4)


# Schemes that also quantize activations: the backward treats activation
# quantize-dequantize as identity (straight-through). Its gradient must match
# the gradient of the same layer with dequantized weights and *no* activation
# quantization, up to the activation quantization error.
STE_BOUNDS = {
    "fp8_w8a8_channel_token": 0.1,
    "fp8_w8a8_block128": 0.1,
    "fp8_w8a8_tensor_static": 0.1,
    "int4_w4a8_g128": 0.1,
    "mxfp4_w4a4": 0.5,
    "mxfp4_w4a8_mxfp8": 0.1,
    "nvfp4_w4a4": 0.5,
}


@pytest.mark.parametrize("name", sorted(STE_BOUNDS))
def test_straight_through_gradient_close_to_dequantized_layer(name):
    experts = make_experts(name)
    x = inputs(8, dtype=torch.float32).requires_grad_()
    w, ids = routing(8)
    w = w.requires_grad_()
    out = tmq.fused_moe(x, experts, w, ids)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), g)

    # the same weights, dequantized (kept in fp32), without activation quantization
    dense = tmq.QuantizedExperts(
        reference.dequantize_weight(experts.w13),
        reference.dequantize_weight(experts.w2),
        tmq.get_scheme("bf16"),
        hidden_size=experts.hidden_size,
        intermediate_size=experts.intermediate_size,
    )
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    out_r = reference.fused_moe(xr, dense, wr, ids)
    rx, rw = torch.autograd.grad(out_r, (xr, wr), g.double())
    assert rel_err(gx, rx) < STE_BOUNDS[name]
    assert rel_err(gw, rw) < STE_BOUNDS[name]


def test_backward_matches_autograd_through_reference_bf16():
    """For an unquantized scheme the op's backward equals plain autograd
    through the reference (which is differentiable torch code)."""
    experts = make_experts("bf16")
    x = inputs(6, dtype=torch.float32).requires_grad_()
    w, ids = routing(6)
    w = w.requires_grad_()
    out = tmq.fused_moe(x, experts, w, ids, activation="gelu")
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    rx, rw = torch.autograd.grad(reference.fused_moe(xr, experts, wr, ids, activation="gelu"), (xr, wr), g)
    assert rel_err(gx, rx) < 1e-6 and rel_err(gw, rw) < 1e-6


def test_expert_map_and_router_on_input_gradients():
    w13, w2 = layer_weights()
    experts = tmq.quantize_experts(w13[:2], w2[:2], "mxfp4_w4a16")
    expert_map = torch.tensor([0, -1, 1, -1], dtype=torch.int32)
    x = inputs(4, dtype=torch.float64).requires_grad_()
    w, ids = routing(4, top_k=1)
    w = w.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w: tmq.fused_moe(x, experts, w, ids, expert_map=expert_map, apply_router_weight_on_input=True),
        (x, w), eps=1e-6, atol=1e-5, rtol=1e-4,
    )


@pytest.mark.parametrize("method", [m.value for m in tmq.RoutingMethod])
def test_route_gradient(method):
    logits = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    kwargs = dict(num_groups=2, topk_groups=1) if method == "deepseek_v3" else {}
    _, ids = tmq.route(logits.detach(), 2, method, **kwargs)

    def f(logits):
        return torch.ops.moe_quant.route(logits, 2, method, None, kwargs.get("num_groups"), kwargs.get("topk_groups"), 1.5)[0]

    out = f(logits)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, logits, g.float())
    ref_logits = logits.detach().clone().requires_grad_()
    ref = tmq.routing.weights_for_ids(ref_logits, ids, method, 1.5)
    (want,) = torch.autograd.grad(ref, ref_logits, g.double())
    assert rel_err(grad, want) < 1e-5


def test_compiled_training_step():
    """Fine-tuning the router on frozen quantized experts under torch.compile."""
    block = MoEBlock(make_experts("int4_w4a16_g128"))
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    x = inputs(5, dtype=torch.float32).requires_grad_()
    compiled(x).square().sum().backward()
    gx_c, gr_c = x.grad.clone(), block.router.grad.clone()
    x.grad = None
    block.router.grad = None
    block(x).square().sum().backward()
    assert rel_err(gx_c, x.grad) < 1e-3
    assert rel_err(gr_c, block.router.grad) < 1e-3
