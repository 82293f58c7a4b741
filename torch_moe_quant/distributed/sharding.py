"""Splitting one MoE layer's ``QuantizedExperts`` across ranks.

Expert parallelism (EP): ``ExpertPlacement`` says which rank holds which
global expert; ``shard_experts`` keeps one rank's experts (every tensor's
expert dim is sliced: codes, scales, zero points, ``g_idx``, nvfp4 global
scales, biases); ``torch_moe_quant.nn.loaders.load_local_experts`` reads
only those experts from a checkpoint. Per-layer static activation scales
(``a13_scale``, ``a2_scale``, ``[1, 1]``: one per GEMM, shared by every
expert) are replicated.

Placement rule (``ExpertPlacement.contiguous``): rank ``r`` of ``ep`` holds the
contiguous range of global experts ``[start_r, start_r + n_r)`` with
``n_r = E // ep + (1 if r < E % ep else 0)``: the remainder goes to the first
ranks, e.g. E=6 on 4 ranks gives ranks 0..3 the experts ``{0,1} {2,3} {4} {5}``.
Any other assignment is an explicit ``ExpertPlacement(owners=...)`` (rank of
every global expert). A rank's local experts are its global experts in
ascending order, and its ``expert_map`` (global id -> local id, ``-1`` = not
here) is what ``fused_moe(expert_map=)`` takes.

Tensor parallelism (TP): ``shard_experts_tp`` splits the (padded)
intermediate dim I into ``tp`` equal slices: rows of w13 (both the gate and
the up half, in the experts' ``GateUpLayout``), the matching entries of
``w13_bias``, and the columns of w2. Quantized formats whose scales group
the split dims (int4/fp8 groups and mx/nvfp4 blocks along w2's columns, fp8
128x128 blocks along w13's rows, packed sub-byte codes) need every slice
boundary on a group boundary: otherwise ``ValueError``. The w2 bias is
added by rank 0 only (other ranks hold zeros, so every rank runs the same
graph).

Every function returns new tensors (copies), so the full experts can be
freed after sharding.
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple

import torch

from ..activations import GateUpLayout
from ..experts import QuantizedExperts, Weight
from ..formats.core import PerBlock, PerGroup, PerTensor, QuantizedTensor
from ..formats.layout import TRAITS, validate
from ..schemes import ActOrder

__all__ = [
    "ExpertParallelShard",
    "ExpertPlacement",
    "TensorParallelShard",
    "concat_experts",
    "select_experts",
    "shard_experts",
    "shard_experts_tp",
]


def _check_rank(rank, world_size: int, name: str = "rank") -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"{name} must be an int, got {type(rank).__name__}")
    if not 0 <= rank < world_size:
        raise ValueError(f"{name} must be in [0, {world_size}), got {rank}")
    return rank


def _check_world_size(world_size, name: str = "world_size") -> int:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"{name} must be a positive int, got {world_size!r}")
    return world_size


# ---------------------------------------------------------------------------
# Expert placement


@dataclasses.dataclass(frozen=True)
class ExpertPlacement:
    """Which rank of an expert-parallel group holds each global expert.

    ``owners[e]`` is the rank holding global expert ``e``; ``world_size`` is
    the EP group size ``ep``. Every rank must hold at least one expert (a rank
    with none has no local experts to run; use a smaller group). A rank's
    local expert ``i`` is its ``i``-th owned global expert in ascending order.
    """

    owners: Tuple[int, ...]
    world_size: int

    def __post_init__(self) -> None:
        _check_world_size(self.world_size)
        owners = tuple(self.owners)
        object.__setattr__(self, "owners", owners)
        if not owners:
            raise ValueError("owners must name the rank of at least one expert, got ()")
        for e, r in enumerate(owners):
            if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < self.world_size:
                raise ValueError(
                    f"owners[{e}] must be a rank in [0, {self.world_size}), got {r!r}"
                )
        empty = sorted(set(range(self.world_size)) - set(owners))
        if empty:
            raise ValueError(
                f"owners gives no expert to ranks {empty} of world_size={self.world_size}: "
                "every rank of the expert-parallel group must hold at least one expert"
            )

    # -- constructors -----------------------------------------------------

    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> "ExpertPlacement":
        """Contiguous ranges, the remainder ``num_experts % world_size`` on the
        first ranks (module docstring)."""
        _check_world_size(world_size)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < world_size:
            raise ValueError(
                f"num_experts must be an int >= world_size={world_size} (every rank holds an "
                f"expert), got {num_experts!r}"
            )
        base, extra = divmod(num_experts, world_size)
        owners: List[int] = []
        for r in range(world_size):
            owners += [r] * (base + (1 if r < extra else 0))
        return cls(tuple(owners), world_size)

    @classmethod
    def even(cls, num_experts: int, world_size: int, *, name: str = "placement") -> "ExpertPlacement":
        """``contiguous`` when ``world_size`` divides ``num_experts``; otherwise a
        ``ValueError`` asking for an explicit placement (``name`` is the
        argument the caller should pass)."""
        _check_world_size(world_size)
        if isinstance(num_experts, int) and num_experts % world_size:
            base, extra = divmod(num_experts, world_size)
            raise ValueError(
                f"{num_experts} experts do not divide evenly over ep={world_size} ranks: pass "
                f"{name}=ExpertPlacement.contiguous({num_experts}, {world_size}) (ranks "
                f"0..{extra - 1} hold {base + 1} experts, the others {base}) or an explicit "
                "ExpertPlacement(owners=..., world_size=...)"
            )
        return cls.contiguous(num_experts, world_size)

    @classmethod
    def from_expert_maps(cls, expert_maps: Sequence[torch.Tensor]) -> "ExpertPlacement":
        """The placement given by one ``expert_map`` per rank (global id ->
        local id, -1 = not on that rank). Each expert must be on exactly one
        rank and each rank's local ids must be ``0..n-1`` in ascending global
        order (the order ``shard_experts`` produces)."""
        maps = [torch.as_tensor(m).tolist() for m in expert_maps]
        if not maps:
            raise ValueError("expert_maps must hold one map per rank, got none")
        E = len(maps[0])
        if any(len(m) != E for m in maps):
            raise ValueError(f"expert_maps must all have {E} entries, got {[len(m) for m in maps]}")
        owners = []
        for e in range(E):
            holders = [r for r, m in enumerate(maps) if m[e] != -1]
            if len(holders) != 1:
                raise ValueError(
                    f"expert_maps: global expert {e} must be on exactly one rank, found on {holders}"
                )
            owners.append(holders[0])
        placement = cls(tuple(owners), len(maps))
        for r, m in enumerate(maps):
            want = placement.expert_map_list(r)
            if m != want:
                raise ValueError(
                    f"expert_maps[{r}] must number rank {r}'s experts 0..n-1 in ascending global "
                    f"order ({want}), got {m}"
                )
        return placement

    # -- queries ----------------------------------------------------------

    @property
    def num_experts(self) -> int:
        """Number of global experts E."""
        return len(self.owners)

    def local_experts(self, rank: int) -> Tuple[int, ...]:
        """Global ids of ``rank``'s experts, ascending (local id = position)."""
        _check_rank(rank, self.world_size)
        return tuple(e for e, r in enumerate(self.owners) if r == rank)

    def num_local(self, rank: int) -> int:
        return len(self.local_experts(rank))

    def expert_map_list(self, rank: int) -> List[int]:
        local = {e: i for i, e in enumerate(self.local_experts(rank))}
        return [local.get(e, -1) for e in range(self.num_experts)]

    def expert_map(self, rank: int, device=None) -> torch.Tensor:
        """int32 ``[E]``: global expert id -> ``rank``'s local id, -1 elsewhere."""
        return torch.tensor(self.expert_map_list(rank), dtype=torch.int32, device=device)

    def owner_table(self, device=None) -> torch.Tensor:
        """int64 ``[E]``: the rank holding each global expert."""
        return torch.tensor(self.owners, dtype=torch.int64, device=device)

    def __str__(self) -> str:
        parts = []
        for r in range(self.world_size):
            ids = self.local_experts(r)
            contiguous = list(ids) == list(range(ids[0], ids[-1] + 1))
            parts.append(f"{r}: {ids[0]}..{ids[-1]}" if contiguous and len(ids) > 2 else f"{r}: {list(ids)}")
        return f"ExpertPlacement(E={self.num_experts}, ep={self.world_size}; " + ", ".join(parts) + ")"


