"""Model cards: the ``README.md`` with Hugging Face metadata that every slimlm checkpoint carries.

The card is built from what the folder holds: ``slimlm.json`` (the provenance chain: prune ->
distill -> align, each stage's record nesting its input's as ``parent``), ``config.json`` (the
shape) and ``eval.json`` when `slimlm eval` has saved results there.  A README that slimlm did
not write (no marker line) is never replaced.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

MARKER = "<!-- slimlm:model-card -->"
BASE_TAGS = ["slimlm", "minitron"]
# Licenses of the models slimlm can load by alias (their hub cards say so).
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stage_kind(meta: dict) -> str:
    """'prune', 'distill', 'lm-training' or 'align' for one provenance record."""
    return str(meta.get("kind") or meta.get("stage") or "unknown")


def lineage(meta: dict | None) -> list[dict]:
    """The provenance records from the first stage to the last (``parent`` links followed)."""
    chain = []
    while isinstance(meta, dict) and len(chain) < 32:
        chain.append(meta)
        meta = meta.get("parent")
    return chain[::-1]


def _input_of(meta: dict) -> str | None:
    kind = stage_kind(meta)
    if kind == "distill":
        return meta.get("teacher") or meta.get("student")
    if kind == "lm-training":
        return meta.get("student")
    return meta.get("source")


def _front_matter(folder: Path) -> dict:
    """The YAML metadata of a README.md in `folder` ({} when none)."""
    readme = folder / "README.md"
    try:
        text = readme.read_text(encoding="utf-8")
    except OSError:
        return {}
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    import yaml

    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def hub_id(spec: str | None) -> str | None:
    """The hub repository a model name stands for: an alias's source or the id itself (None for local folders)."""
    if not spec:
        return None
    from .models import EMBEDDED_ALIASES

    if spec in EMBEDDED_ALIASES:
        return EMBEDDED_ALIASES[spec][2]
    if Path(spec).expanduser().exists():  # a local folder: its hub origin is unknown
        return None
    return spec if _HUB_ID.match(spec) else None


def base_model(chain: list[dict]) -> str | None:
    """The hub id of the model the chain started from (None when it was local only)."""
    for meta in chain:
        repo = hub_id(_input_of(meta))
        if repo:
            return repo
    return None


def license_of(chain: list[dict], base: str | None) -> str | None:
    """The license of the source model, when its card (or slimlm) knows it."""
    if base in KNOWN_LICENSES:
        return KNOWN_LICENSES[base]
    for meta in chain:
        spec = _input_of(meta)
        if spec and Path(spec).expanduser().is_dir():
            lic = _front_matter(Path(spec).expanduser()).get("license")
            if isinstance(lic, str):
                return lic
    return None


def tags_for(chain: list[dict]) -> list[str]:
    kinds = {stage_kind(m) for m in chain}
    tags = list(BASE_TAGS)
    if "prune" in kinds:
        tags.append("pruned")
    if "distill" in kinds:
        tags.append("distilled")
    for m in chain:
        if stage_kind(m) == "align":
            tags += [t for t, key in (("sft", "sft"), ("dpo", "dpo")) if m.get(key)]
    return list(dict.fromkeys(tags))


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _method_lines(chain: list[dict]) -> list[str]:
    lines = []
    for m in chain:
        kind = stage_kind(m)
        if kind == "prune":
            t = (m.get("plan") or {}).get("target_shape") or {}
            s = (m.get("plan") or {}).get("source_shape") or {}
            imp = m.get("importance") or {}
            how = imp.get("importance") or "activation"
            sizes = ", ".join(f"{k} {s.get(k)} → {t.get(k)}" for k in ("layers", "hidden", "ffn", "heads", "kv_heads")
                              if s.get(k) != t.get(k))
            lines.append(f"1. **Pruned** `{m.get('source')}` ({sizes or 'no size change'}), ranking channels, "
                         f"neurons, heads and layers by {how} importance"
                         + (f" on `{imp['data']}`" if imp.get("data") else "") + ".")
        elif kind == "distill":
            loss = m.get("loss") or {}
            lines.append(f"1. **Distilled** from the teacher `{m.get('teacher')}` on "
                         f"{'chat data ' if m.get('chat') else ''}`{m.get('data')}`: "
                         f"{_fmt(m.get('tokens'))} tokens, loss {loss.get('kind', 'kl')} on the logits "
                         f"(temperature {loss.get('temperature', 1.0)}).")
        elif kind == "lm-training":
            lines.append(f"1. **Trained with the LM loss** (teacher correction) on `{m.get('data')}`: "
                         f"{_fmt(m.get('tokens'))} tokens.")
        elif kind == "align":
            sft, dpo = m.get("sft") or {}, m.get("dpo") or {}
            if sft:
                lines.append(f"1. **Instruction-tuned (SFT)** on `{sft.get('data')}`: {_fmt(sft.get('conversations'))} "
                             f"conversations, {_fmt(sft.get('tokens'))} tokens, loss on assistant tokens only.")
            if dpo:
                lines.append(f"1. **Preference-tuned (DPO)** on `{dpo.get('data')}`: {_fmt(dpo.get('pairs'))} pairs, "
                             f"{_fmt(dpo.get('tokens'))} tokens, beta {dpo.get('beta')}.")
    return lines


