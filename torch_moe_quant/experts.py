"""``QuantizedExperts``: the typed container of an MoE layer's expert tensors
under one scheme, and ``quantize_experts`` that builds it.

Shapes (E experts, hidden size H, intermediate size I, DESIGN §2/§3):

* ``w13``: ``[E, 2I, H]`` for gated activations (``[E, I, H]`` non-gated),
  gate/up rows arranged as ``layout`` says.
* ``w2``: ``[E, H, I]``.
* ``w13_bias [E, 2I]``, ``w2_bias [E, H]``: optional, any float dtype.
* ``a13_scale``, ``a2_scale``: static activation scales of the inputs of the
  first and second GEMM (``[1, 1]`` fp32); for nvfp4 they are the activation
  *global* scales (compressed-tensors ``input_global_scale``).

Sizes that a format's block does not divide are zero-padded when asked
(``pad_to=``): padded rows/columns are exact zeros, so they add nothing to the
result, and ``hidden_size``/``intermediate_size`` keep the logical sizes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from . import formats
from .activations import Activation, GateUpLayout, as_activation
from .formats.core import (
    Format,
    PerGroup,
    QuantizedTensor,
    check_tensor,
    register_pytree_dataclass,
    value_ranges,
    values_available,
)
from .formats.layout import TRAITS, check_quantized_values, validate
from .schemes import ActOrder, Scheme, ZeroPoint, get_scheme

Weight = Union[torch.Tensor, QuantizedTensor]


def dequantize_weight(w: Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A weight of a ``QuantizedExperts`` as a plain ``dtype`` tensor."""
    if isinstance(w, QuantizedTensor):
        # formats decode to at most fp32; widening to fp64 (gradcheck) is exact
        return formats.dequantize(w, dtype if dtype.itemsize <= 4 else torch.float32).to(dtype)
    return w.to(dtype)


@dataclasses.dataclass(frozen=True)
class QuantizedExperts:
    """Expert tensors of one MoE layer under ``scheme`` (a registered pytree).

    ``w13``/``w2`` are plain tensors for unquantized schemes and
    ``QuantizedTensor`` otherwise; their logical shapes may be padded beyond
    ``hidden_size``/``intermediate_size`` (see module docstring).
    """

    w13: Weight
    w2: Weight
    scheme: Scheme
    hidden_size: int
    intermediate_size: int
    layout: GateUpLayout = GateUpLayout.GATE_UP
    w13_bias: Optional[torch.Tensor] = None
    w2_bias: Optional[torch.Tensor] = None
    a13_scale: Optional[torch.Tensor] = None
    a2_scale: Optional[torch.Tensor] = None

    @property
    def num_experts(self) -> int:
        return _shape(self.w13)[0]

    @property
    def padded_hidden_size(self) -> int:
        return _shape(self.w2)[1]

    @property
    def padded_intermediate_size(self) -> int:
        return _shape(self.w2)[2]

    @property
    def is_gated(self) -> bool:
        """True when w13 holds both gate and up rows (2I rows)."""
        return _shape(self.w13)[1] == 2 * self.padded_intermediate_size

    @property
    def nbytes(self) -> int:
        leaves = pytree.tree_leaves(self)
        return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))

    def to(self, device) -> "QuantizedExperts":
        """Move every tensor to ``device`` (dtypes are the scheme's and stay)."""
        return pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), self)


register_pytree_dataclass(
    QuantizedExperts,
    ("w13", "w2", "w13_bias", "w2_bias", "a13_scale", "a2_scale"),
    ("scheme", "hidden_size", "intermediate_size", "layout"),
)


def _shape(w: Weight) -> Tuple[int, ...]:
    return tuple(w.shape)


# ---------------------------------------------------------------------------
# Building the container.


def _block_multiple(scheme: Scheme) -> int:
    """The K multiple the scheme's weight *and* activation formats need."""
    m = 1
    w = scheme.weight
    if w.fmt is not None:
        t = TRAITS[w.fmt]
        m = math.lcm(m, t.pack_ratio[1])
        if isinstance(w.granularity, PerGroup):
            m = math.lcm(m, w.granularity.size)
    a = scheme.activation
    if a is not None and isinstance(a.granularity, PerGroup):
        m = math.lcm(m, a.granularity.size)
    return m


def _pad_dim(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    extra = size - t.shape[dim]
    if extra == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, extra]
    return F.pad(t, pad)


