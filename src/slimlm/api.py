"""The Python API behind the CLI, with the same names: `info`, `importance`, `prune`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from ._io import check_not_an_input, check_writable_output
from .adapters import get_adapter
from .data import DEFAULT_CORPUS, check_source, pack_windows
from .errors import SlimlmError
from .importance import IMPORTANCE_KINDS, Scores, estimate_importance, parse_aggregation
from .models import check_device_map, load_config, load_model, load_tokenizer, pick_dtype, resolve_model_path
from .plan import Targets, make_plan, target_shape, validate_targets
from .prune import checkpoint_shards, prune_checkpoint, provenance, save_pruned_model

DEFAULT_CALIB_SAMPLES = 128
DEFAULT_SEQ_LEN = 256
DEFAULT_HELDOUT = 8


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
    """Architecture, shape and parameter counts of a model (no weights are loaded)."""
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
    }


def _default_device_map():
    return "auto" if torch.cuda.is_available() else None


def calibration_windows(tokenizer, data, seq_len, calib_samples, heldout, seed, text_field):
    """(calibration windows, held-out windows) from one seeded sample of the source."""
    windows = pack_windows(data, tokenizer, seq_len, calib_samples + heldout, seed=seed, text_field=text_field)
    main, held = windows.split(heldout) if heldout else (windows, None)
    return main.input_ids, (held.input_ids if held is not None else None)


def add_block_losses(scores: Scores, net, tokenizer, ks, *, data=None, seq_len=DEFAULT_SEQ_LEN,
                     calib_samples=DEFAULT_CALIB_SAMPLES, heldout=DEFAULT_HELDOUT, seed=0, text_field="text",
                     batch_size=8, progress=True) -> list[int]:
    """Score every K-layer block for each K in `ks` that `scores` does not hold yet.

    Uses the held-out windows of the pass that made the scores (from their metadata, the
    arguments being the fallback), so block losses of different K compare.  Returns the
    K values computed.
    """
    from .importance import block_removal_losses

    need = sorted(set(ks) - {0} - set(scores.block_losses))
    if not need:
        return []
    m = scores.meta
    _, held = calibration_windows(
        tokenizer,
        m.get("data", data),
        m.get("seq_len") or seq_len,
        m.get("calib_samples") or calib_samples,
        m.get("heldout") or heldout,
        m.get("seed", seed),
        m.get("text_field", text_field),
    )
    for k in need:
        scores.block_losses[k] = block_removal_losses(net, held, k, batch_size, progress)
    return need


def _validate_common(importance_kind, aggregation, calib_samples, seq_len, batch_size, heldout, dtype="auto",
                     device_map=None):
    pick_dtype(dtype)
    check_device_map(device_map)
    if importance_kind not in IMPORTANCE_KINDS:
        raise SlimlmError(f"unknown importance '{importance_kind}' (choose from {', '.join(IMPORTANCE_KINDS)})")
    parse_aggregation(aggregation)
    for name, value, low in (("calib-samples", calib_samples, 1), ("seq-len", seq_len, 2), ("batch-size", batch_size, 1), ("heldout", heldout, 0)):
        if value < low:
            raise SlimlmError(f"--{name} must be at least {low}, got {value}")


def _check_seq_len(config, seq_len):
    limit = getattr(config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise SlimlmError(f"--seq-len {seq_len} is past the model's limit of {limit} positions")


def importance(
    model: str,
    output: str | Path | None = None,
    *,
    data: str | None = None,
    text_field: str = "text",
    calib_samples: int = DEFAULT_CALIB_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    heldout: int = DEFAULT_HELDOUT,
    batch_size: int = 8,
    importance_kind: str = "activation",
    aggregation: str = "mean,l2",
    depth_loss: bool = True,
    block_sizes: tuple[int, ...] = (),
    seed: int = 0,
    dtype: str = "auto",
    device_map=None,
    overwrite: bool = False,
    progress: bool = True,
    loaded=None,
) -> Scores:
    """Estimate importance scores for `model` and (optionally) save them to `output`."""
    _validate_common(importance_kind, aggregation, calib_samples, seq_len, batch_size, heldout, dtype, device_map)
    if output is not None:
        check_writable_output(output, overwrite, inputs=(model,), folder=False)
    config = load_config(model) if loaded is None else loaded.config
    if output is not None and loaded is None:
        check_not_an_input(output, [resolve_model_path(model)])  # an alias or a .gguf resolves to a cached folder
    shape = get_adapter(config).shape()
    for k in block_sizes:
        if not 0 < k < shape.layers:
            raise SlimlmError(f"--block-sizes {k}: can remove between 1 and {shape.layers - 1} layers")
    needs_data = importance_kind == "activation"
    if needs_data:
        _check_seq_len(config, seq_len)
        check_source(data, text_field)
    net = loaded if loaded is not None else load_model(model, dtype=dtype, device_map=device_map or _default_device_map())
    windows = held = None
    if needs_data:
        tok = load_tokenizer(model)
        windows, held = calibration_windows(tok, data, seq_len, calib_samples, heldout, seed, text_field)
    scores = estimate_importance(
        net,
        windows,
        importance=importance_kind,
        aggregation=aggregation,
        heldout=held,
        depth_loss=depth_loss,
        block_sizes=tuple(block_sizes),
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        meta={
            "model": model,
            "data": data or DEFAULT_CORPUS,
            "text_field": text_field,
            "calib_samples": calib_samples if needs_data else 0,
            "heldout": heldout if needs_data else 0,
            "seq_len": seq_len,
            "seed": seed,
        },
    )
    if output is not None:
        scores.save(output)
    return scores


def _source_dtype(config):
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else None


def prune(
    model: str,
    output: str | Path,
    *,
    hidden: int | None = None,
    ffn: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    layers: int | None = None,
    drop_layers: str | None = None,
    depth_metric: str = "block",
    scores: str | Path | Scores | None = None,
    save_scores: str | Path | None = None,
    data: str | None = None,
    text_field: str = "text",
    calib_samples: int = DEFAULT_CALIB_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    heldout: int = DEFAULT_HELDOUT,
    batch_size: int = 8,
    importance_kind: str = "activation",
    aggregation: str = "mean,l2",
    seed: int = 0,
    dtype: str = "auto",
    device_map=None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Prune `model` to the given sizes and write a standard checkpoint to `output`.

    Returns a summary (plan, shapes, parameter counts, output path).  With `scores`
    (a file or a Scores object) no forward pass runs, except for the contiguous-block
    depth metric at a block size the scores do not hold yet.
    """
    targets = Targets(hidden, ffn, heads, kv_heads, layers, drop_layers, depth_metric)
    # -- validate everything before any work -------------------------------------------
    _validate_common(importance_kind, aggregation, calib_samples, seq_len, batch_size, heldout, dtype, device_map)
    # No output may replace an input: the model, its folder, the scores file (updating the
    # scores file it reads with --save-scores is fine: the new one holds all the old one did).
    reads = (model,) if isinstance(scores, Scores) else (model, scores)
    out = check_writable_output(output, overwrite, inputs=reads)
    if save_scores is not None:
        if Path(save_scores).expanduser().resolve() == out.resolve():
            raise SlimlmError(f"--save-scores {save_scores} is the output folder; choose another file")
        check_writable_output(save_scores, overwrite=True, inputs=(model,), folder=False)
    config = load_config(model)
    check_not_an_input(out, [resolve_model_path(model)])  # an alias or a .gguf resolves to a cached folder
    adapter = get_adapter(config)
    shape = adapter.shape()
    validate_targets(targets, shape)
    adapter.validate_shape(target_shape(targets, shape))
    k_drop = shape.layers - layers if layers is not None else 0
    need_block = k_drop > 0 and depth_metric == "block"
    loaded_scores = None
    if isinstance(scores, Scores):
        loaded_scores = scores
    elif scores is not None:
        loaded_scores = Scores.load(scores)
    if loaded_scores is not None:
        loaded_scores.check_matches(shape)
        if depth_metric in ("loss", "bi") and k_drop and loaded_scores.meta.get("importance", "activation") == "activation":
            loaded_scores.depth(depth_metric)  # errors now if missing
    block_missing = (
        need_block
        and (loaded_scores is None or (loaded_scores.meta.get("importance", "activation") == "activation" and k_drop not in loaded_scores.block_losses))
        and importance_kind == "activation"
    )
    needs_forward = (loaded_scores is None and importance_kind == "activation") or block_missing
    if needs_forward:
        _check_seq_len(config, seq_len)
        check_source(data, text_field)
        if heldout < 1 and (need_block or (k_drop and depth_metric == "loss")):
            raise SlimlmError(f"depth pruning by '{depth_metric}' needs held-out windows: --heldout must be at least 1")

    # -- importance ---------------------------------------------------------------------
    net = None
    if loaded_scores is None:
        net = load_model(model, dtype=dtype, device_map=device_map or _default_device_map())
        loaded_scores = importance(
            model,
            data=data,
            text_field=text_field,
            calib_samples=calib_samples,
            seq_len=seq_len,
            heldout=heldout,
            batch_size=batch_size,
            importance_kind=importance_kind,
            aggregation=aggregation,
            depth_loss=bool(k_drop) and depth_metric == "loss",
            block_sizes=(k_drop,) if need_block else (),
            seed=seed,
            progress=progress,
            loaded=net,
        )
    elif block_missing:
        net = load_model(model, dtype=dtype, device_map=device_map or _default_device_map())
        add_block_losses(loaded_scores, net, load_tokenizer(model), [k_drop], data=data, seq_len=seq_len,
                         calib_samples=calib_samples, heldout=heldout, seed=seed, text_field=text_field,
                         batch_size=batch_size, progress=progress)
    if save_scores is not None:
        loaded_scores.save(save_scores)

    # -- plan and slicing ------------------------------------------------------------------
    plan = make_plan(loaded_scores, shape, targets)
    prov = provenance(plan, model, loaded_scores.meta, {k: v for k, v in asdict(targets).items() if v is not None})
    source_dir = resolve_model_path(model)
    local = Path(source_dir).is_dir()
    # A local safetensors checkpoint is sliced from disk, shard by shard, even when the
    # model is loaded: host memory stays near one shard, and offloaded weights are fine.
    if local and checkpoint_shards(source_dir):
        del net
        prune_checkpoint(source_dir, plan, out, prov)
        how = "shard by shard"
    else:
        if net is None:
            net = load_model(model, dtype=dtype, device_map=device_map or _default_device_map())
        tok = None if local else load_tokenizer(model)
        save_pruned_model(net, plan, out, source_dir if local else None, prov, dtype=_source_dtype(config), tokenizer=tok)
        how = "in memory"
    new_shape = plan.target_shape
    return {
        "output": str(out),
        "source": model,
        "source_shape": shape.as_dict(),
        "shape": new_shape.as_dict(),
        "parameters_before": adapter.param_count(shape),
        "parameters_after": adapter.param_count(new_shape),
        "kept_layers": plan.kept_layers,
        "importance": loaded_scores.meta.get("importance"),
        "sliced": how,
    }