#: Shape fields shown on a card when the model has them (label beside)
_EXTRA_SIZES = (("experts", "experts"), ("experts_per_token", "experts per token"), ("moe_ffn", "expert ffn"),
                ("shared_ffn", "shared-expert ffn"), ("mamba_heads", "Mamba heads"),
                ("mamba_head_dim", "Mamba head dim"))


def _shape_table(folder: Path) -> list[str]:
    config = _read_json(folder / "config.json")
    if not config:
        return []
    try:
        from transformers import AutoConfig

        from .adapters import get_adapter

        adapter = get_adapter(AutoConfig.from_pretrained(folder, trust_remote_code=False))
        shape = adapter.shape()
        params = adapter.param_count(shape)
        row = [config.get("model_type"), shape.layers, shape.hidden, shape.ffn, shape.heads, shape.kv_heads,
               shape.head_dim, shape.vocab, f"{params / 1e6:,.1f}M"]
    except Exception:  # an unsupported family still gets a card, without the parameter count
        shape = None
        row = [config.get("model_type"), config.get("num_hidden_layers"), config.get("hidden_size"),
               config.get("intermediate_size"), config.get("num_attention_heads"), config.get("num_key_value_heads"),
               config.get("head_dim"), config.get("vocab_size"), "-"]
    header = ["family", "layers", "hidden", "ffn", "heads", "kv heads", "head dim", "vocab", "parameters"]
    if shape is not None:  # mixture-of-experts and Mamba sizes, and what one token uses
        extra = [(label, getattr(shape, name)) for name, label in _EXTRA_SIZES if getattr(shape, name)]
        if shape.experts:
            extra.append(("active parameters", f"{adapter.param_count(shape, active=True) / 1e6:,.1f}M"))
        header += [label for label, _ in extra]
        row += [value for _, value in extra]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            "| " + " | ".join(_fmt(v) for v in row) + " |"]


def _eval_table(ev: dict | None) -> list[str]:
    if not ev:
        return []
    rows = []
    if ev.get("perplexity"):
        p = ev["perplexity"]
        rows.append(("perplexity", p.get("ppl"), f"{_fmt(p.get('tokens'))} tokens of `{p.get('source', p.get('data', '-'))}`"))
    for task, metrics in (ev.get("tasks") or {}).items():
        for key, value in metrics.items():
            if isinstance(value, float) and not key.endswith("_stderr") and key != "limit":
                err = metrics.get(f"{key}_stderr")
                rows.append((f"{task} {key}", value, f"± {_fmt(err)}" if isinstance(err, float) else ""))
    sp = ev.get("speed") or {}
    for key, label in (("prefill_tokens_per_s", "prefill tokens/s"), ("decode_tokens_per_s", "decode tokens/s"),
                       ("peak_mem_mb", "peak memory MB")):
        if sp.get(key) is not None:
            rows.append((label, sp[key], f"on {ev.get('device', '-')}, {ev.get('dtype', '-')}"))
    if not rows:
        return []
    return ["| metric | value | note |", "|---|---|---|"] + [f"| {a} | {_fmt(b)} | {c} |" for a, b, c in rows]


def display_name(folder: Path) -> str:
    """The folder's name; inside `atomic_dir`'s temporary ``.NAME.tmp-XXXX`` folder, the final NAME."""
    m = re.fullmatch(r"\.(.+)\.tmp-[^.]+", folder.name)
    return m.group(1) if m else folder.name


