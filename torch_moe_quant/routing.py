"""Top-k routing: router logits -> (topk_weights fp32 [M, k], topk_ids int32 [M, k]).

Every method computes in fp32 whatever the logits' dtype (real model code
casts router logits to fp32 before softmax; we do the same, always).

Tie-breaking (deterministic, documented): among equal scores the **lower
expert index wins**, and the k selected experts are ordered by descending
score, ties by ascending index. ``torch.topk`` does not promise this, so the
reference selects with a stable descending sort.

NaN / inf policy: a NaN or +inf router logit, a token whose logits are all
-inf (each would give NaN weights), or a NaN correction bias raises
``ValueError`` in eager mode (one host sync reads the three flags); a -inf
logit beside finite ones is a masked expert and is fine. Under
``torch.compile``, in CUDA graph capture and on fake tensors the check is
skipped (it would need the values), and NaN scores sort as the largest
values, as in ``torch.sort``.
"""

from __future__ import annotations

import enum
from typing import Optional, Tuple, Union

import torch

from .formats.core import values_available


class RoutingMethod(str, enum.Enum):
    """Routing methods (string values are stable public names)."""

    SOFTMAX_TOPK = "softmax_topk"  # softmax over all experts, keep the top k (OLMoE, Qwen2-MoE)
    TOPK_SOFTMAX = "topk_softmax"  # top-k logits, softmax over those k (Mixtral)
    SOFTMAX_TOPK_RENORMALIZE = "softmax_topk_renormalize"  # ... then / sum (Qwen3-MoE)
    SIGMOID_TOPK = "sigmoid_topk"  # sigmoid scores, keep the top k
    DEEPSEEK_V3 = "deepseek_v3"  # sigmoid + bias, grouped top-k, renormalize, scale
    LLAMA4 = "llama4"  # top-k of logits, sigmoid of the selected logits
    TOPK = "topk"  # plain top-k, weights are the logits themselves


def as_method(method) -> RoutingMethod:
    """``method`` (a ``RoutingMethod`` or its name) as a ``RoutingMethod``, else ValueError."""
    try:
        return RoutingMethod(method)
    except ValueError:
        raise ValueError(
            f"method must be one of {[m.value for m in RoutingMethod]}, got {method!r}"
        ) from None


def stable_topk(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim; ties resolved toward the lower index."""
    values, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], idx[..., :k]


def check_route_args(router_logits, top_k, num_experts_hint=None):
    """``route``'s checks of ``router_logits`` and ``top_k`` (module docstring), in its order and words."""
    if not isinstance(router_logits, torch.Tensor):
        raise TypeError(f"router_logits must be a torch.Tensor, got {type(router_logits).__name__}")
    if not router_logits.is_floating_point():
        raise TypeError(f"router_logits must be a float tensor, got {router_logits.dtype}")
    if router_logits.dim() != 2:
        raise ValueError(
            f"router_logits must be 2-D [num_tokens, num_experts], got shape {tuple(router_logits.shape)}"
        )
    E = router_logits.shape[1]
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, num_experts={E}], got {top_k!r}")
    if values_available(router_logits) and router_logits.numel():
        _check_logit_values(router_logits)


def _check_logit_values(router_logits: torch.Tensor) -> None:
    """NaN, +inf, or a token whose logits are all -inf give NaN weights under
    softmax (and an arbitrary choice of experts): rejected, with one read of
    three flags (the same single host sync as the NaN check alone). A -inf
    logit next to finite ones is a masked expert and fine."""
    flags = torch.stack([
        router_logits.isnan().any(),
        router_logits.isposinf().any(),
        router_logits.isneginf().all(dim=-1).any(),
    ]).tolist()
    if flags[0]:
        raise ValueError("router_logits contains NaN")
    if flags[1]:
        raise ValueError("router_logits contains +inf (the routing weights would be NaN)")
    if flags[2]:
        raise ValueError(
            "router_logits has a token whose logits are all -inf (no expert can be chosen; "
            "the routing weights would be NaN)"
        )


