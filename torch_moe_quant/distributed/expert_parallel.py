"""Expert-parallel MoE forward over a ``torch.distributed`` process group.

Each of the ``ep`` ranks of ``group`` holds the experts an
``ExpertPlacement`` gives it (an ``ExpertParallelShard``) and runs them
through the scheme's ``torch.ops.moe_quant.experts_<scheme>`` op
(``fused_moe`` with the rank's ``expert_map``: slots routed to other ranks'
experts contribute zero). How tokens reach the experts is a
``TokenDispatch``:

``ALL_TO_ALL`` (default; tokens are local per rank, e.g. data-parallel
attention): each rank routes its own ``M_r`` tokens. A token is sent once to
every rank holding at least one of its k experts, with its k global expert
ids and weights. The per-destination counts are exchanged first
(``all_to_all_single`` of an ``[ep]`` tensor), then the tokens and their
routing go with ``all_to_all_single`` using those exact split sizes, the
receiving rank runs its local experts (weighted sum over its slots), the
partial outputs go back with the reverse ``all_to_all_single``, and each
rank adds them up per token (in a fixed rank order: deterministic). Ranks
may hold different numbers of tokens (also zero). The split sizes are data:
``.tolist()`` reads them on the host (a device sync, as in every
exact-split dispatcher). Under ``torch.compile(fullgraph=True)`` they become
unbacked symbolic sizes, which requires
``torch._dynamo.config.capture_scalar_outputs = True`` (the package never
sets global config; tracing without it raises a ``RuntimeError`` that says
so). Memory: no padding; the send buffer holds at most ``min(k, ep) * M``
token rows (with their ``2k`` int32 routing words), the receive buffer
exactly the rows other ranks route here.

``ALL_GATHER`` (tokens local per rank, fixed shapes): the padded dispatch at
the worst-case capacity, where every token may need every rank. Since a
fixed-capacity buffer is then all tokens of all ranks, the dispatch *is* an
all-gather (``all_gather_single`` of tokens and routing, ``[ep * M, H]`` on
every rank) and the combine is an ``all_to_all_single`` of the ``[ep * M,
H]`` partial outputs with equal splits followed by a sum over the ``ep``
sources (a reduce-scatter; NCCL and gloo both run it). No data-dependent
shapes, so it compiles without any config; every rank must pass the same
``M`` (checked in eager with one extra small all-gather; not checked under
compile). Memory cost per rank: ``ep * M * H`` input-dtype
elements for the gathered tokens plus ``ep * M * H`` partial outputs (input
dtype, fp32 with ``CombinePrecision.FP32``), i.e. ``ep`` times the single-device
activations; wire bytes per rank ``(ep - 1) * M * H`` each way, regardless
of routing. Choose it for small ``M`` (decode) or when data-dependent shapes
are not wanted; ``ALL_TO_ALL`` sends ``<= min(k, ep - 1) / (ep - 1)`` of that.

``REPLICATED`` (every rank already holds the same tokens and routing, e.g.
a tensor-parallel attention block before the MoE): no dispatch; each rank
runs its local experts on all tokens and the partial outputs are summed
with ``all_reduce``. Every rank returns the full ``[M, H]`` output. The
inputs are not checked to be equal across ranks.

Collectives are ``torch.distributed._functional_collectives``, so the whole
forward traces into one graph under ``torch.compile(fullgraph=True)``. It
works with NCCL (GPU) and gloo (CPU). Forward only: the collectives used here
are not differentiable.

Numerics: the experts see exactly the inputs, weights and routing weights
of the single-device layer; each rank sums the slots of its own experts and
the ranks' partial sums are added. With the default
``CombinePrecision.INPUT`` each partial is rounded once to the input dtype
(bf16: relative error ~3e-3 against the single-device layer); with
``CombinePrecision.FP32`` the result on CPU is the single-device
``fused_moe`` up to the order of the fp32 partial sums (tests assert <= 1
bf16 ulp; measured bit-identical). See ``CombinePrecision`` for CUDA.
"""

from __future__ import annotations

import enum
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from ..activations import Activation, as_activation
from ..formats.core import values_available
from ..moe import fused_moe
from ..reference import check_routing
from ._group import CombinePrecision, as_enum, check_hidden, compute_dtype, materialize, resolve_group
from .sharding import ExpertParallelShard

