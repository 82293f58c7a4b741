"""Property tests (hypothesis, derandomized: CI sees the same examples every
run) over schemes x shapes x dtypes x layouts (issue 17, Done-when 2).

For every drawn call of ``fused_moe`` (through the scheme's
``torch.ops.moe_quant`` op, CPU kernel):

* valid input -> an output of the input's shape and dtype, finite for finite
  input, within the scheme's tolerance of the fp32 reference computed on the
  *dequantized* weights (only activation quantization and the output cast
  separate the two);
* one argument made invalid -> a ``ValueError`` or ``TypeError`` (never
  another exception: no IndexError, RuntimeError, segfault).

Shapes: M in {0, 1, primes}, E in {1, 2, 3, 5, 7} (never dividing a kernel
block), top_k up to E, non-contiguous views of hidden_states and routing,
every hidden_states dtype (bf16, fp16, fp32, fp64), every weight dtype,
``expert_map`` with absent experts, router weight on the input.
"""

import math

import pytest
import torch

from hypothesis import HealthCheck, given, settings  # the [test] extra: never skipped
from hypothesis import strategies as st

import torch_moe_quant as tmq  # noqa: E402
from torch_moe_quant.activations import Activation  # noqa: E402
from torch_moe_quant.experts import _block_multiple  # noqa: E402
from torch_moe_quant.formats import Format  # noqa: E402
from torch_moe_quant.experts import dequantize_weight  # noqa: E402

SETTINGS = dict(
    max_examples=30, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SCHEMES = sorted(tmq.SCHEMES)
PRIMES_AND_EDGES = [0, 1, 2, 3, 5, 7, 11, 13]
X_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
W_DTYPES = [torch.bfloat16, torch.float16, torch.float32]

#: relative Frobenius error allowed against the fp32 reference on the
#: dequantized weights, by activation format (None: weight-only, where the
#: output cast to bf16 / fp16 is the only difference)
ACT_TOLERANCE = {
    None: 1e-2,
    Format.INT8: 0.05,
    Format.FP8_E4M3: 0.1,
    Format.MXFP8: 0.1,
    Format.MXFP6_E2M3: 0.2,
    Format.MXFP6_E3M2: 0.3,
    Format.MXFP4: 0.5,
    Format.NVFP4: 0.5,
}


def _tolerance(scheme) -> float:
    a = scheme.activation
    return ACT_TOLERANCE[None if a is None else a.fmt]


@st.composite
def problems(draw):
    """One valid fused_moe call: (scheme, experts, x, weights, ids, kwargs)."""
    scheme = tmq.get_scheme(draw(st.sampled_from(SCHEMES)))
    m = _block_multiple(scheme)
    h = m * draw(st.integers(1, 2)) if m >= 32 else draw(st.sampled_from([16, 32, 48]))
    inter = m * draw(st.integers(1, 2)) if m >= 32 else draw(st.sampled_from([16, 32]))
    h, inter = max(h, m), max(inter, m)
    E = draw(st.sampled_from([1, 2, 3, 5, 7]))
    M = draw(st.sampled_from(PRIMES_AND_EDGES))
    top_k = draw(st.integers(1, min(E, 3)))
    seed = draw(st.integers(0, 2**16))
    w_dtype = draw(st.sampled_from(W_DTYPES))
    x_dtype = draw(st.sampled_from(X_DTYPES))
    activation = draw(st.sampled_from([a for a in Activation]))
    layout = draw(st.sampled_from(["gate_up", "up_gate", "interleaved"]))
    gated = activation.is_gated
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, (2 if gated else 1) * inter, h, generator=g) / h**0.5).to(w_dtype)
    w2 = (torch.randn(E, h, inter, generator=g) / inter**0.5).to(w_dtype)
    bias = draw(st.booleans())
    b13 = torch.randn(E, w13.shape[1], generator=g) * 0.1 if bias else None
    b2 = torch.randn(E, h, generator=g) * 0.1 if bias else None
    static = {}
    if scheme.static_activation:  # calibrated on 64 tokens of the same distribution
        cx = (torch.randn(64, h, generator=g) * 1.5).clamp(-4, 4)
        cw, cids = tmq.route(torch.randn(64, E, generator=g), top_k, "softmax_topk_renormalize")
        a13, a2 = tmq.calibrate_activation_scales(
            cx, w13.float(), w2.float(), scheme, cw, cids, activation=activation, w13_bias=b13, w2_bias=b2,
            layout=layout,
        )
        static = dict(a13_scale=a13, a2_scale=a2)
    experts = tmq.quantize_experts(w13, w2, scheme, w13_bias=b13, w2_bias=b2, layout=layout, **static)
    # hidden_states: maybe a non-contiguous view (strided columns or a transpose)
    view = draw(st.sampled_from(["contiguous", "strided", "transposed"]))
    base = torch.randn(M, 2 * h, generator=g).clamp(-4, 4)
    x = {"contiguous": base[:, :h].contiguous(), "strided": base[:, ::2],
         "transposed": base[:, :h].t().contiguous().t()}[view].to(x_dtype)
    logits = torch.randn(M, E, generator=g)
    w, ids = tmq.route(logits, top_k, "softmax_topk_renormalize")
    if draw(st.booleans()):  # non-contiguous routing tensors
        ids = torch.stack([ids, ids], dim=-1)[..., 0]
        w = torch.stack([w, w], dim=-1)[..., 0]
    kwargs = dict(activation=activation.value)
    if draw(st.booleans()) and E > 1:  # expert parallel: this rank holds a subset
        local = draw(st.integers(1, E))
        perm = torch.randperm(E, generator=g)
        emap = torch.full((E,), -1, dtype=torch.int32)
        emap[perm[:local]] = torch.arange(local, dtype=torch.int32)
        experts = _first_experts(experts, local, scheme, b13, b2, layout, static, w13, w2, perm[:local])
        kwargs["expert_map"] = emap
    if top_k == 1 and draw(st.booleans()):
        kwargs["apply_router_weight_on_input"] = True
    return scheme, experts, x, w.to(draw(st.sampled_from([torch.float32, torch.bfloat16]))), ids, kwargs


