"""Benchmark the distillation engine against a plain PyTorch loop, and the chunked loss's memory.

Two measurements:

1. ``speed``: tokens/s of `slimlm.distill.distill` vs a naive loop (full teacher and student
   logits, full-vocabulary forward KL, AdamW) at the same models, micro-batch and sequence length.
2. ``memory``: peak extra memory of one forward + backward of the KD loss at `--vocab` x `--tokens`
   (default 49152 x 2048, SmolLM2's vocabulary), chunked vs naive.  Each variant runs in a fresh
   subprocess; on CPU the peak is the growth of the max resident set size (run with
   MALLOC_TRIM_THRESHOLD_=0, see docs/PITFALLS.md), on GPU `torch.cuda.max_memory_allocated`.

Without --teacher/--student, random Llama models are built (vocab --vocab) with a tiny
character tokenizer, so the script needs no download.  A smoke run (under a minute on 2 cores):

    python bench/distill.py --what both --steps 3 --seq-len 64 --hidden 64 --vocab 8192 --tokens 512

The real comparison (long on a CPU; do not run on a shared machine):

    python bench/distill.py --teacher smollm2-135m --student pruned/ --seq-len 128 --micro-batch 4 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


# ---- inputs -------------------------------------------------------------------------------
def char_tokenizer():
    """A ~100-token character tokenizer built in memory (ids fit any vocab >= 128)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in " \n" + "".join(chr(c) for c in range(33, 127)):
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def random_models(folder: Path, hidden: int, vocab: int, seq_len: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    paths = []
    for name, layers in (("teacher", 4), ("student", 2)):
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                             num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
                             num_key_value_heads=max(hidden // 64, 1), max_position_embeddings=max(seq_len, 128),
                             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(len(paths))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(folder / name)
        char_tokenizer().save_pretrained(folder / name)
        paths.append(str(folder / name))
    return paths


# ---- speed --------------------------------------------------------------------------------
def naive_loop(teacher_spec, student_spec, windows, micro_batch, steps, lr):
    """The baseline: what one writes by hand with full logits."""
    from slimlm.models import load_model

    teacher, student = load_model(teacher_spec), load_model(student_spec)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.95))
    rates = []
    for step in range(steps):
        ids = windows[step * micro_batch:(step + 1) * micro_batch]
        t0 = time.perf_counter()
        with torch.no_grad():
            t_logits = teacher(ids).logits
        s_logits = student(ids).logits
        log_q = F.log_softmax(s_logits.float(), -1)
        log_p = F.log_softmax(t_logits.float(), -1)
        loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(ids.numel() / (time.perf_counter() - t0))
    return rates


def speed(args, teacher, student, tokenizer):
    from slimlm.data import pack_windows
    from slimlm.distill import distill

    n = args.steps * args.micro_batch
    windows = pack_windows(args.data, tokenizer, args.seq_len, n, seed=0).input_ids
    out = Path(tempfile.mkdtemp(prefix="slimlm-bench-")) / "out"
    distill(teacher, student, args.data, out, tokens=n * args.seq_len, seq_len=args.seq_len,
            micro_batch=args.micro_batch, lr=1e-4, warmup=0, eval_every=0, save_every=0, progress=False,
            tensorboard=False, tokenizer=tokenizer)
    ours = [json.loads(line)["tokens_per_s"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["event"] == "train"]
    naive = naive_loop(teacher, student, windows, args.micro_batch, args.steps, 1e-4)
    # The first step pays one-time costs (allocations, kernel selection): leave it out.
    return {"slimlm_tokens_per_s": statistics.median(ours[1:] or ours),
            "naive_tokens_per_s": statistics.median(naive[1:] or naive)}


# ---- memory -------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to clear_refs); return the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS") * 1024


def _peak_rss() -> int:
    return _status_kb("VmHWM") * 1024


def _memory_child(variant: str, vocab: int, tokens: int, hidden: int, chunk: int) -> dict:
    """Runs in a fresh process: peak extra memory of one KD forward + backward."""
    from slimlm.distill.loss import kd_loss, naive_kd_loss

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    # Warm-up on tiny inputs: the first checkpointed call imports torch._dynamo (~100 MB, seconds).
    x = torch.randn(4, 8, device=dev, requires_grad=True)
    kd_loss(x, torch.randn(16, 8, device=dev), x.detach(), torch.randn(16, 8, device=dev)).loss.backward()
    g = torch.Generator(device=dev).manual_seed(0)
    hs = torch.randn(tokens, hidden, device=dev, generator=g, requires_grad=True)
    w = (0.02 * torch.randn(vocab, hidden, device=dev, generator=g)).requires_grad_()
    ht = torch.randn(tokens, hidden, device=dev, generator=g)
    wt = 0.02 * torch.randn(vocab, hidden, device=dev, generator=g)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_peak_rss()
    t0 = time.perf_counter()
    if variant == "chunked":
        loss = kd_loss(hs, w, ht, wt, chunk_size=chunk).loss
    else:
        loss = naive_kd_loss(hs @ w.T, ht @ wt.T)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss() - base
    return {"variant": variant, "peak_extra_mb": round(peak / 2**20, 1), "seconds": round(time.perf_counter() - t0, 3)}


def memory(args):
    results = []
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "0"}
    for variant in ("chunked", "naive"):
        code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import distill as b; "
                f"print(json.dumps(b._memory_child({variant!r}, {args.vocab}, {args.tokens}, {args.hidden}, "
                f"{args.chunk})))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {"vocab": args.vocab, "tokens": args.tokens, "hidden": args.hidden, "chunk": args.chunk,
            "results": results, "logits_tensor_mb": round(args.vocab * args.tokens * 4 / 2**20, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", choices=["speed", "memory", "both"], default="both")
    p.add_argument("--teacher"), p.add_argument("--student")
    p.add_argument("--data", default="builtin:python-docs")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--hidden", type=int, default=576, help="random models / memory test: hidden size")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--tokens", type=int, default=2048, help="memory test: tokens in the loss")
    p.add_argument("--chunk", type=int, default=1024, help="memory test: chunk size")
    args = p.parse_args(argv)
    report = {"torch_threads": torch.get_num_threads()}
    if args.what in ("speed", "both"):
        if args.teacher and args.student:
            from slimlm.models import load_tokenizer

            teacher, student, tok = args.teacher, args.student, load_tokenizer(args.student)
        else:
            teacher, student = random_models(Path(tempfile.mkdtemp(prefix="slimlm-bench-models-")), args.hidden,
                                             args.vocab, args.seq_len)
            tok = char_tokenizer()
        report["speed"] = speed(args, teacher, student, tok)
    if args.what in ("memory", "both"):
        report["memory"] = memory(args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
