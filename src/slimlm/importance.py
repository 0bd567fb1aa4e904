"""Importance estimation (METHOD §2): one hooked forward pass, no gradients.

Width: hidden channels from the outputs of every norm that feeds a projection
(summed over all sites into one global ranking), MLP neurons from the input of the
down projection, attention heads from the input of the output projection (a head's
score is the L2 norm of its channels' scores).  Activations are reduced over the
sequence (`mean` of |x| by default, or `l2`, `var`) and then over the batch (`l2` by
default, or `mean`, `var`), accumulated in fp32.

Depth: Block Importance (1 - cos(layer input, layer output)) from the same pass;
the LM-loss increase when one layer alone is removed; and for K layers to drop the
loss of removing each window of K consecutive layers ("block").

Baselines: `magnitude` (L2 norm of each channel's weights) and `random`.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import __version__
from .adapters import Adapter, get_adapter
from .adapters.base import FFN, GATE_UP, HIDDEN, KV, Q, QKV
from .errors import SlimlmError

SEQ_AGGREGATIONS = ("mean", "l2", "var")
BATCH_AGGREGATIONS = ("l2", "mean", "var")
IMPORTANCE_KINDS = ("activation", "magnitude", "random")


@dataclass
class Scores:
    """Importance scores (higher = more important), saved to and loaded from safetensors."""

    hidden: torch.Tensor  # [hidden]
    ffn: torch.Tensor  # [layers, ffn]
    heads: torch.Tensor  # [layers, heads]
    hidden_sites: torch.Tensor | None = None  # [sites, hidden]
    depth_scores: dict[str, torch.Tensor] = field(default_factory=dict)  # metric -> [layers]
    block_losses: dict[int, list[float]] = field(default_factory=dict)  # K -> loss for each start
    meta: dict = field(default_factory=dict)

    def depth(self, metric: str) -> torch.Tensor:
        """Per-layer depth importance by `metric` (higher = keep)."""
        kind = self.meta.get("importance", "activation")
        if kind != "activation":
            return self.depth_scores[kind]  # baselines rank layers their own way
        if metric not in self.depth_scores:
            raise SlimlmError(
                f"the scores hold no '{metric}' depth metric (they have: {', '.join(self.depth_scores) or 'none'}); "
                "recompute them without --scores"
            )
        return self.depth_scores[metric]

    def best_block_start(self, k: int) -> int | None:
        """Start of the K-layer window whose removal hurts least (None if not computed)."""
        if self.meta.get("importance", "activation") != "activation":
            scores = self.depth_scores[self.meta["importance"]]
            sums = [scores[s : s + k].sum().item() for s in range(len(scores) - k + 1)]
            return min(range(len(sums)), key=sums.__getitem__)
        losses = self.block_losses.get(k)
        if losses is None:
            return None
        return min(range(len(losses)), key=losses.__getitem__)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        from ._io import atomic_write_bytes_via

        tensors = {"hidden": self.hidden, "ffn": self.ffn, "heads": self.heads}
        if self.hidden_sites is not None:
            tensors["hidden_sites"] = self.hidden_sites
        for name, t in self.depth_scores.items():
            tensors[f"depth_{name}"] = t
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
        meta = dict(self.meta, block_losses={str(k): v for k, v in self.block_losses.items()})
        atomic_write_bytes_via(path, lambda tmp: save_file(tensors, tmp, metadata={"slimlm": json.dumps(meta)}))

    @classmethod
    def load(cls, path: str | Path) -> "Scores":
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise SlimlmError(f"scores file not found: {path}")
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("slimlm", "{}"))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise SlimlmError(f"{path} is not a slimlm scores file: {exc}") from exc
        if not {"hidden", "ffn", "heads"} <= tensors.keys():
            raise SlimlmError(f"{path} is not a slimlm scores file (missing hidden/ffn/heads scores)")
        blocks = {int(k): v for k, v in meta.pop("block_losses", {}).items()}
        return cls(
            hidden=tensors["hidden"],
            ffn=tensors["ffn"],
            heads=tensors["heads"],
            hidden_sites=tensors.get("hidden_sites"),
            depth_scores={k[len("depth_") :]: v for k, v in tensors.items() if k.startswith("depth_")},
            block_losses=blocks,
            meta=meta,
        )

    def check_matches(self, shape) -> None:
        """Error when these scores were computed for a model of another shape."""
        got = (self.hidden.numel(), tuple(self.ffn.shape), tuple(self.heads.shape))
        want = (shape.hidden, (shape.layers, shape.ffn), (shape.layers, shape.heads))
        if got != want:
            raise SlimlmError(
                f"the scores do not match this model (scores: hidden {got[0]}, ffn {got[1]}, heads {got[2]}; "
                f"model: hidden {want[0]}, ffn {want[1]}, heads {want[2]})"
            )


class _Accumulator:
    """Streaming per-channel statistics of the sequence-reduced activations."""

    def __init__(self, seq_agg: str):
        self.seq_agg = seq_agg
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.dim() == 2:  # [seq, channels] without a batch dim
            x = x.unsqueeze(0)
        x = x.float()
        if self.seq_agg == "mean":
            v = x.abs().mean(dim=1)
        elif self.seq_agg == "l2":
            v = x.norm(dim=1)
        else:
            v = x.var(dim=1, unbiased=False)
        s, sq = v.sum(0), (v * v).sum(0)
        if self.sum is None:
            self.sum, self.sumsq = s, sq
        else:
            self.sum += s.to(self.sum.device)
            self.sumsq += sq.to(self.sumsq.device)
        self.count += v.shape[0]

    def finalize(self, batch_agg: str) -> torch.Tensor:
        if self.sum is None:
            raise RuntimeError("an importance hook never fired; the adapter's module names may be wrong")
        s, sq, n = self.sum.cpu().double(), self.sumsq.cpu().double(), self.count
        if batch_agg == "l2":
            out = sq.sqrt()
        elif batch_agg == "mean":
            out = s / n
        else:
            out = (sq / n - (s / n) ** 2).clamp_min(0)
        return out.float()


def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def _hidden_of(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output_of(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def parse_aggregation(text: str) -> tuple[str, str]:
    """'SEQ,BATCH' (e.g. 'mean,l2', the default) -> (seq, batch)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2 or parts[0] not in SEQ_AGGREGATIONS or parts[1] not in BATCH_AGGREGATIONS:
        raise SlimlmError(
            f"--aggregation expects SEQ,BATCH with SEQ in {{{', '.join(SEQ_AGGREGATIONS)}}} and "
            f"BATCH in {{{', '.join(BATCH_AGGREGATIONS)}}}, got '{text}'"
        )
    return parts[0], parts[1]


