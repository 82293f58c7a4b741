"""The ``torch.ops.moe_quant`` namespace.

* ``experts_<scheme>`` (one per scheme in ``SCHEMES``) and ``experts_<scheme>_backward``
* ``route``, ``align``
* ``quantize_<fmt>`` / ``dequantize_<fmt>`` for the activation formats

Importing this package registers them (``import torch_moe_quant`` does).
"""

from . import experts, quant, routing
from .experts import EXPERT_OPS, SIGNATURES, op_for

__all__ = ["EXPERT_OPS", "SIGNATURES", "experts", "op_for", "quant", "routing"]
