"""Cost of the importance pass next to a plain forward over the same tokens.

    python bench/importance.py [--windows 32 --seq-len 256 --batch-size 8 --repeats 2]

Runs on the embedded SmolLM2-135M teacher (fp32, CPU).  Each measurement is repeated
and the fastest kept, alternating the two so that background load hits both alike.
Peak memory is the resident-set growth during the pass (sampled every 2 ms).
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from _common import PeakRSS, machine
from slimlm.data import pack_windows
from slimlm.importance import activation_scores
from slimlm.models import load_model, load_tokenizer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype="float32")
    tok = load_tokenizer(args.model)
    windows = pack_windows(None, tok, args.seq_len, args.windows, seed=0).input_ids

    @torch.inference_mode()
    def full_forward():
        for b in windows.split(args.batch_size):
            model(input_ids=b, use_cache=False)

    @torch.inference_mode()
    def decoder_forward():
        for b in windows.split(args.batch_size):
            model.base_model(input_ids=b, use_cache=False)

    def importance():
        activation_scores(model, windows, batch_size=args.batch_size, progress=False)

    runs = {"forward (with LM head)": full_forward, "forward (decoder only)": decoder_forward, "importance pass": importance}
    best = {k: float("inf") for k in runs}
    peak = {k: 0.0 for k in runs}
    full_forward()  # warm-up
    for _ in range(args.repeats):
        for name, fn in runs.items():
            gc.collect()
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
            best[name] = min(best[name], dt)
            peak[name] = max(peak[name], mem.delta_mb)
    tokens = windows.numel()
    print(f"# {machine()}; {args.model}; {args.windows} windows x {args.seq_len} tokens, batch {args.batch_size}")
    print(f"{'pass':26s} {'seconds':>8s} {'tokens/s':>9s} {'peak MB':>8s}")
    for name in runs:
        print(f"{name:26s} {best[name]:8.2f} {tokens / best[name]:9.0f} {peak[name]:8.0f}")
    imp, dec, full = best["importance pass"], best["forward (decoder only)"], best["forward (with LM head)"]
    result = {
        "time_ratio_vs_full_forward": imp / full,
        "time_ratio_vs_decoder_forward": imp / dec,
        "memory_ratio_vs_full_forward": peak["importance pass"] / max(peak["forward (with LM head)"], 1e-9),
        "memory_ratio_vs_decoder_forward": peak["importance pass"] / max(peak["forward (decoder only)"], 1e-9),
    }
    print(f"importance / plain forward (with LM head): time {result['time_ratio_vs_full_forward']:.3f}x, peak memory {result['memory_ratio_vs_full_forward']:.2f}x")
    print(f"importance / decoder-only forward (same layers, no hooks): time {result['time_ratio_vs_decoder_forward']:.3f}x, peak memory {result['memory_ratio_vs_decoder_forward']:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
