"""Inductor lowerings: rewrite ordinary MoE code into ``torch.ops.moe_quant``.

Opt-in and explicit::

    import torch_moe_quant.lowerings as lowerings
    lowerings.install()            # or: with lowerings.enabled(): ...
    torch.compile(model)(x)        # softmax/sigmoid -> top-k routers now call moe_quant.route,
                                   # expert GEMMs call moe_quant.experts_<scheme>
    lowerings.uninstall()

Importing this package changes no global state; see ``install`` for where
the pass goes and how it composes with a pass you already set,
``routing_patterns`` for the router rewrites and ``expert_patterns`` for the
expert-compute ones (transformers v5 ``grouped_mm``/``batched_mm`` experts,
dense all-experts formulations, explicit fp8/int4/mxfp4 weight dequantize
and fp8 activation QDQ -> the matching quantized scheme's op). The first
``install()`` traces and registers every pattern (a few seconds) and, when
transformers is installed, imports ``transformers.integrations.moe`` for
its ``grouped_mm_fallback`` op. Each rewrite bumps
``torch._dynamo.utils.counters["moe_quant"][<pattern name>]``.
"""

from .install import MoeQuantPass, enabled, install, installed, uninstall

__all__ = ["MoeQuantPass", "enabled", "install", "installed", "uninstall"]
