"""Recipes: YAML files that describe a whole `slimlm run`, validated up front.

Every key is checked against the schema below before any work starts; a mistake names
the key and its line (``recipe.yaml:12: distill.tokns: unknown key (did you mean 'tokens'?)``).
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import SlimlmError

NUM = (int, float)
# section -> key -> (accepted types, default).  None as default: optional, unset.
SCHEMA: dict[str, dict[str, tuple[tuple, Any]]] = {
    "": {
        "teacher": ((str,), "smollm2-135m"),
        "data": ((str, list), None),
        "text_field": ((str,), "text"),
        "seed": ((int,), 0),
        "dtype": ((str,), "auto"),
        "accelerate_config": ((str,), None),
        "description": ((str,), None),
    },
    "correct_teacher": {
        "tokens": ((int,), 0),
        "lr": (NUM, 1e-5),
        "warmup": ((int,), 120),
        "seq_len": ((int,), 256),
        "micro_batch": ((int,), 4),
        "global_batch": ((int,), None),
    },
    "importance": {
        "calib_samples": ((int,), 128),
        "seq_len": ((int,), 256),
        "heldout": ((int,), 8),
        "batch_size": ((int,), 8),
        "aggregation": ((str,), "mean,l2"),
        "kind": ((str,), "activation"),
        "depth_loss": ((bool,), False),
    },
    "prune": {
        "hidden": ((int,), None),
        "ffn": ((int,), None),
        "heads": ((int,), None),
        "kv_heads": ((int,), None),
        "layers": ((int,), None),
        "drop_layers": ((str,), None),
        "depth_metric": ((str,), "block"),
    },
    "search": {
        "target_params": (NUM, None),
        "tolerance": (NUM, 0.05),
        "max_width_prune": (NUM, 0.4),
        "max_depth_prune": (NUM, 0.2),
        "max_candidates": ((int,), 8),
        "search_tokens": ((int,), 20000),
        "prune_heads": ((bool,), True),
        "hidden_step": ((int,), 64),
        "ffn_step": ((int,), 128),
    },
    "distill": {
        "tokens": ((int,), 40000),
        "seq_len": ((int,), 256),
        "micro_batch": ((int,), 4),
        "global_batch": ((int,), 16),
        "lr": (NUM, 1e-4),
        "min_lr": (NUM, 1e-5),
        "warmup": ((int,), 40),
        "loss": ((str,), "kl"),
        "temperature": (NUM, 1.0),
        "ce_weight": (NUM, 0.0),
        "hidden_loss": ((str,), None),
        "eval_every": ((int,), None),
        "save_every": ((int,), None),
        "heldout": ((int,), 16),
    },
    # Optional instruction tuning of the distilled student (runs when `sft` is given).
    "align": {
        "sft": ((str,), None),
        "prefs": ((str,), None),
        "tokens": ((int,), 20000),
        "lr": (NUM, 2e-5),
        "seq_len": ((int,), 256),
        "micro_batch": ((int,), 4),
        "global_batch": ((int,), None),
        "beta": (NUM, 0.1),
    },
    "eval": {
        "ppl": ((str, list), None),
        "ppl_tokens": ((int,), 8192),
        "seq_len": ((int,), 256),
        "tasks": ((str, list), None),
        "task_data": ((dict,), None),
        "limit": (NUM, None),
        "speed": ((bool,), True),
        "prompt_len": ((int,), 128),
        "new_tokens": ((int,), 32),
    },
    "report": {"enabled": ((bool,), True)},
}
SECTIONS = [s for s in SCHEMA if s]


def _line(node) -> int:
    return node.start_mark.line + 1


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(options))})"


def _plain(node):
    return yaml.safe_load(yaml.serialize(node)) if node is not None else None


def parse_recipe(text: str, name: str = "recipe") -> dict:
    """Validate a recipe's YAML text; return the resolved recipe (every default filled in)."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        raise SlimlmError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    resolved = {s: {k: d for k, (_, d) in keys.items()} for s, keys in SCHEMA.items() if s}
    resolved.update({k: d for k, (_, d) in SCHEMA[""].items()})
    present = set()
    if root is None:
        return _finish(resolved, present, name)
    if not isinstance(root, yaml.MappingNode):
        raise SlimlmError(f"{name}:{_line(root)}: a recipe is a mapping of keys to values")
    for key_node, value_node in root.value:
        key = key_node.value
        if key in SECTIONS:
            present.add(key)
            if value_node.tag == "tag:yaml.org,2002:null":
                continue
            if not isinstance(value_node, yaml.MappingNode):
                raise SlimlmError(f"{name}:{_line(value_node)}: {key}: expected a mapping of settings")
            for sub_key_node, sub_value_node in value_node.value:
                sub = sub_key_node.value
                if sub not in SCHEMA[key]:
                    raise SlimlmError(f"{name}:{_line(sub_key_node)}: {key}.{sub}: unknown key{_suggest(sub, SCHEMA[key])}")
                resolved[key][sub] = _check_type(f"{key}.{sub}", SCHEMA[key][sub][0], sub_value_node, name)
        elif key in SCHEMA[""]:
            resolved[key] = _check_type(key, SCHEMA[""][key][0], value_node, name)
        else:
            raise SlimlmError(f"{name}:{_line(key_node)}: {key}: unknown key{_suggest(key, set(SCHEMA['']) | set(SECTIONS))}")
    return _finish(resolved, present, name)


def _check_type(key: str, types: tuple, node, name: str):
    value = _plain(node)
    if value is None:
        return None
    if isinstance(value, str) and float in types:
        try:  # YAML 1.1 reads 1e-4 as a string; accept it as a number
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        want = " or ".join(sorted({t.__name__ for t in types}))
        raise SlimlmError(f"{name}:{_line(node)}: {key}: expected {want}, got {value!r}")
    if isinstance(value, float) and int in types and float not in types:
        raise SlimlmError(f"{name}:{_line(node)}: {key}: expected an integer, got {value!r}")
    return value


def _finish(r: dict, present: set, name: str) -> dict:
    if "prune" in present and "search" in present:
        raise SlimlmError(f"{name}: give either a prune section or a search section, not both")
    if "search" in present and not r["search"]["target_params"]:
        raise SlimlmError(f"{name}: search.target_params is required for a search")
    r["mode"] = "search" if "search" in present else "prune"
    if r["mode"] == "prune" and not any(r["prune"][k] is not None for k in ("hidden", "ffn", "heads", "kv_heads", "layers", "drop_layers")):
        raise SlimlmError(f"{name}: the prune section names no size (hidden, ffn, heads, kv_heads, layers or drop_layers)")
    if "align" in present and r["align"]["prefs"] and not r["align"]["sft"]:
        raise SlimlmError(f"{name}: align.prefs needs align.sft (DPO runs after SFT)")
    for section in ("correct_teacher", "importance", "distill", "search", "align"):
        for key, value in r[section].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise SlimlmError(f"{name}: {section}.{key} must not be negative")
    return r


def load_recipe(path: str | Path | None) -> tuple[dict, str]:
    """(resolved recipe, its source text); None loads the embedded default recipe."""
    if path is None:
        text = resources.files("slimlm.recipes").joinpath("default.yaml").read_text()
        return parse_recipe(text, "default.yaml"), text
    p = Path(path)
    if not p.exists():
        raise SlimlmError(f"recipe not found: {p}")
    text = p.read_text()
    return parse_recipe(text, p.name), text
