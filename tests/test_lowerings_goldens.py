"""One golden of the rewritten post-grad graph per expert-compute pattern.

Every pattern name the expert rewrites count under
(``counters["moe_quant"][name]``: a dispatch form, optionally a weight
decode form and an fp8 activation QDQ) gets a small module that produces
it; the test checks that this pattern (and no other expert pattern) fired,
that the graph holds exactly one moe_quant experts / whole-block call, and
that the rewritten graph equals its golden file under
``tests/goldens/lowerings/<name>.txt``. ``EXPECTTEST_ACCEPT=1`` rewrites the
files (review the diff). The inline goldens of ``test_lowerings_experts``
and ``test_lowerings_routing`` stay where they are; this file covers every
name, including the ones they do not. The goldens are torch 2.13's (the
CI pin): other versions may differ (torch 2.11 traces no ``one_hot``
range asserts in ``dense_matmul``, so there its route and experts fuse).
"""

import os
import pathlib

import pytest
import torch
from test_lowerings_experts import (
    ONE_HOT_ASSERTS,
    Moe,
    batched,
    decode_formats,
    decode_fp8,
    decode_int4,
    decode_mxfp4,
    dense_einsum,
    dense_matmul,
    expert_rewrites,
    experts_of,
    fp8_qdq,
    grouped,
    hidden,
    moe_block,
    tokens,
)
from lowering_graphs import rewritten_graph

from torch_moe_quant.lowerings import expert_patterns

GOLDENS = pathlib.Path(__file__).parent / "goldens" / "lowerings"
DISPATCH = {"grouped_mm": grouped, "batched_mm": batched, "dense_einsum": dense_einsum, "dense_matmul": dense_matmul}
#: decode form -> (scheme of the weights, decode function); "_formats": formats.dequantize in the graph
DECODE = {
    "fp8": ("fp8_w8a16_channel", decode_fp8),
    "fp8_formats": ("fp8_w8a16_channel", decode_formats),
    "int4": ("int4_w4a16_g32", decode_int4),
    "int4_formats": ("int4_w4a16_g32", decode_formats),
    "mxfp4": ("mxfp4_w4a16", decode_mxfp4),
    "mxfp4_formats": ("mxfp4_w4a16", decode_formats),
}


def pattern_names():
    return sorted({r.name for r in expert_patterns.rewrites()})


def case(name):
    """(module, input) that produces pattern ``name``."""
    if name == "grouped_mm_fallback":
        # transformers' own grouped GEMM op, which it calls for non-bf16 weights
        return moe_block("qwen3_moe", "grouped_mm", torch.float32), tokens(5, torch.float32)
    dispatch, _, rest = name.partition("[")
    forms = rest.rstrip("]").split(",") if rest else []
    qdq = fp8_qdq if "fp8_qdq" in forms else None
    decode = [f for f in forms if f != "fp8_qdq"]
    # grouped_mm runs bf16 only on CPU; the others in fp32 (exact graphs, no casts),
    # except int4_formats, whose fp32 graph is int4's
    dtype = torch.bfloat16 if dispatch == "grouped_mm" or "int4_formats" in forms else torch.float32
    if decode:
        scheme, fn = DECODE[decode[0]]
        if qdq is not None:
            scheme = "fp8_w8a8_channel_token"
        return Moe(experts_of(scheme, dtype), DISPATCH[dispatch], fn, qdq=qdq), hidden(5, dtype)
    return Moe(experts_of(None, dtype), DISPATCH[dispatch]), hidden(5, dtype)


def test_every_pattern_has_a_case():
    assert len(pattern_names()) == 29
    for name in pattern_names():
        case(name)  # raises KeyError for a form without a builder


@pytest.mark.parametrize("name", pattern_names())
def test_golden_per_pattern(lowered, name):
    if name == "dense_matmul" and not ONE_HOT_ASSERTS:
        pytest.skip("torch 2.11 traces no one_hot asserts: another (fused) graph than the torch 2.13 golden")
    module, x = case(name)
    graph = rewritten_graph(module, x)
    assert expert_rewrites() == {name: 1}
    assert graph.count("torch.ops.moe_quant.experts_") + graph.count("torch.ops.moe_quant.moe_") == 1, graph
    path = GOLDENS / f"{name}.txt"
    if os.environ.get("EXPECTTEST_ACCEPT") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(graph + "\n")
    assert path.exists(), f"no golden {path}: run with EXPECTTEST_ACCEPT=1"
    assert graph + "\n" == path.read_text(), f"{name}: the rewritten graph changed (EXPECTTEST_ACCEPT=1 to accept)"
