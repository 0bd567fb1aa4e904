"""Every setting of every command, declared once.

A command's settings are one dataclass; each field holds the setting's type, default and
help text (and, where it matters, its flag, lower bound and parser).  Everything else is
derived from these classes:

- the command line: `slimlm.cli.settings_command` turns the fields into typer options;
- the recipe schema: `slimlm.recipe` validates each YAML section against its class, with
  the same types and defaults;
- the Python API: functions take a config object, or keyword overrides of its defaults
  (``slimlm.api.prune("m", "out", hidden=384)``).

Settings shared by several commands (the data source, the seed, the dtype, ...) are declared
by one function each below and used as the field of every class that has them.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from .errors import SlimlmError

DEFAULT_CORPUS = "builtin:python-docs"

# ---- parsers: text a user types -> the value a setting holds ----------------------------------

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(text, what: str = "--tokens") -> int:
    """'100000', '1e5', '100k', '2.5M', '94B' (or an int) -> an integer."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if isinstance(text, float) and text == int(text):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", str(text).lower())
    if not m:
        raise SlimlmError(f"{what} must be a number like 100000, 1e5, 250k or 2M, got '{text}'")
    return int(round(float(m.group(1)) * _SUFFIX[m.group(2)]))


def parse_ints(text, what: str) -> tuple[int, ...]:
    """'8,12' (or a list of ints) -> (8, 12)."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [x for x in str(text).split(",") if x.strip()]
    try:
        return tuple(int(x) for x in items)
    except (TypeError, ValueError):
        raise SlimlmError(f"{what} expects comma-separated integers, got '{text}'") from None


def parse_assignments(items, what: str) -> dict[str, str]:
    """['hellaswag=PATH', ...] (or a dict) -> {'hellaswag': 'PATH'}."""
    if isinstance(items, dict):
        return {str(k): str(v) for k, v in items.items()}
    out = {}
    for item in [items] if isinstance(items, str) else items:
        name, sep, value = str(item).partition("=")
        if not sep or not name or not value:
            raise SlimlmError(f"{what} expects NAME=PATH, got '{item}'")
        out[name.strip()] = value.strip()
    return out


# ---- the declaration helper ------------------------------------------------------------------


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    short: str | None = None,
    min: float | None = None,
    above: float | None = None,
    parse=None,
    cli_type=None,
    recipe_types: tuple | None = None,
    cli: bool = True,
    recipe: bool = True,
    shared: bool = False,
    required: bool = False,
    metavar: str | None = None,
):
    """One setting: its default and help, and how the CLI and the recipe present it.

    flag / short: the option's names (default ``--field-name``; ``--x/--no-x`` for booleans
    that default to True); min / above: the value must be >= min / > above (None passes);
    parse: turns what a user typed (CLI text, a recipe string) into the value, e.g. '100k' ->
    100000; cli_type / recipe_types: what the CLI reads and the recipe accepts when they
    differ from the field's type; cli / recipe: whether the setting appears there; shared: in a
    recipe it is a top-level key, common to every stage, not a key of the section; required:
    the command needs it (a CLI option without default; the recipe section must give it).
    """
    meta = dict(help=help, flag=flag, short=short, min=min, above=above, parse=parse, cli_type=cli_type,
                recipe_types=recipe_types, cli=cli, recipe=recipe, shared=shared, required=required,
                metavar=metavar)
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed; use a tuple or None")
    return field(default=default, metadata=meta)


# Settings that several commands share: one declaration each.

DATA_HELP = ("Text source: .txt/.jsonl/.parquet/.csv files, folders, globs, a saved `datasets` folder, "
             "hf:NAME[:CONFIG][@SPLIT]; repeat to mix several (default: builtin:python-docs, which ships with Python).")


def parse_sources(value, what: str = "--data"):
    """What --data holds: None (the default corpus), one source, several (a list) or a {source: weight} dict."""
    if isinstance(value, (list, tuple)):
        if not value:
            return None
        return str(value[0]) if len(value) == 1 else [str(v) for v in value]
    return value


def _data():
    return setting(None, DATA_HELP, short="-d", parse=parse_sources, cli_type=Optional[list[str]],
                   recipe_types=(str, list), shared=True, metavar="SOURCE")


def _text_field():
    return setting("text", "Field holding the text in JSONL/Parquet/CSV/datasets sources.", shared=True)


def _seed():
    return setting(0, "Seed of window sampling, data order, initialisation and random baselines.", min=0, shared=True)


def _dtype():
    return setting("auto", "auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16.", shared=True)


def _data_weights(**kw):
    return setting(
        None, "Mixing weights, one per --data in the same order, comma-separated: 0.7,0.3 (relative; the windows "
              "are interleaved in a seeded order that keeps these proportions).",
        cli_type=Optional[str], recipe_types=(str, list), **kw)


def _eval_data(**kw):
    return setting(None, "Separate held-out text source (default: windows after the training ones).", **kw)


def _token_cache(**kw):
    return setting(
        None, "Folder of the token caches (default $SLIMLM_TOKEN_CACHE or ~/.cache/slimlm/tokens); each source is "
              "tokenized once there and reused. Delete it to clear the cache.", **kw)


def _count(default, help, **kw):
    return setting(default, help, parse=parse_count, cli_type=str, recipe_types=(int, str), **kw)


# ---- one class per command ---------------------------------------------------------------------


class Settings:
    """Base of the config classes: construction from overrides, validation, a plain dict."""

    @classmethod
    def make(cls, config=None, **overrides):
        """`config` (or the defaults) with `overrides` applied, parsed and checked."""
        base = config if config is not None else cls()
        if not isinstance(base, cls):
            raise TypeError(f"expected a {cls.__name__}, got {type(base).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"{cls.__name__} has no setting {', '.join(sorted(unknown))}")
        return dataclasses.replace(base, **overrides).checked()

    def checked(self):
        """A copy with every parser applied (e.g. tokens '100k' -> 100000), after the declared checks."""
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            parse = f.metadata.get("parse")
            if parse is not None and value is not None:
                value = parse(value, flag_of(f))
            check_bounds(f, value, flag_of(f))
            values[f.name] = value
        return dataclasses.replace(self, **values)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def settings(cls, *, where: str | None = None) -> list[dataclasses.Field]:
        """The fields shown on the CLI (`where='cli'`) or in a recipe section (`where='recipe'`)."""
        return [f for f in fields(cls) if where is None or f.metadata.get(where, True)]


def flag_of(f: dataclasses.Field) -> str:
    """The CLI flag of a setting ('--seq-len'), the name its error messages use."""
    flag = f.metadata.get("flag")
    if flag:
        return flag.split("/")[0]
    return "--" + f.name.replace("_", "-")


def check_bounds(f: dataclasses.Field, value, name: str) -> None:
    """The declared lower bounds of a setting (`min`, `above`); SlimlmError naming it.  No setting
    takes NaN or infinity ('--lr inf' parses as a float but would only train to NaN)."""
    low, above = f.metadata.get("min"), f.metadata.get("above")
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise SlimlmError(f"{name} must be a finite number, got {value}")
    if low is not None and not value >= low:
        raise SlimlmError(f"{name} must be at least {low:g}, got {value}")
    if above is not None and not value > above:
        raise SlimlmError(f"{name} must be greater than {above:g}, got {value}")


@dataclass(frozen=True)
class ImportanceConfig(Settings):
    """Calibration and importance estimation (`slimlm importance`, and the pass `prune` and `search` run)."""

    data: Any = _data()
    text_field: str = _text_field()
    calib_samples: int = setting(128, "Calibration windows for the hooked pass (paper: 1024).", min=1)
    seq_len: int = setting(256, "Tokens per calibration window.", min=2)
    heldout: int = setting(8, "Extra held-out windows for the LM-loss depth metrics (0: skip them).", min=0)
    batch_size: int = setting(8, "Windows per forward pass.", min=1)
    kind: str = setting("activation", "activation (Minitron), or the baselines magnitude, random.", flag="--importance")
    aggregation: str = setting("mean,l2", "Reduction over sequence, then batch: SEQ in mean/l2/var, BATCH in l2/mean/var.")
    depth_loss: Optional[bool] = setting(
        None, "Measure the LM-loss increase when each layer alone is removed (default: when pruning needs it; "
              "`slimlm importance` always does).", flag="--depth-loss/--no-depth-loss")
    block_sizes: tuple = setting(
        (), "Comma-separated K: also score every window of K consecutive layers (for --depth-metric block).",
        parse=parse_ints, cli_type=str, recipe_types=(str, list))
    seed: int = _seed()
    dtype: str = _dtype()
    device_map: Optional[str] = setting(
        None, "Accelerate device map, e.g. 'auto' to spread a large model over GPUs and CPU (default: auto when a "
              "GPU is present).")
    offload: str = setting(
        "auto", "layers: read the decoder layers one at a time from the checkpoint (memory: one layer, the "
                "embeddings and the calibration hidden states); auto: do so when the model would not fit in "
                "memory; none: load the whole model.")


@dataclass(frozen=True)
class PruneConfig(Settings):
    """The target shape of `slimlm prune` (None keeps an axis whole)."""

    hidden: Optional[int] = setting(None, "Hidden (embedding) channels to keep.", min=1)
    ffn: Optional[int] = setting(None, "MLP neurons to keep in every layer.", min=1)
    heads: Optional[int] = setting(None, "Query heads to keep in every layer (same number in every KV group).", min=1)
    kv_heads: Optional[int] = setting(
        None, "Key/value heads to keep (default: all; NVIDIA found KV pruning harmful).", min=1)
    layers: Optional[int] = setting(None, "Layers to keep, chosen by --depth-metric.", min=1)
    drop_layers: Optional[str] = setting(None, "Layers to remove by index, e.g. 20-25 or 3,7 (0-based, inclusive).")
    depth_metric: str = setting(
        "block", "block (best contiguous block by LM loss), loss (one layer out), bi (block importance).")
    experts: Optional[int] = setting(
        None, "MoE: routed experts to keep in every MoE layer (router rows sliced, top-k clamped).", min=1)
    moe_ffn: Optional[int] = setting(None, "MoE: neurons to keep in every routed expert (each keeps its own best).", min=1)
    shared_ffn: Optional[int] = setting(None, "MoE: neurons to keep in the shared expert.", min=1)
    mamba_heads: Optional[int] = setting(
        None, "Hybrids: Mamba heads to keep in every Mamba layer (same number in every group).", min=1)
    expert_importance: Optional[str] = setting(
        None, "Expert ranking: reap (router-weighted activation norm, default), frequency, magnitude, random.")

    def any_depth(self) -> bool:
        return self.layers is not None or bool(self.drop_layers)

    def any_size(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self)
                   if f.name not in ("depth_metric", "expert_importance"))


#: The default peak learning rate by distillation budget (tokens): (budget, LR) points, log-linear
#: in between and constant beyond the ends.  3e-4 was the one value within 7 % of the best at every
#: CPU-sized budget measured (32K-131K tokens; bench/lr.py, docs/benchmarks.md); 1e-4 is the paper's,
#: for its ~94B tokens.  Between 1M and 1B tokens the values are interpolated, not measured.
LR_BY_BUDGET = ((1_000_000, 3e-4), (1_000_000_000, 1e-4))


def default_lr(tokens: int, points=LR_BY_BUDGET) -> float:
    """The peak learning rate a distillation of `tokens` tokens gets when none is given."""
    (n0, lr0), (n1, lr1) = points
    if tokens <= n0:
        return lr0
    if tokens >= n1:
        return lr1
    t = (math.log(tokens) - math.log(n0)) / (math.log(n1) - math.log(n0))
    return float(math.exp(math.log(lr0) + t * (math.log(lr1) - math.log(lr0))))


@dataclass(frozen=True)
class DistillConfig(Settings):
    """Distillation (`slimlm distill`, the pipeline's distill stage, each search candidate's short run)."""

    data: Any = _data()
    tokens: int = _count(100_000, "Token budget: 100000, 1e5, 250k, 2M, 94B.", short="-n", min=1)
    seq_len: int = setting(512, "Tokens per training window.", min=2)
    micro_batch: int = setting(4, "Windows per forward pass per process.", min=1)
    global_batch: Optional[int] = setting(None, "Windows per optimizer step (default micro-batch x processes).", min=1)
    lr: Optional[float] = setting(
        None, "Peak learning rate (default: follows --tokens: 3e-4 up to 1M tokens, falling log-linearly to the "
              "paper's 1e-4 at 1B tokens and beyond).", above=0)
    min_lr: Optional[float] = setting(None, "Final learning rate of the cosine decay (default: lr / 10).", min=0)
    warmup: int = setting(40, "Warm-up steps (clamped to 10% of the run).", min=0)
    clip: float = setting(1.0, "Gradient-norm clipping.", above=0)
    weight_decay: float = setting(0.0, "AdamW weight decay.", min=0)
    loss: str = setting("kl", "kl (forward KL, Minitron), reverse-kl or jsd.")
    temperature: float = setting(1.0, "Softmax temperature of the KD loss.", above=0)
    ce_weight: float = setting(0.0, "Weight of an added student cross-entropy term.", min=0)
    hidden_loss: Optional[str] = setting(None, "'cosine': also match intermediate hidden states.")
    layer_map: Optional[str] = setting(
        None, "Student:teacher layer pairs for --hidden-loss, e.g. 0:1,1:3 (default evenly spaced).")
    hidden_weight: float = setting(1.0, "Weight of the hidden-state loss.", min=0)
    router_aux_loss: bool = setting(
        False, "MoE students: add the student's router load-balancing loss, weighted by its config's "
               "router_aux_loss_coef, as transformers trains MoEs (default: logits only, as the paper).")
    mode: str = setting("kd", "kd (distillation) or lm (plain LM loss, a baseline).")
    teacher_logits: Optional[str] = setting(
        None, "Train from a `slimlm teacher-logits` cache instead of running the teacher (written for the same data, "
              "seed, seq-len and budget): top-K forward KL plus one bucket for the rest of the mass, temperature 1. "
              "--teacher may then be omitted; given, it must be the cache's.", recipe=False)
    chunk_size: int = setting(
        512, "Tokens per loss chunk (vocabulary-sized memory is a few chunk x vocab tensors); 0: one chunk.", min=0)
    gradient_checkpointing: bool = setting(False, "Recompute student layers in backward (less memory).")
    eval_every: Optional[int] = setting(None, "Validate every N steps (default: 10 times a run; 0: never).", min=0)
    heldout: int = setting(16, "Held-out windows for validation.", min=0)
    eval_data: Optional[str] = _eval_data()
    save_every: Optional[int] = setting(
        None, "Checkpoint every N steps (default: about 10 a run, every 25-1000 steps; 0: never).", min=0)
    keep_checkpoints: int = setting(1, "Checkpoints kept on disk (the newest).", min=1)
    chat: bool = setting(
        False, "--data is chat JSONL ({\"messages\": [...]}), rendered with the chat template: an instruct teacher "
               "gives an instruct student.")
    data_weights: Optional[Any] = _data_weights()
    token_cache: Optional[str] = _token_cache()
    stop_after: Optional[int] = setting(
        None, "Stop (with a checkpoint, no export) after this many optimizer steps; continue with --resume.",
        min=1, recipe=False)
    tensorboard: bool = setting(True, "Write TensorBoard logs under OUT/run/tensorboard (when installed).",
                                flag="--tensorboard/--no-tensorboard")
    text_field: str = _text_field()
    seed: int = _seed()
    dtype: str = _dtype()

    def peak_lr(self) -> float:
        """`lr`, or the default for this token budget (`default_lr`)."""
        return default_lr(self.tokens) if self.lr is None else self.lr

    def final_lr(self) -> float:
        """`min_lr`, or a tenth of the peak."""
        return self.peak_lr() / 10 if self.min_lr is None else self.min_lr

    def with_learning_rates(self):
        """This config with `lr` and `min_lr` filled in (what a run records and trains with)."""
        return dataclasses.replace(self, lr=self.peak_lr(), min_lr=self.final_lr())


@dataclass(frozen=True)
class CorrectConfig(DistillConfig):
    """Teacher correction (`slimlm correct-teacher`): LM-loss fine-tuning of the teacher on the distillation data.

    The distillation settings with Minitron's teacher-correction defaults.
    """

    lr: float = setting(1e-5, "Peak LR; Minitron uses a fifth of the teacher's original.", above=0)
    warmup: int = setting(120, "Warm-up steps (clamped to 10% of the run).", min=0)
    mode: str = setting("lm", "Always lm (plain LM loss).", cli=False, recipe=False)

    #: distillation-only settings that teacher correction does not show
    HIDDEN = ("loss", "temperature", "ce_weight", "hidden_loss", "layer_map", "hidden_weight", "chat", "mode",
              "teacher_logits")

    @classmethod
    def settings(cls, *, where=None):
        return [f for f in super().settings(where=where) if where is None or f.name not in cls.HIDDEN]


@dataclass(frozen=True)
class TeacherLogitsConfig(Settings):
    """The teacher's top-K log-probabilities over a distillation's windows (`slimlm teacher-logits`).

    The data settings are those of the distillation that will read the cache: with the same
    data, seed, sequence length and budget, the cache holds exactly the windows it reads.  In
    a recipe (the `teacher_logits:` section of `slimlm run`) they are the distill section's,
    so the section holds only K and the batch sizes of the teacher's pass.
    """

    data: Any = _data()
    data_weights: Optional[Any] = _data_weights(recipe=False)
    eval_data: Optional[str] = _eval_data(recipe=False)
    tokens: int = _count(100_000, "Token budget of the distillation that will read the cache (its --tokens); a "
                                  "larger budget later extends the same cache.", short="-n", min=1, recipe=False)
    seq_len: int = setting(512, "Tokens per window (the distillation's --seq-len).", min=2, recipe=False)
    global_batch: Optional[int] = setting(
        None, "Windows per optimizer step of that distillation (default: distill's, 4 on one process); the cache "
              "covers whole steps.", min=1, recipe=False)
    heldout: int = setting(16, "Held-out windows (the distillation's --heldout), stored too: validation needs no "
                               "teacher.", min=0, recipe=False)
    top_k: int = setting(64, "Teacher log-probabilities kept per token; the rest of the mass is kept as one "
                             "bucket (64: within 1 % of online distillation in domain, docs/benchmarks.md).", min=1)
    batch_size: int = setting(8, "Windows per teacher forward pass.", min=1)
    chunk_size: int = setting(512, "Tokens per LM-head chunk (at most a few chunk x vocabulary floats at once).",
                              min=1)
    token_cache: Optional[str] = _token_cache(recipe=False)
    text_field: str = _text_field()
    seed: int = _seed()
    dtype: str = _dtype()


@dataclass(frozen=True)
class SearchConfig(Settings):
    """Architecture search (`slimlm search`, the pipeline's search stage): successive halving over candidate shapes."""

    target_params: Optional[float] = setting(
        None, "Parameter target, e.g. 9e7 (give this or --target-active-params).", above=0)
    target_active_params: Optional[float] = setting(
        None, "Mixture of experts: target of the parameters one token uses (routed experts counted top-k only), "
              "e.g. 3e9, instead of --target-params; the expert count is then kept.", above=0)
    tolerance: float = setting(0.05, "Keep shapes within this fraction of the target.", above=0)
    max_width_prune: float = setting(0.55, "Largest fraction of any width axis to remove.", min=0)
    max_depth_prune: float = setting(0.4, "Largest fraction of layers to remove.", min=0)
    max_candidates: int = setting(
        27, "Distill at most this many candidates (a spread of the shapes that qualify, the closest to the target "
            "first).", min=1)
    prune_heads: bool = setting(
        True, "Also try fewer attention heads (--keep-heads: never prune heads, the paper's choice).",
        flag="--prune-heads/--keep-heads")
    hidden_step: int = setting(64, "Grid step of the hidden size (for families that need the hidden size divisible by the "
                                       "query heads, the smallest step of at least this that fits each head count).", min=1)
    ffn_step: int = setting(128, "Grid step of the MLP sizes (dense, expert and shared-expert).", min=1)
    expert_step: Optional[int] = setting(
        None, "Grid step of the expert count (default: experts / 16, at least 1, a multiple of the routing groups).",
        min=1)
    search_budget: int = _count(
        160_000, "Distillation tokens of the whole search, shared equally by its rungs (default: what 8 candidates "
                 "x 20,000 tokens cost).", min=1)
    reduction: int = setting(
        3, "Each rung keeps the best 1/REDUCTION of its candidates (3: the best third) and distills them longer.",
        min=2)

    def target(self) -> tuple[int, bool]:
        """(parameter target, whether it counts active parameters); exactly one of the two targets is given."""
        if (self.target_params is None) == (self.target_active_params is None):
            raise SlimlmError("a search needs exactly one of --target-params and --target-active-params")
        if self.target_active_params is not None:
            return int(self.target_active_params), True
        return int(self.target_params), False


@dataclass(frozen=True)
class AlignConfig(Settings):
    """Instruction tuning (`slimlm align`, the pipeline's optional align stage): SFT, then DPO."""

    sft: Optional[str] = setting(
        None, "Chat data: JSONL of {\"messages\": [{\"role\", \"content\"}, ...]}.", required=True)
    prefs: Optional[str] = setting(
        None, "Preference pairs for DPO after SFT: JSONL of {\"prompt\", \"chosen\", \"rejected\"}.")
    tokens: int = _count(100_000, "SFT token budget: 100000, 1e5, 250k, 2M.", short="-n", min=1)
    dpo_tokens: Optional[int] = _count(None, "DPO token budget (default: --tokens).", min=1)
    seq_len: Optional[int] = setting(
        None, "Longest example in tokens, longer ones truncated (default 1024, or the model's limit).", min=8)
    micro_batch: int = setting(4, "Examples per forward pass per process.", min=1)
    global_batch: Optional[int] = setting(None, "Examples per optimizer step (default micro-batch x processes).", min=1)
    lr: float = setting(2e-5, "Peak learning rate of SFT.", above=0)
    dpo_lr: float = setting(1e-6, "Peak learning rate of DPO.", above=0)
    beta: float = setting(0.1, "DPO's beta (strength of the pull towards the SFT model).", above=0)
    warmup: int = setting(40, "Warm-up steps (clamped to 10% of each stage).", min=0)
    clip: float = setting(1.0, "Gradient-norm clipping.", above=0)
    weight_decay: float = setting(0.0, "AdamW weight decay.", min=0)
    chat_template_from: Optional[str] = setting(
        None, "Take the chat template from this model (e.g. the teacher) or .jinja file when the model has none.")
    gradient_checkpointing: bool = setting(False, "Recompute layers in backward (less memory).")
    save_every: Optional[int] = setting(None, "Checkpoint every N steps (default: about 10 a stage; 0: never).", min=0)
    keep_checkpoints: int = setting(1, "Checkpoints kept on disk (the newest).", min=1)
    stop_after: Optional[int] = setting(
        None, "Stop (with a checkpoint) after this many optimizer steps over both stages; continue with --resume.",
        min=1, recipe=False)
    tensorboard: bool = setting(True, "Write TensorBoard logs (when installed).", flag="--tensorboard/--no-tensorboard")
    seed: int = _seed()
    dtype: str = _dtype()


@dataclass(frozen=True)
class EvalConfig(Settings):
    """Evaluation (`slimlm eval`, the pipeline's eval stage)."""

    ppl: Optional[Any] = setting(
        None, "Text for perplexity: a .txt/.jsonl/.parquet file, folder, glob, saved dataset, hf:NAME[:CONFIG][@SPLIT] "
              "or builtin:python-docs-heldout.", cli_type=Optional[str], recipe_types=(str, list))
    seq_len: int = setting(512, "Perplexity window length in tokens (BOS included).", min=2)
    stride: Optional[int] = setting(
        None, "Perplexity window step (default and most: --seq-len - 1; windows then share one context token).", min=1)
    max_tokens: Optional[int] = setting(None, "Score only the first N tokens of the perplexity text.", min=1)
    text_field: str = _text_field()
    tasks: Optional[Any] = setting(
        None, "Comma-separated lm-eval tasks (any name lm-eval knows, a task YAML path) or slimlm's local tasks "
              "hellaswag_local and mc_local (their data via --task-data).", cli_type=Optional[str],
        recipe_types=(str, list))
    task_data: Optional[Any] = setting(
        None, "NAME=PATH: a local file for a local task, e.g. hellaswag=hellaswag_val_full.txt.bz2 (6-line text or "
              "Rowan/hellaswag JSONL) or mc=items.jsonl. Repeatable.",
        parse=parse_assignments, cli_type=Optional[list[str]], recipe_types=(dict, list), metavar="NAME=PATH")
    include_path: Optional[Any] = setting(
        None, "A folder of your own lm-eval task YAMLs. Repeatable.", cli_type=Optional[list[str]],
        recipe_types=(str, list), metavar="DIR")
    limit: Optional[float] = setting(None, "Items per task (a fraction of them when below 1).", above=0)
    num_fewshot: Optional[int] = setting(None, "Few-shot examples per item (default: each task's own).", min=0)
    speed: bool = setting(False, "Measure prefill and decode tokens/s and peak memory.")
    batch_size: int = setting(1, "Batch size for perplexity, tasks and speed.", min=1)
    prompt_len: int = setting(128, "Prompt tokens for --speed.", min=1)
    new_tokens: int = setting(32, "Generated tokens for --speed.", min=1)
    repeats: int = setting(3, "Timed runs for --speed (the median is kept).", min=1)
    chat_prompts: Optional[str] = setting(
        None, "Prompts to answer (greedy) with the chat template: JSONL with 'prompt' or 'messages', or text with one "
              "prompt a line. Answers go side by side into chat_answers.jsonl.")
    max_new_tokens: int = setting(128, "Longest answer for --chat-prompts, in tokens.", min=1)
    chat_template: bool = setting(False, "Run the lm-eval tasks with the chat template (instruct models).")
    save: bool = setting(True, "Merge the results into eval.json in each model's folder.", flag="--save/--no-save",
                         recipe=False)
    dtype: str = _dtype()


@dataclass(frozen=True)
class MemoryConfig(Settings):
    """How `--dry-run` plans memory: for which set-up and which devices (nothing is loaded or run)."""

    device_memory: Optional[str] = setting(
        None, "Memory per device to plan for, e.g. 80GB (default: this machine's GPU, else its RAM).", recipe=False)
    accelerate_config: Optional[str] = setting(
        None, "Plan for this Accelerate config (backend, processes, precision) instead of this machine.",
        recipe=False)
    processes: Optional[int] = setting(None, "Plan for this many processes (default: the Accelerate config's).",
                                       min=1, recipe=False)


@dataclass(frozen=True)
class ReportConfig(Settings):
    """The pipeline's report stage."""

    enabled: bool = setting(True, "Write the HTML and Markdown report at the end of the run.", cli=False)


@dataclass(frozen=True)
class RunConfig(Settings):
    """A recipe's top-level keys: the teacher and the settings every stage shares."""

    teacher: str = setting("smollm2-135m", "The model to compress: a folder, hub id, .gguf file or alias.")
    description: Optional[str] = setting(None, "What the recipe does (free text).")
    accelerate_config: Optional[str] = setting(
        None, "An Accelerate config for the training stages; used when the machine has several GPUs.")
    data: Any = _data()
    text_field: str = _text_field()
    seed: int = _seed()
    dtype: str = _dtype()


def shared_settings() -> set[str]:
    """Names of the settings a recipe gives once at the top level for every stage."""
    return {f.name for f in fields(RunConfig) if f.metadata.get("shared")}


def resolved_type(cls, name: str):
    """The type annotation of a setting, evaluated."""
    return typing.get_type_hints(cls)[name]


def route_overrides(overrides: dict, **configs) -> dict:
    """Build several configs from one set of keyword overrides: each goes to every class that declares it.

    ``route_overrides({"hidden": 384, "seed": 1}, prune=(PruneConfig, None), importance=(ImportanceConfig, cfg))``
    -> ``{"prune": PruneConfig(hidden=384), "importance": cfg with seed 1}``.  An override no class
    declares is a TypeError, as for any unknown keyword argument.
    """
    names = {key: {f.name for f in fields(cls)} for key, (cls, _) in configs.items()}
    unknown = set(overrides) - set().union(*names.values())
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    return {key: cls.make(base, **{k: v for k, v in overrides.items() if k in names[key]})
            for key, (cls, base) in configs.items()}