def _pad_gate_up(t: torch.Tensor, dim: int, inter: int, padded: int, layout, gated: bool):
    """Pad the 2I (or I) dim of w13 / w13_bias so each half grows to ``padded``."""
    if padded == inter:
        return t
    if not gated:
        return _pad_dim(t, dim, padded)
    if layout is GateUpLayout.INTERLEAVED:  # append (gate, up) zero pairs
        return _pad_dim(t, dim, 2 * padded)
    a, b = t.split(inter, dim=dim)
    return torch.cat([_pad_dim(a, dim, padded), _pad_dim(b, dim, padded)], dim=dim)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def quantize_experts(
    w13: Weight,
    w2: Weight,
    scheme,
    *,
    w13_bias: Optional[torch.Tensor] = None,
    w2_bias: Optional[torch.Tensor] = None,
    layout: Union[GateUpLayout, str] = GateUpLayout.GATE_UP,
    a13_scale: Optional[torch.Tensor] = None,
    a2_scale: Optional[torch.Tensor] = None,
    pad_to: Optional[int] = None,
    hidden_size: Optional[int] = None,
    intermediate_size: Optional[int] = None,
) -> QuantizedExperts:
    """Quantize float expert weights to ``scheme``, or validate already
    quantized ones (``QuantizedTensor``, e.g. from a checkpoint).

    Args:
        w13: ``[E, 2I, H]`` (gated) or ``[E, I, H]`` float tensor, or a
            ``QuantizedTensor`` of the scheme's weight format.
        w2: ``[E, H, I]`` float tensor or ``QuantizedTensor``.
        scheme: a ``Scheme`` or a name in ``torch_moe_quant.SCHEMES``.
        w13_bias, w2_bias: optional ``[E, 2I]`` / ``[E, H]`` expert biases.
        layout: gate/up arrangement of the rows of w13 (``GateUpLayout``).
        a13_scale, a2_scale: static activation scales (required by schemes
            whose activations are ``ActQuant.STATIC``; see
            ``torch_moe_quant.calibrate_activation_scales``).
        pad_to: when H or I is not a multiple of what the scheme needs
            (block size, packing), zero-pad them up to a multiple of
            ``lcm(pad_to, block)``; without it such sizes raise ValueError.
        hidden_size, intermediate_size: logical (unpadded) sizes when the
            given weights are already padded (default: their sizes).
    """
    if isinstance(w13, torch.Tensor) and isinstance(w2, torch.Tensor):
        check_float_weights(scheme, w13=w13, w2=w2)
    experts = build_experts(
        w13, w2, scheme, w13_bias=w13_bias, w2_bias=w2_bias, layout=layout,
        a13_scale=a13_scale, a2_scale=a2_scale, pad_to=pad_to,
        hidden_size=hidden_size, intermediate_size=intermediate_size,
    )
    check_values(experts)
    return experts


