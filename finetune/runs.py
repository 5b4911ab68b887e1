"""Run comparison: one row per run folder (recipe, backbone, key settings, best and test metric, time)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import yaml

from finetune.errors import FinetuneError
from finetune.recipe import Head

SKIP_FOLDERS = {"model", "checkpoints", "plots", "tensorboard", "adapter"}  # inside a run: never runs themselves
MAX_DEPTH = 4


def find_runs(folder: Path) -> list[Path]:
    """The run folders (those holding config.yaml) at or under folder, sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FinetuneError(f"{folder}: no such folder; `finetune ls RUNS_FOLDER` lists the runs inside one")
    if (folder / "config.yaml").is_file():
        return [folder]
    found, frontier = [], [folder]
    for _ in range(MAX_DEPTH):
        children = []
        for parent in frontier:
            for child in sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if (child / "config.yaml").is_file():
                    found.append(child)
                elif child.name not in SKIP_FOLDERS:
                    children.append(child)
        frontier = children
    return sorted(found)


def read_mapping(path: Path, reader) -> dict:
    """The mapping a file holds (reader: json.loads or yaml.safe_load); {} when missing, unreadable or not a mapping."""
    try:
        value = reader(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _input_size(task, data: dict) -> str | None:
    """The task's note on the input size ("len 128", "224px"); an old or hand-edited config may name no known task."""
    from finetune.tasks import TASKS, get_task

    if task in TASKS:
        return get_task(task).settings_note(data)
    return f"len {data['max_length']}" if data.get("max_length") else None


def _settings(config: dict, metrics: dict) -> str:
    train, data, head = config.get("train") or {}, config.get("data") or {}, config.get("head") or {}
    epochs = train.get("epochs")
    done = len(metrics.get("epochs") or [])
    parts = [f"ep {done}/{epochs}" if metrics and done != epochs else f"ep {epochs}"]
    parts.append(
        f"bs {train.get('batch_size')}" + (f"x{train['grad_accum']}" if (train.get("grad_accum") or 1) > 1 else "")
    )
    if isinstance(train.get("lr"), (int, float)):
        parts.append(f"lr {train['lr']:g}")
    size = _input_size(config.get("task"), data)
    if size:
        parts.append(size)
    kind = head.get("type", "linear")
    if head.get("hidden"):
        kind += "[" + ",".join(map(str, head["hidden"])) + "]"
    if head.get("pooling") not in (None, "auto"):
        kind += f"/{head['pooling']}"
    parts.append(kind)
    if head.get("problem") not in (None, Head.problem):  # the schema's default goes unsaid
        parts.append(head["problem"].replace("_", "-"))
    if isinstance(config.get("lora"), dict):
        parts.append(f"lora r{config['lora'].get('r')}")
    if not (config.get("backbone") or {}).get("pretrained", True):
        parts.append("from scratch")
    return ", ".join(parts)


def run_summary(run_dir: Path, root: Path) -> dict:
    """What `finetune ls RUNS` shows of one run, from its config.yaml and metrics.json (either may be missing)."""
    config = read_mapping(run_dir / "config.yaml", yaml.safe_load)
    metrics_path = run_dir / "metrics.json"
    metrics = read_mapping(metrics_path, json.loads)
    select = (config.get("eval") or {}).get("select_best") or "loss"
    best, test = metrics.get("best") or {}, metrics.get("test") or {}
    relative = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
    finished = None
    if metrics:
        finished = datetime.datetime.fromtimestamp(metrics_path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    return {
        "run": relative or run_dir.name,
        "task": config.get("task"),
        "backbone": (config.get("backbone") or {}).get("name"),
        "data": (config.get("data") or {}).get("train"),
        "settings": _settings(config, metrics),
        "metric": select,
        "best": best.get(select),
        "best_epoch": best.get("epoch"),
        "best_step": best.get("step"),  # train.eval_every: the evaluation's optimizer step
        "test": test.get(select),
        "seconds": (metrics.get("train") or {}).get("seconds"),
        "finished": finished,
        "learned": (metrics.get("health") or {}).get("learned"),  # False: finetune.health found it learned nothing
        "status": "done" if metrics else (_trial_state(run_dir) or ("unfinished" if config else "unreadable")),
    }


def _trial_state(run_dir: Path) -> str | None:
    """A sweep's unfinished trial says why in trial.json (finetune.sweep writes it): pruned or failed."""
    state = read_mapping(run_dir / "trial.json", json.loads).get("state")
    return state if state in ("pruned", "failed") else None


def _short(value, width: int) -> str:
    text = "-" if value is None else str(value)
    if len(text) > width:
        return "…" + text[-(width - 1):]  # paths: the end (the file or model name) says the most
    return text


def format_runs(rows: list[dict]) -> str:
    """A fixed-width table, one line per run."""
    table = [("run", "backbone", "data", "settings", "best (validation)", "test", "time", "finished")]
    for row in rows:
        if row["status"] != "done":
            best = test = row["status"]
        else:
            at = f"step {row['best_step']}" if row.get("best_step") is not None else row["best_epoch"]
            best = f"{row['metric']} {row['best']:.4f} @{at}" if isinstance(row["best"], float) else "-"
            best += " (learned nothing)" if row.get("learned") is False else ""
            test = f"{row['test']:.4f}" if isinstance(row["test"], float) else "-"
        table.append((
            _short(row["run"], 32), _short(row["backbone"], 24), _short(row["data"], 24), row["settings"], best, test,
            _duration(row["seconds"]), row["finished"] or "-",
        ))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table)
