"""recipe: the schema and its defaults, YAML loading, dotted overrides, validation messages, round trips."""

import copy
import dataclasses
from pathlib import Path

import re

import pytest
import yaml

from finetune.errors import FinetuneError
from finetune.metrics import metrics_for
from finetune.recipe import (
    DEFAULT_METRICS,
    RECIPES_DIR,
    Backbone,
    Data,
    Eval,
    Head,
    Hub,
    Recipe,
    Train,
    apply_overrides,
    find_recipe,
    from_dict,
    list_recipes,
    load_recipe,
    parse_yaml,
    to_dict,
    to_yaml,
)
from finetune.tasks import TASKS

MINIMAL = {"task": "text-classification", "backbone": {"name": "minilm-l6"}, "data": {"train": "reviews.csv"}}


def raw(**sections) -> dict:
    """MINIMAL with sections merged in: raw(train={"lr": 1}) sets train.lr; a None value sets the section to null."""
    result = copy.deepcopy(MINIMAL)
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(result.get(name), dict):
            result[name].update(value)
        else:
            result[name] = value
    return result


def problem_of(raw_recipe: dict) -> str:
    with pytest.raises(FinetuneError) as caught:
        from_dict(raw_recipe)
    return str(caught.value)


def write(tmp_path: Path, text: str, name: str = "my-exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL_YAML = "task: text-classification\nbackbone:\n  name: minilm-l6\ndata:\n  train: reviews.csv\n"

# ---------------------------------------------------------------------------------------------------------------
# Built-in recipes.

BUILTIN = list_recipes()


def test_builtin_recipes_are_discovered_by_globbing():
    names = [name for name, _ in BUILTIN]
    assert "text/minilm-bbc-news" in names
    assert sorted(p.resolve() for _, p in BUILTIN) == sorted(p.resolve() for p in RECIPES_DIR.rglob("*.yaml"))
    for name, path in BUILTIN:
        assert path.suffix == ".yaml"
        assert name == path.relative_to(RECIPES_DIR).with_suffix("").as_posix()


@pytest.mark.parametrize("name, path", BUILTIN, ids=[name for name, _ in BUILTIN])
def test_builtin_recipe_loads_and_validates(name, path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert recipe.task in TASKS
    assert recipe.eval.metrics and set(recipe.eval.metrics) <= set(metrics_for(recipe.head.problem))
    assert recipe.eval.select_best in [*recipe.eval.metrics, "loss"]
    assert recipe.output.dir
    assert isinstance(recipe.train.lr, float) and recipe.train.lr > 0
    assert load_recipe(find_recipe(name)) == recipe  # the built-in name resolves to the same file


def test_bbc_news_recipe_values():
    recipe = load_recipe(find_recipe("text/minilm-bbc-news"))
    assert recipe.backbone.name == "minilm-l6"
    assert recipe.data.train == "bbc-news"
    assert recipe.data.max_samples is None  # the quickstart trains on all of train
    assert recipe.train.lr == pytest.approx(1e-4) and isinstance(recipe.train.lr, float)
    assert recipe.train.head_lr == pytest.approx(1e-3)
    assert recipe.eval.metrics == ["accuracy", "f1_macro"]
    assert recipe.eval.select_best == "accuracy"
    assert Path(recipe.output.dir) == Path("runs/minilm-bbc-news")
    # keys the file leaves out come from the schema
    assert recipe.train.scheduler == Train.scheduler
    assert recipe.train.seed == Train.seed
    assert recipe.lora is None


# ---------------------------------------------------------------------------------------------------------------
# Defaults.


def test_defaults_come_from_the_schema():
    recipe = from_dict(raw())
    assert recipe.backbone == Backbone(name="minilm-l6")
    assert recipe.head == Head()
    assert recipe.data == Data(train="reviews.csv")
    assert recipe.train == Train()
    assert recipe.hub == Hub()
    assert recipe.lora is None
    # the documented defaults (DESIGN.md)
    assert recipe.train.lr == 5e-5 and recipe.train.epochs == 3 and recipe.train.batch_size == 32
    assert recipe.train.scheduler == "cosine" and recipe.train.warmup == 0.1 and recipe.train.seed == 42
    assert recipe.data.val_fraction == 0.1 and recipe.data.max_length == 256 and recipe.data.validation is None
    assert recipe.head.problem == "single_label" and recipe.head.type == "linear" and recipe.head.pooling == "auto"
    assert recipe.backbone.pretrained is True and recipe.hub.private is True


def test_default_containers_are_not_shared_between_recipes():
    first, second = from_dict(raw()), from_dict(raw())
    first.head.hidden.append(64)
    first.eval.metrics.append("f1_micro")
    first.train.lr = 1.0
    assert second.head.hidden == []
    assert second.eval.metrics == DEFAULT_METRICS["single_label"]
    assert DEFAULT_METRICS["single_label"] == ["accuracy", "f1_macro"]
    assert second.train.lr == 5e-5


def test_required_keys_are_reported_with_their_dotted_key():
    message = problem_of({"task": "text-classification", "backbone": {}, "data": {}})
    assert "backbone.name: required key is missing" in message
    assert "data.train: required key is missing" in message


def test_empty_recipe_file_reports_every_required_section(tmp_path):
    with pytest.raises(FinetuneError) as caught:
        load_recipe(write(tmp_path, ""))
    message = str(caught.value)
    for key in ("task", "backbone", "data"):
        assert f"{key}: required key is missing" in message


# ---------------------------------------------------------------------------------------------------------------
# Unknown keys.


@pytest.mark.parametrize(
    "sections, key, suggestion",
    [
        ({"trian": {"lr": 1e-4}}, "trian", "train"),
        ({"train": {"lrr": 1e-4}}, "train.lrr", "lr"),
        ({"backbone": {"name": "minilm-l6", "dropuot": 0.2}}, "backbone.dropuot", "dropout"),
        ({"data": {"train": "x.csv", "text_colum": "body"}}, "data.text_colum", "text_column"),
        ({"lora": {"rr": 4}}, "lora.rr", "r"),
    ],
)
def test_unknown_key_gives_did_you_mean_with_the_dotted_key(sections, key, suggestion):
    message = problem_of(raw(**sections))
    assert f"{key}: unknown key" in message
    # the hint names the field, either bare or dotted (train.lr)
    parent = key.rpartition(".")[0]
    assert f"did you mean '{suggestion}'" in message or f"did you mean '{parent}.{suggestion}'" in message


def test_unknown_key_without_a_close_match_lists_the_known_keys():
    message = problem_of(raw(train={"zzzzzz": 1}))
    assert "train.zzzzzz: unknown key" in message
    assert "epochs" in message and "batch_size" in message and "scheduler" in message


def test_unknown_key_in_an_override(tmp_path):
    with pytest.raises(FinetuneError) as caught:
        load_recipe(write(tmp_path, MINIMAL_YAML), ["train.lrr=3e-5"])
    assert "train.lrr: unknown key" in str(caught.value)
    assert "did you mean" in str(caught.value)


# ---------------------------------------------------------------------------------------------------------------
# Every problem at once.


def test_several_problems_are_reported_at_once_on_one_line():
    message = problem_of(
        raw(
            train={"lrr": 1e-4, "epochs": "three", "batch_size": True, "scheduler": "cosin"},
            head={"problem": "regresion"},
            data={"train": "x.csv", "max_length": "long"},
        )
    )
    assert "\n" not in message
    assert "6 problems" in message
    for key in ("train.lrr", "train.epochs", "train.batch_size", "train.scheduler", "head.problem", "data.max_length"):
        assert f"{key}:" in message, key


def test_several_value_problems_are_reported_at_once():
    message = problem_of(
        raw(train={"lr": -1.0, "epochs": 0, "grad_accum": 0}, data={"train": "x.csv", "val_fraction": 2.0})
    )
    assert "\n" not in message
    assert "4 problems" in message
    assert "train.lr: must be > 0, got -1.0" in message
    assert "train.epochs: must be at least 1, got 0" in message
    assert "train.grad_accum:" in message
    assert "data.val_fraction:" in message


def test_the_message_names_the_source_file(tmp_path):
    path = write(tmp_path, MINIMAL_YAML + "train:\n  epochs: 0\n")
    with pytest.raises(FinetuneError) as caught:
        load_recipe(path)
    assert str(caught.value).startswith(f"{path}: 1 problem: train.epochs")


def test_type_problems_and_value_problems_are_reported_together():
    message = problem_of(raw(train={"lrr": 1e-4, "epochs": 0}, data={"train": "x.csv", "val_fraction": 2.0}))
    assert "train.lrr: unknown key" in message
    assert "train.epochs: must be at least 1" in message
    assert "data.val_fraction:" in message


# ---------------------------------------------------------------------------------------------------------------
# Types.


@pytest.mark.parametrize(
    "sections, expected",
    [
        ({"train": {"epochs": "three"}}, "train.epochs: expected an integer, got a string ('three')"),
        ({"train": {"epochs": "3"}}, "train.epochs: expected an integer, got a string ('3')"),
        ({"train": {"batch_size": True}}, "train.batch_size: expected an integer, got true/false"),
        ({"train": {"epochs": 2.5}}, "train.epochs: expected an integer, got a number (2.5)"),
        ({"train": {"lr": "fast"}}, "train.lr: expected a number, got a string ('fast')"),
        ({"train": {"lr": False}}, "train.lr: expected a number, got true/false"),
        ({"backbone": {"name": "minilm-l6", "pretrained": "yes"}}, "backbone.pretrained: expected true/false"),
        ({"backbone": {"name": 7}}, "backbone.name: expected a string, got an integer (7)"),
        ({"head": {"type": "mlp", "hidden": [64, "x"]}}, "head.hidden[1]: expected an integer"),
        ({"head": {"hidden": 64}}, "head.hidden: expected a list, got an integer (64)"),
        ({"data": "reviews.csv"}, "data: expected a mapping of keys, got a string ('reviews.csv')"),
        ({"train": {"max_grad_norm": "none"}}, "train.max_grad_norm: expected a number, got a string ('none')"),
    ],
)
def test_wrong_types_are_rejected_with_the_dotted_key(sections, expected):
    assert expected in problem_of(raw(**sections))


def test_an_integer_is_accepted_for_a_float_and_becomes_a_float():
    recipe = from_dict(raw(train={"lr": 1, "weight_decay": 0}))
    assert recipe.train.lr == 1.0 and type(recipe.train.lr) is float
    assert type(recipe.train.weight_decay) is float


def test_optional_keys_accept_null():
    recipe = from_dict(raw(train={"max_grad_norm": None, "head_lr": None}, backbone={"dropout": None}))
    assert recipe.train.max_grad_norm is None and recipe.train.head_lr is None and recipe.backbone.dropout is None


@pytest.mark.parametrize(
    "sections, key, bad, suggestion",
    [
        ({"train": {"scheduler": "cosin"}}, "train.scheduler", "cosin", "cosine"),
        ({"train": {"precision": "bf61"}}, "train.precision", "bf61", "bf16"),
        ({"head": {"problem": "multilabel"}}, "head.problem", "multilabel", "multi_label"),
        ({"task": "text-clasification"}, "task", "text-clasification", "text-classification"),
    ],
)
def test_literal_values_with_did_you_mean(sections, key, bad, suggestion):
    message = problem_of(raw(**sections))
    assert f"{key}: '{bad}' is not one of" in message
    assert f"did you mean '{suggestion}'" in message


def test_literal_override_with_did_you_mean(tmp_path):
    with pytest.raises(FinetuneError) as caught:
        load_recipe(write(tmp_path, MINIMAL_YAML), ["train.scheduler=cosin"])
    message = str(caught.value)
    assert "train.scheduler: 'cosin' is not one of cosine, linear, constant" in message
    assert "did you mean 'cosine'" in message


def test_literal_lists_the_options_when_nothing_is_close():
    message = problem_of(raw(train={"scheduler": "zzz"}))
    assert "train.scheduler: 'zzz' is not one of cosine, linear, constant" in message
    assert "did you mean" not in message


# ---------------------------------------------------------------------------------------------------------------
# Values.


def test_negative_lr_is_rejected_in_a_file_and_in_an_override(tmp_path):
    path = write(tmp_path, MINIMAL_YAML + "train:\n  lr: -1e-5\n")
    with pytest.raises(FinetuneError, match=r"train\.lr: must be > 0, got -1e-05"):
        load_recipe(path)
    with pytest.raises(FinetuneError, match=r"train\.lr: must be > 0"):
        load_recipe(write(tmp_path, MINIMAL_YAML, "ok.yaml"), ["train.lr=-3e-5"])
    with pytest.raises(FinetuneError, match=r"train\.lr: must be > 0, got 0.0"):
        from_dict(raw(train={"lr": 0}))


@pytest.mark.parametrize("value", ["5e-5", "5E-5", "5.0e-5", "0.00005", "+5e-5"])
def test_scientific_notation_is_a_float_in_a_file(tmp_path, value):
    recipe = load_recipe(write(tmp_path, MINIMAL_YAML + f"train:\n  lr: {value}\n"))
    assert type(recipe.train.lr) is float
    assert recipe.train.lr == pytest.approx(5e-5)


def test_plain_pyyaml_would_have_read_5e_5_as_a_string():
    # the reason for the recipe loader's own float resolver (YAML 1.1 wants "5.0e-5")
    assert yaml.safe_load("lr: 5e-5") == {"lr": "5e-5"}
    assert parse_yaml("lr: 5e-5", "test") == {"lr": 5e-5}


def test_scientific_notation_is_a_float_in_an_override(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL_YAML), ["train.lr=5e-5", "train.head_lr=1e-3"])
    assert type(recipe.train.lr) is float and recipe.train.lr == pytest.approx(5e-5)
    assert type(recipe.train.head_lr) is float and recipe.train.head_lr == pytest.approx(1e-3)


def test_yaml_keeps_ints_and_strings_as_they_were(tmp_path):
    parsed = parse_yaml("a: 100\nb: 1_000\nc: minilm-l6\nd: '5e-5'\ne: .5\nf: null\ng: true", "test")
    assert parsed == {"a": 100, "b": 1000, "c": "minilm-l6", "d": "5e-5", "e": 0.5, "f": None, "g": True}
    assert type(parsed["a"]) is int


@pytest.mark.parametrize(
    "value, expected, kind",
    [("100", 100, int), ("0", 0, int), ("0.1", 0.1, float), ("0.0", 0.0, float), ("0.25", 0.25, float)],
)
def test_warmup_int_is_steps_and_float_is_a_fraction(tmp_path, value, expected, kind):
    recipe = load_recipe(write(tmp_path, MINIMAL_YAML + f"train:\n  warmup: {value}\n"))
    assert recipe.train.warmup == expected
    assert type(recipe.train.warmup) is kind


def test_warmup_override_keeps_an_integer(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL_YAML), ["train.warmup=200"])
    assert recipe.train.warmup == 200 and type(recipe.train.warmup) is int