@torch.inference_mode()
def activation_scores(
    model,
    windows: torch.Tensor,
    *,
    aggregation: tuple[str, str] = ("mean", "l2"),
    batch_size: int = 8,
    progress: bool = True,
) -> Scores:
    """One forward pass with hooks: width scores and Block Importance."""
    adapter = get_adapter(model)
    adapter.check_model(model)
    seq_agg, batch_agg = aggregation
    layers = adapter.layers(model)
    sites = [[_Accumulator(seq_agg) for _ in adapter.hidden_sites] for _ in layers]
    ffn = [_Accumulator(seq_agg) for _ in layers]
    attn = [_Accumulator(seq_agg) for _ in layers]
    bi_sum = torch.zeros(len(layers), dtype=torch.float64)
    bi_count = torch.zeros(len(layers), dtype=torch.float64)
    handles = []

    def bi_hook(i):
        def hook(module, args, kwargs, out):
            a, b = _hidden_of(args, kwargs), _output_of(out)
            cos = F.cosine_similarity(a.float(), b.float().to(a.device), dim=-1)
            bi_sum[i] += cos.sum().item()
            bi_count[i] += cos.numel()

        return hook

    try:
        for i, layer in enumerate(layers):
            for j, name in enumerate(adapter.hidden_sites):
                acc = sites[i][j]
                handles.append(layer.get_submodule(name).register_forward_hook(lambda m, a, o, acc=acc: acc.add(o)))
            handles.append(layer.get_submodule(adapter.mlp_down).register_forward_pre_hook(lambda m, a, acc=ffn[i]: acc.add(a[0])))
            handles.append(layer.get_submodule(adapter.attn_out).register_forward_pre_hook(lambda m, a, acc=attn[i]: acc.add(a[0])))
            handles.append(layer.register_forward_hook(bi_hook(i), with_kwargs=True))
        device = _input_device(model)
        for batch in tqdm(list(windows.split(batch_size)), desc="importance", unit="batch", disable=not progress):
            # The decoder alone: the LM head over the full vocabulary feeds no score.
            model.base_model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()

    shape = adapter.shape()
    hidden_sites = torch.stack([acc.finalize(batch_agg) for row in sites for acc in row])
    ffn_scores = torch.stack([acc.finalize(batch_agg) for acc in ffn])
    channel = torch.stack([acc.finalize(batch_agg) for acc in attn])  # [L, heads*head_dim]
    head_scores = channel.view(len(layers), shape.heads, shape.head_dim).norm(dim=-1)
    return Scores(
        hidden=hidden_sites.sum(0),
        ffn=ffn_scores,
        heads=head_scores,
        hidden_sites=hidden_sites,
        depth_scores={"bi": (1.0 - bi_sum / bi_count.clamp_min(1)).float()},
        meta={"importance": "activation", "aggregation": f"{seq_agg},{batch_agg}"},
    )


