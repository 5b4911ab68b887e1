"""Progress of a training epoch: tqdm's bar at a terminal, plain lines every so often in a log (CI, `> run.log`),
where a bar's carriage-return frames would pile up by the hundred."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

LOG_EVERY_SECONDS = 30.0


def epoch_progress(iterable: Iterable, desc: str, disable: bool, initial: int, total: int, stream=None):
    """What to wrap an epoch's batches in: tqdm when `stream` (default stderr) is a terminal, else PlainProgress."""
    stream = sys.stderr if stream is None else stream
    notebook = "ipykernel" in sys.modules  # tqdm.auto draws a widget there, not carriage returns
    if not disable and not notebook and not (getattr(stream, "isatty", None) and stream.isatty()):
        return PlainProgress(iterable, desc, initial, total, stream)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=disable, mininterval=1.0, initial=initial, total=total, file=stream)


class PlainProgress:
    """tqdm's iteration and set_postfix, written as one line at most every `every` seconds and one at the end."""

    def __init__(self, iterable: Iterable, desc: str, initial: int, total: int, stream, every=LOG_EVERY_SECONDS):
        self.iterable, self.desc, self.count, self.total, self.stream = iterable, desc, initial, total, stream
        self.every, self.postfix, self.start = every, "", time.perf_counter()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def _line(self) -> None:
        seconds = time.perf_counter() - self.start
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.count}/{self.total} batches, {seconds:.0f}s{extra}", file=self.stream, flush=True)

    def __iter__(self) -> Iterator:
        last = time.perf_counter()
        for item in self.iterable:
            yield item
            self.count += 1
            now = time.perf_counter()
            if now - last >= self.every and self.count < self.total:
                self._line()
                last = now
        self._line()
