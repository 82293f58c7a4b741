"""Expert-parallel MoE on 2 GPUs (NCCL): correctness against one GPU holding
all experts, and the time of one EP layer against that single GPU.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 bench/ep_bench.py \\
        [--scheme fp8_w8a8_block128] [--M 16 4096] [--dispatch all_to_all all_gather] \\
        [--modes eager compiled] [--out bench/results/ep_h200.md]

    # CPU dry run of the same code path (gloo, tiny shape, 2 processes):
    torchrun --nproc-per-node 2 bench/ep_bench.py --dry-run

Shape: DeepSeek-V3 (E=256 routed experts, top-8, H=7168, I=2048), grouped
routing ``route(..., "deepseek_v3", correction_bias, num_groups=8,
topk_groups=4, routed_scaling_factor=2.5)``. ``M`` is the number of tokens
of the layer: with ``all_to_all``/``all_gather`` each of the ``ep`` ranks holds
``M / ep`` of them (data-parallel attention), with ``replicated`` every rank
holds all ``M``. The single-GPU baseline runs ``fused_moe`` on all ``M``
tokens with all 256 experts on rank 0.

Weights: generated on the GPU from a generator seeded per expert (so every
rank builds bit-identical experts without communication) and quantized one
chunk of experts at a time (``--chunk``), so the bf16 weights of the whole
layer (256*3*7168*2048*2 bytes = 22.5 GB) never exist at once for quantized
schemes. Rank 0 additionally builds the full layer for the baseline and frees
it before the EP runs. Memory: where the expert op runs the plain-torch
reference (CPU; on CUDA for a weight format the Triton path does not read,
or a torch_moe_quant whose CUDA kernel is still the reference), a call
dequantizes all of its experts to fp32 (45 GB for the full layer, 22.5 GB per EP rank) on top
of the stored weights (11.3 GB fp8, 22.5 GB bf16): fine on H200 (141 GB),
too much for the bf16 full layer on an 80 GB H100 (pass --skip-baseline
there).

Output: a markdown table (rank 0) with, per M / dispatch / mode, the median
of ``--iters`` timed calls (CUDA events; EP: the max over ranks of each
rank's median), the single-GPU median, the speed-up, and the relative
Frobenius error of the EP output against the single-GPU output. With the
default ``--combine input`` the only difference is one bf16 rounding of each
rank's partial sum (expect ~3e-3; measured 2.5e-3 to 3.0e-3 on CPU at tiny
shapes); ``--combine fp32`` runs the local expert kernels on fp32
activations (on CUDA: fp32 GEMMs, so slower and not comparable in time).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import time
from typing import Callable, List, Optional

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off (see the machine notes)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import torch_moe_quant as tmq  # noqa: E402
from torch_moe_quant.distributed import (  # noqa: E402
    CombinePrecision,
    ExpertPlacement,
    TokenDispatch,
    concat_experts,
    expert_parallel_moe,
)
from torch_moe_quant.distributed.sharding import ExpertParallelShard  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    E: int
    top_k: int
    H: int
    I: int
    num_groups: int
    topk_groups: int
    routed_scaling_factor: float = 2.5


DEEPSEEK_V3 = Shape("deepseek-v3", 256, 8, 7168, 2048, 8, 4)
TINY = Shape("tiny (dry run)", 16, 4, 256, 256, 4, 2)


# ---------------------------------------------------------------------------
# weights and inputs


def expert_weights(shape: Shape, e: int, device, seed: int):
    """bf16 ``(w13 [2I, H], w2 [H, I])`` of global expert ``e`` (seeded per expert)."""
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + e)
    w13 = torch.randn(2 * shape.I, shape.H, generator=g, device=device, dtype=torch.float32)
    w13 = (w13 / shape.H**0.5).to(torch.bfloat16)
    w2 = torch.randn(shape.H, shape.I, generator=g, device=device, dtype=torch.float32)
    w2 = (w2 / shape.I**0.5).to(torch.bfloat16)
    return w13, w2


def build_experts(shape: Shape, ids, scheme: str, device, seed: int, chunk: int) -> tmq.QuantizedExperts:
    """``QuantizedExperts`` of the global experts ``ids``, quantized ``chunk``
    experts at a time on ``device`` (every granularity is per expert matrix,
    so chunking does not change the result)."""
    parts = []
    ids = list(ids)
    for i in range(0, len(ids), chunk):
        ws = [expert_weights(shape, e, device, seed) for e in ids[i : i + chunk]]
        w13 = torch.stack([w[0] for w in ws])
        w2 = torch.stack([w[1] for w in ws])
        del ws
        parts.append(tmq.quantize_experts(w13, w2, scheme))
        del w13, w2
    out = parts[0] if len(parts) == 1 else concat_experts(parts)
    del parts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def make_batch(shape: Shape, M: int, device, seed: int):
    """All ``M`` tokens of the layer and their DeepSeek-V3 routing (identical on every rank)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, shape.H, generator=g, device=device, dtype=torch.float32).to(torch.bfloat16)
    logits = torch.randn(M, shape.E, generator=g, device=device, dtype=torch.float32)
    bias = torch.randn(shape.E, generator=g, device=device, dtype=torch.float32) * 0.1
    w, ids = tmq.route(
        logits, shape.top_k, "deepseek_v3", correction_bias=bias, num_groups=shape.num_groups,
        topk_groups=shape.topk_groups, routed_scaling_factor=shape.routed_scaling_factor,
    )
    return x, w, ids


