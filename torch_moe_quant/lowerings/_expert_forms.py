"""The pieces the expert-compute patterns are built from (``expert_patterns``).

A search function is ``dispatch(weights, activation)``: a *dispatch* form (how
tokens reach the experts: grouped GEMM, batched GEMM over gathered weights,
dense all-experts GEMM), an *activation* form (the gated activation as the
model spells it) and one *weight* form per expert weight (a parameter, or an
explicit dequantize of quantized tensors). Each is written the way its
functionalized, decomposed aten graph looks in ``post_grad_custom_pre_pass``:
in-place updates spelled out of place, constants that Inductor's joint-graph
passes fold (``full``/``scalar_tensor``, ``torch.tensor`` lookup tables) taken
as inputs that the extra check verifies.

Every int a form uses is computed from tensor shapes (never a traced magic
value): the pattern matcher's first match ignores ints, and its retrace with
the matched tensors then pins each one (top-k, experts, split sizes, group
sizes) to what the shapes say.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from ..activations import SWIGLU_LIMIT, SWIGLUOAI_ALPHA, Activation, GateUpLayout
from ..formats.core import Format

# ---------------------------------------------------------------- activations
# ``view()`` returns the first GEMM's output [S, 2I] each time the activation
# reads it (a new regenerated view when the model added its bias in place).

ViewFn = Callable[[], torch.Tensor]


def _chunked(fn):
    def act(view: ViewFn) -> torch.Tensor:
        gate, up = view().chunk(2, dim=-1)
        return fn(gate) * up

    return act


def _swigluoai_interleaved(view: ViewFn) -> torch.Tensor:
    """transformers' ``GptOssExperts._apply_gate`` (alpha 1.702, limit 7)."""
    gate, up = view()[..., ::2], view()[..., 1::2]
    gate = gate.clamp(min=None, max=SWIGLU_LIMIT)
    up = up.clamp(min=-SWIGLU_LIMIT, max=SWIGLU_LIMIT)
    glu = gate * torch.sigmoid(gate * SWIGLUOAI_ALPHA)
    return (up + 1) * glu


@dataclasses.dataclass(frozen=True)
class ActivationForm:
    name: str
    activation: Activation
    layout: GateUpLayout
    fn: Callable[[ViewFn], torch.Tensor]


ACTIVATIONS = {
    a.name: a
    for a in (
        ActivationForm("silu", Activation.SILU, GateUpLayout.GATE_UP, _chunked(F.silu)),
        ActivationForm("gelu", Activation.GELU, GateUpLayout.GATE_UP, _chunked(F.gelu)),
        ActivationForm(
            "gelu_tanh", Activation.GELU_TANH, GateUpLayout.GATE_UP,
            _chunked(lambda g: F.gelu(g, approximate="tanh")),
        ),
        ActivationForm("swigluoai", Activation.SWIGLUOAI, GateUpLayout.INTERLEAVED, _swigluoai_interleaved),
    )
}


# ---------------------------------------------------------------- activation QDQ


