"""MoE expert-compute benchmark on one GPU.

    python bench/moe_bench.py --out bench/results/h100.md

For each model shape, M (tokens) and scheme it times, with
``triton.testing.do_bench`` (median, L2 flushed between runs):

* ``triton``: our Triton path (``kernels.fused_experts_triton``: align ->
  GEMM1 (+dequant in the main loop) -> activation -> GEMM2 -> top-k sum),
  routing ids given;
* ``bf16 grouped_mm``: the plain-PyTorch bf16 MoE a user would write
  (sort -> ``torch._grouped_mm`` -> act -> ``torch._grouped_mm`` -> weighted sum);
* ``dequant+grouped_mm``: the scheme's own weights dequantized to bf16 on
  every call, then the bf16 grouped_mm path;

and reports the speed-up over bf16 grouped_mm and the % of the roofline floor
``max(weight bytes read / 3.0 TB/s, flops / 782 TFLOP/s)`` (weight bytes of
the experts the batch actually touches). Each Triton result is checked
against the dequant+grouped_mm output (relative Frobenius error printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import List

import torch
import torch.nn.functional as F

import torch_moe_quant as tmq
from torch_moe_quant.activations import apply_activation
from torch_moe_quant.reference import dequantize_weight

HBM_BYTES_PER_S = 3.0e12
BF16_FLOPS = 782e12


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    E: int
    top_k: int
    H: int
    I: int
    activation: str = "silu"
    layout: str = "gate_up"
    bias: bool = False


SHAPES = {
    s.name: s
    for s in (
        Shape("qwen3-30b-a3b", 128, 8, 2048, 768),
        Shape("gpt-oss-120b", 128, 4, 2880, 2880, "swigluoai", "interleaved", True),
        Shape("mixtral-8x7b", 8, 2, 4096, 14336),
        Shape("deepseek-v3", 256, 8, 7168, 2048),
    )
}


def grouped_mm_moe(x, w13, w2, topk_weights, topk_ids, shape: Shape, b13=None, b2=None):
    """bf16 MoE with torch._grouped_mm: sort pairs by expert, two grouped
    GEMMs, activation, weighted scatter-sum."""
    M, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=shape.E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x[order // k]
    h = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs)
    if b13 is not None:
        h = h + b13[flat[order]]
    a = apply_activation(h.float(), tmq.Activation(shape.activation), tmq.GateUpLayout(shape.layout)).to(x.dtype)
    y = torch._grouped_mm(a, w2.transpose(-2, -1), offs=offs)
    if b2 is not None:
        y = y + b2[flat[order]]
    y = y.float() * topk_weights.reshape(-1)[order, None]
    out = torch.zeros(M, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, order // k, y)
    return out.to(x.dtype)


def roofline_ms(shape: Shape, M: int, topk_ids, bytes_per_expert: float) -> float:
    touched = int(torch.unique(topk_ids).numel())
    bytes_read = touched * bytes_per_expert
    flops = 2 * M * shape.top_k * (2 * shape.I * shape.H + shape.H * shape.I)
    return max(bytes_read / HBM_BYTES_PER_S, flops / BF16_FLOPS) * 1e3


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=list(SHAPES))
    p.add_argument("--M", nargs="*", type=int, default=[1, 16, 256, 4096])
    p.add_argument("--schemes", nargs="*", default=["bf16", "fp8_w8a16_channel", "int4_w4a16_g128", "mxfp4_w4a16"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from torch_moe_quant.kernels.fused_experts import fused_experts_triton

    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows: List[str] = [
        "| shape | M | scheme | triton ms | bf16 grouped_mm ms | dequant+grouped_mm ms | speed-up vs bf16 | % of roofline | rel err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for sname in args.shapes:
        shape = SHAPES[sname]
        t0 = time.time()
        w13 = (torch.randn(shape.E, 2 * shape.I, shape.H, device=dev) / shape.H**0.5).bfloat16()
        w2 = (torch.randn(shape.E, shape.H, shape.I, device=dev) / shape.I**0.5).bfloat16()
        b13 = torch.randn(shape.E, 2 * shape.I, device=dev).bfloat16() * 0.1 if shape.bias else None
        b2 = torch.randn(shape.E, shape.H, device=dev).bfloat16() * 0.1 if shape.bias else None
        for M in args.M:
            x = torch.randn(M, shape.H, device=dev).bfloat16()
            logits = torch.randn(M, shape.E, device=dev)
            tw, ids = tmq.route(logits, shape.top_k, "softmax_topk_renormalize")
            base_ms = bench_ms(lambda: grouped_mm_moe(x, w13, w2, tw, ids, shape, b13, b2))
            for scheme in args.schemes:
                experts = tmq.quantize_experts(
                    w13, w2, scheme, w13_bias=b13, w2_bias=b2, layout=shape.layout, pad_to=128
                )
                Hp = experts.padded_hidden_size

                def dequant_path():
                    d13 = dequantize_weight(experts.w13, torch.bfloat16)
                    d2 = dequantize_weight(experts.w2, torch.bfloat16)
                    xp = F.pad(x, (0, Hp - shape.H))
                    return grouped_mm_moe(xp, d13, d2, tw, ids, shape, experts.w13_bias, experts.w2_bias)[:, : shape.H]

                def triton_path():
                    return fused_experts_triton(x, experts, tw, ids, activation=shape.activation)

                out = triton_path()
                err = rel_err(out, dequant_path())
                tri_ms = bench_ms(triton_path)
                deq_ms = bench_ms(dequant_path)
                per_expert = experts.nbytes / shape.E
                floor = roofline_ms(shape, M, ids, per_expert)
                rows.append(
                    f"| {sname} | {M} | {scheme} | {tri_ms:.3f} | {base_ms:.3f} | {deq_ms:.3f} | "
                    f"{base_ms / tri_ms:.2f}x | {100 * floor / tri_ms:.0f}% | {err:.1e} |"
                )
                print(rows[-1], flush=True)
                del experts
                torch.cuda.empty_cache()
        print(f"# {sname}: {time.time() - t0:.0f} s", flush=True)
        del w13, w2
        torch.cuda.empty_cache()
    table = "\n".join(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"{torch.cuda.get_device_name()} · torch {torch.__version__}\n\n")
            f.write("Command: `python bench/moe_bench.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`\n\n" + table + "\n")


if __name__ == "__main__":
    main()