@pytest.mark.parametrize(
    "value, expected",
    [
        (1.0, "train.warmup: a fraction must be in [0, 1), got 1.0"),
        (1.5, "train.warmup: a fraction must be in [0, 1), got 1.5"),
        (-0.1, "train.warmup: a fraction must be in [0, 1)"),
        (-5, "train.warmup: steps must be >= 0, got -5"),
        (True, "train.warmup: expected an integer or a number, got true/false"),
        ("10%", "train.warmup: expected an integer or a number, got a string"),
    ],
)
def test_bad_warmup(value, expected):
    assert expected in problem_of(raw(train={"warmup": value}))


# ---------------------------------------------------------------------------------------------------------------
# Overrides.


def test_null_removes_a_section(tmp_path):
    path = write(tmp_path, MINIMAL_YAML + "train:\n  early_stopping:\n    patience: 4\n")
    assert load_recipe(path).train.early_stopping.patience == 4
    assert load_recipe(path, ["train.early_stopping=null"]).train.early_stopping is None


def test_dotted_override_creates_a_section_with_schema_defaults(tmp_path):
    for text in (MINIMAL_YAML, MINIMAL_YAML + "train:\n  ema: null\n"):
        recipe = load_recipe(write(tmp_path, text), ["train.ema.decay=0.99"])
        assert recipe.train.ema.decay == 0.99


