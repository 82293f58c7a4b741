"""Routing rewrites: ordinary top-k router code -> ``torch.ops.moe_quant.route``.

Each rewrite is a ``register_replacement`` pair traced with ``fwd_only`` (plus
Inductor's view -> reshape spelling), so the search pattern is the post-grad
aten graph of plain torch code. The replacement returns exactly the dtypes
the original did: ``route``'s int32 ids are cast to the int64 ``aten.topk``
returns, weights are fp32 as they were, and a cast the model applies
afterwards (Qwen3's ``.to(router_logits.dtype)``, gpt-oss's bf16 softmax)
stays in the graph after the rewrite.

Patterns (counter name = ``RoutingMethod`` value). ``logits`` is 2-D
``[tokens, experts]``; every dim must be the last one, spelled -1 or 1; top_k
is any static int (a module attribute; a SymInt ``k`` is not matched).
``[cast]`` is ``prims.convert_element_type(x, fp32)``, there for bf16/fp16
inputs::

  softmax_topk              p = F.softmax(logits, dim=-1, dtype=torch.float)   # or logits.float().softmax(-1)
                            w, ids = torch.topk(p, k, dim=-1)         # OLMoE, Qwen2/3-MoE norm_topk_prob=False
      post-grad: [cast] amax sub exp sum.dim_IntList div topk getitem getitem

  softmax_topk_renormalize  ... w /= w.sum(dim=-1, keepdim=True)       # Mixtral, Qwen3-MoE
      post-grad: ... topk getitem sum.dim_IntList div.Tensor

  topk_softmax              v, ids = torch.topk(logits, k, dim=-1)
                            w = F.softmax(v, dim=1, dtype=v.dtype)    # gpt-oss; or v.float().softmax(-1)
      post-grad: topk getitem [cast] amax sub exp sum div   (Inductor computes a
                 bf16 softmax in fp32 and casts back: that cast stays outside)

  sigmoid_topk              w, ids = torch.topk(logits.float().sigmoid(), k)
      post-grad: [cast] sigmoid topk getitem getitem

  llama4                    v, ids = torch.topk(logits, k); w = torch.sigmoid(v.float())
      post-grad: topk getitem [cast] sigmoid
                 and transformers' Llama4Router, which returns dense scores:
                            s = torch.full_like(logits, -inf).scatter_(1, ids, v)
                            scores = torch.sigmoid(s.float())        # [tokens, experts]
      post-grad: topk getitem full scatter.src [cast] sigmoid
                 -> zeros(fp32).scatter(1, ids, route weights): sigmoid(-inf) is 0.

  deepseek_v3               transformers' DeepseekV3TopkRouter with norm_topk_prob=True
                            (sigmoid, + e_score_correction_bias, grouped top-2 sums,
                            top-k groups (sorted=False), masked_fill -inf, top-k
                            (sorted=False), gather, / (sum + 1e-20)); the
                            routed_scaling_factor multiply stays after the rewrite.
      post-grad: sigmoid add reshape topk getitem sum topk getitem scatter.value
                 unsqueeze expand clone reshape convert(bool) bitwise_not where
                 topk getitem gather sum add div
                 ``sorted=False`` leaves the order of the k experts unspecified;
                 ``route`` returns them sorted (same (id, weight) pairs).
                 With topk_group = 1 (GLM-4-MoE: n_group = topk_group = 1)
                 Inductor's joint-graph pass (``scatter_upon_const_tensor``)
                 has already replaced the scatter by a one-hot compare
                 (expand(idx) == iota, where(., 1, 0), cast); two more
                 patterns take that form (one group: no clone after expand).

``topk`` may be spelled ``torch.topk(x, k)``, ``x.topk(k)``, ``dim=-1``
(which traces to ``aten.topk(x, k)``: the default is dropped, like
``sorted=True``) or ``dim=1`` (``aten.topk(x, k, 1)``).

What must hold, checked by the pattern or its ``extra_check``:

* logits are 2-D and floating, every dim is the last one (a softmax over dim
  0, a top-k over dim 0 or a renormalization over another dim is left alone:
  in the last case the softmax -> top-k inside still becomes softmax_topk);
* top-k selects on what ``route`` selects on. Softmax/sigmoid-first methods
  must compute their scores in fp32 (``route`` always does; a bf16 sigmoid
  would round scores into new ties). Top-k-first methods take fp16/bf16/fp32
  logits (the fp32 upcast is exact and keeps the order; fp64 is refused) and
  must compute the softmax/sigmoid of the values in fp32;
* ``largest=False`` and ``sorted=False`` are other ``aten.topk`` calls and do
  not match (except in the DeepSeek-V3 pattern, which is written with them);
* an intermediate with a user outside the pattern is not rewritten: e.g. the
  softmax probabilities also returned for an auxiliary loss. Rewriting would
  be correct (the probabilities stay in the graph for that user) but computes
  the softmax twice, so we keep the pattern matcher's default. The logits may
  have any number of users (transformers routers return them). A training
  graph saves the intermediates for backward, so it is not rewritten either.

Ties. ``route`` orders by descending score and, among equal scores, picks the
lower expert index. ``torch.topk`` does not: its documentation says tied
indices are not guaranteed, and on CPU (torch 2.13) it often picks a higher
index (``topk(zeros(1, 4), 1)`` returns index 2; ``topk(zeros(1, 8), 3)``
returns 6, 5, 4). The rewrite is allowed because that choice is unspecified;
with distinct scores (router logits in practice) the ids are identical. A
router whose weight is all zeros (transformers initialises some routers with
``torch.zeros``) ties every expert: eager picks arbitrary experts, the
rewritten graph experts ``0..k-1``.

NaN. ``route``'s CPU kernel raises ``ValueError`` on NaN logits, while the
original code propagates NaN (and ``topk`` ranks NaN first): a compiled model
whose router produces NaN fails loudly after the rewrite.
"""

