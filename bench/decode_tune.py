"""Time the decode kernel's tile variants (``moe_gemm.DECODE_BLOCK_N``,
``DECODE_WARPS``, ``DECODE_STAGES``, ``DECODE_UNROLL``) on each GEMM of the real shapes.

    python bench/decode_tune.py [--M 16] [--variants 64,4,4,0 128,4,3,2 ...]

A variant is ``BLOCK_N,warps,stages,unroll`` (unroll 0: the format's default).

One GEMM (w13 with the shape's activation, w2 with routing weights) over 32
of the shape's experts (all 8 for mixtral), CUDA graph, L2 flushed; prints
ms per variant and the best one, and the floor's % (weight bytes of the
touched experts / copy bandwidth).
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

mg = importlib.import_module("torch_moe_quant.kernels.moe_gemm")
sys.path.insert(0, "bench")
from _decode_gemms import decode_gemms  # noqa: E402
from moe_bench import SHAPES, Timer, copy_bandwidth  # noqa: E402

VARIANTS = [(64, 4, 4, 0), (64, 4, 3, 0), (128, 4, 3, 0), (128, 4, 2, 0), (64, 4, 4, 1)]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--M", type=int, nargs="*", default=[16])
    p.add_argument("--schemes", nargs="*", default=["int4_w4a16_g128", "mxfp4_w4a16", "nvfp4_w4a16"])
    p.add_argument("--shapes", nargs="*", default=list(SHAPES))
    p.add_argument("--variants", nargs="*", default=None)
    args = p.parse_args()
    variants = [tuple(int(x) for x in v.split(",")) for v in args.variants] if args.variants else VARIANTS
    dev = torch.device("cuda")
    timer = Timer(10)
    bw = copy_bandwidth()
    print(f"# copy bandwidth {bw / 1e12:.2f} TB/s; variants (BLOCK_N, warps, stages): {variants}")
    print("| shape | M | scheme | gemm | " + " | ".join(f"{v}" for v in variants) + " | best | % floor |")
    print("|---|---|---|---|" + "---|" * (len(variants) + 2))
    for gemm in decode_gemms(args.shapes, args.schemes, lambda _: args.M, dev):
        times = []
        for bn, warps, stages, unroll in variants:
            mg.DECODE_BLOCK_N, mg.DECODE_WARPS, mg.DECODE_STAGES = bn, warps, stages
            mg.DECODE_UNROLL = unroll or None
            try:
                times.append(timer.graph_ms(gemm.run))
            except Exception as e:  # noqa: BLE001 - a variant that does not compile / fit
                print(f"# {variants[len(times)]}: {type(e).__name__}: {str(e)[:100]}")
                times.append(float("inf"))
        best = min(range(len(times)), key=times.__getitem__)
        floor_ms = gemm.weight_bytes / bw * 1e3
        print(gemm.label() + " " + " | ".join(f"{t:.4f}" for t in times)
              + f" | {variants[best]} | {100 * floor_ms / times[best]:.0f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
