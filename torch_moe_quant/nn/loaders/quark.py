"""Load one MoE layer's experts from an AMD Quark OCP-MX checkpoint (mxfp4 /
mxfp6 weights), without re-quantizing.

Conventions, read from amd-quark 0.13 and checked against its exporter and
importer in ``tests/test_loaders.py``:

* Experts are per-expert ``Linear`` modules ``{prefix}.{e}.{gate|up|down}_proj``
  (with transformers v5, ``quark.torch.utils.llm.preprocess_for_quantization``
  splits fused experts into ``QuarkExperts``; ``export_safetensors`` writes
  them per expert).
* ``{module}.weight``: uint8, ``[N, K/2]`` for fp4 (``Pack_fp4``: element
  ``2i`` in the low nibble) or ``[N, 3K/4]`` for fp6 (``Pack_fp6``: codes
  ``v0..v3`` form ``v0 | v1<<6 | v2<<12 | v3<<18``, low byte first). The
  ``reorder`` pack method does not change fp4/fp6 packing.
* ``{module}.weight_scale``: uint8 e8m0 ``[N, K/32]`` (``to_e8m0_uint8``;
  per-group scales of float dtypes are not transposed, only integer ones
  are). An all-zero block stores byte 1 (``safe_log2`` clamps the scale to
  ``2**-126``), which decodes to zeros all the same: kept as stored.
* ``{module}.input_scale``: fp32 scalar ``()`` for static per-tensor fp8
  activations (one per expert and projection: see ``InputScales``).
* ``quantization_config``: ``quant_method: quark``; the layer config is the
  first ``layer_quant_config`` pattern that ``fnmatch``-es the module name,
  else ``layer_type_quant_config`` for Linear, else ``global_quant_config``;
  ``exclude`` patterns (``fnmatch``) mean unquantized
  (``quant_config_parser.get_layer_quant_config``). ``export.weight_format``
  must be ``real_quantized``.

Schemes: weights ``dtype`` ``fp4`` / ``fp6_e2m3`` / ``fp6_e3m2``,
``qscheme: per_group``, ``group_size: 32``, ``scale_format: e8m0``, static;
activations OCP-MX (``fp4``, ``fp6_*``, ``fp8_e4m3`` per_group 32 e8m0,
dynamic; their ``scale_calculation_mode`` must be the schemes' ``even``) or
fp8 per-tensor static. Weight-only mxfp4 loads as ``mxfp4_w4a16``.
"""

from __future__ import annotations

import fnmatch
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from ...activations import GateUpLayout
from ...experts import QuantizedExperts, quantize_experts
from ...formats.core import Format, PerGroup, PerTensor, QuantizedTensor, ScaleRounding
from ...formats.layout import TRAITS
from ...schemes import ActivationSpec, ActQuant
from ._experts import (
    GATE_UP_DOWN,
    ExpertNames,
    InputScales,
    concat_rows,
    find_experts,
    find_scheme,
    reduce_input_scales,
)
from ._safetensors import CheckpointReader, Source, open_source, read_quantization_config

FAMILY = "quark"
_MX_DTYPES = {"fp4": Format.MXFP4, "fp6_e2m3": Format.MXFP6_E2M3, "fp6_e3m2": Format.MXFP6_E3M2}
_ROUNDING = {"even": ScaleRounding.EVEN, "floor": ScaleRounding.FLOOR}
_FLOAT = (torch.bfloat16, torch.float16, torch.float32)


def layer_config(config: Mapping, module: str) -> Optional[Mapping]:
    """The Quark layer config (``weight``/``input_tensors``/... dict) of
    ``module``, or None when it is excluded."""
    for pattern in config.get("exclude") or []:
        if fnmatch.fnmatch(module, pattern):
            return None
    for pattern, cfg in (config.get("layer_quant_config") or {}).items():
        if fnmatch.fnmatch(module, pattern):
            return cfg
    for type_name, cfg in (config.get("layer_type_quant_config") or {}).items():
        if str(type_name).split(".")[-1].strip("'>") == "Linear":
            return cfg
    return config.get("global_quant_config")


