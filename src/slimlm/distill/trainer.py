"""The distillation recipe: `distill()` trains a student on a teacher's output distribution.

One recipe serves two modes:
- ``mode="kd"``: the Minitron loss (forward KL on the logits by default), teacher frozen;
- ``mode="lm"``: plain next-token LM loss (teacher correction, LM-loss baselines).

`DistillRecipe` follows torchtune's recipe classes: the constructor checks everything a user
can get wrong (before any model loads or anything is written), the `_setup_*` methods build
the run's state on the object, and `train()` runs the loop.  Processes, batch arithmetic,
precision, the run folder, checkpoints and monitoring come from `slimlm.training`;
Accelerate handles device placement, mixed precision, gradient accumulation and multiple
processes, so the same code runs on one CPU and under ``accelerate launch`` (DDP, FSDP2,
DeepSpeed ZeRO-3).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ..chat import ensure_chat_template, read_conversations, render_chat_texts, template_hash, template_text
from ..config import DEFAULT_CORPUS, CorrectConfig, DistillConfig
from ..data import check_source
from ..errors import SlimlmError
from ..models import load_config, load_model, load_tokenizer
from ..training import provenance
from ..training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..training.monitor import Monitor, fmt_rate, progress_bar
from ..training.precision import Precision
from ..training.run_folder import RunFolder
from ..training.schedule import default_save_every, effective_warmup, schedule
from ..training.setup import accelerate_released, make_accelerator, plan_batch, shards_parameters
from .accel import check_fsdp_version, set_deepspeed_micro_batch
from .data import build_training_data, chat_text_source, describe_sources, parse_sources, tokenizer_fingerprint
from .export import export_student
from .loss import check_loss_name
from .modules import (Distillation, StudentObjective, TeacherForward, as_module_inputs, parse_layer_map,
                      router_loss_weight)
from .teacher_logits import CachedWindows, TeacherLogitsCache
from .tokens import usable_token_cache

__all__ = ["distill", "correct_teacher", "DistillRecipe", "DistillResult", "NonFiniteLossError", "schedule",
           "effective_warmup"]

MODES = ("kd", "lm")
HIDDEN_LOSSES = ("cosine",)


class NonFiniteLossError(SlimlmError):
    """The loss or the gradient norm became NaN/inf; the run stopped, its last checkpoint is kept."""


@dataclass
class DistillResult:
    """What `distill` returns (and `--json` prints)."""

    out: str
    mode: str
    steps: int
    tokens: int
    complete: bool
    metrics: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    checkpoint: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


# ---- the front doors -----------------------------------------------------------------------------
def distill(
    teacher,
    student,
    data=None,
    out: str | os.PathLike = "distilled",
    tokens: int | str | None = None,
    config: DistillConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[dict], None] | None = None,
    tokenizer=None,
    **overrides,
) -> DistillResult:
    """Distill `teacher` into `student` (mode 'kd'), or train `student` with the LM loss (mode 'lm').

    `teacher`, `student`: model names/folders/aliases (as `slimlm.models.load_model` takes) or
    loaded Hugging Face models (a model object is trained in place, in fp32: see
    `slimlm.training.precision`).  `teacher` may be None in mode 'lm'; given there,
    validation also reports the KL to it.  With ``teacher_logits=CACHE`` (a `slimlm
    teacher-logits` folder) the teacher is never loaded: training and validation read its
    top-K targets, `teacher` may be None, and a teacher given by name must be the cache's.  `config` is a `DistillConfig` (its fields document
    every setting); keyword `overrides` replace its values, and `data` and `tokens` are
    overrides given positionally for short calls:
    ``distill("smollm2-135m", "pruned", "corpus.txt", "out", "100k")``.

    `out` becomes a standard Hugging Face checkpoint with `slimlm.json`, `metrics.jsonl` and the
    run state under `run/` (checkpoints, TensorBoard).  `resume` continues from the newest
    checkpoint in `out` at the exact data position; `overwrite` replaces a finished or
    unfinished run.  `on_step` is called on the main process with each training record;
    `tokenizer` replaces the student's (for model objects that have none on disk).

    Returns a `DistillResult`.  Raises `SlimlmError` for user mistakes (before any work) and
    `NonFiniteLossError` when the loss diverges.  A run that fails before its first checkpoint
    removes what it wrote; one that fails later keeps its checkpoints for `resume`.
    """
    if data is not None:
        overrides["data"] = data
    if tokens is not None:
        overrides["tokens"] = tokens
    c = DistillConfig.make(config, **overrides)
    recipe = DistillRecipe(teacher, student, c, out, resume=resume, overwrite=overwrite, progress=progress,
                           on_step=on_step, tokenizer=tokenizer)
    return recipe.train()


def correct_teacher(model, out: str | os.PathLike = "corrected", config: CorrectConfig | None = None, *,
                    resume: bool = False, overwrite: bool = False, progress: bool = True, **overrides) -> DistillResult:
    """Teacher correction: train `model` with the LM loss on the distillation data (a `CorrectConfig`)."""
    c = CorrectConfig.make(config, **overrides)
    return DistillRecipe(None, model, c, out, resume=resume, overwrite=overwrite, progress=progress).train()


# ---- checks on the inputs ------------------------------------------------------------------------
def check_settings(c: DistillConfig) -> tuple[str, str | None]:
    """What the config classes' bounds do not cover; returns the normalised (loss, hidden loss) names."""
    if c.mode not in MODES:
        raise SlimlmError(f"unknown mode '{c.mode}' (choose from {', '.join(MODES)})")
    loss = check_loss_name(c.loss) if c.mode == "kd" else "none"
    if loss == "none" and c.mode == "kd":
        raise SlimlmError("mode 'kd' needs a distillation loss (kl, reverse-kl or jsd)")
    hidden_loss = None if c.hidden_loss is None else str(c.hidden_loss).lower()
    if hidden_loss in ("", "none"):
        hidden_loss = None
    elif hidden_loss is not None and hidden_loss not in HIDDEN_LOSSES:
        raise SlimlmError(f"unknown hidden loss '{hidden_loss}' (choose from {', '.join(HIDDEN_LOSSES)})")
    elif hidden_loss is not None and c.mode == "lm":
        raise SlimlmError("--hidden-loss needs mode 'kd' (a teacher to match)")
    for name, value, low in (("tokens", c.tokens, 1), ("seq-len", c.seq_len, 2), ("micro-batch", c.micro_batch, 1),
                             ("heldout", c.heldout, 0), ("chunk-size", c.chunk_size, 0)):
        if not isinstance(value, int) or value < low:
            raise SlimlmError(f"--{name} must be an integer >= {low}, got {value}")
    lr, min_lr = c.peak_lr(), c.final_lr()
    if not (lr > 0) or min_lr < 0 or min_lr > lr:
        raise SlimlmError(f"need 0 <= min-lr <= lr and lr > 0, got lr={lr}, min-lr={min_lr}")
    if c.warmup < 0 or c.clip <= 0 or c.temperature <= 0 or c.ce_weight < 0 or c.hidden_weight < 0 \
            or c.weight_decay < 0:
        raise SlimlmError("warmup, ce-weight, hidden-weight, weight-decay must be >= 0; clip and temperature > 0")
    return loss, hidden_loss


