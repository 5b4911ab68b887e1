"""`finetune audit`: out-of-sample scores for every training and validation row by k-fold cross-validation, cleanlab's
confident learning on them, label_issues.csv, the estimated noise per class, and `--clean`'s copy of the data."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune import problems
from finetune.data import where_rows
from finetune.errors import FinetuneError
from finetune.recipe import from_dict, to_dict
from finetune.tasks import get_task
from finetune.tasks.row_files import check_clean_suffix, data_file

COLUMNS = ("split", "file", "location", "input", "given_label", "suggested_label", "label_quality")
AUDITED = ("train", "validation")  # the rows a user labelled for training; the test split stays unseen
MIN_HEAD_EPOCHS = 50  # a head on fixed features is cheap: fit it well, or its scores flag rows it merely underfits
MIN_HEAD_LR = 1e-3  # a fine-tuning recipe's backbone lr (2e-5) barely moves a fresh head in MIN_HEAD_EPOCHS


@dataclass
class Rows:
    """The audited rows in one order: each one's split, the RawSplit it came from and its position there, its encoded
    label, and (once the folds ran) its out-of-sample outputs."""

    splits: list  # split name per row
    parts: list  # RawSplit per row
    positions: list  # position in its RawSplit
    labels: list  # encoded label per row (a tag row for token classification)
    outputs: list | None = None  # out-of-sample logits per row
    label_names: list | None = None
    held_out_from_train: bool = False  # the validation rows are part of data.train's file


def audit(recipe, folds: int = 5, finetune: bool = False, output: str | Path | None = None,
          clean: str | Path | None = None, say=print) -> dict:
    """Audit the recipe's training and validation labels; returns {"issues", "rows", "csv", "clean"}."""
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        raise FinetuneError("audit: needs cleanlab, which is not installed; pip install 'finetune[trust]'") from None
    problem = problems.get(recipe.head.problem)
    if problem.audit_refusal is not None:
        raise FinetuneError(problem.audit_refusal)
    if getattr(recipe, "contrastive", None) is not None:
        raise FinetuneError("audit: contrastive: the audit trains plain heads (or fine-tunes) per fold; set "
                            "contrastive=null for the audit")
    if folds < 2:
        raise FinetuneError(f"--folds: at least 2 folds are needed, got {folds}")
    out = Path(output) if output is not None else Path(recipe.output.dir) / "audit"
    clean_path = Path(clean) if clean is not None else None
    if clean_path is not None and _same_file(clean_path, recipe.data.train):
        raise FinetuneError(f"--clean: {clean_path} is data.train itself; the input files are never changed, name "
                            "another file")
    if clean_path is not None or finetune:  # refused before the folds run, not after
        source = data_file(recipe.data.train, "data.train")
        if clean_path is not None:
            check_clean_suffix(clean_path, source.suffix.lower() if source.is_file() else ".csv")
    out.mkdir(parents=True, exist_ok=True)
    if finetune:
        rows = fine_tuned_outputs(recipe, folds, out, say)
    else:
        rows = probe_outputs(recipe, folds, say)
    issues, classes = problem.label_issues(rows.outputs, rows.labels, recipe.head.threshold)
    names = rows.label_names
    table = issue_table(rows, issues, problem, names)
    path = out / "label_issues.csv"
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    say(noise_lines(classes, names, len(rows.labels)))
    say(top_lines(table, len(rows.labels), path))
    written = None
    if clean_path is not None:
        written = clean_copy(recipe, rows, issues, clean_path, say)
    return {"issues": table, "rows": len(rows.labels), "csv": str(path), "clean": written}


def _same_file(path: Path, spec: str) -> bool:
    given = Path(spec).expanduser()
    return given.exists() and path.exists() and path.resolve() == given.resolve()


# ---------------------------------------------------------------------------------------------------------------
# The default: one pass of the frozen backbone, a fresh head per fold


def probe_recipe(recipe):
    """The recipe as a linear probe: the backbone frozen, no LoRA, no image augmentation (features are computed
    once, as evaluation preprocesses), and every word of a sentence scored on its first sub-token."""
    raw = to_dict(recipe)
    raw["train"]["freeze"] = "backbone"
    raw["train"]["ema"] = None
    raw["lora"] = None
    raw["augment"].update(scale=[1.0, 1.0], hflip=0.0, auto_augment=None, random_erasing=0.0, mixup=0.0, cutmix=0.0)
    raw["data"]["label_all_tokens"] = False
    return from_dict(raw)


