"""GPU check of the decode kernel (``moe_gemm`` with ``GemmKernel.DECODE``).

    python bench/decode_check.py

1. The PTX decoders are bit-exact: on every GEMM below, the decode kernel with
   ``ASM=True`` (the ``lop3`` / ``prmt`` decode) and with ``ASM=False`` (plain
   Triton shifts and masks) must give bit-identical outputs (same bf16 values
   enter the same dots in the same order).
2. Decode vs the grouped kernel vs ``moe_gemm_ref`` (relative Frobenius error)
   at the real shapes of ``moe_bench.SHAPES`` for M in {1, 16, 256}, both GEMMs
   (w13 with the shape's activation, w2 with routing weights), every int4 / fp4
   weight-only scheme the decode kernel takes.
3. Times of both kernels for each GEMM (CUDA graph, L2 flushed).
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
from moe_bench import SHAPES, Timer, rel_err  # noqa: E402

SCHEMES = [
    "int4_w4a16_g128", "int4_w4a16_channel", "mxfp4_w4a16", "nvfp4_w4a16", "int4_w4a16_g32", "int4_w4a16_g64",
    "int4_w4a16_g128_zp", "int4_w4a16_gptq_g128", "int4_w4a16_awq_g128", "fp8_w8a16_channel", "fp8_w8a16_block128",
]


def main() -> int:
    from torch_moe_quant.kernels.align import align_triton
    from torch_moe_quant.kernels.config import GemmProblem, select_config

    p = argparse.ArgumentParser()
    p.add_argument("--schemes", nargs="*", default=SCHEMES)
    p.add_argument("--M", type=int, nargs="*", default=[1, 16, 256])
    p.add_argument("--shapes", nargs="*", default=list(SHAPES))
    args = p.parse_args()
    dev = torch.device("cuda")
    timer = Timer(10)
    fails = 0
    print("| shape | M | scheme | gemm | decode ms | grouped ms | speed-up | err decode | err grouped | asm==plain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for sname in args.shapes:
        shape = SHAPES[sname]
        g = torch.Generator(device=dev).manual_seed(0)
        E, H, I = shape.E, shape.H, shape.I
        # a quarter of the experts (the kernels are per expert; full size only for mixtral)
        E_run = E if E <= 8 else 32
        w13 = torch.randn(E_run, 2 * I, H, device=dev, dtype=torch.bfloat16, generator=g) / H ** 0.5
        w2 = torch.randn(E_run, H, I, device=dev, dtype=torch.bfloat16, generator=g) / I ** 0.5
        for scheme in args.schemes:
            ex = tmq.quantize_experts(w13, w2, scheme, layout=shape.layout, pad_to=128)
            for M in args.M:
                x = torch.randn(M, ex.padded_hidden_size, device=dev, dtype=torch.bfloat16, generator=g)
                ids = torch.stack([torch.randperm(E_run, device=dev, generator=g)[: shape.top_k] for _ in range(M)]).int()
                tw = torch.rand(M, shape.top_k, device=dev, generator=g)
                for name, w, a_rows, kw in (
                    ("w13", ex.w13, mg.ARows.TOKENS, dict(activation=Activation(shape.activation), layout=GateUpLayout(shape.layout))),
                    ("w2", ex.w2, mg.ARows.PAIRS, dict(topk_weights=tw)),
                ):
                    E_, N, K = w.shape
                    a = x if a_rows is mg.ARows.TOKENS else torch.randn(M * shape.top_k, K, device=dev, dtype=torch.bfloat16, generator=g)
                    cfg = select_config(GemmProblem(M, N, K, E_run, shape.top_k, torch.bfloat16), ex.scheme, dev)
                    al = align_triton(ids, E_run, cfg.block_m)
                    common = dict(top_k=shape.top_k, a_rows=a_rows, config=cfg, **kw)
                    dec = mg.moe_gemm(a, w, *al, kernel=mg.GemmKernel.DECODE, **common)
                    grp = mg.moe_gemm(a, w, *al, kernel=mg.GemmKernel.GROUPED, **common)
                    ref = mg.moe_gemm_ref(a, w, *al, **common)
                    # plain-Triton decode on the GPU (ASM=False) must be bit-identical
                    km = mg._kernel_module()
                    plain = torch.zeros_like(dec)
                    call = mg._check_call(a, w, *al, shape.top_k, a_rows, None, kw.get("topk_weights"), None, cfg,
                                          kw.get("activation"), kw.get("layout", GateUpLayout.GATE_UP))
                    order = mg.decode_order(call.op, None, cfg, torch.bfloat16, dev, mg.GemmKernel.DECODE)
                    mg._launch_decode(call, order.permute(a), plain, torch.bfloat16, km, False, mg.NATURAL)
                    same = torch.equal(plain.view(torch.int16), dec.view(torch.int16))
                    e_d, e_g = rel_err(dec, ref), rel_err(grp, ref)
                    t_d = timer.graph_ms(lambda: mg.moe_gemm(a, w, *al, kernel=mg.GemmKernel.DECODE, **common))
                    t_g = timer.graph_ms(lambda: mg.moe_gemm(a, w, *al, kernel=mg.GemmKernel.GROUPED, **common))
                    bad = (not same) or e_d > max(2 * e_g, 1e-2)
                    fails += bad
                    print(f"| {sname} | {M} | {scheme} | {name} | {t_d:.4f} | {t_g:.4f} | {t_g / t_d:.2f}x "
                          f"| {e_d:.1e} | {e_g:.1e} | {same}{' FAIL' if bad else ''} |", flush=True)
            del ex
        del w13, w2
        torch.cuda.empty_cache()
    print(f"# decode_check: {fails} failures")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
