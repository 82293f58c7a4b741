"""Triton kernel of ``kernels.combine.combine_topk``; builtins only (see
``_align_kernel``). Program ``(token, h-block)`` sums the ``TOP_K`` rows of
its token's pairs whose expert is on this rank and stores the sum, cast."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def combine_kernel(
    y_ptr, ids_ptr, map_ptr, out_ptr,
    H, num_experts, map_len,
    stride_ym, stride_om,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs < H
    acc = tl.full((BLOCK_H,), 0.0, tl.float32)
    for slot in range(TOP_K):
        pair = token * TOP_K + slot
        e = tl.load(ids_ptr + pair).to(tl.int32)
        if map_ptr is not None:
            e = tl.load(map_ptr + e, mask=(e >= 0) & (e < map_len), other=-1).to(tl.int32)
        e_vec = tl.full((BLOCK_H,), 0, tl.int32) + e  # a vector mask (the interpreter
        on_rank = (e_vec >= 0) & (e_vec < num_experts)  # rejects scalar & vector masks)
        acc += tl.load(y_ptr + pair * stride_ym + offs, mask=h_ok & on_rank, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=h_ok)
