"""``torch.ops.moe_quant.experts_<scheme>``: one opaque custom op per scheme,
generated from the registry, plus its backward op.

Each op has

* a CPU kernel: the plain-PyTorch reference (``reference.fused_moe``);
* a CUDA kernel: ``kernels.fused_experts_triton`` (align, two grouped GEMMs
  with in-loop weight dequantization and the activation in the first one's
  epilogue, top-k combine) for bf16/fp16/fp32 ``hidden_states``; float64
  inputs (gradcheck) run the reference;
* a fake impl: ``fake_impls.experts_output_shape`` after the same shape and
  dtype validation as the real kernels, so bad arguments fail at trace time
  with the eager message;
* autograd w.r.t. ``hidden_states`` and ``topk_weights`` (weights are frozen):
  the backward is its own opaque op ``experts_<scheme>_backward`` running
  ``reference.MoEProblem.backward`` (analytic). Activation quantize-dequantize is
  treated as identity in the backward (straight-through estimator), the usual
  rule for QAT/fine-tuning.
"""

from __future__ import annotations

from typing import Dict

import torch

from ..fake_impls.shapes import experts_output_shape
from ..kernels._operand import FLOAT_DTYPES
from ..formats.core import check_tensor
from ..reference import MoEProblem, validate_call
from ..schemes import SCHEMES, Scheme
from .signature import ExpertsSignature

NAMESPACE = "moe_quant"


def _unflatten(sig: ExpertsSignature, args):
    """Split the op's arguments and rebuild the ``QuantizedExperts``."""
    hidden_states, topk_weights, topk_ids, *tensors = args[:-4]
    expert_map, activation, layout, on_input = args[-4:]
    check_tensor("hidden_states", hidden_states)
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states must be 2-D [num_tokens, hidden], got {tuple(hidden_states.shape)}")
    experts = sig.unflatten(hidden_states.shape[1], tensors, layout)
    # The op sees the weights' (possibly zero-padded) hidden size and nothing
    # else: a narrower input cannot be told from a wrong one, so it must match
    # exactly (``fused_moe`` zero-pads the input of padded experts itself).
    if hidden_states.shape[1] != experts.padded_hidden_size:
        raise ValueError(
            f"hidden_states must have shape [num_tokens, {experts.padded_hidden_size}] (the hidden "
            f"size of w2, padding included; fused_moe pads the input of padded experts), "
            f"got {tuple(hidden_states.shape)}"
        )
    return hidden_states, experts, topk_weights, topk_ids, activation, expert_map, on_input


def _make_reference(sig: ExpertsSignature):
    def reference(*args):
        problem = MoEProblem.build(*_unflatten(sig, args))
        return problem.forward()[:, : args[0].shape[1]].to(args[0].dtype)

    return reference


def _make_triton(sig: ExpertsSignature):
    reference = _make_reference(sig)

    def triton_kernel(*args):
        if args[0].dtype not in FLOAT_DTYPES:  # the dtypes the grouped GEMM computes in
            return reference(*args)
        from ..kernels.fused_experts import fused_experts_triton

        x, experts, topk_weights, topk_ids, activation, expert_map, on_input = _unflatten(sig, args)
        return fused_experts_triton(
            x, experts, topk_weights, topk_ids, activation=activation, expert_map=expert_map,
            apply_router_weight_on_input=on_input,
        )

    return triton_kernel



def _make_fake(sig: ExpertsSignature):
    def fake(*args):
        validate_call(*_unflatten(sig, args))
        shape, dtype = experts_output_shape(args[0])
        return args[0].new_empty(shape, dtype=dtype)

    return fake


def _make_backward_reference(sig: ExpertsSignature):
    def backward(grad_out, *args):
        problem = MoEProblem.build(*_unflatten(sig, args))
        H = args[0].shape[1]
        grad = torch.nn.functional.pad(grad_out.to(problem.x.dtype), (0, problem.x.shape[1] - H))
        gx, gw = problem.backward(grad)
        return gx[:, :H].to(args[0].dtype), gw.to(args[1].dtype)

    return backward


def _make_backward_fake(sig: ExpertsSignature):
    def fake(grad_out, *args):
        validate_call(*_unflatten(sig, args))
        return torch.empty_like(args[0]), torch.empty_like(args[1])

    return fake


def save_inputs(ctx, inputs, output) -> None:
    """``setup_context`` saving every input: tensors (``None`` included, as
    not-a-tensor) through ``save_for_backward``, the rest as they are."""
    ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)])
    ctx.mask = [isinstance(t, torch.Tensor) for t in inputs]
    ctx.others = [None if isinstance(t, torch.Tensor) else t for t in inputs]


def saved_inputs(ctx) -> list:
    """The inputs ``save_inputs`` kept, in order."""
    saved = iter(ctx.saved_tensors)
    return [next(saved) if m else o for m, o in zip(ctx.mask, ctx.others)]


def _define(sig: ExpertsSignature):
    name = f"{NAMESPACE}::{sig.op_name}"
    fwd = torch.library.custom_op(
        name, _make_reference(sig), mutates_args=(), device_types="cpu", schema=sig.schema
    )
    fwd.register_kernel("cuda")(_make_triton(sig))
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

    def backward(ctx, grad_out):
        inputs = saved_inputs(ctx)
        gx, gw = bwd(grad_out, *inputs)
        return (gx, gw) + (None,) * (len(inputs) - 2)

    fwd.register_autograd(backward, setup_context=save_inputs)
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
