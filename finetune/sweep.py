"""Hyperparameter sweeps on Optuna: the search space, trials as ordinary runs, pruning, the sweep folder."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from finetune import recipe as recipe_module
from finetune.errors import FinetuneError

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
FINISHED = ("COMPLETE", "PRUNED")
# what --trials counts; a failed trial is run again by a rerun
STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}
NOT_SEARCHABLE = ("output", "sweep", "hub")  # set per trial, or meaningless per trial
DEFAULT_JOURNAL = "study.journal"

# ---------------------------------------------------------------------------------------------------------------
# The search space.


@dataclass
class Param:
    """One searched key: a distribution over the values of a dotted recipe key."""

    key: str
    kind: str  # one of DISTRIBUTIONS
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: list | None = None

    def labels(self) -> list:
        """What Optuna stores for each choice: the value itself when it is a scalar, else its YAML text."""
        if all(c is None or isinstance(c, (bool, int, float, str)) for c in self.choices):
            return list(self.choices)
        return [_flow(c) for c in self.choices]

    def suggest(self, trial) -> Any:
        if self.kind == "choice":
            labels = self.labels()
            return self.choices[labels.index(trial.suggest_categorical(self.key, labels))]
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "loguniform")

    def value_of(self, stored) -> Any:
        """The recipe value behind what Optuna stored for this key."""
        return self.choices[self.labels().index(stored)] if self.kind == "choice" else stored

    def grid(self) -> list:
        if self.kind == "choice":
            return self.labels()
        if self.kind == "int":
            return list(range(self.low, self.high + 1))
        raise FinetuneError(
            f"sweep.space.{self.key}: sweep.sampler=grid needs choice or int distributions, not {self.kind}; "
            f"use sampler=tpe or random, or list the values as {{choice: [...]}}"
        )

    def representatives(self) -> list:
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def spec(self) -> dict:
        if self.kind == "choice":
            return {"choice": self.choices}
        spec = {self.kind: [self.low, self.high]}
        return spec | {"log": True} if self.log else spec


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip().removesuffix("...").strip()


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_param(key: str, spec: Any) -> Param:
    where = f"sweep.space.{key}"
    example = "e.g. {loguniform: [1.0e-5, 3.0e-4]}, {uniform: [0, 0.3]}, {int: [4, 32]} or {choice: [16, 32]}"
    if not isinstance(spec, dict):
        raise FinetuneError(f"{where}: expected a distribution, got {spec!r}; {example}")
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    extra = [k for k in spec if k not in DISTRIBUTIONS and not (k == "log" and kinds == ["int"])]
    if len(kinds) != 1 or extra:
        import difflib

        close = difflib.get_close_matches(str((extra or kinds or [""])[0]), DISTRIBUTIONS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close and extra else ""
        raise FinetuneError(f"{where}: expected one of {', '.join(DISTRIBUTIONS)}{hint}; {example}")
    kind, value = kinds[0], spec[kinds[0]]
    if kind == "choice":
        if not isinstance(value, list) or not value:
            raise FinetuneError(f"{where}: choice needs a non-empty list of values, e.g. {{choice: [16, 32]}}")
        labels = Param(key, kind, choices=value).labels()
        if len({json.dumps(v, sort_keys=True) for v in labels}) != len(labels):
            raise FinetuneError(f"{where}: choice lists a value twice; list each value once")
        return Param(key, kind, choices=value)
    if not (isinstance(value, list) and len(value) == 2 and all(map(_number, value))):
        raise FinetuneError(f"{where}: {kind} needs [lower, upper], two numbers, got {value!r}")
    low, high = value
    if low >= high:
        raise FinetuneError(f"{where}: {kind} lower bound {low} is not below the upper bound {high}; "
                            "give [lower, upper]")
    if kind == "loguniform" and low <= 0:
        raise FinetuneError(f"{where}: loguniform needs a lower bound above 0, got {low}; e.g. [1.0e-5, 3.0e-4]")
    if kind == "int":
        log = spec.get("log", False)
        if not all(isinstance(v, int) for v in value) or not isinstance(log, bool):
            raise FinetuneError(f"{where}: int needs two integers [lower, upper] and log true/false, got {spec!r}")
        if log and low < 1:
            raise FinetuneError(f"{where}: int with log: true needs a lower bound of at least 1, got {low}")
        return Param(key, kind, low, high, log=log)
    return Param(key, kind, float(low), float(high))


def parse_space(space: dict, base: dict) -> list[Param]:
    """The space as Params, parents before their children; each bound or choice is checked on the base recipe
    with the recipe's own validation, so a typo gets its "did you mean" and a bad value its reason."""
    if not space:
        raise FinetuneError(
            "sweep.space: nothing to search; add dotted recipe keys, e.g. sweep.space: {train.lr: {loguniform: "
            "[1.0e-5, 3.0e-4]}} (or pass --space FILE)"
        )
    params = [parse_param(str(key), spec) for key, spec in space.items()]
    for param in params:
        parts = param.key.split(".")
        if any(not part for part in parts):
            raise FinetuneError(f"sweep.space.{param.key}: not a dotted recipe key, e.g. train.lr")
        if parts[0] in NOT_SEARCHABLE:
            raise FinetuneError(f"sweep.space.{param.key}: {parts[0]}.* is set by the sweep, not searched; drop it")
        for value in param.representatives():
            raw = copy.deepcopy(base)
            set_dotted(raw, param.key, value)
            try:
                recipe_module.from_dict(raw, source=f"sweep.space.{param.key}={_flow(value)}")
            except FinetuneError as error:
                raise FinetuneError(f"{error}; fix sweep.space.{param.key}") from None
    return sorted(params, key=lambda p: p.key.count("."))  # stable: a section is set before the keys inside it


