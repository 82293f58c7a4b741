"""Top-k routing in one Triton launch: ``route_triton``.

Same contract as ``torch_moe_quant.routing.route`` (every ``RoutingMethod``,
fp32 weights, int32 ids, lower expert index wins ties, the k experts ordered
by descending score then ascending index, NaN scores sort as the largest),
and the same validation with the same messages, on the host, before launch:
the NaN checks read values (one host sync) only when values can be read
(``formats.core.values_available``: not while compiling or capturing a CUDA
graph), exactly like the reference.

Each program of ``_route_kernel.route_kernel`` takes a block of tokens and
all experts; a method is a pair (``RouteScore``: what is ranked,
``RouteWeight``: what the k selected experts weigh; both in ``_enums``), see
``PLANS``. Scores are computed in fp32 from fp32 / bf16 / fp16 logits; fp64
(and other float) logits, and more than ``MAX_EXPERTS`` experts, run the
reference instead.

Ids equal the reference's exactly whenever the kernel's fp32 scores order the
experts like torch's: always for ``topk`` / ``topk_softmax`` / ``llama4``
(they rank the logits themselves); for softmax / sigmoid scores, ``exp`` may
differ from torch's by an ulp, which can only reorder two experts whose
scores are within an ulp of each other (equal logits always give equal scores,
so forced ties are exact).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

import torch

from ..routing import RoutingMethod, as_method, check_correction_bias, check_route_args, deepseek_groups, route
from ._enums import RouteScore, RouteWeight

#: most experts the kernel holds in registers (larger E runs the reference)
MAX_EXPERTS = 4096
#: dtypes the kernel loads (upcast to fp32 in registers)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: tile elements per program (tokens x padded experts)
_TILE = 2048
_MAX_BLOCK_M = 32
#: programs a launch aims for before tiles grow past one token (H100: 132 SMs)
_TARGET_PROGRAMS = 128


#: each routing method as (what is ranked, how the selected are weighted)
PLANS = {
    RoutingMethod.SOFTMAX_TOPK: (RouteScore.SOFTMAX, RouteWeight.SCORE),
    RoutingMethod.TOPK_SOFTMAX: (RouteScore.LOGIT, RouteWeight.SOFTMAX),
    RoutingMethod.SOFTMAX_TOPK_RENORMALIZE: (RouteScore.SOFTMAX, RouteWeight.RENORMALIZED),
    RoutingMethod.SIGMOID_TOPK: (RouteScore.SIGMOID, RouteWeight.SCORE),
    RoutingMethod.DEEPSEEK_V3: (RouteScore.SIGMOID, RouteWeight.UNBIASED_RENORMALIZED),
    RoutingMethod.LLAMA4: (RouteScore.LOGIT, RouteWeight.SIGMOID),
    RoutingMethod.TOPK: (RouteScore.LOGIT, RouteWeight.SCORE),
}


@dataclasses.dataclass(frozen=True)
class RouteArgs:
    """Validated arguments: ``num_groups`` / ``topk_groups`` resolved
    (1 / ``num_groups`` by default, as in the reference)."""

    method: RoutingMethod
    top_k: int
    num_groups: int
    topk_groups: int


@dataclasses.dataclass(frozen=True)
class RouteTiles:
    """Launch shape: ``block_m`` tokens per program, experts as
    ``group_pad x per_group_pad`` (powers of two), ``k_pad`` output slots."""

    block_m: int
    group_pad: int
    per_group_pad: int
    k_pad: int
    num_warps: int


def _next_pow2(x: int) -> int:
    p = 1
    while p < x:
        p *= 2
    return p


def check_route(
    router_logits, top_k, method, correction_bias=None, num_groups=None, topk_groups=None
) -> RouteArgs:
    """The reference's validation (``routing.route`` / ``_deepseek_v3``), in
    its order and with its messages, without computing anything; also the
    bias must live on the logits' device (the reference fails there too)."""
    method = as_method(method)
    check_route_args(router_logits, top_k)
    if method is not RoutingMethod.DEEPSEEK_V3:
        if correction_bias is not None or num_groups is not None or topk_groups is not None:
            raise ValueError(
                "correction_bias, num_groups and topk_groups apply only to method='deepseek_v3'"
            )
        return RouteArgs(method, top_k, 1, 1)
    E = router_logits.shape[1]
    num_groups, topk_groups, _ = deepseek_groups(E, top_k, num_groups, topk_groups)
    if correction_bias is not None:
        check_correction_bias(correction_bias, E)
        if correction_bias.device != router_logits.device:
            raise ValueError(
                f"correction_bias must be on router_logits' device {router_logits.device}, "
                f"got {correction_bias.device}"
            )
    return RouteArgs(method, top_k, num_groups, topk_groups)


