"""`finetune curve`: each method at each labelled-rows-per-class size and seed as an ordinary run, and the learning
curve (curve.json, curve.png, a table) they draw against a classical baseline."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from finetune.errors import FinetuneError

# What each method changes in the recipe. A method's usual learning rate comes with it (the shipped recipes' values:
# a frozen backbone's head wants ~100x the rate of full fine-tuning, adapters start at zero and want more); the
# command's key=value overrides are applied last, to every method.
NOT_STAGED = {"contrastive": None, "lora": None}
METHODS: dict[str, dict | None] = {
    "full": NOT_STAGED | {"train.freeze": "none", "train.lr": 1.0e-4, "train.head_lr": 1.0e-3},
    "probe": NOT_STAGED | {"train.freeze": "backbone", "train.lr": 1.0e-2, "train.head_lr": None},
    "contrastive": {"lora": None, "train.freeze": "backbone", "train.lr": 1.0e-2, "train.head_lr": None},
    "lora": {"contrastive": None, "train.freeze": "none", "train.lr": 4.0e-3, "train.head_lr": None},
    "scratch": NOT_STAGED | {"backbone.pretrained": False, "train.freeze": "none", "train.lr": 1.0e-4,
                             "train.head_lr": 1.0e-3},
    "baseline": None,  # scikit-learn on the task's classical features (Task.baseline_features)
}
POINT = "point.json"  # a finished point's line of curve.json, beside its run's metrics.json


def method_keys(name: str, raw: dict) -> dict:
    """The dotted keys that make the recipe `raw` (as written) this method's run."""
    keys = dict(METHODS[name] or {})
    if name == "contrastive":  # the recipe's own stage settings when it has them
        keys["contrastive"] = raw.get("contrastive") or {}
    if name == "lora":
        keys["lora"] = raw.get("lora") or {"r": 8}
    return keys


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(item) for item in text.split(",") if item.strip()})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise FinetuneError(f"--per-class: expected rows per class as whole numbers >= 1, e.g. 8,16,32; got '{text}'")
    return sizes


def parse_methods(text: str) -> list[str]:
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise FinetuneError(f"--methods: unknown method '{unknown[0] if unknown else text}'; choose from "
                            f"{', '.join(METHODS)}")
    return list(dict.fromkeys(names))


class Curve:
    """The points of one curve: every method x size x seed, each in DIR/method/n-N/seed-S."""

    def __init__(self, recipe, overrides, methods: list[str], sizes: list[int | None], seeds: list[int],
                 output: str | None):
        from finetune.api import resolve_recipe
        from finetune.recipe import to_dict

        self.user = list(overrides or [])
        base = resolve_recipe(recipe, self.user)  # the recipe's own errors first, as `run` reports them
        self.raw, self.metric = to_dict(base), base.eval.select_best
        self.methods, self.sizes, self.seeds = methods, sizes, seeds
        self.dir = Path(output or f"{base.output.dir}-curve")
        self.points = [(m, n, s) for m in methods for n in sizes for s in seeds]

    def recipe(self, method: str, n: int | None, seed: int):
        from finetune.api import resolve_recipe

        keys = method_keys(method, self.raw) | {"data.train_per_class": n, "train.seed": seed}
        return resolve_recipe(resolve_recipe(self.raw, keys), self.user, self.folder(method, n, seed))

    def folder(self, method: str, n: int | None, seed: int) -> Path:
        return self.dir / method / ("all" if n is None else f"n-{n}") / f"seed-{seed}"

    def check(self) -> None:
        """Every method applies and every size fits the data, refused in one line before anything runs."""
        from finetune.tasks import get_task

        largest = max((n for n in self.sizes if n is not None), default=None)
        for method in self.methods:
            try:
                recipe = self.recipe(method, largest, self.seeds[0])
            except FinetuneError as error:
                raise FinetuneError(f"curve: method '{method}' does not apply to this recipe (drop it from "
                                    f"--methods): {error}") from None
            task = get_task(recipe.task)
            if method == "baseline" and task.baseline_features(recipe) is None:
                raise FinetuneError(f"curve: method 'baseline' does not apply: {recipe.task} has no classical "
                                    "baseline; drop it from --methods")
        splits = task.load_splits(recipe)  # a class short of the largest size is data.train_per_class's error
        self.classes = len(splits.label_names)
        if splits.test is None:
            raise FinetuneError("curve: the recipe has no test split to score the points on; give data.test a file")

    def run_point(self, method: str, n: int | None, seed: int) -> dict:
        """One point, trained (or fitted) now; its folder keeps metrics.json and the run's small files."""
        recipe = self.recipe(method, n, seed)
        out = Path(recipe.output.dir)
        start = time.perf_counter()
        if method == "baseline":
            metrics = fit_baseline(recipe)
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        else:
            from finetune.train import train

            metrics = train(recipe, overwrite=True, plots=False, checkpoints=False)
            for bulky in ("model", "checkpoints"):  # every point's weights would fill the disk; metrics stay
                shutil.rmtree(out / bulky, ignore_errors=True)
        split = out / "split.json"  # the run's own record of the rows it trained on
        rows = (json.loads(split.read_text())["splits"]["train"]["count"] if split.is_file()
                else metrics["train"]["rows"])
        point = {"method": method, "per_class": n, "seed": seed, "rows": rows,
                 "metric": self.metric, "test": metrics["test"][self.metric],
                 "seconds": round(time.perf_counter() - start, 2),
                 # finetune.health: a run that learned nothing is a point to mark, not a result to average quietly
                 "learned": (metrics.get("health") or {}).get("learned", True)}
        (out / POINT).write_text(json.dumps(point) + "\n")
        return point

    def run(self, say=print) -> list[dict]:
        done = []
        for i, (method, n, seed) in enumerate(self.points, 1):
            out = self.folder(method, n, seed)
            where = f"curve: {method} n={'all' if n is None else n} seed {seed} ({i}/{len(self.points)})"
            if (out / "metrics.json").is_file() and (out / POINT).is_file():
                point = json.loads((out / POINT).read_text())
                say(f"{where}: {self.metric} {point['test']:.4f}, done before")
            else:
                point = self.run_point(method, n, seed)
                nothing = "" if point.get("learned", True) else " (learned nothing)"
                say(f"{where}: {self.metric} {point['test']:.4f}{nothing}, {point['seconds']:.0f} s")
            done.append(point)
        return done


