"""Shared by the per-family loaders: how per-expert keys are named, which
experts a checkpoint holds, how gate and up are stacked into one ``w13``,
how per-expert static activation scales become one scale per GEMM, and which
registered scheme a checkpoint's configuration is.

Stacking (DESIGN §2): ``w13 = [gate; up]`` along the rows (``GateUpLayout.GATE_UP``),
``[E, 2I, H]``; ``w2 = down``, ``[E, H, I]``. Every field of the per-projection
``QuantizedTensor``s is concatenated row-wise, which is exact for every
granularity whose scales follow the rows (per row, per group, 2-D blocks when
``I`` is a multiple of the block height). Formats with one scale per matrix
(fp8/int8 per tensor, the nvfp4 global scale) need gate and up to share it:
see ``PerTensorScales``.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from ...formats.core import Format, Granularity, PerBlock, PerRow, PerTensor, QuantizedTensor
from ... import schemes
from ...schemes import ActivationSpec, ActOrder, Scheme, WeightSpec, ZeroPoint
from ._safetensors import CheckpointReader


@dataclasses.dataclass(frozen=True)
class ExpertNames:
    """Names of one expert's projections: module ``{prefix}.{e}.{proj}``,
    tensors ``{prefix}.{e}.{proj}.{param}``. ``gate=None``: non-gated experts
    (``w13`` is the up projection alone)."""

    gate: Optional[str] = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def w13(self) -> Tuple[str, ...]:
        """The projections stacked into w13, in row order."""
        return (self.gate, self.up) if self.gated else (self.up,)

    def module(self, prefix: str, expert: int, proj: str) -> str:
        return f"{prefix}.{expert}.{proj}"


#: Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE, GLM-4-MoE, Llama-4 and Mixtral as
#: linearized by llm-compressor / AMD Quark for transformers v5.
GATE_UP_DOWN = ExpertNames("gate_proj", "up_proj", "down_proj")
#: Mixtral / PhiMoE original checkpoints: w1 = gate, w3 = up, w2 = down.
W1_W3_W2 = ExpertNames("w1", "w3", "w2")


class PerTensorScales(str, enum.Enum):
    """What to do when ``w13 = [gate; up]`` needs one scale per matrix but
    the checkpoint holds one per projection (fp8/int8 per-tensor weight scales,
    the nvfp4 weight global scale). Re-quantizing is never done."""

    #: gate and up scales must be bit-equal (per expert), else ValueError.
    REQUIRE_EQUAL = "require_equal"
    #: fp8/int8 per-tensor weights only: store per-row scales equal to each
    #: half's tensor scale (exact) and pick the per-channel scheme with the
    #: same activations. Raises if no such scheme is registered.
    EXPAND_TO_ROWS = "expand_to_rows"


class InputScales(str, enum.Enum):
    """Static activation scales: checkpoints hold one per expert and
    projection, a ``QuantizedExperts`` one per GEMM (``a13_scale``, ``a2_scale``)."""

    #: the widest range over experts (and gate/up): the largest fp8/int8
    #: ``input_scale``, the smallest nvfp4 ``input_global_scale``. What vLLM
    #: does for fp8 and nvfp4 MoE (it warns when they differ).
    WIDEST = "widest"
    #: all must be bit-equal, else ValueError.
    REQUIRE_EQUAL = "require_equal"


# --------------------------------------------------------------------------
# Expert discovery


def find_experts(
    reader: CheckpointReader,
    prefix: str,
    proj: str,
    experts: Optional[Iterable[int]] = None,
) -> List[int]:
    """Expert indices to load: ``experts`` if given (each must exist), else
    every ``{prefix}.{e}.{proj}.*`` key's ``e``, which must run 0..E-1."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.{re.escape(proj)}\.")
    found = set()
    for key in reader.source.keys():
        m = pattern.match(key)
        if m:
            found.add(int(m.group(1)))
    if not found:
        raise reader.error(
            f"no expert tensors under prefix {prefix!r} (looked for keys like "
            f"'{prefix}.0.{proj}.<param>'); check prefix= and names="
        )
    if experts is not None:
        wanted = [int(e) for e in experts]
        missing = [e for e in wanted if e not in found]
        if missing:
            raise reader.error(f"experts {missing} not found under {prefix!r} (found {sorted(found)})")
        if not wanted:
            raise reader.error("experts= is empty")
        return wanted
    ordered = sorted(found)
    if ordered != list(range(len(ordered))):
        gaps = sorted(set(range(ordered[-1] + 1)) - found)
        raise reader.error(
            f"experts under {prefix!r} must be numbered 0..E-1; missing {gaps} "
            "(pass experts= to load a subset)"
        )
    return ordered


