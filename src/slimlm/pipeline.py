"""`slimlm run`: the whole recipe in one resumable command.

    teacher correction (optional) -> importance -> teacher logits (optional) -> prune | search -> distill
    -> align (optional) -> eval -> report

The pipeline is the table `STAGES`: each stage has a name, the recipe settings that form its
fingerprint, and a function of (recipe, run folder).  `run` walks the table.  Every stage writes
into the one run folder and records itself in ``stages.json`` with its fingerprint, which also
covers every stage before it; rerunning skips finished stages whose settings did not change, and
`from_stage` redoes that stage and everything after it.  Evaluation results go to the models
they describe (``pruned/eval.json``, ``student/eval.json``, ... and their model cards; the
teacher's to ``eval/teacher/``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ._io import atomic_write_json, atomic_write_text
from .config import DistillConfig, flag_of
from .errors import SlimlmError
from .recipe import Recipe, load_recipe


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunState:
    """The run folder's ``stages.json``: which stages finished, with which settings."""

    def __init__(self, root: Path):
        self.root = root
        self.path = root / "stages.json"
        self.done: dict = json.loads(self.path.read_text()) if self.path.exists() else {}

    def finished(self, stage: str, fp: str) -> bool:
        return self.done.get(stage, {}).get("fingerprint") == fp

    def mark(self, stage: str, fp: str, summary: dict) -> None:
        self.done[stage] = {"fingerprint": fp, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **summary}
        atomic_write_json(self.path, self.done)

    def forget_from(self, stage: str) -> None:
        names = [s.name for s in STAGES]
        for s in names[names.index(stage):]:
            self.done.pop(s, None)
        atomic_write_json(self.path, self.done)


class RunFolder:
    """The run folder and what the stages share: paths, the log, the teacher loaded once."""

    def __init__(self, root: Path, recipe: Recipe, progress: bool):
        self.root, self.recipe, self.progress = root, recipe, progress
        self.teacher = recipe.teacher  # the corrected teacher replaces it after the correct stage
        self.scores = root / "scores.safetensors"
        self.corrected, self.pruned = root / "teacher-corrected", root / "pruned"
        self.student, self.aligned = root / "student", root / "aligned"
        self.teacher_logits = root / "teacher-logits"
        self._teacher_model = None
        self._log = root / "run.log"

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)
        with open(self._log, "a") as f:
            f.write(line + "\n")

    def teacher_model(self):
        """The teacher in memory (loaded on first use, shared by importance, search and distill)."""
        if self._teacher_model is None:
            from .models import load_model

            self._teacher_model = load_model(self.teacher, dtype=self.recipe.run.dtype)
        return self._teacher_model

    def release_teacher(self) -> None:
        self._teacher_model = None


# ---- the stages -----------------------------------------------------------------------------------


def correct_stage(r: Recipe, run: RunFolder) -> dict:
    c = r.correct_teacher
    run.log(f"stage correct: LM-loss fine-tuning of the teacher on {c.tokens:,} tokens")
    res = train(r, "correct", None, run.teacher, run.corrected, c, progress=run.progress)
    return {"metrics": res.metrics}


def importance_stage(r: Recipe, run: RunFolder) -> dict:
    from . import api
    from .adapters import get_adapter

    model = run.teacher_model()
    layers = get_adapter(model).shape().layers
    k = layers - r.prune.layers if r.mode == "prune" and r.prune.layers else 0
    blocks = (k,) if k and r.prune.depth_metric == "block" else ()
    depth_loss = r.importance.depth_loss if r.importance.depth_loss is not None else (
        bool(k) and r.prune.depth_metric == "loss")
    run.log("stage importance: one hooked forward pass over the calibration windows")
    scores = api.importance(run.teacher, run.scores, r.importance, depth_loss=depth_loss, block_sizes=blocks,
                            overwrite=True, progress=run.progress, loaded=model)
    return {"depth_metrics": sorted(scores.depth_scores)}


