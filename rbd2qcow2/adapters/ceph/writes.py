"""Writes into an open image with several requests in flight (``aio_write``), bounded in count and bytes."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

from ...core.errors import CephError
from .calls import wrap


class AsyncWrites:
    """Writes into one open image, several in flight (``aio_write``), bounded in count and bytes.

    Any thread may submit; a submit waits while ``depth`` requests or
    ``max_bytes`` of data are in flight.  librbd runs the completion
    callbacks on its own thread with the GIL held, so they only count and
    note the first failure; that failure is raised as :class:`CephError` by
    the next submit or by :meth:`wait`.  A request's buffer stays referenced
    until librbd has completed it (librbd may send it without a copy).
    Every wait has a timeout: a write that never completes is an error, not
    a hang.
    """

    def __init__(self, img: Any, label: str, depth: int, max_bytes: int, timeout: float) -> None:
        self._img = img
        self._label = label
        self._depth = max(1, depth)
        self._max_bytes = max_bytes
        self._timeout = timeout
        self._cond = threading.Condition(threading.Lock())
        self._in_flight = 0
        self._bytes = 0
        self._failure: str | None = None

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Writer protocol of the pipeline: queue a write (a view of part of a buffer is copied)."""
        buf = _whole_buffer(data)
        req = _Request(self, f"write {len(buf)} at {offset}", buf, len(buf))
        self._submit(req, lambda: self._img.aio_write(buf, offset, req))

    def zero(self, length: int, offset: int) -> None:
        """Queue a write-zeroes: ``[offset, offset+length)`` reads as zeros."""
        req = _Request(self, f"write zeroes {length} at {offset}", None, 0)
        self._submit(req, lambda: self._img.aio_write_zeroes(offset, length, req))

    def wait(self) -> None:
        """Wait until nothing is in flight, then raise the first failure, if any."""
        with self._cond:
            self._wait_until(lambda: self._in_flight == 0)
        self._raise_failure()

    def settle(self) -> None:
        """Wait until nothing is in flight, after a failure elsewhere; raises nothing."""
        with self._cond, contextlib.suppress(CephError):
            self._wait_until(lambda: self._in_flight == 0)

    def _submit(self, req: _Request, start: Callable[[], Any]) -> None:
        self._raise_failure()
        with self._cond:
            self._wait_until(lambda: self._in_flight == 0 or self._room_for(req.size))
            self._in_flight += 1
            self._bytes += req.size
        try:
            wrap(f"{self._label}: {req.what}", start)
        except BaseException:
            self._completed(req, None)
            raise

    def _room_for(self, size: int) -> bool:
        return self._in_flight < self._depth and self._bytes + size <= self._max_bytes

    def _completed(self, req: _Request, failure: str | None) -> None:
        with self._cond:
            if failure is not None and self._failure is None:
                self._failure = failure
            self._in_flight -= 1
            self._bytes -= req.size
            self._cond.notify_all()

    def _wait_until(self, ready: Callable[[], bool]) -> None:
        """With the lock held."""
        if not self._cond.wait_for(ready, timeout=self._timeout):
            raise CephError(f"{self._label}: no write completed in {self._timeout:.0f} s")

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise CephError(f"{self._label}: {self._failure}")


class _Request:
    """One request in flight; librbd calls it on completion.  Holds the buffer until then."""

    __slots__ = ("buf", "owner", "size", "what")

    def __init__(self, owner: AsyncWrites, what: str, buf: bytes | bytearray | None, size: int) -> None:
        self.owner, self.what, self.buf, self.size = owner, what, buf, size

    def __call__(self, completion: Any) -> None:
        ret = completion.get_return_value()
        self.owner._completed(self, f"{self.what}: {os.strerror(-ret)}" if ret < 0 else None)
        self.buf = None


def _whole_buffer(data: bytes | bytearray | memoryview) -> bytes | bytearray:
    """``data`` as bytes or bytearray, without a copy unless it is a view of part of a buffer."""
    if isinstance(data, bytes | bytearray):
        return data
    if isinstance(data.obj, bytes | bytearray) and data.nbytes == len(data.obj) and data.contiguous:
        return data.obj
    return bytes(data)
