"""Inference speed and memory, measured the same way for every model.

Prefill: one forward over a [batch, prompt_len] prompt.  Decode: `new_tokens` greedy
steps, one token per sequence at a time, with the KV cache the prefill filled.  Each is
timed `repeats` times after one warm-up, and the median is kept.  The prompt is random
token ids (seeded), so a teacher and its student (same vocabulary) see the same input.

Memory (``peak_mem_mb``) is the model's weights plus the peak growth of memory over the
runs:
- on CUDA, ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated
  before (``memory_method: cuda_max_allocated``);
- on CPU, the process's peak resident set (VmHWM), reset through
  ``/proc/self/clear_refs`` before the runs, minus the resident set before them
  (``memory_method: rss_peak``, Linux).  Elsewhere the resident set is sampled by a
  thread every few milliseconds (``rss_sampled``), which can miss short peaks.
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import statistics
import threading
import time
from contextlib import contextmanager

import torch

from ..errors import SlimlmError


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trim_heap() -> None:
    # glibc keeps freed memory in its arenas; giving it back first keeps one
    # model's leftovers out of the next model's baseline.
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@contextmanager
def _peak_memory(device: torch.device):
    """Yield a dict that holds, on exit, the peak growth of memory in bytes and the method."""
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out.update(bytes=torch.cuda.max_memory_allocated(device) - base, method="cuda_max_allocated")
        return
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets the peak RSS (VmHWM) to the current RSS
        base = _status_kb("VmRSS")
    except OSError:
        base = None
    if base is not None:
        yield out
        out.update(bytes=max((_status_kb("VmHWM") or base) - base, 0) * 1024, method="rss_peak")
        return
    import psutil

    proc = psutil.Process()
    base, peak, done = proc.memory_info().rss, [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        done.set()
        thread.join()
    out.update(bytes=max(peak[0] - base, 0), method="rss_sampled")


def _forward_kwargs(model) -> tuple[dict, str]:
    """(prefill keyword arguments, the name of the cache argument)."""
    params = inspect.signature(model.forward).parameters
    # Prefill needs the last position's logits only (as generate() does); a full
    # [batch, seq, vocab] tensor would be timed and counted for nothing.
    prefill = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    # transformers 5.2x renamed `past_key_values` to `cache`.
    return prefill, "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    return out.get("cache", None) if out.get("cache", None) is not None else out.get("past_key_values")


def _run_once(model, prompt: torch.Tensor, new_tokens: int, kwargs: tuple[dict, str]) -> tuple[float, float]:
    prefill_kwargs, cache_arg = kwargs
    device = prompt.device
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, **prefill_kwargs)
    _sync(device)
    t1 = time.perf_counter()
    cache, token = _cache_of(out), out.logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{cache_arg: cache})
        cache, token = _cache_of(out), out.logits[:, -1:].argmax(-1)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def weights_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def speed(
    model,
    tokenizer=None,
    batch: int = 1,
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Prefill and decode throughput (tokens/s) and peak memory of `model`.

    `tokenizer` is only used to keep special tokens out of the random prompt.
    """
    check_speed_args(batch, prompt_len, new_tokens, repeats)
    device = model.get_input_embeddings().weight.device
    vocab = model.get_input_embeddings().weight.shape[0]
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    allowed = torch.tensor([i for i in range(vocab) if i not in special] or list(range(vocab)))
    g = torch.Generator().manual_seed(seed)
    prompt = allowed[torch.randint(len(allowed), (batch, prompt_len), generator=g)].to(device)
    kwargs = _forward_kwargs(model)

    _run_once(model, prompt, new_tokens, kwargs)  # warm-up: lazy init, allocator, kernels
    prefill, decode = [], []
    with _peak_memory(device) as mem:
        for _ in range(repeats):
            p, d = _run_once(model, prompt, new_tokens, kwargs)
            prefill.append(p)
            decode.append(d)
    weights = weights_bytes(model)
    p, d = statistics.median(prefill), statistics.median(decode)
    return {
        "prefill_tokens_per_s": batch * prompt_len / p,
        "decode_tokens_per_s": batch * new_tokens / d if new_tokens else None,
        "prefill_s": p,
        "decode_s": d,
        "peak_mem_mb": (weights + mem["bytes"]) / 2**20,
        "weights_mb": weights / 2**20,
        "memory_method": mem["method"],
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }


def check_speed_args(batch: int, prompt_len: int, new_tokens: int, repeats: int) -> None:
    """Fail on impossible settings before any model loads."""
    for name, value, low in (("--batch-size", batch, 1), ("--prompt-len", prompt_len, 1), ("--new-tokens", new_tokens, 0), ("--repeats", repeats, 1)):
        if value < low:
            raise SlimlmError(f"{name} must be at least {low}, got {value}")
