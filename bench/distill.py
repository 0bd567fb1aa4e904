"""Benchmark the distillation engine against a plain PyTorch loop and TRL, and the chunked loss's memory.

Two measurements, printed as tables and as one final JSON line:

1. ``speed``: optimizer-step throughput (tokens/s, median over the steps after the first) of
   (a) `slimlm.distill.distill`, (b) a naive loop (full teacher and student logits,
   full-vocabulary forward KL, AdamW), and (c) TRL's `trl.experimental.gkd.GKDTrainer` set up as
   pure forward KL on corpus text (lmbda=0, beta=0, seq_kd=False, temperature 1; fp32, no bf16,
   no gradient checkpointing: its defaults turn both on, even on CPU), one after the other in the
   same process, at the same teacher, student, micro-batch, sequence length, learning rate
   (constant), betas (0.9, 0.95), clipping (1.0) and thread count.  (b) and (c) train on the
   same packed windows of --data; (a) packs its own windows of the same source and length
   (content does not change the cost of a fixed-length step).  Also printed: the ratios
   slimlm/naive and slimlm/TRL, and each one's share of the machine's roofline: the best fp32
   GFLOP/s of a 2048 x 2048 matmul loop at the same thread count, against the useful FLOPs of a
   step (PaLM convention, per token: teacher forward 2*N_t + 4*L_t*T*A_t, student forward and
   backward 6*N_s + 12*L_s*T*A_s, where N counts every Linear weight, LM head included, T is
   the sequence length and A the attention width heads*head_dim; recomputation not counted).
2. ``memory``: peak extra memory of one forward + backward of the KD loss at `--vocab` x `--tokens`
   (default 49152 x 2048, SmolLM2's vocabulary), chunked vs naive, and their ratio (target
   <= 0.35).  Each variant runs in a fresh subprocess; on CPU the peak is the growth of the max
   resident set size (run with MALLOC_TRIM_THRESHOLD_=0, see docs/PITFALLS.md), on GPU
   `torch.cuda.max_memory_allocated`.

Without --teacher/--student, random Llama models are built (vocab --vocab) with a tiny
character tokenizer, so the script needs no download: `--shape tiny` (4 and 2 layers of width
--hidden) or `--shape 1.7b` (a teacher of SmolLM2-1.7B's shape, 1.7B parameters, and a
student of half its width, 0.5B, as `slimlm prune --hidden 1024 --ffn 4096 --heads 16` makes;
for GPUs).  On a GPU every engine runs there; `--dtype bf16` gives all three bf16 mixed precision
(fp32 master weights and autocast for the student, the frozen teacher in bf16; TRL with
bf16=True) and the roofline is the bf16 matmul peak.  The GPU runs recorded in docs/benchmarks.md
are the two calls of this script in `bench/gpu.sh`.  A smoke run (about a minute on 2 cores):

    python bench/distill.py --what both --steps 3 --seq-len 64 --hidden 64 --vocab 8192 --tokens 512

The real comparison, on the real teacher and a student pruned to about half of it (67.5M
parameters).  Make the student once (about a minute):

    slimlm prune smollm2-135m -o bench/out/smol-half --hidden 384 --ffn 1024 --heads 6 --calib-samples 32

(if --student names a folder that does not exist and --teacher is smollm2-135m, the script makes
it exactly so itself).  Then, on quiet cores (about 5 minutes on 2 quiet cores: 3 x 10 steps of
512 tokens at ~90 tokens/s, plus loading, the matmul probe and the two memory subprocesses):

    python bench/distill.py --teacher smollm2-135m --student bench/out/smol-half --seq-len 128 --micro-batch 4 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _mixed(dtype: str):
    """The autocast context of --dtype (bf16 mixed precision), or a no-op for fp32."""
    return torch.autocast(DEV, dtype=torch.bfloat16, enabled=dtype == "bf16")


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


def random_models(folder: Path, hidden: int, vocab: int, seq_len: int, shape: str = "tiny"):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if shape == "1.7b":  # SmolLM2-1.7B's shape, and the half-width student width pruning makes of it
        shapes = (("teacher", dict(layers=24, hidden=2048, ffn=8192, heads=32)),
                  ("student", dict(layers=24, hidden=1024, ffn=4096, heads=16)))
    else:
        shapes = (("teacher", dict(layers=4, hidden=hidden, ffn=hidden * 3, heads=max(hidden // 64, 1))),
                  ("student", dict(layers=2, hidden=hidden, ffn=hidden * 3, heads=max(hidden // 64, 1))))
    paths = []
    for name, sh in shapes:
        config = LlamaConfig(vocab_size=vocab, hidden_size=sh["hidden"], intermediate_size=sh["ffn"],
                             num_hidden_layers=sh["layers"], num_attention_heads=sh["heads"],
                             num_key_value_heads=sh["heads"], head_dim=64, max_position_embeddings=max(seq_len, 128),
                             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(len(paths))
        with torch.device(DEV):  # initialising 1.7B parameters on a CPU takes minutes
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(folder / name)
        char_tokenizer().save_pretrained(folder / name)
        paths.append(str(folder / name))
    return paths


# ---- speed --------------------------------------------------------------------------------
def _median_after_first(values):
    """The first step pays one-time costs (allocations, kernel selection): leave it out."""
    return statistics.median(values[1:] or values)


def naive_loop(teacher_spec, student_spec, windows, micro_batch, steps, lr, dtype="fp32", profiler=None):
    """The baseline: what one writes by hand with full logits (bf16: autocast, teacher in bf16)."""
    from slimlm.models import load_model

    teacher = load_model(teacher_spec, "bfloat16" if dtype == "bf16" else "float32").to(DEV)
    student = load_model(student_spec, "float32").to(DEV)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.95))
    rates = []
    for step in range(steps):
        ids = windows[step * micro_batch:(step + 1) * micro_batch].to(DEV)
        _sync()
        t0 = time.perf_counter()
        with _mixed(dtype):
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
        _sync()
        rates.append(ids.numel() / (time.perf_counter() - t0))
        if profiler is not None:
            profiler.step()
    del teacher, student, opt, t_logits, s_logits, log_q, log_p, loss
    return rates


def trl_loop(teacher_spec, student_spec, windows, tokenizer, micro_batch, steps, lr, dtype="fp32"):
    """TRL's GKDTrainer as pure forward KL on the corpus windows; tokens/s of each optimizer step.

    lmbda=0 (never the student's own generations), seq_kd=False (never the teacher's), beta=0
    (the generalized JSD is then the forward KL(teacher || student)), temperature 1.  Its
    defaults (inherited from SFTConfig) turn on bf16 and gradient checkpointing even on CPU:
    both are turned off, so it runs in fp32 like the other two (with --dtype bf16 its bf16=True
    mixed precision is on, and the teacher is loaded in bf16 as slimlm does).  A step is timed from the
    trainer's on_step_begin to on_step_end: forward, backward, clipping and the optimizer step,
    not the data loading or logging around them (generous to TRL).
    """
    import warnings

    from datasets import Dataset
    from transformers import TrainerCallback
    from slimlm.models import load_model

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDConfig, GKDTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0, self.seconds = None, []

        def on_step_begin(self, args, state, control, **kw):
            _sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync()
            self.seconds.append(time.perf_counter() - self.t0)

    def collate(rows):
        ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    bf16 = dtype == "bf16"
    teacher = load_model(teacher_spec, "bfloat16" if bf16 else "float32")
    student = load_model(student_spec, "float32")
    config = GKDConfig(
        output_dir=tempfile.mkdtemp(prefix="slimlm-bench-trl-"),
        lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0,
        per_device_train_batch_size=micro_batch, gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
        bf16=bf16, fp16=False, gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(),
        max_length=windows.shape[1], report_to=[], save_strategy="no", logging_strategy="no",
        eval_strategy="no", disable_tqdm=True, dataloader_pin_memory=False, seed=0,
    )
    timer = StepTimer()
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, data_collator=collate,
                         train_dataset=Dataset.from_dict({"input_ids": windows.tolist()}), processing_class=tokenizer,
                         callbacks=[timer])
    # What the trainer will really run (its config could silently override ours).
    assert trainer.args.bf16 == bf16 and not trainer.args.gradient_checkpointing and trainer.lmbda == 0 and trainer.beta == 0
    assert next(trainer.model.parameters()).dtype == torch.float32
    trainer.train()
    tokens = micro_batch * windows.shape[1]
    return [tokens / s for s in timer.seconds]


def matmul_peak(dtype: str = "fp32", seconds: float = 3.0) -> dict:
    """GFLOP/s of an n x n matmul (n 2048 on CPUs, at the current thread count; 8192 on GPUs), in
    --dtype: best and median of a ~3 s loop."""
    n = 8192 if DEV == "cuda" else 2048
    kw = dict(device=DEV, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    a, b, c = torch.randn(n, n, **kw), torch.randn(n, n, **kw), torch.empty(n, n, **kw)
    for _ in range(3):
        torch.mm(a, b, out=c)
    _sync()
    rates, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(rates) < 5:
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        _sync()
        rates.append(2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return {"n": n, "dtype": dtype, "device": DEV, "threads": torch.get_num_threads(),
            "best_gflops": round(max(rates), 1), "median_gflops": round(statistics.median(rates), 1),
            "runs": len(rates)}


def model_flops(spec, seq_len: int) -> dict:
    """Matmul weights N (every Linear, LM head included even when tied) and attention shape of a model."""
    from slimlm.models import load_model

    model = load_model(spec, "float32")
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    c = model.config
    attn = c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    del model
    return {"matmul_params": n, "layers": c.num_hidden_layers, "attn_width": attn,
            "fwd_flops_per_token": 2 * n + 4 * c.num_hidden_layers * seq_len * attn}


def _free():
    import gc

    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def _profiler():
    """torch.profiler over steps 3-5 (the caller calls .step() after each optimizer step)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    return profile(activities=acts, schedule=schedule(wait=1, warmup=1, active=3, repeat=1))


