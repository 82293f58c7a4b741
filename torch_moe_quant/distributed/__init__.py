"""Expert and tensor parallelism for quantized MoE layers on ``torch.distributed``.

* ``ExpertPlacement``: which rank holds which global expert (contiguous
  ranges, remainder on the first ranks, or explicit owners).
* ``shard_experts``: one rank's ``ExpertParallelShard`` from the full layer
  (``torch_moe_quant.nn.loaders.load_local_experts`` reads it straight from a
  checkpoint).
* ``expert_parallel_moe``: the expert-parallel forward (``TokenDispatch``:
  exact-split ``all_to_all_single``, fixed-shape all-gather, or replicated
  tokens + ``all_reduce``); local experts run through the scheme's
  ``torch.ops.moe_quant`` op.
* ``shard_experts_tp`` / ``tensor_parallel_moe``: the intermediate dim split
  over ranks, ``all_reduce`` of the partial outputs.

Everything uses ``torch.distributed._functional_collectives`` and traces
under ``torch.compile(fullgraph=True)`` (NCCL and gloo). Importing this
package initializes nothing and changes no global config.
"""

from ._group import CombinePrecision
from .expert_parallel import TokenDispatch, expert_parallel_moe
from .sharding import (
    ExpertParallelShard,
    ExpertPlacement,
    TensorParallelShard,
    concat_experts,
    select_experts,
    shard_experts,
    shard_experts_tp,
)
from .tensor_parallel import tensor_parallel_moe

__all__ = [
    "CombinePrecision",
    "ExpertParallelShard",
    "ExpertPlacement",
    "TensorParallelShard",
    "TokenDispatch",
    "concat_experts",
    "expert_parallel_moe",
    "select_experts",
    "shard_experts",
    "shard_experts_tp",
    "tensor_parallel_moe",
]
