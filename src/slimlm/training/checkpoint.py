"""Training checkpoints, written atomically and read back without unpickling anything.

slimlm's checkpoints (`slimlm distill`, `correct-teacher`)::

    run/checkpoints/step-00000040/
        model.safetensors            the trained module's weights (tied weights stored once)
        optimizer.safetensors        the optimizer's per-parameter state tensors
        optimizer.json               its parameter groups and any non-tensor state
        rng-R.safetensors, rng-R.json  process R's torch (CPU, CUDA) / Python / NumPy random states
        trainer_state.json           step, data position, ... and under "restore" the scheduler, grad
                                     scaler and accumulation counter (written last: marks it complete)
    run/checkpoints/latest           the name of the newest complete checkpoint

Every process writes its part into ``step-N.tmp``; the main process then renames it and
updates ``latest``, so a crash mid-save leaves the previous checkpoint as the latest one.

Why no pickle: a run folder may come from elsewhere, and unpickling runs whatever code a
crafted file names.  Accelerate's `load_state` unpickles registered custom objects (such as a
scheduler) with ``weights_only=False``; safetensors holds only tensors and JSON only data, so
`--resume` from these files cannot run code.  Files other than the ones above are never read.

Under FSDP2 and DeepSpeed the model and optimizer are sharded across processes; there
Accelerate's `save_state` / `load_state` write and read those two (FSDP2 through
`torch.distributed.checkpoint`, whose metadata file is a pickle; DeepSpeed with
``torch.load(weights_only=False)``), so resume sharded runs only from folders you wrote.
slimlm's own state stays in JSON and safetensors there too.

The Hugging Face Trainer's checkpoints (`slimlm align`): ``checkpoint-N`` folders; on one
process and DDP the Trainer reads them with safetensors and ``torch.load(weights_only=True)``
(tensors and plain containers only: a crafted object is refused, see `refusing_pickles`).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path

from .._io import atomic_write_json, atomic_write_text
from .._logging import quiet_logger
from ..errors import SlimlmError

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS, OPTIMIZER_JSON = "optimizer.safetensors", "optimizer.json"


# ---- slimlm's checkpoints ------------------------------------------------------------------------
def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if (path / STATE_FILE).exists() else None


def save_checkpoint(accelerator, run_dir: Path, step: int, model, optimizer, scheduler, run_state: dict,
                    keep: int = 1) -> Path:
    """Save the full training state at `step`; keep the newest `keep` checkpoints. Call on every process.

    `model` and `optimizer` are the prepared ones; `run_state` is the trainer's own JSON record.
    """
    from .setup import shards_parameters

    root = run_dir / "checkpoints"
    final, tmp = root / f"step-{step:08d}", root / f"step-{step:08d}.tmp"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if shards_parameters(accelerator):
        from accelerate.utils import DistributedType

        # DeepSpeed would also store its partitions of the frozen teacher; the teacher is an input, not state.
        extra = {"exclude_frozen_parameters": True} if accelerator.distributed_type == DistributedType.DEEPSPEED else {}
        # Accelerate warns on every save that a tied LM head is stored once (expected).
        with quiet_logger("accelerate.utils.other"):
            accelerator.save_state(str(tmp), **extra)  # no custom objects are registered: no pickled ones written
    elif main:  # one process or DDP: every process holds the same weights and optimizer state
        _save_model(accelerator.unwrap_model(model), tmp)
        _save_optimizer(optimizer, tmp)
    _save_rng(tmp, accelerator.process_index)
    accelerator.wait_for_everyone()
    if main:
        restore = {"scheduler": scheduler.state_dict(), "accumulation_step": accelerator.step,
                   "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None}
        atomic_write_json(tmp / STATE_FILE, {**run_state, "restore": restore})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / "latest", final.name + "\n")
        done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: max(len(done) - keep, 0)]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler, grad scaler and random states from `path`; return the run state."""
    from .setup import shards_parameters

    state = json.loads((path / STATE_FILE).read_text())
    restore = state.pop("restore", None)
    sharded = shards_parameters(accelerator)
    if restore is None or (not sharded and not (path / OPTIMIZER_JSON).exists()):
        raise SlimlmError(f"{path} was written by an older slimlm (pickled Accelerate state), which --resume no "
                          "longer reads; start the run again with --overwrite")
    if sharded:
        accelerator.load_state(str(path))
    else:
        _load_model(accelerator.unwrap_model(model), path)
        _load_optimizer(optimizer, path)
    scheduler.load_state_dict(restore["scheduler"])
    if accelerator.scaler is not None and restore.get("grad_scaler"):
        accelerator.scaler.load_state_dict(restore["grad_scaler"])
    accelerator.step = restore.get("accumulation_step", 0)
    _load_rng(path, accelerator.process_index)
    return state


