"""Routing rewrites of ``torch_moe_quant.lowerings`` (Inductor pattern matcher).

Every compile is ``fullgraph=True`` with the FX graph / AOT autograd caches
off (a cache hit would skip the pass and its counters). Router inputs are
random logits: distinct scores, so ids must match eager exactly (ties are
unspecified in ``torch.topk``; see ``test_ties_pick_the_lower_expert``).
"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from lowering_graphs import rewritten_graph
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import run_and_get_code

import torch_moe_quant  # noqa: F401  (registers torch.ops.moe_quant)
from torch_moe_quant import lowerings
from torch_moe_quant.lowerings.install import (
    CONFIG_KEY, CONFIG_TAKES_LISTS, MoeQuantPass, get_custom_graph_passes, pass_sources, source_hash,
)
from torch_moe_quant.routing import stable_topk

K = 2
ROUTE_CALL = "torch.ops.moe_quant.route.default"


def logits_of(dtype=torch.float32, tokens=13, experts=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, experts, generator=gen).to(dtype)


def rewrites():
    return dict(counters["moe_quant"])


def _tensors(x):
    return (x,) if isinstance(x, torch.Tensor) else tuple(x)


def assert_same(out, ref):
    """Same dtypes and shapes; ids exact, weights close."""
    out, ref = _tensors(out), _tensors(ref)
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape
        if r.is_floating_point():
            torch.testing.assert_close(o, r)
        else:
            assert torch.equal(o, r)


# ------------------------------------------------------------ router forms
# As transformers 5.23 writes them (logits = F.linear(hidden, weight)).


def olmoe(logits):  # OlmoeTopKRouter / Qwen2MoeTopKRouter, norm_topk_prob=False
    probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
    value, index = torch.topk(probs, K, dim=-1)
    return value.to(logits.dtype), index


def softmax_method(logits):
    return logits.float().softmax(-1).topk(K)


def qwen3(logits):  # Qwen3MoeTopKRouter, norm_topk_prob=True
    probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
    value, index = torch.topk(probs, K, dim=-1)
    value /= value.sum(dim=-1, keepdim=True)
    return value.to(logits.dtype), index


def mixtral(logits):  # MixtralTopKRouter
    probs = torch.nn.functional.softmax(logits.float(), dim=-1)
    value, index = torch.topk(probs, K, dim=-1, sorted=True)
    value /= value.sum(dim=-1, keepdim=True)
    return value, index


def gpt_oss(logits):  # GptOssTopKRouter
    value, index = torch.topk(logits, K, dim=-1)
    return torch.nn.functional.softmax(value, dim=1, dtype=value.dtype), index


def topk_then_float_softmax(logits):
    value, index = logits.topk(K)
    return value.float().softmax(-1), index


def sigmoid_topk(logits):
    return torch.topk(logits.float().sigmoid(), K, dim=1)


def llama4_router(logits):  # Llama4Router (top-1, dense scores)
    value, index = torch.topk(logits, 1, dim=1)
    scores = torch.full_like(logits, float("-inf")).scatter_(1, index, value)
    return torch.nn.functional.sigmoid(scores.float()).to(scores.dtype)


def llama4_values(logits):
    value, index = torch.topk(logits, K)
    return torch.sigmoid(value.float()), index


MATCHED = {
    olmoe: "softmax_topk",
    softmax_method: "softmax_topk",
    qwen3: "softmax_topk_renormalize",
    mixtral: "softmax_topk_renormalize",
    gpt_oss: "topk_softmax",
    topk_then_float_softmax: "topk_softmax",
    sigmoid_topk: "sigmoid_topk",
    llama4_router: "llama4",
    llama4_values: "llama4",
}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("router", list(MATCHED), ids=lambda f: f.__name__)
def test_router_is_rewritten(lowered, router, dtype, dynamic):
    compiled = torch.compile(router, fullgraph=True, dynamic=dynamic)
    logits = logits_of(dtype)
    out, (code,) = run_and_get_code(compiled, logits)
    assert rewrites() == {MATCHED[router]: 1}
    assert ROUTE_CALL in code
    assert_same(out, router(logits))
    if dynamic:  # same graph, other token count
        other = logits_of(dtype, tokens=5, seed=1)
        assert_same(compiled(other), router(other))
        assert rewrites() == {MATCHED[router]: 1}


GROUPS, KEPT_GROUPS, DS_TOP_K = 4, 2, 4  # over logits_of(experts=16)


def _deepseek_v3(logits, bias, group_top, normalize):  # DeepseekV3TopkRouter
    scores = logits.sigmoid()
    scores_for_choice = scores + bias
    group_scores = scores_for_choice.view(-1, GROUPS, 16 // GROUPS).topk(group_top, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=KEPT_GROUPS, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, GROUPS, 16 // GROUPS).reshape(-1, 16)
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
    topk_indices = torch.topk(scores_for_choice, k=DS_TOP_K, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    if normalize:
        topk_weights /= topk_weights.sum(dim=-1, keepdim=True) + 1e-20
    return topk_weights * 2.5, topk_indices


# Literal ints at the call: under dynamic=True an int argument or closure
# variable becomes a SymInt, and a symbolic top-k size is never rewritten.
def deepseek_v3(logits, bias):
    return _deepseek_v3(logits, bias, 2, True)


def deepseek_v3_group_top3(logits, bias):
    return _deepseek_v3(logits, bias, 3, True)


def deepseek_v3_unnormalized(logits, bias):
    return _deepseek_v3(logits, bias, 2, False)


def by_expert(weights, ids):
    """(weights, ids) with each row ordered by expert id: top-k with
    sorted=False leaves the order of the k experts unspecified."""
    ids, order = ids.sort(dim=-1)
    return weights.gather(1, order), ids


def deepseek_inputs(tokens=13, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return logits_of(tokens=tokens, experts=16, seed=seed), torch.rand(16, generator=gen) * 0.1


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_deepseek_v3_is_rewritten(lowered, dynamic):
    compiled = torch.compile(deepseek_v3, fullgraph=True, dynamic=dynamic)
    args = deepseek_inputs()
    out, (code,) = run_and_get_code(compiled, *args)
    assert rewrites() == {"deepseek_v3": 1}
    assert ROUTE_CALL in code
    assert_same(by_expert(*out), by_expert(*deepseek_v3(*args)))
    other = deepseek_inputs(tokens=5, seed=1)
    assert_same(by_expert(*compiled(*other)), by_expert(*deepseek_v3(*other)))


@pytest.mark.parametrize("router", [deepseek_v3_group_top3, deepseek_v3_unnormalized], ids=lambda f: f.__name__)
def test_deepseek_v3_near_miss(lowered, router):
    args = deepseek_inputs()
    out = torch.compile(router, fullgraph=True)(*args)
    assert rewrites() == {}
    assert_same(by_expert(*out), by_expert(*router(*args)))


def _one_kept_group(logits, bias, groups, normalize):  # DeepseekV3TopkRouter / Glm4MoeTopkRouter, topk_group = 1
    scores = logits.sigmoid()
    choice = scores + bias
    group_scores = choice.view(-1, groups, 16 // groups).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=1, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, groups, 16 // groups).reshape(-1, 16)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    ids = torch.topk(choice, k=DS_TOP_K, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if normalize:
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
    return weights, ids


def one_kept_of_4(logits, bias):
    return _one_kept_group(logits, bias, 4, True)


def one_group(logits, bias):
    return _one_kept_group(logits, bias, 1, True)


def one_kept_of_4_unnormalized(logits, bias):
    return _one_kept_group(logits, bias, 4, False)


def one_group_unnormalized(logits, bias):
    return _one_kept_group(logits, bias, 1, False)


@pytest.mark.parametrize("router, rewritten", [
    (one_kept_of_4, True), (one_group, True), (one_kept_of_4_unnormalized, False), (one_group_unnormalized, False),
], ids=lambda x: getattr(x, "__name__", str(x)))
def test_deepseek_v3_one_kept_group(lowered, router, rewritten):
    """topk_group = 1 (GLM-4-MoE: one group of all experts): Inductor's joint-graph
    pass has turned the group-mask scatter into a one-hot compare before ours runs;
    the one-group patterns take that form (and leave the unnormalized router alone)."""
    args = deepseek_inputs()
    out, (code,) = run_and_get_code(torch.compile(router, fullgraph=True, dynamic=True), *args)
    assert rewrites() == ({"deepseek_v3": 1} if rewritten else {})
    assert (ROUTE_CALL in code) == rewritten
    assert_same(by_expert(*out), by_expert(*router(*args)))


# ------------------------------------------------------------ goldens


def test_golden_softmax_topk(lowered):
    assert_expected_inline(
        rewritten_graph(olmoe, logits_of()),
        """\
