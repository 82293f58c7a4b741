"""The reference MoE forward: plain PyTorch, readable before fast.

This is the ground truth every kernel and lowering is compared against:

1. dequantize both expert weights to fp32;
2. per expert, gather its tokens; quantize-dequantize them exactly as the
   scheme's kernel will (``ActivationSpec``); ``x @ w13.T (+ bias)`` in fp32;
3. activation (``activations.apply_activation``); quantize-dequantize again
   for the second GEMM; ``@ w2.T (+ bias)`` in fp32;
4. multiply by the routing weight (after the experts, or before them with
   ``apply_router_weight_on_input``) and sum over the k chosen experts;
5. cast to ``hidden_states.dtype``.

Activation quantization of the first GEMM's input is per token and so does
not depend on the expert; dynamic per-token quantization of the second GEMM's
input is per (token, expert) row.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple, Union

import torch

from . import formats
from .activations import Activation, activation_vjp, apply_activation, as_activation
from .experts import QuantizedExperts, dequantize_weight
from .formats.core import Format, QuantizedTensor, check_tensor, value_ranges, values_available
from .schemes import ActivationSpec, ActQuant

QDQ = Callable[[torch.Tensor], torch.Tensor]


def activation_qdq(spec: Optional[ActivationSpec], static_scale: Optional[torch.Tensor]) -> QDQ:
    """The fake-quantization a kernel applies to a GEMM input (fp32 in/out)."""
    if spec is None:
        return lambda x: x
    options = {}
    if spec.rounding is not None:
        options["rounding"] = spec.rounding
    if spec.mode is ActQuant.STATIC:
        key = "global_scale" if spec.fmt is Format.NVFP4 else "scale"
        options[key] = static_scale
    # quantization math in fp32 even for fp64 inputs (gradcheck): the formats
    # decode to at most fp32, which widens exactly to x.dtype
    return lambda x: formats.fake_quantize(
        x.float(), spec.fmt, spec.granularity, dtype=torch.float32, **options
    ).to(x.dtype)


def check_routing(
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    num_tokens: int,
    num_experts: int,
    expert_map: Optional[torch.Tensor],
    local_experts: int,
    device: Optional[torch.device] = None,
) -> None:
    """Validate routing tensors; errors name the argument. ``device``: the
    device of ``hidden_states`` every routing tensor must be on (a ``meta``
    or other-device id tensor would otherwise be read as garbage)."""
    check_tensor("topk_ids", topk_ids, dtype=(torch.int32, torch.int64))
    check_tensor(
        "topk_weights", topk_weights,
        dtype=(torch.float32, torch.float16, torch.bfloat16, torch.float64),
    )
    if expert_map is not None:
        check_tensor("expert_map", expert_map, dtype=(torch.int32, torch.int64))
    if device is not None:
        for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights), ("expert_map", expert_map)):
            if t is not None and t.device != device:
                raise ValueError(
                    f"{name} is on {t.device} but hidden_states is on {device}: every routing tensor "
                    f"must be on the device of hidden_states"
                )
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
        raise ValueError(
            f"topk_ids must have shape [num_tokens={num_tokens}, top_k], got {tuple(topk_ids.shape)}"
        )
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(
            f"topk_weights must have the shape of topk_ids {tuple(topk_ids.shape)}, "
            f"got {tuple(topk_weights.shape)}"
        )
    if topk_ids.shape[1] > num_experts:
        raise ValueError(f"top_k={topk_ids.shape[1]} is larger than the number of experts {num_experts}")
    if expert_map is not None:
        if expert_map.dim() != 1:
            raise ValueError(f"expert_map must be 1-D [num_global_experts], got {tuple(expert_map.shape)}")
    if not values_available(topk_ids, expert_map) or topk_ids.numel() == 0:
        return
    (lo, hi), *map_range = value_ranges(topk_ids, *([expert_map] if expert_map is not None else []))
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"topk_ids must be in [0, {num_experts}), found ids in [{lo}, {hi}]")
    if expert_map is not None:
        (mlo, mhi), = map_range
        if mlo < -1 or mhi >= local_experts:
            raise ValueError(
                f"expert_map values must be -1 (not on this rank) or a local expert in "
                f"[0, {local_experts}), found values in [{mlo}, {mhi}]"
            )


#: field names of the two dataclasses, read once (``experts_tensors`` runs on every call:
#: ~4 us this way, ~30 us through ``pytree.tree_flatten_with_path``)
_EXPERTS_FIELDS = tuple(f.name for f in dataclasses.fields(QuantizedExperts))
_QTENSOR_FIELDS = tuple(f.name for f in dataclasses.fields(QuantizedTensor))


def experts_tensors(experts: QuantizedExperts):
    """``(field name, tensor)`` of every tensor ``experts`` holds (a quantized
    weight contributes its data, scales, zero points and g_idx)."""
    for field in _EXPERTS_FIELDS:
        value = getattr(experts, field)
        if isinstance(value, QuantizedTensor):
            for sub in _QTENSOR_FIELDS:
                t = getattr(value, sub)
                if isinstance(t, torch.Tensor):
                    yield f"{field}.{sub}", t
        elif isinstance(value, torch.Tensor):
            yield field, value


def check_inputs(hidden_states, experts, activation) -> Tuple[torch.Tensor, Activation]:
    if not isinstance(experts, QuantizedExperts):
        raise TypeError(
            f"experts must be a QuantizedExperts (torch_moe_quant.quantize_experts), "
            f"got {type(experts).__name__}"
        )
    check_tensor(
        "hidden_states", hidden_states,
        dtype=(torch.float32, torch.bfloat16, torch.float16, torch.float64),
    )
    if hidden_states.dim() != 2 or hidden_states.shape[1] != experts.hidden_size:
        raise ValueError(
            f"hidden_states must have shape [num_tokens, {experts.hidden_size}], "
            f"got {tuple(hidden_states.shape)}"
        )
    for name, t in experts_tensors(experts):
        if t.device != hidden_states.device:
            raise ValueError(
                f"experts.{name} is on {t.device} but hidden_states is on {hidden_states.device}: "
                f"move the experts with experts.to(device)"
            )
    act = as_activation(activation)
    if act.is_gated != experts.is_gated:
        kind = "gated" if act.is_gated else "non-gated"
        rows = "2I" if act.is_gated else "I"
        raise ValueError(
            f"activation={act.value} is {kind} and needs w13 with {rows} rows; these experts have "
            f"w13 rows={experts.w13.shape[1]}, I={experts.padded_intermediate_size}"
        )
    # fp32 math; float64 inputs (gradcheck) keep float64
    x = hidden_states.to(torch.promote_types(hidden_states.dtype, torch.float32))
    pad = experts.padded_hidden_size - experts.hidden_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x, act


def validate_call(
    hidden_states, experts, topk_weights, topk_ids, activation, expert_map, apply_router_weight_on_input
) -> Tuple[torch.Tensor, Activation]:
    """Every check of a MoE call (shapes and dtypes always, values when they
    can be read); returns the padded compute-dtype input and the activation.
    Shared by the reference, the ops' kernels and their fake impls."""
    x, act = check_inputs(hidden_states, experts, activation)
    E = experts.num_experts
    num_global = E if expert_map is None else expert_map.shape[0]
    check_routing(topk_weights, topk_ids, x.shape[0], num_global, expert_map, E, hidden_states.device)
    if apply_router_weight_on_input and topk_ids.shape[1] != 1:
        raise ValueError(
            f"apply_router_weight_on_input needs top_k == 1, got top_k={topk_ids.shape[1]}"
        )
    return x, act