def _save_model(module, folder: Path) -> None:
    from safetensors.torch import save_model

    save_model(module, str(folder / MODEL_FILE))  # stores tied weights once


def _load_model(module, folder: Path) -> None:
    from safetensors.torch import load_model

    load_model(module, str(folder / MODEL_FILE), strict=True)


def _save_optimizer(optimizer, folder: Path) -> None:
    """Per-parameter state tensors to safetensors (``"INDEX/NAME"``), the rest (groups, plain values) to JSON."""
    import torch
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, values in sd["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}/{name}"] = value.contiguous()
            else:
                plain.setdefault(str(index), {})[name] = value
    save_file(tensors, str(folder / OPTIMIZER_TENSORS))
    atomic_write_json(folder / OPTIMIZER_JSON, {"param_groups": sd["param_groups"], "state": plain})


def _load_optimizer(optimizer, folder: Path) -> None:
    from safetensors.torch import load_file

    saved = json.loads((folder / OPTIMIZER_JSON).read_text())
    state: dict[int, dict] = {}
    for key, tensor in load_file(str(folder / OPTIMIZER_TENSORS)).items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in saved["state"].items():
        state.setdefault(int(index), {}).update(values)
    groups = saved["param_groups"]
    for group, current in zip(groups, optimizer.param_groups):  # JSON turned tuples (AdamW's betas) into lists
        for key, value in group.items():
            if isinstance(current.get(key), tuple):
                group[key] = tuple(value)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _save_rng(folder: Path, rank: int) -> None:
    """This process's random states: torch's as tensors, Python's and NumPy's as JSON numbers."""
    import random

    import numpy as np
    import torch
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    save_file(tensors, str(folder / f"rng-{rank}.safetensors"))
    atomic_write_json(folder / f"rng-{rank}.json", {"python": [version, list(internal), gauss],
                                                    "numpy": [name, keys.tolist(), pos, has_gauss, cached]})


def _load_rng(folder: Path, rank: int) -> None:
    import random

    import numpy as np
    import torch
    from safetensors.torch import load_file

    if not (folder / f"rng-{rank}.json").exists():
        return  # a run resumed with more processes: the new ones keep their seeded states
    tensors = load_file(str(folder / f"rng-{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    plain = json.loads((folder / f"rng-{rank}.json").read_text())
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---- the Hugging Face Trainer's checkpoints --------------------------------------------------------
def last_trainer_checkpoint(folder: Path) -> Path | None:
    """The newest complete Trainer checkpoint (``checkpoint-N`` with its trainer state) in `folder`."""
    if not folder.is_dir():
        return None
    done = [p for p in folder.glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.json").exists()
            and p.name.split("-")[-1].isdigit()]
    return max(done, key=trainer_checkpoint_step) if done else None


def trainer_checkpoint_step(ckpt: Path | None) -> int:
    """The optimizer step a Trainer checkpoint was written at (0 for None)."""
    return int(ckpt.name.split("-")[-1]) if ckpt is not None else 0


@contextmanager
def refusing_pickles(ckpt: Path | None):
    """A file that ``torch.load(weights_only=True)`` refuses (it names code, not tensors) ends the run in one line."""
    try:
        yield
    except pickle.UnpicklingError as exc:
        if ckpt is None:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SlimlmError(f"{ckpt} holds a file that is not plain tensors; refusing to unpickle it ({first})") from None
