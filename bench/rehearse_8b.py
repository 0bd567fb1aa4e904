"""The paper's 8B shape, rehearsed on a small machine: importance and pruning of Llama-3.1-8B's exact shape.

    python bench/rehearse_8b.py                 # the real shape: ~16 GB of bf16 shards under bench/out/rehearse-8b
    python bench/rehearse_8b.py --shape tiny    # the same steps on a small shape, in a minute

Steps, each a separate `slimlm` process whose wall time and peak resident memory (GNU time's
"Maximum resident set size") are recorded:

1. write a random-weight checkpoint of Llama-3.1-8B's shape (32 layers, hidden 4096, MLP 14336,
   32 heads, 8 KV heads, vocab 128,256, untied head, bf16, shards of at most 2 GB) with SmolLM2's
   tokenizer (its ids are all below the vocabulary size);
2. `slimlm importance` on it: 8 windows x 256 tokens of the default corpus; the model does not fit
   in memory in fp32, so the decoder layers stream one at a time (automatic);
3. `slimlm prune` to Llama-3.1-Minitron-4B-Width (hidden 3072, MLP 9216) and to 4B-Depth (16 layers
   by Block Importance, which the streamed pass computes), both from the saved scores, shard by shard;
4. load each pruned checkpoint (bf16) and run one forward;
5. `slimlm distill --dry-run` for 8B -> 4B-Width on 8 x 80 GB under FSDP2 and under ZeRO-3.

Nothing generated is committed (bench/out is ignored).  Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "rehearse-8b"

SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "tiny": dict(vocab_size=49152, hidden_size=256, intermediate_size=896, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=32),
}
WIDTH = {"8b": (3072, 9216), "tiny": (192, 672)}

WRITE = r"""
import json, sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoTokenizer
from safetensors.torch import save_file
shape, out, max_shard = json.loads(sys.argv[1]), Path(sys.argv[2]), int(float(sys.argv[3]))
out.mkdir(parents=True, exist_ok=True)
config = AutoConfig.for_model("llama", **shape, max_position_embeddings=131072, rope_theta=500000.0,
                              tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001, dtype="bfloat16")
config.save_pretrained(out)
from slimlm.models import load_tokenizer
load_tokenizer("smollm2-135m").save_pretrained(out)
# every tensor of the architecture, by name and shape, without building the model
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM
with init_empty_weights():
    skeleton = AutoModelForCausalLM.from_config(config)
g = torch.Generator().manual_seed(0)
shards, current, size, index = [], {}, 0, {}
def flush():
    global current, size
    if current:
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(current, out / name, metadata={"format": "pt"})
        shards.append(name); index.update({k: name for k in current})
        current, size = {}, 0
for name, p in skeleton.named_parameters():
    n = p.numel() * 2
    if size + n > max_shard:
        flush()
    if name.endswith("norm.weight"):
        t = torch.ones(p.shape, dtype=torch.bfloat16)
    else:
        t = (torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)
    current[name] = t; size += n
flush()
total = sum((out / s).stat().st_size for s in shards)
for i, s in enumerate(shards):  # the standard names: model-0000i-of-0000n.safetensors
    final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    (out / s).rename(out / final)
    index = {k: (final if v == s else v) for k, v in index.items()}
(out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}))
print(json.dumps({"shards": len(shards), "bytes": total, "parameters": sum(p.numel() for p in skeleton.parameters())}))
"""

FORWARD = r"""
import sys, time, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(2)
t0 = time.time()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
t1 = time.time()
with torch.inference_mode():
    logits = model(input_ids=torch.tensor([[1, 504, 3458, 282, 4649, 314]])).logits
