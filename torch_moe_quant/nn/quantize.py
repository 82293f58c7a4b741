"""``quantize_(model, scheme)``: swap the MoE expert modules of a model, in
place, for ``QuantizedExpertsModule``s that run the scheme's ``moe_quant`` op.

What is found (``find_experts``):

* **fused 3-D experts** (transformers v5 ``@use_experts_implementation``
  classes: Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3, gpt-oss, ...; and any
  module with 3-D ``gate_up_proj``/``up_proj`` and ``down_proj`` tensors):
  replaced by ``TransformersQuantizedExperts``, which takes the same call
  ``(hidden_states, top_k_index, top_k_weights)`` and returns the same
  ``[T, H]`` tensor. The decorator's flags say the layout: ``is_transposed``
  (``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``; inferred from the
  shapes for undecorated modules), ``is_concatenated=False`` (interleaved
  gate/up rows), ``has_bias``, ``has_gate=False`` (non-gated ``up_proj``).
* **lists of per-expert MLPs**: an ``nn.ModuleList`` whose attribute name is
  ``experts`` and whose items all hold ``nn.Linear`` ``w1``/``w2``/``w3``
  (Mixtral v4 style: gate, down, up) or ``gate_proj``/``up_proj``/``down_proj``
  of equal shapes: stacked into w13/w2 and replaced by ``QuantizedExpertList``
  (keeps ``len``, indexing and iteration; see there).

Routers, shared experts, attention and everything else are left untouched.

The activation of each module (``resolve_activation``): the ``activation=``
override if given; else a known custom gate (gpt-oss ``_apply_gate`` →
``swigluoai`` with the interleaved layout, checked against alpha 1.702 and
limit 7.0); else the module's ``act_fn`` (nn.SiLU/SiLUActivation → silu,
GELUActivation → gelu, GELUTanh/NewGELUActivation → gelu_tanh,
ReLUSquaredActivation → relu2; non-gated experts map silu/gelu to
``silu_no_mul``/``gelu_no_mul``); else the config's ``hidden_act`` string.
Anything else raises ``ValueError`` naming the module.

Not supported (``ValueError`` at planning time, nothing is modified): experts
with ``has_post_expert_norm``, expert-parallel experts (``_is_expert_parallel``),
experts whose forward takes the hidden states alone (Llama-4: every expert on
router-scaled inputs, no routing arguments),
custom gates other than gpt-oss's, ModuleLists of non-gated MLPs.
Static-activation schemes (``*_static``, ``nvfp4_w4a4``, ``*_w*a8_fp8``) need
per-module scales: run ``torch_moe_quant.calibrate_(model, sample_batches)``
first (``nn.calibrate``: the ranges it records on each experts module become
the scheme's scales), or pass ``activation_scales={fqn: (a13_scale,
a2_scale)}`` for every converted module (``calibrate_activation_scales``
computes a pair for one layer); given scales win over calibrated ones.

Every module is planned and dry-run on ``meta`` tensors first (activation,
sizes, padding, scales), then the values of every static scale and float
weight are checked; modules are then converted one at a time and swapped in
only when all converted, so an error of any kind leaves the model (module
tree and ``state_dict``) untouched. A model whose experts are already
quantized raises ``ValueError`` (quantize the float model instead).
"""

from __future__ import annotations

import dataclasses
import inspect
import enum
import logging
from typing import Callable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..activations import SWIGLU_LIMIT, SWIGLUOAI_ALPHA, Activation, GateUpLayout, as_activation
from ..experts import _check_static_scales, check_float_weights, quantize_experts
from ..formats.core import Format, values_available
from ..schemes import Scheme, ZeroPoint, get_scheme
from ._ranges import activation_range, scales_from_range
from .modules import QuantizedExpertList, QuantizedExpertsModule, TransformersQuantizedExperts

logger = logging.getLogger(__name__)

FilterFn = Callable[[nn.Module, str], bool]

#: number of modules from which ``Progress.AUTO`` shows a tqdm bar
PROGRESS_MIN_MODULES = 8


class ExpertsKind(str, enum.Enum):
    """How a model stores its experts."""

    FUSED_3D = "fused_3d"  # one module, 3-D gate_up_proj / down_proj tensors
    LINEAR_LIST = "linear_list"  # nn.ModuleList of per-expert nn.Linear MLPs