# --------------------------------------------------------------------------
# Stacking gate and up


def expand_to_rows(q: QuantizedTensor) -> QuantizedTensor:
    """A per-tensor ``q`` as per-row scales (each row keeps its matrix's scale): exact."""
    if not isinstance(q.granularity, PerTensor):
        return q
    rows = q.shape[-2]
    scale = q.scale.expand(*q.scale.shape[:-2], rows, 1).contiguous()
    return dataclasses.replace(q, scale=scale, granularity=PerRow())


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() and a.element_size() in (1, 2, 4, 8):
        view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


def _first_mismatch(a: torch.Tensor, b: torch.Tensor, experts: Sequence[int]) -> int:
    for i, e in enumerate(experts):
        if not _bit_equal(a[i], b[i]):
            return e
    return experts[0]


def concat_rows(
    parts: Sequence[QuantizedTensor],
    names: Sequence[str],
    experts: Sequence[int],
    reader: CheckpointReader,
) -> QuantizedTensor:
    """Stack the per-projection ``[E, N_i, K]`` tensors ``parts`` row-wise
    into one ``[E, sum N_i, K]`` tensor. ``names`` (module names with ``{e}``)
    are used in errors. One-per-matrix fields (per-tensor scale, global
    scale) and per-column fields (``g_idx``) must be bit-equal."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for q, name in zip(parts[1:], names[1:]):
        if q.granularity != first.granularity or q.fmt is not first.fmt:
            raise reader.error(
                f"{names[0]} is {first.fmt.value} {first.granularity} but {name} is "
                f"{q.fmt.value} {q.granularity}: w13 = [gate; up] needs one format"
            )
        if q.shape[-1] != first.shape[-1]:
            raise reader.error(f"{names[0]} has K={first.shape[-1]} but {name} has K={q.shape[-1]}")
    g = first.granularity
    if isinstance(g, PerTensor):
        for q, name in zip(parts[1:], names[1:]):
            if not _bit_equal(q.scale, first.scale):
                e = _first_mismatch(first.scale, q.scale, experts)
                raise reader.error(
                    f"per-tensor weight scales of {names[0].format(e=e)} and {name.format(e=e)} differ "
                    f"({first.scale[experts.index(e)].item()!r} vs {q.scale[experts.index(e)].item()!r}); "
                    "w13 = [gate; up] holds one scale per matrix and re-quantizing is not allowed. "
                    "Pass per_tensor_scales=PerTensorScales.EXPAND_TO_ROWS to keep each half's scale "
                    "as per-row scales (exact, per-channel scheme)"
                )
        scale = first.scale
    elif isinstance(g, PerBlock):
        for q, name in zip(parts[:-1], names[:-1]):
            if q.shape[-2] % g.rows:
                raise reader.error(
                    f"{name} has {q.shape[-2]} rows, not a multiple of the {g.rows}-row weight block: "
                    "stacking it with the next projection would put two projections in one scale block"
                )
        scale = torch.cat([q.scale for q in parts], dim=-2)
    else:
        scale = torch.cat([q.scale for q in parts], dim=-2)
    global_scale = first.global_scale
    if global_scale is not None:
        for q, name in zip(parts[1:], names[1:]):
            if not _bit_equal(q.global_scale, global_scale):
                e = _first_mismatch(global_scale, q.global_scale, experts)
                raise reader.error(
                    f"weight_global_scale of {names[0].format(e=e)} and {name.format(e=e)} differ "
                    f"({global_scale[experts.index(e)].item()!r} vs "
                    f"{q.global_scale[experts.index(e)].item()!r}); w13 = [gate; up] holds one global "
                    "scale per matrix and rescaling the e4m3 block scales is not exact. llm-compressor "
                    "fuses gate/up global scales (update_fused_layer_weight_global_scales); this "
                    "checkpoint did not"
                )
    g_idx = first.g_idx
    if any(q.g_idx is not None for q in parts):
        if not all(q.g_idx is not None and _bit_equal(q.g_idx, first.g_idx) for q in parts):
            raise reader.error(
                f"act-order g_idx of {' and '.join(n.format(e='{e}') for n in names)} differ; one "
                "w13 matrix holds one column order (vLLM makes the same assumption)"
            )
    zero_point = None
    if any(q.zero_point is not None for q in parts):
        zero_point = torch.cat([_zero_point_or_zeros(q) for q in parts], dim=-2)
    return QuantizedTensor(
        data=torch.cat([q.data for q in parts], dim=-2),
        scale=scale,
        fmt=first.fmt,
        granularity=g,
        shape=(*first.shape[:-2], sum(q.shape[-2] for q in parts), first.shape[-1]),
        global_scale=global_scale,
        zero_point=zero_point,
        g_idx=g_idx,
        rounding=first.rounding,
    )


def _zero_point_or_zeros(q: QuantizedTensor) -> torch.Tensor:
    if q.zero_point is not None:
        return q.zero_point
    return torch.zeros(q.scale.shape, dtype=torch.int8, device=q.scale.device)


# --------------------------------------------------------------------------
# Static activation scales


def reduce_input_scales(
    scales: Mapping[str, torch.Tensor],
    policy: InputScales,
    *,
    widest_is_max: bool,
    reader: CheckpointReader,
) -> torch.Tensor:
    """One fp32 ``[1, 1]`` scale from per-module scalars ``{key: tensor}``."""
    policy = InputScales(policy)
    keys = list(scales)
    values = torch.stack([scales[k].detach().float().reshape(()) for k in keys])
    bad = [k for k, v in zip(keys, values) if not (torch.isfinite(v) and v > 0)]
    if bad:
        raise reader.error(f"static activation scale {bad[0]!r} must be finite and positive, got {scales[bad[0]].item()!r}")
    if policy is InputScales.REQUIRE_EQUAL:
        differ = [k for k, v in zip(keys, values) if not _bit_equal(v, values[0])]
        if differ:
            raise reader.error(
                f"static activation scales differ ({keys[0]!r} = {values[0].item()!r}, {differ[0]!r} = "
                f"{scales[differ[0]].float().item()!r}); pass input_scales=InputScales.WIDEST to take "
                "the widest range, as vLLM does"
            )
    out = values.max() if widest_is_max else values.min()
    return out.reshape(1, 1)


# --------------------------------------------------------------------------
# Scheme lookup


def find_scheme(
    weight_fmt: Format,
    granularity: Granularity,
    activation: Optional[ActivationSpec],
    *,
    zero_point: ZeroPoint = ZeroPoint.NONE,
    act_order: ActOrder = ActOrder.NONE,
    describe: str,
    reader: CheckpointReader,
) -> Scheme:
    """The registered scheme with these weights and activations
    (``schemes.find``: the activation's rounding is compared when given; among
    int4 schemes that differ only in their checkpoint packing label the plain
    one wins), or ``reader.error`` naming the configuration."""
    weight = WeightSpec(weight_fmt, granularity, zero_point=zero_point, act_order=act_order)
    found = schemes.find(weight, activation)
    if found is None:
        act = "none (weight-only)" if activation is None else str(activation)
        raise reader.error(
            f"no registered scheme for {describe}: weights {weight_fmt.value} {granularity}"
            f"{', zero points' if zero_point is ZeroPoint.ASYMMETRIC else ''}"
            f"{', act-order' if act_order is ActOrder.GROUP else ''}; activations {act}"
        )
    return found


__all__ = [
    "ExpertNames",
    "GATE_UP_DOWN",
    "InputScales",
    "PerTensorScales",
    "W1_W3_W2",
    "concat_rows",
    "expand_to_rows",
    "find_experts",
    "find_scheme",
    "reduce_input_scales",
]
