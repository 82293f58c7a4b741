"""Grouped MoE GEMM over (expert, token-block) tiles: the Triton launcher
``moe_gemm`` and its plain-PyTorch twin ``moe_gemm_ref`` (same signature).

Contract (``E`` local experts, ``P`` (token, slot) pairs, pair index
``p = token * top_k + slot``):

* ``a [rows, K]`` fp16 / bf16 / fp32. ``a_rows=ARows.TOKENS``: pair ``p``
  reads row ``p // top_k`` and ``P = rows * top_k``; ``ARows.PAIRS``: pair
  ``p`` reads row ``p`` and ``P = rows``.
* ``weight``: one expert tensor ``[E, N, K]``: a bf16/fp16/fp32 tensor or a
  ``QuantizedTensor`` of a format in ``_operand.CODECS`` (fp8 e4m3 per
  tensor / row / group / 2-D block, int8 per tensor / row, int4
  pack-quantized per row / group with optional zero points and act-order
  ``g_idx``, mxfp4, mxfp6 e2m3 / e3m2, mxfp8, nvfp4).
* ``sorted_ids, block_expert_ids, num_padded``: the outputs of
  ``torch.ops.moe_quant.align(topk_ids, E, config.block_m, expert_map)``
  (sentinel pair ``P``, block expert ``-1`` = unused).
* ``bias [E, N]`` (optional, any float dtype) is added, then the optional
  ``activation`` (``activations.Activation``) is applied in fp32 in the
  epilogue: a gated one reads the gate and up halves of the row as
  ``layout`` (``GateUpLayout``) says and gives ``N / 2`` columns; then the
  optional routing weight ``topk_weights[p]`` (``[P]`` or
  ``[P // top_k, top_k]``) multiplies the row.

Returns ``C [P, N_out]`` in ``out_dtype`` (default ``a.dtype``), ``N_out =
N / 2`` for a gated activation and ``N`` otherwise:
``C[p] = act(a[row(p)] @ W[e(p)].T + bias[e(p)]) * topk_weights[p]``. Rows of
pairs that ``align`` dropped (expert not on this rank) are zero with
``dropped=DroppedRows.ZERO`` (the default) and left unwritten (``torch.empty``,
one memset less) with ``DroppedRows.UNWRITTEN``.

Arithmetic: fp32 accumulation; ``tl.dot`` operands in ``a.dtype`` (fp32 dots
use ``input_precision="ieee"``). Weight codes enter the dot exactly except in
``ScaleMode.PER_GROUP`` / ``PER_ELEMENT`` (see ``_operand.ScaleMode``). Under the Triton
interpreter a bf16 ``a`` is multiplied in fp32 (the interpreter's bf16
``tl.dot`` returns garbage; the values of bf16 operands are exact in fp32).

Activation quantization is not part of this GEMM: a scheme that quantizes
activations passes ``a`` already quantize-dequantized
(``reference.activation_qdq``) and cast to the compute dtype.

Every argument is validated before launch; shapes, dtypes and devices raise
``TypeError``/``ValueError`` naming the argument, and a weight format the
kernel cannot read raises ``NotImplementedError`` naming the format.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Optional

import torch

from ..activations import Activation, GateUpLayout, apply_activation
from ..fake_impls.shapes import align_shapes
from ..formats.core import check_tensor
from ..reference import dequantize_weight
from ._operand import FLOAT_DTYPES, Weight, WeightOperand
from .config import GemmProblem, KernelConfig, select_config


class ARows(enum.IntEnum):
    """What a row of the GEMM input ``a`` is (kernel constexpr ``A_ROWS``)."""

    TOKENS = 0  # a[token]; pair p reads row p // top_k (first GEMM)
    PAIRS = 1  # a[pair]; pair p reads row p (second GEMM)


class EpilogueAct(enum.IntEnum):
    """The activation applied in the epilogue (kernel constexpr ``ACT``)."""

    NONE = 0
    SILU = 1
    GELU = 2
    GELU_TANH = 3
    SWIGLUOAI = 4
    SWIGLUSTEP = 5
    RELU2 = 6
    SILU_NO_MUL = 7
    GELU_NO_MUL = 8

    @staticmethod
    def of(activation: Optional[Activation]) -> "EpilogueAct":
        return EpilogueAct.NONE if activation is None else EpilogueAct[Activation(activation).name]


class DroppedRows(enum.Enum):
    """What ``moe_gemm`` leaves in the output rows of pairs it does not compute."""

    ZERO = "zero"  # torch.zeros output
    UNWRITTEN = "unwritten"  # torch.empty output: the caller never reads those rows


_GATE_CODES = {GateUpLayout.GATE_UP: 0, GateUpLayout.UP_GATE: 1, GateUpLayout.INTERLEAVED: 2}


# ---------------------------------------------------------------- the kernel, lazily


def _kernel_module():
    """The Triton kernel module, imported on first use (see ``_gemm_kernel``)."""
    from . import _gemm_kernel

    return _gemm_kernel


def kernel_is_interpreted() -> bool:
    """True when the GEMM kernel runs under the Triton interpreter
    (``TRITON_INTERPRET=1`` was set before the kernel module was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_kernel_module().moe_gemm_kernel, InterpretedFunction)


