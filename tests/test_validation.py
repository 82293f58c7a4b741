"""No silent wrong answers (issue 17): each case that used to give a wrong
answer, a broken model or an unclear error now gives a named ValueError /
TypeError or a correct result. Cases are numbered as in the issue; the
quantize_ atomicity of case 2 over every error class is in
``test_quantize_atomic.py``, the property tests in ``test_fuzz.py``."""

import copy
import json
import logging
import math
import os

import pytest
import torch
from safetensors.torch import save_file

import torch_moe_quant as tmq
from torch_moe_quant import formats
from torch_moe_quant.formats import Format, PerGroup
from torch_moe_quant.nn.loaders import load_compressed_tensors_experts, load_experts, load_gpt_oss_experts
from torch_moe_quant.ops.experts import SIGNATURES
from torch_moe_quant.tools.accuracy import sqnr_db

E, H, I, M = 4, 64, 32, 5
PREFIX = "model.layers.0.mlp.experts"


def _layer(seed=0, e=E, h=H, inter=I):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(e, 2 * inter, h, generator=g) / h**0.5
    w2 = torch.randn(e, h, inter, generator=g) / inter**0.5
    x = torch.randn(M, h, generator=g)
    w, ids = tmq.route(torch.randn(M, e, generator=g), 2, "softmax_topk")
    return w13, w2, x, w, ids


def _direct(experts, x, w, ids, expert_map=None):
    """The scheme's op called directly (not through fused_moe)."""
    name = experts.scheme.name
    op = getattr(torch.ops.moe_quant, f"experts_{name}")
    return op(x, w, ids, *SIGNATURES[name].flatten(experts), expert_map, "silu", experts.layout.value, False)


# --- 1. routing tensors on another device (meta) ------------------------------

@pytest.mark.parametrize("call", [tmq.fused_moe, _direct], ids=["fused_moe", "op"])
def test_1_routing_tensors_on_meta_are_rejected(call):
    w13, w2, x, w, ids = _layer()
    experts = tmq.quantize_experts(w13, w2, "bf16")
    with pytest.raises(ValueError, match=r"topk_ids is on meta but hidden_states is on cpu"):
        call(experts, x, w, ids.to("meta")) if call is _direct else call(x, experts, w, ids.to("meta"))
    with pytest.raises(ValueError, match=r"topk_weights is on meta but hidden_states is on cpu"):
        call(experts, x, w.to("meta"), ids) if call is _direct else call(x, experts, w.to("meta"), ids)
    emap = torch.arange(E, dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match=r"expert_map is on meta but hidden_states is on cpu"):
        if call is _direct:
            call(experts, x, w, ids, expert_map=emap)
        else:
            call(x, experts, w, ids, expert_map=emap)


def test_1_all_meta_call_still_traces_shapes():
    """Everything on meta (a shape-only dry run) is consistent and allowed."""
    w13, w2, x, w, ids = _layer()
    experts = tmq.quantize_experts(w13, w2, "bf16").to("meta")
    out = tmq.fused_moe(x.to("meta"), experts, w.to("meta"), ids.to("meta"))
    assert out.device.type == "meta" and out.shape == (M, H)


# --- 3. int4 zero points near the fp32 limit -----------------------------------

@pytest.mark.parametrize("scheme", ["int4_w4a16_g128_zp", "int4_w4a16_gptq_g128_actorder", "int4_w4a16_g128", "int8_w8a16_channel"])
def test_3_huge_finite_weights_raise_or_stay_finite(scheme):
    """Finite weights near the fp32 limit: a ValueError naming w13, or
    weights that decode to finite values (was: NaN for the zero-point schemes)."""
    g = torch.Generator().manual_seed(3)
    w13, w2 = torch.randn(2, 256, 128, generator=g), torch.randn(2, 128, 128, generator=g)
    raised = 0
    for v in (1e37, 1.6e38, 3e38, 3.4e38):
        big = w13.clone()
        big[0, 0, 0], big[0, 0, 1] = v, -v
        try:
            q = tmq.quantize_experts(big, w2, scheme)
        except ValueError as e:
            assert str(e).startswith("w13: x has values of magnitude"), e
            raised += 1
            continue
        assert torch.isfinite(formats.dequantize(q.w13)).all(), v
    assert raised >= 1  # 3.4e38 cannot be represented by any of these grids