route_default = torch.ops.moe_quant.route.default(arg0_1, 2, 'softmax_topk')
getitem_2 = route_default[0]
getitem_3 = route_default[1]
convert_element_type_default = torch.ops.prims.convert_element_type.default(getitem_3, torch.int64)
return (getitem_2, convert_element_type_default)""",
    )


def test_golden_softmax_topk_renormalize_bf16(lowered):
    # the cast to fp32 goes into route; the model's cast back to bf16 stays
    assert_expected_inline(
        rewritten_graph(qwen3, logits_of(torch.bfloat16)),
        """\
route_default = torch.ops.moe_quant.route.default(arg0_1, 2, 'softmax_topk_renormalize')
getitem_2 = route_default[0]
getitem_3 = route_default[1]
convert_element_type_default = torch.ops.prims.convert_element_type.default(getitem_3, torch.int64)
convert_element_type_1 = torch.ops.prims.convert_element_type.default(getitem_2, torch.bfloat16)
return (convert_element_type_1, convert_element_type_default)""",
    )


def test_golden_softmax_topk_renormalize(lowered):
    assert_expected_inline(
        rewritten_graph(mixtral, logits_of()),
        """\
route_default = torch.ops.moe_quant.route.default(arg0_1, 2, 'softmax_topk_renormalize')
getitem_2 = route_default[0]
getitem_3 = route_default[1]
convert_element_type_default = torch.ops.prims.convert_element_type.default(getitem_3, torch.int64)
return (getitem_2, convert_element_type_default)""",
    )


def test_golden_topk_softmax_bf16(lowered):
    assert_expected_inline(
        rewritten_graph(gpt_oss, logits_of(torch.bfloat16)),
        """\
