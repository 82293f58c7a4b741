"""End-to-end decode of a Qwen3-30B-A3B-shaped transformers model: transformers'
own experts against ours (bf16 and quantized), eager and compiled.

    # H200, split over commands of < 9 minutes (each compile of the 48-layer
    # model takes about a minute or more, so all compiled rows do not fit in one):
    export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
    python bench/e2e_decode.py --modes eager --batch 1 16 64 --budget 360 --timeout-per-variant 150 --json $OUT/e2e_eager.jsonl
    python bench/e2e_decode.py --modes compiled --batch 1 16 --experts hf bf16 --budget 320 --timeout-per-variant 200 --json $OUT/e2e_c1.jsonl
    python bench/e2e_decode.py --modes compiled --batch 1 16 --experts int4_w4a16_g128 mxfp4_w4a16 --budget 320 --timeout-per-variant 200 --json $OUT/e2e_c2.jsonl
    python bench/e2e_decode.py --modes compiled --batch 1 16 --experts nvfp4_w4a16 fp8_w8a8_channel_token --budget 320 --timeout-per-variant 200 --json $OUT/e2e_c3.jsonl
    # one table from all of them (speed-ups recomputed across the files; no GPU needed)
    python bench/e2e_decode.py --report e2e_eager.jsonl e2e_c1.jsonl e2e_c2.jsonl e2e_c3.jsonl
    # CPU smoke run (the ops run their plain-PyTorch reference kernels)
    python bench/e2e_decode.py --tiny --device cpu --modes eager --batch 1 --steps 3

The model is ``Qwen3MoeForCausalLM`` built from a ``Qwen3MoeConfig`` written
here (48 layers, hidden 2048, 128 experts of width 768, top-8, 32 query / 4
kv heads of 128, vocab 151936: the shape of Qwen3-30B-A3B, ~61 GB in bf16)
with random weights (transformers' own init, run on the target device in
bf16; nothing is downloaded). ``--layers N`` shortens it, ``--tiny`` shrinks
every width for CPU smoke runs.

Variants (``--experts``):

* ``hf``: transformers' experts, unmodified (their default implementation,
  ``grouped_mm`` where it can dispatch); compiled without the lowerings:
  plain Inductor, the baseline.
* ``hf-lowered`` (not in the default list): the same model compiled with
  ``torch_moe_quant.lowerings`` installed (the router and the grouped_mm
  experts are rewritten into ``moe_quant`` ops); compiled mode only.
* a scheme name (``bf16``, ``fp8_w8a8_channel_token``, ``int4_w4a16_g128``,
  ``mxfp4_w4a16``, ``nvfp4_w4a16``, any name of ``torch_moe_quant.SCHEMES``
  without static activation scales): the experts of every layer swapped by
  ``torch_moe_quant.quantize_(model, scheme)`` (quantized once per scheme
  from the same random weights and reused for every mode and batch; the
  float experts are put back afterwards); compiled with the lowerings
  installed (the router becomes ``moe_quant.route`` and is fused with the
  experts into ``moe_quant.moe_<scheme>``).

Modes (``--modes``):

* ``eager``: the model's forward in a Python loop with a ``DynamicCache``
  (what a plain ``model.generate`` does per step).
* ``compiled``: a ``StaticCache``; the prompt is prefilled eagerly, then one
  decode step (forward + greedy argmax) is ``torch.compile(fullgraph=True,
  dynamic=False, mode="reduce-overhead")``-d: CUDA graphs on a GPU. On CPU
  there are no CUDA graphs, so the mode is Inductor's default there (said in
  the header).

Per variant, mode and batch: a random prompt of ``--prompt`` tokens per
sequence is prefilled, then ``--warmup`` + ``--steps`` greedy decode steps
run; each timed step is bracketed by CUDA events and synchronized (a
per-step latency, as a generate loop that checks its stopping criteria each
step sees it); the table reports the median ms per step, batch x 1000 / ms
tokens/s, and speed-ups against ``hf`` and against ours ``bf16`` in the same
mode and batch. Compiled rows also give the compile time (first call), the
``moe_quant`` rewrite counters, and flag CUDA-graph skips and recompiles.
Each row is written to ``--json`` as soon as it is measured; a row that
fails (or passes ``--timeout-per-variant``) prints its error and the run
goes on; rows not started within ``--budget`` seconds are listed as skipped,
so a command ends inside the device's time limit with every finished row.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import platform
import shlex
import signal
import statistics
import sys
import threading
import time
import traceback
from typing import Dict, Iterator, List, Optional, Sequence

import torch

HF = "hf"
HF_LOWERED = "hf-lowered"
DEFAULT_EXPERTS = (HF, "bf16", "fp8_w8a8_channel_token", "int4_w4a16_g128", "mxfp4_w4a16", "nvfp4_w4a16")
MODES = ("eager", "compiled")

#: Qwen3-30B-A3B's shape (its config.json, minus the weights)
QWEN3_30B_A3B = dict(
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_experts=128,
    num_experts_per_tok=8,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    vocab_size=151936,
    num_hidden_layers=48,
    max_position_embeddings=40960,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    norm_topk_prob=True,
    tie_word_embeddings=False,
    decoder_sparse_step=1,
    mlp_only_layers=[],
)
#: every width small (divisible by the 4-bit formats' blocks: 128 for int4 g128)
TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=128,
    num_experts=8,
    num_experts_per_tok=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=512,
    num_hidden_layers=2,
    max_position_embeddings=512,
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- model ---------------------------------------------------------------------


def qwen3_config(layers: Optional[int] = None, tiny: bool = False):
    """A ``Qwen3MoeConfig`` of Qwen3-30B-A3B's shape (``tiny``: small widths)."""
    from transformers import Qwen3MoeConfig

    sizes = dict(QWEN3_30B_A3B)
    if tiny:
        sizes.update(TINY)
    if layers is not None:
        sizes["num_hidden_layers"] = layers
    config = Qwen3MoeConfig(**sizes)
    config.use_cache = True
    return config


