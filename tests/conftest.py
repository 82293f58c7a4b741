"""Fixtures shared by the lowering tests."""

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
