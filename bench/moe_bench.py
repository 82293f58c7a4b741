"""MoE benchmark on one GPU: every scheme against a plain bf16 MoE.

    python bench/moe_bench.py --json bench/results/h100.json
    python bench/plot.py bench/results/h100.json bench/results/h100.png   # on any machine

For each model shape (``SHAPES``), M (tokens) and scheme, with random
weights and softmax top-k routing, it measures

* ``fwd``: the whole forward of ``torch.ops.moe_quant.experts_<scheme>``
  (validation, align, both grouped GEMMs, activation, combine), captured in
  a CUDA graph and replayed with the L2 cache flushed before every replay
  (median of ``--reps`` replays timed with CUDA events);
* ``gemms``: the two grouped GEMMs alone (same method, align and the
  activation QDQ precomputed);
* ``host``: host time of one eager call without a CUDA graph (mean over 50
  back-to-back calls, at M = 1 only, where the GPU work is short; it is a
  ceiling of the host cost when the GPU is the bottleneck);
* ``bf16``: the bf16 MoE a user writes with ``torch._grouped_mm`` (sort by
  expert -> grouped_mm -> activation -> grouped_mm -> weighted scatter-sum),
  same timing method;
* ``dequant``: the scheme's weights dequantized to bf16 on every call, then
  the bf16 path (OOM is reported as such).

It reports the speed-up of ``fwd`` over ``bf16`` and over ``dequant``, and
``fwd`` as a % of the roofline floor ``max(bytes / bandwidth, flops / peak)``:
bandwidth = the device-to-device copy bandwidth measured at the start of the
same run (bytes read + written by a 2 GiB ``copy_``, median of 10; recorded
per row as ``copy_bytes_per_s``); bytes = the stored weight bytes of the
experts the batch touches (codes, scales, biases) plus the input and output
rows (``x`` read, ``y`` written, bf16); peak = 1270 TFLOP/s for fp8/int8
activations, 782 TFLOP/s otherwise (H100 SXM dense). A row above
``SUSPECT_PCT`` % of its floor is impossible (weights left in L2, or a
byte count that is off) and is marked ``suspect``: a benchmark bug, not a
result. The L2 is flushed by writing ``_FLUSH_BYTES`` of changing values
(not zeros) before every timed replay. Every result is checked against the reference
(``torch_moe_quant.reference.fused_moe`` on the touched experts, for up to
``REF_ROWS`` random tokens) by relative Frobenius error, printed as ``err``
and marked FAIL above the scheme's ``bound``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

import torch_moe_quant as tmq
from torch_moe_quant.activations import Activation, GateUpLayout, apply_activation
from torch_moe_quant.distributed import select_experts
from torch_moe_quant.formats import Format
from torch_moe_quant.reference import dequantize_weight

#: HBM bandwidth of the roofline floor: the issue's 3.0 TB/s for an H100, the
#: H200's 4.8 TB/s (HBM3e) there
HBM_BYTES_PER_S = {"H100": 3.0e12, "H200": 4.8e12}


def hbm_bytes_per_s(device_name: str) -> float:
    """The floor's bandwidth for a GPU named ``device_name`` (H100 default)."""
    return next((bw for key, bw in HBM_BYTES_PER_S.items() if key in device_name), HBM_BYTES_PER_S["H100"])


BF16_FLOPS = 782e12
FP8_FLOPS = 1270e12
#: bytes written before each replay: over 4x the H200's 60 MB L2
_FLUSH_BYTES = 256 << 20
#: a row faster than this % of its floor is a benchmark bug (``measure``)
SUSPECT_PCT = 110.0
#: bytes copied to measure the device-to-device copy bandwidth
_COPY_BYTES = 2 << 30


