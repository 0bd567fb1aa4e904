"""A pruning plan: the kept indices along every axis, a plain serialisable object.

`make_plan` turns importance scores and target sizes into a plan; `prune` (in
prune.py) applies it.  Widths stay uniform across layers, so the pruned model is a
standard config of the same family.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .adapters import Shape
from .config import PruneConfig
from .errors import SlimlmError


@dataclass
class PrunePlan:
    """Kept indices; per-layer entries are keyed by the *original* layer index."""

    source_shape: Shape
    kept_hidden: list[int]
    kept_layers: list[int]
    kept_ffn: dict[int, list[int]]
    kept_heads: dict[int, list[int]]
    kept_kv_heads: dict[int, list[int]]
    info: dict = field(default_factory=dict)

    @property
    def target_shape(self) -> Shape:
        s = self.source_shape
        first = self.kept_layers[0] if self.kept_layers else None
        return Shape(
            layers=len(self.kept_layers),
            hidden=len(self.kept_hidden),
            ffn=len(self.kept_ffn[first]) if first is not None else s.ffn,
            heads=len(self.kept_heads[first]) if first is not None else s.heads,
            kv_heads=len(self.kept_kv_heads[first]) if first is not None else s.kv_heads,
            head_dim=s.head_dim,
            vocab=s.vocab,
            tied=s.tied,
        )

    def is_identity(self) -> bool:
        return self.target_shape == self.source_shape

    def to_dict(self) -> dict:
        return {
            "source_shape": self.source_shape.as_dict(),
            "target_shape": self.target_shape.as_dict(),
            "kept_layers": self.kept_layers,
            "kept_hidden": self.kept_hidden,
            "kept_ffn": {str(k): v for k, v in self.kept_ffn.items()},
            "kept_heads": {str(k): v for k, v in self.kept_heads.items()},
            "kept_kv_heads": {str(k): v for k, v in self.kept_kv_heads.items()},
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PrunePlan":
        return cls(
            source_shape=Shape(**d["source_shape"]),
            kept_hidden=list(d["kept_hidden"]),
            kept_layers=list(d["kept_layers"]),
            kept_ffn={int(k): list(v) for k, v in d["kept_ffn"].items()},
            kept_heads={int(k): list(v) for k, v in d["kept_heads"].items()},
            kept_kv_heads={int(k): list(v) for k, v in d["kept_kv_heads"].items()},
            info=dict(d.get("info", {})),
        )


def parse_layer_range(text: str, n_layers: int) -> list[int]:
    """'A-B' or 'A-B,C' (0-based, inclusive) -> sorted layer indices to drop."""
    drop: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
            else:
                a = b = int(part)
        except ValueError:
            raise SlimlmError(f"--drop-layers expects ranges like 20-25 or 3,7 (0-based, inclusive), got '{text}'") from None
        if a > b or a < 0 or b >= n_layers:
            raise SlimlmError(f"--drop-layers range {part} is outside layers 0-{n_layers - 1}")
        drop.update(range(a, b + 1))
    if len(drop) >= n_layers:
        raise SlimlmError("--drop-layers would remove every layer")
    return sorted(drop)


DEPTH_METRICS = ("block", "loss", "bi")


def validate_targets(t: PruneConfig, shape: Shape) -> None:
    """Every size check, before any work starts."""

    def check(name, value, upper):
        if value is None:
            return
        if value < 1:
            raise SlimlmError(f"--{name} must be at least 1, got {value}")
        if value > upper:
            raise SlimlmError(f"--{name} {value} is larger than the model's {upper}")

    check("hidden", t.hidden, shape.hidden)
    check("ffn", t.ffn, shape.ffn)
    check("heads", t.heads, shape.heads)
    check("kv-heads", t.kv_heads, shape.kv_heads)
    check("layers", t.layers, shape.layers)
    if t.layers is not None and t.drop_layers:
        raise SlimlmError("give either --layers or --drop-layers, not both")
    if t.drop_layers:
        parse_layer_range(t.drop_layers, shape.layers)
    if t.depth_metric not in DEPTH_METRICS:
        raise SlimlmError(f"unknown depth metric '{t.depth_metric}' (choose from {', '.join(DEPTH_METRICS)})")
    kv = t.kv_heads or shape.kv_heads
    heads = t.heads or (shape.heads if t.kv_heads is None else kv * (shape.heads // shape.kv_heads))
    if t.kv_heads is not None and shape.kv_heads % 1 == 0 and t.kv_heads > shape.kv_heads:
        raise SlimlmError(f"--kv-heads {t.kv_heads} is larger than the model's {shape.kv_heads}")
    if heads % kv:
        raise SlimlmError(
            f"--heads {heads} must be a multiple of the {kv} key/value heads (GQA: every KV group keeps the same number of query heads)"
        )
    if heads // kv > shape.heads // shape.kv_heads:
        raise SlimlmError(
            f"--heads {heads} with {kv} key/value heads needs {heads // kv} query heads per group; the model has {shape.heads // shape.kv_heads}"
        )


def target_shape(t: PruneConfig, shape: Shape) -> Shape:
    """The shape `t` asks for (call after `validate_targets`)."""
    kv = t.kv_heads or shape.kv_heads
    if t.drop_layers:
        layers = shape.layers - len(parse_layer_range(t.drop_layers, shape.layers))
    else:
        layers = t.layers or shape.layers
    return Shape(
        layers=layers,
        hidden=t.hidden or shape.hidden,
        ffn=t.ffn or shape.ffn,
        heads=t.heads or kv * (shape.heads // shape.kv_heads),
        kv_heads=kv,
        head_dim=shape.head_dim,
        vocab=shape.vocab,
        tied=shape.tied,
    )


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, sorted ascending (ties broken by position)."""
    order = torch.argsort(scores.double(), descending=True, stable=True)[:k]
    return sorted(order.tolist())


