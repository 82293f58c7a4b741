"""Bad input gets a clear error naming the argument and the expected value."""

import dataclasses

import pytest
import torch

import torch_moe_quant as tmq
from torch_moe_quant import formats

E, H, I, M = 4, 64, 32, 5


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    return torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)


@pytest.fixture
def layer(weights):
    w13, w2 = weights
    x = torch.randn(M, H)
    w, ids = tmq.route(torch.randn(M, E), 2, "softmax_topk")
    return x, tmq.quantize_experts(w13, w2, "mxfp4_w4a16"), w, ids


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


# --- quantize_experts -------------------------------------------------------

def test_mismatched_expert_count(weights):
    w13, w2 = weights
    _raises(ValueError, r"w2 has 3 experts but w13 has 4", tmq.quantize_experts, w13, w2[:3], "bf16")


def test_mismatched_hidden_and_intermediate(weights):
    w13, w2 = weights
    _raises(ValueError, r"w2.shape\[1\] \(hidden size\) must equal w13.shape\[2\]=64", tmq.quantize_experts, w13, w2[:, :32], "bf16")
    _raises(ValueError, r"w13.shape\[1\] must be 2\*I=62", tmq.quantize_experts, w13, w2[:, :, :31], "bf16")


def test_wrong_weight_dtype_and_rank(weights):
    w13, w2 = weights
    _raises(TypeError, r"w13 must be float32/bfloat16/float16, got torch.int32", tmq.quantize_experts, w13.int(), w2, "fp8_w8a16_channel")
    _raises(ValueError, r"w2 must be 3-D", tmq.quantize_experts, w13, w2[0], "bf16")
    _raises(TypeError, r"w13 must be a torch.Tensor or QuantizedTensor", tmq.quantize_experts, [1], w2, "bf16")


def test_hidden_not_divisible_by_block(weights):
    w13, w2 = weights
    _raises(ValueError, r"multiples of 32; got H=48", tmq.quantize_experts, w13[..., :48], w2[:, :48], "mxfp4_w4a16")
    _raises(ValueError, r"multiples of 128", tmq.quantize_experts, w13, w2, "int4_w4a16_g128")


def test_bias_shapes(weights):
    w13, w2 = weights
    _raises(ValueError, r"w13_bias must have shape \(4, 64\)", tmq.quantize_experts, w13, w2, "bf16", w13_bias=torch.zeros(4, 63))
    _raises(TypeError, r"w2_bias must be a float tensor", tmq.quantize_experts, w13, w2, "bf16", w2_bias=torch.zeros(4, 64, dtype=torch.int32))


def test_static_scales_required_and_checked(weights):
    w13, w2 = weights
    _raises(ValueError, r"pass a13_scale=", tmq.quantize_experts, w13, w2, "fp8_w8a8_tensor_static")
    _raises(ValueError, r"a2_scale must be finite and positive", tmq.quantize_experts, w13, w2, "fp8_w8a8_tensor_static", a13_scale=torch.tensor(1.0), a2_scale=torch.tensor(-1.0))
    _raises(ValueError, r"a13_scale is only for static-activation schemes", tmq.quantize_experts, w13, w2, "fp8_w8a8_channel_token", a13_scale=torch.tensor(1.0))


def test_static_scales_follow_the_weights_device():
    # a float or CPU-tensor scale given with weights elsewhere is stored next to
    # the weights (the Triton kernels read it there; a CPU pointer failed the launch)
    from torch_moe_quant.experts import _check_static_scales

    scheme = tmq.get_scheme("fp8_w8a8_tensor_static")
    a13, a2 = _check_static_scales(scheme, 0.5, torch.tensor(2.0), torch.device("meta"))
    assert a13.device.type == a2.device.type == "meta" and a13.shape == a2.shape == (1, 1)


def test_experts_on_another_device(layer):
    x, experts, w, ids = layer
    moved = experts.to("meta")
    _raises(ValueError, r"experts.w13.data is on meta but hidden_states is on cpu: move the experts", tmq.fused_moe, x, moved, w, ids)
    biased = dataclasses.replace(experts, w2_bias=torch.zeros(E, H, device="meta"))
    _raises(ValueError, r"experts.w2_bias is on meta but hidden_states is on cpu", tmq.fused_moe, x, biased, w, ids)


def test_act_quant_static_scale_device():
    from torch_moe_quant.kernels.act_quant import ActQuant, quantize_rows

    spec = tmq.get_scheme("fp8_w8a8_tensor_static").activation
    act = ActQuant.of(spec, torch.tensor([[0.5]], device="meta"), "a13_scale")
    _raises(ValueError, r"act.static_scale is on meta but x is on cpu", quantize_rows, torch.randn(4, 64), act)


def test_wrong_packed_size(layer):
    _, experts, _, _ = layer
    bad = dataclasses.replace(experts.w13, data=experts.w13.data[..., :-1])
    _raises(ValueError, r"w13.data must have shape \(4, 64, 32\)", tmq.quantize_experts, bad, experts.w2, "mxfp4_w4a16")