def audited_rows(splits) -> Rows:
    """The training and validation rows in order, with where each came from (Splits.parts) and its label."""
    rows = Rows([], [], [], [])
    for key in AUDITED:
        table, part = getattr(splits, key), splits.parts.get(key)
        if table is None or part is None:
            continue
        count = len(table["label"])
        rows.splits += [key] * count
        rows.parts += [part] * count
        rows.positions += list(range(count))
    rows.label_names = splits.label_names
    rows.held_out_from_train = bool(splits.info.get("validation_held_out_from_train"))
    return rows


def fold_indices(rows: Rows, problem, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(training, held-out) positions of each fold, stratified on the problem's strata, seeded by train.seed."""
    from sklearn.model_selection import StratifiedKFold

    strata = problem.strata([part.labels[i] for part, i in zip(rows.parts, rows.positions)])
    if len(strata) < folds:
        raise FinetuneError(f"--folds: {folds} folds need at least {folds} training and validation rows, the data has "
                            f"{len(strata)}")
    try:
        return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(strata)), strata))
    except ValueError as error:
        raise FinetuneError(f"--folds: {error}; use fewer folds") from None


def probe_outputs(recipe, folds: int, say) -> Rows:
    """Out-of-sample logits of every training and validation row from a head per fold on the frozen backbone's
    features (computed once, through the kit's feature cache); where the head cannot be separated from the backbone
    (a token-classification model), each fold's head trains through the frozen backbone instead."""
    import torch
    from accelerate.utils import set_seed

    from finetune import transfer

    probe = probe_recipe(recipe)
    problem = problems.get(probe.head.problem)
    accelerator = fp32_accelerator()
    set_seed(probe.train.seed)
    job = get_task(probe.task).job(probe, accelerator)
    for warning in job.warnings:
        say(f"warning: {warning}")
    rows = audited_rows(job.splits)
    depths, top = transfer.layer_ids(job.model)
    transfer.apply_freeze(job.model, top + 1, depths)
    model = job.model.to(accelerator.device)
    features_fn = transfer.feature_function(model)
    datasets = [job.datasets[key] for key in AUDITED if key in job.datasets]
    if features_fn is not None:
        data = _features(model, features_fn, job, datasets, accelerator.device, say, probe.head.pooling)
        model = transfer.CachedHead(model)
    else:
        say("the head cannot be separated from this backbone: each fold trains it through the frozen backbone")
        data = _joined(datasets)
    rows.labels = transfer.labels_of(data)
    # a head on fixed features costs little per epoch: fit it well; through the backbone, the recipe's epochs
    epochs = max(probe.train.epochs, MIN_HEAD_EPOCHS) if features_fn is not None else probe.train.epochs
    start = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    rows.outputs = [None] * len(rows.labels)
    for number, (kept, held) in enumerate(fold_indices(rows, problem, folds, probe.train.seed), 1):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in start:
                    p.copy_(start[name])
        torch.manual_seed(probe.train.seed + number)
        fit_head(model, _loader(job, data, kept, probe, True), problem, probe, accelerator.device, epochs)
        for position, logits in held_out_logits(model, _loader(job, data, held, probe, False), accelerator.device):
            rows.outputs[position] = logits
        say(f"fold {number}/{folds}: head trained on {len(kept)} rows, {len(held)} rows scored")
    return rows


def fp32_accelerator():
    """An Accelerator for the task's job (its loaders and device), at fp32 whatever an earlier run in this process
    asked (accelerate keeps one state per process)."""
    import torch
    from accelerate import Accelerator

    from finetune.precision import allow_accelerator_at

    allow_accelerator_at("no")
    return Accelerator(cpu=not torch.accelerator.is_available(), mixed_precision="no")


def _features(model, features_fn, job, datasets, device, say, pooling: str):
    """The frozen backbone's features of the audited splits, from the disk cache a probe run (`train.freeze:
    backbone`, fp32) also fills: the same keys."""
    import torch

    from finetune import transfer

    model_key = transfer.model_fingerprint(model)
    features = [
        transfer.cached_features(
            model, features_fn, dataset, lambda d: job.make_loader(d, 64, False),
            {"split": key, "model": model_key, "data": transfer.dataset_fingerprint(dataset),
             "pooling": pooling, "kind": type(model).__name__},
            device, say,
        )
        for key, dataset in zip(AUDITED, datasets)
    ]
    labels = [label for dataset in datasets for label in transfer.labels_of(dataset)]
    return transfer.FeatureDataset(torch.cat(features), labels)


