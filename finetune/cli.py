"""The command line: `finetune ls | cp | validate | run`; bad input is one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from finetune import __version__
from finetune.errors import FinetuneError
from finetune.recipe import find_recipe, list_recipes, load_recipe, to_yaml

EXIT_BAD_INPUT = 2


def _summary(path: Path) -> str:
    """One line per recipe: task, backbone, data (read from the file, without validating it)."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text()) or {}
        return f"{raw.get('task', '?'):22} {raw.get('backbone', {}).get('name', '?'):20} {raw.get('data', {}).get('train', '?')}"
    except (yaml.YAMLError, AttributeError, OSError):
        return "(unreadable)"


def cmd_ls(args) -> int:
    recipes = list_recipes()
    width = max((len(name) for name, _ in recipes), default=10)
    print(f"{'recipe':{width}}  {'task':22} {'backbone':20} data")
    for name, path in recipes:
        print(f"{name:{width}}  {_summary(path)}")
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


def cmd_validate(args) -> int:
    recipe = load_recipe(find_recipe(args.recipe), args.overrides)
    if recipe.task == "image-classification":
        from finetune.images import load_image_splits as load_splits
    else:
        from finetune.data import load_splits
    splits = load_splits(recipe)  # files, columns, labels: what `run` would trip on, without loading a model
    print(to_yaml(recipe), end="")
    counts = ", ".join(f"{key} {part['count']}" for key, part in splits.info["splits"].items())
    print(f"{args.recipe}: recipe and data are valid ({counts} rows)", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    recipe = load_recipe(find_recipe(args.recipe), args.overrides)  # before importing torch: typos report fast
    from finetune.train import train

    if _is_main_process():
        print(to_yaml(recipe), end="")
    train(recipe, overwrite=args.overwrite)
    return 0


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _quiet_libraries(debug: bool) -> None:
    """transformers 5 prints a load report and progress bars per model load; keep our output readable."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if debug:
        return
    import warnings

    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + error
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="finetune", description="Fine-tune pretrained backbones from a YAML recipe.")
    parser.add_argument("--version", action="version", version=f"finetune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{ls,cp,validate,run}", parser_class=_Parser)

    verbs.add_parser("ls", help="list the built-in recipes").set_defaults(func=cmd_ls)

    cp = verbs.add_parser("cp", help="copy a built-in recipe to edit")
    cp.add_argument("recipe", help="built-in recipe name (see `finetune ls`) or a recipe file")
    cp.add_argument("dest", help="file or folder to copy to")
    cp.add_argument("--force", action="store_true", help="replace an existing file")
    cp.set_defaults(func=cmd_cp)

    for name, func, text in (("validate", cmd_validate, "check a recipe and print it resolved"), ("run", cmd_run, "train")):
        verb = verbs.add_parser(name, help=text)
        verb.add_argument("recipe", help="recipe file or built-in recipe name")
        verb.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-5")
        if name == "run":
            verb.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
        verb.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        verb.set_defaults(func=func)
    return parser


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries(args.debug)
    try:
        return args.func(args)
    except FinetuneError as error:
        if args.debug:
            raise
        print(f"finetune: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("finetune: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug or an environment failure: still one line, the traceback on --debug
        if args.debug:
            raise
        print(f"finetune: internal error: {error.__class__.__name__}: {_one_line(error)} (rerun with --debug)", file=sys.stderr)
        return 1
