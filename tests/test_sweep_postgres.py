"""`finetune sweep --storage postgresql://...` as several machines use it: two workers with their own sweep folders
on one study, one killed in the middle of a trial, its heartbeat running out, and a rerun that leaves every trial
run once. PostgreSQL: $FINETUNE_TEST_POSTGRES_URL, or a throwaway cluster of the installed server (Debian's
postgresql package, which .ci/run installs); skipped without either."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import recipe_dict, subprocess_env, write_recipe

optuna = pytest.importorskip("optuna")
URL_ENV = "FINETUNE_TEST_POSTGRES_URL"


def _server_programs() -> tuple[str, str] | None:
    for folder in [None, *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]:
        initdb, pg_ctl = shutil.which("initdb", path=folder), shutil.which("pg_ctl", path=folder)
        if initdb and pg_ctl:
            return initdb, pg_ctl
    return None


def _as_owner(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the postgres user the package made."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def postgres_url():
    if os.environ.get(URL_ENV):
        yield os.environ[URL_ENV]
        return
    pytest.importorskip("psycopg", reason='the PostgreSQL driver: pip install "finetune[sweep]"')
    programs = _server_programs()
    if programs is None:
        pytest.skip(f"no PostgreSQL server (apt-get install postgresql) and no ${URL_ENV}")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: PostgreSQL will not start as root")
    initdb, pg_ctl = programs
    folder = Path(tempfile.mkdtemp(prefix="finetune-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data = folder / "data"
    subprocess.run(_as_owner([initdb, "-D", str(data), "-A", "trust", "-U", "finetune", "--no-sync"]), check=True,
                   capture_output=True)
    options = f"-c listen_addresses='' -k {folder} -p 5433 -c fsync=off"  # a Unix socket in the folder alone
    subprocess.run(_as_owner([pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"]),
                   check=True, capture_output=True)
    try:
        yield f"postgresql://finetune@/postgres?host={folder}&port=5433"
    finally:
        subprocess.run(_as_owner([pg_ctl, "-D", str(data), "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def worker(recipe: Path, url: str, study: str, **run) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "finetune", "sweep", str(recipe), "--trials", "4", "--storage", url, "--study", study],
        env=subprocess_env(FINETUNE_SWEEP_HEARTBEAT="1,3"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, **run,
    )


def machine(tiny_bert, tiny_data, tmp_path: Path, name: str) -> Path:
    """One machine's recipe: the same search, its own sweep folder."""
    raw = recipe_dict(tiny_bert, tiny_data, tmp_path / name, **{
        "data.validation": str(tiny_data["train"]),  # a tiny run learns its training rows: no trial "learned nothing"
        "train.epochs": 8, "sweep.pruner": "none"})
    raw["sweep"] = {"space": {"train.lr": {"loguniform": [2e-3, 1e-2]}}, **raw.get("sweep", {})}
    return write_recipe(tmp_path / f"{name}.yaml", raw)


