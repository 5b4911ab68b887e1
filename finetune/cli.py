"""The command line: `finetune ls | report | cat | cp | schema | validate | run | sweep | audit | curve | eval |
predict | explain | export | shrink | serve | push | cache`; bad input is one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from finetune import __version__, api
from finetune.cli_recipes import cmd_cat, cmd_cp, cmd_ls, cmd_report, cmd_schema
from finetune.curve import add_curve_verb
from finetune.errors import FinetuneError
from finetune.recipe import to_yaml
from finetune.shrink import SHRINK_HELP, shrink_verb

EXIT_BAD_INPUT = 2


def _need_recipe(args) -> None:
    if args.recipe is None:
        raise FinetuneError(
            f"{args.verb}: which recipe? give a recipe file or a built-in name, e.g. `finetune {args.verb} "
            "text/minilm-bbc-news`; `finetune ls` lists them, `finetune cp NAME my.yaml` copies one to edit"
        )


def cmd_validate(args) -> int:
    _need_recipe(args)
    recipe = api.resolve_recipe(args.recipe, args.overrides)
    report = api.validate(recipe)
    print(to_yaml(recipe), end="")  # stdout stays the resolved recipe, so it can be piped into a file
    print(report.table(), file=sys.stderr)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    counts = ", ".join(f"{key} {summary.rows}" for key, summary in report.splits.items())
    print(f"{args.recipe}: recipe and data are valid ({counts} rows)", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    _need_recipe(args)
    recipe = api.resolve_recipe(args.recipe, args.overrides)  # before importing torch: typos report fast
    if _is_main_process():
        print(to_yaml(recipe), end="")
    api.run(recipe, overwrite=args.overwrite, resume=args.resume)
    return 0


def cmd_sweep(args) -> int:
    from finetune.sweep.trials import sweep

    sweep(args.recipe, args.overrides, trials=args.trials, timeout=args.timeout, storage=args.storage,
          study=args.study, space=args.space)
    return 0


def cmd_audit(args) -> int:
    _need_recipe(args)
    from finetune.audit import audit

    recipe = api.resolve_recipe(args.recipe, args.overrides)

    audit(recipe, folds=args.folds, finetune=args.finetune, output=args.output, clean=args.clean)
    return 0


def cmd_eval(args) -> int:
    _keep_freed_memory()
    report = api.evaluate(
        args.model, args.data, split=args.split, text_column=args.text_column, label_column=args.label_column,
        image_column=args.image_column, batch_size=args.batch_size, output=args.output, pair_column=args.pair_column,
    ).report
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
    from finetune.predict import default_column, expand_inputs

    if args.top_k is not None and args.top_k < 1:
        raise FinetuneError(f"--top-k: must be at least 1, got {args.top_k}")
    _keep_freed_memory()
    predictor = api.load(args.model)
    pair_column = args.pair_column or (predictor.recipe.data.text_pair_column if predictor.recipe else None)
    inputs = expand_inputs(args.inputs, predictor.task, args.column or default_column(predictor), pair_column)
    if not inputs:
        raise FinetuneError("predict: the inputs hold nothing to predict on (empty files?)")
    level = args.confidence_set  # every label's score decoded, the set taken, then the scores cut to --top-k
    cutoff = None if level is None else predictor.confidence_cutoff(level, "--confidence-set")
    results = predictor.predict([entry for _, entry in inputs], top_k=args.top_k if cutoff is None else None,
                                batch_size=args.batch_size)
    if cutoff is not None:
        results = predictor.with_confidence_sets(results, cutoff, args.top_k)
    if args.json:
        for (shown, _), result in zip(inputs, results):  # JSON Lines: one object per input, in order
            print(json.dumps({"input": shown, **result}))
        return 0
    for (shown, _), result in zip(inputs, results):
        print(f"{_clip(shown, 60):60}  {_describe_prediction(result, args.top_k)}")
    return 0


def cmd_explain(args) -> int:
    from finetune.explain.api import explain_command

    return explain_command(args)


def cmd_export(args) -> int:
    from finetune.onnx_runtime import EXPORT_FILE

    _keep_freed_memory()
    folder = api.export(args.model, format=args.format, quantize=args.quantize, output=args.output)
    info = json.loads((folder / EXPORT_FILE).read_text(encoding="utf-8"))
    parity = info["parity"]
    agreement = "" if parity.get("agreement") is None else f", labels agree {parity['agreement']:.1%}"
    print(f"{folder}: {info['bytes'] / 1e6:.1f} MB, max abs logit diff {parity['max_abs_logit_diff']:.2e}"
          f"{agreement}", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from finetune.serve import serve

    _keep_freed_memory()
    return serve(args.model, host=args.host, port=args.port, api_key_env=args.api_key_env, max_batch=args.max_batch,
                 max_wait_ms=args.max_wait_ms, max_inputs=args.max_inputs, max_body_mb=args.max_body_mb)


def _keep_freed_memory() -> None:
    """A verb that runs a model on the CPU: its batches reuse the pages the last one freed (finetune.allocator). The
    setting is process-wide, so the CLI, whose process this is, makes it (as `run` does); finetune.load does not."""
    import torch

    from finetune import allocator

    if not torch.accelerator.is_available():
        allocator.keep_freed_memory()


def _clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _describe_prediction(result: dict, top_k: int | None) -> str:
    if "entities" in result:  # token classification
        found = "  ".join(f"{e['word']}/{e['label']} {e['score']:.3f}" for e in result["entities"])
        return found or "(no entities)"
    if "value" in result:
        return f"{result['value']:.6g}"
    if "confidence_set" in result:
        return _describe_prediction({k: v for k, v in result.items() if k != "confidence_set"}, top_k) + \
            f"  set {{{', '.join(result['confidence_set'])}}}"
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


def _run_hub_settings(run: Path) -> dict:
    """The run's own hub section (config.yaml, the resolved recipe): repo_id and private as the run was trained."""
    from finetune.recipe import parse_yaml

    config = run / "config.yaml"
    if not config.is_file():
        return {}
    raw = parse_yaml(config.read_text(encoding="utf-8"), str(config))
    hub = raw.get("hub") if isinstance(raw, dict) else None
    return hub if isinstance(hub, dict) else {}


