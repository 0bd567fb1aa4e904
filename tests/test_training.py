"""The training core (slimlm.training): batch plan, precision, run folder, checkpoints (tiny models, CPU)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import save_tiny, tiny_model

from slimlm.errors import SlimlmError
from slimlm.training import RunFolder, resumable
from slimlm.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from slimlm.training.precision import Precision
from slimlm.training.setup import accelerate_released, make_accelerator, plan_batch


def test_batch_plan_splits_the_global_batch():
    plan = plan_batch(4, 12)
    assert (plan.processes, plan.accumulation, plan.per_process) == (1, 3, 12)
    assert plan.describe() == {"micro_batch": 4, "global_batch": 12, "grad_accumulation": 3, "processes": 1}
    assert plan_batch(4, None).global_batch == 4
    with pytest.raises(SlimlmError, match="not a multiple"):
        plan_batch(4, 6)


def test_precision_rules():
    assert Precision.from_setting("fp32").describe() == {"dtype": "float32", "mixed_precision": "no"}
    bf16 = Precision.from_setting("bf16")
    assert (bf16.mixed, bf16.master, bf16.compute) == ("bf16", torch.float32, torch.bfloat16)
    model = tiny_model("llama").to(torch.bfloat16)
    assert bf16.trainable(model) is model and {p.dtype for p in model.parameters()} == {torch.float32}
    same = tiny_model("llama")
    before = [p.data_ptr() for p in same.parameters()]
    assert [p.data_ptr() for p in bf16.trainable(same).parameters()] == before  # fp32 stays untouched
    with pytest.raises(SlimlmError, match="unknown dtype"):
        Precision.from_setting("int8")


def test_run_folder_checks(tmp_path):
    folder = RunFolder(tmp_path / "out")
    folder.check_start(resume=False, overwrite=False, has_checkpoint=False)  # a new folder
    with pytest.raises(SlimlmError, match="nothing to resume"):
        folder.check_start(resume=True, overwrite=False, has_checkpoint=False)
    folder.prepare(resume=False, overwrite=False, settings={"lr": 1.0})
    assert folder.created_out and folder.unfinished() and json.loads(folder.settings_file.read_text()) == {"lr": 1.0}
    with pytest.raises(SlimlmError, match="unfinished run that has no checkpoint: pass --overwrite"):
        folder.check_start(resume=False, overwrite=False, has_checkpoint=False)
    with pytest.raises(SlimlmError, match="unfinished run: pass --resume"):
        folder.check_start(resume=False, overwrite=False, has_checkpoint=True)
    folder.check_start(resume=False, overwrite=True, has_checkpoint=True)
    folder.check_same_run({"lr": 1.0, "new": 2})  # settings the old run did not record are not compared
    with pytest.raises(SlimlmError, match=r"different settings .*lr: 1.0 -> 2.0"):
        folder.check_same_run({"lr": 2.0})
    with pytest.raises(SlimlmError, match="one of the input models"):
        folder.refuse_inputs(None, str(tmp_path / "out"))


@pytest.mark.parametrize("existed", [False, True])
def test_a_failure_before_any_checkpoint_removes_only_what_the_run_wrote(tmp_path, existed):
    out = tmp_path / "out"
    if existed:  # e.g. a finished run replaced with --overwrite: its model files stay until the export
        out.mkdir()
        (out / "model.safetensors").write_text("old")
    folder = RunFolder(out)
    folder.prepare(resume=False, overwrite=True, settings={})
    folder.metrics_file.write_text("{}\n")
    with pytest.raises(RuntimeError):
        with folder.removed_on_failure(lambda: False):
            raise RuntimeError("diverged")
    if existed:
        assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    else:
        assert not out.exists()
    # with a checkpoint to resume from, everything stays
    folder = RunFolder(tmp_path / "kept")
    folder.prepare(resume=False, overwrite=False, settings={})
    with pytest.raises(RuntimeError):
        with folder.removed_on_failure(lambda: True):
            raise RuntimeError("diverged")
    assert folder.unfinished()


def _training_state(seed=0):
    model = tiny_model("llama", num_hidden_layers=2, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    return model, optimizer, scheduler


def test_checkpoint_round_trip_is_exact_and_pickle_free(tmp_path):
    """Model, optimizer, scheduler, accumulation counter and all random states come back bit for bit."""
    ids = torch.randint(4, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with accelerate_released():
        acc = make_accelerator(plan_batch(2, 2), "no")
        model, optimizer, scheduler = _training_state()
        model, optimizer = acc.prepare(model, optimizer)
        for _ in range(2):
            with acc.accumulate(model):
                acc.backward(model(ids, labels=ids).loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
        path = save_checkpoint(acc, tmp_path / "run", 2, model, optimizer, scheduler, {"step": 2, "data_position": 4})
        draws = (torch.rand(3), random.random(), np.random.rand())
        assert latest_checkpoint(tmp_path / "run") == path
        assert not [p for p in path.iterdir() if p.suffix not in (".json", ".safetensors")]

        fresh, fresh_opt, fresh_sched = _training_state(seed=1)
        fresh, fresh_opt = acc.prepare(fresh, fresh_opt)
        acc.step = 0
        state = load_checkpoint(acc, path, fresh, fresh_opt, fresh_sched)
        assert state == {"step": 2, "data_position": 4} and acc.step == 2
        after = (torch.rand(3), random.random(), np.random.rand())
        assert torch.equal(after[0], draws[0]) and after[1:] == draws[1:]
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    want, got = optimizer.state_dict(), fresh_opt.state_dict()
    assert want["param_groups"] == got["param_groups"]
    for i, values in want["state"].items():
        assert all(torch.equal(values[k], got["state"][i][k]) for k in values)
    assert fresh_sched.state_dict() == scheduler.state_dict()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(400)
def test_two_process_resume_is_exact(tmp_path):
    """DDP (torchrun, 2 gloo processes): the main process writes weights and optimizer, each its random state;
    stopping after 2 of 4 steps and resuming gives the uninterrupted run's weights bit for bit."""
    teacher = save_tiny("llama", tmp_path / "teacher")
    student = save_tiny("llama", tmp_path / "student", num_hidden_layers=2)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("the quick brown fox jumps over the lazy dog. " * 40 + "\n") * 20)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def launch(out, *extra):
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port()), "-m", "slimlm", "distill", "--teacher", str(teacher), "--student", str(student),
                "--data", str(corpus), "-o", str(tmp_path / out), "-q", "--tokens", "1024", "--seq-len", "32",
                "--micro-batch", "2", "--global-batch", "8", "--lr", "2e-3", "--warmup", "1", "--eval-every", "0",
                "--save-every", "0", *extra]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env)
        assert done.returncode == 0, done.stderr[-3000:]

    launch("straight")
    launch("stopped", "--stop-after", "2")
    ckpt = latest_checkpoint(tmp_path / "stopped" / "run")
    assert {p.name for p in ckpt.glob("rng-*.json")} == {"rng-0.json", "rng-1.json"}
    assert resumable(tmp_path / "stopped")
    launch("stopped", "--resume")
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(tmp_path / "stopped" /
                                                                                      "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not resumable(tmp_path / "stopped")
