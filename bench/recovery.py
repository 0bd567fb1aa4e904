"""Recovery of a pruned SmolLM2-135M: logit distillation vs LM-loss training, token by token.

The real teacher SmolLM2-135M (`smollm2-135m`) is width-pruned to about half (hidden 384,
ffn 1024, heads 6: 67.5M parameters; activation importance on the default corpus, 64
calibration windows x 128 tokens).  From that one pruned start, two runs train on the first 90 %
of tiny Shakespeare with the same tokens, data order, batch, seed and LR schedule:

  KD  `slimlm.distill.distill(teacher, student, ...)`             forward KL to the teacher
  LM  `slimlm.distill.distill(None, student, ..., mode="lm")`     next-token cross-entropy

At 0 tokens and at each of --checkpoints (default 25K, 50K, 100K) both are evaluated:
  val KL     forward KL(teacher || student) per token on --val-windows windows of the last
             10 % of the text, which no run trains on;
  wikitext   WikiText-2 perplexity, first --ppl-tokens tokens, 512-token windows
             (`slimlm.evaluate.perplexity`);
  (JSON only) the student's perplexity on the same held-out Shakespeare windows.
Each intermediate point is a snapshot of the one run of max(--checkpoints) tokens: its LR
schedule (warm-up, cosine) is that of the full run.  The run is split into segments with
`distill(..., stop_after=STEP)` and continued with `resume=True` (exact data position,
optimizer and scheduler state restored from the checkpoint `stop_after` writes); the student is
a model object trained in place, evaluated between segments.  A checkpoint count is rounded to
whole optimizer steps, so the table gives the tokens really trained on (e.g. 24,576 for 25K).

Resumable: finished points are cached in OUT/points.jsonl and each run keeps its last
checkpoint (also written every --save-every steps), so an interrupted study continues where it
stopped; changing a setting that shapes the results needs --fresh (or another --out).

    python bench/recovery.py            # the study: about 35-40 minutes on 2 quiet CPU cores
    python bench/recovery.py --quick    # tiny budgets, end to end: a few minutes (8 on 2 busy cores)

Prints a Markdown table (tokens | KD val KL | KD wikitext ppl | LM val KL | LM wikitext ppl)
and, last, one JSON line with every number; also writes OUT/recovery.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from _common import SHAKESPEARE, WIKITEXT, machine, parse_study  # noqa: E402

TEACHER = "smollm2-135m"
SHAPE = dict(hidden=384, ffn=1024, heads=6)  # about half of SmolLM2-135M


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny settings: checks the whole study end to end")
    ap.add_argument("--out", default=None, help="output folder (default bench/out/recovery[-quick])")
    ap.add_argument("--checkpoints", default=None,
                    help="token counts to report, comma-separated (full 25000,50000,100000; quick 128,256,512)")
    ap.add_argument("--seq-len", type=int, default=None, help="training / validation window (full 128, quick 64)")
    ap.add_argument("--micro-batch", type=int, default=None, help="windows per forward (full 4, quick 2)")
    ap.add_argument("--global-batch", type=int, default=None, help="windows per optimizer step (full 8, quick 2)")
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (cosine to --min-lr)")
    ap.add_argument("--min-lr", type=float, default=1e-5)
    ap.add_argument("--warmup", type=int, default=10, help="warm-up steps (distill clamps to 10 %% of the run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=None, help="pruning calibration windows (full 64, quick 8)")
    ap.add_argument("--calib-seq-len", type=int, default=None, help="pruning calibration window (full 128, quick 64)")
    ap.add_argument("--val-windows", type=int, default=None, help="held-out Shakespeare windows (full 32, quick 2)")
    ap.add_argument("--ppl-tokens", type=int, default=None, help="WikiText-2 tokens scored (full 8192, quick 512)")
    ap.add_argument("--save-every", type=int, default=25, help="also checkpoint every N steps (0: only at the points)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--fresh", action="store_true", help="delete OUT and start over")
    full = dict(checkpoints="25000,50000,100000", seq_len=128, micro_batch=4, global_batch=8, calib_samples=64,
                calib_seq_len=128, val_windows=32, ppl_tokens=8192)
    quick = dict(checkpoints="128,256,512", seq_len=64, micro_batch=2, global_batch=2, calib_samples=8,
                 calib_seq_len=64, val_windows=2, ppl_tokens=512)
    a = parse_study(ap, "recovery", full, quick, argv)
    try:
        a.checkpoints = sorted({int(x) for x in str(a.checkpoints).split(",") if x.strip()})
    except ValueError:
        ap.error(f"--checkpoints must be integers separated by commas, got {a.checkpoints!r}")
    if not a.checkpoints or a.checkpoints[0] < 1:
        ap.error("--checkpoints needs positive token counts")
    if a.global_batch % a.micro_batch:
        ap.error("--global-batch must be a multiple of --micro-batch")
    return a


class Study:
    def __init__(self, a):
        from slimlm.data import pack_windows
        from slimlm.models import load_model, load_tokenizer

        self.a = a
        self.tokens_per_step = a.global_batch * a.seq_len
        # Requested token count -> optimizer step (nearest whole step, at least 1).
        self.steps = {c: max(1, round(c / self.tokens_per_step)) for c in a.checkpoints}
        self.total_steps = max(self.steps.values())
        self.settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                         if k not in ("out", "fresh", "quick", "threads", "save_every")}
        self.settings.update(teacher=TEACHER, shape=SHAPE, total_steps=self.total_steps)
        self.key = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:12]
        if a.fresh and a.out.exists():
            shutil.rmtree(a.out)
        a.out.mkdir(parents=True, exist_ok=True)
        self._check_settings()
        self.points_path = a.out / "points.jsonl"
        self.points = {}
        if self.points_path.exists():
            for line in self.points_path.read_text().splitlines():
                if line.strip():
                    p = json.loads(line)
                    self.points[(p["run"], p["step"])] = p

        self.tok = load_tokenizer(TEACHER)
        self.teacher = load_model(TEACHER, dtype="float32")
        # Train on the first 90 % of the text; validate on windows of the last 10 %.
        data = a.out / "data"
        data.mkdir(exist_ok=True)
        text = SHAKESPEARE.read_text()
        cut = int(len(text) * 0.9)
        self.train_file, held_file = data / "shakespeare-train.txt", data / "shakespeare-heldout.txt"
        for path, part in ((self.train_file, text[:cut]), (held_file, text[cut:])):
            if not path.exists() or path.read_text() != part:  # rewriting would change the token cache's key
                path.write_text(part)
        self.val = pack_windows(str(held_file), self.tok, a.seq_len, a.val_windows, seed=1).input_ids
        self.pruned_dir = a.out / "pruned"

    def _check_settings(self):
        path = self.a.out / "settings.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved != self.settings:
                differ = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
                sys.exit(f"{self.a.out} holds results of other settings ({', '.join(differ)}); "
                         "pass --fresh to start over or --out for another folder")
        else:
            path.write_text(json.dumps(self.settings, indent=1) + "\n")

    def save_point(self, point: dict) -> None:
        self.points[(point["run"], point["step"])] = point
        with open(self.points_path, "a") as f:
            f.write(json.dumps(point) + "\n")

    # ---- pruning -------------------------------------------------------------------------
    def prune(self) -> None:
        if (self.pruned_dir / "config.json").exists():
            return
        from slimlm.api import prune

        t0 = time.perf_counter()
        info = prune(TEACHER, self.pruned_dir, **SHAPE, calib_samples=self.a.calib_samples,
                     seq_len=self.a.calib_seq_len, seed=self.a.seed, overwrite=True, progress=False)
        print(f"# pruned {TEACHER} to {info['shape']}: {info['parameters_after'] / 1e6:.1f}M parameters "
              f"(from {info['parameters_before'] / 1e6:.1f}M) in {time.perf_counter() - t0:.0f}s", flush=True)

    def load_student(self):
        from slimlm.models import load_model

        return load_model(str(self.pruned_dir), dtype="float32")

    # ---- measurements ----------------------------------------------------------------------
    @torch.inference_mode()
    def evaluate(self, model, teacher: bool = False) -> dict:
        from slimlm.evaluate import perplexity

        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        kl = nll = 0.0
        n = 0
        for b in self.val.split(4):
            s = F.log_softmax(model(b, use_cache=False).logits.float(), -1)
            if not teacher:
                t = F.log_softmax(self.teacher(b, use_cache=False).logits.float(), -1)
                kl += (t.exp() * (t - s)).sum().item()
            nll += -s[:, :-1].gather(-1, b[:, 1:, None]).sum().item()
            n += b.numel()
        n_pred = self.val.shape[0] * (self.val.shape[1] - 1)
        ppl = perplexity(model, self.tok, str(WIKITEXT), seq_len=512, max_tokens=self.a.ppl_tokens)["ppl"]
        if was_training:
            model.train()
        return {"val_kl": 0.0 if teacher else kl / n, "wikitext_ppl": ppl,
                "shakespeare_ppl": math.exp(nll / n_pred), "eval_s": round(time.perf_counter() - t0, 1)}

    # ---- training --------------------------------------------------------------------------
    def run(self, mode: str) -> None:
        """Train one run (kd or lm) to the last point, stopping at every point to evaluate it."""
        from slimlm.distill import distill

        todo = sorted(s for s in set(self.steps.values()) if (mode, s) not in self.points)
        if not todo:
            return
        run_out = self.a.out / mode
        done_step = self._checkpoint_step(run_out)
        complete = (run_out / "slimlm.json").exists()
        if complete and todo == [self.total_steps]:
            # Finished and exported, but the last point was not recorded: evaluate the export.
            from slimlm.models import load_model

            self._record(mode, self.total_steps, load_model(str(run_out), dtype="float32"), None)
            return
        if complete or (done_step is not None and done_step > todo[0]):
            print(f"# {mode}: the saved run is past the first missing point (step {todo[0]}); restarting it",
                  file=sys.stderr, flush=True)
            done_step = None
        student = self.load_student()
        resume = done_step is not None
        for step in todo:
            t0 = time.perf_counter()
            res = distill(
                self.teacher if mode == "kd" else None, student, str(self.train_file), run_out,
                tokens=self.total_steps * self.tokens_per_step, seq_len=self.a.seq_len,
                micro_batch=self.a.micro_batch, global_batch=self.a.global_batch, lr=self.a.lr,
                min_lr=self.a.min_lr, warmup=self.a.warmup, seed=self.a.seed, mode=mode, loss="kl",
                eval_every=0, save_every=self.a.save_every, keep_checkpoints=1, dtype="fp32",
                stop_after=None if step == self.total_steps else step, resume=resume, overwrite=not resume,
                tokenizer=self.tok, progress=sys.stderr.isatty(), tensorboard=False,
            )
            resume = True
            if res.steps != step:
                raise RuntimeError(f"{mode}: distill stopped at step {res.steps}, expected {step}")
            self._record(mode, step, student, time.perf_counter() - t0)
        # Every point is recorded: the run's checkpoints (model + optimizer) are no longer needed.
        shutil.rmtree(run_out / "run" / "checkpoints", ignore_errors=True)

    @staticmethod
    def _checkpoint_step(run_out: Path) -> int | None:
        from slimlm.training.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(run_out / "run")
        if ckpt is None:
            return None
        return int(json.loads((ckpt / "trainer_state.json").read_text())["step"])

    def _record(self, mode: str, step: int, model, train_s) -> None:
        point = {"run": mode, "step": step, "tokens": step * self.tokens_per_step,
                 "train_segment_s": round(train_s, 1) if train_s is not None else None, **self.evaluate(model)}
        self.save_point(point)
        print(f"{mode:8s} step {step:5d}  tokens {point['tokens']:7d}  val KL {point['val_kl']:.4f}  "
              f"wikitext ppl {point['wikitext_ppl']:8.2f}  shakespeare ppl {point['shakespeare_ppl']:8.2f}  "
              f"(train {point['train_segment_s'] if train_s is not None else '-'}s, eval {point['eval_s']}s)", flush=True)


def report(st: Study, wall: float) -> None:
    a = st.a
    teacher = st.points[("teacher", 0)]
    start = st.points[("pruned", 0)]
    rows = [(0, 0, start, start)]
    warmup = max(0, min(a.warmup, int(st.total_steps * 0.1)))  # as distill clamps it (10 % of the steps)
    for c in a.checkpoints:
        s = st.steps[c]
        rows.append((c, s * st.tokens_per_step, st.points[("kd", s)], st.points[("lm", s)]))
    lines = [
        f"Machine: {machine()}. Teacher SmolLM2-135M-Instruct (fp32), pruned to hidden {SHAPE['hidden']}, ffn "
        f"{SHAPE['ffn']}, heads {SHAPE['heads']} ({a.calib_samples} calibration windows x {a.calib_seq_len}). Both runs: "
        f"tiny Shakespeare (first 90 %), batch {a.global_batch} x {a.seq_len} tokens, LR {a.lr:g} -> {a.min_lr:g} cosine "
        f"over {st.total_steps} steps ({st.total_steps * st.tokens_per_step:,} tokens), warm-up {warmup} steps, seed {a.seed}. "
        f"Val KL: forward KL to the teacher on {a.val_windows} windows of the held-out last 10 %. WikiText-2: first "
        f"{a.ppl_tokens:,} tokens, 512-token windows. Teacher: WikiText-2 ppl {teacher['wikitext_ppl']:.2f}.",
        "",
        "| tokens | KD val KL | KD wikitext ppl | LM val KL | LM wikitext ppl |",
        "|---|---|---|---|---|",
    ]
    for want, got, kd, lm in rows:
        label = f"{got:,}" if want == got else f"{got:,} (~{want:,})"
        lines.append(f"| {label} | {kd['val_kl']:.4f} | {kd['wikitext_ppl']:.2f} | {lm['val_kl']:.4f} | "
                     f"{lm['wikitext_ppl']:.2f} |")
    text = "\n".join(lines)
    (a.out / "recovery.md").write_text(text + "\n")
    print("\n" + text + "\n")
    summary = {
        "settings": st.settings, "machine": machine(), "wall_s": round(wall, 1),
        "teacher": {k: teacher[k] for k in ("wikitext_ppl", "shakespeare_ppl")},
        "points": [{"tokens_requested": want, "tokens": got, "step": got // st.tokens_per_step,
                    "kd": {k: kd[k] for k in ("val_kl", "wikitext_ppl", "shakespeare_ppl")},
                    "lm": {k: lm[k] for k in ("val_kl", "wikitext_ppl", "shakespeare_ppl")}}
                   for want, got, kd, lm in rows],
    }
    print(json.dumps(summary), flush=True)


def main(argv=None):
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    st = Study(a)
    print(f"# {machine()}; points at steps {sorted(set(st.steps.values()))} of {st.total_steps} "
          f"({st.tokens_per_step} tokens/step); out: {a.out}", flush=True)
    if ("teacher", 0) not in st.points:
        st.save_point({"run": "teacher", "step": 0, "tokens": 0, **st.evaluate(st.teacher, teacher=True)})
    st.prune()
    if ("pruned", 0) not in st.points:
        st._record("pruned", 0, st.load_student(), None)
    st.run("kd")
    st.run("lm")
    report(st, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
