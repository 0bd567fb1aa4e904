#!/usr/bin/env bash
# The GPU check recorded in docs/benchmarks.md ("On a GPU"), as one script: run it from the
# repository root on a machine with an NVIDIA GPU where torch, transformers and accelerate import
# (TRL and datasets for the TRL baseline, pytest for the tests).  About 6 minutes on one H200.
#
#   bash bench/gpu.sh            # logs and JSON under $OUT (default bench/out/gpu)
#
# 1. distillation throughput, bf16 mixed precision: slimlm vs a naive full-logit loop vs TRL's
#    GKDTrainer, random SmolLM2-1.7B-shaped teacher -> half-width 0.5B student (bench/distill.py);
# 2. the loss's peak GPU memory at a Llama-3-sized vocabulary (128256) x 16384 tokens;
# 3. the product end to end on the GPU: `slimlm prune` then `slimlm distill` (dtype auto = bf16)
#    of a random SmolLM2-135M-shaped model, and the result loaded by transformers;
# 4. the distillation, pruning and importance tests, which then run their trainers on the GPU
#    (plus the fused loss under CUDA bf16 autocast).
set -u
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
S=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - S )) s)"; }

stamp env
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
$PY -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/env.txt"
$PY -c "import slimlm.distill, slimlm.api" || { echo "slimlm does not import"; exit 3; }

stamp "1. throughput"
timeout 220 $PY bench/distill.py --what speed --shape 1.7b --dtype bf16 --seq-len 1024 --micro-batch 8 \
    --steps 12 --vocab 49152 --chunks 512,2048 2>&1 | grep -v "it/s\]\|Warning" | tee "$OUT/speed.txt" | tail -12

stamp "2. loss memory"
timeout 90 $PY bench/distill.py --what memory --vocab 128256 --tokens 16384 --hidden 2048 --chunk 2048 2>&1 \
    | tee "$OUT/memory.txt" | tail -8

stamp "3. prune + distill end to end"
timeout 120 $PY - <<'EOF' 2>&1 | grep -v "it/s\]\|Warning" | tee "$OUT/e2e.txt" | tail -25
import json, subprocess, sys, tempfile
from pathlib import Path
import torch
sys.path.insert(0, "bench")
from distill import char_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig

tmp = Path(tempfile.mkdtemp())
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp / "t")
char_tokenizer().save_pretrained(tmp / "t")
for cmd in (["prune", str(tmp / "t"), "-o", str(tmp / "s"), "--hidden", "384", "--ffn", "1024", "--heads", "6",
             "--calib-samples", "16"],
            ["distill", "-t", str(tmp / "t"), "-s", str(tmp / "s"), "-o", str(tmp / "d"), "--tokens", "131072",
             "--seq-len", "512", "--micro-batch", "16"]):
    print("$ slimlm", " ".join(cmd), flush=True)
    done = subprocess.run([sys.executable, "-m", "slimlm", *cmd], capture_output=True, text=True)
    print(done.stdout[-1500:], done.stderr[-1500:], "exit", done.returncode, flush=True)
    if done.returncode:
        sys.exit(1)
meta = json.loads((tmp / "d" / "slimlm.json").read_text())
print("slimlm.json hyperparameters:", {k: meta.get("hyperparameters", {}).get(k) for k in ("dtype", "distributed")})
rows = [json.loads(l) for l in (tmp / "d" / "metrics.jsonl").read_text().splitlines()]
train = [r for r in rows if r["event"] == "train"]
print("train steps", len(train), "loss first/last", train[0]["loss"], train[-1]["loss"],
      "tokens/s median", sorted(r["tokens_per_s"] for r in train)[len(train) // 2])
m = AutoModelForCausalLM.from_pretrained(tmp / "d", dtype=torch.bfloat16).cuda()
ids = torch.tensor([[1, 40, 41, 42]], device="cuda")
print("loads in transformers:", sum(p.numel() for p in m.parameters()) / 1e6, "M params; generate ->",
      m.generate(ids, max_new_tokens=5, do_sample=False).tolist())
EOF

stamp "4. tests on the GPU"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_distill.py tests/test_prune.py tests/test_importance.py \
    2>&1 | tee "$OUT/tests.txt" | tail -25
stamp done
