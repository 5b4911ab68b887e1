"""The Optuna study behind a sweep: recipe and space loaded and checked, storage, heartbeat, sampler and pruner."""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import recipe as recipe_module
from finetune.errors import FinetuneError
from finetune.sweep.space import Param, parse_space

FINISHED = ("COMPLETE", "PRUNED")
# what --trials counts; a failed trial is run again by a rerun
STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


@dataclass
class Setup:
    recipe: Any  # the base Recipe (with its sweep section)
    base: dict  # the resolved base recipe as a dict, what every trial starts from
    params: list[Param]
    out: Path
    storage_text: str
    study_name: str
    direction: str


def load_setup(recipe_path: str, overrides: list[str], space_file: str | None = None) -> Setup:
    from finetune.metrics import higher_is_better

    path = recipe_module.find_recipe(recipe_path)
    recipe = recipe_module.load_recipe(path, overrides)
    if space_file is not None:
        section = _read_space_file(space_file)
        raw = recipe_module.to_dict(recipe)
        raw["sweep"] = {**(raw["sweep"] or {}), **section}
        recipe = recipe_module.from_dict(raw, source=space_file)
    if recipe.sweep is None:
        raise FinetuneError(
            f"{recipe_path}: no sweep section; add sweep: {{space: {{train.lr: {{loguniform: [1.0e-5, 3.0e-4]}}}}}} "
            "or pass --space FILE"
        )
    base = recipe_module.to_dict(recipe)
    base["sweep"] = None
    params = parse_space(recipe.sweep.space, base)
    direction = "maximize" if higher_is_better(recipe.sweep.metric) else "minimize"
    out = Path(recipe.output.dir)
    return Setup(recipe, base, params, out, "", "", direction)


def _read_space_file(space_file: str) -> dict:
    path = Path(space_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise FinetuneError(f"--space: cannot read '{space_file}' ({error.__class__.__name__})") from None
    section = recipe_module.parse_yaml(text, space_file)
    if not isinstance(section, dict):
        raise FinetuneError(f"{space_file}: expected what a recipe's sweep: section holds (space:, metric:, ...)")
    if "space" not in section:  # a bare mapping of dotted keys is the space itself
        section = {"space": section}
    return section


def _storage_path(text: str) -> Path | None:
    return Path(text[len("journal:"):]) if text.startswith("journal:") else None


def open_storage(text: str):
    """An Optuna storage: journal:<file> (processes on one machine) or a database URL (with heartbeats, so a
    killed worker's trial ends failed, on any machine)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    journal = _storage_path(text)
    try:
        if journal is not None:
            if not journal.parent.is_dir():
                raise FinetuneError(f"--storage: '{text}': the folder {journal.parent} does not exist; create it first")
            return optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
        return _database(database_url(text))
    except FinetuneError:
        raise
    except Exception as error:  # sqlalchemy and drivers raise many kinds; all mean the same thing here
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise FinetuneError(
            f"--storage: cannot open '{text}' ({error.__class__.__name__}: {first}); give journal:<file> or a "
            "reachable database URL (sqlite:///file.db, postgresql://user@host/db)"
        ) from None


def database_url(text: str) -> str:
    """SQLAlchemy reads a bare postgresql:// as psycopg2's; the sweep extra installs psycopg (3): say so."""
    scheme, sep, rest = text.partition("://")
    if scheme not in ("postgresql", "postgres") or not sep:
        return text
    try:
        import psycopg  # noqa: F401
    except ImportError:
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            raise FinetuneError(f"--storage: '{text}' needs a PostgreSQL driver; pip install \"finetune[sweep]\" "
                                "(it brings psycopg)") from None
        return f"postgresql://{rest}"
    return f"postgresql+psycopg://{rest}"


def _database(url: str):
    """Optuna's RDBStorage with heartbeats; a trial whose worker was killed is failed and queued again once with the
    same values (RetryFailedTrialCallback), so a rerun fills the study with every trial once. Workers started at
    the same moment on a new database race to create its tables: the loser tries again."""
    import time

    import optuna
    import sqlalchemy.exc

    interval, grace = heartbeat_settings()
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=interval, grace_period=grace, failed_trial_callback=retry_once(),
                engine_kwargs={"pool_pre_ping": True},
            )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == 2:
                raise
            time.sleep(0.5 + attempt)


