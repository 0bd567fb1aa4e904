"""`slimlm run`: the whole recipe in one resumable command.

    teacher correction (optional) -> importance -> prune | search -> distill -> align (optional) -> eval -> report

Every stage writes into one run folder and records itself in ``stages.json`` with a
fingerprint of its settings.  Rerunning skips finished stages whose settings did not
change; `from_stage` redoes that stage and everything after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from ._io import atomic_write_json, atomic_write_text
from .errors import SlimlmError

STAGES = ("correct", "importance", "prune", "distill", "align", "eval", "report")


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
        for s in STAGES[STAGES.index(stage) :]:
            self.done.pop(s, None)
        atomic_write_json(self.path, self.done)


def stage_settings(r: dict) -> dict:
    """The settings each stage depends on (its own and everything upstream)."""
    common = {k: r[k] for k in ("teacher", "data", "text_field", "seed", "dtype")}
    s = {"correct": [common, r["correct_teacher"]]}
    s["importance"] = s["correct"] + [r["importance"], r["prune"].get("layers"), r["prune"].get("depth_metric")]
    s["prune"] = s["importance"] + [r["mode"], r["prune"] if r["mode"] == "prune" else r["search"], r["distill"] if r["mode"] == "search" else None]
    s["distill"] = s["prune"] + [r["distill"]]
    s["align"] = s["distill"] + [r["align"]]
    s["eval"] = s["align"] + [r["eval"]]
    s["report"] = s["eval"] + [r["report"]]
    return {k: _fingerprint(v) for k, v in s.items()}


def validate_recipe_inputs(r: dict) -> None:
    """Checks that need the teacher's config or data; still before any heavy work."""
    from .adapters import get_adapter
    from .data import check_source
    from .models import load_config
    from .plan import Targets, target_shape, validate_targets

    config = load_config(r["teacher"])
    adapter = get_adapter(config)
    shape = adapter.shape()
    check_source(r["data"], r["text_field"])
    if r["mode"] == "prune":
        p = r["prune"]
        t = Targets(p["hidden"], p["ffn"], p["heads"], p["kv_heads"], p["layers"], p["drop_layers"], p["depth_metric"])
        validate_targets(t, shape)
        adapter.validate_shape(target_shape(t, shape))
    limit = getattr(config, "max_position_embeddings", None)
    if r["align"]["sft"]:
        from .chat import read_conversations, read_preferences, template_text
        from .models import load_tokenizer

        read_conversations(r["align"]["sft"])
        if r["align"]["prefs"]:
            read_preferences(r["align"]["prefs"])
        if template_text(load_tokenizer(r["teacher"])) is None:
            raise SlimlmError("the align stage needs a chat template, and the teacher has none")
    for section in ("importance", "distill", "correct_teacher", "eval", "align"):
        if limit and r[section].get("seq_len") and r[section]["seq_len"] > limit:
            raise SlimlmError(f"{section}.seq_len {r[section]['seq_len']} is past the teacher's limit of {limit} positions")
    if r["eval"]["ppl"] is not None:
        check_source(r["eval"]["ppl"], r["text_field"])
    from .distill.tokens import usable_token_cache

    usable_token_cache()  # the distill stage (and teacher correction) tokenize into it


# What a run writes into its folder.
RUN_OUTPUTS = ("recipe.yaml", "recipe.resolved.json", "stages.json", "run.log", "teacher-corrected", "scores.safetensors",
               "pruned", "search", "student", "aligned", "eval", "report")


def _is_run_folder(folder: Path) -> bool:
    return any((folder / name).exists() for name in ("stages.json", "recipe.yaml", "recipe.resolved.json"))


def check_run_folder(out: str | Path, recipe: dict) -> Path:
    """The run folder: new, empty, or an earlier run's (which resumes); never a folder that holds
    something else, nor one above the recipe's inputs.  Checked writable before any work."""
    from ._io import check_not_an_input, probe_writable

    root = Path(out).expanduser()
    data = recipe.get("data")
    inputs = [recipe.get("teacher"), recipe["eval"].get("ppl"), recipe["align"].get("sft"),
              recipe["align"].get("prefs"), *(data if isinstance(data, list) else [data])]
    for name in RUN_OUTPUTS:  # the stages replace these: none may be (or hold) an input
        check_not_an_input(root / name, inputs)
    if root.exists():
        if not root.is_dir():
            raise SlimlmError(f"the run folder {root} is a file; choose another --output")
        if any(root.iterdir()) and not _is_run_folder(root):
            raise SlimlmError(f"{root} exists and is not a slimlm run folder; choose another --output")
    probe_writable(root, what="run folder")
    return root


