"""Triton kernel of ``kernels.route.route_triton`` (one launch per call).

Imported lazily by the launcher at the first launch, like ``_align_kernel``,
and for the same reason it calls Triton builtins only: reductions are
``tl.reduce`` with a local ``_max`` / ``_add``, never ``tl.max`` /
``tl.sum`` / ``tl.sigmoid`` (``@jit`` helpers of ``triton.language.standard``).

Program ``pid`` takes tokens ``[pid * BLOCK_M, (pid + 1) * BLOCK_M)`` and all
experts, held as a ``[BLOCK_M, G_PAD, P_PAD]`` tile: expert ``g * P + p`` of
``G`` groups of ``P`` (``G = 1, P = E`` unless DeepSeek-V3 groups them), both
padded to powers of two.

Ordering. Every selection is a maximum of an int64 *order key*: the fp32
score's bits mapped to an int32 that sorts like the float (``-0.0`` counted as
``+0.0``, every NaN above ``+inf``, as ``torch.sort`` places NaN) in the high
word and ``IDX_LIMIT - index`` in the low word. Keys are distinct within a
row, the largest key is the best score with the lowest index among equals,
and k rounds of (max, retire the winner) emit the k experts by descending
score then ascending index: ``routing.stable_topk``'s order. Padding and
retired entries hold ``SENTINEL``, below the key of ``-inf``. The combine
function is one ``tl.maximum``, which is also what keeps the interpreter
(whose ``tl.reduce`` calls the combine once per element) fast enough for CPU
tests.

Scores (``SCORE``, a ``RouteScore``) are computed in fp32 from logits loaded
in their own dtype; the weight formula (``WEIGHT``, a ``RouteWeight``) runs
on the k selected values; weights are multiplied by ``scale`` (exact for 1.0).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._enums import IDX_LIMIT, RouteScore, RouteWeight

_SOFTMAX: tl.constexpr = tl.constexpr(int(RouteScore.SOFTMAX))
_SIGMOID: tl.constexpr = tl.constexpr(int(RouteScore.SIGMOID))

_W_RENORMALIZED: tl.constexpr = tl.constexpr(int(RouteWeight.RENORMALIZED))
_W_SOFTMAX: tl.constexpr = tl.constexpr(int(RouteWeight.SOFTMAX))
_W_SIGMOID: tl.constexpr = tl.constexpr(int(RouteWeight.SIGMOID))
_W_UNBIASED_RENORMALIZED: tl.constexpr = tl.constexpr(int(RouteWeight.UNBIASED_RENORMALIZED))

_IDX_LIMIT: tl.constexpr = tl.constexpr(IDX_LIMIT)
#: below every real key (the key of -inf is -0x7F800001 << 32)
_SENTINEL: tl.constexpr = tl.constexpr(-0x7FFFFFFF * 2**32)
_NAN_KEY: tl.constexpr = tl.constexpr(0x7FFFFFFF)


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _row_max(x):
    """``[BLOCK_M, G, P] -> [BLOCK_M]``."""
    return tl.reduce(tl.reduce(x, 2, _max), 1, _max)


@triton.jit
def _row_sum(x):
    return tl.reduce(tl.reduce(x, 2, _add), 1, _add)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _order_key(x, idx, valid):
    """int64 key of fp32 ``x`` at expert/group ``idx`` (module docstring)."""
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with +0.0, as in torch.sort
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(x != x, _NAN_KEY, key)
    key64 = (key.to(tl.int64) << 32) | (idx ^ _IDX_LIMIT).to(tl.int64)  # IDX_LIMIT - idx
    return tl.where(valid, key64, _SENTINEL)


@triton.jit
def _key_value(key64):
    """Inverse of ``_order_key``: ``(fp32 value, int32 index)``."""
    key = (key64 >> 32).to(tl.int32)
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    idx = (key64 & _IDX_LIMIT).to(tl.int32) ^ _IDX_LIMIT
    return bits.to(tl.float32, bitcast=True), idx


@triton.jit
def _keep_best_groups(key, num_groups, topk_groups, G_PAD: tl.constexpr):
    """DeepSeek-V3 group stage on the order keys of the biased scores: group
    score = sum of its two best values; ``[BLOCK_M, G_PAD]`` mask of the
    ``topk_groups`` best groups (lower group index wins ties)."""
    first = tl.reduce(key, 2, _max)
    v1, _i1 = _key_value(first)
    second = tl.reduce(tl.where(key == first[:, :, None], _SENTINEL, key), 2, _max)
    v2, _i2 = _key_value(second)
    group_score = tl.where(second == _SENTINEL, v1, v1 + v2)  # one expert per group: v1
    groups = tl.arange(0, G_PAD)[None, :]
    group_key = _order_key(group_score, groups, groups < num_groups)
    kept = group_key < _SENTINEL  # all False, [BLOCK_M, G_PAD]
    for _r in range(topk_groups):
        best = tl.reduce(group_key, 1, _max)
        hit = group_key == best[:, None]
        kept = kept | hit
        group_key = tl.where(hit, _SENTINEL, group_key)
    return kept


@triton.jit
def route_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr,
    M, stride_m, num_groups, per_group, topk_groups, scale,
    TOP_K: tl.constexpr,
    SCORE: tl.constexpr,
    WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    G_PAD: tl.constexpr,
    P_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < M
    # rows past M recompute row M - 1 (finite, never stored)
    row_off = tl.minimum(rows, M - 1).to(tl.int64) * stride_m
    g3 = tl.arange(0, G_PAD)[None, :, None]
    p3 = tl.arange(0, P_PAD)[None, None, :]
    expert = g3 * per_group + p3  # [1, G_PAD, P_PAD]
    valid = (rows[:, None, None] >= 0) & (g3 < num_groups) & (p3 < per_group)
    x = tl.load(logits_ptr + row_off[:, None, None] + expert, mask=valid, other=float("-inf"))
    x = x.to(tl.float32)

    if SCORE == _SOFTMAX:
        e = tl.exp(x - _row_max(x)[:, None, None])
        score = e / _row_sum(tl.where(valid, e, 0.0))[:, None, None]
    elif SCORE == _SIGMOID:
        score = _sigmoid(x)
        if bias_ptr is not None:
            bias = tl.load(bias_ptr + expert, mask=(g3 < num_groups) & (p3 < per_group), other=0.0)
            score = score + bias.to(tl.float32)
    else:  # RouteScore.LOGIT
        score = x
    key = _order_key(score, expert, valid)
    if G_PAD > 1:
        kept = _keep_best_groups(key, num_groups, topk_groups, G_PAD)
        key = _order_key(tl.where(kept[:, :, None], score, float("-inf")), expert, valid)

    # ---- top k: k rounds of (max key, retire it)
    slots = tl.arange(0, K_PAD)[None, :]
    slot_ok = slots < TOP_K
    sel = tl.full((BLOCK_M, K_PAD), 0.0, tl.float32)
    sel_ids = tl.full((BLOCK_M, K_PAD), 0, tl.int32)
    for j in range(TOP_K):
        best = _row_max(key)
        value, idx = _key_value(best)
        sel = tl.where(slots == j, value[:, None], sel)
        sel_ids = tl.where(slots == j, idx[:, None], sel_ids)
        key = tl.where(key == best[:, None, None], _SENTINEL, key)

    # ---- weights of the selected experts
    if WEIGHT == _W_RENORMALIZED:
        w = sel / tl.reduce(tl.where(slot_ok, sel, 0.0), 1, _add)[:, None]
    elif WEIGHT == _W_SOFTMAX:
        top = tl.reduce(tl.where(slots == 0, sel, 0.0), 1, _add)  # the largest (or NaN)
        e = tl.exp(sel - top[:, None])
        w = e / tl.reduce(tl.where(slot_ok, e, 0.0), 1, _add)[:, None]
    elif WEIGHT == _W_SIGMOID:
        w = _sigmoid(sel)
    elif WEIGHT == _W_UNBIASED_RENORMALIZED:
        out_ok = rows_ok[:, None] & slot_ok
        x_sel = tl.load(logits_ptr + row_off[:, None] + sel_ids, mask=out_ok, other=0.0)
        s = _sigmoid(x_sel.to(tl.float32))
        w = s / (tl.reduce(tl.where(slot_ok, s, 0.0), 1, _add)[:, None] + 1e-20)
    else:  # RouteWeight.SCORE
        w = sel
    w = w * scale
    out = rows[:, None].to(tl.int64) * TOP_K + slots
    out_ok = rows_ok[:, None] & slot_ok
    tl.store(weights_ptr + out, w, mask=out_ok)
    tl.store(ids_ptr + out, sel_ids, mask=out_ok)
