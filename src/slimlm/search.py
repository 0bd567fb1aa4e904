"""Architecture search (METHOD §5): candidate shapes near a parameter target, ranked by successive halving.

Zero-shot rankings are unreliable (the paper's rankings changed until ~300 steps of
distillation, then held), so candidates are ranked by their validation KL to the teacher
after a short distillation.  To try many shapes for the compute of a few, the distillation
is spent in rungs (successive halving, Jamieson & Talwalkar 2016): every candidate is
distilled briefly, the best 1/`reduction` (a third by default) continue from their checkpoint
for a longer stretch, and so on until one is left, the winner.

Compute accounting (`plan_ladder`): the budget is `search_budget` distillation tokens, i.e.
S = search_budget // (global batch x seq_len) optimizer steps.  With n_r candidates in rung r
(n_0 candidates, n_{r+1} = ceil(n_r / reduction), R rungs until one is left), each rung gets
an equal share of what is left, ``(S - used) // (R - r)`` steps, split evenly over its n_r
candidates; what rounding leaves goes to the later rungs.  So sum_r n_r x added_r <= S, and
less than n_{R-1} steps stay unused.  The default budget, 160,000 tokens, is what the former
search spent by default (8 candidates x 20,000 tokens).  At 4 x 512 tokens a step that is 78
steps; 27 candidates would not get one step each in rung 0, so 26 run: 26 x 1 + 9 x 2 + 3 x 11
= 77 steps, the three finalists having had 14 steps each (at 4 x 256 tokens a step: 156
steps, 27 x 1 + 9 x 7 + 3 x 22 = 156).  When the budget cannot give every candidate of rung 0
one step, fewer candidates run (the first of the spread, see `enumerate_candidates`).
Validation (held-out windows, no backward) is not counted: every candidate is validated at
step 0 and at the end of each of its rungs.  Each candidate runs the teacher itself, unless
the distillation settings name a teacher-logits cache (``teacher_logits``, which `slimlm run`
writes once for the search and the distill stage): then every candidate trains and is
validated from the cache (top-K + rest-bucket KL), and the teacher runs once for the whole
search.  The cache must cover the search's windows (`search_tokens`); that is checked first.

Each candidate is one distillation planned for the last rung's length (so every candidate is
at the same point of the same learning-rate schedule when it is compared) and stopped at the
end of each rung (``stop_after``): a survivor resumes from its checkpoint with its optimizer
state and data position, exactly as an uninterrupted run.  A rung's ranking is saved as soon
as the rung is done (``rungs/rung-R.{json,md}``); a candidate's result in a rung
(``candidates/NAME/rung-R.json``) is never redone after a restart, and eliminated candidates'
checkpoints are deleted.  Disk: after rung 0 every candidate holds one checkpoint (weights and
AdamW state, about 12 bytes per student parameter).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ._io import atomic_write_json, atomic_write_text
from .adapters import Adapter, Shape
from .config import DistillConfig, ImportanceConfig, PruneConfig, SearchConfig, route_overrides
from .errors import SlimlmError

LADDER_FILE = "ladder.json"


#: the width axes of a candidate shape (Shape fields); an axis the model lacks keeps its one value
WIDTH_AXES = ("hidden", "ffn", "heads", "experts", "moe_ffn", "shared_ffn", "mamba_heads")
#: the sizes a candidate prunes to, as PruneConfig settings of the same names
PRUNED_AXES = ("layers",) + WIDTH_AXES
#: the block of a layer that makes an axis exist, and the axis' letter in a candidate's name
_AXIS_BLOCK = {"ffn": "mlp", "heads": "attention", "experts": "moe", "moe_ffn": "moe", "shared_ffn": "shared",
               "mamba_heads": "mamba"}
_LETTER = {"layers": "L", "hidden": "H", "ffn": "F", "heads": "Q", "experts": "E", "moe_ffn": "M", "shared_ffn": "S",
           "mamba_heads": "MH"}
#: largest grid counted at once (shapes per depth); a larger one is thinned (see `axis_grids`)
MAX_GRID = 2_000_000
#: most valid shapes kept, the closest to the target first, before the spread is chosen
MAX_POOL = 20_000


def model_axes(shape: Shape) -> tuple[str, ...]:
    """The pruned axes a model of `shape` has (depth and hidden always; the others where a layer holds their block)."""
    return tuple(a for a in PRUNED_AXES
                 if a not in _AXIS_BLOCK or (shape.layers_with(_AXIS_BLOCK[a]) and getattr(shape, a)))


@dataclass(frozen=True)
class Candidate:
    """A shape of the search, with its total and active (per-token) parameter counts."""

    shape: Shape
    params: int
    active_params: int

    @property
    def name(self) -> str:
        """e.g. L24-H1536-F4096-Q12 (dense), L24-H1536-Q12-E96-M512 (MoE): the axes the model has."""
        return "-".join(f"{_LETTER[a]}{getattr(self.shape, a)}" for a in model_axes(self.shape))


def prune_targets(sizes, source: Shape, **settings) -> PruneConfig:
    """The PruneConfig of a candidate (a Shape or a ranking row): the size of every axis the source model has."""
    get = sizes.get if isinstance(sizes, dict) else lambda name: getattr(sizes, name, None)
    return PruneConfig(**{a: get(a) for a in model_axes(source) if get(a)}, **settings)


def _grid(low: float, high: int, step: int) -> list[int]:
    start = max(step, math.ceil(low / step) * step)
    values = list(range(start, high + 1, step))
    if high not in values:
        values.append(high)
    return values


def _hidden_grid(adapter: Adapter, low: float, high: int, step: int, heads: list[int]) -> list[int]:
    """Hidden sizes on multiples of `step`, or, where a family needs the hidden size divisible by
    the query heads, on each head count's own step: the smallest multiple of lcm(heads,
    gcd(step, 8)) that is at least `step` (SmolLM2's 9 or 6 heads with step 64: every 72, so
    hidden 432 is on the grid, where multiples of 64 leave only 384 and 576 loadable).  A step
    that already divides evenly is unchanged (32 heads, step 64: every 64)."""
    if not adapter.hidden_divisible_by_heads or not any(heads):
        return _grid(low, high, step)
    values = set()
    for h in heads:
        unit = math.lcm(h, math.gcd(step, 8))
        values.update(_grid(low, high, math.ceil(step / unit) * unit))
    return sorted(values)


def _expert_grid(s: Shape, low: float, step: int | None) -> list[int]:
    """Expert counts down to `low` x the experts: multiples of the routing groups, never below top-k."""
    groups = max(s.expert_groups, 1)
    step = step or max(1, s.experts // 16)
    step = math.ceil(step / groups) * groups
    values = [e for e in range(step, s.experts + 1, step) if e >= s.experts * low and e >= s.experts_per_token]
    return values if s.experts in values else values + [s.experts]


def axis_grids(adapter: Adapter, config: SearchConfig, active: bool) -> dict[str, list[int]]:
    """The values each width axis may take (one value: the axis is not searched).

    Hidden and MLP-type sizes on multiples of `hidden_step` / `ffn_step` (the expert and
    shared-expert sizes too; the hidden step made to fit each head count where the family needs
    the hidden size divisible by the heads, `_hidden_grid`), query heads on multiples of the KV heads, Mamba heads on multiples
    of the Mamba groups (every group keeps the same number), experts on multiples of
    `expert_step`; each down to (1 - max_width_prune) of the original.  The expert count is
    searched only against a total target: with an active target it changes no active parameter,
    so fewer experts would only lose capacity at the same per-token compute.  A grid of more than
    MAX_GRID shapes is thinned, every other value of its longest axis at a time (the original
    size always kept).
    """
    c, s = config, adapter.shape()
    low = 1.0 - c.max_width_prune
    axes = model_axes(s)
    grids = {a: [getattr(s, a)] for a in WIDTH_AXES}
    for a in ("ffn", "moe_ffn", "shared_ffn"):
        if a in axes:
            grids[a] = _grid(getattr(s, a) * low, getattr(s, a), c.ffn_step)
    if "heads" in axes and c.prune_heads:
        grids["heads"] = [h for h in range(s.kv_heads, s.heads + 1, s.kv_heads) if h >= s.heads * low]
    grids["hidden"] = _hidden_grid(adapter, s.hidden * low, s.hidden, c.hidden_step, grids["heads"])
    if "experts" in axes and not active:
        grids["experts"] = _expert_grid(s, low, c.expert_step)
    if "mamba_heads" in axes:
        g = max(s.mamba_groups, 1)
        grids["mamba_heads"] = [m for m in range(g, s.mamba_heads + 1, g) if m >= s.mamba_heads * low]
    while math.prod(len(v) for v in grids.values()) > MAX_GRID:
        longest = max(grids, key=lambda a: len(grids[a]))
        grids[longest] = grids[longest][::-1][::2][::-1]
    return grids


def depth_grid(source: Shape, config: SearchConfig) -> list[int]:
    """Layer counts from (1 - max_depth_prune) x L to L; only L when the layers differ (a hybrid, or
    a MoE with dense layers): which layers go then depends on the depth scores, and with them the
    parameter count."""
    if len(set(source.layer_blocks)) > 1:
        return [source.layers]
    return list(range(max(1, math.ceil(source.layers * (1.0 - config.max_depth_prune))), source.layers + 1))


def enumerate_candidates(adapter: Adapter, config: SearchConfig | None = None, **overrides) -> list[Candidate]:
    """Uniform shapes within ±`tolerance` of the parameter target (settings: `SearchConfig`).

    The target is `target_params` (total) or `target_active_params` (what one token uses: of
    the routed experts only the top-k).  The shapes are every combination of `depth_grid` and
    `axis_grids`, each made from the source shape (`dataclasses.replace`, so a MoE or hybrid
    keeps its layer pattern) and counted by the adapter's analytic `param_count`, a whole grid
    at once; shapes transformers would refuse (`Adapter.validate_shape`) are left out.  With
    `max_candidates` None, every qualifying shape (at most MAX_POOL), closest to the target
    first.  When more shapes qualify than `max_candidates`, a spread of them: the closest to the
    target, then each time the shape farthest from those chosen (every axis as a fraction of
    the original); any prefix of the list is a spread too.
    """
    import numpy as np

    c = SearchConfig.make(config, **overrides)
    target, active = c.target()
    tolerance, max_width_prune, max_depth_prune = c.tolerance, c.max_width_prune, c.max_depth_prune
    s = adapter.shape()
    full = adapter.param_count(s, active=active)
    flag = "--target-active-params" if active else "--target-params"
    if not 0 < target < full:
        raise SlimlmError(f"{flag} must be between 0 and the model's {full:,}"
                          + (" active parameters" if active else ""))
    if not 0 < tolerance < 1:
        raise SlimlmError(f"--tolerance must be between 0 and 1, got {tolerance}")
    for name, value in (("max-width-prune", c.max_width_prune), ("max-depth-prune", c.max_depth_prune)):
        if not 0 <= value < 1:
            raise SlimlmError(f"--{name} must be a fraction in [0, 1), got {value}")
    grids = axis_grids(adapter, c, active)
    found = []
    for n in depth_grid(s, c):
        mesh = np.meshgrid(*[np.asarray(grids[a], dtype=np.int64) for a in WIDTH_AXES], indexing="ij")
        cols = {a: m.reshape(-1) for a, m in zip(WIDTH_AXES, mesh)}
        shapes = replace(s, layers=n, layer_blocks=s.layer_blocks[:n], **cols,
                         experts_per_token=np.minimum(s.experts_per_token, cols["experts"]))
        totals = np.broadcast_to(adapter.param_count(shapes), cols["hidden"].shape)
        actives = np.broadcast_to(adapter.param_count(shapes, active=True), cols["hidden"].shape)
        counted = actives if active else totals
        hit = np.nonzero(np.abs(counted - target) <= tolerance * target)[0]
        found.append((np.full(len(hit), n), {a: v[hit] for a, v in cols.items()}, totals[hit], actives[hit]))
    layers = np.concatenate([f[0] for f in found])
    cols = {a: np.concatenate([f[1][a] for f in found]) for a in WIDTH_AXES}
    totals, actives = (np.concatenate([f[i] for f in found]) for i in (2, 3))
    distance = np.abs((actives if active else totals) - target)
    out = []
    for i in np.lexsort((-cols["hidden"], -layers, distance)):  # closest first, then deeper, then wider
        n = int(layers[i])
        widths = {a: int(cols[a][i]) for a in WIDTH_AXES}
        shape = replace(s, layers=n, layer_blocks=s.layer_blocks[:n], **widths,
                        experts_per_token=min(s.experts_per_token, widths["experts"]))
        try:
            adapter.validate_shape(shape)
        except SlimlmError:
            continue
        out.append(Candidate(shape, int(totals[i]), int(actives[i])))
        if len(out) == MAX_POOL:
            break
    if not out:
        raise SlimlmError(
            f"no uniform shape within ±{tolerance:.0%} of {target:,} {'active ' if active else ''}parameters under "
            f"the pruning caps (width ≤ {max_width_prune:.0%}, depth ≤ {max_depth_prune:.0%}); widen --tolerance or "
            "the caps"
        )
    if not c.max_candidates or len(out) <= c.max_candidates:
        return out
    return _spread(out, s, c.max_candidates)


def _spread(candidates: list[Candidate], source: Shape, k: int) -> list[Candidate]:
    """`k` candidates far apart in shape (farthest-point sampling from the first one)."""
    import numpy as np

    axes = model_axes(source)
    x = np.array([[getattr(c.shape, a) / getattr(source, a) for a in axes] for c in candidates])
    chosen = [0]
    dist = np.linalg.norm(x - x[0], axis=1)
    while len(chosen) < k:
        i = int(np.argmax(dist))  # ties: the first, i.e. the closest to the target
        chosen.append(i)
        dist = np.minimum(dist, np.linalg.norm(x - x[i], axis=1))
    return [candidates[i] for i in chosen]


# ---- the ladder ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rung:
    """One rung of successive halving: `candidates` distill `added` more steps each, to `steps` in all."""

    index: int
    candidates: int
    added: int
    steps: int


def rung_sizes(n_candidates: int, reduction: int) -> list[int]:
    """Candidates in each rung: n, ceil(n / reduction), ... down to the last rung before one is left."""
    sizes = [n_candidates]
    while sizes[-1] > 1:
        sizes.append(math.ceil(sizes[-1] / reduction))
    return sizes[:-1] if len(sizes) > 1 else sizes


def plan_ladder(n_candidates: int, budget_steps: int, reduction: int) -> list[Rung]:
    """The rungs for `n_candidates` and `budget_steps` optimizer steps in all (see the module doc).

    Each rung gets an equal share of the steps still unspent; SlimlmError when a rung would
    give its candidates no step at all.
    """
    sizes = rung_sizes(n_candidates, reduction)
    rungs, used, steps = [], 0, 0
    for r, n in enumerate(sizes):
        added = (budget_steps - used) // (len(sizes) - r) // n
        if added < 1:
            raise SlimlmError(f"a search budget of {budget_steps} steps cannot give the {n} candidates of rung {r} "
                              "one step each: raise --search-budget or lower --max-candidates")
        steps += added
        used += added * n
        rungs.append(Rung(r, n, added, steps))
    return rungs


def fit_ladder(n_candidates: int, budget_steps: int, reduction: int) -> list[Rung]:
    """`plan_ladder` for as many of the candidates as the budget gives one step each in every rung."""
    for n in range(n_candidates, 0, -1):
        try:
            return plan_ladder(n, budget_steps, reduction)
        except SlimlmError:
            continue
    raise SlimlmError(f"the search budget ({budget_steps} optimizer steps) is less than one step; "
                      "raise --search-budget")


def ladder_steps(rungs: list[Rung]) -> int:
    """Optimizer steps the ladder spends in all: sum over rungs of candidates x added steps."""
    return sum(r.candidates * r.added for r in rungs)


# ---- running it ----------------------------------------------------------------------------------


def _row(cand: Candidate, rung: Rung, result, plan, tokens_per_step: int) -> dict:
    s = cand.shape
    return {
        "candidate": cand.name,
        **{k: v for k, v in s.as_dict().items() if k in PRUNED_AXES + ("kv_heads",)},
        "params": cand.params, "active_params": cand.active_params,
        "rung": rung.index, "steps": rung.steps, "tokens": rung.steps * tokens_per_step,
        "val_kl": result.metrics.get("val_kl"), "val_lm_loss": result.metrics.get("val_lm_loss"),
        "seconds": result.elapsed_s, "kept_layers": plan.kept_layers,
    }


def _by_kl(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["val_kl"] is None, r["val_kl"] if r["val_kl"] is not None else 0.0))


def run_rung(teacher_model, tokenizer, scores, candidates: list[Candidate], rung: Rung, final_steps: int, out: Path,
             *, data, distill: DistillConfig, depth_metric: str = "block", progress: bool = True) -> list[dict]:
    """Distill each candidate to `rung.steps` steps (resuming its checkpoint), validate it; ranked by val KL.

    Every candidate's distillation is planned for `final_steps` (the last rung) and stopped at
    the rung's end.  A candidate whose result for this rung exists is not run again.
    """
    from .adapters import get_adapter
    from .training.checkpoint import latest_checkpoint
    from .plan import make_plan
    from .prune import prune_model

    source = get_adapter(teacher_model).shape()
    tokens_per_step = (distill.global_batch or distill.micro_batch) * distill.seq_len
    # One distillation per candidate, planned for the whole ladder: validated only where it stops
    # (eval_every = its length), checkpointed only there (save_every 0).
    config = distill.make(distill, tokens=final_steps * tokens_per_step, eval_every=final_steps, save_every=0,
                          keep_checkpoints=1, stop_after=rung.steps if rung.steps < final_steps else None)
    rows = []
    for i, cand in enumerate(candidates):
        folder = out / "candidates" / cand.name
        done = folder / f"rung-{rung.index}.json"
        if done.exists():
            rows.append(json.loads(done.read_text()))
            continue
        plan = make_plan(scores, source, prune_targets(cand.shape, source, depth_metric=depth_metric))
        student = prune_model(teacher_model, plan)
        resume = latest_checkpoint(folder / "student" / "run") is not None
        print(f"[search rung {rung.index}, {i + 1}/{len(candidates)}] {cand.name}: {cand.params / 1e6:.1f}M parameters, "
              f"steps {rung.steps - rung.added} -> {rung.steps}", flush=True)
        result = _distill_candidate(teacher_model, student, folder / "student", data, config, tokenizer,
                                    resume=resume, progress=progress)
        row = _row(cand, rung, result, plan, tokens_per_step)
        atomic_write_json(done, row)
        rows.append(row)
        del student
    return _by_kl(rows)


def _distill_candidate(teacher, student, folder: Path, data, config: DistillConfig, tokenizer, *, resume: bool,
                       progress: bool):
    """One candidate's distillation up to its rung's end (from the teacher-logits cache when the config names one:
    the teacher model is then not used; `search` checked the cache against it)."""
    from .distill import distill as run_distill

    if config.teacher_logits:
        teacher = None
    return run_distill(teacher, student, data, folder, config=config, tokenizer=tokenizer, resume=resume,
                       overwrite=not resume, progress=progress)


def drop_checkpoints(out: Path, names: list[str]) -> None:
    """Delete the training checkpoints of candidates that will not run again (their results stay)."""
    for name in names:
        shutil.rmtree(out / "candidates" / name / "student" / "run" / "checkpoints", ignore_errors=True)


def keep_winner(out: Path, best: str) -> Path:
    """Copy the winner's distilled student to OUT/winner (its run folder left behind)."""
    src = out / "candidates" / best / "student"
    dst = out / "winner"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("run"))
    return dst


