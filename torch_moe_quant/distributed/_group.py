"""Process-group checks shared by the expert- and tensor-parallel forwards,
and the enums both take. Everything here traces under ``torch.compile``
(``dist.get_rank``/``get_world_size`` of a group are compile-time constants)."""

from __future__ import annotations

import enum
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc


class CombinePrecision(str, enum.Enum):
    """Precision in which the ranks' partial expert outputs are computed,
    exchanged and summed.

    ``INPUT`` (default): the local experts run in the input dtype
    (bf16/fp16), exactly as the single-device op runs them, and return
    partial sums in that dtype; that is what goes over the wire. The
    all-to-all combines add the partials in fp32; the ``all_reduce`` combines
    (``TokenDispatch.REPLICATED``, tensor parallelism) add them in the input
    dtype, in the backend's order. Difference from the single-device layer:
    one extra rounding of each rank's partial sum to the input dtype
    (measured relative Frobenius error 2.5e-3 to 3.0e-3 in bf16 on CPU).
    ``FP32``: the local experts get fp32 activations (the same values) and
    return fp32 partials, exchanged and summed in fp32, cast once at the end.
    On CPU, where the op computes in fp32 whatever the input dtype, this is
    the single-device result up to the fp32 summation order (bit-identical in
    the tests). On CUDA it makes the expert kernel run in fp32 (its compute
    dtype is the input's): slower, and not the bf16 single-device rounding;
    the combine moves twice the bytes. Use it to check correctness.
    """

    FP32 = "fp32"
    INPUT = "input"


def as_enum(cls, value, name: str):
    try:
        return cls(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {[v.value for v in cls]}, got {value!r}") from None


def materialize(t: torch.Tensor) -> torch.Tensor:
    """In eager, wait for a functional collective's result before returning
    it: an unwaited ``AsyncCollectiveTensor`` escaping to the caller would let
    a CUDA event recorded right after the call fire before the collective
    finishes (and c10d warns about unwaited collectives). Under
    ``torch.compile`` the graph already holds the waits."""
    if not torch.compiler.is_compiling() and isinstance(t, fc.AsyncCollectiveTensor):
        return t.wait()
    return t


def resolve_group(group: Optional["dist.ProcessGroup"], world_size: int, rank: int, what: str) -> "dist.ProcessGroup":
    """``group`` (None = the default group) after checking that it has
    ``world_size`` ranks and that this process is its rank ``rank`` (the rank
    ``what`` was built for)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "group: torch.distributed is not initialized; call torch.distributed.init_process_group "
            "(e.g. under torchrun) before running the parallel MoE"
        )
    if group is None:
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    size = dist.get_world_size(group)
    my_rank = dist.get_rank(group)
    if my_rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    if size != world_size:
        raise ValueError(
            f"group has {size} ranks but {what} was built for world_size={world_size}; pass the "
            "process group the experts were sharded for"
        )
    if my_rank != rank:
        raise ValueError(
            f"{what} was built for rank {rank} but this process is rank {my_rank} of group; "
            "shard with the rank of this process in the group (dist.get_rank(group))"
        )
    return group


def compute_dtype(dtype: torch.dtype, combine: CombinePrecision) -> torch.dtype:
    """The dtype the local experts run in for ``combine``."""
    if combine is CombinePrecision.FP32:
        return torch.promote_types(dtype, torch.float32)
    return dtype


def check_hidden(hidden_states: torch.Tensor, hidden_size: int) -> Tuple[int, int]:
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    if hidden_states.dim() != 2 or hidden_states.shape[1] != hidden_size:
        raise ValueError(
            f"hidden_states must have shape [num_tokens, {hidden_size}], got {tuple(hidden_states.shape)}"
        )
    if not hidden_states.is_floating_point():
        raise TypeError(f"hidden_states must be a float tensor, got {hidden_states.dtype}")
    return hidden_states.shape[0], hidden_states.shape[1]