def magnitude_scores(model) -> Scores:
    """Baseline: the L2 norm of the weights that read or write each channel, neuron, head."""
    adapter = get_adapter(model)
    shape = adapter.shape()
    hidden = torch.zeros(shape.hidden, dtype=torch.float64)
    ffn = torch.zeros(shape.layers, shape.ffn, dtype=torch.float64)
    q_rows = torch.zeros(shape.layers, shape.heads * shape.head_dim, dtype=torch.float64)
    layer_norms = torch.zeros(shape.layers, dtype=torch.float64)
    qdim = shape.heads * shape.head_dim
    for name, tensor in model.state_dict().items():
        layer, rule = adapter.tensor_rule(name)
        t = tensor.detach().double().cpu()
        if layer is not None:
            layer_norms[layer] += t.pow(2).sum()
        for dim, axis in rule.items():
            other = [d for d in range(t.dim()) if d != dim]
            sq = t.pow(2).sum(dim=other) if other else t.pow(2)
            if axis == HIDDEN:
                hidden += sq
            elif axis == FFN:
                ffn[layer] += sq
            elif axis == GATE_UP:
                ffn[layer] += sq[: shape.ffn] + sq[shape.ffn :]
            elif axis == Q:
                q_rows[layer] += sq
            elif axis == QKV:
                q_rows[layer] += sq[:qdim]
            elif axis == KV:
                pass  # KV heads are ranked through their query heads
    heads = q_rows.view(shape.layers, shape.heads, shape.head_dim).sum(-1).sqrt()
    return Scores(
        hidden=hidden.sqrt().float(),
        ffn=ffn.sqrt().float(),
        heads=heads.float(),
        depth_scores={"magnitude": layer_norms.sqrt().float()},
        meta={"importance": "magnitude"},
    )


