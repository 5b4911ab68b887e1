"""Running a sweep's trials: each an ordinary run, shared between workers and ranks, stopped after failures."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import socket
import time
from pathlib import Path

from finetune import recipe as recipe_module
from finetune.errors import FinetuneError
from finetune.sweep.report import write_report
from finetune.sweep.space import flow, sample, trial_recipe_dict
from finetune.sweep.study import (
    FINISHED,
    STATE_NAMES,
    Setup,
    best_of,
    check_study,
    count_states,
    fail_stale_trials,
    grid_size,
    heartbeat,
    heartbeat_settings,
    load_setup,
    open_storage,
    open_study,
    retry_once,
    study_lock,
    sweep_lock,
    write_json,
)

DEFAULT_JOURNAL = "study.journal"


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
            failed_trial = copy.deepcopy(study._storage.get_trial(trial._trial_id))
            failed_trial.user_attrs = {k: v for k, v in failed_trial.user_attrs.items() if k != "error"}
            retry_once()(study, failed_trial)  # queued again as the heartbeat's check does, without the error
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

    shown = ", ".join(f"{k}={flow(v)}" for k, v in values.items())
    say(f"trial {trial.number}: {shown} -> {run_dir}")
    record = {"number": number, "params": values, "run_dir": str(run_dir)}
    state, value, why = TrialState.FAIL, None, None
    try:
        recipe = recipe_module.from_dict(trial_recipe_dict(setup.base, values, run_dir), source=f"trial {number}")
        with heartbeat(study, trial):
            metrics = train(recipe, on_epoch=report, evaluate_test=False, plots=False, checkpoints=False)
        state, value = TrialState.COMPLETE, best_of(metrics["epochs"], metric)
        if not metrics["health"]["learned"]:  # a value to rank below every trial that learned (see learned_nothing)
            state, why = TrialState.PRUNED, learned_nothing(metrics["health"])
            trial.set_user_attr("learned", False)  # sweep.json's row and table say so
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
        write_json(run_dir / "trial.json", record | {"state": STATE_NAMES[state.name], "value": value,
                                                        "seconds": seconds, "reason": why})
    say(f"trial {trial.number}: {STATE_NAMES[state.name]}" + (f" {metric} {value:.4f}" if value is not None else "")
        + (f" ({why})" if why else ""))
    return why if state == TrialState.FAIL else None


def learned_nothing(health: dict) -> str:
    """A trial that learned nothing (finetune.health) ends pruned, neither complete nor failed: the study never
    calls it best, Optuna's TPE sampler (the sweep's default) ranks it below every complete trial yet still learns
    from where it was (a failed trial it ignores, so it would keep sampling the lr that collapsed), and it counts
    towards --trials as a trial that ran, where failed ones are run again and three in a row stop the sweep."""
    return "learned nothing: " + "; ".join(health["reasons"])


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
        with sweep_lock(setup.out), study_lock(study):
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
            retried = study._storage.get_trial_system_attrs(trial._trial_id).get("failed_trial")
            if retried is not None:
                say(f"trial {trial.number}: the values of trial {retried} again (its worker stopped)")
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


