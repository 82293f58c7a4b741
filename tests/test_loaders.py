"""Checkpoint loaders (``torch_moe_quant.nn.loaders``) against the real
producers: tiny checkpoints written by compressed-tensors' own compressors
(``ModelCompressor``, the way llm-compressor saves), by AMD Quark's exporter
(``export_safetensors``), and a gpt-oss MXFP4 layer written byte by byte from
the published layout. The loaded experts must dequantize bit-exactly
(``torch.equal``) to the producer's own dequantization and run in ``fused_moe``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, Optional

import pytest
import torch
from safetensors.torch import load_file, save_file

import torch_moe_quant as tmq
from torch_moe_quant import formats
from torch_moe_quant.nn import loaders
from torch_moe_quant.nn.loaders import (
    GATE_UP_DOWN,
    W1_W3_W2,
    ExpertNames,
    InputScales,
    PerTensorScales,
    load_compressed_tensors_experts,
    load_experts,
    load_gpt_oss_experts,
    load_quark_experts,
)

E, H, I = 3, 256, 128
PREFIX = "model.layers.0.mlp.experts"


def _run_moe(experts: tmq.QuantizedExperts, activation="silu", seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, experts.hidden_size, generator=g).bfloat16()
    logits = torch.randn(5, experts.num_experts, generator=g)
    w, ids = tmq.route(logits, min(2, experts.num_experts), "softmax_topk_renormalize")
    out = tmq.fused_moe(x, experts, w, ids, activation=activation)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    return out


# ===========================================================================
# compressed-tensors: a tiny per-expert Linear model, calibrated with min/max
# (as llm-compressor's MinMax observer), compressed by compressed-tensors.

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor, ModelCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize  # noqa: E402
from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam  # noqa: E402


class _Expert(torch.nn.Module):
    def __init__(self, names: ExpertNames, dtype):
        super().__init__()
        for proj, shape in ((names.gate, (I, H)), (names.up, (I, H)), (names.down, (H, I))):
            if proj is None:  # non-gated experts
                continue
            lin = torch.nn.Linear(shape[1], shape[0], bias=False, dtype=dtype)
            setattr(self, proj, lin)


def _tiny_model(names: ExpertNames, dtype, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    layer = torch.nn.Module()
    layer.mlp = torch.nn.Module()
    layer.mlp.experts = torch.nn.ModuleList([_Expert(names, dtype) for _ in range(E)])
    layer.mlp.gate = torch.nn.Linear(H, E, bias=False, dtype=dtype)  # the router, left unquantized
    root.model.layers = torch.nn.ModuleList([layer])
    with torch.no_grad():
        for name, p in root.named_parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(dtype))
        # an all-zero 32x128 corner in expert 0's first projection: zero blocks/groups
        getattr(layer.mlp.experts[0], names.w13[0]).weight[:32, :128] = 0
    return root


def _min_max(x: torch.Tensor, args: QuantizationArgs):
    s = args.strategy
    if s == "tensor":
        return x.amin().reshape(1), x.amax().reshape(1)
    if s in ("channel", "token"):
        return x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if s in ("group", "tensor_group"):
        xg = x.unflatten(-1, (x.shape[-1] // args.group_size, args.group_size))
        return xg.amin(-1), xg.amax(-1)
    if s == "block":
        bh, bw = args.block_structure
        xb = x.unflatten(0, (x.shape[0] // bh, bh)).unflatten(-1, (x.shape[-1] // bw, bw))
        return xb.amin((1, 3)), xb.amax((1, 3))
    raise AssertionError(s)


def _calibrate(model: torch.nn.Module, names: ExpertNames, shared_tensor_scales: bool):
    """Fill every qparam the way llm-compressor's MinMax observer would (and,
    with ``shared_tensor_scales``, give gate and up one per-tensor/global
    scale as its ``update_fused_layer_weight_global_scales`` does for nvfp4)."""
    for e, expert in enumerate(model.model.layers[0].mlp.experts):
        mods = {p: getattr(expert, p) for p in (*names.w13, names.down)}
        args = mods[names.up].quantization_scheme.weights
        w13_max = max(float(mods[p].weight.detach().abs().amax()) for p in names.w13)
        for p, m in mods.items():
            w = m.weight.data
            gscale = None
            if hasattr(m, "weight_global_scale"):
                amax = w13_max if (shared_tensor_scales and p in names.w13) else float(w.abs().amax())
                gscale = generate_gparam(torch.tensor(-amax), torch.tensor(amax))
                m.weight_global_scale.data.copy_(gscale)
            lo, hi = _min_max(w, args)
            if shared_tensor_scales and args.strategy == "tensor" and p in names.w13:
                lo, hi = torch.full_like(lo, -w13_max), torch.full_like(hi, w13_max)
            scale, zp = calculate_qparams(lo, hi, args, global_scale=gscale)
            m.weight_scale.data.copy_(scale.to(m.weight_scale.dtype))
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.data.copy_(zp.to(m.weight_zero_point.dtype))
            amax_in = 1.0 + 0.25 * e + (0.5 if p == names.down else 0.0)  # per expert, gate = up
            if hasattr(m, "input_scale"):
                ia = m.quantization_scheme.input_activations
                qmax = 448.0 if ia.type == "float" else 127.5
                m.input_scale.data.fill_(amax_in / qmax)
            if hasattr(m, "input_global_scale"):
                m.input_global_scale.data.copy_(generate_gparam(torch.tensor(-amax_in), torch.tensor(amax_in)))


@dataclasses.dataclass
class CTCheckpoint:
    directory: str
    config: dict
    state: Dict[str, torch.Tensor]
    dequantized: Dict[str, torch.Tensor]  # module name -> compressed-tensors' own decompress
    names: ExpertNames

    def w13(self, experts=range(E)) -> torch.Tensor:
        return torch.stack([
            torch.cat([self.dequantized[f"{PREFIX}.{e}.{p}"] for p in self.names.w13]) for e in experts
        ])

    def w2(self, experts=range(E)) -> torch.Tensor:
        return torch.stack([self.dequantized[f"{PREFIX}.{e}.{self.names.down}"] for e in experts])


def _decompress(state: Dict[str, torch.Tensor], config: dict, module: str) -> torch.Tensor:
    """compressed-tensors' decompress of one module, from the saved tensors."""
    qc = QuantizationConfig.model_validate(config)
    (scheme,) = qc.config_groups.values()
    fmt = scheme.format or qc.format
    local = {k[len(module) + 1:]: v for k, v in state.items() if k.startswith(module + ".")}
    return BaseCompressor.get_value_from_registry(fmt).decompress(local, scheme)["weight"]


