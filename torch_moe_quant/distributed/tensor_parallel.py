"""Tensor-parallel experts: every rank holds all experts, each with a slice
of the intermediate dim I (``shard_experts_tp``), runs them on all tokens
through the scheme's ``moe_quant`` op, and the partial outputs are summed
with ``all_reduce``.

For one token and expert, ``y = act(x W13^T) W2^T``: the gated activation is
elementwise over I (gate unit ``i`` pairs with up unit ``i``), so the rows
``i`` of both the gate and the up half of w13 and the columns ``i`` of w2 can
live on the same rank and ``y = sum_r act(x W13_r^T) W2_r^T``. The first
GEMM's bias is split with its rows; the second's is added by rank 0 only.

Every rank must pass the same tokens and routing (tensor-parallel
attention, or replicated activations); every rank returns the full output.
Forward only. Compiles with ``torch.compile(fullgraph=True)`` (functional
``all_reduce``). Numerics: see ``shard_experts_tp``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from ..activations import Activation, as_activation
from ..moe import fused_moe
from ._group import CombinePrecision, as_enum, check_hidden, compute_dtype, materialize, resolve_group
from .sharding import TensorParallelShard

__all__ = ["tensor_parallel_moe"]


def tensor_parallel_moe(
    hidden_states: torch.Tensor,
    shard: TensorParallelShard,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    group: Optional["dist.ProcessGroup"] = None,
    activation: Union[Activation, str] = Activation.SILU,
    expert_map: Optional[torch.Tensor] = None,
    combine: Union[CombinePrecision, str] = CombinePrecision.INPUT,
    apply_router_weight_on_input: bool = False,
) -> torch.Tensor:
    """MoE forward with the experts' intermediate dim split over ``group``.

    Args:
        hidden_states: ``[M, H]``, the same on every rank.
        shard: this rank's ``TensorParallelShard`` (``shard_experts_tp``);
            ``shard.rank``/``shard.world_size`` must match ``group``.
        topk_weights, topk_ids: ``[M, k]`` routing (the same on every rank).
        group: the tensor-parallel process group (default: the world).
        activation, expert_map, apply_router_weight_on_input: as in ``fused_moe``.
        combine: a ``CombinePrecision`` (what ``all_reduce`` sums).

    Returns ``[M, H]`` in the dtype of ``hidden_states`` on every rank.
    """
    if not isinstance(shard, TensorParallelShard):
        raise TypeError(
            f"shard must be a TensorParallelShard (torch_moe_quant.distributed.shard_experts_tp), "
            f"got {type(shard).__name__}"
        )
    combine = as_enum(CombinePrecision, combine, "combine")
    group = resolve_group(group, shard.world_size, shard.rank, "shard")
    check_hidden(hidden_states, shard.experts.hidden_size)
    partial = fused_moe(
        hidden_states.to(compute_dtype(hidden_states.dtype, combine)),
        shard.experts,
        topk_weights,
        topk_ids,
        activation=as_activation(activation),
        expert_map=expert_map,
        apply_router_weight_on_input=apply_router_weight_on_input,
    )
    return materialize(fc.all_reduce(partial, "sum", group)).to(hidden_states.dtype)
