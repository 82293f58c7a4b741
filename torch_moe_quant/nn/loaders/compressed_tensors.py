"""Load one MoE layer's experts from a compressed-tensors (llm-compressor)
checkpoint, without re-quantizing.

Conventions, read from compressed-tensors 0.20 (``compressors/``,
``quantization/``) and checked against its own compressors in
``tests/test_loaders.py``:

* Every expert projection is a ``Linear`` module
  ``{prefix}.{e}.{gate|up|down}`` whose tensors are ``{module}.{param}``;
  ``weight`` is ``[N, K]`` = ``[out_features, in_features]``.
* Which ``config_groups`` scheme applies to a module: not in ``ignore``
  (exact name, ``re:`` regex with ``re.match``, or class name), then the
  first matching target among exact names, then ``re:`` regexes (sorted),
  then class names (``match_targets`` / ``_scheme_from_targets``); a later
  group with the same target string replaces an earlier one.
* ``format`` (the group's, else the config's): ``float-quantized`` /
  ``int-quantized`` / ``naive-quantized`` (``NaiveQuantizationCompressor``):
  ``weight`` fp8 e4m3fn or int8 (also int4 values in int8), ``weight_scale``
  in the model dtype, shape ``(1,)`` per tensor, ``[N, 1]`` per channel,
  ``[N, K/g]`` per group, ``[ceil(N/bh), ceil(K/bw)]`` per block;
  ``weight_zero_point`` only when asymmetric (``_remove_symmetric_zp``);
  ``input_scale`` ``(1,)`` for static per-tensor activations.
* ``pack-quantized`` (``PackedQuantizationCompressor``, ``pack_to_int32``):
  ``weight_packed`` int32 ``[N, ceil(K * bits / 32)]`` (dense: element ``i``
  at bit ``i * bits``, stored as ``code + 2**(bits-1)``), ``weight_scale``
  ``[N, G]``, ``weight_shape`` int64 ``[2]``, ``weight_zero_point`` int32
  ``[ceil(N/8), G]`` packed along N (asymmetric only), and ``weight_g_idx``
  int32 ``[K]`` in checkpoints written before act-order "group" was removed
  (compressed-tensors 0.20 no longer writes it; all ``-1`` means unused).
  Dequantize ``(code - zp) * scale``.
* ``nvfp4-pack-quantized`` (``NVFP4PackedCompressor``): ``weight_packed``
  uint8 ``[N, K/2]`` (element ``2i`` in the low nibble), ``weight_scale``
  float8_e4m3fn ``[N, K/16]``, ``weight_global_scale`` fp32 ``(1,)``,
  ``input_global_scale`` fp32 ``(1,)`` for W4A4; dequantize
  ``value * (scale / global_scale)``.
* ``mxfp4-pack-quantized`` (``MXFP4PackedCompressor``, weight-only):
  ``weight_packed`` uint8 ``[N, K/2]``, ``weight_scale`` uint8 e8m0 ``[N, K/32]``.

Choices where a checkpoint holds more scales than a ``QuantizedExperts``:

* Per-tensor weight scales of gate and up (fp8/int8) and nvfp4 weight global
  scales: see ``PerTensorScales`` (default: must be equal, else ValueError;
  fp8/int8 may opt into exact per-row scales). vLLM instead re-quantizes with
  the max (fp8) or uses the gate's global scale (nvfp4); we do neither.
* Static activation scales (``input_scale``, ``input_global_scale``), one per
  expert and projection: see ``InputScales`` (default: the widest, as vLLM).
* Zero points: int8 must be symmetric (an all-zero zero point is dropped,
  ``formats.int8.reject_zero_point``); int4 zero points are kept. A
  symmetric int4 act-order checkpoint is loaded into the asymmetric act-order
  scheme with all-zero zero points (exact), the only act-order scheme.
* An all-``-1`` or trivial (``k // g``) ``weight_g_idx`` is dropped.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from ...activations import GateUpLayout
from ...experts import QuantizedExperts, quantize_experts
from ...formats import int4 as _int4
from ...formats.core import (
    Format,
    Granularity,
    PerBlock,
    PerGroup,
    PerRow,
    PerTensor,
    QuantizedTensor,
)
from ...formats.int4_packing import from_pack_quantized
from ...formats.layout import check_quantized_values
from ...schemes import ActivationSpec, ActOrder, ActQuant, Scheme, ZeroPoint
from ._experts import (
    GATE_UP_DOWN,
    ExpertNames,
    InputScales,
    PerTensorScales,
    concat_rows,
    expand_to_rows,
    find_experts,
    find_scheme,
    reduce_input_scales,
)
from ._safetensors import CheckpointReader, Source, open_source, read_quantization_config

FAMILY = "compressed-tensors"
_FLOAT_SCALE = (torch.bfloat16, torch.float16, torch.float32)

NAIVE_FORMATS = ("naive-quantized", "int-quantized", "float-quantized")
SUPPORTED_FORMATS = NAIVE_FORMATS + ("pack-quantized", "nvfp4-pack-quantized", "mxfp4-pack-quantized")


# --------------------------------------------------------------------------
# The config


@dataclasses.dataclass(frozen=True)
class QuantArgs:
    """The fields of a compressed-tensors ``QuantizationArgs`` dict that
    decide the storage (strategy inferred as compressed-tensors does)."""

    num_bits: int
    type: str  # "int" | "float"
    symmetric: bool
    strategy: str  # tensor | channel | group | block | token | tensor_group
    group_size: Optional[int]
    block_structure: Optional[Tuple[int, int]]
    dynamic: object  # True | False | "local"
    actorder: Optional[str]

    @classmethod
    def parse(cls, d: Mapping, where: str, reader: CheckpointReader) -> "QuantArgs":
        if not isinstance(d, Mapping):
            raise reader.error(f"{where} must be a dict, got {type(d).__name__}")

        def integer(field: str, value):
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise reader.error(f"{where}.{field} must be an int, got {value!r}")
            try:
                return int(value)
            except ValueError:
                raise reader.error(f"{where}.{field} must be an int, got {value!r}") from None

        group_size = d.get("group_size")
        group_size = None if group_size is None else integer("group_size", group_size)
        strategy = d.get("strategy")
        if strategy is None:
            strategy = "tensor" if group_size is None else ("channel" if group_size == -1 else "group")
        block = d.get("block_structure")
        if isinstance(block, str):
            block = block.split("x")
        if block is not None:
            if not isinstance(block, (list, tuple)) or len(block) != 2:
                raise reader.error(f"{where}.block_structure must be [rows, cols] or 'RxC', got {d.get('block_structure')!r}")
            block = [integer("block_structure", v) for v in block]
        dynamic = d.get("dynamic", False)
        if isinstance(dynamic, str):
            dynamic = dynamic.lower()
        actorder = d.get("actorder")
        if actorder is True:
            actorder = "group"
        return cls(
            num_bits=integer("num_bits", d.get("num_bits", 8)),
            type=str(d.get("type", "int")).lower(),
            symmetric=bool(d.get("symmetric", True)),
            strategy=str(strategy).lower(),
            group_size=None if group_size is None else int(group_size),
            block_structure=None if block is None else (int(block[0]), int(block[1])),
            dynamic=dynamic,
            actorder=None if actorder in (None, False) else str(actorder).lower(),
        )

    def __str__(self) -> str:
        extra = f" {self.group_size}" if self.strategy in ("group", "tensor_group") else ""
        extra += f" {self.block_structure}" if self.block_structure else ""
        dyn = {True: "dynamic", False: "static"}.get(self.dynamic, str(self.dynamic))
        return f"{self.type}{self.num_bits} {self.strategy}{extra} {dyn}{'' if self.symmetric else ' asymmetric'}"


@dataclasses.dataclass(frozen=True)
class GroupScheme:
    """The config group that applies to one module."""

    group: str
    weights: QuantArgs
    inputs: Optional[QuantArgs]
    format: str


def _match_name(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def resolve_scheme(
    config: Mapping, module: str, classes: Sequence[str], reader: CheckpointReader
) -> Optional[GroupScheme]:
    """The ``config_groups`` scheme compressed-tensors applies to ``module``
    (of class names ``classes``), or None when it is ignored or untargeted."""
    ignore = config.get("ignore") or []
    if any(_match_name(module, ign) or ign in classes for ign in ignore):
        return None
    groups = config.get("config_groups") or {}
    if not isinstance(groups, Mapping) or not groups:
        raise reader.error("quantization_config has no config_groups")
    target_to_group: "collections.OrderedDict[str, str]" = collections.OrderedDict()
    for gname, scheme in groups.items():
        if not isinstance(scheme, Mapping):
            raise reader.error(
                f"config_groups[{gname!r}] is a preset reference ({scheme!r}); expand it to a "
                "scheme dict (weights / input_activations) first"
            )
        for target in scheme.get("targets") or []:
            target_to_group[target] = gname
    ordered = sorted(target_to_group, key=lambda t: ("re:" in t, t))
    matched = [t for t in ordered if _match_name(module, t)]
    matched += [t for t in ordered if t in classes and t not in matched]
    if not matched:
        return None
    gname = target_to_group[matched[0]]
    scheme = groups[gname]
    if scheme.get("weights") is None:
        raise reader.error(f"config_groups[{gname!r}] quantizes no weights (module {module})")
    weights = QuantArgs.parse(scheme["weights"], f"config_groups[{gname!r}].weights", reader)
    inputs = scheme.get("input_activations")
    inputs = None if inputs is None else QuantArgs.parse(inputs, f"config_groups[{gname!r}].input_activations", reader)
    if scheme.get("output_activations") is not None:
        raise reader.error(f"config_groups[{gname!r}] quantizes output activations: not supported")
    fmt = scheme.get("format") or config.get("format")
    if fmt in (None, "mixed-precision"):
        fmt = _infer_format(weights, inputs)
    return GroupScheme(gname, weights, inputs, str(fmt))


def _infer_format(w: QuantArgs, inputs: Optional[QuantArgs]) -> str:
    """compressed-tensors' ``infer_module_format`` priority, for Linear modules."""
    if w.type == "float" and w.num_bits == 4:
        return "mxfp4-pack-quantized" if w.group_size == 32 else "nvfp4-pack-quantized"
    if w.type == "int":
        if inputs is not None:
            return "int-quantized"
        return "pack-quantized"
    return "float-quantized" if inputs is not None else "naive-quantized"


