"""``calibrate_`` (issue 17, Done-when 5): sample batches through the float
model fill the static activation scales, so ``quantize_`` of a static scheme
needs nothing else, and the logits stay within the scheme's SQNR floor."""

import copy

import pytest
import torch

import torch_moe_quant as tmq
from torch_moe_quant.nn.calibrate import activation_range, scales_from_range
from torch_moe_quant.tools.accuracy import sqnr_db

from transformers import AutoConfig, AutoModelForCausalLM  # the [test] extra: never skipped

COMMON = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=32, max_position_embeddings=64, tie_word_embeddings=False,
)
QWEN3 = dict(moe_intermediate_size=32, intermediate_size=64, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
EXPERTS = ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts")

#: logit SQNR floors (dB) of the calibrated static schemes on this 2-layer
#: model (2 x 8 tokens, calibrated on 4 other batches); measured on torch
#: 2.13 CPU: fp8 50.2, int8 58.1, nvfp4_w4a4 38.0, mxfp4_w4a8_fp8 39.8. The
#: fp8 floor is the scheme's own floor of tests/test_schemes.py (23 dB, one
#: layer); the others sit ~1 dB under the measurement.
LOGIT_FLOORS = {
    "fp8_w8a8_tensor_static": 23.0,
    "int8_w8a8_tensor_static": 57.0,
    "nvfp4_w4a4": 37.0,
    "mxfp4_w4a8_fp8": 38.5,
}


@pytest.fixture(scope="module")
def model_and_batches():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **COMMON, **QWEN3)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 8), generator=g) for _ in range(4)]
    test = torch.randint(0, 128, (2, 8), generator=g)
    with torch.no_grad():
        ref = model(test).logits
    return model, batches, test, ref


@pytest.mark.parametrize("scheme", sorted(LOGIT_FLOORS))
def test_calibrate_then_quantize_static_scheme(model_and_batches, scheme):
    model, batches, test, ref = model_and_batches
    model = copy.deepcopy(model)
    ranges = tmq.calibrate_(model, batches)
    assert sorted(ranges) == list(EXPERTS)
    for r in ranges.values():
        assert r.tokens == 4 * 16 and r.a13_amax > 0 and r.a2_amax > 0
    state_before = set(model.state_dict())
    summary = tmq.quantize_(model, scheme, progress="never")  # no activation_scales=
    assert summary.converted == EXPERTS
    assert set(model.state_dict()) - state_before  # the quantized buffers
    with torch.no_grad():
        db = sqnr_db(ref, model(test).logits)
    assert db >= LOGIT_FLOORS[scheme], f"{scheme}: {db:.1f} dB"


def test_calibrated_scales_equal_the_layer_calibration(model_and_batches):
    """The scales quantize_ takes from calibrate_ are calibrate_activation_scales'
    on the same inputs (the hidden states and routing each layer saw)."""
    model, batches, _, _ = model_and_batches
    # bf16 weights: calibrate_activation_scales runs its layer in bf16 weights
    model = copy.deepcopy(model).to(torch.bfloat16)
    experts = model.get_submodule(EXPERTS[0])
    seen = []
    handle = experts.register_forward_pre_hook(lambda m, args: seen.append(args))
    tmq.calibrate_(model, batches[:2])
    handle.remove()
    x = torch.cat([a[0] for a in seen])
    ids = torch.cat([a[1] for a in seen])
    w = torch.cat([a[2] for a in seen])
    for scheme in ("fp8_w8a8_tensor_static", "int8_w8a8_tensor_static", "nvfp4_w4a4"):
        s = tmq.get_scheme(scheme)
        want = tmq.calibrate_activation_scales(
            x.float(), experts.gate_up_proj.detach().float(), experts.down_proj.detach().float(), s, w.float(), ids,
        )
        got = scales_from_range(s, activation_range(experts), EXPERTS[0])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_given_scales_win_and_uncalibrated_modules_are_named(model_and_batches):
    model, batches, _, _ = model_and_batches
    model = copy.deepcopy(model)
    tmq.calibrate_(model, batches[:1], filter_fn=lambda m, fqn: fqn == EXPERTS[0])
    with pytest.raises(ValueError, match=rf"experts at '{EXPERTS[1]}' have none: run torch_moe_quant.calibrate_"):
        tmq.quantize_(model, "fp8_w8a8_tensor_static", progress="never")
    given = {EXPERTS[1]: (0.5, 0.25), EXPERTS[0]: (1.0, 2.0)}
    tmq.quantize_(model, "fp8_w8a8_tensor_static", activation_scales=given, progress="never")
    q = model.get_submodule(EXPERTS[0]).quantized_experts
    assert q.a13_scale.item() == 1.0 and q.a2_scale.item() == 2.0


def test_calibrate_errors():
    with pytest.raises(ValueError, match=r"no float MoE experts"):
        tmq.calibrate_(torch.nn.Linear(4, 4), [torch.randn(2, 4)])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **COMMON, **QWEN3)).eval()
    with pytest.raises(ValueError, match=r"batches is empty"):
        tmq.calibrate_(model, [])
    assert all(not h for h in (model.get_submodule(e)._forward_pre_hooks for e in EXPERTS))
