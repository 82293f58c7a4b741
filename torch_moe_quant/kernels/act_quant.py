"""Activation quantization on the Triton path: what the grouped GEMM does to
its input ``a`` for a scheme's ``ActivationSpec``, the row-quantization
launcher ``quantize_rows`` (one launch) and the test launcher
``quantize_activation``, each with a plain-PyTorch twin built on ``formats``.

An ``ActQuant`` reduces a spec (plus its static scale) to kernel
constexprs: the element (``ActElement``) and how the scale is found
(``ActScale``). Where the quantization runs follows from the scale:

* the scale is local to a K tile (static per-tensor fp8/int8, nvfp4 with its
  static global scale and dynamic e4m3 block scales of 16, MX e8m0 groups of
  32, fp8 groups of 128): ``ActPlacement.PROLOGUE``: the GEMM quantizes the
  A tile in registers (no launch, no torch op). The tile must hold whole
  groups: ``BLOCK_K`` a multiple of ``group`` (``fit_config`` raises it);
* the scale spans a whole row (dynamic per-token fp8/int8):
  ``ActPlacement.ROW_KERNEL``: ``quantize_rows`` (one Triton launch) writes
  the codes and one fp32 scale per row, and the GEMM reads the codes.

Contract (bit-exact, tested): the codes, scales and quantize-dequantized
values of the device helpers (``_act_quant_kernel``) equal those of
``formats.quantize`` / ``formats.fake_quantize`` on the fp32 input
(``Arithmetic.FP32``; int8 with ``Int8ScaleRule.HALF_RANGE``), including
all-zero blocks, subnormals, ties, saturation and NaN/inf as ``formats``
defines them (a NaN code's sign bit may differ: CPUs and GPUs make NaNs of
different signs). Exceptions: int8 input with NaN/inf, which ``formats``
rejects, gives unspecified codes here (kernels cannot raise); and MX
rounding ``RCEIL`` has no device helper (``NotImplementedError``).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple, Optional, Tuple

import torch

from .. import formats
from ..formats.core import Format, PerGroup, PerRow, PerTensor, ScaleRounding, check_tensor
from ..schemes import ActivationSpec
from ..schemes import ActQuant as QuantMode
from ._enums import ActElement, ActScale
from ._operand import FLOAT_DTYPES


class ActPlacement(enum.Enum):
    """Where the pipeline quantizes a GEMM input (module docstring)."""

    PROLOGUE = "prologue"
    ROW_KERNEL = "row_kernel"


_ELEMENTS = {
    Format.FP8_E4M3: ActElement.FP8_E4M3,
    Format.INT8: ActElement.INT8,
    Format.MXFP4: ActElement.FP4_E2M1,
    Format.MXFP6_E2M3: ActElement.FP6_E2M3,
    Format.MXFP6_E3M2: ActElement.FP6_E3M2,
    Format.MXFP8: ActElement.FP8_E4M3,
    Format.NVFP4: ActElement.FP4_E2M1,
}
_MX_SCALES = {ScaleRounding.FLOOR: ActScale.MX_FLOOR, ScaleRounding.EVEN: ActScale.MX_EVEN}
#: torch dtype of the codes ``quantize_rows`` writes (what the GEMM reads)
CODE_DTYPES = {ActElement.FP8_E4M3: torch.float8_e4m3fn, ActElement.INT8: torch.int8}


@dataclasses.dataclass(frozen=True)
class ActQuant:
    """One GEMM input's quantization as the kernels see it.

    ``group``: K columns per scale for the group scales (16 / 32 / 128), 0
    when one scale covers the row or the tensor. ``static_scale``: fp32
    ``[1]`` for ``STATIC_TENSOR`` (the scale) and ``NVFP4`` (the global
    scale), else None. ``spec``: the ``ActivationSpec`` it came from.
    """

    spec: ActivationSpec
    element: ActElement
    scale: ActScale
    group: int = 0
    static_scale: Optional[torch.Tensor] = None

    @staticmethod
    def of(spec: Optional[ActivationSpec], static_scale: Optional[torch.Tensor] = None,
           name: str = "static_scale") -> Optional["ActQuant"]:
        """The ``ActQuant`` of ``spec`` (None for None); ``static_scale`` is the
        scheme's calibrated scale (``a13_scale`` / ``a2_scale``), required iff
        the spec is static. Errors name ``name``."""
        if spec is None:
            return None
        if not isinstance(spec, ActivationSpec):
            raise TypeError(f"spec must be an ActivationSpec or None, got {type(spec).__name__}")
        fmt, g = Format(spec.fmt), spec.granularity
        if fmt not in _ELEMENTS:
            raise NotImplementedError(f"activation format {fmt.value} has no Triton quantizer")
        element = _ELEMENTS[fmt]
        static = spec.mode is QuantMode.STATIC
        if static != (static_scale is not None):
            need = "needs" if static else "takes no"
            raise ValueError(f"{name}: the {spec} activation {need} a static scale, got {static_scale!r}")
        if static:
            check_tensor(name, static_scale, dtype=torch.float32)
            if static_scale.numel() != 1:
                raise ValueError(f"{name} must hold one per-tensor scale, got shape {tuple(static_scale.shape)}")
            static_scale = static_scale.reshape(1)
        if fmt is Format.NVFP4:
            if g != PerGroup(16) or not static:
                raise NotImplementedError(f"nvfp4 activations need PerGroup(16) and a static global scale, got {spec}")
            return ActQuant(spec, element, ActScale.NVFP4, 16, static_scale)
        if fmt in (Format.MXFP4, Format.MXFP6_E2M3, Format.MXFP6_E3M2, Format.MXFP8):
            rounding = ScaleRounding(spec.rounding or ScaleRounding.FLOOR)
            if rounding not in _MX_SCALES or g != PerGroup(32) or static:
                raise NotImplementedError(
                    f"MX activations: the kernels quantize dynamic PerGroup(32) with rounding floor or even, got {spec}"
                )
            return ActQuant(spec, element, _MX_SCALES[rounding], 32)
        # fp8 / int8
        if isinstance(g, PerTensor) and static:
            return ActQuant(spec, element, ActScale.STATIC_TENSOR, 0, static_scale)
        if isinstance(g, PerRow) and not static:
            return ActQuant(spec, element, ActScale.DYNAMIC_ROW)
        if isinstance(g, PerGroup) and not static and element is ActElement.FP8_E4M3 and g.size & (g.size - 1) == 0:
            return ActQuant(spec, element, ActScale.DYNAMIC_GROUP, g.size)
        raise NotImplementedError(f"activation quantization {spec} has no Triton quantizer")

    @property
    def placement(self) -> ActPlacement:
        codes = self.scale in (ActScale.DYNAMIC_ROW, ActScale.GROUP_CODES)
        return ActPlacement.ROW_KERNEL if codes else ActPlacement.PROLOGUE

    @property
    def code_dtype(self) -> torch.dtype:
        """dtype of the codes ``quantize_rows`` writes (fp8 / int8 elements only)."""
        return CODE_DTYPES[self.element]

    def as_row_codes(self) -> "ActQuant":
        """How the GEMM sees this input once ``quantize_rows`` turned it into
        codes + one fp32 scale per row (``ROW_KERNEL`` placement), whether the
        scales came from each row (dynamic) or are the static one repeated."""
        if self.scale not in (ActScale.DYNAMIC_ROW, ActScale.STATIC_TENSOR) or self.element not in CODE_DTYPES:
            raise ValueError(f"{self.spec}: only fp8 / int8 per-row or per-tensor activations become row codes")
        return dataclasses.replace(self, scale=ActScale.DYNAMIC_ROW, group=0, static_scale=None)

    def as_group_codes(self) -> "ActQuant":
        """How the GEMM sees fp8 / int8 groups (``DYNAMIC_GROUP``) once
        ``quantize_rows`` turned them into codes + fp32 scales ``[rows, K / group]``
        (``GROUP_CODES``: ``ROW_KERNEL`` placement, one scale per row and K tile)."""
        if self.scale is not ActScale.DYNAMIC_GROUP or self.element not in CODE_DTYPES:
            raise ValueError(f"{self.spec}: only fp8 / int8 dynamic group activations become group codes")
        return dataclasses.replace(self, scale=ActScale.GROUP_CODES)

    def check_k(self, k: int, name: str) -> None:
        """``k`` must be a multiple of the group (ValueError naming ``name``)."""
        if self.group and k % self.group:
            raise ValueError(f"{name}: K={k} must be a multiple of the activation group {self.group} ({self.spec})")


def _check_x(x: torch.Tensor, act: ActQuant, name: str = "x") -> None:
    check_tensor(name, x, dtype=FLOAT_DTYPES)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, K], got shape {tuple(x.shape)}")
    if not isinstance(act, ActQuant):
        raise TypeError(f"act must be an ActQuant, got {type(act).__name__}")
    act.check_k(x.shape[1], name)
    if act.static_scale is not None and act.static_scale.device != x.device:
        raise ValueError(f"act.static_scale is on {act.static_scale.device} but {name} is on {x.device}")


# ---------------------------------------------------------------- launchers


def _kernel_module():
    from . import _act_quant_kernel

    return _act_quant_kernel


class QuantizedRows(NamedTuple):
    """Output of ``quantize_activation``: ``formats``' representation of the
    quantized ``x`` (unpacked codes) and its QDQ values."""

    codes: torch.Tensor  # fp8: float8_e4m3fn; int8: int8; fp4/fp6: uint8 codes (unpacked)
    scale: torch.Tensor  # fp32 [rows, 1] / [rows, K // g] / [1, 1]; e8m0 uint8; nvfp4: float8_e4m3fn
    values: torch.Tensor  # fp32 [rows, K]: dequantize(quantize(x))


@dataclasses.dataclass(frozen=True)
class Tiles:
    """How one launch of the row kernel covers ``x [rows, K]``: programs of
    ``block_r`` rows x ``k_chunk`` columns, each looping over its columns
    ``block_k`` at a time; grid ``(ceil(rows / block_r), ceil(K / k_chunk))``."""

    block_r: int
    block_k: int
    k_chunk: int

    def grid(self, rows: int, k: int) -> Tuple[int, int]:
        return (-(-rows // self.block_r), -(-k // self.k_chunk))


#: from this many rows on, 16-row programs each looping over the whole row fill
#: the GPU (16+ programs); below, a launch of such programs ran one or a few
#: programs walking K serially: on the H200 (bench/results/h200.md, before this
#: rule) the two activation launches of an M=1 forward cost 66-548 us
#: (mixtral-8x7b's K = 14336: 363 us fp8 per-token, 548 us fp8 block128).
WIDE_ROWS = 256
#: per-row scales at few rows: programs of 2 rows x up to 1024 columns per step
_ROW_TILE = (2, 1024)


def _tile(k: int, smallest: int, widest: int) -> int:
    """``smallest`` doubled until it reaches ``min(k, widest)``."""
    b = smallest
    while b < min(k, widest):
        b *= 2
    return b


def launch_tiles(act: ActQuant, rows: int, k: int) -> Tiles:
    """The ``Tiles`` of a launch for ``act`` on ``[rows, k]``: at ``WIDE_ROWS``
    rows or more, 16-row programs over whole rows (tiles of the power of two
    >= min(k, 128), at least 16 and the activation group); below, group /
    per-tensor scales split K across programs (one tile each) and per-row
    scales, which need the whole row in one program, take 2-row programs with
    wide steps."""
    block_k = max(_tile(k, 16, 128), act.group)
    if rows >= WIDE_ROWS:
        return Tiles(16, block_k, -(-k // block_k) * block_k)
    if act.scale is ActScale.DYNAMIC_ROW:
        block_r, widest = _ROW_TILE
        wide = _tile(k, block_k, widest)
        return Tiles(block_r, wide, -(-k // wide) * wide)
    return Tiles(16, block_k, block_k)


def _launch(x: torch.Tensor, act: ActQuant, codes, scale, values) -> None:
    km = _kernel_module()
    rows, k = x.shape
    tiles = launch_tiles(act, rows, k)
    km.act_quant_kernel[tiles.grid(rows, k)](
        x, codes, scale, values, act.static_scale, rows, k, tiles.k_chunk,
        x.stride(0), x.stride(1), *(codes.stride() if codes is not None else (0, 0)),
        scale.stride(0), scale.stride(1) if scale.dim() == 2 else 0,
        values.stride(0) if values is not None else 0, values.stride(1) if values is not None else 0,
        A_ELEM=int(act.element), A_SCALE=int(act.scale), GROUP=max(act.group, 1),
        BLOCK_R=tiles.block_r, BLOCK_K=tiles.block_k,
    )


_CODE_SCALES = (ActScale.DYNAMIC_ROW, ActScale.STATIC_TENSOR, ActScale.DYNAMIC_GROUP)


def _check_row_codes(act: ActQuant) -> None:
    if act.scale not in _CODE_SCALES or act.element not in CODE_DTYPES:
        raise ValueError(
            f"act: quantize_rows is for fp8 / int8 per-row, per-group or static per-tensor activations, got {act.spec}"
        )


def quantize_rows(x: torch.Tensor, act: ActQuant) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp8 / int8 quantization of ``x [rows, K]`` (fp16/bf16/fp32) in one
    Triton launch: ``(codes [rows, K] in act.code_dtype, fp32 scales [rows])``,
    bit-exact with ``formats.quantize(x.float(), fmt, PerRow())`` (dynamic)
    or ``formats.quantize(x.float(), fmt, PerTensor(), scale=static_scale)``
    (static: every row gets the static scale); the GEMM reads the result as
    ``act.as_row_codes()``. Dynamic groups: fp32 scales ``[rows, K / group]``,
    bit-exact with ``formats.quantize(x.float(), fmt, PerGroup(group))``, read
    as ``act.as_group_codes()``."""
    _check_x(x, act)
    _check_row_codes(act)
    rows, k = x.shape
    codes = torch.empty(rows, k, dtype=act.code_dtype, device=x.device)
    if act.scale is ActScale.DYNAMIC_GROUP:
        scale = written = torch.empty(rows, k // act.group, dtype=torch.float32, device=x.device)
    elif act.scale is ActScale.STATIC_TENSOR:
        scale = act.static_scale.expand(rows).contiguous()
        written = torch.empty(1, dtype=torch.float32, device=x.device)  # not written by the kernel
    else:
        scale = written = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows and k:
        store = codes.view(torch.uint8) if act.element is ActElement.FP8_E4M3 else codes
        _launch(x, act, store, written, None)
    return codes, scale


def quantize_rows_ref(x: torch.Tensor, act: ActQuant) -> Tuple[torch.Tensor, torch.Tensor]:
    """Twin of ``quantize_rows`` on ``formats.quantize``."""
    _check_x(x, act)
    _check_row_codes(act)
    if act.scale is ActScale.STATIC_TENSOR:
        q = formats.quantize(x.float(), act.spec.fmt, PerTensor(), scale=act.static_scale.reshape(1, 1))
        return q.data, act.static_scale.expand(x.shape[0]).contiguous()
    if act.scale is ActScale.DYNAMIC_GROUP:
        q = formats.quantize(x.float(), act.spec.fmt, PerGroup(act.group))
        return q.data, q.scale.float().reshape(x.shape[0], -1)
    q = formats.quantize(x.float(), act.spec.fmt, PerRow())
    return q.data, q.scale.reshape(-1)


def quantize_activation(x: torch.Tensor, act: ActQuant) -> QuantizedRows:
    """Any ``ActQuant`` on ``x [rows, K]`` with the device helpers the GEMM
    prologue and ``quantize_rows`` use (one launch); for testing them against
    ``formats`` (``quantize_activation_ref``)."""
    _check_x(x, act)
    rows, k = x.shape
    el = act.element
    code_dtype = CODE_DTYPES.get(el, torch.uint8)
    codes = torch.empty(rows, k, dtype=code_dtype, device=x.device)
    values = torch.empty(rows, k, dtype=torch.float32, device=x.device)
    if act.scale is ActScale.STATIC_TENSOR:
        scale = act.static_scale.reshape(1, 1).clone()
    elif act.scale is ActScale.DYNAMIC_ROW:
        scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    else:
        sdt = torch.float32 if act.scale is ActScale.DYNAMIC_GROUP else torch.uint8
        scale = torch.empty(rows, k // act.group, dtype=sdt, device=x.device)
    if rows and k:
        store = codes.view(torch.uint8) if el is ActElement.FP8_E4M3 else codes
        _launch(x, act, store, scale, values)
    if act.scale is ActScale.NVFP4:
        scale = scale.view(torch.float8_e4m3fn)
    return QuantizedRows(codes, scale, values)


def quantize_activation_ref(x: torch.Tensor, act: ActQuant) -> QuantizedRows:
    """Twin of ``quantize_activation``: ``formats.quantize`` (codes unpacked)
    and ``formats.fake_quantize`` on ``x.float()``."""
    _check_x(x, act)
    spec, xf = act.spec, x.float()
    options = {}
    if spec.rounding is not None:
        options["rounding"] = spec.rounding
    if act.static_scale is not None:
        key = "global_scale" if spec.fmt is Format.NVFP4 else "scale"
        options[key] = act.static_scale.reshape(1, 1)
    q = formats.quantize(xf, spec.fmt, spec.granularity, **options)
    values = formats.dequantize(q, torch.float32)
    k = x.shape[1]
    if spec.fmt in (Format.MXFP4, Format.NVFP4):
        codes = formats.mxfp4.unpack(q.data, k)
    elif spec.fmt in (Format.MXFP6_E2M3, Format.MXFP6_E3M2):
        codes = formats.mxfp6.unpack(q.data, k)
    else:
        codes = q.data
    return QuantizedRows(codes, q.scale, values)


def qdq_rows(x: torch.Tensor, act: ActQuant, out_dtype: torch.dtype) -> torch.Tensor:
    """Quantize-dequantize ``x [rows, K]`` in one launch (the device helpers
    of ``quantize_activation``), values written in ``out_dtype``: the
    pipeline's separate QDQ pass for tile-local scales (``fused_experts.ActInput``).
    Equals ``fake_quantize_ref(x, act).to(out_dtype)`` (the fp32 values are
    bit-exact; the store rounds them to ``out_dtype``)."""
    _check_x(x, act)
    if act.scale is ActScale.DYNAMIC_ROW:
        raise ValueError(f"act: per-row activations go through quantize_rows, got {act.spec}")
    rows, k = x.shape
    values = torch.empty(rows, k, dtype=out_dtype, device=x.device)
    if rows and k:
        groups = 1 if act.scale is ActScale.STATIC_TENSOR else k // act.group
        sdt = torch.float32 if act.scale is ActScale.DYNAMIC_GROUP else torch.uint8
        scale = torch.empty(rows, groups, dtype=sdt, device=x.device)  # scratch
        _launch(x, act, None, scale, values)  # values only: no codes written
    return values


def qdq_rows_ref(x: torch.Tensor, act: ActQuant, out_dtype: torch.dtype) -> torch.Tensor:
    """Twin of ``qdq_rows`` on ``formats``."""
    return fake_quantize_ref(x, act).to(out_dtype)


def fake_quantize_ref(a: torch.Tensor, act: Optional[ActQuant]) -> torch.Tensor:
    """fp32 QDQ of ``a`` as ``reference.activation_qdq`` (identity for None)."""
    if act is None:
        return a.float()
    return quantize_activation_ref(a, act).values


__all__ = [
    "ActElement",
    "ActPlacement",
    "ActQuant",
    "ActScale",
    "QuantizedRows",
    "fake_quantize_ref",
    "qdq_rows",
    "qdq_rows_ref",
    "quantize_activation",
    "quantize_activation_ref",
    "quantize_rows",
    "quantize_rows_ref",
]
