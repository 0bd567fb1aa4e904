"""The end of a run: the student as a standard Hugging Face checkpoint, with its provenance record."""

from __future__ import annotations

from pathlib import Path

from .._io import atomic_dir, atomic_write_json
from ..training.run_folder import carry_run_state


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
                carry_run_state(out, tmp)
                atomic_write_json(tmp / "slimlm.json", meta)
                from ..card import write_model_card

                write_model_card(tmp)
        finally:
            config.dtype = old_dtype
            if source is not None:
                config._slimlm_source = source
    accelerator.wait_for_everyone()
