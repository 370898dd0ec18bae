"""The pruning plan: a JSON file a person can read and edit, saying what every layer keeps.

Indices refer to the model the plan was made for (query heads 0..H-1, KV heads 0..K-1, MLP channels 0..I-1 of
each layer; in a mixture-of-experts layer, routed experts 0..E-1 under `experts`, the channels each kept routed
expert keeps under `expert_channels` (keyed by expert index) and the shared expert's under `shared_channels`). MLP
channels are written as compact ranges ("0-99,120,130-1535") so the file stays readable. `hidden_channels` (top level)
lists the residual-stream channels 0..hidden_size-1 kept in every layer; absent: all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_serializer, field_validator

from .adapters import DecoderAdapter
from .adapters.base import LayerShape
from .errors import DomainpruneError

PLAN_FORMAT = "domainprune.plan/1"


def format_ranges(indices: list[int]) -> str:
    """[0,1,2,5,7,8] -> "0-2,5,7-8"."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def parse_ranges(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError as e:
            raise ValueError(f"bad channel range {part!r}; write e.g. '0-99,120,130-1535'") from e
        out.extend(range(a, b + 1))
    return out


class LayerPlan(BaseModel):
    index: int  # layer index in the original model
    drop: bool = False  # remove the whole decoder layer
    kv_heads: list[int] = Field(default_factory=list)  # kept KV heads
    query_heads: list[int] = Field(default_factory=list)  # kept query heads (grouped equally under kv_heads)
    mlp_channels: list[int] = Field(default_factory=list)  # kept MLP channels
    # kept routed experts of a mixture-of-experts layer; None: not an MoE layer, or keep all (left out of the JSON)
    experts: list[int] | None = Field(default=None, exclude_if=lambda v: v is None)
    # kept MLP channels of every kept routed expert, by expert index (all the same count: a layer's experts are one
    # fused tensor); None: every kept expert keeps all its channels
    expert_channels: dict[int, list[int]] | None = Field(default=None, exclude_if=lambda v: v is None)
    # kept MLP channels of the shared expert (≥ 1; the shared expert is never removed); None: all
    shared_channels: list[int] | None = Field(default=None, exclude_if=lambda v: v is None)
    # sublayers removed by a depth method ("self_attn", "mlp"; their lists above are empty): never compensated, and
    # absent (output zero) when statistics for the width part of a plan are collected (domainprune.depth)
    skip: list[str] = Field(default_factory=list, exclude_if=lambda v: not v)

    @field_validator("mlp_channels", "shared_channels", mode="before")
    @classmethod
    def _parse_channels(cls, v: Any) -> Any:
        return parse_ranges(v) if isinstance(v, str) else v

    @field_validator("expert_channels", mode="before")
    @classmethod
    def _parse_expert_channels(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: parse_ranges(c) if isinstance(c, str) else c for k, c in v.items()}
        return v

    @field_serializer("mlp_channels")
    def _write_channels(self, v: list[int]) -> str:
        return format_ranges(v)

    @field_serializer("shared_channels")
    def _write_shared(self, v: list[int] | None) -> str | None:
        return None if v is None else format_ranges(v)

    @field_serializer("expert_channels")
    def _write_expert_channels(self, v: dict[int, list[int]] | None) -> dict[str, str] | None:
        return None if v is None else {str(e): format_ranges(c) for e, c in sorted(v.items())}

    def shape(self, num_experts: int = 0, expert_width: int = 0, shared_width: int = 0) -> LayerShape:
        """Widths after pruning; the arguments are the layer's expert count and widths before, which are kept
        where `experts`, `expert_channels` or `shared_channels` is None."""
        kept = num_experts if self.experts is None else len(self.experts)
        if self.expert_channels:
            expert_width = len(next(iter(self.expert_channels.values())))
        if self.shared_channels is not None:
            shared_width = len(self.shared_channels)
        return LayerShape(
            len(self.query_heads), len(self.kv_heads), len(self.mlp_channels), kept, expert_width, shared_width
        )