def _joined(datasets):
    """The audited splits' tokenised rows as one data set (train's rows first)."""
    from datasets import concatenate_datasets

    return concatenate_datasets(list(datasets)) if len(datasets) > 1 else datasets[0]


def _loader(job, data, positions, recipe, training: bool):
    """Batches of the rows at `positions`: cached features in a plain loader, else the task's own loader."""
    import torch
    from torch.utils.data import DataLoader, Subset

    positions = [int(i) for i in positions]
    if hasattr(data, "select"):
        return job.make_loader(data.select(positions), recipe.train.batch_size, training), positions

    def collate(items):
        return {"features": torch.stack([item["features"] for item in items]),
                "labels": torch.tensor([item["labels"] for item in items])}

    generator = torch.Generator().manual_seed(recipe.train.seed)
    loader = DataLoader(Subset(data, positions), batch_size=recipe.train.batch_size, shuffle=training,
                        generator=generator, collate_fn=collate)
    return loader, positions


def fit_head(model, loader_and_rows, problem, recipe, device, epochs: int) -> None:
    """The trainable part (the head) fitted with AdamW at the head's lr on the fold's rows."""
    import torch

    from finetune.loop import logits_of

    loader, _ = loader_and_rows
    t = recipe.train
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=max(t.head_lr or t.lr, MIN_HEAD_LR), weight_decay=t.weight_decay)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            loss = problem.loss(logits_of(model(**batch)), labels, t.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def held_out_logits(model, loader_and_rows, device):
    """(position in the audited rows, logits) of each held-out row, whatever order the loader reads them in."""
    import torch

    from finetune.loop import logits_of

    loader, positions = loader_and_rows
    model.eval()
    order = list(iter(loader.sampler))
    outputs = []
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            outputs += list(logits_of(model(**batch)).float().cpu().numpy())
    return [(positions[i], logits) for i, logits in zip(order, outputs)]


# ---------------------------------------------------------------------------------------------------------------
# --finetune: an ordinary run per fold


def fine_tuned_outputs(recipe, folds: int, out: Path, say) -> Rows:
    """Each fold an ordinary run of the recipe (finetune.train) on the other folds' rows, written as copies of
    data.train (and data.validation) without the held-out rows under OUT/folds/fold-N/; the held-out rows are then
    scored by that run's exported model, through the task's own evaluation loader."""

    from finetune import transfer
    from finetune.train import train

    task, problem = get_task(recipe.task), problems.get(recipe.head.problem)
    scoring = probe_recipe(recipe)  # its data and loaders only: evaluation preprocessing, a word on its first piece
    accelerator = fp32_accelerator()
    device = accelerator.device
    job = task.job(scoring, accelerator)
    rows = audited_rows(job.splits)
    datasets = [job.datasets[key] for key in AUDITED if key in job.datasets]
    if not all(hasattr(dataset, "select") for dataset in datasets):
        raise FinetuneError(f"--finetune: not available for {task.name} yet; audit on the frozen backbone's features "
                            "(without --finetune)")
    data = _joined(datasets)
    rows.labels, rows.outputs = transfer.labels_of(data), [None] * len(data)
    for number, (_, held) in enumerate(fold_indices(rows, problem, folds, recipe.train.seed), 1):
        folder = out / "folds" / f"fold-{number}"
        say(f"fold {number}/{folds}: fine-tuning on the other folds' rows in {folder / 'run'}")
        train(fold_recipe(recipe, rows, held, folder), overwrite=True, plots=False, checkpoints=False)
        model, _, spec = task.load_model_folder(folder / "run" / "model")
        if list(spec.get("labels") or []) != list(rows.label_names or []):
            raise FinetuneError(f"--folds: fold {number}'s training rows lack a label the data has; use fewer folds")
        model.to(device)
        for position, logits in held_out_logits(model, _loader(job, data, held, scoring, False), device):
            rows.outputs[position] = logits
    return rows


def fold_recipe(recipe, rows: Rows, held, folder: Path):
    """The recipe on copies of its data files without the fold's held-out rows (no test split: nothing to test)."""
    dropped: dict[str, set] = {"train": set(), "validation": set()}
    for i in held:
        key = "train" if rows.splits[i] == "train" or rows.held_out_from_train else "validation"
        dropped[key].add(rows.parts[i].rows[rows.positions[i]])
    raw = to_dict(recipe)
    folder.mkdir(parents=True, exist_ok=True)
    for key, rows_out in dropped.items():
        spec = getattr(recipe.data, key)
        if spec is None:
            continue
        target = folder / f"{key}{Path(spec).suffix or '.csv'}"  # an image folder is copied as a csv list
        get_task(recipe.task).write_without(spec, recipe, rows_out, target)
        raw["data"][key] = str(target)
    raw["data"]["test"] = None
    raw["output"]["dir"] = str(folder / "run")
    raw["hub"]["repo_id"] = None
    return from_dict(raw)


# ---------------------------------------------------------------------------------------------------------------
# What the audit writes and prints


def issue_table(rows: Rows, issues: list, problem, names: list[str]) -> list[dict]:
    """label_issues.csv's rows, most suspicious (lowest label quality) first, each named by its file and line (or
    row, path or zoo name) as the data layer names it."""
    wanted: dict[int, tuple] = {}
    for row, *_ in issues:
        part = rows.parts[row]
        wanted.setdefault(id(part), (part, set()))[1].add(rows.positions[row])
    wheres = {}
    for part, positions in wanted.values():  # a line-based file is read once per split
        ordered = sorted(positions)
        wheres.update({(id(part), p): where for p, where in zip(ordered, where_rows(part, ordered))})
    table = []
    for row, word, given, suggested, quality in sorted(issues, key=lambda issue: issue[4]):
        part, position = rows.parts[row], rows.positions[row]
        where, source = wheres[(id(part), position)], part.source
        location = where[len(source):].strip().strip("()") if where.startswith(source) else where
        if word is not None:
            location = f"{location}, word {word + 1}"
        table.append({
            "split": rows.splits[row], "file": source.strip("'"), "location": location,
            "input": shown_input(part.texts[position], word, part.pairs[position] if part.pairs else None),
            "given_label": problem.label_text(given, names), "suggested_label": problem.label_text(suggested, names),
            "label_quality": f"{quality:.4f}",
        })
    return table


def shown_input(value, word: int | None, pair=None) -> str:
    """An input as the CSV shows it: a text (and its pair), the words of a sentence with the flagged one in
    [[brackets]], or an image's path."""
    if isinstance(value, (list, tuple)):
        return " ".join(f"[[{w}]]" if i == word else str(w) for i, w in enumerate(value))
    if isinstance(value, dict):
        return str(value.get("path") or "(image bytes)")
    return str(value) if pair is None else f"{value} [SEP] {pair}"


def noise_lines(classes, names: list[str], count: int) -> str:
    """cleanlab's per-class estimate: rows flagged, and the share of each label's rows estimated mislabelled."""
    lines = [f"estimated label noise per class ({count} rows audited; cleanlab's confident joint):",
             f"  {'label':24} {'issues':>7} {'noise':>7} {'quality':>8}"]
    for _, entry in classes.sort_values("Class Index").iterrows():
        name = names[int(entry["Class Index"])]
        lines.append(f"  {name[:24]:24} {int(entry['Label Issues']):>7} {entry['Label Noise']:>7.1%} "
                     f"{entry['Label Quality Score']:>8.3f}")
    return "\n".join(lines)


def top_lines(table: list[dict], count: int, path: Path, shown: int = 10) -> str:
    lines = [f"{len(table)} likely label issues among {count} rows (most suspicious first); all in {path}"]
    if table:
        lines.append(f"  {'quality':>7}  {'where':32} {'given':14} {'suggested':14} input")
    for entry in table[:shown]:
        where = f"{entry['file']} {entry['location']}"
        lines.append(f"  {entry['label_quality']:>7}  {where[-32:]:32} {entry['given_label'][:14]:14} "
                     f"{entry['suggested_label'][:14]:14} {entry['input'][:50]}")
    return "\n".join(lines)


def clean_copy(recipe, rows: Rows, issues: list, path: Path, say) -> dict:
    """--clean: data.train's file copied without its flagged rows (a flagged word drops its sentence), in the same
    format; validation rows from a file of their own stay where they are."""
    from_train = {"train", "validation"} if rows.held_out_from_train else {"train"}
    dropped = {rows.parts[row].rows[rows.positions[row]] for row, *_ in issues if rows.splits[row] in from_train}
    kept, written = get_task(recipe.task).write_without(recipe.data.train, recipe, dropped, path)
    say(f"--clean: wrote {written} ({kept} rows kept, {len(dropped)} flagged rows left out); "
        f"{recipe.data.train} is unchanged")
    return {"path": written, "kept": kept, "dropped": len(dropped)}