#: ranking-table columns of the axes (shown when some row has a non-zero value)
AXIS_COLUMNS = {"layers": "layers", "hidden": "hidden", "ffn": "ffn", "heads": "heads", "experts": "experts",
                "moe_ffn": "expert ffn", "shared_ffn": "shared ffn", "mamba_heads": "Mamba heads"}


def table_columns(rows: list[dict]) -> tuple[list[str], bool]:
    """(axes shown, whether an active-parameter column is shown) for ranking rows."""
    axes = [a for a in AXIS_COLUMNS if any(row.get(a) for row in rows)]
    active = any(row.get("active_params") not in (None, row.get("params")) for row in rows)
    return axes, active


def ranking_table(rows: list[dict], kept: int | None = None) -> list[str]:
    """A Markdown table of ranked candidates (`kept`: how many of them go on to the next rung)."""
    axes, active = table_columns(rows)
    header = ["rank", "candidate"] + [AXIS_COLUMNS[a] for a in axes] + ["parameters"] + (["active"] if active else [])
    header += ["steps", "val KL", "val LM loss"] + (["next rung"] if kept is not None else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows, 1):
        kl = f"{row['val_kl']:.4f}" if row["val_kl"] is not None else "-"
        lm = f"{row['val_lm_loss']:.4f}" if row["val_lm_loss"] is not None else "-"
        cells = [str(i), row["candidate"]] + [str(row.get(a, "-")) for a in axes] + [f"{row['params'] / 1e6:.2f}M"]
        cells += [f"{row['active_params'] / 1e6:.2f}M"] if active else []
        cells += [str(row["steps"]), kl, lm] + ([("yes" if i <= kept else "")] if kept is not None else [])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_rung(out: Path, rung: Rung, rows: list[dict], kept: int) -> None:
    """OUT/rungs/rung-R.json and .md: the rung's ranking and how many go on."""
    atomic_write_json(out / "rungs" / f"rung-{rung.index}.json", {**asdict(rung), "kept": kept, "ranking": rows})
    lines = [f"# Rung {rung.index}: {rung.candidates} candidates at {rung.steps} steps ({rung.added} added each); "
             f"{kept} kept", ""] + ranking_table(rows, kept)
    atomic_write_text(out / "rungs" / f"rung-{rung.index}.md", "\n".join(lines) + "\n")


