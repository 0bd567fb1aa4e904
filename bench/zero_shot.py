"""Zero-shot quality of pruned SmolLM2-135M: activation vs magnitude vs random importance.

    python bench/zero_shot.py [--calib-samples 128 --seq-len 256 --ppl-tokens 16384]

Width: hidden 384 / ffn 1024 / heads 6 (about half the parameters).  Depth: the number
of layers that gives the same parameter count, chosen by each depth metric.  Perplexity
on the first `--ppl-tokens` tokens of WikiText-2 test (512-token windows), as in
../shared/data/README.md.  Calibration uses slimlm's default corpus (Python's docs).
Writes a Markdown table to stdout and bench/out/zero_shot.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from _common import WIKITEXT, machine
from slimlm.adapters import get_adapter
from slimlm.api import calibration_windows
from slimlm.evaluate import perplexity
from slimlm.importance import estimate_importance
from slimlm.models import load_model, load_tokenizer
from slimlm.config import PruneConfig
from slimlm.plan import make_plan
from slimlm.prune import prune_model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--heldout", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, dtype="float32")
    tok = load_tokenizer(args.model)
    adapter = get_adapter(model)
    shape = adapter.shape()
    width = PruneConfig(hidden=384, ffn=1024, heads=6)
    width_params = adapter.param_count(make_plan_shape(width, shape))
    # depth: the layer count whose parameter count is closest to the width-pruned model's
    layers = min(range(1, shape.layers), key=lambda n: abs(adapter.param_count(shape.__class__(**{**shape.as_dict(), "layers": n})) - width_params))
    k = shape.layers - layers

    def ppl(m):
        return perplexity(m, tok, str(WIKITEXT), seq_len=512, max_tokens=args.ppl_tokens)["ppl"]

    calib, held = calibration_windows(tok, None, args.seq_len, args.calib_samples, args.heldout, 0, "text")
    t0 = time.perf_counter()
    scores = {
        "activation": estimate_importance(model, calib, heldout=held, block_sizes=(k,), batch_size=8),
        "magnitude": estimate_importance(model, None, importance="magnitude"),
        "random": estimate_importance(model, None, importance="random", seed=0),
    }
    t_scores = time.perf_counter() - t0
    rows = [("teacher", "-", "-", adapter.param_count(shape), ppl(model), [])]
    cases = [("width", kind, PruneConfig(hidden=384, ffn=1024, heads=6)) for kind in scores]
    cases += [("depth", "activation", PruneConfig(layers=layers, depth_metric=m)) for m in ("block", "loss", "bi")]
    cases += [("depth", kind, PruneConfig(layers=layers)) for kind in ("magnitude", "random")]
    for axis, kind, t in cases:
        plan = make_plan(scores[kind], shape, t)
        student = prune_model(model, plan)
        metric = t.depth_metric if axis == "depth" and kind == "activation" else "-"
        value = ppl(student)
        dropped = [i for i in range(shape.layers) if i not in plan.kept_layers]
        rows.append((f"{axis}", kind, metric, adapter.param_count(plan.target_shape), value, dropped))
        print(f"{axis:6s} {kind:10s} {metric:6s} ppl {value:10.2f}", flush=True)
        del student
    print(f"\n# {machine()}; calibration {args.calib_samples} x {args.seq_len} tokens (+{args.heldout} held out) of builtin:python-docs; scores in {t_scores:.0f} s")
    print(f"# perplexity: WikiText-2 test, first {args.ppl_tokens} tokens, 512-token windows\n")
    print("| model | importance | depth metric | parameters | WikiText-2 ppl | layers dropped |")
    print("|---|---|---|---|---|---|")
    for axis, kind, metric, params, value, dropped in rows:
        d = f"{dropped[0]}-{dropped[-1]}" if dropped and dropped == list(range(dropped[0], dropped[-1] + 1)) else (",".join(map(str, dropped)) or "-")
        print(f"| {axis} | {kind} | {metric} | {params / 1e6:.1f}M | {value:.2f} | {d} |")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "zero_shot.json").write_text(json.dumps([dict(zip(("model", "importance", "depth_metric", "parameters", "ppl", "dropped"), r)) for r in rows], indent=1))


def make_plan_shape(t, shape):
    from slimlm.plan import target_shape

    return target_shape(t, shape)


if __name__ == "__main__":
    main()
