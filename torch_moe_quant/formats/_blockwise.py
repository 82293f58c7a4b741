"""Private helpers shared by the scaled formats (fp8, int8, int4): block views
of a ``[..., rows, cols]`` tensor, per-block reductions, the zero-scale rule,
and the eager-only value checks.

A granularity's blocks are ``block_shape`` tiles of each ``[rows, cols]``
matrix; ``to_blocks`` reshapes ``x`` to ``[..., R, br, C, bc]`` (``R, C`` =
``scale_shape``) so a per-block value ``v[..., R, C]`` broadcasts against it
as ``v[..., :, None, :, None]``. Only ``PerBlock`` can have partial tiles; they
are zero padded, which leaves every ``|x|`` maximum unchanged.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .core import Granularity, check_tensor, values_available


def to_blocks(x: torch.Tensor, g: Granularity) -> torch.Tensor:
    """``[..., rows, cols]`` -> ``[..., R, br, C, bc]`` (zero padded to whole tiles)."""
    rows, cols = x.shape[-2:]
    br, bc = g.block_shape(rows, cols)
    nr, nc = g.scale_shape(rows, cols)
    pad_r, pad_c = nr * br - rows, nc * bc - cols
    if pad_r or pad_c:
        x = F.pad(x, (0, pad_c, 0, pad_r))
    return x.reshape(*x.shape[:-2], nr, br, nc, bc)


def from_blocks(xb: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of ``to_blocks``: ``[..., R, br, C, bc]`` -> ``[..., rows, cols]``."""
    nr, br, nc, bc = xb.shape[-4:]
    x = xb.reshape(*xb.shape[:-4], nr * br, nc * bc)
    return x[..., :rows, :cols]


def per_block(v: torch.Tensor) -> torch.Tensor:
    """A per-block ``[..., R, C]`` value as ``[..., R, 1, C, 1]`` (broadcasts on blocks)."""
    return v[..., :, None, :, None]


def block_amax(x: torch.Tensor, g: Granularity) -> torch.Tensor:
    """``max |x|`` of every block, in ``x.dtype`` (exact); NaN propagates (torch.amax)."""
    xb = to_blocks(x.abs(), g)
    if xb.numel() == 0:  # no rows: every (empty) block has amax 0, as an all-zero one
        return xb.new_zeros(xb.shape[:-3] + xb.shape[-2:-1])
    return xb.amax(dim=(-3, -1))


def block_min_max(x: torch.Tensor, g: Granularity) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` of every block (no padding: only whole-tile granularities use it)."""
    xb = to_blocks(x, g)
    if xb.numel() == 0:
        zeros = xb.new_zeros(xb.shape[:-3] + xb.shape[-2:-1])
        return zeros, zeros
    return xb.amin(dim=(-3, -1)), xb.amax(dim=(-3, -1))


def replace_zero_scale(s: torch.Tensor, eps_dtype: torch.dtype) -> torch.Tensor:
    """compressed-tensors' zero-scale rule (``calculate_qparams`` step 5): a scale
    that is exactly 0 becomes ``finfo(eps_dtype).eps``; nothing else changes
    (it is a replacement, not a floor). An all-zero block then quantizes to
    code 0 and dequantizes to 0, never 0/0 = NaN."""
    eps = torch.finfo(eps_dtype).eps
    return torch.where(s == 0, torch.full_like(s, eps), s)


def eager(*tensors) -> bool:
    """True outside torch.compile tracing and CUDA graph capture, and when no
    tensor of ``tensors`` is fake or on the ``meta`` device: value
    (data-dependent) checks, which read values on the host, run only then
    (``core.values_available``)."""
    return values_available(*tensors)


def check_finite(name: str, x: torch.Tensor, limit: Optional[float] = None) -> None:
    """Integer formats have no NaN/inf code: reject non-finite input (eagerly).
    ``limit``: the largest magnitude whose scale and codes stay finite in the
    working precision (larger finite values would overflow to inf or NaN)."""
    if not eager(x) or x.numel() == 0:
        return
    amax = float(x.abs().amax())  # NaN and inf propagate: one reduction, one read
    if not math.isfinite(amax):
        raise ValueError(
            f"{name} must be finite for integer quantization: it has "
            f"{int(torch.isnan(x).sum())} NaN and {int(torch.isinf(x).sum())} inf values"
        )
    if limit is not None:
        if amax > limit:
            raise ValueError(
                f"{name} has values of magnitude {amax:.4g}; integer quantization supports at most "
                f"{limit:.4g} here (a larger range overflows its scale or codes to inf)"
            )


def check_static_scale(
    name: str, scale: torch.Tensor, shape: Sequence[int], dtype: torch.dtype
) -> None:
    """A static scale must have the granularity's scale shape, ``dtype``, and be
    finite and > 0 (value check eager only)."""
    check_tensor(name, scale, dtype=dtype, shape=tuple(shape))
    if eager(scale) and not bool(((scale > 0) & torch.isfinite(scale)).all()):
        raise ValueError(f"{name} must be finite and > 0 everywhere")


def check_float_dtype(name: str, dtype: torch.dtype) -> None:
    """Output/scale dtypes are one of bf16, fp16, fp32."""
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"{name} must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}")


def check_input(x: torch.Tensor) -> None:
    """``x`` is a float16/bfloat16/float32 tensor with at least 2 dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x must be float16/bfloat16/float32, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims [..., rows, cols], got {tuple(x.shape)}")
