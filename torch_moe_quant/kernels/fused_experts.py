"""The whole MoE forward on the grouped GEMM: ``fused_experts_triton`` and
its twin ``fused_experts_ref`` (same pipeline on the plain-torch twins of
each kernel).

Pipeline (each step is the step of ``reference.moe_forward`` it replaces):

1. validate as ``reference.fused_moe`` (``reference.validate_call``: one
   host sync for the id range, skipped while compiling or capturing a CUDA
   graph) and zero-pad ``hidden_states`` to the experts' padded hidden size;
2. ``apply_router_weight_on_input`` (top_k = 1): scale each token in fp32;
3. activation QDQ of the first GEMM's input when the scheme quantizes
   activations (``reference.activation_qdq``, fp32, torch), then cast to
   the compute dtype (``hidden_states.dtype``);
4. ``align.align_unchecked`` (one Triton program at decode sizes);
5. GEMM1 (``w13`` + ``w13_bias``) with the activation in its epilogue ->
   ``[M * k, I]``, in the compute dtype, or fp32 when the scheme quantizes
   the second GEMM's input (QDQ in torch, then the cast);
6. GEMM2 (``w2`` + ``w2_bias``, rows = pairs, times the routing weight
   unless it was applied on the input) -> ``[M * k, H_padded]`` in the
   compute dtype;
7. ``combine.combine_topk``: sum over the k slots in fp32, cut to
   ``hidden_size``, cast.

So a weight-only scheme at decode is four launches: align, two GEMMs, combine.
Rows of pairs routed to experts not on this rank (``expert_map[id] == -1``)
are never computed nor read. Weight formats without a kernel path raise
``NotImplementedError`` naming the format (``supported_weight_formats``).
Differences from the reference are roundings only: GEMM inputs and the
per-pair outputs are rounded to the compute dtype (the reference keeps fp32),
and fp32 accumulation order differs.
"""

from __future__ import annotations

from typing import Callable, Dict, FrozenSet, Optional, Union

import torch

import dataclasses

from ..activations import Activation
from ..experts import QuantizedExperts
from ..formats.core import Format
from ..reference import activation_qdq, validate_call
from ._operand import CODECS, FLOAT_DTYPES, check_format_supported
from .autotune import config_for
from .config import KernelConfig, GemmProblem, select_config
from .align import align_unchecked
from .combine import combine_topk, combine_topk_ref
from .moe_gemm import ARows, DroppedRows, moe_gemm, moe_gemm_ref


@dataclasses.dataclass(frozen=True)
class _Steps:
    """The three kernels of the pipeline: Triton or their torch twins."""

    align: Callable
    gemm: Callable[..., torch.Tensor]
    combine: Callable[..., torch.Tensor]


def _align_ref(topk_ids, num_experts, block_size, expert_map):
    return torch.ops.moe_quant.align(topk_ids, num_experts, block_size, expert_map)


_TRITON = _Steps(align_unchecked, moe_gemm, combine_topk)
_REFERENCE = _Steps(_align_ref, moe_gemm_ref, combine_topk_ref)


def supported_weight_formats() -> FrozenSet[Format]:
    """Quantized weight formats the grouped GEMM reads (unquantized weights too)."""
    return frozenset(CODECS)