def test_scale_shape_does_not_match_block(layer):
    _, experts, _, _ = layer
    # scales for blocks of 16 instead of 32
    bad = dataclasses.replace(experts.w2, scale=experts.w2.scale.repeat_interleave(2, -1))
    _raises(ValueError, r"w2.scale must have shape \(4, 64, 1\)", tmq.quantize_experts, experts.w13, bad, "mxfp4_w4a16")


def test_wrong_scale_dtype(layer):
    _, experts, _, _ = layer
    bad = dataclasses.replace(experts.w2, scale=experts.w2.scale.float())
    _raises(TypeError, r"w2.scale must have dtype torch.uint8", tmq.quantize_experts, experts.w13, bad, "mxfp4_w4a16")


def test_wrong_format_for_scheme(layer):
    _, experts, _, _ = layer
    _raises(ValueError, r"w13 has format mxfp4, scheme nvfp4_w4a16 needs nvfp4", tmq.quantize_experts, experts.w13, experts.w2, "nvfp4_w4a16")
    _raises(TypeError, r"w2 must be a QuantizedTensor of mxfp4", tmq.quantize_experts, experts.w13, torch.zeros(E, H, I), "mxfp4_w4a16")


def test_missing_zero_point_for_asymmetric_scheme(weights):
    w13, w2 = weights
    sym = tmq.quantize_experts(w13, w2, "int4_w4a16_g128", pad_to=128)
    _raises(ValueError, r"w13.zero_point must be given", tmq.quantize_experts, sym.w13, sym.w2, "int4_w4a16_g128_zp")


# --- fused_moe ---------------------------------------------------------------

def test_hidden_states_dtype_and_shape(layer):
    x, experts, w, ids = layer
    _raises(TypeError, r"hidden_states must have dtype", tmq.fused_moe, x.int(), experts, w, ids)
    _raises(ValueError, r"hidden_states must have shape \[num_tokens, 64\]", tmq.fused_moe, x[:, :32], experts, w, ids)


def test_topk_larger_than_experts(layer):
    x, experts, _, _ = layer
    ids = torch.zeros(M, 5, dtype=torch.int32)
    _raises(ValueError, r"top_k=5 is larger than the number of experts 4", tmq.fused_moe, x, experts, torch.ones(M, 5), ids)


def test_expert_id_out_of_range(layer):
    x, experts, w, ids = layer
    bad = ids.clone()
    bad[0, 0] = 0  # the fixture's random ids need not contain 0: pin the low end of the reported range
    bad[2, 1] = 4
    _raises(ValueError, r"topk_ids must be in \[0, 4\), found ids in \[0, 4\]", tmq.fused_moe, x, experts, w, bad)
    bad[2, 1] = -1
    _raises(ValueError, r"topk_ids must be in \[0, 4\)", tmq.fused_moe, x, experts, w, bad)


def test_routing_tensor_types_and_shapes(layer):
    x, experts, w, ids = layer
    _raises(TypeError, r"topk_ids must have dtype", tmq.fused_moe, x, experts, w, ids.float())
    _raises(ValueError, r"topk_weights must have the shape of topk_ids", tmq.fused_moe, x, experts, w[:, :1], ids)
    _raises(ValueError, r"topk_ids must have shape \[num_tokens=5, top_k\]", tmq.fused_moe, x, experts, w[:4], ids[:4])


def test_expert_map_values(layer):
    x, experts, w, ids = layer
    _raises(ValueError, r"expert_map values must be -1 .* \[0, 4\)", tmq.fused_moe, x, experts, w, ids, expert_map=torch.tensor([0, 1, 2, 9], dtype=torch.int32))
    _raises(TypeError, r"expert_map must have dtype", tmq.fused_moe, x, experts, w, ids, expert_map=torch.zeros(4))


def test_activation_must_match_w13(layer):
    x, experts, w, ids = layer
    _raises(ValueError, r"activation=relu2 is non-gated and needs w13 with I rows", tmq.fused_moe, x, experts, w, ids, activation="relu2")
    _raises(ValueError, r"activation must be one of", tmq.fused_moe, x, experts, w, ids, activation="tanh")


def test_router_weight_on_input_needs_top1(layer):
    x, experts, w, ids = layer
    _raises(ValueError, r"apply_router_weight_on_input needs top_k == 1", tmq.fused_moe, x, experts, w, ids, apply_router_weight_on_input=True)


def test_experts_type(layer):
    x, _, w, ids = layer
    _raises(TypeError, r"experts must be a QuantizedExperts", tmq.fused_moe, x, {"w13": 1}, w, ids)


# --- formats -----------------------------------------------------------------

def test_formats_bad_arguments():
    x = torch.randn(4, 64)
    _raises(ValueError, r"fmt must be one of", formats.quantize, x, "fp5")
    _raises(TypeError, r"x must be float16/bfloat16/float32", formats.quantize, x.int(), "fp8_e4m3")
    _raises(ValueError, r"x must have at least 2 dims", formats.quantize, x[0], "fp8_e4m3")
    _raises(ValueError, r"granularity must be one of", formats.quantize, x, "fp8_e4m3", "per-vibe")
    _raises(TypeError, r"q must be a QuantizedTensor", formats.dequantize, x)