assert torch.isfinite(logits.float()).all()
print(f"params {sum(p.numel() for p in model.parameters())} load {t1 - t0:.1f}s forward {time.time() - t1:.1f}s")
"""


def timed(name: str, argv: list[str], rows: list, env: dict, notes: list | None = None) -> str:
    """Run one step under GNU time; record wall seconds and peak resident memory."""
    print(f"+ {' '.join(argv)}", flush=True)
    t0 = time.time()
    done = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if done.returncode:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-5000:])
        raise SystemExit(f"step '{name}' failed")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    rows.append((name, wall, peak_kb * 1024))
    if notes is not None:  # the one-line notices slimlm printed (e.g. that the layers stream)
        notes += [line for line in done.stderr.splitlines() if line.startswith("importance: ")]
    print(f"  {wall:,.0f} s, peak {peak_kb / 2**20:.2f} GiB", flush=True)
    return done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints (default: delete at the end)")
    a = ap.parse_args()
    out = a.out or (OUT if a.shape == "8b" else OUT.with_name("rehearse-tiny"))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_TRIM_THRESHOLD_": "0", "TOKENIZERS_PARALLELISM": "false",
           "SLIMLM_TOKEN_CACHE": str(out / "token-cache")}
    py, slim = sys.executable, [sys.executable, "-m", "slimlm"]
    ckpt, scores = out / "llama-8b-shape", out / "scores.safetensors"
    rows: list = []
    notes: list = []
    info = json.loads(timed("write the random checkpoint (bf16, shards <= 2 GB)",
                            [py, "-c", WRITE, json.dumps(SHAPES[a.shape]), str(ckpt), "2e9"], rows, env)
                      .strip().splitlines()[-1])
    timed("importance (8 x 256 tokens, layers streamed)",
          [*slim, "importance", str(ckpt), "-o", str(scores), "--calib-samples", "8", "--seq-len", "256",
           "--heldout", "0", "--batch-size", "8", *(["--offload", "layers"] if a.shape == "tiny" else [])],
          rows, env, notes)
    hidden, ffn = WIDTH[a.shape]
    timed(f"prune to 4B-Width (hidden {hidden}, MLP {ffn})",
          [*slim, "prune", str(ckpt), "-o", str(out / "4b-width"), "--scores", str(scores), "--hidden", str(hidden),
           "--ffn", str(ffn)], rows, env)
    layers = SHAPES[a.shape]["num_hidden_layers"] // 2
    timed(f"prune to 4B-Depth ({layers} layers by Block Importance)",
          [*slim, "prune", str(ckpt), "-o", str(out / "4b-depth"), "--scores", str(scores), "--layers", str(layers),
           "--depth-metric", "bi"], rows, env)
    for name in ("4b-width", "4b-depth"):
        notes.append(f"{name}: " + timed(f"load {name} (bf16) and run one forward", [py, "-c", FORWARD, str(out / name)],
                                        rows, env).strip().splitlines()[-1])
    plans = {}
    for backend, cfg in (("FSDP2", "fsdp2_8gpu.yaml"), ("ZeRO-3", "deepspeed_zero3_8gpu.yaml")):
        text = timed(f"distill --dry-run, 8B -> 4B-Width, {backend} on 8 x 80 GB",
                     [*slim, "distill", "-t", str(ckpt), "-s", str(out / "4b-width"), "-o", str(out / "never"),
                      "--seq-len", "8192", "--micro-batch", "1", "--global-batch", "1152", "--dtype", "bf16",
                      "--dry-run", "--accelerate-config", str(ROOT / "configs" / "accelerate" / cfg),
                      "--device-memory", "80GB", "--json"], rows, env)
        plans[backend] = json.loads(text.strip().splitlines()[-1])["plans"]["distill"]

    print(f"\n### Llama-3.1-8B shape ({a.shape}), {info['parameters'] / 1e9:.2f}B parameters, "
          f"{info['bytes'] / 2**30:.1f} GiB in {info['shards']} bf16 shards\n")
    print("| step | wall time | peak resident memory |\n|---|---|---|")
    for name, wall, peak in rows:
        print(f"| {name} | {wall:,.0f} s | {peak / 2**30:.2f} GiB |")
    print()
    for n in notes:
        print(f"- {n}")
    print("\n| `distill --dry-run` 8B -> 4B-Width, per GPU | " + " | ".join(plans) + " |\n|---|" + "---|" * len(plans))
    parts = list(next(iter(plans.values()))["parts"])
    for part in parts + ["total"]:
        cells = [(p["parts"].get(part, 0) if part != "total" else p["total"]) / 2**30 for p in plans.values()]
        print(f"| {part} | " + " | ".join(f"{c:.2f} GiB" for c in cells) + " |")
    print("| fits in 80 GB | " + " | ".join(str(p["fits"]) for p in plans.values()) + " |")
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
