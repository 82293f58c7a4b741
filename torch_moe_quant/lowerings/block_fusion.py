"""Whole-block rewrite: ``route`` feeding ``experts_<scheme>`` -> ``moe_<scheme>``.

Runs after the pattern rewrites (``install.MoeQuantPass``), so it sees the
routers and experts they produced as well as calls a user wrote. A pair
is fused when the ``route`` outputs reach the experts call and nothing
else, through value-preserving steps only:

* weights: ``getitem(route, 0)``, then at most one dtype cast
  (``prims.convert_element_type``; kept as the op's ``routing_dtype``) and
  reshapes to the same shape;
* ids: ``getitem(route, 1)``, then integer casts and reshapes to the same
  ``[M, k]`` shape;

each intermediate node having that one user. Anything else (a routing
output also returned or used by other code, an id transform, a weight
scaled after routing) leaves the graph as it is. Every fusion bumps
``counters["moe_quant"]["route_experts"]``.
"""

from __future__ import annotations

import functools
import operator
from typing import Dict, List, Optional, Tuple

import torch
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..schemes import SCHEMES, Scheme
from ._matching import COUNTER, meta_val

NAME = "route_experts"
"""The counter key of this rewrite."""

aten, prims = torch.ops.aten, torch.ops.prims
_RESHAPES = (aten.reshape.default, aten.view.default)
_CAST = prims.convert_element_type.default


def _route_op():
    return torch.ops.moe_quant.route.default


@functools.lru_cache(maxsize=None)
def _experts_ops() -> Dict[torch._ops.OpOverload, Scheme]:
    """Every scheme's ``experts_<scheme>`` forward overload -> that scheme."""
    from ..ops.experts import op_for

    return {op_for(scheme): scheme for scheme in SCHEMES.values()}


def _experts_scheme(node: torch.fx.Node) -> Optional[Scheme]:
    """The scheme of an ``experts_<scheme>`` call (not its backward), else None."""
    if node.op != "call_function":
        return None
    return _experts_ops().get(node.target)


def _arguments(node: torch.fx.Node) -> List[object]:
    """Every schema argument of an op call, positional, defaults filled in."""
    out = []
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out.append(node.args[i])
        elif arg.name in node.kwargs:
            out.append(node.kwargs[arg.name])
        else:
            out.append(arg.default_value if arg.has_default_value() else None)
    return out


def _same_shape(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    va, vb = meta_val(a), meta_val(b)
    if va is None or vb is None or va.dim() != vb.dim():
        return False
    return all(statically_known_true(x == y) for x, y in zip(va.shape, vb.shape))


def _trace_back(node, cast_ok) -> Optional[Tuple[List[torch.fx.Node], List[torch.dtype]]]:
    """From an experts argument back to a ``getitem`` through single-user
    casts (``cast_ok(dtype)``) and reshapes. Returns the nodes walked (the
    argument first, the single-user getitem last) and the cast dtypes, or
    None when the path holds anything else."""
    chain, casts = [], []
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and len(node.users) == 1:
        chain.append(node)
        if node.target is operator.getitem:
            return chain, casts
        if node.target is _CAST and cast_ok(node.args[1]):
            casts.append(node.args[1])
        elif node.target not in _RESHAPES:
            return None
        node = node.args[0]
    return None


def _fuse_one(graph: torch.fx.Graph, experts: torch.fx.Node, scheme: Scheme) -> bool:
    from ..ops.block import block_op_for

    args = _arguments(experts)
    weights_arg, ids_arg = args[1], args[2]
    ids = _trace_back(ids_arg, lambda d: not d.is_floating_point)
    weights = _trace_back(weights_arg, lambda d: d.is_floating_point)
    if ids is None or weights is None or len(weights[1]) > 1:
        return False
    ids_item, weights_item = ids[0][-1], weights[0][-1]
    route = ids_item.args[0]
    if not (
        isinstance(route, torch.fx.Node) and route.target is _route_op()
        and ids_item.args[1] == 1 and weights_item.args == (route, 0)
        and len(route.users) == 2  # exactly the two getitems walked
    ):
        return False
    if not (_same_shape(ids_arg, ids_item) and _same_shape(weights_arg, weights_item)):
        return False
    routing_dtype = weights[1][0] if weights[1] else None
    if routing_dtype is torch.float32:
        routing_dtype = None
    route_args = _arguments(route)
    with graph.inserting_before(experts):
        fused = graph.call_function(
            block_op_for(scheme.name),
            (args[0], *route_args, routing_dtype, *args[3:]),
        )
    # only the output value: ``eager_input_vals`` describe the experts call's arguments
    fused.meta.update({k: v for k, v in experts.meta.items() if k in ("val", "stack_trace")})
    experts.replace_all_uses_with(fused)
    graph.erase_node(experts)
    for node in (*ids[0], *weights[0]):
        graph.erase_node(node)
    graph.erase_node(route)
    counters[COUNTER][NAME] += 1
    return True


def fuse_blocks(graph: torch.fx.Graph) -> int:
    """Fuse every eligible ``route`` -> ``experts_<scheme>`` pair of
    ``graph`` (module docstring); returns how many were fused."""
    fused = 0
    for node in list(graph.nodes):
        scheme = _experts_scheme(node)
        if scheme is not None and _fuse_one(graph, node, scheme):
            fused += 1
    return fused
