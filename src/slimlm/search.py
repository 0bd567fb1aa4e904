"""Architecture search (METHOD §5): uniform candidate shapes near a parameter target,
each pruned from the same importance scores and briefly distilled, ranked by
validation KL to the teacher.

Zero-shot rankings are unreliable (the paper's rankings changed until ~300 steps of
distillation, then held), so every candidate gets the same short distillation.  One
candidate is in memory at a time; a finished candidate is not redone after a restart.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from ._io import atomic_write_json, atomic_write_text
from .adapters import Adapter, Shape
from .config import DistillConfig, ImportanceConfig, PruneConfig, SearchConfig, route_overrides
from .errors import SlimlmError


@dataclass(frozen=True)
class Candidate:
    shape: Shape
    params: int

    @property
    def name(self) -> str:
        s = self.shape
        return f"L{s.layers}-H{s.hidden}-F{s.ffn}-Q{s.heads}"


def _grid(low: float, high: int, step: int) -> list[int]:
    start = max(step, math.ceil(low / step) * step)
    values = list(range(start, high + 1, step))
    if high not in values:
        values.append(high)
    return values


def enumerate_candidates(adapter: Adapter, target_params: int, config: SearchConfig | None = None,
                         **overrides) -> list[Candidate]:
    """Uniform shapes within ±`tolerance` of `target_params`, closest first (settings: `SearchConfig`).

    Grids: layers from (1 - max_depth_prune)·L to L; hidden and MLP sizes on multiples
    of `hidden_step` / `ffn_step` down to (1 - max_width_prune) of the original; query
    heads on multiples of the KV heads (or the original count with `prune_heads=False`;
    the paper kept heads when width-pruning).  Parameters are counted analytically.
    `max_candidates` None keeps them all.
    """
    c = SearchConfig.make(config, **overrides)
    tolerance, max_width_prune, max_depth_prune = c.tolerance, c.max_width_prune, c.max_depth_prune
    hidden_step, ffn_step, max_candidates, prune_heads = c.hidden_step, c.ffn_step, c.max_candidates, c.prune_heads
    s = adapter.shape()
    if not 0 < target_params < adapter.param_count(s):
        raise SlimlmError(f"--target-params must be between 0 and the model's {adapter.param_count(s):,}")
    if not 0 < tolerance < 1:
        raise SlimlmError(f"--tolerance must be between 0 and 1, got {tolerance}")
    for name, value in (("max-width-prune", max_width_prune), ("max-depth-prune", max_depth_prune)):
        if not 0 <= value < 1:
            raise SlimlmError(f"--{name} must be a fraction in [0, 1), got {value}")
    low_w = 1.0 - max_width_prune
    layers = range(max(1, math.ceil(s.layers * (1.0 - max_depth_prune))), s.layers + 1)
    hiddens = _grid(s.hidden * low_w, s.hidden, hidden_step)
    ffns = _grid(s.ffn * low_w, s.ffn, ffn_step)
    heads = [h for h in range(s.kv_heads, s.heads + 1, s.kv_heads) if h >= s.heads * low_w] if prune_heads else [s.heads]
    out = []
    for n in layers:
        for h in hiddens:
            for f in ffns:
                for q in heads:
                    shape = Shape(n, h, f, q, s.kv_heads, s.head_dim, s.vocab, s.tied)
                    if adapter.hidden_divisible_by_heads and h % q:
                        continue
                    p = adapter.param_count(shape)
                    if abs(p - target_params) <= tolerance * target_params:
                        out.append(Candidate(shape, p))
    if not out:
        raise SlimlmError(
            f"no uniform shape within ±{tolerance:.0%} of {target_params:,} parameters under the pruning caps "
            f"(width ≤ {max_width_prune:.0%}, depth ≤ {max_depth_prune:.0%}); widen --tolerance or the caps"
        )
    out.sort(key=lambda c: (abs(c.params - target_params), -c.shape.layers, -c.shape.hidden))
    return out[:max_candidates] if max_candidates else out


def distill_candidates(teacher_model, tokenizer, scores, candidates: list[Candidate], out: Path, *, data,
                       search_tokens: int, distill: DistillConfig, depth_metric: str = "block",
                       progress: bool = True) -> list[dict]:
    """Prune, briefly distill and score each candidate; results are cached per candidate."""
    from .adapters import get_adapter
    from .distill import distill as run_distill
    from .plan import make_plan
    from .prune import prune_model

    adapter = get_adapter(teacher_model)
    source = adapter.shape()
    results = []
    for i, cand in enumerate(candidates):
        folder = out / "candidates" / cand.name
        done = folder / "result.json"
        if done.exists():
            results.append(json.loads(done.read_text()))
            continue
        s = cand.shape
        targets = PruneConfig(hidden=s.hidden, ffn=s.ffn, heads=s.heads, layers=s.layers, depth_metric=depth_metric)
        plan = make_plan(scores, source, targets)
        student = prune_model(teacher_model, plan)
        print(f"[search {i + 1}/{len(candidates)}] {cand.name}: {cand.params / 1e6:.1f}M parameters", flush=True)
        result = run_distill(teacher_model, student, data, folder / "student", search_tokens, distill,
                             tokenizer=tokenizer, overwrite=True, progress=progress)
        row = {
            "candidate": cand.name,
            **{k: v for k, v in s.as_dict().items() if k in ("layers", "hidden", "ffn", "heads", "kv_heads")},
            "params": cand.params,
            "val_kl": result.metrics.get("val_kl"),
            "val_lm_loss": result.metrics.get("val_lm_loss"),
            "tokens": result.tokens,
            "seconds": result.elapsed_s,
            "kept_layers": plan.kept_layers,
        }
        atomic_write_json(done, row)
        results.append(row)
        del student
    results.sort(key=lambda r: (r["val_kl"] is None, r["val_kl"]))
    return results


def keep_winner(out: Path, results: list[dict]) -> Path:
    """Copy the best candidate's briefly distilled student to OUT/winner; drop the others' weights."""
    best = results[0]["candidate"]
    src = out / "candidates" / best / "student"
    dst = out / "winner"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("run"))
    return dst


def write_ranking(out: Path, results: list[dict]) -> None:
    """OUT/ranking.md (a Markdown table) and OUT/ranking.json."""
    lines = ["| rank | candidate | layers | hidden | ffn | heads | parameters | val KL | val LM loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, row in enumerate(results, 1):
        kl = f"{row['val_kl']:.4f}" if row["val_kl"] is not None else "-"
        lm = f"{row['val_lm_loss']:.4f}" if row["val_lm_loss"] is not None else "-"
        lines.append(f"| {i} | {row['candidate']} | {row['layers']} | {row['hidden']} | {row['ffn']} | {row['heads']} "
                     f"| {row['params'] / 1e6:.1f}M | {kl} | {lm} |")
    atomic_write_text(out / "ranking.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "ranking.json", results)


def _is_search_folder(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("candidates", "scores.safetensors", "ranking.json", "winner"))


def check_search_output(output: str | Path, inputs=()) -> Path:
    """The search folder: new, empty, or an earlier search's (which resumes); never one of the inputs nor a
    folder that holds something else.  Checked writable before any work."""
    from ._io import check_not_an_input, probe_writable

    out = Path(output).expanduser()
    check_not_an_input(out, inputs)
    if out.exists():
        if not out.is_dir():
            raise SlimlmError(f"the search output {out} is a file; give a folder")
        if any(out.iterdir()) and not _is_search_folder(out):
            raise SlimlmError(f"{out} exists and is not a search folder; choose another --output")
    probe_writable(out, what="search folder")
    return out


def search(
    model: str,
    output: str | Path,
    config: SearchConfig | None = None,
    distill: DistillConfig | None = None,
    importance: ImportanceConfig | None = None,
    *,
    scores: str | Path | None = None,
    loaded=None,
    progress: bool = True,
    **overrides,
) -> dict:
    """The whole search: what `slimlm search` and the pipeline's search stage run.

    Enumerates candidate shapes near `config.target_params`, scores importance (or reuses
    `scores`, default OUT/scores.safetensors when it exists), adds the contiguous-block losses
    the depth candidates need, distills every candidate for `search_tokens` with the `distill`
    settings (its data is `importance.data`, calibration windows use the distillation's seq_len),
    writes OUT/ranking.{md,json} and keeps the winner's student in OUT/winner.  Keyword overrides
    go to whichever config declares them.  `loaded` is the teacher already in memory.  Returns
    {"output", "ranking", "winner", "winner_path", "candidates"}.
    """
    from . import api
    from .adapters import get_adapter
    from .data import check_source
    from .importance import Scores
    from .models import load_config, load_model, load_tokenizer, pick_dtype

    made = route_overrides(overrides, search=(SearchConfig, config), distill=(DistillConfig, distill),
                           importance=(ImportanceConfig, importance))
    c, d, imp = made["search"], made["distill"], made["importance"]
    if c.target_params is None:
        raise SlimlmError("--target-params is required for a search")
    api.check_importance_config(imp)
    # -- every check before any output exists (a search folder is resumable: an earlier one is fine) --
    pick_dtype(d.dtype)
    model_config = loaded.config if loaded is not None else load_config(model)
    adapter = get_adapter(model_config)
    candidates = enumerate_candidates(adapter, int(c.target_params), c)
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit and d.seq_len > limit:
        raise SlimlmError(f"--seq-len {d.seq_len} is past the model's limit of {limit} positions")
    check_source(imp.data, imp.text_field)
    out = check_search_output(output, inputs=(model, scores))
    scores_path = Path(scores).expanduser() if scores else out / "scores.safetensors"
    if scores and not scores_path.exists():
        raise SlimlmError(f"scores file not found: {scores}")
    given = Scores.load(scores_path) if scores_path.exists() else None
    if given is not None:
        given.check_matches(adapter.shape())
    # -- work: a search that fails before writing anything leaves no folder behind ---------------
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        teacher = loaded if loaded is not None else load_model(model, dtype=d.dtype)
        tok = load_tokenizer(model)
        calib = imp.make(imp, seq_len=d.seq_len, depth_loss=False)
        sc = given if given is not None else api.importance(model, scores_path, calib, loaded=teacher, overwrite=True,
                                                            progress=progress)
        depths = [adapter.shape().layers - cand.shape.layers for cand in candidates]
        if api.add_block_losses(sc, teacher, tok, depths, calib, progress):
            sc.save(scores_path)
        ranking = distill_candidates(teacher, tok, sc, candidates, out, data=imp.data, search_tokens=c.search_tokens,
                                     distill=d, progress=progress)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    write_ranking(out, ranking)
    winner = keep_winner(out, ranking)
    return {"output": str(out), "ranking": ranking, "winner": ranking[0], "winner_path": str(winner),
            "candidates": len(candidates), "scores": str(scores_path)}
