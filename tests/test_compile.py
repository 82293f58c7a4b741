"""torch.compile (fullgraph, dynamic), recompilation and torch.export of MoE
blocks built on the moe_quant ops."""

import io

import pytest
import torch
from moe_cases import MoEBlock, inputs, make_experts, rel_err

import torch_moe_quant as tmq
from torch._dynamo.testing import CompileCounterWithBackend

SCHEMES = sorted(tmq.SCHEMES)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", SCHEMES)
def test_compile_fullgraph_dynamic_matches_eager(name):
    block = MoEBlock(make_experts(name))
    x = inputs(11)
    eager = block(x)
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    out = compiled(x)
    assert out.shape == eager.shape and out.dtype == eager.dtype
    # the expert op is opaque (same kernel); only the router matmul may be
    # reassociated by Inductor, which moves weights by ~1 ulp
    assert rel_err(out, eager) < 1e-2
    assert rel_err(compiled(inputs(3)), block(inputs(3))) < 1e-2


@pytest.mark.parametrize("name", ["bf16", "fp8_w8a8_channel_token", "int4_w4a16_g128", "mxfp4_w4a16", "nvfp4_w4a4"])
def test_dynamic_token_dim_compiles_once(name):
    block = MoEBlock(make_experts(name))
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    for M in (1, 3, 64, 257):
        x = inputs(M)
        # unbacked: a backed dynamic dim is specialized when it is 1, which
        # would compile M=1 separately (measured: 2 frames with mark_dynamic)
        torch._dynamo.decorators.mark_unbacked(x, 0)
        out = compiled(x)
        assert rel_err(out, block(x)) < 1e-2
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"


def test_generated_code_calls_moe_quant():
    from torch._inductor.utils import run_and_get_code

    block = MoEBlock(make_experts("mxfp4_w4a16"))
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    _, code = run_and_get_code(compiled, inputs(5))
    src = "\n".join(code)
    assert "torch.ops.moe_quant.route.default" in src
    assert "torch.ops.moe_quant.experts_mxfp4_w4a16.default" in src


@pytest.mark.parametrize("name", ["bf16", "fp8_w8a8_block128", "int4_w4a16_gptq_g128_actorder", "mxfp4_w4a16", "nvfp4_w4a4"])
def test_export_round_trip(name):
    block = MoEBlock(make_experts(name))
    x = inputs(6)
    M = torch.export.Dim("M", min=1, max=4096)
    ep = torch.export.export(block, (x,), dynamic_shapes={"x": {0: M}})
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert f"moe_quant.experts_{name}.default" in targets
    assert torch.equal(ep.module()(x), block(x))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    y = inputs(9)
    assert torch.equal(loaded.module()(y), block(y))
