"""Activation quantization on a CUDA GPU (compiled Triton, not the
interpreter): the device helpers bit-exact against ``formats``, the native
fp8 / int8 dots against the compute-dtype fallback and ``moe_gemm_ref``, and
the fused pipeline of every activation-quantizing scheme against the
reference. Skipped without a GPU, or when the kernels were imported under
``TRITON_INTERPRET=1`` (run this file alone: ``python -m pytest
tests/test_act_quant_cuda.py``).
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from act_quant_cases import edge_rows, nan_rows, same_codes, same_values  # noqa: E402
from moe_cases import make_experts, rel_err  # noqa: E402

from torch_moe_quant import reference  # noqa: E402
from torch_moe_quant.kernels import ARows, KernelConfig, fused_experts_triton, moe_gemm, moe_gemm_ref  # noqa: E402
from torch_moe_quant.kernels.act_quant import (  # noqa: E402
    ActPlacement,
    ActQuant,
    quantize_activation,
    quantize_activation_ref,
    quantize_rows,
)
from torch_moe_quant.kernels.config import fit_activation  # noqa: E402
from torch_moe_quant.kernels.moe_gemm import DotPreference, kernel_is_interpreted  # noqa: E402
from torch_moe_quant.schemes import SCHEMES  # noqa: E402

ACT_SCHEMES = sorted(n for n, s in SCHEMES.items() if s.activation is not None)


@pytest.fixture(autouse=True, scope="module")
def _compiled():
    if kernel_is_interpreted():
        pytest.skip("kernels were imported under TRITON_INTERPRET=1")


@pytest.mark.parametrize("name", ACT_SCHEMES)
def test_helpers_bit_exact_on_gpu(name):
    spec = SCHEMES[name].activation
    static = None
    if spec.mode.value == "static":
        static = torch.tensor([744.7273 if spec.fmt.value == "nvfp4" else 0.0123], device="cuda")
    act = ActQuant.of(spec, static)
    x = edge_rows(512)
    if spec.fmt.value == "int8":
        x = x[torch.isfinite(x).all(1) & (x.abs().amax(1) < 1e30)]
        if static is not None:
            x = x[(x.abs() / static.cpu()).amax(1) < 1e6]
    xs = [x, torch.randn(64, 512) * 10]
    if spec.fmt.value != "int8":
        xs.append(nan_rows(512))
    for xc in xs:
        # the contract is formats on the CPU: torch on CUDA divides by a scalar as a
        # multiplication by its reciprocal (1 ulp off the CPU's IEEE division)
        cpu_act = ActQuant.of(spec, None if static is None else static.cpu())
        got, want = quantize_activation(xc.cuda(), act), quantize_activation_ref(xc, cpu_act)
        assert same_codes(got.codes.cpu(), want.codes.cpu()), name
        assert same_values(got.values.cpu(), want.values.cpu()), name
        if got.scale.dtype == torch.float32:
            assert same_values(got.scale.cpu(), want.scale.cpu()), name
        elif got.scale.dtype == torch.float8_e4m3fn:
            assert same_codes(got.scale.cpu(), want.scale.cpu()), name
        else:
            assert torch.equal(got.scale.cpu(), want.scale.cpu()), name


@pytest.mark.parametrize("M", [1, 64, 1024])
@pytest.mark.parametrize("name", ACT_SCHEMES)
def test_gemm_paths_on_gpu(name, M):
    experts = make_experts(name).to("cuda")
    act = ActQuant.of(experts.scheme.activation, experts.a13_scale)
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(M)]).to(torch.int32).cuda()
    x = torch.randn(M, 128, generator=g).bfloat16().cuda()
    for cfg in (KernelConfig(16, 64, 128), KernelConfig(64, 128, 64)):
        cfg = fit_activation(cfg, act)
        aligned = torch.ops.moe_quant.align(ids, 4, cfg.block_m, None)
        kw = dict(top_k=2, a_rows=ARows.TOKENS, out_dtype=torch.float32, config=cfg, act=act,
                  compute_dtype=torch.bfloat16)
        if act.placement is ActPlacement.ROW_KERNEL:
            codes, scale = quantize_rows(x, act)
            args, kw = (codes, experts.w13, *aligned), dict(kw, a_scale=scale)
        else:
            args = (x, experts.w13, *aligned)
        ref = moe_gemm_ref(*args, **kw)
        auto = moe_gemm(*args, **kw)
        fallback = moe_gemm(*args, dot=DotPreference.COMPUTE, **kw)
        assert rel_err(auto, ref) < 1e-2, (name, M, cfg, rel_err(auto, ref))
        assert rel_err(fallback, ref) < 1e-2, (name, M, cfg, rel_err(fallback, ref))


@pytest.mark.parametrize("name", ACT_SCHEMES)
def test_fused_pipeline_on_gpu(name):
    experts = make_experts(name)
    g = torch.Generator().manual_seed(1)
    M = 300
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(M)]).to(torch.int32)
    w = torch.rand(M, 2, generator=g)
    x = torch.randn(M, 128, generator=g).bfloat16()
    ref = reference.fused_moe(x, experts, w, ids)
    out = fused_experts_triton(x.cuda(), experts.to("cuda"), w.cuda(), ids.cuda())
    # bf16 GEMM operands can move GEMM2 inputs across a quantization step: 4-bit steps are coarse
    bound = 5e-2 if SCHEMES[name].activation.fmt.value in ("nvfp4", "mxfp4") else 2e-2
    assert rel_err(out.cpu(), ref) < bound, (name, rel_err(out.cpu(), ref))
