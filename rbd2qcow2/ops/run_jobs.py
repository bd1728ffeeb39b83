"""The run's job scheduler: items prepared ahead in ``prep-N`` threads, finished in ``job-N`` threads.

Preparing an image (claim, chain lock, snapshot) is mostly waiting for the
monitors, and concurrent preparations share that wait; so ``ahead`` prep
threads prepare items, at most ``ahead`` of them waiting for a job at any
time, and each of the ``jobs`` job threads finds its next item ready when
it finishes one.  Nothing here knows about images: :class:`Jobs` says how
to prepare, finish and give up an item, so the scheduler is tested with
plain callables.

A failure of a thread (a bug: an item's own failures are its result) stops
the preparing and is raised to the caller once every thread has ended.  A
signal (:class:`Cancelled` in the main thread) is passed on through
:class:`Stop`: the items in progress stop at their next check and clean up,
within ``grace`` seconds; items prepared that no job took are given up.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from ..core.errors import Cancelled
from ..core.threads import POLL, Crew

logger = logging.getLogger(__name__)

W = TypeVar("W")  # an item of work
P = TypeVar("P")  # an item prepared for a job
C = TypeVar("C")  # what a job thread keeps from one item to the next (a qemu-storage-daemon)
R = TypeVar("R")  # the result of an item


class Stop:
    """A signal seen by the main thread, passed on to the worker threads (which signals never reach)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def check(self) -> None:
        if self.signum is not None:
            raise Cancelled(self.signum)


@dataclass(frozen=True)
class Jobs(Generic[W, P, C, R]):
    """What the scheduler does with each item."""

    # In a prep thread: a prepared item (an instance of ``prepared``), or the result of an item
    # that needs no job (skipped, or failed already).
    prepare: Callable[[W], P | R]
    prepared: type[P]
    finish: Callable[[P, C], R]  # in a job thread
    give_up: Callable[[P], None]  # a prepared item that no job took
    job_context: Callable[[], AbstractContextManager[C]]  # entered once per job thread
    on_cancel: Callable[[], None] = lambda: None  # after a signal, once the items in progress had their grace


@dataclass(frozen=True)
class Limits:
    jobs: int  # job threads
    ahead: int  # prep threads, and items prepared and not yet taken by a job
    grace: float  # seconds the items in progress get to clean up after a signal


def run_jobs(jobs: Jobs[W, P, C, R], items: Sequence[W], limits: Limits, stop: Stop) -> list[R]:
    """Every item's result (in no particular order); the first failure of a thread is raised."""
    return _Schedule(jobs, items, limits, stop).run()


class _Schedule(Generic[W, P, C, R]):
    def __init__(self, jobs: Jobs[W, P, C, R], items: Sequence[W], limits: Limits, stop: Stop) -> None:
        self.jobs = jobs
        self.stop = stop
        self.grace = limits.grace
        self.todo: queue.Queue[W] = queue.Queue()
        for item in items:
            self.todo.put(item)
        self.ready: queue.Queue[P | None] = queue.Queue()
        self.job_count = min(limits.jobs, len(items))
        self.ahead = min(limits.ahead, len(items))
        self.slots = threading.Semaphore(self.ahead)
        self.results: list[R] = []
        self.lock = threading.Lock()
        self.preparing = self.ahead
        self.crew = Crew()  # its stop signal: a thread died, or a signal came; prepare nothing more

    def run(self) -> list[R]:
        for i in range(self.ahead):
            self.crew.start(self.prep, f"prep-{i}")
        for i in range(self.job_count):
            self.crew.start(self.job, f"job-{i}")
        try:
            self.crew.wait()
        except Cancelled as exc:
            # The items in progress stop at their next check and clean up
            # (partial files, new snapshots, claims) before the process exits.
            self.stop.signum = exc.signum
            self.crew.stopping.set()
            logger.warning("%s: stopping the images in progress", exc)
            self._drain()
            if not self.crew.wait(deadline=time.monotonic() + self.grace):
                logger.error("jobs still running after %.0f s; exiting without their clean-up", self.grace)
            self.jobs.on_cancel()
            raise
        finally:
            self._give_up()  # prepared, and taken by no job (a job thread failed, or a signal)
        self.crew.check()
        return self.results

    def prep(self) -> None:
        try:
            while self._take_slot():
                try:
                    item = self.todo.get_nowait()
                except queue.Empty:
                    self.slots.release()
                    break
                r = self.jobs.prepare(item)
                if isinstance(r, self.jobs.prepared):
                    self.ready.put(r)
                else:
                    self.slots.release()
                    with self.lock:
                        self.results.append(cast(R, r))
        except Cancelled:
            pass  # the main thread has the signal
        except BaseException as exc:
            self.crew.fail(exc)  # stops the other prep threads before the jobs hear that preparing is over
        finally:
            with self.lock:
                self.preparing -= 1
                if self.preparing == 0:
                    for _ in range(self.job_count):
                        self.ready.put(None)

    def job(self) -> None:
        with self.jobs.job_context() as context:
            while (r := self.ready.get()) is not None:
                self.slots.release()
                result = self.jobs.finish(r, context)
                with self.lock:
                    self.results.append(result)

    def _take_slot(self) -> bool:
        while not self.crew.stopping.is_set():
            if self.slots.acquire(timeout=POLL):
                return True
        return False

    def _drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self.todo.get_nowait()

    def _give_up(self) -> None:
        while True:
            try:
                r = self.ready.get_nowait()
            except queue.Empty:
                return
            if r is not None:
                with contextlib.suppress(Exception):
                    self.jobs.give_up(r)