def param_bytes(config, dtype=torch.bfloat16) -> int:
    """Bytes of the model's parameters (counted from the config)."""
    h, v, n = config.hidden_size, config.vocab_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    attn = h * q + 2 * h * kv + q * h + 2 * config.head_dim
    experts = config.num_experts * 3 * config.moe_intermediate_size * h
    layer = attn + experts + config.num_experts * h + 2 * h
    emb = v * h * (1 if config.tie_word_embeddings else 2)
    return (n * layer + emb + h) * torch.empty(0, dtype=dtype).element_size()


def expert_param_bytes(config, dtype=torch.bfloat16) -> int:
    return (config.num_hidden_layers * config.num_experts * 3 * config.moe_intermediate_size
            * config.hidden_size * torch.empty(0, dtype=dtype).element_size())


def build_model(config, device, dtype=torch.bfloat16, seed: int = 0):
    """``Qwen3MoeForCausalLM(config)`` with random weights, created directly
    on ``device`` in ``dtype`` (transformers' init runs there: on a GPU the
    whole 48-layer model takes seconds), eval mode, no grads."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3MoeForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()  # no .to(dtype): the rotary inv_freq buffers stay float32, as from_pretrained leaves them
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def experts_modules(model) -> Dict[str, torch.nn.Module]:
    """``{fqn: module}`` of every MoE experts module (to put back later)."""
    return {name: m for name, m in model.named_modules() if name.endswith("mlp.experts")}


def set_submodule(model, fqn: str, module: torch.nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def restore_experts(model, originals: Dict[str, torch.nn.Module]) -> None:
    for fqn, module in originals.items():
        set_submodule(model, fqn, module)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def reset_compiled() -> None:
    """Forget every compiled function and CUDA graph (between rows)."""
    torch._dynamo.reset()
    try:
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
    except Exception:  # noqa: BLE001 (older/newer torch without it: dynamo.reset did it)
        pass
    free_memory()


# -- timing ----------------------------------------------------------------------


class StepTimer:
    """Per-step latency: CUDA events around each step, synchronized after it
    (CPU: wall time)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.ms: List[float] = []

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            end.synchronize()
            self.ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            yield
            self.ms.append((time.perf_counter() - t0) * 1e3)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompt_ids(config, batch: int, length: int, device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=g).to(device)


@dataclasses.dataclass
class Measured:
    step_ms: List[float]
    compile_s: Optional[float] = None
    rewrites: Optional[Dict[str, int]] = None
    wall_ms: Optional[float] = None  # mean wall time per timed step, host clock
    cudagraph_skips: Optional[int] = None  # Inductor's count: > 0 means a graph ran without CUDA graphs
    graphs: Optional[int] = None  # graphs Dynamo compiled for the row: 1 unless the step recompiled


