"""``torch_moe_quant.fused_moe``: the public MoE entry point. It validates
the call and dispatches to the scheme's ``torch.ops.moe_quant`` op through
the table ``ops.EXPERT_OPS`` (no if-chain); ``reference.fused_moe`` is the
plain-PyTorch ground truth the ops' CPU kernels run."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .activations import Activation, as_activation
from .experts import QuantizedExperts


def fused_moe(
    hidden_states: torch.Tensor,
    experts: QuantizedExperts,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: Union[Activation, str] = Activation.SILU,
    expert_map: Optional[torch.Tensor] = None,
    apply_router_weight_on_input: bool = False,
) -> torch.Tensor:
    """MoE forward through the scheme's ``moe_quant`` op.

    Same contract as ``torch_moe_quant.reference.fused_moe``: ``hidden_states
    [M, H]``, routing ``[M, k]``, returns ``[M, H]`` in the input dtype.
    Differentiable w.r.t. ``hidden_states`` and ``topk_weights``.
    """
    from .ops.experts import EXPERT_OPS, SIGNATURES

    if not isinstance(experts, QuantizedExperts):
        raise TypeError(
            f"experts must be a QuantizedExperts (torch_moe_quant.quantize_experts), "
            f"got {type(experts).__name__}"
        )
    name = experts.scheme.name
    if name not in EXPERT_OPS or SIGNATURES[name].scheme != experts.scheme:
        raise ValueError(
            f"experts.scheme {name!r} is not a registered scheme; build it from torch_moe_quant.SCHEMES"
        )
    if isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 2 and hidden_states.shape[1] != experts.hidden_size:
        raise ValueError(
            f"hidden_states must have shape [num_tokens, {experts.hidden_size}], "
            f"got {tuple(hidden_states.shape)}"
        )
    pad = experts.padded_hidden_size - experts.hidden_size
    if pad and isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 2:
        # the op takes the weights' padded width: zero features add nothing
        hidden_states = torch.nn.functional.pad(hidden_states, (0, pad))
    out = EXPERT_OPS[name](
        hidden_states,
        topk_weights,
        topk_ids,
        *SIGNATURES[name].flatten(experts),
        expert_map,
        as_activation(activation).value,
        experts.layout.value,
        bool(apply_router_weight_on_input),
    )
    return out[:, : experts.hidden_size] if pad else out
