"""Recipes: the typed schema (the one home of every default), YAML loading, dotted overrides and validation."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from finetune import foreign_names
from finetune.errors import FinetuneError
from finetune.problems import PROBLEMS
from finetune.tasks import TASKS

TaskName = Literal[tuple(TASKS)]  # a new task is its module and its line in finetune.tasks.TASKS

# ---------------------------------------------------------------------------------------------------------------
# The schema. Field comments are the documentation; `finetune cp` gives a commented example.


@dataclass
class Backbone:
    name: str  # offline zoo name | hub id | timm model name | local directory
    dropout: Optional[float] = 0.1  # backbone dropout (hidden+attention for text, drop_rate for timm); null: keep
    drop_path: float = 0.0  # timm stochastic depth
    pretrained: bool = True  # false: same architecture, random weights (the from-scratch baseline)
    trust_remote_code: bool = False  # run model code from the hub; only for sources you trust


@dataclass
class Head:
    type: Literal["linear", "mlp"] = "linear"
    hidden: list[int] = field(default_factory=list)  # mlp layer widths
    dropout: float = 0.1
    pooling: Literal["auto", "cls", "mean"] = "auto"  # auto: what the ecosystem's own class pools
    # tags: a tag per word, token-classification's only problem (it takes it whatever this says by default)
    problem: Literal["single_label", "multi_label", "regression", "tags"] = "single_label"
    threshold: float = 0.5  # multi_label: a label is predicted when its sigmoid exceeds this


@dataclass
class Data:
    train: str  # offline zoo data set | csv/tsv/json/jsonl/parquet file | image folder | hub:<id>
    validation: Optional[str] = None  # null: a stratified val_fraction of train (seeded), saved in split.json
    test: Optional[str] = None
    val_fraction: float = 0.1
    max_samples: Optional[int] = None  # cap the rows of each split (quick experiments)
    text_column: str = "text"
    text_pair_column: Optional[str] = None  # sentence pairs (NLI, paraphrase, STS): the second text of each row
    tokens_column: str = "tokens"  # token-classification tables: a list of words per row
    tags_column: str = "tags"  # token-classification tables: a list of tags per row, one per word
    label_all_tokens: bool = False  # token-classification: a word's tag on all its sub-tokens (B- becoming I-)
    image_column: str = "image"
    label_column: str = "label"  # multi_label: a list column or an "a|b|c" string; regression: a number
    max_length: int = 256  # text: tokens per example, longer texts are truncated
    image_size: Optional[int] = None  # vision; null: the backbone's pretrained input size
    skip_bad_images: bool = False  # vision: skip (and count) unreadable images instead of stopping with an error
    num_workers: Optional[int] = None  # loader processes; null: 0 for text, images: tasks.image_classification


@dataclass
class Augment:
    """Train-time image augmentation, done by timm's own transforms; evaluation is always deterministic."""

    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random-resized-crop area range
    hflip: float = 0.5  # probability of a horizontal flip
    auto_augment: Optional[str] = None  # timm policy: rand-m9-mstd0.5-inc1 (RandAugment) | trivialaugment | null
    random_erasing: float = 0.0  # probability
    mixup: float = 0.0  # mixup alpha; 0: off
    cutmix: float = 0.0  # cutmix alpha; 0: off


@dataclass
class Ema:
    decay: float = 0.9998  # timm's ModelEmaV3; the EMA weights are evaluated and can be the kept model


@dataclass
class EarlyStopping:
    metric: Optional[str] = None  # null: eval.select_best
    patience: int = 2  # evaluations without improvement before stopping (epochs, or train.eval_every steps)


@dataclass
class Freeze:
    """How much of the pretrained backbone trains, epoch by epoch (the head always trains)."""

    head_warmup: int = 0  # epochs of training the head alone, then everything
    unfreeze_every: Optional[int] = None  # staged: the head alone, then one more layer from the top every K epochs