def set_dotted(raw: dict, key: str, value) -> None:
    """As a `key=value` override does it: missing or null sections on the way become mappings."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = copy.deepcopy(value)


def _switched_off(key: str, values: dict) -> bool:
    """A key inside a section that this trial set to null (lora.r when lora is null) is not searched."""
    parts = key.split(".")
    return any(values.get(".".join(parts[:i]), ...) is None for i in range(1, len(parts)))


def sample(params: list[Param], trial) -> dict:
    values: dict = {}
    for param in params:
        if not _switched_off(param.key, values):
            values[param.key] = param.suggest(trial)
    return values


def trial_recipe_dict(base: dict, values: dict, run_dir: Path) -> dict:
    raw = copy.deepcopy(base)
    raw["sweep"] = None
    for key, value in values.items():
        set_dotted(raw, key, value)
    raw.setdefault("output", {})["dir"] = str(run_dir)
    return raw


# ---------------------------------------------------------------------------------------------------------------
# Loading the sweep: recipe, space, study. Everything is checked before anything is written.


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
    killed worker's trial ends failed)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    journal = _storage_path(text)
    try:
        if journal is not None:
            if not journal.parent.is_dir():
                raise FinetuneError(f"--storage: '{text}': the folder {journal.parent} does not exist; create it first")
            return optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
        interval, grace = heartbeat_settings()
        return optuna.storages.RDBStorage(text, heartbeat_interval=interval, grace_period=grace,
                                          engine_kwargs={"pool_pre_ping": True})
    except FinetuneError:
        raise
    except Exception as error:  # sqlalchemy and drivers raise many kinds; all mean the same thing here
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise FinetuneError(
            f"--storage: cannot open '{text}' ({error.__class__.__name__}: {first}); give journal:<file> or a "
            "reachable database URL (sqlite:///file.db, postgresql://user@host/db)"
        ) from None


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
        if directions != [setup.direction] or (before is not None and before != _plain(_space_signature(setup))):
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


def _plain(value):
    return json.loads(json.dumps(value))


def open_study(setup: Setup, storage):
    """Create the study, or join it (several workers may do this at once)."""
    import optuna

    study = optuna.create_study(
        storage=storage, study_name=setup.study_name, direction=setup.direction, load_if_exists=True,
        sampler=build_sampler(setup), pruner=build_pruner(setup),
    )
    if "sweep" not in study.user_attrs:
        study.set_user_attr("sweep", _plain(_space_signature(setup)))
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
# Running trials.


@contextlib.contextmanager
def _sweep_lock(out: Path):
    """Workers sharing output.dir take turns to count the finished trials and start one (no more than --trials)."""
    import fcntl

    with open(out / ".sweep.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study) -> list[int]:
    """Running trials of workers on this machine that died (SIGKILL, power) end failed, so a rerun replaces them;
    a database storage's heartbeat does the same across machines."""
    from optuna.trial import TrialState

    host, failed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker") or {}
        if worker.get("host") == host and worker.get("pid") != os.getpid() and not _alive(int(worker.get("pid", 0))):
            study._storage.set_trial_user_attr(trial._trial_id, "error", "its worker died")
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            failed.append(trial.number)
    return failed


