#!/usr/bin/env bash
# The GPU check recorded in docs/benchmarks.md ("On a GPU"), as one script: run it from the
# repository root on a machine with an NVIDIA GPU where torch, transformers and accelerate import
# (TRL and datasets for the TRL baseline, pytest for the tests, DeepSpeed for ZeRO-3).  Parts 1-4:
# about 150 s on one H200; part 5 adds an estimated 3-4 minutes (capped at 390 s).
#
#   bash bench/gpu.sh            # logs and JSON under $OUT (default bench/out/gpu)
#
# 1. distillation throughput, bf16 mixed precision: slimlm vs a naive full-logit loop vs TRL's
#    GKDTrainer, random SmolLM2-1.7B-shaped teacher -> half-width 0.5B student (bench/distill.py);
# 2. the loss's peak GPU memory at a Llama-3-sized vocabulary (128256) x 16384 tokens;
# 3. the product end to end on the GPU: `slimlm prune` then `slimlm distill` (dtype auto = bf16)
#    of a random SmolLM2-135M-shaped model, and the result loaded by transformers;
# 4. the distillation, pruning and importance tests, which then run their trainers on the GPU
#    (plus the fused loss under CUDA bf16 autocast);
# 5. FSDP2 and DeepSpeed ZeRO-3 through `accelerate launch` on the GPU(s) (bench/gpu_sharded.py):
#    in fp32, killed after step 5 and resumed from step 4, losses and exported weights against one
#    plain process within 1e-4; then in bf16 mixed precision (the GPU default) within 3e-2.
#    Estimated 3-4 minutes (8 short runs of a 135M teacher; not yet timed on a GPU).
#
#   PARTS=5 bash bench/gpu.sh    # only some parts (default 1,2,3,4,5); parts 1-4 took about 150 s
#                                # on one H200 (docs/benchmarks.md), part 5 is capped at 390 s
#   SHARDED_FLAGS=--tiny PARTS=5 bash bench/gpu.sh   # part 5's plumbing on a CPU machine (tiny models)
#
# ZeRO-3 needs DeepSpeed, which the GPU machine lacks and cannot download (nothing outside it can
# be reached).  Build its wheels on a machine with the package index, into .whl/ (ignored by git:
# `echo /.whl/ >> .git/info/exclude`), and carry that folder; this script then installs them
# into /tmp/site.  For Python 3.12 on x86-64 (4.7 MB):
#   pip wheel --no-deps -w .whl deepspeed==0.19.8
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl pydantic==2.13.4 pydantic-core==2.46.4 \
#       annotated-types==0.7.0 typing-inspection==0.4.2 hjson==3.1.0
# Without DeepSpeed, part 5 runs FSDP2 only and says that ZeRO-3 was skipped.
set -u
OUT=${OUT:-bench/out/gpu}
PARTS=",${PARTS:-1,2,3,4,5},"
part() { [[ $PARTS == *",$1,"* ]]; }
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
S=$(date +%s)
stamp() { echo "== $1 ($(( $(date +%s) - S )) s)"; }

stamp env
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/env.txt"
$PY -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/env.txt"
$PY -c "import slimlm.distill, slimlm.api" || { echo "slimlm does not import"; exit 3; }

part 1 && stamp "1. throughput" && timeout 220 $PY bench/distill.py --what speed --shape 1.7b --dtype bf16 --seq-len 1024 --micro-batch 8 \
    --steps 12 --vocab 49152 --chunks 512,2048 2>&1 | grep -v "it/s\]\|Warning" | tee "$OUT/speed.txt" | tail -12

part 2 && stamp "2. loss memory" && timeout 90 $PY bench/distill.py --what memory --vocab 128256 --tokens 16384 --hidden 2048 --chunk 2048 2>&1 \
    | tee "$OUT/memory.txt" | tail -8

part 3 && stamp "3. prune + distill end to end" && timeout 120 $PY - <<'EOF' 2>&1 | grep -v "it/s\]\|Warning" | tee "$OUT/e2e.txt" | tail -25
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

part 4 && stamp "4. tests on the GPU" && timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_distill.py tests/test_prune.py tests/test_importance.py \
    2>&1 | tee "$OUT/tests.txt" | tail -25
if part 5; then
  stamp "5. FSDP2 and ZeRO-3 on the GPU"
  if ! $PY -c "import deepspeed" 2>/dev/null && ls .whl/deepspeed-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=$PYTHONPATH:/tmp/site
  fi
  $PY -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$OUT/env.txt"
  quiet='^{\|Loading weights\|Writing model\|WARNING\|Warning'
  timeout 240 $PY bench/gpu_sharded.py --dtype fp32 ${SHARDED_FLAGS:-} 2>&1 | tee "$OUT/sharded-fp32.txt" \
    | grep -v "$quiet" | tail -30
  timeout 150 $PY bench/gpu_sharded.py --dtype bf16 --no-resume ${SHARDED_FLAGS:-} 2>&1 | tee "$OUT/sharded-bf16.txt" \
    | grep -v "$quiet" | tail -30
fi
stamp done