#: oldest CUDA architecture the kernels run on (bf16 ``tl.dot`` needs sm80)
MIN_CAPABILITY = (8, 0)
#: first architecture with hardware fp8 conversions (sm89 Ada, sm90 Hopper, ...)
FP8_CAPABILITY = (8, 9)


def fp8_native(device: torch.device) -> bool:
    """Whether e4m3 bytes are decoded with the hardware fp8 cast on ``device``
    (kernel constexpr ``FP8_NATIVE``); older GPUs decode the bits in integer
    arithmetic, with the same (exact) result. Raises a ``RuntimeError`` naming
    the architecture for GPUs older than ``MIN_CAPABILITY``."""
    if device.type != "cuda":
        return True  # the interpreter
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        raise RuntimeError(
            f"the Triton MoE kernels need a CUDA GPU of compute capability >= "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ampere); {torch.cuda.get_device_name(device)} is "
            f"{cap[0]}.{cap[1]}. Use the CPU reference (tensors on the CPU) instead."
        )
    return cap >= FP8_CAPABILITY


# ---------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class _Call:
    """Validated arguments shared by ``moe_gemm`` and ``moe_gemm_ref``."""

    a: torch.Tensor
    op: WeightOperand
    sorted_ids: torch.Tensor
    block_expert_ids: torch.Tensor
    num_padded: torch.Tensor
    top_k: int
    a_rows: ARows
    num_pairs: int
    bias: Optional[torch.Tensor]
    topk_weights: Optional[torch.Tensor]  # flat [P]
    out_dtype: torch.dtype
    config: KernelConfig
    activation: Optional[Activation]
    layout: GateUpLayout

    @property
    def n_out(self) -> int:
        gated = self.activation is not None and self.activation.is_gated
        return self.op.n // 2 if gated else self.op.n


