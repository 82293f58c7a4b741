"""A transformers MoE block compiled with and without ``lowerings.install()``.

    python bench/lowering_bench.py                     # H100: real widths
    python bench/lowering_bench.py --tiny --device cpu # a CPU dry run

Real-width bf16 blocks of transformers 5.23 (random weights,
``config._experts_implementation = "grouped_mm"``, transformers' fastest
compiled form): Qwen3-MoE (``Qwen3MoeSparseMoeBlock``: H=2048, I=768, E=128,
k=8) and gpt-oss (``GptOssMLP``: H=2880, I=2880, E=128, k=4, biases,
swigluoai). Each is compiled with ``torch.compile(fullgraph=True,
mode=...)`` twice: plain Inductor, and with the moe_quant lowerings
installed (routing -> ``moe_quant.route``, experts ->
``moe_quant.experts_bf16``, whose CUDA kernel is the Triton path). Prints,
per block and M, the median time of one forward (CUDA events over
``--iters`` calls after warm-up), the rewrite counters and whether the
compiled code calls moe_quant, and the relative difference between the two
outputs. The routers compute bf16 logits; a token whose k-th and (k+1)-th
logits tie picks a different expert in ``torch.topk`` (order of ties
unspecified) and in ``moe_quant.route`` (lower index), so a few tokens can
differ by a whole expert: the difference is then not a rounding error.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import time

import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config

BLOCKS = {
    "qwen3-moe": (
        "qwen3_moe",
        "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock",
        dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True),
    ),
    "gpt-oss": (
        "gpt_oss",
        "transformers.models.gpt_oss.modeling_gpt_oss.GptOssMLP",
        dict(hidden_size=2880, intermediate_size=2880, num_local_experts=128, num_experts_per_tok=4),
    ),
}
TINY = {
    "qwen3-moe": dict(hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    "gpt-oss": dict(hidden_size=64, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
}


def build(name: str, tiny: bool, device, dtype=torch.bfloat16):
    from transformers import AutoConfig

    family, path, sizes = BLOCKS[name]
    config = AutoConfig.for_model(family, **(TINY[name] if tiny else sizes))
    config._experts_implementation = "grouped_mm"
    module, cls = path.rsplit(".", 1)
    torch.manual_seed(0)
    with torch.device(device):
        block = getattr(importlib.import_module(module), cls)(config).to(dtype).eval()
        for p in block.parameters():  # init-scale random weights
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            p.data = (torch.randn(p.shape, device=device) / fan_in**0.5).to(dtype)
    return block, config.hidden_size


def time_ms(fn, iters: int, device) -> float:
    """Median of ``iters`` CUDA-event-timed calls after three warm-ups (CPU:
    the mean wall time)."""
    from torch_moe_quant.kernels.autotune import cuda_time_ms

    for _ in range(2):
        fn()
    if device.type == "cuda":
        return cuda_time_ms(fn, iters)  # its own warm-up is the third
    fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", nargs="*", default=list(BLOCKS))
    p.add_argument("--M", nargs="*", type=int, default=[1, 16, 4096])
    p.add_argument("--mode", default="reduce-overhead", help="torch.compile mode (default: CUDA graphs)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    mode = None if args.mode in ("", "default") else args.mode
    if device.type != "cuda":
        mode = None

    import torch_moe_quant  # noqa: F401
    from torch_moe_quant import lowerings

    print(f"# {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} · torch {torch.__version__} · "
          f"mode={mode} · command: python bench/lowering_bench.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print("| block | M | inductor ms | + lowerings ms | speed-up | rewrites | moe_quant ops in code | rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.blocks:
        block, H = build(name, args.tiny, device)
        gen = torch.Generator(device=device).manual_seed(0)
        inputs = {M: torch.randn(1, M, H, device=device, generator=gen).to(torch.bfloat16) for M in args.M}
        results = {}
        for lowered in (False, True):
            torch._dynamo.reset()
            counters.clear()
            ctx = lowerings.enabled() if lowered else contextlib.nullcontext()
            # no FX graph / AOT cache: a cache hit skips the pass and its counters
            with ctx, inductor_config.patch(fx_graph_cache=False), torch._functorch.config.patch(
                enable_autograd_cache=False
            ):
                compiled = torch.compile(block, fullgraph=True, mode=mode)
                for M in args.M:
                    x = inputs[M]
                    with torch.no_grad():
                        fn = lambda: compiled(x)  # noqa: E731
                        out = fn()
                        out = (out[0] if isinstance(out, tuple) else out).clone()
                        ms = time_ms(fn, args.iters, device)
                    results[(lowered, M)] = (ms, out, dict(counters["moe_quant"]))
        from torch._inductor.utils import run_and_get_code

        torch._dynamo.reset()
        with lowerings.enabled(), torch.no_grad():
            _, code = run_and_get_code(torch.compile(block, fullgraph=True), torch.randn(1, 4, H, device=device, dtype=torch.bfloat16))
        import re

        ops = sorted(set(re.findall(r"torch\.ops\.moe_quant\.(\w+)\.default", "".join(code)))) or ["none"]
        for M in args.M:
            base, low = results[(False, M)], results[(True, M)]
            diff = ((low[1].float() - base[1].float()).norm() / base[1].float().norm()).item()
            rewrites = ", ".join(f"{k}={v}" for k, v in sorted(low[2].items())) or "none"
            print(f"| {name} | {M} | {base[0]:.3f} | {low[0]:.3f} | {base[0] / low[0]:.2f}x | {rewrites} | "
                  f"{', '.join(ops)} | {diff:.1e} |", flush=True)
        del block
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