def teacher_logits_stage(r: Recipe, run: RunFolder) -> dict:
    """The teacher's top-K over the distill stage's windows and the search's, written once (`slimlm teacher-logits`)."""
    from .distill.teacher_logits import write_cache

    c = teacher_logits_config(r)
    run.log(f"stage teacher_logits: the teacher's top-{c.top_k} over {c.tokens:,} tokens of distillation windows")
    summary = write_cache(run.teacher, run.teacher_logits, c, replace=True, progress=run.progress,
                          loaded=run.teacher_model())
    return {k: summary[k] for k in ("windows", "tokens", "top_k", "bytes", "bytes_per_token")}


def teacher_logits_config(r: Recipe):
    """The cache's settings: K and batch sizes from the recipe's section, the windows those of the distill section,
    for its budget or the search's, whichever is larger (one cache covers both: see `CacheStream`)."""
    d = r.distill
    tokens = d.tokens
    if r.mode == "search":
        from .adapters import get_adapter
        from .models import load_config
        from .search import search_tokens

        tokens = max(tokens, search_tokens(get_adapter(load_config(r.teacher)), r.search, d))
    return r.teacher_logits.make(r.teacher_logits, data_weights=d.data_weights, eval_data=d.eval_data, tokens=tokens,
                                 seq_len=d.seq_len, global_batch=d.global_batch, heldout=d.heldout,
                                 token_cache=d.token_cache)


def distill_settings(r: Recipe, run: RunFolder) -> DistillConfig:
    """The distill section, reading the run's teacher-logits cache when the recipe writes one."""
    if r.uses_teacher_logits:
        return r.distill.make(r.distill, teacher_logits=str(run.teacher_logits))
    return r.distill


def prune_stage(r: Recipe, run: RunFolder) -> dict:
    from . import api

    if r.mode == "prune":
        run.log("stage prune")
        summary = api.prune(run.teacher, run.pruned, r.prune, r.importance, scores=run.scores, overwrite=True,
                            progress=run.progress)
    else:
        summary = _search_and_prune(r, run)
    return {"shape": summary.get("shape"), "parameters_after": summary.get("parameters_after")}


def _search_and_prune(r: Recipe, run: RunFolder) -> dict:
    from . import api
    from .adapters import get_adapter
    from .search import prune_targets, search

    s = r.search
    run.log(f"stage search: successive halving over {s.search_budget:,} distillation tokens")
    # A search folder left by a recipe with other settings is cleared; one with the same settings is continued.
    result = search(run.teacher, run.root / "search", s, distill_settings(r, run), r.importance, scores=run.scores,
                    loaded=run.teacher_model(), progress=run.progress, overwrite=True)
    targets = prune_targets(result["winner"], get_adapter(run.teacher_model()).shape())
    return api.prune(run.teacher, run.pruned, targets, r.importance, scores=run.scores, overwrite=True,
                     progress=run.progress)


def distill_stage(r: Recipe, run: RunFolder) -> dict:
    d = distill_settings(r, run)
    source = f" from the teacher's top-{r.teacher_logits.top_k} in {run.teacher_logits}" if d.teacher_logits else ""
    run.log(f"stage distill: {d.tokens:,} tokens of forward-KL distillation{source}")
    teacher = run._teacher_model if run._teacher_model is not None else run.teacher
    if d.teacher_logits:  # named, to be checked against the cache; never loaded
        teacher = run.teacher
    res = train(r, "distill", teacher, str(run.pruned), run.student, d, progress=run.progress)
    run.release_teacher()
    return {"metrics": res.metrics, "tokens": res.tokens}


def align_stage(r: Recipe, run: RunFolder) -> dict:
    from .align import align
    from .training import resumable

    a = r.align
    run.log(f"stage align: SFT on {a.sft}" + (f", then DPO on {a.prefs}" if a.prefs else ""))
    can_resume = resumable(run.aligned)
    res = align(str(run.student), out=run.aligned, config=a, chat_template_from=run.teacher, resume=can_resume,
                overwrite=not can_resume, progress=run.progress)
    return {"stages": res.stages}