def test_lora_section_takes_schema_defaults_and_null_removes_it(tmp_path):
    path = write(tmp_path, MINIMAL_YAML + "lora:\n  r: 16\n")
    lora = load_recipe(path).lora
    assert (lora.r, lora.alpha, lora.target_modules, lora.bias) == (16, 16, "auto", "none")
    assert load_recipe(path, ["lora=null"]).lora is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora.r=0"], "lora.r: must be at least 1"),
        (["lora.target_modules=qkv"], "lora.target_modules: expected auto or a list, got a string ('qkv')"),
        (["lora.r=4", "train.freeze=backbone"], "train.freeze: LoRA already freezes"),
        (["train.freeze=head"], "train.freeze: expected none or backbone or a mapping"),
        (["train.freeze.head_warmup=-1"], "train.freeze.head_warmup: must be >= 0"),
        (["train.freeze.head_warmup=1", "train.freeze.unfreeze_every=1"], "pick one"),
        (["train.layer_decay=1.5"], "train.layer_decay: must be in (0, 1]"),
        (["train.cache_features=true"], "train.cache_features: needs a frozen backbone"),
    ],
)
def test_transfer_learning_controls_are_checked(tmp_path, overrides, message):
    with pytest.raises(FinetuneError, match=re.escape(message)):
        load_recipe(write(tmp_path, MINIMAL_YAML), overrides)