def build_experts(
    w13: Weight,
    w2: Weight,
    scheme,
    *,
    w13_bias: Optional[torch.Tensor] = None,
    w2_bias: Optional[torch.Tensor] = None,
    layout: Union[GateUpLayout, str] = GateUpLayout.GATE_UP,
    a13_scale: Optional[torch.Tensor] = None,
    a2_scale: Optional[torch.Tensor] = None,
    pad_to: Optional[int] = None,
    hidden_size: Optional[int] = None,
    intermediate_size: Optional[int] = None,
) -> QuantizedExperts:
    """``quantize_experts`` without ``check_values``: every shape, dtype and
    device check, and the static scales' values, but no read of the weights'
    values. The ops rebuild their experts with it on every call (DESIGN §6b:
    a call checks its tensors' shapes, dtypes and devices only)."""
    scheme = get_scheme(scheme)
    try:
        layout = GateUpLayout(layout)
    except ValueError:
        raise ValueError(
            f"layout must be one of {[v.value for v in GateUpLayout]}, got {layout!r}"
        ) from None
    quantized_input = isinstance(w13, QuantizedTensor) or isinstance(w2, QuantizedTensor)
    for name, w in (("w13", w13), ("w2", w2)):
        if not isinstance(w, (torch.Tensor, QuantizedTensor)):
            raise TypeError(f"{name} must be a torch.Tensor or QuantizedTensor, got {type(w).__name__}")
        if len(w.shape) != 3:
            raise ValueError(f"{name} must be 3-D [E, rows, K], got shape {tuple(w.shape)}")
    E, n13, H = _shape(w13)
    E2, H2, inter = _shape(w2)
    if E == 0:
        raise ValueError(f"w13 must hold at least one expert, got shape {tuple(w13.shape)} (E = 0)")
    if min(n13, H, inter) == 0:
        raise ValueError(
            f"expert sizes must be positive: w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}"
        )
    if E2 != E:
        raise ValueError(f"w2 has {E2} experts but w13 has {E}: the expert dims must match")
    if H2 != H:
        raise ValueError(f"w2.shape[1] (hidden size) must equal w13.shape[2]={H}, got {H2}")
    if n13 not in (inter, 2 * inter):
        raise ValueError(
            f"w13.shape[1] must be 2*I={2 * inter} (gated) or I={inter} (non-gated) "
            f"where I=w2.shape[2], got {n13}"
        )
    gated = n13 == 2 * inter
    for name, b, want in (("w13_bias", w13_bias, (E, n13)), ("w2_bias", w2_bias, (E, H))):
        if b is not None:
            check_tensor(name, b, shape=want)
            if not b.is_floating_point():
                raise TypeError(f"{name} must be a float tensor, got {b.dtype}")
    weights_device = (w13.data if isinstance(w13, QuantizedTensor) else w13).device
    a13_scale, a2_scale = _check_static_scales(scheme, a13_scale, a2_scale, weights_device)

    if quantized_input:
        w13, w2 = _validate_quantized(scheme, w13, w2)
        return QuantizedExperts(
            w13, w2, scheme,
            hidden_size=hidden_size or H,
            intermediate_size=intermediate_size or inter,
            layout=layout, w13_bias=w13_bias, w2_bias=w2_bias,
            a13_scale=a13_scale, a2_scale=a2_scale,
        )

    for name, w in (("w13", w13), ("w2", w2)):
        if not w.is_floating_point() or w.dtype.itemsize < 2:
            raise TypeError(f"{name} must be float32/bfloat16/float16, got {w.dtype}")
    mult = _block_multiple(scheme)
    if pad_to is not None:
        if not isinstance(pad_to, int) or pad_to < 1:
            raise ValueError(f"pad_to must be a positive int, got {pad_to!r}")
        mult = math.lcm(mult, pad_to)
    Hp, Ip = _round_up(H, mult), _round_up(inter, mult)
    if (Hp, Ip) != (H, inter) and pad_to is None:
        raise ValueError(
            f"scheme {scheme.name} needs the hidden size H and intermediate size I to be "
            f"multiples of {mult}; got H={H}, I={inter}. Pass pad_to= to zero-pad them."
        )
    w13 = _pad_dim(_pad_gate_up(w13, 1, inter, Ip, layout, gated), 2, Hp)
    w2 = _pad_dim(_pad_dim(w2, 1, Hp), 2, Ip)
    if w13_bias is not None:
        w13_bias = _pad_gate_up(w13_bias, 1, inter, Ip, layout, gated)
    if w2_bias is not None:
        w2_bias = _pad_dim(w2_bias, 1, Hp)
    return QuantizedExperts(
        _quantize_weight(scheme, w13, "w13"),
        _quantize_weight(scheme, w2, "w2"),
        scheme,
        hidden_size=hidden_size or H,
        intermediate_size=intermediate_size or inter,
        layout=layout,
        w13_bias=w13_bias,
        w2_bias=w2_bias,
        a13_scale=a13_scale,
        a2_scale=a2_scale,
    )


