"""Expert-compute rewrites: ordinary MoE expert code -> ``torch.ops.moe_quant.experts_<scheme>``.

Each rewrite is a ``register_replacement`` pair traced with ``fwd_only``
(plus Inductor's early joint-graph patterns and view -> reshape, which every
post-grad graph has been through: ``trace_as_post_grad``), so the search
pattern is the ``post_grad_custom_pre_pass`` aten graph of plain torch code.
A rewrite is ``dispatch x activation x weight form [x activation QDQ]``
(``_expert_forms`` holds the pieces); its counter name is the dispatch name,
with the weight form (and ``fp8_qdq``) in brackets when the weights are
quantized: ``grouped_mm``, ``dense_einsum[mxfp4]``,
``batched_mm[fp8,fp8_qdq]``. The replacement calls the scheme's op with the
routing tensors, the *raw* expert tensors (codes and scales: no dequantize
is left in the graph) and returns the dtype and shape the original did
(``promote(x, topk_weights)`` for the transformers forms, whose top-k sum
runs in the routing weights' dtype; a model's final cast stays after it).

Notation: ``x [M, H]`` tokens (M symbolic under ``dynamic=True``), ``k``
top-k, ``E`` experts, ``I`` intermediate size; ``w13 [E, 2I, H]``,
``w2 [E, H, I]`` (gpt-oss stores them transposed: ``[E, H, 2I]``,
``[E, I, H]``); ``[cast]`` is ``prims.convert_element_type``, present for
bf16/fp16 math. Every int (k, E, I, H, split sizes, group sizes, histc
bins) is computed from shapes in the search function: the first match
ignores ints, the matcher's retrace with the matched tensors pins them.

Dispatch forms (transformers 5.23, ``transformers/integrations/moe.py``)::

  grouped_mm            grouped_mm_experts_forward, is_transposed=False, no bias
                        (Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3 with bf16 weights)
      post-grad: sort(ids_flat) getitem getitem div.Tensor_mode(perm, k, floor)
                 index(x) [cast fp32 (CPU/MPS) | int32 (CUDA)] histc(E, 0, E-1)
                 cumsum(int32) permute(w13) _grouped_mm <act> permute(w2)
                 _grouped_mm reshape(w, [-1]) index(perm) unsqueeze mul
                 index_put(empty, [perm], iota) index reshape([M, k, H]) sum(1)
  grouped_mm            (gpt-oss: is_transposed=True, bias, swigluoai) the same
                        without the permutes, + index(bias, [sorted ids]) add
                        after each GEMM
  grouped_mm_fallback   the same two forms with ``transformers::grouped_mm_fallback``
                        (what transformers calls under torch.compile for
                        non-bf16 weights: fp32, fp16) instead of ``aten._grouped_mm``;
                        registered when transformers is installed (``install()``
                        imports ``transformers.integrations.moe``, which defines it)
  batched_mm            batched_mm_experts_forward, is_transposed=False, no bias
      post-grad: unsqueeze expand clone reshape (x.repeat_interleave(k, 0))
                 index(w13, [ids]) unsqueeze bmm squeeze <act> index(w2, [ids])
                 unsqueeze bmm squeeze reshape(w, [-1]) unsqueeze mul
                 reshape([M, k, H]) sum(1)
  batched_mm            (gpt-oss) bmm(unsqueeze(x, 1), w13[ids]) squeeze(1) and the
                        in-place bias add as functionalized: add(bias[ids])
                        unsqueeze(1), each later read a new squeeze(1)
  dense_einsum          every token through every expert:
                            h = torch.einsum("th,enh->etn", x, w13); a = act(h)
                            y = torch.einsum("eti,ehi->eth", a, w2)
                            r = torch.zeros(M, E, dtype=w.dtype).scatter(1, ids, w)
                            out = torch.einsum("eth,te->th", y, r.to(y.dtype))
      post-grad: einsum's unsqueeze/permute/reshape/bmm chains, full(0) scatter.src
                 [cast] unsqueeze bmm permute reshape
  dense_matmul              h = x @ w13.transpose(1, 2); a = act(h); y = a @ w2.transpose(1, 2)
                            r = (F.one_hot(ids, E).to(w.dtype) * w.unsqueeze(-1)).sum(1)
                            out = (y * r.T.unsqueeze(-1).to(y.dtype)).sum(0)
      post-grad: expand expand bmm <act> expand expand bmm unsqueeze iota eq
                 [cast] [cast] unsqueeze mul sum(1) permute unsqueeze [cast] mul sum(0)
                 (one_hot's two _assert_async checks stay in the graph)

Activation forms (``<act>``; the op's ``activation``/``layout``)::

  silu       gate, up = h.chunk(2, -1); F.silu(gate) * up          split getitem getitem
                                                                    [cast] neg exp add div [cast] mul
  gelu       F.gelu(gate) * up                                      split, F.gelu's erf decomposition, mul
  gelu_tanh  F.gelu(gate, approximate="tanh") * up                  split, its tanh decomposition, mul
  swigluoai  gpt-oss _apply_gate, interleaved: h[..., ::2], h[..., 1::2], clamp(max=7),
             clamp(-7, 7), (up + 1) * gate * sigmoid(gate * 1.702)
                                                                    slice slice [cast] clamp_max
                                                                    clamp_min clamp_max [cast] add
                                                                    mul sigmoid mul mul
  (grouped_mm, grouped_mm_fallback and batched_mm take silu/gelu/gelu_tanh without
  bias and swigluoai with the gpt-oss layout; the dense forms take silu)

Weight forms (what produces ``w13``/``w2``, dequantized to x's dtype)::

  float          the parameter itself: experts_bf16 / experts_fp16 / experts_fp32
                 for bf16 / fp16 / fp32 weights
  fp8            (codes.float() * scale).to(dtype), codes fp8 e4m3 [E, N, K],
                 fp32 scale [E, N, 1]                       -> fp8_w8a16_channel
                 post-grad: [cast fp32] mul [cast]
  fp8_formats    formats.dequantize of that QuantizedTensor (scale repeated over K)
                 post-grad: [cast fp32] unsqueeze expand clone reshape mul [cast]
  int4           symmetric int4, compressed-tensors packing (int32 [E, N, K/8]),
                 group scale [E, N, K/g], in torch:
                     nib = (packed.unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int32)) & 0xF
                     w = nib.reshape(E, N, K).float() - 8
                     (w * scale.repeat_interleave(g, -1)).to(dtype)
                                                            -> int4_w4a16_g{32,64,128} | _channel
                 post-grad: unsqueeze iota __rshift__ bitwise_and reshape [cast] sub
                            unsqueeze expand clone reshape mul [cast]
  int4_formats   formats.dequantize (no zero point, no g_idx): int4's graph with the
                 scale cast to fp32 first (bf16 / fp16 only; in fp32 it is int4's)
  mxfp4          e2m1 lookup table (a torch.tensor constant in forward) x 2^(e8m0-127):
                     lo = lut[(data & 0x0F).long()]; hi = lut[(data >> 4).long()]
                     v = torch.stack((lo, hi), -1).reshape(E, N, K // 32, 32)
                     (v * torch.exp2(scale.float() - 127).unsqueeze(-1)).reshape(E, N, K).to(dtype)
                                                            -> mxfp4_w4a16
                 post-grad: bitwise_and [cast] index unsqueeze __rshift__ [cast] index
                            unsqueeze cat reshape [cast] sub exp2 unsqueeze mul reshape [cast]
  mxfp4_formats  formats.dequantize (value_table lookup; scale from the exponent
                 bits: pow2 with where/shift/view(fp32), NaN for byte 255)

Activation QDQ (``fp8_qdq``, with the fp8 weight forms -> fp8_w8a8_channel_token):
the tokens before the first GEMM and the activation output before the
second, each through the scheme's exact dynamic per-row fp8 math::

      s = x.float().abs().amax(-1, keepdim=True) / 448.0
      s = torch.where(s == 0, torch.finfo(torch.float32).eps, s)
      q = (x.float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
      (q.float() * s).to(x.dtype)
  post-grad: [cast] abs amax div eq where(full(eps)) div clamp_min clamp_max
             [cast fp8] [cast fp32] mul [cast]

What the pattern and its ``extra_check`` require:

* ``x`` 2-D bf16/fp16/fp32; ``topk_weights`` 2-D float ``[M, k]``; ids
  int32/int64, ``[M*k]`` (the flattened ids: the model's ``reshape(-1)``
  has a second user under dynamic shapes) or ``[M, k]`` (dense forms), M
  statically equal everywhere;
* weights, scales and biases with static sizes (parameters: the op
  specializes weight sizes anyway); float weights 3-D in x's dtype with
  w13 holding 2I rows for w2's I columns; biases 2-D float; the shapes
  chain (the retrace fails otherwise) and the op's fake impl accepts the
  arguments (shapes, dtypes, packed sizes, scale layouts, gated w13 rows);
* grouped: the un-permute buffer is ``[M*k]`` (its contents do not matter:
  ``perm`` is a permutation, every slot is written) and ``iota(M*k)`` is
  ``arange`` (start 0, step 1);
* dense_einsum: the routing matrix is scattered into ``full(0)`` ``[M, E]``
  and the ids are top-k ids (``aten.topk``/``moe_quant.route`` output, maybe
  reshaped or cast): scatter keeps one of duplicate ids, the op would sum them;
* quantized: int4 group sizes equal for both weights (32/64/128) or both
  per-row; the lookup table a constant equal to the e2m1 table, the folded
  NaN/ones/eps constants what formats/QDQ put there;
* an intermediate with a user outside the pattern is not rewritten (the
  matcher's default): e.g. the dequantized weights also returned, or a
  training graph (saved activations).

Most specific first: a float pattern takes its weights as inputs, so it
also matches a dequantized weight (or a QDQ'd input) when no quantized
pattern does; the quantized rewrites are registered before it, the QDQ ones
first. Such a fallback is exact w.r.t. the eager math (experts_bf16 on the
decoded bf16 weights) but keeps the dequantize in the graph.

Numerics (``tests/test_lowerings_experts.py`` has the measured bounds). The
op computes in fp32 and rounds once; eager bf16 code rounds the GEMM
outputs, the activation and the per-pair products to bf16: bf16 forms
differ from eager by 3e-3 .. 6e-3 (relative Frobenius), fp16 by ~7e-4,
quantized weights in fp32 math by ~2e-7 (the op decodes the same codes
exactly), fp8 activation QDQ in bf16 by 1e-2 .. 3e-2 (a bf16-rounded QDQ
input can cross an fp8 rounding boundary). Semantic corners, where the
rewritten graph differs from eager: the mxfp4 torch form maps scale byte
255 to 2^128 (inf) where the op gives NaN; a dense form multiplies the
outputs of unrouted experts by 0 (``inf * 0 = NaN`` in eager, not in the
op); expert ids outside ``[0, E)`` leave rows uninitialized in the grouped
GEMMs and fail the op's check (``ValueError``).

Not matched (and why):

* transformers' ``eager`` experts (per-expert loop over ``nonzero`` hits):
  data-dependent, fails under ``fullgraph=True`` and graph-breaks otherwise;
* gpt-oss under ``dynamic=True``: Dynamo passes the float ``alpha`` as a
  graph input (unspecialized float), so 1.702 cannot be checked. With the
  default ``dynamic=None`` both the first (static) compile and the
  automatic-dynamic recompile (symbolic M, alpha still a constant) match;
* batched_mm with top_k = 1 (``repeat_interleave(1)`` traces differently);
  ``aten._grouped_mm`` on non-bf16 weights (transformers uses its fallback);
  transformers' expert-parallel (sentinel masking) and post-expert-norm
  variants;
* spellings other than the ones above, e.g. a final ``view(M, k, -1)``
  (transformers writes the hidden size: the pattern's reshape sizes are
  literal), ids flattened twice (two ``reshape`` nodes), a QDQ whose 448
  is an argument or attribute (``dynamic=True`` makes it a graph input);
* dequantized weights in grouped_mm_fallback / dense_matmul / the gpt-oss
  forms, asymmetric int4, act-order, other formats; the dense forms with
  bf16 routing weights;
* dense_einsum on CUDA: Inductor's joint-graph ``bmm_to_mm`` (GPU only)
  turns its batch-1 bmm into mm first (not verified on a GPU here).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import operator
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch._inductor.pattern_matcher import Match, register_replacement
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import schemes
from ..formats.core import Format, PerGroup, PerRow
from ..schemes import ActivationSpec, Scheme, WeightSpec
from . import _expert_forms as forms
from ._matching import _counted, fwd_only_as_post_grad, meta_val, name_kwargs

aten = torch.ops.aten

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FP32_EPS = torch.finfo(torch.float32).eps
#: what the ``fp8_qdq`` forms do to both GEMM inputs: dynamic per-row fp8
_FP8_TOKEN = ActivationSpec(Format.FP8_E4M3, PerRow())

# Example sizes for the first trace (ints are ignored by the first match and
# pinned by the retrace, so only the structure matters): all distinct, no
# square weight, K multiples of 32 for the packed formats.
_E, _H, _I, _M, _K = 4, 64, 96, 5, 2


# ---------------------------------------------------------------- constants


def _node(x) -> Optional[torch.fx.Node]:
    return x if isinstance(x, torch.fx.Node) else None


def _full_value(node):
    """The fill value of ``full(size, v)`` / ``scalar_tensor(v)``, else None."""
    node = _node(node)
    if node is None or node.op != "call_function":
        return None
    if node.target is aten.full.default:
        return node.args[1]
    if node.target is aten.scalar_tensor.default:
        return node.args[0]
    return None


def _is_full(node, value) -> bool:
    v = _full_value(node)
    if v is None or not isinstance(v, (int, float)):
        return False
    if value != value:  # NaN
        return v != v
    return v == value


def _constant_values(node) -> Optional[List[float]]:
    """The values of a 1-D constant the model wrote as ``torch.tensor([...])``,
    else None. Dynamo gives it one of two forms: a graph constant (``get_attr``,
    maybe under ``lift_fresh_copy``), or a ``cat`` of one-element ``full``s.
    Placeholders (parameters, buffers, inputs) have no value at compile time."""
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    node = _node(node)
    if node is not None and node.op == "call_function" and node.target is aten.lift_fresh_copy.default:
        node = _node(node.args[0])
    if node is None:
        return None
    if node.op == "call_function" and node.target is aten.cat.default:
        parts = node.args[0]
        if len(node.args) > 1 and node.args[1] not in (0, -1):
            return None
        values = []
        for part in parts:
            v = _full_value(part)
            shape = getattr(meta_val(part), "shape", None)
            if v is None or shape is None or tuple(shape) != (1,):
                return None
            values.append(float(v))
        return values
    if node.op != "get_attr":
        return None
    try:
        value = operator.attrgetter(node.target)(node.graph.owning_module)
    except AttributeError:
        return None
    if not isinstance(value, torch.Tensor) or isinstance(value, FakeTensor) or value.dim() != 1:
        return None
    with unset_fake_temporarily():  # the extra check runs under the graph's fake mode
        return [float(v) for v in value.detach().cpu().double().tolist()]


def _is_constant_table(node, table: Sequence[float]) -> bool:
    """``node`` is a 1-D constant holding ``table`` (-0.0 == 0.0)."""
    values = _constant_values(node)
    return values is not None and values == [float(t) for t in table]


def _is_arange(node, length) -> bool:
    """``iota(length, start=0, step=1)``: torch.arange(length)."""
    node = _node(node)
    return (
        node is not None
        and node.target is torch.ops.prims.iota.default
        and node.kwargs.get("start") == 0
        and node.kwargs.get("step") == 1
        and statically_known_true(meta_val(node).shape[0] == length)
    )


_ID_PASSTHROUGH = {
    aten.reshape.default,
    aten.view.default,
    aten.clone.default,
    aten.alias.default,
    torch.ops.prims.convert_element_type.default,
}


def _ids_from_topk(node) -> bool:
    """``node`` is top-k ids (distinct per row): ``aten.topk``'s or
    ``moe_quant.route``'s second output, maybe reshaped or cast."""
    node = _node(node)
    while node is not None and node.op == "call_function" and node.target in _ID_PASSTHROUGH:
        node = _node(node.args[0])
    if node is None or node.target is not operator.getitem or node.args[1] != 1:
        return False
    src = _node(node.args[0])
    return src is not None and src.target in (aten.topk.default, torch.ops.moe_quant.route.default)