route_default = torch.ops.moe_quant.route.default(arg0_1, 2, 'topk_softmax')
getitem_2 = route_default[0]
getitem_3 = route_default[1]
convert_element_type_default = torch.ops.prims.convert_element_type.default(getitem_3, torch.int64)
convert_element_type_1 = torch.ops.prims.convert_element_type.default(getitem_2, torch.bfloat16)
return (convert_element_type_1, convert_element_type_default)""",
    )


def test_golden_sigmoid_topk(lowered):
    assert_expected_inline(
        rewritten_graph(sigmoid_topk, logits_of()),
        """\
route_default = torch.ops.moe_quant.route.default(arg0_1, 2, 'sigmoid_topk')
getitem_2 = route_default[0]
getitem_3 = route_default[1]
convert_element_type_default = torch.ops.prims.convert_element_type.default(getitem_3, torch.int64)
return (getitem_2, convert_element_type_default)""",
    )


def test_golden_llama4_router(lowered):
    assert_expected_inline(
        rewritten_graph(llama4_router, logits_of()),
        """\
route_default = torch.ops.moe_quant.route.default(arg0_1, 1, 'llama4')
getitem_2 = route_default[0]
getitem_3 = route_default[1]
convert_element_type_default = torch.ops.prims.convert_element_type.default(getitem_3, torch.int64)
full_default_1 = torch.ops.aten.full.default([13, 8], 0, dtype = torch.float32, layout = torch.strided, device = device(type='cpu'), pin_memory = False)
scatter_src = torch.ops.aten.scatter.src(full_default_1, 1, convert_element_type_default, getitem_2)
return (scatter_src,)""",
    )


def test_golden_llama4_values(lowered):
    assert_expected_inline(
        rewritten_graph(llama4_values, logits_of()),
        """\
route_default = torch.ops.moe_quant.route.default(arg0_1, 2, 'llama4')
getitem_2 = route_default[0]
getitem_3 = route_default[1]
convert_element_type_default = torch.ops.prims.convert_element_type.default(getitem_3, torch.int64)
return (getitem_2, convert_element_type_default)""",
    )


def test_golden_deepseek_v3(lowered):
    # the routed_scaling_factor multiply stays; the dead group-mask and -inf
    # constants are removed
    assert_expected_inline(
        rewritten_graph(deepseek_v3, *deepseek_inputs()),
        """\