# --- 4. nvfp4 on float16 weights of small magnitude ----------------------------

def test_4_nvfp4_fp16_small_weights_keep_their_global_scale():
    g = torch.Generator().manual_seed(4)
    w13 = torch.randn(E, 2 * I, H, generator=g) * 0.005
    w2 = torch.randn(E, H, I, generator=g) * 0.005
    q16 = tmq.quantize_experts(w13.half(), w2.half(), "nvfp4_w4a16")
    q32 = tmq.quantize_experts(w13.half().float(), w2.half().float(), "nvfp4_w4a16")
    for a, b in ((q16.w13, q32.w13), (q16.w2, q32.w2)):
        assert torch.equal(a.global_scale, b.global_scale) and (a.global_scale != 1.0).all()
        assert torch.equal(a.data, b.data)
    db = sqnr_db(w13.half().float(), formats.dequantize(q16.w13))
    assert db > 15.0, db  # was 0.4 dB (global scale 1.0, 96% zero codes)


# --- 5. loaders ----------------------------------------------------------------

def _ct_config(weights: dict, fmt: str) -> dict:
    return {
        "quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
    }


def _int4_asym_state(drop_zero_points=False):
    """A pack-quantized asymmetric int4 g128 checkpoint written with our formats
    (the compressed-tensors layout: codes + 8 packed along K, zero points
    packed along N)."""
    g = torch.Generator().manual_seed(5)
    state = {}
    for e in range(2):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            n = k = 128  # the zero-point scheme groups 128 along K
            q = formats.quantize(torch.randn(n, k, generator=g), Format.INT4, PerGroup(128), mode=formats.Int4Mode.ASYMMETRIC)
            m = f"{PREFIX}.{e}.{proj}"
            state[f"{m}.weight_packed"] = q.data
            state[f"{m}.weight_scale"] = q.scale
            state[f"{m}.weight_shape"] = torch.tensor([n, k])
            if not drop_zero_points:
                zp = formats.int4.pack_nibbles((q.zero_point.to(torch.int32) + 8).T).T.contiguous()
                state[f"{m}.weight_zero_point"] = zp
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 128}
    return state, _ct_config(weights, "pack-quantized")


def test_5_asymmetric_checkpoint_without_zero_points_is_rejected():
    state, config = _int4_asym_state()
    assert load_experts(state, PREFIX, config).scheme.weight.zero_point.value == "asymmetric"
    state, config = _int4_asym_state(drop_zero_points=True)
    with pytest.raises(ValueError, match=r"missing tensor '.*\.0\.gate_proj\.weight_zero_point'.*asymmetric"):
        load_experts(state, PREFIX, config)


def _fp8_state(scale_value=None, where="1.up_proj"):
    g = torch.Generator().manual_seed(6)
    state = {}
    for e in range(2):
        for proj, (n, k) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            q = formats.quantize(torch.randn(n, k, generator=g), Format.FP8_E4M3, "channel")
            m = f"{PREFIX}.{e}.{proj}"
            state[f"{m}.weight"] = q.data
            state[f"{m}.weight_scale"] = q.scale.bfloat16()
    if scale_value is not None:
        state[f"{PREFIX}.{where}.weight_scale"][3, 0] = scale_value
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
    return state, _ct_config(weights, "float-quantized")


@pytest.mark.parametrize("value", [float("nan"), 0.0, -0.5, float("inf")])
def test_5_bad_weight_scales_are_rejected_naming_the_key(value):
    state, config = _fp8_state(value)
    with pytest.raises(ValueError, match=rf"tensor '{PREFIX}\.1\.up_proj\.weight_scale' must be finite and > 0"):
        load_experts(state, PREFIX, config)


