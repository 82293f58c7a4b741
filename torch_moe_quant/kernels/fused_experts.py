"""The whole MoE forward on the grouped GEMM: ``fused_experts_triton`` and
its twin ``fused_experts_ref`` (same pipeline on the plain-torch twins of
each kernel).

Pipeline (each step is the step of ``reference.moe_forward`` it replaces):

1. validate as ``reference.fused_moe`` (``experts.validate_call``: one
   host sync for the id range, skipped while compiling or capturing a CUDA
   graph) and zero-pad ``hidden_states`` to the experts' padded hidden size;
2. ``apply_router_weight_on_input`` (top_k = 1): scale each token in fp32;
3. activation quantization of the first GEMM's input when the scheme
   quantizes activations (``act_quant.ActQuant``): dynamic per-token fp8/int8
   through ``act_quant.quantize_rows`` (one launch: codes + fp32 row
   scales), static per-tensor fp8/int8 too where the weights allow the
   native dot (``_static_codes``); every other spec (groups of 16/32/128,
   static fp8 with MX weights) as ``ActInput`` says: by default ``act_quant.qdq_rows`` (one launch writing
   the quantize-dequantized values in the compute dtype), or in the GEMM's
   prologue (no launch), or (``ActInput.CODES``, fp8 / int8 groups) as
   codes + group scales from ``quantize_rows`` for the native dot;
   bit-exact with ``reference.activation_qdq``;
4. ``align.align_unchecked`` (one Triton program at decode sizes);
5. GEMM1 (``w13`` + ``w13_bias``) with the activation in its epilogue ->
   ``[M * k, I]``, in the compute dtype, or fp32 when the scheme quantizes
   the second GEMM's input (so its quantizer sees the reference's values);
   per-row schemes then run ``quantize_rows`` on it, group / static schemes
   ``qdq_rows`` (or GEMM2's prologue); fp8 / int8 codes go through the native
   tensor-core dot where ``moe_gemm.choose_dot`` allows it;
6. GEMM2 (``w2`` + ``w2_bias``, rows = pairs, times the routing weight
   unless it was applied on the input) -> ``[M * k, H_padded]`` in the
   compute dtype;
7. ``combine.combine_topk``: sum over the k slots in fp32, cut to
   ``hidden_size``, cast.

So a weight-only scheme at decode is four launches: align, two GEMMs,
combine (six for schemes that quantize activations, four with
``ActInput.PROLOGUE``). ``fused_experts_ref``
keeps the torch QDQ (``formats``) in its twins.
Rows of pairs routed to experts not on this rank (``expert_map[id] == -1``)
are never computed nor read. Weight formats without a kernel path raise
``NotImplementedError`` naming the format (``supported_weight_formats``).
Differences from the reference are roundings only: GEMM inputs on the
compute-dtype path and the per-pair outputs are rounded to the compute dtype
(the reference keeps fp32), and fp32 accumulation order differs.
"""

from __future__ import annotations

from typing import Callable, Dict, FrozenSet, Optional, Union

import torch

import dataclasses
import enum

from ..activations import Activation
from ..experts import QuantizedExperts
from ..formats.core import Format
from ..experts import validate_call
from ._operand import CODECS, FLOAT_DTYPES, WeightOperand, check_format_supported
from .act_quant import (
    CODE_DTYPES, ActPlacement, ActQuant, ActScale, qdq_rows, qdq_rows_ref, quantize_rows, quantize_rows_ref,
)
from .autotune import config_for
from .config import KernelConfig, GemmProblem, fit_activation, select_config
from .align import align_unchecked
from .combine import combine_topk, combine_topk_ref
from .moe_gemm import NATURAL, ARows, DroppedRows, decode_order, moe_gemm, moe_gemm_ref, native_dot_blocker


