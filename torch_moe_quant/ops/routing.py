"""``moe_quant::route`` and ``moe_quant::align``.

``route``: router logits -> ``(topk_weights fp32 [M, k], topk_ids int32 [M, k])``
for every ``RoutingMethod`` (see ``torch_moe_quant.routing``).

``align``: sort the ``M * k`` (token, slot) pairs by local expert into blocks
of ``block_size`` rows, the layout a grouped-GEMM kernel walks. Outputs are
worst-case sized (``fake_impls.align_shapes``); entries past ``num_padded``
are the sentinel ``M * k`` (pairs) or ``-1`` (blocks). Pairs whose expert is
not on this rank (``expert_map[id] == -1``) are dropped. Within an expert,
pairs keep ascending pair order (deterministic).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..fake_impls.shapes import align_shapes, route_shapes
from ..kernels.align import align_sorted, check_align
from ..routing import RoutingMethod, as_method, check_route_args, route, route_vjp

ROUTE_SCHEMA = (
    "(Tensor router_logits, int top_k, str method, Tensor? correction_bias=None, "
    "int? num_groups=None, int? topk_groups=None, float routed_scaling_factor=1.0) "
    "-> (Tensor, Tensor)"
)


def _route_ref(
    router_logits, top_k, method, correction_bias=None, num_groups=None, topk_groups=None,
    routed_scaling_factor=1.0,
):
    return route(
        router_logits, top_k, method, correction_bias=correction_bias,
        num_groups=num_groups, topk_groups=topk_groups,
        routed_scaling_factor=routed_scaling_factor,
    )


route_op = torch.library.custom_op(
    "moe_quant::route", _route_ref, mutates_args=(), device_types="cpu", schema=ROUTE_SCHEMA
)


@route_op.register_kernel("cuda")
def _route_cuda(
    router_logits, top_k, method, correction_bias=None, num_groups=None, topk_groups=None,
    routed_scaling_factor=1.0,
):
    """The Triton kernel (``kernels.route.route_triton``): one launch, the
    reference's validation and outputs (fp64 logits run the reference)."""
    from ..kernels.route import route_triton

    return route_triton(
        router_logits, top_k, method, correction_bias, num_groups, topk_groups,
        routed_scaling_factor,
    )


@route_op.register_fake
def _route_fake(
    router_logits, top_k, method, correction_bias=None, num_groups=None, topk_groups=None,
    routed_scaling_factor=1.0,
):
    as_method(method)
    check_route_args(router_logits, top_k)
    (ws, wd), (ids_s, ids_d) = route_shapes(router_logits.shape[0], top_k)
    return router_logits.new_empty(ws, dtype=wd), router_logits.new_empty(ids_s, dtype=ids_d)


def _route_backward_ref(grad_weights, router_logits, topk_ids, method, routed_scaling_factor):
    return route_vjp(grad_weights, router_logits, topk_ids, method, routed_scaling_factor).to(
        router_logits.dtype
    )


route_backward_op = torch.library.custom_op(
    "moe_quant::route_backward",
    _route_backward_ref,
    mutates_args=(),
    schema="(Tensor grad_weights, Tensor router_logits, Tensor topk_ids, str method, "
    "float routed_scaling_factor) -> Tensor",
)


@route_backward_op.register_fake
def _route_backward_fake(grad_weights, router_logits, topk_ids, method, routed_scaling_factor):
    return torch.empty_like(router_logits)


def _route_setup_context(ctx, inputs, output):
    router_logits, _, method, _, _, _, scaling = inputs
    ctx.save_for_backward(router_logits, output[1])
    ctx.method, ctx.scaling = method, scaling


def _route_backward(ctx, grad_weights, grad_ids):
    router_logits, topk_ids = ctx.saved_tensors
    grad = route_backward_op(grad_weights, router_logits, topk_ids, ctx.method, ctx.scaling)
    return grad, None, None, None, None, None, None


# Gradients flow to the router logits through the weights (ids are discrete;
# a DeepSeek-V3 correction bias only steers the choice and gets none).
route_op.register_autograd(_route_backward, setup_context=_route_setup_context)


ALIGN_SCHEMA = (
    "(Tensor topk_ids, int num_experts, int block_size, Tensor? expert_map=None) "
    "-> (Tensor sorted_ids, Tensor block_expert_ids, Tensor num_padded)"
)


def align_reference(
    topk_ids: torch.Tensor, num_experts: int, block_size: int, expert_map: Optional[torch.Tensor] = None
):
    """Plain-torch ``align`` (see module docstring)."""
    check_align(topk_ids, num_experts, block_size, expert_map)
    shapes = align_shapes(topk_ids.numel(), num_experts, block_size)
    pairs = topk_ids.numel()
    sorted_ids = torch.full(shapes["sorted_ids"][0], pairs, dtype=torch.int32, device=topk_ids.device)
    block_ids = torch.full(shapes["block_expert_ids"][0], -1, dtype=torch.int32, device=topk_ids.device)
    local = topk_ids.reshape(-1).long()
    if expert_map is not None:
        local = expert_map.long()[local]
    pos = 0
    for e in range(num_experts):
        idx = (local == e).nonzero().reshape(-1)
        n = idx.numel()
        if n == 0:
            continue
        sorted_ids[pos : pos + n] = idx.to(torch.int32)
        blocks = -(-n // block_size)
        block_ids[pos // block_size : pos // block_size + blocks] = e
        pos += blocks * block_size
    return sorted_ids, block_ids, torch.tensor([pos], dtype=torch.int32, device=topk_ids.device)


# CPU: the readable per-expert loop; CUDA: the loop-free version (no syncs).
align_op = torch.library.custom_op(
    "moe_quant::align", align_reference, mutates_args=(), device_types="cpu", schema=ALIGN_SCHEMA
)
align_op.register_kernel("cuda")(align_sorted)


@align_op.register_fake
def _align_fake(topk_ids, num_experts, block_size, expert_map=None):
    check_align(topk_ids, num_experts, block_size, expert_map)
    shapes = align_shapes(topk_ids.numel(), num_experts, block_size)
    return tuple(topk_ids.new_empty(s, dtype=d) for s, d in shapes.values())


def route_kernel(device_type: str):
    """The function ``route`` runs on ``device_type`` (``"cpu"``: the
    reference, ``"cuda"``: the Triton kernel), for ops that route inside
    their own kernel (``ops.block``)."""
    return {"cpu": _route_ref, "cuda": _route_cuda}[device_type]


__all__ = ["RoutingMethod", "align_op", "align_reference", "align_sorted", "check_align", "route_kernel", "route_op"]
