"""Install / uninstall the moe_quant Inductor pass.

The pass is one ``CustomGraphPass`` (``MoeQuantPass``) set in
``torch._inductor.config.post_grad_custom_pre_pass``. Nothing happens at
import: the config is only touched by ``install()``, and the patterns are
traced and registered on the first ``install()``.

Why the post-grad *pre* pass and not the post pass: the pre pass sees the
same normalized, functionalized aten graph (on CPU the two graphs were
identical for every router form we match), but it runs *before* Inductor's
own post-grad pattern passes. Those rewrite ordinary code that our patterns
look for: on CUDA/XPU with the Triton backend, ``prepare_softmax_pattern``
turns ``amax/sub/exp/sum`` into ``prepare_softmax_online``, so a softmax
router would no longer be recognisable by a post pass.

Composition with a pass the user already set: ``install()`` chains. The
config value becomes a tuple ``(*user_passes, MoeQuantPass())`` (torch runs
every entry of a list/tuple, in order, and keys the FX graph cache on each
entry's ``uuid()``); torch 2.11 takes a single pass, so there the value is a
``_ChainedPass`` running the user's passes then ours, its uuid covering all of
them (the H100 run of torch 2.11 found the missing list support).
``uninstall()`` restores exactly the value seen by
``install()``; if the config was changed in between, it only removes our
pass and leaves the rest as it is. ``install()`` is idempotent.

Caching: ``MoeQuantPass.uuid()`` hashes the source of every module of this
package (``lowerings/*.py``), so the FX graph cache misses when a pattern
changes. A cache hit skips the pass altogether, so the
``counters["moe_quant"]`` rewrite counters are only bumped on a real compile.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional, Tuple, Union

import torch
from torch._inductor import config as inductor_config
from torch._inductor import custom_graph_pass as _cgp
from torch._inductor.custom_graph_pass import CustomGraphPass

CONFIG_KEY = "post_grad_custom_pre_pass"
"""The ``torch._inductor.config`` attribute our pass is installed in."""

_PACKAGE_DIR = Path(__file__).resolve().parent

#: torch >= 2.12 runs every pass of a list/tuple in the config; torch 2.11 takes
#: one pass (and has no ``get_custom_graph_passes``): there we chain ourselves.
CONFIG_TAKES_LISTS = hasattr(_cgp, "get_custom_graph_passes")


class _ChainedPass(CustomGraphPass):
    """Several passes run in order as one (torch 2.11's single-pass config)."""

    def __init__(self, passes) -> None:
        self.passes = tuple(passes)

    def __call__(self, graph: torch.fx.Graph) -> None:
        for p in self.passes:
            p(graph)

    def uuid(self):
        return source_hash((type(p).__name__, str(p.uuid())) for p in self.passes)

    def __repr__(self) -> str:
        return f"_ChainedPass({list(self.passes)!r})"


def get_custom_graph_passes(value) -> tuple:
    """The passes a config value holds (``None``, one pass, a list/tuple, or
    our chain on torch 2.11), as a tuple."""
    if isinstance(value, _ChainedPass):
        return value.passes
    if CONFIG_TAKES_LISTS:
        return tuple(_cgp.get_custom_graph_passes(value))
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _config_value(passes: tuple, like=None):
    """The config value running ``passes`` in order (``None`` if empty)."""
    if not passes:
        return None
    if len(passes) == 1:
        return passes[0]
    if CONFIG_TAKES_LISTS:
        return list(passes) if isinstance(like, list) else tuple(passes)
    return _ChainedPass(passes)


def source_hash(sources: Iterable[Tuple[str, Union[str, bytes]]]) -> str:
    """sha256 over ``(name, text)`` pairs: the pass ``uuid()``.

    Taking the texts (not paths) lets tests check that any change of a
    pattern's source gives a new uuid without editing files.
    """
    hasher = hashlib.sha256()
    for name, text in sources:
        data = text.encode("utf-8") if isinstance(text, str) else text
        for part in (name.encode("utf-8"), data):
            hasher.update(len(part).to_bytes(8, "little"))
            hasher.update(part)
    return hasher.hexdigest()


def pass_sources() -> Tuple[Tuple[str, bytes], ...]:
    """The sources the uuid covers: every ``*.py`` file of this package."""
    return tuple((p.name, p.read_bytes()) for p in sorted(_PACKAGE_DIR.glob("*.py")))


class MoeQuantPass(CustomGraphPass):
    """Applies the moe_quant rewrites to a post-grad graph: the routing and
    expert-compute patterns, then the whole-block fusion (``block_fusion``)."""

    def __init__(self) -> None:
        self._uuid: Optional[str] = None

    def __call__(self, graph: torch.fx.Graph) -> None:
        from .block_fusion import fuse_blocks

        if _patterns().apply(graph):
            # e.g. the ``full(-inf)`` a rewritten Llama-4 router scattered into
            graph.eliminate_dead_code()
        elif _is_training_graph() and _has_moe_nodes(graph):
            _warn_training_graph()
        fuse_blocks(graph)  # route -> experts_<scheme> pairs become moe_<scheme>

    def uuid(self) -> str:
        if self._uuid is None:
            self._uuid = source_hash(pass_sources())
        return self._uuid

    def __repr__(self) -> str:
        return "MoeQuantPass()"


def _is_training_graph() -> bool:
    """Whether the graph being compiled is the forward of a training graph
    (AOTAutograd traced tangents for it: an output requires grad), read from
    the tracing context; False when there is none."""
    from torch._guards import TracingContext

    ctx = TracingContext.try_get()
    meta = getattr(ctx, "fw_metadata", None) if ctx is not None else None
    return bool(getattr(meta, "traced_tangents", None))


def _has_moe_nodes(graph: torch.fx.Graph) -> bool:
    """A ``topk`` (routing) or ``_grouped_mm`` (experts) node: MoE code the
    rewrites would have looked at."""
    targets = {torch.ops.aten.topk.default, torch.ops.aten._grouped_mm.default}
    return any(n.op == "call_function" and n.target in targets for n in graph.nodes)


_TRAINING_GRAPH_WARNING = (
    "torch_moe_quant lowerings: this MoE graph is compiled for training (autograd is recording: parameters "
    "require grad and torch.no_grad() is not active), and the lowerings rewrite inference graphs only, so its "
    "routing and experts run unrewritten. Compile and run under torch.no_grad() or torch.inference_mode()."
)


def _warn_training_graph() -> None:
    warnings.warn(_TRAINING_GRAPH_WARNING, UserWarning, stacklevel=2)


_PASS = MoeQuantPass()
_LOCK = threading.RLock()
_UNSET = object()
_saved = _UNSET  # the config value install() replaced
_installed_value = _UNSET  # the config value install() set


_pattern_pass = None


def _patterns():
    """The ``PatternMatcherPass`` holding every rewrite, built on first use."""
    global _pattern_pass
    with _LOCK:
        if _pattern_pass is None:
            from torch._dynamo.utils import counters
            from torch._inductor.pattern_matcher import PatternMatcherPass

            from . import expert_patterns, routing_patterns

            patterns = PatternMatcherPass(pass_name="moe_quant")
            inductor_counters = counters["inductor"].copy()
            routing_patterns.register(patterns)
            expert_patterns.register(patterns)
            # tracing the patterns may bump Inductor's own counters
            counters["inductor"] = inductor_counters
            _pattern_pass = patterns
        return _pattern_pass


def _current_passes() -> tuple:
    return get_custom_graph_passes(getattr(inductor_config, CONFIG_KEY))


def installed() -> bool:
    """Whether the moe_quant pass is in ``torch._inductor.config`` now."""
    return any(p is _PASS for p in _current_passes())


def install() -> None:
    """Add the moe_quant rewrites to every later Inductor compile.

    Idempotent. A user pass already set in ``post_grad_custom_pre_pass`` is
    kept and runs first (see the module docstring). Call
    ``torch._dynamo.reset()`` for functions compiled before.
    """
    global _saved, _installed_value
    with _LOCK:
        _patterns()
        if installed():
            return
        previous = getattr(inductor_config, CONFIG_KEY)
        user_passes = get_custom_graph_passes(previous)
        new_value = _config_value((*user_passes, _PASS))
        setattr(inductor_config, CONFIG_KEY, new_value)
        _saved, _installed_value = previous, new_value


def uninstall() -> None:
    """Undo ``install()``; a no-op when not installed."""
    global _saved, _installed_value
    with _LOCK:
        current = getattr(inductor_config, CONFIG_KEY)
        if installed():
            if current is _installed_value:
                restored = _saved
            else:  # changed since install(): remove our pass, keep the others
                others = tuple(p for p in get_custom_graph_passes(current) if p is not _PASS)
                restored = _config_value(others, like=current)
            setattr(inductor_config, CONFIG_KEY, restored)
        _saved = _installed_value = _UNSET


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """``with enabled():`` the pass is installed inside, and afterwards in
    the state it was before (left installed if it already was)."""
    was_installed = installed()
    install()
    try:
        yield
    finally:
        if not was_installed:
            uninstall()