class ModelRef(BaseModel):
    source: str
    model_type: str
    hidden_size: int
    head_dim: int
    layers: list[tuple[int, int, int]]  # (query heads, KV heads, MLP channels) per layer before pruning
    # routed experts per layer before pruning (0 for dense layers); None for a model without MoE layers
    experts: list[int] | None = Field(default=None, exclude_if=lambda v: v is None)
    # MLP channels of each routed expert and of the shared expert per layer before pruning (0: none); None for a
    # model without MoE layers (or a plan written before channels inside experts could be pruned)
    expert_widths: list[int] | None = Field(default=None, exclude_if=lambda v: v is None)
    shared_widths: list[int] | None = Field(default=None, exclude_if=lambda v: v is None)

    def experts_before(self) -> list[int]:
        return self.experts or [0] * len(self.layers)

    def shapes_before(self, adapter: DecoderAdapter) -> list[LayerShape]:
        """Every layer's shape before pruning (widths the plan does not record are read from the model)."""
        now = adapter.shapes() if self.experts and (self.expert_widths is None or self.shared_widths is None) else None
        expert_w = self.expert_widths or ([s.expert_width for s in now] if now else [0] * len(self.layers))
        shared_w = self.shared_widths or ([s.shared_width for s in now] if now else [0] * len(self.layers))
        return [LayerShape(*s, e, w, sw) for s, e, w, sw in zip(self.layers, self.experts_before(), expert_w, shared_w)]


class ParamCounts(BaseModel):
    attention_mlp_before: int
    attention_mlp_after: int
    total_before: int
    total_after: int

    @property
    def sparsity(self) -> float:
        return 1 - self.attention_mlp_after / self.attention_mlp_before


