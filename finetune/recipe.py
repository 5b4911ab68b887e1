"""Recipes: the typed schema (the one home of every default), YAML loading, dotted overrides and validation."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from finetune import foreign_names
from finetune.errors import FinetuneError
from finetune.problems import PROBLEMS
from finetune.recipe_checks import check_values
from finetune.recipe_schema import (  # noqa: F401 (the sections: most callers read them through finetune.recipe)
    Augment, Backbone, Contrastive, Data, Distill, EarlyStopping, Ema, Eval, Freeze, Head, Hub, Lora, Output, Recipe,
    Sweep, TaskName, Train,
)

DEFAULT_METRICS = {name: list(problem.default_metrics) for name, problem in PROBLEMS.items()}

def _recipes_dir() -> Path:
    installed = Path(__file__).resolve().parent / "recipes"  # a wheel install carries them as package data
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "recipes"


RECIPES_DIR = _recipes_dir()

# ---------------------------------------------------------------------------------------------------------------
# YAML: safe loading, with "5e-5" read as the number a user means (PyYAML follows YAML 1.1, which wants "5.0e-5").


class _RecipeLoader(yaml.SafeLoader):
    pass


class _RecipeDumper(yaml.SafeDumper):
    pass


_FLOAT = re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
)
# the same resolver on both sides: to_yaml then quotes any string that parse_yaml would read as a number
for _side in (_RecipeLoader, _RecipeDumper):
    _side.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 — a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise FinetuneError(f"{source}:{where}: not valid recipe YAML ({problem}); recipes are plain data") from None


# ---------------------------------------------------------------------------------------------------------------
# Loading and overrides.


def find_recipe(name_or_path: str) -> Path:
    """A recipe file path, or a built-in recipe's name such as `text/minilm-bbc-news`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise FinetuneError(f"{name_or_path}: is a directory; give a recipe .yaml file")
    builtin = RECIPES_DIR / (name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml")
    if builtin.is_file():
        return builtin
    names = [name for name, _ in list_recipes()]
    hint = difflib.get_close_matches(name_or_path, names, n=1)
    suggestion = f"did you mean '{hint[0]}'? " if hint else ""
    raise FinetuneError(f"{name_or_path}: no such recipe file or built-in recipe; {suggestion}`finetune ls` lists them")


def list_recipes() -> list[tuple[str, Path]]:
    """Built-in recipes, found by globbing `recipes/` (no hand-kept registry)."""
    return [(str(p.relative_to(RECIPES_DIR).with_suffix("")), p) for p in sorted(RECIPES_DIR.rglob("*.yaml"))]


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `dotted.key=value` overrides; values parse as YAML scalars (`lora=null` removes a section)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise FinetuneError(f"override '{item}': expected dotted.key=value, e.g. train.lr=3e-5")
        parts = key.split(".")
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = parse_yaml(value, f"override '{item}'")
    return raw


def read_recipe_file(path: str | Path) -> dict:
    """A recipe file's mapping as written, before overrides, defaults and checks."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise FinetuneError(f"{path}: cannot read recipe ({error.__class__.__name__}: {error})") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FinetuneError(f"{path}: a recipe is a YAML mapping of sections (task, backbone, data, ...)")
    return raw


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    raw = apply_overrides(read_recipe_file(path), list(overrides))
    recipe = from_dict(raw, source=str(path))
    if recipe.output.dir is None:
        recipe.output.dir = str(Path("runs") / path.stem)
    return recipe


def from_dict(raw: dict, source: str = "recipe") -> Recipe:
    problems: list[str] = []
    recipe = _build(Recipe, raw, "", problems)
    if recipe is not None and recipe.backbone is not None and recipe.data is not None:
        failed = {problem.split(":", 1)[0] for problem in problems}
        checks: list[str] = []
        _resolve(recipe)
        check_values(recipe, checks)
        # a check on a stand-in value, or one that depends on a key already reported, would only add noise
        problems += [c for c in checks if c.split(":", 1)[0] not in failed and not any(f"{k}=" in c for k in failed)]
    if problems:
        count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
        raise FinetuneError(f"{source}: {count}: " + "; ".join(problems))
    return recipe


def to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def to_yaml(recipe: Recipe) -> str:
    return yaml.dump(to_dict(recipe), Dumper=_RecipeDumper, sort_keys=False, default_flow_style=False)


# ---------------------------------------------------------------------------------------------------------------
# Typed conversion that collects every problem with its dotted key.


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    where = prefix.rstrip(".") or "recipe"
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of keys, got {_describe(raw)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = foreign_names.hint(key, prefix.rstrip(".")) or (
                f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(fields)})")
            problems.append(f"{prefix}{key}: unknown key{hint}")
    values = {}
    for name, f in fields.items():
        if name in raw:
            count = len(problems)
            value = _convert(hints[name], raw[name], f"{prefix}{name}", problems)
            if len(problems) > count and not dataclasses.is_dataclass(value):
                value = field_default(f)  # already reported; a valid stand-in lets the value checks run on the rest
            values[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{prefix}{name}: required key is missing")
            values[name] = None
    try:
        return cls(**values)
    except TypeError:
        return None


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (made anew from its factory); None when it has none (a required key)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _convert(hint: Any, value: Any, key: str, problems: list[str]) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        # int before float, so `warmup: 100` stays a step count
        for option in sorted(options, key=lambda a: a is float):
            trial: list[str] = []
            converted = _convert(option, value, key, trial)
            if not trial:
                return converted
        if len(options) == 1:
            return _convert(options[0], value, key, problems)
        problems.append(f"{key}: expected {' or '.join(_name(a) for a in options)}, got {_describe(value)}")
        return None
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint_text = f" (did you mean '{close[0]}'?)" if close else ""
        problems.append(f"{key}: {value!r} is not one of {', '.join(map(str, args))}{hint_text}")
        return None
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {_describe(value)}")
            return None
        return [_convert(args[0], v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.", problems)
    if origin is dict:  # free-form arguments handed to a library, checked by the code that hands them on
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        problems.append(f"{key}: expected a mapping of names to values, got {_describe(value)}")
        return None
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is dict:  # free-form data checked by its own reader (sweep.space)
        if isinstance(value, dict):
            return value
    problems.append(f"{key}: expected {_name(hint)}, got {_describe(value)}")
    return None


def _name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(map(str, typing.get_args(hint)))
    if typing.get_origin(hint) is list:
        return "a list"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}.get(
        hint, str(hint)
    )


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    kind = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}
    return (f"{kind.get(type(value), type(value).__name__)} ({value!r})" if not isinstance(value, (dict, list))
            else kind[type(value)])


# ---------------------------------------------------------------------------------------------------------------
# Defaults that depend on other keys, then the checks a type cannot express.


def _resolve(recipe: Recipe) -> None:
    from finetune.tasks import TASKS, get_task

    if recipe.task in TASKS and recipe.head.problem not in get_task(recipe.task).problems \
            and recipe.head.problem == "single_label":  # the schema's default: the task's own (token tags)
        recipe.head.problem = get_task(recipe.task).problems[0]
    if recipe.eval.metrics is None:
        recipe.eval.metrics = list(DEFAULT_METRICS[recipe.head.problem])
    if recipe.eval.select_best is None:
        recipe.eval.select_best = recipe.eval.metrics[0] if recipe.eval.metrics else "loss"
    if recipe.train.early_stopping is not None and recipe.train.early_stopping.metric is None:
        recipe.train.early_stopping.metric = recipe.eval.select_best
    if recipe.sweep is not None and recipe.sweep.metric is None:
        recipe.sweep.metric = recipe.eval.select_best