def copy_bandwidth(reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + written), median of
    ``reps`` timed ``copy_`` of ``_COPY_BYTES`` after two warm-ups."""
    src = torch.randint(0, 255, (_COPY_BYTES,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * _COPY_BYTES / statistics.median(times)


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
    routing: str = "softmax_topk_renormalize"
    #: hidden size of the ``--warm-jobs`` compile pass, where the full layer
    #: would not fit once per worker (``warm_shape``); None = ``H``
    warm_H: Optional[int] = None

    def warm_shape(self) -> "Shape":
        """The shape a ``--warm-jobs`` worker runs: the same Triton kernels
        (constexprs and integer-argument specializations), less memory.
        Triton specializes an integer argument on ``== 1`` and on divisibility
        by 16; the configs depend on pairs per expert (E, k, M) and on N, K
        only where they are below a tile (128). DeepSeek-V3's H = 7168 = 2^10 * 7
        -> 1024 keeps every H / group for groups 16..128 on the same side of
        16-divisibility (H / 128 = 56 and 8: neither divisible) and cuts its
        22.5 GB of bf16 weights (per worker) to 3.2 GB; gpt-oss's H = 2880
        (padded 2944 = 128 * 23) -> 320 (padded 384 = 128 * 3) likewise, 6.4 GB
        -> 0.7 GB."""
        return self if self.warm_H is None else dataclasses.replace(self, H=self.warm_H)


SHAPES = {
    s.name: s
    for s in (
        Shape("qwen3-30b-a3b", 128, 8, 2048, 768),
        Shape("gpt-oss-120b", 128, 4, 2880, 2880, "swigluoai", "interleaved", True, "topk_softmax", warm_H=320),
        Shape("mixtral-8x7b", 8, 2, 4096, 14336),
        Shape("deepseek-v3", 256, 8, 7168, 2048, routing="deepseek_v3", warm_H=1024),
    )
}


def route_for(shape: Shape, logits: torch.Tensor):
    """The shape's own routing; DeepSeek-V3: 8 groups, top-4 groups, a random
    correction bias, routed_scaling_factor 2.5 (the model's config)."""
    if shape.routing != "deepseek_v3":
        return tmq.route(logits, shape.top_k, shape.routing)
    g = torch.Generator(device=logits.device).manual_seed(1)
    bias = torch.randn(shape.E, generator=g, device=logits.device) * 0.1
    return tmq.route(
        logits, shape.top_k, "deepseek_v3", correction_bias=bias, num_groups=8, topk_groups=4,
        routed_scaling_factor=2.5,
    )


def make_weights(shape: Shape, device, seed: int = 0):
    """bf16 ``w13 [E, 2I, H]``, ``w2 [E, H, I]`` (+ biases), generated per
    expert chunk on the device (no fp32 copy of the whole tensor)."""
    g = torch.Generator(device=device).manual_seed(seed)
    w13 = torch.empty(shape.E, 2 * shape.I, shape.H, dtype=torch.bfloat16, device=device)
    w2 = torch.empty(shape.E, shape.H, shape.I, dtype=torch.bfloat16, device=device)
    for e in range(0, shape.E, 16):
        w13[e : e + 16] = torch.randn(w13[e : e + 16].shape, generator=g, device=device) / shape.H**0.5
        w2[e : e + 16] = torch.randn(w2[e : e + 16].shape, generator=g, device=device) / shape.I**0.5
    b13 = b2 = None
    if shape.bias:
        b13 = (torch.randn(shape.E, 2 * shape.I, generator=g, device=device) * 0.1).bfloat16()
        b2 = (torch.randn(shape.E, shape.H, generator=g, device=device) * 0.1).bfloat16()
    return w13, w2, b13, b2


def make_batch(shape: Shape, M: int, device):
    """``(x bf16 [M, H], topk_weights, topk_ids)`` of batch size ``M``, seeded by
    ``M`` (the same batch in every script and worker), routed by the shape's own method."""
    g = torch.Generator(device=device).manual_seed(M)
    x = torch.randn(M, shape.H, generator=g, device=device).bfloat16()
    return (x, *route_for(shape, torch.randn(M, shape.E, generator=g, device=device)))


def run_shards(script: str, argv: List[str], jobs: int, shard_flag: str) -> List[tuple]:
    """``script argv shard_flag i jobs`` for i < jobs, all at once (they share
    the GPU; Triton compiles in parallel): ``(returncode, output)`` of each."""
    import subprocess

    procs = [
        subprocess.Popen([sys.executable, script, *argv, shard_flag, str(i), str(jobs)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(jobs)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        results.append((proc.returncode, out))
    return results


def grouped_mm_moe(x, w13, w2, topk_weights, topk_ids, shape: Shape, b13=None, b2=None):
    """bf16 MoE with torch._grouped_mm: sort pairs by expert, two grouped
    GEMMs, activation, weighted scatter-sum (capturable: no host syncs)."""
    M, k = topk_ids.shape
    E = w13.shape[0]
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32)
    )
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x[order // k]
    h = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs)
    if b13 is not None:
        h = h + b13[flat[order]]
    a = apply_activation(h.float(), Activation(shape.activation), GateUpLayout(shape.layout)).to(x.dtype)
    y = torch._grouped_mm(a, w2.transpose(-2, -1), offs=offs)
    if b2 is not None:
        y = y + b2[flat[order]]
    y = y.float() * topk_weights.reshape(-1)[order, None]
    out = torch.zeros(M, x.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, order // k, y)
    return out.to(x.dtype)


class Timer:
    """CUDA-graph replay timing with the L2 flushed before every replay."""

    def __init__(self, reps: int):
        self.reps = reps
        self.flush = torch.empty(_FLUSH_BYTES, dtype=torch.uint8, device="cuda")

    def graph_ms(self, fn: Callable[[], torch.Tensor]) -> float:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile kernels, settle allocations
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        times = []
        for _ in range(self.reps):
            self.flush.add_(1)  # changing values, every byte written
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        del graph
        return statistics.median(times)

    @staticmethod
    def host_us(fn: Callable[[], torch.Tensor], calls: int = 50) -> float:
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return (t1 - t0) / calls * 1e6


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def touched_bytes(experts, ids, x=None) -> float:
    """Stored bytes of the experts ``ids`` touches (codes, scales, biases),
    plus ``x`` read and an output of its size written when ``x`` is given."""
    touched = int(torch.unique(ids).numel())
    io = 0 if x is None else 2 * x.numel() * x.element_size()
    return experts.nbytes * touched / experts.num_experts + io


def roofline_ms(shape: Shape, M: int, nbytes: float, scheme, bandwidth: float) -> float:
    act = scheme.activation
    peak = FP8_FLOPS if act is not None and act.fmt in (Format.FP8_E4M3, Format.INT8) else BF16_FLOPS
    flops = 2 * M * shape.top_k * 3 * shape.I * shape.H
    return max(nbytes / bandwidth, flops / peak) * 1e3


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="*", default=list(SHAPES))
    p.add_argument("--M", nargs="*", type=int, default=[1, 16, 256, 4096])
    p.add_argument("--schemes", nargs="*", default=None, help="default: every scheme")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", default=None, help="append result rows (JSON lines) to this file")
    p.add_argument("--no-dequant", nargs="*", default=None, metavar="SHAPE",
                   help="skip the dequant+grouped_mm path (on the SHAPEs named, or on every shape)")
    p.add_argument("--resume", action="store_true",
                   help="skip (shape, scheme) pairs whose every M already has a row in --json")
    p.add_argument("--warm-jobs", type=int, default=0,
                   help="first compile every kernel in this many parallel worker processes (see warm_up)")
    p.add_argument("--warm-shard", type=int, nargs=2, default=None, metavar=("I", "N"), help=argparse.SUPPRESS)
    p.add_argument("--act-input", default=None, choices=["qdq_kernel", "prologue", "codes"],
                   help="time fused_experts_triton with this ActInput instead of the op (its default)")
    args = p.parse_args(argv)
    schemes = args.schemes or list(tmq.SCHEMES)
    if args.resume:
        if not args.json:
            p.error("--resume needs --json")
        schemes_left = _left_to_run(args.json, args.shapes, args.M, schemes)
    else:
        schemes_left = {sname: schemes for sname in args.shapes}
    if args.warm_shard is not None:
        return _warm_shard(args, schemes_left)
    if args.warm_jobs:
        warm_up(argv if argv is not None else sys.argv[1:], args.warm_jobs)
    dev = torch.device("cuda")
    timer = Timer(args.reps)
    bandwidth = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()} · torch {torch.__version__} · copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s (the floor's) · command: "
          f"python bench/moe_bench.py {' '.join(sys.argv[1:] if argv is None else argv)}", flush=True)
    print("| shape | M | scheme | fwd ms | gemms ms | host us | bf16 ms | dequant ms | vs bf16 | vs dequant "
          "| % roofline | err |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for sname in args.shapes:
        shape = SHAPES[sname]
        if not schemes_left[sname]:
            continue
        t_shape = time.time()
        dequant = args.no_dequant is None or (args.no_dequant and sname not in args.no_dequant)
        w13, w2, b13, b2 = make_weights(shape, dev)
        inputs = {}
        for M in args.M:
            x, tw, ids = make_batch(shape, M, dev)
            base = timer.graph_ms(lambda: grouped_mm_moe(x, w13, w2, tw, ids, shape, b13, b2))
            inputs[M] = (x, tw, ids, base)
        for scheme_name in schemes_left[sname]:
            scheme = tmq.get_scheme(scheme_name)
            kw = dict(w13_bias=b13, w2_bias=b2, layout=shape.layout, pad_to=128)
            if scheme.static_activation:
                x0, tw0, ids0, _ = inputs[max(args.M)]
                a13, a2 = _calibrate(x0, w13, w2, scheme, tw0, ids0, shape, b13, b2)
                kw.update(a13_scale=a13, a2_scale=a2)
            try:
                experts = tmq.quantize_experts(w13, w2, scheme, **kw)
            except torch.OutOfMemoryError:
                print(f"| {sname} | - | {scheme_name} | quantize OOM |", flush=True)
                torch.cuda.empty_cache()
                continue
            for M in args.M:
                x, tw, ids, base = inputs[M]
                row = measure(timer, shape, M, scheme, experts, x, tw, ids, base, dequant, args.act_input, bandwidth)
                print(_md(row), flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
            del experts
            torch.cuda.empty_cache()
        print(f"# {sname}: {time.time() - t_shape:.0f} s", flush=True)
        del w13, w2, b13, b2, inputs
        torch.cuda.empty_cache()
    return 0


def _left_to_run(path: str, shapes: List[str], Ms: List[int], schemes: List[str]) -> Dict[str, List[str]]:
    """Per shape, the schemes of ``schemes`` that some M of ``Ms`` has no row
    for in the JSON-lines file ``path`` (missing file: all of them)."""
    done = set()
    try:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                done.add((r["shape"], r["scheme"], r["M"]))
    except FileNotFoundError:
        pass
    return {s: [n for n in schemes if any((s, n, M) not in done for M in Ms)] for s in shapes}


def warm_up(argv: List[str], jobs: int) -> None:
    """Compile every Triton kernel the run needs in ``jobs`` worker processes
    (this script with ``--warm-shard i jobs``: every ``jobs``-th scheme, each
    shape's ``warm_shape``, one rep, no dequant path, nothing written), so the
    timing pass, one process on an otherwise idle GPU, loads them from
    Triton's on-disk cache instead of compiling one at a time. Compiling is
    CPU work; on the H100 machine's 16 cores it was most of a serial run
    (19 schemes x 4 shapes did not finish in 550 s)."""
    t0 = time.time()
    failed = 0
    for i, (code, out) in enumerate(run_shards(__file__, argv, jobs, "--warm-shard")):
        if code:
            failed += 1
            tail = out.strip().splitlines()[-5:]
            print(f"# warm-up worker {i} exited {code}: " + " / ".join(tail), flush=True)
    print(f"# warm-up: {jobs} workers, {time.time() - t0:.0f} s, {failed} failed", flush=True)


def _warm_shard(args, schemes_left: Dict[str, List[str]]) -> int:
    """One ``warm_up`` worker: run every measurement of its schemes once on
    each shape's ``warm_shape`` and discard the numbers."""
    i, n = args.warm_shard
    dev = torch.device("cuda")
    timer = Timer(1)
    for sname in args.shapes:
        shape = SHAPES[sname].warm_shape()
        mine = schemes_left[sname][i::n]
        if not mine:
            continue
        w13, w2, b13, b2 = make_weights(shape, dev)
        for scheme_name in mine:
            scheme = tmq.get_scheme(scheme_name)
            kw = dict(w13_bias=b13, w2_bias=b2, layout=shape.layout, pad_to=128)
            if scheme.static_activation:
                kw.update(a13_scale=torch.tensor(0.05, device=dev), a2_scale=torch.tensor(0.05, device=dev))
            experts = tmq.quantize_experts(w13, w2, scheme, **kw)
            for M in args.M:
                x, tw, ids = make_batch(shape, M, dev)
                measure(timer, shape, M, scheme, experts, x, tw, ids, 1.0, False, args.act_input)
            del experts
            torch.cuda.empty_cache()  # eight workers share the GPU's memory
        del w13, w2, b13, b2
        torch.cuda.empty_cache()
    return 0


def _calibrate(x, w13, w2, scheme, tw, ids, shape, b13, b2):
    """Static activation scales from the largest batch on the first 16
    experts (the fp32 reference of a whole deepseek-size layer would not fit):
    a pair routed elsewhere is sent to expert 0 with weight 0, so every token
    still feeds the first GEMM's scale and the second sees real activations."""
    used = torch.arange(min(16, shape.E), device=ids.device)
    sub_ids = torch.where(ids < used.numel(), ids, 0)
    sub_tw = torch.where(ids < used.numel(), tw, 0.0)
    sl = lambda t: None if t is None else t[used]  # noqa: E731
    return tmq.calibrate_activation_scales(
        x, w13[used], w2[used], scheme, sub_tw, sub_ids, activation=shape.activation,
        w13_bias=sl(b13), w2_bias=sl(b2), layout=shape.layout,
    )


def measure(
    timer: Timer, shape: Shape, M: int, scheme, experts, x, tw, ids, base_ms: float, dequant: bool,
    act_input: Optional[str] = None, bandwidth: Optional[float] = None,
) -> Dict:
    from torch_moe_quant.kernels.align import align_triton
    from torch_moe_quant.kernels.config import GemmProblem, select_config
    from torch_moe_quant.kernels.moe_gemm import ARows, DroppedRows, moe_gemm
    from torch_moe_quant.reference import activation_qdq

    act = Activation(shape.activation)

    if act_input is None:
        def fwd():
            return tmq.fused_moe(x, experts, tw, ids, activation=act)
    else:  # the op's CUDA kernel with another ActInput (the op itself takes none)
        from torch_moe_quant.kernels.fused_experts import ActInput, fused_experts_triton

        def fwd():
            return fused_experts_triton(x, experts, tw, ids, activation=act, act_input=ActInput(act_input))

    out = fwd()
    rows = torch.randperm(M, generator=torch.Generator().manual_seed(0))[:REF_ROWS].to(x.device)
    err = rel_err(out[rows], reference_on_touched(x[rows], experts, tw[rows], ids[rows], act))
    fwd_ms = timer.graph_ms(fwd)
    host = timer.host_us(fwd) if M == 1 else None

    # the two GEMMs alone, inputs prepared as the pipeline does
    E, Hp = experts.num_experts, experts.padded_hidden_size
    xp = torch.nn.functional.pad(x, (0, Hp - x.shape[1]))
    spec = experts.scheme.activation
    cfg13 = select_config(GemmProblem(M, experts.w13.shape[1], Hp, E, shape.top_k, x.dtype), experts.scheme, x.device)
    cfg2 = select_config(GemmProblem(M, Hp, experts.padded_intermediate_size, E, shape.top_k, x.dtype), experts.scheme, x.device)
    al13 = align_triton(ids, E, cfg13.block_m)
    al2 = align_triton(ids, E, cfg2.block_m)
    a1 = (xp if spec is None else activation_qdq(spec, experts.a13_scale)(xp)).to(x.dtype)
    g1 = dict(top_k=shape.top_k, a_rows=ARows.TOKENS, bias=experts.w13_bias, config=cfg13, activation=act,
              layout=experts.layout, dropped=DroppedRows.UNWRITTEN, out_dtype=x.dtype)
    a2 = moe_gemm(a1, experts.w13, *al13, **g1)
    g2 = dict(top_k=shape.top_k, a_rows=ARows.PAIRS, bias=experts.w2_bias, topk_weights=tw, config=cfg2,
              dropped=DroppedRows.UNWRITTEN, out_dtype=x.dtype)
    gemms_ms = timer.graph_ms(lambda: (moe_gemm(a1, experts.w13, *al13, **g1), moe_gemm(a2, experts.w2, *al2, **g2)))

    deq_ms = None
    if dequant:
        def dequant_path():
            d13 = dequantize_weight(experts.w13, torch.bfloat16)
            d2 = dequantize_weight(experts.w2, torch.bfloat16)
            return grouped_mm_moe(xp, d13, d2, tw, ids, shape, experts.w13_bias, experts.w2_bias)

        try:
            deq_ms = timer.graph_ms(dequant_path)
        except torch.OutOfMemoryError:
            deq_ms = "OOM"
        except RuntimeError as e:  # e.g. a dequantize that cannot be graph-captured
            deq_ms = f"n/a ({str(e).splitlines()[0][:60]})"
            torch.cuda.synchronize()
        torch.cuda.empty_cache()
    if bandwidth is None:
        bandwidth = hbm_bytes_per_s(torch.cuda.get_device_name())
    floor = roofline_ms(shape, M, touched_bytes(experts, ids, x), experts.scheme, bandwidth)
    return dict(
        shape=shape.name, M=M, scheme=experts.scheme.name, fwd_ms=fwd_ms, gemms_ms=gemms_ms, host_us=host,
        bf16_ms=base_ms, dequant_ms=deq_ms, speedup_bf16=base_ms / fwd_ms,
        speedup_dequant=deq_ms / fwd_ms if isinstance(deq_ms, float) else None,
        roofline_pct=100 * floor / fwd_ms, err=err, bound=bound(experts.scheme), ok=err < bound(experts.scheme),
        act_input=act_input or "default",
        device=torch.cuda.get_device_name(), hbm_bytes_per_s=bandwidth, copy_bytes_per_s=bandwidth,
        floor_ms=floor, suspect=100 * floor / fwd_ms > SUSPECT_PCT,
    )


#: tokens compared with the reference (each token's output depends on its own
#: row only, so a random subset checks the kernel at M=4096 at 1/16 the cost)
REF_ROWS = 256
_LOW_BIT_ACT = (Format.MXFP4, Format.NVFP4, Format.MXFP6_E2M3, Format.MXFP6_E3M2)


def bound(scheme) -> float:
    """Relative Frobenius error bound vs the fp32 reference (see gpu_check.py
    for where each number comes from)."""
    act = scheme.activation
    if act is None:
        return 1e-2
    return 6e-2 if act.fmt in _LOW_BIT_ACT else 3e-2


def reference_on_touched(x, experts, tw, ids, act, chunk: int = 32) -> torch.Tensor:
    """``reference.fused_moe`` (fp32 math), computed ``chunk`` experts at a time
    with an ``expert_map`` per chunk and summed: the fp32 dequantized weights
    of a whole deepseek-size layer (45 GB) never exist at once."""
    from torch_moe_quant.reference import fused_moe as reference_moe

    E = experts.num_experts
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for lo in torch.unique(ids.long() // chunk).tolist():
        lo = lo * chunk
        hi = min(E, lo + chunk)
        emap = torch.full((E,), -1, dtype=torch.int32, device=x.device)
        emap[lo:hi] = torch.arange(hi - lo, dtype=torch.int32, device=x.device)
        sub = select_experts(experts, range(lo, hi))
        out += reference_moe(x.float(), sub, tw, ids, activation=act, expert_map=emap)
    return out


def _fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, spec)


def _md(r: Dict) -> str:
    return (
        f"| {r['shape']} | {r['M']} | {r['scheme']} | {_fmt(r['fwd_ms'], '.3f')} | {_fmt(r['gemms_ms'], '.3f')} "
        f"| {_fmt(r['host_us'], '.0f')} | {_fmt(r['bf16_ms'], '.3f')} | {_fmt(r['dequant_ms'], '.3f')} "
        f"| {_fmt(r['speedup_bf16'], '.2f')}x | {_fmt(r['speedup_dequant'], '.2f')}x "
        f"| {_fmt(r['roofline_pct'], '.0f')}%{' SUSPECT' if r.get('suspect') else ''} "
        f"| {r['err']:.1e}{'' if r['ok'] else ' FAIL'} |"
    )


if __name__ == "__main__":
    sys.exit(main())