def choose_heads(head_scores: torch.Tensor, n_kv: int, keep_heads: int, keep_kv: int) -> tuple[list[int], list[int]]:
    """Kept query heads and KV heads of one layer, GQA-valid.

    KV groups are ranked by the L2 norm of their query heads' scores; inside each kept
    group the best `keep_heads / keep_kv` query heads stay, so every group keeps the same
    number and the new head order still maps head i to group i // group_size.
    """
    n_heads = head_scores.numel()
    group = n_heads // n_kv
    per_group = keep_heads // keep_kv
    grouped = head_scores.double().view(n_kv, group)
    kv = _top(grouped.norm(dim=1), keep_kv)
    heads: list[int] = []
    for g in kv:
        heads.extend(g * group + i for i in _top(grouped[g], per_group))
    return heads, kv


def make_plan(scores, shape: Shape, targets: PruneConfig, kept_layers: list[int] | None = None) -> PrunePlan:
    """Kept indices from importance scores (see importance.Scores) and target sizes.

    `kept_layers` overrides the depth choice (computed by the caller when it needs a
    forward pass, e.g. the contiguous-block metric).
    """
    validate_targets(targets, shape)
    if kept_layers is None:
        kept_layers = choose_layers(scores, shape, targets)
    kv_keep = targets.kv_heads or shape.kv_heads
    heads_keep = targets.heads or kv_keep * (shape.heads // shape.kv_heads)
    ffn_keep = targets.ffn or shape.ffn
    kept_ffn, kept_heads, kept_kv = {}, {}, {}
    for layer in kept_layers:
        kept_ffn[layer] = _top(scores.ffn[layer], ffn_keep)
        kept_heads[layer], kept_kv[layer] = choose_heads(scores.heads[layer], shape.kv_heads, heads_keep, kv_keep)
    return PrunePlan(
        source_shape=shape,
        kept_hidden=_top(scores.hidden, targets.hidden or shape.hidden),
        kept_layers=list(kept_layers),
        kept_ffn=kept_ffn,
        kept_heads=kept_heads,
        kept_kv_heads=kept_kv,
        info={"importance": scores.meta.get("importance"), "depth_metric": targets.depth_metric if targets.any_depth() else None},
    )


def choose_layers(scores, shape: Shape, targets: PruneConfig) -> list[int]:
    """Layers to keep by a per-layer depth score (higher = more important)."""
    if targets.drop_layers:
        drop = set(parse_layer_range(targets.drop_layers, shape.layers))
        return [i for i in range(shape.layers) if i not in drop]
    if targets.layers is None or targets.layers == shape.layers:
        return list(range(shape.layers))
    if targets.depth_metric == "block":
        start = scores.best_block_start(shape.layers - targets.layers)
        if start is None:
            raise SlimlmError("the contiguous-block depth metric needs a forward pass for this size; run without --scores or use --depth-metric loss/bi")
        k = shape.layers - targets.layers
        return [i for i in range(shape.layers) if not start <= i < start + k]
    per_layer = scores.depth(targets.depth_metric)
    return _top(per_layer, targets.layers)
