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
from pathlib import Path

from .._io import atomic_dir, atomic_write_json
from ..chat import ensure_chat_template, read_conversations, read_preferences, template_hash, template_text
from ..config import AlignConfig
from ..errors import SlimlmError
from ..models import load_config, load_model, load_tokenizer, resolve_model_path
from ..training import provenance
from ..training.checkpoint import last_trainer_checkpoint, refusing_pickles, trainer_checkpoint_step
from ..training.monitor import Monitor
from ..training.precision import Precision
from ..training.run_folder import RunFolder, carry_run_state
from ..training.schedule import default_save_every, effective_warmup
from ..training.setup import accelerate_released, plan_batch

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
    """Instruction-tune `model` on chat data `sft` (JSONL of ``messages``), then DPO on `prefs` when given.

    `model` is a model name/folder/alias (e.g. the output of `slimlm distill`).  `config` is an
    `AlignConfig` (its fields document every setting); keyword `overrides` replace its values,
    and `sft` / `prefs` are overrides given positionally: ``align("student", "chats.jsonl", "out")``.

    `sft`: conversations, JSONL of ``{"messages": [{"role", "content"}, ...]}``; the loss covers the
    assistant tokens only.  `prefs`: optional preference pairs, JSONL of ``{"prompt", "chosen",
    "rejected"}`` (strings or message lists) for DPO after SFT (the SFT model is the DPO reference).
    `out` becomes a standard Hugging Face checkpoint with tokenizer, chat template, ``slimlm.json``
    provenance, ``README.md`` model card, ``metrics.jsonl`` and run state in ``run/``.  `resume`
    continues from the newest checkpoint; a run that fails before its first checkpoint removes what
    it wrote.

    Raises `SlimlmError` for user mistakes, before any model loads.
    """
    if sft is not None:
        overrides["sft"] = str(sft)
    if prefs is not None:
        overrides["prefs"] = str(prefs)
    c = AlignConfig.make(config, **overrides)
    if c.sft is None:
        raise SlimlmError("align needs chat data (--sft FILE.jsonl)")
    return AlignRecipe(model, c, out, resume=resume, overwrite=overwrite, progress=progress).train()


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