def fit_baseline(recipe) -> dict:
    """The task's classical features and a logistic regression on the run's own rows, scored by the problem as a
    run's test split is (the regression's decision scores standing for logits)."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    from finetune.problems import get
    from finetune.tasks import get_task

    splits = get_task(recipe.task).load_splits(recipe)
    features = get_task(recipe.task).baseline_features(recipe)
    labels = np.asarray(splits.train["label"])
    model = LogisticRegression(max_iter=2000)
    model = OneVsRestClassifier(model) if labels.ndim == 2 else model  # label sets: one regression per label
    model.fit(features.fit_transform(splits.train), labels)
    scores = np.asarray(model.decision_function(features.transform(splits.test)), dtype=np.float32)
    if labels.ndim == 1:  # columns for the classes the rows hold, in the label space's order
        full = np.full((len(scores), len(splits.label_names)), -1e4, dtype=np.float32)
        if scores.ndim == 1:  # two classes: one score, whose sigmoid is the softmax of (-s/2, s/2)
            scores = np.stack([-scores / 2, scores / 2], axis=1)
        full[:, model.classes_] = scores
        scores = full
    truth = torch.tensor(np.asarray(splits.test["label"]))
    test = get(recipe.head.problem).score([(torch.from_numpy(scores), truth)], recipe.eval.metrics, splits)
    return {"test": test, "train": {"rows": len(labels), "baseline": "logistic regression on the task's features"}}


def summary(points: list[dict]) -> list[dict]:
    """Per method and size: the test metric's mean, spread (sample std, min, max) and mean seconds over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for point in points:
        groups.setdefault((point["method"], point["per_class"]), []).append(point)
    rows = []
    for (method, n), group in groups.items():
        values = [p["test"] for p in group]
        rows.append({"method": method, "per_class": n, "seeds": len(values), "mean": statistics.fmean(values),
                     "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": min(values),
                     "max": max(values), "seconds": statistics.fmean(p["seconds"] for p in group),
                     "rows": group[0]["rows"],
                     "learned_nothing": [p["test"] for p in group if not p.get("learned", True)]})
    return rows


def curve_table(rows: list[dict], metric: str) -> str:
    lines = [f"{'method':<12} {'per class':>9} {'seeds':>5} {metric + ' mean':>14} {'std':>7} {'min':>7} {'max':>7} "
             f"{'seconds':>8}"]
    for r in rows:
        n = "all" if r["per_class"] is None else str(r["per_class"])
        nothing = len(r.get("learned_nothing") or [])
        lines.append(f"{r['method']:<12} {n:>9} {r['seeds']:>5} {r['mean']:>14.4f} {r['std']:>7.4f} {r['min']:>7.4f} "
                     f"{r['max']:>7.4f} {r['seconds']:>8.1f}" + (f"  {nothing} learned nothing" if nothing else ""))
    return "\n".join(lines)


