"""Storage layout of every format: the one place that says which tensors a
``QuantizedTensor`` of a given format, logical shape and granularity holds,
with which shapes and dtypes.

Used to validate tensors that come from outside (checkpoints, users) with
errors that name the field and the expected value, and by the fake (meta)
implementations of the ops, so shapes are written down exactly once.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import torch

from .core import (
    Format,
    values_available,
    Granularity,
    PerBlock,
    PerGroup,
    PerRow,
    PerTensor,
    QuantizedTensor,
)


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    shape: Tuple[int, ...]
    dtypes: Tuple[torch.dtype, ...]
    why: str = ""


@dataclasses.dataclass(frozen=True)
class FormatTraits:
    """Static facts about a format's storage."""

    data_dtype: torch.dtype
    #: (numerator, denominator): packed cols = cols * num // den
    pack_ratio: Tuple[int, int]
    scale_dtypes: Tuple[torch.dtype, ...]
    granularities: Tuple[type, ...]
    #: the block along cols that MX/NVFP4 formats fix (None = free)
    fixed_group: Optional[int] = None
    has_global_scale: bool = False


_F32 = (torch.float32,)
_MX_GRAN = (PerGroup,)
TRAITS: Dict[Format, FormatTraits] = {
    Format.FP8_E4M3: FormatTraits(
        torch.float8_e4m3fn, (1, 1), _F32, (PerTensor, PerRow, PerGroup, PerBlock)
    ),
    Format.INT8: FormatTraits(torch.int8, (1, 1), _F32, (PerTensor, PerRow)),
    Format.INT4: FormatTraits(
        torch.int32,
        (1, 8),
        (torch.bfloat16, torch.float16, torch.float32),
        (PerRow, PerGroup),
    ),
    Format.MXFP4: FormatTraits(torch.uint8, (1, 2), (torch.uint8,), _MX_GRAN, 32),
    Format.MXFP6_E2M3: FormatTraits(torch.uint8, (3, 4), (torch.uint8,), _MX_GRAN, 32),
    Format.MXFP6_E3M2: FormatTraits(torch.uint8, (3, 4), (torch.uint8,), _MX_GRAN, 32),
    Format.MXFP8: FormatTraits(torch.float8_e4m3fn, (1, 1), (torch.uint8,), _MX_GRAN, 32),
    Format.NVFP4: FormatTraits(
        torch.uint8, (1, 2), (torch.float8_e4m3fn,), _MX_GRAN, 16, has_global_scale=True
    ),
}


def check_supported(fmt: Format, granularity: Granularity, cols: int, name: str) -> None:
    """Raise ValueError if ``fmt`` cannot use ``granularity`` on ``cols`` columns."""
    t = TRAITS[fmt]
    if not isinstance(granularity, t.granularities):
        raise ValueError(
            f"{name}: format {fmt.value} supports granularities "
            f"{[g.__name__ for g in t.granularities]}, got {granularity!r}"
        )
    if t.fixed_group is not None and granularity != PerGroup(t.fixed_group):
        raise ValueError(
            f"{name}: format {fmt.value} uses blocks of {t.fixed_group} along K, got {granularity!r}"
        )
    if isinstance(granularity, PerGroup) and cols % granularity.size:
        raise ValueError(
            f"{name}: K={cols} must be divisible by the block size {granularity.size} "
            f"of {fmt.value} (pad K to a multiple of {granularity.size})"
        )
    num, den = t.pack_ratio
    if (cols * num) % den:
        raise ValueError(f"{name}: K={cols} must be a multiple of {den} to pack {fmt.value}")


