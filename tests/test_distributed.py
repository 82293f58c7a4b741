"""Expert and tensor parallelism (``torch_moe_quant.distributed``) on CPU.

Single-process tests: placement rules, sharding of every tensor of a
``QuantizedExperts`` (EP: expert dim; TP: intermediate dim, with the
group-boundary errors), loading local experts, and the per-rank
computations summed in one process against the full layer.

Multi-process tests: the gloo backend, 2 and 4 processes
(``torch.multiprocessing.spawn``, ``FileStore`` rendezvous in ``tmp_path``).
Each spawned group runs many cases and writes one JSON result file per rank;
a rank stops at its first failing case (the gloo timeout ends a collective a
failed peer never joins). Every output is compared with single-process
``fused_moe`` on the concatenated tokens and the full layer.

Measured bounds (torch 2.13 CPU, gloo), asserted below:

* ``CombinePrecision.FP32`` (default), every dispatch, every scheme tested
  (bf16, fp8_w8a8_channel_token, int4_w4a16_g128, mxfp4_w4a16), eager and
  compiled: asserted <= 1 bf16 ulp from single-process ``fused_moe`` (the
  only difference is the order of the fp32 partial sums); measured 0 ulp
  (bit-identical) in every case.
* tensor parallelism (weight-only schemes, the second GEMM's reduction is
  split): asserted <= 1 ulp; measured 0 ulp, 1 ulp (rel 3.4e-7) for
  mxfp4 + biases + swigluoai.
* ``CombinePrecision.INPUT`` (each rank's partial rounded to bf16 once):
  asserted relative Frobenius error <= 6e-3; measured 2.5e-3 to 3.0e-3
  (EP and TP).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
import traceback
from typing import Callable, Dict, List, Optional

import pytest
import torch

import torch_moe_quant as tmq
from torch_moe_quant import formats
from torch_moe_quant.distributed import (
    CombinePrecision,
    ExpertParallelShard,
    ExpertPlacement,
    TokenDispatch,
    expert_parallel_moe,
    shard_experts,
    shard_experts_tp,
    tensor_parallel_moe,
)
from torch_moe_quant.formats.core import QuantizedTensor
from torch_moe_quant.nn.loaders import load_local_experts

H, I = 128, 256  # multiples of 128: int4 g128 and fp8 128x128 blocks fit, TP slices too
EP_SCHEMES = ("bf16", "fp8_w8a8_channel_token", "int4_w4a16_g128", "mxfp4_w4a16")
TP_SCHEMES = ("bf16", "fp8_w8a16_channel", "int4_w4a16_g128", "mxfp4_w4a16")
#: a scheme of every storage kind, for the sharding unit tests
SHARD_SCHEMES = (
    "bf16",
    "fp8_w8a8_tensor_static",
    "fp8_w8a8_channel_token",
    "fp8_w8a16_block128",
    "int8_w8a16_channel",
    "int4_w4a16_g128",
    "int4_w4a16_g128_zp",
    "int4_w4a16_gptq_g128_actorder",
    "nvfp4_w4a4",
    "mxfp4_w4a16",
    "mxfp6_e2m3_w6a6",
)


# ---------------------------------------------------------------------------
# helpers


def make_layer(
    scheme: str,
    E: int = 8,
    seed: int = 0,
    *,
    layout: str = "gate_up",
    bias: bool = False,
    inter: int = I,
) -> tmq.QuantizedExperts:
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(E, 2 * inter, H, generator=g) / H**0.5).bfloat16()
    w2 = (torch.randn(E, H, inter, generator=g) / inter**0.5).bfloat16()
    kwargs = {}
    if bias:
        kwargs["w13_bias"] = (torch.randn(E, 2 * inter, generator=g) * 0.1).bfloat16()
        kwargs["w2_bias"] = (torch.randn(E, H, generator=g) * 0.1).bfloat16()
    if tmq.get_scheme(scheme).static_activation:
        x = torch.randn(64, H, generator=g).bfloat16()
        w, ids = tmq.route(torch.randn(64, E, generator=g), 2, "softmax_topk_renormalize")
        kwargs["a13_scale"], kwargs["a2_scale"] = tmq.calibrate_activation_scales(x, w13, w2, scheme, w, ids)
    return tmq.quantize_experts(w13, w2, scheme, layout=layout, **kwargs)


def make_tokens(M: int, E: int, k: int, seed: int, allowed: Optional[List[int]] = None):
    """bf16 tokens and their routing; ``allowed`` restricts the experts chosen."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, H, generator=g).bfloat16()
    logits = torch.randn(M, E, generator=g)
    if allowed is not None:
        mask = torch.full((E,), -1e4)
        mask[allowed] = 0
        logits = logits + mask
    w, ids = tmq.route(logits, k, "softmax_topk_renormalize")
    return x, w, ids


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 ulps (0 for identical tensors, +0 == -0)."""
    def key(t):
        v = t.to(torch.bfloat16).contiguous().view(torch.int16).int()
        mag = v & 0x7FFF
        return torch.where(v < 0, -mag, mag)

    if a.numel() == 0:
        return 0
    return int((key(a) - key(b)).abs().max())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


def dequant(w) -> torch.Tensor:
    if isinstance(w, QuantizedTensor):
        return formats.dequantize(w, torch.float32)
    return w.float()


# ---------------------------------------------------------------------------
# placement


def test_placement_contiguous_remainder_on_first_ranks():
    p = ExpertPlacement.contiguous(6, 4)
    assert [p.local_experts(r) for r in range(4)] == [(0, 1), (2, 3), (4,), (5,)]
    assert p.expert_map(1).tolist() == [-1, -1, 0, 1, -1, -1]
    assert p.owner_table().tolist() == [0, 0, 1, 1, 2, 3]
    assert ExpertPlacement.even(8, 2).owners == (0,) * 4 + (1,) * 4
    maps = [p.expert_map(r) for r in range(4)]
    assert ExpertPlacement.from_expert_maps(maps) == p
    strided = ExpertPlacement((0, 1, 0, 1), 2)
    assert strided.local_experts(1) == (1, 3)
    assert strided.expert_map(1).tolist() == [-1, 0, -1, 1]


def test_placement_errors():
    with pytest.raises(ValueError, match=r"placement=ExpertPlacement.contiguous\(6, 4\)"):
        ExpertPlacement.even(6, 4)
    with pytest.raises(ValueError, match=r"no expert to ranks \[2\]"):
        ExpertPlacement((0, 1, 1), 3)
    with pytest.raises(ValueError, match=r"owners\[1\] must be a rank in \[0, 2\)"):
        ExpertPlacement((0, 2), 2)
    with pytest.raises(ValueError, match="num_experts must be an int >= world_size=4"):
        ExpertPlacement.contiguous(3, 4)
    with pytest.raises(ValueError, match="exactly one rank"):
        ExpertPlacement.from_expert_maps([torch.tensor([0, 0]), torch.tensor([0, -1])])
    with pytest.raises(ValueError, match="ascending global order"):
        ExpertPlacement.from_expert_maps([torch.tensor([1, 0, -1]), torch.tensor([-1, -1, 0])])


# ---------------------------------------------------------------------------
# EP sharding


@pytest.mark.parametrize("scheme", SHARD_SCHEMES)
def test_shard_experts_slices_every_tensor(scheme):
    full = make_layer(scheme, E=6, bias=True)
    p = ExpertPlacement.contiguous(6, 4)
    for r in range(4):
        shard = shard_experts(full, r, p)
        ids = list(p.local_experts(r))
        local = shard.experts
        assert local.num_experts == len(ids) and local.scheme == full.scheme
        for name in ("w13", "w2"):
            lw, fw = getattr(local, name), getattr(full, name)
            torch.testing.assert_close(dequant(lw), dequant(fw)[ids], rtol=0, atol=0)
            if isinstance(fw, QuantizedTensor):
                assert set(lw.tensors) == set(fw.tensors)
                for field, t in lw.tensors.items():
                    assert torch.equal(_bits(t), _bits(fw.tensors[field][ids])), field
                    assert t.untyped_storage().data_ptr() != fw.tensors[field].untyped_storage().data_ptr()
        assert torch.equal(local.w13_bias, full.w13_bias[ids]) and torch.equal(local.w2_bias, full.w2_bias[ids])
        if full.a13_scale is not None:
            assert torch.equal(local.a13_scale, full.a13_scale) and torch.equal(local.a2_scale, full.a2_scale)


def test_concat_experts_inverts_sharding():
    from torch_moe_quant.distributed import concat_experts

    full = make_layer("int4_w4a16_g128_zp", E=6, bias=True)
    p = ExpertPlacement.contiguous(6, 4)
    back = concat_experts([shard_experts(full, r, p).experts for r in range(4)])
    leaves = zip(torch.utils._pytree.tree_leaves(back), torch.utils._pytree.tree_leaves(full))
    assert back.w13.shape == full.w13.shape
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in leaves)
    with pytest.raises(ValueError, match=r"parts\[1\].scheme"):
        concat_experts([full, make_layer("bf16", E=2)])


def test_shard_experts_errors():
    full = make_layer("bf16", E=6)
    with pytest.raises(ValueError, match=r"6 experts do not divide evenly over ep=4.*placement="):
        shard_experts(full, 0, world_size=4)
    with pytest.raises(ValueError, match="placement is for 8 experts but experts holds 6"):
        shard_experts(full, 0, ExpertPlacement.contiguous(8, 2))
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        shard_experts(full, 2, ExpertPlacement.contiguous(6, 2))
    with pytest.raises(ValueError, match="experts holds 6 experts but placement gives rank 0 3"):
        ExpertParallelShard.from_local(full, ExpertPlacement.contiguous(6, 2), 0)
    with pytest.raises(TypeError, match="experts must be a QuantizedExperts"):
        shard_experts(full.w13, 0, world_size=2)


def _emulated_ep(full, placement, x, w, ids, activation="silu"):
    """The sum over ranks of each rank's local-expert output (what the
    collectives add up), in one process."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for r in range(placement.world_size):
        shard = shard_experts(full, r, placement)
        out += tmq.fused_moe(x.float(), shard.experts, w, ids, activation=activation, expert_map=shard.expert_map)
    return out.to(x.dtype)