def run(recipe: dict, recipe_text: str, out: str | Path, *, from_stage: str | None = None, progress: bool = True) -> dict:
    """Run (or resume) a recipe into the run folder `out`; returns the before/after summary."""
    from .models import load_tokenizer

    if from_stage is not None and from_stage not in STAGES:
        raise SlimlmError(f"--from expects one of {', '.join(STAGES)}, got '{from_stage}'")
    root = check_run_folder(out, recipe)
    validate_recipe_inputs(recipe)
    # Everything is checked: only now does the run folder appear.  A failure before the first
    # stage starts removes a folder this call made, so the corrected rerun starts clean.
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / "recipe.yaml", recipe_text)
        atomic_write_json(root / "recipe.resolved.json", recipe)
        state = RunState(root)
        if from_stage:
            state.forget_from(from_stage)
        fps = stage_settings(recipe)
        # A changed stage invalidates everything after it.
        for i, stage in enumerate(STAGES):
            if stage in state.done and not state.finished(stage, fps[stage]):
                state.forget_from(stage)
                break
        r = recipe
        teacher = r["teacher"]
        tokenizer = load_tokenizer(teacher)
    except BaseException:
        if created:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
        raise
    log = _Log(root)

    # 1. teacher correction ------------------------------------------------------------
    corrected = root / "teacher-corrected"
    if r["correct_teacher"]["tokens"] > 0:
        if not state.finished("correct", fps["correct"]):
            c = r["correct_teacher"]
            log(f"stage correct: LM-loss fine-tuning of the teacher on {c['tokens']:,} tokens")
            res = _train(r, None, teacher, r["data"], out=corrected, tokens=c["tokens"], seq_len=c["seq_len"],
                         micro_batch=c["micro_batch"], global_batch=c["global_batch"], lr=c["lr"], min_lr=c["lr"] / 10,
                         warmup=c["warmup"], seed=r["seed"], mode="lm", dtype=r["dtype"], text_field=r["text_field"],
                         overwrite=True, progress=progress)
            state.mark("correct", fps["correct"], {"metrics": res.metrics})
        teacher = str(corrected)
    else:
        state.mark("correct", fps["correct"], {"skipped": True}) if not state.finished("correct", fps["correct"]) else None

    # 2. importance ---------------------------------------------------------------------
    from . import api
    from .adapters import get_adapter
    from .models import load_model

    scores_path = root / "scores.safetensors"
    teacher_model = None
    if not state.finished("importance", fps["importance"]):
        imp = r["importance"]
        teacher_model = load_model(teacher, dtype=r["dtype"])
        shape = get_adapter(teacher_model).shape()
        k = shape.layers - r["prune"]["layers"] if r["mode"] == "prune" and r["prune"]["layers"] else 0
        blocks = (k,) if k and r["prune"]["depth_metric"] == "block" else ()
        log("stage importance: one hooked forward pass over the calibration windows")
        scores = api.importance(teacher, scores_path, data=r["data"], text_field=r["text_field"],
                                calib_samples=imp["calib_samples"], seq_len=imp["seq_len"], heldout=imp["heldout"],
                                batch_size=imp["batch_size"], importance_kind=imp["kind"], aggregation=imp["aggregation"],
                                depth_loss=imp["depth_loss"] or (bool(k) and r["prune"]["depth_metric"] == "loss"),
                                block_sizes=blocks, seed=r["seed"], overwrite=True, progress=progress, loaded=teacher_model)
        state.mark("importance", fps["importance"], {"depth_metrics": sorted(scores.depth_scores)})

    # 3. prune or search ------------------------------------------------------------------
    pruned = root / "pruned"
    if not state.finished("prune", fps["prune"]):
        if r["mode"] == "prune":
            p = r["prune"]
            log("stage prune")
            summary = api.prune(teacher, pruned, scores=scores_path, data=r["data"], text_field=r["text_field"],
                                hidden=p["hidden"], ffn=p["ffn"], heads=p["heads"], kv_heads=p["kv_heads"],
                                layers=p["layers"], drop_layers=p["drop_layers"], depth_metric=p["depth_metric"],
                                seed=r["seed"], dtype=r["dtype"], overwrite=True, progress=progress)
        else:
            summary = _search_stage(r, teacher, teacher_model, tokenizer, scores_path, root, pruned, log, progress)
        state.mark("prune", fps["prune"], {"shape": summary.get("shape"), "parameters_after": summary.get("parameters_after")})

    # 4. distill ----------------------------------------------------------------------------
    student = root / "student"
    if not state.finished("distill", fps["distill"]):
        d = r["distill"]
        ckpts = student / "run" / "checkpoints"
        can_resume = ckpts.is_dir() and any(ckpts.iterdir())  # an interrupted distillation continues
        log(f"stage distill: {d['tokens']:,} tokens of forward-KL distillation")
        res = _train(r, teacher_model if teacher_model is not None else teacher, str(pruned), r["data"], out=student,
                      tokens=d["tokens"], seq_len=d["seq_len"], micro_batch=d["micro_batch"], global_batch=d["global_batch"],
                      lr=d["lr"], min_lr=d["min_lr"], warmup=d["warmup"], loss=d["loss"], temperature=d["temperature"],
                      ce_weight=d["ce_weight"], hidden_loss=d["hidden_loss"], eval_every=d["eval_every"],
                      save_every=d["save_every"], heldout=d["heldout"], seed=r["seed"], dtype=r["dtype"],
                      text_field=r["text_field"], resume=can_resume, overwrite=not can_resume, progress=progress)
        state.mark("distill", fps["distill"], {"metrics": res.metrics, "tokens": res.tokens})
    del teacher_model

    # 5. align (optional) -----------------------------------------------------------------------
    aligned = root / "aligned"
    if r["align"]["sft"] and not state.finished("align", fps["align"]):
        from .align import align
        from .align.trainer import _last_checkpoint

        a = r["align"]
        can_resume = not (aligned / "slimlm.json").exists() and (
            (aligned / "run" / "sft" / "done.json").exists() or _last_checkpoint(aligned / "run" / "sft") is not None)
        log(f"stage align: SFT on {a['sft']}" + (f", then DPO on {a['prefs']}" if a["prefs"] else ""))
        res = align(str(student), a["sft"], aligned, a["prefs"], tokens=a["tokens"], seq_len=a["seq_len"],
                    micro_batch=a["micro_batch"], global_batch=a["global_batch"], lr=a["lr"], beta=a["beta"],
                    seed=r["seed"], dtype=r["dtype"], chat_template_from=teacher, resume=can_resume,
                    overwrite=not can_resume, progress=progress)
        state.mark("align", fps["align"], {"stages": res.stages})

    # 6. eval -------------------------------------------------------------------------------
    if not state.finished("eval", fps["eval"]):
        from .evaluate import evaluate, save_results

        e = r["eval"]
        log("stage eval: teacher, pruned (zero-shot) and distilled student" + (" and aligned student" if r["align"]["sft"] else "")
            + ", measured the same way")
        roles = [("teacher", teacher), ("pruned", str(pruned)), ("student", str(student))]
        if r["align"]["sft"]:
            roles.append(("aligned", str(aligned)))
        else:  # results of an align stage the recipe no longer has
            import shutil

            shutil.rmtree(root / "eval" / "aligned", ignore_errors=True)
        for name, spec in roles:
            result = evaluate(spec, ppl=e["ppl"], seq_len=e["seq_len"], max_tokens=e["ppl_tokens"], text_field=r["text_field"],
                              tasks=e["tasks"], task_data=e["task_data"], limit=e["limit"], speed=e["speed"],
                              prompt_len=e["prompt_len"], new_tokens=e["new_tokens"], dtype=r["dtype"], progress=progress)
            result["role"] = name
            (root / "eval" / name).mkdir(parents=True, exist_ok=True)
            save_results(result, root / "eval" / name)
        state.mark("eval", fps["eval"], {})

    # 7. report -----------------------------------------------------------------------------
    report = None
    if r["report"]["enabled"]:
        if not state.finished("report", fps["report"]):
            from .evaluate.report import write_report

            log("stage report")
            write_report(root, root / "report")
            state.mark("report", fps["report"], {})
        report = str(root / "report" / "report.html")
    return summarize(root, report)


