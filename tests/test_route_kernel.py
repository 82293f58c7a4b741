"""``kernels.route.route_triton`` (the Triton routing kernel) under the Triton
interpreter, against the reference ``routing.route``.

``TRITON_INTERPRET=1`` is set first thing, before anything imports the
kernel module (``route_triton`` imports it at its first launch), as in
``test_kernels_interpret``.

Ids must equal the reference's exactly. Weights: elementwise relative error
at most ``WEIGHT_RTOL``; measured here (triton 3.9 interpreter, torch 2.13
CPU) over every case of this file: at most 4.6e-7 (softmax_topk, E=64;
a few ulps: numpy's fp32 ``exp`` vs torch's, a division vs torch softmax's
multiply by the reciprocal, the order of the k-term sums); sigmoid / topk /
llama4 weights are mostly bit-equal.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import ast  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from torch_moe_quant import routing  # noqa: E402
from torch_moe_quant.kernels.route import (  # noqa: E402
    MAX_EXPERTS,
    PLANS,
    RouteTiles,
    check_route,
    kernel_is_interpreted,
    kernel_runs,
    route_tiles,
    route_triton,
    route_unchecked,
)
from torch_moe_quant.routing import RoutingMethod  # noqa: E402

#: 16 fp32 ulps (measured: 4.6e-7, module docstring)
WEIGHT_RTOL = 2e-6
METHODS = list(RoutingMethod)
DEEPSEEK = RoutingMethod.DEEPSEEK_V3


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _assert_matches(logits, top_k, method, **kw):
    w, ids = route_triton(logits, top_k, method, **kw)
    rw, rids = routing.route(logits, top_k, method, **kw)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == ids.shape == (logits.shape[0], top_k)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, rtol=WEIGHT_RTOL, atol=0.0, equal_nan=True)


def _assert_matches_unchecked(logits, top_k, method, monkeypatch, *route_args, **kw):
    """The kernel with the host value check skipped (compiling / capturing)
    against the reference with its check switched off the same way."""
    args = check_route(logits[:0], top_k, method, *route_args)  # the shape/arg checks, no values
    w, ids = route_unchecked(logits, args)
    monkeypatch.setattr(routing, "values_available", lambda *t: False)
    rw, rids = routing.route(logits, top_k, method, **kw)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, rtol=WEIGHT_RTOL, atol=0.0, equal_nan=True)
    return ids


def test_interpreter_is_used():
    route_triton(_randn(2, 4), 1, "topk")
    assert kernel_is_interpreted()


def test_kernel_calls_only_triton_builtins():
    """See ``test_kernels_interpret.test_kernels_call_only_triton_builtins``."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    from torch_moe_quant.kernels import _route_kernel

    with open(_route_kernel.__file__) as f:
        tree = ast.parse(f.read())
    used = {
        node.attr for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "tl"
    }
    assert {"load", "reduce"} <= used
    assert not sorted(n for n in used if isinstance(getattr(tl, n, None), JITFunction))


def test_every_method_has_a_plan():
    assert set(PLANS) == set(RoutingMethod)


# (M, E, k): E not a power of two, a tile with padded rows, top_k == E, M == 1
SHAPES = [(1, 8, 2), (7, 13, 4), (9, 64, 6), (3, 12, 12)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M%d_E%d_k%d" % s)
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.value)
def test_matches_reference(method, shape):
    M, E, k = shape
    kw = {}
    if method is DEEPSEEK:
        kw = dict(correction_bias=_randn(E, seed=1) * 0.1, routed_scaling_factor=2.5)
    _assert_matches(_randn(M, E), k, method, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.value)
def test_half_precision_logits(method, dtype):
    # coarse values: bf16 rows hold repeated logits, so ties are exercised too
    _assert_matches((_randn(9, 24, seed=2) * 3).to(dtype), 5, method)