@pytest.mark.parametrize("scheme", SHARD_SCHEMES)
def test_ep_partials_sum_to_full_layer(scheme):
    full = make_layer(scheme, E=6, bias=True)
    x, w, ids = make_tokens(24, 6, 3, seed=5)
    ref = tmq.fused_moe(x, full, w, ids)
    for p in (ExpertPlacement.contiguous(6, 4), ExpertPlacement((1, 0, 1, 0, 0, 1), 2)):
        out = _emulated_ep(full, p, x, w, ids)
        assert ulp_diff(out, ref) <= 1, (scheme, str(p))


# ---------------------------------------------------------------------------
# TP sharding


def _gate_up_units(t: torch.Tensor, layout: str, lo: int, hi: int, inter: int) -> torch.Tensor:
    """Rows (dim 1) of a w13-like tensor for intermediate units [lo, hi)."""
    if layout == "interleaved":
        return t[:, 2 * lo : 2 * hi]
    return torch.cat([t[:, lo:hi], t[:, inter + lo : inter + hi]], dim=1)


TP_SHARD_CASES = [
    ("bf16", "gate_up"),
    ("bf16", "interleaved"),
    ("fp8_w8a8_tensor_static", "up_gate"),
    ("fp8_w8a16_channel", "gate_up"),
    ("fp8_w8a16_block128", "gate_up"),
    ("int4_w4a16_g128", "gate_up"),
    ("int4_w4a16_g128_zp", "up_gate"),
    ("nvfp4_w4a16", "gate_up"),
    ("mxfp4_w4a16", "interleaved"),
    ("mxfp6_e2m3_w6a6", "gate_up"),
]


