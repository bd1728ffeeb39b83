"""The run's job scheduler with plain callables: no Ceph, no qemu."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType

import pytest

from rbd2qcow2.core.errors import Cancelled
from rbd2qcow2.ops.run_jobs import Jobs, Limits, Stop, run_jobs


def wait_until(log: Log, condition: Callable[[Log], bool]) -> None:
    deadline = time.monotonic() + 10
    while True:
        with log.lock:
            if condition(log):
                return
        assert time.monotonic() < deadline, "the scheduler did not get there"
        time.sleep(0.002)


@dataclass
class Ready:
    item: int


@dataclass
class Log:
    """What the fake callables saw, under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    waiting: int = 0  # prepared, not yet finished
    most_waiting: int = 0
    contexts: list[str] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)
    stopped: list[int] = field(default_factory=list)
    given_up: list[int] = field(default_factory=list)
    cancel_hook: int = 0


def fakes(
    log: Log,
    *,
    skip: set[int] | None = None,
    finish: Callable[[int], None] = lambda item: None,
) -> Jobs[int, Ready, str, str]:
    def prepare(item: int) -> Ready | str:
        if item in (skip or set()):
            return f"skipped {item}"
        with log.lock:
            log.waiting += 1
            log.most_waiting = max(log.most_waiting, log.waiting)
        return Ready(item)

    def done(r: Ready, context: str) -> str:
        try:
            finish(r.item)
        finally:
            with log.lock:
                log.waiting -= 1
        with log.lock:
            log.finished.append(r.item)
        return f"{context} did {r.item}"

    @contextlib.contextmanager
    def job_context() -> Iterator[str]:
        name = threading.current_thread().name
        with log.lock:
            log.contexts.append(name)
        yield name

    def give_up(r: Ready) -> None:
        with log.lock:
            log.given_up.append(r.item)

    def on_cancel() -> None:
        log.cancel_hook += 1

    return Jobs(
        prepare=prepare,
        prepared=Ready,
        finish=done,
        give_up=give_up,
        job_context=job_context,
        on_cancel=on_cancel,
    )


def test_every_item_has_a_result() -> None:
    log = Log()
    results = run_jobs(fakes(log, skip={3, 7}), list(range(10)), Limits(jobs=3, ahead=6, grace=5), Stop())
    assert len(results) == 10
    assert sorted(r for r in results if r.startswith("skipped")) == ["skipped 3", "skipped 7"]
    done = sorted(int(r.split()[-1]) for r in results if r.startswith("job-"))
    assert done == sorted(log.finished) == [0, 1, 2, 4, 5, 6, 8, 9]
    assert sorted(log.contexts) == ["job-0", "job-1", "job-2"]  # one context per job thread
    assert not log.given_up and log.cancel_hook == 0


def test_no_items() -> None:
    assert run_jobs(fakes(Log()), [], Limits(jobs=4, ahead=8, grace=5), Stop()) == []


def test_fewer_items_than_jobs_start_fewer_threads() -> None:
    log = Log()
    assert len(run_jobs(fakes(log), [1, 2], Limits(jobs=8, ahead=16, grace=5), Stop())) == 2
    assert len(log.contexts) == 2


def test_the_items_prepared_ahead_are_bounded() -> None:
    """With slow jobs, the prep threads wait: never more than ``ahead`` items wait for a job
    (plus the ones the jobs hold)."""
    log = Log()
    limits = Limits(jobs=2, ahead=3, grace=5)
    results = run_jobs(fakes(log, finish=lambda item: time.sleep(0.02)), list(range(20)), limits, Stop())
    assert len(results) == 20
    assert log.most_waiting <= limits.ahead + limits.jobs
    assert log.most_waiting >= limits.ahead  # the prep threads did run ahead


def test_a_failing_job_thread_is_raised_to_the_caller_and_the_rest_given_up() -> None:
    log = Log()

    def finish(item: int) -> None:
        wait_until(log, lambda log: log.waiting == 3)  # its own item and two prepared ahead
        raise RuntimeError("a bug in the job")

    with pytest.raises(RuntimeError, match="a bug in the job"):
        run_jobs(fakes(log, finish=finish), list(range(50)), Limits(jobs=1, ahead=2, grace=5), Stop())
    # The only job thread died on its first item: nothing was finished, the two prepared ahead were undone.
    assert log.finished == []
    assert len(log.given_up) == 2


def test_a_failing_prep_thread_is_raised_to_the_caller() -> None:
    jobs = fakes(Log())

    def prepare(item: int) -> Ready | str:
        if item == 2:
            raise ValueError("a bug in prepare")
        return jobs.prepare(item)

    broken = Jobs(prepare, Ready, jobs.finish, jobs.give_up, jobs.job_context)
    with pytest.raises(ValueError, match="a bug in prepare"):
        run_jobs(broken, list(range(10)), Limits(jobs=2, ahead=1, grace=5), Stop())


@pytest.fixture
def usr1_cancels() -> Iterator[None]:
    """SIGUSR1 raises Cancelled in the main thread, as the command line does for SIGINT/SIGTERM/SIGHUP."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise Cancelled(signum)

    old = signal.signal(signal.SIGUSR1, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, old)


@pytest.mark.usefixtures("usr1_cancels")
def test_cancelled_stops_the_items_in_progress_and_gives_up_the_prepared_ones() -> None:
    log = Log()
    stop = Stop()
    in_progress: list[int] = []

    def finish(item: int) -> None:
        """An item in progress: it checks the stop signal between chunks, as the transfer does."""
        with log.lock:
            in_progress.append(item)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                stop.check()
            except Cancelled:
                with log.lock:
                    log.stopped.append(item)
                raise
            time.sleep(0.005)

    def signal_once_started() -> None:
        # Both jobs busy, and four items prepared ahead of them.
        wait_until(log, lambda log: len(in_progress) == 2 and log.waiting == 6)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR1)

    threading.Thread(target=signal_once_started, daemon=True).start()
    with pytest.raises(Cancelled) as raised:
        run_jobs(fakes(log, finish=finish), list(range(30)), Limits(jobs=2, ahead=4, grace=10), stop)
    assert raised.value.signum == signal.SIGUSR1 and stop.signum == signal.SIGUSR1
    assert sorted(log.stopped) == sorted(in_progress)  # both jobs' items stopped (and cleaned up)
    assert log.finished == []
    # The four prepared and taken by no job are undone; nothing more was prepared.
    assert len(log.given_up) == 4 and not set(log.given_up) & set(in_progress)
    assert log.waiting == 4 and log.cancel_hook == 1