def fp8_token_qdq(t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """fp8 e4m3 dynamic per-row quantize-dequantize, the scheme's exact math
    (``formats.fp8``): scale ``amax / 448`` in fp32, a zero scale replaced by
    ``eps`` (``finfo(fp32).eps``, a folded constant: an input here), divide,
    saturate, cast, multiply back, cast to the input dtype."""
    tf = t.float()
    scale = tf.abs().amax(dim=-1, keepdim=True) / 448.0
    scale = torch.where(scale == 0, eps, scale)
    q = (tf / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(t.dtype)


# ---------------------------------------------------------------- weight forms
# ``decode(t, c, dtype)`` -> the float weight [E, N, K] the GEMMs use, from the
# weight's tensors ``t`` (by field suffix) and constants ``c`` (by suffix).


def _float_decode(t, c, dtype):
    return t[""]


def _fp8_channel_decode(t, c, dtype):
    """``(codes.float() * scale).to(dtype)``: codes fp8 e4m3 [E, N, K], scale fp32 [E, N, 1]."""
    return (t[""].float() * t["_scale"]).to(dtype)


def _fp8_channel_formats_decode(t, c, dtype):
    """``formats.dequantize`` of a per-row fp8 ``QuantizedTensor`` (the scale
    repeated over K by ``expand_scale``)."""
    from ..formats.core import PerRow, expand_scale

    codes, scale = t[""], t["_scale"]
    rows, cols = codes.shape[-2:]
    return (codes.float() * expand_scale(scale, PerRow(), rows, cols)).to(dtype)


def _int4_shifts(packed):
    return torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)


def _int4_decode(t, c, dtype):
    """Symmetric int4, compressed-tensors packing (int32 [E, N, K/8], column
    ``8w + j`` in bits ``4j``), group scale [E, N, K/g], written in torch:
    shift, mask, ``- 8``, times the scale repeated over its group."""
    packed, scale = t[""], t["_scale"]
    E, N, words = packed.shape
    K = words * 8
    nib = (packed.unsqueeze(-1) >> _int4_shifts(packed)) & 0xF
    w = nib.reshape(E, N, K).float() - 8
    return (w * scale.repeat_interleave(K // scale.shape[-1], dim=-1)).to(dtype)


def _int4_formats_decode(t, c, dtype):
    """``formats.dequantize`` of a symmetric int4 ``QuantizedTensor`` without
    ``g_idx`` (plain nibble order: ``unpack_nibbles`` does not index): int4's
    graph with the scale cast to fp32 first, which only bf16 / fp16 scales
    show (in fp32 it is int4's graph and matches that pattern)."""
    from ..formats.core import PerGroup, expand_scale

    packed, scale = t[""], t["_scale"]
    rows, cols = packed.shape[-2], packed.shape[-1] * 8
    nib = (packed.unsqueeze(-1) >> _int4_shifts(packed)) & 0xF
    v = nib.reshape(*packed.shape[:-1], cols).float() - 8
    group = PerGroup(cols // scale.shape[-1])
    return (v * expand_scale(scale, group, rows, cols).float()).to(dtype)


def _mxfp4_decode(t, c, dtype):
    """MXFP4 in torch: uint8 [E, N, K/2] (even element in the low nibble),
    e2m1 lookup table ``c["_lut"]`` (a ``torch.tensor`` constant), e8m0 scale
    bytes [E, N, K/32] as ``exp2(byte - 127)``."""
    data, scale, lut = t[""], t["_scale"], c["_lut"]
    E, N, half = data.shape
    K = half * 2
    lo = lut[(data & 0x0F).long()]
    hi = lut[(data >> 4).long()]
    vals = torch.stack((lo, hi), dim=-1).reshape(E, N, K // 32, 32)
    s = torch.exp2(scale.float() - 127)
    return (vals * s.unsqueeze(-1)).reshape(E, N, K).to(dtype)


def _mxfp4_formats_decode(t, c, dtype):
    """``formats.dequantize`` of an MXFP4 ``QuantizedTensor``
    (``_e8m0.mx_dequantize``); its folded constants are inputs: the value
    table ``_lut``, the NaN of scale byte 255 ``_nan`` and ``pow2``'s
    ``ones_like`` ``_ones``."""
    data, scale = t[""], t["_scale"]
    cols = data.shape[-1] * 2
    codes = torch.stack((data & 0xF, data >> 4), dim=-1).flatten(-2)
    values = c["_lut"][(codes & 0xF).to(torch.int64)].unflatten(-1, (cols // 32, 32))
    b = scale.to(torch.int32)
    e = b - 127
    normal = (e + 127).clamp(min=1) << 23
    sub = c["_ones"] << (e + 149).clamp(min=0, max=22)
    s = torch.where(b == 255, c["_nan"], torch.where(e >= -126, normal, sub).view(torch.float32))
    return (values * s.unsqueeze(-1)).flatten(-2).to(dtype)


#: e2m1 code -> value (OCP MX); code 8 is -0.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclasses.dataclass(frozen=True)
class WeightForm:
    """How an expert weight reaches the GEMMs: ``fields`` are the suffixes of
    its tensor arguments (``""`` = the weight or its codes), ``consts`` the
    suffixes of folded constants the check verifies."""

    name: str
    fields: Tuple[str, ...]
    consts: Tuple[str, ...]
    decode: Callable
    #: format of the codes (None: a float weight)
    fmt: Optional[Format] = None

    def examples(self, shape, dtype) -> dict:
        """Example tensors (by suffix) for a weight of logical shape ``shape``."""
        E, N, K = shape
        if self.fmt is None:
            return {"": torch.empty(shape, dtype=dtype)}
        if self.fmt is Format.FP8_E4M3:
            out = {"": torch.empty(shape, dtype=torch.float8_e4m3fn), "_scale": torch.empty(E, N, 1)}
        elif self.fmt is Format.INT4:
            out = {
                "": torch.empty(E, N, K // 8, dtype=torch.int32),
                "_scale": torch.empty(E, N, K // 32, dtype=dtype),
            }
        else:  # mxfp4
            out = {
                "": torch.empty(E, N, K // 2, dtype=torch.uint8),
                "_scale": torch.empty(E, N, K // 32, dtype=torch.uint8),
                "_lut": torch.empty(16),
                "_nan": torch.empty(()),
                "_ones": torch.empty(E, N, K // 32, dtype=torch.int32),
            }
        return {k: v for k, v in out.items() if k in self.fields + self.consts}


WEIGHT_FORMS = {
    f.name: f
    for f in (
        WeightForm("float", ("",), (), _float_decode),
        WeightForm("fp8", ("", "_scale"), (), _fp8_channel_decode, Format.FP8_E4M3),
        WeightForm("fp8_formats", ("", "_scale"), (), _fp8_channel_formats_decode, Format.FP8_E4M3),
        WeightForm("int4", ("", "_scale"), (), _int4_decode, Format.INT4),
        WeightForm("int4_formats", ("", "_scale"), (), _int4_formats_decode, Format.INT4),
        WeightForm("mxfp4", ("", "_scale"), ("_lut",), _mxfp4_decode, Format.MXFP4),
        WeightForm("mxfp4_formats", ("", "_scale"), ("_lut", "_nan", "_ones"), _mxfp4_formats_decode, Format.MXFP4),
    )
}


# ---------------------------------------------------------------- dispatch forms
# ``body(a, w13, w2, act, qdq)``: ``a`` maps argument names to tensors (x,
# topk_weights, topk_ids, biases, dispatch constants, QDQ eps), ``w13``/``w2``
# are the decoded weights, ``qdq(t, eps_name)`` the activation QDQ (identity
# when the rewrite has none).


def aten_grouped_mm(a, w, offs):
    """What ``F.grouped_mm`` / ``torch._grouped_mm`` trace to."""
    return torch.ops.aten._grouped_mm(a, w, offs)


def transformers_grouped_mm(a, w, offs):
    """transformers' fallback grouped GEMM (an opaque custom op)."""
    return torch.ops.transformers.grouped_mm_fallback(a, w, offs)


def _grouped(mm, transposed: bool, bias: bool):
    """transformers 5.23 ``grouped_mm_experts_forward`` (sort by expert, gather,
    histc -> cumsum offsets, two grouped GEMMs, un-permute, sum over top-k)."""

    def body(a, w13, w2, act: ActivationForm, qdq):
        x, tw, ids = a["x"], a["topk_weights"], a["topk_ids"]
        k, M, H, E = tw.shape[1], x.shape[0], x.shape[-1], w13.shape[0]
        x = qdq(x, "x_eps")
        sample_weights = tw.reshape(-1)
        ids_g, perm = torch.sort(ids)
        xs = x[perm // k]
        sw = sample_weights[perm]
        hist_in = ids_g.float() if x.device.type in ("cpu", "mps") else ids_g.int()
        counts = torch.histc(hist_in, bins=E, min=0, max=E - 1)
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        h = mm(xs, w13 if transposed else w13.transpose(-2, -1), offs)
        if bias:
            h = h + a["w13_bias"][ids_g]
        h = qdq(act.fn(lambda: h), "a_eps")
        y = mm(h, w2 if transposed else w2.transpose(-2, -1), offs)
        if bias:
            y = y + a["w2_bias"][ids_g]
        y = y * sw.unsqueeze(-1)
        inv = torch.index_put(a["inv_empty"], [perm], a["inv_iota"])
        return y[inv].view(M, k, H).sum(dim=1)

    return body


def _batched(transposed: bool, bias: bool):
    """transformers 5.23 ``batched_mm_experts_forward`` (repeat tokens top-k
    times, gather each pair's expert weights, bmm). A bias is added in place
    to a view of the bmm output there: functionalized, later reads of that
    view are regenerated from ``unsqueeze(out + bias)``."""
    d = 1 if transposed else -1

    def linear(inp, w, b):
        if transposed:
            out = torch.bmm(inp.unsqueeze(1), w).squeeze(1)
        else:
            out = torch.bmm(w, inp.unsqueeze(-1)).squeeze(-1)
        if b is None:
            return lambda: out
        base = (out + b).unsqueeze(d)
        return lambda: base.squeeze(d)

    def body(a, w13, w2, act: ActivationForm, qdq):
        x, tw, ids = a["x"], a["topk_weights"], a["topk_ids"]
        k, M, H = tw.shape[1], x.shape[0], x.shape[-1]
        xs = qdq(x, "x_eps").repeat_interleave(k, dim=0)
        sample_weights = tw.reshape(-1)
        b13 = a["w13_bias"][ids] if bias else None
        h = qdq(act.fn(linear(xs, w13[ids], b13)), "a_eps")
        b2 = a["w2_bias"][ids] if bias else None
        y = linear(h, w2[ids], b2)()
        return (y * sample_weights.unsqueeze(-1)).view(M, k, H).sum(dim=1)

    return body


def _dense_einsum(a, w13, w2, act: ActivationForm, qdq):
    """Every token through every expert with einsum; a dense [T, E] routing
    matrix scattered into zeros (``fill``); einsum combine."""
    x, tw, ids = a["x"], a["topk_weights"], a["topk_ids"]
    h = torch.einsum("th,enh->etn", qdq(x, "x_eps"), w13)
    h = qdq(act.fn(lambda: h), "a_eps")
    y = torch.einsum("eti,ehi->eth", h, w2)
    combine = a["fill"].scatter(1, ids, tw)
    return torch.einsum("eth,te->th", y, combine.to(y.dtype))


def _dense_matmul(a, w13, w2, act: ActivationForm, qdq):
    """Every token through every expert with broadcast matmuls; a dense
    [T, E] routing matrix from one_hot; multiply-and-sum combine."""
    x, tw, ids = a["x"], a["topk_weights"], a["topk_ids"]
    h = qdq(x, "x_eps") @ w13.transpose(1, 2)
    h = qdq(act.fn(lambda: h), "a_eps")
    y = h @ w2.transpose(1, 2)
    combine = (F.one_hot(ids, w13.shape[0]).to(tw.dtype) * tw.unsqueeze(-1)).sum(1)
    return (y * combine.T.unsqueeze(-1).to(y.dtype)).sum(0)


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """How tokens reach the experts. ``flat_ids``: the pattern's ``topk_ids``
    is the flattened ``[M * k]`` ids (the model's ``reshape(-1)`` has another
    user under dynamic shapes); ``consts``: folded constants the check verifies."""

    name: str
    body: Callable
    flat_ids: bool
    transposed: bool = False
    bias: bool = False
    consts: Tuple[str, ...] = ()
    #: the output dtype is promote(x, topk_weights) (weighted in the weights'
    #: dtype) rather than x's (the dense forms cast the routing matrix)
    promotes: bool = True


def grouped(name, mm, transposed=False, bias=False) -> Dispatch:
    return Dispatch(name, _grouped(mm, transposed, bias), True, transposed, bias, ("inv_empty", "inv_iota"))


def batched(name, transposed=False, bias=False) -> Dispatch:
    return Dispatch(name, _batched(transposed, bias), True, transposed, bias)


DENSE_EINSUM = Dispatch("dense_einsum", _dense_einsum, False, consts=("fill",), promotes=False)
DENSE_MATMUL = Dispatch("dense_matmul", _dense_matmul, False, promotes=False)