@pytest.mark.parametrize("scheme,layout", TP_SHARD_CASES)
def test_tp_shard_slices_and_partials_sum(scheme, layout):
    full = make_layer(scheme, E=4, layout=layout, bias=True)
    activation = "swigluoai" if layout == "interleaved" else "silu"
    x, w, ids = make_tokens(16, 4, 2, seed=7)
    ref = tmq.fused_moe(x, full, w, ids, activation=activation)
    tp = 2
    out = torch.zeros(x.shape)
    for r in range(tp):
        shard = shard_experts_tp(full, r, tp)
        local = shard.experts
        lo, hi = r * I // tp, (r + 1) * I // tp
        assert local.intermediate_size == local.padded_intermediate_size == hi - lo
        torch.testing.assert_close(dequant(local.w13), _gate_up_units(dequant(full.w13), layout, lo, hi, I), rtol=0, atol=0)
        torch.testing.assert_close(dequant(local.w2), dequant(full.w2)[..., lo:hi], rtol=0, atol=0)
        assert torch.equal(local.w13_bias, _gate_up_units(full.w13_bias, layout, lo, hi, I))
        assert torch.equal(local.w2_bias, full.w2_bias if r == 0 else torch.zeros_like(full.w2_bias))
        out += tmq.fused_moe(x.float(), local, w, ids, activation=activation)
    out = out.to(x.dtype)
    if tmq.get_scheme(scheme).activation is None:
        assert ulp_diff(out, ref) <= 1, scheme
    else:  # activations quantized: static scales, or mx groups along the split dim
        assert rel_err(out, ref) < 1e-2, scheme