def test_freeze_accepts_a_word_or_a_schedule(tmp_path):
    path = write(tmp_path, MINIMAL_YAML)
    assert load_recipe(path).train.freeze == "none"
    assert load_recipe(path, ["train.freeze=backbone"]).train.freeze == "backbone"
    schedule = load_recipe(path, ["train.freeze.unfreeze_every=2"]).train.freeze
    assert (schedule.head_warmup, schedule.unfreeze_every) == (0, 2)


def test_early_stopping_override_creates_it_and_metric_defaults_to_select_best(tmp_path):
    overrides = ["train.early_stopping.patience=5", "eval.select_best=f1_macro"]
    recipe = load_recipe(write(tmp_path, MINIMAL_YAML), overrides)
    assert recipe.train.early_stopping.patience == 5
    assert recipe.train.early_stopping.metric == "f1_macro"


def test_overrides_parse_as_yaml_scalars(tmp_path):
    recipe = load_recipe(
        write(tmp_path, MINIMAL_YAML),
        ["data.train=other.csv", "train.epochs=7", "backbone.pretrained=false", "eval.metrics=[f1_macro, accuracy]",
         "data.max_samples=null", "hub.repo_id=me/reviews-minilm"],
    )
    assert recipe.data.train == "other.csv"
    assert recipe.train.epochs == 7
    assert recipe.backbone.pretrained is False
    assert recipe.eval.metrics == ["f1_macro", "accuracy"]
    assert recipe.data.max_samples is None
    assert recipe.hub.repo_id == "me/reviews-minilm"


