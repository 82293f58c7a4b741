"""Opt-in autotuning of the grouped GEMM's tiles, with an on-disk cache.

Off by default: ``select_config``'s heuristic picks every tile. Turn it on
with the environment variable ``TORCH_MOE_QUANT_AUTOTUNE=<path.json>`` (read
at the first GEMM) or ``enable_autotune(path)`` / ``disable_autotune()``.

When on, the first eager CUDA call of each ``TuneKey`` (device, weight
format and granularity, compute dtype, E, top_k, N, K and the token count
rounded up to a power of two) times every ``candidates(...)`` config on the
call's own inputs (CUDA events, median of ``REPS`` runs after one warm-up),
keeps the fastest, and writes it to the JSON file (atomically: a temporary
file, then a rename). Later calls and later processes read it from there.
No tuning happens while ``torch.compile`` traces, while a CUDA graph is
captured, or on the CPU (the interpreter): a cached entry is used if there
is one, else the heuristic. A file that cannot be parsed is reported with a
warning and ignored (it is rewritten at the next tuned entry).

The cache holds plain JSON (no hand-edited tables ship with the package):
``{"version": 1, "entries": {"<key>": {"block_m": 64, ...}}}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch

from ..formats.core import cuda_capturing
from ..schemes import WeightSpec
from .config import (
    MIN_BLOCK, SMEM_BUDGET, GemmProblem, KernelConfig, _pow2_at_least, block_k_for, select_config, stage_bytes,
)

ENV_VAR = "TORCH_MOE_QUANT_AUTOTUNE"
VERSION = 1
#: timed runs per candidate (after one warm-up run)
REPS = 5


@dataclasses.dataclass(frozen=True)
class TuneKey:
    """What a tuned config is valid for."""

    device: str
    weight: str
    dtype: str
    num_experts: int
    top_k: int
    n: int
    k: int
    tokens_pow2: int

    @staticmethod
    def of(problem: GemmProblem, spec: WeightSpec, device: torch.device) -> "TuneKey":
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        tokens = _pow2_at_least(problem.num_tokens, 1)
        return TuneKey(
            name, f"{spec}|zp={spec.zero_point.value}|act_order={spec.act_order.value}",
            str(problem.dtype).replace("torch.", ""), problem.num_experts, problem.top_k,
            problem.n, problem.k, tokens,
        )

    def __str__(self) -> str:
        return "/".join(str(v) for v in dataclasses.astuple(self))


def candidates(problem: GemmProblem, spec: WeightSpec) -> List[KernelConfig]:
    """Configs worth timing for ``problem``: the heuristic's pick first, then
    block_m around the pairs per expert, block_n 64/128, block_k from the
    heuristic's rule (``block_k_for``) for 64 and 128, 4 or 8 warps, and
    the deepest pipeline that fits ``SMEM_BUDGET`` (at most 4 stages)."""
    base = select_config(problem, spec, "cuda")
    out = [base]
    ppe = problem.pairs_per_expert
    block_ms = [m for m in (16, 32, 64, 128) if m <= max(16, 2 * ppe)] or [16]
    for bm in block_ms:
        for bn in (64, 128):
            for pref_k in (64, 128):
                bk = block_k_for(spec, pref_k, problem.dtype)
                if bk < MIN_BLOCK:
                    continue
                for warps in (4, 8):
                    stages = 4
                    while stages > 1 and stages * stage_bytes(spec, problem.dtype, bm, bn, bk) > SMEM_BUDGET:
                        stages -= 1
                    cfg = KernelConfig(bm, bn, bk, 8 if bm >= 64 else 1, warps, stages)
                    if cfg not in out:
                        out.append(cfg)
    return out


class AutotuneCache:
    """The JSON file of tuned configs (module docstring)."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: Dict[str, KernelConfig] = self._load()

    def _load(self) -> Dict[str, KernelConfig]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") != VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {VERSION}")
            return {key: KernelConfig(**cfg) for key, cfg in data["entries"].items()}
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            warnings.warn(f"ignoring the autotune cache {self.path}: it cannot be read ({e})", stacklevel=3)
            return {}

    def get(self, key: TuneKey) -> Optional[KernelConfig]:
        return self._entries.get(str(key))

    def put(self, key: TuneKey, config: KernelConfig) -> None:
        with self._lock:
            self._entries[str(key)] = config
            payload = {
                "version": VERSION,
                "entries": {k: dataclasses.asdict(v) for k, v in sorted(self._entries.items())},
            }
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(payload, f, indent=1)
            os.replace(tmp, self.path)

    def __len__(self) -> int:
        return len(self._entries)


_UNSET = object()
_cache = _UNSET  # AutotuneCache, None (off) or _UNSET (read ENV_VAR at first use)


def enable_autotune(path: Union[str, os.PathLike]) -> AutotuneCache:
    """Tune on first use and keep the results in ``path`` (JSON)."""
    global _cache
    _cache = AutotuneCache(path)
    return _cache


def disable_autotune() -> None:
    """Back to the heuristic (the file is left as it is)."""
    global _cache
    _cache = None


def active_cache() -> Optional[AutotuneCache]:
    """The cache in use, or None when autotuning is off."""
    global _cache
    if _cache is _UNSET:
        path = os.environ.get(ENV_VAR)
        _cache = AutotuneCache(path) if path else None
    return _cache


Timer = Callable[[Callable[[], object]], float]


def cuda_time_ms(fn: Callable[[], object], reps: int = REPS) -> float:
    """Median over ``reps`` CUDA-event-timed runs of ``fn`` after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def config_for(
    problem: GemmProblem,
    spec: WeightSpec,
    device: torch.device,
    run: Callable[[KernelConfig], object],
    timer: Timer = cuda_time_ms,
) -> KernelConfig:
    """The config to launch ``problem`` with: the heuristic when autotuning is
    off; else the cached entry, or (eager CUDA calls only) the fastest of
    ``candidates`` timed by calling ``run(config)``, then cached."""
    cache = active_cache()
    if cache is None:
        return select_config(problem, spec, device)
    key = TuneKey.of(problem, spec, device)
    hit = cache.get(key)
    if hit is not None:
        return hit
    if device.type != "cuda" or torch.compiler.is_compiling() or cuda_capturing():
        return select_config(problem, spec, device)
    timings = []
    for cfg in candidates(problem, spec):
        try:
            timings.append((timer(lambda cfg=cfg: run(cfg)), cfg))
        except Exception as e:  # a config the compiler or the GPU refuses (e.g. out of resources)
            warnings.warn(f"autotune: skipping {cfg} ({type(e).__name__}: {str(e)[:80]})", stacklevel=2)
    if not timings:
        return select_config(problem, spec, device)
    best = min(timings, key=lambda t: t[0])[1]
    cache.put(key, best)
    return best


__all__ = [
    "AutotuneCache",
    "ENV_VAR",
    "TuneKey",
    "active_cache",
    "candidates",
    "config_for",
    "cuda_time_ms",
    "disable_autotune",
    "enable_autotune",
]
