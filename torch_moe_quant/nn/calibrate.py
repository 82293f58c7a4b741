"""``calibrate_(model, batches)``: observe the inputs of both expert GEMMs of
every MoE layer on sample batches, so ``quantize_`` can give static-activation
schemes (``*_static``, ``nvfp4_w4a4``, ``*_w*a8_fp8``) their per-tensor scales
from the model alone (a one-shot calibration in the manner of llm-compressor's:
run the float model, keep a running absolute maximum per layer and GEMM).

What is recorded, per experts module that ``quantize_`` would convert
(``find_experts``), as an ``ActivationRange``:

* ``a13_amax``: ``max |x|`` over the hidden states reaching the experts (the
  first GEMM's input, every token);
* ``a2_amax``: ``max |activation(x @ w13.T + b)|`` over every routed (token,
  expert) pair (the second GEMM's input), computed by the reference
  (``reference.MoEProblem``) on the module's float weights for fused 3-D
  experts, or read from the input of each expert's down projection for lists
  of per-expert ``nn.Linear`` MLPs.

Ranges are kept on the module (a plain attribute: not a buffer, so the
``state_dict`` is unchanged) and accumulate over calls; ``calibrate_`` starts
afresh unless ``reset=False``. ``quantize_`` turns them into the scheme's
scales (``scales_from_range``: fp8 / int8 ``amax / qmax``, nvfp4 the global
scale ``448 * 6 / amax``), exactly what ``calibrate_activation_scales`` gives
for the same inputs. A module that saw no token has no range, and
``quantize_`` then asks for one.

The model runs as it is (``eval()`` it first for inference statistics) under
``torch.no_grad()``; hooks are removed afterwards, also on error.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterable, Mapping, Optional

import torch
from torch import nn

from ._ranges import RANGE_ATTR, ActivationRange, activation_range, record_range, scales_from_range
from .quantize import (
    ExpertsKind,
    FilterFn,
    _linear_names,
    find_experts,
    fused_flags,
    read_fused,
    resolve_activation,
)

def _amax(t: torch.Tensor) -> torch.Tensor:
    return t.detach().abs().amax().float() if t.numel() else torch.zeros((), device=t.device)


def _fused_hook(fqn: str, module: nn.Module, config) -> Callable:
    """Forward pre-hook of a fused 3-D experts module ``(hidden_states,
    top_k_index, top_k_weights)``: both ranges from the reference forward."""
    from ..experts import quantize_experts
    from ..reference import MoEProblem

    flags = fused_flags(fqn, module)
    act = resolve_activation(fqn, module, flags.has_gate, config=config)
    fe = read_fused(module, flags)
    dense = quantize_experts(
        fe.w13.float(), fe.w2.float(), "fp32", w13_bias=None if fe.w13_bias is None else fe.w13_bias.float(),
        w2_bias=None if fe.w2_bias is None else fe.w2_bias.float(), layout=fe.layout,
    )

    def hook(mod, args, kwargs):
        named = dict(zip(("hidden_states", "top_k_index", "top_k_weights"), args))
        named.update(kwargs)
        x, ids, w = named["hidden_states"], named["top_k_index"], named["top_k_weights"]
        x = x.reshape(-1, x.shape[-1])
        seen = []

        def keep(t):
            seen.append(_amax(t))
            return t

        problem = MoEProblem.build(
            x.float(), dense.to(x.device), w.reshape(x.shape[0], -1).float(), ids.reshape(x.shape[0], -1),
            act, None, False,
        )
        dataclasses.replace(problem, qdq13=lambda t: t, qdq2=keep).forward()
        a2 = torch.stack(seen).amax() if seen else torch.zeros((), device=x.device)
        record_range(mod, _amax(x), a2, x.shape[0])

    return hook


def _linear_list_hooks(module: nn.ModuleList):
    """Pre-hooks on every expert's gate (its input is also up's: the first
    GEMM's) and down (the second GEMM's) ``nn.Linear``, recording into the
    list module."""
    handles = []
    for expert in module:
        gate, up, down = _linear_names(expert)

        def first(mod, args):
            x = args[0]
            record_range(module, _amax(x), torch.zeros((), device=x.device), x.reshape(-1, x.shape[-1]).shape[0])

        def second(mod, args):
            x = args[0]
            record_range(module, torch.zeros((), device=x.device), _amax(x), 0)

        handles.append(getattr(expert, gate).register_forward_pre_hook(first))
        handles.append(getattr(expert, down).register_forward_pre_hook(second))
    return handles


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def calibrate_(
    model: nn.Module,
    batches: Iterable,
    *,
    filter_fn: Optional[FilterFn] = None,
    forward: Optional[Callable[[nn.Module, object], object]] = None,
    reset: bool = True,
) -> Dict[str, ActivationRange]:
    """Record the expert GEMM input ranges of every float MoE experts module
    of ``model`` over ``batches`` (in place; see module docstring).

    Args:
        model: the float model ``quantize_`` will convert.
        batches: sample inputs; each is passed as ``model(batch)``, or
            ``model(*batch)`` for a tuple/list, ``model(**batch)`` for a dict.
        filter_fn: ``filter_fn(module, fqn)``: the modules to calibrate (the
            same filter you will give ``quantize_``).
        forward: ``forward(model, batch)`` to call instead of the above.
        reset: forget ranges recorded by earlier calls first.

    Returns:
        ``{fqn: ActivationRange}`` of the calibrated modules. Then
        ``quantize_(model, "<static scheme>")`` needs no ``activation_scales``.
    """
    found = find_experts(model, filter_fn)
    if not found:
        raise ValueError("calibrate_: the model has no float MoE experts modules to calibrate")
    config = getattr(model, "config", None)
    handles = []
    try:
        for f in found:
            if reset:
                f.module.__dict__.pop(RANGE_ATTR, None)
            if f.kind is ExpertsKind.FUSED_3D:
                handles.append(
                    f.module.register_forward_pre_hook(_fused_hook(f.fqn, f.module, config), with_kwargs=True)
                )
            else:
                handles += _linear_list_hooks(f.module)
        count = 0
        with torch.no_grad():
            for batch in batches:
                forward(model, batch) if forward is not None else _run(model, batch)
                count += 1
        if count == 0:
            raise ValueError("calibrate_: batches is empty; pass at least one sample batch")
    finally:
        for h in handles:
            h.remove()
    return {f.fqn: activation_range(f.module) for f in found if activation_range(f.module) is not None}


__all__ = ["RANGE_ATTR", "ActivationRange", "activation_range", "calibrate_", "scales_from_range"]
