"""Correctness of the CUDA kernels of ``torch.ops.moe_quant.experts_<scheme>``
(the Triton path) against the reference, on a GPU.

    python bench/gpu_check.py [--shapes qwen3-30b-a3b ...] [--M 1 16 256 4096] [--schemes ...]

For every scheme, shape and M: ``torch_moe_quant.fused_moe`` (the op, whose
CUDA kernel is ``kernels.fused_experts_triton``) against
``reference.fused_moe`` (fp32 math on the same quantized weights, computed
32 experts at a time so a deepseek-size layer fits) by relative Frobenius
error; plus M=0, ``expert_map`` with every other expert absent, and a batch
where every token picks expert 3 (all at M=16 on each shape).

Bounds (``bound``), from the first H100 run on the small shapes (max error
per scheme in brackets): 1e-2 for unquantized activations (the kernel rounds
GEMM inputs and per-pair outputs to bf16, the reference stays fp32: <= 4e-3);
3e-2 for 8-bit activations (bf16-rounded intermediates flip some activation
codes, each flip moves a value by a whole fp8/int8 step: <= 2.3e-2, mxfp4_w4a8_fp8
at M=1); 6e-2 for 4/6-bit activations (an fp4 step is up to a third of the
value: <= 2.6e-2, nvfp4_w4a4).
Prints one line per case and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import sys

import torch

import torch_moe_quant as tmq

sys.path.insert(0, "bench")
from moe_bench import SHAPES, Shape, bound, make_batch, make_weights, reference_on_touched, rel_err, run_shards  # noqa: E402

from torch_moe_quant.distributed import select_experts  # noqa: E402

SHAPES = dict(
    SHAPES,
    small=Shape("small", 16, 4, 512, 256),
    small_oss=Shape("small_oss", 16, 4, 576, 320, "swigluoai", "interleaved", True, "topk_softmax"),
)


def calibrated(scheme, x, w13, w2, tw, ids, shape: Shape, b13, b2) -> dict:
    if not scheme.static_activation:
        return {}
    if x.shape[0] == 0:
        return dict(a13_scale=torch.tensor(0.01, device=x.device), a2_scale=torch.tensor(0.01, device=x.device))
    from moe_bench import _calibrate

    a13, a2 = _calibrate(x, w13, w2, scheme, tw, ids, shape, b13, b2)
    return dict(a13_scale=a13, a2_scale=a2)


def check(shape: Shape, M: int, scheme, experts, x, tw, ids, mode: str, expert_map=None) -> bool:
    act = tmq.Activation(shape.activation)
    out = tmq.fused_moe(x, experts, tw, ids, activation=act, expert_map=expert_map)
    torch.cuda.synchronize()
    if expert_map is not None:  # the same sum with local ids; absent pairs weigh 0
        local = expert_map[ids.long()]
        tw, ids = torch.where(local >= 0, tw, 0.0), local.clamp(min=0)
    ref = reference_on_touched(x, experts, tw, ids, act) if M else torch.zeros_like(out, dtype=torch.float32)
    err = rel_err(out, ref) if M else 0.0
    b = bound(scheme)
    ok = out.shape == x.shape and out.dtype == x.dtype and bool(torch.isfinite(out).all()) and err < b
    print(f"{'ok  ' if ok else 'FAIL'} {shape.name:<14} M={M:<5} {scheme.name:<32} {mode:<10} "
          f"rel_err={err:.2e} bound={b:.0e}", flush=True)
    return ok


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="*", default=list(SHAPES))
    p.add_argument("--M", nargs="*", type=int, default=[1, 16, 256, 4096])
    p.add_argument("--schemes", nargs="*", default=None)
    p.add_argument("--extras", action=argparse.BooleanOptionalAction, default=True,
                   help="also M=0, expert_map and one-expert cases")
    p.add_argument("--jobs", type=int, default=1,
                   help="worker processes sharing the GPU, each every jobs-th scheme (Triton compiles in parallel)")
    p.add_argument("--shard", type=int, nargs=2, default=None, metavar=("I", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    names = args.schemes or list(tmq.SCHEMES)
    if args.jobs > 1:
        return run_workers(args.jobs)
    dev = torch.device("cuda")
    if args.shard is not None:
        names = names[args.shard[0]::args.shard[1]]
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; schemes: {len(names)}", flush=True)
    failures = cases = 0
    for sname in args.shapes:
        shape = SHAPES[sname]
        w13, w2, b13, b2 = make_weights(shape, dev)
        batches = {}
        for M in sorted(set(args.M) | ({0, 16} if args.extras else set())):
            batches[M] = make_batch(shape, M, dev)
        for name in names:
            scheme = tmq.get_scheme(name)
            xc, twc, idsc = batches[max(batches)]
            kw = dict(w13_bias=b13, w2_bias=b2, layout=shape.layout, pad_to=128)
            kw.update(calibrated(scheme, xc, w13, w2, twc, idsc, shape, b13, b2))
            experts = tmq.quantize_experts(w13, w2, scheme, **kw)
            for M in args.M:
                cases += 1
                failures += not check(shape, M, scheme, experts, *batches[M], "plain")
            if args.extras:
                x, tw, ids = batches[16]
                cases += 3
                failures += not check(shape, 0, scheme, experts, *batches[0], "empty")
                failures += not check(shape, 16, scheme, experts, x, tw, torch.full_like(ids, 3), "one_expert")
                # every other expert on this rank: a half-size layer and a map
                half = select_experts(experts, range(shape.E // 2))
                emap = torch.full((shape.E,), -1, dtype=torch.int32, device=dev)
                emap[1::2] = torch.arange(shape.E // 2, dtype=torch.int32, device=dev)
                failures += not check(shape, 16, scheme, half, x, tw, ids, "expert_map", emap)
            del experts
            torch.cuda.empty_cache()
        del w13, w2, b13, b2
        torch.cuda.empty_cache()
    print(f"{failures} failures in {cases} cases")
    return 1 if failures else 0


def run_workers(jobs: int) -> int:
    """This command once per shard of the schemes, ``jobs`` processes at a
    time on the one GPU; their logs printed in order, failures summed."""
    import re

    argv = sys.argv[1:]
    i = argv.index("--jobs")
    del argv[i : i + 2]
    failures = cases = 0
    for k, (code, out) in enumerate(run_shards(__file__, argv, jobs, "--shard")):
        print(f"# shard {k}/{jobs} (exit {code})\n{out.rstrip()}", flush=True)
        m = re.search(r"^(\d+) failures in (\d+) cases$", out, re.M)
        if m is None or code not in (0, 1):
            failures += 1  # a crashed worker counts as a failure
        else:
            failures, cases = failures + int(m[1]), cases + int(m[2])
    print(f"{failures} failures in {cases} cases ({jobs} workers)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