class Plan(BaseModel):
    format: str = PLAN_FORMAT
    model: ModelRef
    recipe: dict[str, Any] = Field(default_factory=dict)
    # kept residual-stream channels, the same in every layer (domainprune.hidden); None: all
    hidden_channels: list[int] | None = Field(default=None, exclude_if=lambda v: v is None)
    layers: list[LayerPlan]
    params: ParamCounts | None = None

    @field_validator("hidden_channels", mode="before")
    @classmethod
    def _parse_hidden(cls, v: Any) -> Any:
        return parse_ranges(v) if isinstance(v, str) else v

    @field_serializer("hidden_channels")
    def _write_hidden(self, v: list[int] | None) -> str | None:
        return None if v is None else format_ranges(v)

    # ----- I/O ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from .cache import atomic_write_bytes

        atomic_write_bytes(Path(path), (self.model_dump_json(indent=1) + "\n").encode())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise DomainpruneError(f"plan file {path} does not exist; write one with `domainprune plan`")
        try:
            plan = cls.model_validate_json(path.read_text())
        except (ValidationError, ValueError) as e:
            lines = [line for line in str(e).splitlines() if "errors.pydantic.dev" not in line]
            detail = " ".join(lines[:3]) if lines else "unreadable"
            raise DomainpruneError(f"plan file {path} is not a valid plan: {detail}") from e
        if plan.format != PLAN_FORMAT:
            raise DomainpruneError(f"plan file {path} has format {plan.format!r}; this version reads {PLAN_FORMAT!r}")
        return plan

    # ----- derived -----------------------------------------------------------------------------------------
    def kept_layers(self) -> list[LayerPlan]:
        return [lp for lp in self.layers if not lp.drop]

    def hidden_fraction(self) -> float:
        """Kept fraction of the residual stream (1.0 without hidden pruning)."""
        return 1.0 if self.hidden_channels is None else len(self.hidden_channels) / self.model.hidden_size

    def count_params(self, adapter: DecoderAdapter, total_before: int) -> ParamCounts:
        """Attention + MLP parameters before and after (a MoE layer's MLP: its routed experts with their router
        rows, plus its shared expert), and the model totals. Hidden pruning scales every weight outside the
        attention/MLP inner widths by the kept fraction of the residual stream (biases of q/k/v, which do not
        scale, are under 0.1 % of a layer)."""
        shapes = self.model.shapes_before(adapter)
        before = sum(adapter.layer_params(s) for s in shapes)
        kept = self.hidden_fraction()
        after = sum(adapter.layer_params(lp.shape(*_moe_widths(shapes[lp.index]))) for lp in self.kept_layers())
        dropped_norms = sum(2 * adapter.hidden_size for lp in self.layers if lp.drop)  # the layer's two RMSNorms
        outside = total_before - before - dropped_norms  # embeddings, LM head, norms
        return ParamCounts(
            attention_mlp_before=before,
            attention_mlp_after=round(after * kept),
            total_before=total_before,
            total_after=round((after + outside) * kept),
        )

    def summary(self) -> str:
        p = self.params
        kept = self.kept_layers()
        heads = sum(len(lp.query_heads) for lp in kept)
        heads0 = sum(s[0] for s in self.model.layers)
        ch = sum(len(lp.mlp_channels) for lp in kept)
        ch0 = sum(s[2] for s in self.model.layers)
        text = f"layers {len(kept)}/{len(self.layers)}, query heads {heads}/{heads0}, MLP channels {ch}/{ch0}"
        if self.model.experts:
            before = self.model.experts_before()
            ex = sum(before[lp.index] if lp.experts is None else len(lp.experts) for lp in kept)
            text += f", experts {ex}/{sum(before)}"
        if any(lp.expert_channels is not None or lp.shared_channels is not None for lp in self.layers):
            widths = self.model.expert_widths or [0] * len(self.layers)
            shared = self.model.shared_widths or [0] * len(self.layers)
            counts = self.model.experts_before()
            ch0 = sum(e * w + sw for e, w, sw in zip(counts, widths, shared))
            after = [lp.shape(counts[lp.index], widths[lp.index], shared[lp.index]) for lp in kept]
            ch = sum(s.num_experts * s.expert_width + s.shared_width for s in after)
            text += f", expert channels {ch}/{ch0}"
        if self.hidden_channels is not None:
            text += f", hidden channels {len(self.hidden_channels)}/{self.model.hidden_size}"
        if gone := sum(not lp.kv_heads for lp in kept) + sum(not lp.mlp_channels and lp.experts is None for lp in kept):
            text += f", sublayers removed {gone}"
        if p:
            text += (
                f"; attention+MLP params {p.attention_mlp_after:,}/{p.attention_mlp_before:,} "
                f"({1 - p.sparsity:.1%} kept), total {p.total_after:,}/{p.total_before:,}"
            )
        return text


def _moe_widths(s: LayerShape) -> tuple[int, int, int]:
    return s.num_experts, s.expert_width, s.shared_width