def random_scores(shape, seed: int = 0) -> Scores:
    """Baseline: random scores (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return Scores(
        hidden=torch.rand(shape.hidden, generator=g),
        ffn=torch.rand(shape.layers, shape.ffn, generator=g),
        heads=torch.rand(shape.layers, shape.heads, generator=g),
        depth_scores={"random": torch.rand(shape.layers, generator=g)},
        meta={"importance": "random", "seed": seed},
    )


# ---- depth by LM loss -----------------------------------------------------------


@contextmanager
def layers_removed(model, adapter: Adapter, drop: set[int]) -> Iterator[None]:
    """Temporarily run the model without the layers in `drop` (no copies of weights)."""
    layers = adapter.layers(model)
    config = model.config
    saved = (layers, config.num_hidden_layers, getattr(config, "layer_types", None))
    keep = [i for i in range(len(layers)) if i not in drop]
    adapter.set_layers(model, torch.nn.ModuleList([layers[i] for i in keep]))
    config.num_hidden_layers = len(keep)
    if isinstance(saved[2], list):
        config.layer_types = [saved[2][i] for i in keep]
    try:
        yield
    finally:
        adapter.set_layers(model, saved[0])
        config.num_hidden_layers = saved[1]
        if isinstance(saved[2], list):
            config.layer_types = saved[2]


@torch.inference_mode()
def lm_loss(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over the windows."""
    device = _input_device(model)
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten().to(logits.device), reduction="sum")
        total += loss.item()
        count += batch[:, 1:].numel()
    return total / count


def layer_removal_losses(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = True) -> tuple[float, torch.Tensor]:
    """(base loss, loss increase when each layer alone is removed)."""
    adapter = get_adapter(model)
    n = len(adapter.layers(model))
    base = lm_loss(model, windows, batch_size)
    out = torch.zeros(n)
    for i in tqdm(range(n), desc="depth: one layer out", disable=not progress):
        with layers_removed(model, adapter, {i}):
            out[i] = lm_loss(model, windows, batch_size) - base
    return base, out


def block_removal_losses(model, windows: torch.Tensor, k: int, batch_size: int = 8, progress: bool = True) -> list[float]:
    """LM loss after removing each window of `k` consecutive layers (index = start)."""
    adapter = get_adapter(model)
    n = len(adapter.layers(model))
    if not 0 < k < n:
        raise SlimlmError(f"cannot remove {k} of {n} layers")
    losses = []
    for start in tqdm(range(n - k + 1), desc=f"depth: blocks of {k}", disable=not progress):
        with layers_removed(model, adapter, set(range(start, start + k))):
            losses.append(lm_loss(model, windows, batch_size))
    return losses


def estimate_importance(
    model,
    windows: torch.Tensor | None,
    *,
    importance: str = "activation",
    aggregation: str | tuple[str, str] = "mean,l2",
    heldout: torch.Tensor | None = None,
    depth_loss: bool = True,
    block_sizes: tuple[int, ...] = (),
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    meta: dict | None = None,
) -> Scores:
    """Scores for every axis of `model`.

    `windows` [n, seq] feed the hooked pass; `heldout` windows (when given) feed the
    LM-loss depth metrics: one-layer removal when `depth_loss`, and contiguous blocks
    for each K in `block_sizes`.
    """
    if importance not in IMPORTANCE_KINDS:
        raise SlimlmError(f"unknown importance '{importance}' (choose from {', '.join(IMPORTANCE_KINDS)})")
    agg = parse_aggregation(aggregation) if isinstance(aggregation, str) else tuple(aggregation)
    adapter = get_adapter(model)
    if importance == "magnitude":
        scores = magnitude_scores(model)
    elif importance == "random":
        scores = random_scores(adapter.shape(), seed)
    else:
        if windows is None or len(windows) == 0:
            raise SlimlmError("activation importance needs calibration windows")
        scores = activation_scores(model, windows, aggregation=agg, batch_size=batch_size, progress=progress)
        if heldout is not None and len(heldout):
            if depth_loss:
                base, inc = layer_removal_losses(model, heldout, batch_size, progress)
                scores.depth_scores["loss"] = inc
                scores.meta["base_loss"] = base
            for k in block_sizes:
                scores.block_losses[k] = block_removal_losses(model, heldout, k, batch_size, progress)
    scores.meta.update(meta or {})
    scores.meta.setdefault("slimlm_version", __version__)
    scores.meta["shape"] = adapter.shape().as_dict()
    return scores
