"""Experiment (issue 18): what limits the decode kernel? Times source variants of
``_decode_kernel.moe_decode_kernel`` on single GEMMs (CUDA graph, L2 flushed):

* ``base``: the kernel as it is;
* ``pref``: int4 per-K-tile scales loaded one tile ahead into registers (the
  pipeliner leaves loads that do not feed the dot synchronous);
* ``nodec``: the int4 decode replaced by one conversion per word (wrong values:
  the memory and MMA ceiling of the kernel's structure);
* ``tiled`` / ``nodec_tiled``: words read as if each (row block, K tile) were
  contiguous in memory (a kernel layout; wrong values, same bytes).

    python bench/exp_decode_variants.py

It edits the kernel source as it was at commit a5bff61 (results:
bench/results/h200_decode_rows.md) and asserts every line it replaces, so on
a later kernel it stops with an AssertionError naming the line.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys
import tempfile

import torch

mg = importlib.import_module("torch_moe_quant.kernels.moe_gemm")
dk = importlib.import_module("torch_moe_quant.kernels._decode_kernel")
sys.path.insert(0, "bench")
from _decode_gemms import decode_gemms  # noqa: E402
from moe_bench import Timer, copy_bandwidth  # noqa: E402

SRC = pathlib.Path(dk.__file__).read_text().replace("from ._gemm_kernel import", "from torch_moe_quant.kernels._gemm_kernel import")

LOAD = "            words = tl.load(w_rows + offs_w[None, :] * stride_wk)\n"
TILED = ("            words = tl.load(w_ptr + expert * stride_we + pid_n * BLOCK_N * stride_wn + (k0 // CPW) * BLOCK_N"
         " + tl.arange(0, BLOCK_N)[:, None] * SUB + tl.arange(0, SUB)[None, :])\n")
DEC = "                v0, v1, v2, v3, v4, v5, v6, v7 = _int4_split_asm(words)\n"
NODEC = ("                v0 = words.to(tl.float32, bitcast=True).to(tl.bfloat16)\n"
         "                v1, v2, v3, v4, v5, v6, v7 = v0, v0, v0, v0, v0, v0, v0\n")
S_OLD = ("            s = _decode_scale(tl.load(s_rows + (k0 // SCALE_BLOCK_K) * stride_sk, mask=n_ok, other=0), SCALE_CODEC, FP8_NATIVE)\n"
         "            acc += tl.dot(wt, a_t) * s[:, None]\n")
S_NEW = ("            s_nxt = tl.load(s_rows + ((k0 + BLOCK_K) // SCALE_BLOCK_K) * stride_sk, mask=n_ok & (k0 + BLOCK_K < K), other=0)\n"
         "            acc += tl.dot(wt, a_t) * _decode_scale(s_cur, SCALE_CODEC, FP8_NATIVE)[:, None]\n"
         "            s_cur = s_nxt\n")
LOOP = "    for k0 in range(0, K, BLOCK_K):\n"
PRE = ("    if SCALE_MODE == _SM_PER_K_TILE:\n"
       "        s_cur = tl.load(s_rows, mask=n_ok, other=0)\n") + LOOP


def variant(name: str):
    src = SRC
    for part, edits in {
        "pref": [(S_OLD, S_NEW), (LOOP, PRE)],
        "nodec": [(DEC, NODEC)],
        "tiled": [(LOAD, TILED)],
    }.items():
        if part in name.split("_")[0:2]:
            for o, n in edits:
                assert src.count(o) == 1, (name, o)
                src = src.replace(o, n)
    path = pathlib.Path(tempfile.gettempdir()) / f"dk_{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"dk_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.moe_decode_kernel


CODE = ["base", "tiled", "nodec_tiled", "base_bk256", "nodec_bk256", "base_bk512"]
CONFIGS = ["64,4,4", "64,4,3"]
CASES = ["mixtral-8x7b:16", "gpt-oss-120b:16", "deepseek-v3:16", "qwen3-30b-a3b:1"]


def main() -> int:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--codes", nargs="*", default=CODE)
    p.add_argument("--configs", nargs="*", default=CONFIGS, help="BLOCK_N,warps,stages")
    p.add_argument("--cases", nargs="*", default=CASES, help="shape:M")
    p.add_argument("--schemes", nargs="*", default=["int4_w4a16_channel"])
    args = p.parse_args()
    codes = args.codes
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs]
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases]
    kernels = {}
    for name in codes:
        kernels[name] = variant(name.split("_bk")[0])
    dev = torch.device("cuda")
    timer = Timer(10)
    bw = copy_bandwidth()
    orig = dk.moe_decode_kernel
    print(f"# copy bandwidth {bw / 1e12:.2f} TB/s; % of floor (weight bytes / copy bw) per (code, (BLOCK_N, warps, stages))")
    cols = [(c, v) for c in codes for v in configs]
    print("| shape | M | scheme | gemm | " + " | ".join(f"{c} {v}" for c, v in cols) + " |")
    print("|---|---|---|---|" + "---|" * len(cols))
    shapes = list(dict.fromkeys(s for s, _ in cases))
    for gemm in decode_gemms(shapes, args.schemes, lambda shape: [M for s, M in cases if s == shape], dev):
        floor_ms = gemm.weight_bytes / bw * 1e3
        cells = []
        for code, (bn, warps, stages) in cols:
            dk.moe_decode_kernel = kernels[code]
            words = int(code.split("bk")[1]) // 8 if "bk" in code else 16
            mg._INT4_ORDER = mg.KOrder(8, words)
            mg.DECODE_BLOCK_N, mg.DECODE_WARPS, mg.DECODE_STAGES = bn, warps, stages
            try:
                cells.append(f"{100 * floor_ms / timer.graph_ms(gemm.run):.0f}")
            except Exception as e:  # noqa: BLE001 - a variant that does not compile / fit
                cells.append(type(e).__name__)
        dk.moe_decode_kernel = orig
        mg._INT4_ORDER = mg.KOrder(8, 16)
        print(gemm.label() + " " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
