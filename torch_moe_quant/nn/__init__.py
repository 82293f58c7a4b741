"""Model integration: ``nn.Module`` wrappers of quantized experts, in-place
quantization of existing MoE models (``quantize_``, with ``calibrate_`` for
static activation scales) and the transformers v5
experts interface (``register_transformers_experts``).

Importing this package imports neither transformers nor tqdm and changes no
global state; ``register_transformers_experts()`` is the explicit opt-in.
"""

from .calibrate import ActivationRange, calibrate_
from .modules import ExpertView, QuantizedExpertList, QuantizedExpertsModule, TransformersQuantizedExperts
from .quantize import ExpertsKind, Progress, QuantizeSummary, find_experts, quantize_
from .transformers_integration import (
    IMPLEMENTATION,
    register_transformers_experts,
    unregister_transformers_experts,
)

__all__ = [
    "ActivationRange",
    "ExpertView",
    "ExpertsKind",
    "IMPLEMENTATION",
    "Progress",
    "QuantizeSummary",
    "QuantizedExpertList",
    "QuantizedExpertsModule",
    "TransformersQuantizedExperts",
    "calibrate_",
    "find_experts",
    "quantize_",
    "register_transformers_experts",
    "unregister_transformers_experts",
]
