"""Accuracy of a scheme against the bf16 layer, measured as SQNR.

``python -m torch_moe_quant.tools.accuracy`` prints the README's table.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from ..experts import quantize_experts
from ..reference import calibrate_activation_scales, fused_moe
from ..routing import route
from ..schemes import SCHEMES, get_scheme


def sqnr_db(signal: torch.Tensor, approx: torch.Tensor) -> float:
    """``10 log10(|signal|^2 / |signal - approx|^2)`` in float64 (inf if equal)."""
    s, a = signal.double(), approx.double()
    noise = (s - a).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(s.pow(2).sum().item() / noise)


@dataclasses.dataclass(frozen=True)
class RandomLayer:
    """A random MoE layer; weights scaled so activations stay O(1)."""

    E: int = 8
    H: int = 256
    I: int = 512
    M: int = 64
    top_k: int = 2
    seed: int = 0

    def tensors(self):
        g = torch.Generator().manual_seed(self.seed)
        w13 = torch.randn(self.E, 2 * self.I, self.H, generator=g) / self.H**0.5
        w2 = torch.randn(self.E, self.H, self.I, generator=g) / self.I**0.5
        x = torch.randn(self.M, self.H, generator=g).bfloat16()
        logits = torch.randn(self.M, self.E, generator=g)
        return x, w13.bfloat16(), w2.bfloat16(), logits


def scheme_sqnr(scheme, layer: Optional[RandomLayer] = None) -> float:
    """SQNR (dB) of ``fused_moe`` under ``scheme`` vs the bf16 layer.

    Static activation scales are calibrated on the same inputs."""
    scheme = get_scheme(scheme)
    layer = layer or RandomLayer()
    x, w13, w2, logits = layer.tensors()
    weights, ids = route(logits, layer.top_k, "softmax_topk_renormalize")
    ref = fused_moe(x.float(), quantize_experts(w13, w2, "bf16"), weights, ids)
    scales = {}
    if scheme.static_activation:
        a13, a2 = calibrate_activation_scales(x, w13, w2, scheme, weights, ids)
        scales = dict(a13_scale=a13, a2_scale=a2)
    experts = quantize_experts(w13, w2, scheme, **scales)
    return sqnr_db(ref, fused_moe(x.float(), experts, weights, ids))


def markdown_table(layer: Optional[RandomLayer] = None) -> str:
    layer = layer or RandomLayer()
    rows = [
        f"SQNR of `fused_moe` vs the bf16 layer (E={layer.E}, H={layer.H}, I={layer.I}, "
        f"M={layer.M}, top_k={layer.top_k}); `python -m torch_moe_quant.tools.accuracy`",
        "",
        "| scheme | weights | activations | weight bits | SQNR (dB) |",
        "|---|---|---|---|---|",
    ]
    for name, s in SCHEMES.items():
        act = s.activation or "—"
        rows.append(f"| `{name}` | {s.weight} | {act} | {s.weight.bits} | {scheme_sqnr(s, layer):.1f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