def cmd_push(args) -> int:
    from finetune.hub import push_run

    run = Path(args.run)
    settings = _run_hub_settings(run)
    repo_id = args.repo_id or settings.get("repo_id")
    if not repo_id:
        raise FinetuneError(
            f"push: no --repo-id, and {run / 'config.yaml'} has no hub.repo_id; pass --repo-id OWNER/NAME"
        )
    if args.private is not None:
        private, why = args.private, "--private" if args.private else "--public"
    else:  # the schema's default is private: a run folder without the key is not published by accident
        private, why = settings.get("private", True) is not False, "the run's hub.private"
    url = push_run(run, repo_id, private=private, revision=args.revision)
    print(url)
    asked = "private" if private else "public"
    actual = {True: "private", False: "public", None: asked}[getattr(url, "private", None)]
    why = why if actual == asked else f"it already existed; {why} does not change a repo's visibility"
    print(f"pushed {run / 'model'} to {repo_id}, a {actual} repo ({why})", file=sys.stderr)
    return 0


def cmd_cache(args) -> int:
    from finetune.caches import CACHES, clear, human, usage

    names = [args.name] if args.name else list(CACHES)
    if args.action == "clear":
        for name in names:
            held = clear(name)
            print(f"{name}: removed {held['files']} files ({human(held['bytes'])}) from {held['path']}")
        return 0
    rows = [usage(name) for name in names]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'cache':9} {'files':>6} {'size':>9}  path")
    for row in rows:
        print(f"{row['cache']:9} {row['files']:>6} {human(row['bytes']):>9}  {row['path']}")
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


