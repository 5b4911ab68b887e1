"""The recipe's JSON Schema, made from the typed schema in `finetune.recipe`: types, defaults, enums, and the field
comments as descriptions (one source), for editors that complete and check YAML (`finetune schema`)."""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import tokenize
import types
import typing
from typing import Any, Literal, Union

SCHEMA_FILE = "recipe.schema.json"  # beside the built-in recipes, which name it in their first line
MODELINE = "# yaml-language-server: $schema="
SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean"}


def recipe_schema() -> dict:
    """The whole recipe as a JSON Schema (draft 2020-12)."""
    from finetune.recipe import Recipe

    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "finetune recipe"}
    return schema | section_schema(Recipe)


def section_schema(cls: type) -> dict:
    """One dataclass of the schema: its keys (no others), the required ones, and each key's type and help."""
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    properties, required = {}, []
    for field in dataclasses.fields(cls):
        entry = type_schema(hints[field.name])
        default = _json_default(field)
        if default is not dataclasses.MISSING:
            entry["default"] = default
        else:
            required.append(field.name)
        if comments.get(field.name):
            entry["description"] = comments[field.name]
        properties[field.name] = entry
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):  # dataclasses write a signature as the doc
        schema["description"] = " ".join(cls.__doc__.split())
    return schema | ({"required": required} if required else {})


def type_schema(kind: Any) -> dict:
    """A type hint of the schema as JSON Schema: scalars, Literal enums, lists, mappings, unions, sections."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind in SCALARS:
        # YAML writes 1 for 1.0: a float key takes integers too (JSON Schema's number does)
        return {"type": SCALARS[kind]}
    if kind is type(None):
        return {"type": "null"}
    if kind is Any:
        return {}
    if dataclasses.is_dataclass(kind):
        return section_schema(kind)
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (Union, types.UnionType):
        return {"anyOf": [type_schema(arg) for arg in args]}
    if origin is list:
        return {"type": "array", "items": type_schema(args[0])} if args else {"type": "array"}
    if origin is dict or kind is dict:
        return {"type": "object", "additionalProperties": type_schema(args[1]) if args else {}}
    raise TypeError(f"no JSON Schema for {kind!r}")


def _json_default(field: dataclasses.Field):
    """The field's default as JSON holds it; MISSING for a required key."""
    from finetune.recipe import field_default

    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
        return dataclasses.MISSING
    value = field_default(field)
    return json.loads(json.dumps(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value))


def field_comments(cls: type) -> dict[str, str]:
    """key -> its help in the class's source: the full-line comments just above the field, then the comment after it
    on its own line (the recipe's schema documents itself this way)."""
    source = inspect.getsource(cls)
    comments = {token.start[0]: token for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT}
    lines, found = source.splitlines(), {}
    for number, line in enumerate(lines, start=1):
        name = line.split(":", 1)[0].strip()
        if not name.isidentifier() or line.lstrip().startswith(("#", "def ", "class ", "@")):
            continue
        help_lines, above = [], number - 1
        while above in comments and not lines[above - 1][:comments[above].start[1]].strip():
            help_lines.insert(0, comments[above].string.lstrip("#").strip())
            above -= 1
        if number in comments:
            help_lines.append(comments[number].string.lstrip("#").strip())
        if help_lines:
            found[name] = " ".join(help_lines)
    return found


# ---------------------------------------------------------------------------------------------------------------
# The recipe reference page (docs/reference.md), written from the same JSON Schema: keys, types, defaults and help.

REFERENCE_HEAD = """# Recipe reference

<!-- Made by `python scripts/make_reference.py` from finetune/recipe_schema.py's comments; do not edit by hand. -->

Every key of a recipe, by section: its type, its default (a key without one is required) and what it does. The
same text is the help an editor shows from `finetune schema`. Dotted keys are what overrides take
(`finetune run my.yaml train.lr=3e-5`).
"""


def reference_markdown() -> str:
    """docs/reference.md: one list per section of the recipe, made from `recipe_schema()`."""
    schema = recipe_schema()
    lines = [REFERENCE_HEAD]
    top = []
    for key, entry in schema["properties"].items():
        section = _section_of(entry)
        top.append(_key_line(key, entry, schema.get("required", ())))
        if section is not None:
            lines += _section_lines(key, section, entry)
    return "\n".join(["\n".join(lines[:1]), "## Sections\n", *top, "", *lines[1:]]).rstrip() + "\n"


def _section_lines(path: str, section: dict, entry: dict) -> list[str]:
    """A section's heading, its help, its keys, then its own sub-sections under dotted headings."""
    lines = [f"## `{path}`\n"]
    if entry.get("description") or section.get("description"):
        lines.append((entry.get("description") or section["description"]) + "\n")
    nested = []
    for key, sub in section["properties"].items():
        lines.append(_key_line(f"{path}.{key}", sub, section.get("required", ())))
        if _section_of(sub) is not None:
            nested.append((f"{path}.{key}", _section_of(sub), sub))
    lines.append("")
    for sub_path, sub_section, sub in nested:
        lines += _section_lines(sub_path, sub_section, sub)
    return lines


def _section_of(entry: dict) -> dict | None:
    """The section schema inside a key's entry (a section, or a section or null), else None."""
    for option in [entry, *entry.get("anyOf", [])]:
        if option.get("type") == "object" and "properties" in option:
            return option
    return None


def _key_line(path: str, entry: dict, required) -> str:
    """One key: its dotted name, type, default (a section's defaults are its keys') and help."""
    name = path.rsplit(".", 1)[-1]
    default = "required" if name in required else f"default `{json.dumps(entry.get('default'))}`"
    if entry.get("type") == "object" and "properties" in entry and name not in required:
        default = "defaults below"  # a section's defaults are its keys' own
    # the help is plain text: < > and * would be read as HTML or emphasis
    help_text = entry.get("description", "").replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
    return f"- **`{path}`** ({_type_words(entry)}; {default}): {help_text}".rstrip(": ")


def _type_words(entry: dict) -> str:
    """A key's JSON Schema type in a few words: `a | b` for choices, `list of number`, `section`, `any`."""
    if "enum" in entry:
        return " | ".join(f"`{json.dumps(value)}`" for value in entry["enum"])
    if "anyOf" in entry:
        return " or ".join(_type_words(option) for option in entry["anyOf"])
    kind = entry.get("type")
    if kind == "object":
        return "section" if "properties" in entry else "mapping"
    if kind == "array":
        return f"list of {_type_words(entry['items'])}" if entry.get("items") else "list"
    return kind or "any"
