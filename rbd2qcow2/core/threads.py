"""The one way rbd2qcow2 runs threads: daemon threads whose first failure reaches their owner.

Threads are waited for by polling, never by ``Thread.join``: a signal that
interrupts a join can mark a running thread as stopped (CPython gh-90882),
and a Ctrl-C must reach the main thread promptly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
POLL = 0.1  # seconds between looks at a thread that is being waited for
STOP_POLL = 0.005  # while stopping: threads that stop do so within milliseconds
STOP_TIMEOUT = 30.0  # a thread that has not stopped after this is reported and left (it is a daemon)


class Crew:
    """Worker threads that share a stop signal; the first exception of any is kept for the owner.

    :meth:`check` raises that exception in the owner's thread; :meth:`wait`
    waits until every thread has finished; :meth:`stop` asks them to stop
    and waits a bounded time.
    """

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        # Notified as each thread ends, so that a bounded wait returns at once, not at its next look.
        self._ended = threading.Condition()
        self._running: set[threading.Thread] = set()  # those whose function has not returned yet

    def __len__(self) -> int:
        return len(self._threads)

    def start(self, fn: Callable[[], object], name: str) -> None:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # carried to the owner by check()
                self.fail(exc)
            finally:
                with self._ended:
                    self._running.discard(threading.current_thread())
                    self._ended.notify_all()

        thread = threading.Thread(target=run, name=name, daemon=True)
        self._threads.append(thread)
        with self._ended:
            self._running.add(thread)
        thread.start()

    def fail(self, exc: BaseException) -> None:
        """Record a failure (the first one is raised by :meth:`check`) and ask every thread to stop."""
        self._errors.append(exc)
        self.stopping.set()

    @property
    def failed(self) -> bool:
        return bool(self._errors)

    def check(self) -> None:
        """Raise the first failure of a thread, if there was one."""
        if self._errors:
            raise self._errors[0]

    def alive(self) -> bool:
        """Whether a thread's function is still running."""
        return bool(self._running)

    def _pause(self, seconds: float) -> None:
        """Up to ``seconds``, less if a thread ends meanwhile (a bounded wait: signals get through)."""
        with self._ended:
            if self._running:
                self._ended.wait(seconds)

    def wait(self, deadline: float | None = None, each: Callable[[], object] | None = None) -> bool:
        """Until every thread has finished (True) or ``deadline`` (monotonic) passed (False).

        ``each`` runs between looks (to report progress, or raise a failure early).
        """
        while self.alive():
            if deadline is not None and time.monotonic() > deadline:
                return False
            if each is not None:
                each()
            self._pause(POLL)
        return True

    def stop(self, nudge: Callable[[], object] | None = None, timeout: float = STOP_TIMEOUT) -> None:
        """Set the stop signal and wait up to ``timeout`` for the threads; ``nudge`` wakes threads that block."""
        self.stopping.set()
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            if nudge is not None:
                nudge()
            self._pause(STOP_POLL)
        with self._ended:
            for t in self._running:
                logger.error("thread %s did not stop", t.name)


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


def every(interval: float, fn: Callable[[], object], name: str) -> Crew:
    """``fn()`` every ``interval`` seconds in a thread until the returned crew's :meth:`Crew.stop`."""
    crew = Crew()

    def loop() -> None:
        while not crew.stopping.wait(interval):
            fn()

    crew.start(loop, name)
    return crew


__all__ = ["Background", "Crew", "Later", "every", "in_parallel"]
