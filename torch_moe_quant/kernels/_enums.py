"""Integer enums and constants shared by the launchers and their Triton
kernels: the values a launcher passes as ``tl.constexpr`` and the kernel
compares against.

A kernel module (``_act_quant_kernel``, ``_route_kernel``, ``_gemm_kernel``)
imports them from here and never its launcher (``act_quant``, ``route``,
``moe_gemm``), which imports the kernel module: so neither waits on the
other. This module imports neither Triton nor a launcher.
"""

from __future__ import annotations

import enum
from typing import Optional

from ..activations import Activation

# ---------------------------------------------------------------- act_quant


class ActElement(enum.IntEnum):
    """Element of the quantized activation (kernel constexpr ``A_ELEM``)."""

    FP8_E4M3 = 1
    INT8 = 2
    FP4_E2M1 = 3
    FP6_E2M3 = 4
    FP6_E3M2 = 5


class ActScale(enum.IntEnum):
    """How the activation scale is found (kernel constexpr ``A_SCALE``)."""

    NONE = 0  # no activation quantization
    STATIC_TENSOR = 1  # one calibrated fp32 scale: x / scale
    DYNAMIC_ROW = 2  # fp32 amax / qmax per row (whole K); the GEMM reads codes + row scales
    DYNAMIC_GROUP = 3  # fp32 amax / qmax per group along K
    MX_FLOOR = 4  # e8m0 shared exponent per 32, OCP floor rule
    MX_EVEN = 5  # e8m0 shared exponent per 32, AMD Quark "even" rule
    NVFP4 = 6  # e4m3 block scale per 16 x static fp32 global scale
    GROUP_CODES = 7  # DYNAMIC_GROUP already applied by quantize_rows: the GEMM reads codes + [rows, K/g] scales


# ---------------------------------------------------------------- route

#: experts are encoded as ``IDX_LIMIT - index`` in the low word of the order key
IDX_LIMIT = 0xFFFF


class RouteScore(enum.IntEnum):
    """What the routing kernel ranks (computed in fp32; constexpr ``SCORE``)."""

    LOGIT = 0
    SOFTMAX = 1  # over all experts
    SIGMOID = 2  # plus the correction bias when given (DeepSeek-V3)


class RouteWeight(enum.IntEnum):
    """The weight of a selected expert, from its selected score ``v``
    (constexpr ``WEIGHT``)."""

    SCORE = 0  # v
    RENORMALIZED = 1  # v / sum(v)
    SOFTMAX = 2  # softmax over the k selected v
    SIGMOID = 3  # sigmoid(v)
    UNBIASED_RENORMALIZED = 4  # s = sigmoid(logit), s / (sum(s) + 1e-20)


# ---------------------------------------------------------------- moe_gemm


class ARows(enum.IntEnum):
    """What a row of the GEMM input ``a`` is (kernel constexpr ``A_ROWS``)."""

    TOKENS = 0  # a[token]; pair p reads row p // top_k (first GEMM)
    PAIRS = 1  # a[pair]; pair p reads row p (second GEMM)


class EpilogueAct(enum.IntEnum):
    """The activation applied in the epilogue (kernel constexpr ``ACT``)."""

    NONE = 0
    SILU = 1
    GELU = 2
    GELU_TANH = 3
    SWIGLUOAI = 4
    SWIGLUSTEP = 5
    RELU2 = 6
    SILU_NO_MUL = 7
    GELU_NO_MUL = 8

    @staticmethod
    def of(activation: Optional[Activation]) -> "EpilogueAct":
        return EpilogueAct.NONE if activation is None else EpilogueAct[Activation(activation).name]


class DotKind(enum.IntEnum):
    """Operands of the kernel's ``tl.dot`` (kernel constexpr ``DOT``)."""

    COMPUTE = 0  # both dequantized to the compute dtype (fallback; every format)
    FP8 = 1  # e4m3 activation codes x e4m3 (or int4) weight codes, fp32 accumulation (sm89+)
    INT8 = 2  # int8 activation codes x int8 (or int4) weight codes, int32 per K tile


__all__ = [
    "IDX_LIMIT",
    "ARows",
    "ActElement",
    "ActScale",
    "DotKind",
    "EpilogueAct",
    "RouteScore",
    "RouteWeight",
]
