"""Work in background threads whose results (or exceptions) come back to the thread that asks.

Results are waited for by polling an event, never by ``Thread.join``: a
signal that interrupts a join can mark a running thread as stopped (CPython
gh-90882), and a Ctrl-C must reach the main thread promptly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")
POLL = 0.1


class Background(Generic[T]):
    """``fn()`` run in a daemon thread; :meth:`result` waits for it and returns or raises what it did."""

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, args=(fn,), name=name, daemon=True).start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # carried to the thread that asks
            self._error = exc
        finally:
            self._done.set()

    def result(self) -> T:
        while not self._done.wait(POLL):
            pass
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class Later(Generic[T]):
    """``fn()`` in a background thread once started (at the latest by :meth:`result`)."""

    def __init__(self, fn: Callable[[], T], name: str) -> None:
        self._fn = fn
        self._name = name
        self._running: Background[T] | None = None

    def start(self) -> None:
        if self._running is None:
            self._running = Background(self._fn, self._name)

    def result(self) -> T:
        self.start()
        assert self._running is not None
        return self._running.result()


def in_parallel(fn: Callable[[T], R], items: Sequence[T], workers: int, name: str) -> list[R]:
    """``fn`` over ``items`` in up to ``workers`` threads; the results in order (the first exception is raised)."""
    lanes = min(len(items), max(1, workers))

    def lane(n: int) -> Callable[[], list[R]]:
        return lambda: [fn(item) for item in items[n::lanes]]

    done = [each.result() for each in [Background(lane(n), f"{name}-{n}") for n in range(lanes)]]
    return [done[i % lanes][i // lanes] for i in range(len(items))]


__all__ = ["Background", "Later", "in_parallel"]