def _mx_spec(d: Mapping, where: str, reader: CheckpointReader) -> Tuple[Format, Optional[ScaleRounding]]:
    """An OCP-MX tensor spec -> (element format, scale rounding)."""
    dtype = d.get("dtype")
    if dtype == "mx":
        raise reader.error(
            f"{where}: legacy Quark 'mx' dtype (mx_element_dtype={d.get('mx_element_dtype')!r}) is not "
            "supported; only OCP-MX (dtype fp4/fp6_e2m3/fp6_e3m2/fp8_e4m3, scale_format e8m0)"
        )
    fmt = _MX_DTYPES.get(dtype)
    if dtype == "fp8_e4m3":
        fmt = Format.MXFP8
    want = {"qscheme": "per_group", "group_size": 32, "scale_format": "e8m0"}
    got = {k: d.get(k) for k in want}
    if fmt is None or got != want:
        raise reader.error(
            f"{where} is {dtype} {got}; supported: dtype fp4/fp6_e2m3/fp6_e3m2 (weights and activations) "
            "or fp8_e4m3 (activations) with qscheme per_group, group_size 32, scale_format e8m0"
        )
    if d.get("ch_axis") not in (None, -1, 1):
        raise reader.error(f"{where}.ch_axis is {d.get('ch_axis')!r}: MX blocks must run along K (ch_axis -1)")
    mode = d.get("scale_calculation_mode")
    return fmt, _ROUNDING.get(mode) if mode is not None else None


def _activation_spec(d: Optional[Mapping], reader: CheckpointReader) -> Optional[ActivationSpec]:
    if d is None:
        return None
    if isinstance(d, list):
        raise reader.error("input_tensors with several quantizers (a list) are not supported")
    if d.get("dtype") == "fp8_e4m3" and d.get("qscheme") == "per_tensor":
        if d.get("is_dynamic"):
            raise reader.error("dynamic per-tensor fp8 input activations are not supported (static only)")
        return ActivationSpec(Format.FP8_E4M3, PerTensor(), ActQuant.STATIC)
    fmt, rounding = _mx_spec(d, "input_tensors", reader)
    if not d.get("is_dynamic"):
        raise reader.error("static OCP-MX input activations are not supported (dynamic only)")
    mode = d.get("scale_calculation_mode")
    if rounding is None:
        raise reader.error(f"input_tensors.scale_calculation_mode {mode!r} is not supported (even or floor)")
    return ActivationSpec(fmt, PerGroup(32), ActQuant.DYNAMIC, rounding)


