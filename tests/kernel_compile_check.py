"""Helper of ``test_kernels_compile``, run in its own process (the
interpreter tests set ``TRITON_INTERPRET=1`` before the kernels are first
imported, and interpreted kernels cannot be compiled): record every Triton
launch of the CUDA pipeline on CPU tensors, compile each distinct launch for
``sm_90`` with Triton's compiler and ptxas, print a JSON summary."""

import importlib
import json
import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"

import torch_moe_quant as tmq  # noqa: E402
from torch_moe_quant.kernels.fused_experts import ActInput, fused_experts_triton  # noqa: E402
from torch_moe_quant.routing import RoutingMethod  # noqa: E402

K = importlib.import_module  # the package re-exports functions under the submodules' names
KERNELS = {
    "_gemm_kernel": "moe_gemm_kernel",
    "_decode_kernel": "moe_decode_kernel",
    "_act_quant_kernel": "act_quant_kernel",
    "_align_kernel": "align_kernel",
    "_combine_kernel": "combine_kernel",
    "_route_kernel": "route_kernel",
}
#: one scheme per weight format and per activation path (row codes + native
#: dot, static codes, group codes, qdq_rows / prologue on MX and nvfp4)
SCHEMES = [
    "fp16", "fp32", "fp8_w8a16_block128", "int8_w8a16_channel", "int4_w4a16_g128_zp",
    "int4_w4a16_gptq_g128_actorder", "mxfp4_w4a16", "nvfp4_w4a4", "mxfp6_e2m3_w6a6",
    "fp8_w8a8_channel_token", "int8_w8a8_tensor_static", "fp8_w8a8_block128", "int4_w4a8_g128",
    "mxfp4_w4a8_mxfp8",
]
_TYPES = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32", torch.int16: "i16",
    torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8", torch.float8_e4m3fn: "fp8e4nv",
}
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


class _Recorder:
    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def _source(fn, args, kwargs):
    """``(ASTSource, options, constexprs by name)`` of one launch: pointer /
    int / float types, constexprs (and None pointers) by index."""
    values = dict(zip(fn.arg_names, args), **kwargs)
    signature, constexprs = {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        v = values.get(name)
        if param.is_constexpr or v is None:
            signature[name], constexprs[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _TYPES[v.dtype]
        elif isinstance(v, int):
            signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        else:
            signature[name] = "fp32"
    options = {k: values[k] for k in _LAUNCH_OPTIONS if k in values}
    named = {fn.arg_names[i[0]]: repr(v) for i, v in constexprs.items()}
    return ASTSource(fn, signature, constexprs), options, named


def record(launches) -> None:
    for module, name in KERNELS.items():
        mod = K(f"torch_moe_quant.kernels.{module}")
        setattr(mod, name, _Recorder(getattr(mod, name), launches))
    for launcher in ("moe_gemm", "route"):
        setattr(K(f"torch_moe_quant.kernels.{launcher}"), "kernel_is_interpreted", lambda: True)
    setattr(K("torch_moe_quant.kernels.moe_gemm"), "fp8_native", lambda device: True)  # sm90
    setattr(K("torch_moe_quant.kernels.moe_gemm"), "decode_asm", lambda device: True)  # the PTX decoders


def run_pipeline() -> None:
    g = torch.Generator().manual_seed(0)
    E, H, I, M = 4, 256, 128, 5
    w13, w2 = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    x = torch.randn(M, H, generator=g).half()
    tw, ids = tmq.route(torch.randn(M, E, generator=g), 2, "softmax_topk")
    for name in SCHEMES:
        scheme = tmq.get_scheme(name)
        static = dict(a13_scale=0.05, a2_scale=0.05) if scheme.static_activation else {}
        oss = dict(w13_bias=torch.randn(E, 2 * I, generator=g), layout="interleaved") if "mxfp4" in name else {}
        experts = tmq.quantize_experts(w13, w2, name, **static, **oss)
        act = "swigluoai" if oss else "silu"
        inputs = list(ActInput) if scheme.activation is not None else [ActInput.QDQ_KERNEL]
        for act_input in inputs:
            # nothing runs: the outputs are empty tensors, which no step reads on the host
            fused_experts_triton(x, experts, tw, ids, activation=act, act_input=act_input)
    for name in ("int4_w4a16_g128", "mxfp4_w4a16", "nvfp4_w4a16"):  # the decode kernel (bf16 only)
        experts = tmq.quantize_experts(w13, w2, name)
        fused_experts_triton(x.bfloat16(), experts, tw, ids)
    route = K("torch_moe_quant.kernels.route")
    bias = torch.randn(16, generator=g)
    for method in RoutingMethod:
        kw = dict(correction_bias=bias, num_groups=4, topk_groups=2) if method is RoutingMethod.DEEPSEEK_V3 else {}
        route.route_triton(torch.randn(M, 16, generator=g).half(), 4, method, **kw)


def main() -> int:
    launches = []
    record(launches)
    run_pipeline()
    target = GPUTarget("cuda", 90, 32)
    compiled = {}
    for fn, args, kwargs in launches:
        src, options, named = _source(fn, args, kwargs)
        key = (fn.__name__, tuple(src.signature.items()), tuple(sorted(named.items())))
        if key not in compiled:
            triton.compile(src, target=target, options=options)
            compiled[key] = named
    summary = dict(
        launches=len(launches),
        compiled=len(compiled),
        kernels=sorted({k[0] for k in compiled}),
        gemm_constexprs=[c for k, c in compiled.items() if k[0] == "moe_gemm_kernel"],
        decode_constexprs=[c for k, c in compiled.items() if k[0] == "moe_decode_kernel"],
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
