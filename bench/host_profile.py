"""Where the host time of one eager MoE call goes (no CUDA graph).

    PYTHONPATH=$PWD python3 bench/host_profile.py --schemes bf16 int4_w4a16_g128 fp8_w8a8_channel_token

For each scheme, on the ``--shape`` of ``moe_bench`` at ``M`` tokens: the
mean host time of ``torch.ops.moe_quant.experts_<scheme>`` over ``--calls``
back-to-back calls (``time.perf_counter`` around the loop, the GPU is not
waited for except once at the end, so with a short GPU workload this is the
host cost), and a cProfile of the same loop: the ``--top`` functions by own
time, so the hot spots of validation, config selection and kernel launch
are visible. The profile adds overhead of its own: read its proportions,
not its absolute numbers.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

import torch_moe_quant as tmq
from moe_bench import SHAPES, make_weights, route_for
from torch_moe_quant.activations import Activation


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schemes", nargs="*", default=["bf16", "int4_w4a16_g128", "fp8_w8a8_channel_token"])
    p.add_argument("--shape", default="qwen3-30b-a3b", choices=list(SHAPES))
    p.add_argument("--M", type=int, default=1)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    shape = SHAPES[args.shape]
    w13, w2, b13, b2 = make_weights(shape, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(args.M, shape.H, generator=g, device=dev).bfloat16()
    tw, ids = route_for(shape, torch.randn(args.M, shape.E, generator=g, device=dev))
    act = Activation(shape.activation)
    print(f"# {torch.cuda.get_device_name()} · torch {torch.__version__} · {args.shape} M={args.M}")
    for name in args.schemes:
        scheme = tmq.get_scheme(name)
        kw = dict(w13_bias=b13, w2_bias=b2, layout=shape.layout, pad_to=128)
        if scheme.static_activation:
            kw.update(a13_scale=torch.tensor(0.05, device=dev), a2_scale=torch.tensor(0.05, device=dev))
        experts = tmq.quantize_experts(w13, w2, scheme, **kw)

        def call():
            return tmq.fused_moe(x, experts, tw, ids, activation=act)

        for _ in range(5):
            call()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            call()
        host_us = (time.perf_counter() - t0) * 1e6 / args.calls
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            call()
        prof.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.top)
        print(f"\n## {name}: host {host_us:.0f} us per call\n```")
        print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[:6000])
        print("```", flush=True)
        del experts
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
