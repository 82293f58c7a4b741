"""Expert-compute rewrites of ``torch_moe_quant.lowerings`` (``expert_patterns``).

Every compile is ``fullgraph=True`` with the FX graph / AOT autograd caches
off (a cache hit would skip the pass and its counters). Routers are part of
the compiled modules (so top-k is a static int and the routing rewrite runs
too); inputs are random, so router scores are distinct.

Bounds are relative Frobenius errors vs the eager module, measured here
(torch 2.13 CPU, transformers 5.23, the seeds below) and set ~2x above the
largest measured value:

* bf16: eager rounds every GEMM output, the activation and each weighted
  pair to bf16, the op computes in fp32 and rounds once. Measured 3.2e-3 ..
  5.3e-3 over every bf16 test here -> ``BF16_BOUND = 1.2e-2``.
* fp16 (``experts_fp16``): measured 6.1e-4 -> ``FP16_BOUND = 1.5e-3``.
* fp32 math (fp32 models: ``experts_fp32``; quantized weights: the op
  decodes the same codes exactly):
  measured 1.8e-7 .. 2.6e-7 -> ``FP32_BOUND = 2e-6``.
* fp8 activation QDQ: in fp32 measured 1.7e-7, but a QDQ input one ulp off
  (another fp32 summation order) can cross an fp8 rounding boundary, so
  ``FP32_QDQ_BOUND = 1e-3``; in bf16 the eager QDQ inputs are bf16-rounded
  first: measured 1.4e-2 here (3.3e-2 with other weights of these sizes) ->
  ``BF16_QDQ_BOUND = 6e-2``.
"""

import dataclasses
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from lowering_graphs import rewritten_graph
from moe_cases import rel_err
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

import torch_moe_quant as tmq
from torch_moe_quant import formats
from torch_moe_quant.formats.core import QuantizedTensor
from torch_moe_quant.lowerings.install import pass_sources

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig  # noqa: E402
from transformers.integrations import moe as hf_moe  # noqa: E402

BF16_BOUND = 1.2e-2
FP16_BOUND = 1.5e-3
FP32_BOUND = 2e-6
FP32_QDQ_BOUND = 1e-3
BF16_QDQ_BOUND = 6e-2
EXPERTS_CALL = "torch.ops.moe_quant.experts_"
ROUTE_CALL = "torch.ops.moe_quant.route.default"
#: the whole-block op a ``route`` feeding an experts op is fused into
BLOCK_CALL = "torch.ops.moe_quant.moe_"
FUSED = {"route_experts": 1}
#: torch >= 2.12 traces range asserts for one_hot (the dense matmul MoE's ids)
ONE_HOT_ASSERTS = torch.__version__ >= (2, 12)


def rewrites():
    return dict(counters["moe_quant"])


def expert_rewrites():
    """The expert counters (routing ones have no dispatch name in them)."""
    names = ("grouped_mm", "batched_mm", "dense_einsum", "dense_matmul")
    return {k: v for k, v in rewrites().items() if k.startswith(names)}


def compile_and_run(module, *args, dynamic=True):
    with torch.no_grad():
        compiled = torch.compile(module, fullgraph=True, dynamic=dynamic)
        out, (code,) = run_and_get_code(compiled, *args)
        ref = module(*args)
    return out, ref, code, compiled


def op_args(code, scheme):
    """The arguments of the (one) ``experts_<scheme>`` or ``moe_<scheme>``
    call in the output code, at the experts op's positions (the whole-block
    op's nine leading hidden-state and routing arguments become
    ``hidden_states, "<routed>", "<routed>"``)."""
    calls = re.findall(re.escape(f"{EXPERTS_CALL}{scheme}.default(") + r"([^)]*)\)", code)
    blocks = re.findall(re.escape(f"{BLOCK_CALL}{scheme}.default(") + r"([^)]*)\)", code)
    assert len(calls) + len(blocks) == 1, (calls, blocks)
    if calls:
        return [a.strip() for a in calls[0].split(",")]
    args = [a.strip() for a in blocks[0].split(",")]
    return [args[0], "<routed>", "<routed>", *args[9:]]


def no_expert_op(code) -> bool:
    return EXPERTS_CALL not in code and BLOCK_CALL not in code


def first(out):
    return out[0] if isinstance(out, tuple) else out


def assert_close_to_eager(out, ref, bound):
    out, ref = first(out), first(ref)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    err = rel_err(out, ref)
    assert err <= bound, err
    return err


# ------------------------------------------------------------ transformers v5 MoE blocks