def draw(rows: list[dict], metric: str, classes: int, path: Path) -> None:
    """The test metric against labelled rows per class (log x), a mean line and a min-max band per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: per_class_x(r, classes))
        x = [per_class_x(r, classes) for r in mine]
        axis.plot(x, [r["mean"] for r in mine], marker="o", label=method)
        axis.fill_between(x, [r["min"] for r in mine], [r["max"] for r in mine], alpha=0.2)
    failed = [(per_class_x(r, classes), value) for r in rows for value in r.get("learned_nothing") or []]
    if failed:  # seeds whose run learned nothing (finetune.health): marked, so a low mean explains itself
        axis.scatter(*zip(*failed), marker="x", color="black", zorder=3, label="learned nothing")
    axis.set_xscale("log", base=2)
    sizes = sorted({per_class_x(r, classes) for r in rows})
    axis.set_xticks(sizes, [f"{x:.0f}" for x in sizes])  # the sizes asked for, not powers of two
    axis.minorticks_off()
    axis.set_xlabel("labelled training rows per class")
    axis.set_ylabel(f"test {metric} (mean; band: min-max over seeds)")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def per_class_x(row: dict, classes: int) -> float:
    """A point's place on the x axis: its size, or all the training rows shared out over the classes."""
    return row["per_class"] if row["per_class"] is not None else (row["rows"] or classes) / max(classes, 1)


def curve(recipe, overrides=None, per_class=(8, 16, 32, 64), every_row: bool = False, seeds: int = 3,
          methods=("full", "probe", "contrastive", "lora", "scratch", "baseline"), output=None, say=print) -> Path:
    """Run (or pick up) every point, then write curve.json, curve.png and print the table; returns the folder."""
    if seeds < 1:
        raise FinetuneError(f"--seeds: at least 1, got {seeds}")
    sizes: list[int | None] = list(per_class) + ([None] if every_row else [])
    plan = Curve(recipe, overrides, list(methods), sizes, list(range(seeds)), output)
    plan.check()
    points = plan.run(say)
    rows = summary(points)
    classes = plan.classes
    plan.dir.mkdir(parents=True, exist_ok=True)
    (plan.dir / "curve.json").write_text(json.dumps({"metric": plan.metric, "points": points, "summary": rows},
                                                    indent=1) + "\n")
    draw(rows, plan.metric, classes, plan.dir / "curve.png")
    say(curve_table(rows, plan.metric))
    say(f"curve: {len(points)} points in {plan.dir / 'curve.json'}; the picture: {plan.dir / 'curve.png'}")
    return plan.dir


def add_curve_verb(verbs) -> None:
    """`finetune curve`'s parser (kept here: cli.py holds the other verbs at its size limit)."""
    parser = verbs.add_parser(
        "curve", help="learning curve: each method at N labelled rows per class, over seeds, against a baseline",
        description="Run every method x rows-per-class x seed as an ordinary run under one folder (resumable: a rerun "
                    "skips finished points), then write curve.json, curve.png and a table: when is a network worth "
                    "it, and which one.",
        epilog="examples:\n  finetune curve text/minilm-few-labels data.train=mine.csv data.test=test.csv\n"
               "  finetune curve text/minilm-bbc-news --per-class 4,8,16 --seeds 2 --methods probe,baseline",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", help="recipe file or built-in recipe name")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides applied to every point, after the method's own keys")
    parser.add_argument("--per-class", default="8,16,32,64", help="labelled rows per class (default: %(default)s)")
    parser.add_argument("--all", action="store_true", help="add the point with every training row")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per size (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--output", help="the curve's folder (default: output.dir-curve)")
    parser.set_defaults(func=cmd_curve)


def cmd_curve(args) -> int:
    if args.recipe is None:
        raise FinetuneError("curve: give a recipe, e.g. finetune curve text/minilm-few-labels data.train=mine.csv "
                            "data.test=test.csv (finetune ls lists the built-in ones)")
    curve(args.recipe, args.overrides, parse_sizes(args.per_class), args.all, args.seeds,
          parse_methods(args.methods), args.output)
    return 0
