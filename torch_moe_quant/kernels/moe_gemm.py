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

Activation quantization (``act``, an ``act_quant.ActQuant``, or None): for
scales local to a K tile (static per-tensor fp8/int8, nvfp4, MX groups, fp8
groups of 128) ``a`` holds float values and the prologue quantizes each A
tile in registers, bit-exact with ``formats.fake_quantize`` of ``a.float()``
(``config.block_k`` must be a multiple of the group: ``config.fit_activation``);
for dynamic per-row fp8/int8, ``a`` holds the codes of
``act_quant.quantize_rows`` (float8_e4m3fn / int8) and ``a_scale`` their fp32
row scales. The dot (``dot``, a ``DotPreference``; ``choose_dot``): natively
on fp8 (sm89+) / int8 codes where ``native_dot_blocker`` allows it (fp8 x
e4m3 or int4 weights, int8 x int8 or int4 weights; per-column or per-K-tile
weight scales), with the activation scale applied per K tile (groups) or in
the epilogue, in fp32; otherwise the activation is dequantized to
``compute_dtype`` (default ``a.dtype``; bf16 for codes) as before.
``moe_gemm_ref`` quantizes with ``formats`` instead.

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
from ..experts import dequantize_weight
from ._enums import ARows, DotKind, EpilogueAct
from ._operand import FLOAT_DTYPES, ElementCodec, ScaleCodec, ScaleMode, Weight, WeightOperand
from .act_quant import ActElement, ActPlacement, ActQuant, ActScale, fake_quantize_ref
from .config import GemmProblem, KernelConfig, fit_activation, select_config


class DotPreference(enum.Enum):
    """Which ``DotKind`` ``moe_gemm`` may use (``choose_dot``)."""

    # the native fp8 / int8 dot where ``choose_dot`` allows it, else COMPUTE; at decode sizes the
    # decode kernel may take per-row codes instead (its bf16 dot on the exact codes: decode_blocker)
    AUTO = "auto"
    COMPUTE = "compute"  # always the dequantize-to-compute-dtype path
    NATIVE = "native"  # the native dot, or a ValueError/RuntimeError saying why not


class DroppedRows(enum.Enum):
    """What ``moe_gemm`` leaves in the output rows of pairs it does not compute."""

    ZERO = "zero"  # torch.zeros output
    UNWRITTEN = "unwritten"  # torch.empty output: the caller never reads those rows