@dataclass
class Train:
    epochs: int = 3
    max_steps: Optional[int] = None  # stop after this many optimizer steps, whatever train.epochs says (the schedule
    # spans them, as in the transformers Trainer); null: train.epochs
    eval_every: Optional[int] = None  # validate every N optimizer steps (and at the last); null: after each epoch
    batch_size: int = 32  # per process; the global batch is batch_size x processes x grad_accum
    eval_batch_size: Optional[int] = None  # null: 2 x batch_size
    lr: float = 5.0e-5
    head_lr: Optional[float] = None  # null: same as lr
    weight_decay: float = 0.01  # never on biases and norm weights
    # transformers' schedules (SchedulerType): cosine | linear | constant (with warmup) | cosine_with_min_lr |
    # cosine_warmup_with_min_lr | warmup_stable_decay | polynomial | cosine_with_restarts | inverse_sqrt |
    # constant_with_warmup; each takes its own train.scheduler_args. reduce_lr_on_plateau | greedy: the lr follows
    # eval.select_best after each validation (mode max/min from the metric; no warmup), as the Trainer steps them
    scheduler: Literal[
        "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt",
        "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay", "reduce_lr_on_plateau", "greedy",
    ] = "cosine"
    # the schedule's own arguments, as transformers names them: {min_lr_rate: 0.1} (cosine_with_min_lr),
    # {num_decay_steps: 0.2, decay_type: linear} (warmup_stable_decay; steps as an int or a fraction of all steps),
    # {lr_end: 1.0e-7, power: 2.0} (polynomial), {num_cycles: 3} (cosine_with_restarts), {timescale: 100}
    scheduler_args: dict[str, Any] = field(default_factory=dict)
    warmup: Union[int, float] = 0.1  # float < 1: fraction of steps; int: steps
    grad_accum: int = 1
    max_grad_norm: Optional[float] = 1.0  # null: no clipping
    # auto: bf16/fp16 on GPUs, bf16 autocast on CPUs with native bf16 (AVX512_BF16/AMX), fp32 on the others
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 42
    early_stopping: Optional[EarlyStopping] = None  # {metric: accuracy, patience: 2}
    label_smoothing: float = 0.0  # single_label cross-entropy (and mixup/cutmix targets)
    ema: Optional[Ema] = None  # {decay: 0.9998}: keep an exponential moving average of the weights
    # vision memory format; null: on for convolutional backbones on GPUs, measured on CPUs (finetune.step_choice)
    channels_last: Optional[bool] = None
    # none | backbone (linear probe: the head alone) | {head_warmup: N} | {unfreeze_every: K}
    freeze: Union[Literal["none", "backbone"], Freeze] = "none"
    layer_decay: Optional[float] = None  # e.g. 0.75: each layer below the head gets this times the lr of the one above
    # frozen backbone without augmentation: compute its features once (cached on disk) and train the head on them;
    # null: whenever that is possible
    cache_features: Optional[bool] = None
    group_by_length: bool = False  # text: batches of similar lengths (shuffled groups): less padding, faster epochs
    sampler: Literal["random", "balanced"] = "random"  # balanced: draw every class equally often (skewed labels)
    freeze_embeddings: bool = False  # text: keep the word embeddings as pretrained (a third of MiniLM's weights)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% slower
    compile: bool = False  # torch.compile the model (pays off on long runs; the first steps compile)
    # CPU training: dropout (and the attention's dropout) with a cheaper random mask, same rate (finetune.dropout;
    # ~40% of a text forward pass otherwise); false: torch's own dropout. Ignored on GPUs.
    fast_dropout: bool = True
    # accelerate's experiment trackers, the recipe logged as each run's config: tensorboard (in the run folder) |
    # wandb | mlflow | comet_ml | aim | clearml | dvclive | trackio | swanlab; [] for none
    log_with: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "trackio",
                           "swanlab"]] = field(default_factory=lambda: ["tensorboard"])
    log_project: str = "finetune"  # the trackers' project (wandb, comet_ml, trackio) or experiment (mlflow, ...)
    checkpoint_every: Optional[int] = None  # optimizer steps between resumable checkpoints; null: at each epoch's end
    keep_checkpoints: int = 1  # resumable checkpoints kept (the newest); the best model is kept apart
    # single_label loss weights: auto (inverse class frequency in train, mean 1) | one number per label | null
    class_weights: Union[Literal["auto"], list[float], None] = None


@dataclass
class Lora:
    """Low-rank adapters through peft: the backbone stays frozen, small matrices beside chosen layers train."""

    r: int = 8  # rank of the update
    alpha: int = 16  # scaling: the update is multiplied by alpha / r
    dropout: float = 0.05  # on the adapters' input
    target_modules: Union[Literal["auto"], list[str]] = "auto"  # auto: peft's table per architecture, or ours for timm
    bias: Literal["none", "all", "lora_only"] = "none"  # which biases train too