def launch_command(config_file: str, teacher, student: str, data, out, **kw) -> list[str]:
    """The `accelerate launch ... -m slimlm distill` command line for a distill() call."""
    cmd = ["accelerate", "launch", "--config_file", str(config_file), "-m", "slimlm", "distill"]
    if teacher is not None:
        cmd += ["--teacher", str(teacher)]
    cmd += ["--student", str(student), "--out", str(out), "--quiet"]
    if isinstance(data, dict):  # a weighted mixture
        for source in data:
            cmd += ["--data", str(source)]
        cmd += ["--data-weights", ",".join(str(w) for w in data.values())]
    elif data is not None:
        for source in [data] if isinstance(data, (str, os.PathLike)) else data:
            cmd += ["--data", str(source)]
    for key, value in kw.items():
        if key == "progress" or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    return cmd


def _train(r: dict, teacher, student, data, *, out, **kw):
    """distill() in this process, or under `accelerate launch` when the recipe names an
    Accelerate config and this machine has several GPUs (FSDP2 / ZeRO-3 need one process
    per GPU; the other stages run once, here)."""
    import torch

    from .distill import DistillResult, distill

    config = r.get("accelerate_config")
    if not (config and torch.cuda.device_count() > 1):
        return distill(teacher, student, data, out=out, **kw)
    import subprocess

    if not isinstance(teacher, (str, type(None))):
        teacher = r["teacher"] if not (Path(out).parent / "teacher-corrected").exists() else str(Path(out).parent / "teacher-corrected")
    cmd = launch_command(config, teacher, student, data, out, **kw)
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    prov = json.loads((Path(out) / "slimlm.json").read_text())
    return DistillResult(out=str(out), mode=kw.get("mode", "kd"), steps=prov.get("steps", 0), tokens=prov.get("tokens", 0),
                         complete=True, metrics=prov.get("final_metrics") or {})


