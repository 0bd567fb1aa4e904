"""A pruning plan: the kept indices along every axis, a plain serialisable object.

`make_plan` turns importance scores and target sizes into a plan; `prune` (in
prune.py) applies it.  Widths stay uniform across layers, so the pruned model is a
standard config of the same family.  Axes with groups keep the same number in every
group: query heads per KV group (GQA), Mamba heads per group (Minitron-SSM), experts
per routing group.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .adapters import Shape
from .config import PruneConfig
from .errors import SlimlmError


@dataclass
class PrunePlan:
    """Kept indices; per-layer entries are keyed by the *original* layer index.

    MoE and Mamba entries exist only for the layers that hold such a block.
    `kept_expert_ffn[layer][j]` lists the neurons kept in the j-th kept expert; it is
    empty when expert neurons are not pruned (every expert keeps all of them).
    """

    source_shape: Shape
    kept_hidden: list[int]
    kept_layers: list[int]
    kept_ffn: dict[int, list[int]]
    kept_heads: dict[int, list[int]]
    kept_kv_heads: dict[int, list[int]]
    info: dict = field(default_factory=dict)
    kept_experts: dict[int, list[int]] = field(default_factory=dict)
    kept_expert_ffn: dict[int, list[list[int]]] = field(default_factory=dict)
    kept_shared_ffn: dict[int, list[int]] = field(default_factory=dict)
    kept_mamba_heads: dict[int, list[int]] = field(default_factory=dict)

    def expert_neurons(self, layer: int) -> torch.Tensor:
        """[kept experts, kept neurons] index of each kept expert's neurons in `layer`."""
        if layer in self.kept_expert_ffn:
            return torch.tensor(self.kept_expert_ffn[layer], dtype=torch.long)
        n = len(self.kept_experts[layer])
        return torch.arange(self.source_shape.moe_ffn).expand(n, -1)

    @property
    def target_shape(self) -> Shape:
        s = self.source_shape
        first = self.kept_layers[0] if self.kept_layers else None

        def size(kept: dict, default: int) -> int:
            layer = next((i for i in self.kept_layers if i in kept), None)
            return default if layer is None else len(kept[layer])

        experts = size(self.kept_experts, s.experts)
        moe_ffn = s.moe_ffn
        if self.kept_expert_ffn:
            moe_ffn = len(next(iter(self.kept_expert_ffn.values()))[0])
        return replace(
            s,
            layers=len(self.kept_layers),
            hidden=len(self.kept_hidden),
            ffn=len(self.kept_ffn[first]) if first is not None else s.ffn,
            heads=len(self.kept_heads[first]) if first is not None else s.heads,
            kv_heads=len(self.kept_kv_heads[first]) if first is not None else s.kv_heads,
            experts=experts,
            experts_per_token=min(s.experts_per_token, experts),
            moe_ffn=moe_ffn,
            shared_ffn=size(self.kept_shared_ffn, s.shared_ffn),
            mamba_heads=size(self.kept_mamba_heads, s.mamba_heads),
            layer_blocks=tuple(s.layer_blocks[i] for i in self.kept_layers) if s.layer_blocks else (),
        )

    def is_identity(self) -> bool:
        return self.target_shape == self.source_shape

    def to_dict(self) -> dict:
        out = {
            "source_shape": self.source_shape.as_dict(),
            "target_shape": self.target_shape.as_dict(),
            "kept_layers": self.kept_layers,
            "kept_hidden": self.kept_hidden,
            "kept_ffn": {str(k): v for k, v in self.kept_ffn.items()},
            "kept_heads": {str(k): v for k, v in self.kept_heads.items()},
            "kept_kv_heads": {str(k): v for k, v in self.kept_kv_heads.items()},
            "info": self.info,
        }
        for name in ("kept_experts", "kept_shared_ffn", "kept_mamba_heads"):
            if getattr(self, name):
                out[name] = {str(k): v for k, v in getattr(self, name).items()}
        if self.kept_expert_ffn:
            # layers x experts x neurons would make slimlm.json tens of MB for a large MoE:
            # each expert's kept neurons are written as a hexadecimal bit mask
            out["kept_expert_ffn_masks"] = {str(k): [_to_mask(n) for n in v] for k, v in self.kept_expert_ffn.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "PrunePlan":
        def per_layer(key):
            return {int(k): list(v) for k, v in d.get(key, {}).items()}

        return cls(
            source_shape=Shape(**d["source_shape"]),
            kept_hidden=list(d["kept_hidden"]),
            kept_layers=list(d["kept_layers"]),
            kept_ffn=per_layer("kept_ffn"),
            kept_heads=per_layer("kept_heads"),
            kept_kv_heads=per_layer("kept_kv_heads"),
            info=dict(d.get("info", {})),
            kept_experts=per_layer("kept_experts"),
            kept_expert_ffn={int(k): [_from_mask(m) for m in v] for k, v in d.get("kept_expert_ffn_masks", {}).items()},
            kept_shared_ffn=per_layer("kept_shared_ffn"),
            kept_mamba_heads=per_layer("kept_mamba_heads"),
        )


def _to_mask(indices: list[int]) -> str:
    return format(sum(1 << i for i in indices), "x")


def _from_mask(mask: str) -> list[int]:
    bits = int(mask, 16)
    return [i for i in range(bits.bit_length()) if bits >> i & 1]


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
EXPERT_IMPORTANCE_KINDS = ("reap", "frequency", "magnitude", "random")


def validate_targets(t: PruneConfig, shape: Shape) -> None:
    """Every size check, before any work starts."""

    def check(name, value, upper, what=None):
        if value is None:
            return
        if upper == 0 and what:
            raise SlimlmError(f"--{name}: this model has no {what}")
        if value < 1:
            raise SlimlmError(f"--{name} must be at least 1, got {value}")
        if value > upper:
            raise SlimlmError(f"--{name} {value} is larger than the model's {upper}")

    check("hidden", t.hidden, shape.hidden)
    check("ffn", t.ffn, shape.ffn, "dense MLP (prune its experts with --experts / --moe-ffn)")
    check("heads", t.heads, shape.heads)
    check("kv-heads", t.kv_heads, shape.kv_heads)
    check("layers", t.layers, shape.layers)
    check("experts", t.experts, shape.experts, "mixture-of-experts layers")
    check("moe-ffn", t.moe_ffn, shape.moe_ffn, "mixture-of-experts layers")
    check("shared-ffn", t.shared_ffn, shape.shared_ffn, "shared expert")
    check("mamba-heads", t.mamba_heads, shape.mamba_heads, "Mamba layers")
    if t.mamba_heads is not None and t.mamba_heads % shape.mamba_groups:
        raise SlimlmError(
            f"--mamba-heads {t.mamba_heads} must be a multiple of the {shape.mamba_groups} Mamba groups "
            "(every group keeps the same number of heads)"
        )
    groups = max(shape.expert_groups, 1)
    if t.experts is not None and t.experts % groups:
        raise SlimlmError(f"--experts {t.experts} must be a multiple of the {groups} routing groups (every group keeps the same number)")
    if t.expert_importance is not None and t.expert_importance not in EXPERT_IMPORTANCE_KINDS:
        raise SlimlmError(
            f"unknown expert importance '{t.expert_importance}' (choose from {', '.join(EXPERT_IMPORTANCE_KINDS)})"
        )
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
    """The shape `t` asks for (call after `validate_targets`).

    When `t.layers` leaves the choice of layers to an importance metric and the layers
    of the model differ (a hybrid), the kept layer pattern is not known yet:
    `layer_blocks` is then empty (the plan's `target_shape` has it).
    """
    kv = t.kv_heads or shape.kv_heads
    blocks = shape.layer_blocks
    if t.drop_layers:
        drop = set(parse_layer_range(t.drop_layers, shape.layers))
        layers = shape.layers - len(drop)
        blocks = tuple(b for i, b in enumerate(blocks) if i not in drop)
    else:
        layers = t.layers or shape.layers
        if layers != shape.layers and blocks:
            blocks = blocks[:layers] if len(set(blocks)) == 1 else ()
    experts = t.experts or shape.experts
    return replace(
        shape,
        layers=layers,
        hidden=t.hidden or shape.hidden,
        ffn=t.ffn or shape.ffn,
        heads=t.heads or kv * (shape.heads // shape.kv_heads),
        kv_heads=kv,
        experts=experts,
        experts_per_token=min(shape.experts_per_token, experts),
        moe_ffn=t.moe_ffn or shape.moe_ffn,
        shared_ffn=t.shared_ffn or shape.shared_ffn,
        mamba_heads=t.mamba_heads or shape.mamba_heads,
        layer_blocks=blocks,
    )


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, sorted ascending (ties broken by position)."""
    order = torch.argsort(scores.double(), descending=True, stable=True)[:k]
    return sorted(order.tolist())


def top_per_group(scores: torch.Tensor, groups: int, keep: int) -> list[int]:
    """The best `keep / groups` of each of `groups` equal consecutive groups, sorted.

    Every group keeps the same number, so position i of the kept list still belongs
    to group i // (keep / groups): what Mamba-2's B/C sharing and grouped routing need.
    """
    groups = max(groups, 1)
    grouped = scores.double().view(groups, -1)
    size = grouped.shape[1]
    return [g * size + i for g in range(groups) for i in _top(grouped[g], keep // groups)]


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
    info = {"importance": scores.meta.get("importance"), "depth_metric": targets.depth_metric if targets.any_depth() else None}
    plan = PrunePlan(
        source_shape=shape,
        kept_hidden=_top(scores.hidden, targets.hidden or shape.hidden),
        kept_layers=list(kept_layers),
        kept_ffn=kept_ffn,
        kept_heads=kept_heads,
        kept_kv_heads=kept_kv,
        info=info,
    )
    _plan_experts(plan, scores, shape, targets)
    _plan_per_layer(plan.kept_shared_ffn, plan, shape.layers_with("shared"), scores.shared_ffn, "shared_ffn",
                    lambda row: _top(row, targets.shared_ffn or shape.shared_ffn))
    _plan_per_layer(plan.kept_mamba_heads, plan, shape.layers_with("mamba"), scores.mamba_heads, "mamba_heads",
                    lambda row: top_per_group(row, shape.mamba_groups, targets.mamba_heads or shape.mamba_heads))
    return plan


def _plan_per_layer(out: dict, plan: PrunePlan, layers: list[int], rows, name: str, choose) -> None:
    """Fill `out[layer]` for each kept layer holding the block, from that layer's row of scores."""
    kept = [layer for layer in plan.kept_layers if layer in layers]
    if kept and rows is None:
        raise SlimlmError(f"the scores hold no '{name}' scores; recompute them with this version of slimlm")
    for layer in kept:
        out[layer] = choose(rows[layers.index(layer)])


def _plan_experts(plan: PrunePlan, scores, shape: Shape, targets: PruneConfig) -> None:
    moe_layers = shape.layers_with("moe")
    if not any(layer in moe_layers for layer in plan.kept_layers):
        return
    kind = targets.expert_importance or scores.default_expert_importance()
    expert_scores = scores.expert_scores(kind)
    keep = targets.experts or shape.experts
    _plan_per_layer(plan.kept_experts, plan, moe_layers, expert_scores, f"experts_{kind}",
                    lambda row: top_per_group(row, shape.expert_groups, keep))
    plan.info["expert_importance"] = kind
    if (targets.moe_ffn or shape.moe_ffn) < shape.moe_ffn:
        neurons = targets.moe_ffn
        if scores.expert_ffn is None:
            raise SlimlmError("the scores hold no expert-neuron scores; recompute them with this version of slimlm")
        for layer, experts in plan.kept_experts.items():
            row = scores.expert_ffn[moe_layers.index(layer)]
            plan.kept_expert_ffn[layer] = [_top(row[e], neurons) for e in experts]


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
