"""The memory a distillation run needs, per device, before any weight is loaded (`--dry-run`).

`plan_distill_memory` adds up, for the backend in use (one process, DDP, FSDP2, ZeRO-3) and the
number of processes:

- the frozen teacher's weights (compute dtype) and its forward's working memory;
- the student's master weights (fp32), gradients and AdamW state (two fp32 moments);
- the student's activations kept for backward at micro-batch x sequence length, with and
  without gradient checkpointing;
- the loss's buffers (a few chunk x vocabulary fp32 tensors and the LM head's gradient);
- under FSDP2 / ZeRO-3, the largest unit gathered at once (twice: one prefetched).

Weights and optimizer state come from the parameter counts of the configs (a meta-device model,
no weights).  Activations are measured, not guessed: one forward of the student on the meta device
records the tensors autograd saves for backward (`torch.autograd.graph.saved_tensors_hooks`), with
attention counted as a fused kernel keeps it (q, k, v, output and the log-sum-exp, never the
T x T scores), at two sequence lengths, which gives the bytes per token of every family exactly
as transformers implements it.  Numbers are bytes; the device's framework overhead (CUDA context,
allocator fragmentation) is a fixed allowance, stated in the report.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch

from .errors import SlimlmError
from .models import decoder

GIB = 1024**3
CUDA_CONTEXT_BYTES = int(0.75 * GIB)  # CUDA context + cuBLAS workspaces + allocator slack, per GPU
BACKENDS = ("single", "ddp", "fsdp2", "zero3")


def parse_bytes(text) -> int:
    """'80GB', '80G', '24GiB', '512MB', 8e10 -> bytes (GB and GiB both read as 2**30, as GPU vendors mean them)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise SlimlmError(f"--device-memory expects a size like 80GB or 24GiB, got '{text}'")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def fmt_bytes(n: float) -> str:
    return f"{n / GIB:,.2f} GiB" if n >= GIB / 4 else f"{n / 2**20:,.0f} MiB"


# ---- parameters and activations from configs alone -------------------------------------------------


def _meta_model(config, dtype):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def parameter_count(config) -> dict:
    """{"total", "head", "embed_and_head", "largest_layer"}: parameters (shared tensors once), those of the LM
    head's weight, of the input embeddings and LM head together (once when tied), of the largest layer."""
    model = _meta_model(config, torch.float32)
    model.tie_weights()
    seen, total = set(), 0
    for p in model.parameters():
        key = p.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            total += p.numel()
    head = model.get_output_embeddings()
    ends = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), head) if m is not None}
    return {"total": total, "head": head.weight.numel() if head is not None else 0,
            "embed_and_head": sum(ends.values()),
            "largest_layer": max(sum(p.numel() for p in layer.parameters()) for layer in _layers(model))}


def _layers(model):
    return list(decoder(model).layers)