def _first_experts(experts, local, scheme, b13, b2, layout, static, w13, w2, chosen):
    """The experts this rank holds: global experts ``chosen`` as local 0..local-1."""
    pick = chosen.long()
    return tmq.quantize_experts(
        w13[pick], w2[pick], scheme, layout=layout,
        w13_bias=None if b13 is None else b13[pick], w2_bias=None if b2 is None else b2[pick], **static,
    )


def _reference_on_dequantized(experts, x, w, ids, kwargs):
    """The fp32 (fp64 for fp64 input) reference on the dequantized weights."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    dense = tmq.quantize_experts(
        dequantize_weight(experts.w13, dtype).float(), dequantize_weight(experts.w2, dtype).float(), "fp32",
        w13_bias=experts.w13_bias, w2_bias=experts.w2_bias, layout=experts.layout,
    )
    from torch_moe_quant import reference

    return reference.fused_moe(x.to(dtype), dense, w, ids, **kwargs)


@settings(**SETTINGS)
@given(problems())
def test_valid_calls_match_the_reference(problem):
    scheme, experts, x, w, ids, kwargs = problem
    out = tmq.fused_moe(x, experts, w, ids, **kwargs)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all(), scheme.name
    if x.shape[0] == 0:
        return
    ref = _reference_on_dequantized(experts, x, w, ids, kwargs)
    scale = ref.double().norm().item()
    err = (out.double() - ref.double()).norm().item()
    tol = _tolerance(scheme)
    if x.dtype in (torch.bfloat16, torch.float16):
        tol = max(tol, 1e-2)
    assert err <= tol * scale + 1e-4 * math.sqrt(out.numel()), (scheme.name, err / max(scale, 1e-30))


#: one argument made invalid: (name, how)
MUTATIONS = [
    "x_int", "x_3d", "x_wider", "x_narrower", "x_meta", "ids_float", "ids_out_of_range", "ids_negative",
    "ids_rows", "ids_meta", "weights_shape", "weights_int", "top_k_too_large", "map_out_of_range",
    "map_2d", "map_float", "activation_name", "activation_kind", "on_input_top_k",
]


def _mutate(how, experts, x, w, ids, kwargs):
    E, M = experts.num_experts, x.shape[0]
    kwargs = dict(kwargs)
    if how == "x_int":
        x = x.to(torch.int32)
    elif how == "x_3d":
        x = x.unsqueeze(0)
    elif how == "x_wider":
        x = torch.nn.functional.pad(x, (0, 1))
    elif how == "x_narrower":
        x = x[:, :-1]
    elif how == "x_meta":
        x = x.to("meta")
    elif how == "ids_float":
        ids = ids.float()
    elif how == "ids_out_of_range":
        ids = ids.clone()
        ids[..., -1] = kwargs["expert_map"].shape[0] if "expert_map" in kwargs else E
    elif how == "ids_negative":
        ids = ids.clone()
        ids[..., 0] = -1
    elif how == "ids_rows":
        ids = torch.cat([ids, ids[:1]])
    elif how == "ids_meta":
        ids = ids.to("meta")
    elif how == "weights_shape":
        w = w[:, :1].expand(M, 2) if w.shape[1] == 1 else w[:, :1]
    elif how == "weights_int":
        w = w.to(torch.int32)
    elif how == "top_k_too_large":
        num = kwargs["expert_map"].shape[0] if "expert_map" in kwargs else E
        ids = torch.zeros(M, num + 1, dtype=torch.int32)
        w = torch.zeros(M, num + 1)
    elif how == "map_out_of_range":
        emap = kwargs.get("expert_map", torch.arange(E, dtype=torch.int32)).clone()
        emap[0] = E
        kwargs["expert_map"] = emap
    elif how == "map_2d":
        kwargs["expert_map"] = torch.arange(E, dtype=torch.int32).reshape(1, E)
    elif how == "map_float":
        kwargs["expert_map"] = torch.arange(E, dtype=torch.float32)
    elif how == "activation_name":
        kwargs["activation"] = "swish2"
    elif how == "activation_kind":  # gated <-> non-gated
        gated = Activation(kwargs["activation"]).is_gated
        kwargs["activation"] = "relu2" if gated else "silu"
    elif how == "on_input_top_k":
        if ids.shape[1] == 1:
            ids, w = torch.cat([ids, ids], 1), torch.cat([w, w], 1)
        kwargs["apply_router_weight_on_input"] = True
    return x, w, ids, kwargs


def _is_noop(how, x, ids):
    """Mutations that cannot make an empty batch invalid (no id to read)."""
    return x.shape[0] == 0 and how in ("ids_out_of_range", "ids_negative", "map_out_of_range", "ids_rows")


@settings(**{**SETTINGS, "max_examples": 40})
@given(problems(), st.sampled_from(MUTATIONS))
def test_invalid_calls_raise_value_or_type_errors(problem, how):
    scheme, experts, x, w, ids, kwargs = problem
    if _is_noop(how, x, ids):
        return
    x, w, ids, kwargs = _mutate(how, experts, x, w, ids, kwargs)
    with pytest.raises((ValueError, TypeError)):
        tmq.fused_moe(x, experts, w, ids, **kwargs)


@settings(**SETTINGS)
@given(
    st.sampled_from(SCHEMES),
    st.sampled_from([1, 2, 3, 5]),
    st.sampled_from(W_DTYPES),
    st.floats(min_value=-30, max_value=30),
)
def test_quantize_experts_gives_finite_weights_or_an_error(scheme, E, dtype, log2_magnitude):
    """Finite float weights of any magnitude: finite dequantized weights (and
    scales), or a ValueError naming the weight; never NaN."""
    scheme = tmq.get_scheme(scheme)
    m = max(_block_multiple(scheme), 16)
    g = torch.Generator().manual_seed(E)
    mag = 2.0**log2_magnitude
    w13 = (torch.randn(E, 2 * m, m, generator=g) * mag).to(dtype)
    w2 = (torch.randn(E, m, m, generator=g) * mag).to(dtype)
    if not (torch.isfinite(w13).all() and torch.isfinite(w2).all()):
        return  # the magnitude overflowed the dtype: not a finite input
    static = dict(a13_scale=0.01, a2_scale=0.01) if scheme.static_activation else {}
    try:
        experts = tmq.quantize_experts(w13, w2, scheme, **static)
    except ValueError as e:
        assert str(e).startswith(("w13", "w2")), e
        return
    for w in (experts.w13, experts.w2):
        assert torch.isfinite(dequantize_weight(w)).all(), scheme.name
