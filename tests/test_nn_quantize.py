"""torch_moe_quant.nn without transformers: ``QuantizedExpertsModule``
storage (buffers, dtype-frozen casts, state-dict / torch.save / safetensors
round trips) and ``quantize_`` on hand-written MoE blocks."""

import io
import math
import subprocess
import sys

import pytest
import torch
from moe_cases import make_experts, rel_err, routing
from torch import nn

import torch_moe_quant as tmq
from torch_moe_quant.nn import (
    ExpertView,
    Progress,
    QuantizedExpertList,
    QuantizedExpertsModule,
    TransformersQuantizedExperts,
    find_experts,
    quantize_,
)

# One scheme per storage shape: plain bf16, fp8 + fp32 scales, fp8 static
# scales, int4 with zero points / act-order g_idx, nvfp4 global scales, MX e8m0.
STORAGE_SCHEMES = [
    "bf16",
    "fp8_w8a8_channel_token",
    "fp8_w8a8_tensor_static",
    "int4_w4a16_g128_zp",
    "int4_w4a16_gptq_g128_actorder",
    "nvfp4_w4a4",
    "mxfp4_w4a16",
    "mxfp6_e2m3_w6a6",
]


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    return -20 * math.log10(max(rel_err(out, ref), 1e-30))


def _module(name: str, **kwargs) -> QuantizedExpertsModule:
    return QuantizedExpertsModule(make_experts(name, **kwargs), "silu")


def _tokens(m: int, h: int = 128, seed: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, h, generator=g).bfloat16()


def _run(mod, m=9):
    w, ids = routing(m)
    return mod(_tokens(m), w, ids)


def _state(mod):
    return {k: v.clone() for k, v in mod.state_dict().items()}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# ---------------------------------------------------------------------------
# QuantizedExpertsModule


@pytest.mark.parametrize("name", STORAGE_SCHEMES)
def test_module_matches_fused_moe_and_names_buffers_like_the_op(name):
    experts = make_experts(name)
    mod = QuantizedExpertsModule(experts, "silu")
    w, ids = routing(9)
    x = _tokens(9)
    assert torch.equal(mod(x, w, ids), tmq.fused_moe(x, experts, w, ids))
    # leading dims are flattened into tokens
    out3 = mod(x.view(3, 3, -1), w.view(3, 3, -1), ids.view(3, 3, -1))
    assert torch.equal(out3.view(9, -1), mod(x, w, ids))
    # the buffers are the op's tensor arguments, by name
    from torch_moe_quant.ops.experts import SIGNATURES

    sig = SIGNATURES[name]
    present = [n for n, t in zip(sig.weight_args + ("w13_bias", "w2_bias") + sig.static_args, sig.flatten(experts)) if t is not None]
    assert list(mod.state_dict()) == present
    # the view rebuilt from the buffers is the original container
    view = mod.quantized_experts
    assert [t is None for t in sig.flatten(view)] == [t is None for t in sig.flatten(experts)]
    for a, b in zip(sig.flatten(view), sig.flatten(experts)):
        assert a is None or _bits_equal(a, b)
    assert f"scheme={name}" in repr(mod)
    assert mod.nbytes == experts.nbytes


@pytest.mark.parametrize("name", STORAGE_SCHEMES)
def test_state_dict_roundtrips_bit_exactly(name, tmp_path):
    from safetensors.torch import load_file, save_file

    src = _module(name, seed=0)
    ref = _run(src)
    sd = src.state_dict()
    # torch.save / torch.load of the state dict
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    dst = _module(name, seed=1)
    assert not torch.equal(_run(dst), ref)
    dst.load_state_dict(torch.load(buf))
    assert torch.equal(_run(dst), ref)
    # safetensors
    path = tmp_path / "experts.safetensors"
    save_file(sd, str(path))
    dst2 = _module(name, seed=2)
    dst2.load_state_dict(load_file(str(path)))
    for k, v in sd.items():
        assert _bits_equal(dst2.state_dict()[k], v), k
    assert torch.equal(_run(dst2), ref)
    # the whole module pickles
    buf = io.BytesIO()
    torch.save(src, buf)
    buf.seek(0)
    whole = torch.load(buf, weights_only=False)
    assert torch.equal(_run(whole), ref)


