"""Several models measured the same way, and the one before/after table.

`compare` is what `slimlm eval` runs.  `comparison_rows` builds the before/after table (one
row per model, speeds also as a ratio to the first model) that the CLI (`comparison_table`),
the report and the `slimlm run` summary all show.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Sequence

from ..config import EvalConfig
from ..errors import SlimlmError


def compare(models: Sequence[str], config: EvalConfig | None = None, *, output: str | os.PathLike | None = None,
            progress: bool = True, **overrides) -> dict:
    """Evaluate `models` one after another with the same settings; every check runs before the first loads.

    With `chat_prompts`, the answers of all models are written side by side to
    ``chat_answers.jsonl`` (in `output`, a folder or a .jsonl file; default the first model's folder).
    Returns ``{"models": [result, ...], "chat_answers"?: path}``.
    """
    from .runner import check_eval_args, check_models, evaluate

    c = EvalConfig.make(config, **overrides)
    if not models:
        raise SlimlmError("give at least one model to evaluate")
    check_eval_args(c)
    check_models(models, c, chat=c.chat_prompts is not None or c.chat_template)
    if output is not None and c.chat_prompts is not None:
        from .._io import check_writable_output
        from .chat import answers_path

        # Replacing an earlier answers file is fine; the prompts file or a model's own file is not.
        check_writable_output(answers_path([], output), overwrite=True, inputs=[c.chat_prompts, *models], folder=False)
    results = []
    for spec in models:
        if progress:
            print(f"evaluating {spec}", file=sys.stderr, flush=True)
        result = evaluate(spec, config=c, progress=progress)
        if result.get("saved_to") and progress:
            print(f"results saved to {result['saved_to']}", file=sys.stderr, flush=True)
        results.append(result)
        gc.collect()  # the model is gone: free it before the next one is measured
    out = {"models": results}
    if c.chat_prompts is not None:
        from .chat import write_side_by_side

        out["chat_answers"] = str(write_side_by_side(results, output))
    return out


# ---- the before/after table --------------------------------------------------------------------


def _num(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _params(n) -> str:
    return "-" if not isinstance(n, (int, float)) else (f"{n / 1e6:,.1f}M" if n < 1e9 else f"{n / 1e9:,.2f}B")


def model_name(result: dict, path: Path | None = None) -> str:
    """How a model is named in the table: its role in a run, else what the user called it."""
    if result.get("role"):
        return str(result["role"])
    if result.get("model"):
        return str(result["model"])
    return path.parent.name if path is not None else "?"


def comparison_rows(results: Sequence[dict], names: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the before/after table: one row per model, the first one is the "before"."""
    tasks: dict[tuple[str, str], None] = {}
    for r in results:
        for task, m in (r.get("tasks") or {}).items():
            metric = "acc_norm" if "acc_norm" in m else "acc" if "acc" in m else next(
                (k for k, v in m.items() if isinstance(v, float) and not k.endswith("_stderr")), None)
            if metric:
                tasks[(task, metric)] = None
    header = ["model", "parameters", "perplexity"] + [f"{t} {m}" for t, m in tasks] + [
        "prefill tok/s", "decode tok/s", "peak MB"]
    base = results[0] if results else {}
    rows = []
    for i, r in enumerate(results):
        ppl = (r.get("perplexity") or {}).get("ppl")
        sp, bsp = r.get("speed") or {}, base.get("speed") or {}

        def with_ratio(key):
            v, b = sp.get(key), bsp.get(key)
            if isinstance(v, (int, float)) and isinstance(b, (int, float)) and b and r is not base:
                return f"{_num(v)} ({v / b:.2f}x)"
            return _num(v)

        rows.append(
            [names[i] if names else model_name(r), _params(r.get("parameters")), _num(ppl)]
            + [_num((r.get("tasks") or {}).get(t, {}).get(m)) for t, m in tasks]
            + [with_ratio("prefill_tokens_per_s"), with_ratio("decode_tokens_per_s"), _num(sp.get("peak_mem_mb"))]
        )
    return header, rows


def comparison_table(results: Sequence[dict], title: str = "slimlm eval"):
    """The before/after table as a rich Table, for the terminal."""
    from rich.table import Table

    header, rows = comparison_rows(results, [Path(model_name(r)).name or model_name(r) for r in results])
    table = Table(title=title)
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table