def versions() -> str:
    """finetune and the libraries it trains with, Python and the device: what a bug report needs (like
    `accelerate env`)."""
    import importlib.metadata
    import os
    import platform

    lines = [f"finetune {__version__}", f"python {platform.python_version()} ({platform.platform()})"]
    for name in ("torch", "transformers", "timm", "accelerate", "peft", "datasets", "huggingface_hub"):
        try:
            lines.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"{name} not installed")
    try:
        import torch

        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
        lines[2] = f"torch {torch.__version__} ({build})"  # the build tag says which wheel pip took
        kind = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        if kind is None:
            device = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
        else:
            count = torch.accelerator.device_count()
            name = torch.cuda.get_device_name(0) if kind.type == "cuda" else kind.type
            device = f"{kind.type} x{count} ({name})"
    except Exception as error:  # noqa: BLE001 — a broken torch install is worth reporting, not a traceback
        device = f"unknown ({error.__class__.__name__}: {error})"
    lines.append(f"device {device}")
    return "\n".join(lines)


class _Versions(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(versions())
        parser.exit()


def _verb(verbs, name: str, help: str, description: str, examples: str):
    """A verb's parser: one help line for `finetune --help`, a paragraph and examples for `finetune NAME --help`."""
    return verbs.add_parser(
        name, help=help, description=description, epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


OVERRIDE_HELP = "dotted overrides, values as YAML scalars, e.g. train.lr=3e-5 lora=null"
MODEL_HELP = "a run folder, its model/ folder, or a hub model id (owner/name)"
BATCH_HELP = "inputs per forward pass (default: %(default)s); lower it if memory runs out"


def _add_recipe_verbs(verbs) -> None:
    """ls, cat, cp, schema and validate: the recipes, before any training."""
    ls = _verb(verbs, "ls", "list the built-in recipes, or the runs in a folder",
               "Without a folder: the built-in recipes, one line each (task, backbone, data, and what a recipe needs "
               "beyond pip: files (a data key names your own files), an apt package or the network). With a "
               "folder: its runs compared in one table.",
               "  finetune ls\n  finetune ls --json\n  finetune ls runs/")
    ls.add_argument("folder", nargs="?", help="a folder of runs (e.g. runs/): compare them in one table")
    ls.add_argument("--json", action="store_true", help="the recipes (or runs) as JSON")
    ls.set_defaults(func=cmd_ls)

    report = _verb(verbs, "report", "one HTML page comparing the runs in a folder",
                   "Write one self-contained HTML page comparing the runs at or under a folder (a sweep's trials "
                   "included): a sortable table of their differing settings and metrics, their validation curves "
                   "on one plot, each run's confusion matrix and reliability plot, and the recipe differences.",
                   "  finetune report runs/\n  finetune report runs/sweep --output sweep.html")
    report.add_argument("folder", help="a folder of runs (e.g. runs/, or a sweep's output.dir)")
    report.add_argument("--output", help="where to write the page (default: FOLDER/report.html)")
    report.set_defaults(func=cmd_report)

    cat = _verb(verbs, "cat", "print a built-in recipe", "Print a built-in recipe (or a recipe file) as it is.",
                "  finetune cat text/minilm-bbc-news\n  finetune cat vision/efficientnet-lite0-digits > my.yaml")
    cat.add_argument("recipe", help="built-in recipe name (see `finetune ls`) or a recipe file")
    cat.set_defaults(func=cmd_cat)

    cp = _verb(verbs, "cp", "copy a built-in recipe to edit", "Copy a built-in recipe to a file or folder.",
               "  finetune cp text/minilm-bbc-news my.yaml\n  finetune cp vision/efficientnet-lite0-digits recipes/")
    cp.add_argument("recipe", help="built-in recipe name (see `finetune ls`) or a recipe file")
    cp.add_argument("dest", help="file or folder to copy to")
    cp.add_argument("--force", action="store_true", help="replace an existing file")
    cp.set_defaults(func=cmd_cp)

    schema = _verb(verbs, "schema", "print the recipe's JSON Schema (for editors that complete and check YAML)",
                   "The recipe's JSON Schema: every key with its type, default, choices and help, made from the "
                   "schema `run` checks recipes with. The built-in recipes name theirs in their first line "
                   "(# yaml-language-server: $schema=...); point a recipe of yours at a copy.",
                   "  finetune schema > recipe.schema.json\n  finetune schema --output recipe.schema.json")
    schema.add_argument("--output", help="write it to this file instead of stdout")
    schema.set_defaults(func=cmd_schema)

    validate = _verb(verbs, "validate", "check a recipe and its data, and print the recipe resolved",
                     "Check the recipe (every problem at once, with its dotted key) and its data (files, columns, "
                     "labels, leakage, lengths) without training; print the resolved recipe on stdout.",
                     "  finetune validate my.yaml\n  finetune validate text/minilm-bbc-news train.lr=3e-5 "
                     "> resolved.yaml")
    validate.add_argument("recipe", nargs="?", help="recipe file or built-in recipe name")
    validate.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDE_HELP)
    validate.set_defaults(func=cmd_validate)


def _add_training_verbs(verbs) -> None:
    """run and sweep: the verbs that train."""
    run = _verb(verbs, "run", "train: fine-tune a backbone as a recipe says and write the run folder",
                "Train as the recipe says: data checked first, then the model fine-tuned, the best epoch kept and "
                "tested, and output.dir written (config.yaml, metrics.json, model/, checkpoints/, train.log).",
                "  finetune run text/minilm-bbc-news\n  finetune run my.yaml train.lr=3e-5 data.train=reviews.csv\n"
                "  finetune run runs/my --resume\n  accelerate launch -m finetune run my.yaml   # several GPUs")
    run.add_argument("recipe", nargs="?", help="recipe file, built-in recipe name, or a run folder to --resume")
    run.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDE_HELP)
    run.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    run.add_argument("--resume", action="store_true", help="continue the unfinished run in output.dir from its last "
                                                           "checkpoint")
    run.set_defaults(func=cmd_run)

    sweep = _verb(verbs, "sweep", "search hyperparameters (the recipe's sweep: section) on Optuna",
                  "Hyperparameter search: each trial an ordinary run under output.dir/trials/, pruned per epoch; "
                  "sweep.json, best.yaml and plots at the end. Workers sharing --storage share the study.",
                  "  finetune sweep my.yaml --trials 8\n"
                  "  finetune sweep my.yaml --storage journal:study.journal --trials 16   # in several shells")
    sweep.add_argument("recipe", help="recipe file or built-in recipe name, with a sweep: section (or --space)")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the base recipe")
    sweep.add_argument("--trials", type=int, help="finished trials the study should hold (default sweep.trials)")
    sweep.add_argument("--timeout", type=float, help="seconds after which this worker starts no new trial")
    sweep.add_argument("--storage", help="journal:<file> (processes on one machine) or a database URL (machines); "
                                         "default journal:<output.dir>/study.journal")
    sweep.add_argument("--study", help="study name (default: output.dir's folder name)")
    sweep.add_argument("--space", help="a YAML file holding what the sweep: section holds (replaces its keys)")
    sweep.set_defaults(func=cmd_sweep)

    audit = _verb(verbs, "audit", "find likely label errors in the training data (cleanlab's confident learning)",
                  "Out-of-sample scores for every training and validation row by k-fold cross-validation (a head per "
                  "fold on the frozen backbone's cached features, or --finetune: a fine-tuning run per fold), then "
                  "cleanlab's confident learning: label_issues.csv (most suspicious first) and the estimated noise "
                  "per class. The data files are never changed; --clean writes a copy without the flagged rows.",
                  "  finetune audit my.yaml\n  finetune audit my.yaml --folds 10 --clean train.clean.csv\n"
                  "  finetune audit my.yaml --finetune --output runs/audit")
    audit.add_argument("recipe", nargs="?", help="recipe file or built-in recipe name")
    audit.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDE_HELP)
    audit.add_argument("--folds", type=int, default=5, help="cross-validation folds (default: %(default)s)")
    audit.add_argument("--finetune", action="store_true", help="fine-tune each fold (slower) instead of a head on "
                                                              "the frozen backbone's features")
    audit.add_argument("--output", help="where label_issues.csv (and --finetune's fold runs) go (default: "
                                        "output.dir/audit)")
    audit.add_argument("--clean", metavar="FILE", help="write a copy of data.train without the flagged rows")
    audit.set_defaults(func=cmd_audit)


