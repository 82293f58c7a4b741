"""The activation ranges ``calibrate_`` records on an experts module and
``quantize_`` turns into static scales (shared by both, so neither imports
the other)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import nn

from .. import formats
from ..formats.core import Format
from ..schemes import Scheme

#: attribute of an experts module holding its ``ActivationRange``
RANGE_ATTR = "_moe_quant_activation_range"


@dataclasses.dataclass(frozen=True)
class ActivationRange:
    """Absolute maxima of the two expert GEMM inputs of one module (fp32 scalars)."""

    a13_amax: torch.Tensor
    a2_amax: torch.Tensor
    tokens: int

    def merged(self, a13: torch.Tensor, a2: torch.Tensor, tokens: int) -> "ActivationRange":
        return ActivationRange(
            torch.maximum(self.a13_amax, a13), torch.maximum(self.a2_amax, a2), self.tokens + tokens
        )


def activation_range(module: nn.Module) -> Optional[ActivationRange]:
    """The range ``calibrate_`` recorded on ``module`` (None if none)."""
    return module.__dict__.get(RANGE_ATTR)


def record_range(module: nn.Module, a13: torch.Tensor, a2: torch.Tensor, tokens: int) -> None:
    a13, a2 = a13.detach().float().reshape(()), a2.detach().float().reshape(())
    old = activation_range(module)
    module.__dict__[RANGE_ATTR] = ActivationRange(a13, a2, tokens) if old is None else old.merged(a13, a2, tokens)


def scales_from_range(scheme: Scheme, r: ActivationRange, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(a13_scale, a2_scale)`` of a static-activation ``scheme`` for the
    recorded range: the per-tensor scale the activation format computes for a
    tensor whose absolute maximum is the recorded one (fp32 ``[1, 1]``)."""
    spec = scheme.activation
    out = []
    for which, amax in (("a13", r.a13_amax), ("a2", r.a2_amax)):
        if not bool(torch.isfinite(amax)):
            raise ValueError(
                f"{name}: the calibrated {which} range is {float(amax)} (the sample batches produced "
                f"NaN or inf activations); calibrate on finite inputs"
            )
        if spec.fmt is Format.NVFP4:  # the global scale of a 16-wide block holding amax
            probe = amax.reshape(1, 1).expand(1, 16)
            out.append(formats.quantize(probe, spec.fmt).global_scale.reshape(1, 1).float())
        else:
            probe = amax.reshape(1, 1)
            out.append(formats.quantize(probe, spec.fmt, "tensor").scale.reshape(1, 1).float())
    return out[0], out[1]