# slow (~45 s on two busy cores): three worker processes and nine short trials
@pytest.mark.slow
def test_two_workers_on_postgresql_one_killed_mid_trial_then_every_trial_ran_once(tiny_bert, tiny_data, tmp_path,
                                                                                  postgres_url):
    from optuna.trial import TrialState

    study_name = f"pg-{os.getpid()}-{time.monotonic_ns()}"  # a shared server may hold other studies
    a, b = machine(tiny_bert, tiny_data, tmp_path, "a"), machine(tiny_bert, tiny_data, tmp_path, "b")
    first, second = worker(a, postgres_url, study_name), worker(b, postgres_url, study_name)
    storage = optuna.storages.RDBStorage(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    deadline, running = time.monotonic() + 180, None
    while running is None and time.monotonic() < deadline and second.poll() is None:
        logs = list((tmp_path / "b" / "trials").glob("*/train.log"))
        if logs and "epoch 1/8" in logs[0].read_text():
            number = int(logs[0].parent.name)
            running = optuna.load_study(study_name=study_name, storage=storage).trials[number]
        time.sleep(0.05)
    assert running is not None and running.state == TrialState.RUNNING, second.communicate()[0][-3000:]
    # as if the second worker ran on another machine: the first cannot see its process, only its heartbeat
    storage.set_trial_user_attr(running._trial_id, "worker", {"host": "another-machine", "pid": 1})
    os.kill(second.pid, signal.SIGKILL)
    second.wait()
    out_a = first.communicate(timeout=300)[0]
    assert first.returncode == 0, out_a[-3000:]
    rerun = worker(b, postgres_url, study_name)  # the killed machine's worker started again
    out_b = rerun.communicate(timeout=300)[0]
    assert rerun.returncode == 0, out_b[-3000:]

    trials = optuna.load_study(study_name=study_name, storage=storage).trials
    by_state = {state: [t for t in trials if t.state == state] for state in TrialState}
    assert [t.number for t in by_state[TrialState.FAIL]] == [running.number]
    assert "seconds" not in by_state[TrialState.FAIL][0].user_attrs  # failed by the heartbeat, not by itself
    assert f"trial {running.number}: failed (no heartbeat from its worker for 3 s)" in out_a + out_b
    finished = by_state[TrialState.COMPLETE] + by_state[TrialState.PRUNED]
    assert len(finished) == 4 and len(trials) == 5  # four, and no fifth: nothing ran twice
    assert not by_state[TrialState.RUNNING] and not by_state[TrialState.WAITING]
    (again,) = [t for t in finished if t.system_attrs.get("failed_trial") == running.number]
    assert again.params == running.params  # the killed trial's values ran once, by another worker
    assert len({t.params["train.lr"] for t in finished}) == 4
    # each finished trial's folder on the machine that ran it, once
    folders = [p.parent.name for p in tmp_path.glob("[ab]/trials/*/trial.json")]
    assert sorted(map(int, folders)) == sorted(t.number for t in finished)


# fast: the database's parts alone, no training (what CI runs where PostgreSQL is installed)


def test_a_silent_trial_on_postgresql_is_failed_and_its_values_queued_again_once(postgres_url, monkeypatch):
    from optuna.trial import TrialState

    from finetune.sweep.study import fail_stale_trials, open_storage

    monkeypatch.setenv("FINETUNE_SWEEP_HEARTBEAT", "1,2")
    storage = open_storage(postgres_url)  # a bare postgresql:// URL, through psycopg
    study = optuna.create_study(storage=storage, study_name=f"silent-{os.getpid()}-{time.monotonic_ns()}")
    trial = study.ask()
    trial.suggest_float("train.lr", 1e-5, 1e-2, log=True)
    for number in (0, 1):  # the trial, then its one retry, each left by a worker killed after one heartbeat
        assert trial.number == number
        storage.record_heartbeat(trial._trial_id)
        assert fail_stale_trials(study) == []  # beating: running elsewhere
        time.sleep(2.5)
        assert fail_stale_trials(study) == [number]
        waiting = study.get_trials(states=(TrialState.WAITING,))
        if number == 0:
            assert len(waiting) == 1 and waiting[0].params == study.trials[0].params
            trial = study.ask()  # the queued values, as the next worker's ask takes them
            assert trial.params == study.trials[0].params
        else:
            assert waiting == []  # a second kill on the same values: left failed
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]


def test_workers_on_postgresql_take_turns_through_the_study_lock(postgres_url):
    import threading

    from finetune.sweep.study import open_storage, study_lock

    name = f"lock-{os.getpid()}-{time.monotonic_ns()}"
    first = optuna.create_study(storage=open_storage(postgres_url), study_name=name)
    second = optuna.load_study(storage=open_storage(postgres_url), study_name=name)  # another engine: a machine
    order: list[str] = []
    holding = threading.Event()

    def other() -> None:
        holding.wait()
        with study_lock(second):
            order.append("second in")

    thread = threading.Thread(target=other)
    thread.start()
    with study_lock(first):
        holding.set()
        time.sleep(0.5)  # the other worker is waiting on the database meanwhile
        order.append("first out")
    thread.join(timeout=30)
    assert order == ["first out", "second in"]


def test_an_unreachable_postgresql_is_one_line_naming_it():
    from finetune.errors import FinetuneError
    from finetune.sweep.study import open_storage

    pytest.importorskip("psycopg")
    url = "postgresql://nobody@127.0.0.1:9/sweeps"  # the discard port: nothing listens
    with pytest.raises(FinetuneError) as refused:
        open_storage(url)
    message = str(refused.value)
    assert "\n" not in message and f"--storage: cannot open '{url}' (OperationalError" in message