def route_tiles(num_tokens: int, num_experts: int, top_k: int, num_groups: int) -> RouteTiles:
    """Tile of one program: about ``_TILE`` elements, at most ``_MAX_BLOCK_M``
    tokens, and one token per program until a launch has ``_TARGET_PROGRAMS``
    programs (a program's k rounds are serial: small batches spread out)."""
    group_pad = _next_pow2(num_groups)
    per_group_pad = _next_pow2(num_experts // num_groups)
    experts_pad = group_pad * per_group_pad
    spread = _next_pow2(-(-num_tokens // _TARGET_PROGRAMS))
    block_m = max(1, min(_TILE // experts_pad, _MAX_BLOCK_M, spread))
    num_warps = 4 if block_m * experts_pad <= _TILE else 8
    return RouteTiles(block_m, group_pad, per_group_pad, _next_pow2(top_k), num_warps)


def kernel_runs(router_logits: torch.Tensor) -> bool:
    """True when ``route_triton`` launches the kernel for these logits (else
    it runs the reference): a kernel dtype and at most ``MAX_EXPERTS`` experts."""
    return router_logits.dtype in KERNEL_DTYPES and router_logits.shape[1] <= MAX_EXPERTS


def route_triton(
    router_logits: torch.Tensor,
    top_k: int,
    method: Union[RoutingMethod, str] = RoutingMethod.SOFTMAX_TOPK,
    correction_bias: Optional[torch.Tensor] = None,
    num_groups: Optional[int] = None,
    topk_groups: Optional[int] = None,
    routed_scaling_factor: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(topk_weights fp32 [M, k], topk_ids int32 [M, k])``: ``routing.route``
    computed by the Triton kernel (module docstring)."""
    args = check_route(router_logits, top_k, method, correction_bias, num_groups, topk_groups)
    if not kernel_runs(router_logits):
        return route(
            router_logits, top_k, args.method, correction_bias=correction_bias,
            num_groups=num_groups, topk_groups=topk_groups,
            routed_scaling_factor=routed_scaling_factor,
        )
    return route_unchecked(router_logits, args, correction_bias, routed_scaling_factor)


def _kernel():
    """The kernel, imported on first use (``TRITON_INTERPRET`` is read then)."""
    from ._route_kernel import route_kernel

    return route_kernel


def kernel_is_interpreted() -> bool:
    """True when the routing kernel runs under the Triton interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_kernel(), InterpretedFunction)


def route_unchecked(
    router_logits: torch.Tensor,
    args: RouteArgs,
    correction_bias: Optional[torch.Tensor] = None,
    routed_scaling_factor: float = 1.0,
    tiles: Optional[RouteTiles] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch for arguments ``check_route`` accepted and ``kernel_runs``
    logits (no value check here: NaN logits take the NaN ordering).
    ``tiles``: the launch shape, ``route_tiles``'s by default."""
    M, E = router_logits.shape
    dev = router_logits.device
    weights = torch.empty(M, args.top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(M, args.top_k, dtype=torch.int32, device=dev)
    if M == 0:
        return weights, ids
    kernel = _kernel()
    if dev.type == "cpu" and not kernel_is_interpreted():
        raise RuntimeError(
            "route_triton got CPU tensors but the Triton kernel was compiled for a GPU: set "
            "TRITON_INTERPRET=1 before the first kernel launch to run it under the interpreter"
        )
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    bias = correction_bias
    if bias is not None:
        bias = (bias if bias.dtype in KERNEL_DTYPES else bias.float()).contiguous()
    score, weight = PLANS[args.method]
    if tiles is None:
        tiles = route_tiles(M, E, args.top_k, args.num_groups)
    grid = (-(-M // tiles.block_m),)
    kernel[grid](
        router_logits, bias, weights, ids,
        M, router_logits.stride(0), args.num_groups, E // args.num_groups, args.topk_groups,
        float(routed_scaling_factor),
        TOP_K=args.top_k, SCORE=int(score), WEIGHT=int(weight), BLOCK_M=tiles.block_m,
        G_PAD=tiles.group_pad, P_PAD=tiles.per_group_pad, K_PAD=tiles.k_pad,
        num_warps=tiles.num_warps,
    )
    return weights, ids


__all__ = [
    "KERNEL_DTYPES",
    "MAX_EXPERTS",
    "PLANS",
    "RouteArgs",
    "RouteTiles",
    "check_route",
    "kernel_is_interpreted",
    "kernel_runs",
    "route_tiles",
    "route_triton",
    "route_unchecked",
]