def test_later_overrides_win_and_the_file_is_not_changed(tmp_path):
    path = write(tmp_path, MINIMAL_YAML + "train:\n  epochs: 2\n")
    before = path.read_text()
    assert load_recipe(path, ["train.epochs=4", "train.epochs=6"]).train.epochs == 6
    assert path.read_text() == before
    assert load_recipe(path).train.epochs == 2


@pytest.mark.parametrize("item", ["train.lr", "=3e-5", "train..lr=1", ".lr=1", "train.=1"])
def test_malformed_override(item):
    with pytest.raises(FinetuneError, match="expected dotted.key=value"):
        apply_overrides({}, [item])


def test_apply_overrides_replaces_a_scalar_on_the_path():
    assert apply_overrides({"lora": None, "train": {"lr": 1.0}}, ["lora.r=4", "train.lr=2e-5"]) == {
        "lora": {"r": 4},
        "train": {"lr": 2e-5},
    }


# ---------------------------------------------------------------------------------------------------------------
# Unsafe and malformed YAML.


def test_python_tag_is_rejected_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = write(
        tmp_path,
        "task: text-classification\n"
        f"backbone: !!python/object/apply:os.system [\"touch {marker}\"]\n"
        "data:\n  train: reviews.csv\n",
    )
    with pytest.raises(FinetuneError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert str(path) in message
    assert "line 2" in message
    assert "python/object/apply" in message
    assert "\n" not in message
    assert not marker.exists()


def test_python_tag_in_an_override_is_rejected_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(FinetuneError, match="override"):
        load_recipe(write(tmp_path, MINIMAL_YAML), [f'train.lr=!!python/object/apply:os.system ["touch {marker}"]'])
    assert not marker.exists()


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, MINIMAL_YAML + "train:\n  lr: [1, 2\n")
    with pytest.raises(FinetuneError) as caught:
        load_recipe(path)
    assert str(caught.value).startswith(str(path))
    assert "line" in str(caught.value)


