"""``moe_quant::quantize_<fmt>`` / ``moe_quant::dequantize_<fmt>`` for the
activation formats the kernels use (fp8, int8, mxfp4, mxfp6 e2m3/e3m2,
mxfp8, nvfp4). Kernels = ``formats`` references; fakes = ``formats.layout``.

Schemas (``x`` is ``[..., rows, K]``; scales as in ``formats.core``)::

    quantize_fp8(Tensor x, str granularity="token", int group_size=128, Tensor? scale=None) -> (Tensor, Tensor)
    quantize_int8(Tensor x, str granularity="token", Tensor? scale=None) -> (Tensor, Tensor)
    quantize_mxfp4(Tensor x, str rounding="floor") -> (Tensor, Tensor)     # also mxfp6_e2m3, mxfp6_e3m2, mxfp8
    quantize_nvfp4(Tensor x, Tensor? global_scale=None) -> (Tensor, Tensor, Tensor)
    dequantize_<fmt>(Tensor data, Tensor scale[, Tensor global_scale], ScalarType dtype=float32) -> Tensor

``granularity`` is ``"tensor"``, ``"token"`` or ``"group"`` (fp8: groups of
``group_size`` along K). Dequantize infers the block from the scale's shape.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Tuple

import torch

from .. import formats
from ..fake_impls.shapes import dequantize_shape, quantize_shapes
from ..formats.core import (
    Format,
    PerGroup,
    PerRow,
    PerTensor,
    QuantizedTensor,
    ScaleRounding,
    check_tensor,
)
from ..formats.layout import TRAITS


def _granularity(name: str, group_size: int = 128):
    table = {"tensor": PerTensor(), "token": PerRow(), "group": PerGroup(group_size)}
    if name not in table:
        raise ValueError(f"granularity must be one of {sorted(table)}, got {name!r}")
    return table[name]


def _rounding(name: str) -> ScaleRounding:
    try:
        return ScaleRounding(name)
    except ValueError:
        raise ValueError(
            f"rounding must be one of {[r.value for r in ScaleRounding]}, got {name!r}"
        ) from None


@dataclasses.dataclass(frozen=True)
class QuantOpSpec:
    """One activation format's pair of ops."""

    fmt: Format
    quant_schema: str
    #: op args (after x) -> (granularity, formats.quantize keyword options)
    parse: Callable

    @property
    def name(self) -> str:
        return self.fmt.value.replace("fp8_e4m3", "fp8")

    @property
    def outputs(self) -> Tuple[str, ...]:
        return ("data", "scale", "global_scale") if TRAITS[self.fmt].has_global_scale else ("data", "scale")


def _fp8(granularity="token", group_size=128, scale=None):
    return _granularity(granularity, group_size), ({} if scale is None else {"scale": scale})


def _int8(granularity="token", scale=None):
    return _granularity(granularity), ({} if scale is None else {"scale": scale})


def _mx(rounding="floor"):
    return PerGroup(32), {"rounding": _rounding(rounding)}


def _nv(global_scale=None):
    return PerGroup(16), ({} if global_scale is None else {"global_scale": global_scale})


_MX_SCHEMA = '(Tensor x, str rounding="floor") -> (Tensor, Tensor)'
SPECS = (
    QuantOpSpec(
        Format.FP8_E4M3,
        '(Tensor x, str granularity="token", int group_size=128, Tensor? scale=None) -> (Tensor, Tensor)',
        _fp8,
    ),
    QuantOpSpec(
        Format.INT8,
        '(Tensor x, str granularity="token", Tensor? scale=None) -> (Tensor, Tensor)',
        _int8,
    ),
    QuantOpSpec(Format.MXFP4, _MX_SCHEMA, _mx),
    QuantOpSpec(Format.MXFP6_E2M3, _MX_SCHEMA, _mx),
    QuantOpSpec(Format.MXFP6_E3M2, _MX_SCHEMA, _mx),
    QuantOpSpec(Format.MXFP8, _MX_SCHEMA, _mx),
    QuantOpSpec(
        Format.NVFP4,
        "(Tensor x, Tensor? global_scale=None) -> (Tensor, Tensor, Tensor)",
        _nv,
    ),
)