class AlignRecipe:
    """One align run (SFT, then DPO when there are preference pairs): checked on construction, run by `train()`.

    Construction reads the data, the model's config and its tokenizer, and checks everything
    a user can get wrong; `train()` sets up the run folder and the stages' shared Trainer
    arguments (`_setup_*`), runs SFT and DPO on TRL's trainers and exports the final model.
    """

    def __init__(self, model, c: AlignConfig, out, *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True):
        self.c, self.resume, self.overwrite, self.progress = c, resume, overwrite, progress
        self._check_settings()
        self.dpo_tokens = c.dpo_tokens or c.tokens
        self.conversations = read_conversations(c.sft)
        self.pairs = read_preferences(c.prefs) if c.prefs is not None else None
        self.spec = str(model)
        model_config = load_config(self.spec)
        self.source = Path(resolve_model_path(self.spec))
        self.folder = RunFolder(out)
        self._check_output()
        self.seq_len = self._check_seq_len(getattr(model_config, "max_position_embeddings", None))
        self._check_tokenizer()
        self.batch = plan_batch(c.micro_batch, c.global_batch)
        self.precision = Precision.from_setting(c.dtype)
        self.settings = self._run_settings()
        if resume:
            self.folder.check_same_run(self.settings)

    # ---- checks (construction) ---------------------------------------------------------------
    def _check_settings(self) -> None:
        c = self.c
        if c.seq_len is not None:
            _check_numbers(seq_len=(c.seq_len, 8))
        _check_numbers(tokens=(c.tokens, 1), micro_batch=(c.micro_batch, 1), warmup=(c.warmup, 0),
                       keep_checkpoints=(c.keep_checkpoints, 1), seed=(c.seed, 0))
        if c.dpo_tokens is not None:
            _check_numbers(dpo_tokens=(c.dpo_tokens, 1))
        if c.save_every is not None:
            _check_numbers(save_every=(c.save_every, 0))
        if c.stop_after is not None:
            _check_numbers(stop_after=(c.stop_after, 1))
        if not (c.lr > 0) or not (c.dpo_lr > 0) or not (c.beta > 0) or not (c.clip > 0) or c.weight_decay < 0:
            raise SlimlmError("lr, dpo-lr, beta and clip must be > 0, weight-decay >= 0")

    def _check_output(self) -> None:
        folder = self.folder
        folder.refuse_inputs(str(self.source), what="the input model")
        has_checkpoint = folder.settings_file.exists() and self._has_checkpoint()
        c = self.c
        folder.check_start(resume=self.resume, overwrite=self.overwrite, has_checkpoint=has_checkpoint,
                           inputs=(self.spec, c.sft, c.prefs, c.chat_template_from))

    def _check_seq_len(self, limit: int | None) -> int:
        if self.c.seq_len is None:
            return min(DEFAULT_SEQ_LEN, limit or DEFAULT_SEQ_LEN)
        if limit is not None and self.c.seq_len > limit:
            raise SlimlmError(f"--seq-len {self.c.seq_len} exceeds the model's max_position_embeddings ({limit})")
        return self.c.seq_len

    def _check_tokenizer(self) -> None:
        """The tokenizer with its chat template (from `chat_template_from` when the model has none), the SFT rows."""
        tok = load_tokenizer(self.spec)
        self.had_template = template_text(tok) is not None
        self.template = ensure_chat_template(tok, self.c.chat_template_from if not self.had_template else None,
                                             what=self.spec)
        _check_renders(tok, self.conversations, self.pairs)
        self.mode = sft_loss_mask(tok)
        self.rows = sft_rows(self.conversations, self.mode)
        if not self.rows:
            raise SlimlmError(f"{self.c.sft}: no assistant message follows a prompt; nothing to train on")
        self.tok = tok

    def _run_settings(self) -> dict:
        """The settings that shape training, recorded in run/config.json and compared on --resume."""
        c, dpo = self.c, self.pairs is not None
        return dict(
            kind="align", model=self.spec, sft=str(c.sft), prefs=str(c.prefs) if c.prefs else None,
            tokens=c.tokens, dpo_tokens=self.dpo_tokens if dpo else None, seq_len=self.seq_len,
            micro_batch=c.micro_batch, global_batch=self.batch.global_batch, lr=c.lr, dpo_lr=c.dpo_lr if dpo else None,
            beta=c.beta if dpo else None, warmup=c.warmup, clip=c.clip, weight_decay=c.weight_decay, seed=c.seed,
            dtype=str(c.dtype), chat_template=template_hash(self.template), loss_mask=self.mode,
        )

    def _has_checkpoint(self) -> bool:
        run = self.folder.run
        return (run / "sft" / "done.json").exists() or last_trainer_checkpoint(run / "sft") is not None

    # ---- the run -------------------------------------------------------------------------------
    def train(self) -> AlignResult:
        """SFT, then DPO when there are pairs, then the export; see `align`."""
        from accelerate import PartialState

        self.state = PartialState()
        self.main = self.state.is_main_process
        with accelerate_released():
            self._setup_folder()
            with self.folder.removed_on_failure(self._has_checkpoint, enabled=self.main):
                self._setup_state()
                if self.sft_done is not None:  # a resumed run that finished SFT before
                    self.stages["sft"], trainer = self.sft_done, None
                else:
                    trainer = self._sft_stage()
                    if trainer is None:
                        return self._stopped()
                    if self.pairs:
                        self._finish_sft(trainer)
                        trainer = None
                        gc.collect()
                if self.pairs:
                    trainer = self._dpo_stage()
                    if trainer is None:
                        return self._stopped()
                return self._export(trainer)

    def _setup_folder(self) -> None:
        self.state.wait_for_everyone()  # every process checked the output before the main one writes into it
        if self.main:
            self.folder.prepare(resume=self.resume, overwrite=self.overwrite, settings=self.settings)
        self.state.wait_for_everyone()

    def _setup_state(self) -> None:
        """Where each stage resumes, the metrics file, and the Trainer arguments both stages share."""
        c, run = self.c, self.folder.run
        self.sft_dir, self.dpo_dir = run / "sft", run / "dpo"
        done = self.sft_dir / "done.json"
        self.sft_done = json.loads(done.read_text()) if self.resume and done.exists() else None
        self.sft_ckpt = last_trainer_checkpoint(self.sft_dir) if self.resume and self.sft_done is None else None
        self.dpo_ckpt = last_trainer_checkpoint(self.dpo_dir) if self.resume and self.sft_done is not None else None
        resume_step = None
        if self.resume:
            resume_step = trainer_checkpoint_step(self.sft_ckpt) if self.sft_done is None \
                else self.sft_done["steps"] + trainer_checkpoint_step(self.dpo_ckpt)
        self.monitor = Monitor(self.folder.metrics_file, run / "tensorboard" if c.tensorboard else None,
                               enabled=self.main, resume_step=resume_step)
        mixed = self.precision.mixed
        self.common = dict(
            per_device_train_batch_size=c.micro_batch, gradient_accumulation_steps=self.batch.accumulation,
            lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
            weight_decay=c.weight_decay, max_grad_norm=c.clip, adam_beta2=0.95, bf16=mixed == "bf16",
            fp16=mixed == "fp16", use_cpu=self.batch.cpu, gradient_checkpointing=c.gradient_checkpointing,
            max_length=self.seq_len, save_total_limit=c.keep_checkpoints, seed=c.seed, data_seed=c.seed,
            disable_tqdm=not (self.progress and self.main), max_steps=1, ddp_find_unused_parameters=False)
        self.stages: dict = {}
        self.t_start = time.perf_counter()

    def _sft_stage(self):
        """SFT; its trainer when it ran to its last step, None when stopped on purpose (with a checkpoint)."""
        c = self.c
        model = _load(self.spec, self.precision.master)
        trainer = make_sft_trainer(model, self.tok, self.rows, self.mode, output_dir=str(self.sft_dir),
                                   learning_rate=c.lr, **self.common)
        steps, covered = _apply_budget(trainer, [len(x) for x in trainer.train_dataset["input_ids"]], c.tokens,
                                       self.batch.global_batch, c.warmup, c.save_every)
        self._run_trainer(trainer, "sft", 0, self.sft_ckpt, steps)
        self.stages["sft"] = {"data": str(c.sft), "conversations": len(self.conversations), "examples": len(self.rows),
                              "loss_mask": self.mode, "steps": steps, "tokens": covered, "lr": c.lr,
                              "train_loss": _last_loss(trainer)}
        return trainer if trainer.state.global_step >= steps else None

    def _finish_sft(self, trainer) -> None:
        """Save the SFT model (DPO's start and reference) and mark SFT done, so a resumed run goes straight to DPO."""
        trainer.save_model(str(self.sft_dir / "model"))
        if self.main:
            atomic_write_json(self.sft_dir / "done.json", self.stages["sft"])
        self.state.wait_for_everyone()

    def _dpo_stage(self):
        """DPO from the SFT model (also the frozen reference); the trainer to export, None if stopped."""
        c = self.c
        policy = _load(str(self.sft_dir / "model"), self.precision.master)
        ref = _load(str(self.sft_dir / "model"), self.precision.compute)
        ref.requires_grad_(False)
        trainer = make_dpo_trainer(policy, ref, self.tok, self.pairs, c.beta, output_dir=str(self.dpo_dir),
                                   learning_rate=c.dpo_lr, **self.common)
        ds = trainer.train_dataset
        lengths = [min(len(p) + len(ch), self.seq_len) + min(len(p) + len(r), self.seq_len)
                   for p, ch, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
        steps, covered = _apply_budget(trainer, lengths, self.dpo_tokens, self.batch.global_batch, c.warmup,
                                       c.save_every)
        self._run_trainer(trainer, "dpo", self.stages["sft"]["steps"], self.dpo_ckpt, steps)
        self.stages["dpo"] = {"data": str(c.prefs), "pairs": len(self.pairs), "steps": steps, "tokens": covered,
                              "lr": c.dpo_lr, "beta": c.beta, "train_loss": _last_loss(trainer),
                              "reward_accuracy": _last_value(trainer, "rewards/accuracies"),
                              "reward_margin": _last_value(trainer, "rewards/margins")}
        return trainer if trainer.state.global_step >= steps else None

    def _run_trainer(self, trainer, stage: str, offset: int, ckpt: Path | None, steps: int) -> None:
        """trainer.train() with slimlm's metrics and stop_after, from `ckpt` when resuming."""
        self.last_stage_dir = self.sft_dir if stage == "sft" else self.dpo_dir
        trainer.add_callback(_feedback(self.monitor, stage, offset, self.c.stop_after))
        if self.main and ckpt is not None:
            print(f"resuming {stage.upper()} from {ckpt.name} (step {trainer_checkpoint_step(ckpt)} of {steps})",
                  file=sys.stderr, flush=True)
        with _quiet_prep(), refusing_pickles(ckpt):
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)

    def _stopped(self) -> AlignResult:
        self.monitor.close()
        ckpt = last_trainer_checkpoint(self.last_stage_dir)
        return AlignResult(str(self.folder.out), False, self.stages, round(time.perf_counter() - self.t_start, 2),
                           str(ckpt) if ckpt else None)

    def _export(self, trainer) -> AlignResult:
        self.monitor.close()
        elapsed = time.perf_counter() - self.t_start
        export_trained(trainer, self.tok, self.folder, self._provenance(elapsed), self.precision.compute, self.main)
        self.state.wait_for_everyone()
        return AlignResult(str(self.folder.out), True, self.stages, round(elapsed, 2), None)

    def _provenance(self, elapsed: float) -> dict:
        c = self.c
        return {
            "slimlm": provenance.slimlm_version(),
            "kind": "align",
            "created": provenance.now(),
            "source": self.spec,
            "chat_template": {"from": c.chat_template_from if not self.had_template else self.spec,
                              "sha256_16": template_hash(self.template)},
            "sft": self.stages.get("sft"),
            "dpo": self.stages.get("dpo"),
            "tokens": sum((s or {}).get("tokens", 0) for s in self.stages.values()),
            "hyperparameters": {
                "seq_len": self.seq_len, **self.batch.describe(), "warmup_requested": c.warmup,
                "schedule": "cosine to lr/10", "clip": c.clip, "optimizer": "AdamW(0.9, 0.95)",
                "weight_decay": c.weight_decay, "seed": c.seed, **self.precision.describe(),
            },
            "elapsed_s": round(elapsed, 2),
            "versions": provenance.versions("trl"),
            "parent": provenance.parent_record(self.source),
        }


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
    if not lengths:
        raise SlimlmError("no training examples are left after tokenization (all longer than --seq-len?)")
    mean = sum(lengths) / len(lengths)
    steps = max(1, math.ceil(budget / (global_batch * mean)))
    args = trainer.args
    args.max_steps = steps
    args.warmup_steps = effective_warmup(warmup, steps)
    every = default_save_every(steps) if save_every is None else save_every
    if every:
        args.save_strategy = "steps"
        args.save_steps = every
    return steps, int(round(steps * global_batch * mean))



def _load(spec: str, dtype):
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


def export_trained(trainer, tok, folder: RunFolder, meta: dict, save_dtype, main: bool) -> None:
    """The final model as a standard checkpoint in the run's output folder, written atomically (run state carried over)."""
    import torch

    from ..card import write_model_card

    out, staging = folder.out, folder.run / "export"
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
        carry_run_state(out, tmp)
        atomic_write_json(tmp / "slimlm.json", meta)
        write_model_card(tmp)