# ---------------------------------------------------------------- the rewrites


@dataclasses.dataclass(frozen=True)
class ExpertRewrite:
    """One search/replace pair: ``dispatch`` x ``act`` x ``weights``
    (+ activation QDQ), traced from ``dtype`` examples."""

    dispatch: forms.Dispatch
    act: forms.ActivationForm
    weights: forms.WeightForm
    qdq: bool
    dtype: torch.dtype
    #: dtype of the example routing weights (default: ``dtype``)
    routing_dtype: Optional[torch.dtype] = None

    @property
    def name(self) -> str:
        """The counter name."""
        if self.weights.fmt is None and not self.qdq:
            return self.dispatch.name
        tags = [self.weights.name] + (["fp8_qdq"] if self.qdq else [])
        return f"{self.dispatch.name}[{','.join(tags)}]"

    @property
    def argnames(self) -> Tuple[str, ...]:
        names = ["x", "topk_weights", "topk_ids"]
        names += [w + f for w in ("w13", "w2") for f in self.weights.fields]
        if self.dispatch.bias:
            names += ["w13_bias", "w2_bias"]
        names += list(self.dispatch.consts)
        names += [w + c for w in ("w13", "w2") for c in self.weights.consts]
        if self.qdq:
            names += ["x_eps", "a_eps"]
        return tuple(names)

    # -- search / replace, both over ``argnames``

    def _args(self, args) -> Dict[str, torch.Tensor]:
        return dict(zip(self.argnames, args))

    def search(self, *args):
        a = self._args(args)
        decoded = [
            self.weights.decode(
                {f: a[w + f] for f in self.weights.fields},
                {c: a[w + c] for c in self.weights.consts},
                a["x"].dtype,
            )
            for w in ("w13", "w2")
        ]
        if self.qdq:
            qdq = lambda t, eps: forms.fp8_token_qdq(t, a[eps])  # noqa: E731
        else:
            qdq = lambda t, eps: t  # noqa: E731
        return self.dispatch.body(a, *decoded, self.act, qdq)

    def _weight_specs(self, a) -> List[WeightSpec]:
        """What the matched weights are, most specific first (from shapes and dtypes)."""
        fmt = self.weights.fmt
        if fmt is None:
            return [WeightSpec(None, float_dtype=a["w13"].dtype)]
        if fmt is Format.FP8_E4M3:
            return [WeightSpec(fmt, PerRow())]
        if fmt is Format.MXFP4:
            return [WeightSpec(fmt, PerGroup(32))]
        # int4: the group size from the scale, the same for both weights; one scale column: per row
        g13, g2 = (a[w].shape[-1] * 8 // a[w + "_scale"].shape[-1] for w in ("w13", "w2"))
        specs = [WeightSpec(fmt, PerGroup(g13))] if g13 == g2 and g13 > 0 else []
        if all(a[w + "_scale"].shape[-1] == 1 for w in ("w13", "w2")):
            specs.append(WeightSpec(fmt, PerRow()))
        return specs

    def scheme(self, a) -> Optional[Scheme]:
        """The scheme whose op computes this match (``schemes.find``), or None."""
        activation = _FP8_TOKEN if self.qdq else None
        found = (schemes.find(w, activation) for w in self._weight_specs(a))
        return next((s for s in found if s is not None), None)

    def replace(self, *args):
        a = self._args(args)
        x, tw, ids = a["x"], a["topk_weights"], a["topk_ids"]
        if self.dispatch.flat_ids:
            ids = ids.reshape(-1, tw.shape[1])
        tensors: List[torch.Tensor] = []
        for w in ("w13", "w2"):
            if self.weights.fmt is None:
                t = a[w].transpose(1, 2) if self.dispatch.transposed else a[w]
                tensors.append(t)
            else:
                tensors += [a[w + f] for f in self.weights.fields]
        biases = (a["w13_bias"], a["w2_bias"]) if self.dispatch.bias else (None, None)
        op = getattr(torch.ops.moe_quant, f"experts_{self.scheme(a).name}").default
        out = op(x, tw, ids, *tensors, *biases, None, self.act.activation.value, self.act.layout.value, False)
        return out.to(torch.promote_types(x.dtype, tw.dtype) if self.dispatch.promotes else x.dtype)

    # -- the extra check

    def check(self, match: Match) -> bool:
        """The extra check (see the module docstring). The activation and
        the gate/up layout are the pattern's own (its structure, and the
        retrace pins swigluoai's 1.702 and 7.0); ``_op_accepts`` runs the
        op's fake impl, which also checks the activation against w13's rows."""
        kw = match.kwargs
        vals = {n: meta_val(kw[n]) for n in self.argnames}
        if any(not isinstance(v, torch.Tensor) for v in vals.values()):
            return False
        return (
            self._routing_ok(vals)
            and self._weights_ok(vals)
            and self._constants_ok(kw, vals)
            and (self.dispatch.name != "dense_einsum" or _ids_from_topk(kw["topk_ids"]))
            and self.scheme(vals) is not None
            and self._op_accepts(vals)
        )

    def _routing_ok(self, v) -> bool:
        x, tw, ids = v["x"], v["topk_weights"], v["topk_ids"]
        if not (x.dim() == 2 and x.dtype in _FLOAT_DTYPES and tw.dim() == 2 and tw.is_floating_point()):
            return False
        if ids.dtype not in (torch.int32, torch.int64) or not statically_known_true(tw.shape[0] == x.shape[0]):
            return False
        if self.dispatch.flat_ids:
            return ids.dim() == 1 and statically_known_true(ids.shape[0] == tw.shape[0] * tw.shape[1])
        return ids.dim() == 2 and all(statically_known_true(a == b) for a, b in zip(ids.shape, tw.shape))

    def _weights_ok(self, v) -> bool:
        """Float weights: 3-D in x's dtype (the GEMMs ran in it); quantized
        weights: the codes and scales the op takes (it validates the rest),
        decoded to x's dtype by the pattern."""
        w13, w2 = v["w13"], v["w2"]
        if w13.dim() != 3 or w2.dim() != 3:
            return False
        # static sizes (parameters; the op specializes weight sizes anyway)
        tensors = [v[n] for n in self.argnames if n.startswith(("w13", "w2"))]
        if not all(isinstance(d, int) for t in tensors for d in t.shape):
            return False
        if self.weights.fmt is None:
            if w13.dtype != v["x"].dtype or w2.dtype != v["x"].dtype:
                return False
            # gated: w13 holds 2I rows (gate and up) for w2's I columns
            if self.dispatch.transposed:  # [E, H, 2I], [E, I, H]
                w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
            E, H, inter = w2.shape
            if tuple(w13.shape) != (E, 2 * inter, H) or not statically_known_true(v["x"].shape[1] == H):
                return False
        if self.dispatch.bias:
            b13, b2 = v["w13_bias"], v["w2_bias"]
            if b13.dim() != 2 or b2.dim() != 2 or not (b13.is_floating_point() and b2.is_floating_point()):
                return False
        return True

    def _constants_ok(self, kw, v) -> bool:
        x, tw = v["x"], v["topk_weights"]
        consts = set(self.dispatch.consts)
        if "inv_iota" in consts:  # inv[perm] = arange(S) over an [S] buffer: perm's inverse
            pairs = tw.shape[0] * tw.shape[1]
            empty = v["inv_empty"]
            if not (empty.dim() == 1 and statically_known_true(empty.shape[0] == pairs)):
                return False
            if not _is_arange(kw["inv_iota"], pairs):
                return False
        if "fill" in consts:  # dense routing matrix scattered into zeros [T, E]
            fill = v["fill"]
            if not (
                _is_full(kw["fill"], 0)
                and fill.dim() == 2
                and statically_known_true(fill.shape[0] == x.shape[0])
                and statically_known_true(fill.shape[1] == v["w13"].shape[0])
            ):
                return False
        for w in ("w13", "w2"):
            if "_lut" in self.weights.consts and not _is_constant_table(kw[w + "_lut"], forms.E2M1_VALUES):
                return False
            if "_nan" in self.weights.consts and not _is_full(kw[w + "_nan"], float("nan")):
                return False
            if "_ones" in self.weights.consts:
                ones, scale = v[w + "_ones"], v[w + "_scale"]
                if not (_is_full(kw[w + "_ones"], 1) and tuple(ones.shape) == tuple(scale.shape)):
                    return False
        if self.qdq:
            return all(_is_full(kw[name], _FP32_EPS) for name in ("x_eps", "a_eps"))
        return True

    def _op_accepts(self, v) -> bool:
        """The replacement traces: the op's fake impl accepts the tensors
        (shapes, dtypes, packed sizes, scale layouts, activation vs w13 rows)."""
        args = [v[n] for n in self.argnames]
        fake_mode = torch._guards.detect_fake_mode(args)
        if fake_mode is None:
            return False
        try:
            with fake_mode:
                self.replace(*args)
        except (TypeError, ValueError, RuntimeError):
            return False
        return True

    # -- registration

    def examples(self) -> List[torch.Tensor]:
        dtype = self.dtype
        transposed = self.dispatch.transposed and self.weights.fmt is None
        w13_shape = (_E, _H, 2 * _I) if transposed else (_E, 2 * _I, _H)
        w2_shape = (_E, _I, _H) if transposed else (_E, _H, _I)
        w13 = self.weights.examples((_E, 2 * _I, _H), dtype)
        w2 = self.weights.examples((_E, _H, _I), dtype)
        if self.weights.fmt is None:
            w13, w2 = {"": torch.empty(w13_shape, dtype=dtype)}, {"": torch.empty(w2_shape, dtype=dtype)}
        ex = {
            "x": torch.empty(_M, _H, dtype=dtype),
            "topk_weights": torch.empty(_M, _K, dtype=self.routing_dtype or dtype),
            "topk_ids": torch.empty((_M * _K,) if self.dispatch.flat_ids else (_M, _K), dtype=torch.int64),
            "w13_bias": torch.empty(_E, 2 * _I, dtype=dtype),
            "w2_bias": torch.empty(_E, _H, dtype=dtype),
            "inv_empty": torch.empty(_M * _K, dtype=torch.int64),
            "inv_iota": torch.empty(_M * _K, dtype=torch.int64),
            "fill": torch.empty(_M, _E, dtype=self.routing_dtype or dtype),
            "x_eps": torch.empty(()),
            "a_eps": torch.empty(()),
        }
        ex.update({"w13" + k: t for k, t in w13.items()})
        ex.update({"w2" + k: t for k, t in w2.items()})
        return [ex[n] for n in self.argnames]

    def register(self, pass_dict) -> None:
        register_replacement(
            _with_signature(self.search, self.argnames),
            _with_signature(self.replace, self.argnames),
            self.examples(),
            trace_as_post_grad,
            pass_dict,
            extra_check=_counted(self.name, self.check),
            **name_kwargs(self.name),
        )


def trace_as_post_grad(fn, args, *, get_decomp_fn=None) -> torch.fx.GraphModule:
    """``fwd_only`` plus what every post-grad graph went through before our
    pass and ``fwd_only`` skips: Inductor's early joint-graph patterns
    (pointless permute/view pairs, e.g. the two permutes einsum wraps around
    an operand) and view -> reshape."""
    from torch._inductor.fx_passes.joint_graph import early_patterns

    kwargs = {} if get_decomp_fn is None else {"get_decomp_fn": get_decomp_fn}
    gm = fwd_only_as_post_grad(fn, args, **kwargs)
    if early_patterns.apply(gm.graph):
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm


def _with_signature(fn: Callable, names: Sequence[str]) -> Callable:
    """``fn(*args)`` presented with named positional parameters: the pattern
    matcher names the pattern's inputs after them."""

    def wrapper(*args):
        return fn(*args)

    wrapper.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )
    wrapper.__name__ = getattr(fn, "__name__", "expert_pattern")
    return wrapper