@pytest.mark.parametrize("text", ["- task\n- backbone\n", "just a string\n", "42\n"])
def test_non_mapping_yaml_is_rejected(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(FinetuneError) as caught:
        load_recipe(path)
    assert str(caught.value).startswith(str(path))
    assert "mapping" in str(caught.value)


def test_from_dict_of_a_non_mapping():
    with pytest.raises(FinetuneError, match="recipe: expected a mapping"):
        from_dict(["task", "backbone"])


def test_missing_file(tmp_path):
    with pytest.raises(FinetuneError, match="cannot read recipe"):
        load_recipe(tmp_path / "absent.yaml")


# ---------------------------------------------------------------------------------------------------------------
# Metrics in the recipe.


@pytest.mark.parametrize(
    "problem, first", [("single_label", "accuracy"), ("multi_label", "f1_micro"), ("regression", "rmse")]
)
def test_eval_metrics_default_per_problem(problem, first):
    recipe = from_dict(raw(head={"problem": problem}))
    assert recipe.eval.metrics == DEFAULT_METRICS[problem]
    assert recipe.eval.metrics[0] == first
    assert recipe.eval.select_best == first
    assert set(recipe.eval.metrics) <= set(metrics_for(problem))


def test_regression_gets_regression_metrics():
    metrics = from_dict(raw(head={"problem": "regression"})).eval.metrics
    assert "rmse" in metrics
    assert not {"accuracy", "f1_macro", "f1_micro"} & set(metrics)


def test_select_best_defaults_to_the_first_given_metric():
    recipe = from_dict(raw(eval={"metrics": ["f1_macro", "accuracy"]}))
    assert recipe.eval.select_best == "f1_macro"


def test_select_best_can_be_loss():
    assert from_dict(raw(eval={"select_best": "loss"})).eval.select_best == "loss"


def test_select_best_outside_the_metrics_is_rejected():
    message = problem_of(raw(eval={"metrics": ["accuracy"], "select_best": "f1_macro"}))
    assert "eval.select_best: 'f1_macro' is not in eval.metrics" in message


@pytest.mark.parametrize(
    "problem, metric",
    [("regression", "accuracy"), ("single_label", "rmse"), ("multi_label", "matthews"), ("single_label", "acuracy")],
)
def test_metric_not_valid_for_the_problem_is_rejected(problem, metric):
    message = problem_of(raw(head={"problem": problem}, eval={"metrics": [metric]}))
    assert f"eval.metrics: '{metric}' is" in message
    assert f"head.problem={problem}" in message
    for allowed in metrics_for(problem):  # the message says what to use instead
        assert allowed in message


def test_unknown_metric_gets_did_you_mean():
    message = problem_of(raw(eval={"metrics": ["acuracy"]}))
    assert "did you mean 'accuracy'" in message


def test_early_stopping_metric_must_be_evaluated():
    message = problem_of(raw(train={"early_stopping": {"metric": "rmse"}}))
    assert "train.early_stopping.metric: 'rmse' is not in eval.metrics" in message


# ---------------------------------------------------------------------------------------------------------------
# Output directory.


def test_output_dir_defaults_to_runs_and_the_recipe_stem(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL_YAML, "my-exp.yaml"))
    assert Path(recipe.output.dir) == Path("runs") / "my-exp"


