"""``quantize_`` and the ``"moe_quant"`` experts implementation on tiny
random transformers v5 models (no downloads): Qwen3-MoE, Mixtral, OLMoE,
gpt-oss (transposed, interleaved, biased, swigluoai) and DeepSeek-V3
(one dense layer, shared experts, grouped routing)."""

import copy
import functools
import io
import math

import pytest
import torch
from moe_cases import rel_err
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: E402

import torch_moe_quant as tmq  # noqa: E402
from torch_moe_quant.nn import (  # noqa: E402
    IMPLEMENTATION,
    TransformersQuantizedExperts,
    quantize_,
    register_transformers_experts,
    unregister_transformers_experts,
)

# H = 64 and I = 32: multiples of 32, so int4 g32 and the MX schemes fit unpadded.
COMMON = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=32, max_position_embeddings=64, tie_word_embeddings=False,
)
FAMILIES = {
    "qwen3_moe": dict(moe_intermediate_size=32, intermediate_size=64, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
    "mixtral": dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=32, num_experts=4, num_experts_per_tok=2, eos_token_id=None, pad_token_id=None),
    "gpt_oss": dict(
        intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"], sliding_window=16,
    ),
    "deepseek_v3": dict(
        num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, intermediate_size=64,
        n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
        n_shared_experts=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=16, qk_nope_head_dim=16,
        v_head_dim=16,
    ),
}
EXPERTS_CLASS = {
    "qwen3_moe": "Qwen3MoeExperts", "mixtral": "MixtralExperts", "olmoe": "OlmoeExperts",
    "gpt_oss": "GptOssExperts", "deepseek_v3": "DeepseekV3Experts",
}
SCHEMES = ["bf16", "fp8_w8a16_channel", "int4_w4a16_g32", "mxfp4_w4a16"]

# SQNR (dB) vs the float model, floors ~1 dB below the minimum measured over
# the five families (measured here: torch 2.13 CPU, seed 0):
# * EXPERT_FLOORS: each swapped module vs the module it replaced, same call
#   (64 unit-normal tokens, random top-2 routing), worst layer. Measured:
#   bf16 50.6, fp8_w8a16_channel 27.2, fp8_w8a8_channel_token 24.4 (qwen3_moe
#   only), int4_w4a16_g32 15.6, mxfp4_w4a16 13.9 (gpt-oss ~1.5 dB higher).
# * LOGIT_FLOORS: logits of the whole model (2 x 8 tokens). The residual
#   stream dominates a tiny random model, so these are higher; gpt-oss is the
#   lowest family: bf16 62.1, fp8_w8a16 38.4, int4 g32 26.2, mxfp4 24.2;
#   fp8_w8a8_channel_token 50.2 (qwen3_moe).
EXPERT_FLOORS = {
    "bf16": 49.5,
    "fp8_w8a16_channel": 26.0,
    "fp8_w8a8_channel_token": 23.5,
    "int4_w4a16_g32": 14.5,
    "mxfp4_w4a16": 13.0,
}
LOGIT_FLOORS = {
    "bf16": 61.0,
    "fp8_w8a16_channel": 37.0,
    "fp8_w8a8_channel_token": 49.0,
    "int4_w4a16_g32": 25.0,
    "mxfp4_w4a16": 23.0,
}


def sqnr_db(out, ref) -> float:
    return -20 * math.log10(max(rel_err(out, ref), 1e-30))


@functools.lru_cache(maxsize=None)
def _float_model(family: str, seed: int = 0, **overrides):
    config = AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family], **dict(overrides)})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def model_for(family: str, seed: int = 0, **overrides):
    return copy.deepcopy(_float_model(family, seed, **overrides))


INPUT_IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


def logits(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS, use_cache=False, **kwargs).logits


def experts_modules(model, cls_name):
    return {n: m for n, m in model.named_modules() if type(m).__name__ == cls_name}


def _routing_inputs(num_experts: int, hidden: int, m: int = 64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, hidden, generator=g)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:2] for _ in range(m)])
    w = torch.rand(m, 2, generator=g).softmax(-1)
    return x, ids, w