def eval_stage(r: Recipe, run: RunFolder) -> dict:
    from .card import write_model_card
    from .evaluate import evaluate, save_results

    roles = _eval_roles(r, run)
    run.log("stage eval: " + ", ".join(name for name, _, _ in roles) + ", measured the same way")
    import shutil

    shutil.rmtree(run.root / "eval", ignore_errors=True)  # results of an earlier layout or of a stage now gone
    for name, spec, folder in roles:
        result = evaluate(spec, config=r.eval, save=False, progress=run.progress)
        result["role"] = name
        folder.mkdir(parents=True, exist_ok=True)
        save_results(result, folder)
        if (folder / "slimlm.json").exists():
            write_model_card(folder)  # the card shows what was just measured
    return {}


def _eval_roles(r: Recipe, run: RunFolder) -> list[tuple[str, str, Path]]:
    """(role, model, folder for its eval.json): the teacher's results go to eval/teacher, not its own folder."""
    roles = [("teacher", run.teacher, run.root / "eval" / "teacher"), ("pruned", str(run.pruned), run.pruned),
             ("student", str(run.student), run.student)]
    if r.aligns:
        roles.append(("aligned", str(run.aligned), run.aligned))
    return roles


def report_stage(r: Recipe, run: RunFolder) -> dict:
    from .evaluate.report import write_report

    run.log("stage report")
    write_report(run.root, run.root / "report")
    return {}


@dataclass(frozen=True)
class Stage:
    """One step of `slimlm run`: `inputs(recipe)` are the settings its fingerprint covers."""

    name: str
    inputs: Callable[[Recipe], object]
    run: Callable[[Recipe, RunFolder], dict]
    enabled: Callable[[Recipe], bool] = lambda r: True


