"""What the explain verb and `serve` call: `explain_inputs` (one JSON object per input) and the command itself."""

from __future__ import annotations

import sys
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.explain.methods import DEFAULT_STEPS, attribute, check_method, explainable_of

def explain_subjects(predictor, entries: list, method: str | None = None, label: str | None = None,
                     steps: int = DEFAULT_STEPS) -> tuple[list[dict], list, str]:
    """(one --json object per input, the subjects explained, the method run)."""
    explainable = explainable_of(predictor)
    method = check_method(explainable, method)
    subjects = explainable.subjects(list(entries), label)
    folded = attribute(explainable, subjects, method, steps)
    results = [explainable.describe(s, list(zip(s.targets, values))) for s, values in zip(subjects, folded)]
    return results, subjects, method


def explain_inputs(predictor, entries: list, method: str | None = None, label: str | None = None,
                   steps: int = DEFAULT_STEPS) -> list[dict]:
    """One object per input, as `finetune explain --json` prints it: text {"label", "score", "words": [{"word",
    "start", "end", "attribution"}]} (pairs add "pair_words"), token classification {"entities": [...]} with such a
    list per predicted entity, images {"label", "score", "heatmap"}. `method`: integrated-gradients (default; an
    ONNX export: occlusion), occlusion or gradcam (images)."""
    return explain_subjects(predictor, entries, method, label, steps)[0]


def add_explain_arguments(parser, model_help: str) -> None:
    """The explain verb's arguments (cli.py builds the verb)."""
    parser.add_argument("model", help=model_help + ", or an ONNX export folder (occlusion)")
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="texts, .txt files, images, image folders, or "
                        "csv/jsonl/parquet files (see --column)")
    parser.add_argument("--label", help="explain this label (default: the predicted one)")
    parser.add_argument("--method", help="integrated-gradients (default), occlusion, or gradcam (images)")
    parser.add_argument("--steps", type=int, default=64, help="Integrated Gradients' steps (default: %(default)s)")
    parser.add_argument("--column", help="the table column holding the inputs (default: the run's)")
    parser.add_argument("--pair-column", help="sentence pairs: the column of each row's second text")
    parser.add_argument("--json", action="store_true", help="JSON Lines: one object per input")
    parser.add_argument("--output", help="a folder for explain.html (and an overlay PNG per image)")
    parser.add_argument("--data", help="with --faithfulness: the file whose texts the method is scored on")
    parser.add_argument("--faithfulness", action="store_true", help="comprehensiveness and sufficiency at 20%% "
                        "of the words, against random words")
    parser.add_argument("--seed", type=int, default=0, help="--faithfulness: the random words' seed")


def explain_command(args) -> int:
    """The explain verb: load, explain (or measure faithfulness), print, and write --output."""
    from finetune.explain.render import print_explanations, write_page
    from finetune.loading import load_predictor
    from finetune.predict import default_column, expand_inputs

    if args.faithfulness and not args.data:
        raise FinetuneError("--faithfulness: needs --data FILE (rows whose texts the method is scored on)")
    if args.data and not args.faithfulness:
        raise FinetuneError("--data: is read by --faithfulness; add --faithfulness, or give the inputs themselves")
    if not args.data and not args.inputs:
        raise FinetuneError("explain: give inputs to explain (texts, files, images), or --data FILE --faithfulness")
    predictor = load_predictor(args.model)
    explainable = explainable_of(predictor)  # a missing extra or an unexplainable model fails before the inputs
    pair_column = args.pair_column or (predictor.recipe.data.text_pair_column if predictor.recipe else None)
    column = args.column or default_column(predictor)
    if args.faithfulness:
        from finetune.explain.faithfulness import faithfulness, print_faithfulness

        entries = [entry for _, entry in expand_inputs([args.data], predictor.task, column, pair_column)]
        report = faithfulness(predictor, entries, args.method, args.steps, seed=args.seed)
        print_faithfulness(report, args.json)
        return 0
    inputs = expand_inputs(args.inputs, predictor.task, column, pair_column)
    if not inputs:
        raise FinetuneError("explain: the inputs hold nothing to explain (empty files?)")
    if explainable.model is None and args.method is None:
        print(f"{args.model}: an ONNX export: occlusion only (gradients need the torch model)", file=sys.stderr)
    results, subjects, method = explain_subjects(predictor, [e for _, e in inputs], args.method, args.label,
                                                 args.steps)
    print_explanations([shown for shown, _ in inputs], results, args.json)
    if args.output:
        page = write_page(Path(args.output), [shown for shown, _ in inputs], results, subjects, method)
        print(f"explanations written to {page}", file=sys.stderr)
    return 0
