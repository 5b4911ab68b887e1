"""A sweep's search space: the sweep: section parsed into typed parameters, sampled per trial into a recipe."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune import recipe as recipe_module
from finetune.errors import FinetuneError

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
NOT_SEARCHABLE = ("output", "sweep", "hub")  # set per trial, or meaningless per trial


@dataclass
class Param:
    """One searched key: a distribution over the values of a dotted recipe key."""

    key: str
    kind: str  # one of DISTRIBUTIONS
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: list | None = None

    def labels(self) -> list:
        """What Optuna stores for each choice: the value itself when it is a scalar, else its YAML text."""
        if all(c is None or isinstance(c, (bool, int, float, str)) for c in self.choices):
            return list(self.choices)
        return [flow(c) for c in self.choices]

    def suggest(self, trial) -> Any:
        if self.kind == "choice":
            labels = self.labels()
            return self.choices[labels.index(trial.suggest_categorical(self.key, labels))]
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "loguniform")

    def value_of(self, stored) -> Any:
        """The recipe value behind what Optuna stored for this key."""
        return self.choices[self.labels().index(stored)] if self.kind == "choice" else stored

    def grid(self) -> list:
        if self.kind == "choice":
            return self.labels()
        if self.kind == "int":
            return list(range(self.low, self.high + 1))
        raise FinetuneError(
            f"sweep.space.{self.key}: sweep.sampler=grid needs choice or int distributions, not {self.kind}; "
            f"use sampler=tpe or random, or list the values as {{choice: [...]}}"
        )

    def representatives(self) -> list:
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def spec(self) -> dict:
        if self.kind == "choice":
            return {"choice": self.choices}
        spec = {self.kind: [self.low, self.high]}
        return spec | {"log": True} if self.log else spec


def flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip().removesuffix("...").strip()


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_param(key: str, spec: Any) -> Param:
    where = f"sweep.space.{key}"
    example = "e.g. {loguniform: [1.0e-5, 3.0e-4]}, {uniform: [0, 0.3]}, {int: [4, 32]} or {choice: [16, 32]}"
    if not isinstance(spec, dict):
        raise FinetuneError(f"{where}: expected a distribution, got {spec!r}; {example}")
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    extra = [k for k in spec if k not in DISTRIBUTIONS and not (k == "log" and kinds == ["int"])]
    if len(kinds) != 1 or extra:
        import difflib

        close = difflib.get_close_matches(str((extra or kinds or [""])[0]), DISTRIBUTIONS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close and extra else ""
        raise FinetuneError(f"{where}: expected one of {', '.join(DISTRIBUTIONS)}{hint}; {example}")
    kind, value = kinds[0], spec[kinds[0]]
    if kind == "choice":
        if not isinstance(value, list) or not value:
            raise FinetuneError(f"{where}: choice needs a non-empty list of values, e.g. {{choice: [16, 32]}}")
        labels = Param(key, kind, choices=value).labels()
        if len({json.dumps(v, sort_keys=True) for v in labels}) != len(labels):
            raise FinetuneError(f"{where}: choice lists a value twice; list each value once")
        return Param(key, kind, choices=value)
    if not (isinstance(value, list) and len(value) == 2 and all(map(_finite_number, value))):
        raise FinetuneError(f"{where}: {kind} needs [lower, upper], two numbers, got {value!r}")
    low, high = value
    if low >= high:
        raise FinetuneError(f"{where}: {kind} lower bound {low} is not below the upper bound {high}; "
                            "give [lower, upper]")
    if kind == "loguniform" and low <= 0:
        raise FinetuneError(f"{where}: loguniform needs a lower bound above 0, got {low}; e.g. [1.0e-5, 3.0e-4]")
    if kind == "int":
        log = spec.get("log", False)
        if not all(isinstance(v, int) for v in value) or not isinstance(log, bool):
            raise FinetuneError(f"{where}: int needs two integers [lower, upper] and log true/false, got {spec!r}")
        if log and low < 1:
            raise FinetuneError(f"{where}: int with log: true needs a lower bound of at least 1, got {low}")
        return Param(key, kind, low, high, log=log)
    return Param(key, kind, float(low), float(high))


def parse_space(space: dict, base: dict) -> list[Param]:
    """The space as Params, parents before their children; each bound or choice is checked on the base recipe
    with the recipe's own validation, so a typo gets its "did you mean" and a bad value its reason."""
    if not space:
        raise FinetuneError(
            "sweep.space: nothing to search; add dotted recipe keys, e.g. sweep.space: {train.lr: {loguniform: "
            "[1.0e-5, 3.0e-4]}} (or pass --space FILE)"
        )
    params = [parse_param(str(key), spec) for key, spec in space.items()]
    for param in params:
        parts = param.key.split(".")
        if any(not part for part in parts):
            raise FinetuneError(f"sweep.space.{param.key}: not a dotted recipe key, e.g. train.lr")
        if parts[0] in NOT_SEARCHABLE:
            raise FinetuneError(f"sweep.space.{param.key}: {parts[0]}.* is set by the sweep, not searched; drop it")
        for value in param.representatives():
            raw = copy.deepcopy(base)
            set_dotted(raw, param.key, value)
            try:
                recipe_module.from_dict(raw, source=f"sweep.space.{param.key}={flow(value)}")
            except FinetuneError as error:
                raise FinetuneError(f"{error}; fix sweep.space.{param.key}") from None
    return sorted(params, key=lambda p: p.key.count("."))  # stable: a section is set before the keys inside it


def set_dotted(raw: dict, key: str, value) -> None:
    """As a `key=value` override does it: missing or null sections on the way become mappings."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = copy.deepcopy(value)


def _switched_off(key: str, values: dict) -> bool:
    """A key inside a section that this trial set to null (lora.r when lora is null) is not searched."""
    parts = key.split(".")
    return any(values.get(".".join(parts[:i]), ...) is None for i in range(1, len(parts)))


def sample(params: list[Param], trial) -> dict:
    values: dict = {}
    for param in params:
        if not _switched_off(param.key, values):
            values[param.key] = param.suggest(trial)
    return values


def trial_recipe_dict(base: dict, values: dict, run_dir: Path) -> dict:
    raw = copy.deepcopy(base)
    raw["sweep"] = None
    for key, value in values.items():
        set_dotted(raw, key, value)
    raw.setdefault("output", {})["dir"] = str(run_dir)
    return raw