def test_tp_shard_errors():
    with pytest.raises(ValueError, match=r"w2: .*int4 shares one scale per group of 128 columns"):
        shard_experts_tp(make_layer("int4_w4a16_g128", E=2), 0, 4)  # 64-wide slices
    with pytest.raises(ValueError, match=r"w13: .*blocks of 128 rows"):
        shard_experts_tp(make_layer("fp8_w8a16_block128", E=2), 1, 4)
    with pytest.raises(ValueError, match="groups of 32 along I"):
        shard_experts_tp(make_layer("mxfp4_w4a4", E=2, inter=64), 0, 4)  # 16-wide slices
    with pytest.raises(ValueError, match="act-order"):
        shard_experts_tp(make_layer("int4_w4a16_gptq_g128_actorder", E=2), 0, 2)
    with pytest.raises(ValueError, match=r"world_size=3 must divide the intermediate size I=256"):
        shard_experts_tp(make_layer("bf16", E=2), 0, 3)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        shard_experts_tp(make_layer("bf16", E=2), 2, 2)


def test_not_initialized_names_group():
    full = make_layer("bf16", E=2)
    x, w, ids = make_tokens(4, 2, 1, seed=0)
    with pytest.raises(RuntimeError, match="group: torch.distributed is not initialized"):
        expert_parallel_moe(x, shard_experts(full, 0, world_size=2), w, ids)
    with pytest.raises(RuntimeError, match="group: torch.distributed is not initialized"):
        tensor_parallel_moe(x, shard_experts_tp(full, 0, 2), w, ids)
    with pytest.raises(ValueError, match="dispatch must be one of"):
        expert_parallel_moe(x, shard_experts(full, 0, world_size=2), w, ids, dispatch="broadcast")


# ---------------------------------------------------------------------------
# loading only the local experts


