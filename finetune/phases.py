"""Where a run's wall time goes, from the process's start: start-up (imports and checks, data and model, the cached
feature pass, preparing), the training loop, the test pass and saving. metrics.json keeps them under train.phases;
the run's log ends with them in one line."""

from __future__ import annotations

import time


def process_start() -> float:
    """The wall-clock time this process was created (psutil, which accelerate already needs), so that interpreter
    start and imports count; the first call's time where the OS does not say."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # no psutil, or a platform without the process's creation time
        return time.time()


class Phases:
    """mark(name): the time since the previous mark (or the start) is added to phase `name`."""

    _runs = 0  # runs timed in this process so far

    def __init__(self, start: float | None = None) -> None:
        self.start = process_start() if start is None else start
        self.last = self.start
        self.seconds: dict[str, float] = {}

    @classmethod
    def for_run(cls) -> Phases:
        """The first run of a process counts from the process's start; a later one (a sweep's next trial, in the
        same process) from now, so that no run is charged with the ones before it."""
        cls._runs += 1
        return cls() if cls._runs == 1 else cls(time.time())

    def mark(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = self.seconds.get(name, 0.0) + max(0.0, now - self.last)
        self.last = now

    START_UP = ("imports and checks", "choosing the step", "data and model", "feature pass", "preparing")

    def report(self) -> dict:
        """{"start_up_seconds": to the first training step, "phases": {name: seconds}, "wall_seconds": all of it}"""
        start_up = sum(v for k, v in self.seconds.items() if k in self.START_UP)
        return {"start_up_seconds": start_up, "phases": dict(self.seconds), "wall_seconds": self.last - self.start}

    def line(self) -> str:
        report = self.report()
        inside = ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items() if k in self.START_UP and v >= 0.05)
        after = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items() if k not in self.START_UP)
        return (f"time: {report['wall_seconds']:.1f} s from process start: start-up {report['start_up_seconds']:.1f} s "
                f"({inside}), {after}")