# --------------------------------------------------------------------------
# Config -> our types


def _weight_granularity(w: QuantArgs, reader: CheckpointReader) -> Granularity:
    if w.strategy == "tensor":
        return PerTensor()
    if w.strategy == "channel":
        return PerRow()
    if w.strategy in ("group", "tensor_group"):
        if not w.group_size or w.group_size <= 0:
            raise reader.error(f"weights strategy {w.strategy} needs a positive group_size")
        return PerGroup(w.group_size)
    if w.strategy == "block":
        if w.block_structure is None:
            raise reader.error("weights strategy block needs block_structure")
        return PerBlock(*w.block_structure)
    raise reader.error(f"weights strategy {w.strategy!r} is not supported")


def _weight_format(s: GroupScheme, reader: CheckpointReader) -> Format:
    w = s.weights
    table = {
        ("float", 8): Format.FP8_E4M3,
        ("int", 8): Format.INT8,
        ("int", 4): Format.INT4,
    }
    if s.format == "nvfp4-pack-quantized":
        if (w.type, w.num_bits, w.strategy, w.group_size) != ("float", 4, "tensor_group", 16):
            raise reader.error(f"nvfp4-pack-quantized needs float4 tensor_group 16 weights, got {w}")
        return Format.NVFP4
    if s.format == "mxfp4-pack-quantized":
        if (w.type, w.num_bits, w.strategy, w.group_size) != ("float", 4, "group", 32):
            raise reader.error(f"mxfp4-pack-quantized needs float4 group 32 weights, got {w}")
        return Format.MXFP4
    fmt = table.get((w.type, w.num_bits))
    if fmt is None or (s.format == "pack-quantized" and w.type != "int"):
        raise reader.error(f"weights {w} in format {s.format!r} are not supported")
    if fmt is Format.FP8_E4M3 and s.format not in ("float-quantized", "naive-quantized"):
        raise reader.error(f"fp8 weights in format {s.format!r} are not supported")
    return fmt


