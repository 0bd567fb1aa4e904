"""`align()`: supervised fine-tuning on chat data (TRL `SFTTrainer`), then optionally DPO (`DPOTrainer`).

The loss of SFT covers assistant tokens only:

- when the chat template marks assistant turns with ``{% generation %}`` (or TRL ships a marked
  training version of it), TRL's ``assistant_only_loss`` builds the mask;
- otherwise every assistant turn becomes one prompt/completion example (the conversation up to
  that turn, rendered with the generation prompt, then the turn) and TRL's
  ``completion_only_loss`` masks the prompt.  Both render with the same chat template.

Budget, precision, processes and resume behave as in `slimlm distill`: ``tokens`` sets the
optimizer steps (steps = ceil(tokens / (global_batch x mean tokens per example))), fp32 on CPU
and bf16 mixed precision on GPUs, Accelerate underneath (``accelerate launch`` works), and
``resume`` continues from the newest TRL checkpoint under ``OUT/run``.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .._io import atomic_dir, atomic_write_json, check_writable_output
from ..chat import ensure_chat_template, read_conversations, read_preferences, template_hash, template_text
from ..config import AlignConfig
from ..errors import SlimlmError
from ..models import load_config, load_tokenizer, pick_dtype, resolve_model_path

MASK_GENERATION = "assistant-only"  # TRL assistant_only_loss ({% generation %} markers)
MASK_TURNS = "per-turn"  # one prompt/completion example per assistant turn, TRL completion_only_loss
DEFAULT_SEQ_LEN = 1024


@dataclass
class AlignResult:
    """What `align` returns (and `--json` prints)."""

    out: str
    complete: bool
    stages: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    checkpoint: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def sft_loss_mask(tokenizer) -> str:
    """How SFT restricts the loss to assistant tokens with this tokenizer's chat template.

    ``"assistant-only"`` when the template has ``{% generation %}`` markers or TRL can patch in a
    training template that has them; ``"per-turn"`` (prompt/completion examples) otherwise.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    text = template_text(tokenizer)
    if text is None:
        raise SlimlmError("the tokenizer has no chat template")
    if has_generation_markers(text):
        return MASK_GENERATION
    try:
        patched = get_training_chat_template(tokenizer)
    except Exception:  # TRL has no training version of this template (or cannot render its probes)
        return MASK_TURNS
    return MASK_GENERATION if patched is None or has_generation_markers(patched) else MASK_TURNS


def sft_rows(conversations: list[list[dict]], mode: str) -> list[dict]:
    """The SFT dataset rows for a loss-mask mode (see `sft_loss_mask`)."""
    if mode == MASK_GENERATION:
        return [{"messages": m} for m in conversations]
    rows = []
    for msgs in conversations:
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and i > 0:
                rows.append({"prompt": msgs[:i], "completion": [m]})
    return rows


def make_sft_trainer(model, tokenizer, rows: list[dict], mode: str, callbacks=None, **config):
    """A TRL SFTTrainer over `rows` (from `sft_rows`) with assistant-only loss; `config` goes to SFTConfig."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    with _quiet_prep():
        args = SFTConfig(assistant_only_loss=mode == MASK_GENERATION, completion_only_loss=mode == MASK_TURNS,
                         **_trl_defaults(config))
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=callbacks)
    return _quiet_logs(trainer)


def make_dpo_trainer(model, ref_model, tokenizer, pairs: list[dict], beta: float, callbacks=None, **config):
    """A TRL DPOTrainer over conversational preference pairs; `config` goes to DPOConfig."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    with _quiet_prep():
        args = DPOConfig(beta=beta, **_trl_defaults(config))
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(pairs),
                             processing_class=tokenizer, callbacks=callbacks)
    return _quiet_logs(trainer)


