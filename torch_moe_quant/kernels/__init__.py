"""Triton kernels of the MoE ops (CUDA; on CPU under ``TRITON_INTERPRET=1``).

* ``moe_gemm`` / ``moe_gemm_ref``: grouped GEMM over (expert, token-block)
  tiles with in-loop weight dequantization, and its plain-PyTorch twin.
* ``fused_experts_triton`` / ``fused_experts_ref``: the whole MoE forward
  (align -> GEMM1 -> activation -> GEMM2 -> top-k sum) built on them.
* ``select_config``, ``KernelConfig``, ``GemmProblem``: typed tile selection;
  ``autotune``: opt-in tuning with an on-disk cache
  (``TORCH_MOE_QUANT_AUTOTUNE=<file.json>`` or ``enable_autotune(path)``).
* ``align.align_triton``, ``combine.combine_topk``: the pipeline's other kernels.

Importing this package does not import Triton: the kernel module is loaded
at the first launch, which is when ``TRITON_INTERPRET`` is read.
"""

from .autotune import disable_autotune, enable_autotune
from .config import GemmProblem, KernelConfig, select_config
from .fused_experts import fused_experts_ref, fused_experts_triton, supported_weight_formats
from .moe_gemm import ARows, kernel_is_interpreted, moe_gemm, moe_gemm_ref

__all__ = [
    "ARows",
    "GemmProblem",
    "KernelConfig",
    "disable_autotune",
    "enable_autotune",
    "fused_experts_ref",
    "fused_experts_triton",
    "kernel_is_interpreted",
    "moe_gemm",
    "moe_gemm_ref",
    "select_config",
    "supported_weight_formats",
]
from .route import route_triton  # noqa: E402,F401  (one-launch routing kernel, kernels.route)