class ActInput(enum.Enum):
    """How the pipeline quantizes a GEMM input whose scale is local to a K
    tile (static per-tensor, groups of 16 / 32 / 128); per-row activations
    always take ``quantize_rows`` + the codes GEMM.

    ``QDQ_KERNEL`` (default): one ``qdq_rows`` launch, then the GEMM on
    compute-dtype values. ``PROLOGUE``: the GEMM quantizes each A tile in
    registers (no launch), once per N tile. Measured on the H100 (triton 3.6,
    bench/results/h100.md), the prologue was the slower one past decode:
    qwen3-30b-a3b M=16 mxfp4_w4a4 1.64 ms vs 0.82 ms with the (then torch)
    QDQ pass, fp8_w8a8_block128 2.3 ms vs 0.32 ms, gpt-oss M=4096
    fp8_w8a8_tensor_static 14.4 vs 7.3 ms; it won only at M=1 against the
    many-op torch QDQ (mxfp6_e2m3_w6a6 0.21 vs 0.49 ms), which the one-launch
    ``qdq_rows`` replaces.

    ``CODES``: fp8 / int8 groups (fp8 block128) become codes + one fp32 scale
    per row and group in one ``quantize_rows`` launch, and the GEMM runs the
    native fp8 / int8 dot on them (the activation scale applied per K tile,
    ``ActScale.GROUP_CODES``): exact codes, as static fp8 / int8 always get
    (``_static_codes``), instead of QDQ values rounded to the compute dtype.
    Other specs, or weights the native dot cannot take, fall back to
    ``QDQ_KERNEL``. Not yet measured on a GPU, hence opt-in."""

    QDQ_KERNEL = "qdq_kernel"
    PROLOGUE = "prologue"
    CODES = "codes"


@dataclasses.dataclass(frozen=True)
class _Steps:
    """The kernels of the pipeline: Triton or their torch twins."""

    align: Callable
    gemm: Callable[..., torch.Tensor]
    combine: Callable[..., torch.Tensor]
    quantize_rows: Callable[..., tuple]
    qdq_rows: Callable[..., torch.Tensor]


def _align_ref(topk_ids, num_experts, block_size, expert_map):
    return torch.ops.moe_quant.align(topk_ids, num_experts, block_size, expert_map)


_TRITON = _Steps(align_unchecked, moe_gemm, combine_topk, quantize_rows, qdq_rows)
_REFERENCE = _Steps(_align_ref, moe_gemm_ref, combine_topk_ref, quantize_rows_ref, qdq_rows_ref)


_ALIGNED = ("sorted_ids", "block_expert_ids", "num_padded")


def _static_codes(act: ActQuant, weight, device: torch.device) -> bool:
    """Static per-tensor fp8 / int8 activations whose GEMM can take the native
    dot: quantized to codes in one launch (``quantize_rows``) and read as row
    codes, so the dot sees exact values. QDQ values in the compute dtype
    would be rounded (bf16: 8 bits), and the intermediate's static quantizer
    turns that rounding into flipped codes: qwen3-30b-a3b on the H100
    measured 1.3-1.8e-2 relative error vs the reference with bf16 QDQ values,
    2.4e-3 with exact codes."""
    if act.scale is not ActScale.STATIC_TENSOR or act.element not in CODE_DTYPES:
        return False
    # per-tensor / per-column weight scales: the tile size does not matter
    return native_dot_blocker(act.as_row_codes(), WeightOperand.of(weight), 128, device) is None


