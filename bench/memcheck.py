"""Small CUDA-kernel runs for ``compute-sanitizer``.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python bench/memcheck.py

1. ``torch_moe_quant.fused_moe`` (the op's CUDA kernel: activation
   quantization, align, both grouped GEMMs, combine) on a small layer (E=16,
   top_k=4, H=512 with 64 columns of padding, I=256; gpt-oss layout with
   biases for mxfp4) at M = 1 and 16, for one scheme per weight format and
   per activation-quantization path (row codes + native fp8 / int8 dot,
   static exact codes, ``qdq_rows``, and the ``ActInput.PROLOGUE`` GEMM
   prologue), with and without an ``expert_map`` that drops half the pairs.
2. ``kernels.route.route_triton`` for every routing method at M = 1, 16, 33
   (E=16, k=4; DeepSeek-V3 with 4 groups of which 2 are kept).

With the caching allocator off, memcheck sees every tensor's exact extent,
so an out-of-bounds load or store in a kernel is reported instead of landing
in a neighbouring block.
"""

from __future__ import annotations

import sys

import torch

import torch_moe_quant as tmq
from torch_moe_quant.kernels.fused_experts import ActInput, fused_experts_triton

SCHEMES = [
    # weight formats
    "bf16", "fp16", "fp32", "fp8_w8a16_channel", "int8_w8a16_channel", "int4_w4a16_g128_zp",
    "int4_w4a16_gptq_g128_actorder", "mxfp4_w4a16", "nvfp4_w4a16",
    # activation paths: per-row codes + native dot; static exact codes; qdq_rows / prologue on groups
    "fp8_w8a8_channel_token", "int8_w8a8_channel_token", "int4_w4a8_g128", "fp8_w8a8_tensor_static",
    "int8_w8a8_tensor_static", "fp8_w8a8_block128", "mxfp6_e2m3_w6a6", "mxfp6_e3m2_w6a6",
    "mxfp4_w4a8_mxfp8", "mxfp4_w4a8_fp8", "nvfp4_w4a4",
]
#: schemes whose activation scales are local to a K tile, also run with the GEMM prologue
_PROLOGUE = ("fp8_w8a8_tensor_static", "fp8_w8a8_block128", "mxfp6_e2m3_w6a6", "mxfp4_w4a8_mxfp8", "nvfp4_w4a4")


def route_cases(dev) -> int:
    from torch_moe_quant.kernels.route import route_triton
    from torch_moe_quant.routing import RoutingMethod

    g = torch.Generator(device=dev).manual_seed(1)
    E, k, n = 16, 4, 0
    for method in RoutingMethod:
        kw = {}
        if method is RoutingMethod.DEEPSEEK_V3:
            kw = dict(correction_bias=torch.randn(E, generator=g, device=dev) * 0.1, num_groups=4, topk_groups=2,
                      routed_scaling_factor=2.5)
        for M in (1, 16, 33):
            logits = torch.randn(M, E, generator=g, device=dev).bfloat16()
            w, ids = route_triton(logits, k, method, **kw)
            torch.cuda.synchronize()
            n += 1
        print(f"route {method.value:<28} ok  ids in range={bool(((ids >= 0) & (ids < E)).all())}", flush=True)
    return n


def main() -> int:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    E, k, H, I = 16, 4, 512, 256
    w13 = (torch.randn(E, 2 * I, H, generator=g, device=dev) / H**0.5).bfloat16()
    w2 = (torch.randn(E, H, I, generator=g, device=dev) / I**0.5).bfloat16()
    b13 = torch.randn(E, 2 * I, generator=g, device=dev).bfloat16()
    b2 = torch.randn(E, H, generator=g, device=dev).bfloat16()
    emap = torch.full((2 * E,), -1, dtype=torch.int32, device=dev)
    emap[1::2] = torch.arange(E, dtype=torch.int32, device=dev)
    batches = []
    for M in (1, 16):
        x = torch.randn(M, H - 64, generator=g, device=dev).bfloat16()  # padded hidden size
        tw, ids = tmq.route(torch.randn(M, E, generator=g, device=dev), k, "softmax_topk_renormalize")
        batches.append((x, tw, ids, ids * 2 + 1 - (ids % 2)))  # global ids: half on absent experts
    names = [n for n in SCHEMES if n in tmq.SCHEMES]
    runs = 0
    for name in names:
        scheme = tmq.get_scheme(name)
        oss = "mxfp4" in name
        kw = dict(w13_bias=b13, w2_bias=b2[:, : H - 64], layout="interleaved") if oss else {}
        if scheme.static_activation:
            kw.update(a13_scale=torch.tensor(0.05), a2_scale=torch.tensor(0.05))
        experts = tmq.quantize_experts(w13[:, :, : H - 64], w2[:, : H - 64], scheme, pad_to=128, **kw)
        act = "swigluoai" if oss else "silu"
        inputs = (ActInput.QDQ_KERNEL, ActInput.PROLOGUE) if name in _PROLOGUE else (ActInput.QDQ_KERNEL,)
        finite = True
        for x, tw, ids, ids_global in batches:
            for act_input in inputs:
                out = fused_experts_triton(x, experts, tw, ids, activation=act, act_input=act_input)
                out_map = fused_experts_triton(
                    x, experts, tw, ids_global, activation=act, expert_map=emap, act_input=act_input
                )
                torch.cuda.synchronize()
                finite &= bool(out.isfinite().all()) and bool(out_map.isfinite().all())
                runs += 2
        print(f"{name:<32} ok  finite={finite} ({'+'.join(i.value for i in inputs)})", flush=True)
    n_route = route_cases(dev)
    print(f"{len(names)} schemes, {runs} expert forwards, {n_route} routing calls ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