def speed(args, teacher, student, tokenizer):
    from slimlm.data import pack_windows
    from slimlm.distill import distill

    n = args.steps * args.micro_batch
    windows = pack_windows(args.data, tokenizer, args.seq_len, n, seed=0).input_ids
    lr = 1e-4
    peak = matmul_peak(args.dtype)
    t_f, s_f = model_flops(teacher, args.seq_len), model_flops(student, args.seq_len)
    flops_per_token = t_f["fwd_flops_per_token"] + 3 * s_f["fwd_flops_per_token"]

    def ours(chunk, profiler=None):
        out = Path(tempfile.mkdtemp(prefix="slimlm-bench-")) / "out"
        distill(teacher, student, args.data, out, tokens=n * args.seq_len, seq_len=args.seq_len,
                micro_batch=args.micro_batch, lr=lr, min_lr=lr, warmup=0, eval_every=0, save_every=0,
                progress=False, tensorboard=False, tokenizer=tokenizer, dtype=args.dtype, chunk_size=chunk,
                on_step=(lambda rec: profiler.step()) if profiler is not None else None)
        rates = [json.loads(line)["tokens_per_s"] for line in (out / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["event"] == "train"]
        shutil.rmtree(out.parent, ignore_errors=True)  # the exported student (270 MB for the real one)
        _free()
        return rates

    chunks = [int(c) for c in args.chunks.split(",")]
    rates = {"slimlm": ours(chunks[0])}
    for c in chunks[1:]:
        rates[f"slimlm_chunk{c}"] = ours(c)
    rates["naive"] = naive_loop(teacher, student, windows, args.micro_batch, args.steps, lr, args.dtype)
    _free()
    rates["trl"], trl_error = None, None
    if not args.no_trl:
        try:
            rates["trl"] = trl_loop(teacher, student, windows, tokenizer, args.micro_batch, args.steps, lr, args.dtype)
        except Exception as exc:  # e.g. TRL missing or changed: report it, keep the other two
            trl_error = f"{type(exc).__name__}: {exc}"[:500]
            print(f"TRL run failed: {trl_error}", file=sys.stderr)
        _free()
    res = {"steps": args.steps, "micro_batch": args.micro_batch, "seq_len": args.seq_len, "dtype": args.dtype,
           "device": DEV, "gpu": torch.cuda.get_device_name() if DEV == "cuda" else None, "trl_error": trl_error,
           "teacher": str(teacher), "student": str(student), "matmul": peak,
           "teacher_matmul_params": t_f["matmul_params"], "student_matmul_params": s_f["matmul_params"],
           "flops_per_token": flops_per_token}
    for name, r in rates.items():
        if r is None:
            continue
        tps = _median_after_first(r)
        res[f"{name}_tokens_per_s"] = round(tps, 2)
        res[f"{name}_step_rates"] = [round(x, 2) for x in r]
        res[f"{name}_roofline_fraction"] = round(tps * flops_per_token / (peak["best_gflops"] * 1e9), 3)
    res["slimlm_over_naive"] = round(res["slimlm_tokens_per_s"] / res["naive_tokens_per_s"], 3)
    res["chunks"] = chunks
    if args.profile:  # where the time of a step goes: slimlm (first chunk size) and the naive loop
        res["profile"] = {}
        for name in ("slimlm", "naive"):
            with _profiler() as prof:
                if name == "slimlm":
                    ours(chunks[0], prof)
                else:
                    naive_loop(teacher, student, windows, args.micro_batch, min(args.steps, 6), lr, args.dtype, prof)
            res["profile"][name] = prof.key_averages().table(
                sort_by="self_device_time_total" if DEV == "cuda" else "self_cpu_time_total", row_limit=25)
    if "trl_tokens_per_s" in res:
        res["slimlm_over_trl"] = round(res["slimlm_tokens_per_s"] / res["trl_tokens_per_s"], 3)
    return res


def print_speed(r: dict) -> None:
    m = r["matmul"]
    print(f"\n## speed: {r['teacher']} -> {r['student']}, micro-batch {r['micro_batch']} x {r['seq_len']} tokens, "
          f"{r['steps']} steps (median of steps 2..{r['steps']})")
    where = r["gpu"] if r.get("gpu") else f"{m['threads']} threads"
    print(f"matmul roofline: {m['best_gflops']} GFLOP/s best, {m['median_gflops']} median "
          f"({m['n']}x{m['n']} {m.get('dtype', 'fp32')}, {where}); {r.get('dtype', 'fp32')} engines; useful work {r['flops_per_token'] / 1e9:.3f} GFLOP/token "
          f"(teacher N={r['teacher_matmul_params'] / 1e6:.1f}M, student N={r['student_matmul_params'] / 1e6:.1f}M)")
    print("| engine | tokens/s | slimlm / engine | share of roofline |\n|---|---|---|---|")
    rows = [("slimlm", f"slimlm distill (chunk {r['chunks'][0]})")]
    rows += [(f"slimlm_chunk{c}", f"slimlm distill (chunk {c})") for c in r["chunks"][1:]]
    rows += [("naive", "naive PyTorch loop"), ("trl", "TRL GKDTrainer (fwd KL)")]
    for name, label in rows:
        if f"{name}_tokens_per_s" in r:
            tps = r[f"{name}_tokens_per_s"]
            print(f"| {label} | {tps:.1f} | {r['slimlm_tokens_per_s'] / tps:.2f}x | {100 * r[f'{name}_roofline_fraction']:.0f} % |")
    for name, table in r.get("profile", {}).items():
        print(f"\n### profile of 3 steps: {name}\n{table}")


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
    # Warm-up of the same path on tiny inputs: the first checkpointed call imports torch._dynamo
    # (~100 MB, seconds), the first matmuls load their kernels.
    x = torch.randn(4, 8, device=dev, requires_grad=True)
    w0, t0_ = torch.randn(16, 8, device=dev, requires_grad=True), torch.randn(16, 8, device=dev)
    if variant in ("fused", "checkpointed"):
        kd_loss(x, w0, x.detach(), t0_, chunk_size=2, fused=variant == "fused").loss.backward()
    else:
        naive_kd_loss(x @ w0.T, x.detach() @ t0_.T).backward()
    del x, w0, t0_
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
    if variant in ("fused", "checkpointed"):
        loss = kd_loss(hs, w, ht, wt, chunk_size=chunk, fused=variant == "fused").loss
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
    for variant in ("fused", "checkpointed", "naive"):
        code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import distill as b; "
                f"print(json.dumps(b._memory_child({variant!r}, {args.vocab}, {args.tokens}, {args.hidden}, "
                f"{args.chunk})))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(f"memory test '{variant}' failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    by = {r["variant"]: r for r in results}
    naive = max(by["naive"]["peak_extra_mb"], 1e-9)
    ratio = by["fused"]["peak_extra_mb"] / naive  # the default path
    return {"vocab": args.vocab, "tokens": args.tokens, "hidden": args.hidden, "chunk": args.chunk,
            "results": results, "logits_tensor_mb": round(args.vocab * args.tokens * 4 / 2**20, 1),
            "fused_over_naive": round(ratio, 3), "time_fused_over_naive": round(by["fused"]["seconds"] / by["naive"]["seconds"], 3),
            "checkpointed_over_naive": round(by["checkpointed"]["peak_extra_mb"] / naive, 3),
            "time_checkpointed_over_naive": round(by["checkpointed"]["seconds"] / by["naive"]["seconds"], 3),
            "target": 0.35, "meets_target": ratio <= 0.35}


def print_memory(r: dict) -> None:
    print(f"\n## memory: one KD forward + backward at vocab {r['vocab']} x {r['tokens']} tokens, hidden {r['hidden']} "
          f"(one fp32 logits tensor: {r['logits_tensor_mb']} MB)")
    print("| loss | peak extra MB | seconds |\n|---|---|---|")
    labels = {"fused": f"fused, default ({r['chunk']}-token chunks, head gradient taken in the forward)",
              "checkpointed": f"checkpointed ({r['chunk']}-token chunks, heads recomputed in backward; FSDP2 / ZeRO-3 path)",
              "naive": "naive (full logits)"}
    for x in r["results"]:
        print(f"| {labels[x['variant']]} | {x['peak_extra_mb']} | {x['seconds']} |")
    print(f"fused / naive: peak {r['fused_over_naive']:.2f}x (target <= {r['target']}x: "
          f"{'met' if r['meets_target'] else 'NOT met'}), time {r['time_fused_over_naive']:.2f}x; "
          f"checkpointed / naive: peak {r['checkpointed_over_naive']:.2f}x, time {r['time_checkpointed_over_naive']:.2f}x")


def make_student(teacher: str, folder: Path) -> None:
    """The documented student: SmolLM2-135M width-pruned to about half (same as `slimlm prune ... --calib-samples 32`)."""
    from slimlm.api import prune

    print(f"making the student {folder} (slimlm prune {teacher} -o {folder} --hidden 384 --ffn 1024 --heads 6 "
          "--calib-samples 32) ...", file=sys.stderr, flush=True)
    prune(teacher, folder, hidden=384, ffn=1024, heads=6, calib_samples=32, progress=False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", choices=["speed", "memory", "both"], default="both")
    p.add_argument("--teacher", help="teacher (name/folder/alias); with --student, else random models are built")
    p.add_argument("--student", help="student folder; made by pruning when missing and --teacher is smollm2-135m")
    p.add_argument("--data", default="builtin:python-docs")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per engine (the first is not counted)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-trl", action="store_true", help="skip the TRL GKDTrainer run")
    p.add_argument("--chunks", default="512",
                   help="slimlm's loss chunk size(s), comma-separated: the first is the main row, each other "
                        "one more slimlm row (default 512, distill()'s default)")
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler tables of 3 steps of slimlm and of the naive loop")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="fp32 (default; CPUs) or bf16 mixed precision for all three engines (GPUs)")
    p.add_argument("--shape", choices=["tiny", "1.7b"], default="tiny",
                   help="random models: tiny (--hidden wide) or a 1.7B teacher and 0.5B student (GPUs)")
    p.add_argument("--hidden", type=int, default=576, help="random models / memory test: hidden size")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--tokens", type=int, default=2048, help="memory test: tokens in the loss")
    p.add_argument("--chunk", type=int, default=512, help="memory test: chunk size")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first step is not counted)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if bool(args.teacher) != bool(args.student):
        p.error("give both --teacher and --student, or neither (random models)")
    report = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu"}
    t0 = time.perf_counter()
    if args.what in ("speed", "both"):
        if args.teacher and args.student:
            from slimlm.models import load_tokenizer

            if not Path(args.student).expanduser().exists() and args.teacher == "smollm2-135m":
                make_student(args.teacher, Path(args.student).expanduser())
            teacher, student, tok = args.teacher, args.student, load_tokenizer(args.student)
        else:
            teacher, student = random_models(Path(tempfile.mkdtemp(prefix="slimlm-bench-models-")), args.hidden,
                                             args.vocab, args.seq_len, args.shape)
            tok = char_tokenizer()
        report["speed"] = speed(args, teacher, student, tok)
        print_speed(report["speed"])
    if args.what in ("memory", "both"):
        report["memory"] = memory(args)
        print_memory(report["memory"])
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