@pytest.mark.parametrize("name", ["fp8_w8a8_channel_token", "fp8_w8a8_tensor_static", "int4_w4a16_g128_zp", "nvfp4_w4a4", "mxfp4_w4a16"])
def test_dtype_cast_of_the_model_keeps_quantized_storage(name):
    mod = _module(name)
    before = _state(mod)
    model = nn.Sequential(nn.Linear(4, 4), mod)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float(), lambda m: m.to("cpu", torch.float16)):
        cast(model)
        for k, v in model[1].state_dict().items():
            assert _bits_equal(v, before[k]), k
    assert model[0].weight.dtype == torch.float16
    out = _run(model[1])
    assert out.dtype == torch.bfloat16  # follows the input
    # device moves still apply: meta and back through to_empty
    model.to("meta")
    assert all(b.is_meta for b in model[1].buffers())
    assert {k: v.dtype for k, v in model[1].state_dict().items()} == {k: v.dtype for k, v in before.items()}
    model.to_empty(device="cpu")
    model[1].load_state_dict(before)
    assert torch.equal(_run(model[1]), _run(_module(name)))


def test_load_state_dict_rejects_another_dtype():
    mod = _module("fp8_w8a16_channel")
    sd = mod.state_dict()
    sd["w13_scale"] = sd["w13_scale"].bfloat16()
    with pytest.raises(RuntimeError, match="w13_scale.*never cast"):
        mod.load_state_dict(sd)
    sd = mod.state_dict()
    sd["w13"] = sd["w13"].float()
    with pytest.raises(RuntimeError, match="w13"):
        mod.load_state_dict(sd)


def test_module_argument_errors():
    with pytest.raises(TypeError, match="experts must be a QuantizedExperts"):
        QuantizedExpertsModule(torch.zeros(1))
    with pytest.raises(ValueError, match="non-gated"):
        QuantizedExpertsModule(make_experts("bf16"), "relu2")
    with pytest.raises(ValueError, match="activation must be one of"):
        QuantizedExpertsModule(make_experts("bf16"), "tanh")


# ---------------------------------------------------------------------------
# quantize_ on hand-written blocks


class LinearExpert(nn.Module):
    """Mixtral v4 style expert: w2(act(w1 x) * w3 x)."""

    def __init__(self, h, i, names=("w1", "w3", "w2"), bias=False, act=None):
        super().__init__()
        g, u, d = names
        setattr(self, g, nn.Linear(h, i, bias=bias))
        setattr(self, u, nn.Linear(h, i, bias=bias))
        setattr(self, d, nn.Linear(i, h, bias=bias))
        self.names = names
        self.act_fn = act if act is not None else nn.SiLU()

    def forward(self, x):
        g, u, d = (getattr(self, n) for n in self.names)
        return d(self.act_fn(g(x)) * u(x))