@pytest.mark.parametrize(
    "M,E,k,groups,kept,bias_dtype",
    [
        (4, 256, 8, 8, 4, torch.float32),  # DeepSeek-V3's own shape
        (5, 30, 5, 5, 2, torch.float32),  # groups of 6: both axes padded
        (3, 24, 4, 3, 1, torch.bfloat16),
        (2, 16, 3, 16, 3, torch.float32),  # one expert per group
        (3, 24, 4, 4, 2, None),
    ],
)
def test_deepseek_v3_groups(M, E, k, groups, kept, bias_dtype):
    kw = dict(num_groups=groups, topk_groups=kept, routed_scaling_factor=2.5)
    if bias_dtype is not None:
        kw["correction_bias"] = (_randn(E, seed=3) * 0.5).to(bias_dtype)
    _assert_matches(_randn(M, E, seed=4), k, DEEPSEEK, **kw)


def test_deepseek_group_ties():
    # equal group scores and equal experts: the lower group / expert wins
    logits = torch.zeros(2, 16)
    logits[1, 12:] = 1.0  # the last group is best, the others tie
    _assert_matches(logits, 6, DEEPSEEK, num_groups=4, topk_groups=2)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.value)
def test_empty_batch(method):
    w, ids = route_triton(torch.randn(0, 12), 3, method)
    assert w.shape == ids.shape == (0, 3)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.value)
def test_forced_ties(method):
    # all-equal rows, and rows of a few repeated values (many equal scores)
    equal = torch.full((3, 10), 0.25)
    repeated = torch.randint(-2, 3, (6, 10), generator=torch.Generator().manual_seed(5)).float()
    signed_zero = torch.tensor([[0.0, -0.0, -1.0, 0.0, -0.0, 1.0, -0.0, 0.0, -2.0, 0.0]])
    for logits in (equal, repeated, signed_zero):
        _assert_matches(logits, 4, method)
    w, ids = route_triton(equal, 4, method)
    assert ids.tolist() == [[0, 1, 2, 3]] * 3


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf, as in torch
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.value)
def test_infinities(method, monkeypatch):
    """-inf logits beside finite ones are masked experts in eager mode too;
    +inf (a NaN weight) raises in eager (``routing``'s NaN / inf policy). With
    the host check skipped (compiling / capturing), the kernel computes what
    the reference computes with its check switched off the same way."""
    inf = float("inf")
    masked = torch.tensor([
        [-inf, 1.0, -inf, 0.5, -inf, 2.0],
        [-inf, -inf, -inf, -inf, -inf, 0.0],
    ])
    _assert_matches(masked, 3, method)
    logits = torch.cat([masked, torch.tensor([[3.0, inf, 1.0, inf, -inf, 0.0]])])
    with pytest.raises(ValueError, match=r"router_logits contains \+inf"):
        route_triton(logits, 3, method)
    with pytest.raises(ValueError, match=r"router_logits contains \+inf"):
        routing.route(logits, 3, method)
    _assert_matches_unchecked(logits, 3, method, monkeypatch)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.value)
def test_nan_sorts_first_when_the_check_is_skipped(method, monkeypatch):
    """The host NaN check is skipped while compiling or capturing a CUDA
    graph (``values_available`` is False); the kernel then places NaN scores
    first, lower index first, like ``torch.sort``. The reference is run with
    its check switched off the same way."""
    nan = float("nan")
    logits = torch.tensor([
        [0.5, nan, 2.0, nan, -1.0, 0.0, 1.0, 3.0],
        [0.5, 1.0, 2.0, -3.0, -1.0, 0.0, nan, 3.0],
        [0.5, 1.0, 2.0, -3.0, -1.0, 0.0, 4.0, 3.0],
    ])
    ids = _assert_matches_unchecked(logits, 3, method, monkeypatch)
    if method in (RoutingMethod.TOPK, RoutingMethod.LLAMA4, RoutingMethod.SIGMOID_TOPK):
        assert ids[0].tolist() == [1, 3, 7]