def check_teacher_logits_settings(c: DistillConfig, loss: str, hidden_loss: str | None) -> None:
    """Refuse (one line) the settings a teacher-logits cache cannot serve; `loss`, `hidden_loss` from `check_settings`."""
    flag = "--teacher-logits"
    if c.mode != "kd":
        raise SlimlmError(f"{flag} needs mode 'kd' (the cache holds a teacher's distribution)")
    if loss != "kl":
        raise SlimlmError(f"{flag} trains with the forward KL (--loss kl): {loss} needs the teacher's whole "
                          "distribution, the cache holds its top K")
    if c.temperature != 1.0:
        raise SlimlmError(f"{flag} needs --temperature 1: the cache holds log-probabilities at temperature 1, "
                          "from which the rest bucket's mass at another temperature cannot be recovered")
    if hidden_loss:
        raise SlimlmError(f"--hidden-loss needs the teacher's hidden states, which {flag} does not hold")
    if c.chat:
        raise SlimlmError(f"--chat cannot read {flag}: a cache is written from text sources")


def _spec_and_config(model, role: str):
    """(the name the user gave, config) for a model given as a spec string or an nn.Module."""
    if model is None:
        return None, None
    if isinstance(model, (str, os.PathLike)):
        return str(model), load_config(str(model))
    config = getattr(model, "config", None)
    if config is None:
        raise SlimlmError(f"the {role} must be a model name/folder or a Hugging Face model")
    return getattr(config, "_slimlm_source", None) or getattr(config, "name_or_path", None) or f"<{role}>", config


