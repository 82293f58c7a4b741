"""``kernels.route.route_triton`` against ``routing.route`` on a GPU: exact
ids, weight error, and time of both.

    PYTHONPATH=$PWD python3 bench/route_check.py [--dtype bfloat16] [--iters 50]

For every routing method, M in {1, 16, 4096} and expert shapes E=128 k=8,
E=8 k=2, E=256 k=8 (DeepSeek-V3: 8 groups, 4 kept, correction bias, scaling
2.5; the other methods plain), E=128 k=4: the number of ids that differ
(must be 0), the largest elementwise relative weight error, and the median
of ``--iters`` CUDA-event timings of the reference, of ``route_triton`` (its
host validation included: the eager NaN check is one host sync, as in the
reference) and of the launch alone (``route_unchecked``, what runs under
``torch.compile`` or CUDA-graph capture), all host overhead included; then
the device time of the reference and of the kernel alone, replayed from a
CUDA graph. Prints a markdown table; exits non-zero if any id differs.
"""

from __future__ import annotations

import argparse
import sys

import torch

from torch_moe_quant import routing
from torch_moe_quant.kernels.autotune import cuda_time_ms
from torch_moe_quant.kernels.route import check_route, route_triton, route_unchecked
from torch_moe_quant.routing import RoutingMethod

M_VALUES = (1, 16, 4096)
#: (num_experts, top_k, DeepSeek-V3 groups or None)
EXPERT_SHAPES = ((128, 8, None), (8, 2, None), (256, 8, (8, 4)), (128, 4, None))


def _kwargs(method, E, groups, device):
    if method is not RoutingMethod.DEEPSEEK_V3:
        return {}
    g = torch.Generator(device="cpu").manual_seed(E)
    kw = dict(correction_bias=(torch.randn(E, generator=g) * 0.1).to(device), routed_scaling_factor=2.5)
    if groups is not None:
        kw.update(num_groups=groups[0], topk_groups=groups[1])
    return kw


def _median_ms(fn, iters):
    for _ in range(4):  # cuda_time_ms warms up once more
        fn()
    return cuda_time_ms(fn, iters)


def _graph_ms(fn, iters, calls=10):
    """Device time of one call: ``calls`` calls captured in a CUDA graph,
    replayed (no host overhead; the host NaN checks are skipped under capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return _median_ms(graph.replay, iters) / calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    print(f"device: {torch.cuda.get_device_name()}, logits {args.dtype}, median of {args.iters}\n")
    print(
        "| method | M | E | k | groups | ids differ | max rel w err | ref ms | triton ms | launch ms "
        "| ref graph us | kernel graph us |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    failures = 0
    for method in RoutingMethod:
        for E, k, groups in EXPERT_SHAPES:
            for M in M_VALUES:
                g = torch.Generator(device="cpu").manual_seed(M * 1000 + E)
                logits = torch.randn(M, E, generator=g).to(dtype).to(dev)
                kw = _kwargs(method, E, groups, dev)
                w, ids = route_triton(logits, k, method, **kw)
                rw, rids = routing.route(logits, k, method, **kw)
                differ = int((ids != rids).sum())
                failures += differ > 0
                nz = rw != 0
                err = ((w - rw).abs()[nz] / rw.abs()[nz]).max().item() if nz.any() else 0.0
                checked = check_route(
                    logits, k, method, kw.get("correction_bias"), kw.get("num_groups"), kw.get("topk_groups")
                )
                scale = kw.get("routed_scaling_factor", 1.0)
                t_ref = _median_ms(lambda: routing.route(logits, k, method, **kw), args.iters)
                t_tri = _median_ms(lambda: route_triton(logits, k, method, **kw), args.iters)
                t_launch = _median_ms(
                    lambda: route_unchecked(logits, checked, kw.get("correction_bias"), scale), args.iters
                )
                g_ref = _graph_ms(lambda: routing.route(logits, k, method, **kw), args.iters)
                g_tri = _graph_ms(
                    lambda: route_unchecked(logits, checked, kw.get("correction_bias"), scale), args.iters
                )
                grp = f"{groups[0]}/{groups[1]}" if groups and method is RoutingMethod.DEEPSEEK_V3 else "-"
                print(
                    f"| {method.value} | {M} | {E} | {k} | {grp} | {differ} | {err:.1e} | "
                    f"{t_ref:.3f} | {t_tri:.3f} | {t_launch:.3f} | {g_ref * 1e3:.1f} | {g_tri * 1e3:.1f} |",
                    flush=True,
                )
    print(f"\n{'FAIL' if failures else 'OK'}: {failures} case(s) with differing ids")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