def make_ct_checkpoint(
    tmp_path, scheme: QuantizationScheme, *, names=GATE_UP_DOWN, dtype=torch.bfloat16,
    shared_tensor_scales=False, seed=0, postprocess=None,
) -> CTCheckpoint:
    model = _tiny_model(names, dtype, seed)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["re:.*mlp.gate$"])
    apply_quantization_config(model, config, show_progress=False)
    _calibrate(model, names, shared_tensor_scales)
    compressor = ModelCompressor.from_pretrained_model(model)  # llm-compressor's save path
    compressor.compress_model(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    directory = str(tmp_path)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model_type": "tiny_moe"}, f)
    compressor.update_config(directory)
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)["quantization_config"]
    if postprocess is not None:
        state, config = postprocess(state, config)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({"quantization_config": config}, f)
    save_file(state, os.path.join(directory, "model.safetensors"))
    modules = {f"{PREFIX}.{e}.{p}" for e in range(E) for p in (*names.w13, names.down)}
    deq = {m: _decompress(state, config, m) for m in modules}
    return CTCheckpoint(directory, config, state, deq, names)


def _args(**kw) -> QuantizationArgs:
    return QuantizationArgs(**kw)


FP8_W = dict(num_bits=8, type="float", symmetric=True)
INT_W = dict(type="int", symmetric=True)
FP8_TOKEN = _args(num_bits=8, type="float", strategy="token", dynamic=True)
INT8_TOKEN = _args(num_bits=8, type="int", strategy="token", dynamic=True)

