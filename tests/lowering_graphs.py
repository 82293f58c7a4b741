"""The post-grad graph the moe_quant pass leaves, as text: what the
lowering goldens compare (shared by the routing and expert-compute tests)."""

from __future__ import annotations

import re

import torch
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

from torch_moe_quant.lowerings.install import CONFIG_KEY, _config_value, get_custom_graph_passes


class _CaptureGraph(CustomGraphPass):
    """Runs after the moe_quant pass and records the graph it left."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph):
        lines = graph.python_code("self").src.strip().splitlines()[1:]  # drop "def forward"
        body = (re.sub(r";  [\w =]+ = None$", "", line.strip()) for line in lines)
        self.graphs.append("\n".join(line for line in body if line))

    def uuid(self):
        return None


def rewritten_graph(fn, *args) -> str:
    """Compile ``fn(*args)`` (fullgraph, no grad) with a capture pass after the
    installed passes; the one post-grad graph it saw, as code lines."""
    capture = _CaptureGraph()
    passes = (*get_custom_graph_passes(getattr(inductor_config, CONFIG_KEY)), capture)
    with inductor_config.patch({CONFIG_KEY: _config_value(passes)}), torch.no_grad():
        torch.compile(fn, fullgraph=True)(*args)
    (graph,) = capture.graphs
    return graph
