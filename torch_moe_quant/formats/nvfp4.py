"""NVFP4: fp4 e2m1 elements, one e4m3 scale per 16 along K, and one float32
global scale per matrix, following compressed-tensors 0.20
(``nvfp4-pack-quantized``; the convention of llm-compressor checkpoints and
vLLM).

Layout of a quantized ``[..., rows, cols]`` tensor:

* ``data``: uint8 ``[..., rows, cols // 2]``, same codes and nibble order as
  mxfp4 (element ``2i`` in the low nibble).
* ``scale``: ``torch.float8_e4m3fn`` ``[..., rows, cols // 16]``.
* ``global_scale``: float32 ``[..., 1, 1]``.

Quantize (the arithmetic of compressed-tensors, dtype by dtype):

* ``global_scale = 448 * 6 / max(amax, finfo(x.dtype).tiny)`` computed in
  ``x.dtype`` (amax over the finite values of each ``[rows, cols]`` matrix),
  NaN/inf results replaced by 1.0, then float32. Or the ``global_scale=``
  argument (static, e.g. a checkpoint's ``input_global_scale``), which must
  be finite and > 0 (``ValueError`` otherwise, checked eagerly). Measured
  consequence of computing in ``x.dtype``: for float16 input with
  ``amax < 2688 / 65504 ~ 0.041`` the quotient overflows and the global
  scale is 1.0, as in compressed-tensors.
* ``block_scale = e4m3(min((block_amax / 6 in x.dtype) * global_scale, 448))``
  (float32 product, round to nearest even).
* elements: ``x / (block_scale / global_scale)`` in float32 (the quotient of
  the scales rounded first), clamp to ``±6``, round to nearest even; negative
  values that round to zero keep the sign (code 8).

Dequantize: ``value(code) * (block_scale / global_scale)`` in float32 (same
order of rounding as compressed-tensors' ``dequantize``), cast to ``dtype``.

Zero blocks: a block whose scale rounds to 0 (all-zero, or
``block_amax * global_scale / 6 <= 2**-10``) stores scale 0 and codes ``±0``.
compressed-tensors 0.20 stores 0.125 (its ``_get_dtype_eps`` of e4m3) as the
scale there instead; its codes are the same ``±0`` (measured).

NaN / inf policy:

* NaN or ``±inf`` are left out of the computed global scale.
* a block holding a NaN gets scale NaN (e4m3 ``0x7F``) and codes 0; it
  dequantizes to NaN everywhere.
* a block holding ``±inf`` (no NaN) gets the largest scale 448: the infs
  saturate to ``±6`` and dequantize to the finite ``±6 * 448 / global_scale``
  (saturating, like fp8; e4m3 has no inf).

compressed-tensors has no such policy: a NaN gives global scale 1.0 for the
whole matrix and an inf gives global scale 0 (measured).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _e8m0
from ._minifloat import FP4_E2M1, decode, encode
from .core import Format, PerGroup, QuantizedTensor, values_available
from .mxfp4 import _pack, _unpack

FMT = Format.NVFP4
ELEMENT = FP4_E2M1
BLOCK = 16
DEFAULT_GRANULARITY = PerGroup(BLOCK)
_E4M3_MAX = 448.0
_FP4_MAX = 6.0


def global_scale_of(x: torch.Tensor) -> torch.Tensor:
    """float32 ``[..., 1, 1]`` global scale of each ``[rows, cols]`` matrix of
    ``x``: ``448 * 6 / amax`` in ``x.dtype`` as compressed-tensors'
    ``generate_gparam`` (non-finite values ignored; non-finite results -> 1.0)."""
    finite = torch.where(torch.isfinite(x), x.abs(), torch.zeros((), dtype=x.dtype))
    if finite.numel() == 0:  # no rows: as an all-zero matrix
        amax = finite.new_zeros(finite.shape[:-2] + (1, 1))
    else:
        amax = finite.amax(dim=(-2, -1), keepdim=True)
    amax = amax.clamp(min=torch.finfo(x.dtype).tiny)
    gs = torch.nan_to_num(_E4M3_MAX * _FP4_MAX / amax, nan=1.0, posinf=1.0, neginf=1.0)
    return gs.float()


def quantize(
    x: torch.Tensor,
    granularity=DEFAULT_GRANULARITY,
    *,
    global_scale: Optional[torch.Tensor] = None,
) -> QuantizedTensor:
    """Quantize float ``x`` ``[..., rows, cols]`` (cols a multiple of 16) to
    NVFP4. ``granularity`` must be ``PerGroup(16)``. ``global_scale``: a float
    tensor broadcastable to ``[..., 1, 1]`` (e.g. ``[1]`` or ``[1, 1]``), or
    None to compute it per matrix."""
    _e8m0.check_granularity(granularity, FMT, BLOCK)
    _e8m0.check_float_input(x)
    if x.shape[-1] % BLOCK:
        raise ValueError(
            f"x: the last dim (cols={x.shape[-1]}) must be a multiple of {BLOCK}, "
            f"the nvfp4 block size (pad K to a multiple of {BLOCK})"
        )
    gs = global_scale_of(x) if global_scale is None else _static_global_scale(global_scale, x)
    blocks = x.unflatten(-1, (x.shape[-1] // BLOCK, BLOCK))
    block_amax = blocks.abs().amax(dim=-1)  # propagates NaN
    # (amax / 6) in x.dtype, then float32 times the global scale.
    scale = (block_amax / _FP4_MAX).float() * gs
    scale = scale.clamp(max=_E4M3_MAX).to(torch.float8_e4m3fn)  # clamp keeps NaN
    codes = encode(_scaled_elements(blocks, scale, gs), ELEMENT).flatten(-2)
    return QuantizedTensor(
        data=_pack(codes),
        scale=scale,
        fmt=FMT,
        granularity=granularity,
        shape=tuple(x.shape),
        global_scale=gs.contiguous(),
    )


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode an NVFP4 ``q`` to a ``dtype`` tensor of shape ``q.shape``."""
    _e8m0.check_dequantize_args(q, dtype, FMT)
    cols = q.shape[-1]
    values = decode(_unpack(q.data), ELEMENT).unflatten(-1, (cols // BLOCK, BLOCK))
    step = (q.scale.float() / q.global_scale).unsqueeze(-1)
    return (values * step).flatten(-2).to(dtype)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 4-bit codes ``[..., cols]`` (cols even) -> uint8 ``[..., cols // 2]``."""
    _e8m0.check_codes(codes, 4, 2)
    return _pack(codes)


def unpack(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 ``[..., cols // 2]`` -> uint8 4-bit codes ``[..., cols]``."""
    _e8m0.check_packed(packed, cols, torch.uint8, 1, 2)
    return _unpack(packed)


def _scaled_elements(
    blocks: torch.Tensor, scale: torch.Tensor, gs: torch.Tensor
) -> torch.Tensor:
    """``blocks / (scale / gs)`` in float32; zero-scale blocks give ``±0`` and
    NaN-scale blocks give 0 (so their codes are 0)."""
    step = (scale.float() / gs).unsqueeze(-1)
    xf = blocks.float()
    scaled = torch.where(step == 0, xf * 0.0, xf / step)
    return torch.where(step.isnan(), 0.0, scaled)


def _static_global_scale(global_scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(global_scale, torch.Tensor) or not global_scale.is_floating_point():
        raise TypeError(
            f"global_scale must be a float tensor, got {getattr(global_scale, 'dtype', type(global_scale))}"
        )
    target = tuple(x.shape[:-2]) + (1, 1)
    try:
        ok = torch.broadcast_shapes(tuple(global_scale.shape), target) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"global_scale must broadcast to {target} (one per [rows, cols] matrix), "
            f"got shape {tuple(global_scale.shape)}"
        )
    gs = global_scale.to(device=x.device, dtype=torch.float32)
    if values_available(gs) and gs.numel() and not bool((torch.isfinite(gs) & (gs > 0)).all()):
        # 0 zeroes every code, NaN / inf give NaN scales: never a usable result
        raise ValueError("global_scale must be finite and > 0 everywhere")
    return gs.expand(target)
