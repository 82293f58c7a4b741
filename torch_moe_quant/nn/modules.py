"""``QuantizedExpertsModule``: an ``nn.Module`` that owns one MoE layer's
``QuantizedExperts`` and runs them through ``torch_moe_quant.fused_moe``.

Storage contract:

* Every tensor of the ``QuantizedExperts`` is a **buffer** named exactly like
  the argument of the scheme's ``moe_quant::experts_<scheme>`` op (``w13``,
  ``w13_scale``, ``w13_global_scale``, ``w13_zero_point``, ``w13_g_idx``, the
  same for ``w2``, then ``w13_bias``, ``w2_bias``, and ``a13_scale``,
  ``a2_scale`` for static-activation schemes). Absent optional tensors are
  ``None`` buffers and do not appear in ``state_dict()``. So ``model.to()``,
  ``state_dict()``/``load_state_dict()``, ``torch.save``/``torch.load`` and
  safetensors ``save_file``/``load_file`` of the state dict round-trip bit
  for bit.
* Metadata (scheme, layout, activation, logical sizes, packed shapes) are
  plain attributes fixed at construction; a state dict carries tensors only,
  so load it into a module built for the same scheme and sizes (e.g. a model
  quantized the same way, or built on the ``meta`` device and materialized
  with ``to_empty``).
* **Dtypes are frozen.** A dtype cast of the model (``model.to(torch.bfloat16)``,
  ``.half()``, ``.float()``) never casts quantized storage: fp8 codes, fp32
  scales, uint8 e8m0 scales, bf16 weights of the unquantized schemes and the
  biases keep their dtypes, while device moves (``.to("cuda")``, ``.cuda()``,
  ``to_empty``) apply. The output dtype follows the input's.
  ``load_state_dict`` rejects a tensor whose dtype differs from the buffer's
  (it would otherwise be cast silently).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from ..activations import Activation, GateUpLayout
from ..experts import QuantizedExperts, check_activation
from ..formats.core import QuantizedTensor
from ..moe import fused_moe
from ..ops.signature import ExpertsSignature
from ..schemes import Scheme

_WEIGHTS = ("w13", "w2")


@dataclasses.dataclass(frozen=True)
class _WeightMeta:
    """Static part of a quantized weight (what the buffers do not say)."""

    shape: Tuple[int, ...]
    rounding: object
    #: (QuantizedTensor field, buffer name) pairs, e.g. ("scale", "w13_scale")
    buffers: Tuple[Tuple[str, str], ...]


def buffer_names(scheme: Scheme) -> Tuple[str, ...]:
    """Buffer names of a ``QuantizedExpertsModule`` of ``scheme``, in the
    order of the scheme op's tensor arguments (``ExpertsSignature.flatten``)."""
    sig = ExpertsSignature(scheme)
    return sig.weight_args + ("w13_bias", "w2_bias") + sig.static_args


