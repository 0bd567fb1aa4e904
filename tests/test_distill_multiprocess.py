"""Two CPU processes (gloo) follow one process at equal global batch: DDP, FSDP2 and DeepSpeed ZeRO-3.

One process runs micro-batch 4 with 2 accumulation steps; two processes run micro-batch 4
each with none. Each optimizer step sees the same 8 windows, so the loss curves agree up to
the order of floating-point sums in the gradient reduction (tolerances in each test).
DDP runs under torchrun; FSDP2 and ZeRO-3 under `accelerate launch` with the repository's configs,
turned on for the CPU group by tests/cpu_accelerate.py. About 10 s, 20 s and 25 s on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny

from slimlm.distill import distill

SEQ = 32
ARGS = dict(tokens=4 * 8 * SEQ, seq_len=SEQ, micro_batch=4, global_batch=8, lr=2e-3, warmup=1, eval_every=2,
            heldout=4, save_every=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(folder, event):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


@pytest.mark.timeout(300)
def test_two_processes_follow_one(tmp_path):
    teacher = save_tiny("llama", tmp_path / "teacher")
    student = save_tiny("llama", tmp_path / "student", num_hidden_layers=2)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("the quick brown fox jumps over the lazy dog. " * 40 + "\n") * 20)

    distill(str(teacher), str(student), str(corpus), tmp_path / "one", progress=False, tensorboard=False, **ARGS)

    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), "-m", "slimlm", "distill", "--teacher", str(teacher), "--student", str(student),
            "--data", str(corpus), "-o", str(tmp_path / "two"), "-q", "--json"]
    for key, value in ARGS.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=280, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["complete"]
    meta = json.loads((tmp_path / "two" / "slimlm.json").read_text())["hyperparameters"]
    assert meta["processes"] == 2 and meta["grad_accumulation"] == 1

    for event, key in (("train", "loss"), ("eval", "val_kl"), ("eval", "val_lm_loss")):
        one = [r[key] for r in _records(tmp_path / "one", event)]
        two = [r[key] for r in _records(tmp_path / "two", event)]
        assert len(one) == len(two) > 0
        assert two == pytest.approx(one, rel=1e-4), (event, key)


ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distill_worker.py")
# Four steps, checkpoints every 2; the sharded runs are killed after step 3 and resumed from step 2.
SHARDED = dict(tokens=4 * 8 * SEQ, seq_len=SEQ, micro_batch=4, global_batch=8, lr=2e-3, warmup=1, eval_every=2,
               heldout=4, save_every=2, chunk_size=16, progress=False, tensorboard=False)


def _launch(config: str, spec: dict, tmp_path, name: str, timeout: int = 150) -> subprocess.CompletedProcess:
    """`accelerate launch` of tests/distill_worker.py with a config of configs/accelerate, 2 CPU processes, fp32."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate" / config),
            "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
            str(WORKER), str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The launcher's agent ends its workers (each in a session of its own) on SIGTERM; SIGKILL if it hangs.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"{name}: no result after {timeout} s\n{err[-3000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _sharded_run_follows_one_process(tmp_path, config: str, distributed: str):
    """Train through the real trainer under `config` on 2 gloo processes, kill it after step 3, resume it from
    its step-2 checkpoint, and compare everything with the same run in one plain process.

    Tolerances: the losses and validation values agree to rel 1e-5, the exported weights to 1e-5
    absolute; the two runs differ only in the order of floating-point sums (gradients averaged over
    2 processes vs accumulated in one), observed ~2e-7 relative in the losses and ~3e-8 in the weights
    (Adam's normalised step can turn such differences in a near-zero gradient into up to lr per step).
    """
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    teacher = save_tiny("llama", tmp_path / "teacher")
    student = save_tiny("llama", tmp_path / "student", num_hidden_layers=2)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("the quick brown fox jumps over the lazy dog. " * 40 + "\n") * 20)
    distill(str(teacher), str(student), str(corpus), tmp_path / "one", **SHARDED)

    spec = dict(teacher=str(teacher), student=str(student), data=str(corpus), out=str(tmp_path / "two"),
                kwargs=SHARDED, kill_after_step=3)
    killed = _launch(config, spec, tmp_path, "killed")
    assert killed.returncode != 0, "the run should have been killed after step 3"
    checkpoints = tmp_path / "two" / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-00000002", killed.stderr[-3000:]
    assert not (tmp_path / "two" / "slimlm.json").exists()
    resumed = _launch(config, {**spec, "kwargs": {**SHARDED, "resume": True}, "kill_after_step": None},
                      tmp_path, "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step-00000002" in resumed.stderr

    meta = json.loads((tmp_path / "two" / "slimlm.json").read_text())["hyperparameters"]
    assert meta["distributed"] == distributed and meta["processes"] == 2
    for event, key in (("train", "loss"), ("eval", "val_kl"), ("eval", "val_lm_loss")):
        one = [r[key] for r in _records(tmp_path / "one", event)]
        two = [r[key] for r in _records(tmp_path / "two", event)]
        assert len(one) == len(two) > 0
        assert two == pytest.approx(one, rel=1e-5), (event, key)
    assert [r["step"] for r in _records(tmp_path / "two", "train")] == [1, 2, 3, 4]

    # One standard checkpoint: the same tensors as the one-process export, loaded by transformers.
    names = {}
    for run in ("one", "two"):
        with safe_open(str(tmp_path / run / "model.safetensors"), "pt") as f:
            names[run] = sorted(f.keys())
    assert names["two"] == names["one"]
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)
    return checkpoints