FAMILIES = {
    "qwen3_moe": (
        "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock",
        dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
        "softmax_topk_renormalize",
    ),
    "mixtral": (
        "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock",
        dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
        "softmax_topk_renormalize",
    ),
    "olmoe": (
        "transformers.models.olmoe.modeling_olmoe.OlmoeSparseMoeBlock",
        dict(intermediate_size=32, num_experts=4, num_experts_per_tok=2),
        "softmax_topk",
    ),
    # topk_group >= 2: with one kept group Inductor rewrites the group-mask
    # scatter (scatter_upon_const_tensor) and the routing pattern does not match
    "deepseek_v3": (
        "transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE",
        dict(
            moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
            topk_group=2, n_shared_experts=1, norm_topk_prob=True,
        ),
        "deepseek_v3",
    ),
    "gpt_oss": (
        "transformers.models.gpt_oss.modeling_gpt_oss.GptOssMLP",
        dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
        "topk_softmax",
    ),
}


def moe_block(family, implementation, dtype, seed=0, **overrides):
    import importlib

    path, sizes, _ = FAMILIES[family]
    config = AutoConfig.for_model(family, hidden_size=64, **{**sizes, **overrides})
    config._experts_implementation = implementation
    module, cls = path.rsplit(".", 1)
    torch.manual_seed(seed)
    block = getattr(importlib.import_module(module), cls)(config).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    for p in block.parameters():
        p.data = (torch.randn(p.shape, generator=gen) * 0.2).to(dtype)
    return block


