"""Removing experts and Mamba heads from small models trained here: which importance keeps quality.

No trained mixture-of-experts or hybrid Mamba weights can be downloaded on this machine, so
this study trains two small models from scratch on the default corpus (`builtin:python-docs`,
the SmolLM2 tokenizer of the embedded teacher `smollm2-135m`), then prunes them with slimlm:

  moe     a `qwen3_moe` model: 6 layers, hidden 128, 16 experts of 128 neurons, top-2 (renormalised),
          trained with a router load-balancing loss computed for each MoE layer and averaged
          (Switch Transformer's, coefficient 0.01), as MoEs are pretrained.  `--balance transformers`
          uses transformers' own loss instead (Qwen3-MoE's coefficient 0.001), which balances the
          experts' load summed over layers, not in each layer (QwenLM/Qwen3#1418): trained with it,
          this model left several experts of every layer almost unused;
  hybrid  a `nemotron_h` model: 8 layers (4 Mamba-2, 1 attention, 3 MLP), hidden 128, Mamba layers
          of 16 heads x 16 channels in 2 groups.

Both train with the LM loss (AdamW, warm-up then cosine) on 256-token windows of the corpus, in
fp32; the seed fixes initialisation and data order.  Then, from the trained model:

  moe     a quarter and a half of the experts of every layer removed (16 -> 12, 16 -> 8), ranked by
          REAP (router-weighted expert activation norm, slimlm's default), routing frequency, weight
          magnitude, and at random (5 seeds: mean and standard deviation);
  hybrid  a quarter and a half of the Mamba heads removed (16 -> 12, 16 -> 8, the same number in each
          group), ranked by activation (Minitron-SSM), magnitude, and at random (5 seeds).

Importance: one calibration pass of 64 windows x 256 tokens of `builtin:python-docs`.  Quality:
perplexity on all of `builtin:python-docs-heldout` (topics never trained on; 256-token windows,
`slimlm.evaluate.perplexity`).  Finally the best of each removal level is distilled from the
trained model (`slimlm.distill.distill`, forward KL on logits) for --distill-tokens tokens.

    python bench/moe.py               # both models: about 50 minutes on 2 quiet cores
    python bench/moe.py --part moe    # or hybrid
    python bench/moe.py --quick       # tiny budgets, end to end (a few minutes)

Trained models are kept in OUT/<part>/trained (reused by a rerun; --fresh retrains).  Prints one
Markdown table per part and a JSON line with every number; writes OUT/moe.json and OUT/moe.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from _common import machine  # noqa: E402

TOKENIZER = "smollm2-135m"
TRAIN, HELDOUT = "builtin:python-docs", "builtin:python-docs-heldout"
RANDOM_SEEDS = (0, 1, 2, 3, 4)

COMMON = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
              tie_word_embeddings=True)
CONFIGS = {
    "moe": ("qwen3_moe", dict(COMMON, num_hidden_layers=6, num_experts=16, num_experts_per_tok=2,
                              moe_intermediate_size=128, intermediate_size=512, norm_topk_prob=True,
                              router_aux_loss_coef=0.001, output_router_logits=False)),
    "hybrid": ("nemotron_h", dict(COMMON, layers_block_type=["linear_attention", "mlp", "linear_attention",
                                                             "full_attention", "linear_attention", "mlp",
                                                             "linear_attention", "mlp"],
                                  intermediate_size=512, mamba_num_heads=16, mamba_head_dim=16, n_groups=2,
                                  ssm_state_size=32, conv_kernel=4, chunk_size=64)),
}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("moe", "hybrid", "both"), default="both")
    ap.add_argument("--quick", action="store_true", help="tiny budgets: checks the whole study end to end")
    ap.add_argument("--out", default=None, help="output folder (default bench/out/moe[-quick])")
    ap.add_argument("--train-tokens", type=int, default=None, help="training tokens per model (default 1,536,000)")
    ap.add_argument("--distill-tokens", type=int, default=None, help="distillation tokens (default 102,400)")
    ap.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 64)")
    ap.add_argument("--balance", choices=("per-layer", "transformers"), default="per-layer",
                    help="MoE load-balancing loss: per layer (Switch, 0.01) or transformers' own (all layers, 0.001)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="retrain even when OUT/<part>/trained exists")
    ap.add_argument("--overlap", action="store_true",
                    help="only print how much of the held-out text occurs verbatim in the training text")
    a = ap.parse_args(argv)
    quick = a.quick
    a.train_tokens = a.train_tokens or (8 * 4096 if quick else 375 * 4096)
    a.distill_tokens = a.distill_tokens or (4 * 2048 if quick else 50 * 2048)
    a.calib_samples = a.calib_samples or (8 if quick else 64)
    a.out = Path(a.out or Path(__file__).parent / "out" / ("moe-quick" if quick else "moe"))
    return a


# ---- training ------------------------------------------------------------------------------------

PER_LAYER_COEF = 0.01  # Switch Transformer's alpha


def balance_losses(model, router_logits) -> torch.Tensor:
    """Switch Transformer's load-balancing loss of each MoE layer ([layers]), by transformers' own function
    applied to one layer at a time."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    c = model.config
    return torch.stack([load_balancing_loss_func((g,), c.num_experts, c.num_experts_per_tok) for g in router_logits])