# ---------------------------------------------------------------------------
# EP shards


@dataclasses.dataclass(frozen=True)
class ExpertParallelShard:
    """One rank's part of an expert-parallel MoE layer.

    * ``experts``: the rank's local experts (``placement.num_local(rank)`` of
      them), in ascending global order;
    * ``placement``, ``rank``: where every global expert lives;
    * ``expert_map``: int32 ``[E]`` global -> local id (-1 = elsewhere);
    * ``owners``: int64 ``[E]`` rank of every global expert.

    Build it with ``shard_experts`` (from the full layer),
    ``ExpertParallelShard.from_local`` (experts already local) or
    ``nn.loaders.load_local_experts`` (from a checkpoint).
    """

    experts: QuantizedExperts
    placement: ExpertPlacement
    rank: int
    expert_map: torch.Tensor
    owners: torch.Tensor

    @classmethod
    def from_local(
        cls, experts: QuantizedExperts, placement: ExpertPlacement, rank: int
    ) -> "ExpertParallelShard":
        """Wrap experts that already are ``rank``'s local experts (e.g. loaded
        with ``load_experts(..., experts=placement.local_experts(rank))``)."""
        if not isinstance(experts, QuantizedExperts):
            raise TypeError(f"experts must be a QuantizedExperts, got {type(experts).__name__}")
        if not isinstance(placement, ExpertPlacement):
            raise TypeError(f"placement must be an ExpertPlacement, got {type(placement).__name__}")
        _check_rank(rank, placement.world_size)
        want = placement.num_local(rank)
        if experts.num_experts != want:
            raise ValueError(
                f"experts holds {experts.num_experts} experts but placement gives rank {rank} {want} "
                f"(global {list(placement.local_experts(rank))}); {placement}"
            )
        device = experts.w2.data.device if isinstance(experts.w2, QuantizedTensor) else experts.w2.device
        return cls(
            experts,
            placement,
            rank,
            placement.expert_map(rank, device=device),
            placement.owner_table(device=device),
        )

    @property
    def num_global_experts(self) -> int:
        return self.placement.num_experts

    @property
    def world_size(self) -> int:
        return self.placement.world_size

    def to(self, device) -> "ExpertParallelShard":
        return dataclasses.replace(
            self,
            experts=self.experts.to(device),
            expert_map=self.expert_map.to(device),
            owners=self.owners.to(device),
        )