def decode_eager(model, batch: int, prompt: int, warmup: int, steps: int, device: torch.device) -> Measured:
    """Prefill ``prompt`` tokens, then ``warmup`` + ``steps`` greedy steps of
    the eager model with a ``DynamicCache``; the last ``steps`` are timed."""
    from transformers import DynamicCache

    ids = prompt_ids(model.config, batch, prompt, device)
    cache = DynamicCache(config=model.config)
    timer = StepTimer(device)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(warmup):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            with timer.step():
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
        sync(device)
        wall = (time.perf_counter() - t0) * 1e3 / max(steps, 1)
    return Measured(timer.ms, wall_ms=wall)


def compile_mode(device: torch.device, requested: str) -> Optional[str]:
    """``reduce-overhead`` needs CUDA graphs: on CPU the default mode."""
    if requested in ("", "default") or device.type != "cuda":
        return None
    return requested


def decode_compiled(
    model,
    batch: int,
    prompt: int,
    warmup: int,
    steps: int,
    device: torch.device,
    *,
    lowered: bool,
    mode: Optional[str] = "reduce-overhead",
) -> Measured:
    """``StaticCache``; the prompt prefilled eagerly, then the decode step
    (forward + greedy argmax) compiled with ``torch.compile(fullgraph=True,
    dynamic=False, mode=mode)`` (``lowered``: with the moe_quant lowerings
    installed); ``warmup`` (at least 3: compile, CUDA-graph warm-up and
    record) + ``steps`` steps, the last ``steps`` timed."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config
    from transformers import StaticCache

    from torch_moe_quant import lowerings

    warmup = max(warmup, 3)
    reset_compiled()
    counters["moe_quant"].clear()
    skips_before = counters["inductor"].get("cudagraph_skips", 0)
    graphs_before = counters["stats"].get("unique_graphs", 0)
    ids = prompt_ids(model.config, batch, prompt, device)
    cache = StaticCache(config=model.config, max_cache_len=prompt + warmup + steps + 8)
    cudagraphs = mode in ("reduce-overhead", "max-autotune")

    def step(tokens: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=tokens, past_key_values=cache, use_cache=True).logits
        return logits[:, -1:].argmax(-1)

    compiled = torch.compile(step, fullgraph=True, dynamic=False, mode=mode)
    timer = StepTimer(device)
    ctx = lowerings.enabled() if lowered else contextlib.nullcontext()
    # no FX graph / AOT cache: a hit would skip the lowering pass and its counters
    with torch.no_grad(), ctx, inductor_config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        if lowered and not lowerings.installed():
            raise RuntimeError("lowerings.enabled() did not install the pass")
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1:].argmax(-1)
        del out
        sync(device)

        def call(tokens):
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            return compiled(tokens).clone()  # a CUDA-graph output is overwritten by the next replay

        t0 = time.perf_counter()
        nxt = call(nxt)  # compiles
        sync(device)
        compile_s = time.perf_counter() - t0
        rewrites = dict(counters["moe_quant"])
        for _ in range(warmup - 1):
            nxt = call(nxt)
        sync(device)
        skips = counters["inductor"].get("cudagraph_skips", 0) - skips_before
        t0 = time.perf_counter()
        for _ in range(steps):
            with timer.step():
                nxt = call(nxt)
        sync(device)
        wall = (time.perf_counter() - t0) * 1e3 / max(steps, 1)
    graphs = counters["stats"].get("unique_graphs", 0) - graphs_before
    return Measured(timer.ms, compile_s=compile_s, rewrites=rewrites, wall_ms=wall,
                    cudagraph_skips=skips if cudagraphs else None, graphs=graphs)


# -- variants --------------------------------------------------------------------


def check_variants(names: Sequence[str]) -> None:
    import torch_moe_quant as tmq

    for name in names:
        if name in (HF, HF_LOWERED):
            continue
        if name not in tmq.SCHEMES:
            raise SystemExit(f"--experts: unknown {name!r}; use hf, hf-lowered or a scheme of torch_moe_quant.SCHEMES")
        if tmq.get_scheme(name).static_activation:
            raise SystemExit(f"--experts: {name} needs calibrated static activation scales; not supported here")


def apply_variant(model, name: str) -> Dict[str, object]:
    """Swap the experts for ``name`` (a scheme; ``hf``/``hf-lowered``: keep
    transformers'); returns what to record (quantize time, bytes)."""
    if name in (HF, HF_LOWERED):
        return {"experts_impl": str(model.config._experts_implementation)}
    import torch_moe_quant as tmq

    t0 = time.perf_counter()
    summary = tmq.quantize_(model, name, progress="never")
    sync(next(model.parameters()).device)
    return {
        "quantize_s": round(time.perf_counter() - t0, 2),
        "modules": summary.num_converted,
        "experts_gib_before": round(summary.bytes_before / 2**30, 2),
        "experts_gib_after": round(summary.bytes_after / 2**30, 2),
    }


# -- guards ----------------------------------------------------------------------


class RowTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: Optional[float]) -> Iterator[None]:
    """Raise ``RowTimeout`` in the main thread after ``seconds`` (SIGALRM;
    a no-op where there is none or when ``seconds`` is falsy). Python code
    is interrupted between bytecodes: a kernel or a compile worker is
    waited for, then the row is abandoned."""
    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise RowTimeout(f"took longer than {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- rows and table ----------------------------------------------------------------


def variant_label(name: str) -> str:
    if name == HF:
        return "transformers experts"
    if name == HF_LOWERED:
        return "transformers experts + lowerings"
    return f"ours {name}"


def make_row(variant: str, mode: str, batch: int, m: Optional[Measured], error: Optional[str], extra) -> dict:
    row: Dict[str, object] = {"variant": variant, "mode": mode, "batch": batch}
    if m is not None:
        ms = statistics.median(m.step_ms)
        row.update(
            step_ms=round(ms, 4),
            tok_s=round(batch * 1e3 / ms, 2),
            step_ms_min=round(min(m.step_ms), 4),
            step_ms_max=round(max(m.step_ms), 4),
            wall_ms=round(m.wall_ms, 4) if m.wall_ms is not None else None,
            steps=len(m.step_ms),
        )
        if m.compile_s is not None:
            row["compile_s"] = round(m.compile_s, 1)
        if m.rewrites is not None:
            row["rewrites"] = m.rewrites
        if m.cudagraph_skips is not None:
            row["cudagraph_skips"] = m.cudagraph_skips
        if m.graphs is not None:
            row["graphs"] = m.graphs
    if error is not None:
        row["error"] = error
    row.update(extra)
    return row


def _group(row: dict) -> tuple:
    """Rows compared with each other: same model depth, device and widths."""
    env = row.get("env") or {}
    return (row.get("layers"), bool(row.get("tiny")), env.get("gpu"), row["mode"], row["batch"])


def add_speedups(rows: List[dict]) -> None:
    """``vs_hf`` / ``vs_bf16``: step time of ``hf`` / ours ``bf16`` in the
    same mode and batch (and model) over this row's, where both were measured."""
    ref = {(r["variant"],) + _group(r): r.get("step_ms") for r in rows}
    for r in rows:
        if r.get("step_ms") is None:
            continue
        for key, base in (("vs_hf", HF), ("vs_bf16", "bf16")):
            b = ref.get((base,) + _group(r))
            if b:
                r[key] = round(b / r["step_ms"], 3)


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "—" if v is None else format(v, spec) + suffix


def markdown_table(rows: List[dict]) -> str:
    """The results table (speed-ups computed across ``rows``)."""
    add_speedups(rows)
    lines = [
        "| experts | mode | batch | ms / step | tokens/s | vs transformers | vs ours bf16 | compile s | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        notes = []
        if "error" in r:
            notes.append(f"**{r['error']}**")
        if r.get("cudagraph_skips"):
            notes.append(f"**CUDA graphs skipped ({r['cudagraph_skips']})**")
        if r.get("graphs", 1) != 1:
            notes.append(f"**{r['graphs']} graphs compiled (recompiles)**")
        if r.get("rewrites"):
            notes.append(", ".join(f"{k}={v}" for k, v in sorted(r["rewrites"].items())))
        elif r["mode"] == "compiled" and "step_ms" in r and r["variant"] != HF:
            notes.append("no moe_quant rewrites")
        lines.append(
            f"| {variant_label(r['variant'])} | {r['mode']} | {r['batch']} | {_fmt(r.get('step_ms'), '.2f')} | "
            f"{_fmt(r.get('tok_s'), '.0f')} | {_fmt(r.get('vs_hf'), '.2f', 'x')} | "
            f"{_fmt(r.get('vs_bf16'), '.2f', 'x')} | {_fmt(r.get('compile_s'), '.0f')} | {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def header_lines(config_layers: int, command: str, env: Dict[str, str], mode: Optional[str], args) -> List[str]:
    cpu = env.get("device", "").startswith("cpu")
    return [
        f"# End-to-end decode, Qwen3-30B-A3B-shaped model ({config_layers} layers, random bf16 weights"
        + (", tiny widths" if args.tiny else "") + ")",
        "",
        f"Command: `{command}`",
        "",
        "; ".join(f"{k} {v}" for k, v in env.items())
        + f"; compiled: torch.compile(fullgraph=True, dynamic=False, mode={mode!r}) of one decode step "
        + "(forward + argmax) with a StaticCache" + (" (CPU: no CUDA graphs)" if cpu else "")
        + f"; eager: DynamicCache; prompt {args.prompt} tokens, {args.warmup} warm-up steps, "
        + f"median of {args.steps} synchronized decode steps",
        "",
    ]


def environment(device: torch.device) -> Dict[str, str]:
    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "none"
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = str(torch.version.cuda)
    else:
        env["gpu"] = "none (cpu: the moe_quant ops run their reference kernels)"
    return env


def report(paths: Sequence[str], out=sys.stdout) -> List[dict]:
    """One table from the JSON lines of one or more runs (e.g. a run split
    over several commands); speed-ups are recomputed across all of them."""
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    commands = list(dict.fromkeys(r.get("command", "?") for r in rows))
    envs = list(dict.fromkeys(json.dumps(r.get("env", {}), sort_keys=True) for r in rows))
    layers = sorted({r.get("layers") for r in rows}, key=str)
    print(f"# End-to-end decode, Qwen3-30B-A3B-shaped model ({', '.join(map(str, layers))} layers, random bf16 "
          f"weights)\n", file=out)
    print("Commands:\n\n" + "\n".join(f"- `{c}`" for c in commands) + "\n", file=out)
    for e in envs:
        print("; ".join(f"{k} {v}" for k, v in json.loads(e).items()) + "\n", file=out)
    print(markdown_table(rows), file=out, flush=True)
    return rows


# -- main --------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", nargs="+", default=list(DEFAULT_EXPERTS),
                   help=f"hf, {HF_LOWERED} and/or scheme names (default: {' '.join(DEFAULT_EXPERTS)})")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--batch", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 48; --tiny: 2)")
    p.add_argument("--tiny", action="store_true", help="small widths, for CPU smoke runs")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--prompt", type=int, default=8, help="prompt tokens per sequence")
    p.add_argument("--warmup", type=int, default=5, help="untimed decode steps (compiled: at least 3)")
    p.add_argument("--steps", type=int, default=30, help="timed decode steps")
    p.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode on CUDA (CPU: default)")
    p.add_argument("--json", default=None, help="append one JSON line per row to this file")
    p.add_argument("--timeout-per-variant", type=float, default=None,
                   help="seconds allowed to quantizing a variant and to each of its rows "
                        "(one mode and batch); SIGALRM, main thread only")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run: rows not started by then are skipped and listed")
    p.add_argument("--hf-impl", default=None,
                   help="transformers' experts implementation for hf / hf-lowered (default: transformers' "
                        "default, grouped_mm where it can dispatch; also batched_mm, eager)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", nargs="+", default=None, metavar="JSONL",
                   help="no run: print one table from these JSON-lines files (several commands' rows)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def _error_text(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def run(args: argparse.Namespace, out=sys.stdout) -> List[dict]:
    """Build the model, measure every variant x mode x batch (each row
    printed to stderr and appended to ``--json`` as soon as it is measured),
    print the markdown table to ``out``; return the rows."""
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_variants(args.experts)
    import torch_moe_quant  # noqa: F401  (registers the ops)

    config = qwen3_config(args.layers, args.tiny)
    env = environment(device)
    mode = compile_mode(device, args.compile_mode)
    need = param_bytes(config)
    log(f"[e2e] {env} · model {need / 2**30:.1f} GiB in bf16 ({config.num_hidden_layers} layers)")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # the bf16 model + one quantized copy of the experts while quantize_
        # converts (bf16 ours aliases the float weights) + workspace
        quantized = any(v not in (HF, HF_LOWERED, "bf16") for v in args.experts)
        extra = expert_param_bytes(config) * (0.55 if quantized else 0)
        if need + extra + 4 * 2**30 > free:
            raise SystemExit(f"the model needs {need / 2**30:.1f} GiB (+{extra / 2**30:.1f} GiB while quantizing) "
                             f"but {free / 2**30:.1f} of {total / 2**30:.1f} GiB are free: use --layers")
    t0 = time.perf_counter()
    model = build_model(config, device, seed=args.seed)
    if args.hf_impl:
        model.set_experts_implementation(args.hf_impl)
    env["transformers_experts"] = str(model.config._experts_implementation)
    sync(device)
    log(f"[e2e] built in {time.perf_counter() - t0:.1f} s; transformers experts implementation "
        f"{model.config._experts_implementation!r}"
        + (f"; {torch.cuda.memory_allocated(device) / 2**30:.1f} GiB allocated" if device.type == "cuda" else ""))

    command = "python bench/e2e_decode.py " + shlex.join(args.argv)
    print("\n".join(header_lines(config.num_hidden_layers, command, env, mode, args)), file=out, flush=True)
    json_file = open(args.json, "a") if args.json else None
    rows: List[dict] = []
    originals = experts_modules(model)
    skipped: List[str] = []

    def over_budget() -> bool:
        return args.budget is not None and time.perf_counter() - t_start > args.budget

    def record(row: dict) -> None:
        row.update(env=env, layers=config.num_hidden_layers, tiny=bool(args.tiny), prompt=args.prompt,
                   command=command)
        rows.append(row)
        add_speedups(rows)
        if json_file is not None:
            json_file.write(json.dumps(row) + "\n")
            json_file.flush()

    try:
        for variant in args.experts:
            modes = [m for m in args.modes if not (variant == HF_LOWERED and m == "eager")]
            if not modes:
                continue
            if over_budget():
                skipped += [f"{variant}/{m}/{b}" for m in modes for b in args.batch]
                continue
            try:
                log(f"[e2e] {variant}: preparing the experts")
                with time_limit(args.timeout_per_variant):
                    extra = apply_variant(model, variant)
                log(f"[e2e] {variant}: {extra}")
            except Exception as e:  # noqa: BLE001 (also RowTimeout)
                err = _error_text(e)
                log(f"[e2e] {variant}: FAILED to prepare: {err}\n{traceback.format_exc()}")
                restore_experts(model, originals)
                free_memory()
                for m in modes:
                    for b in args.batch:
                        record(make_row(variant, m, b, None, err, {}))
                continue
            try:
                for m in modes:
                    for b in args.batch:
                        if over_budget():
                            skipped.append(f"{variant}/{m}/{b}")
                            continue
                        log(f"[e2e] {variant} {m} batch {b} ...")
                        t_row = time.perf_counter()
                        measured, err = None, None
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats(device)
                        try:
                            with time_limit(args.timeout_per_variant):
                                if m == "eager":
                                    measured = decode_eager(model, b, args.prompt, args.warmup, args.steps, device)
                                else:
                                    measured = decode_compiled(
                                        model, b, args.prompt, args.warmup, args.steps, device,
                                        lowered=variant != HF, mode=mode,
                                    )
                        except Exception as e:  # noqa: BLE001 (also RowTimeout)
                            err = _error_text(e)
                            log(f"[e2e] {variant} {m} batch {b}: FAILED: {err}\n{traceback.format_exc()}")
                            reset_compiled()
                        row = make_row(variant, m, b, measured, err, extra)
                        row["row_s"] = round(time.perf_counter() - t_row, 1)
                        if device.type == "cuda":
                            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
                        record(row)
                        log(f"[e2e] {variant} {m} batch {b}: " + (
                            f"{row['step_ms']:.2f} ms/step, {row['tok_s']:.0f} tok/s"
                            + (f", {row['vs_hf']:.2f}x hf" if row.get("vs_hf") else "")
                            + (f", {row['vs_bf16']:.2f}x ours bf16" if row.get("vs_bf16") else "")
                            + (f", compile {row['compile_s']:.0f} s" if "compile_s" in row else "")
                            if measured is not None else "error") + f" (row {row['row_s']:.0f} s, "
                            f"total {time.perf_counter() - t_start:.0f} s)")
            finally:
                if variant not in (HF, HF_LOWERED):
                    restore_experts(model, originals)
                reset_compiled()
    finally:
        if json_file is not None:
            json_file.close()
        print(markdown_table(rows), file=out, flush=True)
        if skipped:
            print(f"\nSkipped (--budget {args.budget:.0f} s spent): {', '.join(skipped)}", file=out, flush=True)
        log(f"[e2e] done in {time.perf_counter() - t_start:.0f} s")
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        report(args.report)
        return 0
    rows = run(args)
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
