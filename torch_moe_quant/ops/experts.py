"""``torch.ops.moe_quant.experts_<scheme>``: one opaque custom op per scheme,
generated from the registry, plus its backward op.

Each op has

* a CPU kernel: the plain-PyTorch reference (``reference.fused_moe``);
* a CUDA kernel: the reference too until the Triton kernels land (README);
* a fake impl: ``fake_impls.experts_output_shape`` after the same shape and
  dtype validation as the real kernels, so bad arguments fail at trace time
  with the eager message;
* autograd w.r.t. ``hidden_states`` and ``topk_weights`` (weights are frozen):
  the backward is its own opaque op ``experts_<scheme>_backward`` running
  ``reference.moe_backward`` (analytic). Activation quantize-dequantize is
  treated as identity in the backward (straight-through estimator), the usual
  rule for QAT/fine-tuning.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch

from ..activations import as_activation
from ..fake_impls.shapes import experts_output_shape
from ..formats.core import check_tensor
from ..reference import (
    activation_qdq,
    check_inputs,
    check_routing,
    dequantize_weight,
    moe_backward,
    moe_forward,
)
from ..schemes import SCHEMES, Scheme
from .signature import ExpertsSignature

NAMESPACE = "moe_quant"


@dataclasses.dataclass(frozen=True)
class ExpertsCall:
    """Validated, unflattened arguments of one call."""

    x: torch.Tensor  # padded, in the compute dtype
    experts: object
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    activation: object
    expert_map: Optional[torch.Tensor]
    on_input: bool


def _parse(sig: ExpertsSignature, args) -> ExpertsCall:
    """Shape/dtype (and, on real tensors, value) validation shared by the
    fake impl, the kernels and the backward."""
    hidden_states, topk_weights, topk_ids, *tensors = args[:-4]
    expert_map, activation, layout, on_input = args[-4:]
    check_tensor("hidden_states", hidden_states)
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be 2-D [num_tokens, hidden], got {tuple(hidden_states.shape)}")
    # The logical hidden size is the input's; the weights may be zero-padded beyond it.
    experts = sig.unflatten(hidden_states.shape[1], tensors, layout)
    if hidden_states.shape[1] > experts.padded_hidden_size:
        raise ValueError(
            f"hidden_states has {hidden_states.shape[1]} features but the experts' hidden size "
            f"is {experts.padded_hidden_size}"
        )
    x, act = check_inputs(hidden_states, experts, activation)
    E = experts.num_experts
    num_global = E if expert_map is None else expert_map.shape[0]
    check_routing(topk_weights, topk_ids, hidden_states.shape[0], num_global, expert_map, E)
    if on_input and topk_ids.shape[1] != 1:
        raise ValueError(f"apply_router_weight_on_input needs top_k == 1, got top_k={topk_ids.shape[1]}")
    return ExpertsCall(x, experts, topk_weights, topk_ids, act, expert_map, on_input)


def _forward(call: ExpertsCall) -> torch.Tensor:
    cdt = call.x.dtype
    e = call.experts
    return moe_forward(
        call.x,
        dequantize_weight(e.w13, cdt),
        dequantize_weight(e.w2, cdt),
        e,
        call.topk_weights.to(cdt),
        call.topk_ids.long(),
        call.activation,
        call.expert_map,
        call.on_input,
        activation_qdq(e.scheme.activation, e.a13_scale),
        activation_qdq(e.scheme.activation, e.a2_scale),
    )[:, : e.hidden_size]


def _make_reference(sig: ExpertsSignature):
    def reference(*args):
        call = _parse(sig, args)
        return _forward(call).to(args[0].dtype)

    return reference


def _make_fake(sig: ExpertsSignature):
    def fake(*args):
        _parse(sig, args)
        shape, dtype = experts_output_shape(args[0])
        return args[0].new_empty(shape, dtype=dtype)

    return fake


def _make_backward_reference(sig: ExpertsSignature):
    def backward(grad_out, *args):
        call = _parse(sig, args)
        e = call.experts
        cdt = call.x.dtype
        H = args[0].shape[1]
        grad = torch.nn.functional.pad(grad_out.to(cdt), (0, call.x.shape[1] - H))
        gx, gw = moe_backward(
            grad,
            call.x,
            dequantize_weight(e.w13, cdt),
            dequantize_weight(e.w2, cdt),
            e,
            call.topk_weights.to(cdt),
            call.topk_ids.long(),
            call.activation,
            call.expert_map,
            call.on_input,
            activation_qdq(e.scheme.activation, e.a13_scale),
            activation_qdq(e.scheme.activation, e.a2_scale),
        )
        return gx[:, :H].to(args[0].dtype), gw.to(args[1].dtype)

    return backward


def _make_backward_fake(sig: ExpertsSignature):
    def fake(grad_out, *args):
        _parse(sig, args)
        return torch.empty_like(args[0]), torch.empty_like(args[1])

    return fake


def _define(sig: ExpertsSignature):
    name = f"{NAMESPACE}::{sig.op_name}"
    fwd = torch.library.custom_op(
        name, _make_reference(sig), mutates_args=(), device_types="cpu", schema=sig.schema
    )
    # CUDA: reference fallback until the Triton kernels are registered (README).
    fwd.register_kernel("cuda")(_make_reference(sig))
    fwd.register_fake(_make_fake(sig))

    bwd_schema = sig.schema.replace("(", "(Tensor grad_out, ", 1).replace(
        "-> Tensor", "-> (Tensor, Tensor)"
    )
    bwd = torch.library.custom_op(
        f"{name}_backward", _make_backward_reference(sig), mutates_args=(),
        device_types="cpu", schema=bwd_schema,
    )
    bwd.register_kernel("cuda")(_make_backward_reference(sig))
    bwd.register_fake(_make_backward_fake(sig))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)])
        ctx.mask = [isinstance(t, torch.Tensor) for t in inputs]
        ctx.others = [None if isinstance(t, torch.Tensor) else t for t in inputs]

    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved) if m else o for m, o in zip(ctx.mask, ctx.others)]
        gx, gw = bwd(grad_out, *inputs)
        return (gx, gw) + (None,) * (len(inputs) - 2)

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd, bwd


#: scheme name -> forward op (``CustomOpDef``); ``fused_moe`` dispatches here.
EXPERT_OPS: Dict[str, object] = {}
#: scheme name -> its signature (flatten / unflatten)
SIGNATURES: Dict[str, ExpertsSignature] = {}

for _name, _scheme in SCHEMES.items():
    _sig = ExpertsSignature(_scheme)
    SIGNATURES[_name] = _sig
    EXPERT_OPS[_name] = _define(_sig)[0]


def op_for(scheme: Scheme):
    """The ``torch.ops.moe_quant`` overload of ``scheme``."""
    return getattr(torch.ops.moe_quant, SIGNATURES[scheme.name].op_name).default
