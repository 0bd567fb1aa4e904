"""Perplexity with Hugging Face's strided sliding-window method.

The documents of a source are tokenized and joined (EOS between documents) into one
token stream.  Windows of up to `seq_len` tokens slide over it `stride` tokens at a
time; each token is scored exactly once, in the window where it is among the last
`stride` tokens, so it sees at least `seq_len - stride` tokens of context.

The first position of every window is context only: BOS when the tokenizer adds one,
else the previous window's last token (so, unlike HF's recipe with stride = window,
no token goes unscored at window borders).  Hence `stride` defaults to, and is capped
at, `seq_len - 1`: windows that do not otherwise overlap.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data import adds_bos, iter_texts
from ..errors import SlimlmError


def token_stream(texts, tokenizer, max_tokens: int | None = None) -> list[int]:
    """The documents' tokens joined into one list, EOS between documents, no BOS."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        if stream and eos is not None:
            stream.append(eos)
        stream.extend(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
        if max_tokens is not None and len(stream) >= max_tokens:
            return stream[:max_tokens]
    return stream


@dataclass
class Window:
    """Stream tokens [start, end) as one model input; the last `n_scored` of them are scored."""

    start: int
    end: int
    n_scored: int


def plan_windows(n_tokens: int, seq_len: int, stride: int | None, bos: bool) -> list[Window]:
    """The windows of the strided method over a stream of `n_tokens` tokens.

    With `bos`, every window starts with a BOS token, so it holds `seq_len - 1` stream
    tokens and even the stream's first token is scored (given BOS).  Without it the
    first token has no context and is not scored.
    """
    stride = effective_stride(seq_len, stride)
    body = seq_len - 1 if bos else seq_len
    windows: list[Window] = []
    prev_end = 0
    for start in range(0, n_tokens, stride):
        end = min(start + body, n_tokens)
        n_scored = end - prev_end
        if start == 0 and not bos:
            n_scored -= 1
        windows.append(Window(start, end, n_scored))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def effective_stride(seq_len: int, stride: int | None) -> int:
    """The stride in stream tokens: `seq_len - 1` by default and at most."""
    return seq_len - 1 if stride is None else min(stride, seq_len - 1)


def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def _score(model, inputs: torch.Tensor, n_scored: int) -> float:
    """Summed negative log-likelihood of the last `n_scored` tokens of each row."""
    kwargs = {}
    # Only the logits of scored positions are needed; skipping the rest saves a
    # [batch, seq, vocab] tensor, which dominates memory for large vocabularies.
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = n_scored + 1
    logits = model(input_ids=inputs, use_cache=False, **kwargs).logits
    logits = logits[:, -(n_scored + 1) : -1].float()
    targets = inputs[:, -n_scored:].to(logits.device)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()


@torch.inference_mode()
def perplexity(
    model,
    tokenizer,
    source: str | Sequence[str] | None,
    seq_len: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    text_field: str = "text",
    batch_size: int = 1,
    progress: bool = False,
) -> dict:
    """Perplexity of `model` on the text of `source` (anything `slimlm.data.iter_texts` reads).

    `seq_len` is the window length the model sees (BOS included when the tokenizer adds
    one), `stride` how far windows move (default and cap: `seq_len - 1`, see the module
    docstring), `max_tokens` keeps only the stream's first tokens.  Returns
    ``{"ppl", "nll" (mean per scored token), "tokens" (scored), "windows", ...}``.
    """
    check_perplexity_args(seq_len, stride, max_tokens, batch_size)
    bos = adds_bos(tokenizer)
    stream = token_stream(iter_texts(source, text_field), tokenizer, max_tokens)
    if len(stream) < (1 if bos else 2):
        raise SlimlmError(f"data source {source} holds too few tokens to measure perplexity")
    windows = plan_windows(len(stream), seq_len, stride, bos)
    device = _input_device(model)
    ids = torch.tensor(stream, dtype=torch.long)
    prefix = torch.tensor([tokenizer.bos_token_id] if bos else [], dtype=torch.long)

    # Windows of equal length and equal scored count share a batch (all but the first
    # and the last one, usually).
    groups: list[list[Window]] = []
    for w in windows:
        last = groups[-1][-1] if groups else None
        same = last is not None and (last.end - last.start, last.n_scored) == (w.end - w.start, w.n_scored)
        if same and len(groups[-1]) < batch_size:
            groups[-1].append(w)
        else:
            groups.append([w])

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(windows), desc="perplexity", unit="window", leave=False)
    nll, scored = 0.0, 0
    for group in groups:
        inputs = torch.stack([torch.cat([prefix, ids[w.start : w.end]]) for w in group]).to(device)
        nll += _score(model, inputs, group[0].n_scored)
        scored += group[0].n_scored * len(group)
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    mean = nll / scored
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "tokens": scored,
        "windows": len(windows),
        "seq_len": seq_len,
        "stride": effective_stride(seq_len, stride),
        "bos": bos,
        "source": _describe(source),
        "max_tokens": max_tokens,
    }


def _describe(source) -> str | None:
    """The source as saved in results: local paths made absolute, so they still mean something later."""
    if not isinstance(source, str):
        return None
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def check_perplexity_args(seq_len: int, stride: int | None, max_tokens: int | None, batch_size: int) -> None:
    """Fail on impossible settings before any model loads."""
    if seq_len < 2:
        raise SlimlmError(f"--seq-len must be at least 2, got {seq_len}")
    if stride is not None and not 1 <= stride <= seq_len:
        raise SlimlmError(f"--stride must be between 1 and --seq-len ({seq_len}), got {stride}")
    if max_tokens is not None and max_tokens < 2:
        raise SlimlmError(f"--max-tokens must be at least 2, got {max_tokens}")
    if batch_size < 1:
        raise SlimlmError(f"--batch-size must be at least 1, got {batch_size}")
