"""`finetune report`: one self-contained HTML page comparing the runs in a folder (a sweep's trials included)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import yaml

from finetune.checkpoints import flatten
from finetune.errors import FinetuneError
from finetune.plots import evaluated_at, evaluations
from finetune.runs import find_runs, read_mapping, run_summary

# The pictures each run already drew (finetune.plots and the calibration's reliability plot): embedded, not linked,
# so the page can be mailed or attached to a ticket on its own.
RUN_PICTURES = (("Confusion matrix", "confusion.png"), ("Reliability", "reliability.png"))
MAX_SETTING_COLUMNS = 8  # the table's settings, the recipe's main sections first; all differences are further down
SECTION_ORDER = ("train", "backbone", "head", "lora", "data", "augment", "eval", "task")


def differing_keys(configs: list[dict[str, object]]) -> list[str]:
    """The dotted keys whose value is not the same in every run (a key missing from a run counts as differing)."""
    keys = sorted({key for config in configs for key in config})
    return [key for key in keys if len({json.dumps(c.get(key, "<unset>"), sort_keys=True, default=str)
                                        for c in configs}) > 1]


class RunView:
    """What the page shows of one run folder."""

    def __init__(self, folder: Path, root: Path):
        self.folder = folder
        self.summary = run_summary(folder, root)
        self.config = flatten(read_mapping(folder / "config.yaml", yaml.safe_load))
        self.metrics = read_mapping(folder / "metrics.json", json.loads)

    @property
    def name(self) -> str:
        return self.summary["run"]

    def validation_points(self) -> tuple[list[int], list[dict], str]:
        """(x, validation dicts, unit): one point per evaluation, at its epoch or, when the run validated every
        train.eval_every steps, at its optimizer step."""
        epochs = [e for e in evaluations(self.metrics) if "validation" in e]
        x, unit = evaluated_at(epochs, self.metrics.get("best") or {})
        return x, [e["validation"] for e in epochs], unit


def _png(figure) -> str:
    """A matplotlib figure as a data: URI (and the figure closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def curves_figure(runs: list[RunView], metric: str):
    """Every run's validation `metric` on one axis (None when no run evaluated it)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []
    for run in runs:
        x, validations, unit = run.validation_points()
        points = [(at, v[metric]) for at, v in zip(x, validations) if isinstance(v.get(metric), (int, float))]
        if points:
            lines.append((run.name, points, unit))
    if not lines:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    for name, points, _ in lines:
        axis.plot(*zip(*points), "o-", label=name, markersize=3)
    units = {unit for _, _, unit in lines}
    axis.set_xlabel("epoch" if units == {"epoch"} else "epoch or optimizer step")
    axis.set_ylabel(f"validation {metric}")
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    if len(lines) <= 12:  # beyond that a legend hides the curves; the table names the runs
        axis.legend(fontsize=7)
    return figure


def _shown_and_key(value, digits: str) -> tuple[str, str]:
    """(text shown, sort key): numbers sort as numbers, a missing value ("-") sorts last."""
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        text = "-" if value is None else json.dumps(value) if not isinstance(value, bool) else str(value).lower()
        return text, text
    if isinstance(value, (int, float)):
        return (format(value, digits) if isinstance(value, float) else str(value)), repr(float(value))
    return str(value), str(value)


def setting_columns(differing: list[str]) -> list[str]:
    """The settings worth a column: the recipe's main sections first; output.* differs in every run and says nothing."""
    def rank(key: str) -> int:
        section = key.split(".")[0]
        return SECTION_ORDER.index(section) if section in SECTION_ORDER else len(SECTION_ORDER)

    return sorted((k for k in differing if not k.startswith("output.")), key=rank)[:MAX_SETTING_COLUMNS]


def table_rows(runs: list[RunView], settings: list[str], metric: str) -> tuple[list[str], list[list]]:
    """The sortable table: run, status, the best validation and the test metrics, time, the differing settings."""
    test_names = sorted({name for run in runs for name in (run.metrics.get("test") or {})})
    header = ["run", "status", f"validation {metric} (kept)", *[f"test {n}" for n in test_names], "seconds",
              *settings]
    rows = []
    for run in runs:
        status = run.summary["status"] + (" (learned nothing)" if run.summary.get("learned") is False else "")
        test = run.metrics.get("test") or {}
        best = (run.metrics.get("best") or {}).get(metric)
        rows.append([run.name, status, best, *[test.get(name) for name in test_names],
                     run.summary.get("seconds"), *[run.config.get(key) for key in settings]])
    return header, rows


def _table_html(header: list[str], rows: list[list], table_id: str, sortable: bool, formats=()) -> str:
    """A table; column i shows floats in formats[i] (default: as written, "g")."""
    heads = "".join(f'<th>{html.escape(h)}</th>' for h in header)
    body = []
    for row in rows:
        cells = []
        for column, value in enumerate(row):
            text, key = _shown_and_key(value, formats[column] if column < len(formats) else "g")
            cells.append(f'<td data-sort="{html.escape(key)}">{html.escape(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    kind = ' class="sortable"' if sortable else ""
    return f'<table id="{table_id}"{kind}><thead><tr>{heads}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _pictures_html(run: RunView) -> str:
    pictures = []
    for title, name in RUN_PICTURES:
        path = run.folder / "plots" / name
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            pictures.append(f'<figure><img alt="{html.escape(title)} of {html.escape(run.name)}" '
                            f'src="data:image/png;base64,{data}"><figcaption>{html.escape(title)}</figcaption>'
                            "</figure>")
    if not pictures:
        return ""
    return f'<section class="run"><h3>{html.escape(run.name)}</h3>{"".join(pictures)}</section>'


SCRIPT = """
document.querySelectorAll('table.sortable th').forEach((th, column) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0];
  const ascending = th.dataset.order !== 'asc';
  th.closest('tr').querySelectorAll('th').forEach(h => delete h.dataset.order);
  th.dataset.order = ascending ? 'asc' : 'desc';
  const key = row => row.cells[column].dataset.sort;
  const numeric = [...body.rows].every(row => key(row) === '-' || !isNaN(parseFloat(key(row))));
  const compare = (a, b) => {
    if (key(a) === '-' || key(b) === '-') return (key(a) === '-') - (key(b) === '-');  // missing values last
    const order = numeric ? parseFloat(key(a)) - parseFloat(key(b)) : key(a).localeCompare(key(b));
    return ascending ? order : -order;
  };
  [...body.rows].sort(compare).forEach(row => body.appendChild(row));
}));
"""

STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .5em;font-size:.85em;text-align:left}th{background:#f2f2f2}
table.sortable th{cursor:pointer}th[data-order=asc]::after{content:" ▲"}th[data-order=desc]::after{content:" ▼"}
figure{display:inline-block;margin:0 1em 1em 0}img{max-width:480px}figcaption{font-size:.8em;color:#555}
.wide{overflow-x:auto}"""


def render(runs: list[RunView], folder: Path) -> str:
    """The page: the sortable table, the overlaid validation curves, each run's pictures, the recipe differences."""
    metrics = [run.summary.get("metric") or "loss" for run in runs]
    metric = max(set(metrics), key=metrics.count)  # runs of one study share it; a mixed folder shows the commonest
    configs = [run.config for run in runs]
    differing = differing_keys(configs)
    # Keys that change with every run (output.dir, seeds of trials) say nothing about settings: shown below only.
    settings = setting_columns(differing)
    header, rows = table_rows(runs, settings, metric)
    formats = ["g", "g"] + [".4f"] * (len(header) - len(settings) - 3) + [".0f"]  # metrics, then seconds
    parts = [f"<h1>Runs in {html.escape(str(folder))}</h1>", f"<p>{len(runs)} runs. Click a column to sort.</p>",
             '<div class="wide">' + _table_html(header, rows, "runs", True, formats) + "</div>"]
    for name in dict.fromkeys([metric, *sorted(set(metrics)), "loss"]):
        figure = curves_figure(runs, name)
        if figure is not None:
            parts.append(f'<h2>Validation {html.escape(name)}</h2><img class="curves" alt="validation {name}" '
                         f'src="{_png(figure)}">')
    pictures = "".join(_pictures_html(run) for run in runs)
    if pictures:
        parts.append("<h2>Each run</h2>" + pictures)
    if differing:
        diff_rows = [[key, *[c.get(key) for c in configs]] for key in differing]
        parts.append('<h2>Recipe differences</h2><div class="wide">'
                     + _table_html(["key", *[run.name for run in runs]], diff_rows, "differences", sortable=False)
                     + "</div>")
    else:
        parts.append("<h2>Recipe differences</h2><p>The runs share one recipe.</p>")
    return (f'<!doctype html><html lang="en"><meta charset="utf-8"><title>finetune report: '
            f'{html.escape(folder.name)}</title><style>{STYLE}</style><body>{"".join(parts)}'
            f"<script>{SCRIPT}</script></body></html>")


def write_runs_page(folder, output=None) -> Path:
    """Write the comparison page of the runs at or under folder; returns its path (default: folder/report.html)."""
    folder = Path(folder)
    runs = [RunView(run, folder) for run in find_runs(folder)]
    if not runs:
        raise FinetuneError(f"{folder}: no run folders inside (a run folder holds config.yaml); "
                            "point `finetune report` at the output.dir of your runs or of a sweep")
    output = Path(output) if output is not None else folder / "report.html"
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_text(render(runs, folder), encoding="utf-8")
    temporary.replace(output)
    return output