def overall_ranking(rung_rows: list[list[dict]]) -> list[dict]:
    """Every candidate once, at the last rung it ran: the winner first, then by rung reached and val KL."""
    last = {}
    for rows in rung_rows:
        for row in rows:
            last[row["candidate"]] = row
    return sorted(last.values(), key=lambda r: (-r["rung"], r["val_kl"] is None,
                                                r["val_kl"] if r["val_kl"] is not None else 0.0))


def write_ranking(out: Path, results: list[dict]) -> None:
    """OUT/ranking.md (a Markdown table) and OUT/ranking.json: every candidate at the last rung it ran."""
    atomic_write_text(out / "ranking.md", "\n".join(ranking_table(results)) + "\n")
    atomic_write_json(out / "ranking.json", results)


def search_plan(adapter: Adapter, c: SearchConfig, d: DistillConfig) -> tuple[list[Candidate], list[Rung], int]:
    """(candidates that run, the rungs, tokens per optimizer step) of a search; see the module doc."""
    candidates = enumerate_candidates(adapter, c)
    tokens_per_step = (d.global_batch or d.micro_batch) * d.seq_len
    rungs = fit_ladder(len(candidates), c.search_budget // tokens_per_step, c.reduction)
    return candidates[: rungs[0].candidates], rungs, tokens_per_step


def search_tokens(adapter: Adapter, c: SearchConfig, d: DistillConfig) -> int:
    """The token budget each candidate's distillation is planned for (the last rung's steps): what a shared
    teacher-logits cache must cover."""
    _, rungs, tokens_per_step = search_plan(adapter, c, d)
    return _candidate_tokens(rungs, tokens_per_step)


def _candidate_tokens(rungs: list[Rung], tokens_per_step: int) -> int:
    return rungs[-1].steps * tokens_per_step


def _check_cache(model: str, tokenizer, d: DistillConfig, imp: ImportanceConfig, tokens: int) -> None:
    """The teacher-logits cache `d.teacher_logits` was written from `model` for the candidates' data and covers them."""
    from .distill.teacher_logits import TeacherLogitsCache
    from .distill.trainer import check_settings, check_teacher_logits_settings

    check_teacher_logits_settings(d, *check_settings(d))
    cache = TeacherLogitsCache.open(d.teacher_logits)
    cache.check_files()
    cache.check_matches(tokenizer=tokenizer, data=imp.data, data_weights=d.data_weights, eval_data=d.eval_data,
                        text_field=imp.text_field, seed=d.seed, seq_len=d.seq_len, teacher=model, dtype=d.dtype)
    cache.stream(tokens=tokens, global_batch=d.global_batch or d.micro_batch, heldout=d.heldout)


def _ladder_record(model: str, candidates: list[Candidate], rungs: list[Rung], c: SearchConfig, d: DistillConfig,
                   imp: ImportanceConfig, tokens_per_step: int, budget_steps: int) -> dict:
    """What a search folder was made with (OUT/ladder.json); a restart must find the same."""
    return {
        "teacher": str(model), "candidates": [{"name": x.name, "params": x.params} for x in candidates],
        "rungs": [asdict(r) for r in rungs], "tokens_per_step": tokens_per_step, "budget_steps": budget_steps,
        "steps_used": ladder_steps(rungs), "search": c.as_dict(), "distill": d.as_dict(),
        "data": imp.data, "text_field": imp.text_field,
    }


def _check_search_folder(out: Path, record: dict, overwrite: bool) -> None:
    """A search folder is resumable: one holding the same plan continues; one with another plan is
    refused, or cleared with `overwrite`; a fresh output must be new (or `overwrite`)."""
    from ._io import check_writable_output

    previous = json.loads((out / LADDER_FILE).read_text()) if (out / LADDER_FILE).exists() else None
    if previous is not None and previous != json.loads(json.dumps(record, default=str)):
        if not overwrite:
            raise SlimlmError(f"{out} holds a search with other settings; choose another folder (or pass overwrite)")
        for name in ("candidates", "rungs", "winner"):
            shutil.rmtree(out / name, ignore_errors=True)
        previous = None
    if previous is None and not (out / "candidates").is_dir():
        check_writable_output(out, overwrite=overwrite)


def _search_scores(model, teacher, tok, given, scores_path: Path, imp: ImportanceConfig, d: DistillConfig,
                   depths: list[int], progress: bool):
    """The importance scores (`given`, or computed into `scores_path`) with the block losses the
    depth candidates need added."""
    from . import api

    calib = imp.make(imp, seq_len=d.seq_len, depth_loss=False, offload="none")  # the teacher is in memory to distill
    sc = given if given is not None else api.importance(model, scores_path, calib, loaded=teacher, overwrite=True,
                                                        progress=progress)
    if api.add_block_losses(sc, teacher, tok, depths, calib, progress):
        sc.save(scores_path)
    return sc


def run_ladder(teacher, tok, scores, candidates: list[Candidate], rungs: list[Rung], out: Path, *, data,
               distill: DistillConfig, progress: bool = True) -> list[list[dict]]:
    """Successive halving: each rung distils its candidates (continuing their runs), ranks them and
    keeps the best for the next; returns each rung's ranked rows.  Checkpoints of dropped candidates
    are deleted as they drop out."""
    alive, per_rung = candidates, []
    final_steps = rungs[-1].steps
    for i, rung in enumerate(rungs):
        rows = run_rung(teacher, tok, scores, alive, rung, final_steps, out, data=data, distill=distill,
                        progress=progress)
        kept = rungs[i + 1].candidates if i + 1 < len(rungs) else 1
        write_rung(out, rung, rows, kept)
        per_rung.append(rows)
        survivors = {row["candidate"] for row in rows[:kept]}
        drop_checkpoints(out, [x.name for x in alive if x.name not in survivors or i + 1 == len(rungs)])
        alive = [x for x in alive if x.name in survivors]
    return per_rung


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
    overwrite: bool = False,
    **overrides,
) -> dict:
    """The whole search: what `slimlm search` and the pipeline's search stage run.

    Enumerates candidate shapes near `config.target_params` (or `target_active_params`), scores
    importance (or reuses `scores`, default OUT/scores.safetensors when it exists), adds the contiguous-block losses
    the depth candidates need, then runs the successive-halving ladder (module doc) with the
    `distill` settings (its data is `importance.data`; calibration windows use the
    distillation's seq_len).  Writes OUT/ladder.json (the plan), OUT/rungs/rung-R.{json,md}
    (each rung's ranking), OUT/ranking.{md,json} (every candidate at its last rung) and the
    winner's student in OUT/winner.  A folder holding a search with other settings is refused,
    or cleared with `overwrite`.  Keyword overrides go to whichever config declares them.
    `loaded` is the teacher already in memory.  Returns {"output", "ranking", "rungs", "winner",
    "winner_path", "candidates", "scores", "steps_used", "budget_steps"}.
    """
    from .models import load_model, load_tokenizer

    made = route_overrides(overrides, search=(SearchConfig, config), distill=(DistillConfig, distill),
                           importance=(ImportanceConfig, importance))
    c, d, imp = made["search"], made["distill"], made["importance"]
    r = _check_search(model, output, c, d, imp, scores=scores, loaded=loaded, overwrite=overwrite)
    out, candidates, rungs = r.out, r.candidates, r.rungs
    # -- work: a search that fails before its first result leaves no folder behind --------------
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write_json(out / LADDER_FILE, r.record)
        teacher = loaded if loaded is not None else load_model(model, dtype=d.dtype)
        tok = load_tokenizer(model)
        depths = [r.adapter.shape().layers - cand.shape.layers for cand in candidates]
        sc = _search_scores(model, teacher, tok, r.given, r.scores_path, imp, d, depths, progress)
    except BaseException:
        # Only the plan was written (a computed scores file is kept: the rerun reuses it).
        if created and {p.name for p in out.iterdir()} <= {LADDER_FILE}:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if progress:
        print(f"search: {len(candidates)} candidates, rungs " + ", ".join(
            f"{x.candidates} x {x.steps} steps" for x in rungs) + f"; {ladder_steps(rungs)} of {r.budget_steps} "
            f"steps ({r.tokens_per_step:,} tokens each)", flush=True)
    per_rung = run_ladder(teacher, tok, sc, candidates, rungs, out, data=imp.data, distill=d, progress=progress)
    ranking = overall_ranking(per_rung)
    write_ranking(out, ranking)
    winner = keep_winner(out, per_rung[-1][0]["candidate"])
    return {"output": str(out), "ranking": ranking, "rungs": per_rung, "winner": per_rung[-1][0],
            "winner_path": str(winner), "candidates": len(candidates), "scores": str(r.scores_path),
            "steps_used": ladder_steps(rungs), "budget_steps": r.budget_steps}


