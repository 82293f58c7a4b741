"""``quantize_`` is all or nothing (issue 17, case 2 and Done-when 3): after
an error of any class the model's module tree and ``state_dict`` are exactly
what they were, whichever module the error comes from (the last one here)."""

import pytest
import torch

import torch_moe_quant as tmq
from torch_moe_quant.nn import quantize as quantize_module

E, H = 4, 64


class Experts(torch.nn.Module):
    """Fused 3-D experts (transformers v5 layout) with a SiLU gate."""

    def __init__(self, inter: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate_up_proj = torch.nn.Parameter(torch.randn(E, 2 * inter, H, generator=g) / H**0.5)
        self.down_proj = torch.nn.Parameter(torch.randn(E, H, inter, generator=g) / inter**0.5)
        self.act_fn = torch.nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        experts = tmq.quantize_experts(self.gate_up_proj.detach(), self.down_proj.detach(), "fp32")
        return tmq.fused_moe(hidden_states, experts, top_k_weights, top_k_index)


class Layer(torch.nn.Module):
    def __init__(self, inter: int, seed: int):
        super().__init__()
        self.router = torch.nn.Linear(H, E, bias=False)
        self.experts = Experts(inter, seed)

    def forward(self, x):
        w, ids = tmq.route(self.router(x), 2, "softmax_topk_renormalize")
        return x + self.experts(x, ids, w.to(x.dtype))


class Model(torch.nn.Module):
    def __init__(self, last_inter: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([Layer(32, 1), Layer(32, 2), Layer(last_inter, 3)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


LAST = "layers.2.experts"
FQNS = ("layers.0.experts", "layers.1.experts", LAST)


def snapshot(model):
    tree = [(name, type(m), id(m)) for name, m in model.named_modules()]
    state = {k: (v.dtype, v.clone()) for k, v in model.state_dict().items()}
    params = [(name, id(p)) for name, p in model.named_parameters()]
    return tree, state, params


def assert_unchanged(model, before):
    tree, state, params = snapshot(model)
    assert tree == before[0]
    assert params == before[2]
    assert state.keys() == before[1].keys()
    for k, (dtype, value) in state.items():
        assert dtype == before[1][k][0], k
        old = before[1][k][1]
        if value.is_floating_point():  # bit for bit (a NaN equals itself)
            bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[value.element_size()]
            value, old = value.view(bits), old.view(bits)
        assert torch.equal(value, old), k


def _scales(last=None):
    scales = {fqn: (torch.tensor(0.01), torch.tensor(0.02)) for fqn in FQNS}
    if last is not None:
        scales[LAST] = last
    return scales


def _poison(value):
    def edit(model):
        with torch.no_grad():
            model.layers[2].experts.down_proj[1, 3, 4] = value
    return edit


def _raise_on_last(monkeypatch, where: str):
    """An unexpected failure (not a validation error) on the last module."""
    if where == "quantize":
        real = quantize_module.quantize_experts
        calls = []

        def failing(*args, **kwargs):
            if not args[0].is_meta:  # the conversions, not the meta dry runs
                calls.append(1)
            if len(calls) == len(FQNS):
                raise RuntimeError("out of memory (injected)")
            return real(*args, **kwargs)

        monkeypatch.setattr(quantize_module, "quantize_experts", failing)
    else:
        real = quantize_module._set_submodule
        calls = []

        def failing(model, fqn, new):
            calls.append(fqn)
            if fqn == LAST and len(calls) == len(FQNS):
                raise RuntimeError("setattr failed (injected)")
            return real(model, fqn, new)

        monkeypatch.setattr(quantize_module, "_set_submodule", failing)


# (id, scheme, keyword arguments, model edit or None, exception, message regex)
CASES = [
    ("unknown scheme", "fp9_w9a9", {}, None, ValueError, r"fp9_w9a9"),
    ("bad progress", "fp8_w8a16_channel", dict(progress="sometimes"), None, ValueError, r"progress must be one of"),
    ("scales for a dynamic scheme", "fp8_w8a16_channel", dict(activation_scales=_scales()), None, ValueError, r"only for static-activation"),
    ("size the block does not divide", "mxfp4_w4a16", {}, "odd_size", ValueError, rf"{LAST}.*multiples of 32"),
    ("unknown activation", "fp8_w8a16_channel", {}, "no_act", ValueError, rf"{LAST}.*activation"),
    ("static scale missing", "fp8_w8a8_tensor_static", dict(activation_scales={f: (0.01, 0.02) for f in FQNS[:2]}), None, ValueError, rf"{LAST}.*calibrate_"),
    ("static scale NaN", "fp8_w8a8_tensor_static", dict(activation_scales=_scales((torch.tensor(0.01), torch.tensor(float("nan"))))), None, ValueError, rf"{LAST}.*a2_scale must be finite and positive"),
    ("static scale zero", "int8_w8a8_tensor_static", dict(activation_scales=_scales((0.0, 0.01))), None, ValueError, rf"{LAST}.*a13_scale must be finite and positive"),
    ("static scale negative", "nvfp4_w4a4", dict(activation_scales=_scales((10.0, -3.0))), None, ValueError, rf"{LAST}.*a2_scale must be finite and positive"),
    ("static scale string", "fp8_w8a8_tensor_static", dict(activation_scales=_scales(("0.1", 0.1))), None, TypeError, rf"{LAST}.*a13_scale must be a float"),
    ("static scales not a pair", "fp8_w8a8_tensor_static", dict(activation_scales=_scales((0.1,))), None, ValueError, rf"activation_scales\['{LAST}'\] must be a pair"),
    ("scales for unknown modules", "fp8_w8a8_tensor_static", dict(activation_scales={**_scales(), "nope": (1.0, 1.0)}), None, ValueError, r"modules quantize_ does not convert: \['nope'\]"),
    ("NaN weight int4", "int4_w4a16_g32", {}, _poison(float("nan")), ValueError, rf"{LAST}.*down_proj must be finite"),
    ("inf weight int8", "int8_w8a16_channel", {}, _poison(float("inf")), ValueError, rf"{LAST}.*down_proj must be finite"),
    ("NaN weight fp8", "fp8_w8a16_channel", {}, _poison(float("nan")), ValueError, rf"{LAST}.*down_proj must be finite"),
    ("NaN weight mxfp4", "mxfp4_w4a16", {}, _poison(float("nan")), ValueError, rf"{LAST}.*down_proj must be finite"),
    ("huge weight int4", "int4_w4a16_g32", {}, _poison(3.3e38), ValueError, rf"{LAST}.*down_proj has values of magnitude"),
    ("filter_fn raises", "fp8_w8a16_channel", dict(filter_fn=lambda m, fqn: 1 / 0 if fqn == LAST else True), None, ZeroDivisionError, r"division"),
    ("failure while quantizing", "fp8_w8a16_channel", {}, "fail_quantize", RuntimeError, r"injected"),
    ("failure while swapping", "fp8_w8a16_channel", {}, "fail_swap", RuntimeError, r"injected"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_error_leaves_model_unchanged(case, monkeypatch):
    _, scheme, kwargs, edit, exc, match = case
    model = Model(last_inter=48 if edit == "odd_size" else 32)
    if edit == "no_act":
        del model.layers[2].experts.act_fn
    elif edit in ("fail_quantize", "fail_swap"):
        _raise_on_last(monkeypatch, edit.split("_")[1])
    elif callable(edit):
        edit(model)
    x = torch.randn(3, H)
    with torch.no_grad():
        out = model(x) if edit != "no_act" else None
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        tmq.quantize_(model, scheme, **{"progress": "never", **kwargs})
    assert_unchanged(model, before)
    if out is not None and torch.isfinite(out).all():
        with torch.no_grad():
            assert torch.equal(model(x), out)


def test_already_quantized_model_is_an_error_and_unchanged():
    model = Model()
    tmq.quantize_(model, "fp8_w8a16_channel", progress="never")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"already quantized"):
        tmq.quantize_(model, "int4_w4a16_g32", progress="never")
    assert_unchanged(model, before)


def test_success_converts_every_module():
    model = Model()
    summary = tmq.quantize_(model, "fp8_w8a16_channel", progress="never")
    assert summary.converted == FQNS
    assert all(type(model.get_submodule(f)).__name__ == "TransformersQuantizedExperts" for f in FQNS)