def _quiet_logs(trainer):
    """The Trainer prints every log dict; slimlm writes them to metrics.jsonl and keeps a plain progress bar."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class Progress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            pass

    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(Progress())
    return trainer


def _trl_defaults(config: dict) -> dict:
    """TRL turns on bf16 and gradient checkpointing by default, even on CPU: slimlm decides them itself."""
    import torch

    cpu = not torch.cuda.is_available()
    base = dict(output_dir=".", bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=cpu, report_to="none",
                logging_steps=1, save_strategy="no", disable_tqdm=True, dataloader_pin_memory=not cpu,
                log_level="warning")
    return {**base, **config}


class _quiet_prep:
    """Hide the `datasets` progress bars of TRL's dataset preparation, and transformers' v6 renaming notices."""

    def __enter__(self):
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6.*", category=FutureWarning)
        try:
            from datasets.utils.logging import disable_progress_bar, is_progress_bar_enabled

            self.was = is_progress_bar_enabled()
            disable_progress_bar()
        except Exception:
            self.was = None
        return self

    def __exit__(self, *exc):
        if self.was:
            from datasets.utils.logging import enable_progress_bar

            enable_progress_bar()
        self.warnings.__exit__(*exc)


def _check_numbers(**values) -> None:
    for name, (value, low) in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise SlimlmError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value}")


def align(
    model,
    sft: str | os.PathLike | None = None,
    out: str | os.PathLike = "aligned",
    prefs: str | os.PathLike | None = None,
    config: AlignConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **overrides,
) -> AlignResult:
    """Instruction-tune `model` with the settings of `config` (an `AlignConfig`) and `overrides`.

    `sft` and `prefs` (the chat data and the optional preference pairs) are overrides given
    positionally: ``align("student", "chats.jsonl", "out")``.  See `_align` for the settings.
    """
    if sft is not None:
        overrides["sft"] = str(sft)
    if prefs is not None:
        overrides["prefs"] = str(prefs)
    c = AlignConfig.make(config, **overrides)
    if c.sft is None:
        raise SlimlmError("align needs chat data (--sft FILE.jsonl)")
    settings = c.as_dict()
    return _align(model, settings.pop("sft"), out, settings.pop("prefs"), resume=resume, overwrite=overwrite,
                  progress=progress, **settings)


def _align(
    model,
    sft: str | os.PathLike,
    out: str | os.PathLike = "aligned",
    prefs: str | os.PathLike | None = None,
    *,
    tokens: int = 100_000,
    dpo_tokens: int | None = None,
    seq_len: int | None = None,
    micro_batch: int = 4,
    global_batch: int | None = None,
    lr: float = 2e-5,
    dpo_lr: float = 1e-6,
    beta: float = 0.1,
    warmup: int = 40,
    clip: float = 1.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    dtype: str = "auto",
    chat_template_from: str | None = None,
    gradient_checkpointing: bool = False,
    save_every: int | None = None,
    keep_checkpoints: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    tensorboard: bool = True,
) -> AlignResult:
    """Instruction-tune `model` on chat data `sft` (JSONL of ``messages``), then DPO on `prefs` when given.

    Args:
        model: a model name/folder/alias (e.g. the output of `slimlm distill`).
        sft: conversations, JSONL of ``{"messages": [{"role", "content"}, ...]}``; the loss covers the
            assistant tokens only.
        prefs: optional preference pairs, JSONL of ``{"prompt", "chosen", "rejected"}`` (strings or
            message lists) for DPO after SFT (the SFT model is the DPO reference).
        out: output folder: a standard Hugging Face checkpoint with tokenizer, chat template,
            ``slimlm.json`` provenance, ``README.md`` model card, ``metrics.jsonl`` and run state in ``run/``.
        tokens: SFT token budget; optimizer steps = ceil(tokens / (global_batch x mean example length)).
            `dpo_tokens` (default: `tokens`) is DPO's, counting prompt+chosen and prompt+rejected.
        seq_len: longest sequence in tokens (longer examples are truncated); default 1024, or the
            model's max_position_embeddings when that is smaller.
        micro_batch, global_batch: examples per forward per process, and per optimizer step
            (default micro_batch x processes; the rest is gradient accumulation).
        lr, dpo_lr: peak learning rates (cosine decay to a tenth, `warmup` steps clamped to 10 %).
        beta: DPO's KL strength.
        dtype: 'auto' (fp32 on CPU, bf16 mixed precision on GPUs), 'fp32', 'bf16', 'fp16'.
        chat_template_from: where the chat template comes from when `model` has none: a model
            (e.g. the teacher) or a .jinja file.  It is used for training and saved with the result.
        save_every: checkpoint every N optimizer steps (default: about 10 per stage; 0: never);
            `resume` continues from the newest one; `stop_after` stops (with a checkpoint) after that
            many optimizer steps over both stages.

    Raises `SlimlmError` for user mistakes, before any model loads.
    """
    # ---- 1. arguments -------------------------------------------------------------------------
    if seq_len is not None:
        _check_numbers(seq_len=(seq_len, 8))
    _check_numbers(tokens=(tokens, 1), micro_batch=(micro_batch, 1), warmup=(warmup, 0),
                   keep_checkpoints=(keep_checkpoints, 1), seed=(seed, 0))
    if dpo_tokens is not None:
        _check_numbers(dpo_tokens=(dpo_tokens, 1))
    if save_every is not None:
        _check_numbers(save_every=(save_every, 0))
    if stop_after is not None:
        _check_numbers(stop_after=(stop_after, 1))
    if not (lr > 0) or not (dpo_lr > 0) or not (beta > 0) or not (clip > 0) or weight_decay < 0:
        raise SlimlmError("lr, dpo-lr, beta and clip must be > 0, weight-decay >= 0")
    dpo_tokens = dpo_tokens or tokens

    # ---- 2. data -----------------------------------------------------------------------------
    conversations = read_conversations(sft)
    pairs = read_preferences(prefs) if prefs is not None else None

    # ---- 3. model and output -------------------------------------------------------------------
    spec = str(model)
    config = load_config(spec)
    out = Path(out).expanduser()
    source = Path(resolve_model_path(spec))
    if source.exists() and source.resolve() == out.resolve():
        raise SlimlmError(f"the output {out} is the input model; choose another folder")
    run_dir = out / "run"
    sft_done = (run_dir / "sft" / "done.json").exists()
    if resume:
        if not (run_dir / "config.json").exists() or not (sft_done or _last_checkpoint(run_dir / "sft")):
            raise SlimlmError(f"nothing to resume in {out} (no checkpoint under {run_dir})")
    else:
        unfinished = (run_dir / "config.json").exists() and not (out / "slimlm.json").exists()
        if unfinished and not overwrite:
            raise SlimlmError(f"output {out} holds an unfinished run: pass --resume to continue it or --overwrite")
        check_writable_output(out, overwrite=overwrite, inputs=(spec, sft, prefs, chat_template_from))
    limit = getattr(config, "max_position_embeddings", None)
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, limit or DEFAULT_SEQ_LEN)
    elif limit is not None and seq_len > limit:
        raise SlimlmError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({limit})")

    # ---- 4. tokenizer and chat template ---------------------------------------------------------
    tok = load_tokenizer(spec)
    had_template = template_text(tok) is not None
    template = ensure_chat_template(tok, chat_template_from if not had_template else None, what=spec)
    _check_renders(tok, conversations, pairs)
    mode = sft_loss_mask(tok)
    rows = sft_rows(conversations, mode)
    if not rows:
        raise SlimlmError(f"{sft}: no assistant message follows a prompt; nothing to train on")

    # ---- 5. processes, batch, precision -------------------------------------------------------
    from accelerate import PartialState

    from ..distill.accel import cpu_only, reset_accelerate
    from ..distill.trainer import _check_same_run

    cpu = cpu_only()
    world = PartialState(cpu=cpu).num_processes
    global_batch = global_batch or micro_batch * world
    if global_batch % (micro_batch * world):
        raise SlimlmError(
            f"--global-batch {global_batch} is not a multiple of micro-batch x processes = {micro_batch} x {world}")
    accum = global_batch // (micro_batch * world)
    compute_dtype = pick_dtype(dtype)
    import torch

    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(compute_dtype, "no")
    settings = dict(
        kind="align", model=spec, sft=str(sft), prefs=str(prefs) if prefs else None, tokens=tokens,
        dpo_tokens=dpo_tokens if pairs else None, seq_len=seq_len, micro_batch=micro_batch, global_batch=global_batch,
        lr=lr, dpo_lr=dpo_lr if pairs else None, beta=beta if pairs else None, warmup=warmup, clip=clip,
        weight_decay=weight_decay, seed=seed, dtype=str(dtype), chat_template=template_hash(template), loss_mask=mode,
    )
    if resume:
        _check_same_run(run_dir, settings)
    try:
        return _run(**locals())
    finally:
        reset_accelerate()


def _check_renders(tok, conversations, pairs) -> None:
    """Every conversation and pair renders with the template (templates may refuse some role orders)."""
    def render(msgs, **kw):
        try:
            tok.apply_chat_template(msgs, tokenize=False, **kw)
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SlimlmError(f"the chat template cannot render a conversation of the data: {first}") from None

    for msgs in conversations:
        render(msgs)
    for p in pairs or ():
        render(p["prompt"], add_generation_prompt=True)
        render(p["prompt"] + p["chosen"])
        render(p["prompt"] + p["rejected"])


def resumable(out: str | os.PathLike) -> bool:
    """True when `out` holds an unfinished align run that `resume=True` can continue."""
    out = Path(out)
    run_dir = out / "run"
    return not (out / "slimlm.json").exists() and (
        (run_dir / "sft" / "done.json").exists() or _last_checkpoint(run_dir / "sft") is not None)


def _last_checkpoint(folder: Path) -> Path | None:
    """The newest complete TRL checkpoint (``checkpoint-N`` with its trainer state) in `folder`."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.json").exists()
            and p.name.split("-")[-1].isdigit()]
    return max(done, key=lambda p: int(p.name.split("-")[-1])) if done else None