# (id, scheme, expected scheme name, options); preset names are compressed-tensors'
CT_CASES = [
    ("FP8_DYNAMIC", "FP8_DYNAMIC", "fp8_w8a8_channel_token", {}),
    ("FP8_BLOCK", "FP8_BLOCK", "fp8_w8a8_block128", {}),
    ("FP8_shared", "FP8", "fp8_w8a8_tensor_static", {"shared_tensor_scales": True}),
    ("fp8_tensor_token_rows", dict(weights=_args(**FP8_W, strategy="tensor"), input_activations=FP8_TOKEN),
     "fp8_w8a8_channel_token", {"per_tensor_scales": PerTensorScales.EXPAND_TO_ROWS}),
    ("fp8_channel_w8a16", dict(weights=_args(**FP8_W, strategy="channel")), "fp8_w8a16_channel", {}),
    ("W8A8", "W8A8", "int8_w8a8_channel_token", {}),
    ("int8_tensor_static", dict(
        weights=_args(num_bits=8, **INT_W, strategy="tensor"),
        input_activations=_args(num_bits=8, type="int", strategy="tensor", dynamic=False)),
     "int8_w8a8_tensor_static", {"shared_tensor_scales": True}),
    ("int8_channel_w8a16", dict(weights=_args(num_bits=8, **INT_W, strategy="channel")), "int8_w8a16_channel", {}),
    ("W4A16", "W4A16", "int4_w4a16_g128", {}),
    ("W4A16_g32_fp32", dict(weights=_args(num_bits=4, **INT_W, strategy="group", group_size=32)),
     "int4_w4a16_g32", {"dtype": torch.float32}),
    ("W4A16_channel", dict(weights=_args(num_bits=4, **INT_W, strategy="channel")), "int4_w4a16_channel", {}),
    ("W4A16_ASYM", "W4A16_ASYM", "int4_w4a16_g128_zp", {}),
    ("W4A8", "W4A8", "int4_w4a8_g128", {}),
    ("W4AFP8", "W4AFP8", "int4_w4afp8_g128", {}),
    ("NVFP4", "NVFP4", "nvfp4_w4a4", {"shared_tensor_scales": True}),
    ("NVFP4A16", "NVFP4A16", "nvfp4_w4a16", {"shared_tensor_scales": True}),
    ("MXFP4A16", "MXFP4A16", "mxfp4_w4a16", {}),
    ("FP8_DYNAMIC_mixtral", "FP8_DYNAMIC", "fp8_w8a8_channel_token", {"names": W1_W3_W2}),
    ("W4A16_non_gated", "W4A16", "int4_w4a16_g128", {"names": ExpertNames(gate=None)}),
]


def _scheme(spec) -> QuantizationScheme:
    if isinstance(spec, str):
        from compressed_tensors.quantization import preset_name_to_scheme

        return preset_name_to_scheme(spec, ["Linear"])
    return QuantizationScheme(targets=["Linear"], **spec)


def _split_options(options):
    make = {k: options[k] for k in ("shared_tensor_scales", "names", "dtype") if k in options}
    load = {k: options[k] for k in ("per_tensor_scales", "names") if k in options}
    return make, load


@pytest.mark.parametrize("case", CT_CASES, ids=[c[0] for c in CT_CASES])
def test_compressed_tensors_bit_exact(tmp_path, case):
    _, spec, expected, options = case
    make, load = _split_options(options)
    ckpt = make_ct_checkpoint(tmp_path, _scheme(spec), **make)
    experts = load_compressed_tensors_experts(ckpt.directory, PREFIX, **load)
    assert experts.scheme.name == expected
    assert experts.layout is tmq.GateUpLayout.GATE_UP
    assert (experts.num_experts, experts.hidden_size, experts.intermediate_size) == (E, H, I)
    assert experts.is_gated == ckpt.names.gated
    want13, want2 = ckpt.w13(), ckpt.w2()
    assert torch.equal(formats.dequantize(experts.w13, want13.dtype), want13)
    assert torch.equal(formats.dequantize(experts.w2, want2.dtype), want2)
    if experts.scheme.static_activation:
        key = "input_global_scale" if "nvfp4" in expected else "input_scale"
        vals13 = [ckpt.state[f"{PREFIX}.{e}.{p}.{key}"].float() for e in range(E) for p in ckpt.names.w13]
        vals2 = [ckpt.state[f"{PREFIX}.{e}.{ckpt.names.down}.{key}"].float() for e in range(E)]
        pick = torch.min if key == "input_global_scale" else torch.max
        assert torch.equal(experts.a13_scale, pick(torch.stack(vals13)).reshape(1, 1))
        assert torch.equal(experts.a2_scale, pick(torch.stack(vals2)).reshape(1, 1))
    _run_moe(experts, "silu" if experts.is_gated else "relu2")


@pytest.fixture(scope="module")
def w4a16(tmp_path_factory) -> CTCheckpoint:
    return make_ct_checkpoint(tmp_path_factory.mktemp("w4a16"), _scheme("W4A16"))


