"""Triton kernel of ``kernels.align.align_triton`` (one program, no host sync).

Imported lazily by the launcher, like ``_gemm_kernel``, and for the same
reason it calls Triton builtins only (``tl.reduce`` / ``tl.associative_scan``
with a local ``_add``, never ``tl.sum`` / ``tl.cumsum``, which are ``@jit``
helpers of ``triton.language.standard``).

One program walks the pairs twice in chunks of ``CHUNK``:

1. count the pairs of each local expert (a ``[CHUNK, E_PAD]`` one-hot
   compare, summed over the chunk), pad each count to ``BLOCK_SIZE``, and
   write ``num_padded`` and the expert of every block (``-1`` past the end);
2. fill ``sorted_ids`` with the sentinel ``num_pairs``, barrier, then write
   each pair's index at ``padded_start[e] + (pairs of e before it)``: the
   rank inside a chunk is an exclusive scan of the one-hot along the chunk,
   so the order is stable (pair order within an expert), the same outputs as
   ``ops.routing.align_reference``.

A pair whose id is outside ``[0, len(expert_map))`` (or ``[0, num_experts)``
without a map), or maps to ``-1``, is dropped; the launcher validates ids
before launch when values can be read.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _local_expert(ids_ptr, map_ptr, offs, num_pairs, num_experts, map_len):
    """Local expert of each pair in ``offs``, ``-1`` when dropped or past the end."""
    ok = offs < num_pairs
    ids = tl.load(ids_ptr + offs, mask=ok, other=-1).to(tl.int32)
    if map_ptr is not None:
        in_map = ok & (ids >= 0) & (ids < map_len)
        ids = tl.load(map_ptr + ids, mask=in_map, other=-1).to(tl.int32)
    return tl.where(ok & (ids >= 0) & (ids < num_experts), ids, -1)


@triton.jit
def align_kernel(
    ids_ptr, map_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
    num_pairs, num_experts, map_len, num_slots, num_blocks,
    BLOCK_SIZE: tl.constexpr,
    E_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
    FILL: tl.constexpr,
):
    experts = tl.arange(0, E_PAD)
    counts = tl.full((E_PAD,), 0, tl.int32)
    for c0 in range(0, num_pairs, CHUNK):
        local = _local_expert(ids_ptr, map_ptr, c0 + tl.arange(0, CHUNK), num_pairs, num_experts, map_len)
        hit = (local[:, None] == experts[None, :]).to(tl.int32)
        counts += tl.reduce(hit, 0, _add)
    padded = (counts + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
    ends = tl.associative_scan(padded, 0, _add)
    starts = ends - padded
    tl.store(num_padded_ptr, tl.reduce(padded, 0, _add))

    # block b belongs to the expert whose padded run covers it: #{e : end_e <= b}
    block_ends = ends // BLOCK_SIZE
    for b0 in range(0, num_blocks, FILL):
        b = b0 + tl.arange(0, FILL)
        e = tl.reduce((block_ends[None, :] <= b[:, None]).to(tl.int32), 1, _add)
        tl.store(block_expert_ptr + b, tl.where(e < num_experts, e, -1), mask=b < num_blocks)

    for s0 in range(0, num_slots, FILL):
        s = s0 + tl.arange(0, FILL)
        tl.store(sorted_ptr + s, tl.full((FILL,), 0, tl.int32) + num_pairs, mask=s < num_slots)
    tl.debug_barrier()  # the sentinel fill is visible before any thread scatters

    running = tl.full((E_PAD,), 0, tl.int32)
    for c0 in range(0, num_pairs, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        local = _local_expert(ids_ptr, map_ptr, offs, num_pairs, num_experts, map_len)
        hit = (local[:, None] == experts[None, :]).to(tl.int32)
        before = tl.associative_scan(hit, 0, _add) - hit  # same-expert pairs earlier in the chunk
        dest = tl.reduce(hit * ((starts + running)[None, :] + before), 1, _add)
        tl.store(sorted_ptr + dest, offs, mask=local >= 0)
        running += tl.reduce(hit, 0, _add)
