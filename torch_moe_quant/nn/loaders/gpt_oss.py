"""Load one MoE layer's experts from a gpt-oss (OpenAI) MXFP4 checkpoint in
the Hugging Face layout, without re-quantizing.

Layout (transformers 5.x ``integrations/mxfp4.py``: ``Mxfp4GptOssExperts``,
``_convert_moe_packed_tensors``; ``models/gpt_oss/modeling_gpt_oss.py``), for
``E`` experts, hidden size ``H``, intermediate size ``I``::

    {prefix}.gate_up_proj_blocks  uint8 [E, 2I, H/32, 16]  fp4 e2m1 codes, 2 per byte
    {prefix}.gate_up_proj_scales  uint8 [E, 2I, H/32]      e8m0 (2**(byte - 127))
    {prefix}.gate_up_proj_bias    bf16/fp32 [E, 2I]
    {prefix}.down_proj_blocks     uint8 [E, H, I/32, 16]
    {prefix}.down_proj_scales     uint8 [E, H, I/32]
    {prefix}.down_proj_bias       bf16/fp32 [E, H]

* Row ``n`` of ``*_blocks`` is output channel ``n``; block ``g`` holds
  elements ``32g .. 32g+31`` of the reduction dim (``H`` for gate_up, ``I``
  for down); byte ``b`` of a block holds element ``2b`` in its low nibble and
  ``2b + 1`` in its high nibble (``sub[:, 0::2] = lut[blk & 0x0F]``). So
  ``blocks.reshape(E, N, K / 2)`` is exactly ``formats.mxfp4``'s ``data`` and
  ``scales`` its ``scale``: the loader only reshapes.
* The rows of ``gate_up`` interleave gate and up: even rows gate, odd rows up
  (``gate_up[..., ::2], gate_up[..., 1::2]`` in ``GptOssExperts._apply_gate``),
  so the experts use ``GateUpLayout.INTERLEAVED``; the bias is interleaved the
  same way.
* The activation is ``Activation.SWIGLUOAI`` (alpha 1.702, limit
  ``config.swiglu_limit`` = 7.0): pass ``activation=GPT_OSS_ACTIVATION`` to
  ``fused_moe``.
* ``quantization_config`` is ``{"quant_method": "mxfp4", "modules_to_not_convert": [...]}``.

Scheme: ``mxfp4_w4a16`` (bf16 activations, per-expert biases).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch

from ...activations import Activation, GateUpLayout
from ...experts import QuantizedExperts, quantize_experts
from ...formats.core import Format, PerGroup, QuantizedTensor
from ...formats.layout import E8M0_NAN
from ._safetensors import CheckpointReader, Source, open_source, read_quantization_config

FAMILY = "gpt-oss"
SCHEME = "mxfp4_w4a16"
#: The activation gpt-oss experts use (``fused_moe(..., activation=GPT_OSS_ACTIVATION)``).
GPT_OSS_ACTIVATION = Activation.SWIGLUOAI
_BIAS_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_config(config: Optional[Mapping], prefix: str, reader: CheckpointReader) -> None:
    if config is None:
        return
    method = config.get("quant_method")
    if method != "mxfp4":
        raise reader.error(f"quantization_config.quant_method is {method!r}, expected 'mxfp4'")
    for skipped in config.get("modules_to_not_convert") or []:
        if prefix == skipped or prefix.startswith(skipped + "."):
            raise reader.error(f"{prefix!r} is in modules_to_not_convert ({skipped!r}): it is not mxfp4")


def _select(t: torch.Tensor, experts: Optional[list]) -> torch.Tensor:
    return t if experts is None else t[experts]


def load_gpt_oss_experts(
    source: Source,
    prefix: str,
    quantization_config: Optional[Mapping] = None,
    *,
    experts: Optional[Iterable[int]] = None,
) -> QuantizedExperts:
    """Read ``{prefix}.{gate_up,down}_proj_{blocks,scales,bias}`` into a
    ``mxfp4_w4a16`` ``QuantizedExperts`` with ``GateUpLayout.INTERLEAVED``
    and both biases (see module docstring). ``prefix`` is the experts module,
    e.g. ``"model.layers.0.mlp.experts"``; ``experts`` selects a subset.
    ``quantization_config`` is optional (checked when given or when
    ``source`` is a checkpoint directory with a config.json)."""
    with open_source(source) as src:
        reader = CheckpointReader(src, FAMILY)
        config = quantization_config
        if config is None and src.directory is not None:
            try:
                config = read_quantization_config(None, src, FAMILY)
            except ValueError:
                config = None
        elif config is not None:
            config = read_quantization_config(config, src, FAMILY)
        _check_config(config, prefix, reader)

        gu = reader.get(f"{prefix}.gate_up_proj_blocks", dtype=torch.uint8, what="[E, 2I, H/32, 16] fp4 blocks")
        if gu.dim() != 4 or gu.shape[-1] != 16 or gu.shape[1] % 2:
            raise reader.error(
                f"tensor '{prefix}.gate_up_proj_blocks' has shape {tuple(gu.shape)}, expected "
                "[E, 2I, H/32, 16] (16 bytes = 32 fp4 values per block, an even number 2I of rows)"
            )
        E, two_i, hg, _ = gu.shape
        H, inter = hg * 32, two_i // 2
        if inter % 32:
            raise reader.error(f"intermediate size I={inter} (from gate_up_proj_blocks) must be a multiple of 32")
        gu_s = reader.get(f"{prefix}.gate_up_proj_scales", dtype=torch.uint8, shape=(E, two_i, hg),
                          what="one e8m0 scale per 32 along H")
        gu_b = reader.get(f"{prefix}.gate_up_proj_bias", dtype=_BIAS_DTYPES, shape=(E, two_i),
                          what="interleaved gate/up bias")
        dn = reader.get(f"{prefix}.down_proj_blocks", dtype=torch.uint8, shape=(E, H, inter // 32, 16),
                        what="[E, H, I/32, 16] fp4 blocks")
        dn_s = reader.get(f"{prefix}.down_proj_scales", dtype=torch.uint8, shape=(E, H, inter // 32),
                          what="one e8m0 scale per 32 along I")
        dn_b = reader.get(f"{prefix}.down_proj_bias", dtype=_BIAS_DTYPES, shape=(E, H), what="down bias")

        for key, scales in ((f"{prefix}.gate_up_proj_scales", gu_s), (f"{prefix}.down_proj_scales", dn_s)):
            bad = scales == E8M0_NAN
            if bool(bad.any()):
                where = tuple(int(i) for i in bad.nonzero()[0])
                raise reader.error(
                    f"tensor {key!r} holds the e8m0 NaN byte 255 ({int(bad.sum())} of {bad.numel()}, "
                    f"first at index {where}): those blocks would decode to NaN"
                )
        ids = None
        if experts is not None:
            ids = [int(e) for e in experts]
            bad = [e for e in ids if not 0 <= e < E]
            if bad or not ids:
                raise reader.error(f"experts {bad or ids} out of range: the checkpoint has {E} experts")
        n = E if ids is None else len(ids)
        w13 = QuantizedTensor(
            data=_select(gu, ids).reshape(n, two_i, H // 2).contiguous(),
            scale=_select(gu_s, ids).contiguous(),
            fmt=Format.MXFP4, granularity=PerGroup(32), shape=(n, two_i, H),
        )
        w2 = QuantizedTensor(
            data=_select(dn, ids).reshape(n, H, inter // 2).contiguous(),
            scale=_select(dn_s, ids).contiguous(),
            fmt=Format.MXFP4, granularity=PerGroup(32), shape=(n, H, inter),
        )
        try:
            return quantize_experts(
                w13, w2, SCHEME,
                layout=GateUpLayout.INTERLEAVED,
                w13_bias=_select(gu_b, ids).contiguous(),
                w2_bias=_select(dn_b, ids).contiguous(),
            )
        except (TypeError, ValueError) as exc:
            raise reader.error(f"experts under {prefix!r} do not form a valid {SCHEME}: {exc}") from None


__all__ = ["GPT_OSS_ACTIVATION", "load_gpt_oss_experts"]
