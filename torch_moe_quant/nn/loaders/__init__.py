"""Checkpoint loaders: one MoE layer's expert tensors from a safetensors
checkpoint into a ``torch_moe_quant.QuantizedExperts``, with no
re-quantization (only exact repacking).

One module per checkpoint family:

* ``compressed_tensors``: llm-compressor checkpoints (``quant_method:
  compressed-tensors``): fp8 (tensor / channel / 128x128 block), int8,
  int4 pack-quantized (groups, zero points, act-order ``g_idx``), nvfp4,
  mxfp4 weight-only.
* ``gpt_oss``: OpenAI gpt-oss MXFP4 experts (``quant_method: mxfp4``).
* ``quark``: AMD Quark OCP-MX (mxfp4 / mxfp6 weights; ``quant_method: quark``).

``load_experts`` dispatches on ``quantization_config["quant_method"]``.
Every checkpoint problem (missing key, wrong shape or dtype, a configuration
no registered scheme covers) raises ``ValueError`` naming the key or config
entry and what was expected.
"""

from __future__ import annotations

from typing import Mapping, Optional

from ...experts import QuantizedExperts
from ._experts import GATE_UP_DOWN, W1_W3_W2, ExpertNames, InputScales, PerTensorScales
from ._safetensors import Source, TensorSource, open_source, read_quantization_config
from .compressed_tensors import load_compressed_tensors_experts
from .gpt_oss import GPT_OSS_ACTIVATION, load_gpt_oss_experts
from .quark import load_quark_experts

LOADERS = {
    "compressed-tensors": load_compressed_tensors_experts,
    "mxfp4": load_gpt_oss_experts,
    "quark": load_quark_experts,
}


def load_experts(
    source: Source,
    prefix: str,
    quantization_config: Optional[Mapping] = None,
    **options,
) -> QuantizedExperts:
    """Load the experts under ``prefix`` with the loader of the checkpoint's
    ``quant_method`` (``LOADERS``); ``options`` go to that loader."""
    with open_source(source) as src:
        config = read_quantization_config(quantization_config, src, "checkpoint")
        method = config.get("quant_method")
        if method not in LOADERS:
            raise ValueError(
                f"checkpoint: quantization_config.quant_method {method!r} has no loader "
                f"(supported: {', '.join(sorted(LOADERS))})"
            )
        return LOADERS[method](src, prefix, config, **options)


__all__ = [
    "GATE_UP_DOWN",
    "GPT_OSS_ACTIVATION",
    "LOADERS",
    "W1_W3_W2",
    "ExpertNames",
    "InputScales",
    "PerTensorScales",
    "TensorSource",
    "load_compressed_tensors_experts",
    "load_experts",
    "load_gpt_oss_experts",
    "load_quark_experts",
]