def test_compressed_tensors_sources_and_subset(w4a16):
    """A state dict, a list of files and the dispatcher all read the same
    checkpoint; ``experts=`` loads a subset in the order given."""
    path = os.path.join(w4a16.directory, "model.safetensors")
    from_dir = load_compressed_tensors_experts(w4a16.directory, PREFIX)
    from_dict = load_compressed_tensors_experts(load_file(path), PREFIX, w4a16.config)
    from_list = load_experts([path], PREFIX, {"quantization_config": w4a16.config})
    for other in (from_dict, from_list):
        assert other.scheme == from_dir.scheme
        assert all(torch.equal(a, b) for a, b in zip(from_dir.w13.tensors.values(), other.w13.tensors.values()))
    sub = load_compressed_tensors_experts(w4a16.directory, PREFIX, experts=[2, 0])
    assert sub.num_experts == 2
    assert torch.equal(formats.dequantize(sub.w13, torch.bfloat16), w4a16.w13([2, 0]))
    assert torch.equal(formats.dequantize(sub.w2, torch.bfloat16), w4a16.w2([2, 0]))


def _act_order_checkpoint(symmetric: bool, seed: int = 3):
    """An act-order (``actorder: group``) pack-quantized checkpoint as
    compressed-tensors < 0.20 wrote it: codes in the original column order,
    group ``g_idx[k]`` per column. Built with compressed-tensors' own
    ``calculate_qparams`` / ``quantize`` / ``pack_to_int32`` on the
    column-permuted weight; the expected dequantization is its own
    ``decompress`` of the permuted tensors, permuted back."""
    g = torch.Generator().manual_seed(seed)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=128)
    state, deq = {}, {}
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    perms = {}
    for e in range(E):
        for proj, (n, k) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            key = (e, "down" if proj == "down_proj" else "w13")
            if key not in perms:
                perms[key] = torch.randperm(k, generator=g)
            perm = perms[key]
            inv = torch.argsort(perm)
            w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
            wp = w[:, perm]
            lo, hi = _min_max(wp, args)
            scale, zp = calculate_qparams(lo, hi, args)
            codes_p = ct_quantize(wp, scale, zp if not symmetric else None, args, dtype=torch.int8)
            m = f"{PREFIX}.{e}.{proj}"
            permuted = {"weight_packed": pack_to_int32(codes_p, 4), "weight_scale": scale,
                        "weight_shape": torch.tensor([n, k])}
            if not symmetric:
                permuted["weight_zero_point"] = pack_to_int32(zp.to(torch.int8), 4, packed_dim=0)
            w_deq_p = BaseCompressor.get_value_from_registry("pack-quantized").decompress(permuted, scheme)["weight"]
            deq[m] = w_deq_p[:, inv]
            state.update({f"{m}.{p}": t for p, t in permuted.items()})
            state[f"{m}.weight_packed"] = pack_to_int32(codes_p[:, inv].contiguous(), 4)
            state[f"{m}.weight_g_idx"] = (inv // 128).to(torch.int32)
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group",
               "group_size": 128, "actorder": "group", "dynamic": False}
    config = {"quant_method": "compressed-tensors", "format": "pack-quantized",
              "quantization_status": "compressed", "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    return state, config, deq


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_compressed_tensors_act_order(symmetric):
    state, config, deq = _act_order_checkpoint(symmetric)
    experts = load_compressed_tensors_experts(state, PREFIX, config)
    assert experts.scheme.name == "int4_w4a16_gptq_g128_actorder"
    assert experts.w13.g_idx is not None and experts.w2.g_idx is not None
    want13 = torch.stack([torch.cat([deq[f"{PREFIX}.{e}.{p}"] for p in ("gate_proj", "up_proj")]) for e in range(E)])
    want2 = torch.stack([deq[f"{PREFIX}.{e}.down_proj"] for e in range(E)])
    assert torch.equal(formats.dequantize(experts.w13, torch.bfloat16), want13)
    assert torch.equal(formats.dequantize(experts.w2, torch.bfloat16), want2)
    _run_moe(experts)


def test_compressed_tensors_unused_g_idx_is_dropped(w4a16):
    """A g_idx of all -1 (initialized, no act-order) or the trivial k // g is no act-order."""
    state = dict(w4a16.state)
    for e in range(E):
        state[f"{PREFIX}.{e}.gate_proj.weight_g_idx"] = torch.full((H,), -1, dtype=torch.int32)
        state[f"{PREFIX}.{e}.up_proj.weight_g_idx"] = torch.full((H,), -1, dtype=torch.int32)
        state[f"{PREFIX}.{e}.down_proj.weight_g_idx"] = (torch.arange(I) // 128).to(torch.int32)
    experts = load_compressed_tensors_experts(state, PREFIX, w4a16.config)
    assert experts.scheme.name == "int4_w4a16_g128" and experts.w13.g_idx is None


def _error(fn, *patterns):
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    for p in patterns:
        assert p in msg, f"{p!r} not in {msg!r}"
    return msg


def test_compressed_tensors_bad_checkpoints(w4a16):
    key = f"{PREFIX}.1.up_proj.weight_scale"
    state = {k: v for k, v in w4a16.state.items() if k != key}
    _error(lambda: load_compressed_tensors_experts(state, PREFIX, w4a16.config), repr(key), "(128, 2)")
    state = dict(w4a16.state, **{key: torch.ones(128, 4, dtype=torch.bfloat16)})
    _error(lambda: load_compressed_tensors_experts(state, PREFIX, w4a16.config), repr(key), "(128, 4)", "(128, 2)")
    key = f"{PREFIX}.2.down_proj.weight_packed"
    state = dict(w4a16.state, **{key: w4a16.state[key].to(torch.int64)})
    _error(lambda: load_compressed_tensors_experts(state, PREFIX, w4a16.config), repr(key), "int32")
    # expert numbering, prefix
    state = {k: v for k, v in w4a16.state.items() if ".experts.1." not in k}
    _error(lambda: load_compressed_tensors_experts(state, PREFIX, w4a16.config), "missing [1]")
    _error(lambda: load_compressed_tensors_experts(w4a16.state, "model.layers.1.mlp.experts", w4a16.config),
           "no expert tensors", "model.layers.1.mlp.experts")
    _error(lambda: load_compressed_tensors_experts(w4a16.state, PREFIX, w4a16.config, names=W1_W3_W2),
           "no expert tensors", "w3")


def _with(config: dict, **weights) -> dict:
    config = json.loads(json.dumps(config))
    config["config_groups"]["group_0"]["weights"].update(weights)
    return config


def test_compressed_tensors_unsupported_configs(w4a16):
    cfg = w4a16.config
    load = lambda c: load_compressed_tensors_experts(w4a16.state, PREFIX, c)  # noqa: E731
    _error(lambda: load(dict(cfg, quant_method="gptq")), "'gptq'", "compressed-tensors")
    _error(lambda: load(dict(cfg, quantization_status="frozen")), "frozen")
    _error(lambda: load(dict(cfg, transform_config={"config_groups": {"u": {"type": "hadamard"}}})), "transform_config")
    _error(lambda: load(_with(cfg, group_size=16)), "no registered scheme", "group 16")
    _error(lambda: load(_with(cfg, group_size=64, symmetric=False)), "no registered scheme", "zero points")
    groups = json.loads(json.dumps(cfg["config_groups"]))
    groups["group_0"]["format"] = "marlin-24"
    _error(lambda: load(dict(cfg, config_groups=groups)), "'marlin-24'", "not supported")
    _error(lambda: load(dict(cfg, ignore=["re:.*down_proj$"])), "down_proj", "not quantized")
    # down_proj in another group than gate/up: one layer needs one scheme
    groups = json.loads(json.dumps(cfg["config_groups"]))
    groups["group_1"] = json.loads(json.dumps(groups["group_0"]))
    groups["group_1"]["targets"] = ["re:.*down_proj$"]
    groups["group_1"]["weights"]["group_size"] = 32
    _error(lambda: load(dict(cfg, config_groups=groups)), "different schemes", "down_proj")


def test_compressed_tensors_per_tensor_scales(tmp_path):
    """fp8 per-tensor static (compressed-tensors' FP8 preset) calibrated per
    module: gate and up scales differ and w13 has one scale per matrix."""
    ckpt = make_ct_checkpoint(tmp_path, _scheme("FP8"))
    _error(lambda: load_compressed_tensors_experts(ckpt.directory, PREFIX),
           "per-tensor weight scales", "gate_proj", "up_proj", "EXPAND_TO_ROWS")
    # per-row scales are exact, but no registered scheme pairs them with static per-tensor fp8 inputs
    _error(lambda: load_compressed_tensors_experts(
        ckpt.directory, PREFIX, per_tensor_scales=PerTensorScales.EXPAND_TO_ROWS), "no registered scheme", "per-row")


def test_compressed_tensors_nvfp4_global_scales_must_match(tmp_path):
    ckpt = make_ct_checkpoint(tmp_path, _scheme("NVFP4A16"), shared_tensor_scales=False)
    _error(lambda: load_compressed_tensors_experts(ckpt.directory, PREFIX), "weight_global_scale", "differ")


def test_compressed_tensors_input_scale_policy(tmp_path):
    ckpt = make_ct_checkpoint(tmp_path, _scheme("FP8"), shared_tensor_scales=True)
    _error(lambda: load_compressed_tensors_experts(ckpt.directory, PREFIX, input_scales=InputScales.REQUIRE_EQUAL),
           "static activation scales differ", "input_scale")
    state = dict(ckpt.state)
    state[f"{PREFIX}.0.down_proj.input_scale"] = torch.tensor([0.0], dtype=torch.bfloat16)
    _error(lambda: load_compressed_tensors_experts(state, PREFIX, ckpt.config), "0.down_proj.input_scale", "positive")


# ===========================================================================
# gpt-oss: the Hugging Face MXFP4 layout written byte by byte.

GPT_H, GPT_I = 128, 64


def _gpt_oss_checkpoint(directory: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def blocks(n, k):
        return torch.randint(0, 256, (E, n, k // 32, 16), generator=g, dtype=torch.uint8)

    def scales(n, k):
        s = torch.randint(118, 128, (E, n, k // 32), generator=g).to(torch.uint8)
        s[0, 0, 0] = 0  # 2**-127: a subnormal scale
        s[0, 1, 0] = 254  # 2**127
        return s

    state = {
        f"{PREFIX}.gate_up_proj_blocks": blocks(2 * GPT_I, GPT_H),
        f"{PREFIX}.gate_up_proj_scales": scales(2 * GPT_I, GPT_H),
        f"{PREFIX}.gate_up_proj_bias": (torch.randn(E, 2 * GPT_I, generator=g) * 0.1).bfloat16(),
        f"{PREFIX}.down_proj_blocks": blocks(GPT_H, GPT_I),
        f"{PREFIX}.down_proj_scales": scales(GPT_H, GPT_I),
        f"{PREFIX}.down_proj_bias": (torch.randn(E, GPT_H, generator=g) * 0.1).bfloat16(),
        "model.layers.0.mlp.router.weight": torch.zeros(E, GPT_H, dtype=torch.bfloat16),
    }
    save_file(state, os.path.join(directory, "model.safetensors"))
    config = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router"]}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model_type": "gpt_oss", "quantization_config": config}, f)
    return state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt_oss_bit_exact(tmp_path, dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    state = _gpt_oss_checkpoint(str(tmp_path))
    experts = load_gpt_oss_experts(str(tmp_path), PREFIX)
    assert experts.scheme.name == "mxfp4_w4a16" and experts.layout is tmq.GateUpLayout.INTERLEAVED
    assert (experts.num_experts, experts.hidden_size, experts.intermediate_size) == (E, GPT_H, GPT_I)
    for w, proj in ((experts.w13, "gate_up_proj"), (experts.w2, "down_proj")):
        # transformers' dequantization returns [E, K, N]
        want = convert_moe_packed_tensors(state[f"{PREFIX}.{proj}_blocks"], state[f"{PREFIX}.{proj}_scales"], dtype=dtype)
        assert torch.equal(formats.dequantize(w, dtype), want.transpose(1, 2))
    assert torch.equal(experts.w13_bias, state[f"{PREFIX}.gate_up_proj_bias"])
    assert torch.equal(experts.w2_bias, state[f"{PREFIX}.down_proj_bias"])
    sub = load_gpt_oss_experts(str(tmp_path), PREFIX, experts=[2])
    assert torch.equal(sub.w13.data, experts.w13.data[2:])


def test_gpt_oss_forward_matches_transformers(tmp_path):
    """fused_moe with GPT_OSS_ACTIVATION on the loaded experts = transformers'
    GptOssExperts (interleaved gate/up, swigluoai, biases) on the dequantized weights."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    state = _gpt_oss_checkpoint(str(tmp_path), seed=1)
    # keep the outputs in a range where swigluoai's clamps matter but nothing overflows
    for proj in ("gate_up_proj", "down_proj"):
        state[f"{PREFIX}.{proj}_scales"].clamp_(118, 124)
    experts = load_gpt_oss_experts(state, PREFIX, {"quant_method": "mxfp4"})
    cfg = GptOssConfig(hidden_size=GPT_H, intermediate_size=GPT_I, num_local_experts=E, num_experts_per_tok=2)
    ref = GptOssExperts(cfg)
    with torch.no_grad():
        ref.gate_up_proj.copy_(formats.dequantize(experts.w13).transpose(1, 2))
        ref.down_proj.copy_(formats.dequantize(experts.w2).transpose(1, 2))
        ref.gate_up_proj_bias.copy_(experts.w13_bias.float())
        ref.down_proj_bias.copy_(experts.w2_bias.float())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, GPT_H, generator=g)
    w, ids = tmq.route(torch.randn(6, E, generator=g), 2, "topk_softmax")
    got = tmq.fused_moe(x, experts, w, ids, activation=loaders.GPT_OSS_ACTIVATION)
    with torch.no_grad():
        want = ref(x, router_indices=ids.long(), routing_weights=w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gpt_oss_bad_checkpoints(tmp_path):
    state = _gpt_oss_checkpoint(str(tmp_path))
    key = f"{PREFIX}.down_proj_scales"
    bad = dict(state, **{key: state[key][:, :, :1]})
    _error(lambda: load_gpt_oss_experts(bad, PREFIX), repr(key), f"({E}, {GPT_H}, 2)")
    bad = {k: v for k, v in state.items() if k != f"{PREFIX}.gate_up_proj_bias"}
    _error(lambda: load_gpt_oss_experts(bad, PREFIX), "gate_up_proj_bias", f"({E}, {2 * GPT_I})")
    _error(lambda: load_gpt_oss_experts(state, PREFIX, {"quant_method": "fp8"}), "'fp8'", "mxfp4")
    _error(lambda: load_gpt_oss_experts(state, PREFIX, {"quant_method": "mxfp4", "modules_to_not_convert": [PREFIX]}),
           "modules_to_not_convert")
    _error(lambda: load_gpt_oss_experts(state, PREFIX, experts=[E]), "out of range")


# ===========================================================================
# AMD Quark: a tiny transformers Qwen3-MoE quantized and exported by Quark,
# re-imported by Quark for its own dequantization.

QUARK_H, QUARK_I = 128, 64


def _quark_model(seed: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from quark.torch.utils.llm import preprocess_for_quantization

    cfg = Qwen3MoeConfig(
        vocab_size=64, hidden_size=QUARK_H, intermediate_size=QUARK_I, moe_intermediate_size=QUARK_I,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        num_experts=E, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj[0, :4, :32] = 0  # all-zero MX blocks
    preprocess_for_quantization(model)  # fused experts -> per-expert Linear (QuarkExperts)
    return model


def _quark_spec(name: str, dynamic: bool):
    from quark.torch.quantization.config import config as qc

    if name == "fp8_tensor":
        return qc.FP8E4M3PerTensorSpec(observer_method="min_max", is_dynamic=False).to_quantization_spec()
    spec = {"fp4": qc.OCP_MXFP4Spec, "fp6_e2m3": qc.OCP_MXFP6E2M3Spec, "fp6_e3m2": qc.OCP_MXFP6E3M2Spec,
            "mxfp8": qc.OCP_MXFP8E4M3Spec}[name]
    return spec(ch_axis=-1, is_dynamic=dynamic).to_quantization_spec()


def make_quark_checkpoint(directory: str, weight: str, act: Optional[str], seed: int = 0):
    from quark.torch import ModelQuantizer, export_safetensors, import_model_from_safetensors
    from quark.torch.quantization.config.config import QConfig, QLayerConfig

    model = _quark_model(seed)
    layer = QLayerConfig(weight=_quark_spec(weight, False), input_tensors=None if act is None else _quark_spec(act, True))
    config = QConfig(global_quant_config=layer, exclude=["lm_head", "*.mlp.gate", "*self_attn*"])
    calib = [torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    model = ModelQuantizer(config).quantize_model(model, calib)
    export_safetensors(model, directory)
    # Quark's own import path: QParamsLinear modules that dequantize their packed weight
    imported = import_model_from_safetensors(_quark_model(seed), directory)
    experts = imported.model.layers[0].mlp.experts
    deq = {}
    for e in range(E):
        for p in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(getattr(experts, str(e)), p)
            deq[f"{PREFIX}.{e}.{p}"] = lin._get_qweight(lin.weight).detach()
    return deq


QUARK_CASES = [
    ("fp4", "fp4", "mxfp4_w4a4"),
    ("fp4", None, "mxfp4_w4a16"),
    ("fp4", "fp6_e3m2", "mxfp4_w4a6_e3m2"),
    ("fp4", "mxfp8", "mxfp4_w4a8_mxfp8"),
    ("fp4", "fp8_tensor", "mxfp4_w4a8_fp8"),
    ("fp6_e2m3", "fp6_e2m3", "mxfp6_e2m3_w6a6"),
    ("fp6_e3m2", "fp8_tensor", "mxfp6_e3m2_w6a8_fp8"),
]


@pytest.mark.parametrize("weight,act,expected", QUARK_CASES, ids=[c[2] for c in QUARK_CASES])
def test_quark_bit_exact(tmp_path, weight, act, expected):
    pytest.importorskip("quark")
    deq = make_quark_checkpoint(str(tmp_path), weight, act)
    experts = load_quark_experts(str(tmp_path), PREFIX)
    assert experts.scheme.name == expected
    want13 = torch.stack([torch.cat([deq[f"{PREFIX}.{e}.{p}"] for p in ("gate_proj", "up_proj")]) for e in range(E)])
    want2 = torch.stack([deq[f"{PREFIX}.{e}.down_proj"] for e in range(E)])
    assert torch.equal(formats.dequantize(experts.w13, torch.float32), want13)
    assert torch.equal(formats.dequantize(experts.w2, torch.float32), want2)
    # Quark stores byte 1 (2**-126), not 0, for the all-zero blocks; kept as stored
    assert int(experts.w13.scale[0, 0, 0]) == 1 and not want13[0, :4, :32].any()
    if experts.scheme.static_activation:
        state = load_file(os.path.join(str(tmp_path), "model.safetensors"))
        s13 = [state[f"{PREFIX}.{e}.{p}.input_scale"] for e in range(E) for p in ("gate_proj", "up_proj")]
        s2 = [state[f"{PREFIX}.{e}.down_proj.input_scale"] for e in range(E)]
        assert torch.equal(experts.a13_scale, torch.stack(s13).max().reshape(1, 1))
        assert torch.equal(experts.a2_scale, torch.stack(s2).max().reshape(1, 1))
    _run_moe(experts)


def test_quark_configs(tmp_path):
    pytest.importorskip("quark")
    make_quark_checkpoint(str(tmp_path), "fp4", "fp4")
    with open(os.path.join(str(tmp_path), "config.json")) as f:
        config = json.load(f)["quantization_config"]
    state = load_file(os.path.join(str(tmp_path), "model.safetensors"))
    assert load_experts(state, PREFIX, config).scheme.name == "mxfp4_w4a4"

    def edit(**changes):
        c = json.loads(json.dumps(config))
        for path, value in changes.items():
            node = c
            *parents, leaf = path.split("__")
            for p in parents:
                node = node[p]
            node[leaf] = value
        return c

    load = lambda c: load_quark_experts(state, PREFIX, c)  # noqa: E731
    # activations calibrated with another MX rounding than the schemes' "even"
    _error(lambda: load(edit(global_quant_config__input_tensors__scale_calculation_mode="floor")),
           "no registered scheme")
    _error(lambda: load(edit(global_quant_config__weight__dtype="mx")), "legacy Quark 'mx'")
    _error(lambda: load(edit(global_quant_config__weight__scale_format="float32")), "scale_format")
    _error(lambda: load(edit(export__weight_format="fake_quantized")), "real_quantized")
    _error(lambda: load(edit(exclude=["*.experts.1.*"])), "experts.1", "excluded")
    # a layer_quant_config pattern overrides the global config for matching modules
    other = json.loads(json.dumps(config["global_quant_config"]))
    other["input_tensors"]["dtype"] = "fp6_e2m3"
    _error(lambda: load(edit(layer_quant_config={"*.down_proj": other})), "different Quark layer configs")
    key = f"{PREFIX}.2.gate_proj.weight_scale"
    _error(lambda: load_quark_experts({k: v for k, v in state.items() if k != key}, PREFIX, config),
           repr(key), f"({QUARK_I}, {QUARK_H // 32})")
    key = f"{PREFIX}.0.down_proj.weight"
    bad = dict(state, **{key: state[key][:, :-1]})
    _error(lambda: load_quark_experts(bad, PREFIX, config), repr(key), f"({QUARK_H}, {QUARK_I // 2})")
