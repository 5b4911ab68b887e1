"""Progress of a training epoch and of the other long passes (evaluation, test, the feature pass, tokenising):
tqdm's bar at a terminal, plain lines every so often in a log (CI, `> run.log`), where a bar's carriage-return
frames would pile up by the hundred."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

LOG_EVERY_SECONDS = 30.0


def draws_bars(stream=None) -> bool:
    """Whether progress is drawn as a bar: at a terminal or in a notebook (tqdm.auto draws a widget there)."""
    stream = sys.stderr if stream is None else stream
    return "ipykernel" in sys.modules or bool(getattr(stream, "isatty", None) and stream.isatty())


def epoch_progress(iterable: Iterable, desc: str, disable: bool, initial: int, total: int, stream=None):
    """What to wrap an epoch's batches in: tqdm when `stream` (default stderr) is a terminal, else PlainProgress."""
    stream = sys.stderr if stream is None else stream
    if not disable and not draws_bars(stream):
        return PlainProgress(iterable, desc, initial, total, stream)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=disable, mininterval=1.0, initial=initial, total=total, file=stream)


def pass_progress(iterable: Iterable, desc: str, total: int, disable: bool = False, stream=None):
    """A pass that is not an epoch (validation, test, features): a bar that goes away when done at a terminal; in a
    log, plain lines only when it runs long (a line at the end of every short pass would say nothing)."""
    stream = sys.stderr if stream is None else stream
    if not disable and not draws_bars(stream):
        return PlainProgress(iterable, desc, 0, total, stream, final_line=False)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=disable, mininterval=1.0, total=total, file=stream, leave=False)


class PlainProgress:
    """tqdm's iteration and set_postfix, written as one line at most every `every` seconds and one at the end."""

    def __init__(self, iterable: Iterable, desc: str, initial: int, total: int, stream, every: float | None = None,
                 final_line: bool = True):
        self.iterable, self.desc, self.count, self.total, self.stream = iterable, desc, initial, total, stream
        self.every = LOG_EVERY_SECONDS if every is None else every
        self.postfix, self.start = "", time.perf_counter()
        self.final_line = final_line  # False: the closing line only after a periodic one (a pass that ran long)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def _line(self) -> None:
        seconds = time.perf_counter() - self.start
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.count}/{self.total} batches, {seconds:.0f}s{extra}", file=self.stream, flush=True)

    def __iter__(self) -> Iterator:
        last, said = time.perf_counter(), False
        for item in self.iterable:
            yield item
            self.count += 1
            now = time.perf_counter()
            if now - last >= self.every and self.count < self.total:
                self._line()
                last, said = now, True
        if self.final_line or said:
            self._line()


def datasets_bars() -> None:
    """`datasets`' own bars (tokenising with Dataset.map) at a terminal only: in a log they would be frames."""
    import datasets

    (datasets.enable_progress_bars if draws_bars() else datasets.disable_progress_bars)()