def _search_stage(r, teacher, teacher_model, tokenizer, scores_path, root, pruned, log, progress) -> dict:
    from . import api
    from .adapters import get_adapter
    from .importance import Scores
    from .models import load_model
    from .search import enumerate_candidates, search

    s, d = r["search"], r["distill"]
    model = teacher_model if teacher_model is not None else load_model(teacher, dtype=r["dtype"])
    cands = enumerate_candidates(get_adapter(model), int(s["target_params"]), tolerance=s["tolerance"],
                                 max_width_prune=s["max_width_prune"], max_depth_prune=s["max_depth_prune"],
                                 hidden_step=s["hidden_step"], ffn_step=s["ffn_step"], max_candidates=s["max_candidates"],
                                 prune_heads=s["prune_heads"])
    log(f"stage search: {len(cands)} candidates, {s['search_tokens']:,} distillation tokens each")
    kwargs = dict(seq_len=d["seq_len"], micro_batch=d["micro_batch"], global_batch=d["global_batch"], lr=d["lr"],
                  min_lr=d["min_lr"], warmup=d["warmup"], loss=d["loss"], seed=r["seed"], dtype=r["dtype"],
                  text_field=r["text_field"], heldout=d["heldout"])
    results, _ = search(model, tokenizer, Scores.load(scores_path), scores_path, cands, root / "search", data=r["data"],
                        search_tokens=s["search_tokens"], distill_kwargs=kwargs,
                        calibration=dict(seed=r["seed"], text_field=r["text_field"]), progress=progress)
    best = results[0]
    return api.prune(teacher, pruned, scores=scores_path, hidden=best["hidden"], ffn=best["ffn"], heads=best["heads"],
                     layers=best["layers"], depth_metric="block", seed=r["seed"], dtype=r["dtype"], overwrite=True,
                     progress=progress, data=r["data"], text_field=r["text_field"])


def summarize(root: Path, report: str | None) -> dict:
    """The before/after rows (teacher, pruned, student) from the run's eval results."""
    from .evaluate import load_results

    rows = []
    names = ["teacher", "pruned", "student"] + (["aligned"] if (root / "eval" / "aligned").is_dir() else [])
    for name in names:
        res = load_results(root / "eval" / name) or {}
        ppl = (res.get("perplexity") or {}).get("ppl")
        speed = res.get("speed") or {}
        rows.append({"model": name, "parameters": res.get("parameters"), "ppl": ppl,
                     "prefill_tok_s": speed.get("prefill_tokens_per_s"), "decode_tok_s": speed.get("decode_tokens_per_s")})
    out = {"run": str(root), "rows": rows, "report": report, "student": str(root / "student")}
    if (root / "aligned" / "slimlm.json").exists():
        out["aligned"] = str(root / "aligned")
    return out


class _Log:
    def __init__(self, root: Path):
        self.path = root / "run.log"

    def __call__(self, msg: str) -> None:
        import sys

        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")