def test_nan_in_grouped_deepseek(monkeypatch):
    nan = float("nan")
    logits = _randn(2, 16, seed=6)
    logits[0, 13] = nan  # its group (the last) scores NaN: kept first
    _assert_matches_unchecked(logits, 4, DEEPSEEK, monkeypatch, None, 4, 2, num_groups=4, topk_groups=2)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.value)
def test_multi_token_tiles(method):
    """Programs of several tokens, the last one partly past M (large batches
    get them; small ones run a token per program)."""
    M, E, k = 11, 24, 5
    assert route_tiles(4096, E, k, 1).block_m > 1
    logits = _randn(M, E, seed=11)
    kw = dict(num_groups=4, topk_groups=2, correction_bias=_randn(E, seed=12) * 0.1) if method is DEEPSEEK else {}
    args = check_route(logits, k, method, kw.get("correction_bias"), kw.get("num_groups"), kw.get("topk_groups"))
    tiles = route_tiles(M, E, k, args.num_groups)
    tiles = RouteTiles(4, tiles.group_pad, tiles.per_group_pad, tiles.k_pad, tiles.num_warps)
    w, ids = route_unchecked(logits, args, kw.get("correction_bias"), 1.0, tiles)
    rw, rids = routing.route(logits, k, method, **kw)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw, rtol=WEIGHT_RTOL, atol=0.0)


def test_strided_logits():
    wide = _randn(6, 40, seed=7)
    _assert_matches(wide[:, 3:19], 4, "softmax_topk_renormalize")  # row stride 40
    _assert_matches(_randn(16, 5, seed=8).t(), 2, "sigmoid_topk")  # column stride != 1


def test_fp64_and_wide_inputs_run_the_reference():
    logits = _randn(3, 8, seed=9).double()
    assert not kernel_runs(logits)
    assert not kernel_runs(torch.zeros(1, MAX_EXPERTS + 1))
    w, ids = route_triton(logits, 2, "softmax_topk")
    rw, rids = routing.route(logits, 2, "softmax_topk")
    assert torch.equal(w, rw) and torch.equal(ids, rids)


def test_large_expert_count():
    # E = 512: one token per program, the whole row in registers
    assert route_tiles(3, 512, 8, 1).block_m >= 1
    _assert_matches(_randn(2, 512, seed=10), 8, "softmax_topk")


BAD = [
    ((torch.randn(4, 8), 9, "softmax_topk"), {}),
    ((torch.randn(4, 8), 0, "softmax_topk"), {}),
    ((torch.randn(4, 8), True, "softmax_topk"), {}),
    ((torch.randn(4, 8), 2, "nope"), {}),
    ((torch.randn(4, 8, 2), 2, "topk"), {}),
    (([[1.0, 2.0]], 1, "topk"), {}),
    ((torch.ones(4, 8, dtype=torch.int64), 2, "topk"), {}),
    ((torch.full((2, 8), float("nan")), 2, "topk"), {}),
    ((torch.randn(4, 8), 2, "softmax_topk"), dict(correction_bias=torch.zeros(8))),
    ((torch.randn(4, 8), 2, "llama4"), dict(num_groups=2)),
    ((torch.randn(4, 8), 2, "deepseek_v3"), dict(num_groups=3)),
    ((torch.randn(4, 8), 2, "deepseek_v3"), dict(num_groups=4, topk_groups=5)),
    ((torch.randn(4, 8), 3, "deepseek_v3"), dict(num_groups=4, topk_groups=1)),
    ((torch.randn(4, 8), 2, "deepseek_v3"), dict(correction_bias=torch.zeros(7))),
    ((torch.randn(4, 8), 2, "deepseek_v3"), dict(correction_bias=torch.full((8,), float("nan")))),
]


@pytest.mark.parametrize("args,kw", BAD, ids=range(len(BAD)))
def test_bad_input_raises_like_the_reference(args, kw):
    with pytest.raises((ValueError, TypeError)) as ref:
        routing.route(*args, **kw)
    with pytest.raises(ref.type) as got:
        route_triton(*args, **kw)
    assert str(got.value) == str(ref.value)