def _index_experts_weight(w: Weight, idx: torch.Tensor) -> Weight:
    if isinstance(w, QuantizedTensor):
        fields = {k: v.index_select(0, idx.to(v.device)) for k, v in w.tensors.items()}
        return dataclasses.replace(w, shape=(int(idx.numel()),) + tuple(w.shape[1:]), **fields)
    return w.index_select(0, idx.to(w.device))


def select_experts(experts: QuantizedExperts, ids: Sequence[int]) -> QuantizedExperts:
    """A ``QuantizedExperts`` of the experts ``ids`` (in that order): the expert
    dim of every tensor is indexed (codes, scales, global scales, zero points,
    ``g_idx``, biases); per-layer static activation scales are kept."""
    if not isinstance(experts, QuantizedExperts):
        raise TypeError(f"experts must be a QuantizedExperts, got {type(experts).__name__}")
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("ids must select at least one expert")
    bad = [i for i in ids if not 0 <= i < experts.num_experts]
    if bad:
        raise ValueError(f"expert ids {bad} out of range for {experts.num_experts} experts")
    idx = torch.tensor(ids, dtype=torch.int64)
    return dataclasses.replace(
        experts,
        w13=_index_experts_weight(experts.w13, idx),
        w2=_index_experts_weight(experts.w2, idx),
        w13_bias=None if experts.w13_bias is None else experts.w13_bias.index_select(0, idx.to(experts.w13_bias.device)),
        w2_bias=None if experts.w2_bias is None else experts.w2_bias.index_select(0, idx.to(experts.w2_bias.device)),
    )