def _nvfp4_state(global_scale=None):
    g = torch.Generator().manual_seed(7)
    state = {}
    for e in range(2):
        shared = torch.tensor([[300.0]])  # gate and up share one global scale (w13 holds one)
        for proj, (n, k) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            q = formats.quantize(torch.randn(n, k, generator=g), Format.NVFP4, global_scale=shared)
            m = f"{PREFIX}.{e}.{proj}"
            state[f"{m}.weight_packed"] = q.data
            state[f"{m}.weight_scale"] = q.scale
            state[f"{m}.weight_global_scale"] = q.global_scale.reshape(1)
    if global_scale is not None:  # gate and up must share it: set both
        for proj in ("gate_proj", "up_proj"):
            state[f"{PREFIX}.0.{proj}.weight_global_scale"] = torch.tensor([global_scale])
    weights = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16}
    return state, _ct_config(weights, "nvfp4-pack-quantized")


@pytest.mark.parametrize("value", [0.0, float("nan"), -2.0, float("inf")])
def test_5_nvfp4_global_scale_must_be_finite_and_positive(value):
    state, config = _nvfp4_state()
    assert load_experts(state, PREFIX, config).scheme.name == "nvfp4_w4a16"
    state, config = _nvfp4_state(value)
    with pytest.raises(ValueError, match=rf"tensor '{PREFIX}\.0\.gate_proj\.weight_global_scale' must be finite and > 0"):
        load_experts(state, PREFIX, config)


