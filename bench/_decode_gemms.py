"""The single decode-kernel GEMMs that ``decode_tune.py`` and
``exp_decode_variants.py`` time: w13 (with the shape's activation) and w2
(with routing weights) of a shape's experts (all of mixtral's 8, 32 of the
others'), random weights and top-k routing of M tokens."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Iterator, Sequence

import torch

import torch_moe_quant as tmq
from torch_moe_quant.activations import Activation, GateUpLayout

mg = importlib.import_module("torch_moe_quant.kernels.moe_gemm")


@dataclasses.dataclass(frozen=True)
class DecodeGemm:
    shape: str
    M: int
    scheme: str
    name: str  # "w13" / "w2"
    run: Callable[[], torch.Tensor]  # the GEMM on the decode kernel
    weight_bytes: float  # codes + scales of the experts the routing touches

    def label(self) -> str:
        return f"| {self.shape} | {self.M} | {self.scheme} | {self.name} |"


def decode_gemms(shapes: Sequence[str], schemes: Sequence[str], ms_for: Callable[[str], Sequence[int]],
                 dev: torch.device) -> Iterator[DecodeGemm]:
    """Each GEMM of each shape (in order), scheme and ``M in ms_for(shape)``."""
    from moe_bench import SHAPES

    from torch_moe_quant.kernels.align import align_triton
    from torch_moe_quant.kernels.config import GemmProblem, select_config

    for sname in shapes:
        shape = SHAPES[sname]
        g = torch.Generator(device=dev).manual_seed(0)
        E = shape.E if shape.E <= 8 else 32
        w13 = torch.randn(E, 2 * shape.I, shape.H, device=dev, dtype=torch.bfloat16, generator=g) / shape.H ** 0.5
        w2 = torch.randn(E, shape.H, shape.I, device=dev, dtype=torch.bfloat16, generator=g) / shape.I ** 0.5
        for scheme in schemes:
            ex = tmq.quantize_experts(w13, w2, scheme, layout=shape.layout, pad_to=128)
            for M in ms_for(sname):
                ids = torch.stack([torch.randperm(E, device=dev, generator=g)[: shape.top_k] for _ in range(M)]).int()
                tw = torch.rand(M, shape.top_k, device=dev, generator=g)
                touched = int(torch.unique(ids).numel())
                for name, w, a_rows, kw in (
                    ("w13", ex.w13, mg.ARows.TOKENS, dict(activation=Activation(shape.activation), layout=GateUpLayout(shape.layout))),
                    ("w2", ex.w2, mg.ARows.PAIRS, dict(topk_weights=tw)),
                ):
                    _, N, K = w.shape
                    rows = M if a_rows is mg.ARows.TOKENS else M * shape.top_k
                    a = torch.randn(rows, K, device=dev, dtype=torch.bfloat16, generator=g)
                    cfg = select_config(GemmProblem(M, N, K, E, shape.top_k, torch.bfloat16), ex.scheme, dev)
                    al = align_triton(ids, E, cfg.block_m)
                    common = dict(top_k=shape.top_k, a_rows=a_rows, config=cfg, kernel=mg.GemmKernel.DECODE, **kw)
                    wbytes = sum(t.numel() * t.element_size() for t in (w.data, w.scale) if t is not None) / E * touched
                    yield DecodeGemm(sname, M, scheme, name,
                                     lambda a=a, w=w, al=al, common=common: mg.moe_gemm(a, w, *al, **common), wbytes)
            del ex
        del w13, w2
        torch.cuda.empty_cache()
