"""Output shapes of every ``moe_quant`` op (ints may be SymInts)."""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch

from ..formats.core import Format, Granularity
from ..formats.layout import FieldSpec, expected_fields

Shape = Tuple[int, ...]


def experts_output_shape(hidden_states: torch.Tensor) -> Tuple[Shape, torch.dtype]:
    """An expert op returns ``[M, H]`` in the dtype of ``hidden_states``."""
    return tuple(hidden_states.shape), hidden_states.dtype


def route_shapes(num_tokens, top_k: int) -> Tuple[Tuple[Shape, torch.dtype], Tuple[Shape, torch.dtype]]:
    """``route`` returns fp32 weights and int32 ids, both ``[M, k]``."""
    return ((num_tokens, top_k), torch.float32), ((num_tokens, top_k), torch.int32)


def align_max_padded(num_pairs, num_experts: int, block_size: int):
    """Worst case of the padded pair count: every expert's group may need up
    to ``block_size - 1`` padding slots."""
    return num_pairs + num_experts * (block_size - 1)


def align_shapes(num_pairs, num_experts: int, block_size: int) -> Dict[str, Tuple[Shape, torch.dtype]]:
    """``align`` outputs, worst-case sized (no data-dependent shapes):

    * ``sorted_ids`` int32 ``[max_padded]``: pair indices (``token * k + slot``)
      grouped by expert, each group padded to a multiple of ``block_size``
      with the sentinel ``num_pairs``;
    * ``block_expert_ids`` int32 ``[ceil(max_padded / block_size)]``: the
      local expert of each block (-1 for unused blocks);
    * ``num_padded`` int32 ``[1]``: how many entries of ``sorted_ids`` are used.
    """
    max_padded = align_max_padded(num_pairs, num_experts, block_size)
    return {
        "sorted_ids": ((max_padded,), torch.int32),
        "block_expert_ids": (((max_padded + block_size - 1) // block_size,), torch.int32),
        "num_padded": ((1,), torch.int32),
    }


def quantize_shapes(fmt: Format, shape: Sequence[int], granularity: Granularity) -> Dict[str, FieldSpec]:
    """Tensors a quantize op returns (data, scale[, global_scale])."""
    return expected_fields(fmt, tuple(shape), granularity)


def dequantize_shape(fmt: Format, data_shape: Sequence[int]) -> Shape:
    """Logical shape of packed ``data`` of ``fmt``."""
    from ..formats.layout import TRAITS

    num, den = TRAITS[fmt].pack_ratio
    *lead, cols = data_shape
    # packed cols are a multiple of num; dividing first keeps the symbolic
    # expression simple (4*floor(s/3), not floor(4*s/3), which sympy trips on)
    return tuple(lead) + (cols // num * den,)
