"""Small helpers shared by the pattern modules: reading a ``Match`` and
registering ``fwd_only`` replacements with counted extra checks."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable, Dict, Mapping, Sequence, Tuple

import torch
from torch._dynamo.utils import counters
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.fx_passes.post_grad import view_to_reshape
from torch._inductor.pattern_matcher import Match, PatternMatcherPass, fwd_only, register_replacement

COUNTER = "moe_quant"
"""``torch._dynamo.utils.counters[COUNTER][name]`` counts rewrites per pattern."""

Check = Callable[[Match], bool]

#: ``register_replacement`` takes ``pattern_name`` (a label for Inductor's
#: logs) from torch 2.12 on; torch 2.11 rejects the keyword.
_NAMES_PATTERNS = "pattern_name" in inspect.signature(register_replacement).parameters


def name_kwargs(name: str) -> dict:
    """The ``pattern_name`` keyword of ``register_replacement`` for rewrite
    ``name`` where this torch takes it, else nothing."""
    return {"pattern_name": f"{COUNTER}.{name}"} if _NAMES_PATTERNS else {}


def meta_val(node):
    """The fake tensor (or SymInt) an FX node produces."""
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def all_of(*checks: Check) -> Check:
    def check(match: Match) -> bool:
        return all(c(match) for c in checks)

    return check


def nodes_of(match: Match, target) -> Tuple[torch.fx.Node, ...]:
    return tuple(n for n in match.nodes if n.op == "call_function" and n.target is target)


def fwd_only_as_post_grad(fn, args, *, get_decomp_fn=select_decomp_table) -> torch.fx.GraphModule:
    """``fwd_only``, with every ``aten.view`` turned into ``aten.reshape`` as
    ``compile_fx`` does (``view_to_reshape``) before the post-grad passes: a
    pattern holding a view would never match a post-grad graph."""
    gm = fwd_only(fn, args, get_decomp_fn=get_decomp_fn)
    view_to_reshape(gm)
    gm.recompile()
    return gm


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """One search/replace pair, registered once per example dtype.

    ``search`` and ``replace`` take the same arguments: tensors (traced with
    one example tensor per shape in ``example_shapes``, all of one dtype from
    ``example_dtypes``) and ints named in ``magic`` (traced with the magic
    value, matched as a ``KeywordArg`` and handed to ``check`` in
    ``match.kwargs``).
    """

    name: str
    search: Callable
    replace: Callable
    check: Check
    example_dtypes: Sequence[torch.dtype]
    example_shapes: Sequence[Sequence[int]]
    magic: Mapping[str, int]

    def register(self, pass_dict: PatternMatcherPass) -> None:
        traced: Dict[str, object] = {}
        search = _recording(self.search, traced)
        for dtype in self.example_dtypes:
            examples = [torch.empty(shape, dtype=dtype) for shape in self.example_shapes]
            register_replacement(
                search,
                self.replace,
                examples,
                fwd_only_as_post_grad,
                pass_dict,
                extra_check=_counted(self.name, all_of(_binds(tuple(self.magic), traced), self.check)),
                scalar_workaround=dict(self.magic),
                **name_kwargs(self.name),
            )


def _recording(search: Callable, traced: Dict[str, object]) -> Callable:
    """``search`` (same signature), keeping the arguments of its latest call
    in ``traced``: torch 2.11 re-traces it with the matched values right
    before the extra check (see ``_binds``)."""
    signature = inspect.signature(search)

    @functools.wraps(search)
    def recorded(*args, **kwargs):
        traced.clear()
        traced.update(signature.bind(*args, **kwargs).arguments)
        return search(*args, **kwargs)

    return recorded


def _binds(names: Tuple[str, ...], traced: Dict[str, object]) -> Check:
    """Every magic int is in ``match.kwargs``. torch >= 2.12 hands the check
    the match that bound them. torch 2.11 hands it the match of a pattern
    re-traced with the matched values, which binds the tensors only (found
    on the H100: ``KeyError: 'top_k'`` failed the user's compile): there the
    ints are taken from that re-trace (``_recording``), which ran just
    before this check in the same thread, and only if every one is there
    as an int; otherwise the rewrite does not apply."""

    def check(match: Match) -> bool:
        missing = [n for n in names if n not in match.kwargs]
        if missing and all(isinstance(traced.get(n), int) for n in missing):
            match.kwargs.update({n: traced[n] for n in missing})
        return all(n in match.kwargs for n in names)

    return check


def _counted(name: str, check: Check) -> Check:
    """``check``, bumping the rewrite counter when it accepts.

    The pattern matcher replaces a match right after its extra check accepts
    it, so this counts rewrites.
    """

    def counted_check(match: Match) -> bool:
        if not check(match):
            return False
        counters[COUNTER][name] += 1
        return True

    counted_check.__name__ = f"{name}_check"
    return counted_check
