"""Expert activations and the layout of the fused gate/up projection (w13).

Gated activations take the ``[..., 2I]`` output of the first GEMM and return
``[..., I]``; non-gated ones map ``[..., I] -> [..., I]``. Definitions:

* ``silu``: ``silu(gate) * up``
* ``gelu``: ``gelu(gate) * up`` (exact erf gelu); ``gelu_tanh``: tanh approximation
* ``swigluoai`` (gpt-oss): ``gate = min(gate, limit)``,
  ``up = clamp(up, -limit, limit)``, ``(up + 1) * gate * sigmoid(alpha * gate)``
  with ``alpha = 1.702``, ``limit = 7.0``
* ``swiglustep`` (vLLM ``SwigluStepAndMul``): ``min(silu(gate), limit) *
  clamp(up, -limit, limit)``, ``limit = 7.0``
* non-gated: ``relu2`` (``relu(x)**2``), ``silu_no_mul``, ``gelu_no_mul``
"""

from __future__ import annotations

import enum
from typing import Tuple

import torch
import torch.nn.functional as F

SWIGLUOAI_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


class Activation(str, enum.Enum):
    SILU = "silu"
    GELU = "gelu"
    GELU_TANH = "gelu_tanh"
    SWIGLUOAI = "swigluoai"
    SWIGLUSTEP = "swiglustep"
    RELU2 = "relu2"
    SILU_NO_MUL = "silu_no_mul"
    GELU_NO_MUL = "gelu_no_mul"

    @property
    def is_gated(self) -> bool:
        return self not in _NON_GATED


_NON_GATED = frozenset({Activation.RELU2, Activation.SILU_NO_MUL, Activation.GELU_NO_MUL})


class GateUpLayout(str, enum.Enum):
    """How the rows of w13 ``[E, 2I, H]`` hold the gate and up projections."""

    GATE_UP = "gate_up"  # rows [0, I) gate, [I, 2I) up (vLLM, transformers Mixtral/Qwen)
    UP_GATE = "up_gate"  # rows [0, I) up, [I, 2I) gate
    INTERLEAVED = "interleaved"  # even rows gate, odd rows up (gpt-oss)


def as_activation(activation) -> Activation:
    try:
        return Activation(activation)
    except ValueError:
        raise ValueError(
            f"activation must be one of {[a.value for a in Activation]}, got {activation!r}"
        ) from None


def split_gate_up(h: torch.Tensor, layout: GateUpLayout) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split the last dim ``2I`` of ``h`` into ``(gate, up)``."""
    if layout is GateUpLayout.INTERLEAVED:
        return h[..., 0::2], h[..., 1::2]
    first, second = h.chunk(2, dim=-1)
    return (first, second) if layout is GateUpLayout.GATE_UP else (second, first)


def apply_activation(
    h: torch.Tensor, activation: Activation, layout: GateUpLayout = GateUpLayout.GATE_UP
) -> torch.Tensor:
    """Apply ``activation`` to the first GEMM's output (see module docstring)."""
    if not activation.is_gated:
        if activation is Activation.RELU2:
            return F.relu(h).square()
        if activation is Activation.SILU_NO_MUL:
            return F.silu(h)
        return F.gelu(h)
    gate, up = split_gate_up(h, layout)
    if activation is Activation.SILU:
        return F.silu(gate) * up
    if activation is Activation.GELU:
        return F.gelu(gate) * up
    if activation is Activation.GELU_TANH:
        return F.gelu(gate, approximate="tanh") * up
    if activation is Activation.SWIGLUOAI:
        gate = gate.clamp(max=SWIGLU_LIMIT)
        up = up.clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT)
        return (up + 1) * (gate * torch.sigmoid(SWIGLUOAI_ALPHA * gate))
    # SWIGLUSTEP
    return F.silu(gate).clamp(max=SWIGLU_LIMIT) * up.clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT)


def _dsilu(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _dgelu(x: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1 + torch.erf(x * 0.7071067811865476))
    pdf = torch.exp(-0.5 * x * x) * 0.3989422804014327
    return cdf + x * pdf


def _dgelu_tanh(x: torch.Tensor) -> torch.Tensor:
    k, c = 0.7978845608028654, 0.044715
    t = torch.tanh(k * (x + c * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * c * x * x)


def _merge_gate_up(g_gate: torch.Tensor, g_up: torch.Tensor, layout: GateUpLayout) -> torch.Tensor:
    """Inverse of ``split_gate_up`` for gradients."""
    if layout is GateUpLayout.INTERLEAVED:
        return torch.stack((g_gate, g_up), dim=-1).flatten(-2)
    pair = (g_gate, g_up) if layout is GateUpLayout.GATE_UP else (g_up, g_gate)
    return torch.cat(pair, dim=-1)


def activation_vjp(
    h: torch.Tensor, grad: torch.Tensor, activation: Activation, layout: GateUpLayout = GateUpLayout.GATE_UP
) -> torch.Tensor:
    """Gradient w.r.t. ``h`` of ``apply_activation(h)`` times ``grad``
    (analytic; clamps pass gradient where ``torch.clamp`` does: inside or on
    the bound)."""
    if not activation.is_gated:
        if activation is Activation.RELU2:
            return grad * 2 * F.relu(h)
        d = _dsilu(h) if activation is Activation.SILU_NO_MUL else _dgelu(h)
        return grad * d
    gate, up = split_gate_up(h, layout)
    L = SWIGLU_LIMIT
    if activation is Activation.SILU:
        d_gate, d_up = up * _dsilu(gate), F.silu(gate)
    elif activation is Activation.GELU:
        d_gate, d_up = up * _dgelu(gate), F.gelu(gate)
    elif activation is Activation.GELU_TANH:
        d_gate, d_up = up * _dgelu_tanh(gate), F.gelu(gate, approximate="tanh")
    elif activation is Activation.SWIGLUOAI:
        gc, uc = gate.clamp(max=L), up.clamp(-L, L)
        s = torch.sigmoid(SWIGLUOAI_ALPHA * gc)
        d_gate = (uc + 1) * (s + SWIGLUOAI_ALPHA * gc * s * (1 - s)) * (gate <= L)
        d_up = gc * s * ((up >= -L) & (up <= L))
    else:  # SWIGLUSTEP
        sg = F.silu(gate)
        d_gate = _dsilu(gate) * (sg <= L) * up.clamp(-L, L)
        d_up = sg.clamp(max=L) * ((up >= -L) & (up <= L))
    return _merge_gate_up(grad * d_gate, grad * d_up, layout)
