"""Inductor lowerings: rewrite ordinary MoE code into ``torch.ops.moe_quant``.

Opt-in and explicit::

    import torch_moe_quant.lowerings as lowerings
    lowerings.install()            # or: with lowerings.enabled(): ...
    torch.compile(model)(x)        # softmax/sigmoid -> top-k routers now call moe_quant.route
    lowerings.uninstall()

Importing this package changes no global state; see ``install`` for where
the pass goes and how it composes with a pass you already set, and
``routing_patterns`` for what is rewritten. Each rewrite bumps
``torch._dynamo.utils.counters["moe_quant"][<pattern name>]``.
"""

from .install import MoeQuantPass, enabled, install, installed, uninstall

__all__ = ["MoeQuantPass", "enabled", "install", "installed", "uninstall"]
