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
from .activations import Activation, activation_vjp, apply_activation
from .experts import QuantizedExperts, dequantize_weight, validate_call
# the call checks live in experts (below kernels); re-exported for callers of reference.*
from .experts import check_inputs, check_routing, experts_tensors  # noqa: F401
from .formats.core import Format
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
