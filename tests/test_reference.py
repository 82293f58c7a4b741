"""The reference fused_moe against an independent dense formulation."""

import pytest
import torch
import torch.nn.functional as F

import torch_moe_quant as tmq
from torch_moe_quant.reference import fused_moe



def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_layer(E=8, H=64, I=48, M=21, k=2, seed=0, gated=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, (2 if gated else 1) * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    x = torch.randn(M, H, generator=g).to(dtype)
    logits = torch.randn(M, E, generator=g)
    return x, w13, w2, logits


def dense_moe(x, w13, w2, weights, ids, act_fn, b13=None, b2=None, on_input=False):
    """Every expert on every token in float64, combined with a routing matrix."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    M, E = x.shape[0], w13.shape[0]
    route = torch.zeros(M, E, dtype=torch.float64)
    route.scatter_add_(1, ids.long(), weights.double())
    xin = x[None].expand(E, -1, -1)
    if on_input:
        xin = xin * route.T[:, :, None]
    h = torch.einsum("emh,enh->emn", xin, w13)
    if b13 is not None:
        h = h + b13.double()[:, None, :]
    y = torch.einsum("emi,ehi->emh", act_fn(h), w2)
    if b2 is not None:
        y = y + b2.double()[:, None, :]
    if on_input:
        return (y * (route.T[:, :, None] != 0)).sum(0)
    return (y * route.T[:, :, None]).sum(0)


def _gate_up(h, layout):
    if layout == "interleaved":
        return h[..., 0::2], h[..., 1::2]
    a, b = h.chunk(2, -1)
    return (a, b) if layout == "gate_up" else (b, a)


ACT_FNS = {
    "silu": lambda g, u: F.silu(g) * u,
    "gelu": lambda g, u: F.gelu(g) * u,
    "gelu_tanh": lambda g, u: F.gelu(g, approximate="tanh") * u,
    "swigluoai": lambda g, u: (u.clamp(-7, 7) + 1) * g.clamp(max=7) * torch.sigmoid(1.702 * g.clamp(max=7)),
    "swiglustep": lambda g, u: F.silu(g).clamp(max=7) * u.clamp(-7, 7),
}
NON_GATED = {
    "relu2": lambda h: F.relu(h) ** 2,
    "silu_no_mul": F.silu,
    "gelu_no_mul": F.gelu,
}


@pytest.mark.parametrize("layout", ["gate_up", "up_gate", "interleaved"])
@pytest.mark.parametrize("act", list(ACT_FNS))
def test_gated_activations_and_layouts(act, layout):
    x, w13, w2, logits = make_layer(seed=1)
    x = x * 4  # reach the swiglu clamps
    w, ids = tmq.route(logits, 2, "softmax_topk_renormalize")
    experts = tmq.quantize_experts(w13, w2, "bf16", layout=layout)
    w13b, w2b = w13.bfloat16().float(), w2.bfloat16().float()
    out = fused_moe(x, experts, w, ids, activation=act)
    ref = dense_moe(x, w13b, w2b, w, ids, lambda h: ACT_FNS[act](*_gate_up(h, layout)))
    assert out.dtype == x.dtype
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("act", list(NON_GATED))
def test_non_gated_activations(act):
    x, w13, w2, logits = make_layer(seed=2, gated=False)
    w, ids = tmq.route(logits, 3, "softmax_topk")
    experts = tmq.quantize_experts(w13, w2, "bf16")
    out = fused_moe(x, experts, w, ids, activation=act)
    ref = dense_moe(x, w13.bfloat16(), w2.bfloat16(), w, ids, NON_GATED[act])
    assert rel_err(out, ref) < 1e-6


def test_biases_and_fp16_scheme():
    x, w13, w2, logits = make_layer(seed=3)
    b13, b2 = torch.randn(8, 96), torch.randn(8, 64)
    w, ids = tmq.route(logits, 2, "topk_softmax")
    experts = tmq.quantize_experts(w13, w2, "fp16", w13_bias=b13, w2_bias=b2)
    assert experts.w13.dtype == torch.float16
    out = fused_moe(x, experts, w, ids)
    ref = dense_moe(x, w13.half(), w2.half(), w, ids, lambda h: ACT_FNS["silu"](*h.chunk(2, -1)), b13, b2)
    assert rel_err(out, ref) < 1e-6


def test_router_weight_on_input():
    x, w13, w2, logits = make_layer(seed=4)
    w, ids = tmq.route(logits, 1, "llama4")
    experts = tmq.quantize_experts(w13, w2, "bf16")
    out = fused_moe(x, experts, w, ids, apply_router_weight_on_input=True)
    ref = dense_moe(x, w13.bfloat16(), w2.bfloat16(), w, ids, lambda h: ACT_FNS["silu"](*h.chunk(2, -1)), on_input=True)
    assert rel_err(out, ref) < 1e-6
    # differs from applying the weight after the (non-linear) experts
    after = fused_moe(x, experts, w, ids)
    assert rel_err(after, ref) > 1e-3


def test_expert_map_half_absent():
    x, w13, w2, logits = make_layer(E=8, seed=5)
    w, ids = tmq.route(logits, 2, "softmax_topk")
    # this rank holds global experts 1, 3, 5, 7 as local 0..3
    expert_map = torch.full((8,), -1, dtype=torch.int32)
    expert_map[1::2] = torch.arange(4, dtype=torch.int32)
    local = tmq.quantize_experts(w13[1::2], w2[1::2], "bf16")
    out = fused_moe(x, local, w, ids, expert_map=expert_map)
    w13z, w2z = w13.bfloat16().float().clone(), w2.bfloat16().float().clone()
    w13z[0::2] = 0
    w2z[0::2] = 0
    ref = dense_moe(x, w13z, w2z, w, ids, lambda h: ACT_FNS["silu"](*h.chunk(2, -1)))
    assert rel_err(out, ref) < 1e-6
    # the two halves add up to the full layer
    other_map = torch.full((8,), -1, dtype=torch.int32)
    other_map[0::2] = torch.arange(4, dtype=torch.int32)
    other = fused_moe(x, tmq.quantize_experts(w13[0::2], w2[0::2], "bf16"), w, ids, expert_map=other_map)
    full = fused_moe(x, tmq.quantize_experts(w13, w2, "bf16"), w, ids)
    assert rel_err(out + other, full) < 1e-6


def test_all_tokens_one_expert_and_empty_batch():
    x, w13, w2, _ = make_layer(seed=6)
    experts = tmq.quantize_experts(w13, w2, "bf16")
    ids = torch.full((x.shape[0], 1), 3, dtype=torch.int32)
    w = torch.ones(x.shape[0], 1)
    out = fused_moe(x, experts, w, ids)
    h = x @ w13[3].bfloat16().float().T
    ref = (F.silu(h[:, :48]) * h[:, 48:]) @ w2[3].bfloat16().float().T
    assert rel_err(out, ref) < 1e-6
    empty = fused_moe(x[:0], experts, w[:0], ids[:0])
    assert empty.shape == (0, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_dtype_follows_input(dtype):
    x, w13, w2, logits = make_layer(seed=7, dtype=dtype)
    w, ids = tmq.route(logits, 2, "softmax_topk")
    out = fused_moe(x, tmq.quantize_experts(w13, w2, "bf16"), w, ids)
    assert out.dtype == dtype and out.shape == x.shape


def test_padding_is_exact_for_odd_sizes():
    # H=100, I=60: mxfp4 needs multiples of 32, so the weights are zero-padded
    x, w13, w2, logits = make_layer(E=4, H=100, I=60, seed=8)
    w, ids = tmq.route(logits, 2, "softmax_topk")
    padded = tmq.quantize_experts(w13, w2, "mxfp4_w4a16", pad_to=32)
    assert (padded.padded_hidden_size, padded.padded_intermediate_size) == (128, 64)
    assert (padded.hidden_size, padded.intermediate_size) == (100, 60)
    out = fused_moe(x, padded, w, ids)
    assert out.shape == (21, 100)
    # the same as padding by hand: zero gate rows, zero up rows, zero columns
    w13h = torch.zeros(4, 128, 128)
    w13h[:, :60, :100] = w13[:, :60]
    w13h[:, 64:124, :100] = w13[:, 60:]
    w2h = torch.zeros(4, 128, 64)
    w2h[:, :100, :60] = w2
    by_hand = tmq.quantize_experts(w13h, w2h, "mxfp4_w4a16")
    ref = fused_moe(F.pad(x, (0, 28)), by_hand, w, ids)[:, :100]
    assert torch.equal(out, ref)


def test_quantized_tensors_round_trip_through_quantize_experts():
    x, w13, w2, logits = make_layer(I=64, seed=9)
    w, ids = tmq.route(logits, 2, "softmax_topk")
    a = tmq.quantize_experts(w13, w2, "int4_w4a16_g32")
    b = tmq.quantize_experts(a.w13, a.w2, "int4_w4a16_g32")
    assert torch.equal(fused_moe(x, a, w, ids), fused_moe(x, b, w, ids))


def test_experts_pytree_and_to():
    from torch.utils import _pytree as pytree

    _, w13, w2, _ = make_layer()
    e = tmq.quantize_experts(w13, w2, "nvfp4_w4a16")
    leaves, spec = pytree.tree_flatten(e)
    assert all(isinstance(t, torch.Tensor) or t is None for t in leaves)
    assert sum(isinstance(t, torch.Tensor) for t in leaves) == 6  # data, scale, global_scale x2
    back = pytree.tree_unflatten(leaves, spec)
    assert back.scheme is e.scheme and back.w13.fmt is e.w13.fmt
    assert all(a is b for a, b in zip(pytree.tree_leaves(back), leaves))
    moved = e.to("meta")
    assert moved.w13.data.device.type == "meta" and moved.w13.data.dtype == torch.uint8
    assert e.nbytes < w13.numel() + w2.numel()  # < 1 byte per weight
