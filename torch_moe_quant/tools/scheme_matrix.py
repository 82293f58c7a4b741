"""The README's supported-scheme matrix, generated from the registry:
``python -m torch_moe_quant.tools.scheme_matrix`` (a test keeps it current).

Columns: the CPU kernel (every op: the plain-PyTorch reference), the CUDA
kernel (every scheme: the Triton path of ``kernels``), the backward op, and
which checkpoint loader of ``nn.loaders`` reads the scheme's weight format
without re-quantizing (which scheme a checkpoint maps to is then found from
its weight and activation config, ``nn.loaders._experts.find_scheme``).
"""

from __future__ import annotations

import torch

from ..formats.core import Format
from ..kernels._operand import CODECS
from ..ops.experts import EXPERT_OPS
from ..schemes import SCHEMES

START = "<!-- scheme-matrix:start -->"
END = "<!-- scheme-matrix:end -->"

#: weight format -> the loaders that read it (nn/loaders)
LOADERS = {
    Format.FP8_E4M3: "compressed-tensors",
    Format.INT8: "compressed-tensors",
    Format.INT4: "compressed-tensors (pack-quantized)",
    Format.NVFP4: "compressed-tensors",
    Format.MXFP4: "gpt-oss (`*_blocks`/`*_scales`), AMD Quark OCP-MX",
    Format.MXFP6_E2M3: "AMD Quark OCP-MX",
    Format.MXFP6_E3M2: "AMD Quark OCP-MX",
}


def markdown() -> str:
    rows = [
        "| scheme | CPU | CUDA | backward | checkpoint loader |",
        "|---|---|---|---|---|",
    ]
    for name, scheme in SCHEMES.items():
        fmt = scheme.weight.fmt
        cuda = "Triton" if fmt is None or fmt in CODECS else "reference"
        op_name = EXPERT_OPS[name]._name.split("::")[-1]
        backward = "yes" if hasattr(torch.ops.moe_quant, f"{op_name}_backward") else "no"
        loader = "— (unquantized: any checkpoint, `quantize_`)" if fmt is None else LOADERS.get(fmt, "—")
        rows.append(f"| `{name}` | reference | {cuda} | {backward} (reference) | {loader} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(START)
    print(markdown())
    print(END)
