"""The whole MoE forward on the grouped GEMM: ``fused_experts_triton`` and
its twin ``fused_experts_ref`` (same pipeline with ``moe_gemm_ref``).

Pipeline (each step is the step of ``reference.moe_forward`` it replaces):

1. validate as ``reference.fused_moe`` (``reference.validate_call``) and
   zero-pad ``hidden_states`` to the experts' padded hidden size;
2. ``apply_router_weight_on_input`` (top_k = 1): scale each token in fp32;
3. activation QDQ of the first GEMM's input when the scheme quantizes
   activations (``reference.activation_qdq``, fp32), then cast to the
   compute dtype (``hidden_states.dtype``);
4. ``torch.ops.moe_quant.align(topk_ids, E, block_m, expert_map)``;
5. GEMM1 (``w13`` + ``w13_bias``, rows = tokens) -> fp32 ``[M * k, N13]``;
6. ``activations.apply_activation`` in torch (fp32), activation QDQ for the
   second GEMM, cast to the compute dtype;
7. GEMM2 (``w2`` + ``w2_bias``, rows = pairs, times the routing weight
   unless it was applied on the input) -> fp32 ``[M * k, H_padded]``;
8. sum over the k slots (torch), cut to ``hidden_size``, cast to
   ``hidden_states.dtype``.

Pairs routed to experts not on this rank (``expert_map[id] == -1``) are
dropped by ``align`` and contribute zero. Weight formats without a kernel
path raise ``NotImplementedError`` naming the format (``supported_weight_formats``).
Differences from the reference are roundings only: GEMM inputs are rounded
to the compute dtype (the reference multiplies in fp32), and fp32
accumulation order differs.
"""

from __future__ import annotations

from typing import Callable, Dict, FrozenSet, Optional, Union

import torch

from ..activations import Activation, apply_activation
from ..experts import QuantizedExperts
from ..formats.core import Format
from ..reference import activation_qdq, validate_call
from ._operand import CODECS, FLOAT_DTYPES, check_format_supported
from .config import KernelConfig, GemmProblem, select_config
from .moe_gemm import ARows, moe_gemm, moe_gemm_ref

Gemm = Callable[..., torch.Tensor]


def supported_weight_formats() -> FrozenSet[Format]:
    """Quantized weight formats the grouped GEMM reads (unquantized weights too)."""
    return frozenset(CODECS)


def _run(
    gemm: Gemm,
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

    def cfg(n: int, k: int) -> KernelConfig:
        if config is not None:
            return config
        return select_config(GemmProblem(M, n, k, E, top_k, cdt), experts.scheme, x.device)

    cfg13, cfg2 = cfg(n13, h_pad), cfg(h_pad, i_pad)
    aligned: Dict[int, tuple] = {}

    def align(block_m: int) -> tuple:
        if block_m not in aligned:
            aligned[block_m] = torch.ops.moe_quant.align(topk_ids, E, block_m, expert_map)
        return aligned[block_m]

    if apply_router_weight_on_input:
        x = x * topk_weights.to(x.dtype)[:, :1]
    a1 = qdq13(x).to(cdt)
    h = gemm(
        a1, experts.w13, *align(cfg13.block_m), top_k=top_k, a_rows=ARows.TOKENS,
        bias=experts.w13_bias, out_dtype=torch.float32, config=cfg13,
    )
    a2 = qdq2(apply_activation(h, act, experts.layout)).to(cdt)
    y = gemm(
        a2, experts.w2, *align(cfg2.block_m), top_k=top_k, a_rows=ARows.PAIRS,
        bias=experts.w2_bias,
        topk_weights=None if apply_router_weight_on_input else topk_weights,
        out_dtype=torch.float32, config=cfg2,
    )
    out = y.view(M, top_k, h_pad).sum(dim=1)
    return out[:, : experts.hidden_size].to(cdt)


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
        moe_gemm, hidden_states, experts, topk_weights, topk_ids, activation, expert_map,
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
    """Twin of ``fused_experts_triton``: the same pipeline with ``moe_gemm_ref``."""
    return _run(
        moe_gemm_ref, hidden_states, experts, topk_weights, topk_ids, activation, expert_map,
        apply_router_weight_on_input, config,
    )


__all__ = ["fused_experts_ref", "fused_experts_triton", "supported_weight_formats"]