def expected_fields(
    fmt: Format,
    shape: Sequence[int],
    granularity: Granularity,
    *,
    with_zero_point: bool = False,
    with_g_idx: bool = False,
) -> Dict[str, FieldSpec]:
    """Shapes and dtypes of every tensor of a ``QuantizedTensor``."""
    *batch, rows, cols = shape
    batch = tuple(batch)
    t = TRAITS[fmt]
    num, den = t.pack_ratio
    sshape = batch + tuple(granularity.scale_shape(rows, cols))
    fields = {
        "data": FieldSpec(batch + (rows, cols * num // den), (t.data_dtype,), "packed codes"),
        "scale": FieldSpec(sshape, t.scale_dtypes, f"one scale per {granularity}"),
    }
    if t.has_global_scale:
        fields["global_scale"] = FieldSpec(batch + (1, 1), _F32, "per-matrix global scale")
    if with_zero_point:
        fields["zero_point"] = FieldSpec(sshape, (torch.int8,), "one zero point per scale")
    if with_g_idx:
        fields["g_idx"] = FieldSpec(batch + (cols,), (torch.int32,), "group of each column")
    return fields


def validate(q: QuantizedTensor, name: str) -> None:
    """Check every tensor of ``q`` against ``expected_fields``; errors name
    ``name.<field>`` and the expected shape/dtype."""
    check_supported(q.fmt, q.granularity, q.shape[-1], name)
    fields = expected_fields(
        q.fmt,
        q.shape,
        q.granularity,
        with_zero_point=q.zero_point is not None,
        with_g_idx=q.g_idx is not None,
    )
    for field, spec in fields.items():
        t = getattr(q, field)
        if t is None:
            raise ValueError(f"{name}.{field} is required for {q.fmt.value} ({spec.why})")
        if t.dtype not in spec.dtypes:
            raise TypeError(
                f"{name}.{field} must have dtype {' or '.join(map(str, spec.dtypes))} "
                f"for {q.fmt.value}, got {t.dtype}"
            )
        if tuple(t.shape) != spec.shape:
            raise ValueError(
                f"{name}.{field} must have shape {spec.shape} ({spec.why}, logical shape "
                f"{tuple(q.shape)}), got {tuple(t.shape)}"
            )
    extra = set(q.tensors) - set(fields)
    if extra:
        raise ValueError(f"{name} has unexpected fields for {q.fmt.value}: {sorted(extra)}")


#: e8m0 byte that encodes NaN (OCP MX spec)
E8M0_NAN = 255


def _first_bad(bad: torch.Tensor) -> str:
    idx = tuple(int(i) for i in bad.nonzero()[0])
    return f"{int(bad.sum())} of {bad.numel()}, first at index {idx}"


def check_quantized_values(q: QuantizedTensor, name: str, key=None) -> None:
    """Value checks of a quantized tensor from outside (checkpoint, user), run
    at construction or load, never per call: every value must decode to a
    finite number of the right sign. Errors name ``name.<field>``.

    * fp8 / int8 / int4 scales: finite and > 0 (0 zeroes a block, a negative
      scale flips its signs; our quantizers and compressed-tensors never store
      either);
    * MX (e8m0) scales: not the NaN byte 255;
    * nvfp4: block scales not NaN and >= 0 (0 is an all-zero block), global
      scale finite and > 0 (dequantize divides by it);
    * int4 zero points in [-8, 8] (8: a GPTQ v1 nibble 15), g_idx in [0, groups).

    ``key(field) -> str`` names a field in errors (default ``name.<field>``;
    the loaders pass the checkpoint key). Skipped when the values cannot be
    read (meta / fake tensors, compiling)."""
    label = key or (lambda field: f"{name}.{field}")
    tensors = [t for t in q.tensors.values()]
    if not values_available(*tensors):
        return
    traits = TRAITS[q.fmt]
    s = q.scale
    if s.numel():
        if s.dtype == torch.uint8:  # e8m0
            bad = s == E8M0_NAN
            if bool(bad.any()):
                raise ValueError(f"{label('scale')} holds the e8m0 NaN byte 255 ({_first_bad(bad)})")
        elif traits.has_global_scale:
            f = s.float()
            bad = f.isnan() | (f < 0)
            if bool(bad.any()):
                raise ValueError(f"{label('scale')} (nvfp4 block scales) must be >= 0 and not NaN ({_first_bad(bad)})")
        else:
            f = s.float()
            bad = ~(torch.isfinite(f) & (f > 0))
            if bool(bad.any()):
                raise ValueError(f"{label('scale')} must be finite and > 0 everywhere ({_first_bad(bad)} are not)")
    if q.global_scale is not None and q.global_scale.numel():
        g = q.global_scale.float()
        bad = ~(torch.isfinite(g) & (g > 0))
        if bool(bad.any()):
            raise ValueError(
                f"{label('global_scale')} must be finite and > 0 (dequantize divides by it; {_first_bad(bad)} are not)"
            )
    if q.zero_point is not None and q.zero_point.numel():
        z = q.zero_point
        bad = (z < -8) | (z > 8)
        if q.fmt is Format.INT4 and bool(bad.any()):
            raise ValueError(f"{label('zero_point')} must lie in [-8, 8] for int4 ({_first_bad(bad)} do not)")
    if q.g_idx is not None and q.g_idx.numel() and isinstance(q.granularity, PerGroup):
        groups = q.shape[-1] // q.granularity.size
        bad = (q.g_idx < 0) | (q.g_idx >= groups)
        if bool(bad.any()):
            raise ValueError(f"{label('g_idx')} must lie in [0, {groups}) ({_first_bad(bad)} do not)")
