"""Reproduce the Minitron findings at small scale on the real SmolLM2-135M teacher.

    python bench/fidelity.py            # the full study: about 4.5 hours on 2 quiet CPU cores (estimate)
    python bench/fidelity.py --hellaswag-items 100   # the same with HellaSwag on 100 items: about 2 hours
    python bench/fidelity.py --quick    # the same rows with tiny budgets: about 20 minutes from scratch on 2 cores
    python bench/fidelity.py --groups 6 # only group 6 (and the teacher row): about an hour (2026-12-02); the
                                        # other groups' cached rows stay; docs untouched unless --docs is given

Every row is a student of about half the teacher's parameters (or the teacher), with
equal distillation tokens, evaluated the same way:
  WikiText-2 perplexity (first --ppl-tokens tokens, 512-token windows),
  HellaSwag acc_norm (first --hellaswag-items items, local 6-line file),
  validation KL to the original teacher on Python documentation pages no row trains on,
  wall time of the row (pruning + training; evaluation excluded).
Groups (METHOD §7):
  1 width vs depth (depth by block, loss and bi), after distillation;
  2 activation vs magnitude vs random importance, zero-shot and after distillation;
  3 the four batch/sequence aggregations, zero-shot;
  4 logit distillation vs LM-loss training from the same pruned start, vs random init + distillation;
  5 corrected vs original teacher, distilling on Shakespeare (far from the teacher's data);
  6 the search's winner vs hand-picked shapes, at equal search compute: the winner of today's
    search (successive halving) and the winners of the former search's settings (on the former
    hidden grid, and on today's), each pruned afresh and given the same final distillation as
    every row, against the hand-picked shapes.

Group 6's compute accounting.  Each search gets the same --search-budget of distillation
tokens (default 81 optimizer steps of 4 windows x --seq-len tokens: 82,944 tokens in the full
study, 20,736 with --quick); validation (the same held-out windows for every candidate, no
backward) and the importance pass with its contiguous-block losses (shared by the searches)
are not counted, as in `slimlm.search`.
  new: `slimlm.search.search` with the defaults of SearchConfig (caps 55 % width / 40 % depth,
    up to 27 candidates as a spread, reduction 3).  81 steps -> rungs of n x 1, 9 x 3, 3 x 9
    steps (each rung an equal third of the budget; the three finalists end at 13 steps); 81 is
    the fewest steps that give 27 candidates a step in rung 0.  At this target 106 shapes
    qualify (the hidden grid steps by 72 for SmolLM2's 6 or 9 query heads, so hidden 288, 360,
    432, 504 and 576 are all loadable; `search._hidden_grid`) and the search takes a spread of
    27 of them: all 81 steps are spent.
  old: what `slimlm search` did before successive halving, built from the same pieces
    (`enumerate_candidates`, `plan_ladder`, `run_rung`): the 8 shapes closest to the target
    under caps 40 % width / 20 % depth (closest first, as the former code chose; not a spread),
    one rung (plan_ladder with reduction 8) of 81 // 8 = 10 steps each (80 steps), ranked once
    by validation KL, on the former hidden grid (multiples of 64: only 384 and 576 load with 6
    or 9 heads; `former_hidden_grid`).
  old on today's grid: the same, with today's hidden grid (hidden 360, 432, 504, 576 at these
    caps), to separate what the grid gives from what the ladder and the wider caps give.
The new search and one old one together (166K tokens in the full study) cost about what one
default search of the former code did (8 candidates x 20,000 tokens = 160,000).  The former group 6 spent
16,384 tokens (4 candidates x 4,096); that cannot give 27 candidates one step each at this
batch (81 steps x 1,024 tokens is the least), hence the larger budget.  Candidates of all
searches distill with 4 windows per step (the search's default batch), the study's LR schedule
(1e-4 -> 1e-5; the warm-up of 4 steps is clamped to 10 % of each candidate's run: 1 step)
and 4 held-out windows.
Rows are cached in OUT/rows.jsonl: an interrupted run resumes where it stopped (group 6's
searches too: OUT/search-new, OUT/search-old, OUT/search-old-new-grid), and a row cached
with fewer HellaSwag items than asked is topped up (HellaSwag re-run on the same model).
Writes OUT/fidelity.md (tables) and OUT/*.png (plots), and (full study) puts the same tables
into docs/benchmarks.md between its fidelity markers and the plot into docs/img/; the
commentary around them is written by hand.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import HELLASWAG, SHAKESPEARE, WIKITEXT, machine, parse_study
from slimlm.adapters import Shape, get_adapter
from slimlm.data import pack_windows
from slimlm.distill import distill
from slimlm.evaluate import perplexity, run_tasks
from slimlm.importance import Scores, estimate_importance
from slimlm.models import load_model, load_tokenizer
from slimlm.config import DistillConfig, ImportanceConfig, PruneConfig, SearchConfig
from slimlm.plan import make_plan, target_shape
from slimlm.prune import prune_model

WIDTH = dict(hidden=384, ffn=1024, heads=6)  # about half of SmolLM2-135M
# Other hand-picked shapes of about the same size (66.0M and 64.9M against 67.6M).
HAND_SHAPES = {"hand: hidden 432, ffn 768, heads 6": dict(hidden=432, ffn=768, heads=6),
               "hand: 24 layers, hidden 384, ffn 1280, heads 6": dict(hidden=384, ffn=1280, heads=6, layers=24)}
CORPUS = "builtin:python-docs"  # what every row (but group 5's) distills on
GROUPS = (1, 2, 3, 4, 5, 6)
GROUP6 = "6 search vs hand-picked (equal search compute)"
#: groups of earlier versions of the study: their cached rows stay in rows.jsonl but are not shown
RETIRED_GROUPS = ("6 search vs hand-picked",)  # 4 closest candidates x 4,096 tokens, caps 45 % / 20 %
#: group 6's two searches: (folder under OUT, row label)
SEARCHES = (("search-new", "search (new: successive halving, caps 55 %/40 %, up to 27 candidates)"),
            ("search-old", "search (old settings: 8 candidates, caps 40 % width / 20 % depth, one rung)"),
            ("search-old-new-grid", "search (old settings on today's hidden grid)"))
#: optimizer steps of each search: the fewest that give the new search's 27 candidates one step in rung 0
SEARCH_STEPS = 81
SEARCH_BATCH = 4  # windows per step of a search candidate (the search's default)


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny budgets: checks every row end to end (about 20 minutes on 2 cores; group 6 alone 12)")
    ap.add_argument("--out", default=None, help="output folder (default bench/out/fidelity[-quick])")
    ap.add_argument("--tokens", type=int, default=None, help="distillation tokens per row (full 16384, quick 1024)")
    ap.add_argument("--seq-len", type=int, default=None, help="training/calibration window (full 256, quick 64)")
    ap.add_argument("--ppl-tokens", type=int, default=None, help="WikiText-2 tokens scored (full 8192, quick 1024)")
    ap.add_argument("--hellaswag-items", type=int, default=None,
                    help="HellaSwag items (full 500, quick 10; about 2.5 min per model on 2 cores). Rows cached with "
                         "fewer items are re-scored on HellaSwag alone (trained students reload from OUT/students)")
    ap.add_argument("--calib-samples", type=int, default=None, help="calibration windows (full 128, quick 8)")
    ap.add_argument("--docs", default=None,
                    help="Markdown file whose '<!-- fidelity:begin -->' ... '<!-- fidelity:end -->' block gets the "
                         "tables, with the plot copied beside it under img/ (default docs/benchmarks.md for the full "
                         "study of all groups; quick runs and --groups runs write none; 'none' turns it off)")
    ap.add_argument("--groups", default=",".join(map(str, GROUPS)),
                    help="comma-separated groups to run, e.g. 6 (default: all); the teacher row always runs, the "
                         "tables show every cached row")
    ap.add_argument("--search-budget", type=int, default=None,
                    help=f"distillation tokens of each of group 6's two searches (default {SEARCH_STEPS} steps x "
                         f"{SEARCH_BATCH} windows x --seq-len: full 82944, quick 20736)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report-only", action="store_true", help="write OUT/fidelity.md and the plot from the rows done so far")
    full = dict(tokens=16384, seq_len=256, ppl_tokens=8192, hellaswag_items=500, calib_samples=128)
    quick = dict(tokens=1024, seq_len=64, ppl_tokens=1024, hellaswag_items=10, calib_samples=8)
    a = parse_study(ap, "fidelity", full, quick)
    a.groups = {int(g) for g in a.groups.split(",") if g.strip()}
    if not a.groups <= set(GROUPS):
        ap.error(f"--groups takes numbers among {', '.join(map(str, GROUPS))}, got {sorted(a.groups)}")
    if a.search_budget is None:
        a.search_budget = SEARCH_STEPS * SEARCH_BATCH * a.seq_len
    if a.docs is None and not a.quick and a.groups == set(GROUPS):  # a partial run would replace the whole block
        a.docs = str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")
    a.docs = None if a.docs in (None, "none") else Path(a.docs)
    return a


def legacy_items(a) -> int:
    """HellaSwag items of rows cached before rows recorded them: the default of that time."""
    return 10 if a.quick else 100


class Study:
    def __init__(self, a):
        self.a = a
        self.out = a.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows_path = self.out / "rows.jsonl"
        self.rows = {}
        if self.rows_path.exists():
            for line in self.rows_path.read_text().splitlines():
                r = json.loads(line)
                self.rows[r["id"]] = r
        self.teacher = load_model("smollm2-135m", dtype="float32")
        self.tok = load_tokenizer("smollm2-135m")
        self.adapter = get_adapter(self.teacher)
        self.shape = self.adapter.shape()
        # text no row trains on, for the validation KL
        self.kl_windows = pack_windows("builtin:python-docs-heldout", self.tok, a.seq_len, 16 if not a.quick else 4, seed=1).input_ids
        self.data_dir = self.out / "data"
        self.data_dir.mkdir(exist_ok=True)
        text = SHAKESPEARE.read_text()
        cut = int(len(text) * 0.9)
        (self.data_dir / "shakespeare-train.txt").write_text(text[:cut])
        (self.data_dir / "shakespeare-heldout.txt").write_text(text[cut:])
        self._scores = {}

    # ---- measurements ------------------------------------------------------------------
    @torch.inference_mode()
    def val_kl(self, student) -> float:
        total, n = 0.0, 0
        for b in self.kl_windows.split(4):
            t = F.log_softmax(self.teacher(b, use_cache=False).logits.float(), -1)
            s = F.log_softmax(student(b, use_cache=False).logits.float(), -1)
            total += (t.exp() * (t - s)).sum().item()
            n += b.numel()
        return total / n

    def evaluate(self, model, extra_ppl=None) -> dict:
        res = {
            "params": sum(p.numel() for p in model.parameters()),
            "wikitext_ppl": perplexity(model, self.tok, str(WIKITEXT), seq_len=512, max_tokens=self.a.ppl_tokens)["ppl"],
            "val_kl": self.val_kl(model) if model is not self.teacher else 0.0,
        }
        res.update(self.hellaswag(model))
        if extra_ppl:
            res["shakespeare_ppl"] = perplexity(model, self.tok, extra_ppl, seq_len=256, max_tokens=self.a.ppl_tokens)["ppl"]
        return res

    def hellaswag(self, model) -> dict:
        hs = run_tasks(model, self.tok, ["hellaswag_local"], limit=self.a.hellaswag_items, batch_size=8,
                       task_data={"hellaswag": str(HELLASWAG)})
        return {"hellaswag_acc_norm": hs["hellaswag_local"].get("acc_norm"), "hellaswag_items": self.a.hellaswag_items}

    # ---- ingredients ---------------------------------------------------------------------
    def scores(self, kind="activation", aggregation="mean,l2", teacher=None, data=None, key=None):
        key = key or (kind, aggregation)
        saved = self.out / "scores.safetensors"  # the main scores, as the search stage saved them
        if key not in self._scores and key == ("activation", "mean,l2") and saved.exists():
            sc = Scores.load(saved)
            if all(sc.meta.get(k) == v for k, v in (("calib_samples", self.a.calib_samples), ("seq_len", self.a.seq_len))):
                self._scores[key] = sc
        if key not in self._scores:
            model = teacher or self.teacher
            calib = held = None
            if kind == "activation":
                w = pack_windows(data, self.tok, self.a.seq_len, self.a.calib_samples + 8, seed=0)
                main, hw = w.split(8)
                calib, held = main.input_ids, hw.input_ids
            k = self.shape.layers - self.depth_layers()
            depth = key == ("activation", "mean,l2")  # only the main scores feed depth pruning
            self._scores[key] = estimate_importance(model, calib, importance=kind, aggregation=aggregation, heldout=held,
                                                    depth_loss=depth, block_sizes=(k,) if depth else (), batch_size=8, seed=0,
                                                    meta=dict(data=data, seq_len=self.a.seq_len, seed=0, heldout=8,
                                                              calib_samples=self.a.calib_samples))
        return self._scores[key]

    def depth_layers(self) -> int:
        width_params = self.adapter.param_count(target_shape(PruneConfig(**WIDTH), self.shape))
        return min(range(1, self.shape.layers), key=lambda n: abs(
            self.adapter.param_count(Shape(**{**self.shape.as_dict(), "layers": n})) - width_params))

    def student_dir(self, name) -> Path:
        return self.out / "students" / name.replace(" ", "_").replace(",", "").replace(":", "")

    def train(self, student, name, *, teacher=None, mode="kd", data="builtin:python-docs", tokens=None):
        out = self.student_dir(name)
        return distill(None if mode == "lm" and teacher is None else (teacher or self.teacher), student, data, out=out,
                       tokens=tokens or self.a.tokens, seq_len=self.a.seq_len, micro_batch=4, global_batch=16, lr=1e-4,
                       min_lr=1e-5, warmup=4, seed=0, mode=mode, heldout=4, overwrite=True, tokenizer=self.tok,
                       progress=False, tensorboard=False)

    # ---- rows --------------------------------------------------------------------------
    def row(self, group, name, build, *, train=None, extra_ppl=None, saved=None):
        """One row: build (and train) a model and evaluate it; cached in rows.jsonl.

        `saved`: the students/ folder a trained row writes (training defaults to distillation from the
        teacher into that folder), to reload it when only HellaSwag must be topped up (a cached row with
        fewer items than --hellaswag-items); untrained rows rebuild.
        """
        if saved is not None and train is None:
            train = lambda m: self.train(m, saved)  # noqa: E731
        rid = f"{group}|{name}"
        if rid in self.rows:
            row = self.rows[rid]
            if row.get("hellaswag_items", legacy_items(self.a)) >= self.a.hellaswag_items:
                return row
            if train is not None and not (saved and (self.student_dir(saved) / "config.json").exists()):
                return row  # the trained model is gone: keep the row as it was measured
            model = load_model(str(self.student_dir(saved)), dtype="float32") if train is not None else build()
            old = row["hellaswag_acc_norm"], row.get("hellaswag_items", legacy_items(self.a))
            row.update(self.hellaswag(model))
            self._rewrite_rows()
            print(f"{group:28s} {name:42s} HellaSwag {old[0]:.3f} ({old[1]} items) -> "
                  f"{row['hellaswag_acc_norm']:.3f} ({row['hellaswag_items']} items)", flush=True)
            del model
            return row
        t0 = time.perf_counter()
        model = build()
        if train is not None:
            train(model)
        wall = time.perf_counter() - t0
        row = {"id": rid, "group": group, "name": name, "wall_s": round(wall, 1), "threads": torch.get_num_threads(),
               **self.evaluate(model, extra_ppl)}
        self.rows[rid] = row
        with open(self.rows_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{group:28s} {name:42s} params {row['params'] / 1e6:6.1f}M  ppl {row['wikitext_ppl']:9.2f}  "
              f"hs {row['hellaswag_acc_norm']:.3f}  KL {row['val_kl']:.3f}  {wall:6.0f}s", flush=True)
        del model
        return row

    def _rewrite_rows(self) -> None:
        tmp = self.rows_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows.values()))
        tmp.replace(self.rows_path)

    def pruned(self, targets: PruneConfig, kind="activation", aggregation="mean,l2", teacher=None, scores_key=None, data=None):
        sc = self.scores(kind, aggregation, teacher=teacher, data=data, key=scores_key)
        return prune_model(teacher or self.teacher, make_plan(sc, self.shape, targets))


def report_only(a) -> None:
    """Tables and plot from OUT/rows.jsonl (and group 6's rung rankings) without running anything."""
    from types import SimpleNamespace

    rows_path = a.out / "rows.jsonl"
    if not rows_path.exists():
        raise SystemExit(f"no rows yet in {rows_path}")
    rows = {}
    for line in rows_path.read_text().splitlines():
        r = json.loads(line)
        rows[r["id"]] = r
    write_tables(SimpleNamespace(a=a, rows=rows, out=a.out))


def main():
    a = parse()
    if a.report_only:
        return report_only(a)
    torch.set_num_threads(a.threads)
    st = Study(a)
    print(f"# {machine()}; {a.tokens} distillation tokens per row; groups {sorted(a.groups)}; out: {a.out}", flush=True)
    st.row("0 teacher", "SmolLM2-135M-Instruct", lambda: st.teacher)  # every group's reference
    runs = {1: width_vs_depth, 2: importance_kinds, 3: aggregations, 4: objectives, 5: teacher_correction,
            6: search_vs_hand}
    for g in sorted(a.groups):
        runs[g](st)
    write_tables(st)


def width_vs_depth(st: Study) -> None:
    """Group 1: width vs depth (depth by block, loss and bi), after distillation."""
    depth_n = st.depth_layers()
    st.row("1 width vs depth", "width (activation)", lambda: st.pruned(PruneConfig(**WIDTH)), saved="w-act")
    for metric in ("block", "loss", "bi"):
        st.row("1 width vs depth", f"depth {depth_n} layers by {metric}",
               lambda metric=metric: st.pruned(PruneConfig(layers=depth_n, depth_metric=metric)),
               saved=f"d-{metric}")


def importance_kinds(st: Study) -> None:
    """Group 2: activation vs magnitude vs random importance, zero-shot and after distillation."""
    width = PruneConfig(**WIDTH)
    for kind in ("activation", "magnitude", "random"):
        st.row("2 importance (zero-shot)", kind, lambda kind=kind: st.pruned(width, kind))
    for kind in ("magnitude", "random"):
        st.row("2 importance (distilled)", kind, lambda kind=kind: st.pruned(width, kind), saved=f"w-{kind}")


def aggregations(st: Study) -> None:
    """Group 3: the four batch/sequence aggregations, zero-shot."""
    width = PruneConfig(**WIDTH)
    for agg in ("mean,l2", "mean,mean", "l2,l2", "var,var"):
        st.row("3 aggregation (zero-shot)", f"seq {agg.split(',')[0]}, batch {agg.split(',')[1]}",
               lambda agg=agg: st.pruned(width, "activation", agg))


def objectives(st: Study) -> None:
    """Group 4: distillation vs LM loss from the same pruned start, vs random init + distillation."""
    width = PruneConfig(**WIDTH)
    st.row("4 training objective", "LM loss from the pruned start", lambda: st.pruned(width),
           train=lambda m: st.train(m, "w-lm", mode="lm"), saved="w-lm")

    def random_init():
        from transformers import AutoModelForCausalLM

        plan = make_plan(st.scores(), st.shape, width)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(st.adapter.new_config(plan), dtype=torch.float32)

    st.row("4 training objective", "random init + distillation", random_init, saved="w-random-init")


def teacher_correction(st: Study) -> None:
    """Group 5: corrected vs original teacher, distilling on Shakespeare."""
    a, width = st.a, PruneConfig(**WIDTH)
    train_txt, held_txt = str(st.data_dir / "shakespeare-train.txt"), str(st.data_dir / "shakespeare-heldout.txt")
    st.row("5 teacher correction", "original teacher (reference)", lambda: st.teacher, extra_ppl=held_txt)
    corrected_dir = a.out / "students" / "teacher-corrected"

    def corrected_teacher():
        if not (corrected_dir / "config.json").exists():
            st.train(load_model("smollm2-135m", dtype="float32"), "teacher-corrected", mode="lm", data=train_txt, tokens=a.tokens * 2)
        return load_model(str(corrected_dir), dtype="float32")

    st.row("5 teacher correction", "corrected teacher (reference)", corrected_teacher, extra_ppl=held_txt)
    st.row("5 teacher correction", "student of the original teacher",
           lambda: st.pruned(width, scores_key="shakes-orig", data=train_txt),
           train=lambda m: st.train(m, "shakes-orig", data=train_txt), extra_ppl=held_txt, saved="shakes-orig")

    def from_corrected():
        t = corrected_teacher()
        st._corrected = t
        return st.pruned(width, teacher=t, scores_key="shakes-corr", data=train_txt)

    st.row("5 teacher correction", "student of the corrected teacher", from_corrected,
           train=lambda m: st.train(m, "shakes-corr", teacher=st._corrected, data=train_txt), extra_ppl=held_txt,
           saved="shakes-corr")


# ---- group 6: the search ---------------------------------------------------------------------


def search_settings(st: Study) -> tuple[SearchConfig, DistillConfig, ImportanceConfig]:
    """The settings both searches share: target, budget, each candidate's distillation, calibration."""
    a = st.a
    target = st.adapter.param_count(target_shape(PruneConfig(**WIDTH), st.shape))
    config = SearchConfig(target_params=target, search_budget=a.search_budget)
    distill_config = DistillConfig(data=CORPUS, seq_len=a.seq_len, micro_batch=SEARCH_BATCH, global_batch=SEARCH_BATCH,
                                   lr=1e-4, min_lr=1e-5, warmup=4, seed=0, heldout=4, tensorboard=False,
                                   dtype="float32")
    # The candidates' training data is the importance config's (as in `slimlm search`); the
    # calibration settings are those of the study's scores, which the search reuses.
    importance = ImportanceConfig(data=CORPUS, calib_samples=a.calib_samples, seq_len=a.seq_len, heldout=8, seed=0,
                                  dtype="float32")
    return config.checked(), distill_config.checked(), importance.checked()


@contextmanager
def former_hidden_grid():
    """The former search's hidden grid: plain multiples of hidden_step (64), whatever the heads
    (for SmolLM2 only 384 and 576 of them load), instead of today's per-head-count step."""
    from slimlm import search as search_module

    today = search_module._hidden_grid
    search_module._hidden_grid = lambda adapter, low, high, step, heads: search_module._grid(low, high, step)
    try:
        yield
    finally:
        search_module._hidden_grid = today


def old_search(st: Study, config: SearchConfig, distill_config: DistillConfig, importance: ImportanceConfig,
               scores_path: Path, which: int) -> list[dict]:
    """What `slimlm search` did before successive halving, built from today's pieces.

    The former code took the 8 shapes closest to the target under caps of 40 % width and 20 %
    depth (closest first, not a spread), distilled each for the same number of tokens and
    ranked them once by validation KL.  Here: the same shapes, one rung of `plan_ladder` with a
    reduction of 8 (every candidate gets budget // 8 steps, then the best is the winner), each
    candidate trained and validated by `run_rung` exactly as a rung of the new search.
    `which` 1: on the former hidden grid (multiples of 64), as the former code searched;
    2: the same settings on today's hidden grid (to tell the grid's part from the ladder's).
    Returns the ranking, best first; a finished candidate is not redone.
    """
    import shutil

    from slimlm import api
    from slimlm.search import (LADDER_FILE, drop_checkpoints, enumerate_candidates, ladder_steps, plan_ladder,
                               run_rung, write_ranking, write_rung)

    folder, label = SEARCHES[which]
    out = st.out / folder
    c = SearchConfig.make(config, max_width_prune=0.4, max_depth_prune=0.2, max_candidates=None)
    with former_hidden_grid() if which == 1 else nullcontext():
        candidates = enumerate_candidates(st.adapter, c)[:8]
    tokens_per_step = distill_config.global_batch * distill_config.seq_len
    budget_steps = c.search_budget // tokens_per_step
    rungs = plan_ladder(len(candidates), budget_steps, reduction=len(candidates))
    assert len(rungs) == 1, rungs
    record = {"candidates": [{"name": x.name, "params": x.params} for x in candidates],
              "rungs": [asdict(r) for r in rungs], "tokens_per_step": tokens_per_step, "budget_steps": budget_steps,
              "steps_used": ladder_steps(rungs), "search": c.as_dict(), "distill": distill_config.as_dict()}
    record = json.loads(json.dumps(record, default=str))
    if (out / LADDER_FILE).exists() and json.loads((out / LADDER_FILE).read_text()) != record:
        shutil.rmtree(out)  # other settings: start over
    out.mkdir(parents=True, exist_ok=True)
    (out / LADDER_FILE).write_text(json.dumps(record, indent=1))
    sc = Scores.load(scores_path)
    if api.add_block_losses(sc, st.teacher, st.tok, [st.shape.layers - x.shape.layers for x in candidates],
                            importance, progress=False):
        sc.save(scores_path)
    print(f"{label}: {len(candidates)} candidates x {rungs[0].steps} steps "
          f"({rungs[0].steps * tokens_per_step:,} tokens each)", flush=True)
    rows = run_rung(st.teacher, st.tok, sc, candidates, rungs[0], rungs[0].steps, out, data=importance.data,
                    distill=distill_config, progress=False)
    write_rung(out, rungs[0], rows, kept=1)
    write_ranking(out, rows)
    drop_checkpoints(out, [x.name for x in candidates])
    return rows


def search_vs_hand(st: Study) -> None:
    """Group 6: both searches at the same budget, then their winners and the hand-picked shapes
    pruned from the teacher and distilled like every row."""
    from slimlm.search import prune_targets, search

    config, distill_config, importance = search_settings(st)
    scores_path = st.out / "scores.safetensors"  # the study's main scores, which the searches reuse
    if not scores_path.exists():
        st.scores().save(scores_path)
    print(f"{SEARCHES[0][1]}: search_budget {config.search_budget:,} tokens", flush=True)
    new = search("smollm2-135m", st.out / SEARCHES[0][0], config, distill_config, importance, scores=scores_path,
                 loaded=st.teacher, progress=False, overwrite=True)
    winners = [new["winner"]] + [old_search(st, config, distill_config, importance, scores_path, which)[0]
                                 for which in (1, 2)]
    # the searches added contiguous-block losses (depth candidates) to the saved scores: prune with those
    st._scores[("activation", "mean,l2")] = Scores.load(scores_path)
    for (folder, label), best in zip(SEARCHES, winners):
        st.row(GROUP6, f"{label}: winner {best['candidate']}",
               lambda best=best: st.pruned(prune_targets(best, st.shape)), saved=f"{folder}-winner")
    st.row(GROUP6, "hand: hidden 384, ffn 1024, heads 6 (= row 1)", lambda: st.pruned(PruneConfig(**WIDTH)),
           saved="w-act-2")
    for name, t in HAND_SHAPES.items():
        st.row(GROUP6, name, lambda t=t: st.pruned(PruneConfig(**t)), saved=name)


def shown_rows(st: Study) -> list[dict]:
    """The cached rows the tables show: retired groups left out, grouped in group order (stable)."""
    rows = [r for r in st.rows.values() if r["group"] not in RETIRED_GROUPS]
    return sorted(rows, key=lambda r: int(r["group"].split()[0]))


def search_tables(st: Study) -> list[str]:
    """Group 6's accounting and each search's rung rankings, from the search folders."""
    from slimlm.search import LADDER_FILE, ranking_table

    lines = []
    for folder, label in SEARCHES:
        out = st.out / folder
        if not (out / LADDER_FILE).exists():
            continue
        ladder = json.loads((out / LADDER_FILE).read_text())
        per_step = ladder["tokens_per_step"]
        ranked = sorted((out / "rungs").glob("rung-*.json"), key=lambda p: int(p.stem.split("-")[1]))
        rungs = [json.loads(p.read_text()) for p in ranked]
        seconds = {}
        for rung in rungs:  # a candidate's distillation seconds are cumulative over its rungs
            seconds.update({row["candidate"]: row["seconds"] for row in rung["ranking"]})
        plan = " + ".join(f"{r['candidates']} x {r['added']}" for r in ladder["rungs"])
        lines += ["", f"### {label}", "",
                  f"Budget {ladder['budget_steps'] * per_step:,} tokens = {ladder['budget_steps']} optimizer steps of "
                  f"{per_step:,} tokens; spent {plan} = {ladder['steps_used']} steps "
                  f"({ladder['steps_used'] * per_step:,} tokens); {len(ladder['candidates'])} candidates. "
                  f"Distillation time of its candidates (validation included, pruning and checkpoint I/O not): "
                  f"{sum(seconds.values()):.0f} s." + ("" if len(rungs) == len(ladder["rungs"]) else
                                                         f" Rungs done so far: {len(rungs)} of {len(ladder['rungs'])}.")]
        for rung in rungs:
            lines += ["", f"Rung {rung['index']}: {rung['candidates']} candidates at {rung['steps']} steps "
                          f"({rung['steps'] * per_step:,} tokens; {rung['added']} added each), validation KL on the "
                          f"training corpus's held-out windows; {rung['kept']} kept.", ""]
            lines += ranking_table(rung["ranking"], rung["kept"])
    return lines


def write_tables(st: Study) -> None:
    a = st.a
    lines = [f"Machine: {machine()}. Teacher SmolLM2-135M-Instruct (fp32). Distillation: {a.tokens:,} tokens per row, "
             f"sequence {a.seq_len}, batch 16, LR 1e-4 -> 1e-5 cosine, forward KL. WikiText-2: first {a.ppl_tokens:,} tokens. "
             f"HellaSwag: first {a.hellaswag_items} items (one standard error about "
             f"{(0.3 * 0.7 / a.hellaswag_items) ** 0.5:.3f} at acc_norm 0.3; a row measured on fewer items says so). Validation KL: to the original teacher, on Python documentation pages "
             "that no row trains on. Wall time: pruning + training of the row (the first row that needs a set of "
             "importance scores also pays for computing them), at the torch thread count in brackets.", ""]
    group = None
    for r in shown_rows(st):
        if r["group"] != group:
            group = r["group"]
            extra = " Shakespeare ppl |" if group.startswith("5") else ""
            lines += ["", f"### {group}", "", f"| row | parameters | WikiText-2 ppl | HellaSwag acc_norm | val KL |{extra} wall s (threads) |",
                      "|---|---|---|---|---|" + ("---|" if extra else "") + "---|"]
        sh = f" {r['shakespeare_ppl']:.2f} |" if "shakespeare_ppl" in r else ""
        n = r.get("hellaswag_items", legacy_items(a))
        hs = f"{r['hellaswag_acc_norm']:.3f}" + (f" ({n} items)" if n != a.hellaswag_items else "")
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['wikitext_ppl']:.2f} | {hs} | "
                     f"{r['val_kl']:.4f} |{sh} {r['wall_s']:.0f} ({r.get('threads', 1)}) |")
    if any(r["group"] == GROUP6 for r in st.rows.values()):
        lines += ["", "Group 6: every search gets the same budget of distillation tokens (validation not counted); "
                      "each winner is then pruned afresh from the teacher and distilled like every row. The searches' "
                      "budgets, ladders and rung rankings:"]
    lines += search_tables(st)
    (st.out / "fidelity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(st)
    if a.docs is not None:
        update_docs(a.docs, lines, st.out / "fidelity_ppl.png")


BEGIN, END = "<!-- fidelity:begin -->", "<!-- fidelity:end -->"


def update_docs(doc: Path, lines: list[str], png: Path) -> None:
    """Replace the block between the fidelity markers of `doc` with the tables (headings one level
    down) and copy the plot to img/ beside it. Nothing is written when the markers are missing."""
    import shutil

    text = doc.read_text()
    if BEGIN not in text or END not in text:
        print(f"note: {doc} has no {BEGIN} / {END} markers; tables not copied there", flush=True)
        return
    body = [("#" + x) if x.startswith("### ") else x for x in lines]
    head, rest = text.split(BEGIN, 1)
    new = head + BEGIN + "\n" + "\n".join(body) + "\n" + END + rest.split(END, 1)[1]
    tmp = doc.with_suffix(".tmp")
    tmp.write_text(new)
    tmp.replace(doc)
    (doc.parent / "img").mkdir(exist_ok=True)
    shutil.copyfile(png, doc.parent / "img" / png.name)
    print(f"tables written into {doc} and {png.name} copied to {doc.parent / 'img'}", flush=True)


def plot(st: Study) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in shown_rows(st) if not r["group"].startswith("0")]
    fig, ax = plt.subplots(figsize=(11, 0.35 * len(rows) + 1))
    names = [f"{r['group']}: {r['name']}" for r in rows]
    ax.barh(range(len(rows)), [r["wikitext_ppl"] for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("WikiText-2 perplexity (log scale, lower is better)")
    teacher = next(r for r in st.rows.values() if r["group"].startswith("0"))
    ax.axvline(teacher["wikitext_ppl"], color="k", ls="--", lw=1, label="teacher")
    ax.legend()
    fig.tight_layout()
    fig.savefig(st.out / "fidelity_ppl.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
