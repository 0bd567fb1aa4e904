"""Recipes: YAML files that describe a whole `slimlm run`, validated up front.

The schema is not written here: each section is one config class of `slimlm.config`
(`distill:` is a `DistillConfig`, ...), with the same keys, types, defaults and bounds as the
command of the same name; the top-level keys are a `RunConfig` (the teacher and the settings
every stage shares: data, text_field, seed, dtype).  A mistake names the key and its line
(``recipe.yaml:12: distill.tokns: unknown key (did you mean 'tokens'?)``).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .config import (AlignConfig, CorrectConfig, DistillConfig, EvalConfig, ImportanceConfig, PruneConfig,
                     ReportConfig, RunConfig, SearchConfig, Settings, TeacherLogitsConfig, check_bounds,
                     shared_settings)
from .errors import SlimlmError

#: recipe section -> the config class it holds
SECTIONS: dict[str, type[Settings]] = {
    "correct_teacher": CorrectConfig,
    "importance": ImportanceConfig,
    "prune": PruneConfig,
    "search": SearchConfig,
    "teacher_logits": TeacherLogitsConfig,
    "distill": DistillConfig,
    "align": AlignConfig,
    "eval": EvalConfig,
    "report": ReportConfig,
}


@dataclass
class Recipe:
    """A validated recipe: one config object per section, the shared top-level settings filled in."""

    run: RunConfig
    mode: str  # "prune" or "search"
    present: frozenset  # the sections the YAML gave
    correct_teacher: CorrectConfig
    importance: ImportanceConfig
    prune: PruneConfig
    search: SearchConfig
    teacher_logits: TeacherLogitsConfig
    distill: DistillConfig
    align: AlignConfig
    eval: EvalConfig
    report: ReportConfig

    @property
    def teacher(self) -> str:
        return self.run.teacher

    @property
    def corrects_teacher(self) -> bool:
        return "correct_teacher" in self.present

    @property
    def uses_teacher_logits(self) -> bool:
        """A `teacher_logits:` section: the run writes the teacher's top-K once, and the search and the distill
        stage train from it instead of running the teacher."""
        return "teacher_logits" in self.present

    @property
    def aligns(self) -> bool:
        return self.align.sft is not None

    def to_dict(self) -> dict:
        """Plain data (for `recipe.resolved.json` and the stage fingerprints)."""
        out = {f.name: getattr(self.run, f.name) for f in fields(RunConfig)}
        out["mode"] = self.mode
        for section in SECTIONS:
            out[section] = getattr(self, section).as_dict()
        return out


def section_keys(cls: type[Settings]) -> dict[str, dataclasses.Field]:
    """The keys a recipe section accepts: the class's recipe settings, minus the shared top-level ones."""
    shared = shared_settings()
    return {f.name: f for f in cls.settings(where="recipe") if f.name not in shared}


def _accepted_types(cls, f: dataclasses.Field) -> tuple | None:
    """Python types a YAML value of this setting may have (None: anything)."""
    if f.metadata.get("recipe_types"):
        return tuple(f.metadata["recipe_types"])
    tp = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(tp) is typing.Union:
        tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    return {int: (int,), float: (int, float), str: (str,), bool: (bool,)}.get(tp)


def _line(node) -> int:
    return node.start_mark.line + 1


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(options))})"


def _value(cls, f: dataclasses.Field, node, key: str, name: str):
    """The checked value of one recipe key."""
    where = f"{name}:{_line(node)}: {key}"
    value = yaml.safe_load(yaml.serialize(node)) if node is not None else None
    if value is None:
        return None
    types = _accepted_types(cls, f)
    if isinstance(value, str) and types and float in types:
        try:  # YAML 1.1 reads 1e-4 as a string; accept it as a number
            value = float(value)
        except ValueError:
            pass
    if types is not None:
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            want = " or ".join(sorted({t.__name__ for t in types}))
            raise SlimlmError(f"{where}: expected {want}, got {value!r}")
        if isinstance(value, float) and int in types and float not in types:
            raise SlimlmError(f"{where}: expected an integer, got {value!r}")
    parse = f.metadata.get("parse")
    try:
        if parse is not None:
            value = parse(value, key)
        check_bounds(f, value, key)
    except SlimlmError as exc:
        raise SlimlmError(f"{name}:{_line(node)}: {exc}") from None
    return value


def _read_section(cls, node, section: str, name: str) -> dict:
    keys = section_keys(cls)
    values = {}
    for key_node, value_node in node.value:
        key = key_node.value
        if key not in keys:
            raise SlimlmError(f"{name}:{_line(key_node)}: {section}.{key}: unknown key{_suggest(key, keys)}")
        values[key] = _value(cls, keys[key], value_node, f"{section}.{key}", name)
    return values


def parse_recipe(text: str, name: str = "recipe") -> Recipe:
    """Validate a recipe's YAML text; return the resolved recipe (every default filled in)."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark else name
        raise SlimlmError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    top_keys = {f.name: f for f in RunConfig.settings(where="recipe")}
    top: dict[str, Any] = {}
    sections: dict[str, dict] = {}
    if root is not None:
        if not isinstance(root, yaml.MappingNode):
            raise SlimlmError(f"{name}:{_line(root)}: a recipe is a mapping of keys to values")
        for key_node, value_node in root.value:
            key = key_node.value
            if key in SECTIONS:
                if value_node.tag == "tag:yaml.org,2002:null":
                    sections[key] = {}
                    continue
                if not isinstance(value_node, yaml.MappingNode):
                    raise SlimlmError(f"{name}:{_line(value_node)}: {key}: expected a mapping of settings")
                sections[key] = _read_section(SECTIONS[key], value_node, key, name)
            elif key in top_keys:
                top[key] = _value(RunConfig, top_keys[key], value_node, key, name)
            else:
                raise SlimlmError(f"{name}:{_line(key_node)}: {key}: unknown key{_suggest(key, set(top_keys) | set(SECTIONS))}")
    return _resolve(top, sections, name)


def _resolve(top: dict, sections: dict[str, dict], name: str) -> Recipe:
    run = RunConfig(**{k: v for k, v in top.items() if v is not None})
    shared = {k: getattr(run, k) for k in shared_settings()}
    built = {}
    for section, cls in SECTIONS.items():
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in shared.items() if k in names}
        values.update({k: v for k, v in sections.get(section, {}).items() if v is not None})
        built[section] = cls(**values)
    if "prune" in sections and "search" in sections:
        raise SlimlmError(f"{name}: give either a prune section or a search section, not both")
    if "search" in sections:
        try:
            built["search"].target()
        except SlimlmError:
            raise SlimlmError(f"{name}: a search section needs exactly one of target_params and "
                              "target_active_params") from None
    mode = "search" if "search" in sections else "prune"
    if mode == "prune" and not built["prune"].any_size():
        raise SlimlmError(f"{name}: the prune section names no size (hidden, ffn, heads, kv_heads, layers or drop_layers)")
    if "align" in sections and built["align"].prefs and not built["align"].sft:
        raise SlimlmError(f"{name}: align.prefs needs align.sft (DPO runs after SFT)")
    return Recipe(run=run, mode=mode, present=frozenset(sections), **built)


def load_recipe(path: str | Path | None) -> tuple[Recipe, str]:
    """(resolved recipe, its source text); None loads the embedded default recipe."""
    if path is None:
        text = resources.files("slimlm.recipes").joinpath("default.yaml").read_text()
        return parse_recipe(text, "default.yaml"), text
    p = Path(path)
    if not p.exists():
        raise SlimlmError(f"recipe not found: {p}")
    text = p.read_text()
    return parse_recipe(text, p.name), text