def share_cores(study, ranks: Ranks) -> str | None:
    """Workers on one machine share its cores: each takes cores // (workers running a trial here), so two workers
    do not run 2 x all-cores threads (measured: two 2-thread workers on 2 cores trained at 4-5 samples/s where one
    trains at 108). OMP_NUM_THREADS set by the user, or a multi-process worker (torchrun sets it), is left alone.
    Returns a line to print when the count changed."""
    import torch
    from optuna.trial import TrialState

    if os.environ.get("OMP_NUM_THREADS") or ranks.world > 1:
        return None
    host = socket.gethostname()
    others = set()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker") or {}
        pid = int(worker.get("pid") or 0)
        if worker.get("host") == host and pid not in (0, os.getpid()) and _alive(pid):
            others.add(pid)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // (len(others) + 1))
    if threads == torch.get_num_threads():
        return None
    torch.set_num_threads(threads)
    return (f"sweep: {len(others) + 1} workers on this machine: {threads} of its {cores} cores for this one's trials "
            "(OMP_NUM_THREADS sets it yourself)")


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


def _write_json(path: Path, content: dict) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(content, indent=1, default=str) + "\n")
    os.replace(temporary, path)


class Ranks:
    """The processes of one worker: one, or a torchrun/accelerate launch group. Rank 0 alone talks to the storage,
    asks for trials, reports to the pruner and writes the sweep folder; it broadcasts what the others need (an error,
    the next trial's number and values, each epoch's prune decision), so every rank runs the same trial as one
    multi-process run."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        self._state = None
        if self.world > 1:
            import torch
            from accelerate import PartialState

            # the group train()'s Accelerator joins (gloo on a CPU, as there)
            self._state = PartialState(cpu=not torch.accelerator.is_available())
            self.rank = self._state.process_index
            # every trial's train() ends with end_training(), which destroys the process group; accelerate keeps it
            # for fork-launched processes, which also run one training after another in one group. PartialState()
            # rereads the flag from FORK_LAUNCHED at each call, so the environment says it
            self._kept = os.environ.get("FORK_LAUNCHED")
            os.environ["FORK_LAUNCHED"] = "1"
            self._state.fork_launched = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, value=None):
        """Rank 0's value, on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self._state is not None:
            import torch.distributed as dist

            if self._kept is None:
                os.environ.pop("FORK_LAUNCHED", None)
            else:
                os.environ["FORK_LAUNCHED"] = self._kept
            self._state.fork_launched = self._kept not in (None, "", "0")
            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
            self._state = None