@dataclasses.dataclass(frozen=True)
class MoEProblem:
    """One reference MoE computation on validated tensors: ``x`` padded to the
    experts' hidden size in the compute dtype (fp32, or fp64 for fp64 inputs),
    weights dequantized to that dtype, and the activation QDQ of each GEMM."""

    x: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    experts: QuantizedExperts
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    activation: Activation
    expert_map: Optional[torch.Tensor]
    on_input: bool
    qdq13: QDQ
    qdq2: QDQ

    @classmethod
    def build(
        cls,
        hidden_states: torch.Tensor,
        experts: QuantizedExperts,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        activation: Union[Activation, str],
        expert_map: Optional[torch.Tensor],
        apply_router_weight_on_input: bool,
    ) -> "MoEProblem":
        """Validate the call (``validate_call``) and prepare it."""
        x, act = validate_call(
            hidden_states, experts, topk_weights, topk_ids, activation, expert_map,
            apply_router_weight_on_input,
        )
        spec = experts.scheme.activation
        return cls(
            x,
            dequantize_weight(experts.w13, x.dtype),
            dequantize_weight(experts.w2, x.dtype),
            experts,
            topk_weights.to(x.dtype),
            topk_ids.long(),
            act,
            expert_map,
            bool(apply_router_weight_on_input),
            activation_qdq(spec, experts.a13_scale),
            activation_qdq(spec, experts.a2_scale),
        )

    def _routed_input(self) -> torch.Tensor:
        """The first GEMM's input for every token (scaled, then QDQ)."""
        x = self.x * self.topk_weights[:, :1] if self.on_input else self.x
        return self.qdq13(x) if x.shape[0] else x

    def _experts(self):
        """``(local expert, token rows, slots)`` of every expert with tokens."""
        for g in self.topk_ids.unique().tolist():
            e = g if self.expert_map is None else int(self.expert_map[g])
            if e < 0:
                continue
            tok, slot = (self.topk_ids == g).nonzero(as_tuple=True)
            yield e, tok, slot

    def _gemm1(self, xq: torch.Tensor, e: int, tok: torch.Tensor) -> torch.Tensor:
        h = xq[tok] @ self.w13[e].T
        b13 = self.experts.w13_bias
        return h if b13 is None else h + b13[e].to(h.dtype)

    def _gemm2(self, h: torch.Tensor, e: int) -> torch.Tensor:
        a = self.qdq2(apply_activation(h, self.activation, self.experts.layout))
        y = a @ self.w2[e].T
        b2 = self.experts.w2_bias
        return y if b2 is None else y + b2[e].to(y.dtype)

    def forward(self) -> torch.Tensor:
        """``[M, padded H]`` output in the compute dtype."""
        out = torch.zeros_like(self.x)
        xq = self._routed_input()
        for e, tok, slot in self._experts():
            y = self._gemm2(self._gemm1(xq, e, tok), e)
            if not self.on_input:
                y = y * self.topk_weights[tok, slot, None]
            out.index_add_(0, tok, y)
        return out

    def backward(self, grad_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Gradients w.r.t. ``x`` and ``topk_weights`` (weights frozen) for
        ``grad_out`` ``[M, padded H]``. Activation QDQ is differentiated as the
        identity (straight-through estimator)."""
        grad_w = torch.zeros_like(self.topk_weights)
        grad_xq = torch.zeros_like(self.x)
        xq = self._routed_input()
        for e, tok, slot in self._experts():
            h = self._gemm1(xq, e, tok)
            gy = grad_out[tok]
            if not self.on_input:
                grad_w[tok, slot] += (gy * self._gemm2(h, e)).sum(-1)
                gy = gy * self.topk_weights[tok, slot, None]
            grad_h = activation_vjp(h, gy @ self.w2[e], self.activation, self.experts.layout)
            grad_xq.index_add_(0, tok, grad_h @ self.w13[e])
        if not self.on_input:
            return grad_xq, grad_w
        grad_w[:, 0] = (grad_xq * self.x).sum(-1)
        return grad_xq * self.topk_weights[:, :1], grad_w


def fused_moe(
    hidden_states: torch.Tensor,
    experts: QuantizedExperts,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: Union[Activation, str] = Activation.SILU,
    expert_map: Optional[torch.Tensor] = None,
    apply_router_weight_on_input: bool = False,
) -> torch.Tensor:
    """Reference MoE forward (see module docstring).

    Args:
        hidden_states: ``[M, H]`` bf16/fp16/fp32 (or fp64, computed in fp64).
        experts: a ``QuantizedExperts`` (``quantize_experts``).
        topk_weights: ``[M, k]`` routing weights.
        topk_ids: ``[M, k]`` int32/int64 expert ids: global ids when
            ``expert_map`` is given, else in ``[0, E)``.
        activation: an ``Activation`` or its name.
        expert_map: int ``[E_global]``: global id -> local expert, ``-1`` =
            not on this rank (contributes zero).
        apply_router_weight_on_input: scale each token by its routing weight
            before the experts instead of after (Llama-4, top_k = 1).

    Returns:
        ``[M, H]`` in ``hidden_states.dtype``.
    """
    problem = MoEProblem.build(
        hidden_states, experts, topk_weights, topk_ids, activation, expert_map,
        apply_router_weight_on_input,
    )
    return problem.forward()[:, : hidden_states.shape[1]].to(hidden_states.dtype)


def calibrate_activation_scales(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    scheme,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: Union[Activation, str] = Activation.SILU,
    w13_bias: Optional[torch.Tensor] = None,
    w2_bias: Optional[torch.Tensor] = None,
    layout="gate_up",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Static activation scales ``(a13_scale, a2_scale)`` for ``scheme`` from
    sample inputs: run the float layer, record each GEMM's input, and take
    the per-tensor scale the activation format computes for it (fp8/int8:
    amax-based scale; nvfp4: global scale). Returns ``[1, 1]`` fp32 tensors."""
    from .experts import quantize_experts
    from .schemes import get_scheme

    scheme = get_scheme(scheme)
    spec = scheme.activation
    if spec is None or spec.mode is not ActQuant.STATIC:
        raise ValueError(f"scheme {scheme.name} has no static activation scales to calibrate")
    dense = quantize_experts(
        w13.float(), w2.float(), "bf16", w13_bias=w13_bias, w2_bias=w2_bias, layout=layout
    )
    seen = ([], [])

    def record(i):
        def qdq(t):
            seen[i].append(t)
            return t

        return qdq

    problem = MoEProblem.build(hidden_states, dense, topk_weights, topk_ids, activation, None, False)
    dataclasses.replace(problem, qdq13=record(0), qdq2=record(1)).forward()

    def per_tensor_scale(rows):
        t = torch.cat(rows) if rows else torch.zeros(1, 1)
        t = t.reshape(-1, t.shape[-1])
        if spec.fmt is Format.NVFP4:
            return formats.quantize(t, spec.fmt).global_scale.reshape(1, 1)
        return formats.quantize(t, spec.fmt, "tensor").scale.reshape(1, 1)

    return per_tensor_scale(seen[0]), per_tensor_scale(seen[1])