__all__ = ["TokenDispatch", "expert_parallel_moe"]

# torch >= 2.12 deprecates all_gather_tensor for all_gather_single (same
# contract for gather_dim=0); the package supports torch >= 2.11.
_all_gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor


class TokenDispatch(str, enum.Enum):
    """How tokens reach the rank of their experts (module docstring)."""

    #: tokens local per rank; exact split sizes exchanged first (data-dependent shapes)
    ALL_TO_ALL = "all_to_all"
    #: tokens local per rank, same M everywhere; fixed worst-case capacity (all-gather)
    ALL_GATHER = "all_gather"
    #: every rank holds all tokens; local experts then all_reduce
    REPLICATED = "replicated"


_NEEDS_SCALARS = (
    "expert_parallel_moe(dispatch=TokenDispatch.ALL_TO_ALL) exchanges data-dependent split "
    "sizes; under torch.compile set torch._dynamo.config.capture_scalar_outputs = True before "
    "compiling (or use dispatch=TokenDispatch.ALL_GATHER, which has fixed shapes)"
)


def expert_parallel_moe(
    hidden_states: torch.Tensor,
    shard: ExpertParallelShard,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    group: Optional["dist.ProcessGroup"] = None,
    activation: Union[Activation, str] = Activation.SILU,
    dispatch: Union[TokenDispatch, str] = TokenDispatch.ALL_TO_ALL,
    combine: Union[CombinePrecision, str] = CombinePrecision.INPUT,
    apply_router_weight_on_input: bool = False,
) -> torch.Tensor:
    """Expert-parallel MoE forward of this rank's tokens.

    Args:
        hidden_states: ``[M, H]`` this rank's tokens (``REPLICATED``: all
            tokens, the same on every rank).
        shard: this rank's ``ExpertParallelShard`` (``shard_experts``);
            ``shard.rank`` must be this process's rank in ``group`` and
            ``shard.world_size`` the size of ``group``.
        topk_weights, topk_ids: ``[M, k]`` routing of these tokens over the
            *global* experts (ids in ``[0, E)``), e.g. from
            ``torch_moe_quant.route``.
        group: the expert-parallel process group (default: the world).
        activation, apply_router_weight_on_input: as in ``fused_moe``.
        dispatch: a ``TokenDispatch`` (module docstring).
        combine: a ``CombinePrecision``.

    Returns ``[M, H]`` in the dtype of ``hidden_states``: for every token,
    ``sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x_t)``, the output of
    ``fused_moe`` on the full layer.
    """
    if not isinstance(shard, ExpertParallelShard):
        raise TypeError(
            f"shard must be an ExpertParallelShard (torch_moe_quant.distributed.shard_experts), "
            f"got {type(shard).__name__}"
        )
    dispatch = as_enum(TokenDispatch, dispatch, "dispatch")
    combine = as_enum(CombinePrecision, combine, "combine")
    activation = as_activation(activation)
    group = resolve_group(group, shard.world_size, shard.rank, "shard")
    M, H = check_hidden(hidden_states, shard.experts.hidden_size)
    E = shard.num_global_experts
    check_routing(topk_weights, topk_ids, M, E, None, E)
    if shard.expert_map.shape != (E,) or shard.owners.shape != (E,):
        raise ValueError(
            f"shard.expert_map and shard.owners must have shape ({E},), got "
            f"{tuple(shard.expert_map.shape)} and {tuple(shard.owners.shape)}"
        )
    if apply_router_weight_on_input and topk_ids.shape[1] != 1:
        raise ValueError(
            f"apply_router_weight_on_input needs top_k == 1, got top_k={topk_ids.shape[1]}"
        )

    def local_experts(x, weights, ids):
        return fused_moe(
            x.to(compute_dtype(hidden_states.dtype, combine)),
            shard.experts,
            weights,
            ids,
            activation=activation,
            expert_map=shard.expert_map,
            apply_router_weight_on_input=apply_router_weight_on_input,
        )

    if dispatch is TokenDispatch.REPLICATED:
        partial = local_experts(hidden_states, topk_weights, topk_ids)
        out = fc.all_reduce(partial, "sum", group)
    elif dispatch is TokenDispatch.ALL_GATHER:
        out = _all_gather_moe(hidden_states, topk_weights, topk_ids, shard, group, local_experts)
    else:
        out = _all_to_all_moe(hidden_states, topk_weights, topk_ids, shard, group, local_experts)
    return materialize(out).to(hidden_states.dtype)