def _group_codes(act: ActQuant, weight, device: torch.device) -> bool:
    """fp8 / int8 dynamic groups whose GEMM can take the native dot with one
    activation scale per K tile (``ActInput.CODES``): BLOCK_K = the group."""
    if act.scale is not ActScale.DYNAMIC_GROUP or act.element not in CODE_DTYPES:
        return False
    return native_dot_blocker(act.as_group_codes(), WeightOperand.of(weight), act.group, device) is None


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
    act_input: ActInput,
) -> torch.Tensor:
    if not isinstance(act_input, ActInput):
        raise TypeError(f"act_input must be an ActInput, got {act_input!r}")
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
    act13 = ActQuant.of(spec, experts.a13_scale, "experts.a13_scale")
    act2 = ActQuant.of(spec, experts.a2_scale, "experts.a2_scale")
    n13, h_pad = experts.w13.shape[1], experts.padded_hidden_size
    i_pad = experts.padded_intermediate_size

    aligned: Dict[int, tuple] = {}

    def align(block_m: int) -> tuple:
        if block_m not in aligned:
            aligned[block_m] = steps.align(topk_ids, E, block_m, expert_map)
        return aligned[block_m]

    def cfg(n: int, k: int, act: Optional[ActQuant], run) -> KernelConfig:
        if config is not None:
            return fit_activation(config, act)
        problem = GemmProblem(M, n, k, E, top_k, cdt)
        if steps is _REFERENCE:
            return fit_activation(select_config(problem, experts.scheme, x.device), act)
        # heuristic unless autotune is on
        return fit_activation(config_for(problem, experts.scheme.weight, x.device, run), act)

    def gemm_input(a: torch.Tensor, act: Optional[ActQuant], weight) -> dict:
        """The GEMM's input and activation quantization: per-row activations
        as codes + row scales (row kernel); static per-tensor fp8 / int8 the
        same way when the weight allows the native dot; the rest as
        ``act_input`` says (QDQ values in the compute dtype, or ``act`` for
        the prologue)."""
        if act is None:
            return dict(a=a, act=None)
        if act.placement is ActPlacement.ROW_KERNEL:
            codes, scale = steps.quantize_rows(a, act)
            return dict(a=codes, a_scale=scale, act=act)
        if act_input is not ActInput.PROLOGUE and _static_codes(act, weight, a.device):
            codes, scale = steps.quantize_rows(a, act)
            return dict(a=codes, a_scale=scale, act=act.as_row_codes())
        if act_input is ActInput.CODES and _group_codes(act, weight, a.device):
            codes, scale = steps.quantize_rows(a, act)
            return dict(a=codes, a_scale=scale, act=act.as_group_codes())
        if act_input is not ActInput.PROLOGUE:
            return dict(a=steps.qdq_rows(a, act, cdt), act=None)
        return dict(a=a, act=act)

    if apply_router_weight_on_input:
        x = x * topk_weights.to(x.dtype)[:, :1]
    # the quantizers read fp32 values; x.to(cdt) is exact unless the router weight scaled x
    in1 = gemm_input(x if (spec is not None and apply_router_weight_on_input) else x.to(cdt), act13, experts.w13)
    # GEMM2 on the decode kernel reads its input in the weight's packing order (moe_gemm.KOrder):
    # GEMM1's epilogue writes it so, no permutation pass in between (a different tuned config for
    # GEMM2 is still correct: moe_gemm converts between orders). Per-row activation codes keep
    # it: quantizing a row does not depend on the order of its columns
    order2 = NATURAL
    if (act2 is None or act2.placement is ActPlacement.ROW_KERNEL) and steps.gemm is moe_gemm:
        guess = config or select_config(GemmProblem(M, h_pad, i_pad, E, top_k, cdt), experts.scheme, x.device)
        order2 = decode_order(WeightOperand.of(experts.w2), act2, guess, cdt, x.device)
    gemm1 = dict(
        top_k=top_k, a_rows=ARows.TOKENS, bias=experts.w13_bias, compute_dtype=cdt,
        # fp32 when the second GEMM's input is quantized: its quantizer sees the reference's values
        out_dtype=cdt if act2 is None else torch.float32, activation=act, layout=experts.layout,
        dropped=DroppedRows.UNWRITTEN,  # rows of dropped pairs are never read (the row kernel's are unused)
        out_order=order2,
    )
    run1 = lambda c: steps.gemm(  # noqa: E731
        weight=experts.w13, **in1, **dict(zip(_ALIGNED, align(c.block_m))), config=fit_activation(c, in1["act"]), **gemm1
    )
    a2 = run1(cfg(n13, h_pad, in1["act"], run1))
    in2 = gemm_input(a2, act2, experts.w2)
    gemm2 = dict(
        top_k=top_k, a_rows=ARows.PAIRS, bias=experts.w2_bias, compute_dtype=cdt,
        topk_weights=None if apply_router_weight_on_input else topk_weights,
        out_dtype=cdt, dropped=DroppedRows.UNWRITTEN, a_order=order2,
    )
    run2 = lambda c: steps.gemm(  # noqa: E731
        weight=experts.w2, **in2, **dict(zip(_ALIGNED, align(c.block_m))), config=fit_activation(c, in2["act"]), **gemm2
    )
    y = run2(cfg(h_pad, i_pad, in2["act"], run2))
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
    act_input: ActInput = ActInput.QDQ_KERNEL,
) -> torch.Tensor:
    """MoE forward on the Triton grouped GEMM (module docstring); same
    contract as ``reference.fused_moe`` for bf16/fp16/fp32 ``hidden_states``.
    ``config`` (optional) is used for both GEMMs; by default each gets
    ``select_config``. ``act_input``: where tile-local activation scales are
    applied (``ActInput``)."""
    return _run(
        _TRITON, hidden_states, experts, topk_weights, topk_ids, activation, expert_map,
        apply_router_weight_on_input, config, act_input,
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
    act_input: ActInput = ActInput.QDQ_KERNEL,
) -> torch.Tensor:
    """Twin of ``fused_experts_triton``: the same pipeline on the torch twins
    (``moe.quant.align`` op, ``moe_gemm_ref``, ``combine_topk_ref``)."""
    return _run(
        _REFERENCE, hidden_states, experts, topk_weights, topk_ids, activation, expert_map,
        apply_router_weight_on_input, config, act_input,
    )


__all__ = ["ActInput", "fused_experts_ref", "fused_experts_triton", "supported_weight_formats"]
