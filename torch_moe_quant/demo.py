"""``python -m torch_moe_quant.demo``: quantize a small MoE layer with a few
schemes and print weight bytes, accuracy against bf16 and time per call.

Runs on CPU in well under two minutes; uses the GPU when one is present.
"""

from __future__ import annotations

import argparse
import time

import torch

import torch_moe_quant as tmq
from torch_moe_quant.tools.accuracy import sqnr_db

DEFAULT_SCHEMES = ("bf16", "fp8_w8a8_channel_token", "int4_w4a16_g128", "mxfp4_w4a16", "nvfp4_w4a16")


def _time_ms(fn, iters: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / iters


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--schemes", nargs="*", default=list(DEFAULT_SCHEMES))
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    E, H, I, M = args.experts, args.hidden, args.intermediate, args.tokens
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).bfloat16()
    w2 = (torch.randn(E, H, I, generator=g) / I**0.5).bfloat16()
    x = torch.randn(M, H, generator=g).bfloat16().to(device)
    router = torch.randn(M, E, generator=g).to(device)
    weights, ids = tmq.route(router, args.top_k, "softmax_topk_renormalize")

    print(f"MoE layer: E={E} H={H} I={I}, {M} tokens, top_k={args.top_k}, device={device}")
    ref = None
    header = f"{'scheme':<26}{'weight MiB':>11}{'SQNR dB':>9}{'eager ms':>10}"
    print(header)
    print("-" * len(header))
    for name in args.schemes:
        experts = tmq.quantize_experts(w13, w2, name).to(device)
        out = tmq.fused_moe(x, experts, weights, ids)
        if ref is None:
            ref = out.float()
        ms = _time_ms(lambda: tmq.fused_moe(x, experts, weights, ids), args.iters)
        print(f"{name:<26}{experts.nbytes / 2**20:>11.2f}{sqnr_db(ref, out):>9.1f}{ms:>10.2f}")


if __name__ == "__main__":
    main()