def _run(
    steps: _Steps,
    hidden_states: torch.Tensor,
    experts: QuantizedExperts,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    activation: Union[Activation, str],
    expert_map: Optional[torch.Tensor],
    apply_router_weight_on_input: bool,
    config: Optional[KernelConfig],
) -> torch.Tensor:
    if isinstance(hidden_states, torch.Tensor) and hidden_states.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"hidden_states must be bfloat16, float16 or float32 for the Triton path, got {hidden_states.dtype}"
        )
    if not isinstance(apply_router_weight_on_input, bool):
        raise TypeError(f"apply_router_weight_on_input must be a bool, got {apply_router_weight_on_input!r}")
    x, act = validate_call(
        hidden_states, experts, topk_weights, topk_ids, activation, expert_map,
        apply_router_weight_on_input,
    )
    check_format_supported(experts.scheme.weight.fmt, f"experts (scheme {experts.scheme.name})")
    M, E, top_k = x.shape[0], experts.num_experts, topk_ids.shape[1]
    if config is not None and not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a KernelConfig or None, got {type(config).__name__}")
    cdt = hidden_states.dtype
    if M == 0:
        return hidden_states.new_zeros(0, experts.hidden_size)

    spec = experts.scheme.activation
    qdq13 = activation_qdq(spec, experts.a13_scale)
    qdq2 = activation_qdq(spec, experts.a2_scale)
    n13, h_pad = experts.w13.shape[1], experts.padded_hidden_size
    i_pad = experts.padded_intermediate_size

    aligned: Dict[int, tuple] = {}

    def align(block_m: int) -> tuple:
        if block_m not in aligned:
            aligned[block_m] = steps.align(topk_ids, E, block_m, expert_map)
        return aligned[block_m]

    def cfg(n: int, k: int, run) -> KernelConfig:
        if config is not None:
            return config
        problem = GemmProblem(M, n, k, E, top_k, cdt)
        if steps is _REFERENCE:
            return select_config(problem, experts.scheme, x.device)
        return config_for(problem, experts.scheme.weight, x.device, run)  # heuristic unless autotune is on

    if apply_router_weight_on_input:
        x = x * topk_weights.to(x.dtype)[:, :1]
    a1 = (x if spec is None else qdq13(x)).to(cdt)
    gemm1 = dict(
        top_k=top_k, a_rows=ARows.TOKENS, bias=experts.w13_bias,
        out_dtype=cdt if spec is None else torch.float32, activation=act, layout=experts.layout,
        # the QDQ below reads every row (a garbage row could hold NaN): zero the dropped ones
        dropped=DroppedRows.UNWRITTEN if spec is None else DroppedRows.ZERO,
    )
    run1 = lambda c: steps.gemm(a1, experts.w13, *align(c.block_m), config=c, **gemm1)  # noqa: E731
    a2 = run1(cfg(n13, h_pad, run1))
    if spec is not None:
        a2 = qdq2(a2).to(cdt)
    gemm2 = dict(
        top_k=top_k, a_rows=ARows.PAIRS, bias=experts.w2_bias,
        topk_weights=None if apply_router_weight_on_input else topk_weights,
        out_dtype=cdt, dropped=DroppedRows.UNWRITTEN,
    )
    run2 = lambda c: steps.gemm(a2, experts.w2, *align(c.block_m), config=c, **gemm2)  # noqa: E731
    y = run2(cfg(h_pad, i_pad, run2))
    return steps.combine(
        y, topk_ids, num_experts=E, hidden=experts.hidden_size, out_dtype=cdt, expert_map=expert_map
    )


def fused_experts_triton(
    hidden_states: torch.Tensor,
    experts: QuantizedExperts,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: Union[Activation, str] = Activation.SILU,
    expert_map: Optional[torch.Tensor] = None,
    apply_router_weight_on_input: bool = False,
    config: Optional[KernelConfig] = None,
) -> torch.Tensor:
    """MoE forward on the Triton grouped GEMM (module docstring); same
    contract as ``reference.fused_moe`` for bf16/fp16/fp32 ``hidden_states``.
    ``config`` (optional) is used for both GEMMs; by default each gets
    ``select_config``."""
    return _run(
        _TRITON, hidden_states, experts, topk_weights, topk_ids, activation, expert_map,
        apply_router_weight_on_input, config,
    )


def fused_experts_ref(
    hidden_states: torch.Tensor,
    experts: QuantizedExperts,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: Union[Activation, str] = Activation.SILU,
    expert_map: Optional[torch.Tensor] = None,
    apply_router_weight_on_input: bool = False,
    config: Optional[KernelConfig] = None,
) -> torch.Tensor:
    """Twin of ``fused_experts_triton``: the same pipeline on the torch twins
    (``moe.quant.align`` op, ``moe_gemm_ref``, ``combine_topk_ref``)."""
    return _run(
        _REFERENCE, hidden_states, experts, topk_weights, topk_ids, activation, expert_map,
        apply_router_weight_on_input, config,
    )


__all__ = ["fused_experts_ref", "fused_experts_triton", "supported_weight_formats"]
