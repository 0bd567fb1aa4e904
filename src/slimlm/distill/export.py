"""The end of a run: the student as a standard Hugging Face checkpoint, with provenance."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch

from .._io import atomic_dir, atomic_write_json


def provenance(g, metrics: dict, elapsed: float) -> dict:
    """The `slimlm.json` record: inputs, budget, loss, hyper-parameters, final metrics, versions."""
    import accelerate
    import transformers

    try:
        from importlib.metadata import version

        slimlm_version = version("slimlm")
    except Exception:
        slimlm_version = None
    parent = None
    if g.s_spec and (Path(g.s_spec).expanduser() / "slimlm.json").exists():
        parent = json.loads((Path(g.s_spec).expanduser() / "slimlm.json").read_text())
    return {
        "slimlm": slimlm_version,
        "kind": "distill" if g.mode == "kd" else "lm-training",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "teacher": g.t_spec,
        "student": g.s_spec,
        "data": _describe_data(g),
        "chat": bool(getattr(g, "chat", False)),
        "eval_data": str(g.eval_data) if g.eval_data else None,
        "tokens": g.total_steps * g.global_batch * g.seq_len,
        "tokens_requested": g.tokens,
        "steps": g.total_steps,
        "loss": {"mode": g.mode, "kind": g.loss, "temperature": g.temperature, "ce_weight": g.ce_weight,
                 "hidden_loss": g.hidden_loss, "layer_map": [list(p) for p in g.pairs],
                 "hidden_weight": g.hidden_weight},
        "hyperparameters": {
            "seq_len": g.seq_len, "micro_batch": g.micro_batch, "global_batch": g.global_batch,
            "grad_accumulation": g.accum, "processes": g.world,
            "distributed": g.distributed, "lr": g.lr, "min_lr": g.min_lr,
            "warmup_steps": g.warmup_steps, "warmup_requested": g.warmup, "schedule": "cosine",
            "clip": g.clip, "optimizer": "AdamW(0.9, 0.95)", "weight_decay": g.weight_decay, "seed": g.seed,
            "dtype": str(g.compute_dtype).replace("torch.", ""), "mixed_precision": g.mixed,
        },
        "final_metrics": metrics,
        "elapsed_s": round(elapsed, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__},
        "parent": parent,
    }


def export_student(accelerator, model, tokenizer, out: Path, meta: dict, save_dtype) -> None:
    """Write the student of the prepared `Distillation` `model` as a standard HF checkpoint into `out`,
    atomically (run state carried over)."""
    state = accelerator.get_state_dict(model)  # every process: gathers shards under FSDP / ZeRO-3
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model).objective.hf_model
        prefix = "objective.hf_model."
        state = {k[len(prefix):]: (v.to(save_dtype) if v.is_floating_point() else v)
                 for k, v in state.items() if k.startswith(prefix)}
        # Gathered shards of a tied weight (embeddings = LM head) arrive as separate tensors: share them
        # again so that save_pretrained stores the weight once, as for an unsharded model.
        first_name = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            first = first_name.setdefault(id(param), name)
            if first != name and first in state and name in state:
                state[name] = state[first]
        config = model.config
        source = config.__dict__.pop("_slimlm_source", None)  # load_model's note, not a config field
        old_dtype = getattr(config, "dtype", None)
        try:
            config.dtype = save_dtype
            with atomic_dir(out) as tmp:
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                _carry(out, tmp)
                atomic_write_json(tmp / "slimlm.json", meta)
                from ..card import write_model_card

                write_model_card(tmp)
        finally:
            config.dtype = old_dtype
            if source is not None:
                config._slimlm_source = source
    accelerator.wait_for_everyone()


def _carry(out: Path, tmp: Path) -> None:
    """Bring the run's metrics and state into the new output folder (hard links: no copy, no risk)."""
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    if (out / "metrics.jsonl").exists():
        link(out / "metrics.jsonl", tmp / "metrics.jsonl")
    if (out / "run").is_dir():
        shutil.copytree(out / "run", tmp / "run", copy_function=link)


def _describe_data(g):
    """The run's data as recorded: the source, or [[source, weight], ...] for a mixture."""
    from .data import describe_sources

    sources = getattr(g, "sources", None)
    return describe_sources(sources) if sources else str(g.data)
