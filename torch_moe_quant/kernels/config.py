"""Tile configurations of the grouped MoE GEMM.

What exists here: a frozen problem description (``GemmProblem``), a frozen
tile configuration (``KernelConfig``) and ``select_config``, a small typed
heuristic (no tables, no JSON). Every launcher also accepts an explicit
``KernelConfig``, which is how tests pin small tiles. Opt-in autotuning with
an on-disk cache (``TORCH_MOE_QUANT_AUTOTUNE=<file.json>``) lives in
``kernels.autotune``; it starts from this heuristic's candidates.

The heuristic:

* ``BLOCK_M`` follows the average number of (token, slot) pairs per expert,
  ``M * top_k / E``: 16 for decode (a few pairs per expert: a bigger tile
  would mostly multiply padding), up to 128 for prefill.
* ``BLOCK_K`` is a power of two >= 16 (a multiple of every packing: 8 int4
  per word, 2 fp4 per byte, 4 fp6 per 3 bytes) chosen so that the weight's
  scale is applied without rounding (``ScaleMode``): for float scales along
  K (int4 groups, fp8 128x128 blocks) ``BLOCK_K`` divides the group, so each
  K tile has one scale per column (``PER_K_TILE``); power-of-two e8m0 scales
  and nvfp4's e4m3 scales may be folded into the weight tile
  (``PER_GROUP``) exactly in bf16/fp32, so they keep the larger tile,
  except with fp16 activations (fp16's narrow range), where the e8m0 group
  bounds ``BLOCK_K`` too. Act-order weights gather their scales per element
  whatever ``BLOCK_K`` is.
* ``num_stages`` is lowered until the loads one pipeline stage buffers
  (activation tile, packed weight tile, and the scale, zero point and
  ``g_idx`` tiles of ``ScaleMode.PER_GROUP`` / ``PER_ELEMENT``) fit
  ``SMEM_BUDGET`` bytes (H100: 227 KiB of shared memory per block).
* On a CPU device (the Triton interpreter) tiles are the smallest the
  kernel allows, to keep the interpreter fast.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from ..formats.core import PerBlock, PerGroup, QuantizedTensor
from ..formats.layout import TRAITS
from ..schemes import ActOrder, Scheme, WeightSpec, ZeroPoint
from ._operand import CODECS, ElementCodec, ScaleCodec, check_format_supported, weight_spec_of

_COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: ``tl.dot`` needs every tile dim >= 16.
MIN_BLOCK = 16
#: shared memory the pipelined loads may take (bytes), below H100's 227 KiB per block
SMEM_BUDGET = 200 * 1024
#: stored bits per weight element (the kernel loads packed words once)
_BITS = {
    ElementCodec.FP8_E4M3: 8,
    ElementCodec.INT8: 8,
    ElementCodec.INT4: 4,
    ElementCodec.FP4_E2M1: 4,
    ElementCodec.FP6_E2M3: 6,
    ElementCodec.FP6_E3M2: 6,
}


def _is_pow2(x: int) -> bool:
    return isinstance(x, int) and x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class GemmProblem:
    """One grouped GEMM of an MoE layer: ``num_tokens`` tokens, each routed
    to ``top_k`` of ``num_experts`` experts, weights ``[E, n, k]``, activations
    of ``dtype`` (the compute dtype of ``tl.dot``)."""

    num_tokens: int
    n: int
    k: int
    num_experts: int
    top_k: int
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        for name in ("num_tokens", "n", "k", "num_experts", "top_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"GemmProblem.{name} must be a non-negative int, got {v!r}")
        if self.num_experts < 1 or self.top_k < 1:
            raise ValueError(
                f"GemmProblem needs num_experts >= 1 and top_k >= 1, got {self.num_experts}, {self.top_k}"
            )
        if self.dtype not in _COMPUTE_DTYPES:
            raise TypeError(f"GemmProblem.dtype must be bfloat16, float16 or float32, got {self.dtype}")

    @property
    def num_pairs(self) -> int:
        return self.num_tokens * self.top_k

    @property
    def pairs_per_expert(self) -> float:
        return self.num_pairs / self.num_experts


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tiles and launch options of the grouped GEMM.

    ``block_m`` is also the ``block_size`` of ``moe_quant.align``: the rows of
    one tile belong to one expert. ``group_m`` tiles along M share their
    weight columns in L2 (grouped launch order).
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if not _is_pow2(v) or v < MIN_BLOCK:
                raise ValueError(f"KernelConfig.{name} must be a power of two >= {MIN_BLOCK}, got {v!r}")
        if not isinstance(self.group_m, int) or self.group_m < 1:
            raise ValueError(f"KernelConfig.group_m must be a positive int, got {self.group_m!r}")
        if not _is_pow2(self.num_warps):
            raise ValueError(f"KernelConfig.num_warps must be a power of two, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"KernelConfig.num_stages must be a positive int, got {self.num_stages!r}")


def _pow2_at_least(x: int, floor: int = MIN_BLOCK) -> int:
    p = floor
    while p < x:
        p *= 2
    return p


def k_group(spec: WeightSpec) -> Optional[int]:
    """Columns along K that share one scale, or None (one scale for all K,
    or unquantized)."""
    g = spec.granularity
    if isinstance(g, PerGroup):
        return g.size
    if isinstance(g, PerBlock):
        return g.cols
    return None


def block_k_for(spec: WeightSpec, preferred: int, dtype: torch.dtype) -> int:
    """``BLOCK_K`` for ``spec`` (see the module docstring)."""
    group = k_group(spec)
    if spec.fmt is None or group is None or spec.act_order is ActOrder.GROUP:
        return preferred
    _, scale_codec = CODECS[spec.fmt]
    exact_fold = scale_codec is ScaleCodec.E4M3 or (
        scale_codec is ScaleCodec.E8M0 and dtype is not torch.float16
    )
    if exact_fold:
        return preferred
    # largest power of two dividing the group, capped by the preferred tile
    largest_div = group & -group
    return max(MIN_BLOCK, min(preferred, largest_div))


def stage_bytes(spec: WeightSpec, dtype: torch.dtype, block_m: int, block_n: int, block_k: int) -> int:
    """Estimated shared memory of one pipeline stage (see the module docstring)."""
    a = block_m * block_k * dtype.itemsize
    if spec.fmt is None:
        return a + block_k * block_n * spec.float_dtype.itemsize
    element, scale_codec = CODECS[spec.fmt]
    w = block_k * block_n * _BITS[element] // 8
    per_scale = (4 if scale_codec is ScaleCodec.FLOAT else 1) + (spec.zero_point is not ZeroPoint.NONE)
    group = k_group(spec)
    if spec.act_order is ActOrder.GROUP or (group is not None and group % block_k and block_k % group):
        w += block_k * block_n * per_scale + 4 * block_k  # gathered per element (+ g_idx)
    elif group is not None and group < block_k:
        w += block_k // group * block_n * per_scale  # PER_GROUP
    return a + w


def _device_type(device) -> str:
    if isinstance(device, torch.device):
        return device.type
    if isinstance(device, str):
        return torch.device(device).type
    raise TypeError(f"device must be a torch.device or str, got {type(device).__name__}")


def select_config(
    problem: GemmProblem,
    weight: Union[Scheme, WeightSpec, torch.Tensor, QuantizedTensor],
    device: Union[torch.device, str] = "cuda",
) -> KernelConfig:
    """A ``KernelConfig`` for ``problem`` with weights described by ``weight``
    (a ``Scheme``, ``WeightSpec``, weight tensor or ``QuantizedTensor``) on
    ``device`` (see the module docstring for the rules)."""
    if not isinstance(problem, GemmProblem):
        raise TypeError(f"problem must be a GemmProblem, got {type(problem).__name__}")
    spec = weight_spec_of(weight)
    check_format_supported(spec.fmt, "select_config")
    if _device_type(device) == "cpu":
        block_m, block_n, block_k, group_m, warps, stages = 16, 32, 32, 1, 4, 1
    else:
        ppe = problem.pairs_per_expert
        if ppe <= 16:
            block_m, block_n, block_k, group_m, warps, stages = 16, 64, 128, 1, 4, 4
        elif ppe <= 64:
            block_m, block_n, block_k, group_m, warps, stages = 32, 64, 128, 4, 4, 4
        elif ppe <= 256:
            block_m, block_n, block_k, group_m, warps, stages = 64, 128, 64, 8, 4, 3
        else:
            block_m, block_n, block_k, group_m, warps, stages = 128, 128, 64, 8, 8, 3
    block_n = min(block_n, _pow2_at_least(problem.n))
    block_k = min(block_k, _pow2_at_least(problem.k))
    block_k = block_k_for(spec, block_k, problem.dtype)
    if spec.fmt is not None:
        den = TRAITS[spec.fmt].pack_ratio[1]
        assert block_k % den == 0, (block_k, den)
    per_stage = stage_bytes(spec, problem.dtype, block_m, block_n, block_k)
    while stages > 1 and stages * per_stage > SMEM_BUDGET:
        stages -= 1
    return KernelConfig(block_m, block_n, block_k, group_m, warps, stages)


def fit_activation(config: KernelConfig, act) -> KernelConfig:
    """``config`` for a GEMM whose input is quantized per group along K
    (``act_quant.ActQuant`` with ``group`` 16 / 32 / 128, or None): the GEMM
    prologue quantizes whole groups, so a ``block_k`` below the group is
    raised to it (and ``num_stages`` lowered by the same factor, the loads of a
    stage growing with ``block_k``). Power-of-two groups and tiles: a
    ``block_k`` at least the group is a multiple of it."""
    if not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a KernelConfig, got {type(config).__name__}")
    group = 0 if act is None else act.group
    if not group or config.block_k >= group:
        return config
    factor = group // config.block_k
    return dataclasses.replace(config, block_k=group, num_stages=max(1, config.num_stages // factor))


__all__ = [
    "GemmProblem", "KernelConfig", "block_k_for", "fit_activation", "k_group", "select_config", "stage_bytes",
]
