"""Each setting is declared once (slimlm.config): the CLI, the recipe and the API see the same defaults."""

import dataclasses
import inspect
import math

import pytest
from typer.main import get_command

from slimlm import config as C
from slimlm._cli import build_configs
from slimlm.cli import build_app
from slimlm.errors import SlimlmError
from slimlm.recipe import SECTIONS, parse_recipe, section_keys

# The arguments each command needs before its options can be parsed.
REQUIRED = {
    "importance": ["m", "-o", "x"],
    "prune": ["m", "-o", "x"],
    "search": ["m", "-o", "x", "--target-params", "1e6"],
    "distill": ["-t", "a", "-s", "b", "-o", "x"],
    "correct-teacher": ["m", "-o", "x"],
    "eval": ["m"],
    "align": ["m", "-o", "x", "--sft", "chats.jsonl"],
}


def _commands():
    app = get_command(build_app())
    return {name: app.commands[name] for name in REQUIRED}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_cli_defaults_are_the_declared_defaults(name):
    """Parsing a command with only its required arguments gives config objects equal to the classes' defaults,
    value for value, and every default the CLI shows is the declared object itself."""
    cmd = _commands()[name]
    expanded = cmd.callback.__wrapped_settings__
    ctx = cmd.make_context(name, list(REQUIRED[name]))
    configs = build_configs(expanded, ctx.params)
    params = {p.name: p for p in cmd.params}
    for key, (cls, members) in expanded.items():
        required = {"target_params": 1e6, "sft": "chats.jsonl"}
        want = cls.make(**{k: v for k, v in required.items() if k in {f.name for f in dataclasses.fields(cls)}})
        assert configs[key] == want, (name, key)
        for internal, field_name in members:
            declared = cls.__dataclass_fields__[field_name].default
            shown = params[internal].default
            if declared is None or isinstance(declared, tuple) or field_name in required:
                continue  # None/() mean "not given" on the CLI; the config default is used (checked above)
            if isinstance(declared, int) and cls.__dataclass_fields__[field_name].metadata.get("parse"):
                assert C.parse_count(shown) == declared
                continue
            assert shown is declared, (name, internal)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_recipe_defaults_are_the_declared_defaults(section):
    text = {"prune": "prune: {hidden: 8}\n", "search": "search: {target_params: 1.0e+6}\n"}.get(
        section, f"prune: {{hidden: 8}}\n{section}: {{}}\n")
    recipe = parse_recipe(text)
    cls = SECTIONS[section]
    got = getattr(recipe, section)
    for f in dataclasses.fields(cls):
        if (section, f.name) in (("prune", "hidden"), ("search", "target_params")):
            continue
        if f.name in C.shared_settings():  # the top-level keys' defaults, declared by the same functions
            assert getattr(got, f.name) == getattr(C.RunConfig(), f.name)
        else:
            assert getattr(got, f.name) is f.default, (section, f.name)
    # every recipe key is a setting of the class, and every recipe setting of the class is a key
    assert set(section_keys(cls)) == {f.name for f in cls.settings(where="recipe")} - C.shared_settings()


def test_api_functions_declare_no_defaults_of_their_own():
    """The API takes the config classes (or overrides of them): no function re-declares a setting's default."""
    from slimlm import api
    from slimlm.align.trainer import align
    from slimlm.distill.trainer import correct_teacher, distill
    from slimlm.evaluate.compare import compare
    from slimlm.evaluate.runner import evaluate
    from slimlm.search import search

    for fn, classes in ((api.importance, [C.ImportanceConfig]), (api.prune, [C.PruneConfig, C.ImportanceConfig]),
                        (distill, [C.DistillConfig]), (correct_teacher, [C.CorrectConfig]), (align, [C.AlignConfig]),
                        (evaluate, [C.EvalConfig]), (compare, [C.EvalConfig]),
                        (search, [C.SearchConfig, C.DistillConfig, C.ImportanceConfig])):
        settings = {f.name for cls in classes for f in dataclasses.fields(cls)}
        for p in inspect.signature(fn).parameters.values():
            if p.name in settings:  # positional shortcuts (data, tokens, sft, prefs) default to "not given"
                assert p.default is None, (fn.__name__, p.name)


def test_overrides_are_parsed_checked_and_routed():
    c = C.DistillConfig.make(tokens="2.5k", data=["only.txt"])
    assert c.tokens == 2500 and c.data == "only.txt"
    with pytest.raises(SlimlmError, match="--micro-batch must be at least 1"):
        C.DistillConfig.make(micro_batch=0)
    with pytest.raises(SlimlmError, match="--lr must be greater than 0"):
        C.DistillConfig.make(lr=0.0)
    with pytest.raises(TypeError, match="no setting"):
        C.DistillConfig.make(tokns=5)
    made = C.route_overrides({"hidden": 8, "seed": 3}, targets=(C.PruneConfig, None),
                             calib=(C.ImportanceConfig, C.ImportanceConfig(calib_samples=4)))
    assert made["targets"].hidden == 8 and made["calib"].seed == 3 and made["calib"].calib_samples == 4
    with pytest.raises(TypeError, match="unexpected"):
        C.route_overrides({"colour": 1}, targets=(C.PruneConfig, None))


def test_recipe_values_are_checked_like_the_cli():
    with pytest.raises(SlimlmError, match=r"r.yaml:3: distill.micro_batch must be at least 1"):
        parse_recipe("prune: {hidden: 8}\ndistill:\n  micro_batch: 0\n", "r.yaml")
    r = parse_recipe("prune: {hidden: 8}\ndistill:\n  tokens: 2M\n", "r.yaml")
    assert r.distill.tokens == 2_000_000


def test_the_default_learning_rate_follows_the_token_budget_and_a_given_one_wins():
    from slimlm.config import LR_BY_BUDGET, DistillConfig, default_lr

    (small, lr_small), (large, lr_large) = LR_BY_BUDGET
    assert DistillConfig(tokens=32_768).peak_lr() == lr_small
    assert DistillConfig(tokens=94 * 10**9).peak_lr() == lr_large
    middle = int(math.sqrt(small * large))  # log-linear: the geometric mean of the ends halfway (in log tokens)
    assert default_lr(middle) == pytest.approx(math.sqrt(lr_small * lr_large), rel=1e-6)
    budgets = [10**4, 10**6, 10**7, 10**8, 10**9, 10**11]
    lrs = [DistillConfig(tokens=n).peak_lr() for n in budgets]
    assert lrs == sorted(lrs, reverse=True)
    c = DistillConfig(tokens=10**5, lr=2e-3)
    assert (c.peak_lr(), c.final_lr()) == (2e-3, 2e-4)
    assert DistillConfig(tokens=10**5, min_lr=0.0).final_lr() == 0.0
    filled = DistillConfig(tokens=10**5).with_learning_rates()
    assert (filled.lr, filled.min_lr) == (lr_small, pytest.approx(lr_small / 10))
