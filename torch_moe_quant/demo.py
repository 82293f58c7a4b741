"""``python -m torch_moe_quant.demo``: quantize a small MoE block with a few
schemes, compile it with ``torch.compile(fullgraph=True, dynamic=True)`` and
print, per scheme: weight bytes, SQNR against the bf16 block, eager and
compiled time per call, and which ``moe_quant`` ops the compiled graph calls.

Runs on CPU in well under two minutes; uses the GPU when one is present.
On CPU every op runs its plain-PyTorch reference kernel, so times there
measure the reference, not the fused kernels.
"""

from __future__ import annotations

import argparse
import time
from typing import List

import torch

import torch_moe_quant as tmq
from torch_moe_quant.tools.accuracy import sqnr_db

DEFAULT_SCHEMES = ("bf16", "fp8_w8a8_channel_token", "int4_w4a16_g128", "mxfp4_w4a16", "nvfp4_w4a4")


class MoEBlock(torch.nn.Module):
    """A router (Linear) + softmax/top-k/renormalize routing + quantized experts."""

    def __init__(self, router: torch.nn.Linear, experts: tmq.QuantizedExperts, top_k: int):
        super().__init__()
        self.router, self.experts, self.top_k = router, experts, top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x).float()
        weights, ids = torch.ops.moe_quant.route(logits, self.top_k, "softmax_topk_renormalize")
        return tmq.fused_moe(x, self.experts, weights, ids)


def _time_ms(fn, iters: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / iters


def _compile_recording_ops(block: torch.nn.Module, ops: List[str]):
    """``torch.compile`` (Inductor) that also records the moe_quant ops of the
    captured graph into ``ops``."""

    def backend(gm, example_inputs):
        ops.extend(
            str(n.target).replace(".default", "")
            for n in gm.graph.nodes
            if n.op == "call_function" and "moe_quant" in str(n.target)
        )
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    return torch.compile(block, fullgraph=True, dynamic=True, backend=backend)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--schemes", nargs="*", default=list(DEFAULT_SCHEMES), choices=sorted(tmq.SCHEMES))
    args = p.parse_args(argv)

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    E, H, I, M = args.experts, args.hidden, args.intermediate, args.tokens
    w13 = (torch.randn(E, 2 * I, H) / H**0.5).bfloat16()
    w2 = (torch.randn(E, H, I) / I**0.5).bfloat16()
    router = torch.nn.Linear(H, E, bias=False).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(M, H).bfloat16().to(device)

    print(f"MoE block: E={E} experts, H={H}, I={I}, top_k={args.top_k}, {M} tokens, device={device}")
    if device == "cpu":
        print("(CPU: ops run their reference kernels; times measure the reference)")
    header = f"{'scheme':<24}{'weights MiB':>12}{'SQNR dB':>9}{'eager ms':>10}{'compiled ms':>13}  compiled graph calls"
    print(header)
    print("-" * len(header))
    ref = None
    with torch.no_grad():
        for name in args.schemes:
            scales = {}
            if tmq.get_scheme(name).static_activation:
                w, ids = tmq.route(router(x).float().cpu(), args.top_k, "softmax_topk_renormalize")
                a13, a2 = tmq.calibrate_activation_scales(x.cpu(), w13, w2, name, w, ids)
                scales = dict(a13_scale=a13, a2_scale=a2)
            block = MoEBlock(router, tmq.quantize_experts(w13, w2, name, **scales).to(device), args.top_k)
            out = block(x)
            ref = out.float() if ref is None else ref
            torch._dynamo.reset()  # a fresh compile per scheme
            ops: List[str] = []
            compiled = _compile_recording_ops(block, ops)
            eager_ms = _time_ms(lambda: block(x), args.iters)
            compiled_ms = _time_ms(lambda: compiled(x), args.iters)
            sqnr = sqnr_db(ref, out)
            print(
                f"{name:<24}{block.experts.nbytes / 2**20:>12.2f}{sqnr:>9.1f}{eager_ms:>10.2f}"
                f"{compiled_ms:>13.2f}  {', '.join(ops)}"
            )


if __name__ == "__main__":
    main()
