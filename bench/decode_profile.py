"""One decode-kernel GEMM per weight format, for ``ncu`` (issue 18 profiling).

    ncu --clock-control none --kernel-name regex:moe_decode_kernel --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        python bench/decode_profile.py int4_w4a16_g128

Runs mixtral-8x7b's w13 GEMM (all 8 experts, M = 16 tokens, top-2) five times
on the decode kernel.
"""

from __future__ import annotations

import importlib
import sys

import torch

import torch_moe_quant as tmq
from torch_moe_quant.kernels.align import align_triton
from torch_moe_quant.kernels.config import GemmProblem, select_config

mg = importlib.import_module("torch_moe_quant.kernels.moe_gemm")  # the module (the package exports the function)


def main() -> int:
    scheme = sys.argv[1] if len(sys.argv) > 1 else "int4_w4a16_g128"
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    E, H, I, top_k, M = 8, 4096, 14336, 2, 16
    w13 = torch.randn(E, 2 * I, H, device=dev, dtype=torch.bfloat16, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, I, device=dev, dtype=torch.bfloat16, generator=g) / I ** 0.5
    ex = tmq.quantize_experts(w13, w2, scheme, pad_to=128)
    ids = torch.stack([torch.randperm(E, device=dev, generator=g)[:top_k] for _ in range(M)]).int()
    a = torch.randn(M, H, device=dev, dtype=torch.bfloat16, generator=g)
    cfg = select_config(GemmProblem(M, 2 * I, H, E, top_k, torch.bfloat16), ex.scheme, dev)
    al = align_triton(ids, E, cfg.block_m)
    for _ in range(5):
        mg.moe_gemm(a, ex.w13, *al, top_k=top_k, a_rows=mg.ARows.TOKENS, config=cfg, kernel=mg.GemmKernel.DECODE)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