from __future__ import annotations

import inspect

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..routing import RoutingMethod
from ._matching import Rewrite, all_of, meta_val, nodes_of

aten = torch.ops.aten

# Ints the patterns leave free (top_k and every dim) are traced with *magic*
# values: ``register_replacement`` turns each int equal to a magic value into a
# KeywordArg, both in the pattern traced here and in the one it retraces with
# the matched values. So a magic value must equal no int that real router code
# puts in these graphs: dims are -4..-2 (real routers use -1 or 1, and top_k is
# positive; 0/1 are also the bools False/True, and aten.topk drops dim=-1 as
# its default), top_k is an absurd 1021 (sum_dim and scatter_dim share -2: no
# pattern has both). The example tensors are fake, rank 4 (so the dims are
# valid) and large enough for a top-1021 along any dim. DeepSeek-V3's sizes
# get primes in 19..31 that no router config uses.
_EXAMPLE_SHAPE = (1024, 1024, 1024, 1024)
_MAGIC = {"top_k": 1021, "softmax_dim": -4, "topk_dim": -3, "sum_dim": -2, "scatter_dim": -2}
_TOPK_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------- checks


def _logits_2d(match) -> bool:
    logits = meta_val(match.kwargs["logits"])
    top_k = match.kwargs["top_k"]
    return (
        isinstance(logits, torch.Tensor)
        and logits.dim() == 2
        and logits.is_floating_point()
        and isinstance(top_k, int)
        and top_k >= 1
    )


def _dims_last(match) -> bool:
    """Every ``*_dim`` the pattern bound is the last dim of a 2-D tensor."""
    return all(v in (-1, 1) for k, v in match.kwargs.items() if k.endswith("_dim"))


def _topk_input_fp32(match) -> bool:
    """The top-k selects on fp32 scores (softmax/sigmoid-first methods)."""
    return all(meta_val(n.args[0]).dtype == torch.float32 for n in nodes_of(match, aten.topk.default))


def _topk_input_routable(match) -> bool:
    """The top-k selects on logits that upcast to fp32 exactly."""
    return all(meta_val(n.args[0]).dtype in _TOPK_INPUT_DTYPES for n in nodes_of(match, aten.topk.default))


def _weights_fp32(match) -> bool:
    return meta_val(match.output_nodes()[0]).dtype == torch.float32


_check_scores_first = all_of(_logits_2d, _dims_last, _topk_input_fp32, _weights_fp32)
_check_topk_first = all_of(_logits_2d, _dims_last, _topk_input_routable, _weights_fp32)


# ---------------------------------------------------------------- search / replace


def _route(logits, top_k, method: RoutingMethod):
    weights, ids = torch.ops.moe_quant.route.default(logits, top_k, method.value)
    return weights, ids.to(torch.int64)


def _softmax_fp32(x, dim):
    return torch.softmax(x, dim, dtype=torch.float32)