def _add_model_verbs(verbs) -> None:
    """eval, predict and export: the verbs that use a trained model."""
    evaluate = _verb(verbs, "eval", "metrics of a trained model on a labelled file",
                     "Metrics (and a confusion matrix) of a trained model on labelled data in any form `run` reads.",
                     "  finetune eval runs/my --data test.csv\n  finetune eval runs/my --data bbc-news --split test "
                     "--json\n  finetune eval me/reviews-minilm --data unseen.csv --output predictions.csv")
    evaluate.add_argument("model", help=MODEL_HELP)
    evaluate.add_argument("--data", required=True, help="labelled data in any form `run` reads (file, folder, zoo, "
                                                        "hub:)")
    evaluate.add_argument("--split", default="test", help="which split of a zoo/hub set or split folder (default test)")
    evaluate.add_argument("--output", help="write per-row predictions to a .csv or .jsonl file")
    evaluate.add_argument("--text-column", help="default: the run's data.text_column, else text")
    evaluate.add_argument("--label-column", help="default: the run's data.label_column, else label")
    evaluate.add_argument("--image-column", help="default: the run's data.image_column, else image")
    evaluate.add_argument("--pair-column", help="sentence pairs: default the run's data.text_pair_column")
    evaluate.add_argument("--batch-size", type=int, default=32, help=BATCH_HELP)
    evaluate.add_argument("--json", action="store_true", help="the metrics (and confusion matrix) as JSON")
    evaluate.set_defaults(func=cmd_eval)

    predict = _verb(verbs, "predict", "label names and scores for texts or images",
                    "Predictions with label names for texts, text files, images, image folders or table columns.",
                    '  finetune predict runs/my "great phone" "broke in a day"\n'
                    "  finetune predict runs/my reviews.txt --top-k 3\n"
                    "  finetune predict runs/my new.csv --column review --json > predictions.jsonl\n"
                    "  finetune predict runs/digits photos/ cat.png")
    predict.add_argument("model", help=MODEL_HELP)
    predict.add_argument(
        "inputs", nargs="+", metavar="INPUT",
        help="texts, .txt files (one text per line, for a tagging model too: training reads .txt as CoNLL, predict "
             "does not; give CoNLL sentences as .conll/.iob), images, image folders, or csv/jsonl/parquet files (see "
             "--column)",
    )
    predict.add_argument("--top-k", type=int, help="show the K best labels (default: the best one; multi-label: all "
                                                  "over the threshold)")
    predict.add_argument("--column", help="the table column holding the inputs (default: the run's text/image column)")
    predict.add_argument("--pair-column", help="sentence pairs: the table column holding each row's second text "
                                               "(default: the run's data.text_pair_column)")
    predict.add_argument("--batch-size", type=int, default=32, help=BATCH_HELP)
    predict.add_argument("--json", action="store_true", help="JSON Lines: one JSON object per input, in order")
    predict.add_argument("--confidence-set", type=float, metavar="LEVEL",
                         help="add each input's confidence set: the labels that hold the true one at this coverage "
                              "(such as 0.9; split conformal on the validation rows in the model's calibration.json)")
    predict.set_defaults(func=cmd_predict)

    _add_explain_verb(verbs)

    export = _verb(verbs, "export", "an ONNX folder (fp32 or int8) that onnxruntime serves alone",
                   "Export a trained model to one model.onnx with its tokenizer or preprocessing, labels, a card and "
                   "export.json (parity against the torch model, measured before it finishes).",
                   "  finetune export runs/my --format onnx\n  finetune export runs/my --quantize int8")
    export.add_argument("model", help=MODEL_HELP)
    export.add_argument("--format", choices=["onnx"], default="onnx", help="the export's format (default: %(default)s)")
    export.add_argument("--quantize", choices=["int8"], help="int8 weights (parity and test metric measured)")
    export.add_argument("--output", help="default: <run>/export/onnx[-int8]/ (for a model folder or hub id: "
                                         "<MODEL>/export/onnx[-int8]/)")
    export.set_defaults(func=cmd_export)
    shrink_verb(_verb(verbs, "shrink", *SHRINK_HELP))


