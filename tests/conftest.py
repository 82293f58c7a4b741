"""Fixtures shared by the lowering tests, and the ``slow`` marker.

``pytest -m "not slow"`` is the contributors' fast subset (formats, schemes,
reference, routing, errors, validation, fuzz, quantize_); CI runs everything.
A module is slow when it runs Triton kernels under the interpreter, compiles
with Inductor, builds transformers models or starts processes."""

import pathlib

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config

from torch_moe_quant import lowerings


@pytest.fixture
def fresh():
    """No compiled code, counters or FX-graph / AOT cache hits from earlier
    tests (a cache hit skips the pass and its counters)."""
    torch._dynamo.reset()
    counters.clear()
    with inductor_config.patch(fx_graph_cache=False), torch._functorch.config.patch(
        enable_autograd_cache=False
    ):
        yield
    torch._dynamo.reset()


@pytest.fixture
def lowered(fresh):
    """``fresh``, with the moe_quant lowerings installed for the test."""
    with lowerings.enabled():
        yield


#: test modules marked ``slow`` as a whole
SLOW_MODULES = frozenset({
    "test_act_quant_cuda.py",
    "test_act_quant_interpret.py",
    "test_block_fusion.py",
    "test_compile.py",
    "test_decode_kernel.py",
    "test_distributed.py",
    "test_grad.py",
    "test_kernels_compile.py",
    "test_kernels_interpret.py",
    "test_loaders.py",
    "test_lowerings_experts.py",
    "test_lowerings_goldens.py",
    "test_lowerings_routing.py",
    "test_nn_transformers.py",
    "test_ops.py",
    "test_route_kernel.py",
})
#: single slow tests of otherwise fast modules (node-id prefixes)
SLOW_TESTS = (
    "test_docs.py::test_depyf_dump_shows_moe_quant_ops",
    "test_docs.py::test_demo_runs",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = pathlib.Path(str(item.fspath)).name
        node = item.nodeid.rsplit("/", 1)[-1]
        if name in SLOW_MODULES or node.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
