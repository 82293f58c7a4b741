"""The scheme registry: every quantized MoE scheme of DESIGN §4 as a frozen
dataclass, looked up by a stable string name.

A scheme says how the expert weights are stored (``WeightSpec``) and what the
kernel does to activations before each GEMM (``ActivationSpec``). It carries
no tensors; ``torch_moe_quant.quantize_experts`` turns float weights into the
scheme's tensors and ``torch_moe_quant.fused_moe`` runs them.

Activation rounding of MX formats: Quark-origin schemes (mxfp4/mxfp6 with
mxfp4/mxfp6/mxfp8 activations) use ``ScaleRounding.EVEN`` for both weights and
activations, which is what AMD Quark produces and what vLLM's Quark emulation
computes. Weight-only mxfp4 (gpt-oss) quantizes its own weights with the OCP
``FLOOR`` rule; checkpoints bring their scales with them.
"""

from __future__ import annotations

import dataclasses
import enum
import types
from typing import Dict, Optional

import torch

from .formats.core import (
    Format,
    Granularity,
    Int4Packing,
    PerBlock,
    PerGroup,
    PerRow,
    PerTensor,
    ScaleRounding,
)


class ActQuant(str, enum.Enum):
    """When activation scales are computed."""

    DYNAMIC = "dynamic"  # from the activations themselves, per call
    STATIC = "static"  # calibrated once, stored with the experts (a13_scale, a2_scale)


class ZeroPoint(str, enum.Enum):
    """Integer weights: symmetric codes, or asymmetric codes with a zero point."""

    NONE = "none"
    ASYMMETRIC = "asymmetric"


class ActOrder(str, enum.Enum):
    """GPTQ act-order: weights carry a ``g_idx`` (column → group)."""

    NONE = "none"
    GROUP = "group"


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """How expert weights are stored. ``fmt=None`` means unquantized."""

    fmt: Optional[Format]
    granularity: Optional[Granularity] = None
    zero_point: ZeroPoint = ZeroPoint.NONE
    packing: Optional[Int4Packing] = None
    act_order: ActOrder = ActOrder.NONE
    rounding: Optional[ScaleRounding] = None
    #: storage dtype of unquantized weights (``fmt=None``); bf16 otherwise unused
    float_dtype: torch.dtype = torch.bfloat16

    def __str__(self) -> str:
        if self.fmt is None:
            return str(self.float_dtype).replace("torch.", "")
        extra = [
            self.zero_point.value if self.zero_point is not ZeroPoint.NONE else "",
            "act-order" if self.act_order is not ActOrder.NONE else "",
            self.packing.value if self.packing else "",
            self.rounding.value if self.rounding else "",
        ]
        return f"{self.fmt.value} {self.granularity}" + "".join(f", {t}" for t in extra if t)

    @property
    def bits(self) -> int:
        """Bits per stored weight element (scales not counted)."""
        if self.fmt is None:
            return self.float_dtype.itemsize * 8
        return {
            Format.FP8_E4M3: 8,
            Format.INT8: 8,
            Format.MXFP8: 8,
            Format.MXFP6_E2M3: 6,
            Format.MXFP6_E3M2: 6,
        }.get(self.fmt, 4)


@dataclasses.dataclass(frozen=True)
class ActivationSpec:
    """What the kernel does to an activation before a GEMM."""

    fmt: Format
    granularity: Granularity
    mode: ActQuant = ActQuant.DYNAMIC
    rounding: Optional[ScaleRounding] = None

    def __str__(self) -> str:
        rnd = f", {self.rounding.value}" if self.rounding else ""
        return f"{self.fmt.value} {self.mode.value} {self.granularity}{rnd}"


@dataclasses.dataclass(frozen=True)
class Scheme:
    """A quantized MoE scheme: weights, optional activation quantization, and
    the floating dtype the kernel computes and returns in."""

    name: str
    weight: WeightSpec
    activation: Optional[ActivationSpec] = None
    family: str = ""

    @property
    def is_quantized(self) -> bool:
        return self.weight.fmt is not None

    @property
    def static_activation(self) -> bool:
        return self.activation is not None and self.activation.mode is ActQuant.STATIC

    def __str__(self) -> str:
        return self.name


# --------------------------------------------------------------------------
# The registry.

_T, _R = PerTensor(), PerRow()
_B128 = PerBlock(128, 128)
_G = PerGroup
_MX, _NV = PerGroup(32), PerGroup(16)
_EVEN, _FLOOR = ScaleRounding.EVEN, ScaleRounding.FLOOR