class QuantizedExpertsModule(nn.Module):
    """The experts of one MoE layer under a quantization scheme.

    ``forward(hidden_states [..., H], topk_weights [..., k], topk_ids [..., k])``
    returns ``[..., H]`` in the dtype of ``hidden_states``: the routed sum
    ``sum_j topk_weights[:, j] * expert_{topk_ids[:, j]}(x)`` computed by the
    scheme's ``moe_quant`` op (see ``torch_moe_quant.fused_moe``).

    Args:
        experts: the ``QuantizedExperts`` (from ``torch_moe_quant.quantize_experts``).
        activation: the experts' activation (``Activation`` or its name); must
            agree with the experts being gated (``w13`` holds 2I rows) or not.
    """

    def __init__(self, experts: QuantizedExperts, activation: Union[Activation, str] = Activation.SILU):
        super().__init__()
        if not isinstance(experts, QuantizedExperts):
            raise TypeError(
                f"experts must be a QuantizedExperts (torch_moe_quant.quantize_experts), "
                f"got {type(experts).__name__}"
            )
        act = check_activation(experts, activation)
        self.scheme: Scheme = experts.scheme
        self.layout: GateUpLayout = experts.layout
        self.activation: Activation = act
        self.hidden_size: int = experts.hidden_size
        self.intermediate_size: int = experts.intermediate_size
        sig = ExpertsSignature(experts.scheme)
        fields, args = sig.weight_fields, sig.weight_args
        # plain tuples/dicts (not the signature's cached properties, whose
        # lock torch.compile cannot trace) for the forward path
        self._weight_meta: Dict[str, _WeightMeta] = {
            name: _WeightMeta(
                tuple(w.shape),
                getattr(w, "rounding", None),
                tuple(zip(fields, args[i * len(fields) : (i + 1) * len(fields)])),
            )
            for i, (name, w) in enumerate(zip(_WEIGHTS, (experts.w13, experts.w2)))
        }
        for name, t in zip(buffer_names(self.scheme), sig.flatten(experts)):
            self.register_buffer(name, None if t is None else t.detach().contiguous())

    # -- the QuantizedExperts view -------------------------------------------

    @property
    def quantized_experts(self) -> QuantizedExperts:
        """The ``QuantizedExperts`` built from the current buffers (so it
        follows ``.to(device)`` and ``load_state_dict``); no copy."""
        w13, w2 = (self._weight(name) for name in _WEIGHTS)
        return QuantizedExperts(
            w13,
            w2,
            self.scheme,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            layout=self.layout,
            w13_bias=self.w13_bias,
            w2_bias=self.w2_bias,
            a13_scale=getattr(self, "a13_scale", None),
            a2_scale=getattr(self, "a2_scale", None),
        )

    def _weight(self, name: str):
        spec = self.scheme.weight
        if spec.fmt is None:
            return getattr(self, name)
        meta = self._weight_meta[name]
        return QuantizedTensor(
            fmt=spec.fmt,
            granularity=spec.granularity,
            shape=meta.shape,
            rounding=meta.rounding,
            **{field: getattr(self, buffer) for field, buffer in meta.buffers},
        )

    @property
    def num_experts(self) -> int:
        return self._weight_meta["w13"].shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    # -- forward -------------------------------------------------------------

    def forward(
        self,
        hidden_states: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        *,
        expert_map: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Routed expert sum; leading dims of ``hidden_states`` are flattened
        into tokens (``topk_*`` must have the same leading dims)."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        m = x.shape[0]
        out = fused_moe(
            x,
            self.quantized_experts,
            topk_weights.reshape(m, -1),
            topk_ids.reshape(m, -1),
            activation=self.activation,
            expert_map=expert_map,
        )
        return out.view(shape)

    def extra_repr(self) -> str:
        parts = [
            f"scheme={self.scheme.name}",
            f"num_experts={self.num_experts}",
            f"hidden_size={self.hidden_size}",
            f"intermediate_size={self.intermediate_size}",
            f"activation={self.activation.value}",
            f"layout={self.layout.value}",
        ]
        e = self._weight_meta["w2"].shape
        if (e[1], e[2]) != (self.hidden_size, self.intermediate_size):
            parts.append(f"padded=({e[1]}, {e[2]})")
        if self.w13_bias is not None or self.w2_bias is not None:
            parts.append("bias=True")
        return ", ".join(parts)

    # -- dtype-frozen storage --------------------------------------------------

    def _apply(self, fn, recurse=True):
        """Apply ``fn`` (``to``, ``cuda``, ``half``, ``to_empty``...) to the
        buffers, except that a change of dtype is reduced to the device move:
        quantized storage is never cast (see module docstring)."""

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
            if probe.dtype == t.dtype:
                return fn(t)
            return t.to(device=probe.device)

        return super()._apply(keep_dtype, recurse)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        mismatched = []
        for name, buf in self._buffers.items():
            key = prefix + name
            if buf is not None and key in state_dict and isinstance(state_dict[key], torch.Tensor):
                if state_dict[key].dtype != buf.dtype:
                    mismatched.append(
                        f"{key}: the checkpoint holds {state_dict[key].dtype} but "
                        f"{self.scheme.name} stores {buf.dtype} (quantized storage is never cast)"
                    )
        if mismatched:
            error_msgs.extend(mismatched)
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class TransformersQuantizedExperts(QuantizedExpertsModule):
    """Drop-in replacement of a transformers v5 experts module (``Qwen3MoeExperts``,
    ``MixtralExperts``, ``GptOssExperts``...): same buffers as
    ``QuantizedExpertsModule``, but ``forward`` takes the transformers call
    ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`` and
    returns ``[T, H]`` in the dtype of ``hidden_states``.

    ``router_indices``/``routing_weights`` are accepted as keyword spellings of
    ``top_k_index``/``top_k_weights`` (gpt-oss names them so).
    """

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        top_k_index: Optional[torch.Tensor] = None,
        top_k_weights: Optional[torch.Tensor] = None,
        *,
        router_indices: Optional[torch.Tensor] = None,
        routing_weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        ids = top_k_index if top_k_index is not None else router_indices
        weights = top_k_weights if top_k_weights is not None else routing_weights
        if ids is None or weights is None:
            raise TypeError(
                "TransformersQuantizedExperts.forward needs top_k_index and top_k_weights "
                "(or router_indices and routing_weights)"
            )
        return super().forward(hidden_states, weights, ids)


class ExpertView:
    """One expert of a ``QuantizedExpertList``: ``view(x [..., H]) -> [..., H]``
    is that expert's MLP on every row of ``x`` (routing weight 1), computed by
    the scheme's op. Not a module: it owns nothing."""

    def __init__(self, experts: "QuantizedExpertList", index: int):
        self._experts = experts
        self.index = index

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        m = flat.shape[0]
        ids = torch.full((m, 1), self.index, dtype=torch.int32, device=x.device)
        weights = torch.ones((m, 1), dtype=torch.float32, device=x.device)
        return self._experts(flat, weights, ids).view(shape)

    forward = __call__

    def __repr__(self) -> str:
        return f"ExpertView(index={self.index}, scheme={self._experts.scheme.name})"


class QuantizedExpertList(QuantizedExpertsModule):
    """Replacement of an ``nn.ModuleList`` of per-expert MLPs (w1/w2/w3 or
    gate_proj/up_proj/down_proj ``nn.Linear``), stacked into w13/w2.

    Keeps the list interface a hand-written MoE block uses: ``len(experts)``,
    ``experts[i](x)`` and iteration give ``ExpertView``s (one op call per
    expert, correct but not fused). Calling the module itself with routing,
    ``experts(hidden_states, topk_weights, topk_ids)``, runs the fused op once.
    """

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, index: Union[int, slice]) -> Union[ExpertView, List[ExpertView]]:
        if isinstance(index, slice):
            return [ExpertView(self, i) for i in range(self.num_experts)[index]]
        index = int(index)
        n = self.num_experts
        if not -n <= index < n:
            raise IndexError(f"expert index {index} out of range for {n} experts")
        return ExpertView(self, index % n)

    def __iter__(self) -> Iterator[ExpertView]:
        return (ExpertView(self, i) for i in range(self.num_experts))