def run_trial(setup: Setup, study, trial, values: dict, say, ranks: Ranks | None = None) -> str | None:
    """One trial: an ordinary run in trials/<number>/, reporting each epoch's validation value to the pruner. On the
    ranks other than 0 of a multi-process worker, study and trial are None: they run the trial and follow rank 0's
    prune decisions."""
    import optuna
    from optuna.trial import TrialState

    from finetune.train import train

    ranks = ranks or Ranks()
    metric = setup.recipe.sweep.metric
    number = trial.number if ranks.main else values.pop("__number__")
    run_dir = setup.out / "trials" / str(number)
    seen: list[float] = []
    started = time.perf_counter()

    def report(epoch: int, validation: dict) -> None:
        seen.append(validation[metric])
        prune = None
        if ranks.main:
            trial.report(validation[metric], epoch)  # the last epoch too: later trials are compared with it
            prune = epoch < setup.recipe.train.epochs and trial.should_prune()  # a trial that ran all is complete
        if ranks.share(prune):
            raise optuna.TrialPruned(f"epoch {epoch}: validation {metric} {validation[metric]:.4f}")

    if not ranks.main:
        with contextlib.suppress(optuna.TrialPruned, Exception):  # rank 0 records how the trial ended
            recipe = recipe_module.from_dict(trial_recipe_dict(setup.base, values, run_dir), source=f"trial {number}")
            train(recipe, on_epoch=report, evaluate_test=False, plots=False, checkpoints=False)
        return

    shown = ", ".join(f"{k}={_flow(v)}" for k, v in values.items())
    say(f"trial {trial.number}: {shown} -> {run_dir}")
    record = {"number": number, "params": values, "run_dir": str(run_dir)}
    state, value, why = TrialState.FAIL, None, None
    try:
        recipe = recipe_module.from_dict(trial_recipe_dict(setup.base, values, run_dir), source=f"trial {number}")
        with heartbeat(study, trial):
            metrics = train(recipe, on_epoch=report, evaluate_test=False, plots=False, checkpoints=False)
        state, value = TrialState.COMPLETE, best_of(metrics["epochs"], metric)
    except optuna.TrialPruned as pruned:
        state, value, why = TrialState.PRUNED, best_of([{"validation": {metric: v}} for v in seen], metric), str(pruned)
        with contextlib.suppress(OSError), (run_dir / "train.log").open("a") as log:
            log.write(f"pruned by the {setup.recipe.sweep.pruner} pruner after {why}\n")
    except KeyboardInterrupt:
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as error:  # one bad trial (a combination the recipe rejects, a nan loss) ends only itself
        why = " ".join(f"{error.__class__.__name__}: {error}".split())[:500]
    seconds = time.perf_counter() - started
    trial.set_user_attr("seconds", seconds)
    if why:
        trial.set_user_attr("error" if state == TrialState.FAIL else "pruned", why)
    if state == TrialState.COMPLETE:
        study.tell(trial, value)
    else:
        study.tell(trial, state=state)
    if run_dir.is_dir():
        # a trial is never resumed (a rerun starts new ones): it wrote no resumable checkpoint, and the best epoch's
        # weights are in model/ now
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        _write_json(run_dir / "trial.json", record | {"state": STATE_NAMES[state.name], "value": value,
                                                        "seconds": seconds, "reason": why})
    say(f"trial {trial.number}: {STATE_NAMES[state.name]}" + (f" {metric} {value:.4f}" if value is not None else "")
        + (f" ({why})" if why else ""))
    return why if state == TrialState.FAIL else None


