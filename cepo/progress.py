"""Progress on the console: ``12/30 · ETA 3m05s`` lines for training, evaluation and the tiny model's build,
and a status line that counts the seconds of a long wait (services starting, an evaluation)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from rich.console import Console

__all__ = ["Progress", "duration", "ticking"]


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``: short enough for a progress line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """``12/30 · ETA 3m05s``: units done of a total, the remaining time from the mean pace since ``start()``
    (units done before it, e.g. a resumed run's earlier steps, do not count towards the pace)."""

    def __init__(self, total: int, done: int = 0) -> None:
        self.total, self.done, self._first = total, done, done
        self._t0 = time.perf_counter()

    def start(self) -> None:
        self._first, self._t0 = self.done, time.perf_counter()

    def advance(self, n: int = 1) -> str:
        self.done += n
        return str(self)

    def __str__(self) -> str:
        counted = self.done - self._first
        left = max(0, self.total - self.done)
        if not counted or not left:
            eta = "" if left else f" · {duration(time.perf_counter() - self._t0)}"
        else:
            eta = f" · ETA {duration((time.perf_counter() - self._t0) / counted * left)}"
        return f"{self.done}/{self.total}{eta}"


@contextlib.contextmanager
def ticking(console: Console, text: str) -> Iterator[Callable[[str], None]]:
    """A status line with the seconds spent (``text · 42s``), updated every second on a terminal; elsewhere
    (a pipe, a log) one line when it begins. Yields ``update(text)``, which changes the text."""
    if not console.is_terminal:
        console.print(f"{text}", highlight=False)
        yield lambda _text: None
        return
    t0, current, done = time.perf_counter(), [text], threading.Event()
    with console.status(text) as status:

        def tick() -> None:
            while not done.wait(1.0):
                status.update(f"{current[0]} · {duration(time.perf_counter() - t0)}")

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()

        def update(new: str) -> None:
            current[0] = new
            status.update(f"{new} · {duration(time.perf_counter() - t0)}")

        try:
            yield update
        finally:
            done.set()
            ticker.join()
