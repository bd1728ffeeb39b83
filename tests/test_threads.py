"""The thread helper: failures reach the owner, waits are bounded and polled."""

from __future__ import annotations

import threading
import time

import pytest

from rbd2qcow2.core.threads import Background, Crew, Later, every, in_parallel


def test_crew_carries_the_first_failure_and_stops_the_others() -> None:
    crew = Crew()
    crew.start(lambda: crew.stopping.wait(10), "waiter")

    def fails() -> None:
        raise ValueError("first")

    crew.start(fails, "fails")
    assert crew.wait(deadline=time.monotonic() + 10)
    assert crew.failed and crew.stopping.is_set()
    with pytest.raises(ValueError, match="first"):
        crew.check()


def test_crew_wait_runs_each_and_gives_up_at_the_deadline() -> None:
    crew = Crew()
    release = threading.Event()
    crew.start(release.wait, "blocked")
    looks = []
    assert not crew.wait(deadline=time.monotonic() + 0.3, each=lambda: looks.append(1))
    assert looks
    release.set()
    assert crew.wait()
    crew.check()


def test_crew_stop_nudges_blocked_threads_and_reports_those_that_stay(caplog: pytest.LogCaptureFixture) -> None:
    crew = Crew()
    wake = threading.Event()
    crew.start(wake.wait, "nudged")
    crew.stop(nudge=wake.set)
    assert not crew.alive()
    stuck = Crew()
    never = threading.Event()
    stuck.start(never.wait, "stuck")
    stuck.stop(timeout=0.05)
    assert "thread stuck did not stop" in caplog.text
    never.set()


def test_every_repeats_until_stopped() -> None:
    calls: list[float] = []
    crew = every(0.01, lambda: calls.append(time.monotonic()), "tick")
    time.sleep(0.2)
    crew.stop()
    n = len(calls)
    assert n >= 2
    time.sleep(0.05)
    assert len(calls) == n


def test_background_later_and_in_parallel_return_in_order_or_raise() -> None:
    assert Background(lambda: 7, "seven").result() == 7
    later = Later(lambda: "x", "later")
    assert later.result() == "x"
    assert in_parallel(lambda n: n * n, list(range(10)), 3, "sq") == [n * n for n in range(10)]

    def boom(n: int) -> int:
        if n == 4:
            raise KeyError(n)
        return n

    with pytest.raises(KeyError):
        in_parallel(boom, list(range(6)), 2, "boom")
