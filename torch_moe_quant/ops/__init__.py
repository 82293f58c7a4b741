"""The ``torch.ops.moe_quant`` namespace.

* ``experts_<scheme>`` (one per scheme in ``SCHEMES``) and ``experts_<scheme>_backward``
* ``moe_<scheme>``: ``route`` + ``experts_<scheme>`` in one op (what the
  lowerings' whole-block rewrite emits)
* ``route``, ``align``
* ``quantize_<fmt>`` / ``dequantize_<fmt>`` for the activation formats

Importing this package registers them (``import torch_moe_quant`` does).
"""

from . import block, experts, quant, routing
from .block import BLOCK_OPS, block_op_for
from .experts import EXPERT_OPS, SIGNATURES, op_for

__all__ = [
    "BLOCK_OPS", "EXPERT_OPS", "SIGNATURES", "block", "block_op_for", "experts", "op_for", "quant", "routing",
]
