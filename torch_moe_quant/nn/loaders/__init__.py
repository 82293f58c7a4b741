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

``load_experts`` dispatches on ``quantization_config["quant_method"]``;
``load_local_experts`` reads one expert-parallel rank's experts only
(``torch_moe_quant.distributed``).
Every checkpoint problem (missing key, wrong shape or dtype, a configuration
no registered scheme covers) raises ``ValueError`` naming the key or config
entry and what was expected.
"""

from __future__ import annotations

from typing import Mapping, Optional

from ...distributed.sharding import ExpertParallelShard, ExpertPlacement
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


def load_local_experts(
    source: Source,
    prefix: str,
    quantization_config: Optional[Mapping] = None,
    *,
    rank: int,
    placement: ExpertPlacement,
    **options,
) -> ExpertParallelShard:
    """Read only ``rank``'s experts of one MoE layer from a checkpoint.

    Calls ``load_experts(source, prefix, quantization_config,
    experts=placement.local_experts(rank), **options)``: every loader reads
    just the tensors of the experts asked for (safetensors are
    memory-mapped), so a rank never materializes the whole layer. Per-layer
    static activation scales are reduced over the *local* experts by the
    loader (``InputScales``); with ``InputScales.WIDEST`` ranks may then hold
    different scales, unlike the single-device layer: pass
    ``input_scales=InputScales.REQUIRE_EQUAL`` to forbid that, or load the
    full layer and ``distributed.shard_experts`` it.
    """
    if not isinstance(placement, ExpertPlacement):
        raise TypeError(f"placement must be an ExpertPlacement, got {type(placement).__name__}")
    if "experts" in options:
        raise ValueError("experts= is chosen by placement and rank; do not pass it to load_local_experts")
    ids = placement.local_experts(rank)
    experts = load_experts(source, prefix, quantization_config, experts=list(ids), **options)
    return ExpertParallelShard.from_local(experts, placement, rank)


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
    "load_local_experts",
    "load_quark_experts",
]
