"""Time the decode kernel's tile variants (``moe_gemm.DECODE_BLOCK_N``,
``DECODE_WARPS``, ``DECODE_STAGES``) on each GEMM of the real shapes.

    python bench/decode_tune.py [--M 16]

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

import torch_moe_quant as tmq
from torch_moe_quant.activations import Activation, GateUpLayout

mg = importlib.import_module("torch_moe_quant.kernels.moe_gemm")
sys.path.insert(0, "bench")
from moe_bench import SHAPES, Timer, copy_bandwidth  # noqa: E402

VARIANTS = [(32, 2, 4), (64, 4, 4), (128, 4, 3), (128, 4, 4), (128, 4, 6), (128, 8, 4), (256, 8, 4)]


def main() -> int:
    from torch_moe_quant.kernels.align import align_triton
    from torch_moe_quant.kernels.config import GemmProblem, select_config

    p = argparse.ArgumentParser()
    p.add_argument("--M", type=int, nargs="*", default=[16])
    p.add_argument("--schemes", nargs="*", default=["int4_w4a16_g128", "mxfp4_w4a16", "nvfp4_w4a16"])
    p.add_argument("--shapes", nargs="*", default=list(SHAPES))
    args = p.parse_args()
    dev = torch.device("cuda")
    timer = Timer(10)
    bw = copy_bandwidth()
    print(f"# copy bandwidth {bw / 1e12:.2f} TB/s; variants (BLOCK_N, warps, stages): {VARIANTS}")
    print("| shape | M | scheme | gemm | " + " | ".join(f"{v}" for v in VARIANTS) + " | best | % floor |")
    print("|---|---|---|---|" + "---|" * (len(VARIANTS) + 2))
    for sname in args.shapes:
        shape = SHAPES[sname]
        g = torch.Generator(device=dev).manual_seed(0)
        E = shape.E if shape.E <= 8 else 32
        w13 = torch.randn(E, 2 * shape.I, shape.H, device=dev, dtype=torch.bfloat16, generator=g) / shape.H ** 0.5
        w2 = torch.randn(E, shape.H, shape.I, device=dev, dtype=torch.bfloat16, generator=g) / shape.I ** 0.5
        for scheme in args.schemes:
            ex = tmq.quantize_experts(w13, w2, scheme, layout=shape.layout, pad_to=128)
            for M in args.M:
                ids = torch.stack([torch.randperm(E, device=dev, generator=g)[: shape.top_k] for _ in range(M)]).int()
                tw = torch.rand(M, shape.top_k, device=dev, generator=g)
                touched = int(torch.unique(ids).numel())
                for name, w, a_rows, kw in (
                    ("w13", ex.w13, mg.ARows.TOKENS, dict(activation=Activation(shape.activation), layout=GateUpLayout(shape.layout))),
                    ("w2", ex.w2, mg.ARows.PAIRS, dict(topk_weights=tw)),
                ):
                    _, N, K = w.shape
                    rows = M if a_rows is mg.ARows.TOKENS else M * shape.top_k
                    a = torch.randn(rows, K, device=dev, dtype=torch.bfloat16, generator=g)
                    cfg = select_config(GemmProblem(M, N, K, E, shape.top_k, torch.bfloat16), ex.scheme, dev)
                    al = align_triton(ids, E, cfg.block_m)
                    common = dict(top_k=shape.top_k, a_rows=a_rows, config=cfg, kernel=mg.GemmKernel.DECODE, **kw)
                    times = []
                    for bn, warps, stages in VARIANTS:
                        mg.DECODE_BLOCK_N, mg.DECODE_WARPS, mg.DECODE_STAGES = bn, warps, stages
                        try:
                            times.append(timer.graph_ms(lambda: mg.moe_gemm(a, w, *al, **common)))
                        except Exception as e:  # noqa: BLE001 - a variant that does not compile / fit
                            print(f"# {VARIANTS[len(times)]}: {type(e).__name__}: {str(e)[:100]}")
                            times.append(float("inf"))
                    best = min(range(len(times)), key=times.__getitem__)
                    wbytes = sum(t.numel() * t.element_size() for t in (w.data, w.scale) if t is not None) / E * touched
                    floor_ms = wbytes / bw * 1e3
                    print(f"| {sname} | {M} | {scheme} | {name} | " + " | ".join(f"{t:.4f}" for t in times)
                          + f" | {VARIANTS[best]} | {100 * floor_ms / times[best]:.0f}% |", flush=True)
            del ex
        del w13, w2
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