def _activation_spec(a: Optional[QuantArgs], reader: CheckpointReader) -> Optional[ActivationSpec]:
    if a is None:
        return None
    if not a.symmetric:
        raise reader.error(f"asymmetric input activations ({a}) are not supported")
    key = (a.type, a.num_bits, a.strategy, a.dynamic)
    if key == ("float", 8, "tensor", False):
        return ActivationSpec(Format.FP8_E4M3, PerTensor(), ActQuant.STATIC)
    if key == ("float", 8, "token", True):
        return ActivationSpec(Format.FP8_E4M3, PerRow(), ActQuant.DYNAMIC)
    if key == ("float", 8, "group", True):
        return ActivationSpec(Format.FP8_E4M3, PerGroup(a.group_size), ActQuant.DYNAMIC)
    if key == ("int", 8, "tensor", False):
        return ActivationSpec(Format.INT8, PerTensor(), ActQuant.STATIC)
    if key == ("int", 8, "token", True):
        return ActivationSpec(Format.INT8, PerRow(), ActQuant.DYNAMIC)
    if key == ("float", 4, "tensor_group", "local") and a.group_size == 16:
        # per-16 block scales dynamic, global scale static (input_global_scale)
        return ActivationSpec(Format.NVFP4, PerGroup(16), ActQuant.STATIC)
    raise reader.error(f"input activations {a} are not supported")