def act_order_g_idx(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """A GPTQ-style act-order ``g_idx`` without calibration data: columns are
    ranked by descending L2 norm (a stand-in for the Hessian diagonal GPTQ
    uses) and consecutive ranks share a group. Returns int32 ``[..., K]``."""
    order = torch.argsort(w.float().norm(dim=-2), dim=-1, descending=True, stable=True)
    rank = torch.argsort(order, dim=-1, stable=True)
    return (rank // group_size).to(torch.int32)


#: experts quantized at once: the formats' fp32/int32 intermediates of one
#: chunk stay near 1 GiB (a whole gpt-oss-120b w13, 2.1e9 elements, ran out
#: of an H100's 80 GB in one piece). Every granularity's scales are per expert
#: or finer, so chunking along E gives the same codes and scales.
CHUNK_ELEMENTS = 1 << 28


def _quantize_weight(scheme: Scheme, w: torch.Tensor, name: str) -> Weight:
    """``w`` quantized to the scheme's weight format; a format's value error
    (its input is ``x`` there) is re-raised naming ``name``."""
    try:
        return _quantize_weight_chunks(scheme, w)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from e


def _quantize_weight_chunks(scheme: Scheme, w: torch.Tensor) -> Weight:
    spec = scheme.weight
    if spec.fmt is None:
        return w.to(spec.float_dtype)
    per_expert = max(1, w[0].numel())
    step = max(1, CHUNK_ELEMENTS // per_expert)
    if w.shape[0] <= step:
        return _quantize_chunk(scheme, w)
    parts = [_quantize_chunk(scheme, c) for c in w.split(step, dim=0)]
    fields = {
        name: torch.cat([getattr(q, name) for q in parts], dim=0)
        for name in parts[0].tensors
    }
    return dataclasses.replace(parts[0], shape=tuple(w.shape), **fields)


def _quantize_chunk(scheme: Scheme, w: torch.Tensor) -> Weight:
    spec = scheme.weight
    if spec.fmt is Format.NVFP4 and w.dtype == torch.float16:
        # the nvfp4 global scale 448 * 6 / amax is computed in the input dtype
        # (compressed-tensors' convention) and overflows float16 for amax <
        # 0.041, falling back to 1.0 (most codes then round to 0): weights are
        # widened to float32 first (exact), which gives float32's result.
        w = w.float()
    options = {}
    if spec.rounding is not None:
        options["rounding"] = spec.rounding
    if spec.fmt is Format.INT4:
        options["mode"] = formats.Int4Mode.ASYMMETRIC if spec.zero_point is ZeroPoint.ASYMMETRIC else formats.Int4Mode.SYMMETRIC
        if spec.act_order is ActOrder.GROUP:
            options["g_idx"] = act_order_g_idx(w, spec.granularity.size)
    return formats.quantize(w, spec.fmt, spec.granularity, **options)


def _validate_quantized(scheme: Scheme, w13: Weight, w2: Weight):
    spec = scheme.weight
    for name, w in (("w13", w13), ("w2", w2)):
        if spec.fmt is None:
            if isinstance(w, QuantizedTensor):
                raise TypeError(f"{name}: scheme {scheme.name} is unquantized; pass a float tensor")
            continue
        if not isinstance(w, QuantizedTensor):
            raise TypeError(
                f"{name} must be a QuantizedTensor of {spec.fmt.value} when the other weight is "
                f"already quantized, got {type(w).__name__}"
            )
        if w.fmt is not spec.fmt:
            raise ValueError(f"{name} has format {w.fmt.value}, scheme {scheme.name} needs {spec.fmt.value}")
        if w.granularity != spec.granularity:
            raise ValueError(
                f"{name} has granularity {w.granularity!r}, scheme {scheme.name} needs {spec.granularity!r}"
            )
        if (w.zero_point is not None) != (spec.zero_point is ZeroPoint.ASYMMETRIC):
            raise ValueError(
                f"{name}.zero_point must be {'given' if spec.zero_point is ZeroPoint.ASYMMETRIC else 'None'} "
                f"for scheme {scheme.name}"
            )
        if spec.act_order is ActOrder.GROUP and w.g_idx is None:
            raise ValueError(f"{name}.g_idx is required for act-order scheme {scheme.name}")
        validate(w, name)
    return w13, w2


def _check_static_scales(scheme: Scheme, a13_scale, a2_scale, device: torch.device):
    """The static scales as fp32 ``[1, 1]`` tensors on the weights' ``device``
    (a float or a tensor anywhere is accepted: the kernels read the scale
    where the weights are)."""
    if not scheme.static_activation:
        for name, s in (("a13_scale", a13_scale), ("a2_scale", a2_scale)):
            if s is not None:
                raise ValueError(f"{name} is only for static-activation schemes; {scheme.name} is not one")
        return None, None
    out = []
    for name, s in (("a13_scale", a13_scale), ("a2_scale", a2_scale)):
        if s is None:
            raise ValueError(
                f"scheme {scheme.name} quantizes activations with static scales: pass {name}= "
                f"(torch_moe_quant.calibrate_activation_scales computes both from sample inputs)"
            )
        if isinstance(s, bool) or not isinstance(s, (float, int, torch.Tensor)):
            raise TypeError(f"{name} must be a float or a float tensor, got {type(s).__name__}")
        if isinstance(s, torch.Tensor) and not s.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got dtype {s.dtype}")
        s = torch.as_tensor(s, dtype=torch.float32, device=device)
        if s.numel() != 1:
            raise ValueError(f"{name} must hold one per-tensor scale, got shape {tuple(s.shape)}")
        if values_available(s) and not (torch.isfinite(s).all() and (s > 0).all()):
            raise ValueError(f"{name} must be finite and positive, got {s.item()}")
        out.append(s.reshape(1, 1))
    return tuple(out)


def check_values(experts: QuantizedExperts) -> None:
    """Value checks of a ``QuantizedExperts`` at construction (quantize, load),
    never on the call path: float weights and biases of a quantized scheme
    must be finite (a NaN or inf would poison its whole scale block), and
    already-quantized weights must decode to finite values
    (``formats.layout.check_values``: scales finite and positive, no NaN
    e8m0 byte, a usable nvfp4 global scale, g_idx in range). Skipped for
    tensors whose values cannot be read (meta, fake, while compiling)."""
    for name, w in (("w13", experts.w13), ("w2", experts.w2)):
        if isinstance(w, QuantizedTensor):
            check_quantized_values(w, name)
    for name, b in (("w13_bias", experts.w13_bias), ("w2_bias", experts.w2_bias)):
        if b is not None and values_available(b) and b.numel() and not bool(torch.isfinite(b).all()):
            raise ValueError(f"{name} must be finite: it holds NaN or inf values")


def check_float_weights(scheme, **weights: Optional[torch.Tensor]) -> None:
    """Float weights about to be quantized to ``scheme`` must be finite (every
    format: a NaN or inf sets its block's scale to NaN / inf, or raises in the
    integer formats); errors name the argument. Unquantized schemes only check
    that the cast to their dtype does not overflow (NaN stays NaN there)."""
    scheme = get_scheme(scheme)
    if scheme.weight.fmt is None:
        # the cast to the scheme's float dtype must not overflow (float32 /
        # bfloat16 weights beyond float16's range would become inf)
        target = scheme.weight.float_dtype
        for name, w in weights.items():
            if (
                isinstance(w, torch.Tensor) and w.is_floating_point() and w.dtype != target
                and torch.finfo(w.dtype).max > torch.finfo(target).max and w.numel() and values_available(w)
            ):
                amax = float(w.detach().abs().amax())
                if math.isfinite(amax) and amax > torch.finfo(target).max:
                    raise ValueError(
                        f"{name} has values of magnitude {amax:.4g}, beyond {target}'s range "
                        f"(max {torch.finfo(target).max:.4g}): {scheme.name} would store them as inf"
                    )
        return
    for name, w in weights.items():
        if w is None or not isinstance(w, torch.Tensor) or not values_available(w) or w.numel() == 0:
            continue
        finite = torch.isfinite(w)
        if not bool(finite.all()):
            raise ValueError(
                f"{name} must be finite to be quantized to {scheme.name}: it holds "
                f"{int(torch.isnan(w).sum())} NaN and {int(torch.isinf(w).sum())} inf values"
            )


# ---------------------------------------------------------------- call checks
# Shape / dtype / device checks of a MoE call against its experts (values only
# where they can be read without a device sync). They live here, below
# ``kernels`` and ``reference``, so the kernels' launchers and the reference
# share them without ``kernels`` importing ``reference``.


def check_routing(
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    num_tokens: int,
    num_experts: int,
    expert_map: Optional[torch.Tensor],
    local_experts: int,
    device: Optional[torch.device] = None,
) -> None:
    """Validate routing tensors; errors name the argument. ``device``: the
    device of ``hidden_states`` every routing tensor must be on (a ``meta``
    or other-device id tensor would otherwise be read as garbage)."""
    check_tensor("topk_ids", topk_ids, dtype=(torch.int32, torch.int64))
    check_tensor(
        "topk_weights", topk_weights,
        dtype=(torch.float32, torch.float16, torch.bfloat16, torch.float64),
    )
    if expert_map is not None:
        check_tensor("expert_map", expert_map, dtype=(torch.int32, torch.int64))
    if device is not None:
        for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights), ("expert_map", expert_map)):
            if t is not None and t.device != device:
                raise ValueError(
                    f"{name} is on {t.device} but hidden_states is on {device}: every routing tensor "
                    f"must be on the device of hidden_states"
                )
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
        raise ValueError(
            f"topk_ids must have shape [num_tokens={num_tokens}, top_k], got {tuple(topk_ids.shape)}"
        )
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(
            f"topk_weights must have the shape of topk_ids {tuple(topk_ids.shape)}, "
            f"got {tuple(topk_weights.shape)}"
        )
    if topk_ids.shape[1] > num_experts:
        raise ValueError(f"top_k={topk_ids.shape[1]} is larger than the number of experts {num_experts}")
    if expert_map is not None:
        if expert_map.dim() != 1:
            raise ValueError(f"expert_map must be 1-D [num_global_experts], got {tuple(expert_map.shape)}")
    if not values_available(topk_ids, expert_map) or topk_ids.numel() == 0:
        return
    (lo, hi), *map_range = value_ranges(topk_ids, *([expert_map] if expert_map is not None else []))
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"topk_ids must be in [0, {num_experts}), found ids in [{lo}, {hi}]")
    if expert_map is not None:
        (mlo, mhi), = map_range
        if mlo < -1 or mhi >= local_experts:
            raise ValueError(
                f"expert_map values must be -1 (not on this rank) or a local expert in "
                f"[0, {local_experts}), found values in [{mlo}, {mhi}]"
            )