def _gpt_oss_state(experts: tmq.QuantizedExperts, prefix: str) -> Dict[str, torch.Tensor]:
    E, two_i, Hh = experts.w13.shape
    inter = experts.w2.shape[2]
    return {
        f"{prefix}.gate_up_proj_blocks": experts.w13.data.reshape(E, two_i, Hh // 32, 16),
        f"{prefix}.gate_up_proj_scales": experts.w13.scale,
        f"{prefix}.gate_up_proj_bias": experts.w13_bias,
        f"{prefix}.down_proj_blocks": experts.w2.data.reshape(E, Hh, inter // 32, 16),
        f"{prefix}.down_proj_scales": experts.w2.scale,
        f"{prefix}.down_proj_bias": experts.w2_bias,
    }


def test_load_local_experts_reads_only_local():
    full = make_layer("mxfp4_w4a16", E=6, layout="interleaved", bias=True)
    prefix = "model.layers.0.mlp.experts"
    state = _gpt_oss_state(full, prefix)
    p = ExpertPlacement.contiguous(6, 4)
    for r in range(4):
        loaded = load_local_experts(state, prefix, {"quant_method": "mxfp4"}, rank=r, placement=p)
        want = shard_experts(full, r, p)
        assert loaded.rank == r and torch.equal(loaded.expert_map, want.expert_map)
        for a, b in zip(torch.utils._pytree.tree_leaves(loaded.experts), torch.utils._pytree.tree_leaves(want.experts)):
            assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(ValueError, match="experts= is chosen by placement"):
        load_local_experts(state, prefix, {"quant_method": "mxfp4"}, rank=0, placement=p, experts=[0])


# ---------------------------------------------------------------------------
# multi-process (gloo)


@dataclasses.dataclass
class _Ctx:
    rank: int
    world_size: int
    results: List[dict]
    failed: bool = False

    def case(self, name: str, fn: Callable[[], Optional[dict]]) -> None:
        if self.failed:
            return
        t = time.perf_counter()
        try:
            info = fn() or {}
            self.results.append({"case": name, "ok": True, "seconds": round(time.perf_counter() - t, 3), **info})
        except Exception:  # recorded and reported by the parent
            self.failed = True
            self.results.append({"case": name, "ok": False, "error": traceback.format_exc()[-4000:]})


def _ep_reference(full, tokens, activation="silu", on_input=False):
    x = torch.cat([t[0] for t in tokens])
    w = torch.cat([t[1] for t in tokens])
    ids = torch.cat([t[2] for t in tokens])
    ref = tmq.fused_moe(x, full, w, ids, activation=activation, apply_router_weight_on_input=on_input)
    return ref.split([t[0].shape[0] for t in tokens])


def _check(out, ref, combine=CombinePrecision.FP32) -> dict:
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.shape, ref.shape)
    info = {"ulp": ulp_diff(out, ref), "rel": rel_err(out, ref) if out.numel() else 0.0}
    if combine is CombinePrecision.FP32:
        assert info["ulp"] <= 1, info
    else:
        assert info["rel"] <= 6e-3, info
    return info


def _ep_case(ctx, full, placement, Ms, k, seed, *, dispatch, combine=CombinePrecision.FP32,
             allowed=None, activation="silu", on_input=False):
    E = placement.num_experts
    tokens = [make_tokens(m, E, k, seed + 31 * r, allowed) for r, m in enumerate(Ms)]
    if dispatch is TokenDispatch.REPLICATED:  # every rank holds the same (all) tokens
        tokens = [make_tokens(sum(Ms), E, k, seed, allowed)] * ctx.world_size
        ref = _ep_reference(full, tokens[:1], activation, on_input)[0]
    else:
        ref = _ep_reference(full, tokens, activation, on_input)[ctx.rank]
    shard = shard_experts(full, ctx.rank, placement)
    x, w, ids = tokens[ctx.rank]
    out = expert_parallel_moe(x, shard, w, ids, dispatch=dispatch, combine=combine,
                              activation=activation, apply_router_weight_on_input=on_input)
    return _check(out, ref, combine)


def _compile_case(ctx, full, placement, calls, *, dispatch, backend="aot_eager", dynamic=None,
                  combine=CombinePrecision.FP32):
    """Compile one EP forward with ``fullgraph=True`` and a frame counter,
    run it on several (M list, k, seed, allowed) routings; assert one graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend(backend)
    shard = shard_experts(full, ctx.rank, placement)
    compiled = torch.compile(
        lambda x, w, ids: expert_parallel_moe(x, shard, w, ids, dispatch=dispatch, combine=combine),
        backend=counter, fullgraph=True, dynamic=dynamic,
    )
    infos = []
    for Ms, k, seed, allowed in calls:
        if dispatch is TokenDispatch.REPLICATED:  # every rank holds the same (all) tokens
            tokens = [make_tokens(sum(Ms), placement.num_experts, k, seed, allowed)] * ctx.world_size
            ref = _ep_reference(full, tokens[:1])[0]
        else:
            tokens = [make_tokens(m, placement.num_experts, k, seed + 31 * r, allowed) for r, m in enumerate(Ms)]
            ref = _ep_reference(full, tokens)[ctx.rank]
        x, w, ids = tokens[ctx.rank]
        infos.append(_check(compiled(x, w, ids), ref, combine))
    return {"frames": counter.frame_count, "ulp": max(i["ulp"] for i in infos), "rel": max(i["rel"] for i in infos)}


def _worker(rank: int, world_size: int, store: str, outdir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    torch._dynamo.config.capture_scalar_outputs = True  # this process only (ALL_TO_ALL under compile)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    ctx = _Ctx(rank, world_size, [])
    try:
        if world_size == 2:
            _cases_2(ctx)
        else:
            _cases_4(ctx)
    finally:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(ctx.results, f)
        dist.destroy_process_group()


def _cases_2(ctx: _Ctx) -> None:
    A2A, AG, REP = TokenDispatch.ALL_TO_ALL, TokenDispatch.ALL_GATHER, TokenDispatch.REPLICATED
    p = ExpertPlacement.contiguous(8, 2)
    for scheme in EP_SCHEMES:
        full = make_layer(scheme, E=8)
        ctx.case(f"ep2/{scheme}/all_to_all", lambda: _ep_case(ctx, full, p, [13, 6], 3, 1, dispatch=A2A))
        ctx.case(f"ep2/{scheme}/all_gather", lambda: _ep_case(ctx, full, p, [9, 9], 3, 2, dispatch=AG))
        ctx.case(f"ep2/{scheme}/replicated", lambda: _ep_case(ctx, full, p, [5, 6], 3, 3, dispatch=REP))
        # every token to rank 0's experts: rank 1 receives nothing
        ctx.case(f"ep2/{scheme}/all_to_all/skew_to_rank0",
                 lambda: _ep_case(ctx, full, p, [7, 11], 3, 4, dispatch=A2A, allowed=[0, 1, 2, 3]))
        ctx.case(f"ep2/{scheme}/all_gather/skew_to_rank1",
                 lambda: _ep_case(ctx, full, p, [8, 8], 2, 5, dispatch=AG, allowed=[5, 7]))
    full = make_layer("bf16", E=8)
    ctx.case("ep2/bf16/all_to_all/rank1_no_tokens", lambda: _ep_case(ctx, full, p, [10, 0], 2, 6, dispatch=A2A))
    ctx.case("ep2/bf16/all_to_all/combine_input",
             lambda: _ep_case(ctx, full, p, [12, 5], 3, 7, dispatch=A2A, combine=CombinePrecision.INPUT))
    ctx.case("ep2/bf16/all_gather/combine_input",
             lambda: _ep_case(ctx, full, p, [6, 6], 3, 7, dispatch=AG, combine=CombinePrecision.INPUT))
    ctx.case("ep2/int4_w4a16_g128/replicated/combine_input",
             lambda: _ep_case(ctx, make_layer("int4_w4a16_g128", E=8), p, [6, 6], 3, 7, dispatch=REP,
                              combine=CombinePrecision.INPUT))
    ctx.case("ep2/bf16/all_to_all/router_weight_on_input",
             lambda: _ep_case(ctx, full, p, [9, 4], 1, 8, dispatch=A2A, on_input=True))
    gpt = make_layer("mxfp4_w4a16", E=8, layout="interleaved", bias=True)
    ctx.case("ep2/mxfp4_w4a16/interleaved_bias_swigluoai/all_to_all",
             lambda: _ep_case(ctx, gpt, p, [11, 8], 4, 9, dispatch=A2A, activation="swigluoai"))
    strided = ExpertPlacement(tuple(e % 2 for e in range(8)), 2)
    ctx.case("ep2/bf16/strided_placement/all_to_all",
             lambda: _ep_case(ctx, full, strided, [9, 7], 3, 10, dispatch=A2A))

    # errors, raised identically on both ranks before any collective
    def errors():
        x, w, ids = make_tokens(4, 8, 2, 0)
        with pytest.raises(ValueError, match="group has 2 ranks but shard was built for world_size=4"):
            expert_parallel_moe(x, shard_experts(full, ctx.rank, world_size=4), w, ids)
        other = 1 - ctx.rank
        with pytest.raises(ValueError, match=f"shard was built for rank {other} but this process is rank {ctx.rank}"):
            expert_parallel_moe(x, shard_experts(full, other, p), w, ids)
        with pytest.raises(ValueError, match=r"topk_ids must be in \[0, 8\)"):
            expert_parallel_moe(x, shard_experts(full, ctx.rank, p), w, ids + 7)
        with pytest.raises(ValueError, match=r"hidden_states must have shape \[num_tokens, 128\]"):
            expert_parallel_moe(x[:, :64], shard_experts(full, ctx.rank, p), w, ids)
        with pytest.raises(ValueError, match="shard was built for world_size=2"):
            tensor_parallel_moe(x, shard_experts_tp(full, 0, 2), w, ids, group=_subgroup_of_self(ctx))

    ctx.case("ep2/errors", errors)

    def all_gather_uneven():  # one collective (the size check) on both ranks, then both raise
        x, w, ids = make_tokens(3 + ctx.rank, 8, 2, 0)
        with pytest.raises(ValueError, match=r"same number of tokens on every rank, got \[3, 4\]"):
            expert_parallel_moe(x, shard_experts(full, ctx.rank, p), w, ids, dispatch=AG)

    ctx.case("ep2/errors/all_gather_uneven_tokens", all_gather_uneven)

    # tensor parallelism
    for scheme in TP_SCHEMES:
        layer = make_layer(scheme, E=4)

        def tp_case(layer=layer, seed=11, activation="silu"):
            x, w, ids = make_tokens(10, 4, 2, seed)
            ref = tmq.fused_moe(x, layer, w, ids, activation=activation)
            out = tensor_parallel_moe(x, shard_experts_tp(layer, ctx.rank, 2), w, ids, activation=activation,
                                      combine=CombinePrecision.FP32)
            return _check(out, ref)

        ctx.case(f"tp2/{scheme}", tp_case)
    ctx.case("tp2/mxfp4_w4a16/interleaved_bias_swigluoai",
             lambda: tp_case(make_layer("mxfp4_w4a16", E=4, layout="interleaved", bias=True), 12, "swigluoai"))

    def tp_combine_input():
        layer = make_layer("bf16", E=4, bias=True)
        x, w, ids = make_tokens(10, 4, 2, 13)
        out = tensor_parallel_moe(x, shard_experts_tp(layer, ctx.rank, 2), w, ids, combine="input")
        return _check(out, tmq.fused_moe(x, layer, w, ids), CombinePrecision.INPUT)

    ctx.case("tp2/bf16/combine_input", tp_combine_input)

    # torch.compile(fullgraph=True): one graph each, data-dependent splits do not recompile
    full = make_layer("bf16", E=8)
    calls = [([12, 7], 3, 20, None), ([12, 7], 3, 21, [0, 1, 2, 3]), ([12, 7], 3, 22, [5, 6, 7])]
    ctx.case("compile/inductor/bf16/all_to_all/combine_input(default)",
             lambda: _compile_case(ctx, full, p, calls, dispatch=A2A, backend="inductor",
                                   combine=CombinePrecision.INPUT))
    int4 = make_layer("int4_w4a16_g128", E=8)
    ctx.case("compile/aot_eager/int4_w4a16_g128/all_to_all/dynamic",
             lambda: _compile_case(ctx, int4, p, calls + [([5, 9], 3, 23, None)], dispatch=A2A, dynamic=True))
    ctx.case("compile/aot_eager/bf16/all_gather",
             lambda: _compile_case(ctx, full, p, [([8, 8], 3, 24, None), ([8, 8], 3, 25, [4, 5, 6])], dispatch=AG))
    ctx.case("compile/aot_eager/mxfp4_w4a16/replicated",
             lambda: _compile_case(ctx, make_layer("mxfp4_w4a16", E=8), p, [([6, 6], 3, 28, None)], dispatch=REP))

    def compile_tp():
        from torch._dynamo.testing import CompileCounterWithBackend

        layer = make_layer("fp8_w8a16_channel", E=4)
        shard = shard_experts_tp(layer, ctx.rank, 2)
        counter = CompileCounterWithBackend("aot_eager")
        f = torch.compile(lambda x, w, ids: tensor_parallel_moe(x, shard, w, ids, combine="fp32"),
                          backend=counter, fullgraph=True)
        x, w, ids = make_tokens(10, 4, 2, 26)
        info = _check(f(x, w, ids), tmq.fused_moe(x, layer, w, ids))
        return {"frames": counter.frame_count, **info}

    ctx.case("compile/aot_eager/tp/fp8_w8a16_channel", compile_tp)

    def compile_needs_scalar_outputs():
        shard = shard_experts(full, ctx.rank, p)
        f = torch.compile(lambda x, w, ids: expert_parallel_moe(x, shard, w, ids), backend="aot_eager", fullgraph=True)
        x, w, ids = make_tokens(6, 8, 2, 27)
        with torch._dynamo.config.patch(capture_scalar_outputs=False):
            with pytest.raises(Exception, match="capture_scalar_outputs = True"):
                f(x, w, ids)

    ctx.case("compile/all_to_all_without_capture_scalar_outputs_raises", compile_needs_scalar_outputs)


def _subgroup_of_self(ctx: _Ctx):
    """A 1-rank group per rank (``new_group`` is collective: both ranks create both)."""
    import torch.distributed as dist

    groups = [dist.new_group([r]) for r in range(ctx.world_size)]
    return groups[ctx.rank]


def _cases_4(ctx: _Ctx) -> None:
    A2A, AG, REP = TokenDispatch.ALL_TO_ALL, TokenDispatch.ALL_GATHER, TokenDispatch.REPLICATED
    p6 = ExpertPlacement.contiguous(6, 4)  # E=6 on 4 ranks: {0,1} {2,3} {4} {5}
    p8 = ExpertPlacement.contiguous(8, 4)
    for scheme in EP_SCHEMES:
        full6 = make_layer(scheme, E=6)
        # rank 2 holds no tokens
        ctx.case(f"ep4/E6/{scheme}/all_to_all", lambda: _ep_case(ctx, full6, p6, [9, 5, 0, 7], 3, 1, dispatch=A2A))
        ctx.case(f"ep4/E6/{scheme}/all_gather", lambda: _ep_case(ctx, full6, p6, [5, 5, 5, 5], 3, 2, dispatch=AG))
    full6 = make_layer("bf16", E=6)
    full8 = make_layer("int4_w4a16_g128", E=8)
    ctx.case("ep4/E6/bf16/replicated", lambda: _ep_case(ctx, full6, p6, [4, 4, 4, 4], 3, 3, dispatch=REP))
    ctx.case("ep4/E6/bf16/all_to_all/skew_to_rank0",
             lambda: _ep_case(ctx, full6, p6, [6, 3, 8, 2], 2, 4, dispatch=A2A, allowed=[0, 1]))
    ctx.case("ep4/E6/bf16/all_to_all/skew_to_rank3_with_empty_rank",
             lambda: _ep_case(ctx, full6, p6, [6, 0, 8, 2], 1, 5, dispatch=A2A, allowed=[5]))
    ctx.case("ep4/E8/int4_w4a16_g128/all_to_all", lambda: _ep_case(ctx, full8, p8, [7, 8, 9, 3], 4, 6, dispatch=A2A))
    ctx.case("ep4/E8/int4_w4a16_g128/all_to_all/combine_input",
             lambda: _ep_case(ctx, full8, p8, [7, 8, 0, 3], 4, 6, dispatch=A2A, combine=CombinePrecision.INPUT))
    ctx.case("compile/aot_eager/ep4/E6/bf16/all_to_all",
             lambda: _compile_case(ctx, full6, p6, [([9, 5, 0, 7], 2, 30, None), ([9, 5, 0, 7], 2, 31, [0, 1])],
                                   dispatch=A2A))


def _spawn(world_size: int, tmp_path) -> List[dict]:
    import torch.multiprocessing as mp

    outdir = str(tmp_path)
    mp.spawn(_worker, args=(world_size, os.path.join(outdir, "store"), outdir), nprocs=world_size, join=True)
    results = []
    for r in range(world_size):
        path = os.path.join(outdir, f"rank{r}.json")
        assert os.path.exists(path), f"rank {r} wrote no results"
        with open(path) as f:
            results += [dict(rank=r, **c) for c in json.load(f)]
    return results


def _report(results: List[dict]) -> None:
    failed = [r for r in results if not r["ok"]]
    for r in results:
        if r["ok"]:
            extra = {k: v for k, v in r.items() if k not in ("ok", "case", "rank")}
            print(f"rank {r['rank']} {r['case']}: {extra}")
    assert not failed, "\n\n".join(f"rank {r['rank']} {r['case']}:\n{r['error']}" for r in failed)


@pytest.mark.parametrize("world_size", [2, 4])
def test_gloo_expert_and_tensor_parallel(world_size, tmp_path):
    results = _spawn(world_size, tmp_path)
    _report(results)
    names = {r["case"] for r in results}
    assert len(names) >= (30 if world_size == 2 else 12), sorted(names)
    for r in results:
        if r["case"].startswith("compile/") and "frames" in r:
            assert r["frames"] == 1, r  # fullgraph, no recompile for new routings