def dense_plan(adapter: DecoderAdapter, source: str) -> Plan:
    """The plan that keeps everything: the starting point for allocation and for hand-written plans."""
    shapes = adapter.shapes()
    return Plan(
        model=ModelRef(
            source=source,
            model_type=adapter.model_type,
            hidden_size=adapter.hidden_size,
            head_dim=adapter.head_dim,
            layers=[(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in shapes],
            experts=[s.num_experts for s in shapes] if any(s.num_experts for s in shapes) else None,
            expert_widths=[s.expert_width for s in shapes] if any(s.num_experts for s in shapes) else None,
            shared_widths=[s.shared_width for s in shapes] if any(s.shared_width for s in shapes) else None,
        ),
        layers=[
            LayerPlan(
                index=i,
                kv_heads=list(range(s.num_kv_heads)),
                query_heads=list(range(s.num_heads)),
                mlp_channels=list(range(s.intermediate_size)),
                experts=list(range(s.num_experts)) if s.num_experts else None,
            )
            for i, s in enumerate(shapes)
        ],
    )


def validate_plan(plan: Plan, adapter: DecoderAdapter) -> None:
    """Raise a one-line DomainpruneError if the plan cannot be applied to this model."""
    shapes = adapter.shapes()
    if plan.model.model_type != adapter.model_type:
        raise DomainpruneError(
            f"plan is for a {plan.model.model_type!r} model but this model is {adapter.model_type!r}"
        )
    actual = [(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in shapes]
    if [tuple(s) for s in plan.model.layers] != actual or plan.model.hidden_size != adapter.hidden_size:
        raise DomainpruneError(
            "plan does not match this model's shape (layers/heads/channels differ); make the plan from this model"
        )
    if plan.model.experts_before() != [s.num_experts for s in shapes]:
        raise DomainpruneError("plan does not match this model's experts per layer; make the plan from this model")
    for name, widths, actual_widths in (
        ("expert_widths", plan.model.expert_widths, [s.expert_width for s in shapes]),
        ("shared_widths", plan.model.shared_widths, [s.shared_width for s in shapes]),
    ):
        if widths is not None and widths != actual_widths:
            raise DomainpruneError(
                f"plan does not match this model's {name.replace('_', ' ')} per layer; make the plan from this model"
            )
    if sorted(lp.index for lp in plan.layers) != list(range(len(shapes))):
        raise DomainpruneError(f"plan must list every layer 0..{len(shapes) - 1} exactly once")
    if all(lp.drop for lp in plan.layers):
        raise DomainpruneError("plan drops every layer; keep at least one")
    if plan.hidden_channels is not None:
        if not adapter.prunable_hidden:
            raise DomainpruneError(
                f"plan lists hidden_channels but hidden channels of {adapter.model_type!r} models cannot be pruned "
                f"exactly ({adapter.hidden_not_prunable_reason}); remove hidden_channels"
            )
        _check_indices(plan.hidden_channels, adapter.hidden_size, "plan hidden_channels")
        if not plan.hidden_channels:
            raise DomainpruneError("plan hidden_channels keeps no channel; keep at least 1 (or remove the key)")
    for lp in plan.layers:
        s = shapes[lp.index]
        where = f"plan layer {lp.index}"
        _validate_experts(lp, s, where, getattr(adapter, "expert_width_multiple", 1))
        if not adapter.prunable_heads and (len(lp.query_heads), len(lp.kv_heads)) != (s.num_heads, s.num_kv_heads):
            why = f" ({adapter.heads_not_prunable_reason})" if adapter.heads_not_prunable_reason else ""
            raise DomainpruneError(
                f"{where}: attention heads of {adapter.model_type!r} models cannot be pruned exactly{why}; keep them "
                "all"
            )
        for name, kept, n in (
            ("query_heads", lp.query_heads, s.num_heads),
            ("kv_heads", lp.kv_heads, s.num_kv_heads),
            ("mlp_channels", lp.mlp_channels, s.intermediate_size),
        ):
            if len(set(kept)) != len(kept):
                raise DomainpruneError(f"{where}: {name} lists an index twice")
            if any(not 0 <= k < n for k in kept):
                raise DomainpruneError(f"{where}: {name} has an index outside 0..{n - 1}")
        if set(lp.skip) - {"self_attn", "mlp"} or len(set(lp.skip)) != len(lp.skip):
            raise DomainpruneError(f'{where}: skip may list "self_attn" and "mlp" once each, got {lp.skip}')
        if "self_attn" in lp.skip and (lp.query_heads or lp.kv_heads) or "mlp" in lp.skip and lp.mlp_channels:
            raise DomainpruneError(
                f"{where}: a sublayer named in skip keeps nothing; empty its heads or channels, or remove it from skip"
            )
        if lp.drop:
            continue
        group = s.group_size
        per_group = {g: sum(1 for h in lp.query_heads if h // group == g) for g in lp.kv_heads}
        orphans = [h for h in lp.query_heads if h // group not in per_group]
        if orphans or len(set(per_group.values())) > 1 or 0 in per_group.values():
            raise DomainpruneError(
                f"{where}: every kept KV head needs the same number (≥1) of its own query heads "
                f"(head h belongs to KV head h // {group}); got query_heads={lp.query_heads} kv_heads={lp.kv_heads}"
            )


def _validate_experts(lp: LayerPlan, s: LayerShape, where: str, multiple: int = 1) -> None:
    """Mixture-of-experts layers: routed experts 0..E-1, at least one kept; the kept channels of exactly the kept
    experts, the same count (≥1) for each; the shared expert's channels, at least one (the shared expert is not
    indexable as an expert and never removed). A MoE layer has no MLP channels of its own to list."""
    if not s.num_experts:
        for name in ("experts", "expert_channels", "shared_channels"):
            if getattr(lp, name) is not None:
                raise DomainpruneError(f"{where}: lists {name} but the layer is not a mixture-of-experts layer")
        return
    if lp.mlp_channels:
        raise DomainpruneError(
            f"{where}: a mixture-of-experts layer has no MLP channels of its own (list routed experts' channels under "
            "`expert_channels`, the shared expert's under `shared_channels`; shared experts are never pruned whole)"
        )
    _validate_expert_channels(lp, s, where, multiple)
    if lp.experts is None:
        return
    if len(set(lp.experts)) != len(lp.experts):
        raise DomainpruneError(f"{where}: experts lists an index twice")
    if any(not 0 <= e < s.num_experts for e in lp.experts):
        raise DomainpruneError(
            f"{where}: experts has an index outside 0..{s.num_experts - 1} (routed experts only; shared experts "
            "cannot be pruned)"
        )
    if not lp.drop and not lp.experts:
        raise DomainpruneError(f"{where}: keep at least 1 expert (or drop the layer)")


def _validate_expert_channels(lp: LayerPlan, s: LayerShape, where: str, multiple: int) -> None:
    if lp.shared_channels is not None:
        if not s.shared_width:
            raise DomainpruneError(f"{where}: lists shared_channels but the layer has no shared expert")
        _check_indices(lp.shared_channels, s.shared_width, f"{where}: shared_channels")
        if not lp.drop and not lp.shared_channels:
            raise DomainpruneError(f"{where}: the shared expert keeps at least 1 channel (it is never removed)")
    if lp.expert_channels is None:
        return
    kept = sorted(lp.experts) if lp.experts is not None else list(range(s.num_experts))
    if sorted(lp.expert_channels) != kept:
        raise DomainpruneError(
            f"{where}: expert_channels must list exactly the kept experts {format_ranges(kept)}, "
            f"got {format_ranges(list(lp.expert_channels))}"
        )
    for e, channels in lp.expert_channels.items():
        _check_indices(channels, s.expert_width, f"{where}: expert_channels of expert {e}")
    counts = sorted({len(c) for c in lp.expert_channels.values()})
    if len(counts) > 1:
        raise DomainpruneError(
            f"{where}: every kept expert must keep the same number of channels (a layer's experts are one fused "
            f"tensor), got {counts}"
        )
    if not lp.drop and counts and counts[0] == 0:
        raise DomainpruneError(f"{where}: every kept expert keeps at least 1 channel (remove experts under `experts`)")
    if not lp.drop and counts and counts[0] != s.expert_width and counts[0] % multiple:
        raise DomainpruneError(
            f"{where}: each kept expert keeps {counts[0]} channels; keep a multiple of {multiple} (or all "
            f"{s.expert_width}): transformers' grouped_mm expert kernel needs 16-byte aligned widths"
        )


def _check_indices(indices: list[int], n: int, what: str) -> None:
    if len(set(indices)) != len(indices):
        raise DomainpruneError(f"{what} lists an index twice")
    if any(not 0 <= k < n for k in indices):
        raise DomainpruneError(f"{what} has an index outside 0..{n - 1}")