def card_text(folder: str | os.PathLike, repo_id: str | None = None) -> str:
    """The model card of a slimlm checkpoint folder (YAML front matter + Markdown)."""
    from huggingface_hub import ModelCardData

    folder = Path(folder)
    meta = _read_json(folder / "slimlm.json") or {}
    chain = lineage(meta)
    base = base_model(chain)
    data = ModelCardData(
        base_model=base,
        library_name="transformers",
        license=license_of(chain, base),
        pipeline_tag="text-generation",
        tags=tags_for(chain),
    )
    name = repo_id or display_name(folder)
    has_chat = (folder / "chat_template.jinja").exists() or "chat_template" in (
        _read_json(folder / "tokenizer_config.json") or {})
    lines = ["---", data.to_yaml().strip(), "---", MARKER, "", f"# {name.split('/')[-1]}", ""]
    origin = f"[{base}](https://huggingface.co/{base})" if base else "its source model"
    kinds = {stage_kind(m) for m in chain}
    if kinds & {"prune", "distill"}:
        lines += [f"A smaller model made from {origin} with slimlm, which implements NVIDIA's Minitron recipe of "
                  "structured pruning and knowledge distillation: the hidden channels, MLP neurons, attention heads "
                  "and layers that matter least on calibration text are removed, then the pruned model learns to "
                  "match the original model's output distribution.", ""]
    else:
        lines += [f"A model trained from {origin} with slimlm.", ""]
    method = _method_lines(chain)
    if method:
        lines += ["## Method", ""] + method + [""]
    shape = _shape_table(folder)
    if shape:
        lines += ["## Shape", ""] + shape + [""]
    tokens = []
    for m in chain:
        if stage_kind(m) == "align":
            tokens += [(k.upper(), (m.get(k) or {}).get("tokens")) for k in ("sft", "dpo") if m.get(k)]
        elif isinstance(m.get("tokens"), int):
            tokens.append((stage_kind(m), m["tokens"]))
    if tokens:
        lines += ["## Training tokens", "", "| stage | tokens |", "|---|---|"]
        lines += [f"| {k} | {_fmt(t)} |" for k, t in tokens] + [""]
    ev = _eval_table(_read_json(folder / "eval.json"))
    lines += ["## Evaluation", ""] + (ev or ["Not evaluated yet (`slimlm eval` saves results that the card shows)."]) + [""]
    usage = [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
    ]
    if has_chat:
        usage += ['messages = [{"role": "user", "content": "What is the capital of France?"}]',
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
                  "return_dict=True)"]
    else:
        usage += ['inputs = tokenizer("The capital of France is", return_tensors="pt")']
    usage += ["output = model.generate(**inputs, max_new_tokens=64)",
              "print(tokenizer.decode(output[0][inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))", "```"]
    lines += ["## Usage", ""] + usage + [""]
    lines += ["The full provenance (inputs, budgets, hyper-parameters, versions) is in `slimlm.json`.", ""]
    return "\n".join(lines)


def write_model_card(folder: str | os.PathLike, repo_id: str | None = None, strict: bool = False) -> Path | None:
    """Write (or refresh) ``README.md`` in `folder`; returns its path, or None when a README not written by slimlm is there.

    Unless `strict`, a failure only prints a warning: a checkpoint is never lost over its card.
    """
    from ._io import atomic_write_text

    folder = Path(folder)
    readme = folder / "README.md"
    if readme.exists():
        try:
            if MARKER not in readme.read_text(encoding="utf-8"):
                return None
        except OSError:
            return None
    try:
        text = card_text(folder, repo_id)
    except Exception as exc:
        if strict:
            raise
        import sys

        print(f"warning: model card not written ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
        return None
    atomic_write_text(readme, text)
    return readme


def refresh_card(folder: str | os.PathLike, repo_id: str | None = None) -> Path:
    """What `slimlm card` runs: (re)write the model card of a checkpoint folder slimlm wrote."""
    from ._io import probe_writable
    from .errors import SlimlmError
    from .models import check_checkpoint

    path = check_checkpoint(folder, weights=False)  # an invalid config.json gets no card
    probe_writable(path / "README.md", what="model card")
    written = write_model_card(path, repo_id, strict=True)
    if written is None:
        raise SlimlmError(f"{path / 'README.md'} was not written by slimlm; not replacing it")
    return written
