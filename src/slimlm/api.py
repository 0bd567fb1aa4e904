"""The Python API behind the CLI, with the same names: `info`, `importance`, `prune`.

Settings come as config objects (`slimlm.config.ImportanceConfig`, `PruneConfig`) or as keyword
overrides of their defaults: ``prune("smollm2-135m", "out", hidden=384, ffn=1024, calib_samples=32)``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from ._io import check_not_an_input, check_writable_output
from .adapters import get_adapter
from .config import DEFAULT_CORPUS, ImportanceConfig, PruneConfig, route_overrides
from .data import check_source, pack_windows
from .errors import SlimlmError
from .importance import IMPORTANCE_KINDS, Scores, estimate_importance, parse_aggregation
from .models import check_device_map, load_config, load_model, load_tokenizer, pick_dtype, resolve_model_path
from .plan import make_plan, target_shape, validate_targets
from .prune import checkpoint_shards, prune_checkpoint, provenance, save_pruned_model


def count_parameters(config) -> dict:
    """Total and non-embedding parameters, from the config alone (meta device, no weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # shared tensors count once
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    if head is not None and not getattr(config, "tie_word_embeddings", False):
        embed += head.weight.numel()
    return {"total": total, "non_embedding": total - embed}


def info(model: str) -> dict:
    """Architecture, shape and parameter counts of a model (no weights are loaded).

    `active_parameters` counts what one token uses (of the routed experts only the
    top-k); it equals `parameters` for a dense model.
    """
    config = load_config(model, weights=False)
    adapter = get_adapter(config)
    shape = adapter.shape()
    params = count_parameters(config)
    return {
        "model": model,
        "family": config.model_type,
        "architecture": (getattr(config, "architectures", None) or ["?"])[0],
        **shape.as_dict(),
        "parameters": params["total"],
        "parameters_without_embeddings": params["non_embedding"],
        "active_parameters": adapter.param_count(shape, active=True),
    }


def _default_device_map():
    return "auto" if torch.cuda.is_available() else None


def calibration_windows(tokenizer, data, seq_len, calib_samples, heldout, seed, text_field):
    """(calibration windows, held-out windows) from one seeded sample of the source."""
    windows = pack_windows(data, tokenizer, seq_len, calib_samples + heldout, seed=seed, text_field=text_field)
    main, held = windows.split(heldout) if heldout else (windows, None)
    return main.input_ids, (held.input_ids if held is not None else None)


def add_block_losses(scores: Scores, net, tokenizer, ks, config: ImportanceConfig | None = None,
                     progress: bool = True) -> list[int]:
    """Score every K-layer block for each K in `ks` that `scores` does not hold yet.

    Uses the held-out windows of the pass that made the scores (from their metadata; `config`
    is the fallback for what the metadata lacks), so block losses of different K compare.
    Returns the K values computed.
    """
    from .importance import block_removal_losses

    c = config or ImportanceConfig()
    need = sorted(set(ks) - {0} - set(scores.block_losses))
    if not need:
        return []
    m = scores.meta
    _, held = calibration_windows(
        tokenizer,
        m.get("data", c.data),
        m.get("seq_len") or c.seq_len,
        m.get("calib_samples") or c.calib_samples,
        m.get("heldout") or c.heldout,
        m.get("seed", c.seed),
        m.get("text_field", c.text_field),
    )
    for k in need:
        scores.block_losses[k] = block_removal_losses(net, held, k, c.batch_size, progress)
    return need


OFFLOAD_CHOICES = ("auto", "layers", "none")


def check_importance_config(c: ImportanceConfig) -> None:
    """The checks of an importance config that its declaration cannot express."""
    pick_dtype(c.dtype)
    check_device_map(c.device_map)
    if c.kind not in IMPORTANCE_KINDS:
        raise SlimlmError(f"unknown importance '{c.kind}' (choose from {', '.join(IMPORTANCE_KINDS)})")
    parse_aggregation(c.aggregation)
    if c.offload not in OFFLOAD_CHOICES:
        raise SlimlmError(f"--offload expects one of {', '.join(OFFLOAD_CHOICES)}, got '{c.offload}'")


def _check_seq_len(config, seq_len):
    limit = getattr(config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise SlimlmError(f"--seq-len {seq_len} is past the model's limit of {limit} positions")


def streams_layers(model: str, c: ImportanceConfig, model_config, loaded=None) -> bool:
    """Whether the importance pass streams the decoder layers (`--offload`): forced, or the weights would not fit."""
    if loaded is not None or c.kind == "random" or c.offload == "none":
        return False
    if c.offload == "auto":
        from .models import pick_dtype
        from .streaming import should_stream

        if not should_stream(model_config, pick_dtype(c.dtype)):
            return False
    source = Path(resolve_model_path(model))
    if not (source.is_dir() and checkpoint_shards(source)):
        if c.offload == "layers":
            raise SlimlmError(f"--offload layers reads a local safetensors checkpoint; {model} is not one")
        return False
    return True


def _check_streamable(c: ImportanceConfig, depth_loss: bool, block_sizes) -> None:
    if depth_loss or block_sizes:
        metric = "loss" if depth_loss else "block"
        raise SlimlmError(
            f"the '{metric}' depth metric runs the whole model with layers removed, which cannot stream one layer at "
            "a time; with the layers streamed, Block Importance ('bi') comes from the same pass (use --depth-metric bi "
            "or --drop-layers, --no-depth-loss), or run where the model fits (--offload none)")


def importance(
    model: str,
    output: str | Path | None = None,
    config: ImportanceConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    loaded=None,
    **overrides,
) -> Scores:
    """Estimate importance scores for `model` and (optionally) save them to `output`.

    `loaded` is the model already in memory (then `model` only names it).  `depth_loss` None (the
    default) measures the one-layer-out LM loss, as a standalone scores file may serve any later
    pruning, unless the layers stream (`offload`: a model larger than memory is read one decoder
    layer at a time, see `slimlm.streaming`; that metric then needs `--offload none`).
    """
    c = ImportanceConfig.make(config, **overrides)
    check_importance_config(c)
    if output is not None:
        check_writable_output(output, overwrite, inputs=(model,), folder=False)
    net_config = load_config(model) if loaded is None else loaded.config
    if output is not None and loaded is None:
        check_not_an_input(output, [resolve_model_path(model)])  # an alias or a .gguf resolves to a cached folder
    adapter = get_adapter(net_config)
    shape = adapter.shape()
    for k in c.block_sizes:
        if not 0 < k < shape.layers:
            raise SlimlmError(f"--block-sizes {k}: can remove between 1 and {shape.layers - 1} layers")
    needs_data = c.kind == "activation"
    if needs_data:
        _check_seq_len(net_config, c.seq_len)
        check_source(c.data, c.text_field)
    stream = streams_layers(model, c, net_config, loaded)
    depth_loss = (not stream) if c.depth_loss is None else c.depth_loss
    if stream:
        _check_streamable(c, depth_loss, c.block_sizes)
    windows = held = None
    if needs_data:
        tok = load_tokenizer(model)
        windows, held = calibration_windows(tok, c.data, c.seq_len, c.calib_samples, c.heldout, c.seed, c.text_field)
    meta = {
        "model": model,
        "data": c.data or DEFAULT_CORPUS,
        "text_field": c.text_field,
        "calib_samples": c.calib_samples if needs_data else 0,
        "heldout": c.heldout if needs_data else 0,
        "seq_len": c.seq_len,
        "seed": c.seed,
    }
    if stream:
        scores = _streamed_importance(model, c, net_config, windows, progress, meta)
    else:
        net = loaded if loaded is not None else load_model(model, dtype=c.dtype,
                                                             device_map=c.device_map or _default_device_map())
        scores = estimate_importance(net, windows, importance=c.kind, aggregation=c.aggregation, heldout=held,
                                     depth_loss=depth_loss, block_sizes=tuple(c.block_sizes), batch_size=c.batch_size,
                                     seed=c.seed, progress=progress, meta=meta)
    if output is not None:
        scores.save(output)
    return scores


def _streamed_importance(model, c: ImportanceConfig, net_config, windows, progress: bool, meta: dict) -> Scores:
    import sys

    from .importance import parse_aggregation, stamp
    from .models import pick_dtype
    from .streaming import available_memory, model_bytes, streamed_scores

    dtype = pick_dtype(c.dtype)
    free = available_memory()
    why = "as asked" if c.offload == "layers" else (
        f"the weights need {model_bytes(net_config, dtype) / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are available")
    print(f"importance: streaming the decoder layers one at a time from the checkpoint ({why})", file=sys.stderr,
          flush=True)
    scores = streamed_scores(resolve_model_path(model), c.kind, windows, aggregation=parse_aggregation(c.aggregation),
                             batch_size=c.batch_size, progress=progress, dtype=dtype)
    scores.meta["streamed"] = True
    return stamp(scores, net_config, meta)


def _source_dtype(config):
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else None


def prune(
    model: str,
    output: str | Path,
    config: PruneConfig | None = None,
    importance_config: ImportanceConfig | None = None,
    *,
    scores: str | Path | Scores | None = None,
    save_scores: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **overrides,
) -> dict:
    """Prune `model` to the sizes of `config` and write a standard checkpoint to `output`.

    Keyword overrides go to `config` (target sizes) or `importance_config` (calibration).
    Returns a summary (plan, shapes, parameter counts, output path).  With `scores` (a file or
    a Scores object) no forward pass runs, except for the contiguous-block depth metric at a
    block size the scores do not hold yet.
    """
    made = route_overrides(overrides, targets=(PruneConfig, config), calib=(ImportanceConfig, importance_config))
    targets, calib = made["targets"], made["calib"]
    job = _PruneJob(model, output, targets, calib, scores, save_scores, overwrite, progress)
    loaded_scores = job.scores()
    return job.write(loaded_scores)


class _PruneJob:
    """The steps of `prune`: every check first, then the scores, then the slicing."""

    def __init__(self, model, output, targets: PruneConfig, calib: ImportanceConfig, scores, save_scores,
                 overwrite: bool, progress: bool):
        check_importance_config(calib)
        self.model, self.targets, self.calib, self.progress = model, targets, calib, progress
        # No output may replace an input: the model, its folder, the scores file (updating the
        # scores file it reads with --save-scores is fine: the new one holds all the old one did).
        reads = (model,) if isinstance(scores, Scores) else (model, scores)
        self.out = check_writable_output(output, overwrite, inputs=reads)
        self.save_scores = save_scores
        if save_scores is not None:
            if Path(save_scores).expanduser().resolve() == self.out.resolve():
                raise SlimlmError(f"--save-scores {save_scores} is the output folder; choose another file")
            check_writable_output(save_scores, overwrite=True, inputs=(model,), folder=False)
        self.config = load_config(model)
        check_not_an_input(self.out, [resolve_model_path(model)])  # an alias or a .gguf resolves to a cached folder
        self.adapter = get_adapter(self.config)
        self.shape = self.adapter.shape()
        validate_targets(targets, self.shape)
        self.adapter.validate_shape(target_shape(targets, self.shape))
        self.k_drop = self.shape.layers - targets.layers if targets.layers is not None else 0
        self.given = scores if isinstance(scores, Scores) else (Scores.load(scores) if scores is not None else None)
        kind = targets.expert_importance
        if kind in ("reap", "frequency") and self.shape.experts:
            if self.given is not None:
                self.given.expert_scores(kind)  # errors now if missing
            elif calib.kind != "activation":
                raise SlimlmError(f"--expert-importance {kind} needs --importance activation")
        if self.given is not None:
            self.given.check_matches(self.shape)
            if targets.depth_metric in ("loss", "bi") and self.k_drop and self._activation(self.given):
                self.given.depth(targets.depth_metric)  # errors now if missing
        self.stream = self._needs_forward() and streams_layers(model, calib, self.config)
        if self.stream and self._block_missing():
            _check_streamable(calib, False, [self.k_drop])
        if self.stream and self.given is None and self.k_drop and targets.depth_metric == "loss":
            _check_streamable(calib, True, [])
        if self._needs_forward():
            _check_seq_len(self.config, calib.seq_len)
            check_source(calib.data, calib.text_field)
            if calib.heldout < 1 and self.k_drop and targets.depth_metric in ("block", "loss"):
                raise SlimlmError(
                    f"depth pruning by '{targets.depth_metric}' needs held-out windows: --heldout must be at least 1")
        self.net = None

    @staticmethod
    def _activation(scores: Scores) -> bool:
        return scores.meta.get("importance", "activation") == "activation"

    def _block_missing(self) -> bool:
        need_block = self.k_drop > 0 and self.targets.depth_metric == "block"
        given = self.given
        return (need_block and self.calib.kind == "activation"
                and (given is None or (self._activation(given) and self.k_drop not in given.block_losses)))

    def _needs_forward(self) -> bool:
        return (self.given is None and self.calib.kind == "activation") or self._block_missing()

    def _load(self):
        if self.net is None:
            self.net = load_model(self.model, dtype=self.calib.dtype,
                                  device_map=self.calib.device_map or _default_device_map())
        return self.net

    def scores(self) -> Scores:
        """The given scores (with any missing block losses added), or a new importance pass."""
        t, c = self.targets, self.calib
        if self.given is None:
            depth_loss = c.depth_loss if c.depth_loss is not None else (bool(self.k_drop) and t.depth_metric == "loss")
            need_block = self.k_drop > 0 and t.depth_metric == "block"
            scores = importance(self.model, config=c, depth_loss=depth_loss,
                                block_sizes=(self.k_drop,) if need_block else (), progress=self.progress,
                                loaded=None if self.stream else self._load())
        else:
            scores = self.given
            if self._block_missing():
                add_block_losses(scores, self._load(), load_tokenizer(self.model), [self.k_drop], c, self.progress)
        if self.save_scores is not None:
            scores.save(self.save_scores)
        return scores

    def write(self, scores: Scores) -> dict:
        """Plan from the scores and slice: a local safetensors checkpoint shard by shard, else in memory."""
        plan = make_plan(scores, self.shape, self.targets)
        self.adapter.validate_shape(plan.target_shape)  # the kept layer pattern is known only now (hybrids)
        targets = {k: v for k, v in asdict(self.targets).items() if v is not None}
        prov = provenance(plan, self.model, scores.meta, targets)
        source_dir = resolve_model_path(self.model)
        local = Path(source_dir).is_dir()
        # A local safetensors checkpoint is sliced from disk, shard by shard, even when the
        # model is loaded: host memory stays near one shard, and offloaded weights are fine.
        if local and checkpoint_shards(source_dir):
            self.net = None
            prune_checkpoint(source_dir, plan, self.out, prov)
            how = "shard by shard"
        else:
            tok = None if local else load_tokenizer(self.model)
            save_pruned_model(self._load(), plan, self.out, source_dir if local else None, prov,
                              dtype=_source_dtype(self.config), tokenizer=tok)
            how = "in memory"
        new_shape = plan.target_shape
        return {
            "output": str(self.out),
            "source": self.model,
            "source_shape": self.shape.as_dict(),
            "shape": new_shape.as_dict(),
            "parameters_before": self.adapter.param_count(self.shape),
            "parameters_after": self.adapter.param_count(new_shape),
            "active_parameters_before": self.adapter.param_count(self.shape, active=True),
            "active_parameters_after": self.adapter.param_count(new_shape, active=True),
            "kept_layers": plan.kept_layers,
            "importance": scores.meta.get("importance"),
            "sliced": how,
        }
