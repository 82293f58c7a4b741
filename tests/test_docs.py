"""The README stays true: its op table is the generated one, its commands
are the ones CI runs, and depyf dumps show the moe_quant ops."""

import pathlib

import depyf
import torch
from moe_cases import MoEBlock, inputs, make_experts

from torch_moe_quant.tools import op_table

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_op_table_is_generated_from_the_registry():
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(op_table.START), readme.index(op_table.END)
    in_readme = readme[start + len(op_table.START) : end].strip()
    assert in_readme == op_table.markdown().strip(), (
        "README op table is stale: python -m torch_moe_quant.tools.op_table"
    )


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if line.startswith("python -m venv"))
    assert command in readme


def test_depyf_dump_shows_moe_quant_ops(tmp_path):
    torch._dynamo.reset()
    block = MoEBlock(make_experts("mxfp4_w4a16"))
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    with depyf.prepare_debug(str(tmp_path)):
        compiled(inputs(5))
    dumped = {p.name: p.read_text() for p in tmp_path.rglob("*.py")}
    assert dumped, "depyf wrote nothing"
    hits = [name for name, text in dumped.items() if "torch.ops.moe_quant.experts_mxfp4_w4a16" in text]
    assert hits, sorted(dumped)
    assert any("torch.ops.moe_quant.route" in t for t in dumped.values())
    torch._dynamo.reset()


def test_demo_runs(capsys):
    """The README's first command: a transformers model compiled through the
    lowerings; the bf16 model's router and experts are rewritten, quantized
    experts call their scheme's op."""
    from torch_moe_quant import demo

    torch._dynamo.reset()
    demo.main(["--tokens", "8", "--iters", "1", "--hidden", "128", "--intermediate", "128", "--layers", "1",
               "--schemes", "bf16", "mxfp4_w4a16", "fp8_w8a8_tensor_static"])
    out = capsys.readouterr().out
    bf16 = next(line for line in out.splitlines() if line.startswith("bf16 "))
    assert "grouped_mm=1" in bf16 and "softmax_topk_renormalize=1" in bf16 and "route_experts=1" in bf16
    assert "moe_quant.moe_bf16" in bf16
    mx = next(line for line in out.splitlines() if line.startswith("mxfp4_w4a16 "))
    assert "route_experts=1" in mx and "moe_quant.moe_mxfp4_w4a16" in mx
    static = next(line for line in out.splitlines() if line.startswith("fp8_w8a8_tensor_static "))
    assert "moe_quant.moe_fp8_w8a8_tensor_static" in static  # calibrated with calibrate_, then quantize_
    torch._dynamo.reset()


def test_readme_scheme_matrix_is_generated_from_the_registry():
    from torch_moe_quant.tools import scheme_matrix

    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(scheme_matrix.START), readme.index(scheme_matrix.END)
    in_readme = readme[start + len(scheme_matrix.START) : end].strip()
    assert in_readme == scheme_matrix.markdown().strip(), (
        "README scheme matrix is stale: python -m torch_moe_quant.tools.scheme_matrix"
    )
