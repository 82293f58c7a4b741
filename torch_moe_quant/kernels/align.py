"""``align`` on the GPU without host syncs: ``align_triton``.

Same contract and outputs as ``torch.ops.moe_quant.align`` (``ops.routing``):
pairs grouped by local expert in pair order, each group padded to
``block_size`` with the sentinel ``num_pairs``, worst-case sized outputs.

Decode-sized inputs (at most ``MAX_CHUNKS`` chunks of pairs) run the
one-program Triton kernel of ``_align_kernel``: one launch instead of the
~15 torch kernels of ``ops.routing.align_sorted``, which larger inputs keep
(their sort and scans are parallel; one program would walk the pairs
serially, and at prefill sizes the GEMMs dominate anyway).

Validation is ``ops.routing.check_align``: shapes and dtypes always; the id
range (one host sync) only when values can be read (not while compiling or
capturing a CUDA graph: there, an id out of range is dropped and contributes
nothing).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..fake_impls.shapes import align_shapes
from .config import _pow2_at_least

#: chunks of pairs up to which the single-program kernel is used
MAX_CHUNKS = 16
#: elements of one ``[CHUNK, E_PAD]`` one-hot tile (8 warps: 32 per thread)
_TILE = 8192


def chunk_for(num_experts: int) -> int:
    """Pairs per chunk of the one-program kernel for ``num_experts``."""
    return max(16, _TILE // _pow2_at_least(num_experts))


def align_triton(
    topk_ids: torch.Tensor, num_experts: int, block_size: int, expert_map: Optional[torch.Tensor] = None
):
    """``(sorted_ids, block_expert_ids, num_padded)`` (module docstring)."""
    from ..ops.routing import check_align

    check_align(topk_ids, num_experts, block_size, expert_map)
    return align_unchecked(topk_ids, num_experts, block_size, expert_map)


def align_unchecked(
    topk_ids: torch.Tensor, num_experts: int, block_size: int, expert_map: Optional[torch.Tensor] = None
):
    """``align_triton`` for arguments the caller validated (``fused_experts``
    validates ids once, through ``reference.validate_call``)."""
    from ..ops.routing import align_sorted

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


__all__ = ["MAX_CHUNKS", "align_triton", "align_unchecked", "chunk_for"]