_FP8_STATIC = ActivationSpec(Format.FP8_E4M3, _T, ActQuant.STATIC)
_FP8_TOKEN = ActivationSpec(Format.FP8_E4M3, _R)
_FP8_G128 = ActivationSpec(Format.FP8_E4M3, _G(128))
_INT8_STATIC = ActivationSpec(Format.INT8, _T, ActQuant.STATIC)
_INT8_TOKEN = ActivationSpec(Format.INT8, _R)


def _mx_act(fmt: Format) -> ActivationSpec:
    return ActivationSpec(fmt, _MX, ActQuant.DYNAMIC, _EVEN)


_ENTRIES = []


def _add(family, name, weight, activation=None):
    _ENTRIES.append(Scheme(name, weight, activation, family))


# unquantized
_add("bf16", "bf16", WeightSpec(None))
_add("bf16", "fp16", WeightSpec(None, float_dtype=torch.float16))
# fp32 weights as they are: what a compiled fp32 model's experts are rewritten to
_add("bf16", "fp32", WeightSpec(None, float_dtype=torch.float32))

# fp8 w8a8
_fp8 = lambda g: WeightSpec(Format.FP8_E4M3, g)  # noqa: E731
_add("fp8_w8a8", "fp8_w8a8_tensor_static", _fp8(_T), _FP8_STATIC)
_add("fp8_w8a8", "fp8_w8a8_tensor_token", _fp8(_T), _FP8_TOKEN)
_add("fp8_w8a8", "fp8_w8a8_channel_token", _fp8(_R), _FP8_TOKEN)
_add("fp8_w8a8", "fp8_w8a8_block128", _fp8(_B128), _FP8_G128)
# fp8 w8a16
_add("fp8_w8a16", "fp8_w8a16_channel", _fp8(_R))
_add("fp8_w8a16", "fp8_w8a16_block128", _fp8(_B128))

# int8
_int8 = lambda g: WeightSpec(Format.INT8, g)  # noqa: E731
_add("int8_w8a8", "int8_w8a8_tensor_static", _int8(_T), _INT8_STATIC)
_add("int8_w8a8", "int8_w8a8_channel_token", _int8(_R), _INT8_TOKEN)
_add("int8_w8a16", "int8_w8a16_channel", _int8(_R))

# int4 weight-only (canonical storage: compressed-tensors pack-quantized)
_int4 = lambda g, **kw: WeightSpec(Format.INT4, g, **kw)  # noqa: E731
_add("int4_w4a16", "int4_w4a16_g32", _int4(_G(32)))
_add("int4_w4a16", "int4_w4a16_g64", _int4(_G(64)))
_add("int4_w4a16", "int4_w4a16_g128", _int4(_G(128)))
_add("int4_w4a16", "int4_w4a16_channel", _int4(_R))
_add("int4_w4a16", "int4_w4a16_g128_zp", _int4(_G(128), zero_point=ZeroPoint.ASYMMETRIC))
_add(
    "int4_w4a16",
    "int4_w4a16_gptq_g128",
    _int4(_G(128), zero_point=ZeroPoint.ASYMMETRIC, packing=Int4Packing.GPTQ),
)
_add(
    "int4_w4a16",
    "int4_w4a16_gptq_g128_actorder",
    _int4(
        _G(128),
        zero_point=ZeroPoint.ASYMMETRIC,
        packing=Int4Packing.GPTQ,
        act_order=ActOrder.GROUP,
    ),
)
_add(
    "int4_w4a16",
    "int4_w4a16_awq_g128",
    _int4(_G(128), zero_point=ZeroPoint.ASYMMETRIC, packing=Int4Packing.AWQ),
)
# int4 with quantized activations
_add("int4_w4a8", "int4_w4a8_channel", _int4(_R), _INT8_TOKEN)
_add("int4_w4a8", "int4_w4a8_g128", _int4(_G(128)), _INT8_TOKEN)
_add("int4_w4afp8", "int4_w4afp8_g128", _int4(_G(128)), _FP8_TOKEN)

# nvfp4
_nvfp4 = WeightSpec(Format.NVFP4, _NV)
# NVFP4 activations: per-16 block scales are dynamic, the global scale is
# static (compressed-tensors' input_global_scale), so the scheme is STATIC.
_add("nvfp4", "nvfp4_w4a4", _nvfp4, ActivationSpec(Format.NVFP4, _NV, ActQuant.STATIC))
_add("nvfp4", "nvfp4_w4a16", _nvfp4)

