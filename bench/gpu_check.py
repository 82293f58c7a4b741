"""Correctness of the Triton MoE path on a CUDA GPU against the reference.

    python bench/gpu_check.py [--shapes small qwen3-30b-a3b ...] [--M 0 1 16 256 4096]

Every scheme whose weight format the grouped GEMM reads, on each shape and
M, compared with ``torch_moe_quant.reference.fused_moe`` (fp32 math on the
same quantized weights) by relative Frobenius error; plus expert_map with
half the experts absent and a batch where every token picks one expert.
Bound: 2e-2 (GEMM inputs are rounded to bf16, the reference multiplies in
fp32). Prints one line per case and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import sys

import torch

import torch_moe_quant as tmq
from torch_moe_quant.kernels.fused_experts import fused_experts_triton, supported_weight_formats
from torch_moe_quant.reference import fused_moe as reference_moe

sys.path.insert(0, "bench")
from moe_bench import SHAPES, Shape  # noqa: E402

SHAPES = dict(SHAPES, small=Shape("small", 16, 4, 512, 256), small_oss=Shape("small_oss", 16, 4, 576, 320, "swigluoai", "interleaved", True))
BOUND = 2e-2


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check(shape: Shape, M: int, scheme: str, w13, w2, b13, b2, mode: str) -> bool:
    dev = w13.device
    g = torch.Generator(device=dev).manual_seed(M)
    x = torch.randn(M, shape.H, device=dev, generator=g).bfloat16()
    logits = torch.randn(M, shape.E, device=dev, generator=g)
    tw, ids = tmq.route(logits, shape.top_k, "softmax_topk_renormalize")
    expert_map = None
    E_local = shape.E
    kw = dict(w13_bias=b13, w2_bias=b2, layout=shape.layout, pad_to=128)
    if tmq.get_scheme(scheme).static_activation:
        a13, a2 = tmq.calibrate_activation_scales(x, w13, w2, scheme, tw, ids, activation=shape.activation,
                                                  w13_bias=b13, w2_bias=b2, layout=shape.layout) if M else (torch.tensor(0.01), torch.tensor(0.01))
        kw.update(a13_scale=a13, a2_scale=a2)
    if mode == "one_expert":
        ids = torch.full_like(ids, 3)
    if mode == "expert_map":
        expert_map = torch.full((shape.E,), -1, dtype=torch.int32, device=dev)
        expert_map[1::2] = torch.arange(shape.E // 2, dtype=torch.int32, device=dev)
        E_local = shape.E // 2
        kw.update(w13_bias=None if b13 is None else b13[1::2], w2_bias=None if b2 is None else b2[1::2])
        experts = tmq.quantize_experts(w13[1::2], w2[1::2], scheme, **kw)
    else:
        experts = tmq.quantize_experts(w13, w2, scheme, **kw)
    assert experts.num_experts == E_local
    out = fused_experts_triton(x, experts, tw, ids, activation=shape.activation, expert_map=expert_map)
    torch.cuda.synchronize()
    ref = reference_moe(x, experts, tw, ids, activation=shape.activation, expert_map=expert_map)
    err = rel_err(out, ref) if M else 0.0
    ok = out.shape == ref.shape and (M == 0 or (err < BOUND and torch.isfinite(out).all().item()))
    print(f"{'ok  ' if ok else 'FAIL'} {shape.name:<14} M={M:<5} {scheme:<32} {mode:<10} rel_err={err:.2e}", flush=True)
    return ok


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="*", default=["small", "small_oss"])
    p.add_argument("--M", nargs="*", type=int, default=[0, 1, 16, 256])
    p.add_argument("--schemes", nargs="*", default=None)
    args = p.parse_args()
    dev = torch.device("cuda")
    fmts = supported_weight_formats()
    schemes = args.schemes or [n for n, s in tmq.SCHEMES.items() if s.weight.fmt is None or s.weight.fmt in fmts]
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; schemes: {len(schemes)}", flush=True)
    failures = 0
    for sname in args.shapes:
        shape = SHAPES[sname]
        torch.manual_seed(0)
        w13 = (torch.randn(shape.E, 2 * shape.I, shape.H, device=dev) / shape.H**0.5).bfloat16()
        w2 = (torch.randn(shape.E, shape.H, shape.I, device=dev) / shape.I**0.5).bfloat16()
        b13 = torch.randn(shape.E, 2 * shape.I, device=dev).bfloat16() * 0.1 if shape.bias else None
        b2 = torch.randn(shape.E, shape.H, device=dev).bfloat16() * 0.1 if shape.bias else None
        for scheme in schemes:
            for M in args.M:
                failures += not check(shape, M, scheme, w13, w2, b13, b2, "plain")
            failures += not check(shape, 16, scheme, w13, w2, b13, b2, "expert_map")
            failures += not check(shape, 16, scheme, w13, w2, b13, b2, "one_expert")
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