# --------------------------------------------------------------------------
# Reading one projection of every expert


@dataclasses.dataclass(frozen=True)
class _Projection:
    """One projection (gate, up or down) across the experts being loaded."""

    modules: Tuple[str, ...]  # one module name per expert
    template: str  # module name with "{e}" for messages
    role: str  # "gate", "up", "down"


def _stack(reader: CheckpointReader, proj: _Projection, param: str, **check) -> torch.Tensor:
    return torch.stack([reader.get(f"{m}.{param}", **check) for m in proj.modules])


def _stack_optional(reader: CheckpointReader, proj: _Projection, param: str, **check) -> Optional[torch.Tensor]:
    present = [reader.has(f"{m}.{param}") for m in proj.modules]
    if not any(present):
        return None
    if not all(present):
        missing = proj.modules[present.index(False)]
        raise reader.error(f"missing tensor '{missing}.{param}' (other experts have {param})")
    return _stack(reader, proj, param, **check)


def _scale_shape(g: Granularity, n: int, k: int) -> Tuple[int, ...]:
    if isinstance(g, PerTensor):
        return (1,)
    return tuple(g.scale_shape(n, k))


def _logical_shape(reader: CheckpointReader, s: GroupScheme, fmt: Format, first: str) -> Tuple[int, int]:
    """``(N, K)`` of the weight of module ``first``."""
    if s.format in NAIVE_FORMATS:
        w = reader.get(f"{first}.weight")
        if w.dim() != 2:
            raise reader.error(f"tensor '{first}.weight' must be 2-D [N, K], got shape {tuple(w.shape)}")
        return tuple(w.shape)
    if s.format == "pack-quantized":
        shape = reader.get_optional(f"{first}.weight_shape")
        if shape is not None:
            if shape.is_floating_point() or shape.numel() != 2:
                raise reader.error(
                    f"tensor '{first}.weight_shape' must hold the 2 ints [N, K], got "
                    f"{shape.dtype} {tuple(shape.shape)}"
                )
            return tuple(int(v) for v in shape.reshape(-1).tolist())
        packed = reader.get(f"{first}.weight_packed", dtype=torch.int32)
        return (packed.shape[0], packed.shape[1] * 32 // s.weights.num_bits)
    packed = reader.get(f"{first}.weight_packed", dtype=torch.uint8)
    if packed.dim() != 2:
        raise reader.error(f"tensor '{first}.weight_packed' must be 2-D, got shape {tuple(packed.shape)}")
    return (packed.shape[0], packed.shape[1] * 2)


def _require_zero_points(reader: CheckpointReader, proj: _Projection, w: "QuantArgs", zp) -> None:
    """An asymmetric config (``symmetric: false``) must come with zero points:
    reading none as 0 would shift every weight by ``zero_point * scale``."""
    if not w.symmetric and zp is None:
        raise reader.error(
            f"missing tensor '{proj.modules[0]}.weight_zero_point': the weights are asymmetric "
            f"({w}) and their zero points are not in the checkpoint"
        )


_CHECKPOINT_FIELD = {
    "scale": "weight_scale",
    "global_scale": "weight_global_scale",
    "zero_point": "weight_zero_point",
    "g_idx": "weight_g_idx",
}


def check_projection_values(reader: CheckpointReader, proj: "_Projection", q: QuantizedTensor) -> None:
    """Every scale of one projection read from the checkpoint decodes to a
    finite weight of the right sign (``formats.layout.check_quantized_values``);
    the error names the first offending checkpoint key."""
    try:
        check_quantized_values(q, proj.template)
    except ValueError:
        pass
    else:
        return
    for i, m in enumerate(proj.modules):  # find the expert to name its key
        one = dataclasses.replace(
            q, shape=tuple(q.shape[1:]), **{f: t[i] for f, t in q.tensors.items()}
        )
        try:
            check_quantized_values(one, m, key=lambda field, m=m: f"tensor '{m}.{_CHECKPOINT_FIELD[field]}'")
        except ValueError as e:
            raise reader.error(str(e)) from None
    check_quantized_values(q, proj.template)  # not per expert (cannot happen): raise as is


def _check_zero_points_zero(reader: CheckpointReader, proj: _Projection, zp: Optional[torch.Tensor]) -> None:
    """A zero point that is all zero is dropped (exact); any other is rejected
    (symmetric formats; int8 is symmetric only, ``formats.int8.reject_zero_point``)."""
    if zp is not None and bool((zp.float() != 0).any()):
        raise reader.error(
            f"'{proj.template}.weight_zero_point' has nonzero entries: asymmetric "
            f"{'int8' if zp.dtype == torch.int8 else ''} weights are not supported here (symmetric only)"
        )


def _read_naive(reader, proj, s, fmt, gran, n, k) -> QuantizedTensor:
    w = s.weights
    data_dtype = torch.float8_e4m3fn if fmt is Format.FP8_E4M3 else torch.int8
    data = _stack(reader, proj, "weight", dtype=data_dtype, shape=(n, k), what=f"{w} weight [N, K]")
    sshape = _scale_shape(gran, n, k)
    scale = _stack(reader, proj, "weight_scale", dtype=_FLOAT_SCALE, shape=sshape, what=f"one scale per {gran}")
    scale = scale.reshape(len(proj.modules), *gran.scale_shape(n, k))
    zp = _stack_optional(reader, proj, "weight_zero_point", shape=sshape, what="one zero point per scale")
    _require_zero_points(reader, proj, w, zp)
    if fmt is Format.INT4:
        if zp is not None and (w.symmetric or zp.is_floating_point()):
            _check_zero_points_zero(reader, proj, zp)
            zp = None
        if zp is not None:
            zp = zp.reshape(scale.shape).to(torch.int8)
        codes = data.to(torch.int8)
        if bool(((codes < _int4.INT4_MIN) | (codes > _int4.INT4_MAX)).any()):
            raise reader.error(f"'{proj.template}.weight' holds values outside the int4 range [-8, 7]")
        return QuantizedTensor(
            data=_int4.pack_int4(codes), scale=scale, fmt=fmt, granularity=gran,
            shape=(len(proj.modules), n, k), zero_point=zp,
        )
    _check_zero_points_zero(reader, proj, zp)
    return QuantizedTensor(data=data, scale=scale.float(), fmt=fmt, granularity=gran, shape=(len(proj.modules), n, k))


def _unpack_int8_words(packed: torch.Tensor, k: int) -> torch.Tensor:
    """compressed-tensors 8-bit ``pack_to_int32``: element ``4w + j`` in bits
    ``8j..8j+7`` of word ``w``, stored as ``code + 128``."""
    shifts = torch.arange(0, 32, 8, dtype=torch.int32)
    u = (packed.unsqueeze(-1) >> shifts) & 0xFF
    return (u.flatten(-2)[..., :k] - 128).to(torch.int8)


def _read_pack_quantized(reader, proj, s, fmt, gran, n, k) -> QuantizedTensor:
    w = s.weights
    E = len(proj.modules)
    words = -(-k * w.num_bits // 32)
    groups = gran.scale_shape(n, k)[1]
    packed = _stack(reader, proj, "weight_packed", dtype=torch.int32, shape=(n, words), what=f"{w} codes packed into int32")
    for m in proj.modules:
        shape = reader.get_optional(f"{m}.weight_shape")
        if shape is not None and tuple(int(v) for v in shape.reshape(-1).tolist()) != (n, k):
            raise reader.error(f"tensor '{m}.weight_shape' is {shape.tolist()}, expected [{n}, {k}] like {proj.modules[0]}")
    scale = _stack(reader, proj, "weight_scale", dtype=_FLOAT_SCALE, shape=(n, groups), what=f"one scale per {gran}")
    if fmt is Format.INT8:
        zp = _stack_optional(reader, proj, "weight_zero_point", what="zero point")
        _require_zero_points(reader, proj, w, zp)
        _check_zero_points_zero(reader, proj, zp)
        if not isinstance(gran, (PerRow, PerTensor)):
            raise reader.error(f"int8 weights per {gran} are not supported (per channel or tensor only)")
        return QuantizedTensor(
            data=_unpack_int8_words(packed, k), scale=scale.float(), fmt=fmt, granularity=gran, shape=(E, n, k)
        )
    if k % 8:
        raise reader.error(f"{proj.template}: K={k} must be a multiple of 8 for int4 weights")
    zp = _stack_optional(
        reader, proj, "weight_zero_point", dtype=torch.int32, shape=(-(-n // 8), groups),
        what="int4 zero points packed along N",
    )
    _require_zero_points(reader, proj, w, zp)
    g_idx = _stack_optional(reader, proj, "weight_g_idx", dtype=torch.int32, shape=(k,), what="act-order group of each column")
    if g_idx is not None and bool((g_idx == -1).all()):
        g_idx = None  # initialized but unused (no act-order)
    if w.symmetric and zp is not None:
        q = from_pack_quantized(packed, scale, zp, None, (E, n, k))
        _check_zero_points_zero(reader, proj, q.zero_point)
        zp = None
    try:
        q = from_pack_quantized(packed, scale, zp, g_idx, (E, n, k))
    except (TypeError, ValueError) as exc:
        raise reader.error(f"{proj.template}: {exc}") from None
    # a single group spanning K is read back as per-row: keep the config's name for it
    return dataclasses.replace(q, granularity=gran) if q.granularity != gran else q


def _read_fp4(reader, proj, s, fmt, gran, n, k) -> QuantizedTensor:
    E = len(proj.modules)
    if k % gran.size:
        raise reader.error(f"{proj.template}: K={k} must be a multiple of {gran.size}")
    packed = _stack(reader, proj, "weight_packed", dtype=torch.uint8, shape=(n, k // 2), what="two e2m1 codes per byte")
    if fmt is Format.NVFP4:
        scale = _stack(
            reader, proj, "weight_scale", dtype=torch.float8_e4m3fn, shape=(n, k // 16),
            what="one e4m3 scale per 16 along K",
        )
        gs = _stack(reader, proj, "weight_global_scale", dtype=torch.float32, shape=(1,), what="per-matrix global scale")
        return QuantizedTensor(
            data=packed, scale=scale, fmt=fmt, granularity=gran, shape=(E, n, k), global_scale=gs.reshape(E, 1, 1)
        )
    scale = _stack(reader, proj, "weight_scale", dtype=torch.uint8, shape=(n, k // 32), what="one e8m0 scale per 32 along K")
    return QuantizedTensor(data=packed, scale=scale, fmt=fmt, granularity=gran, shape=(E, n, k))


def _read_projection(reader, proj, s, fmt, gran, shape) -> QuantizedTensor:
    n, k = shape
    if s.format in NAIVE_FORMATS:
        return _read_naive(reader, proj, s, fmt, gran, n, k)
    if s.format == "pack-quantized":
        return _read_pack_quantized(reader, proj, s, fmt, gran, n, k)
    return _read_fp4(reader, proj, s, fmt, gran, n, k)


# --------------------------------------------------------------------------
# The loader


def _pick_scheme(fmt, gran, act, s: GroupScheme, act_order: ActOrder, reader, describe) -> Tuple[Scheme, ZeroPoint]:
    """The scheme and the zero-point mode its weights are stored with. A
    symmetric int4 checkpoint with no symmetric scheme (act-order) falls back
    to the asymmetric one with all-zero zero points, which is exact."""
    modes = [ZeroPoint.NONE if s.weights.symmetric else ZeroPoint.ASYMMETRIC]
    if fmt is Format.INT4 and modes[0] is ZeroPoint.NONE:
        modes.append(ZeroPoint.ASYMMETRIC)
    errors = []
    for zp in modes:
        try:
            return find_scheme(fmt, gran, act, zero_point=zp, act_order=act_order, describe=describe, reader=reader), zp
        except ValueError as exc:
            errors.append(exc)
    raise errors[0]


def _with_zero_points(q: QuantizedTensor) -> QuantizedTensor:
    if q.zero_point is not None:
        return q
    return dataclasses.replace(q, zero_point=torch.zeros(q.scale.shape, dtype=torch.int8))


def _with_g_idx(q: QuantizedTensor) -> QuantizedTensor:
    if q.g_idx is not None:
        return q
    *batch, _, k = q.shape
    return dataclasses.replace(q, g_idx=_int4.trivial_g_idx(tuple(batch), k, q.granularity.size))


def _layer_scheme(config: Mapping, projs: Mapping[str, "_Projection"], classes, reader) -> GroupScheme:
    """The one config-group scheme every expert projection of the layer uses."""
    first = projs["up"].modules[0]
    s = None
    for proj in projs.values():
        for m in proj.modules:
            other = resolve_scheme(config, m, classes, reader)
            if other is None:
                raise reader.error(
                    f"module {m!r} is not quantized (ignored or matched by no config_groups target); "
                    "only quantized experts are loaded"
                )
            s = other if s is None else s
            if (other.weights, other.inputs, other.format) != (s.weights, s.inputs, s.format):
                raise reader.error(
                    f"modules {first!r} and {m!r} use different schemes ({s.group}: {s.weights}, {s.format} "
                    f"vs {other.group}: {other.weights}, {other.format}); one MoE layer needs one scheme"
                )
    return s


def _biases(reader, projs: Mapping[str, "_Projection"], w13_roles, inter: int, hidden: int):
    """Optional per-expert ``bias`` tensors: ``(w13_bias [E, 2I], w2_bias [E, H])`` or Nones."""
    b13 = [_stack_optional(reader, projs[r], "bias", dtype=_FLOAT_SCALE, shape=(inter,)) for r in w13_roles]
    b2 = _stack_optional(reader, projs["down"], "bias", dtype=_FLOAT_SCALE, shape=(hidden,))
    if all(b is None for b in b13) and b2 is None:
        return None, None
    if any(b is None for b in b13) or b2 is None:
        raise reader.error("some expert projections have a bias and others not")
    return torch.cat(b13, dim=1), b2


def load_compressed_tensors_experts(
    source: Source,
    prefix: str,
    quantization_config: Optional[Mapping] = None,
    *,
    names: ExpertNames = GATE_UP_DOWN,
    experts: Optional[Iterable[int]] = None,
    per_tensor_scales: PerTensorScales = PerTensorScales.REQUIRE_EQUAL,
    input_scales: InputScales = InputScales.WIDEST,
    module_classes: Sequence[str] = ("Linear",),
) -> QuantizedExperts:
    """Read the experts ``{prefix}.{e}.{gate,up,down}`` of a compressed-tensors
    checkpoint into a ``QuantizedExperts`` (``w13 = [gate; up]``, layout
    ``GATE_UP``) of the matching scheme, without re-quantizing.

    Args:
        source: state dict, safetensors path(s) or checkpoint directory.
        prefix: the experts module, e.g. ``"model.layers.3.mlp.experts"``.
        quantization_config: the ``quantization_config`` dict of config.json
            (read from ``source/config.json`` when source is a directory).
        names: projection names (``GATE_UP_DOWN``, ``W1_W3_W2`` or an ``ExpertNames``).
        experts: expert indices to load (default: all, numbered 0..E-1).
        per_tensor_scales: gate/up per-tensor scales policy (``PerTensorScales``).
        input_scales: static activation scale policy (``InputScales``).
        module_classes: class names the projections match as targets.
    """
    per_tensor_scales = PerTensorScales(per_tensor_scales)
    with open_source(source) as src:
        reader = CheckpointReader(src, FAMILY)
        config = read_quantization_config(quantization_config, src, FAMILY)
        method = config.get("quant_method")
        if method != "compressed-tensors":
            raise reader.error(f"quantization_config.quant_method is {method!r}, expected 'compressed-tensors'")
        status = config.get("quantization_status")
        if status not in (None, "compressed"):
            raise reader.error(f"quantization_status is {status!r}: only compressed checkpoints are loaded")
        for extra in ("transform_config", "sparsity_config"):
            if config.get(extra):
                raise reader.error(
                    f"{extra} is set: rotated (transform) or sparse checkpoints need more than the "
                    "expert weights and are not supported"
                )
        ids = find_experts(reader, prefix, names.up, experts)
        roles = (("gate", names.gate),) if names.gated else ()
        roles += (("up", names.up), ("down", names.down))
        projs = {
            role: _Projection(tuple(names.module(prefix, e, p) for e in ids), names.module(prefix, "{e}", p), role)
            for role, p in roles
        }
        s = _layer_scheme(config, projs, tuple(module_classes), reader)
        if s.format not in SUPPORTED_FORMATS:
            raise reader.error(f"format {s.format!r} is not supported (supported: {', '.join(SUPPORTED_FORMATS)})")
        fmt = _weight_format(s, reader)
        gran = _weight_granularity(s.weights, reader)
        act = _activation_spec(s.inputs, reader)
        gran_out = PerRow() if (
            per_tensor_scales is PerTensorScales.EXPAND_TO_ROWS
            and isinstance(gran, PerTensor)
            and fmt in (Format.FP8_E4M3, Format.INT8)
        ) else gran
        act_order = ActOrder.GROUP if s.weights.actorder in ("group", "dynamic") else ActOrder.NONE
        describe = f"config group {s.group!r} ({s.format}: weights {s.weights}, inputs {s.inputs})"
        scheme, zero_point = _pick_scheme(fmt, gran_out, act, s, act_order, reader, describe)

        # [I, H] from the first up projection; every tensor is then checked against it
        inter, hidden = _logical_shape(reader, s, fmt, projs["up"].modules[0])
        shapes = {role: (hidden, inter) if role == "down" else (inter, hidden) for role in projs}

        qs = {role: _read_projection(reader, p, s, fmt, gran, shapes[role]) for role, p in projs.items()}
        for role, q in qs.items():
            check_projection_values(reader, projs[role], q)
        if any(q.g_idx is not None for q in qs.values()) and act_order is ActOrder.NONE:
            act_order = ActOrder.GROUP
            scheme, zero_point = _pick_scheme(fmt, gran_out, act, s, act_order, reader, describe + " with act-order g_idx")
        if gran_out != gran:
            qs = {role: expand_to_rows(q) for role, q in qs.items()}
        if zero_point is ZeroPoint.ASYMMETRIC:
            qs = {role: _with_zero_points(q) for role, q in qs.items()}
        if act_order is ActOrder.GROUP:
            qs = {role: _with_g_idx(q) for role, q in qs.items()}
        w13_roles = [r for r in ("gate", "up") if r in projs]
        w13 = concat_rows([qs[r] for r in w13_roles], [projs[r].template for r in w13_roles], ids, reader)
        w2 = qs["down"]

        a13 = a2 = None
        if scheme.static_activation:
            param = "input_global_scale" if fmt is Format.NVFP4 or act.fmt is Format.NVFP4 else "input_scale"
            widest_is_max = param == "input_scale"
            a13 = _input_scale(reader, [projs[r] for r in w13_roles], param, input_scales, widest_is_max)
            a2 = _input_scale(reader, [projs["down"]], param, input_scales, widest_is_max)

        w13_bias, b2 = _biases(reader, projs, w13_roles, inter, hidden)
        try:
            return quantize_experts(
                w13, w2, scheme, layout=GateUpLayout.GATE_UP,
                w13_bias=w13_bias, w2_bias=b2, a13_scale=a13, a2_scale=a2,
            )
        except (TypeError, ValueError) as exc:
            raise reader.error(f"experts under {prefix!r} do not form a valid {scheme.name}: {exc}") from None


def _input_scale(reader, projs: List[_Projection], param: str, policy: InputScales, widest_is_max: bool):
    scales = {}
    for p in projs:
        for m in p.modules:
            key = f"{m}.{param}"
            t = reader.get(key, dtype=_FLOAT_SCALE, what="static per-tensor activation scale")
            if t.numel() != 1:
                raise reader.error(f"tensor {key!r} has shape {tuple(t.shape)}, expected shape (1,)")
            zp = reader.get_optional(f"{m}.input_zero_point")
            if zp is not None and bool((zp != 0).any()):
                raise reader.error(f"tensor '{m}.input_zero_point' is nonzero: asymmetric activations are not supported")
            scales[key] = t
    return reduce_input_scales(scales, policy, widest_is_max=widest_is_max, reader=reader)


__all__ = [
    "GroupScheme",
    "QuantArgs",
    "SUPPORTED_FORMATS",
    "load_compressed_tensors_experts",
    "resolve_scheme",
]