class Progress(str, enum.Enum):
    """Progress bar of ``quantize_`` (tqdm)."""

    AUTO = "auto"  # a bar when >= PROGRESS_MIN_MODULES modules are converted and tqdm is installed
    ALWAYS = "always"  # a bar (tqdm required)
    NEVER = "never"


@dataclasses.dataclass(frozen=True)
class QuantizeSummary:
    """What ``quantize_`` did: the converted modules and their storage."""

    scheme: str
    converted: Tuple[str, ...]
    bytes_before: int
    bytes_after: int

    @property
    def num_converted(self) -> int:
        return len(self.converted)

    def __str__(self) -> str:
        if not self.converted:
            return f"quantize_({self.scheme}): no expert modules converted; the model is unchanged"
        ratio = self.bytes_before / self.bytes_after
        return (
            f"quantize_({self.scheme}): {self.num_converted} expert modules, "
            f"{self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB ({ratio:.2f}x)"
        )


@dataclasses.dataclass(frozen=True)
class ExpertsFound:
    """One expert module of a model, as ``find_experts`` reports it."""

    fqn: str
    module: nn.Module
    kind: ExpertsKind


@dataclasses.dataclass(frozen=True)
class FloatExperts:
    """Float expert weights of one module in the package's layout:
    ``w13 [E, 2I, H]`` (``[E, I, H]`` non-gated), ``w2 [E, H, I]``."""

    w13: torch.Tensor
    w2: torch.Tensor
    w13_bias: Optional[torch.Tensor]
    w2_bias: Optional[torch.Tensor]
    layout: GateUpLayout


# ---------------------------------------------------------------------------
# Finding expert modules.

_LINEAR_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))  # (gate, up, down)


