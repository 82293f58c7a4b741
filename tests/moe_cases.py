"""Tiny MoE layers shared by the op, compile and gradient tests."""

from __future__ import annotations

import torch

import torch_moe_quant as tmq

# H and I multiples of 128 so every scheme (int4 g128, fp8 128x128) fits.
E, H, I, K = 4, 128, 128, 2


def layer_weights(seed: int = 0, E=E, H=H, I=I):
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).bfloat16()
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).bfloat16()
    return w13, w2


def make_experts(name: str, seed: int = 0, **kwargs) -> tmq.QuantizedExperts:
    """Experts of scheme ``name``; static schemes are calibrated on sample inputs."""
    w13, w2 = layer_weights(seed)
    if tmq.get_scheme(name).static_activation:
        w, ids = routing(64, seed=10)
        a13, a2 = tmq.calibrate_activation_scales(inputs(64, seed=11), w13, w2, name, w, ids)
        kwargs.update(a13_scale=a13, a2_scale=a2)
    return tmq.quantize_experts(w13, w2, name, **kwargs)


def routing(M: int, seed: int = 1, top_k: int = K, num_experts: int = E):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(M, num_experts, generator=g)
    return tmq.route(logits, top_k, "softmax_topk_renormalize")


def inputs(M: int, seed: int = 2, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, H, generator=g).to(dtype)


class MoEBlock(torch.nn.Module):
    """Router + routing op + experts op, the shape of a real MoE block."""

    def __init__(self, experts: tmq.QuantizedExperts, top_k: int = K):
        super().__init__()
        self.experts = experts
        self.top_k = top_k
        g = torch.Generator().manual_seed(3)
        self.router = torch.nn.Parameter(torch.randn(experts.num_experts, experts.hidden_size, generator=g) / 8)

    def forward(self, x):
        logits = x.float() @ self.router.float().T
        w, ids = torch.ops.moe_quant.route(logits, self.top_k, "softmax_topk_renormalize")
        return tmq.fused_moe(x, self.experts, w, ids)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error ``|a - b| / |b|`` in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
