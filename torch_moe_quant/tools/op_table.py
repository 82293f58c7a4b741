"""The README's table of ``torch.ops.moe_quant`` schemas, generated from the
registry so it cannot drift: ``python -m torch_moe_quant.tools.op_table``.
A test checks the README holds exactly this text between its markers."""

from __future__ import annotations

import torch

from ..ops.experts import SIGNATURES
from ..ops.signature import COMMON_HEAD, COMMON_TAIL

START, END = "<!-- op-table:start -->", "<!-- op-table:end -->"


def markdown() -> str:
    lines = [
        "Every expert op takes `" + ", ".join(f"Tensor {n}" for n in COMMON_HEAD)
        + "`, then its weight tensors (below), then `" + ", ".join(COMMON_TAIL[:2])
        + "`, the static activation scales if it has them, then `"
        + ", ".join(COMMON_TAIL[2:]) + "`, and returns `Tensor` `[M, H]`. "
        "Each has a `<op>_backward` twin (gradients for `hidden_states` and `topk_weights`).",
        "",
        "| op | weights | activations | scheme-specific arguments |",
        "|---|---|---|---|",
    ]
    for name, sig in SIGNATURES.items():
        args = ", ".join(sig.weight_args + sig.static_args)
        act = sig.scheme.activation or "—"
        lines.append(f"| `experts_{name}` | {sig.scheme.weight} | {act} | `{args}` |")
    lines += ["", "| op | schema |", "|---|---|"]
    for op in ("route", "route_backward", "align"):
        lines.append(f"| `{op}` | `{getattr(torch.ops.moe_quant, op).default._schema}` |".replace("moe_quant::", ""))
    for op in sorted(dir(torch.ops.moe_quant)):
        if op.startswith(("quantize_", "dequantize_")):
            schema = str(getattr(torch.ops.moe_quant, op).default._schema).replace("moe_quant::", "")
            lines.append(f"| `{op}` | `{schema}` |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(START)
    print(markdown())
    print(END)
