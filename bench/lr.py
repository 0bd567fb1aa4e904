"""Peak learning rate at CPU-sized budgets: the default run's student, distilled at several peak LRs.

The paper's 1e-4 -> 1e-5 is for ~94B tokens.  This script takes the embedded default recipe
(`src/slimlm/recipes/default.yaml`: SmolLM2-135M-Instruct pruned to hidden 504, MLP 960, 9 heads),
computes its importance and pruned student once, then distils that same student from the same
teacher for each (budget, peak LR) pair with the recipe's other distillation settings (batch,
sequence length, warm-up, data and seed; min LR = peak / 10), and measures each result's
held-out perplexity exactly as `slimlm run` does (`builtin:python-docs-heldout`, 8,192 tokens in
256-token windows).  Everything in one run, so the rows compare.

    python bench/lr.py                                   # 32K tokens at 1e-4, 3e-4, 1e-3 (~35 min)
    python bench/lr.py --tokens 32768,131072             # both budgets of issue 16 (~2.5 h)
    python bench/lr.py --quick                           # 2K tokens, two LRs: end to end in a few minutes

Prints a Markdown table and one JSON line; writes under --out (deleted unless --keep).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402


def held_out_ppl(path_or_model, recipe) -> float:
    from slimlm.evaluate.ppl import perplexity
    from slimlm.models import load_model, load_tokenizer

    e = recipe.eval
    model = load_model(str(path_or_model), dtype="float32") if isinstance(path_or_model, (str, Path)) else path_or_model
    tok = load_tokenizer(str(path_or_model) if isinstance(path_or_model, (str, Path)) else recipe.teacher)
    return float(perplexity(model, tok, e.ppl, seq_len=e.seq_len, max_tokens=e.max_tokens)["ppl"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3", help="peak learning rates, comma-separated")
    ap.add_argument("--tokens", default="32768", help="distillation budgets, comma-separated")
    ap.add_argument("--out", default="bench/out/lr")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--quick", action="store_true", help="2,048 tokens at two LRs (a smoke test)")
    a = ap.parse_args()
    lrs = [float(x) for x in a.lrs.split(",")]
    budgets = [int(x) for x in a.tokens.split(",")]
    if a.quick:
        lrs, budgets = lrs[:2], [2048]

    from slimlm import api
    from slimlm.distill import distill
    from slimlm.models import load_model
    from slimlm.recipe import load_recipe

    torch.manual_seed(0)
    started = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    r, _ = load_recipe(None)
    teacher = load_model(r.teacher, dtype="float32")
    api.importance(r.teacher, out / "scores.safetensors", r.importance, loaded=teacher, overwrite=True, progress=False)
    api.prune(r.teacher, out / "pruned", r.prune, r.importance, scores=out / "scores.safetensors", overwrite=True,
              progress=False)
    teacher_ppl = held_out_ppl(teacher, r)
    pruned_ppl = held_out_ppl(out / "pruned", r)
    print(f"teacher {teacher_ppl:.2f}, pruned (zero-shot) {pruned_ppl:.2f}", flush=True)
    rows = []
    for tokens in budgets:
        for lr in lrs:
            d = dataclasses.replace(r.distill, tokens=tokens, lr=lr, min_lr=lr / 10, save_every=0)
            t0 = time.time()
            res = distill(teacher, str(out / "pruned"), out=out / f"student-{tokens}-{lr:g}", config=d, overwrite=True,
                          progress=False)
            seconds = time.time() - t0
            ppl = held_out_ppl(out / f"student-{tokens}-{lr:g}", r)
            row = {"tokens": tokens, "lr": lr, "ppl": ppl, "ratio": ppl / teacher_ppl, "seconds": round(seconds, 1),
                   "final": res.metrics}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "final"}), flush=True)
    print(f"\n# {machine()}; {time.time() - started:.0f} s in all; teacher held-out perplexity {teacher_ppl:.2f}, "
          f"zero-shot pruned {pruned_ppl:.2f}\n")
    print("| tokens | peak LR | held-out perplexity | / teacher | distillation time |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['tokens']:,} | {row['lr']:g} | {row['ppl']:.2f} | {row['ratio']:.2f}x | {row['seconds']:.0f} s |")
    print(json.dumps({"teacher_ppl": teacher_ppl, "pruned_ppl": pruned_ppl, "rows": rows}, default=str))
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