def _is_3d(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 3


def _is_fused(module: nn.Module) -> bool:
    if isinstance(module, QuantizedExpertsModule):
        return False
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", None)
    if up is None:
        up = getattr(module, "up_proj", None)
    return _is_3d(down) and _is_3d(up)


def _linear_names(expert: nn.Module) -> Optional[Tuple[str, str, str]]:
    for names in _LINEAR_NAMES:
        if all(isinstance(getattr(expert, n, None), nn.Linear) for n in names):
            return names
    return None


def _is_linear_list(name: str, module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    if name.rsplit(".", 1)[-1] != "experts":
        return False
    names = _linear_names(module[0])
    if names is None:
        return False
    shapes = [tuple(getattr(module[0], n).weight.shape) for n in names]
    return all(
        _linear_names(e) == names and [tuple(getattr(e, n).weight.shape) for n in names] == shapes
        for e in module
    )


def find_experts(model: nn.Module, filter_fn: Optional[FilterFn] = None) -> List[ExpertsFound]:
    """The expert modules ``quantize_`` would convert, in ``named_modules`` order.

    ``filter_fn(module, fqn) -> bool`` keeps only the modules it accepts.
    """
    found: List[ExpertsFound] = []
    for fqn, module in model.named_modules():
        if _is_fused(module):
            kind = ExpertsKind.FUSED_3D
        elif _is_linear_list(fqn, module):
            kind = ExpertsKind.LINEAR_LIST
        else:
            continue
        if filter_fn is None or filter_fn(module, fqn):
            found.append(ExpertsFound(fqn, module, kind))
    return found


# ---------------------------------------------------------------------------
# Activation.

#: ``hidden_act`` strings (transformers ACT2FN keys) -> gated activation
HIDDEN_ACT = {
    "silu": Activation.SILU,
    "swish": Activation.SILU,
    "gelu": Activation.GELU,
    "gelu_python": Activation.GELU,
    "gelu_pytorch_tanh": Activation.GELU_TANH,
    "gelu_python_tanh": Activation.GELU_TANH,
    "gelu_new": Activation.GELU_TANH,
    "relu2": Activation.RELU2,
}
#: ``act_fn`` module classes (by name, so transformers need not be imported)
_ACT_FN_CLASSES = {
    "SiLU": Activation.SILU,
    "SiLUActivation": Activation.SILU,
    "GELUActivation": Activation.GELU,
    "GELUTanh": Activation.GELU_TANH,
    "PytorchGELUTanh": Activation.GELU_TANH,
    "NewGELUActivation": Activation.GELU_TANH,
    "ReLUSquaredActivation": Activation.RELU2,
}
_NON_GATED = {
    Activation.SILU: Activation.SILU_NO_MUL,
    Activation.GELU: Activation.GELU_NO_MUL,
    Activation.RELU2: Activation.RELU2,
}
#: experts classes with a custom ``_apply_gate`` we implement:
#: class name -> (activation, attributes that must hold these values)
_KNOWN_GATES = {
    "GptOssExperts": (
        Activation.SWIGLUOAI,
        {"alpha": SWIGLUOAI_ALPHA, "limit": SWIGLU_LIMIT},
    ),
}


def _act_from_callable(fn) -> Optional[Activation]:
    if isinstance(fn, nn.GELU):
        return Activation.GELU_TANH if fn.approximate == "tanh" else Activation.GELU
    if isinstance(fn, nn.Module):
        return _ACT_FN_CLASSES.get(type(fn).__name__)
    return {torch.nn.functional.silu: Activation.SILU, torch.nn.functional.gelu: Activation.GELU}.get(fn)


def _has_custom_gate(module: nn.Module) -> bool:
    """True if the module's class has an ``_apply_gate`` other than
    transformers' default ``act_fn(gate) * up``. (Only names are inspected,
    so this also runs while torch.compile traces.)"""
    gate = getattr(type(module), "_apply_gate", None)
    return gate is not None and gate.__name__ != "_default_apply_gate"


def _hidden_act(*configs) -> Optional[str]:
    for config in configs:
        for c in (config, getattr(config, "text_config", None)):
            act = getattr(c, "hidden_act", None)
            if isinstance(act, str):
                return act
    return None


def resolve_activation(
    fqn: str,
    module: nn.Module,
    gated: bool,
    *,
    override: Optional[Union[Activation, str]] = None,
    config=None,
) -> Activation:
    """The ``Activation`` of the experts ``module`` (see module docstring for
    the order of the sources); ``ValueError`` naming ``fqn`` when unknown."""
    if override is not None:
        act = as_activation(override)
        if act.is_gated != gated:
            raise ValueError(
                f"activation={act.value} is {'gated' if act.is_gated else 'non-gated'} but the experts "
                f"at {fqn!r} are {'gated' if gated else 'non-gated'}"
            )
        return act
    if _has_custom_gate(module):
        known = _KNOWN_GATES.get(type(module).__name__)
        if known is None:
            raise ValueError(
                f"experts at {fqn!r} ({type(module).__name__}) use a custom _apply_gate that "
                f"torch_moe_quant does not recognise; pass activation= if one of "
                f"{[a.value for a in Activation if a.is_gated]} computes it exactly"
            )
        act, attrs = known
        for attr, want in attrs.items():
            got = getattr(module, attr, None)
            if got is None or float(got) != want:
                raise ValueError(
                    f"experts at {fqn!r}: {act.value} needs {attr}={want}, the module has {attr}={got}"
                )
        return act
    act_fn = getattr(module, "act_fn", None)
    if act_fn is None and isinstance(module, nn.ModuleList):
        act_fn = getattr(module[0], "act_fn", None)
    if act_fn is not None:
        base = _act_from_callable(act_fn)
        source = f"act_fn {type(act_fn).__name__}"
    else:
        name = _hidden_act(getattr(module, "config", None), config)
        if name is None:
            raise ValueError(
                f"cannot tell the activation of the experts at {fqn!r}: no act_fn and no config.hidden_act; "
                f"pass activation="
            )
        base = HIDDEN_ACT.get(name)
        source = f"hidden_act={name!r}"
    act = base if gated or base is None else _NON_GATED.get(base)
    if act is None or act.is_gated != gated:
        raise ValueError(
            f"unsupported activation for the {'gated' if gated else 'non-gated'} experts at {fqn!r} "
            f"({source}); supported: hidden_act in {sorted(HIDDEN_ACT)}, or pass activation="
        )
    return act


# ---------------------------------------------------------------------------
# Reading float weights.


def _takes_no_routing(module: nn.Module) -> bool:
    """Whether a 3-D experts module's ``forward`` takes the hidden states
    alone (no routing arguments, no ``*args``): dense experts fed with
    router-scaled inputs, as Llama-4's ``Llama4TextExperts``."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return False
    return len(params) == 1


@dataclasses.dataclass(frozen=True)
class FusedFlags:
    """Storage flags of a fused 3-D experts module (transformers'
    ``use_experts_implementation`` arguments, or inferred)."""

    has_gate: bool
    is_transposed: bool
    layout: GateUpLayout
    has_bias: bool


def fused_flags(fqn: str, module: nn.Module) -> FusedFlags:
    """Flags of a fused experts module; ``ValueError`` for what we cannot run."""
    if getattr(module, "has_post_expert_norm", False):
        raise ValueError(
            f"experts at {fqn!r} ({type(module).__name__}) apply a post-expert norm, which "
            f"torch_moe_quant does not support; exclude them with filter_fn"
        )
    if getattr(module, "_is_expert_parallel", False):
        raise ValueError(
            f"experts at {fqn!r} are expert-parallel (transformers EP); quantize_ supports "
            f"single-rank experts only"
        )
    if _takes_no_routing(module):
        raise ValueError(
            f"experts at {fqn!r} ({type(module).__name__}) run every expert on every token: their forward "
            f"takes only the hidden states, with the router weights already applied to them (Llama-4 "
            f"style), not top_k_index / top_k_weights, which the quantized module needs; torch_moe_quant "
            f"does not support them yet: exclude them with filter_fn"
        )
    has_gate = getattr(module, "has_gate", None)
    if has_gate is None:
        has_gate = _is_3d(getattr(module, "gate_up_proj", None))
    w_in = module.gate_up_proj if has_gate else module.up_proj
    w_out = module.down_proj
    transposed = getattr(module, "is_transposed", None)
    if transposed is None:  # [E, 2I, H] & [E, H, I]  vs  [E, H, 2I] & [E, I, H]
        f = 2 if has_gate else 1
        plain = w_in.shape[1] == f * w_out.shape[2] and w_in.shape[2] == w_out.shape[1]
        transposed = not plain
    concatenated = getattr(module, "is_concatenated", True)
    layout = GateUpLayout.GATE_UP if concatenated or not has_gate else GateUpLayout.INTERLEAVED
    has_bias = getattr(module, "has_bias", None)
    if has_bias is None:
        has_bias = getattr(module, "gate_up_proj_bias" if has_gate else "up_proj_bias", None) is not None
    return FusedFlags(bool(has_gate), bool(transposed), layout, bool(has_bias))


def read_fused(module: nn.Module, flags: FusedFlags) -> FloatExperts:
    """``FloatExperts`` of a fused 3-D module (views where no transpose is needed)."""
    prefix = "gate_up_proj" if flags.has_gate else "up_proj"
    w13, w2 = getattr(module, prefix).detach(), module.down_proj.detach()
    if flags.is_transposed:
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    b13 = b2 = None
    if flags.has_bias:
        b13 = getattr(module, f"{prefix}_bias").detach()
        b2 = module.down_proj_bias.detach()
    return FloatExperts(w13, w2, b13, b2, flags.layout)


def read_linear_list(module: nn.ModuleList) -> FloatExperts:
    """Stack a ModuleList of gated nn.Linear MLPs into ``FloatExperts``."""
    gate_n, up_n, down_n = _linear_names(module[0])

    def stack(name: str, attr: str):
        ts = [getattr(getattr(e, name), attr) for e in module]
        return None if ts[0] is None else torch.stack([t.detach() for t in ts])

    w13 = torch.cat([stack(gate_n, "weight"), stack(up_n, "weight")], dim=1)
    gb, ub = stack(gate_n, "bias"), stack(up_n, "bias")
    b13 = None if gb is None and ub is None else torch.cat(
        [gb if gb is not None else torch.zeros_like(ub), ub if ub is not None else torch.zeros_like(gb)], dim=1
    )
    return FloatExperts(w13, stack(down_n, "weight"), b13, stack(down_n, "bias"), GateUpLayout.GATE_UP)


# ---------------------------------------------------------------------------
# quantize_


@dataclasses.dataclass(frozen=True)
class _Plan:
    found: ExpertsFound
    activation: Activation
    flags: Optional[FusedFlags]
    scales: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]


def _module_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.device, t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _read(plan: _Plan) -> FloatExperts:
    module = plan.found.module
    if plan.found.kind is ExpertsKind.FUSED_3D:
        return read_fused(module, plan.flags)
    return read_linear_list(module)


_Spec = Optional[Tuple[Tuple[int, ...], torch.dtype]]


def _specs(plan: _Plan) -> Tuple[_Spec, _Spec, _Spec, _Spec]:
    """(shape, dtype) of the w13, w2, w13_bias, w2_bias ``_read`` returns (None
    where absent), without reading: for the meta dry run."""
    m = plan.found.module
    if plan.found.kind is ExpertsKind.LINEAR_LIST:
        g, u, d = (getattr(m[0], n) for n in _linear_names(m[0]))
        E, n13 = len(m), g.out_features + u.out_features
        bias13 = g.bias if g.bias is not None else u.bias
        return (
            ((E, n13, g.in_features), g.weight.dtype),
            ((E,) + tuple(d.weight.shape), d.weight.dtype),
            None if bias13 is None else ((E, n13), bias13.dtype),
            None if d.bias is None else ((E, d.out_features), d.bias.dtype),
        )
    f = plan.flags
    prefix = "gate_up_proj" if f.has_gate else "up_proj"
    w13, w2 = getattr(m, prefix), m.down_proj
    s13, s2 = tuple(w13.shape), tuple(w2.shape)
    if f.is_transposed:
        s13, s2 = (s13[0], s13[2], s13[1]), (s2[0], s2[2], s2[1])
    b13 = getattr(m, f"{prefix}_bias") if f.has_bias else None
    b2 = m.down_proj_bias if f.has_bias else None
    return (
        (s13, w13.dtype),
        (s2, w2.dtype),
        None if b13 is None else (tuple(b13.shape), b13.dtype),
        None if b2 is None else (tuple(b2.shape), b2.dtype),
    )


def _dry_run(plan: _Plan, scheme: Scheme, pad_to: Optional[int]) -> None:
    """Run ``quantize_experts``'s validation on meta tensors of the module's
    shapes and dtypes, so a module that cannot be converted fails before any
    module is swapped."""
    w13, w2, b13, b2 = (
        None if spec is None else torch.empty(spec[0], dtype=spec[1], device="meta") for spec in _specs(plan)
    )
    layout = plan.flags.layout if plan.flags else GateUpLayout.GATE_UP
    try:
        quantize_experts(
            w13, w2, scheme, w13_bias=b13, w2_bias=b2, layout=layout,
            a13_scale=plan.scales[0], a2_scale=plan.scales[1], pad_to=pad_to,
        )
    except (ValueError, TypeError) as e:
        raise type(e)(f"experts at {plan.found.fqn!r}: {e}") from e
    except (RuntimeError, NotImplementedError):
        pass  # a value-level step meta tensors cannot run: the validation before it passed


def _check_values(plan: _Plan, scheme: Scheme) -> None:
    """The value checks of ``quantize_experts`` on the module's own tensors,
    before any module is converted: static scales finite and positive, float
    weights finite and in range of the integer formats. Reads every weight
    once (no copy: the tensors are checked where they are)."""
    fqn = plan.found.fqn
    try:
        if plan.scales[0] is not None or plan.scales[1] is not None:
            device = next(
                (s.device for s in plan.scales if isinstance(s, torch.Tensor)), torch.device("cpu")
            )
            _check_static_scales(scheme, plan.scales[0], plan.scales[1], device)
        for name, t in _float_tensors(plan):
            check_float_weights(scheme, **{name: t})
            fraction = _integer_range(scheme)
            if fraction is not None and t.numel() and values_available(t):
                limit = fraction * torch.finfo(torch.float32).max
                amax = float(t.detach().abs().amax())
                if amax > limit:
                    raise ValueError(
                        f"{name} has values of magnitude {amax:.4g}; {scheme.name} supports at most "
                        f"{limit:.4g} (a larger range overflows the integer grid's scale)"
                    )
    except (ValueError, TypeError) as e:
        raise type(e)(f"experts at {fqn!r}: {e}") from e


def _integer_range(scheme: Scheme) -> Optional[float]:
    """The fraction of float32's max the scheme's integer weight quantizer
    accepts (``formats.int4`` / ``formats.int8``), None for other formats."""
    w = scheme.weight
    if w.fmt is Format.INT8:
        return 127.5 / 128
    if w.fmt is Format.INT4:
        return 0.5 if w.zero_point is ZeroPoint.ASYMMETRIC else 7.5 / 8
    return None


def _float_tensors(plan: _Plan):
    """``(name, tensor)`` of every float weight and bias ``_read`` would stack,
    without stacking (names as the module holds them)."""
    m = plan.found.module
    if plan.found.kind is ExpertsKind.LINEAR_LIST:
        for i, expert in enumerate(m):
            for n in _linear_names(expert):
                lin = getattr(expert, n)
                yield f"{i}.{n}.weight", lin.weight.detach()
                if lin.bias is not None:
                    yield f"{i}.{n}.bias", lin.bias.detach()
        return
    prefix = "gate_up_proj" if plan.flags.has_gate else "up_proj"
    yield prefix, getattr(m, prefix).detach()
    yield "down_proj", m.down_proj.detach()
    if plan.flags.has_bias:
        yield f"{prefix}_bias", getattr(m, f"{prefix}_bias").detach()
        yield "down_proj_bias", m.down_proj_bias.detach()


def _already_quantized(model: nn.Module, filter_fn: Optional[FilterFn]) -> List[str]:
    """``fqn (scheme)`` of the quantized experts modules ``filter_fn`` accepts."""
    return [
        f"{fqn} ({module.scheme.name})"
        for fqn, module in model.named_modules()
        if isinstance(module, QuantizedExpertsModule) and (filter_fn is None or filter_fn(module, fqn))
    ]


def _scales_for(
    fqn: str, module: nn.Module, scheme: Scheme, activation_scales
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The static scales of one module: ``activation_scales[fqn]`` if given,
    else those of the range ``calibrate_`` recorded on the module."""
    if not scheme.static_activation:
        return None, None
    if activation_scales is None or fqn not in activation_scales:
        recorded = activation_range(module)
        if recorded is not None:
            return scales_from_range(scheme, recorded, f"experts at {fqn!r}")
        raise ValueError(
            f"scheme {scheme.name} quantizes activations with static scales and the experts at {fqn!r} "
            f"have none: run torch_moe_quant.calibrate_(model, sample_batches) first, or pass "
            f"activation_scales={{fqn: (a13_scale, a2_scale)}} for every converted module "
            f"(torch_moe_quant.calibrate_activation_scales computes a pair for one layer)"
        )
    pair = activation_scales[fqn]
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"activation_scales[{fqn!r}] must be a pair (a13_scale, a2_scale), got {pair!r}")
    return tuple(pair)


def _progress(items: Sequence, progress: Progress, desc: str):
    if progress is Progress.NEVER or (progress is Progress.AUTO and len(items) < PROGRESS_MIN_MODULES):
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if progress is Progress.ALWAYS:
            raise ImportError("progress='always' needs tqdm (pip install tqdm)") from None
        return items
    return tqdm(items, desc=desc, unit="module")


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_(
    model: nn.Module,
    scheme: Union[Scheme, str],
    *,
    filter_fn: Optional[FilterFn] = None,
    activation: Optional[Union[Activation, str]] = None,
    pad_to: Optional[int] = None,
    activation_scales: Optional[Mapping[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
    progress: Union[Progress, str] = Progress.AUTO,
) -> QuantizeSummary:
    """Quantize the MoE experts of ``model`` to ``scheme``, in place.

    Args:
        model: any ``nn.Module`` (a transformers model, a hand-written MoE).
            ``model`` itself cannot be an experts module (nothing to swap it into).
        scheme: a ``Scheme`` or a name in ``torch_moe_quant.SCHEMES``.
        filter_fn: ``filter_fn(module, fqn) -> bool``: convert only the found
            expert modules it accepts (default: all).
        activation: override the detected activation of every converted module.
        pad_to: zero-pad H and I up to a multiple of ``lcm(pad_to, block)``
            when the scheme's block does not divide them (see ``quantize_experts``).
        activation_scales: ``{fqn: (a13_scale, a2_scale)}``, only accepted for
            static-activation schemes, which need them for every module
            ``calibrate_`` has not calibrated.
        progress: ``"auto"`` (a tqdm bar from 8 modules), ``"always"``, ``"never"``.

    Returns:
        ``QuantizeSummary`` (also logged at INFO): converted fqns and bytes
        of the expert weights before and after.

    Raises:
        ValueError / TypeError naming the module. Every module is planned and
        checked before any is converted (activation, layout, dtypes, sizes
        and padding; static scales finite and > 0; float weights finite and in
        range), and converted modules are swapped in only when all of them
        converted: after an error of any kind the model (its module tree and
        its ``state_dict``) is exactly as it was.
    """
    scheme = get_scheme(scheme)
    try:
        progress = Progress(progress)
    except ValueError:
        raise ValueError(f"progress must be one of {[p.value for p in Progress]}, got {progress!r}") from None
    if activation_scales is not None and not scheme.static_activation:
        raise ValueError(
            f"activation_scales is only for static-activation schemes; {scheme.name} is not one"
        )
    config = getattr(model, "config", None)
    plans: List[_Plan] = []
    for found in find_experts(model, filter_fn):
        if found.fqn == "":
            raise ValueError("model is itself an experts module; wrap it or call quantize_experts directly")
        flags = fused_flags(found.fqn, found.module) if found.kind is ExpertsKind.FUSED_3D else None
        gated = flags.has_gate if flags else True
        act = resolve_activation(found.fqn, found.module, gated, override=activation, config=config)
        plan = _Plan(found, act, flags, _scales_for(found.fqn, found.module, scheme, activation_scales))
        _dry_run(plan, scheme, pad_to)
        plans.append(plan)
    for plan in plans:  # values only once every module's configuration passed
        _check_values(plan, scheme)
    if activation_scales is not None:
        unknown = sorted(set(activation_scales) - {p.found.fqn for p in plans})
        if unknown:
            raise ValueError(
                f"activation_scales has entries for modules quantize_ does not convert: {unknown}; "
                f"converted: {[p.found.fqn for p in plans]}"
            )
    if not plans:
        quantized = _already_quantized(model, filter_fn)
        if quantized:
            raise ValueError(
                f"the model's experts are already quantized ({', '.join(quantized)}); quantize_ converts "
                f"float experts only: start again from the float model to use {scheme.name}"
            )
        logger.warning("quantize_(%s): no MoE expert modules found; the model is unchanged", scheme.name)

    # Convert every module first, then swap them in: an error of any kind
    # while converting leaves the model exactly as it was. (Peak memory is
    # the same as swapping one by one: the plans hold the float modules.)
    new_modules, before, after = [], 0, 0
    with torch.no_grad():
        for plan in _progress(plans, progress, f"quantize_ {scheme.name}"):
            fe = _read(plan)
            try:
                experts = quantize_experts(
                    fe.w13, fe.w2, scheme,
                    w13_bias=fe.w13_bias, w2_bias=fe.w2_bias, layout=fe.layout,
                    a13_scale=plan.scales[0], a2_scale=plan.scales[1], pad_to=pad_to,
                )
            except (ValueError, TypeError) as e:
                raise type(e)(f"experts at {plan.found.fqn!r}: {e} (the model is unchanged)") from e
            del fe
            cls = TransformersQuantizedExperts if plan.found.kind is ExpertsKind.FUSED_3D else QuantizedExpertList
            new = cls(experts, plan.activation)
            before += _module_bytes(plan.found.module)
            after += new.nbytes
            new_modules.append(new)
    swapped = []
    try:
        for plan, new in zip(plans, new_modules):
            _set_submodule(model, plan.found.fqn, new)
            swapped.append(plan)
    except BaseException:
        for plan in reversed(swapped):
            _set_submodule(model, plan.found.fqn, plan.found.module)
        raise
    converted = [plan.found.fqn for plan in plans]
    summary = QuantizeSummary(scheme.name, tuple(converted), before, after)
    logger.info("%s", summary)
    return summary
