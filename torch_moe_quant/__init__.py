"""torch_moe_quant: quantized Mixture-of-Experts layers for torch.compile.

Importing the package registers nothing global beyond its own types; the
Inductor lowerings are opt-in (``torch_moe_quant.lowerings.install()``).
"""

from . import formats
from .activations import Activation, GateUpLayout
from .experts import QuantizedExperts, quantize_experts
from .formats import Format, QuantizedTensor, ScaleRounding
from .moe import fused_moe
from .reference import calibrate_activation_scales
from .routing import RoutingMethod, route
from .schemes import SCHEMES, ActivationSpec, ActQuant, Scheme, WeightSpec, get_scheme

from . import ops  # noqa: E402  (registers torch.ops.moe_quant.*)
from .nn import calibrate_, quantize_  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "ActivationSpec",
    "ActQuant",
    "Format",
    "GateUpLayout",
    "QuantizedExperts",
    "QuantizedTensor",
    "RoutingMethod",
    "SCHEMES",
    "ScaleRounding",
    "Scheme",
    "WeightSpec",
    "calibrate_",
    "calibrate_activation_scales",
    "formats",
    "ops",
    "fused_moe",
    "get_scheme",
    "quantize_",
    "quantize_experts",
    "route",
]
