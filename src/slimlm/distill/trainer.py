"""The distillation trainer: `distill()` trains a student on a teacher's output distribution.

One loop serves two modes:
- ``mode="kd"``: the Minitron loss (forward KL on the logits by default), teacher frozen;
- ``mode="lm"``: plain next-token LM loss (teacher correction, LM-loss baselines).

Accelerate handles device placement, mixed precision, gradient accumulation and multiple
processes, so the same code runs on one CPU and under ``accelerate launch`` (DDP, FSDP2,
DeepSpeed ZeRO-3).  Everything a user can get wrong is checked before any model loads.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .._io import check_writable_output
from ..config import DEFAULT_CORPUS, CorrectConfig, DistillConfig
from ..data import check_source
from ..errors import SlimlmError
from ..models import load_config, load_model, load_tokenizer, pick_dtype
from .accel import check_fsdp_version, cpu_only, reset_accelerate, set_deepspeed_micro_batch, shards_parameters
from .checkpoint import latest_checkpoint, load_checkpoint, prepare_run_dir, save_checkpoint
from .export import export_student, provenance
from ..chat import ensure_chat_template, read_conversations, render_chat_texts, template_hash, template_text
from .data import build_training_data, chat_text_source, describe_sources, parse_sources, tokenizer_fingerprint
from .tokens import usable_token_cache
from .loss import check_loss_name
from .modules import Distillation, StudentObjective, TeacherForward, parse_layer_map
from .monitor import Monitor, fmt_rate, progress_bar

MODES = ("kd", "lm")
HIDDEN_LOSSES = ("cosine",)
WARMUP_FRACTION = 0.1  # tiny budgets: warm-up takes at most this share of the steps


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


def schedule(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine to `min_lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def effective_warmup(warmup: int, total_steps: int) -> int:
    """Warm-up clamped to WARMUP_FRACTION of the run (40 warm-up steps in a 50-step run would never decay)."""
    return max(0, min(warmup, int(total_steps * WARMUP_FRACTION)))


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


def _max_positions(config) -> int | None:
    return getattr(config, "max_position_embeddings", None)


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
    """Distill `teacher` into `student` with the settings of `config` (a `DistillConfig`) and `overrides`.

    `data` and `tokens` are overrides too, given positionally for short calls:
    ``distill("smollm2-135m", "pruned", "corpus.txt", "out", "100k")``.  See `_distill` for what
    each setting does; `resume`, `overwrite`, `progress`, `on_step` and `tokenizer` are per call.
    """
    if data is not None:
        overrides["data"] = data
    if tokens is not None:
        overrides["tokens"] = tokens
    c = DistillConfig.make(config, **overrides)
    settings = c.as_dict()
    return _distill(teacher, student, settings.pop("data") or DEFAULT_CORPUS, out, settings.pop("tokens"),
                    resume=resume, overwrite=overwrite, progress=progress, on_step=on_step, tokenizer=tokenizer,
                    **settings)


def correct_teacher(model, out: str | os.PathLike = "corrected", config: CorrectConfig | None = None, *,
                    resume: bool = False, overwrite: bool = False, progress: bool = True, **overrides) -> DistillResult:
    """Teacher correction: train `model` with the LM loss on the distillation data (a `CorrectConfig`)."""
    c = CorrectConfig.make(config, **overrides)
    settings = c.as_dict()
    settings["min_lr"] = c.final_min_lr()
    return _distill(None, model, settings.pop("data") or DEFAULT_CORPUS, out, settings.pop("tokens"),
                    resume=resume, overwrite=overwrite, progress=progress, **settings)


def _distill(
    teacher,
    student,
    data=DEFAULT_CORPUS,
    out: str | os.PathLike = "distilled",
    tokens: int = 100_000,
    *,
    seq_len: int = 512,
    micro_batch: int = 4,
    global_batch: int | None = None,
    lr: float = 1e-4,
    min_lr: float = 1e-5,
    warmup: int = 40,
    clip: float = 1.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    loss: str = "kl",
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    hidden_loss: str | None = None,
    layer_map=None,
    hidden_weight: float = 1.0,
    eval_every: int | None = None,
    heldout: int = 16,
    eval_data=None,
    save_every: int | None = None,
    keep_checkpoints: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    dtype: str = "auto",
    mode: str = "kd",
    text_field: str = "text",
    tokenizer=None,
    chat: bool = False,
    chunk_size: int = 512,
    gradient_checkpointing: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    tensorboard: bool = True,
    on_step: Callable[[dict], None] | None = None,
    data_weights=None,
    token_cache: str | os.PathLike | None = None,
) -> DistillResult:
    """Distill `teacher` into `student` (mode 'kd'), or train `student` with the LM loss (mode 'lm').

    Args:
        teacher, student: model names/folders/aliases (as `slimlm.models.load_model` takes) or
            loaded Hugging Face models (a model object is trained in place). `teacher` may be
            None in mode 'lm'; given there, validation also reports the KL to it.
        data: training text source (see `slimlm.data`), or several mixed: a list (equal weights, or
            `data_weights` with one weight per source) or a dict ``{source: weight}``.  Weights are
            relative; the windows of the sources are interleaved in a seeded order that keeps the
            proportions.  `eval_data` is an optional separate held-out source (default: the windows
            right after each source's training windows, `heldout` in all).
        token_cache: folder of the token caches (default $SLIMLM_TOKEN_CACHE or ~/.cache/slimlm/tokens):
            every source is tokenized once into memory-mapped shards there and reused by later runs.
        out: output folder; in the end a standard Hugging Face checkpoint with `slimlm.json`,
            `metrics.jsonl` and the run state under `run/` (checkpoints, TensorBoard).
        tokens: training budget; steps = ceil(tokens / (global_batch * seq_len)).
        micro_batch: windows per forward per process; `global_batch` windows per optimizer step
            (default micro_batch x processes; the rest is gradient accumulation).
        lr, min_lr, warmup: peak LR, final LR, warm-up steps (clamped to 10 % of the steps), cosine decay.
        loss: 'kl' (forward KL, Minitron), 'reverse-kl' or 'jsd'; `temperature`, `ce_weight`
            (weight of a student cross-entropy term); `hidden_loss='cosine'` adds a cosine loss
            between mapped intermediate states (`layer_map` 'student:teacher,...', default evenly spaced).
        eval_every: validate every N steps (default: 10 times per run; 0 turns it off).
        save_every: checkpoint every N steps (default: total/10 within [25, 1000]; 0: never); `resume`
            continues from the newest checkpoint in `out` at the exact data position.
        dtype: 'auto' (fp32 on CPU, bf16 mixed precision on GPUs), 'fp32', 'bf16', 'fp16'.
        chat: `data` (and `eval_data`) are chat records, JSONL of ``{"messages": [...]}``, rendered with
            the chat template (the student's, else the teacher's) before packing: an instruct teacher
            then yields an instruct student directly.  The teacher's chat template is saved with the
            student whenever the student has none.
        chunk_size: tokens per chunk of the loss (LM head applied inside, each chunk's logit
            gradient taken in the forward; checkpointed and recomputed under FSDP2 / ZeRO-3);
            0 for one chunk of all tokens (full-logit memory).
        gradient_checkpointing: recompute the student's decoder layers in backward (less memory).
        stop_after: stop (with a checkpoint, no export) after this many optimizer steps in total,
            for time-boxed jobs; run again with `resume=True` to continue.
        on_step: called on the main process with each training metrics record.

    Returns a `DistillResult`.  Raises `SlimlmError` for user mistakes (before any work) and
    `NonFiniteLossError` when the loss diverges.
    """
    # ---- 1. arguments (cheap checks first) ---------------------------------------------------
    if mode not in MODES:
        raise SlimlmError(f"unknown mode '{mode}' (choose from {', '.join(MODES)})")
    loss = check_loss_name(loss) if mode == "kd" else "none"
    if loss == "none" and mode == "kd":
        raise SlimlmError("mode 'kd' needs a distillation loss (kl, reverse-kl or jsd)")
    if hidden_loss is not None:
        hidden_loss = str(hidden_loss).lower()
        if hidden_loss in ("", "none"):
            hidden_loss = None
        elif hidden_loss not in HIDDEN_LOSSES:
            raise SlimlmError(f"unknown hidden loss '{hidden_loss}' (choose from {', '.join(HIDDEN_LOSSES)})")
        elif mode == "lm":
            raise SlimlmError("--hidden-loss needs mode 'kd' (a teacher to match)")
    for name, value, low in (("tokens", tokens, 1), ("seq-len", seq_len, 2), ("micro-batch", micro_batch, 1),
                             ("heldout", heldout, 0), ("chunk-size", chunk_size, 0)):
        if not isinstance(value, int) or value < low:
            raise SlimlmError(f"--{name} must be an integer >= {low}, got {value}")
    if not (lr > 0) or min_lr < 0 or min_lr > lr:
        raise SlimlmError(f"need 0 <= min-lr <= lr and lr > 0, got lr={lr}, min-lr={min_lr}")
    if warmup < 0 or clip <= 0 or temperature <= 0 or ce_weight < 0 or hidden_weight < 0 or weight_decay < 0:
        raise SlimlmError("warmup, ce-weight, hidden-weight, weight-decay must be >= 0; clip and temperature > 0")
    if teacher is None and mode == "kd":
        raise SlimlmError("distillation needs a teacher")
    sources = parse_sources(data, data_weights)
    token_cache = usable_token_cache(token_cache)

    from accelerate import PartialState

    cpu = cpu_only()
    world = PartialState(cpu=cpu).num_processes
    global_batch = global_batch or micro_batch * world
    if global_batch % (micro_batch * world):
        raise SlimlmError(
            f"--global-batch {global_batch} is not a multiple of micro-batch x processes = {micro_batch} x {world}"
        )
    accum = global_batch // (micro_batch * world)
    total_steps = max(1, math.ceil(tokens / (global_batch * seq_len)))
    warmup_steps = effective_warmup(warmup, total_steps)
    eval_every = max(1, total_steps // 10) if eval_every is None else eval_every
    # Default: about 10 checkpoints a run, but not more often than every 25 steps nor rarer than 1000.
    save_every = min(1000, max(25, total_steps // 10)) if save_every is None else save_every

    # ---- 2. output ---------------------------------------------------------------------------
    out = Path(out).expanduser()
    run_dir = out / "run"
    t_spec, t_cfg = _spec_and_config(teacher, "teacher")
    s_spec, s_cfg = _spec_and_config(student, "student")
    for spec in (t_spec, s_spec):
        if spec and Path(spec).expanduser().exists() and Path(spec).expanduser().resolve() == out.resolve():
            raise SlimlmError(f"the output {out} is one of the input models; choose another folder")
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise SlimlmError(f"nothing to resume in {out} (no checkpoint under {run_dir / 'checkpoints'})")
    if not resume:
        unfinished = (run_dir / "checkpoints").exists() and not (out / "slimlm.json").exists()
        if unfinished and not overwrite:
            raise SlimlmError(f"output {out} holds an unfinished run: pass --resume to continue it or --overwrite")
        check_writable_output(out, overwrite=overwrite, inputs=(t_spec, s_spec, eval_data, *(s for s, _ in sources)))

    # ---- 3. models' configs and tokenizers -------------------------------------------------
    s_tok = tokenizer or _tokenizer_for(s_spec)
    t_tok = _tokenizer_for(t_spec) if t_cfg is not None else None
    tok = s_tok or t_tok
    if tok is None:
        raise SlimlmError("no tokenizer found with the student or the teacher; pass one")
    if t_cfg is not None:
        _check_compatible(t_cfg, s_cfg, t_tok, s_tok)
    if t_tok is not None and template_text(tok) is None and template_text(t_tok) is not None:
        tok.chat_template = template_text(t_tok)  # the teacher's chat template goes with the student
    if chat:
        if data is None or any(s == DEFAULT_CORPUS for s, _ in sources):
            raise SlimlmError("--chat needs --data FILE.jsonl of {\"messages\": [...]} records")
        ensure_chat_template(tok, what="the student (and the teacher)")
        for source in [s for s, _ in sources] + [eval_data]:
            if source is not None:
                render_chat_texts(read_conversations(source, need_assistant=False), tok)  # every record renders
    if len(tok) > s_cfg.vocab_size:
        raise SlimlmError(f"the tokenizer has {len(tok)} tokens but the student only {s_cfg.vocab_size} embeddings")
    for role, cfg in (("student", s_cfg), ("teacher", t_cfg)):
        limit = _max_positions(cfg) if cfg is not None else None
        if limit is not None and seq_len > limit:
            raise SlimlmError(f"--seq-len {seq_len} exceeds the {role}'s max_position_embeddings ({limit})")
    pairs = []
    if hidden_loss:
        pairs = parse_layer_map(layer_map, s_cfg.num_hidden_layers, t_cfg.num_hidden_layers)

    settings = dict(
        mode=mode, teacher=t_spec, student=s_spec,
        data=str(data) if data is None or isinstance(data, (str, os.PathLike)) else describe_sources(sources),
        eval_data=str(eval_data) if eval_data else None,
        tokens=tokens, seq_len=seq_len, micro_batch=micro_batch, global_batch=global_batch, lr=lr, min_lr=min_lr,
        warmup=warmup, clip=clip, weight_decay=weight_decay, seed=seed, loss=loss, temperature=temperature,
        ce_weight=ce_weight, hidden_loss=hidden_loss, layer_map=[list(p) for p in pairs], hidden_weight=hidden_weight,
        dtype=str(dtype), heldout=heldout, tokenizer=tokenizer_fingerprint(tok),
    )
    if chat:
        settings.update(chat=True, chat_template=template_hash(template_text(tok)))
    if resume:
        _check_same_run(run_dir, settings)

    # ---- 4. the accelerator (the rest runs in _run, which always releases it) -------------
    from accelerate import Accelerator

    compute_dtype = pick_dtype(dtype)
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(compute_dtype, "no")
    accelerator = Accelerator(gradient_accumulation_steps=accum, mixed_precision=mixed, cpu=cpu,
                              step_scheduler_with_optimizer=False)
    if accelerator.gradient_accumulation_steps != accum:
        # An accelerate config / ACCELERATE_GRADIENT_ACCUMULATION_STEPS overrides what we pass.
        got = accelerator.gradient_accumulation_steps
        reset_accelerate()
        raise SlimlmError(
            f"the accelerate config sets gradient accumulation to {got}, but --global-batch {global_batch} needs "
            f"{accum}; remove gradient_accumulation_steps from the accelerate config"
        )
    try:
        check_fsdp_version(accelerator)
    except SlimlmError:
        reset_accelerate()
        raise
    try:
        return _run(**locals())
    finally:
        reset_accelerate()


def _run(accelerator, **kw) -> DistillResult:
    """The part of `distill` after validation (kept apart so the accelerator is always released)."""
    g = _Namespace(kw)
    g.distributed = accelerator.distributed_type.value  # recorded in slimlm.json
    main = accelerator.is_main_process
    out, run_dir = g.out, g.run_dir
    # Every process has checked the output before the main one writes into it (else a slower
    # process finds the run folder just made and refuses it as an existing output).
    accelerator.wait_for_everyone()
    if not g.chat:  # chat data was checked record by record already
        for source, _ in g.sources:  # before anything is written: an empty source is a user error
            check_source(source, g.text_field)
        if g.eval_data:
            check_source(g.eval_data, g.text_field)
    if main:
        prepare_run_dir(out, run_dir, resume=g.resume, overwrite=g.overwrite, settings=g.settings)
    accelerator.wait_for_everyone()

    # ---- 5. data (each source tokenized once into the token cache, read memory-mapped) -----
    need = g.total_steps * g.global_batch
    n_heldout = g.heldout if g.eval_every else 0
    with accelerator.main_process_first():
        sources, eval_src, field = g.sources, g.eval_data, g.text_field
        if g.chat:  # chat records rendered with the template, then packed like any text
            sources = [(chat_text_source(s, g.tok, g.token_cache), w) for s, w in g.sources]
            eval_src = chat_text_source(g.eval_data, g.tok, g.token_cache) if g.eval_data else None
            field = "text"
        say = (lambda m: print(m, file=sys.stderr, flush=True)) if main else None
        data, held = build_training_data(sources, g.tok, g.seq_len, need, n_heldout, g.seed,
                                         eval_source=eval_src if g.eval_data else None, text_field=field,
                                         cache=g.token_cache, progress=g.progress and main, say=say)
    world, rank = accelerator.num_processes, accelerator.process_index
    n_heldout = (len(held) // world) * world  # every process evaluates the same number of windows
    held = held[:n_heldout]

    # ---- 6. models ---------------------------------------------------------------------
    torch.manual_seed(g.seed)
    # Mixed precision keeps fp32 master weights for the student; the frozen teacher runs in the compute dtype.
    s_model = g.student if not isinstance(g.student, (str, os.PathLike)) else load_model(
        g.s_spec, torch.float32 if g.mixed != "no" else g.compute_dtype)
    use_teacher = g.t_cfg is not None
    t_model = None
    if use_teacher:
        t_model = g.teacher if not isinstance(g.teacher, (str, os.PathLike)) else load_model(g.t_spec, g.compute_dtype)
    if g.gradient_checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable (deprecated) to activation_checkpointing_enable.
        enable = getattr(s_model, "activation_checkpointing_enable", None) or s_model.gradient_checkpointing_enable
        enable()
    s_model.config.use_cache = False
    s_model.train()
    # Under FSDP2 / ZeRO-3 AdamW keeps torch's default implementation (sharded parameters).
    sharded = shards_parameters(accelerator)
    if main and sharded and accelerator.device.type != "cpu":
        print(f"note: slimlm's {g.distributed} path is tested on CPU processes (torch 2.11 and 2.13) but not yet "
              "confirmed on GPUs (bench/gpu.sh, part 5; configs/accelerate/README.md)", file=sys.stderr, flush=True)
    # One module runs teacher, student and loss: under FSDP2 / ZeRO-3 it is the root, so every
    # sharded module is called inside the root's forward (see Distillation).
    objective = StudentObjective(
        s_model, g.mode, g.loss, g.temperature, g.ce_weight, g.hidden_loss, g.pairs, g.hidden_weight,
        g.t_cfg.hidden_size if use_teacher else None, g.chunk_size,
    )
    model = Distillation(objective, TeacherForward(t_model, tuple(t for _, t in g.pairs)) if use_teacher else None)
    params = [p for p in model.parameters() if p.requires_grad]  # the teacher is frozen: no optimizer state
    # The fused AdamW kernel (CPU and GPU) steps all parameters at once: ~3x faster than the
    # per-tensor loop torch picks on CPU.
    optimizer = torch.optim.AdamW(params, lr=g.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=g.weight_decay,
                                  fused=not sharded or None)
    sched_fn = lambda s: schedule(s, g.total_steps, g.lr, g.min_lr, g.warmup_steps) / g.lr  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, sched_fn)
    set_deepspeed_micro_batch(accelerator, g.micro_batch)
    with model.teacher_in_state_dict():  # FSDP2 loads every shard, the teacher's too, from the main process
        model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler counts optimizer steps itself (prepare() would step it once per process).
    accelerator.register_for_checkpointing(scheduler)

    start_step, elapsed_before, last_eval = 0, 0.0, {}
    data_start = 0
    if g.ckpt is not None:
        state = load_checkpoint(accelerator, g.ckpt)
        start_step, elapsed_before, last_eval = state["step"], state.get("elapsed_s", 0.0), state.get("eval", {})
        # The data position is part of the checkpoint: the stream position of the next window
        # (step x global batch; the window at a position is a pure function of it, no sampler state).
        data_start = state.get("data_position", start_step * g.global_batch)
        if main:
            print(f"resuming from {g.ckpt.name} (step {start_step} of {g.total_steps})", file=sys.stderr, flush=True)
    monitor = Monitor(out / "metrics.jsonl", run_dir / "tensorboard" if g.tensorboard else None, enabled=main,
                      resume_step=start_step if g.resume else None)
    tokens_per_step = g.global_batch * g.seq_len

    def evaluate(step: int) -> dict:
        if not len(held):
            return {}
        metrics = _evaluate(accelerator, model, use_teacher, held, g.micro_batch)
        monitor.log({"event": "eval", "step": step, "tokens": step * tokens_per_step, **metrics})
        return metrics

    def checkpoint(step: int, elapsed: float) -> str:
        path = save_checkpoint(accelerator, run_dir, step, {"step": step, "tokens": step * tokens_per_step,
                                                            "elapsed_s": elapsed, "eval": last_eval,
                                                            "total_steps": g.total_steps,
                                                            "data_position": step * g.global_batch},
                               keep=g.keep_checkpoints)
        return str(path)

    # ---- 7. the loop -------------------------------------------------------------------
    if start_step == 0 and g.eval_every:
        last_eval = evaluate(0)
    bar = progress_bar(g.total_steps, start_step, g.progress and main)
    per_proc = g.micro_batch * g.accum
    end_step = g.total_steps if g.stop_after is None else min(g.total_steps, max(g.stop_after, start_step))
    t_start = time.perf_counter()
    rate = None
    last_ckpt = str(g.ckpt) if g.ckpt is not None else None
    try:
        for step in range(start_step, end_step):
            t0 = time.perf_counter()
            lr_now = scheduler.get_last_lr()[0]
            # This process reads its own slice of the global batch: positions
            # [step * global_batch + rank * per_proc, ... + per_proc), micro-batch by micro-batch.
            first = data_start + (step - start_step) * g.global_batch + rank * per_proc
            sums = torch.zeros(5, device=accelerator.device)
            grad_norm = None
            for m in range(g.accum):
                ids = data.windows(first + m * g.micro_batch, g.micro_batch).to(accelerator.device)
                with accelerator.accumulate(model):
                    res = model(ids)
                    accelerator.backward(res["loss"])
                    sums += torch.stack([res["loss"].detach().float(), res["kd"].float(), res["ce"].float(),
                                         res["kl"].float(), res["hidden"].float()])
                    if accelerator.sync_gradients:
                        stats = accelerator.reduce(sums / g.accum, "mean")
                        if not torch.isfinite(stats[0]):
                            raise _diverged(step + 1, "loss", last_ckpt, monitor)
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), g.clip)
                        if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
                            raise _diverged(step + 1, "gradient norm", last_ckpt, monitor)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if accelerator.device.type == "cuda":  # kernels run asynchronously: time the finished step
                torch.cuda.synchronize(accelerator.device)
            dt = time.perf_counter() - t0
            rate = tokens_per_step / dt if rate is None else 0.8 * rate + 0.2 * tokens_per_step / dt
            elapsed = elapsed_before + time.perf_counter() - t_start
            record = {"event": "train", "step": done, "tokens": done * tokens_per_step,
                      "loss": stats[0].item(), "lr": lr_now,
                      "grad_norm": float(grad_norm) if grad_norm is not None else None,
                      "tokens_per_s": tokens_per_step / dt, "elapsed_s": elapsed}
            if g.mode == "kd":
                record.update(kd=stats[1].item(), kl=stats[3].item())
                if g.ce_weight:
                    record["ce"] = stats[2].item()
                if g.hidden_loss:
                    record["hidden"] = stats[4].item()
            monitor.log(record)
            if bar is not None:
                post = {"loss": f"{record['loss']:.4f}"}
                if "kl" in record:
                    post["kl"] = f"{record['kl']:.4f}"
                post["tok/s"] = fmt_rate(rate)
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if main and g.on_step is not None:
                g.on_step(record)
            if g.eval_every and done % g.eval_every == 0 and done < g.total_steps:
                last_eval = evaluate(done)
            if g.save_every and done % g.save_every == 0 and done < end_step:
                last_ckpt = checkpoint(done, elapsed)
    finally:
        if bar is not None:
            bar.close()

    elapsed = elapsed_before + time.perf_counter() - t_start
    if end_step < g.total_steps:  # stopped early on purpose: validate there (unless just done), checkpoint, no export
        if g.eval_every and end_step % g.eval_every and end_step > start_step:
            last_eval = evaluate(end_step)  # the result (and the search's ranking) reports the model it stopped with
        last_ckpt = checkpoint(end_step, elapsed)
        monitor.close()
        return DistillResult(str(out), g.mode, end_step, end_step * tokens_per_step, False, last_eval, elapsed, last_ckpt)

    # ---- 8. final validation and export --------------------------------------------------
    final = evaluate(g.total_steps) if len(held) else {}
    if g.save_every:
        last_ckpt = checkpoint(g.total_steps, elapsed)
    monitor.close()
    metrics = {**final, "train_loss": record["loss"] if end_step > start_step else None}
    meta = provenance(g, metrics, elapsed)
    export_student(accelerator, model, g.tok, out, meta, g.compute_dtype)
    return DistillResult(str(out), g.mode, g.total_steps, g.total_steps * tokens_per_step, True, metrics, elapsed,
                         last_ckpt)


class _Namespace:
    def __init__(self, d):
        self.__dict__.update(d)


def _check_same_run(run_dir: Path, settings: dict) -> None:
    """--resume must continue the same run: the settings that shape training must match."""
    import json

    path = run_dir / "config.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    differ = [k for k in settings if k in saved and saved[k] != settings[k]]
    if differ:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {settings[k]!r}" for k in differ)
        raise SlimlmError(f"--resume with different settings than the run in {run_dir.parent} ({detail})")


def _diverged(step: int, what: str, last_ckpt: str | None, monitor: Monitor) -> NonFiniteLossError:
    where = f"the last good checkpoint is {last_ckpt}; rerun with --resume (and a lower --lr) to continue from it" \
        if last_ckpt else "no checkpoint was written yet"
    message = f"the {what} became NaN/inf at step {step}; training stopped ({where})"
    monitor.log({"event": "error", "step": step, "message": message})
    monitor.close()
    return NonFiniteLossError(message)


@torch.no_grad()
def _evaluate(accelerator, model, use_teacher: bool, held, micro_batch: int) -> dict:
    """Held-out forward KL to the teacher (temperature 1) and the student's LM loss, averaged over tokens."""
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = held[rank::world]
    model.eval()
    sums = torch.zeros(4, device=accelerator.device)
    for i in range(0, len(mine), micro_batch):
        ids = torch.from_numpy(mine[i:i + micro_batch].astype("int64")).to(accelerator.device)
        sums += model(ids, metrics=True)
    model.train()
    sums = accelerator.reduce(sums, "sum")
    lm = (sums[1] / sums[3]).item()
    metrics = {"val_lm_loss": lm, "val_ppl": math.exp(min(lm, 50.0))}
    if use_teacher:
        metrics = {"val_kl": (sums[0] / sums[2]).item(), **metrics}
    return metrics