# ---------------------------------------------------------------------------
# timing


def time_ms(fn: Callable[[], torch.Tensor], device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``iters`` calls (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def max_over_ranks(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


# ---------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scheme", default="fp8_w8a8_block128", help="a name in torch_moe_quant.SCHEMES (default fp8_w8a8_block128; bf16 needs 22.5 GB per full layer)")
    p.add_argument("--M", nargs="*", type=int, default=None, help="tokens of the layer (default 16 4096; dry run 16 64)")
    p.add_argument("--dispatch", nargs="*", default=["all_to_all", "all_gather"], choices=[d.value for d in TokenDispatch])
    p.add_argument("--modes", nargs="*", default=["eager"], choices=["eager", "compiled"],
                   help="compiled: torch.compile(fullgraph=True) of the EP forward")
    p.add_argument("--combine", default="input", choices=[c.value for c in CombinePrecision],
                   help="input (default): bf16 partials, as in production; fp32: fp32 expert kernels and combine (a correctness check)")
    p.add_argument("--iters", type=int, default=None, help="timed calls (default 20; dry run 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5; dry run 1)")
    p.add_argument("--chunk", type=int, default=16, help="experts quantized at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-baseline", action="store_true", help="no single-GPU baseline (no error column)")
    p.add_argument("--dry-run", action="store_true", help="gloo on CPU, tiny shape: checks the script, times nothing meaningful")
    p.add_argument("--out", default=None, help="also write the table to this markdown file (rank 0)")
    args = p.parse_args(argv)

    scheme = tmq.get_scheme(args.scheme)
    if scheme.static_activation:
        raise SystemExit(f"--scheme {args.scheme}: static-activation schemes need calibrated scales; pick a dynamic or weight-only scheme")
    shape = TINY if args.dry_run else DEEPSEEK_V3
    Ms = args.M or ([16, 64] if args.dry_run else [16, 4096])
    iters = args.iters or (3 if args.dry_run else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 5)

    if "RANK" not in os.environ:
        raise SystemExit("run under torchrun: torchrun --nproc-per-node 2 bench/ep_bench.py [--dry-run]")
    backend = "gloo" if args.dry_run else "nccl"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --dry-run for the CPU check")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # long timeout: rank 1 waits while rank 0 builds and times the single-device baseline
    dist.init_process_group(
        backend, device_id=device if device.type == "cuda" else None, timeout=datetime.timedelta(minutes=60)
    )
    rank, ep = dist.get_rank(), dist.get_world_size()
    if ep < 2:
        raise SystemExit("expert parallelism needs at least 2 processes (--nproc-per-node 2)")
    for M in Ms:
        if M % ep:
            raise SystemExit(f"--M {M} must be divisible by the {ep} ranks (tokens are split evenly)")
    torch._dynamo.config.capture_scalar_outputs = True  # all_to_all under compile (data-dependent splits)

    placement = ExpertPlacement.contiguous(shape.E, ep)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    log(f"# {shape.name}: E={shape.E} top_k={shape.top_k} H={shape.H} I={shape.I}, scheme {scheme.name}, "
        f"ep={ep} ({backend}), {placement}")

    batches = {M: make_batch(shape, M, device, args.seed + M) for M in Ms}

    # -- single device baseline (rank 0), then freed ----------------------
    baseline = {}
    if not args.skip_baseline:
        if rank == 0:
            t = time.time()
            full = build_experts(shape, range(shape.E), scheme.name, device, args.seed, args.chunk)
            log(f"# full layer: {full.nbytes / 2**30:.2f} GiB, built in {time.time() - t:.0f} s")
            for M, (x, w, ids) in batches.items():
                out = tmq.fused_moe(x, full, w, ids)
                ms = time_ms(lambda: tmq.fused_moe(x, full, w, ids), device, warmup, iters)
                baseline[M] = (out, ms)
                log(f"# 1 device, M={M}: {ms:.3f} ms")
            del full
            if device.type == "cuda":
                torch.cuda.empty_cache()
        dist.barrier()

    # -- expert parallel -----------------------------------------------------
    t = time.time()
    local = build_experts(shape, placement.local_experts(rank), scheme.name, device, args.seed, args.chunk)
    shard = ExpertParallelShard.from_local(local, placement, rank)
    log(f"# EP shard of rank 0: {shard.experts.num_experts} experts, {local.nbytes / 2**30:.2f} GiB, built in {time.time() - t:.0f} s")
    dist.barrier()

    rows = [
        f"| scheme | M | dispatch | mode | EP={ep} ms | 1 device ms | speed-up | rel err vs 1 device |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for M, (x_all, w_all, ids_all) in batches.items():
        for dispatch in map(TokenDispatch, args.dispatch):
            if dispatch is TokenDispatch.REPLICATED:
                x, w, ids = x_all, w_all, ids_all
            else:
                lo, hi = rank * M // ep, (rank + 1) * M // ep
                x, w, ids = x_all[lo:hi], w_all[lo:hi], ids_all[lo:hi]
            for mode in args.modes:
                def forward(x, w, ids, dispatch=dispatch):
                    return expert_parallel_moe(x, shard, w, ids, dispatch=dispatch, combine=args.combine)

                fn = torch.compile(forward, fullgraph=True) if mode == "compiled" else forward
                out = fn(x, w, ids)
                ms = max_over_ranks(time_ms(lambda: fn(x, w, ids), device, warmup, iters), device)
                if dispatch is TokenDispatch.REPLICATED:
                    full_out = out
                else:
                    gathered = [torch.empty_like(out) for _ in range(ep)]
                    dist.all_gather(gathered, out.contiguous())
                    full_out = torch.cat(gathered)
                if rank == 0:
                    if M in baseline:
                        ref, base_ms = baseline[M]
                        cols = f"{base_ms:.3f} | {base_ms / ms:.2f}x | {rel_err(full_out, ref):.1e}"
                    else:
                        cols = "- | - | -"
                    rows.append(f"| {scheme.name} | {M} | {dispatch.value} | {mode} | {ms:.3f} | {cols} |")
                    log(rows[-1])
                dist.barrier()

    if rank == 0:
        table = "\n".join(rows)
        print(table, flush=True)
        if args.out:
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
            with open(args.out, "w") as f:
                f.write(f"{ep} x {name} · {backend} · torch {torch.__version__}\n\n")
                f.write("Command: `NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node "
                        f"{ep} bench/ep_bench.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`\n\n")
                f.write(table + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