def sweep(recipe_path: str, overrides: list[str] = (), trials: int | None = None, timeout: float | None = None,
          storage: str | None = None, study: str | None = None, space: str | None = None) -> dict:
    """Run (or join, or resume) a study until it holds `trials` finished trials; write the sweep folder; return
    sweep.json's content (on rank 0 of a multi-process worker; the other ranks return {})."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise FinetuneError('sweep: Optuna is not installed; pip install "finetune[sweep]"') from None
    setup = load_setup(recipe_path, list(overrides), space)
    target = trials if trials is not None else setup.recipe.sweep.trials
    if target < 1:
        raise FinetuneError(f"--trials: must be at least 1, got {target}")
    if timeout is not None and timeout <= 0:
        raise FinetuneError(f"--timeout: must be a positive number of seconds, got {timeout}")
    if setup.recipe.sweep.sampler == "grid":
        target = min(target, grid_size(setup.params))
    if setup.out.exists() and not setup.out.is_dir():
        raise FinetuneError(f"output.dir: '{setup.out}' is a file; choose a folder path")
    setup.storage_text = storage or f"journal:{setup.out / DEFAULT_JOURNAL}"
    setup.study_name = study or setup.out.name
    ranks = Ranks()
    try:
        if not ranks.main:
            error = ranks.share()  # rank 0's checks of the storage and the study
            if error is not None:
                raise FinetuneError(error)
            _follow(setup, ranks)
            return {}
        try:
            opened = None
            if storage is not None or (setup.out / DEFAULT_JOURNAL).is_file():
                opened = open_storage(setup.storage_text)
            check_study(setup, opened)
            # everything is checked: from here on the sweep folder (and a new study) is written
            setup.out.mkdir(parents=True, exist_ok=True)
            (setup.out / "trials").mkdir(exist_ok=True)
            the_study = open_study(setup, opened or open_storage(setup.storage_text))
        except BaseException as error:
            ranks.share(str(error) if isinstance(error, FinetuneError) else f"sweep: {error.__class__.__name__} "
                        f"on rank 0: {error}")
            raise
        ranks.share(None)
        say = _say(setup.out)
        processes = f"; {ranks.world} processes per trial" if ranks.world > 1 else ""
        say(f"sweep: study '{setup.study_name}' in {setup.storage_text}; {target} finished trials wanted; "
            f"{setup.recipe.sweep.sampler} sampler, {setup.recipe.sweep.pruner} pruner, validation "
            f"{setup.recipe.sweep.metric} ({setup.direction}){processes}")
        try:
            _optimize(setup, the_study, target, timeout, say, ranks)
        finally:
            ranks.share(None)  # the other ranks stop (also when rank 0 failed)
        return write_report(setup, the_study, target, say)
    finally:
        ranks.close()


def _follow(setup: Setup, ranks: Ranks) -> None:
    """A rank other than 0: run each trial rank 0 sends, until it sends None."""
    while (values := ranks.share()) is not None:
        run_trial(setup, None, None, values, lambda message: None, ranks)


FAILURES_IN_A_ROW = 3  # a sampled value can break one trial; three in a row is the recipe or the data


def _optimize(setup: Setup, study, target: int, timeout: float | None, say, ranks: Ranks | None = None) -> None:
    from optuna.trial import TrialState

    ranks = ranks or Ranks()
    deadline = None if timeout is None else time.monotonic() + timeout
    failures: list[str] = []  # this worker's trials that failed in a row
    while deadline is None or time.monotonic() < deadline:
        with _sweep_lock(setup.out):
            for number in fail_dead_trials(study):
                say(f"trial {number}: failed (its worker died)")
            for number in fail_stale_trials(study):
                say(f"trial {number}: failed (no heartbeat from its worker for {heartbeat_settings()[1]} s)")
            counts = count_states(study)
            finished = sum(counts.get(state, 0) for state in FINISHED)
            if finished + counts.get("RUNNING", 0) >= target:
                break
            shared = share_cores(study, ranks)
            if shared:
                say(shared)
            trial = study.ask()
            trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
            try:
                values = sample(setup.params, trial)
            except Exception:
                study.tell(trial, state=TrialState.FAIL)
                raise
        if ranks.world > 1:
            ranks.share(values | {"__number__": trial.number})
        why = run_trial(setup, study, trial, values, say, ranks)
        failures = failures + [why] if why else []
        if len(failures) >= FAILURES_IN_A_ROW:  # failed trials are not finished ones: the study would never fill up
            raise FinetuneError(f"sweep: {len(failures)} trials in a row failed, the last with {failures[-1]}; fix "
                                "the recipe or data and rerun the same command (the study resumes)")


def _say(out: Path):
    def say(message: str) -> None:
        print(message, flush=True)
        with (out / "sweep.log").open("a") as log:
            log.write(message + "\n")

    return say


# ---------------------------------------------------------------------------------------------------------------
# The sweep folder: sweep.json, best.yaml, plots, the table; the test split for the best trial only.


def _trial_row(setup: Setup, trial) -> dict:
    by_key = {p.key: p for p in setup.params}
    params = {k: by_key[k].value_of(v) if k in by_key else v for k, v in trial.params.items()}
    value = trial.value
    if value is None and trial.intermediate_values:  # pruned: the best epoch it reached
        value = best_of([{"validation": {setup.recipe.sweep.metric: v}} for v in trial.intermediate_values.values()],
                        setup.recipe.sweep.metric)
    return {
        "number": trial.number,
        "state": STATE_NAMES[trial.state.name],
        "params": params,
        "value": value,
        "run_dir": str(setup.out / "trials" / str(trial.number)),
        "epochs": len(trial.intermediate_values),
        "seconds": trial.user_attrs.get("seconds"),
        **({"reason": _reason(trial)} if _reason(trial) else {}),
    }


def _reason(trial) -> str | None:
    reason = trial.user_attrs.get("error") or trial.user_attrs.get("pruned")
    if reason is None and trial.state.name == "FAIL" and "seconds" not in trial.user_attrs:
        reason = "its worker stopped mid-trial (its heartbeat ran out)"  # failed by fail_stale_trials
    return reason


def write_report(setup: Setup, study, target: int, say) -> dict:
    from optuna.trial import TrialState

    with _sweep_lock(setup.out):
        trials = study.get_trials(deepcopy=False)
        rows = [_trial_row(setup, t) for t in trials]
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        counts = count_states(study)
        finished = sum(counts.get(state, 0) for state in FINISHED)
        done = finished >= target and not counts.get("RUNNING")
        previous = _read_json(setup.out / "sweep.json")
        report = {
            "study": setup.study_name,
            "storage": setup.storage_text,
            "metric": setup.recipe.sweep.metric,
            "direction": setup.direction,
            "split": "validation",
            "sampler": setup.recipe.sweep.sampler,
            "pruner": setup.recipe.sweep.pruner,
            "requested_trials": target,
            "finished": done,
            "space": {p.key: p.spec() for p in setup.params},
            "trials": rows,
            "best": None,
        }
        if complete:
            best = study.best_trial
            row = next(r for r in rows if r["number"] == best.number)
            report["best"] = {k: row[k] for k in ("number", "params", "value", "run_dir")}
            report["best"]["recipe"] = str(setup.out / "best.yaml")
            _write_best_yaml(setup, best.number, row["value"])
            old_test = (previous.get("best") or {}).get("test")
            run_dir = Path(row["run_dir"])
            recipe, splits = _trial_data(run_dir)
            if old_test is not None and old_test.get("trial") == best.number:
                report["best"]["test"] = old_test
            elif done:
                report["best"]["test"] = _test_once(run_dir, recipe, splits, say)
            _card_for_best(run_dir, recipe, splits)
            report["test_note"] = (
                "the search saw validation values only; the test split is evaluated once, for the best trial only, "
                "when the study has finished" + ("" if done else " (not yet: trials are still to run)")
            )
        _write_json(setup.out / "sweep.json", report)
        write_plots(study, setup, setup.out / "plots")
    print(format_table(report), flush=True)
    where = (f"best trial {report['best']['number']}: {setup.out / 'best.yaml'}" if report["best"]
             else "no trial completed")
    say(f"sweep: {sum(1 for r in rows if r['state'] in ('complete', 'pruned'))} finished trials; {where}; "
        f"{setup.out / 'sweep.json'}")
    return report


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_best_yaml(setup: Setup, number: int, value: float) -> None:
    config = setup.out / "trials" / str(number) / "config.yaml"
    raw = recipe_module.parse_yaml(config.read_text(), str(config))
    raw["output"]["dir"] = str(setup.out / "best")
    recipe = recipe_module.from_dict(raw, source=str(config))
    header = (
        f"# The best trial ({number}) of sweep study '{setup.study_name}': validation {setup.recipe.sweep.metric} "
        f"{value:.6g}.\n# finetune run {setup.out / 'best.yaml'} trains it again (into output.dir) and reaches the "
        "same validation value.\n"
    )
    (setup.out / "best.yaml").write_text(header + recipe_module.to_yaml(recipe))


def _trial_data(run_dir: Path):
    """A trial's recipe (its config.yaml) and the splits it defines, test included."""
    from finetune.tasks import get_task

    recipe = recipe_module.from_dict(
        recipe_module.parse_yaml((run_dir / "config.yaml").read_text(), str(run_dir / "config.yaml"))
    )
    return recipe, get_task(recipe.task).load_splits(recipe)