@dataclass
class Eval:
    metrics: Optional[list[str]] = None  # null: the usual ones for head.problem (see DEFAULT_METRICS)
    select_best: Optional[str] = None  # the metric that picks the kept checkpoint; null: the first of eval.metrics
    # eval.metrics may name Hugging Face evaluate modules, 'evaluate:<folder or hub id>[#key]'; evaluate.load runs
    # their Python code, so they load only with trust_metric_code: true (as transformers' trust_remote_code)
    trust_metric_code: bool = False
    metric_args: dict[str, Any] = field(default_factory=dict)  # 'evaluate:...' entry -> compute() args, config_name
    lower_is_better: list[str] = field(default_factory=list)  # 'evaluate:...' entries where a smaller value wins
    # temperature: one temperature fitted on the kept model's validation logits (minimising NLL) and folded into
    # the exported output layer, so every loader returns calibrated scores; labels never change. null: raw scores.
    # A regression head has none
    calibrate: Optional[Literal["temperature"]] = "temperature"


@dataclass
class Output:
    dir: Optional[str] = None  # null: runs/<recipe file name>


@dataclass
class Hub:
    repo_id: Optional[str] = None
    private: bool = True


@dataclass
class Sweep:
    """`finetune sweep`: the search space (dotted recipe keys), the objective, the sampler and the pruner."""

    # dotted key -> {loguniform: [lo, hi]} | {uniform: [lo, hi]} | {int: [lo, hi], log: false} | {choice: [...]}
    space: dict = field(default_factory=dict)
    metric: Optional[str] = None  # null: eval.select_best; on validation, the trial's best epoch
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"  # judged on each epoch's validation value
    trials: int = 10  # finished (complete or pruned) trials the study should hold; --trials overrides
    startup_trials: int = 3  # trials drawn at random and never pruned before the sampler and pruner use the rest
    min_epochs: Optional[int] = None  # epochs a trial runs before the pruner may stop it; null: train.epochs // 2 + 1
    # (past the middle of a decaying lr schedule, which ranks high-lr trials unfairly early); never after the last
    seed: Optional[int] = None  # sampler seed; null: every worker draws differently


@dataclass(kw_only=True)
class Recipe:
    task: TaskName
    backbone: Backbone
    head: Head = field(default_factory=Head)
    data: Data
    augment: Augment = field(default_factory=Augment)  # vision only
    train: Train = field(default_factory=Train)
    lora: Optional[Lora] = None  # {r: 8, alpha: 16, dropout: 0.05, target_modules: auto}
    eval: Eval = field(default_factory=Eval)
    output: Output = field(default_factory=Output)
    hub: Hub = field(default_factory=Hub)
    sweep: Optional[Sweep] = None  # read by `finetune sweep` only; `finetune run` ignores it


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


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
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
    raw = apply_overrides(raw, list(overrides))
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
        _check_values(recipe, checks)
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


def _check_evaluate_modules(e: Eval, problems: list[str]) -> None:
    """The evaluate entries of eval: trusted, well formed, loadable now (not after an epoch of training); their
    arguments and directions declared to finetune.metrics."""
    from finetune.metrics import declare, evaluate_parts, is_evaluate, load_module

    entries = [name for name in e.metrics if is_evaluate(name)]
    for key, names in (("eval.metric_args", list(e.metric_args)), ("eval.lower_is_better", e.lower_is_better)):
        for name in names:
            if name not in entries:
                what = "an evaluate entry" if is_evaluate(name) else "for evaluate entries only ('evaluate:...')"
                problems.append(f"{key}: '{name}' is not {what} of eval.metrics; list it there first"
                                if is_evaluate(name) else f"{key}: '{name}' is {what}; built-in metrics know "
                                                          "their direction and take no arguments")
    for name, args in e.metric_args.items():
        if not isinstance(args, dict):
            problems.append(f"eval.metric_args.{name}: must be a mapping of compute() arguments, got {args!r}")
    if not entries:
        return
    if not e.trust_metric_code:
        problems.append(f"eval.metrics: '{entries[0]}' runs the module's own Python code through evaluate.load; "
                        "set eval.trust_metric_code=true if you trust it")
        return
    for name in entries:
        ref, key = evaluate_parts(name)
        if not ref or (key is None and "#" in name):
            problems.append(f"eval.metrics: '{name}' should be 'evaluate:<folder or hub id>' or "
                            "'evaluate:<folder or hub id>#<key>'")
            continue
        args = e.metric_args.get(name) if isinstance(e.metric_args.get(name), dict) else {}
        declare(name, args, higher=name not in e.lower_is_better)
        try:
            load_module(ref, args.get("config_name"))
        except FinetuneError as error:
            problems.append(str(error))