STAGES: tuple[Stage, ...] = (
    Stage("correct", lambda r: r.correct_teacher.as_dict(), correct_stage, lambda r: r.corrects_teacher),
    Stage("importance", lambda r: [r.importance.as_dict(), r.prune.layers, r.prune.depth_metric], importance_stage),
    Stage("teacher_logits", lambda r: [teacher_logits_inputs(r)], teacher_logits_stage,
          lambda r: r.uses_teacher_logits),
    Stage("prune", lambda r: [r.mode, r.prune.as_dict() if r.mode == "prune" else [r.search.as_dict(),
                                                                                     r.distill.as_dict()]], prune_stage),
    Stage("distill", lambda r: r.distill.as_dict(), distill_stage),
    Stage("align", lambda r: r.align.as_dict(), align_stage, lambda r: r.aligns),
    Stage("eval", lambda r: r.eval.as_dict(), eval_stage),
    Stage("report", lambda r: r.report.as_dict(), report_stage, lambda r: r.report.enabled),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def teacher_logits_inputs(r: Recipe) -> list:
    """What the teacher_logits stage's cache depends on: its section and the distill settings that place windows
    (no model is loaded: the search's share is covered by the search settings themselves)."""
    d = r.distill
    return [r.teacher_logits.as_dict(), d.data_weights, d.eval_data, d.tokens, d.seq_len, d.global_batch, d.heldout,
            d.micro_batch, d.token_cache, r.mode, r.search.as_dict() if r.mode == "search" else None]


def fingerprints(r: Recipe) -> dict[str, str]:
    """Each stage's fingerprint: its own settings, the shared ones and every earlier stage's."""
    fps, previous = {}, _fingerprint(r.run.as_dict())
    for stage in STAGES:
        previous = fps[stage.name] = _fingerprint(previous, stage.enabled(r), stage.inputs(r))
    return fps


def validate_recipe_inputs(r: Recipe) -> None:
    """Checks that need the teacher's config or data; still before any heavy work or any output."""
    from .adapters import get_adapter
    from .data import check_source
    from .models import load_config
    from .plan import target_shape, validate_targets

    config = load_config(r.teacher)
    adapter = get_adapter(config)
    shape = adapter.shape()
    check_source(r.run.data, r.run.text_field)
    if r.mode == "prune":
        validate_targets(r.prune, shape)
        adapter.validate_shape(target_shape(r.prune, shape))
    limit = getattr(config, "max_position_embeddings", None)
    if r.aligns:
        from .chat import read_conversations, read_preferences, template_text
        from .models import load_tokenizer

        read_conversations(r.align.sft)
        if r.align.prefs:
            read_preferences(r.align.prefs)
        if template_text(load_tokenizer(r.teacher)) is None:
            raise SlimlmError("the align stage needs a chat template, and the teacher has none")
    sections = ["importance", "distill", "eval"] + (["correct_teacher"] if r.corrects_teacher else []) + (
        ["align"] if r.aligns else [])
    for section in sections:
        seq_len = getattr(r, section).seq_len
        if limit and seq_len and seq_len > limit:
            raise SlimlmError(f"{section}.seq_len {seq_len} is past the teacher's limit of {limit} positions")
    if r.eval.ppl is not None:
        check_source(r.eval.ppl, r.eval.text_field)
    if r.uses_teacher_logits:
        from .distill.trainer import check_settings, check_teacher_logits_settings

        check_teacher_logits_settings(r.distill, *check_settings(r.distill))
    from .distill.tokens import usable_token_cache

    usable_token_cache()  # the distill stage (and teacher correction) tokenize into it


# What a run writes into its folder.
RUN_OUTPUTS = ("recipe.yaml", "recipe.resolved.json", "stages.json", "run.log", "teacher-corrected", "scores.safetensors",
               "teacher-logits", "pruned", "search", "student", "aligned", "eval", "report")


def _is_run_folder(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("stages.json", "recipe.yaml", "recipe.resolved.json"))


def check_run_folder(root: Path, r: Recipe) -> None:
    """The run folder: new, empty, or an earlier run's (which resumes); never a folder that holds
    something else, nor one whose stage outputs are (or hold) the recipe's inputs.  Probed writable."""
    from ._io import check_not_an_input, probe_writable

    data = r.run.data
    inputs = [r.teacher, r.eval.ppl, r.align.sft, r.align.prefs,
              *(list(data) if isinstance(data, (list, tuple, dict)) else [data])]
    for name in RUN_OUTPUTS:  # the stages replace these
        check_not_an_input(root / name, inputs)
    if root.exists():
        if not root.is_dir():
            raise SlimlmError(f"the run folder {root} is a file; choose another --output")
        if any(root.iterdir()) and not _is_run_folder(root):
            raise SlimlmError(f"{root} exists and is not a slimlm run folder; choose another --output")
    probe_writable(root, what="run folder")


def run(recipe: str | Path | Recipe | None = None, out: str | Path | None = None, *, from_stage: str | None = None,
        progress: bool = True) -> dict:
    """Run (or resume) a recipe (a YAML path, a `Recipe`, or None for the embedded default) into the run folder
    `out` (default runs/<recipe name>); returns the before/after summary."""
    if isinstance(recipe, Recipe):
        r, text, stem = recipe, None, "recipe"
    else:
        r, text = load_recipe(recipe)
        stem = Path(recipe).stem if recipe is not None else "default"
    if from_stage is not None and from_stage not in STAGE_NAMES:
        raise SlimlmError(f"--from expects one of {', '.join(STAGE_NAMES)}, got '{from_stage}'")
    root = Path(out if out is not None else Path("runs") / stem).expanduser()
    check_run_folder(root, r)
    validate_recipe_inputs(r)
    # Everything is checked: only now does the run folder appear.  A failure before the first
    # stage starts removes a folder this call made, so the corrected rerun starts clean.
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        if text is not None:
            atomic_write_text(root / "recipe.yaml", text)
        atomic_write_json(root / "recipe.resolved.json", r.to_dict())
        state = RunState(root)
        if from_stage:
            state.forget_from(from_stage)
        fps = fingerprints(r)
        for stage in STAGES:  # a changed stage invalidates everything after it
            if stage.name in state.done and not state.finished(stage.name, fps[stage.name]):
                state.forget_from(stage.name)
                break
        folder = RunFolder(root, r, progress)
    except BaseException:
        if created:
            shutil.rmtree(root, ignore_errors=True)
        raise
    for stage in STAGES:
        if stage.enabled(r):
            if not state.finished(stage.name, fps[stage.name]):
                state.mark(stage.name, fps[stage.name], stage.run(r, folder))
        elif not state.finished(stage.name, fps[stage.name]):
            state.mark(stage.name, fps[stage.name], {"skipped": True})
        if stage.name == "correct" and r.corrects_teacher:
            folder.teacher = str(folder.corrected)
    report = str(root / "report" / "report.html") if r.report.enabled else None
    return summarize(root, r, report)


def summarize(root: Path, r: Recipe, report: str | None) -> dict:
    """The before/after results (teacher, pruned, student, aligned) as the eval stage saved them."""
    from .evaluate import load_results

    folder = RunFolder(root, r, progress=False)
    results = []
    for name, _, where in _eval_roles(r, folder):
        res = load_results(where) or {"model": name}
        res["role"] = name
        results.append(res)
    rows = [{"model": res["role"], "parameters": res.get("parameters"), "ppl": (res.get("perplexity") or {}).get("ppl"),
             "prefill_tok_s": (res.get("speed") or {}).get("prefill_tokens_per_s"),
             "decode_tok_s": (res.get("speed") or {}).get("decode_tokens_per_s")} for res in results]
    out = {"run": str(root), "results": results, "rows": rows, "report": report, "student": str(folder.student)}
    if (folder.aligned / "slimlm.json").exists():
        out["aligned"] = str(folder.aligned)
    return out


# ---- training stages: here, or under `accelerate launch` on several GPUs --------------------------


def launch_command(config_file: str, teacher, student: str, out, config: DistillConfig, *, resume: bool = False,
                   overwrite: bool = False) -> list[str]:
    """The `accelerate launch ... -m slimlm distill|correct-teacher` command line for one training stage.

    Every setting of `config` that differs from its default becomes the flag declared for it.
    """
    from .config import CorrectConfig

    lm = isinstance(config, CorrectConfig)
    cmd = ["accelerate", "launch", "--config_file", str(config_file), "-m", "slimlm"]
    cmd += ["correct-teacher", str(student)] if lm else ["distill", "--teacher", str(teacher), "--student", str(student)]
    cmd += ["--out", str(out), "--quiet"]
    defaults = type(config)()
    for f in type(config).settings(where="cli"):
        value = getattr(config, f.name)
        if value == getattr(defaults, f.name) or value is None:
            continue
        flag = flag_of(f)
        pos, _, neg = (f.metadata.get("flag") or "").partition("/")
        if isinstance(value, bool):
            cmd += [flag] if value else [neg or f"--no-{flag[2:]}"]
        elif f.name == "data":
            sources = value if isinstance(value, (list, tuple, dict)) else [value]
            for source in sources:
                cmd += ["--data", str(source)]
            if isinstance(value, dict):
                cmd += ["--data-weights", ",".join(str(w) for w in value.values())]
        elif isinstance(value, (list, tuple)):
            cmd += [flag, ",".join(str(v) for v in value)]
        else:
            cmd += [flag, str(value)]
    cmd += ["--resume"] if resume else (["--overwrite"] if overwrite else [])
    return cmd


def train(r: Recipe, what: str, teacher, student, out: Path, config: DistillConfig, *, progress: bool = True):
    """distill() / correct_teacher() in this process, or under `accelerate launch` when the recipe names an
    Accelerate config and this machine has several GPUs (FSDP2 / ZeRO-3 need one process per GPU; the
    other stages run once, here).  An interrupted run in `out` continues where it stopped."""
    import torch

    from .distill import DistillResult, correct_teacher, distill
    from .training import resumable

    resume = resumable(out)
    accel = r.run.accelerate_config
    if not (accel and torch.cuda.device_count() > 1):
        if what == "correct":
            return correct_teacher(student, out, config, resume=resume, overwrite=not resume, progress=progress)
        return distill(teacher, student, out=out, config=config, resume=resume, overwrite=not resume,
                       progress=progress)
    import subprocess

    if not isinstance(teacher, (str, type(None))):
        teacher = r.teacher if not (Path(out).parent / "teacher-corrected").exists() else str(Path(out).parent / "teacher-corrected")
    cmd = launch_command(accel, teacher, student, out, config, resume=resume, overwrite=not resume)
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    prov = json.loads((Path(out) / "slimlm.json").read_text())
    return DistillResult(out=str(out), mode="lm" if what == "correct" else "kd", steps=prov.get("steps", 0),
                         tokens=prov.get("tokens", 0), complete=True, metrics=prov.get("final_metrics") or {})