def _softmax_topk(logits, top_k, softmax_dim):
    return torch.topk(_softmax_fp32(logits, softmax_dim), top_k)


def _softmax_topk_dim(logits, top_k, softmax_dim, topk_dim):
    return torch.topk(_softmax_fp32(logits, softmax_dim), top_k, topk_dim)


def _softmax_topk_replacement(logits, top_k, *dims):
    return _route(logits, top_k, RoutingMethod.SOFTMAX_TOPK)


def _renormalized(weights, sum_dim):
    return weights / weights.sum(sum_dim, keepdim=True)


def _softmax_topk_renormalize(logits, top_k, softmax_dim, sum_dim):
    weights, ids = _softmax_topk(logits, top_k, softmax_dim)
    return _renormalized(weights, sum_dim), ids


def _softmax_topk_renormalize_dim(logits, top_k, softmax_dim, topk_dim, sum_dim):
    weights, ids = _softmax_topk_dim(logits, top_k, softmax_dim, topk_dim)
    return _renormalized(weights, sum_dim), ids


def _softmax_topk_renormalize_replacement(logits, top_k, *dims):
    return _route(logits, top_k, RoutingMethod.SOFTMAX_TOPK_RENORMALIZE)


def _topk_softmax(logits, top_k, softmax_dim):
    values, ids = torch.topk(logits, top_k)
    return _softmax_fp32(values, softmax_dim), ids


def _topk_softmax_dim(logits, top_k, topk_dim, softmax_dim):
    values, ids = torch.topk(logits, top_k, topk_dim)
    return _softmax_fp32(values, softmax_dim), ids


def _topk_softmax_replacement(logits, top_k, *dims):
    return _route(logits, top_k, RoutingMethod.TOPK_SOFTMAX)


def _sigmoid_topk(logits, top_k):
    return torch.topk(logits.float().sigmoid(), top_k)


def _sigmoid_topk_dim(logits, top_k, topk_dim):
    return torch.topk(logits.float().sigmoid(), top_k, topk_dim)


def _sigmoid_topk_replacement(logits, top_k, *dims):
    return _route(logits, top_k, RoutingMethod.SIGMOID_TOPK)


def _llama4(logits, top_k):
    values, ids = torch.topk(logits, top_k)
    return values.float().sigmoid(), ids


def _llama4_dim(logits, top_k, topk_dim):
    values, ids = torch.topk(logits, top_k, topk_dim)
    return values.float().sigmoid(), ids


def _llama4_replacement(logits, top_k, *dims):
    return _route(logits, top_k, RoutingMethod.LLAMA4)


def _llama4_scores(logits, fill, top_k, scatter_dim):
    values, ids = torch.topk(logits, top_k)
    return fill.scatter(scatter_dim, ids, values).float().sigmoid()


def _llama4_scores_dim(logits, fill, top_k, topk_dim, scatter_dim):
    values, ids = torch.topk(logits, top_k, topk_dim)
    return fill.scatter(scatter_dim, ids, values).float().sigmoid()


def _llama4_scores_replacement(logits, fill, top_k, *dims):
    weights, ids = _route(logits, top_k, RoutingMethod.LLAMA4)
    return torch.zeros_like(fill, dtype=torch.float32).scatter(1, ids, weights)