def _check_x(x: torch.Tensor) -> None:
    check_tensor("x", x, dtype=(torch.float32, torch.bfloat16, torch.float16))
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims [..., rows, K], got {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"x must have K >= 1 (its last dim), got shape {tuple(x.shape)}")


def _make_quantize(spec: QuantOpSpec):
    def quantize(x, *args, **kwargs):
        _check_x(x)
        g, options = spec.parse(*args, **kwargs)
        q = formats.quantize(x, spec.fmt, g, **options)
        out = tuple(getattr(q, f) for f in spec.outputs)
        # a static scale comes back (maybe as a view) as an output scale, and
        # op outputs may not alias inputs: copy the small scale tensors then
        if options.get("scale", options.get("global_scale")) is not None:
            out = out[:1] + tuple(t.clone() for t in out[1:])
        return out

    def fake(x, *args, **kwargs):
        _check_x(x)
        g, _ = spec.parse(*args, **kwargs)
        formats.layout.check_supported(spec.fmt, g, x.shape[-1], "x")
        fields = quantize_shapes(spec.fmt, x.shape, g)
        return tuple(x.new_empty(fields[f].shape, dtype=fields[f].dtypes[0]) for f in spec.outputs)

    return quantize, fake


def _infer_granularity(fmt: Format, shape, scale: torch.Tensor):
    """The granularity whose scale shape ``scale`` has (exact-divisible blocks)."""
    rows, cols = shape[-2], shape[-1]
    sr, sc = scale.shape[-2], scale.shape[-1]
    if TRAITS[fmt].fixed_group is not None:
        return PerGroup(TRAITS[fmt].fixed_group)
    if (sr, sc) == (1, 1) and rows != 1:
        return PerTensor()
    if sc == 1:
        return PerRow()
    if sr != rows or cols % sc:
        raise ValueError(
            f"scale shape {tuple(scale.shape)} matches no tensor/token/group granularity of "
            f"data with logical shape {tuple(shape)}"
        )
    return PerGroup(cols // sc)


def _make_dequantize(spec: QuantOpSpec):
    n = len(spec.outputs)

    def build(args, kwargs) -> Tuple[QuantizedTensor, torch.dtype]:
        tensors = args[:n]
        dtype = args[n] if len(args) > n else kwargs.get("dtype", torch.float32)
        fields = dict(zip(spec.outputs, tensors))
        check_tensor("data", fields["data"])
        check_tensor("scale", fields["scale"])
        if fields["data"].dim() < 2:
            raise ValueError(f"data must have at least 2 dims, got {tuple(fields['data'].shape)}")
        shape = dequantize_shape(spec.fmt, fields["data"].shape)
        g = _infer_granularity(spec.fmt, shape, fields["scale"])
        q = QuantizedTensor(fmt=spec.fmt, granularity=g, shape=tuple(shape), **fields)
        formats.layout.validate(q, "dequantize")
        return q, dtype

    def dequantize(*args, **kwargs):
        q, dtype = build(args, kwargs)
        return formats.dequantize(q, dtype)

    def fake(*args, **kwargs):
        q, dtype = build(args, kwargs)
        return q.data.new_empty(q.shape, dtype=dtype)

    tensor_args = ", ".join(f"Tensor {f}" for f in spec.outputs)
    schema = f"({tensor_args}, ScalarType dtype=float32) -> Tensor"
    return schema, dequantize, fake


#: format -> (quantize op, dequantize op)
QUANT_OPS: Dict[Format, tuple] = {}

for _spec in SPECS:
    _q, _qfake = _make_quantize(_spec)
    _qop = torch.library.custom_op(
        f"moe_quant::quantize_{_spec.name}", _q, mutates_args=(), schema=_spec.quant_schema
    )
    _qop.register_fake(_qfake)
    _dschema, _d, _dfake = _make_dequantize(_spec)
    _dop = torch.library.custom_op(
        f"moe_quant::dequantize_{_spec.name}", _d, mutates_args=(), schema=_dschema
    )
    _dop.register_fake(_dfake)
    QUANT_OPS[_spec.fmt] = (_qop, _dop)
