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
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
    colours = {4: "tab:red", 6: "tab:purple", 8: "tab:blue", 16: "tab:gray"}
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
    args = p.parse_args()
    rows = load(args.jsonl)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(rows) + "\n")
    if args.png:
        plot(rows, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