def _add_explain_verb(verbs) -> None:
    explain = _verb(verbs, "explain", "which words (or pixels) made a model's answer, and how faithfully",
                    "Attributions through captum: Integrated Gradients on the word embeddings (text; per word), "
                    "Grad-CAM or Integrated Gradients (images; a heatmap), occlusion for any model (an ONNX export "
                    "takes occlusion only). --data FILE --faithfulness scores a method as ERASER does.",
                    '  finetune explain runs/my "great phone, awful battery"\n'
                    "  finetune explain runs/my reviews.txt --json --output explained/\n"
                    "  finetune explain runs/digits photo.png --method gradcam --output explained/\n"
                    "  finetune explain runs/my --data test.csv --faithfulness")
    from finetune.explain.api import add_explain_arguments

    add_explain_arguments(explain, MODEL_HELP)
    explain.set_defaults(func=cmd_explain)


def _add_sharing_verbs(verbs) -> None:
    """serve, push and cache: a model served or shared, and the disk caches."""
    serve = _verb(verbs, "serve", "an HTTP JSON endpoint for a model (or an ONNX export)",
                  "Serve GET /health, /info, / (a page) and POST /predict on 127.0.0.1 unless told otherwise; "
                  "concurrent requests are batched together.",
                  "  finetune serve runs/my\n  finetune serve runs/my/export/onnx-int8 --port 8080 "
                  "--api-key-env FINETUNE_API_KEY")
    serve.add_argument("model", help="a run folder, its model/ folder, an ONNX export folder, or a hub model id "
                                     "(owner/name)")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: %(default)s, this "
                                                             "machine only; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000, help="the TCP port (default: %(default)s)")
    serve.add_argument("--api-key-env", metavar="VAR",
                       help="the environment variable holding an API key: every path but / (the page, which asks "
                            "for the key) and /health then needs Authorization: Bearer <key> (default: no key)")
    serve.add_argument("--max-batch", type=int, default=32,
                       help="inputs per model call, across requests (default: %(default)s)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0,
                       help="how long a model call waits for more inputs (default: %(default)s)")
    serve.add_argument("--max-inputs", type=int, default=256,
                       help="inputs one request may send (default: %(default)s)")
    serve.add_argument("--max-body-mb", type=float, default=8.0,
                       help="the largest request body in MB; a larger one gets 413 (default: %(default)s)")
    serve.set_defaults(func=cmd_serve)

    push = _verb(verbs, "push", "upload a run's model/ (and adapter/) with its card to the hub",
                 "Upload model/ at the repo root (and adapter/) with its card in one commit. The repo is created "
                 "private unless the run's hub.private is false or --public is given.",
                 "  finetune push runs/my --repo-id me/reviews-minilm\n"
                 "  finetune push runs/my               # the run's hub.repo_id\n"
                 "  finetune push runs/my --repo-id me/reviews-minilm --public --revision v2")
    push.add_argument("run", help="a run folder")
    push.add_argument("--repo-id", help="owner/name of the model repo, created if missing (default: the run's "
                      "hub.repo_id)")
    visibility = push.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_const", const=True, default=None,
                            help="create the repo private (default: the run's hub.private, which defaults to true)")
    visibility.add_argument("--public", dest="private", action="store_const", const=False,
                            help="create the repo public; an existing repo keeps its visibility either way")
    push.add_argument("--revision", help="a branch to push to (created if missing); default main")
    push.set_defaults(func=cmd_push)

    cache = _verb(verbs, "cache", "show or clear the token and feature caches",
                  "The kit's disk caches: tokenised texts (under the datasets cache, HF_DATASETS_CACHE) and frozen-"
                  "backbone features (under FINETUNE_CACHE, default ~/.cache/finetune). Nothing else cleans them; "
                  "both are rebuilt when next needed.",
                  "  finetune cache ls\n  finetune cache clear features\n  finetune cache clear")
    cache.add_argument("action", choices=["ls", "clear"], help="ls: files and sizes; clear: remove the cached files")
    cache.add_argument("name", nargs="?", choices=["tokens", "features"], help="one cache (default: both)")
    cache.add_argument("--json", action="store_true", help="ls as JSON")
    cache.set_defaults(func=cmd_cache)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="finetune", description="Fine-tune pretrained backbones from a YAML recipe.",
        epilog="start with: finetune ls; finetune cp text/minilm-bbc-news my.yaml; finetune run my.yaml",
    )
    parser.add_argument("--version", action=_Versions, help="versions of finetune, its libraries and the device")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    verbs = parser.add_subparsers(
        dest="verb", required=True, parser_class=_Parser,
        metavar="{ls,report,cat,cp,schema,validate,run,sweep,audit,curve,eval,predict,explain,export,shrink,serve,"
        "push,cache}",
    )

    for add in (_add_recipe_verbs, _add_training_verbs, add_curve_verb, _add_model_verbs, _add_sharing_verbs):
        add(verbs)
    for verb in verbs.choices.values():  # `finetune VERB ... --debug` as well as `finetune --debug VERB ...`
        verb.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush does not fail on the closed pipe again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor (stdout replaced in-process): nothing to redirect
        pass