# ---------------------------------------------------------------- registry


def _transformers_fallback_available() -> bool:
    """transformers registers ``transformers::grouped_mm_fallback`` (its
    grouped GEMM for non-bf16 weights under torch.compile) when its MoE
    integration is imported; import it if transformers is installed."""
    if importlib.util.find_spec("transformers") is None:
        return False
    try:
        importlib.import_module("transformers.integrations.moe")
    except Exception:  # a broken transformers install: skip its form
        return False
    return hasattr(torch.ops, "transformers") and hasattr(torch.ops.transformers, "grouped_mm_fallback")


_GATED = ("silu", "gelu", "gelu_tanh")
_BF16, _FP32 = torch.bfloat16, torch.float32


def rewrites() -> Tuple[ExpertRewrite, ...]:
    """Every expert rewrite, in registration order."""
    A, W = forms.ACTIVATIONS, forms.WEIGHT_FORMS
    grouped_mm = forms.grouped("grouped_mm", forms.aten_grouped_mm)
    grouped_mm_oss = forms.grouped("grouped_mm", forms.aten_grouped_mm, transposed=True, bias=True)
    batched_mm = forms.batched("batched_mm")
    batched_mm_oss = forms.batched("batched_mm", transposed=True, bias=True)
    float_w = W["float"]
    out: List[ExpertRewrite] = []
    # Most specific first: the first rewrite whose pattern and check accept a
    # node wins, and a float pattern also matches a dequantized weight (a
    # node like any other) or a QDQ'd input.
    # (c) explicit weight dequantize, (d) + fp8 activation QDQ
    quantized = [("fp8", True), ("fp8_formats", True)]
    quantized += [(name, False) for name in ("fp8", "fp8_formats", "int4", "int4_formats", "mxfp4", "mxfp4_formats")]
    for name, qdq in quantized:
        out += [ExpertRewrite(grouped_mm, A["silu"], W[name], qdq, _BF16)]
        # int4_formats in fp32 is int4's graph (its scale cast is a no-op): registered once, as int4
        for dtype in (_BF16,) if name == "int4_formats" else (_FP32, _BF16):
            out += [ExpertRewrite(batched_mm, A["silu"], W[name], qdq, dtype)]
            out += [ExpertRewrite(forms.DENSE_EINSUM, A["silu"], W[name], qdq, dtype, _FP32)]
    # (a) transformers v5 experts implementations, float weights
    out += [ExpertRewrite(grouped_mm, A[a], float_w, False, _BF16) for a in _GATED]
    out += [ExpertRewrite(grouped_mm_oss, A["swigluoai"], float_w, False, _BF16)]
    if _transformers_fallback_available():
        fallback = forms.grouped("grouped_mm_fallback", forms.transformers_grouped_mm)
        fallback_oss = forms.grouped(
            "grouped_mm_fallback", forms.transformers_grouped_mm, transposed=True, bias=True
        )
        for dtype in (_FP32, _BF16):
            out += [ExpertRewrite(fallback, A[a], float_w, False, dtype) for a in _GATED]
            out += [ExpertRewrite(fallback_oss, A["swigluoai"], float_w, False, dtype)]
    for dtype in (_FP32, _BF16):
        out += [ExpertRewrite(batched_mm, A[a], float_w, False, dtype) for a in _GATED]
        out += [ExpertRewrite(batched_mm_oss, A["swigluoai"], float_w, False, dtype)]
    # (b) dense formulations (fp32 routing weights)
    for dense in (forms.DENSE_EINSUM, forms.DENSE_MATMUL):
        for dtype in (_FP32, _BF16):
            out += [ExpertRewrite(dense, A["silu"], float_w, False, dtype, _FP32)]
    return tuple(out)


def register(pass_dict) -> None:
    """Trace and register every expert rewrite into ``pass_dict``."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    all_rewrites = rewrites()  # may import transformers: not under the fake mode
    with torch._guards.tracing(None), unset_fake_temporarily(), FakeTensorMode():
        for rewrite in all_rewrites:
            rewrite.register(pass_dict)