#: field names of the two dataclasses, read once (``experts_tensors`` runs on every call:
#: ~4 us this way, ~30 us through ``pytree.tree_flatten_with_path``)
_EXPERTS_FIELDS = tuple(f.name for f in dataclasses.fields(QuantizedExperts))
_QTENSOR_FIELDS = tuple(f.name for f in dataclasses.fields(QuantizedTensor))


def experts_tensors(experts: QuantizedExperts):
    """``(field name, tensor)`` of every tensor ``experts`` holds (a quantized
    weight contributes its data, scales, zero points and g_idx)."""
    for field in _EXPERTS_FIELDS:
        value = getattr(experts, field)
        if isinstance(value, QuantizedTensor):
            for sub in _QTENSOR_FIELDS:
                t = getattr(value, sub)
                if isinstance(t, torch.Tensor):
                    yield f"{field}.{sub}", t
        elif isinstance(value, torch.Tensor):
            yield field, value


def check_activation(experts: QuantizedExperts, activation) -> Activation:
    """``activation`` as an ``Activation``, which must agree with the experts
    being gated (``w13`` holds 2I rows) or not (ValueError naming both)."""
    act = as_activation(activation)
    if act.is_gated != experts.is_gated:
        kind = "gated" if act.is_gated else "non-gated"
        rows = "2I" if act.is_gated else "I"
        raise ValueError(
            f"activation={act.value} is {kind} and needs w13 with {rows} rows; these experts have "
            f"w13 rows={experts.w13.shape[1]}, I={experts.padded_intermediate_size}"
        )
    return act