def _pack_routing(topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """``[M, 2k]`` int32: the ids, then the fp32 weights' bits (one exchange
    for both; integer bit copies, so no float op can touch the values)."""
    w = topk_weights.to(torch.float32).contiguous().view(torch.int32)
    return torch.cat([topk_ids.to(torch.int32), w], dim=1)


def _unpack_routing(meta: torch.Tensor, k: int):
    return meta[:, k:].contiguous().view(torch.float32), meta[:, :k]


def _all_to_all_moe(x, topk_weights, topk_ids, shard, group, local_experts):
    if torch.compiler.is_compiling() and not torch._dynamo.config.capture_scalar_outputs:
        raise RuntimeError(_NEEDS_SCALARS)
    M, H = x.shape
    k = topk_ids.shape[1]
    ep = shard.world_size
    # which ranks each token needs: [M, ep]
    owner = shard.owners[topk_ids.long()]
    ranks = torch.arange(ep, device=x.device)
    needs = (owner.unsqueeze(-1) == ranks).any(dim=1)
    send_counts = needs.sum(dim=0)  # [ep] int64, tokens to each rank
    # (rank, token) pairs to send, grouped by destination rank, tokens ascending
    flat = needs.t().reshape(-1)
    order = torch.argsort((~flat).to(torch.int8), stable=True)
    token_of = torch.arange(M, device=x.device).repeat(ep)
    recv_counts = fc.all_to_all_single(send_counts, None, None, group)
    send_sizes = send_counts.tolist()
    recv_sizes = recv_counts.tolist()
    for s in send_sizes:
        torch._check(s >= 0)
        torch._check(s <= M)
    for s in recv_sizes:
        torch._check(s >= 0)
    n_send = sum(send_sizes)
    torch._check(n_send <= ep * M)
    tok = token_of[order[:n_send]]

    meta = _pack_routing(topk_weights, topk_ids)
    recv_x = fc.all_to_all_single(x.index_select(0, tok), recv_sizes, send_sizes, group)
    recv_meta = fc.all_to_all_single(meta.index_select(0, tok), recv_sizes, send_sizes, group)
    weights, ids = _unpack_routing(recv_meta, k)
    partial = local_experts(recv_x, weights, ids)
    back = fc.all_to_all_single(partial.contiguous(), send_sizes, recv_sizes, group)

    out = torch.zeros(M, H, dtype=torch.float32, device=x.device)
    # one source rank at a time: token ids are unique within a source, so
    # the accumulation order is fixed (no atomics on CUDA)
    for part_tok, part in zip(tok.split(send_sizes), back.split(send_sizes)):
        out.index_add_(0, part_tok, part.float())
    return out.to(x.dtype)


def _all_gather_moe(x, topk_weights, topk_ids, shard, group, local_experts):
    M, H = x.shape
    ep = shard.world_size
    k = topk_ids.shape[1]
    if values_available(x):
        sizes = _all_gather(torch.tensor([M], device=x.device), 0, group).tolist()
        if any(s != M for s in sizes):
            raise ValueError(
                f"hidden_states: dispatch=TokenDispatch.ALL_GATHER needs the same number of tokens "
                f"on every rank, got {sizes} (pad the tokens, or use TokenDispatch.ALL_TO_ALL)"
            )
    gx = _all_gather(x.contiguous(), 0, group)
    gmeta = _all_gather(_pack_routing(topk_weights, topk_ids), 0, group)
    weights, ids = _unpack_routing(gmeta, k)
    partial = local_experts(gx, weights, ids)  # [ep * M, H]: rows of source r at [r*M, (r+1)*M)
    parts = fc.all_to_all_single(partial.contiguous(), None, None, group)  # my tokens' partial from each rank
    out = parts.view(ep, M, H).float().sum(dim=0)
    return out.to(x.dtype)