OVERRIDE_VERBS = ("validate", "run", "sweep", "audit", "curve")  # the verbs whose key=value items change the recipe
DASHED = re.compile(r"--([A-Za-z_][\w.-]*)=(.*)", re.S)


def dashed_overrides(argv: list[str]) -> list[str]:
    """`--train.lr=3e-5` (and another tool's `--learning_rate=3e-5`, which the recipe then answers with our key) as
    the override `train.lr=3e-5`, for the verbs that take overrides; every other argument as it is."""
    from finetune.foreign_names import ours

    verb = next((item for item in argv if not item.startswith("-")), None)
    if verb not in OVERRIDE_VERBS:
        return list(argv)
    converted = []
    for item in argv:
        match = DASHED.fullmatch(item)
        if match and ("." in match.group(1) or ours(match.group(1)) is not None):
            item = f"{match.group(1)}={match.group(2)}"
        converted.append(item)
    return converted


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(dashed_overrides(sys.argv[1:] if argv is None else argv))
    _quiet_libraries(args.debug)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, not at exit: a reader that stopped early (`| head`) is handled below
        return code
    except BrokenPipeError:  # the reader of stdout has gone (`finetune ls | head`): nothing left to say to it
        _silence_stdout()
        return 0
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
        name = error.__class__.__name__
        print(f"finetune: internal error: {name}: {_one_line(error)} (rerun with --debug)", file=sys.stderr)
        return 1