def _read_projection(
    reader: CheckpointReader, modules: Sequence[str], template: str, fmt: Format, rounding, n: int, k: int
) -> QuantizedTensor:
    num, den = TRAITS[fmt].pack_ratio
    if k % 32:
        raise reader.error(f"{template}: K={k} must be a multiple of 32 (the MX block)")
    data = torch.stack([
        reader.get(f"{m}.weight", dtype=torch.uint8, shape=(n, k * num // den), what=f"packed {fmt.value} codes")
        for m in modules
    ])
    scales = []
    for m in modules:
        s = reader.get(f"{m}.weight_scale", dtype=(torch.uint8, torch.float8_e8m0fnu), shape=(n, k // 32),
                       what="one e8m0 scale per 32 along K")
        scales.append(s.view(torch.uint8))
    return QuantizedTensor(
        data=data, scale=torch.stack(scales), fmt=fmt, granularity=PerGroup(32),
        shape=(len(modules), n, k), rounding=rounding,
    )


def _logical_shape(reader: CheckpointReader, module: str, fmt: Format) -> Tuple[int, int]:
    w = reader.get(f"{module}.weight", dtype=torch.uint8)
    if w.dim() != 2:
        raise reader.error(f"tensor '{module}.weight' must be 2-D [N, packed K], got shape {tuple(w.shape)}")
    num, den = TRAITS[fmt].pack_ratio
    if (w.shape[1] * den) % num:
        raise reader.error(f"tensor '{module}.weight' has {w.shape[1]} bytes per row, not a whole number of {fmt.value} codes")
    return (w.shape[0], w.shape[1] * den // num)


def load_quark_experts(
    source: Source,
    prefix: str,
    quantization_config: Optional[Mapping] = None,
    *,
    names: ExpertNames = GATE_UP_DOWN,
    experts: Optional[Iterable[int]] = None,
    input_scales: InputScales = InputScales.WIDEST,
) -> QuantizedExperts:
    """Read the experts ``{prefix}.{e}.{gate,up,down}`` of an AMD Quark
    OCP-MX checkpoint into a ``QuantizedExperts`` (``w13 = [gate; up]``,
    ``GATE_UP``) of the matching ``mxfp4_*`` / ``mxfp6_*`` scheme.

    Args are those of ``load_compressed_tensors_experts`` (``quantization_config``
    is the Quark one, ``quant_method: quark``)."""
    with open_source(source) as src:
        reader = CheckpointReader(src, FAMILY)
        config = read_quantization_config(quantization_config, src, FAMILY)
        if config.get("quant_method") != "quark":
            raise reader.error(f"quantization_config.quant_method is {config.get('quant_method')!r}, expected 'quark'")
        export = config.get("export") or {}
        if export.get("weight_format", "real_quantized") != "real_quantized":
            raise reader.error(
                f"export.weight_format is {export.get('weight_format')!r}: only real_quantized checkpoints are loaded"
            )
        ids = find_experts(reader, prefix, names.up, experts)
        roles = ([("gate", names.gate)] if names.gated else []) + [("up", names.up), ("down", names.down)]
        modules: Dict[str, List[str]] = {role: [names.module(prefix, e, p) for e in ids] for role, p in roles}
        templates = {role: names.module(prefix, "{e}", p) for role, p in roles}

        first = modules["up"][0]
        cfg = None
        for role_modules in modules.values():
            for m in role_modules:
                c = layer_config(config, m)
                if c is None:
                    raise reader.error(f"module {m!r} is excluded from quantization; only quantized experts are loaded")
                if cfg is None:
                    cfg = c
                elif c != cfg:
                    raise reader.error(f"modules {first!r} and {m!r} have different Quark layer configs")
        if cfg.get("bias") is not None or cfg.get("output_tensors") is not None:
            raise reader.error("quantized bias or output_tensors are not supported")
        weight = cfg.get("weight")
        if not isinstance(weight, Mapping):
            raise reader.error(f"layer config weight must be one tensor config dict, got {type(weight).__name__}")
        fmt, rounding = _mx_spec(weight, "weight", reader)
        if fmt is Format.MXFP8:
            raise reader.error("mxfp8 (fp8_e4m3 per_group e8m0) weights are not supported")
        if weight.get("is_dynamic"):
            raise reader.error("weights must be static (is_dynamic: false)")
        act = _activation_spec(cfg.get("input_tensors"), reader)
        describe = f"Quark weight {weight.get('dtype')} with input_tensors {None if act is None else act}"
        scheme = find_scheme(fmt, PerGroup(32), act, describe=describe, reader=reader)

        # [I, H] from the first up projection; every tensor is then checked against it
        inter, hidden = _logical_shape(reader, modules["up"][0], fmt)
        shapes = {role: (hidden, inter) if role == "down" else (inter, hidden) for role in modules}
        qs = {
            role: _read_projection(reader, ms, templates[role], fmt, rounding, *shapes[role])
            for role, ms in modules.items()
        }
        w13_roles = [r for r in ("gate", "up") if r in modules]
        w13 = concat_rows([qs[r] for r in w13_roles], [templates[r] for r in w13_roles], ids, reader)

        a13 = a2 = None
        if scheme.static_activation:
            a13 = _input_scale(reader, [m for r in w13_roles for m in modules[r]], input_scales)
            a2 = _input_scale(reader, modules["down"], input_scales)

        biases = {r: _stack_bias(reader, ms, shapes[r][0]) for r, ms in modules.items()}
        w13_bias = None
        if any(b is not None for b in biases.values()):
            if any(b is None for b in biases.values()):
                raise reader.error("some expert projections have a bias and others not")
            w13_bias = torch.cat([biases[r] for r in w13_roles], dim=1)
        try:
            return quantize_experts(
                w13, qs["down"], scheme, layout=GateUpLayout.GATE_UP,
                w13_bias=w13_bias, w2_bias=biases["down"], a13_scale=a13, a2_scale=a2,
            )
        except (TypeError, ValueError) as exc:
            raise reader.error(f"experts under {prefix!r} do not form a valid {scheme.name}: {exc}") from None


def _input_scale(reader: CheckpointReader, modules: Sequence[str], policy: InputScales) -> torch.Tensor:
    scales = {}
    for m in modules:
        key = f"{m}.input_scale"
        t = reader.get(key, dtype=_FLOAT, what="static per-tensor fp8 activation scale")
        if t.numel() != 1:
            raise reader.error(f"tensor {key!r} has shape {tuple(t.shape)}, expected a scalar ()")
        scales[key] = t
    return reduce_input_scales(scales, policy, widest_is_max=True, reader=reader)


def _stack_bias(reader: CheckpointReader, modules: Sequence[str], n: int) -> Optional[torch.Tensor]:
    present = [reader.has(f"{m}.bias") for m in modules]
    if not any(present):
        return None
    if not all(present):
        raise reader.error(f"missing tensor '{modules[present.index(False)]}.bias' (other experts have a bias)")
    return torch.stack([reader.get(f"{m}.bias", dtype=_FLOAT, shape=(n,), what="bias") for m in modules])


__all__ = ["layer_config", "load_quark_experts"]