def test_output_dir_given_is_kept(tmp_path):
    path = write(tmp_path, MINIMAL_YAML + "output:\n  dir: somewhere/else\n", "my-exp.yaml")
    assert load_recipe(path).output.dir == "somewhere/else"
    assert load_recipe(path, ["output.dir=override"]).output.dir == "override"


# ---------------------------------------------------------------------------------------------------------------
# Round trips.

RICH = raw(
    backbone={"dropout": None, "pretrained": False},
    head={"type": "mlp", "hidden": [128, 64], "pooling": "mean", "problem": "multi_label", "threshold": 0.3},
    data={"train": "t.csv", "validation": "v.csv", "max_samples": 100, "label_column": "tags"},
    train={"lr": 5e-5, "warmup": 100, "scheduler": "linear", "early_stopping": {"patience": 3}, "max_grad_norm": None,
           "ema": {"decay": 0.99}},
    eval={"metrics": ["f1_macro", "f1_micro"]},
    output={"dir": "runs/rich"},
    hub={"repo_id": "me/rich", "private": False},
)


@pytest.mark.parametrize(
    "recipe",
    [from_dict(raw()), from_dict(RICH), *(load_recipe(p) for _, p in BUILTIN)],
    ids=["minimal", "rich", *(name for name, _ in BUILTIN)],
)
def test_to_yaml_round_trips(recipe):
    text = to_yaml(recipe)
    again = from_dict(parse_yaml(text, "printed"))
    assert to_dict(again) == to_dict(recipe)
    assert again == recipe
    assert type(again.train.warmup) is type(recipe.train.warmup)


def test_to_yaml_round_trips_through_a_file(tmp_path):
    recipe = from_dict(RICH)
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(recipe))
    assert load_recipe(path) == recipe


def test_to_yaml_is_plain_data_in_schema_order():
    text = to_yaml(from_dict(RICH))
    assert "!!" not in text  # no python tags: a safe loader reads it
    assert list(yaml.safe_load(text)) == [f.name for f in dataclasses.fields(Recipe)]


def test_to_yaml_quotes_strings_the_recipe_loader_reads_as_numbers():
    recipe = from_dict(raw(data={"train": "x.csv", "text_column": "1e5", "label_column": "2E-3"}))
    again = from_dict(parse_yaml(to_yaml(recipe), "printed"))
    assert again.data.text_column == "1e5"
    assert again.data.label_column == "2E-3"


def test_eval_defaults_written_out_stay_the_same_after_reload():
    recipe = from_dict(raw(head={"problem": "regression"}))
    again = from_dict(parse_yaml(to_yaml(recipe), "printed"))
    assert again.eval == Eval(metrics=DEFAULT_METRICS["regression"], select_best="rmse")


# ---------------------------------------------------------------------------------------------------------------
# Finding recipes.


def test_find_recipe_by_builtin_name():
    path = find_recipe("text/minilm-bbc-news")
    assert path.resolve() == (RECIPES_DIR / "text" / "minilm-bbc-news.yaml").resolve()
    assert find_recipe("text/minilm-bbc-news.yaml").resolve() == path.resolve()


def test_find_recipe_by_path(tmp_path):
    path = write(tmp_path, MINIMAL_YAML, "mine.yaml")
    assert find_recipe(str(path)) == path


def test_find_recipe_near_miss_suggests_the_builtin_name():
    for near_miss in ("text/minilm-bbc-new", "minilm-bbc-news", "text/minilm_bbc_news"):
        with pytest.raises(FinetuneError) as caught:
            find_recipe(near_miss)
        message = str(caught.value)
        assert message.startswith(near_miss)
        assert "did you mean 'text/minilm-bbc-news'" in message


def test_find_recipe_without_a_close_name():
    with pytest.raises(FinetuneError) as caught:
        find_recipe("zzzzzzzz")
    assert "did you mean" not in str(caught.value)
    assert "finetune ls" in str(caught.value)


def test_find_recipe_of_a_directory(tmp_path):
    with pytest.raises(FinetuneError, match="is a directory"):
        find_recipe(str(tmp_path))