route_default = torch.ops.moe_quant.route.default(arg0_1, 4, 'deepseek_v3', arg1_1, 4, 2)
getitem_6 = route_default[0]
getitem_7 = route_default[1]
convert_element_type_default = torch.ops.prims.convert_element_type.default(getitem_7, torch.int64)
mul = torch.ops.aten.mul.Tensor(getitem_6, 2.5)
return (mul, convert_element_type_default)""",
    )


# ------------------------------------------------------------ near misses


def topk_without_softmax(logits):
    value, index = logits.topk(K)
    return value / value.sum(-1, keepdim=True), index


def softmax_over_dim0(logits):
    return torch.topk(F.softmax(logits, dim=0, dtype=torch.float), K)


def topk_over_dim0(logits):
    return torch.topk(F.softmax(logits, dim=-1, dtype=torch.float), K, dim=0)


def probs_also_returned(logits):  # e.g. kept for an auxiliary loss
    probs = F.softmax(logits, dim=-1, dtype=torch.float)
    value, index = torch.topk(probs, K)
    return value, index, probs


def smallest_k(logits):
    return torch.topk(F.softmax(logits, dim=-1, dtype=torch.float), K, largest=False)


def unsorted_topk(logits):
    return torch.topk(F.softmax(logits, dim=-1, dtype=torch.float), K, sorted=False)


def bf16_sigmoid(logits):  # scores rounded to bf16 before the top-k
    return logits.sigmoid().topk(K)


def softmax_over_values_dim0(logits):
    value, index = logits.topk(K)
    return value.float().softmax(0), index


def llama4_zero_fill(logits):  # sigmoid(0) = 0.5, not 0
    value, index = torch.topk(logits, 1, dim=1)
    return torch.zeros_like(logits).scatter_(1, index, value).float().sigmoid()


def plain_softmax_topk(logits):  # in the logits' dtype: fp64 here, route computes in fp32
    return torch.topk(logits.softmax(-1), K)


def batched_logits(logits):  # [batch, tokens, experts]: route takes 2-D logits
    return torch.topk(F.softmax(logits.view(1, *logits.shape), dim=-1, dtype=torch.float), K)


NEAR_MISSES = [
    (topk_without_softmax, torch.float32),
    (softmax_over_dim0, torch.float32),
    (topk_over_dim0, torch.float32),
    (probs_also_returned, torch.float32),
    (smallest_k, torch.float32),
    (unsorted_topk, torch.float32),
    (bf16_sigmoid, torch.bfloat16),
    (softmax_over_values_dim0, torch.float32),
    (llama4_zero_fill, torch.float32),
    (batched_logits, torch.float32),
    (plain_softmax_topk, torch.float64),
    (topk_then_float_softmax, torch.float64),  # fp64 top-k: fp32 could tie
]


@pytest.mark.parametrize(
    "fn,dtype", NEAR_MISSES, ids=[f"{f.__name__}-{str(d)[6:]}" for f, d in NEAR_MISSES]
)
def test_near_miss_is_not_rewritten(lowered, fn, dtype):
    logits = logits_of(dtype)
    out, (code,) = run_and_get_code(torch.compile(fn, fullgraph=True), logits)
    assert rewrites() == {}
    assert "moe_quant" not in code
    assert_same(out, fn(logits))


def renormalize_over_dim0(logits):
    probs = F.softmax(logits, dim=-1, dtype=torch.float)
    value, index = torch.topk(probs, K)
    return value / value.sum(0, keepdim=True), index


def test_renormalization_over_other_dim_keeps_the_division(lowered):
    # the softmax -> top-k inside is still a softmax_topk route; the division
    # over dim 0 stays as written
    logits = logits_of()
    out = torch.compile(renormalize_over_dim0, fullgraph=True)(logits)
    assert rewrites() == {"softmax_topk": 1}
    assert_same(out, renormalize_over_dim0(logits))


def test_fp64_logits_cast_to_fp32_before_softmax_are_rewritten(lowered):
    # softmax(logits.float()): route casts the same way
    logits = logits_of(torch.float64)
    out = torch.compile(softmax_method, fullgraph=True)(logits)
    assert rewrites() == {"softmax_topk": 1}
    assert_same(out, softmax_method(logits))


def test_training_graph_is_not_rewritten(lowered):
    # the forward graph saves the probabilities for backward: an extra user
    logits = logits_of().requires_grad_()
    value, index = torch.compile(qwen3, fullgraph=True)(logits)
    assert rewrites() == {}
    (grad,) = torch.autograd.grad(value.sum(), logits)
    ref_value, ref_index = qwen3(logits)
    (ref_grad,) = torch.autograd.grad(ref_value.sum(), logits)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(grad, ref_grad)


def test_ties_pick_the_lower_expert(lowered):
    # torch.topk leaves tied indices unspecified; the rewritten graph follows
    # route: descending score, lower expert index first
    logits = torch.zeros(4, 8)
    logits[:, 5] = 1.0
    _, ids = torch.compile(softmax_method, fullgraph=True)(logits)
    assert rewrites() == {"softmax_topk": 1}
    assert ids.tolist() == [[5, 0]] * 4
    assert torch.equal(ids, stable_topk(logits, K)[1])


# ------------------------------------------------------------ transformers routers


def _hf_routers():
    pytest.importorskip("transformers")
    from transformers import (
        DeepseekV3Config,
        Glm4MoeConfig,
        GptOssConfig,
        Llama4TextConfig,
        MixtralConfig,
        OlmoeConfig,
        Qwen3MoeConfig,
    )
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
    from transformers.models.llama4.modeling_llama4 import Llama4Router
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    sizes = dict(hidden_size=16, num_experts_per_tok=K)
    return {
        "qwen3_moe": (Qwen3MoeTopKRouter(Qwen3MoeConfig(num_experts=8, norm_topk_prob=True, **sizes)), "softmax_topk_renormalize"),
        "olmoe": (OlmoeTopKRouter(OlmoeConfig(num_experts=8, norm_topk_prob=False, **sizes)), "softmax_topk"),
        "mixtral": (MixtralTopKRouter(MixtralConfig(num_local_experts=8, **sizes)), "softmax_topk_renormalize"),
        "gpt_oss": (GptOssTopKRouter(GptOssConfig(num_local_experts=8, **sizes)), "topk_softmax"),
        "llama4": (Llama4Router(Llama4TextConfig(num_local_experts=8, hidden_size=16, num_experts_per_tok=1)), "llama4"),
        "deepseek_v3": (
            DeepseekV3TopkRouter(
                DeepseekV3Config(
                    n_routed_experts=16, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, **sizes
                )
            ),
            "deepseek_v3",
        ),
        # one kept group: Inductor turns the group-mask scatter into a one-hot compare before our pass
        "deepseek_v3_topk_group_1": (
            DeepseekV3TopkRouter(
                DeepseekV3Config(
                    n_routed_experts=16, n_group=4, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, **sizes
                )
            ),
            "deepseek_v3",
        ),
        # GLM-4-MoE's configuration: one group of all experts
        "glm4_moe": (
            Glm4MoeTopkRouter(
                Glm4MoeConfig(n_routed_experts=16, n_group=1, topk_group=1, norm_topk_prob=True, **sizes)
            ),
            "deepseek_v3",
        ),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_transformers_routers_are_rewritten(lowered, dtype):
    gen = torch.Generator().manual_seed(0)
    for name, (router, counter) in _hf_routers().items():
        torch._dynamo.reset()
        counters.clear()
        for t in (*router.parameters(), *router.buffers()):
            t.data = torch.randn(t.shape, generator=gen).to(dtype)
        hidden = torch.randn(11, 16, generator=gen).to(dtype)
        with torch.no_grad():
            out, (code,) = run_and_get_code(torch.compile(router, fullgraph=True, dynamic=True), hidden)
            ref = router(hidden)
        assert rewrites() == {counter: 1}, name
        assert ROUTE_CALL in code, name
        if counter == "deepseek_v3":  # (logits, weights, ids), top-k with sorted=False
            out, ref = (out[0], *by_expert(*out[1:])), (ref[0], *by_expert(*ref[1:]))
        assert_same(out, ref)


# ------------------------------------------------------------ install / uninstall


def test_import_changes_no_config():
    script = """
