"""The verbs that read recipes and run folders without training: ls, report, cat, cp and schema."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.recipe import find_recipe, list_recipes


def _recipe_row(name: str, path: Path) -> dict:
    """One built-in recipe: task, backbone, data and what it needs beyond pip (read from the file, not validated)."""
    import yaml

    from finetune.needs import recipe_needs

    try:
        raw = yaml.safe_load(path.read_text()) or {}
        backbone, data = raw.get("backbone") or {}, raw.get("data") or {}
        return {
            "name": name, "path": str(path), "task": raw.get("task", "?"), "backbone": backbone.get("name", "?"),
            "data": data.get("train", "?"), "needs": recipe_needs(raw),
        }
    except (yaml.YAMLError, AttributeError, OSError):
        return {"name": name, "path": str(path), "task": "(unreadable)", "backbone": "", "data": "", "needs": []}


def cmd_ls(args) -> int:
    if args.folder is not None:
        return _list_runs(Path(args.folder), args.json)
    rows = [_recipe_row(name, path) for name, path in list_recipes()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max((len(row["name"]) for row in rows), default=10)
    print(f"{'recipe':{width}}  {'task':22} {'backbone':20} {'data':45} needs")
    for row in rows:
        needs = ", ".join(row["needs"]) or "-"
        print(f"{row['name']:{width}}  {row['task']:22} {row['backbone']:20} {row['data']:45} {needs}")
    return 0


def cmd_report(args) -> int:
    from finetune.report import write_runs_page

    print(write_runs_page(Path(args.folder), args.output))
    return 0


def cmd_cat(args) -> int:
    sys.stdout.write(find_recipe(args.recipe).read_text(encoding="utf-8"))
    return 0


def _list_runs(folder: Path, as_json: bool) -> int:
    from finetune.runs import find_runs, format_runs, run_summary

    rows = [run_summary(run, folder) for run in find_runs(folder)]
    if as_json:
        print(json.dumps(rows, indent=1))
    elif rows:
        print(format_runs(rows))
    else:
        print(f"{folder}: no runs (folders with a config.yaml) in it", file=sys.stderr)
    return 0


def cmd_cp(args) -> int:
    source = find_recipe(args.recipe)
    target = Path(args.dest)
    if target.is_dir():
        target = target / source.name
    if target.exists() and not args.force:
        raise FinetuneError(f"{target}: already exists; pass --force to replace it or pick another name")
    shutil.copyfile(source, target)
    print(f"copied {source} to {target}")
    return 0


def cmd_schema(args) -> int:
    from finetune.schema import recipe_schema

    text = json.dumps(recipe_schema(), indent=1) + "\n"
    if args.output is None:
        sys.stdout.write(text)
        return 0
    Path(args.output).write_text(text, encoding="utf-8")
    print(f"recipe schema written to {args.output}")
    return 0