def _is_constant(node, value) -> bool:
    """``node`` is ``full(size, value)`` or ``scalar_tensor(value)``."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.target is aten.full.default:
        return node.args[1] == value
    return node.target is aten.scalar_tensor.default and node.args[0] == value


def _fill_is_minus_inf(match) -> bool:
    """The scattered-into tensor is ``full(..., -inf)``: sigmoid maps it to
    exactly 0, which the replacement writes directly. (The fill is a pattern
    input rather than a traced ``full_like(logits)`` because its size list
    holds SymInt nodes under dynamic shapes, which the matcher cannot retrace.)"""
    return _is_constant(match.kwargs["fill"], float("-inf"))


def _deepseek_v3(logits, correction_bias, group_mask, minus_inf, top_k, num_groups, per_group, topk_groups):
    # DeepseekV3TopkRouter.forward (norm_topk_prob=True) without the scaling
    # multiply, which stays after the rewrite. The zeros group mask and the
    # masked_fill's -inf are inputs: their post-grad forms (full([tokens, G])
    # with SymInt sizes; a constant-folded full([], -inf)) cannot be retraced.
    scores = logits.sigmoid()
    choice = scores + correction_bias
    group_scores = choice.view(-1, num_groups, per_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False)[1]
    group_mask = group_mask.scatter(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, num_groups, per_group).reshape(-1, num_groups * per_group)
    choice = torch.where(~score_mask.bool(), minus_inf, choice)  # masked_fill(..., -inf)
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20), ids


def _deepseek_v3_one_group(logits, correction_bias, minus_inf, top_k, num_groups, per_group):
    # _deepseek_v3 with topk_group == 1 (GLM-4-MoE: n_group = topk_group = 1) as Inductor's joint-graph
    # pass leaves it before ours: a scatter of one index per row into a constant tensor becomes a
    # one-hot compare (``scatter_upon_const_tensor``: expand(idx) == iota, where(., 1, 0), cast)
    scores = logits.sigmoid()
    choice = scores + correction_bias
    group_scores = choice.view(-1, num_groups, per_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=1, dim=-1, sorted=False)[1]
    picked = group_idx.expand(group_scores.shape) == torch.arange(num_groups, device=logits.device).view(1, num_groups)
    group_mask = torch.where(picked, 1, 0).to(torch.float32)
    score_mask = group_mask.unsqueeze(-1).expand(-1, num_groups, per_group).reshape(-1, num_groups * per_group)
    choice = torch.where(~score_mask.bool(), minus_inf, choice)  # masked_fill(..., -inf)
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20), ids


def _deepseek_v3_single_group(logits, correction_bias, minus_inf, top_k, per_group):
    # _deepseek_v3_one_group with one group of all experts (GLM-4-MoE's n_group = 1): the score
    # mask's expand is then a view, traced without the clone
    return _deepseek_v3_one_group(logits, correction_bias, minus_inf, top_k, 1, per_group)


def _deepseek_v3_single_group_replacement(logits, correction_bias, minus_inf, top_k, per_group):
    return _deepseek_v3_replacement(logits, correction_bias, None, minus_inf, top_k, 1, per_group, 1)


def _deepseek_v3_one_group_replacement(logits, correction_bias, minus_inf, top_k, num_groups, per_group):
    return _deepseek_v3_replacement(logits, correction_bias, None, minus_inf, top_k, num_groups, per_group, 1)


def _deepseek_v3_one_group_ok(match) -> bool:
    """``_deepseek_v3_ok`` for one kept group (no group mask input)."""
    kw = match.kwargs
    logits, bias = (meta_val(kw[name]) for name in ("logits", "correction_bias"))
    experts = kw.get("num_groups", 1) * kw["per_group"]
    return (
        logits.dim() == 2
        and logits.dtype == torch.float32
        and bias.dim() == 1
        and bias.is_floating_point()
        and statically_known_true(logits.shape[1] == experts)
        and statically_known_true(bias.shape[0] == experts)
        and _is_constant(kw["minus_inf"], float("-inf"))
        and kw["top_k"] <= kw["per_group"]
    )


def _deepseek_v3_replacement(logits, correction_bias, group_mask, minus_inf, top_k, num_groups, per_group, topk_groups):
    weights, ids = torch.ops.moe_quant.route.default(
        logits, top_k, RoutingMethod.DEEPSEEK_V3.value, correction_bias, num_groups, topk_groups
    )
    return weights, ids.to(torch.int64)


def _deepseek_v3_ok(match) -> bool:
    """fp32 2-D logits, a 1-D bias over the experts, groups that tile the
    experts, a zero group mask and a -inf fill, and enough experts in the kept
    groups for top_k (``route`` raises otherwise; eager would pick -inf ones)."""
    kw = match.kwargs
    logits, bias, mask = (meta_val(kw[name]) for name in ("logits", "correction_bias", "group_mask"))
    experts = kw["num_groups"] * kw["per_group"]
    return (
        logits.dim() == 2
        and logits.dtype == torch.float32
        and bias.dim() == 1
        and bias.is_floating_point()
        and mask.dim() == 2
        and statically_known_true(logits.shape[1] == experts)
        and statically_known_true(bias.shape[0] == experts)
        and statically_known_true(mask.shape[1] == kw["num_groups"])
        and _is_constant(kw["group_mask"], 0)
        and _is_constant(kw["minus_inf"], float("-inf"))
        and kw["top_k"] <= kw["topk_groups"] * kw["per_group"]
    )


# ---------------------------------------------------------------- registry


def _rewrites(name, searches, replacement, check, example_dtypes, tensor_inputs=1):
    return tuple(
        Rewrite(
            name=name,
            search=search,
            replace=replacement,
            check=check,
            example_dtypes=example_dtypes,
            example_shapes=(_EXAMPLE_SHAPE,) * tensor_inputs,
            magic={k: v for k, v in _MAGIC.items() if k in inspect.signature(search).parameters},
        )
        for search in searches
    )


# Each rewrite is traced twice. From bf16 examples, the pattern starts with the
# cast to fp32 (of the logits, or of the top-k values) that the fp32 math needs;
# the source dtype is not part of the pattern, so it also matches fp16. From fp32
# examples it has no cast. bf16 goes first: it takes the logits' cast into
# ``route`` (which casts itself); where that cast has another user, the fp32
# pattern matches the rest and the cast stays.
_EXAMPLE_DTYPES = (torch.bfloat16, torch.float32)

REWRITES = (
    *_rewrites(
        RoutingMethod.SOFTMAX_TOPK_RENORMALIZE.value,
        (_softmax_topk_renormalize, _softmax_topk_renormalize_dim),
        _softmax_topk_renormalize_replacement,
        _check_scores_first,
        _EXAMPLE_DTYPES,
    ),
    *_rewrites(
        RoutingMethod.SOFTMAX_TOPK.value,
        (_softmax_topk, _softmax_topk_dim),
        _softmax_topk_replacement,
        _check_scores_first,
        _EXAMPLE_DTYPES,
    ),
    *_rewrites(
        RoutingMethod.SIGMOID_TOPK.value,
        (_sigmoid_topk, _sigmoid_topk_dim),
        _sigmoid_topk_replacement,
        _check_scores_first,
        _EXAMPLE_DTYPES,
    ),
    *_rewrites(
        RoutingMethod.TOPK_SOFTMAX.value,
        (_topk_softmax, _topk_softmax_dim),
        _topk_softmax_replacement,
        _check_topk_first,
        _EXAMPLE_DTYPES,
    ),
    *_rewrites(
        RoutingMethod.LLAMA4.value,
        (_llama4_scores, _llama4_scores_dim),
        _llama4_scores_replacement,
        all_of(_check_topk_first, _fill_is_minus_inf),
        _EXAMPLE_DTYPES,
        tensor_inputs=2,
    ),
    *_rewrites(
        RoutingMethod.LLAMA4.value,
        (_llama4, _llama4_dim),
        _llama4_replacement,
        _check_topk_first,
        _EXAMPLE_DTYPES,
    ),
    Rewrite(
        name=RoutingMethod.DEEPSEEK_V3.value,
        search=_deepseek_v3,
        replace=_deepseek_v3_replacement,
        check=_deepseek_v3_ok,
        example_dtypes=(torch.float32,),
        # logits, correction_bias, group_mask, minus_inf; the magic sizes are
        # primes no router config uses (see _MAGIC)
        example_shapes=((3, 23 * 29), (23 * 29,), (3, 23), ()),
        magic={"top_k": 31, "num_groups": 23, "per_group": 29, "topk_groups": 19},
    ),
    Rewrite(
        name=RoutingMethod.DEEPSEEK_V3.value,
        search=_deepseek_v3_one_group,
        replace=_deepseek_v3_one_group_replacement,
        check=_deepseek_v3_one_group_ok,
        example_dtypes=(torch.float32,),
        example_shapes=((3, 23 * 29), (23 * 29,), ()),
        magic={"top_k": 31, "num_groups": 23, "per_group": 29},
    ),
    Rewrite(
        name=RoutingMethod.DEEPSEEK_V3.value,
        search=_deepseek_v3_single_group,
        replace=_deepseek_v3_single_group_replacement,
        check=_deepseek_v3_one_group_ok,
        example_dtypes=(torch.float32,),
        example_shapes=((3, 37), (37,), ()),  # (top_k 31 must fit in the one group)
        magic={"top_k": 31, "per_group": 37},
    ),
)


def register(pass_dict) -> None:
    """Trace and register every routing rewrite into ``pass_dict``."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    with torch._guards.tracing(None), unset_fake_temporarily(), FakeTensorMode():
        for rewrite in REWRITES:
            rewrite.register(pass_dict)
