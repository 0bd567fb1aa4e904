"""`slimlm report`: plots and tables of a run folder, as one HTML page and Markdown.

The run folder is searched (a few levels deep) for what earlier steps wrote, and each
section appears only when its input is there:
- ``*scores*.safetensors`` (from `slimlm importance`/`prune`): layer importance per
  depth metric, head and neuron heatmaps, the hidden-channel score distribution; for a
  mixture of experts, per-layer heatmaps of the experts' REAP scores and routing
  frequency; for a hybrid, the Mamba heads' scores;
- ``metrics.jsonl`` (from `slimlm distill`): training and validation curves;
- ``eval.json`` (from `slimlm eval`, in model folders; models that ``slimlm.json``
  names as source/teacher/student are followed): the before/after table;
- ``ladder.json`` and ``rungs/rung-R.json`` (from `slimlm search`): one ranking table per
  rung of the search (the candidates' own training curves are left out).

The HTML page embeds its images (base64) and opens offline; the Markdown links PNG
files written beside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .._io import atomic_dir, check_not_an_input, probe_writable
from ..errors import SlimlmError
from .compare import comparison_rows, model_name
from .runner import EVAL_FILE, load_results

MAX_DEPTH = 4
SKIP_DIRS = {"checkpoints", "report", "tensorboard", "__pycache__", ".git"}


# ---------------------------------------------------------------- reading the run


def find_files(root: Path, match, max_depth: int = MAX_DEPTH) -> list[Path]:
    """Files under `root` (at most `max_depth` folders down) whose name satisfies `match`."""
    found = []
    for folder, dirs, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(".") and depth < max_depth)
        found += [Path(folder) / f for f in sorted(files) if match(f)]
    return found


def read_scores(path: str | os.PathLike) -> dict | None:
    """``{"tensors": {name: tensor}, "meta": dict}`` from a scores file, or None if unreadable.

    Every tensor is optional; the ``slimlm`` metadata entry is JSON (``{}`` if absent or bad).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("slimlm", "{}")
    except Exception:  # a truncated or foreign file must not stop the report
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = {}
    return {"tensors": {k: v.float() for k, v in tensors.items()}, "meta": meta if isinstance(meta, dict) else {}}


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` (lines that are not JSON objects are skipped)."""
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _linked_models(folder: Path) -> list[Path]:
    """Local model folders that ``slimlm.json`` in `folder` names (pruning source, teacher, student)."""
    try:
        prov = json.loads((folder / "slimlm.json").read_text())
    except (OSError, ValueError):
        return []
    out = []
    for key in ("source", "teacher", "student"):
        value = prov.get(key) if isinstance(prov, dict) else None
        if isinstance(value, str) and value:
            p = Path(value).expanduser()
            if not p.is_absolute():
                p = folder / p if (folder / p).is_dir() else Path.cwd() / p
            if not p.is_dir():
                from ..models import cache_dir

                p = cache_dir() / "models" / value  # an embedded alias lives in the cache
            if p.is_dir():
                out.append(p)
    return out


@dataclass
class Run:
    """What a run folder holds for the report."""

    root: Path
    scores: list[tuple[Path, dict]] = field(default_factory=list)
    metrics: list[tuple[Path, list[dict]]] = field(default_factory=list)
    evals: list[tuple[Path, dict]] = field(default_factory=list)
    searches: list[tuple[Path, list[dict]]] = field(default_factory=list)  # (search folder, its rungs)


def read_rungs(folder: Path) -> list[dict]:
    """The saved rungs of a search folder (``rungs/rung-R.json``), in order; unreadable ones skipped."""
    rungs = []
    for p in folder.glob("rungs/rung-*.json"):
        try:
            rung = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rung, dict) and isinstance(rung.get("ranking"), list) and isinstance(rung.get("index"), int):
            rungs.append(rung)
    return sorted(rungs, key=lambda r: r["index"])


def collect_run(run_dir: str | os.PathLike, extra_evals: Sequence[str | os.PathLike] = ()) -> Run:
    """Find scores, metrics and eval results in `run_dir` (plus `extra_evals`)."""
    root = Path(run_dir).expanduser()
    if not root.is_dir():
        raise SlimlmError(f"run folder not found: {root}")
    run = Run(root)
    for p in find_files(root, lambda n: n.endswith(".safetensors") and "score" in n.lower()):
        scores = read_scores(p)
        if scores is not None and scores["tensors"]:
            run.scores.append((p, scores))
    for p in find_files(root, lambda n: n == "ladder.json"):
        rungs = read_rungs(p.parent)
        if rungs:
            run.searches.append((p.parent, rungs))
    search_folders = [folder for folder, _ in run.searches]
    for p in find_files(root, lambda n: n == "metrics.jsonl"):
        if any(folder in p.parents for folder in search_folders):
            continue  # dozens of short candidate runs: the rung tables say what matters
        records = read_metrics(p)
        if records:
            run.metrics.append((p, records))

    eval_paths = find_files(root, lambda n: n == EVAL_FILE)
    for p in list(eval_paths):
        eval_paths += [m / EVAL_FILE for m in _linked_models(p.parent)]
    for folder in {p.parent for p in find_files(root, lambda n: n == "slimlm.json")}:
        eval_paths += [m / EVAL_FILE for m in _linked_models(folder)]
    for extra in extra_evals:
        p = Path(extra).expanduser()
        p = p / EVAL_FILE if p.is_dir() else p
        if load_results(p) is None:
            raise SlimlmError(f"not a readable eval.json: {extra}")
        eval_paths.append(p)
    seen = set()
    for p in eval_paths:
        key = p.resolve()
        result = load_results(p) if key not in seen else None
        seen.add(key)
        if result is not None:
            run.evals.append((p, result))
    # Largest model first: it is the "before".
    run.evals.sort(key=lambda e: -(e[1].get("parameters") or 0))
    return run


# ---------------------------------------------------------------- plots


@dataclass
class Figure:
    name: str  # file stem of the PNG
    title: str
    png: bytes
    caption: str = ""


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and the report must not open windows
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks(*axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _integer_yticks(*axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _depth_metrics(tensors: dict) -> dict:
    return {k[len("depth_") :]: v for k, v in tensors.items() if k.startswith("depth_") and v.dim() == 1}


DEPTH_LABELS = {
    "bi": "Block Importance (1 - cos(input, output))",
    "loss": "LM-loss increase when the layer alone is removed",
    "magnitude": "weight magnitude (baseline)",
    "random": "random (baseline)",
}


def _row_relative(t, floor: float = 1e-3):
    """Each row divided by its largest value, floored at `floor` (1e-3 suits a log colour scale)."""
    return (t.abs() / t.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)).clamp_min(floor).numpy()


def _log_norm():
    from matplotlib.colors import LogNorm

    # Scores span orders of magnitude inside a layer; a linear scale shows only the outliers.
    return LogNorm(vmin=1e-3, vmax=1.0)


def expert_panels(tensors: dict) -> list[tuple[str, object, str]]:
    """(title, [MoE layers, experts] matrix, colour label) of each expert heatmap a scores file allows.

    REAP scores are shown relative to each layer's largest (experts compete within their layer);
    routing frequency as it is, the share of tokens routed to each expert.
    """
    panels = []
    reap, freq = tensors.get("experts_reap"), tensors.get("experts_frequency")
    if reap is not None and reap.dim() == 2 and reap.numel():
        panels.append(("REAP (router-weighted activation norm)", _row_relative(reap, floor=0.0), "score / layer max"))
    if freq is not None and freq.dim() == 2 and freq.numel():
        panels.append(("routing frequency", freq.numpy(), "share of tokens"))
    if not panels:  # scores of a baseline: magnitude or random expert rankings
        for kind in ("magnitude", "random"):
            t = tensors.get(f"experts_{kind}")
            if t is not None and t.dim() == 2 and t.numel():
                panels.append((f"{kind} (baseline)", _row_relative(t, floor=0.0), "score / layer max"))
    return panels


def score_figures(tag: str, scores: dict) -> list[Figure]:
    """Plots of one scores file; each is skipped when its tensor is missing."""
    plt = _plt()
    t, meta = scores["tensors"], scores["meta"]
    figures = (fig(plt, tag, t, meta) for fig in SCORE_FIGURES)
    return [f for f in figures if f is not None]


def _figure_layers(plt, tag: str, t: dict, meta: dict) -> Figure | None:
    depth = _depth_metrics(t)
    if depth:
        fig, axes = plt.subplots(len(depth), 1, figsize=(8, 2.6 * len(depth)), squeeze=False)
        for ax, (name, values) in zip(axes[:, 0], depth.items()):
            ax.bar(range(len(values)), values.numpy(), color="#4477aa")
            ax.set_title(DEPTH_LABELS.get(name, name), fontsize=10)
            ax.set_xlabel("layer")
            ax.set_ylabel("importance")
            _integer_ticks(ax)
        return Figure(f"{tag}layers", "Layer importance", _png(fig), "Higher = more important; depth pruning drops the lowest.")
    return None


def _figure_blocks(plt, tag: str, t: dict, meta: dict) -> Figure | None:
    blocks = meta.get("block_losses")
    if isinstance(blocks, dict) and blocks:
        fig, ax = plt.subplots(figsize=(8, 3))
        for k, losses in sorted(blocks.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
            if isinstance(losses, list) and losses:
                ax.plot(range(len(losses)), losses, marker="o", label=f"{k} layers")
        ax.set_xlabel("first removed layer")
        ax.set_ylabel("LM loss without the block")
        _integer_ticks(ax)
        ax.legend(fontsize=8)
        return Figure(f"{tag}blocks", "Contiguous blocks", _png(fig), "LM loss after removing K consecutive layers starting at each layer.")
    return None


def _figure_heads(plt, tag: str, t: dict, meta: dict) -> Figure | None:
    heads = t.get("heads")
    if heads is not None and heads.dim() == 2:
        fig, ax = plt.subplots(figsize=(min(2 + 0.5 * heads.shape[1], 12), min(1.5 + 0.3 * heads.shape[0], 10)))
        im = ax.imshow(heads.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        _integer_ticks(ax)
        _integer_yticks(ax)
        fig.colorbar(im, ax=ax, label="importance")
        return Figure(f"{tag}heads", "Attention-head importance", _png(fig))
    return None


def _figure_neurons(plt, tag: str, t: dict, meta: dict) -> Figure | None:
    ffn = t.get("ffn")
    if ffn is not None and ffn.dim() == 2 and ffn.numel():  # MoE-only models (Mixtral) have no dense MLP
        # Neurons are ranked within their layer, so each row is shown relative to its max.
        fig, ax = plt.subplots(figsize=(10, min(1.5 + 0.25 * ffn.shape[0], 10)))
        im = ax.imshow(_row_relative(ffn), aspect="auto", cmap="magma", interpolation="nearest", norm=_log_norm())
        ax.set_xlabel("MLP neuron")
        ax.set_ylabel("layer")
        _integer_yticks(ax)
        fig.colorbar(im, ax=ax, label="importance / layer max (log)")
        return Figure(f"{tag}neurons", "MLP-neuron importance", _png(fig), "Each layer scaled by its largest score (log colour scale).")
    return None


def _figure_hidden(plt, tag: str, t: dict, meta: dict) -> Figure | None:
    hidden = t.get("hidden")
    if hidden is not None and hidden.dim() == 1:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
        values, bins = hidden.numpy(), min(60, max(10, hidden.numel() // 8))
        low, high = float(hidden.min()), float(hidden.max())
        if low > 0 and high / low > 10:  # a few huge channels (massive activations) are common
            import numpy as np

            bins = np.geomspace(low, high, bins + 1)
            a.set_xscale("log")
        a.hist(values, bins=bins, color="#228833")
        a.set_xlabel("score")
        a.set_ylabel("channels")
        a.set_title("distribution", fontsize=10)
        b.plot(hidden.sort(descending=True).values.numpy(), color="#228833")
        b.set_xlabel("rank")
        b.set_ylabel("score")
        b.set_yscale("log" if float(hidden.min()) > 0 else "linear")
        b.set_title("sorted", fontsize=10)
        return Figure(f"{tag}hidden", "Hidden-channel importance", _png(fig), "Scores summed over every norm site feeding a projection.")
    return None


def _figure_experts(plt, tag: str, t: dict, meta: dict) -> Figure | None:
    panels = expert_panels(t)
    if panels:
        n_layers, n_experts = panels[0][1].shape
        fig, axes = plt.subplots(1, len(panels), figsize=(min(3 + 0.35 * n_experts, 9) * len(panels),
                                                          min(1.8 + 0.3 * n_layers, 10)), squeeze=False)
        for ax, (title, matrix, label) in zip(axes[0], panels):
            im = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("expert")
            ax.set_ylabel("MoE layer")
            _integer_ticks(ax)
            _integer_yticks(ax)
            fig.colorbar(im, ax=ax, label=label)
        return Figure(f"{tag}experts", "Expert importance", _png(fig),
                           "Experts are ranked within their layer; pruning keeps the highest. Routing frequency: share "
                           "of tokens sent to each expert (top-k of them per token); 0 means never routed.")
    return None


def _figure_mamba_heads(plt, tag: str, t: dict, meta: dict) -> Figure | None:
    mamba = t.get("mamba_heads")
    if mamba is not None and mamba.dim() == 2 and mamba.numel():
        fig, ax = plt.subplots(figsize=(min(2 + 0.4 * mamba.shape[1], 12), min(1.5 + 0.3 * mamba.shape[0], 10)))
        im = ax.imshow(_row_relative(mamba), aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
        ax.set_xlabel("Mamba head")
        ax.set_ylabel("Mamba layer")
        _integer_ticks(ax)
        _integer_yticks(ax)
        fig.colorbar(im, ax=ax, label="importance / layer max")
        return Figure(f"{tag}mamba_heads", "Mamba-head importance", _png(fig),
                           "Heads are ranked within their group; every group keeps the same number.")
    return None


def _figure_hidden_sites(plt, tag: str, t: dict, meta: dict) -> Figure | None:
    sites = t.get("hidden_sites")
    if sites is not None and sites.dim() == 2 and sites.shape[0] > 1:
        fig, ax = plt.subplots(figsize=(10, min(1.5 + 0.15 * sites.shape[0], 10)))
        im = ax.imshow(_row_relative(sites), aspect="auto", cmap="viridis", interpolation="nearest", norm=_log_norm())
        ax.set_xlabel("hidden channel")
        ax.set_ylabel("site")
        fig.colorbar(im, ax=ax, label="score / site max (log)")
        return Figure(f"{tag}hidden_sites", "Hidden-channel importance per site", _png(fig))
    return None


# The report's score plots, in the order shown.
SCORE_FIGURES = (_figure_layers, _figure_blocks, _figure_heads, _figure_neurons, _figure_hidden, _figure_experts,
                 _figure_mamba_heads, _figure_hidden_sites)


def _series(records: list[dict], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        x = r.get("tokens", r.get("step"))
        y = r.get(key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(y):
            xs.append(x)
            ys.append(y)
    return xs, ys


def metrics_figures(tag: str, records: list[dict]) -> list[Figure]:
    """Training curves (loss and its parts) and validation curves (every ``val_*`` value)."""
    plt = _plt()
    is_val = [r.get("event") == "eval" or any(k.startswith("val_") for k in r) for r in records]
    train = [r for r, v in zip(records, is_val) if not v and r.get("event", "train") == "train"]
    val = [r for r, v in zip(records, is_val) if v]
    x_label = "tokens" if any("tokens" in r for r in records) else "step"
    figs = []
    train_keys = [k for k in ("loss", "kd", "kl", "ce", "hidden") if _series(train, k)[0]]
    if train_keys:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for k in train_keys:
            ax.plot(*_series(train, k), label=k, linewidth=1)
        ax.set_xlabel(x_label)
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
        figs.append(Figure(f"{tag}train", "Training loss", _png(fig)))
    val_keys = sorted({k for r in val for k in r if k.startswith("val_") and k != "val_ppl" and _series(val, k)[0]})
    if val_keys:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for k in val_keys:
            ax.plot(*_series(val, k), label=k, marker="o", linewidth=1)
        ax.set_xlabel(x_label)
        ax.set_ylabel("held-out value")
        ax.legend(fontsize=8)
        figs.append(Figure(f"{tag}validation", "Validation", _png(fig)))
    return figs


# ---------------------------------------------------------------- table


def comparison_notes(evals: list[tuple[Path, dict]]) -> list[str]:
    """Warnings about numbers in the table that were not measured alike."""
    notes = []
    ppl = {str(r.get("model")): (p.get("source"), p.get("seq_len"), p.get("stride"), p.get("max_tokens"))
           for _, r in evals if (p := r.get("perplexity"))}
    if len(set(ppl.values())) > 1:
        notes.append("Perplexities were measured on different text or settings: " + "; ".join(
            f"{m}: {src}, seq_len {sl}, stride {st}, max_tokens {mt}" for m, (src, sl, st, mt) in ppl.items()))
    speed = {str(r.get("model")): (s.get("device"), s.get("dtype"), s.get("batch"), s.get("prompt_len"), s.get("new_tokens"))
             for _, r in evals if (s := r.get("speed"))}
    if len(set(speed.values())) > 1:
        notes.append("Speeds were measured with different settings: " + "; ".join(
            f"{m}: {d} {t}, batch {b}, prompt {p}, new tokens {n}" for m, (d, t, b, p, n) in speed.items()))
    return notes


def chat_rows(evals: list[tuple[Path, dict]], width: int = 400) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows) of the chat answers (`slimlm eval --chat-prompts`): one row per prompt, one column per model."""
    with_chat = [(p, r) for p, r in evals if (r.get("chat") or {}).get("answers")]
    if not with_chat:
        return None
    header = ["prompt"] + [model_name(r, p) for p, r in with_chat]
    first = with_chat[0][1]["chat"]["answers"]

    def cut(text) -> str:
        text = " ".join(str(text or "").split())
        return text if len(text) <= width else text[:width] + "…"

    rows = []
    for i, item in enumerate(first):
        prompt = item.get("prompt") or (item.get("messages") or [{}])[-1].get("content", "")
        answers = [r["chat"]["answers"][i].get("answer") if i < len(r["chat"]["answers"]) else None for _, r in with_chat]
        rows.append([cut(prompt)] + [cut(a) for a in answers])
    return header, rows


def search_tables(run: Run) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of each rung of each search in the run (MoE and Mamba axes when the rows have them)."""
    from ..search import AXIS_COLUMNS, table_columns

    tables = []
    for folder, rungs in run.searches:
        where = "" if folder == run.root else f" ({folder.relative_to(run.root)})"
        for rung in rungs:
            last = rung.get("kept") == 1  # the final rung keeps only the winner (every other keeps 2 or more)
            axes, active = table_columns(rung["ranking"])
            header = (["rank", "candidate"] + [AXIS_COLUMNS[a] for a in axes] + ["parameters"]
                      + (["active"] if active else []) + ["steps", "val KL", "next rung"])
            rows = []
            for i, row in enumerate(rung["ranking"], 1):
                kl = row.get("val_kl")
                fate = ("winner" if i == 1 else "") if last else ("yes" if i <= rung.get("kept", 0) else "")
                rows.append([str(i), str(row.get("candidate"))] + [str(row.get(a)) for a in axes]
                            + [f"{(row.get('params') or 0) / 1e6:.2f}M"]
                            + ([f"{(row.get('active_params') or 0) / 1e6:.2f}M"] if active else [])
                            + [str(row.get("steps")), f"{kl:.4f}" if isinstance(kl, (int, float)) else "-", fate])
            tables.append((f"Search{where}, rung {rung['index']}: {rung.get('candidates')} candidates at "
                           f"{rung.get('steps')} steps", header, rows))
    return tables


# ---------------------------------------------------------------- writing


CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}img{max-width:100%;display:block;margin:.5em 0}
figure{margin:1.5em 0}figcaption{color:#555;font-size:90%}code{background:#f4f4f4;padding:0 3px}"""


def _sections(run: Run) -> list[tuple[str, list[Figure], str]]:
    """(heading, figures, note) for each input found."""
    sections = []
    for i, (path, scores) in enumerate(run.scores):
        figs = score_figures(f"scores{i}_", scores)
        if figs:
            sections.append((f"Importance: {path.relative_to(run.root)}", figs, ""))
    for i, (path, records) in enumerate(run.metrics):
        figs = metrics_figures(f"metrics{i}_", records)
        if figs:
            sections.append((f"Training: {path.relative_to(run.root)}", figs, f"{len(records)} records"))
    return sections


def render_html(title: str, table, sections, chat=None, notes: Sequence[str] = (), search=()) -> str:
    """The report as one HTML page with its images inline."""
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{esc(title)}</h1>"]
    if table is not None:
        header, rows = table
        parts.append("<h2>Before / after</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
        parts += [f"<p>{esc(n)}</p>" for n in notes]
    if search:
        parts.append("<h2>Search (successive halving, ranked by validation KL to the teacher)</h2>")
    for heading, header, rows in search:
        parts.append(f"<h3>{esc(heading)}</h3><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    for heading, figs, note in sections:
        parts.append(f"<h2>{esc(heading)}</h2>" + (f"<p>{esc(note)}</p>" if note else ""))
        for f in figs:
            data = base64.b64encode(f.png).decode()
            parts.append(f"<figure><img alt='{esc(f.title)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{esc(f.title)}{': ' + esc(f.caption) if f.caption else ''}</figcaption></figure>")
    if chat is not None:
        header, rows = chat
        parts.append("<h2>Chat answers</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td style='text-align:left'>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def render_markdown(title: str, table, sections, chat=None, notes: Sequence[str] = (), search=()) -> str:
    """The report as Markdown; images are the PNG files named after each figure."""
    md = [f"# {title}", ""]
    if table is not None:
        header, rows = table
        md += ["## Before / after", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        md.append("")
        md += [x for n in notes for x in (n, "")]
    if search:
        md += ["## Search (successive halving, ranked by validation KL to the teacher)", ""]
    for heading, header, rows in search:
        md += [f"### {heading}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        md.append("")
    for heading, figs, note in sections:
        md += [f"## {heading}", ""] + ([note, ""] if note else [])
        for f in figs:
            md += [f"![{f.title}]({f.name}.png)", "", f"*{f.title}*{': ' + f.caption if f.caption else ''}", ""]
    if chat is not None:
        header, rows = chat
        md += ["## Chat answers", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        md.append("")
    return "\n".join(md)


def write_report(
    run_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    extra_evals: Sequence[str | os.PathLike] = (),
) -> dict:
    """Build the report of `run_dir` into `output` (default ``RUN_DIR/report``).

    Writes ``report.html`` (self-contained), ``report.md`` and one PNG per figure,
    atomically.  Returns their paths and what was found.
    """
    run = collect_run(run_dir, extra_evals)
    out = Path(output).expanduser() if output is not None else run.root / "report"
    if (out.exists() and not out.is_dir()) or (out.is_dir() and any(out.iterdir()) and not (out / "report.html").exists()):
        # The folder is replaced whole: never one that holds something else.
        raise SlimlmError(f"{out} exists and is not a slimlm report folder; choose another --output")
    check_not_an_input(out, [run.root, *extra_evals])
    probe_writable(out, what="report")
    if not (run.scores or run.metrics or run.evals or run.searches):
        raise SlimlmError(f"nothing to report in {run.root}: no *scores*.safetensors, metrics.jsonl, eval.json or "
                          "search rungs found")
    sections = _sections(run)
    table = comparison_rows([r for _, r in run.evals], [model_name(r, p) for p, r in run.evals]) if run.evals else None
    title = f"slimlm report: {run.root.resolve().name}"
    figures = [f for _, figs, _ in sections for f in figs]
    with atomic_dir(out) as tmp:
        for f in figures:
            (tmp / f"{f.name}.png").write_bytes(f.png)
        chat = chat_rows(run.evals)
        notes = comparison_notes(run.evals)
        search = search_tables(run)
        (tmp / "report.html").write_text(render_html(title, table, sections, chat, notes, search), encoding="utf-8")
        (tmp / "report.md").write_text(render_markdown(title, table, sections, chat, notes, search), encoding="utf-8")
    return {
        "output": str(out),
        "html": str(out / "report.html"),
        "markdown": str(out / "report.md"),
        "images": [str(out / f"{f.name}.png") for f in figures],
        "scores": [str(p) for p, _ in run.scores],
        "metrics": [str(p) for p, _ in run.metrics],
        "evals": [str(p) for p, _ in run.evals],
        "searches": [str(p) for p, _ in run.searches],
    }
