"""Model integration: ``nn.Module`` wrappers of quantized experts, in-place
quantization of existing MoE models (``quantize_``) and the transformers v5
experts interface (``register_transformers_experts``).

Importing this package imports neither transformers nor tqdm and changes no
global state; ``register_transformers_experts()`` is the explicit opt-in.
"""

from .modules import ExpertView, QuantizedExpertList, QuantizedExpertsModule, TransformersQuantizedExperts
from .quantize import ExpertsKind, Progress, QuantizeSummary, find_experts, quantize_
from .transformers_integration import (
    IMPLEMENTATION,
    register_transformers_experts,
    unregister_transformers_experts,
)

__all__ = [
    "ExpertView",
    "ExpertsKind",
    "IMPLEMENTATION",
    "Progress",
    "QuantizeSummary",
    "QuantizedExpertList",
    "QuantizedExpertsModule",
    "TransformersQuantizedExperts",
    "find_experts",
    "quantize_",
    "register_transformers_experts",
    "unregister_transformers_experts",
]
