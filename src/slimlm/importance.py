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

Mixture of experts: each expert's score is REAP's router-weighted activation norm
(the mean, over the tokens routed to it, of its gate weight times the L2 norm of its
output); its routing frequency is kept beside it.  Each expert's neurons are scored
like dense MLP neurons, from the input of its down projection, over the tokens routed
to it.  Mamba heads: the `x` part of the input projection's output, channels reduced
like the other activations, a head's score the L2 norm of its channels (Minitron-SSM).

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
from .adapters.base import (
    EXPERT,
    EXPERT_FFN,
    EXPERT_GATE_UP,
    EXPERT_GATE_UP_INTERLEAVED,
    FFN,
    GATE_UP,
    HIDDEN,
    MAMBA_CONV,
    MAMBA_HEADS,
    MAMBA_IN,
    MAMBA_INNER,
    NESTED_AXES,
    Q,
    Q_HEADS,
    QKV,
    ROUTER,
    SHARED_FFN,
    _has,
)
from .errors import SlimlmError
from .models import decoder

SEQ_AGGREGATIONS = ("mean", "l2", "var")
BATCH_AGGREGATIONS = ("l2", "mean", "var")
IMPORTANCE_KINDS = ("activation", "magnitude", "random")


@dataclass
class Scores:
    """Importance scores (higher = more important), saved to and loaded from safetensors.

    `ffn` and `heads` have a row per layer (zeros for layers without an MLP or
    attention); the MoE and Mamba scores have a row per layer holding that block, in
    layer order (`Shape.layers_with`).
    """

    hidden: torch.Tensor  # [hidden]
    ffn: torch.Tensor  # [layers, ffn]
    heads: torch.Tensor  # [layers, heads]
    hidden_sites: torch.Tensor | None = None  # [sites, hidden]
    depth_scores: dict[str, torch.Tensor] = field(default_factory=dict)  # metric -> [layers]
    block_losses: dict[int, list[float]] = field(default_factory=dict)  # K -> loss for each start
    meta: dict = field(default_factory=dict)
    experts: dict[str, torch.Tensor] = field(default_factory=dict)  # reap/frequency/magnitude/random -> [moe layers, experts]
    expert_ffn: torch.Tensor | None = None  # [moe layers, experts, moe_ffn]
    shared_ffn: torch.Tensor | None = None  # [layers with a shared expert, shared_ffn]
    mamba_heads: torch.Tensor | None = None  # [mamba layers, mamba heads]

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

    def default_expert_importance(self) -> str:
        """REAP when the scores come from activations, else the baseline they hold."""
        return "reap" if "reap" in self.experts else self.meta.get("importance", "reap")

    def expert_scores(self, kind: str) -> torch.Tensor:
        """[moe layers, experts] scores of one kind (random ones are drawn from the seed)."""
        if kind in self.experts:
            return self.experts[kind]
        if kind == "random" and self.experts:
            like = next(iter(self.experts.values()))
            g = torch.Generator().manual_seed(int(self.meta.get("seed", 0)) + 1)
            return torch.rand(like.shape, generator=g)
        raise SlimlmError(
            f"the scores hold no '{kind}' expert importance (they have: {', '.join(self.experts) or 'none'}); "
            "recompute them with --importance activation"
        )

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
        for name in ("hidden_sites", "expert_ffn", "shared_ffn", "mamba_heads"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        for name, t in self.depth_scores.items():
            tensors[f"depth_{name}"] = t
        for kind, t in self.experts.items():
            tensors[f"experts_{kind}"] = t
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
            experts={k[len("experts_") :]: v for k, v in tensors.items() if k.startswith("experts_")},
            expert_ffn=tensors.get("expert_ffn"),
            shared_ffn=tensors.get("shared_ffn"),
            mamba_heads=tensors.get("mamba_heads"),
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
        moe, shared, mamba = (len(shape.layers_with(b)) for b in ("moe", "shared", "mamba"))
        expected = {
            **{f"experts ({kind})": (t, (moe, shape.experts)) for kind, t in self.experts.items()},
            "expert neurons": (self.expert_ffn, (moe, shape.experts, shape.moe_ffn)),
            "shared-expert neurons": (self.shared_ffn, (shared, shape.shared_ffn)),
            "Mamba heads": (self.mamba_heads, (mamba, shape.mamba_heads)),
        }
        for what, (t, dims) in expected.items():
            if t is not None and tuple(t.shape) != dims:
                raise SlimlmError(f"the scores do not match this model ({what}: scores {tuple(t.shape)}, model {dims})")


def _seq_reduce(x: torch.Tensor, seq_agg: str, dim: int = 1) -> torch.Tensor:
    if seq_agg == "mean":
        return x.abs().mean(dim=dim)
    if seq_agg == "l2":
        return x.norm(dim=dim)
    return x.var(dim=dim, unbiased=False)


def _batch_reduce(s: torch.Tensor, sq: torch.Tensor, n, batch_agg: str) -> torch.Tensor:
    """Batch reduction from the sum and sum of squares of `n` per-window values."""
    s, sq = s.cpu().double(), sq.cpu().double()
    n = torch.as_tensor(n, dtype=torch.float64).clamp_min(1)
    if batch_agg == "l2":
        out = sq.sqrt()
    elif batch_agg == "mean":
        out = s / n
    else:
        out = (sq / n - (s / n) ** 2).clamp_min(0)
    return out.float()


class _Accumulator:
    """Streaming per-channel statistics of the sequence-reduced activations."""

    def __init__(self, seq_agg: str, windows: dict | None = None):
        self.seq_agg = seq_agg
        self.windows = windows  # {"seq_len": tokens per calibration window}, set by the pass
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if x.dim() == 2:
            # Flattened tokens ([batch * seq, channels], as MoE blocks pass them) or one
            # sequence without a batch dim: back to windows.
            seq = (self.windows or {}).get("seq_len")
            x = x.view(-1, seq, x.shape[-1]) if seq and x.shape[0] % seq == 0 else x.unsqueeze(0)
        v = _seq_reduce(x, self.seq_agg)
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
        return _batch_reduce(self.sum, self.sumsq, self.count, batch_agg)


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


# ---- experts ----------------------------------------------------------------------
# transformers 5 describes every experts module with the flags its
# `use_experts_implementation` decorator sets (has_gate, has_bias, is_transposed, and
# `_apply_gate` for the gating); its batched and grouped kernels read the same flags.
# Recomputing one expert from them works for every family without naming one.


def _expert_linear(x: torch.Tensor, weight: torch.Tensor, bias, transposed: bool) -> torch.Tensor:
    y = x @ weight if transposed else F.linear(x, weight)
    return y if bias is None else y + bias


def expert_neurons(experts, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert `e`'s intermediate activations (the input of its down projection) for tokens `x`."""
    gated = getattr(experts, "has_gate", True)
    name = "gate_up_proj" if gated else "up_proj"
    bias = getattr(experts, name + "_bias")[e] if getattr(experts, "has_bias", False) else None
    h = _expert_linear(x, getattr(experts, name)[e], bias, getattr(experts, "is_transposed", False))
    return experts._apply_gate(h) if gated else experts.act_fn(h)


def expert_output(experts, h: torch.Tensor, e: int) -> torch.Tensor:
    """Expert `e`'s output (before the router weight) from its intermediate activations."""
    bias = experts.down_proj_bias[e] if getattr(experts, "has_bias", False) else None
    out = _expert_linear(h, experts.down_proj[e], bias, getattr(experts, "is_transposed", False))
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    return out


class _ExpertStats:
    """Per-expert statistics of one MoE layer, gathered by a pre-hook on its experts module.

    The hook sees what the layer's router chose (top-k indices and weights, as the
    experts module receives them, whatever implementation then runs the experts) and
    recomputes each routed expert for its tokens.
    """

    def __init__(self, n_experts: int, seq_agg: str, windows: dict):
        self.n, self.seq_agg, self.windows = n_experts, seq_agg, windows
        self.tokens = 0
        # Accumulated where the experts run (no device sync per expert), in float64 on CPU at the end.
        self.reap_sum = self.routed = self.sum = self.sumsq = self.window_count = None

    def hook(self, module, args, kwargs):
        import inspect

        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        hidden, index, weights = (bound[name] for name in list(bound)[:3])
        hidden = hidden.detach()
        seq = self.windows.get("seq_len") or hidden.shape[0]
        self.tokens += hidden.shape[0]
        for e in index.unique().tolist():
            if not 0 <= e < self.n:
                continue  # expert-parallel sentinels
            token, slot = torch.where(index == e)
            inner = expert_neurons(module, hidden[token], e).float()
            out = expert_output(module, inner.to(hidden.dtype), e).float()
            gate = weights[token, slot].float()
            v = self._per_window(inner, token // seq)
            if self.sum is None:
                zeros = dict(dtype=torch.float32, device=inner.device)
                self.reap_sum, self.routed, self.window_count = (torch.zeros(self.n, **zeros) for _ in range(3))
                self.sum, self.sumsq = (torch.zeros(self.n, inner.shape[1], **zeros) for _ in range(2))
            self.reap_sum[e] += (gate * out.norm(dim=-1)).sum()
            self.routed[e] += len(token)
            self.sum[e] += v.sum(0)
            self.sumsq[e] += (v * v).sum(0)
            self.window_count[e] += v.shape[0]

    def _per_window(self, x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """The sequence reduction of each window's routed tokens: [windows seen, channels]."""
        _, inv = window.unique(return_inverse=True)
        n = int(inv.max()) + 1
        count = torch.bincount(inv, minlength=n).to(x.dtype)[:, None]
        total = torch.zeros(n, x.shape[1], dtype=x.dtype, device=x.device)
        if self.seq_agg == "mean":
            return total.index_add_(0, inv, x.abs()) / count
        squares = total.clone().index_add_(0, inv, x * x)
        if self.seq_agg == "l2":
            return squares.sqrt()
        mean = total.index_add_(0, inv, x) / count
        return (squares / count - mean * mean).clamp_min(0)

    def finalize(self, batch_agg: str, moe_ffn: int) -> dict[str, torch.Tensor]:
        if self.sum is None:  # no token reached this layer's experts
            return {"reap": torch.zeros(self.n), "frequency": torch.zeros(self.n), "neurons": torch.zeros(self.n, moe_ffn)}
        routed = self.routed.double().cpu()
        reap = (self.reap_sum.double().cpu() / routed.clamp_min(1)).float()  # never routed: 0
        frequency = (routed / max(self.tokens, 1)).float()
        count = self.window_count.double().cpu()
        neurons = _batch_reduce(self.sum, self.sumsq, count[:, None], batch_agg)
        neurons[count == 0] = 0.0
        return {"reap": reap, "frequency": frequency, "neurons": neurons}


class ActivationCollectors:
    """The hooks of the importance pass and what they accumulate, layer by layer.

    `attach(layer, i)` registers layer `i`'s hooks (hidden-channel sites, MLP and
    attention inputs, shared expert, experts, Mamba heads, Block Importance) and returns
    their handles; `scores()` turns what they saw into `Scores`.  The in-memory pass
    attaches every layer and runs the model; the streamed pass (`slimlm.streaming`)
    attaches each layer while it is loaded.  Call `start_batch(windows)` before each batch.
    """

    def __init__(self, adapter: Adapter, aggregation: tuple[str, str] = ("mean", "l2")):
        self.adapter, self.shape = adapter, adapter.shape()
        self.seq_agg, self.batch_agg = aggregation
        self.current = {"seq_len": None}  # tokens per window of the batch running now (for flattened MoE inputs)
        n = self.shape.layers
        self.sites: dict[tuple[int, int], _Accumulator] = {}
        self.ffn, self.attn, self.shared, self.mamba = {}, {}, {}, {}
        self.experts: dict[int, _ExpertStats] = {}
        self.bi_sum = torch.zeros(n, dtype=torch.float64)
        self.bi_count = torch.zeros(n, dtype=torch.float64)

    def start_batch(self, batch: torch.Tensor) -> None:
        self.current["seq_len"] = batch.shape[1]

    def _acc(self) -> _Accumulator:
        return _Accumulator(self.seq_agg, self.current)

    def attach(self, layer, i: int) -> list:
        """Register layer `i`'s hooks; returns their handles (remove them when the layer is done)."""
        adapter, shape, handles = self.adapter, self.shape, []
        blocks = shape.blocks(i)

        def input_of(module_path, store):
            store[i] = self._acc()
            handles.append(layer.get_submodule(module_path).register_forward_pre_hook(
                lambda m, a, a_=store[i]: a_.add(a[0])))

        for j, name in enumerate(adapter.hidden_sites):
            if _has(layer, name):  # hybrids: each layer holds only some of the norms
                acc = self.sites[(i, j)] = self._acc()
                handles.append(layer.get_submodule(name).register_forward_hook(lambda m, a, o, a_=acc: a_.add(o)))
        if "mlp" in blocks:
            input_of(adapter.mlp_down, self.ffn)
        if "attention" in blocks:
            input_of(adapter.attn_out, self.attn)
        if "shared" in blocks:
            input_of(adapter.shared_down, self.shared)
        if "moe" in blocks:
            self.experts[i] = _ExpertStats(shape.experts, self.seq_agg, self.current)
            module = layer.get_submodule(adapter.experts_module)
            handles.append(module.register_forward_pre_hook(self.experts[i].hook, with_kwargs=True))
        if "mamba" in blocks:
            acc = self.mamba[i] = self._acc()
            inner = shape.mamba_heads * shape.mamba_head_dim

            def in_proj_hook(m, a, out, a_=acc, inner=inner):
                a_.add(out[..., inner : 2 * inner])  # the x part of [z | x | B | C | dt]

            handles.append(layer.get_submodule(adapter.mamba_in_proj).register_forward_hook(in_proj_hook))

        def bi_hook(module, args, kwargs, out):
            a, b = _hidden_of(args, kwargs), _output_of(out)
            cos = F.cosine_similarity(a.float(), b.float().to(a.device), dim=-1)
            self.bi_sum[i] += cos.sum().item()
            self.bi_count[i] += cos.numel()

        handles.append(layer.register_forward_hook(bi_hook, with_kwargs=True))
        return handles

    def _rows(self, store: dict, width: int) -> torch.Tensor:
        """One row per layer; zeros for layers without that block."""
        out = torch.zeros(self.shape.layers, width)
        for i, a_ in store.items():
            out[i] = a_.finalize(self.batch_agg)
        return out

    def scores(self) -> Scores:
        shape, agg = self.shape, self.batch_agg
        n = shape.layers
        hidden_sites = torch.stack([self.sites[k].finalize(agg) for k in sorted(self.sites)])
        channel = self._rows(self.attn, shape.heads * shape.head_dim)  # [L, heads*head_dim]
        scores = Scores(
            hidden=hidden_sites.sum(0),
            ffn=self._rows(self.ffn, shape.ffn),
            heads=channel.view(n, shape.heads, shape.head_dim).norm(dim=-1),
            hidden_sites=hidden_sites,
            depth_scores={"bi": (1.0 - self.bi_sum / self.bi_count.clamp_min(1)).float()},
            meta={"importance": "activation", "aggregation": f"{self.seq_agg},{agg}"},
        )
        if self.experts:
            done = [self.experts[i].finalize(agg, shape.moe_ffn) for i in sorted(self.experts)]
            scores.experts = {kind: torch.stack([d[kind] for d in done]) for kind in ("reap", "frequency")}
            scores.expert_ffn = torch.stack([d["neurons"] for d in done])
        if self.shared:
            scores.shared_ffn = torch.stack([self.shared[i].finalize(agg) for i in sorted(self.shared)])
        if self.mamba:
            per_channel = torch.stack([self.mamba[i].finalize(agg) for i in sorted(self.mamba)])
            scores.mamba_heads = per_channel.view(len(self.mamba), shape.mamba_heads, shape.mamba_head_dim).norm(dim=-1)
        return scores


@torch.inference_mode()
def activation_scores(
    model,
    windows: torch.Tensor,
    *,
    aggregation: tuple[str, str] = ("mean", "l2"),
    batch_size: int = 8,
    progress: bool = True,
) -> Scores:
    """One forward pass with hooks: width scores (experts and Mamba heads included) and Block Importance."""
    adapter = get_adapter(model)
    adapter.check_model(model)
    collectors = ActivationCollectors(adapter, aggregation)
    handles = []
    try:
        for i, layer in enumerate(adapter.layers(model)):
            handles += collectors.attach(layer, i)
        device = _input_device(model)
        for batch in tqdm(list(windows.split(batch_size)), desc="importance", unit="batch", disable=not progress):
            collectors.start_batch(batch)
            # The decoder alone: the LM head over the full vocabulary feeds no score.
            decoder(model)(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    scores = collectors.scores()
    if scores.experts and not any(p.is_meta for p in model.parameters()):
        scores.experts["magnitude"] = magnitude_scores(model, experts_only=True).experts["magnitude"]
    return scores


def magnitude_scores(model, experts_only: bool = False, tensors=None) -> Scores:
    """Baseline: the L2 norm of the weights that read or write each channel, neuron, head, expert.

    `experts_only` reads only the expert and router tensors (for the expert baseline
    stored beside activation scores).  `tensors` ((name, tensor) pairs, in-memory names)
    replaces the model's state dict, e.g. layer by layer from a streamed checkpoint; `model`
    may then be its config.
    """
    adapter = get_adapter(model)
    shape = adapter.shape()
    moe, shared_layers, mamba_layers = (shape.layers_with(b) for b in ("moe", "shared", "mamba"))
    f64 = dict(dtype=torch.float64)
    hidden = torch.zeros(shape.hidden, **f64)
    ffn = torch.zeros(shape.layers, shape.ffn, **f64)
    q_rows = torch.zeros(shape.layers, shape.heads * shape.head_dim, **f64)
    q_heads = torch.zeros(shape.layers, shape.heads, **f64)
    layer_norms = torch.zeros(shape.layers, **f64)
    experts = torch.zeros(len(moe), shape.experts, **f64)
    expert_ffn = torch.zeros(len(moe), shape.experts, shape.moe_ffn, **f64)
    shared = torch.zeros(len(shared_layers), shape.shared_ffn, **f64)
    mamba = torch.zeros(len(mamba_layers), shape.mamba_heads, **f64)
    qdim, inner = shape.heads * shape.head_dim, shape.mamba_heads * shape.mamba_head_dim
    nh, mhd = shape.mamba_heads, shape.mamba_head_dim

    def per_head(sq):  # inner channels -> Mamba heads
        return sq.view(nh, mhd).sum(-1)

    for name, tensor in (tensors if tensors is not None else model.state_dict().items()):
        if adapter.is_ignored(name):
            continue
        layer, rule = adapter.tensor_rule(name)
        if experts_only and not {EXPERT, ROUTER} & set(rule.values()):
            continue
        t = tensor.detach().double().cpu()
        if layer is not None:
            layer_norms[layer] += t.pow(2).sum()
        expert_dim = next((d for d, a in rule.items() if a == EXPERT), None)
        for dim, axis in rule.items():
            keep = sorted({dim, expert_dim} if axis in NESTED_AXES else {dim})
            other = [d for d in range(t.dim()) if d not in keep]
            sq = t.pow(2).sum(dim=other) if other else t.pow(2)
            if axis in NESTED_AXES and expert_dim > dim:
                sq = sq.T  # [experts, positions]
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
            elif axis == Q_HEADS:
                q_heads[layer] += sq
            elif axis in (EXPERT, ROUTER):
                experts[moe.index(layer)] += sq
            elif axis == EXPERT_FFN:
                expert_ffn[moe.index(layer)] += sq
            elif axis == EXPERT_GATE_UP:
                expert_ffn[moe.index(layer)] += sq[:, : shape.moe_ffn] + sq[:, shape.moe_ffn :]
            elif axis == EXPERT_GATE_UP_INTERLEAVED:
                expert_ffn[moe.index(layer)] += sq[:, 0::2] + sq[:, 1::2]
            elif axis == SHARED_FFN:
                shared[shared_layers.index(layer)] += sq
            elif axis == MAMBA_IN:  # z, x and dt rows of each head (B and C are shared by a group)
                mamba[mamba_layers.index(layer)] += per_head(sq[:inner]) + per_head(sq[inner : 2 * inner]) + sq[-nh:]
            elif axis == MAMBA_CONV:
                mamba[mamba_layers.index(layer)] += per_head(sq[:inner])
            elif axis == MAMBA_INNER:
                mamba[mamba_layers.index(layer)] += per_head(sq)
            elif axis == MAMBA_HEADS:
                mamba[mamba_layers.index(layer)] += sq
            # KV heads are ranked through their query heads; fixed axes are never pruned
    heads = (q_rows.view(shape.layers, shape.heads, shape.head_dim).sum(-1) + q_heads).sqrt()
    scores = Scores(
        hidden=hidden.sqrt().float(),
        ffn=ffn.sqrt().float(),
        heads=heads.float(),
        depth_scores={"magnitude": layer_norms.sqrt().float()},
        meta={"importance": "magnitude"},
    )
    if moe:
        scores.experts = {"magnitude": experts.sqrt().float()}
        scores.expert_ffn = expert_ffn.sqrt().float()
    if shared_layers:
        scores.shared_ffn = shared.sqrt().float()
    if mamba_layers:
        scores.mamba_heads = mamba.sqrt().float()
    return scores


def random_scores(shape, seed: int = 0) -> Scores:
    """Baseline: random scores (seeded)."""
    g = torch.Generator().manual_seed(seed)
    scores = Scores(
        hidden=torch.rand(shape.hidden, generator=g),
        ffn=torch.rand(shape.layers, shape.ffn, generator=g),
        heads=torch.rand(shape.layers, shape.heads, generator=g),
        depth_scores={"random": torch.rand(shape.layers, generator=g)},
        meta={"importance": "random", "seed": seed},
    )
    moe, shared, mamba = (len(shape.layers_with(b)) for b in ("moe", "shared", "mamba"))
    if moe:
        scores.experts = {"random": torch.rand(moe, shape.experts, generator=g)}
        scores.expert_ffn = torch.rand(moe, shape.experts, shape.moe_ffn, generator=g)
    if shared:
        scores.shared_ffn = torch.rand(shared, shape.shared_ffn, generator=g)
    if mamba:
        scores.mamba_heads = torch.rand(mamba, shape.mamba_heads, generator=g)
    return scores


# ---- depth by LM loss -----------------------------------------------------------


@contextmanager
def layers_removed(model, adapter: Adapter, drop: set[int]) -> Iterator[None]:
    """Temporarily run the model without the layers in `drop` (no copies of weights)."""
    layers = adapter.layers(model)
    config = model.config
    keep = [i for i in range(len(layers)) if i not in drop]
    layers_key = adapter.config_keys.get("layers")
    n_layers = getattr(config, layers_key) if layers_key else None
    adapter.set_layers(model, torch.nn.ModuleList([layers[i] for i in keep]))
    if layers_key:
        setattr(config, layers_key, len(keep))
    old_lists = adapter.trim_layer_keys(config, keep, len(layers))
    try:
        yield
    finally:
        adapter.set_layers(model, layers)
        if layers_key:
            setattr(config, layers_key, n_layers)
        for key, value in old_lists.items():
            setattr(config, key, value)


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
    return stamp(scores, model.config, meta)


def stamp(scores: Scores, config, meta: dict | None = None) -> Scores:
    """Record what made the scores (`meta`), the slimlm version and the model's shape in their metadata."""
    scores.meta.update(meta or {})
    scores.meta.setdefault("slimlm_version", __version__)
    scores.meta["shape"] = get_adapter(config).shape().as_dict()
    return scores