@dataclass(frozen=True)
class _SearchRequest:
    """A search's settings, checked: the plan, its record, and the scores to reuse (`given`)."""

    out: Path
    adapter: Adapter
    candidates: list
    rungs: list
    tokens_per_step: int
    budget_steps: int
    record: dict
    scores_path: Path
    given: object


def _check_search(model, output, c: SearchConfig, d: DistillConfig, imp: ImportanceConfig, *, scores, loaded,
                  overwrite: bool) -> _SearchRequest:
    """Every check of `search` before any output exists."""
    from . import api
    from ._io import check_not_an_input, probe_writable
    from .adapters import get_adapter
    from .data import check_source
    from .importance import Scores
    from .models import load_config, load_tokenizer, pick_dtype

    c.target()  # exactly one target
    api.check_importance_config(imp)
    out = Path(output).expanduser()
    pick_dtype(d.dtype)
    model_config = loaded.config if loaded is not None else load_config(model)
    adapter = get_adapter(model_config)
    candidates, rungs, tokens_per_step = search_plan(adapter, c, d)
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit and d.seq_len > limit:
        raise SlimlmError(f"--seq-len {d.seq_len} is past the model's limit of {limit} positions")
    check_not_an_input(out, (model, scores))
    if out.exists() and not out.is_dir():
        raise SlimlmError(f"the search output {out} is not a folder; choose another --output")
    probe_writable(out, what="search folder")
    budget_steps = c.search_budget // tokens_per_step
    if d.teacher_logits:
        _check_cache(model, load_tokenizer(model), d, imp, _candidate_tokens(rungs, tokens_per_step))
    record = _ladder_record(model, candidates, rungs, c, d, imp, tokens_per_step, budget_steps)
    _check_search_folder(out, record, overwrite)
    check_source(imp.data, imp.text_field)
    scores_path = Path(scores).expanduser() if scores else out / "scores.safetensors"
    if scores and not scores_path.exists():
        raise SlimlmError(f"scores file not found: {scores}")
    given = Scores.load(scores_path) if scores_path.exists() else None
    if given is not None:
        given.check_matches(adapter.shape())
    return _SearchRequest(out, adapter, candidates, rungs, tokens_per_step, budget_steps, record, scores_path, given)
