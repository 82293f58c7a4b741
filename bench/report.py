"""Markdown table and plot from ``moe_bench.py --json`` rows (any machine).

    python bench/report.py bench/results/h100.jsonl --md bench/results/h100_table.md --png bench/results/h100.png

The plot has one panel per model shape: speed-up of the whole forward over
the bf16 ``torch._grouped_mm`` MoE against M (log scale), one line per
scheme, coloured by weight bits. Needs matplotlib (not a dependency of the
package).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List

sys.path.insert(0, "bench")


def load(path: str) -> List[Dict]:
    """The rows of ``path``, the last one of each (shape, scheme, M) kept (a
    resumed run re-measures a scheme whose rows were cut short), with
    ``roofline_pct`` restated at the row's device bandwidth (``normalize``)."""
    rows: Dict[tuple, Dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows[(r["shape"], r["scheme"], r["M"])] = r
    return [normalize(r) for r in rows.values()]


def normalize(r: Dict) -> Dict:
    """Rows written before ``moe_bench`` recorded ``hbm_bytes_per_s`` used the
    H100 figure (3.0 TB/s) on every GPU: the floor is recomputed at the device's
    bandwidth (``moe_bench.hbm_bytes_per_s``) from the flop term, which does
    not depend on it, and the byte term, which the old floor gives exactly
    whenever it was the larger one."""
    from moe_bench import SHAPES, hbm_bytes_per_s, roofline_ms

    import torch_moe_quant as tmq

    if "hbm_bytes_per_s" in r:
        return r
    bw = hbm_bytes_per_s(r.get("device", ""))
    old_floor = r["roofline_pct"] / 100 * r["fwd_ms"]
    flops_ms = roofline_ms(SHAPES[r["shape"]], r["M"], 0.0, tmq.get_scheme(r["scheme"]), 3.0e12)
    bytes_ms = old_floor * 3.0e12 / bw if old_floor > flops_ms else 0.0
    return dict(r, roofline_pct=100 * max(flops_ms, bytes_ms) / r["fwd_ms"], hbm_bytes_per_s=bw)


#: scheme groups of the summary, by weight bits and activation quantization
GROUPS = ("bf16/fp16", "fp32", "8-bit weight-only", "8-bit w8a8", "4-bit weight-only", "4/6-bit, quantized act.")


def group_of(scheme_name: str) -> str:
    import torch_moe_quant as tmq

    s = tmq.get_scheme(scheme_name)
    bits = s.weight.bits
    if bits == 32:
        return "fp32"
    if bits == 16:
        return "bf16/fp16"
    if bits == 8:
        return "8-bit weight-only" if s.activation is None else "8-bit w8a8"
    return "4-bit weight-only" if s.activation is None else "4/6-bit, quantized act."


def _range(vals: List[float], fmt: str = ".2f", unit: str = "x") -> str:
    if not vals:
        return "-"
    lo, hi = format(min(vals), fmt), format(max(vals), fmt)
    return f"{lo}{unit}" if lo == hi else f"{lo}-{hi}{unit}"


def summary(rows: List[Dict]) -> str:
    """Per shape and M: the bf16 ``grouped_mm`` time and, per scheme group,
    the range of speed-ups over it."""
    out = ["| shape | M | bf16 grouped_mm ms | " + " | ".join(GROUPS) + " |", "|---|---|---|" + "---|" * len(GROUPS)]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for M in sorted({r["M"] for r in rows if r["shape"] == shape}):
            mine = [r for r in rows if r["shape"] == shape and r["M"] == M]
            cells = [_range([r["speedup_bf16"] for r in mine if group_of(r["scheme"]) == g]) for g in GROUPS]
            out.append(f"| {shape} | {M} | {mine[0]['bf16_ms']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def targets(rows: List[Dict]) -> str:
    """The issue's speed targets, each with the measured numbers."""
    import torch_moe_quant as tmq

    def sel(pred):
        return [r for r in rows if pred(r)]

    bits = lambda r: tmq.get_scheme(r["scheme"]).weight.bits  # noqa: E731
    lines = []
    four = sel(lambda r: r["M"] <= 16 and bits(r) == 4)
    ok4 = [r for r in four if r["speedup_bf16"] >= 3 and r["roofline_pct"] >= 75]
    best = max(four, key=lambda r: r["speedup_bf16"])
    lines.append(
        f"* M <= 16, 4-bit weights >= 3x bf16 and >= 75% of the HBM floor: {len(ok4)} of {len(four)} points; "
        f"speed-up {_range([r['speedup_bf16'] for r in four])} (best {best['scheme']} on {best['shape']} M={best['M']}), "
        f"{_range([r['roofline_pct'] for r in four], '.0f', '%')} of the floor."
    )
    eight = sel(lambda r: r["M"] <= 16 and bits(r) == 8)
    per_scheme = {}
    for r in eight:
        per_scheme.setdefault(r["scheme"], []).append(r["speedup_bf16"])
    met = sorted(n for n, v in per_scheme.items() if min(v) >= 1.7)
    lines.append(
        f"* M <= 16, 8-bit >= 1.7x: {sum(r['speedup_bf16'] >= 1.7 for r in eight)} of {len(eight)} points; "
        f"every shape and M for {', '.join(met) or 'no scheme'}; per scheme (worst-best): "
        + "; ".join(f"{n} {_range(v)}" for n, v in per_scheme.items())
        + "."
    )
    m1 = sel(lambda r: r["M"] == 1)
    outside = {}
    for r in m1:
        outside.setdefault(group_of(r["scheme"]), []).append(1000 * (r["fwd_ms"] - r["gemms_ms"]))
    lines.append(
        "* M = 1, everything outside the two GEMMs <= 20 us (`fwd - gemms`, two separate graphs: noise of both; "
        "`gemms` runs the GEMMs on compute-dtype inputs, so where `fwd` uses the native fp8/int8 dot the difference "
        "can be negative): "
        + "; ".join(f"{g} {_range(v, '.0f', ' us')} (median {sorted(v)[len(v) // 2]:.0f})" for g, v in outside.items())
        + "."
    )
    host = [r["host_us"] for r in m1 if r.get("host_us") is not None]
    lines.append(
        f"* host time per eager call at M = 1 <= 30 us: {_range(host, '.0f', ' us')} "
        f"(median {sorted(host)[len(host) // 2]:.0f} us)."
    )
    big = sel(lambda r: r["M"] == 4096)
    fp8 = [r for r in big if r["scheme"].startswith("fp8_w8a8")]
    lines.append(
        "* M = 4096, fp8 w8a8 >= 1.5x bf16: "
        + "; ".join(f"{r['shape']} {r['scheme']} {r['speedup_bf16']:.2f}x" for r in fp8)
        + f". Every scheme >= 0.9x: {sum(r['speedup_bf16'] >= 0.9 for r in big)} of {len(big)} points."
    )
    deq = [r for r in rows if isinstance(r.get("speedup_dequant"), float)]
    slow = [r for r in deq if r["speedup_dequant"] < 1]
    lines.append(
        f"* never slower than the scheme's own dequantize-then-grouped_mm path: {len(deq) - len(slow)} of {len(deq)} "
        "measured points hold"
        + (": exceptions " + "; ".join(f"{r['shape']} M={r['M']} {r['scheme']} {r['speedup_dequant']:.2f}x" for r in slow)
           if slow else "")
        + "."
    )
    return "\n".join(lines)


def markdown(rows: List[Dict]) -> str:
    from moe_bench import _md

    head = (
        "| shape | M | scheme | fwd ms | gemms ms | host us | bf16 ms | dequant ms | vs bf16 | vs dequant "
        "| % roofline | err |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([head] + [_md(r) for r in rows])


def plot(rows: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import torch_moe_quant as tmq

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    colours = {4: "tab:red", 6: "tab:purple", 8: "tab:blue", 16: "tab:gray", 32: "tab:olive"}
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4.5), sharey=True, squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        mine = [r for r in rows if r["shape"] == shape]
        for scheme in dict.fromkeys(r["scheme"] for r in mine):
            pts = sorted((r["M"], r["speedup_bf16"]) for r in mine if r["scheme"] == scheme)
            bits = tmq.get_scheme(scheme).weight.bits
            ax.plot(*zip(*pts), marker="o", ms=3, lw=1, alpha=0.7, color=colours.get(bits, "k"))
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(shape)
        ax.set_xlabel("M (tokens)")
    axes[0][0].set_ylabel("speed-up over bf16 grouped_mm")
    for bits, c in colours.items():
        axes[0][-1].plot([], [], color=c, label=f"{bits}-bit weights")
    axes[0][-1].legend(loc="upper right", fontsize=8)
    fig.suptitle(f"torch_moe_quant Triton path, {rows[0].get('device', '')}, every scheme")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("jsonl")
    p.add_argument("--md", default=None)
    p.add_argument("--png", default=None)
    p.add_argument("--summary", default=None, help="write the summary table and the target checks here")
    args = p.parse_args()
    rows = load(args.jsonl)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(rows) + "\n")
    if args.summary:
        with open(args.summary, "w") as f:
            f.write(summary(rows) + "\n\n" + targets(rows) + "\n")
    if args.png:
        plot(rows, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