# mxfp4
_add("mxfp4", "mxfp4_w4a16", WeightSpec(Format.MXFP4, _MX, rounding=_FLOOR))
_mxfp4_even = WeightSpec(Format.MXFP4, _MX, rounding=_EVEN)
_add("mxfp4", "mxfp4_w4a4", _mxfp4_even, _mx_act(Format.MXFP4))
_add("mxfp4", "mxfp4_w4a6_e2m3", _mxfp4_even, _mx_act(Format.MXFP6_E2M3))
_add("mxfp4", "mxfp4_w4a6_e3m2", _mxfp4_even, _mx_act(Format.MXFP6_E3M2))
_add("mxfp4", "mxfp4_w4a8_fp8", _mxfp4_even, _FP8_STATIC)
_add("mxfp4", "mxfp4_w4a8_mxfp8", _mxfp4_even, _mx_act(Format.MXFP8))

# mxfp6
_mxfp6_e2m3 = WeightSpec(Format.MXFP6_E2M3, _MX, rounding=_EVEN)
_mxfp6_e3m2 = WeightSpec(Format.MXFP6_E3M2, _MX, rounding=_EVEN)
_add("mxfp6", "mxfp6_e2m3_w6a6", _mxfp6_e2m3, _mx_act(Format.MXFP6_E2M3))
_add("mxfp6", "mxfp6_e2m3_w6a8_fp8", _mxfp6_e2m3, _FP8_STATIC)
_add("mxfp6", "mxfp6_e3m2_w6a6", _mxfp6_e3m2, _mx_act(Format.MXFP6_E3M2))
_add("mxfp6", "mxfp6_e3m2_w6a8_fp8", _mxfp6_e3m2, _FP8_STATIC)

_REGISTRY: Dict[str, Scheme] = {s.name: s for s in _ENTRIES}
assert len(_REGISTRY) == len(_ENTRIES), "duplicate scheme name"

#: Read-only mapping ``name -> Scheme`` of every registered scheme.
SCHEMES = types.MappingProxyType(_REGISTRY)


def get_scheme(scheme) -> Scheme:
    """Return the ``Scheme`` for a name or a ``Scheme`` (passed through)."""
    if isinstance(scheme, Scheme):
        return scheme
    if isinstance(scheme, str) and scheme in _REGISTRY:
        return _REGISTRY[scheme]
    raise ValueError(
        f"scheme must be a Scheme or one of torch_moe_quant.SCHEMES "
        f"({len(_REGISTRY)} names, e.g. 'fp8_w8a8_channel_token', 'mxfp4_w4a16'), "
        f"got {scheme!r}"
    )


def _rounding_matches(wanted: Optional[ScaleRounding], have: Optional[ScaleRounding]) -> bool:
    return wanted is None or wanted is have


def _weight_matches(wanted: WeightSpec, have: WeightSpec) -> bool:
    if wanted.fmt is None or have.fmt is None:
        return wanted.fmt is have.fmt and wanted.float_dtype == have.float_dtype
    return (
        wanted.fmt is have.fmt
        and wanted.granularity == have.granularity
        and wanted.zero_point is have.zero_point
        and wanted.act_order is have.act_order
        and (wanted.packing is None or wanted.packing is have.packing)
        and _rounding_matches(wanted.rounding, have.rounding)
    )


def _activation_matches(wanted: Optional[ActivationSpec], have: Optional[ActivationSpec]) -> bool:
    if wanted is None or have is None:
        return wanted is None and have is None
    return (
        wanted.fmt is have.fmt
        and wanted.granularity == have.granularity
        and wanted.mode is have.mode
        and _rounding_matches(wanted.rounding, have.rounding)
    )


def find(weight: WeightSpec, activation: Optional[ActivationSpec] = None) -> Optional[Scheme]:
    """The registered scheme that stores ``weight`` and quantizes activations
    as ``activation`` (``None``: weight-only), or ``None`` when no scheme does.

    The one place a scheme is chosen from formats (loaders, lowerings).
    Compared: the weight's format and, when unquantized, its ``float_dtype``;
    else its granularity, zero point and act-order; the activation's format,
    granularity and mode. ``rounding`` (weight or activation) and the weight's
    ``packing`` are compared only when given: a checkpoint's int4 packing is
    converted when it is loaded, so among schemes that differ only in that
    label the one without it wins (zero-point int4 g128 ->
    ``int4_w4a16_g128_zp``, not the GPTQ or AWQ one). Passing a scheme's own
    ``weight`` and ``activation`` returns that scheme (tested for all).
    """
    found = [
        s
        for s in _ENTRIES
        if _weight_matches(weight, s.weight) and _activation_matches(activation, s.activation)
    ]
    found.sort(key=lambda s: s.weight.packing is not None)
    return found[0] if found else None