def retry_once():
    """A killed worker's trial runs again once with its values (a grid point is not lost); a second kill on the same
    values (they exhaust the memory?) leaves it failed and the sampler moves on."""
    import optuna

    return optuna.storages.RetryFailedTrialCallback(max_retry=1)


@contextlib.contextmanager
def study_lock(study):
    """Workers on other machines share no sweep folder (its file lock): on PostgreSQL they take turns to count the
    finished trials and start one through an advisory lock on the study, released by the database when a worker
    dies holding it. Other storages: the sweep folder's lock alone (workers on one machine)."""
    storage = study._storage
    engine = getattr(getattr(storage, "_backend", storage), "engine", None)
    if engine is None or engine.dialect.name != "postgresql":
        yield
        return
    from sqlalchemy import text

    key = {"kind": ADVISORY_LOCK_KIND, "study": study._study_id}
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:kind, :study)"), key)
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:kind, :study)"), key)
            connection.commit()


ADVISORY_LOCK_KIND = 0x5357EE  # the first key of the sweep's advisory locks (the second: the study's id)


HEARTBEAT_ENV = "FINETUNE_SWEEP_HEARTBEAT"
HEARTBEAT = (30, 120)  # seconds: a database storage's heartbeat interval and grace period


def heartbeat_settings() -> tuple[int, int]:
    """A database storage's heartbeat: every interval seconds a running trial's worker records that it is alive;
    a trial silent for the grace period is failed by the next worker that starts a trial. $FINETUNE_SWEEP_HEARTBEAT
    ("INTERVAL[,GRACE]", whole seconds) changes the default 30,120."""
    text = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not text:
        return HEARTBEAT
    try:
        parts = [int(part) for part in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts.append(4 * parts[0])
    if len(parts) != 2 or parts[0] < 1 or parts[1] <= parts[0]:
        raise FinetuneError(f"${HEARTBEAT_ENV}: '{text}' is not INTERVAL[,GRACE] in whole seconds with GRACE above "
                            f"INTERVAL, e.g. {HEARTBEAT[0]},{HEARTBEAT[1]}")
    return parts[0], parts[1]


@contextlib.contextmanager
def heartbeat(study, trial):
    """While the trial runs, record its heartbeat in a storage that keeps them (a database); else nothing."""
    import threading

    storage = study._storage
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if not interval or not hasattr(storage, "record_heartbeat"):
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a database hiccup must not end the trial; the next beat retries
                storage.record_heartbeat(trial._trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"sweep-heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_stale_trials(study) -> list[int]:
    """Running trials whose heartbeat stopped for the grace period (a worker on any machine killed) end failed."""
    import warnings

    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    if not (hasattr(storage, "get_heartbeat_interval") and storage.get_heartbeat_interval()):
        return []
    running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    if not running:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks fail_stale_trials experimental
        optuna.storages.fail_stale_trials(study)
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    return [number for number in running if states.get(number) == TrialState.FAIL]


def _space_signature(setup: Setup) -> dict:
    return {"space": {p.key: p.spec() for p in setup.params}, "metric": setup.recipe.sweep.metric,
            "direction": setup.direction}


def check_study(setup: Setup, storage) -> None:
    """A study of this name must have been made with the same space and direction (a reused name with another
    space would mix the trials of two searches); a new study needs a sweep folder without others' trials."""
    existing = None
    if storage is not None:
        try:
            existing = storage.get_study_id_from_name(setup.study_name)
        except KeyError:
            existing = None
    if existing is not None:
        before = storage.get_study_user_attrs(existing).get("sweep")
        directions = [d.name.lower() for d in storage.get_study_directions(existing)]
        if directions != [setup.direction] or (before is not None and before != _json_values(_space_signature(setup))):
            changed = "direction" if directions != [setup.direction] else "space or metric"
            raise FinetuneError(
                f"--study: '{setup.study_name}' in {setup.storage_text} was made with another {changed}; pass "
                "--study <new name> for a new search, or the same sweep section to continue this one"
            )
    elif (setup.out / "trials").is_dir() and any((setup.out / "trials").iterdir()):
        raise FinetuneError(
            f"output.dir: '{setup.out}' holds the trials of another study; set output.dir=<new folder>, or pass the "
            "--study and --storage that made them"
        )


def _json_values(value):
    return json.loads(json.dumps(value))


def open_study(setup: Setup, storage):
    """Create the study, or join it (several workers may do this at once)."""
    import optuna

    study = optuna.create_study(
        storage=storage, study_name=setup.study_name, direction=setup.direction, load_if_exists=True,
        sampler=build_sampler(setup), pruner=build_pruner(setup),
    )
    if "sweep" not in study.user_attrs:
        study.set_user_attr("sweep", _json_values(_space_signature(setup)))
    return study


def _grid_sampler_class():
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's grid, without its call to study.stop() (meant for study.optimize): the sweep's own loop stops
        at the grid's size."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

    return GridSampler


def _GridSampler(*args, **kwargs):  # a class made on first use: optuna is imported late
    return _grid_sampler_class()(*args, **kwargs)


def build_sampler(setup: Setup):
    import optuna

    s = setup.recipe.sweep
    if s.sampler == "grid":
        return _GridSampler({p.key: p.grid() for p in setup.params}, seed=s.seed)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    # constant_liar: workers running at once see each other's running trials and spread out
    return optuna.samplers.TPESampler(n_startup_trials=s.startup_trials, seed=s.seed, constant_liar=True)


def first_prunable_epoch(recipe) -> int:
    """The first epoch after which the pruner may stop a trial: sweep.min_epochs, by default the first past half of
    train.epochs. Under a decaying lr schedule a high-lr trial is still noisy in its first epochs and often ends best
    (pruned after epoch 1 of 2, such trials lost the kit's benchmark sweep its best lr)."""
    s = recipe.sweep
    return s.min_epochs if s.min_epochs is not None else recipe.train.epochs // 2 + 1


def build_pruner(setup: Setup):
    import optuna

    s = setup.recipe.sweep
    first = first_prunable_epoch(setup.recipe)  # epochs are the pruner's steps, counted from 1
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s.startup_trials, n_warmup_steps=first)
    if s.pruner == "hyperband":
        epochs = setup.recipe.train.epochs
        return optuna.pruners.HyperbandPruner(min_resource=min(first, epochs), max_resource=epochs)
    return optuna.pruners.NopPruner()


def grid_size(params: list[Param]) -> int:
    return math.prod(len(p.grid()) for p in params)


# ---------------------------------------------------------------------------------------------------------------
# What the trials and the report share: the folder's lock and files, the study's counts, a trial's value.


@contextlib.contextmanager
def sweep_lock(out: Path):
    """Workers sharing output.dir take turns to count the finished trials and start one (no more than --trials)."""
    import fcntl

    with open(out / ".sweep.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def count_states(study) -> dict:
    counts: dict = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def best_of(epochs: list[dict], metric: str) -> float | None:
    """The best validation value of metric over the epochs run (the objective: not the last epoch's)."""
    from finetune.metrics import is_improvement

    best = None
    for entry in epochs:
        value = entry["validation"][metric]
        if is_improvement(metric, value, best):
            best = value
    return best


def write_json(path: Path, content: dict) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(content, indent=1, default=str) + "\n")
    os.replace(temporary, path)