def route(
    router_logits: torch.Tensor,
    top_k: int,
    method: Union[RoutingMethod, str] = RoutingMethod.SOFTMAX_TOPK,
    *,
    correction_bias: Optional[torch.Tensor] = None,
    num_groups: Optional[int] = None,
    topk_groups: Optional[int] = None,
    routed_scaling_factor: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Select ``top_k`` experts per token.

    Args:
        router_logits: ``[M, E]`` float logits.
        top_k: experts per token, ``1 <= top_k <= E``.
        method: a ``RoutingMethod`` or its string value.
        correction_bias, num_groups, topk_groups: DeepSeek-V3 only
            (``e_score_correction_bias [E]``, ``n_group``, ``topk_group``);
            the bias only affects *which* experts are chosen, not their weights.
        routed_scaling_factor: multiplies the final weights (DeepSeek-V3).

    Returns:
        ``(topk_weights float32 [M, k], topk_ids int32 [M, k])``.
    """
    method = as_method(method)
    check_route_args(router_logits, top_k)
    if method is not RoutingMethod.DEEPSEEK_V3 and (
        correction_bias is not None or num_groups is not None or topk_groups is not None
    ):
        raise ValueError(
            "correction_bias, num_groups and topk_groups apply only to method='deepseek_v3'"
        )
    logits = router_logits.float()
    if method is RoutingMethod.SOFTMAX_TOPK:
        weights, ids = stable_topk(logits.softmax(dim=-1), top_k)
    elif method is RoutingMethod.TOPK_SOFTMAX:
        values, ids = stable_topk(logits, top_k)
        weights = values.softmax(dim=-1)
    elif method is RoutingMethod.SOFTMAX_TOPK_RENORMALIZE:
        weights, ids = stable_topk(logits.softmax(dim=-1), top_k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
    elif method is RoutingMethod.SIGMOID_TOPK:
        weights, ids = stable_topk(logits.sigmoid(), top_k)
    elif method is RoutingMethod.LLAMA4:
        values, ids = stable_topk(logits, top_k)
        weights = values.sigmoid()
    elif method is RoutingMethod.TOPK:
        weights, ids = stable_topk(logits, top_k)
    else:
        weights, ids = _deepseek_v3(
            logits, top_k, correction_bias, num_groups, topk_groups
        )
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights.float().contiguous(), ids.to(torch.int32).contiguous()


def deepseek_groups(E: int, top_k: int, num_groups, topk_groups) -> Tuple[int, int, int]:
    """Validated DeepSeek-V3 grouping ``(num_groups, topk_groups, per_group)``
    (defaults: one group, all groups kept); errors name the argument."""
    num_groups = 1 if num_groups is None else num_groups
    topk_groups = num_groups if topk_groups is None else topk_groups
    if not isinstance(num_groups, int) or num_groups < 1 or E % num_groups:
        raise ValueError(
            f"num_groups must be a positive int dividing num_experts={E}, got {num_groups!r}"
        )
    if not isinstance(topk_groups, int) or not 1 <= topk_groups <= num_groups:
        raise ValueError(f"topk_groups must be an int in [1, num_groups={num_groups}], got {topk_groups!r}")
    per_group = E // num_groups
    if top_k > topk_groups * per_group:
        raise ValueError(
            f"top_k={top_k} exceeds the experts in the kept groups "
            f"(topk_groups={topk_groups} x {per_group} experts per group)"
        )
    return num_groups, topk_groups, per_group


def check_correction_bias(correction_bias, E: int) -> None:
    """A DeepSeek-V3 correction bias is a ``[E]`` tensor without NaN (values
    checked when they can be read)."""
    if not isinstance(correction_bias, torch.Tensor) or correction_bias.shape != (E,):
        raise ValueError(
            f"correction_bias must be a tensor of shape ({E},), got "
            f"{getattr(correction_bias, 'shape', type(correction_bias).__name__)}"
        )
    if values_available(correction_bias) and torch.isnan(correction_bias).any():
        raise ValueError("correction_bias contains NaN")


def _deepseek_v3(logits, top_k, correction_bias, num_groups, topk_groups):
    """DeepSeek-V3 ``noaux_tc`` routing.

    scores = sigmoid(logits); choice = scores + correction_bias; each of
    ``num_groups`` groups is scored by the sum of its two best ``choice``
    values; the best ``topk_groups`` groups stay eligible; the top k of
    ``choice`` among eligible experts are chosen; their weights are the
    unbiased ``scores``, renormalized to sum to 1.
    """
    M, E = logits.shape
    num_groups, topk_groups, per_group = deepseek_groups(E, top_k, num_groups, topk_groups)
    scores = logits.sigmoid()
    choice = scores
    if correction_bias is not None:
        check_correction_bias(correction_bias, E)
        choice = scores + correction_bias.float()
    if num_groups > 1:
        grouped = choice.view(M, num_groups, per_group)
        group_score = stable_topk(grouped, min(2, per_group))[0].sum(dim=-1)
        _, keep = stable_topk(group_score, topk_groups)
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask.repeat_interleave(per_group, dim=1)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    _, ids = stable_topk(choice, top_k)
    weights = scores.gather(1, ids)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights, ids


def weights_for_ids(
    router_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    method: Union[RoutingMethod, str],
    routed_scaling_factor: float = 1.0,
) -> torch.Tensor:
    """The routing weights ``route`` returns, as a differentiable function of
    the logits once the chosen ``topk_ids`` are fixed (selection itself has no
    gradient): the autograd reference the analytic ``route_vjp`` is tested against."""
    method = as_method(method)
    logits = router_logits.float()
    ids = topk_ids.long()
    if method is RoutingMethod.SOFTMAX_TOPK:
        w = logits.softmax(-1).gather(1, ids)
    elif method is RoutingMethod.TOPK_SOFTMAX:
        w = logits.gather(1, ids).softmax(-1)
    elif method is RoutingMethod.SOFTMAX_TOPK_RENORMALIZE:
        w = logits.softmax(-1).gather(1, ids)
        w = w / w.sum(-1, keepdim=True)
    elif method is RoutingMethod.SIGMOID_TOPK:
        w = logits.sigmoid().gather(1, ids)
    elif method is RoutingMethod.LLAMA4:
        w = logits.gather(1, ids).sigmoid()
    elif method is RoutingMethod.TOPK:
        w = logits.gather(1, ids)
    else:
        w = logits.sigmoid().gather(1, ids)
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * routed_scaling_factor if routed_scaling_factor != 1.0 else w


def route_vjp(
    grad_weights: torch.Tensor,
    router_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    method: Union[RoutingMethod, str],
    routed_scaling_factor: float = 1.0,
) -> torch.Tensor:
    """Analytic gradient w.r.t. the logits of ``weights_for_ids`` (fp32)."""
    method = as_method(method)
    logits = router_logits.float()
    ids = topk_ids.long()
    g = grad_weights.float() * routed_scaling_factor
    grad = torch.zeros_like(logits)
    if method in (RoutingMethod.SOFTMAX_TOPK, RoutingMethod.SOFTMAX_TOPK_RENORMALIZE):
        p = logits.softmax(-1)
        p_ids = p.gather(1, ids)
        if method is RoutingMethod.SOFTMAX_TOPK_RENORMALIZE:
            total = p_ids.sum(-1, keepdim=True)
            g = (g - (g * p_ids).sum(-1, keepdim=True) / total) / total
        gp = g * p_ids  # d/dl_j of p_k = p_k (delta_jk - p_j)
        return grad.scatter_add_(1, ids, gp) - p * gp.sum(-1, keepdim=True)
    if method is RoutingMethod.TOPK_SOFTMAX:
        q = logits.gather(1, ids).softmax(-1)
        return grad.scatter_add_(1, ids, q * (g - (g * q).sum(-1, keepdim=True)))
    if method is RoutingMethod.TOPK:
        return grad.scatter_add_(1, ids, g)
    s = logits.gather(1, ids).sigmoid()
    if method is RoutingMethod.DEEPSEEK_V3:
        total = s.sum(-1, keepdim=True) + 1e-20
        g = (g - (g * s).sum(-1, keepdim=True) / total) / total
    # SIGMOID_TOPK, LLAMA4, DEEPSEEK_V3: sigmoid of the selected logits
    return grad.scatter_add_(1, ids, g * s * (1 - s))
