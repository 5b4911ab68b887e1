"""The command line: `finetune ls | cp | validate | run | eval | predict | push`; bad input is one line on stderr
and exit 2."""

from __future__ import annotations

import argparse
import json
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
    if args.folder is not None:
        return _list_runs(Path(args.folder), args.json)
    recipes = list_recipes()
    width = max((len(name) for name, _ in recipes), default=10)
    print(f"{'recipe':{width}}  {'task':22} {'backbone':20} data")
    for name, path in recipes:
        print(f"{name:{width}}  {_summary(path)}")
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


def cmd_validate(args) -> int:
    recipe = load_recipe(find_recipe(args.recipe), args.overrides)
    from finetune.checks import check_data

    # files, columns, labels, leakage, token lengths, backbone, output folder: what `run` checks, without a model
    report = check_data(recipe)
    print(to_yaml(recipe), end="")  # stdout stays the resolved recipe, so it can be piped into a file
    print(report.table(), file=sys.stderr)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    counts = ", ".join(f"{key} {summary.rows}" for key, summary in report.splits.items())
    print(f"{args.recipe}: recipe and data are valid ({counts} rows)", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    source = Path(args.recipe)
    if source.is_dir() and (source / "config.yaml").is_file():  # a run folder: its own resolved recipe
        source = source / "config.yaml"
    recipe = load_recipe(find_recipe(str(source)), args.overrides)  # before importing torch: typos report fast
    from finetune.train import train

    if _is_main_process():
        print(to_yaml(recipe), end="")
    train(recipe, overwrite=args.overwrite, resume=args.resume)
    return 0


def cmd_eval(args) -> int:
    from finetune.evaluate import evaluate

    report = evaluate(
        args.model, args.data, split=args.split, text_column=args.text_column, label_column=args.label_column,
        image_column=args.image_column, batch_size=args.batch_size, output=args.output,
    )
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        width = max(map(len, report["metrics"]))
        for name, value in report["metrics"].items():
            print(f"{name:{width}}  {value:.4f}")
        _print_confusion(report.get("confusion"))
    where = f"; predictions in {args.output}" if args.output else ""
    print(f"{args.model} on {args.data}: {report['rows']} rows{where}", file=sys.stderr)
    return 0


def _print_confusion(confusion: dict | None) -> None:
    if not confusion or len(confusion["labels"]) > 20:
        return
    labels = confusion["labels"]
    width = max(8, *map(len, labels))
    print(f"\nconfusion (rows: true, columns: predicted)\n{'':{width}}  " + "  ".join(f"{n:>{width}}" for n in labels))
    for name, row in zip(labels, confusion["matrix"]):
        print(f"{name:{width}}  " + "  ".join(f"{v:>{width}}" for v in row))


def cmd_predict(args) -> int:
    from finetune.predict import default_column, expand_inputs, load

    if args.top_k is not None and args.top_k < 1:
        raise FinetuneError(f"--top-k: must be at least 1, got {args.top_k}")
    predictor = load(args.model)
    inputs = expand_inputs(args.inputs, predictor.task, args.column or default_column(predictor))
    if not inputs:
        raise FinetuneError("predict: the inputs hold nothing to predict on (empty files?)")
    results = predictor.predict([entry for _, entry in inputs], top_k=args.top_k, batch_size=args.batch_size)
    if args.json:
        print(json.dumps([{"input": shown, **result} for (shown, _), result in zip(inputs, results)], indent=1))
        return 0
    for (shown, _), result in zip(inputs, results):
        print(f"{_clip(shown, 60):60}  {_describe_prediction(result, args.top_k)}")
    return 0


def cmd_export(args) -> int:
    from finetune.onnx_export import export

    info = export(args.model, output=args.output, quantize=args.quantize)
    parity = info["parity"]
    agreement = "" if parity.get("agreement") is None else f", labels agree {parity['agreement']:.1%}"
    print(f"{info['path']}: {info['bytes'] / 1e6:.1f} MB, max abs logit diff {parity['max_abs_logit_diff']:.2e}"
          f"{agreement}", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from finetune.serve import serve

    return serve(args.model, host=args.host, port=args.port, api_key_env=args.api_key_env, max_batch=args.max_batch,
                 max_wait_ms=args.max_wait_ms, max_inputs=args.max_inputs, max_body_mb=args.max_body_mb)


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _describe_prediction(result: dict, top_k: int | None) -> str:
    if "value" in result:
        return f"{result['value']:.6g}"
    if "label" in result:
        ranked = result["scores"][: top_k or 1]
    elif top_k is not None:
        ranked = result["scores"][:top_k]
    else:  # multi-label: every label over the threshold
        chosen = set(result["labels"])
        ranked = [item for item in result["scores"] if item["label"] in chosen]
        if not ranked:
            return "(no label over the threshold)"
    return "  ".join(f"{item['label']} {item['score']:.3f}" for item in ranked)


def cmd_push(args) -> int:
    from finetune.hub import push_run

    run = Path(args.run)
    url = push_run(run, args.repo_id, private=args.private, revision=args.revision)
    print(url)
    print(f"pushed {run / 'model'} to {args.repo_id}", file=sys.stderr)
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
    verbs = parser.add_subparsers(
        dest="verb", required=True, metavar="{ls,cp,validate,run,eval,predict,push}", parser_class=_Parser
    )

    ls = verbs.add_parser("ls", help="list the built-in recipes, or the runs in a folder")
    ls.add_argument("folder", nargs="?", help="a folder of runs (e.g. runs/): compare them in one table")
    ls.add_argument("--json", action="store_true", help="runs as JSON")
    ls.set_defaults(func=cmd_ls)

    cp = verbs.add_parser("cp", help="copy a built-in recipe to edit")
    cp.add_argument("recipe", help="built-in recipe name (see `finetune ls`) or a recipe file")
    cp.add_argument("dest", help="file or folder to copy to")
    cp.add_argument("--force", action="store_true", help="replace an existing file")
    cp.set_defaults(func=cmd_cp)

    for name, func, text in (("validate", cmd_validate, "check a recipe and print it resolved"), ("run", cmd_run, "train")):
        verb = verbs.add_parser(name, help=text)
        verb.add_argument("recipe", help="recipe file, built-in recipe name, or (run) a run folder to --resume")
        verb.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-5")
        if name == "run":
            verb.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
            verb.add_argument(
                "--resume", action="store_true", help="continue the unfinished run in output.dir from its last checkpoint"
            )
        verb.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        verb.set_defaults(func=func)

    model_help = "a run folder, its model/ folder, or a hub model id (owner/name)"
    evaluate = verbs.add_parser("eval", help="metrics of a trained model on a labelled file")
    evaluate.add_argument("model", help=model_help)
    evaluate.add_argument("--data", required=True, help="labelled data in any form `run` reads (file, folder, zoo, hub:)")
    evaluate.add_argument("--split", default="test", help="which split of a zoo/hub set or split folder (default test)")
    evaluate.add_argument("--output", help="write per-row predictions to a .csv or .jsonl file")
    evaluate.add_argument("--text-column", help="default: the run's data.text_column, else text")
    evaluate.add_argument("--label-column", help="default: the run's data.label_column, else label")
    evaluate.add_argument("--image-column", help="default: the run's data.image_column, else image")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--json", action="store_true", help="the metrics (and confusion matrix) as JSON")
    evaluate.set_defaults(func=cmd_eval)

    predict = verbs.add_parser("predict", help="label names and scores for texts or images")
    predict.add_argument("model", help=model_help)
    predict.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help="texts, .txt files (one text per line), images, image folders, or csv/jsonl/parquet files (see --column)",
    )
    predict.add_argument("--top-k", type=int, help="show the K best labels (default: the best one; multi-label: all "
                                                  "over the threshold)")
    predict.add_argument("--column", help="the table column holding the inputs (default: the run's text/image column)")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--json", action="store_true", help="one JSON object per input")
    predict.set_defaults(func=cmd_predict)

    export = verbs.add_parser("export", help="an ONNX folder (fp32 or int8) that onnxruntime serves alone")
    export.add_argument("model", help="a run folder or its model/ folder")
    export.add_argument("--format", choices=["onnx"], default="onnx")
    export.add_argument("--quantize", choices=["int8"], help="int8 weights (parity and test metric measured)")
    export.add_argument("--output", help="default: <run>/export/onnx[-int8]/")
    export.set_defaults(func=cmd_export)

    serve = verbs.add_parser("serve", help="an HTTP JSON endpoint for a model (or an ONNX export)")
    serve.add_argument("model", help=model_help + ", or an ONNX export folder")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key-env", help="require Authorization: Bearer <the value of this variable>")
    serve.add_argument("--max-batch", type=int, default=32, help="inputs per model call across requests")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    serve.add_argument("--max-inputs", type=int, default=256, help="inputs one request may send")
    serve.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body")
    serve.set_defaults(func=cmd_serve)

    push = verbs.add_parser("push", help="upload a run's model/ (and adapter/) with its card to the hub")
    push.add_argument("run", help="a run folder")
    push.add_argument("--repo-id", required=True, help="owner/name of the model repo (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo private (an existing one keeps its setting)")
    push.add_argument("--revision", help="a branch to push to (created if missing); default main")
    push.set_defaults(func=cmd_push)

    for verb in (evaluate, predict, export, serve, push):
        verb.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
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