def concat_experts(parts: Sequence[QuantizedExperts]) -> QuantizedExperts:
    """The experts of ``parts`` stacked along the expert dim (the inverse of
    ``select_experts``): every tensor is concatenated; scheme, sizes, layout
    and the per-layer static activation scales must agree (bit-equal)."""
    parts = list(parts)
    if not parts or not all(isinstance(p, QuantizedExperts) for p in parts):
        raise TypeError("parts must be a non-empty sequence of QuantizedExperts")
    first = parts[0]
    for i, p in enumerate(parts[1:], 1):
        for attr in ("scheme", "hidden_size", "intermediate_size", "layout"):
            if getattr(p, attr) != getattr(first, attr):
                raise ValueError(f"parts[{i}].{attr}={getattr(p, attr)!r} differs from parts[0]'s {getattr(first, attr)!r}")
        for attr in ("w13_bias", "w2_bias", "a13_scale", "a2_scale"):
            a, b = getattr(first, attr), getattr(p, attr)
            if (a is None) != (b is None):
                raise ValueError(f"parts[{i}].{attr} is {'None' if b is None else 'set'}, parts[0]'s is not")
        for attr in ("a13_scale", "a2_scale"):
            a, b = getattr(first, attr), getattr(p, attr)
            if a is not None and not torch.equal(a, b):
                raise ValueError(f"parts[{i}].{attr} differs from parts[0]'s: one static scale per layer")

    def cat_weight(ws: List[Weight]) -> Weight:
        if not isinstance(ws[0], QuantizedTensor):
            return torch.cat(ws, dim=0)
        fields = {f: torch.cat([w.tensors[f] for w in ws], dim=0) for f in ws[0].tensors}
        E = sum(w.shape[0] for w in ws)
        return dataclasses.replace(ws[0], shape=(E,) + tuple(ws[0].shape[1:]), **fields)

    def cat_opt(name: str):
        ts = [getattr(p, name) for p in parts]
        return None if ts[0] is None else torch.cat(ts, dim=0)

    return dataclasses.replace(
        first,
        w13=cat_weight([p.w13 for p in parts]),
        w2=cat_weight([p.w2 for p in parts]),
        w13_bias=cat_opt("w13_bias"),
        w2_bias=cat_opt("w2_bias"),
    )


def shard_experts(
    experts: QuantizedExperts,
    rank: int,
    placement: Optional[ExpertPlacement] = None,
    *,
    world_size: Optional[int] = None,
) -> ExpertParallelShard:
    """Rank ``rank``'s expert-parallel shard of the full layer ``experts``.

    Give either ``placement`` (whose ``num_experts`` must equal
    ``experts.num_experts``) or ``world_size`` (even contiguous split; a
    ``world_size`` that does not divide E raises and asks for a placement).
    """
    if not isinstance(experts, QuantizedExperts):
        raise TypeError(f"experts must be a QuantizedExperts, got {type(experts).__name__}")
    if placement is None:
        if world_size is None:
            raise ValueError("pass placement= (an ExpertPlacement) or world_size=")
        placement = ExpertPlacement.even(experts.num_experts, world_size)
    elif not isinstance(placement, ExpertPlacement):
        raise TypeError(f"placement must be an ExpertPlacement, got {type(placement).__name__}")
    elif world_size is not None and world_size != placement.world_size:
        raise ValueError(f"world_size={world_size} disagrees with placement.world_size={placement.world_size}")
    if placement.num_experts != experts.num_experts:
        raise ValueError(
            f"placement is for {placement.num_experts} experts but experts holds {experts.num_experts}"
        )
    local = select_experts(experts, placement.local_experts(_check_rank(rank, placement.world_size)))
    return ExpertParallelShard.from_local(local, placement, rank)


# ---------------------------------------------------------------------------
# TP shards