import sys, torch._inductor.config as c
before = c.get_config_copy()
import torch_moe_quant, torch_moe_quant.lowerings
assert c.get_config_copy() == before
assert "torch_moe_quant.lowerings.routing_patterns" not in sys.modules  # registered lazily
assert not torch_moe_quant.lowerings.installed()
"""
    subprocess.run([sys.executable, "-c", script], check=True)


def test_nothing_is_rewritten_without_install(fresh):
    assert not lowerings.installed()
    out, (code,) = run_and_get_code(torch.compile(qwen3, fullgraph=True), logits_of())
    assert rewrites() == {} and "moe_quant" not in code


def test_install_twice_then_uninstall(fresh):
    assert getattr(inductor_config, CONFIG_KEY) is None
    lowerings.install()
    lowerings.install()
    installed_value = getattr(inductor_config, CONFIG_KEY)
    assert isinstance(installed_value, MoeQuantPass) and lowerings.installed()
    torch.compile(qwen3, fullgraph=True)(logits_of())
    assert rewrites() == {"softmax_topk_renormalize": 1}
    lowerings.uninstall()
    assert getattr(inductor_config, CONFIG_KEY) is None and not lowerings.installed()
    lowerings.uninstall()  # harmless
    torch._dynamo.reset()
    counters.clear()
    out, (code,) = run_and_get_code(torch.compile(qwen3, fullgraph=True), logits_of())
    assert rewrites() == {} and "moe_quant" not in code


class _UserPass(CustomGraphPass):
    def __init__(self):
        self.calls = 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return "user-pass"


def test_install_chains_a_user_pass(fresh):
    user = _UserPass()
    with inductor_config.patch({CONFIG_KEY: user}):
        lowerings.install()
        assert get_custom_graph_passes(getattr(inductor_config, CONFIG_KEY))[0] is user
        torch.compile(olmoe, fullgraph=True)(logits_of())
        assert user.calls == 1 and rewrites() == {"softmax_topk": 1}
        lowerings.uninstall()
        assert getattr(inductor_config, CONFIG_KEY) is user


def test_install_chains_a_user_pass_on_a_single_pass_config(fresh, monkeypatch):
    """torch 2.11's config holds one pass (no ``get_custom_graph_passes``):
    ``install()`` then sets one ``_ChainedPass`` running the user's pass and
    ours, whose uuid changes with either, and ``uninstall()`` restores."""
    import importlib

    install_module = importlib.import_module("torch_moe_quant.lowerings.install")  # not the function
    monkeypatch.setattr(install_module, "CONFIG_TAKES_LISTS", False)
    user = _UserPass()
    with inductor_config.patch({CONFIG_KEY: user}):
        lowerings.install()
        chained = getattr(inductor_config, CONFIG_KEY)
        assert isinstance(chained, install_module._ChainedPass) and lowerings.installed()
        assert chained.passes[0] is user and isinstance(chained.passes[1], MoeQuantPass)
        before = chained.uuid()
        user.uuid = lambda: "user-pass-v2"
        assert chained.uuid() != before
        torch.compile(olmoe, fullgraph=True)(logits_of())
        assert user.calls == 1 and rewrites() == {"softmax_topk": 1}
        lowerings.uninstall()
        assert getattr(inductor_config, CONFIG_KEY) is user


@pytest.mark.skipif(not CONFIG_TAKES_LISTS, reason="torch 2.11's config holds one pass, not a list")
def test_uninstall_after_the_config_changed_keeps_other_passes(fresh):
    user, later = _UserPass(), _UserPass()
    with inductor_config.patch({CONFIG_KEY: [user]}):
        lowerings.install()
        setattr(inductor_config, CONFIG_KEY, (*getattr(inductor_config, CONFIG_KEY), later))
        lowerings.uninstall()
        assert getattr(inductor_config, CONFIG_KEY) == (user, later)


def test_enabled_context(fresh):
    with lowerings.enabled():
        assert lowerings.installed()
        torch.compile(sigmoid_topk, fullgraph=True)(logits_of())
    assert not lowerings.installed()
    assert rewrites() == {"sigmoid_topk": 1}
    lowerings.install()
    with lowerings.enabled():
        pass
    assert lowerings.installed()  # was installed before: left installed
    lowerings.uninstall()


def test_uuid_hashes_the_pass_sources():
    sources = pass_sources()
    names = [name for name, _ in sources]
    assert {"install.py", "routing_patterns.py"} <= set(names)
    assert MoeQuantPass().uuid() == source_hash(sources)
    edited = [(n, t + b"\n# changed" if n == "routing_patterns.py" else t) for n, t in sources]
    assert source_hash(edited) != source_hash(sources)
    renamed = [("other.py" if n == "routing_patterns.py" else n, t) for n, t in sources]
    assert source_hash(renamed) != source_hash(sources)
