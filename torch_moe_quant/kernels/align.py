"""``align`` on the GPU without host syncs: ``align_triton``.

Same contract and outputs as ``torch.ops.moe_quant.align`` (``ops.routing``):
pairs grouped by local expert in pair order, each group padded to
``block_size`` with the sentinel ``num_pairs``, worst-case sized outputs.

Decode-sized inputs (at most ``MAX_CHUNKS`` chunks of pairs) run the
one-program Triton kernel of ``_align_kernel``: one launch instead of the
~15 torch kernels of ``align_sorted``, its plain-torch twin, which larger
inputs keep (their sort and scans are parallel; one program would walk the
pairs serially, and at prefill sizes the GEMMs dominate anyway).
``align_sorted`` is also the op's CUDA kernel.

Validation is ``check_align`` (the op's too): shapes and dtypes always; the
id range (one host sync) only when values can be read (not while compiling
or capturing a CUDA graph: there, an id out of range is dropped and
contributes nothing).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..fake_impls.shapes import align_shapes
from ..formats.core import check_tensor, value_ranges, values_available
from .config import _pow2_at_least

#: chunks of pairs up to which the single-program kernel is used
MAX_CHUNKS = 16
#: elements of one ``[CHUNK, E_PAD]`` one-hot tile (8 warps: 32 per thread)
_TILE = 8192


def check_align(topk_ids, num_experts, block_size, expert_map):
    """Validate ``align``'s arguments (module docstring); ValueError/TypeError naming the argument."""
    check_tensor("topk_ids", topk_ids, dtype=(torch.int32, torch.int64))
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be 2-D [num_tokens, top_k], got {tuple(topk_ids.shape)}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if expert_map is not None:
        check_tensor("expert_map", expert_map, dtype=(torch.int32, torch.int64))
        if expert_map.dim() != 1:
            raise ValueError(f"expert_map must be 1-D, got {tuple(expert_map.shape)}")
    if values_available(topk_ids, expert_map) and topk_ids.numel():
        bound = num_experts if expert_map is None else expert_map.shape[0]
        has_map = expert_map is not None and expert_map.numel() > 0
        (lo, hi), *map_range = value_ranges(topk_ids, *([expert_map] if has_map else []))
        if lo < 0 or hi >= bound:
            raise ValueError(f"topk_ids must be in [0, {bound}), found ids in [{lo}, {hi}]")
        if map_range and (map_range[0][0] < -1 or map_range[0][1] >= num_experts):
            raise ValueError(
                f"expert_map values must be -1 or a local expert in [0, {num_experts})"
            )


def align_sorted(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_size: int,
    expert_map: Optional[torch.Tensor] = None,
    *,
    checked: bool = False,
):
    """``align`` with whole-tensor ops only (no per-expert loop; the only host
    sync is eager mode's id-range check): a stable sort by local expert, each
    expert's run shifted to its block-padded start. Same outputs as
    ``ops.routing.align_reference`` (tested). ``checked=True``: the caller already ran
    ``check_align``."""
    if not checked:
        check_align(topk_ids, num_experts, block_size, expert_map)
    shapes = align_shapes(topk_ids.numel(), num_experts, block_size)
    dev = topk_ids.device
    pairs = topk_ids.numel()
    local = topk_ids.reshape(-1).long()
    if expert_map is not None:
        local = expert_map.long()[local]
    key = torch.where(local < 0, num_experts, local)  # absent experts sort last
    order = torch.sort(key, stable=True).indices
    # scatter_add, not bincount: CUDA bincount syncs to size its output (not capturable)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=dev)
    counts = counts.scatter_add_(0, key, torch.ones_like(key))[:num_experts]
    padded = (counts + block_size - 1) // block_size * block_size
    padded_start = torch.cumsum(padded, 0) - padded
    start = torch.cumsum(counts, 0) - counts
    sorted_key = key[order]
    valid = sorted_key < num_experts
    e = sorted_key.clamp(max=num_experts - 1)
    rank = torch.arange(pairs, device=dev) - start[e]
    dest = torch.where(valid, padded_start[e] + rank, shapes["sorted_ids"][0][0])
    sorted_ids = torch.full((shapes["sorted_ids"][0][0] + 1,), pairs, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    sorted_ids = sorted_ids[:-1]  # the last slot absorbed the dropped pairs
    blocks_end = torch.cumsum(padded // block_size, 0)
    n_blocks = shapes["block_expert_ids"][0][0]
    block_expert = torch.bucketize(torch.arange(n_blocks, device=dev), blocks_end, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    num_padded = padded.sum().reshape(1).to(torch.int32)
    return sorted_ids, block_expert, num_padded


def chunk_for(num_experts: int) -> int:
    """Pairs per chunk of the one-program kernel for ``num_experts``."""
    return max(16, _TILE // _pow2_at_least(num_experts))


def align_triton(
    topk_ids: torch.Tensor, num_experts: int, block_size: int, expert_map: Optional[torch.Tensor] = None
):
    """``(sorted_ids, block_expert_ids, num_padded)`` (module docstring)."""
    check_align(topk_ids, num_experts, block_size, expert_map)
    return align_unchecked(topk_ids, num_experts, block_size, expert_map)


def align_unchecked(
    topk_ids: torch.Tensor, num_experts: int, block_size: int, expert_map: Optional[torch.Tensor] = None
):
    """``align_triton`` for arguments the caller validated (``fused_experts``
    validates ids once, through ``experts.validate_call``)."""
    pairs = topk_ids.numel()
    chunk = chunk_for(num_experts)
    if pairs > MAX_CHUNKS * chunk:
        return align_sorted(topk_ids, num_experts, block_size, expert_map, checked=True)
    from ._align_kernel import align_kernel

    shapes = align_shapes(pairs, num_experts, block_size)
    dev = topk_ids.device
    sorted_ids, block_ids, num_padded = (torch.empty(s, dtype=d, device=dev) for s, d in shapes.values())
    align_kernel[(1,)](
        topk_ids.reshape(-1), expert_map, sorted_ids, block_ids, num_padded,
        pairs, num_experts, 0 if expert_map is None else expert_map.shape[0],
        sorted_ids.numel(), block_ids.numel(),
        BLOCK_SIZE=block_size, E_PAD=_pow2_at_least(num_experts), CHUNK=chunk, FILL=chunk,
        num_warps=8,
    )
    return sorted_ids, block_ids, num_padded


__all__ = ["MAX_CHUNKS", "align_sorted", "align_triton", "align_unchecked", "check_align", "chunk_for"]