def _gpt_oss_state(nan_byte=False):
    g = torch.Generator().manual_seed(8)
    q13 = formats.quantize(torch.randn(2, 2 * I, H, generator=g), Format.MXFP4)
    q2 = formats.quantize(torch.randn(2, H, I, generator=g), Format.MXFP4)
    scales = q13.scale.clone()
    if nan_byte:
        scales[1, 2, 0] = 255
    return {
        f"{PREFIX}.gate_up_proj_blocks": q13.data.reshape(2, 2 * I, H // 32, 16),
        f"{PREFIX}.gate_up_proj_scales": scales,
        f"{PREFIX}.gate_up_proj_bias": torch.zeros(2, 2 * I),
        f"{PREFIX}.down_proj_blocks": q2.data.reshape(2, H, I // 32, 16),
        f"{PREFIX}.down_proj_scales": q2.scale,
        f"{PREFIX}.down_proj_bias": torch.zeros(2, H),
    }


def test_5_e8m0_nan_byte_is_rejected():
    assert load_gpt_oss_experts(_gpt_oss_state(), PREFIX).num_experts == 2
    with pytest.raises(ValueError, match=rf"'{PREFIX}\.gate_up_proj_scales' holds the e8m0 NaN byte 255 .*\(1, 2, 0\)"):
        load_gpt_oss_experts(_gpt_oss_state(nan_byte=True), PREFIX)


def test_5_key_in_two_shards_is_rejected(tmp_path):
    state = _gpt_oss_state()
    keys = sorted(state)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({k: state[k].contiguous() for k in keys[:3]}, str(a))
    save_file({k: state[k].contiguous() for k in keys[2:]}, str(b))
    with pytest.raises(ValueError, match=rf"checkpoint key '{keys[2]}' is in two files: .*a\.safetensors.* and .*b\.safetensors"):
        load_gpt_oss_experts([str(a), str(b)], PREFIX)
    save_file({k: state[k].contiguous() for k in keys[3:]}, str(b))
    assert load_gpt_oss_experts([str(a), str(b)], PREFIX).num_experts == 2


def test_5_truncated_shard_names_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in _gpt_oss_state().items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*(cannot be read|truncated)"):
        load_gpt_oss_experts(str(path), PREFIX)
    path.write_bytes(data[:5])  # not even a header
    with pytest.raises(ValueError, match=r"checkpoint file .*model\.safetensors' cannot be read as safetensors"):
        load_gpt_oss_experts(str(path), PREFIX)


# --- 6. static nvfp4 global scale, infinite router logits -----------------------

@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf"), -1.0])
def test_6_quantize_nvfp4_static_global_scale(value):
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match=r"global_scale must be finite and > 0"):
        torch.ops.moe_quant.quantize_nvfp4(x, torch.tensor([value]))
    data, scale, gs = torch.ops.moe_quant.quantize_nvfp4(x, torch.tensor([100.0]))
    assert torch.isfinite(torch.ops.moe_quant.dequantize_nvfp4(data, scale, gs)).all()


@pytest.mark.parametrize("method", [m.value for m in tmq.RoutingMethod])
def test_6_route_rejects_inf_logits(method):
    logits = torch.randn(3, 8)
    plus = logits.clone()
    plus[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"router_logits contains \+inf"):
        tmq.route(plus, 2, method)
    minus = logits.clone()
    minus[2] = float("-inf")
    with pytest.raises(ValueError, match=r"router_logits has a token whose logits are all -inf"):
        tmq.route(minus, 2, method)
    with pytest.raises(ValueError, match=r"router_logits has a token whose logits are all -inf"):
        torch.ops.moe_quant.route(minus, 2, method)
    # a masked expert (-inf beside finite logits) is fine and never chosen
    masked = logits.clone()
    masked[:, 0] = float("-inf")
    w, ids = tmq.route(masked, 2, method)
    assert torch.isfinite(w).all() and (ids != 0).all()


# --- 7. the experts ops: width and dtype ---------------------------------------

def test_7_op_rejects_narrower_hidden_states():
    w13, w2, x, w, ids = _layer()
    experts = tmq.quantize_experts(w13, w2, "fp8_w8a16_channel")
    with pytest.raises(ValueError, match=r"hidden_states must have shape \[num_tokens, 64\].*got \(5, 32\)"):
        _direct(experts, x[:, :32], w, ids)
    with pytest.raises(ValueError, match=r"hidden_states must have shape \[num_tokens, 64\]"):
        tmq.fused_moe(x[:, :32], experts, w, ids)


def test_7_padded_experts_still_take_the_logical_width():
    g = torch.Generator().manual_seed(9)
    w13, w2 = torch.randn(E, 2 * 60, 100, generator=g) / 10, torch.randn(E, 100, 60, generator=g) / 8
    x = torch.randn(M, 100, generator=g)
    w, ids = tmq.route(torch.randn(M, E, generator=g), 2, "softmax_topk")
    experts = tmq.quantize_experts(w13, w2, "mxfp4_w4a16", pad_to=32)
    out = tmq.fused_moe(x, experts, w, ids)
    assert out.shape == (M, 100)
    padded = _direct(experts, torch.nn.functional.pad(x, (0, 28)), w, ids)
    assert torch.equal(out, padded[:, :100])
    with pytest.raises(ValueError, match=r"hidden_states must have shape \[num_tokens, 128\]"):
        _direct(experts, x, w, ids)


def _static(scheme):
    s = tmq.get_scheme(scheme)
    return dict(a13_scale=0.02, a2_scale=0.02) if s.static_activation else {}


@pytest.mark.parametrize("scheme", sorted(tmq.SCHEMES))
def test_7_float64_hidden_states_run_every_scheme(scheme):
    w13, w2, x, w, ids = _layer(h=128, inter=128)
    experts = tmq.quantize_experts(w13, w2, scheme, **_static(scheme))
    out64 = _direct(experts, x.double(), w, ids)
    out32 = _direct(experts, x, w, ids)
    assert out64.dtype == torch.float64
    assert torch.isfinite(out64).all()
    assert (out64 - out32.double()).norm() <= 1e-5 * out32.double().norm() + 1e-6


# --- 8. lowerings under autograd, quantize_ messages ------------------------------

@pytest.mark.slow
def test_8_lowerings_rewrite_inference_graphs_only(lowered):
    """Documented (README, Lowerings): with autograd recording (parameters
    that require grad, no torch.no_grad()) Inductor compiles a training graph,
    which the lowerings leave alone, saying so in a warning; under
    torch.no_grad() / inference_mode the same code is rewritten."""
    from torch._dynamo.utils import counters

    router = torch.nn.Linear(16, 8)

    def qwen3_router(x):
        probs = torch.nn.functional.softmax(router(x), dtype=torch.float, dim=-1)
        value, index = torch.topk(probs, 2, dim=-1)
        return value / value.sum(dim=-1, keepdim=True), index

    x = torch.randn(5, 16)
    compiled = torch.compile(qwen3_router, fullgraph=True)
    with pytest.warns(UserWarning, match="compiled for training .* torch.no_grad"):
        compiled(x)
    assert dict(counters["moe_quant"]) == {}
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        w, ids = compiled(x)
    assert dict(counters["moe_quant"]) == {"softmax_topk_renormalize": 1}
    ref_w, ref_ids = qwen3_router(x)
    assert torch.equal(ids.long(), ref_ids) and torch.allclose(w, ref_w)


def test_8_quantize_twice_names_the_quantized_modules():
    model = _TwoLayers()
    tmq.quantize_(model, "fp8_w8a16_channel", progress="never")
    with pytest.raises(ValueError, match=r"already quantized \(layers\.0\.experts \(fp8_w8a16_channel\), layers\.1\.experts"):
        tmq.quantize_(model, "mxfp4_w4a16", progress="never")


def test_8_dense_model_summary(caplog):
    dense = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with caplog.at_level(logging.WARNING):
        summary = tmq.quantize_(dense, "fp8_w8a16_channel", progress="never")
    assert summary.num_converted == 0
    assert "nan" not in str(summary) and "no expert modules converted" in str(summary)
    assert "no MoE expert modules found" in caplog.text


class _Experts(torch.nn.Module):
    """A fused 3-D experts module (transformers v5 layout, silu)."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate_up_proj = torch.nn.Parameter(torch.randn(E, 2 * I, H, generator=g) / H**0.5)
        self.down_proj = torch.nn.Parameter(torch.randn(E, H, I, generator=g) / I**0.5)
        self.act_fn = torch.nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        experts = tmq.quantize_experts(self.gate_up_proj.detach(), self.down_proj.detach(), "fp32")
        return tmq.fused_moe(hidden_states, experts, top_k_weights, top_k_index)


class _Layer(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.router = torch.nn.Linear(H, E, bias=False)
        self.experts = _Experts(seed)

    def forward(self, x):
        w, ids = tmq.route(self.router(x), 2, "softmax_topk_renormalize")
        return x + self.experts(x, ids, w.to(x.dtype))


class _TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([_Layer(1), _Layer(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


# --- 9. unclear errors ---------------------------------------------------------

def test_9_zero_experts():
    for scheme in ("bf16", "int4_w4a16_g32", "mxfp4_w4a16"):
        with pytest.raises(ValueError, match=r"w13 must hold at least one expert"):
            tmq.quantize_experts(torch.randn(0, 64, 64), torch.randn(0, 64, 32), scheme)


@pytest.mark.parametrize("scheme", ["int4_w4a16_g32", "int4_w4a16_gptq_g128_actorder", "int8_w8a16_channel", "int8_w8a8_channel_token", "fp8_w8a16_channel"])
def test_9_meta_weights_build_meta_experts(scheme):
    w13 = torch.empty(E, 256, 128, device="meta")
    w2 = torch.empty(E, 128, 128, device="meta")
    experts = tmq.quantize_experts(w13, w2, scheme)
    assert experts.w13.data.is_meta and experts.num_experts == E
    out = tmq.fused_moe(torch.empty(3, 128, device="meta"), experts,
                        torch.empty(3, 2, device="meta"), torch.empty(3, 2, dtype=torch.int32, device="meta"))
    assert out.shape == (3, 128) and out.is_meta


@pytest.mark.parametrize("op", ["quantize_fp8", "quantize_int8", "quantize_mxfp4", "quantize_nvfp4"])
def test_9_quantize_ops_reject_empty_k_and_take_zero_rows(op):
    fn = getattr(torch.ops.moe_quant, op)
    with pytest.raises(ValueError, match=r"x must have K >= 1"):
        fn(torch.randn(4, 0))
    outs = fn(torch.randn(0, 64))
    assert outs[0].shape[0] == 0
    if op in ("quantize_fp8", "quantize_int8"):  # per-tensor over no rows: the all-zero scale rule
        data, scale = fn(torch.randn(0, 64), "tensor")
        assert data.shape == (0, 64) and torch.isfinite(scale).all() and (scale > 0).all()


def test_9_non_numeric_static_scale():
    w13, w2, *_ = _layer()
    with pytest.raises(TypeError, match=r"a13_scale must be a float or a float tensor, got str"):
        tmq.quantize_experts(w13, w2, "fp8_w8a8_tensor_static", a13_scale="abc", a2_scale=1.0)
    with pytest.raises(TypeError, match=r"a2_scale must be a float tensor, got dtype torch.int64"):
        tmq.quantize_experts(w13, w2, "fp8_w8a8_tensor_static", a13_scale=1.0, a2_scale=torch.tensor(3))


@pytest.mark.parametrize("field,value", [("num_bits", "four"), ("group_size", 32.5), ("num_bits", None), ("block_structure", "128xabc")])
def test_9_loader_config_fields_are_named(field, value):
    state, config = _int4_asym_state()
    config["config_groups"]["group_0"]["weights"][field] = value
    with pytest.raises(ValueError, match=rf"config_groups\['group_0'\]\.weights\.{field} must be"):
        load_compressed_tensors_experts(state, PREFIX, config)


# --- README "Errors": NaN / inf in activations stay in their token ----------------

@pytest.mark.parametrize("scheme", sorted(tmq.SCHEMES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activation_stays_in_its_token(scheme, bad):
    w13, w2, x, w, ids = _layer(e=2, h=128, inter=128)
    experts = tmq.quantize_experts(w13, w2, scheme, **_static(scheme))
    clean = tmq.fused_moe(x, experts, w, ids)
    poisoned = x.clone()
    poisoned[1, 5] = bad
    s = tmq.get_scheme(scheme)
    if s.activation is not None and s.activation.fmt is Format.INT8:  # no NaN code: the reference refuses
        with pytest.raises(ValueError, match=r"must be finite for integer quantization"):
            tmq.fused_moe(poisoned, experts, w, ids)
        return
    out = tmq.fused_moe(poisoned, experts, w, ids)
    keep = torch.arange(M) != 1
    assert torch.equal(out[keep], clean[keep])
    assert torch.isfinite(clean).all()


# --- 5. the same checks on quantized weights given to quantize_experts ------------

def test_5_quantized_weights_are_value_checked_at_construction():
    import dataclasses

    w13, w2, x, w, ids = _layer(h=128, inter=128)
    mx = tmq.quantize_experts(w13, w2, "mxfp4_w4a16")
    bad = mx.w13.scale.clone()
    bad[1, 4, 2] = 255
    with pytest.raises(ValueError, match=r"w13\.scale holds the e8m0 NaN byte 255 \(1 of \d+, first at index \(1, 4, 2\)\)"):
        tmq.quantize_experts(dataclasses.replace(mx.w13, scale=bad), mx.w2, "mxfp4_w4a16")
    act = tmq.quantize_experts(w13, w2, "int4_w4a16_gptq_g128_actorder")
    g_idx = act.w2.g_idx.clone()
    g_idx[0, 3] = 1  # only one group of 128 along K = 128
    with pytest.raises(ValueError, match=r"w2\.g_idx must lie in \[0, 1\)"):
        tmq.quantize_experts(act.w13, dataclasses.replace(act.w2, g_idx=g_idx), "int4_w4a16_gptq_g128_actorder")
    fp8 = tmq.quantize_experts(w13, w2, "fp8_w8a16_channel")
    neg = fp8.w2.scale.clone()
    neg[0, 0, 0] = -neg[0, 0, 0]
    with pytest.raises(ValueError, match=r"w2\.scale must be finite and > 0"):
        tmq.quantize_experts(fp8.w13, dataclasses.replace(fp8.w2, scale=neg), "fp8_w8a16_channel")
    # the ops rebuild their experts per call without reading values (no host sync)
    out = _direct(dataclasses.replace(fp8, w2=dataclasses.replace(fp8.w2, scale=neg)), x, w, ids)
    assert out.shape == x.shape
