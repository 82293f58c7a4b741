"""How the grouped GEMM reads one expert weight tensor ``[E, N, K]``: the
storage of each format reduced to a few enums (mapped to kernel constexprs)
and the tensors the kernel receives.

* ``ElementCodec``: how codes are packed along K and decoded to fp32.
* ``ScaleCodec``: the dtype of the block scales (float, e8m0 byte, e4m3).
* ``ScaleMode``: where the scale is applied, which follows from how the scale
  varies along K relative to the kernel's ``BLOCK_K`` (see ``scale_mode``).

``WeightOperand.of(weight)`` validates a weight (plain float tensor or
``QuantizedTensor``) against ``formats.layout`` and raises
``NotImplementedError`` naming the format when the kernel has no code path
for it.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Optional, Union

import torch

from ..formats.core import Format, Granularity, PerGroup, QuantizedTensor
from ..formats.layout import validate
from ..schemes import ActOrder, Scheme, WeightSpec, ZeroPoint

Weight = Union[torch.Tensor, QuantizedTensor]


class ElementCodec(enum.IntEnum):
    """Packing and decoding of weight codes (kernel constexpr ``ELEMENT``)."""

    FLOAT = 0  # bf16 / fp16 / fp32 values, no scale
    FP8_E4M3 = 1  # one e4m3fn byte per element (fp8, mxfp8); read as uint8
    INT8 = 2  # one int8 per element
    INT4 = 3  # int32 words, 8 nibbles along K, nibble j = bits 4j, stored code + 8
    FP4_E2M1 = 4  # uint8, 2 per byte, even element in the low nibble (mxfp4, nvfp4)
    FP6_E2M3 = 5  # uint8, 4 codes in 3 bytes: v0 | v1<<6 | v2<<12 | v3<<18, low byte first
    FP6_E3M2 = 6


class ScaleCodec(enum.IntEnum):
    """Dtype of the block scales (kernel constexpr ``SCALE_CODEC``)."""

    NONE = 0
    FLOAT = 1  # fp32 / bf16 / fp16, widened to fp32
    E8M0 = 2  # uint8 byte b: 2**(b - 127), 255 = NaN
    E4M3 = 3  # float8_e4m3fn (nvfp4 block scales; the fp32 global scale divides in the epilogue)


class ScaleMode(enum.IntEnum):
    """Where the kernel applies the weight scale (kernel constexpr ``SCALE_MODE``).

    * ``NONE``: unquantized weights.
    * ``PER_COLUMN``: one scale per output column for the whole K (per-tensor,
      per-row, or a 2-D block as wide as K): the fp32 accumulator is scaled
      once in the epilogue. Weight codes enter the dot exactly.
    * ``PER_K_TILE``: the scale is constant over every ``BLOCK_K`` tile (the
      group along K is a multiple of ``BLOCK_K``): each tile's fp32 partial
      product is scaled. Weight codes enter the dot exactly.
    * ``PER_GROUP``: a K tile holds several whole groups (``BLOCK_K`` a
      multiple of a power-of-two group): one ``[BLOCK_K / group, BLOCK_N]``
      scale load, broadcast over each group of the weight tile, which is then
      rounded to the compute dtype.
    * ``PER_ELEMENT``: the group of each column is looked up (act-order
      ``g_idx``, or a group that neither divides nor is a multiple of
      ``BLOCK_K``): the scale is gathered per element, the weight tile scaled
      in fp32 and rounded to the compute dtype.

    Rounding in the last two: exact for power-of-two (e8m0) scales in
    bf16/fp32 and for nvfp4 (e2m1 x e4m3 fits 6 bits); float scales round
    (int4 act-order: ~2**-9 relative per weight in bf16).
    """

    NONE = 0
    PER_COLUMN = 1
    PER_K_TILE = 2
    PER_GROUP = 3
    PER_ELEMENT = 4


#: Format -> (element codec, scale codec). A format missing here has no Triton path.
CODECS = {
    Format.FP8_E4M3: (ElementCodec.FP8_E4M3, ScaleCodec.FLOAT),
    Format.INT8: (ElementCodec.INT8, ScaleCodec.FLOAT),
    Format.INT4: (ElementCodec.INT4, ScaleCodec.FLOAT),
    Format.MXFP4: (ElementCodec.FP4_E2M1, ScaleCodec.E8M0),
    Format.MXFP6_E2M3: (ElementCodec.FP6_E2M3, ScaleCodec.E8M0),
    Format.MXFP6_E3M2: (ElementCodec.FP6_E3M2, ScaleCodec.E8M0),
    Format.MXFP8: (ElementCodec.FP8_E4M3, ScaleCodec.E8M0),
    Format.NVFP4: (ElementCodec.FP4_E2M1, ScaleCodec.E4M3),
}

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_format_supported(fmt: Optional[Format], where: str) -> None:
    """Raise ``NotImplementedError`` naming ``fmt`` if the kernel cannot read it."""
    if fmt is not None and fmt not in CODECS:
        raise NotImplementedError(
            f"{where}: the Triton grouped GEMM has no code path for weight format "
            f"{Format(fmt).value} (supported: {sorted(f.value for f in CODECS)} and unquantized)"
        )


@dataclasses.dataclass(frozen=True)
class WeightOperand:
    """One expert weight ``[E, N, K]`` as the kernel reads it.

    ``scale``/``zero_point`` are ``[E, SN, SK]`` (contiguous, or N-major for
    act-order weights); the kernel reads entry ``(n // scale_block_n,
    k // scale_block_k)`` (or ``g_idx[e, k]`` along K) through their strides,
    with a zero stride on a dim of size 1 (broadcast).
    ``scale_block_k is None`` means one scale for the whole K (per column).
    """

    data: torch.Tensor
    element: ElementCodec
    scale_codec: ScaleCodec
    num_experts: int
    n: int
    k: int
    scale: Optional[torch.Tensor] = None
    zero_point: Optional[torch.Tensor] = None
    g_idx: Optional[torch.Tensor] = None
    global_scale: Optional[torch.Tensor] = None  # [E] fp32
    scale_block_n: int = 1
    scale_block_k: Optional[int] = None
    fmt: Optional[Format] = None
    granularity: Optional[Granularity] = None

    @staticmethod
    def of(weight: Weight, name: str = "weight") -> "WeightOperand":
        """Validate ``weight`` and describe it (see class docstring)."""
        if isinstance(weight, QuantizedTensor):
            return _quantized_operand(weight, name)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or QuantizedTensor, got {type(weight).__name__}")
        if weight.dim() != 3:
            raise ValueError(f"{name} must be 3-D [E, N, K], got shape {tuple(weight.shape)}")
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have dtype bfloat16, float16 or float32, got {weight.dtype}")
        E, N, K = weight.shape
        return WeightOperand(weight, ElementCodec.FLOAT, ScaleCodec.NONE, E, N, K)

    @property
    def spec(self) -> WeightSpec:
        """The ``WeightSpec`` this operand matches (for ``select_config``)."""
        if self.fmt is None:
            return WeightSpec(None, float_dtype=self.data.dtype)
        return WeightSpec(
            self.fmt,
            self.granularity,
            zero_point=ZeroPoint.ASYMMETRIC if self.zero_point is not None else ZeroPoint.NONE,
            act_order=ActOrder.GROUP if self.g_idx is not None else ActOrder.NONE,
        )

    def scale_mode(self, block_k: int) -> ScaleMode:
        """Where the scale is applied for K tiles of ``block_k`` (``ScaleMode``)."""
        if self.scale is None:
            return ScaleMode.NONE
        if self.g_idx is not None:
            return ScaleMode.PER_ELEMENT
        if self.scale_block_k is None:
            return ScaleMode.PER_COLUMN
        group = self.scale_block_k
        if group % block_k == 0:
            return ScaleMode.PER_K_TILE
        if block_k % group == 0 and group & (group - 1) == 0:
            return ScaleMode.PER_GROUP
        return ScaleMode.PER_ELEMENT

    @property
    def num_k_groups(self) -> int:
        return 1 if self.scale is None else self.scale.shape[2]

    def scale_strides(self):
        """``(stride_e, stride_n, stride_k)`` of scale/zero point, 0 on size-1 dims."""
        if self.scale is None:
            return 0, 0, 0
        e, n, k = self.scale.stride()
        _, sn, sk = self.scale.shape
        return e, (n if sn > 1 else 0), (k if sk > 1 else 0)


def _quantized_operand(q: QuantizedTensor, name: str) -> WeightOperand:
    if len(q.shape) != 3:
        raise ValueError(f"{name} must be 3-D [E, N, K], got logical shape {tuple(q.shape)}")
    check_format_supported(q.fmt, name)
    validate(q, name)
    if q.fmt is Format.INT8 and q.zero_point is not None:
        raise ValueError(f"{name}.zero_point must be None: int8 weights are symmetric")
    E, N, K = q.shape
    element, scale_codec = CODECS[q.fmt]
    data = q.data.view(torch.uint8) if element is ElementCodec.FP8_E4M3 else q.data
    byte_scale = scale_codec in (ScaleCodec.E8M0, ScaleCodec.E4M3)
    scale = q.scale.view(torch.uint8) if byte_scale else q.scale
    br, bc = q.granularity.block_shape(N, K)
    _, sn, sk = q.scale.shape
    g_idx, zero_point = q.g_idx, q.zero_point
    scale = scale.contiguous()
    if zero_point is not None:
        zero_point = zero_point.contiguous()
    if g_idx is not None:
        if not isinstance(q.granularity, PerGroup):
            raise ValueError(f"{name}.g_idx needs a PerGroup granularity, got {q.granularity!r}")
        g_idx = g_idx.contiguous()
        # act-order gathers scale[e, n, g_idx[k]] per element: N-major copies make
        # those loads contiguous along the tile's N (the kernel reads strides)
        scale = _n_major(scale)
        zero_point = None if zero_point is None else _n_major(zero_point)
    # the kernel reads the zero point through the scale's strides
    assert zero_point is None or zero_point.stride() == scale.stride()
    one_k_scale = sk == 1 and g_idx is None
    gs = None
    if q.global_scale is not None:
        gs = q.global_scale.reshape(E).contiguous()
    return WeightOperand(
        data=data.contiguous(),
        element=element,
        scale_codec=scale_codec,
        num_experts=E,
        n=N,
        k=K,
        scale=scale,
        zero_point=zero_point,
        g_idx=g_idx,
        global_scale=gs,
        scale_block_n=br if sn > 1 else 1,
        scale_block_k=None if one_k_scale else bc,
        fmt=q.fmt,
        granularity=q.granularity,
    )


def _n_major(t: torch.Tensor) -> torch.Tensor:
    """The same ``[E, N, G]`` tensor stored with N contiguous."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def weight_spec_of(obj) -> WeightSpec:
    """A ``WeightSpec`` from a ``Scheme``, a ``WeightSpec``, a weight tensor or
    a ``QuantizedTensor`` (TypeError otherwise)."""
    if isinstance(obj, Scheme):
        return obj.weight
    if isinstance(obj, WeightSpec):
        return obj
    if isinstance(obj, (torch.Tensor, QuantizedTensor)):
        return WeightOperand.of(obj).spec
    raise TypeError(
        f"weight must be a Scheme, WeightSpec, torch.Tensor or QuantizedTensor, got {type(obj).__name__}"
    )