class _FusedAttention(torch.autograd.Function):
    """A stand-in for a fused attention kernel on the meta device: the output, and what its backward keeps."""

    @staticmethod
    def forward(ctx, q, k, v):
        b, h, t, d = q.shape
        out = q.new_empty(b, h, t, v.shape[-1])
        lse = q.new_empty(b, h, t, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the trace only counts what forward saves
        raise RuntimeError("the memory trace runs forward only")


def _fused_attention_forward(module, query, key, value, attention_mask, **kwargs):
    # transformers' attention functions take [batch, heads, tokens, head_dim] and return [batch, tokens, heads, head_dim].
    return _FusedAttention.apply(query, key, value).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _meta_trace_setup():
    """Attention as a fused kernel, and transformers' data-dependent mask checks skipped (meta tensors hold no data)."""
    from transformers import AttentionInterface
    import transformers.masking_utils as masking

    AttentionInterface.register("slimlm_memory_trace", _fused_attention_forward)
    saved = masking.is_tracing
    masking.is_tracing = lambda *a, **k: True
    try:
        yield "slimlm_memory_trace"
    finally:
        masking.is_tracing = saved


def _saved_bytes(model, tokens: int) -> int:
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = storage.nbytes()
        return t

    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = decoder(model)(input_ids=ids, use_cache=False).last_hidden_state
    return sum(seen.values()) + hidden.numel() * hidden.element_size()


def activation_bytes_per_token(config, dtype: torch.dtype) -> float:
    """Bytes autograd keeps for backward per token of the student's decoder (all layers), in `dtype`."""
    import copy

    cfg = copy.deepcopy(config)
    with _meta_trace_setup() as impl:
        cfg._attn_implementation = impl
        model = _meta_model(cfg, dtype)
        model.config._attn_implementation = impl
        for m in model.modules():
            if hasattr(m, "config"):
                m.config._attn_implementation = impl
        model.train()
        a, b = _saved_bytes(model, 64), _saved_bytes(model, 128)
    return (b - a) / 64


# ---- the plan ------------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    """Bytes per device for one distillation set-up, and what would fit when it does not."""

    backend: str
    processes: int
    micro_batch: int
    seq_len: int
    gradient_checkpointing: bool
    parts: dict[str, float]
    device_memory: int | None
    device_name: str
    suggestions: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    def as_dict(self) -> dict:
        return {"backend": self.backend, "processes": self.processes, "micro_batch": self.micro_batch,
                "seq_len": self.seq_len, "gradient_checkpointing": self.gradient_checkpointing,
                "parts": {k: int(v) for k, v in self.parts.items()}, "total": int(self.total),
                "device_memory": self.device_memory, "device": self.device_name, "fits": self.fits,
                "suggestions": self.suggestions}

    def lines(self) -> list[str]:
        """The plan as text, one part a line."""
        head = (f"memory per device: {self.backend} x {self.processes} process(es), micro-batch {self.micro_batch} x "
                f"{self.seq_len} tokens, gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}")
        out = [head] + [f"  {name:<34} {fmt_bytes(v):>12}" for name, v in self.parts.items()]
        out.append(f"  {'total':<34} {fmt_bytes(self.total):>12}")
        if self.device_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            out.append(f"  {verdict} in {fmt_bytes(self.device_memory)} ({self.device_name})")
        out += [f"  would fit: {s}" for s in self.suggestions]
        return out


@dataclass
class _Shapes:
    teacher_params: int
    teacher_hidden: int
    teacher_ffn: int
    teacher_largest_layer: int
    teacher_ends: int  # embeddings + LM head (once when tied)
    student_params: int
    student_head: int
    student_hidden: int
    student_layers: int
    student_largest_layer: int
    student_ends: int
    vocab: int
    act_per_token: float  # student, compute dtype


def _shapes(teacher_config, student_config, compute_dtype) -> _Shapes:
    t, s = parameter_count(teacher_config), parameter_count(student_config)
    per_tok = activation_bytes_per_token(student_config, compute_dtype)
    return _Shapes(
        teacher_params=t["total"] if teacher_config is not None else 0,
        teacher_hidden=getattr(teacher_config, "hidden_size", 0),
        teacher_ffn=getattr(teacher_config, "intermediate_size", 0) or 0,
        teacher_largest_layer=t["largest_layer"], teacher_ends=t["embed_and_head"] if teacher_config is not None else 0,
        student_params=s["total"], student_head=s["head"], student_hidden=student_config.hidden_size,
        student_layers=student_config.num_hidden_layers, student_largest_layer=s["largest_layer"],
        student_ends=s["embed_and_head"],
        vocab=student_config.vocab_size, act_per_token=per_tok)


def _parts(sh: _Shapes, *, backend: str, processes: int, micro_batch: int, seq_len: int, checkpointing: bool,
           chunk_size: int, compute_bytes: int, mixed: bool, cuda: bool) -> dict[str, float]:
    n = processes if backend in ("fsdp2", "zero3") else 1
    tokens = micro_batch * seq_len
    chunk = min(chunk_size or tokens, tokens)
    parts: dict[str, float] = {}
    if sh.teacher_params:
        parts["teacher weights"] = sh.teacher_params * compute_bytes / n
        # no grad: the final hidden states, plus the largest transient of one layer (MLP intermediates)
        parts["teacher forward"] = tokens * (sh.teacher_hidden * 4 + 3 * sh.teacher_ffn) * compute_bytes
    parts["student weights (fp32 master)"] = sh.student_params * 4 / n
    parts["student gradients (fp32)"] = sh.student_params * 4 / n
    if backend == "ddp":
        parts["DDP gradient buckets"] = sh.student_params * 4
    parts["AdamW state (2 x fp32)"] = sh.student_params * 8 / n
    if mixed:
        parts["autocast weight copies"] = sh.student_params * compute_bytes / n
    per_layer_act = sh.act_per_token / max(sh.student_layers, 1)
    if checkpointing:
        parts["activations (checkpointed)"] = tokens * (sh.student_layers * sh.student_hidden * compute_bytes
                                                        + per_layer_act)
    else:
        parts["activations"] = tokens * sh.act_per_token
    fused = backend != "zero3"  # ZeRO-3 gathers the head per call: the loss recomputes it in backward
    loss = 3 * chunk * sh.vocab * 4 + tokens * sh.student_hidden * 4 * 2
    if fused:
        loss += sh.student_head * 4  # the head's weight gradient, accumulated over the chunks
    else:
        loss += chunk * sh.vocab * 4  # the recomputed chunk's logits in backward
    parts["loss buffers"] = loss
    if backend in ("fsdp2", "zero3") and n > 1:
        unit = max(sh.student_largest_layer * 4, sh.teacher_largest_layer * compute_bytes)
        if backend == "zero3":  # the LM heads are gathered by each call too
            unit = max(unit, sh.student_head * 4, sh.teacher_ends * compute_bytes)
        parts["gathered units (current + prefetch)"] = 2 * unit
    if backend == "fsdp2" and n > 1:
        # Embeddings, final norms and LM heads of both models stay in the root unit, gathered for the whole
        # step (slimlm.distill.modules.Distillation); the student's in the compute dtype under mixed precision.
        parts["root unit (embeddings, LM heads)"] = (sh.student_ends * (compute_bytes if mixed else 4)
                                                     + sh.teacher_ends * compute_bytes)
    if cuda:
        parts["CUDA context and allocator"] = CUDA_CONTEXT_BYTES
    return parts


def plan_distill_memory(
    teacher_config,
    student_config,
    *,
    micro_batch: int,
    seq_len: int,
    chunk_size: int = 512,
    gradient_checkpointing: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    backend: str = "single",
    processes: int = 1,
    device_memory: int | None = None,
    device_name: str = "device",
    cuda: bool | None = None,
) -> MemoryPlan:
    """The memory per device of distilling `teacher_config` into `student_config` (configs only, no weights).

    `backend`: single, ddp, fsdp2 or zero3; `processes`: devices in the run.  When `device_memory`
    is given and the plan does not fit, `suggestions` name set-ups that would: gradient
    checkpointing, a smaller micro-batch (the global batch is kept by accumulation), or FSDP2 over
    more GPUs.
    """
    if backend not in BACKENDS:
        raise SlimlmError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
    cuda = (compute_dtype != torch.float32) if cuda is None else cuda
    compute_bytes = torch.empty((), dtype=compute_dtype).element_size()
    mixed = compute_dtype != torch.float32
    sh = _shapes(teacher_config, student_config, compute_dtype)

    def parts_for(**over):
        kw = dict(backend=backend, processes=processes, micro_batch=micro_batch, seq_len=seq_len,
                  checkpointing=gradient_checkpointing, chunk_size=chunk_size, compute_bytes=compute_bytes,
                  mixed=mixed, cuda=cuda)
        kw.update(over)
        return _parts(sh, **kw)

    plan = MemoryPlan(backend, processes, micro_batch, seq_len, gradient_checkpointing, parts_for(),
                      device_memory, device_name)
    if device_memory is not None and not plan.fits:
        plan.suggestions = _suggestions(parts_for, device_memory, micro_batch, gradient_checkpointing, backend,
                                        processes)
    return plan


def _suggestions(parts_for, limit: int, micro_batch: int, checkpointing: bool, backend: str, processes: int) -> list[str]:
    fits = lambda **kw: sum(parts_for(**kw).values()) <= limit  # noqa: E731
    out = []
    if not checkpointing and fits(checkpointing=True):
        out.append("--gradient-checkpointing")
    for mb in range(micro_batch - 1, 0, -1):
        if fits(micro_batch=mb):
            out.append(f"--micro-batch {mb} (the global batch is kept by gradient accumulation)")
            break
        if not checkpointing and fits(micro_batch=mb, checkpointing=True):
            out.append(f"--micro-batch {mb} --gradient-checkpointing")
            break
    for n in (2, 4, 8, 16, 32, 64):
        if n <= processes and backend in ("fsdp2", "zero3"):
            continue
        if fits(backend="fsdp2", processes=n):
            out.append(f"FSDP2 over {n} GPUs (configs/accelerate/fsdp2_8gpu.yaml, num_processes: {n})")
            break
        if fits(backend="fsdp2", processes=n, checkpointing=True):
            out.append(f"FSDP2 over {n} GPUs with --gradient-checkpointing")
            break
    if not out:
        out.append("nothing tried here fits: more GPUs, or a smaller student")
    return out


def detect_device() -> tuple[int | None, str, bool]:
    """(memory in bytes, name, is a GPU) of the device a run here would use."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.total_memory, props.name, True
    try:
        import os

        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size, "CPU memory", False
    except (ValueError, OSError, AttributeError):
        return None, "CPU", False


def backend_of(accelerate_config: dict | None, processes: int | None = None) -> tuple[str, int]:
    """(backend, processes) from an Accelerate config dict (None: this machine as it is)."""
    if not accelerate_config:
        n = processes or 1
        return ("ddp" if n > 1 else "single"), n
    kind = str(accelerate_config.get("distributed_type", "NO")).upper()
    n = int(processes or accelerate_config.get("num_processes", 1) or 1) * int(accelerate_config.get("num_machines", 1) or 1)
    if kind == "FSDP":
        return "fsdp2", n
    if kind == "DEEPSPEED":
        stage = int((accelerate_config.get("deepspeed_config") or {}).get("zero_stage", 3))
        return ("zero3" if stage == 3 else "ddp"), n
    return ("ddp" if n > 1 else "single"), n



# ---- what `--dry-run` runs ---------------------------------------------------------------------------


def _read_accelerate_config(path) -> dict | None:
    if path is None:
        return None
    import yaml
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_file():
        raise SlimlmError(f"accelerate config not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise SlimlmError(f"{p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SlimlmError(f"{p} is not an Accelerate config (a mapping of settings)")
    return data


def _setup(config, memory) -> dict:
    """Backend, processes, dtype and device memory for a plan: from --accelerate-config, else this machine."""
    from .models import pick_dtype

    accel = _read_accelerate_config(memory.accelerate_config)
    backend, processes = backend_of(accel, memory.processes)
    if accel is None and processes == 1:
        import os

        world = int(os.environ.get("WORLD_SIZE", "1"))  # under a launcher: what it started
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
            backend, processes = "fsdp2", world
        elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            backend, processes = "zero3", world
        elif world > 1:
            backend, processes = "ddp", world
    found, name, gpu = detect_device()
    if accel is not None and str(accel.get("mixed_precision", "no")) in ("bf16", "fp16"):
        dtype = torch.bfloat16 if accel["mixed_precision"] == "bf16" else torch.float16
        gpu = gpu or not accel.get("use_cpu", False)
    else:
        dtype = pick_dtype(config.dtype)
    limit = parse_bytes(memory.device_memory) if memory.device_memory else found
    if memory.device_memory:
        name = f"given {memory.device_memory}"
    return {"backend": backend, "processes": processes, "compute_dtype": dtype, "device_memory": limit,
            "device_name": name, "cuda": gpu}


def plan_distill(teacher, student, config, memory) -> MemoryPlan:
    """What `slimlm distill --dry-run` prints: the plan for distilling `teacher` into `student` (configs only)."""
    from .models import load_config

    t_cfg = load_config(teacher, weights=False) if teacher is not None else None
    s_cfg = load_config(student, weights=False)
    return plan_distill_memory(t_cfg, s_cfg, micro_batch=config.micro_batch, seq_len=config.seq_len,
                               chunk_size=config.chunk_size, gradient_checkpointing=config.gradient_checkpointing,
                               **_setup(config, memory))


def student_config(teacher_config, targets):
    """The config of the student `targets` (a PruneConfig) gives, from the teacher's config alone."""
    from .adapters import get_adapter
    from .plan import PrunePlan, target_shape, validate_targets

    adapter = get_adapter(teacher_config)
    shape = adapter.shape()
    validate_targets(targets, shape)
    new = target_shape(targets, shape)
    kept = range(new.layers)

    def per_layer(block: str, size):
        return {i: size() for i in shape.layers_with(block) if i in kept}

    plan = PrunePlan(shape, list(range(new.hidden)), list(kept),
                     {i: list(range(new.ffn)) for i in kept},
                     {i: list(range(new.heads)) for i in kept},
                     {i: list(range(new.kv_heads)) for i in kept},
                     kept_experts=per_layer("moe", lambda: list(range(new.experts))),
                     kept_expert_ffn=per_layer("moe", lambda: [list(range(new.moe_ffn))] * new.experts),
                     kept_shared_ffn=per_layer("shared", lambda: list(range(new.shared_ffn))),
                     kept_mamba_heads=per_layer("mamba", lambda: list(range(new.mamba_heads))))
    return adapter.new_config(plan)


def plan_run(recipe, memory) -> list[tuple[str, MemoryPlan]]:
    """What `slimlm run --dry-run` prints: a plan for each training stage of the recipe."""
    from .models import load_config

    r = recipe
    mem = memory if memory.accelerate_config or not r.run.accelerate_config else type(memory)(
        **{**memory.as_dict(), "accelerate_config": r.run.accelerate_config})
    t_cfg = load_config(r.teacher, weights=False)
    if r.mode == "prune":
        s_cfg = student_config(t_cfg, r.prune)
    else:  # the largest candidate the search may pick bounds the student
        from .adapters import get_adapter
        from .search import enumerate_candidates, prune_targets

        adapter = get_adapter(t_cfg)
        best = max(enumerate_candidates(adapter, r.search, max_candidates=None), key=lambda c: c.params)
        s_cfg = student_config(t_cfg, prune_targets(best.shape, adapter.shape()))
    plans = []
    if r.corrects_teacher:
        c = r.correct_teacher
        plans.append(("correct (the teacher trains with the LM loss)",
                      plan_distill_memory(None, t_cfg, micro_batch=c.micro_batch, seq_len=c.seq_len,
                                          chunk_size=c.chunk_size, gradient_checkpointing=c.gradient_checkpointing,
                                          **_setup(c, mem))))
    d = r.distill
    plans.append(("distill", plan_distill_memory(t_cfg, s_cfg, micro_batch=d.micro_batch, seq_len=d.seq_len,
                                                 chunk_size=d.chunk_size,
                                                 gradient_checkpointing=d.gradient_checkpointing, **_setup(d, mem))))
    return plans