class OpRecorder(TorchDispatchMode):
    """Records the names of the ops dispatched while active."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------
# quantize_


CASES = [(f, s) for f in FAMILIES for s in SCHEMES] + [("qwen3_moe", "fp8_w8a8_channel_token")]


@pytest.mark.parametrize("family,scheme", CASES)
def test_quantize_swaps_experts_and_keeps_the_model_close(family, scheme):
    model = model_for(family)
    ref = logits(model)
    originals = experts_modules(model, EXPERTS_CLASS[family])
    others = {k: v.clone() for k, v in model.state_dict().items() if ".experts." not in k}
    expected_layers = 1 if family == "deepseek_v3" else 2
    assert len(originals) == expected_layers

    summary = quantize_(model, scheme)

    assert summary.converted == tuple(originals) and summary.num_converted == expected_layers
    assert summary.bytes_before > summary.bytes_after > 0
    swapped = {n: m for n, m in model.named_modules() if isinstance(m, TransformersQuantizedExperts)}
    assert list(swapped) == list(originals)
    assert not experts_modules(model, EXPERTS_CLASS[family])
    # routers, shared experts, attention, norms: untouched
    after = {k: v for k, v in model.state_dict().items() if ".experts." not in k}
    assert after.keys() == others.keys() and all(torch.equal(after[k], others[k]) for k in others)
    if family == "gpt_oss":
        m = next(iter(swapped.values()))
        assert (m.activation, m.layout) == (tmq.Activation.SWIGLUOAI, tmq.GateUpLayout.INTERLEAVED)
        assert m.w13_bias is not None and m.w2_bias is not None

    # each swapped module against the module it replaced, same call
    for fqn, new in swapped.items():
        old = originals[fqn]
        x, ids, w = _routing_inputs(new.num_experts, new.hidden_size)
        with torch.no_grad():
            want, got = old(x, ids, w), new(x, ids, w)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert sqnr_db(got, want) >= EXPERT_FLOORS[scheme], (fqn, sqnr_db(got, want))

    out = logits(model)
    if scheme == "bf16":
        assert rel_err(out, ref) < 1e-2
    assert sqnr_db(out, ref) >= LOGIT_FLOORS[scheme], sqnr_db(out, ref)


def test_activation_comes_from_the_config():
    model = model_for("qwen3_moe", hidden_act="gelu_pytorch_tanh")
    ref = logits(model)
    quantize_(model, "bf16")
    assert model.model.layers[0].mlp.experts.activation is tmq.Activation.GELU_TANH
    assert rel_err(logits(model), ref) < 1e-2
    model = model_for("qwen3_moe", hidden_act="gelu_fast")
    with pytest.raises(ValueError, match="unsupported activation.*model.layers.0.mlp.experts.*FastGELU"):
        quantize_(model, "bf16")
    quantize_(model, "bf16", activation="gelu_tanh")  # close to gelu_fast: the user's call


@pytest.mark.parametrize("family,scheme", [("qwen3_moe", "mxfp4_w4a16"), ("gpt_oss", "fp8_w8a8_channel_token")])
def test_state_dict_roundtrip_into_a_fresh_quantized_model(family, scheme, tmp_path):
    from safetensors.torch import load_file, save_file

    src = model_for(family)
    quantize_(src, scheme)
    want = logits(src)
    sd = src.state_dict()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    buf = io.BytesIO()
    torch.save(sd, buf)

    for load in (lambda: load_file(str(path)), lambda: (buf.seek(0), torch.load(buf))[1]):
        dst = model_for(family, seed=1)
        quantize_(dst, scheme)
        assert not torch.equal(logits(dst), want)
        dst.load_state_dict(load(), strict=True)
        assert torch.equal(logits(dst), want)


def test_model_dtype_cast_keeps_quantized_storage():
    model = model_for("qwen3_moe")
    quantize_(model, "fp8_w8a16_channel")
    want = logits(model)
    experts = model.model.layers[0].mlp.experts
    dtypes = {k: v.dtype for k, v in experts.state_dict().items()}
    assert dtypes == {"w13": torch.float8_e4m3fn, "w13_scale": torch.float32, "w2": torch.float8_e4m3fn, "w2_scale": torch.float32}
    model.to(torch.bfloat16)
    assert {k: v.dtype for k, v in experts.state_dict().items()} == dtypes
    assert model.lm_head.weight.dtype == torch.bfloat16
    out = logits(model)
    assert out.dtype == torch.bfloat16 and rel_err(out, want) < 5e-2


def test_compile_fullgraph_quantized_model():
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    model = model_for("qwen3_moe")
    quantize_(model, "mxfp4_w4a16")
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():  # compiled before any eager call: nothing was warmed up
        out, code = run_and_get_code(compiled, INPUT_IDS, use_cache=False)
    assert rel_err(out.logits, logits(model)) < 1e-4
    calls = [line for line in "\n".join(code).splitlines() if "= torch.ops.moe_quant.experts_mxfp4_w4a16.default(" in line]
    assert len(calls) == 2, calls  # one per MoE layer
    torch._dynamo.reset()


# ---------------------------------------------------------------------------
# the "moe_quant" experts implementation


@pytest.fixture
def registered():
    assert IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS, "registered at import time"
    register_transformers_experts()
    yield
    unregister_transformers_experts()
    assert IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS


def test_implementation_needs_explicit_registration():
    assert IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS
    model = model_for("qwen3_moe")
    with pytest.raises(ValueError, match="moe_quant"):
        model.set_experts_implementation("moe_quant")


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_experts_interface_routes_through_moe_quant_ops(family, registered):
    model = model_for(family)
    ref = logits(model)
    model.set_experts_implementation("moe_quant")
    assert model.config._experts_implementation == "moe_quant"
    with OpRecorder() as rec:
        out = logits(model)
    assert rec.ops.count("moe_quant.experts_fp32.default") == 2
    assert rel_err(out, ref) < 1e-5  # fp32 weights run experts_fp32: only the summation order differs
    # built once per module, then cached
    experts = model.model.layers[0].mlp.experts
    cached = experts.__dict__["_moe_quant_experts_cache"]
    assert torch.equal(logits(model), out)
    assert experts.__dict__["_moe_quant_experts_cache"] is cached
    # an in-place update of the parameters invalidates the cache
    with torch.no_grad():
        experts.down_proj.mul_(2)
    assert not torch.equal(logits(model), out)
    assert experts.__dict__["_moe_quant_experts_cache"] is not cached
    with torch.no_grad():
        experts.down_proj.div_(2)
    # back to transformers' own implementation
    model.set_experts_implementation("grouped_mm")
    with OpRecorder() as rec:
        back = logits(model)
    assert not any(op.startswith("moe_quant") for op in rec.ops)
    assert rel_err(back, ref) < 1e-5


def test_experts_interface_from_config_and_compile(registered):
    config = AutoConfig.for_model("qwen3_moe", **{**COMMON, **FAMILIES["qwen3_moe"]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, experts_implementation="moe_quant").eval()
    assert model.config._experts_implementation == "moe_quant"
    want = logits(model)
    ref = logits(model_for("qwen3_moe"))
    assert rel_err(want, ref) < 1e-2  # same seed, same weights
    torch._dynamo.reset()
    backend = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        out = compiled(INPUT_IDS, use_cache=False).logits
    assert backend.frame_count == 1
    graph_ops = {str(n.target) for g in backend.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert "moe_quant.experts_fp32.default" in graph_ops
    assert rel_err(out, want) < 1e-5
    torch._dynamo.reset()


def test_quantized_model_ignores_the_switch(registered):
    model = model_for("mixtral")
    quantize_(model, "int4_w4a16_g32")
    want = logits(model)
    for impl in ("moe_quant", "eager", "grouped_mm"):
        model.set_experts_implementation(impl)
        assert torch.equal(logits(model), want)


def test_llama4_experts_are_refused_before_anything_changes():
    """Llama-4's experts run every expert on router-scaled inputs and take no
    routing arguments: quantize_ refuses them with a ValueError naming the
    module, and the model is left as it was (it used to report success and
    leave a model whose forward raised TypeError)."""
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4ForCausalLM

    torch.manual_seed(0)
    cfg = Llama4TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=1,
    )
    model = Llama4ForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 5))
    before = model(ids).logits
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"feed_forward\.experts.*Llama4TextExperts.*filter_fn"):
        tmq.quantize_(model, "int8_w8a16_channel")
    assert [type(m) for m in model.modules()] == types
    assert torch.equal(model(ids).logits, before)