@dataclasses.dataclass(frozen=True)
class TensorParallelShard:
    """One rank's slice of the intermediate dim of every expert.

    ``experts`` holds I/tp of the (padded) intermediate size ``I``: rank
    ``rank`` has columns ``[rank * I/tp, (rank + 1) * I/tp)`` of w2 and the
    matching gate and up rows of w13. ``w2_bias`` is the layer's on rank 0
    and zeros elsewhere (summed once by the all-reduce).
    """

    experts: QuantizedExperts
    rank: int
    world_size: int

    def to(self, device) -> "TensorParallelShard":
        return dataclasses.replace(self, experts=self.experts.to(device))


def _row_ranges(layout: GateUpLayout, gated: bool, inter: int, lo: int, hi: int) -> List[Tuple[int, int]]:
    """Rows of w13 (and entries of w13_bias) holding intermediate units [lo, hi)."""
    if not gated:
        return [(lo, hi)]
    if layout is GateUpLayout.INTERLEAVED:
        return [(2 * lo, 2 * hi)]
    return [(lo, hi), (inter + lo, inter + hi)]


def _slice_scale_rows(name, q: QuantizedTensor, t: torch.Tensor, ranges) -> torch.Tensor:
    g = q.granularity
    rows = q.shape[-2]
    if isinstance(g, PerTensor):
        return t.clone()
    if isinstance(g, PerBlock):
        br = g.rows
        for i, (a, b) in enumerate(ranges):
            last = i == len(ranges) - 1
            if a % br or (b % br and not (last and b == rows)):
                raise ValueError(
                    f"{name}: tensor parallelism keeps w13 rows {ranges} of {rows}, but the weight "
                    f"scales cover blocks of {br} rows: every slice must start and end on a "
                    f"{br}-row block boundary (use a smaller tp or pad I with quantize_experts(pad_to=))"
                )
        return torch.cat([t[..., a // br : -(-b // br), :] for a, b in ranges], dim=-2)
    # per row / per group: one scale row per weight row
    return torch.cat([t[..., a:b, :] for a, b in ranges], dim=-2)


def _slice_rows(name: str, w: Weight, ranges) -> Weight:
    if not isinstance(w, QuantizedTensor):
        return torch.cat([w[:, a:b, :] for a, b in ranges], dim=1)
    fields = {}
    for field, t in w.tensors.items():
        if field == "data":
            fields[field] = torch.cat([t[..., a:b, :] for a, b in ranges], dim=-2)
        elif field in ("scale", "zero_point"):
            fields[field] = _slice_scale_rows(name, w, t, ranges)
        else:  # global_scale (per matrix), g_idx (per column): rows do not change them
            fields[field] = t.clone()
    rows = sum(b - a for a, b in ranges)
    out = dataclasses.replace(w, shape=tuple(w.shape[:-2]) + (rows, w.shape[-1]), **fields)
    validate(out, name)
    return out


def _slice_cols(name: str, w: Weight, lo: int, hi: int, why: str) -> Weight:
    if not isinstance(w, QuantizedTensor):
        return w[..., lo:hi].contiguous()
    cols = w.shape[-1]
    g = w.granularity
    if w.g_idx is not None:
        raise ValueError(
            f"{name}: act-order weights (g_idx) cannot be split along their columns: a slice's "
            "columns may belong to any group. Tensor parallelism does not support act-order "
            "w2; use expert parallelism, or a scheme without act-order"
        )

    def need(multiple: int, what: str) -> None:
        for b in (lo, hi):
            if b % multiple and b != cols:
                raise ValueError(
                    f"{name}: tensor parallelism {why} columns [{lo}, {hi}) of I={cols}, but "
                    f"{w.fmt.value} {what} {multiple} columns: slice boundaries must be multiples "
                    f"of {multiple} (use a smaller tp, or a larger I: quantize_experts(pad_to=))"
                )

    num, den = TRAITS[w.fmt].pack_ratio
    pack = den // math.gcd(num, den)
    if pack > 1:
        need(pack, "packs its codes in units of")
    if isinstance(g, PerGroup):
        need(g.size, "shares one scale per group of")
    elif isinstance(g, PerBlock):
        need(g.cols, "shares one scale per block of")
    fields = {}
    for field, t in w.tensors.items():
        if field == "data":
            fields[field] = t[..., lo * num // den : hi * num // den].contiguous()
        elif field in ("scale", "zero_point"):
            if isinstance(g, PerGroup):
                fields[field] = t[..., lo // g.size : hi // g.size].contiguous()
            elif isinstance(g, PerBlock):
                fields[field] = t[..., lo // g.cols : -(-hi // g.cols)].contiguous()
            else:  # per tensor / per row: one scale for the whole row
                fields[field] = t.clone()
        else:  # global_scale
            fields[field] = t.clone()
    out = dataclasses.replace(w, shape=tuple(w.shape[:-1]) + (hi - lo,), **fields)
    validate(out, name)
    return out


def shard_experts_tp(experts: QuantizedExperts, rank: int, world_size: int) -> TensorParallelShard:
    """Rank ``rank``'s tensor-parallel slice of ``experts`` (module docstring).

    The padded intermediate size ``I`` (``experts.padded_intermediate_size``)
    must be divisible by ``world_size`` and every slice boundary must fall on
    the groups/blocks/packing of the format and of the scheme's second-GEMM
    activation groups; errors say which. Act-order (``g_idx``) w2 is rejected.
    The slice's ``intermediate_size`` is its width ``I / world_size``.

    Numerics: weight-only schemes and schemes whose second-GEMM activation
    quantization is static or grouped along I give the single-device result
    up to fp32 summation order. Schemes with *dynamic per-token* activation
    quantization of the second GEMM (``*_token``, ``int8_w8a8_channel_token``,
    ``int4_w4a8_*``, ``int4_w4afp8_*``) compute each token's scale over the
    rank's slice of I, not the whole row (as vLLM's TP MoE does): a
    different, equally valid quantization, not bit-comparable.
    """
    if not isinstance(experts, QuantizedExperts):
        raise TypeError(f"experts must be a QuantizedExperts, got {type(experts).__name__}")
    _check_world_size(world_size)
    _check_rank(rank, world_size)
    inter = experts.padded_intermediate_size
    if inter % world_size:
        raise ValueError(
            f"world_size={world_size} must divide the intermediate size I={inter} of the experts "
            f"(pad I with quantize_experts(pad_to=...) to a multiple of world_size times the block)"
        )
    step = inter // world_size
    lo, hi = rank * step, (rank + 1) * step
    act = experts.scheme.activation
    if act is not None and isinstance(act.granularity, PerGroup) and step % act.granularity.size:
        raise ValueError(
            f"world_size={world_size} splits I={inter} into slices of {step}, but scheme "
            f"{experts.scheme.name} quantizes the second GEMM's input in groups of "
            f"{act.granularity.size} along I: the slice must be a multiple of {act.granularity.size}"
        )
    if experts.scheme.weight.act_order is ActOrder.GROUP and isinstance(experts.w2, QuantizedTensor):
        _slice_cols("w2", experts.w2, lo, hi, "keeps")  # raises the act-order error
    ranges = _row_ranges(experts.layout, experts.is_gated, inter, lo, hi)
    w13 = _slice_rows("w13", experts.w13, ranges)
    w2 = _slice_cols("w2", experts.w2, lo, hi, "keeps")
    b13 = experts.w13_bias
    if b13 is not None:
        b13 = torch.cat([b13[:, a:b] for a, b in ranges], dim=1)
    b2 = experts.w2_bias
    if b2 is not None:
        b2 = b2.clone() if rank == 0 else torch.zeros_like(b2)
    local = dataclasses.replace(
        experts,
        w13=w13,
        w2=w2,
        w13_bias=b13,
        w2_bias=b2,
        intermediate_size=step,
        a13_scale=None if experts.a13_scale is None else experts.a13_scale.clone(),
        a2_scale=None if experts.a2_scale is None else experts.a2_scale.clone(),
    )
    return TensorParallelShard(local, rank, world_size)

