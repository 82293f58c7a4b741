"""One small MoE forward per weight format, for ``compute-sanitizer``.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python bench/memcheck.py

Runs ``torch_moe_quant.fused_moe`` (the op's CUDA kernel: align, both
grouped GEMMs, combine) on a small layer (E=16, top_k=4, H=512, I=256,
M=16; gpt-oss layout with biases for mxfp4) for one scheme per weight
format, with and without an ``expert_map``. With the caching allocator off,
memcheck sees every tensor's exact extent, so an out-of-bounds load or store
in a kernel is reported instead of landing in a neighbouring block.
"""

from __future__ import annotations

import sys

import torch

import torch_moe_quant as tmq

SCHEMES = [
    "bf16", "fp16", "fp8_w8a16_channel", "fp8_w8a8_block128", "int8_w8a8_channel_token",
    "int4_w4a16_g128_zp", "int4_w4a16_gptq_g128_actorder", "mxfp4_w4a16", "mxfp6_e2m3_w6a6",
    "mxfp6_e3m2_w6a6", "mxfp4_w4a8_mxfp8", "nvfp4_w4a4",
]


def main() -> int:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    E, k, H, I, M = 16, 4, 512, 256, 16
    w13 = (torch.randn(E, 2 * I, H, generator=g, device=dev) / H**0.5).bfloat16()
    w2 = (torch.randn(E, H, I, generator=g, device=dev) / I**0.5).bfloat16()
    b13 = torch.randn(E, 2 * I, generator=g, device=dev).bfloat16()
    b2 = torch.randn(E, H, generator=g, device=dev).bfloat16()
    x = torch.randn(M, H - 64, generator=g, device=dev).bfloat16()  # padded hidden size
    tw, ids = tmq.route(torch.randn(M, E, generator=g, device=dev), k, "softmax_topk_renormalize")
    emap = torch.full((2 * E,), -1, dtype=torch.int32, device=dev)
    emap[1::2] = torch.arange(E, dtype=torch.int32, device=dev)
    ids_global = ids * 2 + 1 - (ids % 2)  # half the pairs land on absent experts
    names = [n for n in SCHEMES if n in tmq.SCHEMES]
    for name in names:
        scheme = tmq.get_scheme(name)
        oss = "mxfp4" in name
        kw = dict(w13_bias=b13, w2_bias=b2[:, : H - 64], layout="interleaved") if oss else {}
        if scheme.static_activation:
            kw.update(a13_scale=torch.tensor(0.05), a2_scale=torch.tensor(0.05))
        experts = tmq.quantize_experts(w13[:, :, : H - 64], w2[:, : H - 64], scheme, pad_to=128, **kw)
        act = "swigluoai" if oss else "silu"
        out = tmq.fused_moe(x, experts, tw, ids, activation=act)
        out_map = tmq.fused_moe(x, experts, tw, ids_global, activation=act, expert_map=emap)
        torch.cuda.synchronize()
        print(f"{name:<32} ok  finite={bool(out.isfinite().all())} {bool(out_map.isfinite().all())}", flush=True)
    print(f"{len(names)} schemes ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