def _test_once(run_dir: Path, recipe, splits, say) -> dict | None:
    """The best trial's kept model on the test split its recipe defines (the first and only look at it), read and
    scored as `finetune eval` scores a run: by the task (texts, pairs, images, a tag per word)."""
    import numpy as np

    from finetune.metrics import compute_metrics, predictions_from_logits
    from finetune.loading import load
    from finetune.tasks import get_task

    task = get_task(recipe.task)
    if splits.test is None:
        return None
    predictor = load(run_dir)
    raw = splits.parts["test"]
    batch_size = recipe.train.eval_batch_size or 2 * recipe.train.batch_size
    if not task.row_outputs:  # a tag per word: scored by the task, as `finetune eval` scores it
        scored = task.evaluate(predictor, raw, recipe, batch_size=batch_size)["metrics"]
        metrics, rows = {name: scored[name] for name in recipe.eval.metrics}, len(raw.texts)
    else:
        pairs = getattr(raw, "pairs", None)
        inputs = raw.texts if pairs is None else [{"text": a, "text_pair": b} for a, b in zip(raw.texts, pairs)]
        logits = predictor.logits(inputs, batch_size, False)
        problem = recipe.head.problem
        predictions = predictions_from_logits(logits, problem, recipe.head.threshold)
        truth = np.asarray(splits.test["label"])
        if problem == "regression":  # the exported model predicts in the targets' own units
            truth = truth.reshape(-1) * splits.target_std + splits.target_mean
        else:
            truth = truth.astype(np.int64)
        metrics, rows = compute_metrics(recipe.eval.metrics, truth, predictions), len(truth)
    metrics_path = run_dir / "metrics.json"
    run_metrics = _read_json(metrics_path)
    if run_metrics:
        _write_json(metrics_path, run_metrics | {"test": metrics})
    say("best trial on the test split: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return {"trial": int(run_dir.name), "rows": rows, **metrics}


def _card_for_best(run_dir: Path, recipe, splits) -> None:
    """The best trial's plots and model card, with its test metrics once it has them. Trials train without plots
    (drawing them took a third of a cached probe trial); the best one gets what any run folder has. Each report
    redraws them for the best trial so far, so a sweep stopped early still leaves a complete best model."""
    from finetune import export
    from finetune.model import KIT_FORMAT_FILE

    model_dir = run_dir / "model"
    metrics = _read_json(run_dir / "metrics.json")
    if not metrics or not (model_dir / "README.md").is_file():
        return
    export.write_card(model_dir, recipe, splits, metrics, native=not (model_dir / KIT_FORMAT_FILE).is_file())


def write_plots(study, setup: Setup, directory: Path) -> list[Path]:
    """Optimisation history, parameter importances and a slice plot per parameter, by optuna's matplotlib plots;
    a plot that the trials so far cannot support (one completed trial has no importances) is left out."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as vis

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    directory.mkdir(exist_ok=True)
    drawn = [("history.png", lambda: vis.plot_optimization_history(study))]
    if len(setup.params) > 1 or len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) > 1:
        drawn.append(("importances.png", lambda: vis.plot_param_importances(study)))
    for param in setup.params:
        drawn.append((f"slice-{param.key}.png", lambda key=param.key: vis.plot_slice(study, params=[key])))
    written = []
    for name, draw in drawn:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
                axes = draw()
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
            figure.savefig(directory / name, dpi=100, bbox_inches="tight")
            plt.close(figure)
            written.append(directory / name)
        except Exception as error:  # too few trials for a plot is not an error of the sweep
            print(f"sweep: plot {name} left out ({error.__class__.__name__}: {error})", file=sys.stderr)
    return written


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _flow(value)


def format_table(report: dict) -> str:
    keys = list(report["space"])
    header = ["trial", *keys, report["metric"], "state", "time"]
    lines = [header]
    best = (report.get("best") or {}).get("number")
    for row in report["trials"]:
        value = f"{row['value']:.4f}" if isinstance(row["value"], float) else "-"
        seconds = f"{row['seconds']:.0f}s" if isinstance(row.get("seconds"), (int, float)) else "-"
        mark = "*" if row["number"] == best else ""
        params = [_cell(row["params"][k]) if k in row["params"] else "-" for k in keys]
        lines.append([f"{row['number']}{mark}", *params, value, row["state"], seconds])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
    test = (report.get("best") or {}).get("test")
    if test:
        text += f"\n* best trial; its test {report['metric']}: {test.get(report['metric'], float('nan')):.4f}"
    elif best is not None:
        text += "\n* best trial"
    return text
