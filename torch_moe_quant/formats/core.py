"""Types shared by every number format: the format enum, granularities, the
MX scale-rounding modes, and the frozen ``QuantizedTensor`` container.

Conventions (DESIGN §3):

* A tensor is quantized over its last two dims ``[..., rows, cols]``; ``cols``
  is the reduction dim (K) and is contiguous. Leading dims are batch dims
  (experts), and every granularity is applied to each ``[rows, cols]`` matrix
  independently.
* ``scale`` always has the same rank as the logical tensor. Its last two dims
  are ``[1, 1]`` (tensor), ``[rows, 1]`` (row = channel = token),
  ``[rows, cols // g]`` (group of ``g`` along cols) or
  ``[ceil(rows / br), ceil(cols / bc)]`` (2-D block). Scales therefore
  broadcast against the codes after ``repeat_interleave`` along the blocked
  dims, which is how every reference dequantize works.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import List, Optional, Tuple, Union

import torch
from torch.utils import _pytree as pytree


class Format(str, enum.Enum):
    """Element formats. The string values are stable public names."""

    FP8_E4M3 = "fp8_e4m3"
    INT8 = "int8"
    INT4 = "int4"
    MXFP4 = "mxfp4"
    MXFP6_E2M3 = "mxfp6_e2m3"
    MXFP6_E3M2 = "mxfp6_e3m2"
    MXFP8 = "mxfp8"
    NVFP4 = "nvfp4"


class ScaleRounding(str, enum.Enum):
    """How an MX shared exponent (e8m0) is derived from a block's amax.

    ``FLOOR``: OCP MX spec, ``floor(log2(amax)) - emax_elem``.
    ``EVEN``: AMD Quark default (and vLLM's Quark emulation): amax is first
    rounded to the element's mantissa width (round half to even on the
    mantissa bits), then ``floor(log2)``.
    ``RCEIL``: NVIDIA hardware / torchao ``RCEIL``: ``ceil(log2(amax / max_elem))``.
    """

    FLOOR = "floor"
    EVEN = "even"
    RCEIL = "rceil"


class Int4Packing(str, enum.Enum):
    """Checkpoint packings of 4-bit integers (see ``formats.int4``)."""

    PACK_QUANTIZED = "pack_quantized"  # compressed-tensors: int32 along K, [.., N, K/8]
    GPTQ = "gptq"  # int32 along K, [.., K/8, N]; zeros packed along N
    AWQ = "awq"  # int32 along N, interleaved, [.., K, N/8]


class Arithmetic(str, enum.Enum):
    """Precision a scaled fp8/int8/int4 quantizer works in (same result for fp32 input).

    ``FP32``: ``x`` is upcast to fp32; the scale is computed in fp32 (then
    rounded once to the stored scale dtype) and ``x / scale`` is one fp32
    division (vLLM's torch references, torchao on fp32 input).
    ``INPUT_DTYPE``: compressed-tensors: the scale is computed and stored at
    ``x.dtype`` precision and ``x / scale`` (``+ zero_point``) is evaluated in
    ``x.dtype`` before the final rounding, a double rounding for bf16/fp16
    input. Use it to reproduce llm-compressor checkpoints bit for bit.
    """

    FP32 = "fp32"
    INPUT_DTYPE = "input_dtype"


@dataclasses.dataclass(frozen=True)
class PerTensor:
    """One scale per ``[rows, cols]`` matrix."""

    def __str__(self) -> str:
        return "per-tensor"

    def scale_shape(self, rows: int, cols: int) -> Tuple[int, int]:
        return (1, 1)

    def block_shape(self, rows: int, cols: int) -> Tuple[int, int]:
        return (rows, cols)


@dataclasses.dataclass(frozen=True)
class PerRow:
    """One scale per row: a weight's output channel or an activation's token."""

    def __str__(self) -> str:
        return "per-row"

    def scale_shape(self, rows: int, cols: int) -> Tuple[int, int]:
        return (rows, 1)

    def block_shape(self, rows: int, cols: int) -> Tuple[int, int]:
        return (1, cols)


@dataclasses.dataclass(frozen=True)
class PerGroup:
    """One scale per ``size`` consecutive elements along cols (K)."""

    size: int

    def __str__(self) -> str:
        return f"group {self.size}"

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"PerGroup.size must be positive, got {self.size}")

    def scale_shape(self, rows: int, cols: int) -> Tuple[int, int]:
        return (rows, cols // self.size)

    def block_shape(self, rows: int, cols: int) -> Tuple[int, int]:
        return (1, self.size)


@dataclasses.dataclass(frozen=True)
class PerBlock:
    """One scale per ``rows x cols`` 2-D tile (DeepSeek-style 128x128)."""

    rows: int = 128
    cols: int = 128

    def __str__(self) -> str:
        return f"block {self.rows}x{self.cols}"

    def scale_shape(self, rows: int, cols: int) -> Tuple[int, int]:
        return (-(-rows // self.rows), -(-cols // self.cols))

    def block_shape(self, rows: int, cols: int) -> Tuple[int, int]:
        return (self.rows, self.cols)


Granularity = Union[PerTensor, PerRow, PerGroup, PerBlock]

#: Aliases accepted wherever a granularity is named by string.
GRANULARITY_NAMES = {
    "tensor": PerTensor(),
    "channel": PerRow(),
    "token": PerRow(),
    "row": PerRow(),
    "block": PerBlock(128, 128),
}


def as_granularity(g: Union[str, Granularity]) -> Granularity:
    """Accept a granularity object or one of ``GRANULARITY_NAMES``."""
    if isinstance(g, (PerTensor, PerRow, PerGroup, PerBlock)):
        return g
    if isinstance(g, str) and g in GRANULARITY_NAMES:
        return GRANULARITY_NAMES[g]
    raise ValueError(
        f"granularity must be one of {sorted(GRANULARITY_NAMES)} or a "
        f"PerTensor/PerRow/PerGroup/PerBlock instance, got {g!r}"
    )


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A quantized tensor: packed codes plus everything needed to decode them.

    Fields that are tensors are pytree children (so the container flows
    through ``torch.compile`` and ``torch.utils._pytree``); the rest are
    static metadata.

    * ``data``: packed codes, layout owned by the format module.
    * ``scale``: block scales, same rank as ``shape`` (see module docstring).
    * ``global_scale``: NVFP4 per-matrix fp32 global scale ``[..., 1, 1]``.
    * ``zero_point``: int4/int8 zero points, shape of ``scale``, int8 codes.
    * ``g_idx``: GPTQ act-order group index per column, int32 ``[..., cols]``.
    """

    data: torch.Tensor
    scale: torch.Tensor
    fmt: Format
    granularity: Granularity
    shape: Tuple[int, ...]
    global_scale: Optional[torch.Tensor] = None
    zero_point: Optional[torch.Tensor] = None
    g_idx: Optional[torch.Tensor] = None
    rounding: Optional[ScaleRounding] = None

    @property
    def tensors(self) -> dict:
        """The non-None tensor fields by name."""
        return {
            name: getattr(self, name)
            for name in _TENSOR_FIELDS
            if getattr(self, name) is not None
        }

    def to(self, *args, **kwargs) -> "QuantizedTensor":
        """Move every tensor field (device moves only; dtypes are the format's)."""
        return dataclasses.replace(
            self, **{k: v.to(*args, **kwargs) for k, v in self.tensors.items()}
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


_TENSOR_FIELDS = ("data", "scale", "global_scale", "zero_point", "g_idx")
_STATIC_FIELDS = ("fmt", "granularity", "shape", "rounding")


def register_pytree_dataclass(cls, tensor_fields, static_fields) -> None:
    """Register a frozen dataclass as a pytree node: ``tensor_fields`` are
    children (an absent ``None`` field is a ``None`` leaf), ``static_fields`` the hashable
    context. (torch 2.13's ``pytree.register_dataclass`` has no static fields.)"""

    def flatten(obj):
        return [getattr(obj, n) for n in tensor_fields], tuple(getattr(obj, n) for n in static_fields)

    def flatten_with_keys(obj):
        children, context = flatten(obj)
        return [(pytree.GetAttrKey(n), c) for n, c in zip(tensor_fields, children)], context

    def unflatten(children, context):
        return cls(**dict(zip(tensor_fields, children)), **dict(zip(static_fields, context)))

    pytree.register_pytree_node(cls, flatten, unflatten, flatten_with_keys_fn=flatten_with_keys)


register_pytree_dataclass(QuantizedTensor, _TENSOR_FIELDS, _STATIC_FIELDS)


def check_tensor(name: str, t: torch.Tensor, *, dtype=None, shape=None) -> None:
    """Raise a TypeError/ValueError naming ``name`` if ``t`` is not as expected."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None:
        dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in dtypes:
            raise TypeError(
                f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}"
            )
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}"
        )


def expand_scale(
    scale: torch.Tensor, granularity: Granularity, rows: int, cols: int
) -> torch.Tensor:
    """Broadcast a ``[..., r, c]`` scale (or zero point) to ``[..., rows, cols]``
    by repeating each entry over its block; a last partial block is cut."""
    br, bc = granularity.block_shape(rows, cols)
    s = scale.repeat_interleave(br, dim=-2)[..., :rows, :] if scale.shape[-2] != rows else scale
    if scale.shape[-1] == cols:
        return s
    return s.repeat_interleave(bc, dim=-1)[..., :cols]


def check_granularity(name: str, g: Granularity, rows: int, cols: int) -> None:
    """Group granularity needs cols divisible by the group size."""
    if isinstance(g, PerGroup) and cols % g.size != 0:
        raise ValueError(
            f"{name}: the last dim ({cols}) must be divisible by the group size "
            f"{g.size}"
        )


def value_ranges(*tensors: torch.Tensor) -> List[Tuple[int, int]]:
    """``(min, max)`` of each (non-empty, integer, same-device) tensor, read
    with one host sync; callers check ``values_available`` first."""
    stats = torch.stack([s.long() for t in tensors for s in (t.min(), t.max())]).tolist()
    return list(zip(stats[0::2], stats[1::2]))


def cuda_capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (host syncs are
    errors there, so value checks are skipped)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def values_available(*tensors: Optional[torch.Tensor]) -> bool:
    """True when the values of ``tensors`` can be read: not while
    ``torch.compile`` traces, not while a CUDA graph is captured (a host sync
    there is an error), and not for fake or meta tensors (fake impls).
    Value checks (NaN, ids in range) run only then; shape/dtype checks always."""
    if torch.compiler.is_compiling() or cuda_capturing():
        return False
    from torch._subclasses.fake_tensor import FakeTensor

    return not any(
        isinstance(t, FakeTensor) or (isinstance(t, torch.Tensor) and t.is_meta)
        for t in tensors
    )
