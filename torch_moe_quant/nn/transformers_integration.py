"""transformers v5 experts interface: a ``"moe_quant"`` implementation.

transformers v5 decorates its experts classes with
``@use_experts_implementation``: their ``forward(hidden_states, top_k_index,
top_k_weights)`` looks up ``ALL_EXPERTS_FUNCTIONS[config._experts_implementation]``
(``transformers.integrations.moe``) and calls it as ``fn(self, hidden_states,
top_k_index, top_k_weights)``. ``register_transformers_experts()`` adds
``"moe_quant"`` to that table (explicitly: importing ``torch_moe_quant`` changes
no global state). Then any of the public switches selects it:

* ``model.set_experts_implementation("moe_quant")`` (and back to ``"grouped_mm"``,
  ``"eager"``, ...), or
* ``AutoModelForCausalLM.from_config(config, experts_implementation="moe_quant")`` /
  ``from_pretrained(..., experts_implementation="moe_quant")``.

With it, an **unquantized** experts module runs ``moe_quant::experts_bf16``
(``experts_fp16`` for fp16 parameters) on ``QuantizedExperts`` built from its
parameters on first use and cached on the module (rebuilt when a parameter is
replaced, modified in place, or moved; under ``torch.compile`` it is built in the
graph instead, which for bf16 parameters is free). Experts swapped by
``quantize_`` are ``TransformersQuantizedExperts`` modules: they always run
their scheme's op, whatever the switch says.

Supported: what ``quantize_`` supports for fused 3-D experts (gated or not,
transposed, interleaved, biases, gpt-oss ``swigluoai``). Expert-parallel
modules and post-expert norms raise ``ValueError``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import nn

from .. import schemes
from ..activations import Activation
from ..experts import QuantizedExperts, quantize_experts
from ..moe import fused_moe
from ..schemes import Scheme, WeightSpec
from .modules import QuantizedExpertsModule
from .quantize import fused_flags, read_fused, resolve_activation

#: the key under which the implementation is registered
IMPLEMENTATION = "moe_quant"

_CACHE_ATTR = "_moe_quant_experts_cache"


@dataclasses.dataclass(frozen=True)
class _Cached:
    key: Tuple
    experts: QuantizedExperts
    activation: Activation


def _float_scheme(dtype: torch.dtype) -> Scheme:
    """The unquantized scheme of ``dtype`` weights (bf16 for other dtypes)."""
    return schemes.find(WeightSpec(None, float_dtype=dtype)) or schemes.get_scheme("bf16")


def _key(module: nn.Module) -> Tuple:
    return tuple(
        (name, p.device, p.dtype, p.data_ptr(), p._version, tuple(p.shape))
        for name, p in module.named_parameters(recurse=False)
    )


def _build(module: nn.Module) -> Tuple[QuantizedExperts, Activation]:
    name = type(module).__name__
    flags = fused_flags(name, module)
    activation = resolve_activation(name, module, flags.has_gate, config=getattr(module, "config", None))
    fe = read_fused(module, flags)
    experts = quantize_experts(
        fe.w13, fe.w2, _float_scheme(fe.w13.dtype),
        w13_bias=fe.w13_bias, w2_bias=fe.w2_bias, layout=fe.layout,
    )
    return experts, activation


def experts_for(module: nn.Module) -> Tuple[QuantizedExperts, Activation]:
    """The ``QuantizedExperts`` (bf16/fp16 scheme) and activation of an
    unquantized transformers experts module, cached on it (see module docstring)."""
    if torch.compiler.is_compiling():
        return _build(module)
    key = _key(module)
    cached: Optional[_Cached] = module.__dict__.get(_CACHE_ATTR)
    if cached is None or cached.key != key:
        with torch.no_grad():
            experts, activation = _build(module)
        cached = _Cached(key, experts, activation)
        module.__dict__[_CACHE_ATTR] = cached
    return cached.experts, cached.activation


def moe_quant_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """``ALL_EXPERTS_FUNCTIONS["moe_quant"]``: the experts of ``self`` through
    the ``moe_quant`` ops; ``[T, H]`` in the dtype of ``hidden_states``."""
    if isinstance(self, QuantizedExpertsModule):  # already quantized: its own op
        return QuantizedExpertsModule.forward(self, hidden_states, top_k_weights, top_k_index)
    experts, activation = experts_for(self)
    return fused_moe(hidden_states, experts, top_k_weights, top_k_index, activation=activation)


def register_transformers_experts() -> None:
    """Register ``"moe_quant"`` in transformers' ``ExpertsInterface`` (global,
    idempotent). Needs transformers v5 (``transformers.integrations.moe``)."""
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as e:
        raise ImportError(
            "register_transformers_experts needs transformers>=5 (transformers.integrations.moe)"
        ) from e
    ExpertsInterface.register(IMPLEMENTATION, moe_quant_experts_forward)


def unregister_transformers_experts() -> None:
    """Undo ``register_transformers_experts`` (models still set to
    ``"moe_quant"`` then fail at their next forward)."""
    from transformers.integrations.moe import ExpertsInterface

    if ExpertsInterface._global_mapping.get(IMPLEMENTATION) is moe_quant_experts_forward:
        del ExpertsInterface._global_mapping[IMPLEMENTATION]