@pytest.mark.timeout(400)
def test_fsdp2_run_is_killed_resumes_and_exports_like_one_process(tmp_path):
    """FSDP2 exactly as Accelerate applies it (`accelerate launch` with configs/accelerate/fsdp2_8gpu.yaml, so
    `fsdp2_prepare_model` with the CPU-RAM-efficient loading, sharded checkpoints and the gathered export)."""
    checkpoints = _sharded_run_follows_one_process(tmp_path, "fsdp2_8gpu.yaml", "FSDP")
    from torch.distributed.checkpoint import FileSystemReader

    # The sharded checkpoint holds the student only: the frozen teacher has neither weights nor optimizer state there.
    step = checkpoints / "step-00000004"
    saved = list(FileSystemReader(str(step / "pytorch_model_fsdp_0")).read_metadata().state_dict_metadata)
    assert saved and all(k.startswith("model.objective.") for k in saved), saved
    optim = list(FileSystemReader(str(step / "optimizer_0")).read_metadata().state_dict_metadata)
    assert optim and not [k for k in optim if "teacher" in k]


@pytest.mark.timeout(400)
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")
def test_zero3_run_is_killed_resumes_and_exports_like_one_process(tmp_path):
    """DeepSpeed ZeRO-3 on DeepSpeed's CPU accelerator (`accelerate launch` with configs/accelerate/deepspeed_zero3_8gpu.yaml:
    ZeRO-3 partitioned from loading on, engine checkpoints, the gathered 16-bit export, here in fp32)."""
    checkpoints = _sharded_run_follows_one_process(tmp_path, "deepspeed_zero3_8gpu.yaml", "DEEPSPEED")
    # The engine's checkpoint holds the student only: the frozen teacher's partitions are left out.
    for rank in (0, 1):
        state = torch.load(checkpoints / "step-00000004" / "pytorch_model" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
                           map_location="cpu", weights_only=False)
        assert state["ds_config"]["zero_optimization"]["stage"] == 3
        assert not state["frozen_param_fragments"] and not [k for k in state["module"] if "teacher" in k]
        assert all(v.numel() == 0 for v in state["module"].values())  # partitioned: the weights are in the optimizer state