def _step_of(ckpt: Path | None) -> int:
    return int(ckpt.name.split("-")[-1]) if ckpt is not None else 0


def _feedback(monitor, stage: str, offset: int, stop_after: int | None):
    from transformers import TrainerCallback

    class Feedback(TrainerCallback):
        """Training records into metrics.jsonl; stop (with a checkpoint) at `stop_after` steps over both stages."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "train_runtime" in logs or not state.is_world_process_zero:
                return
            record = {"event": "train", "stage": stage, "step": offset + state.global_step,
                      "stage_step": state.global_step}
            for key, value in logs.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    record["lr" if key == "learning_rate" else key] = float(value)
            monitor.log(record)

        def on_step_end(self, args, state, control, **kwargs):
            if stop_after is not None and offset + state.global_step >= stop_after:
                control.should_training_stop = True
                control.should_save = True

    return Feedback()


def _apply_budget(trainer, lengths: list[int], budget: int, global_batch: int, warmup: int,
                  save_every: int | None) -> tuple[int, int]:
    """Set the trainer's steps from the token budget; returns (steps, tokens those steps cover)."""
    from ..distill.trainer import effective_warmup

    if not lengths:
        raise SlimlmError("no training examples are left after tokenization (all longer than --seq-len?)")
    mean = sum(lengths) / len(lengths)
    steps = max(1, math.ceil(budget / (global_batch * mean)))
    args = trainer.args
    args.max_steps = steps
    args.warmup_steps = effective_warmup(warmup, steps)
    every = min(1000, max(25, steps // 10)) if save_every is None else save_every
    if every:
        args.save_strategy = "steps"
        args.save_steps = every
    return steps, int(round(steps * global_batch * mean))


def _run(**kw) -> AlignResult:
    """The part of `align` after validation."""
    import torch
    from accelerate import PartialState

    from ..distill.monitor import Monitor
    from ..distill.checkpoint import prepare_run_dir
    from ..models import load_model

    g = type("G", (), kw)
    state = PartialState()
    main = state.is_main_process
    out, run_dir = g.out, g.run_dir
    sft_dir, dpo_dir = run_dir / "sft", run_dir / "dpo"
    state.wait_for_everyone()  # every process checked the output before the main one writes into it
    if main:
        prepare_run_dir(out, run_dir, resume=g.resume, overwrite=g.overwrite, settings=g.settings)
    state.wait_for_everyone()

    sft_done = json.loads((sft_dir / "done.json").read_text()) if g.resume and (sft_dir / "done.json").exists() else None
    sft_ckpt = _last_checkpoint(sft_dir) if g.resume and sft_done is None else None
    dpo_ckpt = _last_checkpoint(dpo_dir) if g.resume and sft_done is not None else None
    resume_step = None
    if g.resume:
        resume_step = _step_of(sft_ckpt) if sft_done is None else sft_done["steps"] + _step_of(dpo_ckpt)
    monitor = Monitor(out / "metrics.jsonl", run_dir / "tensorboard" if g.tensorboard else None, enabled=main,
                      resume_step=resume_step)
    train_dtype = torch.float32 if g.mixed != "no" else g.compute_dtype
    common = dict(per_device_train_batch_size=g.micro_batch, gradient_accumulation_steps=g.accum,
                  lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
                  weight_decay=g.weight_decay, max_grad_norm=g.clip, adam_beta2=0.95, bf16=g.mixed == "bf16",
                  fp16=g.mixed == "fp16", use_cpu=g.cpu, gradient_checkpointing=g.gradient_checkpointing,
                  max_length=g.seq_len, save_total_limit=g.keep_checkpoints, seed=g.seed, data_seed=g.seed,
                  disable_tqdm=not (g.progress and main), max_steps=1, ddp_find_unused_parameters=False)
    stages: dict = {}
    t_start = time.perf_counter()

    def stopped(trainer, folder: Path, steps: int) -> AlignResult | None:
        if trainer.state.global_step >= steps:
            return None
        monitor.close()
        ckpt = _last_checkpoint(folder)
        return AlignResult(str(out), False, stages, round(time.perf_counter() - t_start, 2),
                           str(ckpt) if ckpt else None)

    # ---- SFT -------------------------------------------------------------------------------
    final = None
    if sft_done is None:
        model = _load(load_model, g.spec, train_dtype)
        trainer = make_sft_trainer(model, g.tok, g.rows, g.mode, output_dir=str(sft_dir), learning_rate=g.lr,
                                   **common)
        steps, covered = _apply_budget(trainer, [len(x) for x in trainer.train_dataset["input_ids"]], g.tokens,
                                       g.global_batch, g.warmup, g.save_every)
        trainer.add_callback(_feedback(monitor, "sft", 0, g.stop_after))
        if main and sft_ckpt is not None:
            print(f"resuming SFT from {sft_ckpt.name} (step {_step_of(sft_ckpt)} of {steps})", file=sys.stderr, flush=True)
        with _quiet_prep():
            result = trainer.train(resume_from_checkpoint=str(sft_ckpt) if sft_ckpt else None)
        stages["sft"] = {"data": str(g.sft), "conversations": len(g.conversations), "examples": len(g.rows),
                         "loss_mask": g.mode, "steps": steps, "tokens": covered, "lr": g.lr,
                         "train_loss": _last_loss(trainer)}
        halt = stopped(trainer, sft_dir, steps)
        if halt is not None:
            return halt
        if g.pairs:
            trainer.save_model(str(sft_dir / "model"))
            if main:
                atomic_write_json(sft_dir / "done.json", stages["sft"])
            state.wait_for_everyone()
            del trainer, model, result
            gc.collect()
        else:
            final = trainer
        sft_steps = steps
    else:
        stages["sft"] = sft_done
        sft_steps = sft_done["steps"]

    # ---- DPO -------------------------------------------------------------------------------
    if g.pairs:
        policy = _load(load_model, str(sft_dir / "model"), train_dtype)
        ref = _load(load_model, str(sft_dir / "model"), g.compute_dtype)
        ref.requires_grad_(False)
        trainer = make_dpo_trainer(policy, ref, g.tok, g.pairs, g.beta, output_dir=str(dpo_dir), learning_rate=g.dpo_lr,
                                   **common)
        ds = trainer.train_dataset
        lengths = [min(len(p) + len(c), g.seq_len) + min(len(p) + len(r), g.seq_len)
                   for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
        steps, covered = _apply_budget(trainer, lengths, g.dpo_tokens, g.global_batch, g.warmup, g.save_every)
        trainer.add_callback(_feedback(monitor, "dpo", sft_steps, g.stop_after))
        if main and dpo_ckpt is not None:
            print(f"resuming DPO from {dpo_ckpt.name} (step {_step_of(dpo_ckpt)} of {steps})", file=sys.stderr, flush=True)
        with _quiet_prep():
            trainer.train(resume_from_checkpoint=str(dpo_ckpt) if dpo_ckpt else None)
        stages["dpo"] = {"data": str(g.prefs), "pairs": len(g.pairs), "steps": steps, "tokens": covered,
                         "lr": g.dpo_lr, "beta": g.beta, "train_loss": _last_loss(trainer),
                         "reward_accuracy": _last_value(trainer, "rewards/accuracies"),
                         "reward_margin": _last_value(trainer, "rewards/margins")}
        halt = stopped(trainer, dpo_dir, steps)
        if halt is not None:
            return halt
        final = trainer

    # ---- export ----------------------------------------------------------------------------
    monitor.close()
    elapsed = time.perf_counter() - t_start
    meta = _provenance(g, stages, elapsed)
    _export(final, g.tok, out, run_dir, meta, g.compute_dtype, main)
    state.wait_for_everyone()
    return AlignResult(str(out), True, stages, round(elapsed, 2), None)


def _load(load_model, spec: str, dtype):
    model = load_model(spec, dtype)
    model.config.__dict__.pop("_slimlm_source", None)  # load_model's note, not a config field
    model.train()
    return model


def _last_value(trainer, key: str):
    for entry in reversed(trainer.state.log_history):
        if key in entry:
            return float(entry[key])
    return None


def _last_loss(trainer):
    return _last_value(trainer, "loss")


def _provenance(g, stages: dict, elapsed: float) -> dict:
    import accelerate
    import torch
    import transformers
    import trl

    from .. import __version__

    parent = None
    src = Path(resolve_model_path(g.spec))
    if (src / "slimlm.json").exists():
        try:
            parent = json.loads((src / "slimlm.json").read_text())
        except ValueError:
            parent = None
    return {
        "slimlm": __version__,
        "kind": "align",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": g.spec,
        "chat_template": {"from": g.chat_template_from if not g.had_template else g.spec,
                          "sha256_16": template_hash(g.template)},
        "sft": stages.get("sft"),
        "dpo": stages.get("dpo"),
        "tokens": sum((s or {}).get("tokens", 0) for s in stages.values()),
        "hyperparameters": {
            "seq_len": g.seq_len, "micro_batch": g.micro_batch, "global_batch": g.global_batch,
            "grad_accumulation": g.accum, "processes": g.world, "warmup_requested": g.warmup,
            "schedule": "cosine to lr/10", "clip": g.clip, "optimizer": "AdamW(0.9, 0.95)",
            "weight_decay": g.weight_decay, "seed": g.seed,
            "dtype": str(g.compute_dtype).replace("torch.", ""), "mixed_precision": g.mixed,
        },
        "elapsed_s": round(elapsed, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__, "trl": trl.__version__},
        "parent": parent,
    }


def _cast_weights(folder: Path, dtype) -> None:
    """Store the floating-point weights of a saved checkpoint in `dtype` (mixed precision trains fp32 masters)."""
    from safetensors.torch import load_file, save_file

    for f in folder.glob("*.safetensors"):
        tensors = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in load_file(str(f)).items()}
        save_file(tensors, str(f), metadata={"format": "pt"})
    cfg_path = folder / "config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        cfg["dtype"] = str(dtype).replace("torch.", "")
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _export(trainer, tok, out: Path, run_dir: Path, meta: dict, save_dtype, main: bool) -> None:
    """The final model as a standard checkpoint in `out`, written atomically (run state carried over)."""
    import torch

    from ..card import write_model_card
    from ..distill.export import _carry

    staging = run_dir / "export"
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))  # every process: gathers shards under FSDP / ZeRO-3
    if not main:
        return
    for name in ("training_args.bin", "README.md"):  # the Trainer's, not the model's
        (staging / name).unlink(missing_ok=True)
    if save_dtype != torch.float32:
        _cast_weights(staging, save_dtype)
    with atomic_dir(out) as tmp:
        for f in staging.iterdir():
            shutil.move(str(f), str(tmp / f.name))
        staging.rmdir()
        tok.save_pretrained(tmp)  # with its chat template
        _carry(out, tmp)
        atomic_write_json(tmp / "slimlm.json", meta)
        write_model_card(tmp)
