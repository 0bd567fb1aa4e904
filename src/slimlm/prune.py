"""Applying a plan: slice every weight tensor by name (METHOD §3).

Pruning is a function of tensors by name, so the same code runs on a model in
memory and, shard by shard, on a safetensors checkpoint on disk (peak host memory
near the largest shard, never the whole model).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import torch

from . import __version__
from ._io import atomic_dir
from .adapters import Adapter, get_adapter
from .adapters.base import EXPERT, NESTED_AXES
from .errors import SlimlmError
from .plan import PrunePlan

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def prune_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], adapter: Adapter, plan: PrunePlan, new_config
) -> Iterator[tuple[str, torch.Tensor]]:
    """Slice each (name, tensor); tensors of removed layers and experts are dropped, the rest renumbered.

    Names may be in-memory ones or a checkpoint's (one tensor per expert, renamed prefixes).
    """
    new_index = {old: new for new, old in enumerate(plan.kept_layers)}
    for name, tensor in tensors:
        if adapter.is_ignored(name):
            continue
        layer, rule, expert = adapter.locate(name)
        if layer is None:
            yield name, slice_tensor(tensor, rule, layer, adapter, plan, new_config, name)
            continue
        if layer not in new_index:
            continue
        position = None
        if expert is not None:  # one expert's own tensor, as checkpoints store them
            kept = plan.kept_experts[layer]
            if expert not in kept:
                continue
            position = kept.index(expert)
        out_name = adapter.rename(name, new_index[layer], position)
        yield out_name, slice_tensor(tensor, rule, layer, adapter, plan, new_config, name, position)


def slice_tensor(tensor, rule, layer, adapter: Adapter, plan: PrunePlan, new_config, name: str,
                 expert: int | None = None) -> torch.Tensor:
    """One tensor sliced along every dimension its rule names (`expert`: a single expert's tensor)."""
    out = tensor
    expert_dim = next((d for d, axis in rule.items() if axis == EXPERT), None)
    # Per-expert (nested) axes index the experts already kept, so they come last.
    for dim, axis in sorted(rule.items(), key=lambda item: item[1] in NESTED_AXES):
        index = adapter.axis_index(axis, layer, plan, expert)
        if index is None:
            continue
        index = index.to(out.device)
        if axis in NESTED_AXES and expert is None:
            out = _gather_per_expert(out, expert_dim, dim, index)
        else:
            out = out.index_select(dim, index)
    out = adapter.adjust_tensor(name, out, plan, new_config)
    return out.contiguous()


def _gather_per_expert(t: torch.Tensor, expert_dim: int, dim: int, index: torch.Tensor) -> torch.Tensor:
    """Along `dim`, keep index[e] in the e-th expert (experts along `expert_dim`); index is [experts, n]."""
    shape = [1] * t.dim()
    shape[expert_dim], shape[dim] = index.shape
    view = (index if expert_dim < dim else index.T).reshape(shape)
    target = list(t.shape)
    target[dim] = index.shape[1]
    return t.gather(dim, view.expand(target))


def _new_empty_model(config, dtype):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def prune_model(model, plan: PrunePlan):
    """A new, smaller model in memory; it shares no tensor with the original, which is left untouched."""
    adapter = get_adapter(model)
    new_config = adapter.new_config(plan)
    source = model.state_dict()
    source_storages = {t.untyped_storage().data_ptr() for t in source.values() if t.device.type != "meta"}
    state = {}
    for name, tensor in prune_tensors(source.items(), adapter, plan, new_config):
        # A tensor kept whole (KEEP axes, a plan that keeps everything) comes back as the
        # source's own storage; the student must own every weight, or training it would
        # change the teacher it learns from.
        if tensor.device.type != "meta" and tensor.untyped_storage().data_ptr() in source_storages:
            tensor = tensor.clone()
        state[name] = tensor
    dtype = next(model.parameters()).dtype
    new = _new_empty_model(new_config, dtype)
    tied = adapter.shape(new_config).tied
    if tied:
        state.pop("lm_head.weight", None)
    missing, unexpected = new.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and tied)]
    if missing or unexpected:
        raise RuntimeError(f"pruned state does not fit the new config: missing {missing}, unexpected {unexpected}")
    new.tie_weights()
    new.eval()
    if hasattr(model, "generation_config") and model.generation_config is not None:
        new.generation_config = model.generation_config
    return new


def provenance(plan: PrunePlan, source: str, scores_meta: dict | None, targets: dict | None) -> dict:
    return {
        "slimlm_version": __version__,
        "stage": "prune",
        "source": source,
        "targets": targets or {},
        "importance": scores_meta or {},
        "plan": plan.to_dict(),
    }


def save_pruned_model(model, plan: PrunePlan, out: str | Path, source_dir: str | None, prov: dict, dtype=None, tokenizer=None) -> Path:
    """Prune the in-memory `model` and write a standard checkpoint atomically."""
    new = prune_model(model, plan)
    if dtype is not None:
        new = new.to(dtype)
    with atomic_dir(out) as tmp:
        new.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _finish_folder(tmp, source_dir, prov)
    return Path(out)


def _finish_folder(tmp: Path, source_dir: str | None, prov: dict) -> None:
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(source_dir) / name
            if src.exists() and not (tmp / name).exists():
                shutil.copy2(src, tmp / name)
    (tmp / "slimlm.json").write_text(json.dumps(prov, indent=1) + "\n")
    from .card import write_model_card

    write_model_card(tmp)


def open_safetensors(path):
    """A safetensors file read with pread rather than mmap: read pages would otherwise stay mapped into the
    process (resident) until it closes the file, and reading a large checkpoint piece by piece is the point."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), "pt", device="cpu", backend="pread")
    except TypeError:  # safetensors before 0.7: mmap only
        return safe_open(str(path), "pt", device="cpu")


def checkpoint_shards(folder: str | Path) -> list[Path]:
    """The safetensors files of a local checkpoint (sharded or single)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    return [single] if single.exists() else []


def prune_checkpoint(source_dir: str | Path, plan: PrunePlan, out: str | Path, prov: dict) -> Path:
    """Prune a safetensors checkpoint on disk shard by shard, writing one output shard per input shard."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    source_dir = Path(source_dir)
    shards = checkpoint_shards(source_dir)
    if not shards:
        raise SlimlmError(f"{source_dir} has no safetensors weights to prune shard by shard")
    config = AutoConfig.from_pretrained(source_dir, trust_remote_code=False)
    adapter = get_adapter(config)
    new_config = adapter.new_config(plan)
    tied = adapter.shape(new_config).tied
    weight_map: dict[str, str] = {}
    total = 0
    with atomic_dir(out) as tmp:
        for i, shard in enumerate(shards):
            with open_safetensors(shard) as f:
                names = [n for n in f.keys() if not (tied and n == "lm_head.weight")]
                sliced = dict(prune_tensors(((n, f.get_tensor(n)) for n in names), adapter, plan, new_config))
            if not sliced:
                continue
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sliced, tmp / fname, metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in sliced.values())
            weight_map.update({n: fname for n in sliced})
            del sliced
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        new_config.save_pretrained(tmp)
        _finish_folder(tmp, str(source_dir), prov)
    return Path(out)
