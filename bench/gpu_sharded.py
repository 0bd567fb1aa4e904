"""FSDP2 and DeepSpeed ZeRO-3 through `slimlm distill`, checked against the same run in one plain process.

On a machine with NVIDIA GPUs, from the repository root (bench/gpu.sh runs it twice):

    python bench/gpu_sharded.py --dtype fp32            # strict checks, with a kill and a resume
    python bench/gpu_sharded.py --dtype bf16 --no-resume  # the GPU default (bf16 mixed precision)
    python bench/gpu_sharded.py --tiny                  # the same on CPUs: tiny models, 2 gloo processes

Models: a random SmolLM2-135M-shaped teacher and the student `slimlm prune` makes of it at half
width (`--tiny`: tiny ones).  Runs, on the same teacher, student and data (8 steps of 8 x 512 tokens,
checkpoints every 2 steps):
  plain      one process, no launcher;
  <backend>  `accelerate launch --config_file configs/accelerate/<config> --num_processes N
             tests/distill_worker.py` with N = the number of GPUs (2 CPU processes with --tiny),
             killed with SIGKILL after step 5 and resumed from its step-4 checkpoint (--no-resume:
             one uninterrupted run).
Checks, each backend against plain: the training losses and validation values (relative), the
exported checkpoint's tensor names, and its weights loaded with `AutoModelForCausalLM` (absolute);
with a resume, that the run died after step 5 and continued from step 4.  Tolerances: fp32 1e-4
(the runs differ in the order of floating-point sums; measured on CPUs: ~4e-7 in the losses, ~2e-6
in the weights); bf16 3e-2 (one process computes under autocast from fp32 weights, FSDP2 from bf16
copies of them, DeepSpeed from a bf16 module: different roundings, ~3e-3 in the losses on CPUs,
plus one bf16 rounding step of the exported weights).  Prints a table and a JSON line; exits 1 when
a check fails, 2 when a run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).parent))
WORKER = ROOT / "tests" / "distill_worker.py"
CONFIGS = {"fsdp2": ("fsdp2_8gpu.yaml", "FSDP"), "zero3": ("deepspeed_zero3_8gpu.yaml", "DEEPSPEED")}
STEPS = 8
KW = dict(seq_len=512, micro_batch=8, warmup=2, lr=3e-4, eval_every=4, save_every=2, heldout=8, progress=False,
          tensorboard=False)
TINY = dict(seq_len=32, micro_batch=4)
KILL_AFTER, RESUME_FROM = 5, 4
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}


def models(folder: Path, tiny: bool):
    import torch
    from distill import char_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slimlm.api import prune

    shape = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, head_dim=64, vocab_size=49152) if not tiny else \
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=512)
    cfg = LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, **shape)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder / "teacher")
    char_tokenizer().save_pretrained(folder / "teacher")
    prune(str(folder / "teacher"), folder / "student", hidden=cfg.hidden_size // 2 if not tiny else 48,
          ffn=cfg.intermediate_size // 2, calib_samples=8, progress=False)
    return str(folder / "teacher"), str(folder / "student")


def run(cmd, spec: dict, tmp: Path, name: str, env: dict) -> subprocess.CompletedProcess:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(spec))
    done = subprocess.run([*cmd, str(WORKER), str(path)], capture_output=True, text=True, env=env)
    (tmp / f"{name}.log").write_text(done.stdout + done.stderr)
    return done


def records(out: Path, event: str, key: str) -> list:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["event"] == event]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="fsdp2,zero3", help="comma-separated: fsdp2, zero3")
    p.add_argument("--dtype", default="fp32", choices=sorted(TOLERANCE))
    p.add_argument("--no-resume", action="store_true", help="one uninterrupted run per backend")
    p.add_argument("--tiny", action="store_true", help="tiny models, 2 CPU processes (a check of the script)")
    args = p.parse_args()
    import torch

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if "zero3" in backends and __import__("importlib").util.find_spec("deepspeed") is None:
        print("zero3 skipped: DeepSpeed is not installed (pip install -e '.[deepspeed]'; see bench/gpu.sh)")
        backends.remove("zero3")
    tmp = Path(tempfile.mkdtemp(prefix="slimlm-sharded-"))
    teacher, student = models(tmp, args.tiny)
    procs = 2 if args.tiny else max(torch.cuda.device_count(), 1)
    kw = {**KW, **(TINY if args.tiny else {}), "dtype": args.dtype}
    # One global batch for both runs: the plain process accumulates what the N processes share.
    kw.update(global_batch=kw["micro_batch"] * procs, tokens=STEPS * kw["micro_batch"] * procs * kw["seq_len"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if args.tiny:
        env["OMP_NUM_THREADS"] = "1"
    spec = dict(teacher=teacher, student=student, data="builtin:python-docs", kwargs=kw)

    done = run([sys.executable], {**spec, "out": str(tmp / "plain")}, tmp, "plain", env)
    if done.returncode:
        print(f"plain failed:\n{done.stderr[-4000:]}")
        sys.exit(2)
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "processes": procs, "dtype": args.dtype, "torch": torch.__version__, "resume": not args.no_resume}
    failed = []
    for backend in backends:
        config, kind = CONFIGS[backend]
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(ROOT / "configs" / "accelerate" / config), "--num_processes", str(procs)]
        out = tmp / backend
        first = {**spec, "out": str(out), "kill_after_step": None if args.no_resume else KILL_AFTER}
        done = run(launch, first, tmp, f"{backend}-1", env)
        if args.no_resume and done.returncode:
            print(f"{backend} failed:\n{done.stderr[-4000:]}")
            sys.exit(2)
        checks = {}
        if not args.no_resume:
            latest = out / "run" / "checkpoints" / "latest"
            checks["killed after step 5, checkpoint of step 4 kept"] = (
                done.returncode != 0 and latest.exists() and latest.read_text().strip() == f"step-{RESUME_FROM:08d}")
            done = run(launch, {**spec, "out": str(out), "kwargs": {**kw, "resume": True}}, tmp, f"{backend}-2", env)
            if done.returncode:
                print(f"{backend} resume failed:\n{done.stderr[-4000:]}")
                sys.exit(2)
            checks["resumed from step 4"] = f"resuming from step-{RESUME_FROM:08d}" in done.stderr
        report[backend] = compare(tmp / "plain", out, kind, TOLERANCE[args.dtype], checks)
        failed += [f"{backend}: {name}" for name, ok in report[backend]["checks"].items() if not ok]
    report["failed"] = failed
    for backend in backends:
        r = report[backend]
        print(f"{backend:6s} {r['distributed']:>10s} losses {r['losses']}\n{'':6s} {'plain':>10s} losses "
              f"{r['plain_losses']}\n{'':6s} largest loss difference {r['max_rel_loss_diff']:.3g} (relative), "
              f"weight difference {r['max_weight_diff']:.3g}")
        for name, ok in r["checks"].items():
            print(f"{'':6s} {'ok  ' if ok else 'FAIL'} {name}")
    print(json.dumps(report))
    sys.exit(1 if failed else 0)


def compare(plain: Path, out: Path, kind: str, tol: float, checks: dict) -> dict:
    """The checks of one backend's run against the plain run."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    meta = json.loads((out / "slimlm.json").read_text())["hyperparameters"]
    rel = 0.0
    curves = {}
    for event, key in (("train", "loss"), ("eval", "val_kl"), ("eval", "val_lm_loss")):
        a, b = records(plain, event, key), records(out, event, key)
        curves[key] = (a, b)
        same = len(a) == len(b) > 0
        rel = max(rel, max((abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)), default=0.0))
        checks[f"{key}: {len(b)} values within {tol:g} of plain"] = same and all(
            abs(x - y) <= tol * max(abs(x), 1e-12) for x, y in zip(a, b))
    checks[f"ran under {kind}"] = meta["distributed"] == kind
    names = []
    for folder in (plain, out):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            names.append(sorted(f.keys()))
    checks["same tensor names in model.safetensors"] = names[0] == names[1]
    one = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).state_dict()
    two = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    diff = max(float((one[k] - two[k]).abs().max()) for k in one) if one.keys() == two.keys() else float("inf")
    checks[f"exported weights within {tol:g} of plain (loaded by transformers)"] = diff <= tol
    return {"distributed": meta["distributed"], "losses": [round(x, 5) for x in curves["loss"][1]],
            "plain_losses": [round(x, 5) for x in curves["loss"][0]], "max_rel_loss_diff": rel,
            "max_weight_diff": diff, "checks": checks}


if __name__ == "__main__":
    main()