@dataclasses.dataclass(frozen=True)
class KOrder:
    """The order of a GEMM input's columns along K. ``per_word == 1``: natural.
    Otherwise K is cut into spans of ``per_word * words`` columns and, within a
    span, natural column ``w * per_word + j`` sits at position ``j * words + w``:
    the order in which the decode kernel reads a packed weight (nibble ``j`` of
    word ``w``), so each of its sub-tiles reads ``words`` contiguous columns."""

    per_word: int = 1
    words: int = 16

    @property
    def span(self) -> int:
        return self.per_word * self.words

    @property
    def natural(self) -> bool:
        return self.per_word == 1

    def permute(self, t: torch.Tensor) -> torch.Tensor:
        """``[rows, K]`` in natural order -> this order (a copy; K a multiple of ``span``)."""
        if self.natural:
            return t
        rows, k = t.shape
        return t.view(rows, k // self.span, self.words, self.per_word).transpose(2, 3).reshape(rows, k)

    def unpermute(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of ``permute``."""
        if self.natural:
            return t
        rows, k = t.shape
        return t.view(rows, k // self.span, self.per_word, self.words).transpose(2, 3).reshape(rows, k)

    def check(self, name: str, k: int) -> None:
        if not self.natural and k % self.span:
            raise ValueError(f"{name}: {k} columns are not a multiple of the KOrder span {self.span}")


NATURAL = KOrder()


class GemmKernel(enum.Enum):
    """Which Triton kernel ``moe_gemm`` runs."""

    AUTO = "auto"  # DECODE where ``decode_order`` allows it, else GROUPED
    GROUPED = "grouped"  # the grouped GEMM (``_gemm_kernel``): every format and activation path
    DECODE = "decode"  # the weight-streaming swap-AB kernel (``_decode_kernel``), or a ValueError saying why not


#: ``config.block_m`` up to which AUTO takes the decode kernel (pairs per expert <= 64)
DECODE_MAX_BLOCK_M = 32
#: Weight rows per program of the decode kernel (None: ``_decode_block_n``'s choice per format).
DECODE_BLOCK_N: Optional[int] = None
#: the input order each packed weight is read in (``KOrder``): its span is also the kernel's K tile
#: (BLOCK_K = codes a word (8, or 4 for fp8) x ``words`` int32 words a row), so K, a multiple of the span, needs no K
#: masks in the kernel. fp4 tiles hold four block scales a row (one int32 of scale bytes):
#: 128 columns for mxfp4's groups of 32, 64 for nvfp4's 16
_INT4_ORDER = KOrder(8, 16)
_FP4_ORDERS = {32: KOrder(8, 16), 16: KOrder(8, 8)}
_FP8_ORDER = KOrder(4, 32)  # e4m3 weights: four codes a word


def _decode_k_order(op: WeightOperand) -> Optional[KOrder]:
    """The decode kernel's ``KOrder`` for this weight (None: not an int4 / fp4 / fp8 one it reads)."""
    if op.element is ElementCodec.INT4:
        return _INT4_ORDER
    if op.element is ElementCodec.FP4_E2M1:
        return _FP4_ORDERS.get(op.scale_block_k)
    if op.element is ElementCodec.FP8_E4M3:
        return _FP8_ORDER
    return None


#: pipeline stages of the decode kernel (None: 3 when it unrolls K tiles, else 4; measured in
#: bench/results/h200_decode_rows.md)
DECODE_STAGES: Optional[int] = None
DECODE_WARPS = 4
#: K tiles per decode-kernel iteration (None: ``_decode_unroll``'s choice per format)
DECODE_UNROLL: Optional[int] = None


def _decode_unroll(op: WeightOperand, block_m: int) -> int:
    """K tiles per decode-kernel iteration: 2 for int4 with up to 16 token rows
    (a row's two tiles' words are loaded together, 128 contiguous bytes), 1
    for the others. Measured on the H200 at M = 16 (one GEMM,
    bench/results/h200_decode_rows.md): int4 g128 went from 0.1993 / 0.1173 /
    0.2141 ms to 0.1657 / 0.1054 / 0.1732 on the mixtral / gpt-oss / deepseek-v3
    w13 GEMMs (58 / 53 / 54% -> 70 / 59 / 67% of the floor), zero points
    0.2142 -> 0.2032 (mixtral w13). fp4, bound by its decode's instructions,
    moved within +-5% either way at M = 16 with 2 tiles (and 9% slower on
    gpt-oss at M = 256 with 64 rows, a stage's shared memory doubled), nvfp4 with
    4 tiles 5-30% slower; fp8 reads 128 bytes a row and tile already. With 32
    token rows (mixtral at M = 256) a stage's activation block doubles and 2
    tiles ran 6% slower (0.819 -> 0.874 ms, the whole forward)."""
    if DECODE_UNROLL is not None:
        return DECODE_UNROLL
    return 2 if op.element is ElementCodec.INT4 and block_m <= 16 else 1


def decode_blocker(
    op: WeightOperand, act: Optional[ActQuant], compute_dtype: torch.dtype, device: torch.device
) -> Optional[str]:
    """Why the decode kernel cannot run this GEMM (None if it can): it takes
    weight-only GEMMs, or activations given as per-row fp8 / int8 codes (the
    dot runs on the codes, exact in bf16; the row scale in the epilogue), on int4 (per column or
    groups that are multiples of 128, with or without zero points; bf16
    groups of 32 / 64 without; no act-order) and fp4 (block scales per 32
    or 16 columns: mxfp4, nvfp4) and fp8 e4m3 (per column or blocks of 128)
    weights with bf16 / fp16 compute (bf16 only on CUDA: the PTX decode emits
    bf16)."""
    if act is not None and (act.placement is not ActPlacement.ROW_KERNEL or act.scale is ActScale.GROUP_CODES):
        return "the activation is quantized in the GEMM (only per-row fp8 / int8 codes are read)"
    order = _decode_k_order(op)
    if order is None:
        return (f"{op.element.name} weights with groups of {op.scale_block_k} "
                f"(int4, fp8, and fp4 in groups of 16 / 32 only)")
    if op.g_idx is not None:
        return "act-order weights (g_idx)"
    if op.k % order.span:
        return f"K={op.k} is not a multiple of {order.span}"
    if op.element is ElementCodec.INT4:
        mode = op.scale_mode(order.span)
        if mode is ScaleMode.PER_GROUP:
            if op.zero_point is not None:
                return f"int4 groups of {op.scale_block_k} with zero points (zero points need groups of 128k or per column)"
            if not _int4_group_views_ok(op):
                return (f"int4 groups of {op.scale_block_k}: bf16 scales viewable as int32 pairs only "
                        f"(got {op.scale.dtype}, strides {tuple(op.scale.stride())})")
        elif mode not in (ScaleMode.PER_COLUMN, ScaleMode.PER_K_TILE):
            return f"int4 groups of {op.scale_block_k} (per column, 32, 64 or multiples of 128 only)"
    elif op.zero_point is not None:
        return f"{op.element.name} weights with zero points"
    if op.element is ElementCodec.FP8_E4M3:
        if act is not None:  # not measured against the native fp8 dot yet (issue 18: no w8a8 regression)
            return "fp8 weights with quantized activations (w8a8: the grouped kernel's native fp8 dot)"
        if op.scale_mode(order.span) not in (ScaleMode.PER_COLUMN, ScaleMode.PER_K_TILE):
            return f"fp8 weights with scales per {op.scale_block_k} columns (per column or 128k only)"
        if not _byte_words_ok(op):
            return "fp8 codes not viewable as int32 words (strides, alignment)"
    if op.element is ElementCodec.FP4_E2M1 and not _fp4_views_ok(op):
        return "fp4 codes / block scales not viewable as int32 words / one integer per K tile (strides, alignment)"
    if compute_dtype not in (torch.bfloat16, torch.float16) or (decode_asm(device) and compute_dtype != torch.bfloat16):
        return f"compute dtype {compute_dtype}"
    return None


def _byte_words_ok(op: WeightOperand) -> bool:
    """Whether the weight's byte codes (fp8, or packed fp4 pairs) ``[E, N, K']``
    can be viewed as int32 words: last dim contiguous, the view aligned."""
    d = op.data
    return d.stride(-1) == 1 and d.data_ptr() % 4 == 0 and all(st % 4 == 0 for st in d.stride()[:-1])


def _int4_group_views_ok(op: WeightOperand) -> bool:
    """Whether ``_launch_decode`` can view int4 group scales (32 or 64
    columns: 4 or 2 a K tile) as int32 pairs of bf16: bf16, last dim
    contiguous and even, the view aligned."""
    sc = op.scale
    return (
        op.scale_block_k in (32, 64) and sc.dtype == torch.bfloat16 and sc.stride(-1) == 1
        and sc.shape[-1] % 2 == 0 and sc.data_ptr() % 4 == 0 and all(st % 2 == 0 for st in sc.stride()[:-1])
    )


def _fp4_views_ok(op: WeightOperand) -> bool:
    """Whether ``_launch_decode`` can view fp4 codes as int32 words and a K
    tile's four block scales as one int32 per row: last dims contiguous and
    the views aligned."""
    width = 4  # scale bytes per tile and row
    if op.scale is None:
        return False
    return (
        _byte_words_ok(op) and op.scale.stride(-1) == 1 and op.scale.data_ptr() % width == 0
        and all(st % width == 0 for st in op.scale.stride()[:-1]) and op.scale.shape[-1] % width == 0
    )


def decode_order(
    op: WeightOperand, act: Optional[ActQuant], config: KernelConfig, compute_dtype: torch.dtype, device: torch.device,
    kernel: GemmKernel = GemmKernel.AUTO,
) -> KOrder:
    """The input order the GEMM reads (``KOrder``): the weight's packing
    order when ``kernel`` (AUTO: decode sizes, ``config.block_m <=
    DECODE_MAX_BLOCK_M``) picks the decode kernel, else ``NATURAL``."""
    if not isinstance(kernel, GemmKernel):
        raise TypeError(f"kernel must be a GemmKernel, got {kernel!r}")
    if kernel is GemmKernel.GROUPED:
        return NATURAL
    blocker = decode_blocker(op, act, compute_dtype, device)
    if kernel is GemmKernel.DECODE and blocker is not None:
        raise ValueError(f"kernel=GemmKernel.DECODE: the decode kernel cannot run this GEMM: {blocker}")
    if blocker is not None or (kernel is GemmKernel.AUTO and config.block_m > DECODE_MAX_BLOCK_M):
        return NATURAL
    return _decode_k_order(op)


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


def native_dot_blocker(act: Optional[ActQuant], op: WeightOperand, block_k: int, device: torch.device) -> Optional[str]:
    """Why the native fp8/int8 dot cannot run this GEMM (None if it can).

    It needs: fp8 or int8 activation codes (per tensor, per row, or groups
    of exactly ``block_k``); weight codes exact in that element (e4m3 or int4
    for fp8; int8 or int4 for int8) with fp32-decodable scales applied per
    column or per K tile (no zero point, no act-order); for fp8 a GPU of
    compute capability >= 8.9 (sm80 has no fp8 tensor cores)."""
    if act is None:
        return "the activation is not quantized"
    if act.element is ActElement.FP8_E4M3:
        ok_weights = (ElementCodec.FP8_E4M3, ElementCodec.INT4)
    elif act.element is ActElement.INT8:
        ok_weights = (ElementCodec.INT8, ElementCodec.INT4)
    else:
        return f"activation element {act.element.name} has no native dot (fp8 / int8 only)"
    if op.element not in ok_weights or op.scale_codec is not ScaleCodec.FLOAT:
        fmt = op.fmt.value if op.fmt is not None else "unquantized"
        return f"{fmt} weights are not {act.element.name} x {'/'.join(w.name for w in ok_weights)} codes with float scales"
    if op.zero_point is not None or op.g_idx is not None:
        return "weights with zero points or act-order g_idx"
    if op.scale_mode(block_k) not in (ScaleMode.PER_COLUMN, ScaleMode.PER_K_TILE):
        return f"the weight scale changes inside a K tile of {block_k}"
    if act.group and act.group != block_k:
        return f"activation groups of {act.group} need BLOCK_K == {act.group}, got {block_k}"
    if act.element is ActElement.FP8_E4M3 and not fp8_native(device):
        name = torch.cuda.get_device_name(device)
        return f"fp8 tensor-core dots need compute capability >= 8.9; {name} has none"
    return None


def choose_dot(
    act: Optional[ActQuant], op: WeightOperand, block_k: int, device: torch.device, preference: DotPreference
) -> DotKind:
    """The ``DotKind`` for ``preference`` (``native_dot_blocker`` says when
    the native dot is possible). ``NATIVE`` raises a ``ValueError`` naming the
    reason when it is not (a ``RuntimeError`` for a GPU without fp8 dots)."""
    if not isinstance(preference, DotPreference):
        raise TypeError(f"dot must be a DotPreference, got {preference!r}")
    if preference is DotPreference.COMPUTE:
        return DotKind.COMPUTE
    blocker = native_dot_blocker(act, op, block_k, device)
    if blocker is None:
        return DotKind.FP8 if act.element is ActElement.FP8_E4M3 else DotKind.INT8
    if preference is DotPreference.NATIVE:
        exc = RuntimeError if "compute capability" in blocker else ValueError
        raise exc(f"dot=DotPreference.NATIVE: no native fp8/int8 dot here: {blocker}")
    return DotKind.COMPUTE


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
    act: Optional[ActQuant] = None
    a_scale: Optional[torch.Tensor] = None
    compute_dtype: torch.dtype = torch.bfloat16

    @property
    def n_out(self) -> int:
        gated = self.activation is not None and self.activation.is_gated
        return self.op.n // 2 if gated else self.op.n


def _check_call(
    a, weight, sorted_ids, block_expert_ids, num_padded, top_k, a_rows, bias, topk_weights,
    out_dtype, config, activation=None, layout=GateUpLayout.GATE_UP, act=None, a_scale=None,
    compute_dtype=None,
) -> _Call:
    if act is not None and not isinstance(act, ActQuant):
        raise TypeError(f"act must be an ActQuant or None, got {act!r}")
    codes = act is not None and act.placement is ActPlacement.ROW_KERNEL
    if codes:
        check_tensor("a", a, dtype=act.code_dtype)
        if a.dim() != 2:
            raise ValueError(f"a must be 2-D [rows, K], got shape {tuple(a.shape)}")
        grouped = act.scale is ActScale.GROUP_CODES
        want = (a.shape[0], a.shape[1] // act.group) if grouped else (a.shape[0],)
        check_tensor("a_scale", a_scale, dtype=torch.float32, shape=want)
        if grouped and not a_scale.is_contiguous():
            raise ValueError("a_scale of group codes must be contiguous [rows, K / group]")
        if a_scale.device != a.device:
            raise ValueError(f"a_scale is on {a_scale.device} but a is on {a.device}")
    else:
        check_tensor("a", a, dtype=FLOAT_DTYPES)
        if a_scale is not None:
            raise ValueError("a_scale is only for activation codes (act.placement ROW_KERNEL)")
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if codes else a.dtype
    if compute_dtype not in FLOAT_DTYPES:
        raise TypeError(f"compute_dtype must be bfloat16, float16 or float32, got {compute_dtype}")
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
        problem = GemmProblem(num_pairs // top_k, op.n, op.k, op.num_experts, top_k, compute_dtype)
        config = fit_activation(select_config(problem, op.spec, a.device), act)
    elif not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a KernelConfig or None, got {type(config).__name__}")
    if act is not None:
        act.check_k(op.k, "a")
        if act.group and config.block_k % act.group:
            raise ValueError(
                f"config.block_k={config.block_k} must be a multiple of the activation group {act.group} "
                f"(the prologue quantizes whole groups; config.fit_activation raises it)"
            )
        if act.scale is ActScale.GROUP_CODES and config.block_k != act.group:
            raise ValueError(
                f"config.block_k={config.block_k} must equal the activation group {act.group} for group codes "
                f"(one activation scale per row and K tile)"
            )
        if act.static_scale is not None and act.static_scale.device != a.device:
            raise ValueError(f"act.static_scale is on {act.static_scale.device} but a is on {a.device}")

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
        act, a_scale, compute_dtype,
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
    act: Optional[ActQuant] = None,
    a_scale: Optional[torch.Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
    dot: DotPreference = DotPreference.AUTO,
    kernel: GemmKernel = GemmKernel.AUTO,
    a_order: KOrder = NATURAL,
    out_order: KOrder = NATURAL,
) -> torch.Tensor:
    """Grouped MoE GEMM with in-loop weight dequantization (module docstring).
    ``config`` defaults to ``select_config`` for this problem and device; its
    ``block_m`` must be the ``block_size`` given to ``align``. ``kernel``
    picks the Triton kernel (``GemmKernel``; ``decode_order`` says which
    AUTO takes). ``a_order`` is the order of ``a``'s columns and
    ``out_order`` the order the output columns are written in (``KOrder``):
    a GEMM feeding the decode kernel writes its input order directly."""
    call = _check_call(
        a, weight, sorted_ids, block_expert_ids, num_padded, top_k, a_rows, bias, topk_weights,
        out_dtype, config, activation, layout, act, a_scale, compute_dtype,
    )
    op, cfg = call.op, call.config
    dot_kind = choose_dot(act, op, cfg.block_k, a.device, dot)
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
    compute = call.compute_dtype
    if interpreted and compute == torch.bfloat16:
        compute = torch.float32  # the interpreter's bf16 tl.dot is broken (module docstring)
    _check_orders(a_order, out_order, call)
    if act is not None and dot is not DotPreference.AUTO and kernel is GemmKernel.AUTO:
        order = NATURAL  # an explicit dot kind is the grouped kernel's (the decode kernel's dot is bf16 on codes)
    else:
        order = decode_order(op, act, cfg, call.compute_dtype, a.device, kernel)
    if not order.natural:
        if a_order != order:
            a = order.permute(a_order.unpermute(a))
        asm = decode_asm(a.device)  # the PTX decode emits bf16: the dot is bf16 whenever it runs
        _launch_decode(call, a, out, call.compute_dtype if asm else compute, km, asm, out_order)
        return out
    a = a_order.unpermute(a)
    max_padded = call.sorted_ids.numel()
    grid = (_cdiv(max_padded, cfg.block_m) * _cdiv(op.n, cfg.block_n),)
    s_e, s_n, s_k = op.scale_strides()
    bias_strides = call.bias.stride() if call.bias is not None else (0, 0)
    g_strides = op.g_idx.stride() if op.g_idx is not None else (0, 0)
    if act is not None and act.placement is ActPlacement.ROW_KERNEL:
        a_arg, a_scale_arg = (a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a), a_scale
    else:
        a_arg, a_scale_arg = a, (act.static_scale if act is not None else None)
    km.moe_gemm_kernel[grid](
        a_arg, op.data, out,
        call.sorted_ids, call.block_expert_ids, call.num_padded,
        op.scale, op.zero_point, op.g_idx, op.global_scale, call.bias, call.topk_weights, a_scale_arg,
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
        A_ELEM=int(act.element) if act is not None else 0,
        A_SCALE=int(act.scale) if act is not None else 0,
        A_GROUP=max(act.group, 1) if act is not None else 1,
        DOT=int(dot_kind),
        OUT_PER_WORD=out_order.per_word,
        OUT_WORDS=out_order.words,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def _decode_block_n(op: WeightOperand, tokens: int) -> int:
    """Weight rows per decode program (4 warps, 4 stages). Measured on the H200
    (bench/results/h200_decode_tune.log: mixtral / deepseek-v3 / qwen3 GEMMs,
    M = 1 / 16 / 256, BLOCK_N 32-256 x 2-8 warps x 3-6 stages): int4 ran best
    with 64 rows at 15 of 18 points (within 5% of the best at the rest: 128 rows
    hold 165 registers a thread, 3 programs an SM; 64 rows, 4-5); fp4, whose
    decode is 1.5-1.8x int4's instructions a byte, ran best with 128 rows from
    M = 16 up (5-10% over 64) and with 64 at M = 1 (up to 1.3x: twice the
    programs when only top_k experts stream). Rerun with the fp4 scales in the
    decode (h200_decode_tune_fp4.log): 64 and 128 rows within 5% of each other
    at M = 16 (each best at half the GEMMs), 64 still best at M = 1. int4 with
    two K tiles an iteration (``_decode_unroll``) ran best with 64 rows at every
    M = 16 GEMM (h200_decode_rows.md)."""
    if DECODE_BLOCK_N is not None:
        return DECODE_BLOCK_N
    if op.element in (ElementCodec.INT4, ElementCodec.FP8_E4M3):  # fp8: 64 rows = 8 KiB a tile too (not tuned yet)
        return 64
    return 64 if tokens <= 4 else 128


_TABLES: dict = {}
#: the decode kernel's ``A_CODES`` for each input dtype (``_decode_kernel._A_FLOAT`` / ``_A_INT8`` / ``_A_FP8``)
_A_CODES = {torch.int8: 1, torch.float8_e4m3fn: 2}


def decode_table(op: WeightOperand, device: torch.device) -> Optional[torch.Tensor]:
    """What the decode kernel loads beside the weights (int32, cached per
    device and format; None where it needs nothing): per-word ``prmt``
    selectors of the scales in a K tile of ``words`` words, and for fp4 the
    e2m1 tables.

    * fp4 (``[5 * words]``): word ``w`` takes byte ``g = w * 4 // words`` of
      its row's scale word, as the A part of a pair (nibble 1 for e8m0,
      nibble 0 for e4m3) and as the B part (``4 + g`` in nibble 3 / 1); then
      each ``_decode_kernel.E2M1_LUT`` word ``words`` times (one per word
      column: see the kernel's comment).
    * int4 groups of 32 / 64 (``[words]``): word ``w`` takes bf16 scale
      ``g = w // (group / 8)``, bytes ``2g, 2g + 1`` of its row's two scale
      words, in nibbles 0-1 (A's part) and 2-3 (B's).
    """
    words = _decode_k_order(op).words
    group_int4 = op.element is ElementCodec.INT4 and op.scale_mode(8 * words) is ScaleMode.PER_GROUP
    if op.element is not ElementCodec.FP4_E2M1 and not group_int4:
        return None
    key = (device, op.element, op.scale_codec, words, op.scale_block_k)
    if key not in _TABLES:
        if group_int4:
            g = torch.arange(words, dtype=torch.int64) // (op.scale_block_k // 8)
            table = (2 * g) | ((2 * g + 1) << 4) | ((2 * g) << 8) | ((2 * g + 1) << 12)
        else:
            from . import _decode_kernel as dk

            g = torch.arange(words, dtype=torch.int64) * 4 // words
            sel = (g << 4) | ((g + 4) << 12) if op.scale_codec is ScaleCodec.E8M0 else g | ((g + 4) << 4)
            lut = torch.tensor(dk.E2M1_LUT, dtype=torch.int64)
            lut = (lut - ((lut >> 31) << 32)).repeat_interleave(words)  # int32 values; a copy per word column
            table = torch.cat([sel, lut])
        _TABLES[key] = table.to(torch.int32).to(device)
    return _TABLES[key]


def decode_asm(device: torch.device) -> bool:
    """Whether the decode kernel decodes with its PTX (``lop3`` / ``prmt``)
    helpers: on CUDA; the interpreter runs the plain-Triton decode."""
    return device.type == "cuda"


def _launch_decode(call: "_Call", a, out, compute, km, asm: bool, out_order: KOrder) -> None:
    """Launch ``_decode_kernel.moe_decode_kernel`` (``a`` in its ``decode_order``)."""
    from . import _decode_kernel as dk

    op, cfg = call.op, call.config
    block_k = _decode_k_order(op).span  # decode_blocker: K is a multiple of it
    max_padded = call.sorted_ids.numel()
    block_n = _decode_block_n(op, call.num_pairs // call.top_k)
    unroll = _decode_unroll(op, cfg.block_m)
    grid = (_cdiv(max_padded, cfg.block_m) * _cdiv(op.n, block_n),)
    bias_strides = call.bias.stride() if call.bias is not None else (0, 0)
    gated = call.activation is not None and call.activation.is_gated
    even_n = call.n_out % (block_n // 2) == 0 if gated else op.n % block_n == 0
    # fp4 bytes are read as int32 words of eight codes (like int4's), byte order unchanged; a K
    # tile's four block scales as one int32 per row; int4 bf16 group scales as int32 pairs
    w_data, scale = op.data, op.scale
    mode = op.scale_mode(block_k)
    if op.element is ElementCodec.FP4_E2M1:
        w_data, scale = op.data.view(torch.int32), op.scale.view(torch.int32)
    elif op.element is ElementCodec.FP8_E4M3:
        w_data = op.data.view(torch.int32)
    elif mode is ScaleMode.PER_GROUP:
        scale = op.scale.view(torch.int32)
    s_e, s_n, s_k = _strides3(scale)
    a_arg = a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a  # e4m3 codes read as bytes
    dk.moe_decode_kernel[grid](
        a_arg, w_data, out,
        call.sorted_ids, call.block_expert_ids, call.num_padded,
        scale, op.zero_point, op.global_scale, call.bias, call.topk_weights, decode_table(op, a.device), call.a_scale,
        op.n, call.n_out, op.k, call.num_pairs, max_padded, op.num_experts,
        a.stride(0), a.stride(1),
        *w_data.stride(),
        s_e, s_n, s_k,
        *bias_strides,
        *out.stride(),
        TOP_K=call.top_k,
        A_ROWS=int(call.a_rows),
        ELEMENT=int(op.element),
        SCALE_CODEC=int(op.scale_codec),
        SCALE_MODE=int(mode),
        SCALE_BLOCK_N=op.scale_block_n,
        SCALE_BLOCK_K=op.scale_block_k or 1,
        COMPUTE=km.TL_DTYPES[compute],
        BLOCK_M=cfg.block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        ACT=int(EpilogueAct.of(call.activation)),
        GATED=call.activation is not None and call.activation.is_gated,
        GATE=_GATE_CODES[call.layout],
        FP8_NATIVE=fp8_native(a.device),
        ASM=asm,
        CUDA=a.device.type == "cuda",
        A_CODES=_A_CODES.get(a.dtype, 0),
        OUT_PER_WORD=out_order.per_word,
        OUT_WORDS=out_order.words,
        EVEN_N=even_n,
        UNROLL=unroll,
        EVEN_K=op.k % (block_k * unroll) == 0,
        num_warps=DECODE_WARPS,
        num_stages=DECODE_STAGES or (3 if unroll > 1 else 4),
    )


def _strides3(t: torch.Tensor):
    """``(stride_e, stride_n, stride_k)`` of a 3-D scale tensor, 0 on size-1 dims."""
    return tuple(st if size > 1 else 0 for st, size in zip(t.stride(), t.shape))


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
    act: Optional[ActQuant] = None,
    a_scale: Optional[torch.Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
    dot: DotPreference = DotPreference.AUTO,
    kernel: GemmKernel = GemmKernel.AUTO,
    a_order: KOrder = NATURAL,
    out_order: KOrder = NATURAL,
) -> torch.Tensor:
    """Plain-PyTorch twin of ``moe_gemm``: the weight dequantized to fp32
    (``formats.dequantize``) and an fp32 matmul per expert; same contract,
    same skipping of sentinel pairs and out-of-range experts (dropped rows
    are always zero here)."""
    call = _check_call(
        a, weight, sorted_ids, block_expert_ids, num_padded, top_k, a_rows, bias, topk_weights,
        out_dtype, config, activation, layout, act, a_scale, compute_dtype,
    )
    choose_dot(act, call.op, call.config.block_k, a.device, dot)  # same errors as moe_gemm
    _check_orders(a_order, out_order, call)
    a = a_order.unpermute(a)
    op, bm = call.op, call.config.block_m
    if act is None:
        a = a.float()
    elif act.scale is ActScale.GROUP_CODES:
        a = a.float() * a_scale.repeat_interleave(act.group, dim=1)
    elif act.placement is ActPlacement.ROW_KERNEL:
        a = a.float() * a_scale[:, None]
    else:
        a = fake_quantize_ref(a, act)
    out = torch.zeros(call.num_pairs, call.n_out, dtype=torch.float32, device=a.device)
    used = min(int(call.num_padded[0]), call.sorted_ids.numel())
    pairs = call.sorted_ids[:used].long()
    experts = call.block_expert_ids.long().repeat_interleave(bm)[:used]
    ok = (pairs >= 0) & (pairs < call.num_pairs) & (experts >= 0) & (experts < op.num_experts)
    w = dequantize_weight(weight, torch.float32)
    for e in experts[ok].unique().tolist():
        p = pairs[ok & (experts == e)]
        rows = p // call.top_k if call.a_rows is ARows.TOKENS else p
        y = a[rows] @ w[e].T
        if call.bias is not None:
            y = y + call.bias[e].float()
        if call.activation is not None:
            y = apply_activation(y, call.activation, call.layout)
        if call.topk_weights is not None:
            y = y * call.topk_weights[p].float()[:, None]
        out[p] = y
    return out_order.permute(out).to(call.out_dtype)


def _check_orders(a_order: KOrder, out_order: KOrder, call: "_Call") -> None:
    for name, order in (("a_order", a_order), ("out_order", out_order)):
        if not isinstance(order, KOrder):
            raise TypeError(f"{name} must be a KOrder, got {order!r}")
    a_order.check("a (a_order)", call.op.k)
    out_order.check("the output (out_order)", call.n_out)


__all__ = [
    "ARows", "DotKind", "DotPreference", "DroppedRows", "EpilogueAct", "GemmKernel", "KOrder", "NATURAL",
    "choose_dot", "decode_blocker", "decode_order", "kernel_is_interpreted", "moe_gemm", "moe_gemm_ref",
    "native_dot_blocker",
]
