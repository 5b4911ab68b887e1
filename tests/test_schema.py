"""The recipe's JSON Schema: made from the typed schema (one source), shipped beside the built-in recipes (which
name it), every built-in recipe valid against it, and bad recipes refused by a JSON Schema validator as by `run`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import call_main
from jsonschema import Draft202012Validator

from finetune.errors import FinetuneError
from finetune.recipe import RECIPES_DIR, from_dict, list_recipes, parse_yaml
from finetune.schema import MODELINE, SCHEMA_FILE, field_comments, recipe_schema, reference_markdown

MINIMAL = {"task": "text-classification", "backbone": {"name": "minilm-l6"}, "data": {"train": "reviews.csv"}}


@pytest.fixture(scope="module")
def validator():
    schema = recipe_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def test_the_shipped_schema_is_the_one_the_code_makes():
    """`finetune schema --output recipes/recipe.schema.json` after a change to the recipe's schema."""
    assert json.loads((RECIPES_DIR / SCHEMA_FILE).read_text()) == recipe_schema()


@pytest.mark.parametrize("name", [name for name, _ in list_recipes()])
def test_every_built_in_recipe_names_the_schema_and_is_valid_against_it(name, validator):
    path = RECIPES_DIR / f"{name}.yaml"
    text = path.read_text()
    assert text.splitlines()[0] == f"{MODELINE}../{SCHEMA_FILE}"
    assert (path.parent / f"../{SCHEMA_FILE}").resolve().is_file()
    errors = [error.message for error in validator.iter_errors(parse_yaml(text, str(path)))]
    assert errors == []


@pytest.mark.parametrize(("change", "kind"), [
    (lambda r: r["train"].update(learning_rate=3e-5), "additionalProperties"),
    (lambda r: r["head"].update(pooling="max"), "enum"),
    (lambda r: r["train"].update(epochs="three"), "type"),
    (lambda r: r["backbone"].pop("name"), "required"),
    (lambda r: r["train"].update(freeze={"head_warmup": 1, "unfreeze_evry": 2}), "anyOf"),
    (lambda r: r.update(lora={"r": "eight"}), "anyOf"),
])
def test_a_bad_recipe_is_refused_by_the_schema_as_by_run(change, kind, validator):
    raw = copy.deepcopy(MINIMAL) | {"train": {}, "head": {}}
    assert list(validator.iter_errors(raw)) == []
    change(raw)
    errors = list(validator.iter_errors(raw))
    assert [error.validator for error in errors] == [kind]
    with pytest.raises(FinetuneError):  # the kit's own check agrees
        from_dict(raw)


def test_the_keys_carry_their_types_defaults_and_help(validator):
    train = recipe_schema()["properties"]["train"]["properties"]
    assert train["lr"]["type"] == "number" and train["lr"]["default"] == 5e-5
    assert train["scheduler"]["enum"] and train["scheduler"]["default"] in train["scheduler"]["enum"]
    assert "fraction of steps" in train["warmup"]["description"]  # the field's comment in finetune/recipe_schema.py
    assert recipe_schema()["properties"]["head"]["properties"]["problem"]["description"].startswith("tags:")


def test_a_comment_above_a_field_belongs_to_it_and_to_no_other():
    class Example:
        # the first key's help
        first: int = 1
        second: int = 2  # the second's
        third: int = 3

    assert field_comments(Example) == {"first": "the first key's help", "second": "the second's"}


def test_finetune_schema_prints_it_or_writes_it(capfd, tmp_path):
    result = call_main(capfd, "schema")
    assert result.returncode == 0 and json.loads(result.stdout) == recipe_schema()
    assert call_main(capfd, "schema", "--output", tmp_path / "s.json").returncode == 0
    assert json.loads((tmp_path / "s.json").read_text()) == recipe_schema()


def _keys(section: dict, prefix: str = ""):
    """Every key of the schema, sections inside optional sections included: (dotted name, its entry)."""
    for key, entry in section["properties"].items():
        yield prefix + key, entry
        for option in [entry, *entry.get("anyOf", [])]:
            if option.get("type") == "object" and "properties" in option:
                yield from _keys(option, f"{prefix}{key}.")


def test_every_key_has_a_description():
    """A new key needs its field comment in finetune/recipe_schema.py: its help in editors and the reference."""
    keys = dict(_keys(recipe_schema()))
    assert len(keys) > 100 and "train.freeze.head_warmup" in keys and "sweep.seed" in keys
    assert [name for name, entry in keys.items() if not entry.get("description")] == []


def test_the_reference_page_is_the_one_the_schema_makes():
    """`python scripts/make_reference.py` after a change to a key, its default or its comment."""
    page = Path(__file__).resolve().parents[1] / "docs" / "reference.md"
    assert page.read_text() == reference_markdown()


def test_the_reference_page_lists_every_key_with_its_default():
    page = reference_markdown()
    for name, entry in _keys(recipe_schema()):
        assert f"- **`{name}`** (" in page
    assert "- **`train.lr`** (number; default `5e-05`): peak learning rate" in page
    assert "- **`backbone.name`** (string; required)" in page
    assert "hub:&lt;id&gt;" in page  # help text is escaped, not read as HTML