def check_inputs(hidden_states, experts, activation) -> Tuple[torch.Tensor, Activation]:
    if not isinstance(experts, QuantizedExperts):
        raise TypeError(
            f"experts must be a QuantizedExperts (torch_moe_quant.quantize_experts), "
            f"got {type(experts).__name__}"
        )
    check_tensor(
        "hidden_states", hidden_states,
        dtype=(torch.float32, torch.bfloat16, torch.float16, torch.float64),
    )
    if hidden_states.dim() != 2 or hidden_states.shape[1] != experts.hidden_size:
        raise ValueError(
            f"hidden_states must have shape [num_tokens, {experts.hidden_size}], "
            f"got {tuple(hidden_states.shape)}"
        )
    for name, t in experts_tensors(experts):
        if t.device != hidden_states.device:
            raise ValueError(
                f"experts.{name} is on {t.device} but hidden_states is on {hidden_states.device}: "
                f"move the experts with experts.to(device)"
            )
    act = check_activation(experts, activation)
    # fp32 math; float64 inputs (gradcheck) keep float64
    x = hidden_states.to(torch.promote_types(hidden_states.dtype, torch.float32))
    pad = experts.padded_hidden_size - experts.hidden_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x, act


def validate_call(
    hidden_states, experts, topk_weights, topk_ids, activation, expert_map, apply_router_weight_on_input
) -> Tuple[torch.Tensor, Activation]:
    """Every check of a MoE call (shapes and dtypes always, values when they
    can be read); returns the padded compute-dtype input and the activation.
    Shared by the reference, the ops' kernels and their fake impls."""
    x, act = check_inputs(hidden_states, experts, activation)
    E = experts.num_experts
    num_global = E if expert_map is None else expert_map.shape[0]
    check_routing(topk_weights, topk_ids, x.shape[0], num_global, expert_map, E, hidden_states.device)
    if apply_router_weight_on_input and topk_ids.shape[1] != 1:
        raise ValueError(
            f"apply_router_weight_on_input needs top_k == 1, got top_k={topk_ids.shape[1]}"
        )
    return x, act