class ListMoE(nn.Module):
    """A hand-written Mixtral-style block: router, top-k softmax, a loop over
    a ModuleList of experts (the eager code transformers v4 used)."""

    def __init__(self, h=64, i=32, e=4, k=2, **expert_kwargs):
        super().__init__()
        self.gate = nn.Linear(h, e, bias=False)
        self.experts = nn.ModuleList(LinearExpert(h, i, **expert_kwargs) for _ in range(e))
        self.shared = LinearExpert(h, i)  # not an expert list: left alone
        self.k = k

    def forward(self, x):
        logits = self.gate(x)
        w, ids = torch.topk(logits.float().softmax(-1), self.k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(ids == e)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        return out + self.shared(x)


class FusedExperts(nn.Module):
    """A non-transformers fused experts module (3-D parameters)."""

    def __init__(self, e, h, i, transposed=False):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        w13 = torch.randn(e, 2 * i, h, generator=g) / h**0.5
        w2 = torch.randn(e, h, i, generator=g) / i**0.5
        if transposed:
            w13, w2 = w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
        self.gate_up_proj, self.down_proj = nn.Parameter(w13), nn.Parameter(w2)
        self.act_fn = nn.GELU(approximate="tanh")
        self.transposed = transposed

    def forward(self, x, top_k_index, top_k_weights):
        w13, w2 = self.gate_up_proj, self.down_proj
        if self.transposed:
            w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
        h = torch.einsum("th,eih->tei", x, w13)
        gate, up = h.chunk(2, dim=-1)
        y = torch.einsum("tei,ehi->teh", self.act_fn(gate) * up, w2)
        sel = y.gather(1, top_k_index[..., None].expand(-1, -1, y.shape[-1]))
        return (sel * top_k_weights[..., None]).sum(1)


class FusedMoE(nn.Module):
    def __init__(self, e=4, h=64, i=32, transposed=False):
        super().__init__()
        self.router = nn.Linear(h, e, bias=False)
        self.experts = FusedExperts(e, h, i, transposed)

    def forward(self, x):
        w, ids = torch.topk(self.router(x).softmax(-1), 2, dim=-1)
        return self.experts(x, ids, w)


def _x(m=16, h=64, seed=3):
    return torch.randn(m, h, generator=torch.Generator().manual_seed(seed))


def _routed(block, x):
    """The block's routed-experts part (its float shared expert subtracted)."""
    return block(x) - block.shared(x)


# SQNR of the routed part vs the float block (E=4, H=64, I=32, 16 tokens,
# nn.Linear init, seed 0), measured: bf16 51.5, fp8 w8a16 channel 27.5,
# int4 g32 18.7, mxfp4 12.3 dB; floors ~1 dB below
LIST_FLOORS = {"bf16": 50.0, "fp8_w8a16_channel": 26.5, "int4_w4a16_g32": 17.5, "mxfp4_w4a16": 11.5}


@pytest.mark.parametrize("scheme", sorted(LIST_FLOORS))
def test_quantize_modulelist_of_linear_experts(scheme):
    torch.manual_seed(0)
    block = ListMoE()
    x = _x()
    ref = _routed(block, x)
    shared = block.shared
    summary = quantize_(block, scheme)
    assert summary.converted == ("experts",) and summary.num_converted == 1
    assert isinstance(block.experts, QuantizedExpertList) and block.shared is shared
    assert block.experts.activation is tmq.Activation.SILU
    assert summary.bytes_before == 4 * 3 * 64 * 32 * 4 and summary.bytes_after == block.experts.nbytes
    # the list interface the block's forward uses
    assert len(block.experts) == 4 and isinstance(block.experts[1], ExpertView)
    assert len(list(block.experts)) == 4 and len(block.experts[1:3]) == 2
    out = _routed(block, x)
    assert sqnr_db(out, ref) >= LIST_FLOORS[scheme], sqnr_db(out, ref)
    # the fused call on the same routing equals the per-expert loop
    w, ids = torch.topk(block.gate(x).float().softmax(-1), 2, dim=-1)
    fused = block.experts(x, w / w.sum(-1, keepdim=True), ids)
    assert rel_err(fused, out) < 1e-5


def test_quantize_gate_proj_names_with_bias():
    torch.manual_seed(0)
    block = ListMoE(names=("gate_proj", "up_proj", "down_proj"), bias=True, act=nn.GELU())
    x = _x()
    ref = _routed(block, x)
    quantize_(block, "bf16")
    assert block.experts.activation is tmq.Activation.GELU
    assert block.experts.w13_bias is not None and block.experts.w2_bias is not None
    assert sqnr_db(_routed(block, x), ref) > 50  # measured 54.3 dB


@pytest.mark.parametrize("transposed", [False, True])
def test_quantize_fused_module_outside_transformers(transposed):
    block = FusedMoE(transposed=transposed)
    x = _x()
    ref = block(x)
    summary = quantize_(block, "fp8_w8a16_channel")
    assert isinstance(block.experts, TransformersQuantizedExperts)
    assert summary.converted == ("experts",)
    assert block.experts.activation is tmq.Activation.GELU_TANH
    assert sqnr_db(block(x), ref) > 26  # measured 26.96 (untransposed) dB


def test_filter_fn_selects_modules():
    model = nn.ModuleDict({"a": ListMoE(), "b": ListMoE()})
    assert [f.fqn for f in find_experts(model)] == ["a.experts", "b.experts"]
    summary = quantize_(model, "bf16", filter_fn=lambda m, fqn: fqn.startswith("b."))
    assert summary.converted == ("b.experts",)
    assert isinstance(model["a"].experts, nn.ModuleList) and isinstance(model["b"].experts, QuantizedExpertList)
    # already converted modules are not found again
    assert [f.fqn for f in find_experts(model)] == ["a.experts"]


def test_static_scheme_needs_scales_and_leaves_model_untouched():
    torch.manual_seed(0)
    block = ListMoE()
    x = _x()
    with pytest.raises(ValueError, match="static scales.*activation_scales"):
        quantize_(block, "fp8_w8a8_tensor_static")
    assert isinstance(block.experts, nn.ModuleList)
    with pytest.raises(ValueError, match="only for static-activation"):
        quantize_(block, "fp8_w8a8_channel_token", activation_scales={})
    ref = _routed(block, x)
    scales = (torch.tensor(4.0 / 448), torch.tensor(1.0 / 448))
    with pytest.raises(ValueError, match=r"does not convert: \['expert'\]"):
        quantize_(block, "fp8_w8a8_tensor_static", activation_scales={"experts": scales, "expert": scales})
    quantize_(block, "fp8_w8a8_tensor_static", activation_scales={"experts": scales})
    assert block.experts.a13_scale.item() == pytest.approx(4.0 / 448)
    assert sqnr_db(_routed(block, x), ref) > 23  # measured 24.0 dB


def test_sizes_the_block_does_not_divide_need_pad_to():
    torch.manual_seed(0)
    block = ListMoE(h=48, i=40)
    x = _x(h=48)
    ref = _routed(block, x)
    with pytest.raises(ValueError, match=r"'experts'.*pad_to"):
        quantize_(block, "mxfp4_w4a16")
    assert isinstance(block.experts, nn.ModuleList)  # planned before anything changed
    quantize_(block, "mxfp4_w4a16", pad_to=32)
    assert block.experts.quantized_experts.padded_hidden_size == 64
    assert "padded=(64, 64)" in repr(block.experts)
    assert sqnr_db(_routed(block, x), ref) > 14  # measured 15.2 dB


def test_activation_detection_and_override():
    block = ListMoE(act=nn.Tanh())
    with pytest.raises(ValueError, match=r"unsupported activation.*'experts'.*Tanh"):
        quantize_(block, "bf16")
    with pytest.raises(ValueError, match="non-gated"):
        quantize_(block, "bf16", activation="relu2")
    quantize_(block, "bf16", activation="gelu")  # the user says so
    assert block.experts.activation is tmq.Activation.GELU


def test_progress_bar(capsys):
    model = nn.ModuleList(ListMoE(h=32, i=32, e=2) for _ in range(8))
    summary = quantize_(model, "bf16", progress="auto")
    assert summary.num_converted == 8
    assert "quantize_ bf16" in capsys.readouterr().err
    model = nn.ModuleList(ListMoE(h=32, i=32, e=2) for _ in range(2))
    quantize_(model, "bf16")  # auto: fewer than 8 modules, no bar
    assert "quantize_" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="progress must be one of"):
        quantize_(model, "bf16", progress="sometimes")
    assert Progress("never") is Progress.NEVER


def test_importing_the_package_changes_no_global_state():
    code = (
        "import sys, torch_moe_quant, torch_moe_quant.nn as n\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_unconvertible_weights_fail_before_any_swap():
    model = nn.ModuleDict({"a": FusedMoE(), "b": FusedMoE()})
    model["b"].experts.down_proj.data = model["b"].experts.down_proj.data.to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"experts at 'b.experts'.*float32/bfloat16/float16"):
        quantize_(model, "bf16")
    assert isinstance(model["a"].experts, FusedExperts)  # 'a' was planned first but not swapped


def test_nothing_found_is_a_warning(caplog):
    with caplog.at_level("WARNING", logger="torch_moe_quant.nn.quantize"):
        summary = quantize_(nn.Linear(4, 4), "bf16")
    assert summary.num_converted == 0 and "no MoE expert modules" in caplog.text