def tokens(n, dtype, seed=1, hidden=64):
    return torch.randn(1, n, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _expected_expert_counter(implementation, dtype):
    if implementation == "batched_mm":
        return "batched_mm"
    # under torch.compile transformers calls aten._grouped_mm for bf16 weights
    # only, its own transformers::grouped_mm_fallback op otherwise
    return "grouped_mm" if dtype == torch.bfloat16 else "grouped_mm_fallback"


#: families whose route and experts stay two ops (no whole-block op), and why
UNFUSED_FAMILIES = {
    # GptOssTopKRouter also returns its routing scores (scattered into [M, E])
    "gpt_oss": "the route outputs have other users",
    # under dynamic=True routed_scaling_factor is a graph input multiplied
    # into the weights after routing (a runtime value the op cannot take)
    "deepseek_v3": "the weights are scaled after routing",
}
CASES = [(f, i, torch.bfloat16) for f in FAMILIES for i in ("grouped_mm", "batched_mm")]
# fp32 (the fallback grouped GEMM; batched fp32 also in the plain-torch tests below)
CASES += [("qwen3_moe", "grouped_mm", torch.float32)]
CASES += [("gpt_oss", i, torch.float32) for i in ("grouped_mm", "batched_mm")]
CASES += [("qwen3_moe", "grouped_mm", torch.float16)]
MODEL_BOUND = {torch.bfloat16: BF16_BOUND, torch.float16: FP16_BOUND, torch.float32: FP32_BOUND}
FLOAT_SCHEME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@pytest.mark.parametrize(
    "family,implementation,dtype", CASES, ids=[f"{f}-{i}-{str(d)[6:]}" for f, i, d in CASES]
)
def test_transformers_experts_are_rewritten(lowered, family, implementation, dtype):
    block = moe_block(family, implementation, dtype)
    # gpt-oss compiles static: under dynamic=True Dynamo passes its float
    # swiglu alpha as a graph input (test_gpt_oss_dynamic_is_not_rewritten)
    out, ref, code, _ = compile_and_run(block, tokens(7, dtype), dynamic=family != "gpt_oss")
    counter = _expected_expert_counter(implementation, dtype)
    if family in UNFUSED_FAMILIES:
        assert rewrites() == {counter: 1, FAMILIES[family][2]: 1}
        assert f"{EXPERTS_CALL}{FLOAT_SCHEME[dtype]}.default" in code and ROUTE_CALL in code
    else:
        assert rewrites() == {counter: 1, FAMILIES[family][2]: 1, **FUSED}
        assert f"{BLOCK_CALL}{FLOAT_SCHEME[dtype]}.default" in code and ROUTE_CALL not in code
    assert not re.search(r"bmm|grouped_mm", code)
    assert_close_to_eager(out, ref, MODEL_BOUND[dtype])


def test_dynamic_token_count_compiles_once(lowered):
    block = moe_block("qwen3_moe", "grouped_mm", torch.bfloat16)
    out, ref, code, compiled = compile_and_run(block, tokens(7, torch.bfloat16))
    assert rewrites() == {"grouped_mm": 1, "softmax_topk_renormalize": 1, **FUSED}
    assert_close_to_eager(out, ref, BF16_BOUND)
    other = tokens(13, torch.bfloat16, seed=2)
    with torch.no_grad():
        assert_close_to_eager(compiled(other), block(other), BF16_BOUND)
    # a recompile would have run the pass (and bumped the counters) again
    assert rewrites() == {"grouped_mm": 1, "softmax_topk_renormalize": 1, **FUSED}


def test_gpt_oss_dynamic_is_not_rewritten(lowered):
    # dynamic=True turns GptOssExperts.alpha (a Python float) into a graph
    # input: its value (1.702) cannot be checked, so the experts stay as they are
    block = moe_block("gpt_oss", "grouped_mm", torch.bfloat16)
    out, ref, code, _ = compile_and_run(block, tokens(7, torch.bfloat16))
    assert rewrites() == {"topk_softmax": 1}
    assert no_expert_op(code)
    assert_close_to_eager(out, ref, BF16_BOUND)


def test_gpt_oss_automatic_dynamic_is_rewritten(lowered):
    # the default dynamic=None: a static compile, then one with a symbolic token
    # count in which alpha stays a constant; both are rewritten
    block = moe_block("gpt_oss", "batched_mm", torch.bfloat16)
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        for n, expected in ((7, 1), (11, 2), (13, 2)):
            x = tokens(n, torch.bfloat16, seed=n)
            assert_close_to_eager(compiled(x), block(x), BF16_BOUND)
            assert rewrites() == {"batched_mm": expected, "topk_softmax": expected}, n


def test_training_graph_is_not_rewritten(lowered):
    # the forward graph saves the GEMM inputs and activations for backward
    block = moe_block("qwen3_moe", "batched_mm", torch.float32)
    x = tokens(7, torch.float32).requires_grad_()
    out = torch.compile(block, fullgraph=True)(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    ref = block(x)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x)
    assert expert_rewrites() == {}
    assert rel_err(out, ref) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


def test_other_gated_activations_are_rewritten(lowered):
    for act in ("gelu", "gelu_pytorch_tanh"):
        torch._dynamo.reset()
        counters.clear()
        block = moe_block("mixtral", "batched_mm", torch.bfloat16, hidden_act=act)
        out, ref, code, _ = compile_and_run(block, tokens(7, torch.bfloat16))
        assert expert_rewrites() == {"batched_mm": 1}, act
        assert "'gelu'" in code if act == "gelu" else "'gelu_tanh'" in code
        assert_close_to_eager(out, ref, BF16_BOUND)


# ------------------------------------------------------------ plain torch modules
# Quantized weights are parameters (static shapes under dynamic=True) decoded
# in forward; the router is inside the module.

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def decode_fp8(q, dtype):
    return (q.data.float() * q.scale).to(dtype)


def decode_int4(q, dtype):
    packed, scale = q.data, q.scale
    E, N, words = packed.shape
    K = words * 8
    nib = (packed.unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)) & 0xF
    w = nib.reshape(E, N, K).float() - 8
    return (w * scale.repeat_interleave(K // scale.shape[-1], dim=-1)).to(dtype)


def decode_mxfp4(q, dtype, table=E2M1):
    data, scale = q.data, q.scale
    lut = torch.tensor(table, dtype=torch.float32, device=data.device)
    E, N, half = data.shape
    K = half * 2
    lo = lut[(data & 0x0F).long()]
    hi = lut[(data >> 4).long()]
    v = torch.stack((lo, hi), dim=-1).reshape(E, N, K // 32, 32)
    return (v * torch.exp2(scale.float() - 127).unsqueeze(-1)).reshape(E, N, K).to(dtype)


def decode_formats(q, dtype):
    return formats.dequantize(q, dtype)


# Literal constants: under dynamic=True Dynamo passes a float that is an
# argument or attribute as a graph input, whose value no pattern can check.
def fp8_qdq(t):
    tf = t.float()
    scale = tf.abs().amax(dim=-1, keepdim=True) / 448.0
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    q = (tf / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(t.dtype)


def fp8_qdq_240(t):  # e4m3fnuz's max: not the scheme's math
    tf = t.float()
    scale = tf.abs().amax(dim=-1, keepdim=True) / 240.0
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    q = (tf / scale).clamp(-240.0, 240.0).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(t.dtype)


def silu_and_mul(h):
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def relu_and_mul(h):
    gate, up = h.chunk(2, dim=-1)
    return F.relu(gate) * up


class _Experts:
    """What transformers' experts functions read from ``self``."""

    def __init__(self, num_experts, w13, w2, act):
        self.num_experts, self.gate_up_proj, self.down_proj, self.act = num_experts, w13, w2, act
        self.has_gate, self.has_bias, self.is_transposed = True, False, False
        self._is_expert_parallel = self.has_post_expert_norm = False

    def _apply_gate(self, h):
        return self.act(h)


class Moe(torch.nn.Module):
    """A router (softmax -> top-2 -> renormalize) and experts computed the
    ``dispatch`` way, on weights decoded by ``decode`` (``None``: float
    parameters), optionally with fp8 activation QDQ before each GEMM."""

    def __init__(self, experts, dispatch, decode=None, act=silu_and_mul, qdq=None):
        super().__init__()
        self.dispatch, self.decode, self.act, self.qdq = dispatch, decode, act, qdq
        self.qt = {}
        for name in ("w13", "w2"):
            w = getattr(experts, name)
            if isinstance(w, QuantizedTensor):
                self.qt[name] = w
                self.register_parameter(name, torch.nn.Parameter(w.data, requires_grad=False))
                self.register_parameter(name + "_scale", torch.nn.Parameter(w.scale, requires_grad=False))
            else:
                self.register_parameter(name, torch.nn.Parameter(w, requires_grad=False))
        gen = torch.Generator().manual_seed(5)
        router = torch.randn(experts.num_experts, experts.hidden_size, generator=gen)
        self.router = torch.nn.Parameter(router, requires_grad=False)
        self.num_experts = experts.num_experts

    def weight(self, name, dtype):
        if name not in self.qt:
            return getattr(self, name)
        q = dataclasses.replace(self.qt[name], data=getattr(self, name), scale=getattr(self, name + "_scale"))
        return self.decode(q, dtype)

    def route(self, x):
        w, ids = torch.topk((x.float() @ self.router.T).softmax(-1), 2)
        return w / w.sum(-1, keepdim=True), ids

    def gate(self, h):
        a = self.act(h)
        return self.qdq(a) if self.qdq else a

    def forward(self, x):
        w, ids = self.route(x)
        w13, w2 = self.weight("w13", x.dtype), self.weight("w2", x.dtype)
        if self.qdq:
            x = self.qdq(x)
        return self.dispatch(self, x, w, ids, w13, w2)


def grouped(m, x, w, ids, w13, w2):
    return hf_moe.grouped_mm_experts_forward(_Experts(m.num_experts, w13, w2, m.gate), x, ids, w)


def batched(m, x, w, ids, w13, w2):
    return hf_moe.batched_mm_experts_forward(_Experts(m.num_experts, w13, w2, m.gate), x, ids, w)


def dense_einsum(m, x, w, ids, w13, w2):
    h = torch.einsum("th,enh->etn", x, w13)
    y = torch.einsum("eti,ehi->eth", m.gate(h), w2)
    combine = torch.zeros(x.shape[0], w13.shape[0], dtype=w.dtype).scatter(1, ids, w)
    return torch.einsum("eth,te->th", y, combine.to(y.dtype))


def dense_matmul(m, x, w, ids, w13, w2):
    h = x @ w13.transpose(1, 2)
    y = m.gate(h) @ w2.transpose(1, 2)
    combine = (F.one_hot(ids, w13.shape[0]).to(w.dtype) * w.unsqueeze(-1)).sum(1)
    return (y * combine.T.unsqueeze(-1).to(y.dtype)).sum(0)


E, H, I = 4, 64, 32


def float_weights(seed=0, hidden=H, inter=I):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * inter, hidden, generator=gen) / 8, torch.randn(E, hidden, inter, generator=gen) / 6


def experts_of(scheme, dtype, **sizes):
    """``QuantizedExperts`` of ``scheme`` from ``dtype`` weights (scales
    follow the weights' dtype); ``scheme=None``: plain ``dtype`` tensors."""
    w13, w2 = float_weights(**sizes)
    if scheme is None:
        return tmq.QuantizedExperts(w13.to(dtype), w2.to(dtype), tmq.get_scheme("bf16"), w2.shape[1], w2.shape[2])
    return tmq.quantize_experts(w13.to(dtype), w2.to(dtype), scheme)


def hidden(n, dtype, seed=3, size=H):
    return torch.randn(n, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


DENSE = [(f, d) for f in (dense_einsum, dense_matmul) for d in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("dispatch,dtype", DENSE, ids=[f"{f.__name__}-{str(d)[6:]}" for f, d in DENSE])
def test_dense_formulation_is_rewritten(lowered, dispatch, dtype):
    module = Moe(experts_of(None, dtype), dispatch)
    out, ref, code, _ = compile_and_run(module, hidden(7, dtype))
    if dispatch is dense_matmul and ONE_HOT_ASSERTS:
        # the ids also feed one_hot's range asserts: route keeps other users
        assert rewrites() == {dispatch.__name__: 1, "softmax_topk_renormalize": 1}
        assert EXPERTS_CALL + FLOAT_SCHEME[dtype] + ".default" in code and "bmm" not in code
    else:
        assert rewrites() == {dispatch.__name__: 1, "softmax_topk_renormalize": 1, **FUSED}
        assert BLOCK_CALL + FLOAT_SCHEME[dtype] + ".default" in code and "bmm" not in code
    assert_close_to_eager(out, ref, BF16_BOUND if dtype == torch.bfloat16 else FP32_BOUND)


# (scheme, decode, dispatch, dtype, counter); each weight form once at least,
# each dispatch form with quantized weights, both dtypes
DEQUANT = [
    ("fp8_w8a16_channel", decode_fp8, dense_einsum, torch.float32, "dense_einsum[fp8]"),
    ("fp8_w8a16_channel", decode_formats, grouped, torch.bfloat16, "grouped_mm[fp8_formats]"),
    ("int4_w4a16_g32", decode_int4, batched, torch.float32, "batched_mm[int4]"),
    ("int4_w4a16_g32", decode_formats, dense_einsum, torch.bfloat16, "dense_einsum[int4_formats]"),
    ("int4_w4a16_g32", decode_formats, dense_einsum, torch.float32, "dense_einsum[int4]"),  # fp32: int4's graph
    ("mxfp4_w4a16", decode_mxfp4, grouped, torch.bfloat16, "grouped_mm[mxfp4]"),
    ("mxfp4_w4a16", decode_mxfp4, dense_einsum, torch.float32, "dense_einsum[mxfp4]"),
    ("mxfp4_w4a16", decode_formats, batched, torch.float32, "batched_mm[mxfp4_formats]"),
]


@pytest.mark.parametrize(
    "scheme,decode,dispatch,dtype,counter", DEQUANT, ids=[c[-1] + "-" + str(c[3])[6:] for c in DEQUANT]
)
def test_dequantized_weights_are_rewritten(lowered, scheme, decode, dispatch, dtype, counter):
    module = Moe(experts_of(scheme, dtype), dispatch, decode)
    out, ref, code, _ = compile_and_run(module, hidden(7, dtype))
    assert rewrites() == {counter: 1, "softmax_topk_renormalize": 1, **FUSED}
    # the op takes the raw codes and scales (graph inputs): no decode left
    assert all(re.fullmatch(r"arg\d+_1", a) for a in op_args(code, scheme)[3:7])
    assert not re.search(r"bmm|grouped_mm", code)
    assert_close_to_eager(out, ref, BF16_BOUND if dtype == torch.bfloat16 else FP32_BOUND)


def test_int4_group_size_picks_the_scheme(lowered):
    # per-row scales (one group spanning K) -> the channel scheme
    module = Moe(experts_of("int4_w4a16_channel", torch.float32), dense_einsum, decode_int4)
    out, ref, code, _ = compile_and_run(module, hidden(7, torch.float32))
    assert expert_rewrites() == {"dense_einsum[int4]": 1}
    assert BLOCK_CALL + "int4_w4a16_channel.default" in code
    assert_close_to_eager(out, ref, FP32_BOUND)


QDQ = [
    ("fp8_w8a8_channel_token", decode_fp8, dense_einsum, torch.float32, "dense_einsum[fp8,fp8_qdq]"),
    ("fp8_w8a8_channel_token", decode_formats, grouped, torch.bfloat16, "grouped_mm[fp8_formats,fp8_qdq]"),
]


@pytest.mark.parametrize("scheme,decode,dispatch,dtype,counter", QDQ, ids=[c[-1] for c in QDQ])
def test_activation_qdq_is_rewritten(lowered, scheme, decode, dispatch, dtype, counter):
    module = Moe(experts_of(scheme, dtype), dispatch, decode, qdq=fp8_qdq)
    out, ref, code, _ = compile_and_run(module, hidden(7, dtype))
    assert rewrites() == {counter: 1, "softmax_topk_renormalize": 1, **FUSED}
    args = op_args(code, scheme)
    assert re.fullmatch(r"arg\d+_1", args[0])  # the tokens as they came in: the op quantizes them
    assert all(re.fullmatch(r"arg\d+_1", a) for a in args[3:7])
    assert "448" not in code
    assert_close_to_eager(out, ref, BF16_QDQ_BOUND if dtype == torch.bfloat16 else FP32_QDQ_BOUND)


# ------------------------------------------------------------ near misses


class ReturnsActivations(Moe):
    """Also returns the experts' hidden activations (an extra user)."""

    def forward(self, x):
        w, ids = self.route(x)
        w13, w2 = self.weight("w13", x.dtype), self.weight("w2", x.dtype)
        h = torch.einsum("th,enh->etn", x, w13)
        a = self.gate(h)
        y = torch.einsum("eti,ehi->eth", a, w2)
        combine = torch.zeros(x.shape[0], w13.shape[0], dtype=w.dtype).scatter(1, ids, w)
        return torch.einsum("eth,te->th", y, combine), a


class RoutedOutside(Moe):
    """Dense form on ids given by the caller: nothing says they are distinct
    per row (scatter would keep one of two equal ids, the op sum both)."""

    def forward(self, x, w, ids):
        return dense_einsum(self, x, w, ids, self.w13, self.w2)


def batched_pairs(m, x, w, ids, w13, w2, k_major=False):
    """transformers' batched_mm_experts_forward, written out; ``k_major``
    sums the pairs as if laid out [k, M] (they are [M, k]: a wrong reshape
    that the pattern's [M, k, H] must not match)."""
    k, tokens, size = ids.shape[1], x.shape[0], x.shape[-1]
    xs = x.repeat_interleave(k, dim=0)
    sample_weights, flat = w.reshape(-1), ids.reshape(-1)
    h = torch.bmm(w13[flat], xs.unsqueeze(-1)).squeeze(-1)
    y = torch.bmm(w2[flat], m.gate(h).unsqueeze(-1)).squeeze(-1) * sample_weights.unsqueeze(-1)
    if k_major:
        return y.view(k, tokens, size).sum(dim=0)
    return y.view(tokens, k, size).sum(dim=1)


def batched_k_major(m, x, w, ids, w13, w2):
    return batched_pairs(m, x, w, ids, w13, w2, k_major=True)


def grouped_pairs(m, x, w, ids, w13, w2, transpose=True):
    """transformers' grouped_mm_experts_forward, written out. Without
    ``transpose`` the GEMMs take the weights as stored ([E, K, N]): the
    grouped_mm pattern transposes [E, N, K] weights, so rewriting that would
    compute x @ w13.T where the model computes x @ w13."""
    k, tokens, size = ids.shape[1], x.shape[0], x.shape[-1]
    sample_weights, flat = w.reshape(-1), ids.reshape(-1)
    ids_g, perm = torch.sort(flat)
    counts = torch.histc(ids_g.float(), bins=m.num_experts, min=0, max=m.num_experts - 1)
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    if transpose:
        w13, w2 = w13.transpose(-2, -1), w2.transpose(-2, -1)
    h = torch._grouped_mm(x[perm // k], w13, offs=offs)
    y = torch._grouped_mm(m.gate(h), w2, offs=offs) * sample_weights[perm].unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.size(0))
    return y[inv].view(tokens, k, size).sum(dim=1)


def grouped_untransposed(m, x, w, ids, w13, w2):
    return grouped_pairs(m, x, w, ids, w13, w2, transpose=False)


def square_experts(dtype):
    """w13 [E, H, H] (H = 2I: it runs both ways), w2 [E, I, H]."""
    gen = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, H, H, generator=gen) / 8, torch.randn(E, H // 2, H, generator=gen) / 6
    return tmq.QuantizedExperts(w13.to(dtype), w2.to(dtype), tmq.get_scheme("bf16"), H, H // 2)


def _near_misses():
    bf16, fp32 = torch.bfloat16, torch.float32
    return {
        "relu_activation": lambda: (Moe(experts_of(None, bf16), grouped, act=relu_and_mul), bf16),
        "hidden_activations_returned": lambda: (ReturnsActivations(experts_of(None, fp32), dense_einsum), fp32),
        "k_major_reshape": lambda: (Moe(experts_of(None, fp32), batched_k_major), fp32),
        "weights_used_untransposed": lambda: (Moe(square_experts(bf16), grouped_untransposed), bf16),
        "qdq_max_240": lambda: (
            Moe(experts_of("fp8_w8a8_channel_token", fp32), dense_einsum, decode_fp8, qdq=fp8_qdq_240),
            fp32,
        ),
    }


WRITTEN_OUT = [(batched_pairs, torch.float32, "batched_mm"), (grouped_pairs, torch.bfloat16, "grouped_mm")]


@pytest.mark.parametrize("dispatch,dtype,counter", WRITTEN_OUT, ids=[c[-1] for c in WRITTEN_OUT])
def test_written_out_forms_are_rewritten(lowered, dispatch, dtype, counter):
    # the counterparts of the k_major_reshape / weights_used_untransposed near misses
    module = Moe(experts_of(None, dtype), dispatch)
    out, ref, code, _ = compile_and_run(module, hidden(7, dtype))
    assert expert_rewrites() == {counter: 1}
    assert_close_to_eager(out, ref, FP32_BOUND if dtype == torch.float32 else BF16_BOUND)


@pytest.mark.parametrize("name", list(_near_misses()))
def test_near_miss_is_not_rewritten(lowered, name):
    module, dtype = _near_misses()[name]()
    out, ref, code, _ = compile_and_run(module, hidden(7, dtype))
    assert expert_rewrites() == {}
    assert no_expert_op(code)
    if isinstance(out, tuple):
        for o, r in zip(out, ref):
            assert o.dtype == r.dtype and o.shape == r.shape
            assert rel_err(o, r) <= 1e-5
    else:
        assert out.dtype == ref.dtype and out.shape == ref.shape
        assert rel_err(out, ref) <= (1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_dense_on_caller_ids_is_not_rewritten(lowered):
    module = RoutedOutside(experts_of(None, torch.float32), dense_einsum)
    x = hidden(7, torch.float32)
    w, ids = module.route(x)
    out, ref, code, _ = compile_and_run(module, x, w, ids, dynamic=False)
    assert rewrites() == {}
    assert no_expert_op(code)
    assert rel_err(out, ref) <= 1e-5


def test_wrong_lookup_table_falls_back_to_the_float_op(lowered):
    # a table that is not e2m1: the mxfp4 check refuses, and the float pattern
    # takes the decoded weights as they are (exactly the eager math, decode kept)
    table = [v * 2 for v in E2M1]
    module = Moe(experts_of("mxfp4_w4a16", torch.float32), dense_einsum, lambda q, d: decode_mxfp4(q, d, table))
    out, ref, code, _ = compile_and_run(module, hidden(7, torch.float32))
    assert expert_rewrites() == {"dense_einsum": 1}
    assert BLOCK_CALL + "fp32.default" in code and "mxfp4" not in code
    assert_close_to_eager(out, ref, FP32_BOUND)


# ------------------------------------------------------------ goldens


class Qwen3Experts(torch.nn.Module):
    """transformers' grouped_mm experts on given routing (static shapes)."""

    def __init__(self, dtype):
        super().__init__()
        w13, w2 = float_weights()
        self.gate_up_proj = torch.nn.Parameter(w13.to(dtype), requires_grad=False)
        self.down_proj = torch.nn.Parameter(w2.to(dtype), requires_grad=False)
        self.num_experts, self.act_fn = E, torch.nn.SiLU()
        self.has_gate, self.has_bias, self.is_transposed = True, False, False
        self._is_expert_parallel = self.has_post_expert_norm = False

    def _apply_gate(self, h):
        gate, up = h.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, x, ids, w):
        return hf_moe.grouped_mm_experts_forward(self, x, ids, w)


def test_golden_grouped_mm(lowered):
    x = hidden(5, torch.bfloat16)
    w, ids = torch.topk(torch.randn(5, E, generator=torch.Generator().manual_seed(4)).softmax(-1), 2)
    assert_expected_inline(
        rewritten_graph(Qwen3Experts(torch.bfloat16), x, ids, w.bfloat16()),
        """\
view_1 = torch.ops.aten.reshape.default(arg1_1, [-1])
reshape_default = torch.ops.aten.reshape.default(view_1, [-1, 2])
experts_bf16_default = torch.ops.moe_quant.experts_bf16.default(arg0_1, arg2_1, reshape_default, arg3_1, arg4_1, None, None, None, 'silu', 'gate_up', False)
return (experts_bf16_default,)""",
    )


def test_golden_dense_einsum_mxfp4(lowered):
    module = Moe(experts_of("mxfp4_w4a16", torch.float32), dense_einsum, decode_mxfp4)
    assert_expected_inline(
        rewritten_graph(module, hidden(5, torch.float32)),
        """\
permute = torch.ops.aten.permute.default(arg1_1, [1, 0])
mm = torch.ops.aten.mm.default(arg0_1, permute)
moe_mxfp4_w4a16_default = torch.ops.moe_quant.moe_mxfp4_w4a16.default(arg0_1, mm, 2, 'softmax_topk_renormalize', None, None, None, 1.0, None, arg2_1, arg3_1, arg4_1, arg5_1, None, None, None, 'silu', 'gate_up', False)
return (moe_mxfp4_w4a16_default,)""",
    )


# one golden per dispatch form and per decode form not covered above
GOLDENS = {
    "batched_mm_bf16": lambda: (Moe(experts_of(None, torch.bfloat16), batched), torch.bfloat16),
    "dense_matmul_fp32": lambda: (Moe(experts_of(None, torch.float32), dense_matmul), torch.float32),
    "batched_mm_int4": lambda: (Moe(experts_of("int4_w4a16_g32", torch.float32), batched, decode_int4), torch.float32),
    "dense_einsum_fp8": lambda: (Moe(experts_of("fp8_w8a16_channel", torch.float32), dense_einsum, decode_fp8), torch.float32),
    "dense_einsum_fp8_qdq": lambda: (
        Moe(experts_of("fp8_w8a8_channel_token", torch.float32), dense_einsum, decode_fp8, qdq=fp8_qdq), torch.float32
    ),
}


def golden(form):
    """The post-grad graph of ``GOLDENS[form]`` after the pass, checked to hold
    one moe_quant experts or whole-block call and no bmm."""
    module, dtype = GOLDENS[form]()
    graph = rewritten_graph(module, hidden(5, dtype))
    assert graph.count("torch.ops.moe_quant.experts_") + graph.count("torch.ops.moe_quant.moe_") == 1
    assert "bmm" not in graph
    return graph


def test_golden_batched_mm_bf16(lowered):
    assert_expected_inline(golden("batched_mm_bf16"), """\
convert_element_type = torch.ops.prims.convert_element_type.default(arg0_1, torch.float32)
permute = torch.ops.aten.permute.default(arg1_1, [1, 0])
mm = torch.ops.aten.mm.default(convert_element_type, permute)
moe_bf16_default = torch.ops.moe_quant.moe_bf16.default(arg0_1, mm, 2, 'softmax_topk_renormalize', None, None, None, 1.0, None, arg2_1, arg3_1, None, None, None, 'silu', 'gate_up', False)
convert_element_type_default = torch.ops.prims.convert_element_type.default(moe_bf16_default, torch.float32)
convert_element_type_7 = torch.ops.prims.convert_element_type.default(convert_element_type_default, torch.bfloat16)
return (convert_element_type_7,)""")


@pytest.mark.skipif(not ONE_HOT_ASSERTS, reason="torch 2.11 traces no one_hot asserts: another (fused) graph")
def test_golden_dense_matmul_fp32(lowered):
    assert_expected_inline(golden("dense_matmul_fp32"), """\
permute = torch.ops.aten.permute.default(arg1_1, [1, 0])
mm = torch.ops.aten.mm.default(arg0_1, permute)
route_default = torch.ops.moe_quant.route.default(mm, 2, 'softmax_topk_renormalize')
getitem_4 = route_default[0]
getitem_5 = route_default[1]
convert_element_type_default = torch.ops.prims.convert_element_type.default(getitem_5, torch.int64)
ge = torch.ops.aten.ge.Scalar(convert_element_type_default, 0)
logical_not = torch.ops.aten.logical_not.default(ge)
any_1 = torch.ops.aten.any.dims(logical_not)
logical_not_1 = torch.ops.aten.logical_not.default(any_1)
_assert_async = torch.ops.aten._assert_async.msg(logical_not_1, 'one_hot: Class values must be non-negative.')
lt = torch.ops.aten.lt.Scalar(convert_element_type_default, 4)
logical_not_2 = torch.ops.aten.logical_not.default(lt)
any_2 = torch.ops.aten.any.dims(logical_not_2)
logical_not_3 = torch.ops.aten.logical_not.default(any_2)
_assert_async_1 = torch.ops.aten._assert_async.msg(logical_not_3, 'one_hot: Class values must be smaller than num_classes.')
experts_fp32_default = torch.ops.moe_quant.experts_fp32.default(arg0_1, getitem_4, convert_element_type_default, arg2_1, arg3_1, None, None, None, 'silu', 'gate_up', False)
return (experts_fp32_default,)""")


def test_golden_batched_mm_int4(lowered):
    assert_expected_inline(golden("batched_mm_int4"), """\
permute = torch.ops.aten.permute.default(arg1_1, [1, 0])
mm = torch.ops.aten.mm.default(arg0_1, permute)
moe_int4_w4a16_g32_default = torch.ops.moe_quant.moe_int4_w4a16_g32.default(arg0_1, mm, 2, 'softmax_topk_renormalize', None, None, None, 1.0, None, arg2_1, arg3_1, arg4_1, arg5_1, None, None, None, 'silu', 'gate_up', False)
return (moe_int4_w4a16_g32_default,)""")


def test_golden_dense_einsum_fp8(lowered):
    assert_expected_inline(golden("dense_einsum_fp8"), """\
permute = torch.ops.aten.permute.default(arg1_1, [1, 0])
mm = torch.ops.aten.mm.default(arg0_1, permute)
moe_fp8_w8a16_channel_default = torch.ops.moe_quant.moe_fp8_w8a16_channel.default(arg0_1, mm, 2, 'softmax_topk_renormalize', None, None, None, 1.0, None, arg2_1, arg3_1, arg4_1, arg5_1, None, None, None, 'silu', 'gate_up', False)
return (moe_fp8_w8a16_channel_default,)""")


def test_golden_dense_einsum_fp8_qdq(lowered):
    assert_expected_inline(golden("dense_einsum_fp8_qdq"), """\
permute = torch.ops.aten.permute.default(arg1_1, [1, 0])
mm = torch.ops.aten.mm.default(arg0_1, permute)
moe_fp8_w8a8_channel_token_default = torch.ops.moe_quant.moe_fp8_w8a8_channel_token.default(arg0_1, mm, 2, 'softmax_topk_renormalize', None, None, None, 1.0, None, arg2_1, arg3_1, arg4_1, arg5_1, None, None, None, 'silu', 'gate_up', False)
return (moe_fp8_w8a8_channel_token_default,)""")


# ------------------------------------------------------------ depyf, import, uuid


def test_depyf_dump_shows_the_experts_op(lowered, tmp_path):
    depyf = pytest.importorskip("depyf")
    block = moe_block("qwen3_moe", "batched_mm", torch.bfloat16)
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    with depyf.prepare_debug(str(tmp_path)), torch.no_grad():
        compiled(tokens(5, torch.bfloat16))
    dumped = {p.name: p.read_text() for p in tmp_path.rglob("*.py")}
    assert dumped, "depyf wrote nothing"
    hits = [name for name, text in dumped.items() if "torch.ops.moe_quant.moe_bf16" in text]
    assert hits, sorted(dumped)
    assert rewrites() == {"batched_mm": 1, "softmax_topk_renormalize": 1, **FUSED}


def test_import_registers_nothing():
    script = """
import sys, torch._inductor.config as c
before = c.get_config_copy()
import torch_moe_quant, torch_moe_quant.lowerings
assert c.get_config_copy() == before
assert "torch_moe_quant.lowerings.expert_patterns" not in sys.modules  # registered lazily
assert not torch_moe_quant.lowerings.installed()
"""
    subprocess.run([sys.executable, "-c", script], check=True)


def test_uuid_covers_the_expert_patterns():
    names = {name for name, _ in pass_sources()}
    assert {"expert_patterns.py", "_expert_forms.py"} <= names