def _check_call(
    a, weight, sorted_ids, block_expert_ids, num_padded, top_k, a_rows, bias, topk_weights,
    out_dtype, config, activation=None, layout=GateUpLayout.GATE_UP,
) -> _Call:
    check_tensor("a", a, dtype=FLOAT_DTYPES)
    if a.dim() != 2:
        raise ValueError(f"a must be 2-D [rows, K], got shape {tuple(a.shape)}")
    op = WeightOperand.of(weight, "weight")
    if a.shape[1] != op.k:
        raise ValueError(f"a must have K={op.k} columns (weight is [E, N, K]={[op.num_experts, op.n, op.k]}), got {a.shape[1]}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if not isinstance(a_rows, ARows):
        raise TypeError(f"a_rows must be an ARows (TOKENS or PAIRS), got {a_rows!r}")
    num_pairs = a.shape[0] * top_k if a_rows is ARows.TOKENS else a.shape[0]
    if out_dtype is None:
        out_dtype = a.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    if config is None:
        problem = GemmProblem(num_pairs // top_k, op.n, op.k, op.num_experts, top_k, a.dtype)
        config = select_config(problem, op.spec, a.device)
    elif not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a KernelConfig or None, got {type(config).__name__}")

    shapes = align_shapes(num_pairs, op.num_experts, config.block_m)
    for name, t in (
        ("sorted_ids", sorted_ids), ("block_expert_ids", block_expert_ids), ("num_padded", num_padded)
    ):
        want, dtype = shapes[name]
        check_tensor(name, t, dtype=dtype)
        if tuple(t.shape) != want:
            raise ValueError(
                f"{name} must have shape {want} = align(topk_ids with {num_pairs} pairs, "
                f"num_experts={op.num_experts}, block_size=config.block_m={config.block_m}), "
                f"got {tuple(t.shape)}"
            )
    if bias is not None:
        check_tensor("bias", bias, shape=(op.num_experts, op.n))
        if not bias.is_floating_point():
            raise TypeError(f"bias must be a float tensor, got {bias.dtype}")
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights)
        if not topk_weights.is_floating_point():
            raise TypeError(f"topk_weights must be a float tensor, got {topk_weights.dtype}")
        ok_shapes = {(num_pairs,), (num_pairs // top_k, top_k)}
        if tuple(topk_weights.shape) not in ok_shapes:
            raise ValueError(
                f"topk_weights must have shape ({num_pairs},) (one per pair) or "
                f"({num_pairs // top_k}, {top_k}), got {tuple(topk_weights.shape)}"
            )
        topk_weights = topk_weights.reshape(-1).contiguous()
    if activation is not None:
        if not isinstance(activation, Activation):
            raise TypeError(f"activation must be an Activation or None, got {activation!r}")
        if activation.is_gated and op.n % 2:
            raise ValueError(f"a gated activation needs an even N, weight has N={op.n}")
    if not isinstance(layout, GateUpLayout):
        raise TypeError(f"layout must be a GateUpLayout, got {layout!r}")
    tensors = {
        "weight": op.data, "sorted_ids": sorted_ids, "block_expert_ids": block_expert_ids,
        "num_padded": num_padded, "bias": bias, "topk_weights": topk_weights,
    }
    for name, t in tensors.items():
        if t is not None and t.device != a.device:
            raise ValueError(f"{name} is on {t.device} but a is on {a.device}: all tensors must share a device")
    return _Call(
        a, op, sorted_ids.contiguous(), block_expert_ids.contiguous(), num_padded, top_k,
        a_rows, num_pairs, bias, topk_weights, out_dtype, config, activation, layout,
    )


# ---------------------------------------------------------------- launcher


def moe_gemm(
    a: torch.Tensor,
    weight: Weight,
    sorted_ids: torch.Tensor,
    block_expert_ids: torch.Tensor,
    num_padded: torch.Tensor,
    *,
    top_k: int,
    a_rows: ARows,
    bias: Optional[torch.Tensor] = None,
    topk_weights: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    config: Optional[KernelConfig] = None,
    activation: Optional[Activation] = None,
    layout: GateUpLayout = GateUpLayout.GATE_UP,
    dropped: DroppedRows = DroppedRows.ZERO,
) -> torch.Tensor:
    """Grouped MoE GEMM with in-loop weight dequantization (module docstring).
    ``config`` defaults to ``select_config`` for this problem and device; its
    ``block_m`` must be the ``block_size`` given to ``align``."""
    call = _check_call(
        a, weight, sorted_ids, block_expert_ids, num_padded, top_k, a_rows, bias, topk_weights,
        out_dtype, config, activation, layout,
    )
    op, cfg = call.op, call.config
    if not isinstance(dropped, DroppedRows):
        raise TypeError(f"dropped must be a DroppedRows, got {dropped!r}")
    new = torch.zeros if dropped is DroppedRows.ZERO else torch.empty
    out = new(call.num_pairs, call.n_out, dtype=call.out_dtype, device=a.device)
    if call.num_pairs == 0 or op.n == 0:
        return out
    km = _kernel_module()
    interpreted = kernel_is_interpreted()
    if a.device.type == "cpu" and not interpreted:
        raise RuntimeError(
            "moe_gemm got CPU tensors but the Triton kernel was compiled for a GPU: set "
            "TRITON_INTERPRET=1 before the first kernel launch to run it under the interpreter"
        )
    compute = a.dtype
    if interpreted and compute == torch.bfloat16:
        compute = torch.float32  # the interpreter's bf16 tl.dot is broken (module docstring)
    max_padded = call.sorted_ids.numel()
    grid = (_cdiv(max_padded, cfg.block_m) * _cdiv(op.n, cfg.block_n),)
    s_e, s_n, s_k = op.scale_strides()
    bias_strides = call.bias.stride() if call.bias is not None else (0, 0)
    g_strides = op.g_idx.stride() if op.g_idx is not None else (0, 0)
    km.moe_gemm_kernel[grid](
        a, op.data, out,
        call.sorted_ids, call.block_expert_ids, call.num_padded,
        op.scale, op.zero_point, op.g_idx, op.global_scale, call.bias, call.topk_weights,
        op.n, call.n_out, op.k, call.num_pairs, max_padded, op.num_experts, op.num_k_groups,
        a.stride(0), a.stride(1),
        *op.data.stride(),
        s_e, s_n, s_k,
        *g_strides,
        *bias_strides,
        *out.stride(),
        TOP_K=call.top_k,
        A_ROWS=int(call.a_rows),
        ELEMENT=int(op.element),
        SCALE_CODEC=int(op.scale_codec),
        SCALE_MODE=int(op.scale_mode(cfg.block_k)),
        SCALE_BLOCK_N=op.scale_block_n,
        SCALE_BLOCK_K=op.scale_block_k or 1,
        COMPUTE=km.TL_DTYPES[compute],
        INPUT_PRECISION=km.FP32_DOT_PRECISION if compute == torch.float32 else None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        ACT=int(EpilogueAct.of(call.activation)),
        GATED=call.activation is not None and call.activation.is_gated,
        GATE=_GATE_CODES[call.layout],
        FP8_NATIVE=fp8_native(a.device),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def _cdiv(x: int, y: int) -> int:
    return -(-x // y)


# ---------------------------------------------------------------- reference twin


def moe_gemm_ref(
    a: torch.Tensor,
    weight: Weight,
    sorted_ids: torch.Tensor,
    block_expert_ids: torch.Tensor,
    num_padded: torch.Tensor,
    *,
    top_k: int,
    a_rows: ARows,
    bias: Optional[torch.Tensor] = None,
    topk_weights: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    config: Optional[KernelConfig] = None,
    activation: Optional[Activation] = None,
    layout: GateUpLayout = GateUpLayout.GATE_UP,
    dropped: DroppedRows = DroppedRows.ZERO,
) -> torch.Tensor:
    """Plain-PyTorch twin of ``moe_gemm``: the weight dequantized to fp32
    (``formats.dequantize``) and an fp32 matmul per expert; same contract,
    same skipping of sentinel pairs and out-of-range experts (dropped rows
    are always zero here)."""
    call = _check_call(
        a, weight, sorted_ids, block_expert_ids, num_padded, top_k, a_rows, bias, topk_weights,
        out_dtype, config, activation, layout,
    )
    op, bm = call.op, call.config.block_m
    out = torch.zeros(call.num_pairs, call.n_out, dtype=torch.float32, device=a.device)
    used = min(int(call.num_padded[0]), call.sorted_ids.numel())
    pairs = call.sorted_ids[:used].long()
    experts = call.block_expert_ids.long().repeat_interleave(bm)[:used]
    ok = (pairs >= 0) & (pairs < call.num_pairs) & (experts >= 0) & (experts < op.num_experts)
    w = dequantize_weight(weight, torch.float32)
    for e in experts[ok].unique().tolist():
        p = pairs[ok & (experts == e)]
        rows = p // call.top_k if call.a_rows is ARows.TOKENS else p
        y = a[rows].float() @ w[e].T
        if call.bias is not None:
            y = y + call.bias[e].float()
        if call.activation is not None:
            y = apply_activation(y, call.activation, call.layout)
        if call.topk_weights is not None:
            y = y * call.topk_weights[p].float()[:, None]
        out[p] = y
    return out.to(call.out_dtype)


__all__ = ["ARows", "DroppedRows", "EpilogueAct", "kernel_is_interpreted", "moe_gemm", "moe_gemm_ref"]