def corpus_windows(tok, source: str, seq_len: int) -> torch.Tensor:
    """The source's documents, each followed by EOS, as consecutive windows of `seq_len` tokens."""
    from slimlm.data import iter_texts

    ids = []
    for text in iter_texts(source):
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def train(part: str, out: Path, args) -> dict:
    """Train the part's model from scratch with the LM loss (+ the router load-balancing loss for MoE)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimlm.models import load_tokenizer

    family, kw = CONFIGS[part]
    tok = load_tokenizer(TOKENIZER)
    is_moe = part == "moe"
    per_layer = is_moe and args.balance == "per-layer"
    if per_layer:  # the model's own (all-layer) loss off: ours is added below
        kw = dict(kw, router_aux_loss_coef=0.0)
    config = AutoConfig.for_model(family, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, **kw)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    seq_len, batch = 256, 16
    windows = corpus_windows(tok, TRAIN, seq_len)
    held = corpus_windows(tok, HELDOUT, seq_len)[:8]
    steps = max(1, args.train_tokens // (batch * seq_len))
    warmup = max(1, steps // 20)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(windows), generator=g)
    pos, log, t0 = 0, [], time.perf_counter()
    model.train()
    for step in range(steps):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(windows), generator=g), 0
        ids = windows[order[pos : pos + batch]]
        pos += batch
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        step_out = model(ids, labels=ids, output_router_logits=is_moe)
        loss = step_out.loss
        if is_moe:
            layer_aux = balance_losses(model, step_out.router_logits)
            if per_layer:
                loss = loss + PER_LAYER_COEF * layer_aux.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            model.eval()
            with torch.no_grad():
                val = model(held, labels=held).loss.item()
            model.train()
            rec = {"step": step, "tokens": (step + 1) * batch * seq_len, "loss": loss.item(),
                   "val_loss": val, "seconds": round(time.perf_counter() - t0, 1)}
            if is_moe:  # 2.0 is a perfectly balanced top-2 router; aux_all is transformers' all-layer value
                rec.update(aux_all=step_out.aux_loss.item(), aux_per_layer=[round(x, 3) for x in layer_aux.tolist()])
            log.append(rec)
            print(f"[{part} train] {json.dumps(rec)}", flush=True)
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    seconds = time.perf_counter() - t0
    info = {"family": family, "config": kw, "balance": (args.balance if is_moe else None), "steps": steps, "tokens": steps * batch * seq_len, "seq_len": seq_len,
            "batch": batch, "lr": args.lr, "seed": args.seed, "seconds": round(seconds, 1),
            "tokens_per_s": round(steps * batch * seq_len / seconds, 1),
            "corpus_windows": len(windows), "epochs": round(steps * batch / len(windows), 2), "log": log}
    (tmp / "training.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return info


# ---- pruning and measuring -----------------------------------------------------------------------


def ppl(model, tok) -> float:
    from slimlm.evaluate import perplexity

    return perplexity(model, tok, HELDOUT, seq_len=256)["ppl"]


def study(part: str, args) -> dict:
    from slimlm import api
    from slimlm.adapters import get_adapter
    from slimlm.config import PruneConfig
    from slimlm.distill import distill
    from slimlm.importance import estimate_importance
    from slimlm.models import load_model, load_tokenizer
    from slimlm.plan import make_plan
    from slimlm.prune import prune_model

    root = args.out / part
    trained = root / "trained"
    previous = json.loads((trained / "training.json").read_text()) if (trained / "training.json").exists() else None
    wanted = {"balance": args.balance if part == "moe" else None, "lr": args.lr, "seed": args.seed,
              "tokens": max(1, args.train_tokens // 4096) * 4096}
    if args.fresh or previous is None or any(previous.get(k) != v for k, v in wanted.items()):
        training = train(part, trained, args)
    else:
        training = previous
    model = load_model(str(trained), dtype="float32")
    tok = load_tokenizer(str(trained))
    adapter = get_adapter(model)
    shape = adapter.shape()
    t0 = time.perf_counter()
    scores = api.importance(str(trained), root / "scores.safetensors", calib_samples=args.calib_samples, seq_len=256,
                            heldout=0, depth_loss=False, overwrite=True, progress=False, loaded=model)
    t_scores = time.perf_counter() - t0
    axis = "experts" if part == "moe" else "mamba_heads"
    total = getattr(shape, axis)
    if part == "moe":
        kinds = {"REAP": ("reap", scores), "frequency": ("frequency", scores), "magnitude": ("magnitude", scores)}
    else:
        kinds = {"activation": (None, scores),
                 "magnitude": (None, estimate_importance(model, None, importance="magnitude"))}
    base = {"params": adapter.param_count(shape), "active": adapter.param_count(shape, active=True),
            "ppl": ppl(model, tok)}
    print(f"[{part}] trained: {json.dumps(base)}", flush=True)

    def measure(keep, kind, sc) -> tuple[float, object]:
        targets = PruneConfig(**{axis: keep, "expert_importance": kind} if part == "moe" else {axis: keep})
        plan = make_plan(sc, shape, targets)
        student = prune_model(model, plan)
        assert sum(p.numel() for p in student.parameters()) == adapter.param_count(plan.target_shape)
        return ppl(student, tok), plan

    levels = []
    for removed in (4, 2):  # a quarter, a half
        keep = total - total // removed
        row = {"removed": f"1/{removed}", "kept": keep, "ppl": {}}
        for name, (kind, sc) in kinds.items():
            row["ppl"][name], plan = measure(keep, kind, sc)
            if part == "moe":
                row["kept_experts_layer0"] = {**row.get("kept_experts_layer0", {}), name: plan.kept_experts[0]}
        rand = []
        for seed in RANDOM_SEEDS:
            if part == "moe":
                scores.meta["seed"] = seed  # the random expert ranking is drawn from the scores' seed
                rand.append(measure(keep, "random", scores)[0])
            else:
                rand.append(measure(keep, None, estimate_importance(model, None, importance="random", seed=seed))[0])
        row["ppl"]["random"] = {"mean": statistics.mean(rand), "sd": statistics.stdev(rand), "each": rand}
        row["params"] = adapter.param_count(plan.target_shape)
        row["active"] = adapter.param_count(plan.target_shape, active=True)
        best = min((k for k in kinds), key=lambda k: row["ppl"][k])
        # The best ranking's student, written as a checkpoint and distilled from the trained model.
        pruned, student_out = root / f"pruned-{keep}", root / f"distilled-{keep}"
        kind, sc = kinds[best]
        api.prune(str(trained), pruned, **{axis: keep}, **({"expert_importance": kind} if part == "moe" else {}),
                  scores=sc, overwrite=True, progress=False)
        t1 = time.perf_counter()
        res = distill(str(trained), str(pruned), TRAIN, student_out, tokens=args.distill_tokens, seq_len=256,
                      micro_batch=8, lr=1e-3, warmup=5, heldout=8, eval_every=0, save_every=0, overwrite=True,
                      progress=False, tensorboard=False)
        distilled = load_model(str(student_out), dtype="float32")
        row["distilled"] = {"from": best, "tokens": res.tokens, "steps": res.steps, "ppl": ppl(distilled, tok),
                            "seconds": round(time.perf_counter() - t1, 1)}
        print(f"[{part}] {json.dumps(row)}", flush=True)
        levels.append(row)
    return {"part": part, "axis": axis, "total": total, "training": {k: v for k, v in training.items() if k != "log"},
            "training_log": training.get("log"), "trained": base, "levels": levels,
            "calibration_seconds": round(t_scores, 1),
            "kinds": list(kinds) + ["random"]}


def table(r: dict) -> list[str]:
    what = "experts" if r["part"] == "moe" else "Mamba heads"
    kinds = r["kinds"]
    lines = [f"| {what} removed | kept | parameters (active) | " + " | ".join(
        k + (f" ({len(RANDOM_SEEDS)} seeds)" if k == "random" else "") for k in kinds) + " | distilled best |",
        "|---|---|---|" + "---|" * len(kinds) + "---|"]
    b = r["trained"]
    lines.append(f"| 0 | {r['total']} | {b['params'] / 1e6:.2f}M ({b['active'] / 1e6:.2f}M) | "
                 + " | ".join(f"{b['ppl']:.2f}" for _ in kinds) + " | - |")
    for row in r["levels"]:
        cells = []
        for k in kinds:
            v = row["ppl"][k]
            cells.append(f"{v['mean']:.2f} ± {v['sd']:.2f}" if isinstance(v, dict) else f"{v:.2f}")
        d = row["distilled"]
        lines.append(f"| {row['removed']} | {row['kept']} | {row['params'] / 1e6:.2f}M ({row['active'] / 1e6:.2f}M) | "
                     + " | ".join(cells) + f" | {d['ppl']:.2f} ({d['from']}, {d['tokens']:,} tokens) |")
    return lines


def heldout_overlap(length: int = 64, samples: int = 2000, seed: int = 0) -> float:
    """Share of random `length`-character pieces of the held-out text found verbatim in the training text
    (Python's documentation topics repeat much of their text)."""
    import random

    from slimlm.data import iter_texts

    train_text, held = "\n".join(iter_texts(TRAIN)), "\n".join(iter_texts(HELDOUT))
    rng = random.Random(seed)
    starts = [rng.randrange(len(held) - length) for _ in range(samples)]
    return sum(held[i : i + length] in train_text for i in starts) / samples


def main(argv=None):
    args = parse(argv)
    if args.overlap:
        print(f"{heldout_overlap():.3f} of 2,000 random 64-character pieces of {HELDOUT} occur verbatim in {TRAIN}")
        return
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = ("moe", "hybrid") if args.part == "both" else (args.part,)
    t0 = time.perf_counter()
    results = [study(p, args) for p in parts]
    md = [f"# {machine()}; {time.perf_counter() - t0:.0f} s in all; {heldout_overlap():.0%} of the held-out text's "
          "64-character pieces occur verbatim in the training text", ""]
    for r in results:
        t = r["training"]
        balance = f", {t['balance']} load balancing" if t.get("balance") else ""
        md += [f"## {r['part']} ({t['family']}{balance}): trained {t['tokens']:,} tokens ({t['epochs']} epochs) in "
               f"{t['seconds']:.0f} s "
               f"({t['tokens_per_s']:.0f} tokens/s); held-out perplexity of builtin:python-docs-heldout", ""]
        md += table(r) + [""]
    text = "\n".join(md)
    print(text)
    (args.out / "moe.md").write_text(text + "\n")
    (args.out / "moe.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
