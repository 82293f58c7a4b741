"""How a scheme's ``QuantizedExperts`` becomes the flat argument list of its
``moe_quant::experts_<scheme>`` op, and back.

The op schema is derived from the scheme (never written by hand): the
weight tensors each format stores (``formats.layout.expected_fields``), the
static activation scales if the scheme has them, then the common arguments::

    experts_<scheme>(Tensor hidden_states, Tensor topk_weights, Tensor topk_ids,
                     Tensor w13[, Tensor w13_scale, ...], Tensor w2[, ...],
                     Tensor? w13_bias, Tensor? w2_bias,
                     [Tensor a13_scale, Tensor a2_scale,]
                     Tensor? expert_map, str activation, str layout,
                     bool apply_router_weight_on_input) -> Tensor
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..experts import QuantizedExperts, build_experts
from ..fake_impls.shapes import dequantize_shape
from ..formats.core import QuantizedTensor, check_tensor
from ..formats.layout import expected_fields
from ..schemes import ActOrder, Scheme, ZeroPoint

#: QuantizedTensor field -> suffix of the op argument name
_SUFFIX = {
    "data": "",
    "scale": "_scale",
    "global_scale": "_global_scale",
    "zero_point": "_zero_point",
    "g_idx": "_g_idx",
}
COMMON_HEAD = ("hidden_states", "topk_weights", "topk_ids")
COMMON_TAIL = (
    "Tensor? w13_bias",
    "Tensor? w2_bias",
    "Tensor? expert_map",
    "str activation",
    "str layout",
    "bool apply_router_weight_on_input",
)


@dataclasses.dataclass(frozen=True)
class ExpertsSignature:
    """The flat op signature of one scheme."""

    scheme: Scheme

    @property
    def op_name(self) -> str:
        return f"experts_{self.scheme.name}"

    @functools.cached_property
    def weight_fields(self) -> Tuple[str, ...]:
        """QuantizedTensor fields held per weight (``("data",)`` if unquantized)."""
        w = self.scheme.weight
        if w.fmt is None:
            return ("data",)
        fields = expected_fields(
            w.fmt,
            (1, 1, 1024),  # any shape: only the field names are used
            w.granularity,
            with_zero_point=w.zero_point is ZeroPoint.ASYMMETRIC,
            with_g_idx=w.act_order is ActOrder.GROUP,
        )
        return tuple(fields)

    @functools.cached_property
    def weight_args(self) -> Tuple[str, ...]:
        return tuple(
            f"{w}{_SUFFIX[f]}" for w in ("w13", "w2") for f in self.weight_fields
        )

    @property
    def static_args(self) -> Tuple[str, ...]:
        return ("a13_scale", "a2_scale") if self.scheme.static_activation else ()

    @functools.cached_property
    def schema(self) -> str:
        args = [f"Tensor {n}" for n in COMMON_HEAD + self.weight_args]
        args += list(COMMON_TAIL[:2]) + [f"Tensor {n}" for n in self.static_args]
        args += list(COMMON_TAIL[2:])
        return "(" + ", ".join(args) + ") -> Tensor"

    def flatten(self, experts: QuantizedExperts) -> List[Optional[torch.Tensor]]:
        """Weight tensors, biases and static scales in schema order (the
        arguments between ``topk_ids`` and ``expert_map``)."""
        out: List[Optional[torch.Tensor]] = []
        for w in (experts.w13, experts.w2):
            if isinstance(w, QuantizedTensor):
                out += [getattr(w, f) for f in self.weight_fields]
            else:
                out.append(w)
        out += [experts.w13_bias, experts.w2_bias]
        if self.static_args:
            out += [experts.a13_scale, experts.a2_scale]
        return out

    def unflatten(
        self, hidden_size: int, tensors: Sequence[Optional[torch.Tensor]], layout: str
    ) -> QuantizedExperts:
        """Rebuild (and validate: shapes and dtypes only, so it runs on fake
        tensors) the ``QuantizedExperts`` from ``flatten``'s list."""
        n = len(self.weight_fields)
        w13, w2 = self._weight("w13", tensors[:n]), self._weight("w2", tensors[n : 2 * n])
        rest = list(tensors[2 * n :])
        b13, b2 = rest[0], rest[1]
        a13, a2 = (rest[2], rest[3]) if self.static_args else (None, None)
        if self.scheme.weight.fmt is None:
            want = self.scheme.weight.float_dtype
            check_tensor("w13", w13, dtype=want)
            check_tensor("w2", w2, dtype=want)
        return build_experts(  # shapes, dtypes, devices: never the weights' values
            w13, w2, self.scheme,
            w13_bias=b13, w2_bias=b2, layout=layout, a13_scale=a13, a2_scale=a2,
            hidden_size=hidden_size,
        )

    def _weight(self, name: str, tensors) -> object:
        spec = self.scheme.weight
        if spec.fmt is None:
            return tensors[0]
        fields: Dict[str, torch.Tensor] = dict(zip(self.weight_fields, tensors))
        check_tensor(name, fields["data"])
        # Weight sizes are specialized (int() guards them to their values):
        # they are fixed per model, and symbolic packed sizes like mxfp6's
        # 4*floor(s/3) trip sympy in torch 2.13's shape guards.
        shape = tuple(int(d) for d in dequantize_shape(spec.fmt, fields["data"].shape))
        return QuantizedTensor(
            fmt=spec.fmt,
            granularity=spec.granularity,
            shape=shape,
            rounding=spec.rounding,
            **fields,
        )
