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


def enumerate_candidates(
    adapter: Adapter,
    target_params: int,
    *,
    tolerance: float = 0.05,
    max_width_prune: float = 0.4,
    max_depth_prune: float = 0.2,
    hidden_step: int = 64,
    ffn_step: int = 128,
    max_candidates: int | None = 20,
    prune_heads: bool = True,
) -> list[Candidate]:
    """Uniform shapes within ±`tolerance` of `target_params`, closest first.

    Grids: layers from (1 - max_depth_prune)·L to L; hidden and MLP sizes on multiples
    of `hidden_step` / `ffn_step` down to (1 - max_width_prune) of the original; query
    heads on multiples of the KV heads (or the original count with `prune_heads=False`;
    the paper kept heads when width-pruning).  Parameters are counted analytically.
    """
    s = adapter.shape()
    if not 0 < target_params < adapter.param_count(s):  # NaN fails every comparison: refused too
        raise SlimlmError(f"--target-params must be between 0 and the model's {adapter.param_count(s):,}")
    if not 0 < tolerance < 1:
        raise SlimlmError(f"--tolerance must be between 0 and 1, got {tolerance}")
    for name, value in (("max-width-prune", max_width_prune), ("max-depth-prune", max_depth_prune)):
        if not 0 <= value < 1:
            raise SlimlmError(f"--{name} must be a fraction in [0, 1), got {value}")
    for name, value in (("hidden-step", hidden_step), ("ffn-step", ffn_step)):
        if value < 1:
            raise SlimlmError(f"--{name} must be at least 1, got {value}")
    if max_candidates is not None and max_candidates < 1:
        raise SlimlmError(f"--max-candidates must be at least 1, got {max_candidates}")
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


def run_search(
    teacher_model,
    tokenizer,
    scores,
    candidates: list[Candidate],
    out: Path,
    *,
    data,
    search_tokens: int,
    distill_kwargs: dict,
    depth_metric: str = "block",
    progress: bool = True,
) -> list[dict]:
    """Prune, briefly distill and score each candidate; results are cached per candidate."""
    from .adapters import get_adapter
    from .distill import distill
    from .plan import Targets, make_plan
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
        targets = Targets(hidden=s.hidden, ffn=s.ffn, heads=s.heads, layers=s.layers, depth_metric=depth_metric)
        plan = make_plan(scores, source, targets)
        student = prune_model(teacher_model, plan)
        print(f"[search {i + 1}/{len(candidates)}] {cand.name}: {cand.params / 1e6:.1f}M parameters", flush=True)
        result = distill(
            teacher_model,
            student,
            data,
            out=folder / "student",
            tokens=search_tokens,
            tokenizer=tokenizer,
            overwrite=True,
            progress=progress,
            **distill_kwargs,
        )
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


def search(teacher_model, tokenizer, scores, scores_path: Path, candidates: list[Candidate], out: Path, *,
           data, search_tokens: int, distill_kwargs: dict, calibration: dict | None = None,
           progress: bool = True) -> tuple[list[dict], Path]:
    """The whole search over `candidates`: what `slimlm search` and the pipeline's search stage run.

    Scores the contiguous blocks that depth candidates need (saved back to `scores_path`;
    `calibration` holds `api.add_block_losses`'s fallbacks for what the scores' metadata lacks),
    distills every candidate briefly (`run_search`), writes OUT/ranking.{md,json} and keeps
    the winner's student in OUT/winner.  Returns (ranking, winner folder).
    """
    from .adapters import get_adapter
    from .api import add_block_losses

    layers = get_adapter(teacher_model).shape().layers
    depths = [layers - c.shape.layers for c in candidates]
    if add_block_losses(scores, teacher_model, tokenizer, depths, data=data, progress=progress, **(calibration or {})):
        scores.save(scores_path)
    results = run_search(teacher_model, tokenizer, scores, candidates, out, data=data, search_tokens=search_tokens,
                         distill_kwargs=distill_kwargs, progress=progress)
    write_ranking(out, results)
    return results, keep_winner(out, results)


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


def search_model(
    model: str,
    output: str | Path,
    target_params: float,
    *,
    data=None,
    text_field: str = "text",
    tolerance: float = 0.05,
    max_width_prune: float = 0.4,
    max_depth_prune: float = 0.2,
    max_candidates: int = 8,
    prune_heads: bool = True,
    hidden_step: int = 64,
    ffn_step: int = 128,
    search_tokens: int = 20000,
    scores: str | Path | None = None,
    calib_samples: int = 128,
    seq_len: int = 256,
    micro_batch: int = 4,
    global_batch: int = 16,
    lr: float = 1e-4,
    seed: int = 0,
    dtype: str = "auto",
    progress: bool = True,
    say=print,
) -> tuple[list[dict], Path]:
    """`slimlm search`: check everything, compute (or reuse) the scores, then `search` the candidates.

    Nothing is written before every check passed; a search that fails before its first result
    leaves no output folder behind (a later failure keeps the finished candidates: rerunning
    resumes).  Returns (ranking, winner folder).
    """
    from . import api
    from .adapters import get_adapter
    from .data import check_source
    from .importance import Scores
    from .models import load_config, load_model, load_tokenizer, pick_dtype

    if not 0 < target_params < float("inf"):
        raise SlimlmError(f"--target-params must be a positive number of parameters, got {target_params}")
    if not 0 < lr < float("inf"):
        raise SlimlmError(f"--lr must be a positive number, got {lr}")
    pick_dtype(dtype)
    config = load_config(model)
    adapter = get_adapter(config)
    cands = enumerate_candidates(adapter, int(target_params), tolerance=tolerance, max_width_prune=max_width_prune,
                                 max_depth_prune=max_depth_prune, hidden_step=hidden_step, ffn_step=ffn_step,
                                 max_candidates=max_candidates, prune_heads=prune_heads)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise SlimlmError(f"--seq-len {seq_len} is past the model's limit of {limit} positions")
    for name, value, low in (("search-tokens", search_tokens, 1), ("calib-samples", calib_samples, 1),
                             ("micro-batch", micro_batch, 1), ("global-batch", global_batch, 1), ("seq-len", seq_len, 2)):
        if value < low:
            raise SlimlmError(f"--{name} must be at least {low}, got {value}")
    check_source(data, text_field)
    out = check_search_output(output, inputs=(model, scores))
    scores_path = Path(scores).expanduser() if scores else out / "scores.safetensors"
    reused = None
    if scores_path.exists():
        reused = Scores.load(scores_path)
        reused.check_matches(adapter.shape())
    elif scores is not None:
        raise SlimlmError(f"scores file not found: {scores}")

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        teacher = load_model(model, dtype=dtype)
        tok = load_tokenizer(model)
        sc = reused if reused is not None else api.importance(
            model, scores_path, data=data, text_field=text_field, calib_samples=calib_samples, seq_len=seq_len,
            depth_loss=False, seed=seed, loaded=teacher, overwrite=True, progress=progress)
        say(f"{len(cands)} candidates within ±{tolerance:.0%} of {target_params / 1e6:.1f}M parameters")
        return search(teacher, tok, sc, scores_path, cands, out, data=data, search_tokens=search_tokens,
                      distill_kwargs=dict(seq_len=seq_len, micro_batch=micro_batch, global_batch=global_batch, lr=lr,
                                          seed=seed, dtype=dtype, text_field=text_field),
                      calibration=dict(seq_len=seq_len, calib_samples=calib_samples, seed=seed, text_field=text_field),
                      progress=progress)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
