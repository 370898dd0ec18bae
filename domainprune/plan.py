"""The pruning plan: a JSON file a person can read and edit, saying what every layer keeps.

Indices refer to the model the plan was made for (query heads 0..H-1, KV heads 0..K-1, MLP channels 0..I-1 of
each layer; routed experts 0..E-1 of a mixture-of-experts layer, under `experts`). MLP channels are written as
compact ranges ("0-99,120,130-1535") so the file stays readable.
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

    @field_validator("mlp_channels", mode="before")
    @classmethod
    def _parse_channels(cls, v: Any) -> Any:
        return parse_ranges(v) if isinstance(v, str) else v

    @field_serializer("mlp_channels")
    def _write_channels(self, v: list[int]) -> str:
        return format_ranges(v)

    def shape(self, num_experts: int = 0) -> LayerShape:
        """Widths after pruning; `num_experts` is the layer's expert count before, kept when `experts` is None."""
        kept = num_experts if self.experts is None else len(self.experts)
        return LayerShape(len(self.query_heads), len(self.kv_heads), len(self.mlp_channels), kept)


class ModelRef(BaseModel):
    source: str
    model_type: str
    hidden_size: int
    head_dim: int
    layers: list[tuple[int, int, int]]  # (query heads, KV heads, MLP channels) per layer before pruning
    # routed experts per layer before pruning (0 for dense layers); None for a model without MoE layers
    experts: list[int] | None = Field(default=None, exclude_if=lambda v: v is None)

    def experts_before(self) -> list[int]:
        return self.experts or [0] * len(self.layers)


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
    layers: list[LayerPlan]
    params: ParamCounts | None = None

    # ----- I/O ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        if not path.is_file():
            raise DomainpruneError(f"plan file {path} does not exist; write one with `domainprune plan`")
        try:
            plan = cls.model_validate_json(path.read_text())
        except (ValidationError, ValueError) as e:
            first = str(e).splitlines()
            detail = " ".join(first[:3]) if first else "unreadable"
            raise DomainpruneError(f"plan file {path} is not a valid plan: {detail}") from e
        if plan.format != PLAN_FORMAT:
            raise DomainpruneError(f"plan file {path} has format {plan.format!r}; this version reads {PLAN_FORMAT!r}")
        return plan

    # ----- derived -----------------------------------------------------------------------------------------
    def kept_layers(self) -> list[LayerPlan]:
        return [lp for lp in self.layers if not lp.drop]

    def count_params(self, adapter: DecoderAdapter, total_before: int) -> ParamCounts:
        """Attention + MLP parameters before and after (a MoE layer's MLP: its routed experts with their router
        rows, plus its shared expert), and the model totals."""
        experts = self.model.experts_before()
        before = sum(adapter.layer_params(LayerShape(*s, e)) for s, e in zip(self.model.layers, experts))
        after = sum(adapter.layer_params(lp.shape(experts[lp.index])) for lp in self.kept_layers())
        dropped_norms = sum(2 * adapter.hidden_size for lp in self.layers if lp.drop)  # the layer's two RMSNorms
        return ParamCounts(
            attention_mlp_before=before,
            attention_mlp_after=after,
            total_before=total_before,
            total_after=total_before - (before - after) - dropped_norms,
        )

    def summary(self) -> str:
        p = self.params
        kept = self.kept_layers()
        heads = sum(len(lp.query_heads) for lp in kept)
        heads0 = sum(s[0] for s in self.model.layers)
        ch = sum(len(lp.mlp_channels) for lp in kept)
        ch0 = sum(s[2] for s in self.model.layers)
        text = (
            f"layers {len(kept)}/{len(self.layers)}, query heads {heads}/{heads0}, "
            f"MLP channels {ch}/{ch0}"
        )
        if self.model.experts:
            before = self.model.experts_before()
            ex = sum(before[lp.index] if lp.experts is None else len(lp.experts) for lp in kept)
            text += f", experts {ex}/{sum(before)}"
        if p:
            text += (
                f"; attention+MLP params {p.attention_mlp_after:,}/{p.attention_mlp_before:,} "
                f"({1 - p.sparsity:.1%} kept), total {p.total_after:,}/{p.total_before:,}"
            )
        return text


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
        raise DomainpruneError(f"plan is for a {plan.model.model_type!r} model but this model is {adapter.model_type!r}")
    actual = [(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in shapes]
    if [tuple(s) for s in plan.model.layers] != actual or plan.model.hidden_size != adapter.hidden_size:
        raise DomainpruneError(
            "plan does not match this model's shape (layers/heads/channels differ); make the plan from this model"
        )
    if plan.model.experts_before() != [s.num_experts for s in shapes]:
        raise DomainpruneError("plan does not match this model's experts per layer; make the plan from this model")
    if sorted(lp.index for lp in plan.layers) != list(range(len(shapes))):
        raise DomainpruneError(f"plan must list every layer 0..{len(shapes) - 1} exactly once")
    if all(lp.drop for lp in plan.layers):
        raise DomainpruneError("plan drops every layer; keep at least one")
    for lp in plan.layers:
        s = shapes[lp.index]
        where = f"plan layer {lp.index}"
        _validate_experts(lp, s, where)
        if not adapter.prunable_heads and (len(lp.query_heads), len(lp.kv_heads)) != (s.num_heads, s.num_kv_heads):
            raise DomainpruneError(f"{where}: attention heads of {adapter.model_type!r} models cannot be pruned exactly; keep them all")
        for name, kept, n in (
            ("query_heads", lp.query_heads, s.num_heads),
            ("kv_heads", lp.kv_heads, s.num_kv_heads),
            ("mlp_channels", lp.mlp_channels, s.intermediate_size),
        ):
            if len(set(kept)) != len(kept):
                raise DomainpruneError(f"{where}: {name} lists an index twice")
            if any(not 0 <= k < n for k in kept):
                raise DomainpruneError(f"{where}: {name} has an index outside 0..{n - 1}")
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


def _validate_experts(lp: LayerPlan, s: LayerShape, where: str) -> None:
    """Routed experts only: indices 0..E-1 of a mixture-of-experts layer, at least one kept. A MoE layer has no
    MLP channels to list; its shared experts are not indexable and never pruned."""
    if not s.num_experts:
        if lp.experts is not None:
            raise DomainpruneError(f"{where}: lists experts but the layer is not a mixture-of-experts layer")
        return
    if lp.mlp_channels:
        raise DomainpruneError(
            f"{where}: a mixture-of-experts layer has no MLP channels to keep or prune (routed experts are pruned "
            "whole under `experts`; shared experts are never pruned)"
        )
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
