"""``torch.ops.moe_quant.moe_<scheme>``: routing and experts as one op.

The whole-block op the lowerings emit where a ``route`` call feeds an
``experts_<scheme>`` call and nothing else (``lowerings.block_fusion``).
Its schema is the experts op's with the routing arguments in place of
``topk_weights, topk_ids``::

    moe_<scheme>(Tensor hidden_states, Tensor router_logits, int top_k, str method,
                 Tensor? correction_bias, int? num_groups, int? topk_groups,
                 float routed_scaling_factor, ScalarType? routing_dtype,
                 <the weight, bias and static-scale arguments of experts_<scheme>>,
                 Tensor? expert_map, str activation, str layout,
                 bool apply_router_weight_on_input) -> Tensor

and it computes exactly ``experts_<scheme>(hidden_states, w.to(routing_dtype),
ids, ...)`` with ``w, ids = route(router_logits, top_k, method, ...)``
(``routing_dtype=None``: the fp32 weights as ``route`` returns them).
Kernels: CPU, the two references; CUDA, the routing kernel then the Triton
experts pipeline (in one op: one dispatch, no intermediate graph node).

Autograd: gradients reach ``hidden_states`` and ``router_logits`` (through
the routing weights), as through ``route`` then ``experts_<scheme>``: the
backward re-runs the routing (deterministic) and calls the two ops'
backward ops (``experts_<scheme>_backward``, ``route_backward``).
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from ..schemes import SCHEMES
from .experts import NAMESPACE, SIGNATURES, _make_fake, _make_reference, _make_triton, save_inputs, saved_inputs
from .routing import _route_fake, route_backward_op, route_kernel, route_op
from .signature import ExpertsSignature

#: the routing arguments, in schema order, replacing ``topk_weights, topk_ids``
ROUTING_ARGS = (
    "Tensor router_logits",
    "int top_k",
    "str method",
    "Tensor? correction_bias",
    "int? num_groups",
    "int? topk_groups",
    "float routed_scaling_factor",
    "ScalarType? routing_dtype",
)
_N_ROUTING = len(ROUTING_ARGS)


def block_op_name(scheme_name: str) -> str:
    return f"moe_{scheme_name}"


def block_schema(sig: ExpertsSignature) -> str:
    experts = sig.schema
    head = "(Tensor hidden_states, Tensor topk_weights, Tensor topk_ids, "
    assert experts.startswith(head), experts
    return "(Tensor hidden_states, " + ", ".join(ROUTING_ARGS) + ", " + experts[len(head):]


def _routed(experts_kernel: Callable, route_fn: Callable) -> Callable:
    """The block kernel: ``route_fn`` on the routing arguments, the optional
    cast of the weights, then ``experts_kernel`` on the experts' arguments."""

    def kernel(hidden_states, *args):
        routing, rest = args[:_N_ROUTING], args[_N_ROUTING:]
        *route_args, routing_dtype = routing
        topk_weights, topk_ids = route_fn(*route_args)
        if routing_dtype is not None:
            topk_weights = topk_weights.to(routing_dtype)
        return experts_kernel(hidden_states, topk_weights, topk_ids, *rest)

    return kernel


def _define(sig: ExpertsSignature):
    name = f"{NAMESPACE}::{block_op_name(sig.scheme.name)}"
    op = torch.library.custom_op(
        name, _routed(_make_reference(sig), route_kernel("cpu")), mutates_args=(),
        device_types="cpu", schema=block_schema(sig),
    )
    op.register_kernel("cuda")(_routed(_make_triton(sig), route_kernel("cuda")))
    op.register_fake(_routed(_make_fake(sig), _route_fake))
    experts_backward = getattr(torch.ops.moe_quant, f"{sig.op_name}_backward").default

    def backward(ctx, grad_out):
        hidden_states, *args = saved_inputs(ctx)
        route_args, routing_dtype, rest = args[: _N_ROUTING - 1], args[_N_ROUTING - 1], args[_N_ROUTING:]
        logits, _, method, *_, scaling = route_args
        weights, ids = route_op(*route_args)
        if routing_dtype is not None:
            weights = weights.to(routing_dtype)
        gx, gw = experts_backward(grad_out, hidden_states, weights, ids, *rest)
        g_logits = route_backward_op(gw.float(), logits, ids, method, scaling)
        return (gx, g_logits) + (None,) * (len(args) - 1)

    op.register_autograd(backward, setup_context=save_inputs)
    return op


#: scheme name -> whole-block op (``CustomOpDef``)
BLOCK_OPS: Dict[str, object] = {name: _define(SIGNATURES[name]) for name in SCHEMES}


def block_op_for(scheme_name: str):
    """The ``torch.ops.moe_quant.moe_<scheme>`` overload."""
    return getattr(torch.ops.moe_quant, block_op_name(scheme_name)).default
