"""Routing: every method against a plain per-token formula, exact ids."""

import pytest
import torch

import torch_moe_quant as tmq
from torch_moe_quant import RoutingMethod


def _logits(M=37, E=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, E, generator=g).to(dtype)


def _per_token(logits, k, score_fn, weight_fn):
    """Independent reference: python sort per token, lower index wins ties."""
    ids, weights = [], []
    for row in logits.float():
        scores = score_fn(row)
        order = sorted(range(len(row)), key=lambda e: (-scores[e].item(), e))[:k]
        ids.append(order)
        weights.append(weight_fn(row, scores, order))
    return torch.tensor(weights, dtype=torch.float32), torch.tensor(ids, dtype=torch.int32)


CASES = {
    RoutingMethod.SOFTMAX_TOPK: (lambda r: r.softmax(-1), lambda r, s, o: s[o].tolist()),
    RoutingMethod.TOPK_SOFTMAX: (lambda r: r, lambda r, s, o: r[o].softmax(-1).tolist()),
    RoutingMethod.SOFTMAX_TOPK_RENORMALIZE: (
        lambda r: r.softmax(-1),
        lambda r, s, o: (s[o] / s[o].sum()).tolist(),
    ),
    RoutingMethod.SIGMOID_TOPK: (lambda r: r.sigmoid(), lambda r, s, o: s[o].tolist()),
    RoutingMethod.LLAMA4: (lambda r: r, lambda r, s, o: r[o].sigmoid().tolist()),
    RoutingMethod.TOPK: (lambda r: r, lambda r, s, o: r[o].tolist()),
}


@pytest.mark.parametrize("method", list(CASES), ids=lambda m: m.value)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_methods_match_per_token_formula(method, dtype, k):
    logits = _logits(dtype=dtype)
    w, ids = tmq.route(logits, k, method)
    rw, rids = _per_token(logits, k, *CASES[method])
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == ids.shape == (logits.shape[0], k)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-7)


def test_method_by_string_name():
    logits = _logits()
    a = tmq.route(logits, 2, "softmax_topk_renormalize")
    b = tmq.route(logits, 2, RoutingMethod.SOFTMAX_TOPK_RENORMALIZE)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_topk_softmax_equals_softmax_topk_renormalize_ids():
    logits = _logits(M=64)
    w1, i1 = tmq.route(logits, 3, "topk_softmax")
    w2, i2 = tmq.route(logits, 3, "softmax_topk_renormalize")
    assert torch.equal(i1, i2)
    torch.testing.assert_close(w1, w2)


@pytest.mark.parametrize("method", list(RoutingMethod), ids=lambda m: m.value)
def test_ties_lower_index_wins(method):
    # every expert has the same logit: the chosen experts must be 0..k-1, in order
    logits = torch.zeros(5, 8)
    w, ids = tmq.route(logits, 3, method)
    assert torch.equal(ids, torch.arange(3, dtype=torch.int32).expand(5, 3))
    # a partial tie: experts 2 and 5 share the best score
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0, 0.5, 3.0, -1.0, 1.0]])
    _, ids = tmq.route(logits, 3, "softmax_topk")
    assert ids.tolist() == [[2, 5, 3]]


def _deepseek_loop(logits, k, bias, n_group, topk_group, factor):
    """DeepSeek-V3 noaux_tc written token by token."""
    M, E = logits.shape
    per = E // n_group
    W, I = [], []
    for row in logits.float():
        s = row.sigmoid()
        c = s + bias
        gscore = []
        for gi in range(n_group):
            vals = sorted(c[gi * per:(gi + 1) * per].tolist(), reverse=True)
            gscore.append(sum(vals[:2]))
        groups = sorted(range(n_group), key=lambda gi: (-gscore[gi], gi))[:topk_group]
        eligible = [e for e in range(E) if e // per in groups]
        chosen = sorted(eligible, key=lambda e: (-c[e].item(), e))[:k]
        w = s[chosen]
        W.append((w / (w.sum() + 1e-20) * factor).tolist())
        I.append(chosen)
    return torch.tensor(W), torch.tensor(I, dtype=torch.int32)


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2), (8, 3)])
def test_deepseek_v3_grouped(n_group, topk_group):
    logits = _logits(M=29, E=32, seed=3)
    bias = torch.randn(32, generator=torch.Generator().manual_seed(4)) * 0.1
    w, ids = tmq.route(
        logits, 4, "deepseek_v3", correction_bias=bias, num_groups=n_group,
        topk_groups=topk_group, routed_scaling_factor=2.5,
    )
    rw, rids = _deepseek_loop(logits, 4, bias, n_group, topk_group, 2.5)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-6)
    # the bias changes which experts are chosen but weights use unbiased scores
    torch.testing.assert_close(w.sum(-1), torch.full((29,), 2.5))


def test_deepseek_bias_steers_choice():
    logits = torch.zeros(1, 8)
    bias = torch.zeros(8)
    bias[6] = 1.0
    w, ids = tmq.route(logits, 1, "deepseek_v3", correction_bias=bias)
    assert ids.item() == 6 and w.item() == pytest.approx(1.0)


def test_empty_batch():
    w, ids = tmq.route(torch.randn(0, 8), 2, "softmax_topk")
    assert w.shape == ids.shape == (0, 2)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: tmq.route(torch.randn(4, 8), 9, "softmax_topk"), r"top_k must be an int in \[1, num_experts=8\]"),
        (lambda: tmq.route(torch.randn(4, 8), 0, "softmax_topk"), "top_k"),
        (lambda: tmq.route(torch.randn(4, 8), 2, "nope"), "method must be one of"),
        (lambda: tmq.route(torch.randn(4, 8, 2), 2), r"router_logits must be 2-D"),
        (lambda: tmq.route(torch.ones(4, 8, dtype=torch.int64), 2), "router_logits must be a float"),
        (lambda: tmq.route(torch.full((2, 8), float("nan")), 2), "NaN"),
        (lambda: tmq.route(torch.randn(4, 8), 2, correction_bias=torch.zeros(8)), "deepseek_v3"),
        (lambda: tmq.route(torch.randn(4, 8), 2, "deepseek_v3", num_groups=3), "num_groups"),
        (lambda: tmq.route(torch.randn(4, 8), 2, "deepseek_v3", num_groups=4, topk_groups=5), "topk_groups"),
        (lambda: tmq.route(torch.randn(4, 8), 3, "deepseek_v3", num_groups=4, topk_groups=1), "top_k=3 exceeds"),
        (lambda: tmq.route(torch.randn(4, 8), 2, "deepseek_v3", correction_bias=torch.zeros(7)), r"correction_bias must be a tensor of shape \(8,\)"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