def _check_values(recipe: Recipe, problems: list[str]) -> None:
    """Every value the schema's types cannot check, each problem appended to `problems` with its dotted key."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    for check in (_check_training, _check_data, _check_model, _check_steps, _check_task):
        check(recipe, need)
    _check_metrics(recipe, problems, need)


def _check_training(recipe: Recipe, need) -> None:
    """train.*: sizes, rates and the warm-up."""
    t = recipe.train
    need(t.epochs >= 1, f"train.epochs: must be at least 1, got {t.epochs}")
    need(t.batch_size >= 1, f"train.batch_size: must be at least 1, got {t.batch_size}")
    need(t.eval_batch_size is None or t.eval_batch_size >= 1, "train.eval_batch_size: must be at least 1")
    need(t.lr > 0, f"train.lr: must be > 0, got {t.lr}")
    need(t.head_lr is None or t.head_lr > 0, f"train.head_lr: must be > 0, got {t.head_lr}")
    need(t.weight_decay >= 0, f"train.weight_decay: must be >= 0, got {t.weight_decay}")
    need(t.grad_accum >= 1, f"train.grad_accum: must be at least 1, got {t.grad_accum}")
    need(t.max_grad_norm is None or t.max_grad_norm > 0, "train.max_grad_norm: must be > 0, or null for no clipping")
    if isinstance(t.warmup, float):
        need(0 <= t.warmup < 1, f"train.warmup: a fraction must be in [0, 1), got {t.warmup}; an integer means steps")
    else:
        need(t.warmup >= 0, f"train.warmup: steps must be >= 0, got {t.warmup}")


def _check_data(recipe: Recipe, need) -> None:
    """data.* and augment.*, label smoothing, EMA and the loader's workers."""
    t, d = recipe.train, recipe.data
    need(0 < d.val_fraction < 1, f"data.val_fraction: must be between 0 and 1, got {d.val_fraction}")
    need(d.max_samples is None or d.max_samples >= 1, "data.max_samples: must be at least 1, or null for all rows")
    need(d.max_length >= 2, f"data.max_length: must be at least 2, got {d.max_length}")
    need(d.image_size is None or d.image_size >= 1, "data.image_size: must be at least 1, or null")
    a = recipe.augment
    need(
        len(a.scale) == 2 and 0 < a.scale[0] <= a.scale[1] <= 1,
        f"augment.scale: expected [min, max] area fractions with 0 < min <= max <= 1, got {a.scale}",
    )
    for key in ("hflip", "random_erasing"):
        need(0 <= getattr(a, key) <= 1, f"augment.{key}: a probability must be in [0, 1], got {getattr(a, key)}")
    need(a.mixup >= 0 and a.cutmix >= 0, "augment.mixup/cutmix: alphas must be >= 0 (0 turns them off)")
    need(0 <= t.label_smoothing < 1, f"train.label_smoothing: must be in [0, 1), got {t.label_smoothing}")
    need(t.ema is None or 0 < t.ema.decay < 1, "train.ema.decay: must be between 0 and 1")
    need(d.num_workers is None or d.num_workers >= 0, "data.num_workers: must be >= 0, or null for automatic")


def _check_model(recipe: Recipe, need) -> None:
    """backbone.*, head.*, lora.* and train.freeze."""
    t, h = recipe.train, recipe.head
    need(recipe.backbone.dropout is None or 0 <= recipe.backbone.dropout < 1, "backbone.dropout: must be in [0, 1)")
    need(0 <= recipe.backbone.drop_path < 1, "backbone.drop_path: must be in [0, 1)")
    need(0 <= h.dropout < 1, f"head.dropout: must be in [0, 1), got {h.dropout}")
    need(all(w is not None and w >= 1 for w in h.hidden), "head.hidden: layer widths must be positive integers")
    need(h.type == "mlp" or not h.hidden, "head.hidden: only an mlp head has hidden layers; set head.type=mlp")
    need(0 < h.threshold < 1, f"head.threshold: must be between 0 and 1, got {h.threshold}")
    if recipe.lora is not None:
        need(recipe.lora.r >= 1, f"lora.r: must be at least 1, got {recipe.lora.r}")
        need(0 <= recipe.lora.dropout < 1, "lora.dropout: must be in [0, 1)")
        need(recipe.lora.alpha > 0, f"lora.alpha: must be > 0, got {recipe.lora.alpha}")
        need(recipe.lora.target_modules != [], "lora.target_modules: name at least one module, or use auto")
        need(t.freeze == "none", "train.freeze: LoRA already freezes the backbone; set train.freeze=none with lora")
    if isinstance(t.freeze, Freeze):
        need(t.freeze.head_warmup >= 0, f"train.freeze.head_warmup: must be >= 0 epochs, got {t.freeze.head_warmup}")
        need(
            t.freeze.unfreeze_every is None or t.freeze.unfreeze_every >= 1,
            f"train.freeze.unfreeze_every: must be at least 1 epoch, got {t.freeze.unfreeze_every}",
        )
        need(
            not (t.freeze.head_warmup and t.freeze.unfreeze_every),
            "train.freeze: head_warmup and unfreeze_every are two schedules; pick one",
        )


