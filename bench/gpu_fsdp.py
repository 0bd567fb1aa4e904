"""FSDP2 on a GPU: the sharded path of `slimlm distill` (checkpointed loss chunks, sharded checkpoints,
gathered export, resume) against the same run in one plain process.

On a machine with one or more NVIDIA GPUs, from the repository root (about 2 minutes on one H200):

    python bench/gpu_fsdp.py            # random SmolLM2-135M-shaped teacher, student pruned to half

It runs, on the same teacher, student and data (8 steps of 8 x 512 tokens, checkpoints every 4):
  plain    one process, no FSDP (the fused loss);
  fsdp     `accelerate launch --config_file configs/accelerate/fsdp2_8gpu.yaml --num_processes N`;
  resumed  the same FSDP run stopped after 4 steps (`stop_after`), then continued with `resume=True`;
and prints the three loss curves, the mode each recorded (`hyperparameters.distributed`), and the
largest weight difference of the exported students (resumed vs fsdp: the resume is exact up to
nondeterministic GPU kernels; fsdp vs plain: bf16 rounding of two different loss paths).
`--tiny` uses tiny models, for a check of the script on a CPU (where Accelerate runs no FSDP).
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
KW = dict(tokens=8 * 8 * 512, seq_len=512, micro_batch=8, warmup=2, lr=3e-4, eval_every=4, save_every=4,
          heldout=8, progress=False, tensorboard=False)


def worker(argv):
    """One training run (called under `accelerate launch` or plainly)."""
    from slimlm.distill import distill

    what, teacher, student, out = argv
    kw = dict(KW)
    if os.environ.get("SLIMLM_BENCH_TINY"):
        kw.update(tokens=8 * 4 * 32, seq_len=32, micro_batch=4)
    extra = {"stop": dict(stop_after=4), "resume": dict(resume=True)}.get(what, {})
    distill(teacher, student, "builtin:python-docs", out, **kw, **extra)


def models(folder: Path, tiny: bool):
    import torch
    from distill import char_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slimlm.api import prune

    shape = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3) if not tiny else dict(hidden_size=64, intermediate_size=128,
                                                              num_hidden_layers=2, num_attention_heads=4,
                                                              num_key_value_heads=2)
    cfg = LlamaConfig(vocab_size=49152 if not tiny else 512, head_dim=64 if not tiny else 16,
                      max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, **shape)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder / "teacher")
    char_tokenizer().save_pretrained(folder / "teacher")
    half = cfg.hidden_size // 2
    prune(str(folder / "teacher"), folder / "student", hidden=half if not tiny else 48,
          ffn=cfg.intermediate_size // 2, calib_samples=8, progress=False)
    return str(folder / "teacher"), str(folder / "student")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="slimlm-fsdp-"))
    teacher, student = models(tmp, args.tiny)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           **({"SLIMLM_BENCH_TINY": "1"} if args.tiny else {})}
    me = [str(Path(__file__).resolve()), "--worker"]
    gpus = max(torch.cuda.device_count(), 1)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs/accelerate/fsdp2_8gpu.yaml"), "--num_processes", str(gpus)]
    runs = {"plain": [[sys.executable, *me, "full", teacher, student, str(tmp / "plain")]],
            "fsdp": [[*launch, *me, "full", teacher, student, str(tmp / "fsdp")]],
            "resumed": [[*launch, *me, "stop", teacher, student, str(tmp / "resumed")],
                        [*launch, *me, "resume", teacher, student, str(tmp / "resumed")]]}
    for name, cmds in runs.items():
        for cmd in cmds:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                print(f"{name} failed:\n{done.stderr[-4000:]}")
                sys.exit(1)
    from safetensors.torch import load_file

    report = {"gpus": gpus, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    weights = {}
    for name in runs:
        out = tmp / name
        meta = json.loads((out / "slimlm.json").read_text())["hyperparameters"]
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        report[name] = {"distributed": meta.get("distributed"), "dtype": meta.get("dtype"),
                        "losses": [round(r["loss"], 5) for r in rows if r["event"] == "train"],
                        "val_kl": [round(r["val_kl"], 5) for r in rows if r["event"] == "eval"],
                        "checkpoints": sorted(x.name for x in (out / "run" / "checkpoints").glob("*"))
                        if (out / "run" / "checkpoints").exists() else []}
        weights[name] = load_file(str(out / "model.safetensors"))
        print(f"{name:8s} {report[name]['distributed']:>10s} {report[name]['dtype']:>9s} losses "
              f"{report[name]['losses']} val KL {report[name]['val_kl']}")

    def maxdiff(a, b):
        return max(float((weights[a][k].float() - weights[b][k].float()).abs().max()) for k in weights[a])

    report["max_weight_diff_resumed_vs_fsdp"] = maxdiff("resumed", "fsdp")
    report["max_weight_diff_fsdp_vs_plain"] = maxdiff("fsdp", "plain")
    print(f"largest weight difference: resumed vs fsdp {report['max_weight_diff_resumed_vs_fsdp']:.3g}, "
          f"fsdp vs plain {report['max_weight_diff_fsdp_vs_plain']:.3g}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