def _tokenizer_for(spec: str | None):
    if spec is None or spec.startswith("<"):
        return None
    try:
        return load_tokenizer(spec)
    except (SlimlmError, OSError, ValueError):
        return None


def _check_compatible(t_cfg, s_cfg, t_tok, s_tok) -> None:
    """Teacher and student must share a vocabulary, or the KL compares unrelated distributions."""
    if t_cfg.vocab_size != s_cfg.vocab_size:
        raise SlimlmError(
            f"teacher and student vocabularies differ ({t_cfg.vocab_size} vs {s_cfg.vocab_size} tokens); "
            "distillation needs the same tokenizer"
        )
    if t_tok is not None and s_tok is not None and t_tok.get_vocab() != s_tok.get_vocab():
        raise SlimlmError("teacher and student tokenizers differ; distillation needs the same tokenizer")


# ---- the recipe -----------------------------------------------------------------------------------
class DistillRecipe:
    """One distillation (or LM-training) run: checked on construction, run by `train()`.

    Construction reads only configs and tokenizers; `train()` then sets up the accelerator,
    the run folder, the data, the models and the optimizer (the `_setup_*` methods, which keep
    their results on the object), resumes from a checkpoint when asked, trains and exports.
    """

    def __init__(self, teacher, student, c: DistillConfig, out, *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, on_step: Callable[[dict], None] | None = None, tokenizer=None):
        # The learning rates are fixed here (the default follows the token budget) and recorded as numbers.
        self.c = dataclasses.replace(c.with_learning_rates(), data=c.data or DEFAULT_CORPUS)
        self.teacher, self.student = teacher, student
        self.resume, self.overwrite, self.progress, self.on_step = resume, overwrite, progress, on_step
        if self.teacher is None and c.mode == "kd" and not c.teacher_logits:
            raise SlimlmError("distillation needs a teacher (or --teacher-logits CACHE)")
        self.loss, self.hidden_loss = check_settings(self.c)
        self.cache = self._open_teacher_logits() if c.teacher_logits else None
        self.sources = parse_sources(self.c.data, c.data_weights)
        self.token_cache = usable_token_cache(c.token_cache)
        self.batch = plan_batch(c.micro_batch, c.global_batch)
        self.total_steps = max(1, math.ceil(c.tokens / (self.batch.global_batch * c.seq_len)))
        self.warmup_steps = effective_warmup(c.warmup, self.total_steps)
        self.eval_every = max(1, self.total_steps // 10) if c.eval_every is None else c.eval_every
        self.save_every = default_save_every(self.total_steps) if c.save_every is None else c.save_every
        self.precision = Precision.from_setting(c.dtype)
        self.folder = RunFolder(out)
        self.t_spec, self.t_cfg = _spec_and_config(teacher, "teacher")
        self.s_spec, self.s_cfg = _spec_and_config(student, "student")
        self.router_weight = router_loss_weight(self.s_cfg) if c.router_aux_loss else 0.0
        self._check_output()
        self.tok = self._check_tokenizer(tokenizer)
        self.pairs = parse_layer_map(c.layer_map, self.s_cfg.num_hidden_layers, self.t_cfg.num_hidden_layers) \
            if self.hidden_loss else []
        self.stream = self._check_teacher_logits() if self.cache is not None else None
        self.settings = self._run_settings()
        if resume:
            self.folder.check_same_run(self.settings)

    @property
    def tokens_per_step(self) -> int:
        return self.batch.global_batch * self.c.seq_len

    # ---- checks (construction) ---------------------------------------------------------------
    def _open_teacher_logits(self) -> TeacherLogitsCache:
        """The teacher-logits cache, after refusing the settings it cannot serve (one line each)."""
        check_teacher_logits_settings(self.c, self.loss, self.hidden_loss)
        if self.teacher is not None and not isinstance(self.teacher, (str, os.PathLike)):
            raise SlimlmError("with --teacher-logits give the teacher by name (it is checked against the cache, not "
                              "loaded) or not at all")
        cache = TeacherLogitsCache.open(self.c.teacher_logits)
        cache.check_files()
        return cache

    def _check_teacher_logits(self):
        """The cache was written for this run's tokenizer, data, seed, seq-len (and teacher) and covers its budget.

        Returns the run's stream over the cache (`CacheStream`).
        """
        c, cache = self.c, self.cache
        if cache.vocab != self.s_cfg.vocab_size:
            raise SlimlmError(f"the teacher-logits cache {cache.path} holds a {cache.vocab}-token vocabulary, the "
                              f"student has {self.s_cfg.vocab_size}; distillation needs the same tokenizer")
        cache.check_matches(tokenizer=self.tok, data=c.data, data_weights=c.data_weights, eval_data=c.eval_data,
                            text_field=c.text_field, seed=c.seed, seq_len=c.seq_len, teacher=self.t_spec,
                            dtype=self.precision.compute)
        return cache.stream(tokens=c.tokens, global_batch=self.batch.global_batch,
                            heldout=c.heldout if self.eval_every else 0)

    def _check_output(self) -> None:
        self.folder.refuse_inputs(self.t_spec, self.s_spec)
        self.folder.refuse_inputs(self.c.teacher_logits, what="the teacher-logits cache")
        self.checkpoint = latest_checkpoint(self.folder.run)
        inputs = (self.t_spec, self.s_spec, self.c.eval_data, self.c.teacher_logits, *(s for s, _ in self.sources))
        self.folder.check_start(resume=self.resume, overwrite=self.overwrite, has_checkpoint=self.checkpoint is not None,
                                where=self.folder.run / "checkpoints", inputs=inputs)
        if not self.resume:
            self.checkpoint = None

    def _check_tokenizer(self, given):
        """The tokenizer (the student's, else the teacher's), checked against both models and the data."""
        c = self.c
        s_tok = given or _tokenizer_for(self.s_spec)
        t_tok = _tokenizer_for(self.t_spec) if self.t_cfg is not None else None
        tok = s_tok or t_tok
        if tok is None:
            raise SlimlmError("no tokenizer found with the student or the teacher; pass one")
        if self.t_cfg is not None:
            _check_compatible(self.t_cfg, self.s_cfg, t_tok, s_tok)
        if t_tok is not None and template_text(tok) is None and template_text(t_tok) is not None:
            tok.chat_template = template_text(t_tok)  # the teacher's chat template goes with the student
        if c.chat:
            self._check_chat(tok)
        if len(tok) > self.s_cfg.vocab_size:
            raise SlimlmError(f"the tokenizer has {len(tok)} tokens but the student only {self.s_cfg.vocab_size} "
                              "embeddings")
        for role, cfg in (("student", self.s_cfg), ("teacher", self.t_cfg)):
            limit = getattr(cfg, "max_position_embeddings", None) if cfg is not None else None
            if limit is not None and c.seq_len > limit:
                raise SlimlmError(f"--seq-len {c.seq_len} exceeds the {role}'s max_position_embeddings ({limit})")
        return tok

    def _check_chat(self, tok) -> None:
        """--chat: the data are chat records that every render with the template."""
        if any(s == DEFAULT_CORPUS for s, _ in self.sources):
            raise SlimlmError("--chat needs --data FILE.jsonl of {\"messages\": [...]} records")
        ensure_chat_template(tok, what="the student (and the teacher)")
        for source in [s for s, _ in self.sources] + [self.c.eval_data]:
            if source is not None:
                render_chat_texts(read_conversations(source, need_assistant=False), tok)

    def _run_settings(self) -> dict:
        """The settings that shape training, recorded in run/config.json and compared on --resume."""
        c, data = self.c, self.c.data
        settings = dict(
            mode=c.mode, teacher=self.t_spec, student=self.s_spec,
            data=str(data) if isinstance(data, (str, os.PathLike)) else describe_sources(self.sources),
            eval_data=str(c.eval_data) if c.eval_data else None,
            tokens=c.tokens, seq_len=c.seq_len, micro_batch=c.micro_batch, global_batch=self.batch.global_batch,
            lr=c.lr, min_lr=c.min_lr, warmup=c.warmup, clip=c.clip, weight_decay=c.weight_decay, seed=c.seed,
            loss=self.loss, temperature=c.temperature, ce_weight=c.ce_weight, hidden_loss=self.hidden_loss,
            layer_map=[list(p) for p in self.pairs], hidden_weight=c.hidden_weight, dtype=str(c.dtype),
            heldout=c.heldout, tokenizer=tokenizer_fingerprint(self.tok),
        )
        if c.chat:
            settings.update(chat=True, chat_template=template_hash(template_text(self.tok)))
        if c.router_aux_loss:
            settings.update(router_aux_loss=self.router_weight)
        if self.cache is not None:  # resuming from another cache (or one rewritten with another key) is refused
            settings.update(teacher_logits=str(self.cache.path), teacher_logits_key=self.cache.key)
        return settings

    # ---- the run -------------------------------------------------------------------------------
    def train(self) -> DistillResult:
        """Set up, train (from the checkpoint when resuming), validate and export; see `distill`."""
        self.accelerator = make_accelerator(self.batch, self.precision.mixed)
        self.main = self.accelerator.is_main_process
        with accelerate_released():
            check_fsdp_version(self.accelerator)
            self._setup_folder()
            has_checkpoint = lambda: latest_checkpoint(self.folder.run) is not None  # noqa: E731
            with self.folder.removed_on_failure(has_checkpoint, enabled=self.main):
                self._setup_data()
                self._setup_models()
                self._setup_optimizer()
                self._setup_state()
                return self._run()

    def _setup_folder(self) -> None:
        """Check the data sources, then (main process) create the run folder and record the settings."""
        acc, c = self.accelerator, self.c
        # Every process has checked the output before the main one writes into it (else a slower
        # process finds the run folder just made and refuses it as an existing output).
        acc.wait_for_everyone()
        if not c.chat:  # chat data was checked record by record already
            for source, _ in self.sources:  # before anything is written: an empty source is a user error
                check_source(source, c.text_field)
            if c.eval_data:
                check_source(c.eval_data, c.text_field)
        if self.main:
            self.folder.prepare(resume=self.resume, overwrite=self.overwrite, settings=self.settings)
        acc.wait_for_everyone()

    def _setup_data(self) -> None:
        """The training windows and the held-out ones (each source tokenized once into the token cache)."""
        acc, c = self.accelerator, self.c
        world = acc.num_processes
        if self.stream is not None:  # the windows and their targets come from the cache: nothing to tokenize
            held = self.stream.heldout_windows()
            self.data, self.held = self.stream, held[: (len(held) // world) * world]
            return
        need = self.total_steps * self.batch.global_batch
        n_heldout = c.heldout if self.eval_every else 0
        with acc.main_process_first():
            sources, eval_src, text_field = self.sources, c.eval_data, c.text_field
            if c.chat:  # chat records rendered with the template, then packed like any text
                sources = [(chat_text_source(s, self.tok, self.token_cache), w) for s, w in self.sources]
                eval_src = chat_text_source(c.eval_data, self.tok, self.token_cache) if c.eval_data else None
                text_field = "text"
            say = (lambda m: print(m, file=sys.stderr, flush=True)) if self.main else None
            self.data, held = build_training_data(sources, self.tok, c.seq_len, need, n_heldout, c.seed,
                                                  eval_source=eval_src if c.eval_data else None,
                                                  text_field=text_field, cache=self.token_cache,
                                                  progress=self.progress and self.main, say=say)
        self.held = held[: (len(held) // world) * world]  # every process evaluates the same number of windows

    def _setup_models(self) -> None:
        """The student (fp32 master weights) inside its training objective, and the frozen teacher."""
        acc, c = self.accelerator, self.c
        torch.manual_seed(c.seed)
        if isinstance(self.student, (str, os.PathLike)):
            student = load_model(self.s_spec, self.precision.master)
        else:
            student = self.precision.trainable(self.student)
        teacher = None
        if self.t_cfg is not None and self.cache is None:  # the frozen teacher runs in the compute dtype
            is_path = isinstance(self.teacher, (str, os.PathLike))
            teacher = load_model(self.t_spec, self.precision.compute) if is_path else self.teacher
        if c.gradient_checkpointing:
            # transformers 5 renamed gradient_checkpointing_enable (deprecated) to activation_checkpointing_enable.
            enable = getattr(student, "activation_checkpointing_enable", None) or student.gradient_checkpointing_enable
            enable()
        student.config.use_cache = False
        student.train()
        # Under FSDP2 / ZeRO-3 AdamW keeps torch's default implementation (sharded parameters).
        self.sharded = shards_parameters(acc)
        self._warn_sharded()
        objective = StudentObjective(
            student, c.mode, self.loss, c.temperature, c.ce_weight, self.hidden_loss, self.pairs, c.hidden_weight,
            self.t_cfg.hidden_size if teacher is not None else None, c.chunk_size, router_weight=self.router_weight,
            cached_targets=self.cache is not None,
        )
        # One module runs teacher, student and loss: under FSDP2 / ZeRO-3 it is the root, so every
        # sharded module is called inside the root's forward (see Distillation).
        taps = tuple(t for _, t in self.pairs)
        self.model = Distillation(objective, TeacherForward(teacher, taps) if teacher is not None else None)

    def _warn_sharded(self) -> None:
        acc = self.accelerator
        if self.main and self.sharded and acc.device.type != "cpu":
            print(f"note: slimlm's {acc.distributed_type.value} path is tested on CPU processes (torch 2.11 and 2.13) "
                  "but not yet confirmed on GPUs (bench/gpu.sh, part 5; configs/accelerate/README.md)",
                  file=sys.stderr, flush=True)

    def _setup_optimizer(self) -> None:
        """AdamW and the warm-up + cosine schedule; the model and optimizer prepared by Accelerate."""
        acc, c = self.accelerator, self.c
        params = [p for p in self.model.parameters() if p.requires_grad]  # the teacher is frozen: no optimizer state
        # The fused AdamW kernel (CPU and GPU) steps all parameters at once: ~3x faster than the
        # per-tensor loop torch picks on CPU.  Sharded parameters keep torch's default implementation.
        optimizer = torch.optim.AdamW(params, lr=c.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=c.weight_decay,
                                      fused=not self.sharded or None)
        total, lr, min_lr, warmup = self.total_steps, c.lr, c.min_lr, self.warmup_steps
        # The scheduler is stepped once per optimizer step by the loop (prepare() would step it per process).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                           lambda s: schedule(s, total, lr, min_lr, warmup) / lr)
        set_deepspeed_micro_batch(acc, c.micro_batch)
        with self.model.teacher_in_state_dict():  # FSDP2 loads every shard, the teacher's too, from the main process
            self.model, self.optimizer = acc.prepare(self.model, optimizer)

    def _setup_state(self) -> None:
        """Start (or resume) the step counters, the data position and the metrics file."""
        self.start_step, self.elapsed_before, self.last_eval, self.data_start = 0, 0.0, {}, 0
        self.last_checkpoint = str(self.checkpoint) if self.checkpoint is not None else None
        if self.checkpoint is not None:
            state = load_checkpoint(self.accelerator, self.checkpoint, self.model, self.optimizer, self.scheduler)
            self.start_step, self.elapsed_before = state["step"], state.get("elapsed_s", 0.0)
            self.last_eval = state.get("eval", {})
            # The data position is part of the checkpoint: the stream position of the next window
            # (step x global batch; the window at a position is a pure function of it, no sampler state).
            self.data_start = state.get("data_position", self.start_step * self.batch.global_batch)
            if self.main:
                print(f"resuming from {self.checkpoint.name} (step {self.start_step} of {self.total_steps})",
                      file=sys.stderr, flush=True)
        run = self.folder.run
        self.monitor = Monitor(self.folder.metrics_file, run / "tensorboard" if self.c.tensorboard else None,
                               enabled=self.main, resume_step=self.start_step if self.resume else None)

    def _run(self) -> DistillResult:
        """The loop, then either a checkpoint (stopped early on purpose) or the final validation and export."""
        c = self.c
        end_step = self.total_steps if c.stop_after is None else min(self.total_steps,
                                                                    max(c.stop_after, self.start_step))
        if self.start_step == 0 and self.eval_every:
            self.last_eval = self._validate(0)
        record = self._loop(end_step)
        elapsed = self.elapsed_before + time.perf_counter() - self.t_start
        if end_step < self.total_steps:  # stopped early on purpose: validate there (unless just done), checkpoint
            if self.eval_every and end_step % self.eval_every and end_step > self.start_step:
                self.last_eval = self._validate(end_step)  # the result (and the search's ranking) reports this model
            self.last_checkpoint = self._checkpoint(end_step, elapsed)
            self.monitor.close()
            return self._result(end_step, False, self.last_eval, elapsed)
        final = self._validate(self.total_steps) if len(self.held) else {}
        if self.save_every:
            self.last_checkpoint = self._checkpoint(self.total_steps, elapsed)
        self.monitor.close()
        metrics = {**final, "train_loss": record["loss"] if record is not None else None}
        export_student(self.accelerator, self.model, self.tok, self.folder.out,
                       self._provenance(metrics, elapsed), self.precision.compute)
        return self._result(self.total_steps, True, metrics, elapsed)

    def _loop(self, end_step: int) -> dict | None:
        """Optimizer steps [start_step, end_step) with logging, validation and checkpoints; the last record."""
        bar = progress_bar(self.total_steps, self.start_step, self.progress and self.main, desc="distill")
        self.t_start, self.rate, record = time.perf_counter(), None, None
        try:
            for step in range(self.start_step, end_step):
                record = self._train_step(step)
                self._report(record, bar)
                done = step + 1
                if self.eval_every and done % self.eval_every == 0 and done < self.total_steps:
                    self.last_eval = self._validate(done)
                if self.save_every and done % self.save_every == 0 and done < end_step:
                    self.last_checkpoint = self._checkpoint(done, record["elapsed_s"])
        finally:
            if bar is not None:
                bar.close()
        return record

    def _train_step(self, step: int) -> dict:
        """One optimizer step over the global batch (0-based `step`); its training record."""
        acc, b, c = self.accelerator, self.batch, self.c
        t0 = time.perf_counter()
        lr_now = self.scheduler.get_last_lr()[0]
        # This process reads its own slice of the global batch: positions
        # [step * global_batch + rank * per_process, ... + per_process), micro-batch by micro-batch.
        first = self.data_start + (step - self.start_step) * b.global_batch + acc.process_index * b.per_process
        sums = torch.zeros(5, device=acc.device)
        stats = grad_norm = None
        for m in range(b.accumulation):
            batch = self.data.windows(first + m * b.micro_batch, b.micro_batch)
            with acc.accumulate(self.model):
                res = model_forward(self.model, batch, acc.device)
                acc.backward(res["loss"])
                sums += torch.stack([res["loss"].detach().float(), res["kd"].float(), res["ce"].float(),
                                     res["kl"].float(), res["hidden"].float()])
                if acc.sync_gradients:
                    stats = acc.reduce(sums / b.accumulation, "mean")
                    grad_norm = self._optimizer_step(step + 1, stats[0])
        if acc.device.type == "cuda":  # kernels run asynchronously: time the finished step
            torch.cuda.synchronize(acc.device)
        dt = time.perf_counter() - t0
        done = step + 1
        record = {"event": "train", "step": done, "tokens": done * self.tokens_per_step, "loss": stats[0].item(),
                  "lr": lr_now, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "tokens_per_s": self.tokens_per_step / dt,
                  "elapsed_s": self.elapsed_before + time.perf_counter() - self.t_start}
        if c.mode == "kd":
            record.update(kd=stats[1].item(), kl=stats[3].item())
            if c.ce_weight:
                record["ce"] = stats[2].item()
            if self.hidden_loss:
                record["hidden"] = stats[4].item()
        return record

    def _optimizer_step(self, step: int, loss: torch.Tensor):
        """Clip, step AdamW and the schedule; NonFiniteLossError on a NaN/inf loss or gradient norm (1-based `step`)."""
        if not torch.isfinite(loss):
            raise self._diverged(step, "loss")
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.c.clip)
        if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
            raise self._diverged(step, "gradient norm")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _diverged(self, step: int, what: str) -> NonFiniteLossError:
        if self.last_checkpoint:
            where = (f"the last good checkpoint is {self.last_checkpoint}; rerun with --resume (and a lower --lr) "
                     "to continue from it")
        else:
            where = "no checkpoint was written yet, so the run's files are removed"
        message = f"the {what} became NaN/inf at step {step}; training stopped ({where})"
        self.monitor.log({"event": "error", "step": step, "message": message})
        self.monitor.close()
        return NonFiniteLossError(message)

    def _report(self, record: dict, bar) -> None:
        """The record into metrics.jsonl / TensorBoard, the progress bar and `on_step`."""
        self.monitor.log(record)
        rate = record["tokens_per_s"]
        self.rate = rate if self.rate is None else 0.8 * self.rate + 0.2 * rate
        if bar is not None:
            post = {"loss": f"{record['loss']:.4f}"}
            if "kl" in record:
                post["kl"] = f"{record['kl']:.4f}"
            post["tok/s"] = fmt_rate(self.rate)
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        if self.main and self.on_step is not None:
            self.on_step(record)

    def _validate(self, step: int) -> dict:
        if not len(self.held):
            return {}
        metrics = validation_metrics(self.accelerator, self.model, self.t_cfg is not None or self.cache is not None,
                                     self.held, self.c.micro_batch)
        if self.cache is not None:  # val_kl is the top-K + rest-bucket KL to the cache's targets
            metrics["val_kl_top_k"] = self.cache.top_k
        self.monitor.log({"event": "eval", "step": step, "tokens": step * self.tokens_per_step, **metrics})
        return metrics

    def _checkpoint(self, step: int, elapsed: float) -> str:
        run_state = {"step": step, "tokens": step * self.tokens_per_step, "elapsed_s": elapsed, "eval": self.last_eval,
                     "total_steps": self.total_steps, "data_position": step * self.batch.global_batch}
        path = save_checkpoint(self.accelerator, self.folder.run, step, self.model, self.optimizer,
                               self.scheduler, run_state, keep=self.c.keep_checkpoints)
        return str(path)

    def _result(self, steps: int, complete: bool, metrics: dict, elapsed: float) -> DistillResult:
        return DistillResult(str(self.folder.out), self.c.mode, steps, steps * self.tokens_per_step, complete,
                             metrics, elapsed, self.last_checkpoint)

    def _cache_provenance(self) -> dict:
        if self.cache is None:
            return {}
        return {"teacher_logits": str(self.cache.path), "top_k": self.cache.top_k,
                "validation": f"KL over the teacher's top {self.cache.top_k} tokens plus one bucket for the rest "
                              "(val_kl), from the cache"}

    def _provenance(self, metrics: dict, elapsed: float) -> dict:
        """The `slimlm.json` record: inputs, budget, loss, hyper-parameters, final metrics, versions."""
        c, b = self.c, self.batch
        return {
            "slimlm": provenance.slimlm_version(),
            "kind": "distill" if c.mode == "kd" else "lm-training",
            "created": provenance.now(),
            "teacher": self.t_spec,
            "student": self.s_spec,
            "data": describe_sources(self.sources),
            "chat": bool(c.chat),
            "eval_data": str(c.eval_data) if c.eval_data else None,
            "tokens": self.total_steps * self.tokens_per_step,
            "tokens_requested": c.tokens,
            "steps": self.total_steps,
            "loss": {"mode": c.mode, "kind": self.loss, "temperature": c.temperature, "ce_weight": c.ce_weight,
                     "hidden_loss": self.hidden_loss, "layer_map": [list(p) for p in self.pairs],
                     "hidden_weight": c.hidden_weight, **self._cache_provenance()},
            "hyperparameters": {
                "seq_len": c.seq_len, **b.describe(), "distributed": self.accelerator.distributed_type.value,
                "lr": c.lr, "min_lr": c.min_lr, "warmup_steps": self.warmup_steps, "warmup_requested": c.warmup,
                "schedule": "cosine", "clip": c.clip, "optimizer": "AdamW(0.9, 0.95)",
                "weight_decay": c.weight_decay, "seed": c.seed, **self.precision.describe(),
            },
            "final_metrics": metrics,
            "elapsed_s": round(elapsed, 2),
            "versions": provenance.versions(),
            "parent": provenance.parent_record(self.s_spec),
        }


def model_forward(model, batch, device, metrics: bool = False):
    """`Distillation` on a batch of windows: token ids [B, L] (a tensor or an array), or `CachedWindows`."""
    if isinstance(batch, CachedWindows):
        batch = batch.to(device)
        return model(batch.ids, metrics=metrics, targets=as_module_inputs(batch.targets))
    ids = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(batch.astype("int64"))
    return model(ids.to(device), metrics=metrics)


@torch.no_grad()
def validation_metrics(accelerator, model, use_teacher: bool, held, micro_batch: int) -> dict:
    """Held-out forward KL to the teacher (temperature 1) and the student's LM loss, averaged over tokens.

    `held`: windows [n, L] (the KL to the teacher in `model`), or `CachedWindows` (the top-K +
    rest-bucket KL to the cache's targets).
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = held[rank::world]
    model.eval()
    sums = torch.zeros(4, device=accelerator.device)
    for i in range(0, len(mine), micro_batch):
        sums += model_forward(model, mine[i:i + micro_batch], accelerator.device, metrics=True)
    model.train()
    sums = accelerator.reduce(sums, "sum")
    lm = (sums[1] / sums[3]).item()
    metrics = {"val_lm_loss": lm, "val_ppl": math.exp(min(lm, 50.0))}
    if use_teacher:
        metrics = {"val_kl": (sums[0] / sums[2]).item(), **metrics}
    return metrics
