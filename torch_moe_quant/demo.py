"""``python -m torch_moe_quant.demo``: a small transformers MoE model,
quantized with a few schemes and compiled through the moe_quant lowerings.

The model is a random-weight Qwen3-MoE causal LM of transformers 5 (2
layers, 8 experts, top-2, bf16; its experts use transformers' ``grouped_mm``
implementation). For every scheme the demo

* ``bf16``: keeps the model as it is: the lowerings rewrite its plain router
  (softmax -> top-k -> renormalize) into ``moe_quant.route`` and its
  ``grouped_mm`` experts into ``moe_quant.experts_bf16``, then fuse the two
  into the whole-block op ``moe_quant.moe_bf16``;
* any other scheme: quantizes the experts in place with
  ``torch_moe_quant.quantize_`` (static-activation schemes after
  ``torch_moe_quant.calibrate_`` on four sample batches; the experts module then calls
  ``moe_quant.experts_<scheme>``), the router is still rewritten and the
  pair fused into ``moe_quant.moe_<scheme>``;

and prints the experts' weight bytes, logit SQNR and next-token agreement
against the bf16 model run eagerly, tokens/s eager and compiled
(``torch.compile(fullgraph=True)`` with ``lowerings.enabled()``), the rewrite
counters and the ``moe_quant`` ops the compiled code calls.

On CPU every op runs its plain-PyTorch reference kernel, so the times there
measure the reference, not the fused kernels; on a GPU the ops run the
Triton kernels. Runs on CPU in well under two minutes.
"""

from __future__ import annotations

import argparse
import copy
import re
import time
from typing import Dict, List

import torch
from torch._dynamo.utils import counters

import torch_moe_quant as tmq
from torch_moe_quant.nn.quantize import _module_bytes
from torch_moe_quant.tools.accuracy import sqnr_db

DEFAULT_SCHEMES = ("bf16", "fp8_w8a8_channel_token", "fp8_w8a8_tensor_static", "int4_w4a16_g128", "mxfp4_w4a16")


def build_model(hidden: int, intermediate: int, experts: int, top_k: int, layers: int, device):
    """A random-weight Qwen3-MoE causal LM (transformers 5), bf16, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=hidden, moe_intermediate_size=intermediate, num_experts=experts,
        num_experts_per_tok=top_k, norm_topk_prob=True, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, intermediate_size=2 * hidden,
        vocab_size=1024, max_position_embeddings=256,
    )
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(device=device, dtype=torch.bfloat16).eval()


def experts_bytes(model: torch.nn.Module) -> int:
    """Bytes of every experts module's parameters and buffers (the quantized
    modules keep their codes and scales as buffers)."""
    return sum(_module_bytes(m) for name, m in model.named_modules() if name.endswith(".experts"))


def _time_ms(fn, iters: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / iters


def compile_lowered(model):
    """``torch.compile(fullgraph=True)`` under ``lowerings.enabled()``; returns
    the logits of the first call, the rewrite counters, the moe_quant ops the
    generated code calls, and the compiled callable."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from . import lowerings

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda ids: model(ids).logits, fullgraph=True)

    def call(ids):
        with lowerings.enabled():
            return compiled(ids)

    # no FX graph cache: a hit would skip the pass, and the counters with it
    with inductor_config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        code = run_and_get_code(call, _IDS[0])[1]  # compiles: the pass runs here
    return call, dict(counters["moe_quant"]), _ops_in_code(code)


def _ops_in_code(code: List[str]) -> List[str]:
    return sorted(set(re.findall(r"torch\.ops\.(moe_quant\.\w+)", "\n".join(code))))


_IDS: List[torch.Tensor] = []


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--schemes", nargs="*", default=list(DEFAULT_SCHEMES), choices=sorted(tmq.SCHEMES))
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = build_model(args.hidden, args.intermediate, args.experts, args.top_k, args.layers, device)
    ids = torch.randint(0, base.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    _IDS[:] = [ids]
    print(f"Qwen3-MoE (random weights): {args.layers} layers, E={args.experts}, H={args.hidden}, "
          f"I={args.intermediate}, top_k={args.top_k}, {args.tokens} tokens, bf16, device={device}")
    if device == "cpu":
        print("(CPU: the moe_quant ops run their reference kernels; times measure the reference)")
    header = (f"{'scheme':<24}{'experts MiB':>12}{'logit SQNR':>11}{'top-1 agree':>12}"
              f"{'eager tok/s':>12}{'compiled tok/s':>15}  rewrites / compiled graph calls")
    print(header)
    print("-" * len(header))
    with torch.no_grad():
        ref = base(ids).logits.float()
        for name in args.schemes:
            model = base if name == "bf16" else copy.deepcopy(base)
            if tmq.get_scheme(name).static_activation:
                # static activation scales from sample batches (other tokens than the measured ones)
                g = torch.Generator().manual_seed(2)
                calib = [torch.randint(0, base.config.vocab_size, (1, args.tokens), generator=g).to(device)
                         for _ in range(4)]
                tmq.calibrate_(model, calib)
            if name != "bf16":
                tmq.quantize_(model, name, progress="never")
            eager = model(ids).logits.float()
            call, rewrites, ops = compile_lowered(model)
            compiled_logits = call(ids).float()
            eager_ms = _time_ms(lambda: model(ids), args.iters)
            compiled_ms = _time_ms(lambda: call(ids), args.iters)
            agree = (compiled_logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
            rw = ", ".join(f"{k}={v}" for k, v in sorted(rewrites.items())) or "no rewrites"
            print(
                f"{name:<24}{experts_bytes(model) / 2**20:>12.2f}{sqnr_db(ref, compiled_logits):>11.1f}"
                f"{100 * agree:>11.0f}%{1e3 * args.tokens / eager_ms:>12.0f}{1e3 * args.tokens / compiled_ms:>15.0f}"
                f"  {rw}; {', '.join(ops)}"
            )
            del eager


if __name__ == "__main__":
    main()
