"""Sum of each token's top-k expert rows: ``combine_topk`` (Triton) and its
torch twin ``combine_topk_ref``.

``y [M * top_k, >= hidden]`` holds one row per (token, slot) pair, already
multiplied by its routing weight (``moe_gemm`` with ``topk_weights``). The
result ``out[m] = sum over slots s with expert on this rank of y[m * top_k +
s, :hidden]``, accumulated in fp32 and cast to ``out_dtype``: rows of pairs
routed off this rank (``expert_map[id] == -1``) are never read, so the GEMM
may leave them unwritten (``DroppedRows.UNWRITTEN``). One launch replaces
torch's ``view -> sum -> slice -> cast`` (two kernels and a copy).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..formats.core import check_tensor

_BLOCK_H = 1024


def _check(y, topk_ids, expert_map, num_experts, hidden):
    check_tensor("y", y, dtype=(torch.float32, torch.bfloat16, torch.float16))
    check_tensor("topk_ids", topk_ids, dtype=(torch.int32, torch.int64))
    if topk_ids.dim() != 2 or y.dim() != 2 or y.shape[0] != topk_ids.numel():
        raise ValueError(
            f"y must be [num_tokens * top_k, H] for topk_ids {tuple(topk_ids.shape)}, got {tuple(y.shape)}"
        )
    if not 0 <= hidden <= y.shape[1]:
        raise ValueError(f"hidden must be in [0, {y.shape[1]}], got {hidden}")
    if expert_map is not None:
        check_tensor("expert_map", expert_map, dtype=(torch.int32, torch.int64))
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")


def combine_topk(
    y: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    num_experts: int,
    hidden: int,
    out_dtype: torch.dtype,
    expert_map: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``[M, hidden]`` in ``out_dtype`` (module docstring)."""
    _check(y, topk_ids, expert_map, num_experts, hidden)
    M, top_k = topk_ids.shape
    out = torch.empty(M, hidden, dtype=out_dtype, device=y.device)
    if M == 0 or hidden == 0:
        return out
    from ._combine_kernel import combine_kernel

    if y.stride(1) != 1:
        y = y.contiguous()
    grid = (M, -(-hidden // _BLOCK_H))
    combine_kernel[grid](
        y, topk_ids.contiguous(), expert_map, out,
        hidden, num_experts, 0 if expert_map is None else expert_map.shape[0],
        y.stride(0), out.stride(0),
        TOP_K=top_k, BLOCK_H=_BLOCK_H, num_warps=4,
    )
    return out


def combine_topk_ref(
    y: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    num_experts: int,
    hidden: int,
    out_dtype: torch.dtype,
    expert_map: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain-torch twin of ``combine_topk``."""
    _check(y, topk_ids, expert_map, num_experts, hidden)
    M, top_k = topk_ids.shape
    local = topk_ids.long()
    if expert_map is not None:
        local = expert_map.long()[local]
    on_rank = (local >= 0) & (local < num_experts)
    rows = y[:, :hidden].float().view(M, top_k, hidden)
    return torch.where(on_rank[..., None], rows, 0.0).sum(dim=1).to(out_dtype)


__all__ = ["combine_topk", "combine_topk_ref"]