def _check_steps(recipe: Recipe, need) -> None:
    """train.*'s step counts, orders, class weights, layer decay and cached features."""
    t, h = recipe.train, recipe.head
    need(t.max_steps is None or t.max_steps >= 1,
         f"train.max_steps: must be at least 1 step, or null; got {t.max_steps}")
    need(t.eval_every is None or t.eval_every >= 1,
         f"train.eval_every: must be at least 1 step, or null (after each epoch); got {t.eval_every}")
    need(t.checkpoint_every is None or t.checkpoint_every >= 1,
         "train.checkpoint_every: must be at least 1 step, or null")
    need(t.keep_checkpoints >= 1, f"train.keep_checkpoints: must be at least 1, got {t.keep_checkpoints}")
    need(t.sampler == "random" or PROBLEMS[h.problem].single_class, "train.sampler: balanced is for single_label heads")
    need(
        not (t.group_by_length and t.sampler == "balanced"),
        "train.group_by_length: and train.sampler=balanced are two orders; pick one",
    )
    if t.class_weights is not None:
        need(PROBLEMS[h.problem].single_class, "train.class_weights: only for head.problem=single_label")
        need(
            t.class_weights == "auto" or all(w is not None and w > 0 for w in t.class_weights),
            "train.class_weights: weights must be positive numbers (one per label, in label order), or auto",
        )
    need(t.layer_decay is None or 0 < t.layer_decay <= 1, f"train.layer_decay: must be in (0, 1], got {t.layer_decay}")
    need(
        not (t.cache_features and t.freeze != "backbone"),
        "train.cache_features: needs a frozen backbone; set train.freeze=backbone (or cache_features=null)",
    )


def _check_task(recipe: Recipe, need) -> None:
    """head.problem and the keys the recipe's task constrains."""
    from finetune.tasks import TASKS, get_task

    h = recipe.head
    if recipe.task in TASKS:  # a bad task name is its own problem, reported already
        task = get_task(recipe.task)
        need(h.problem in task.problems, f"head.problem: {recipe.task} takes {' or '.join(task.problems)}, "
                                          f"not {h.problem}")
        task.check_recipe(recipe, need)


def _check_metrics(recipe: Recipe, problems: list[str], need) -> None:
    """eval.metrics for the problem, and what selects or stops on them (eval, early stopping, sweep)."""
    from finetune.metrics import METRICS, is_evaluate, metrics_for  # metrics owns the names; recipe checks them

    t, h = recipe.train, recipe.head
    allowed = metrics_for(h.problem)
    _check_evaluate_modules(recipe.eval, problems)
    for name in recipe.eval.metrics:
        if is_evaluate(name):
            continue
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            kind = "not a metric for" if name in METRICS else "unknown metric for"
            problems.append(f"eval.metrics: '{name}' is {kind} head.problem={h.problem}{hint}; "
                            f"use {', '.join(allowed)}")
    selectable = [*recipe.eval.metrics, "loss"]
    need(
        recipe.eval.select_best in selectable,
        f"eval.select_best: '{recipe.eval.select_best}' is not in eval.metrics; use one of {', '.join(selectable)}",
    )
    if t.early_stopping is not None:
        need(
            t.early_stopping.metric in selectable,
            f"train.early_stopping.metric: '{t.early_stopping.metric}' is not in eval.metrics; use one of "
            + ", ".join(selectable),
        )
        need(t.early_stopping.patience >= 1, "train.early_stopping.patience: must be at least 1")
    if recipe.sweep is not None:
        s = recipe.sweep
        need(
            s.metric is None or s.metric in selectable,
            f"sweep.metric: '{s.metric}' is not in eval.metrics; use one of {', '.join(selectable)}",
        )
        need(s.trials >= 1, f"sweep.trials: must be at least 1, got {s.trials}")
        need(s.startup_trials >= 0, f"sweep.startup_trials: must be >= 0, got {s.startup_trials}")
        need(s.min_epochs is None or s.min_epochs >= 1, f"sweep.min_epochs: must be >= 1 or null, got {s.min_epochs}")
