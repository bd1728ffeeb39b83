"""The NBD boundary: writing a layer through qemu's NBD server with libnbd.

One :class:`Connection` per writer thread when the server advertises
multi-conn; otherwise all threads share one connection (libnbd handles are
thread-safe).  Every libnbd error becomes :class:`~rbd2qcow2.core.errors.NbdError`.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import nbd

from ..core.errors import NbdError

SLOT = 64 * 1024  # the size of a write sent with others in flight: one checksum block
IN_FLIGHT = 32  # requests of one connection in flight at once


class _Slots:
    """Write buffers for requests in flight, kept as long as the process and reused.

    The Python binding of libnbd 1.14 never frees the memory of a buffer
    that ``aio_pwrite`` has used, whether it was copied or shared (a pool
    run with a new buffer per write kept every byte it wrote: 4 GiB).  A
    buffer that lives on and is used again costs nothing more, so the pool
    holds at most as many as were ever in flight at once.
    """

    def __init__(self) -> None:
        self._free: list[tuple[nbd.Buffer, memoryview]] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> list[tuple[nbd.Buffer, memoryview]]:
        with self._lock:
            out = [self._free.pop() for _ in range(min(n, len(self._free)))]
        while len(out) < n:
            raw = bytearray(SLOT)
            out.append((nbd.Buffer.from_buffer(raw), memoryview(raw)))
        return out

    def give(self, slots: list[tuple[nbd.Buffer, memoryview]]) -> None:
        with self._lock:
            self._free += slots


_SLOTS = _Slots()


class Connection:
    """A connected libnbd handle to one export (with the base:allocation context)."""

    def __init__(self, socket: Path, export: str) -> None:
        try:
            self._h = nbd.NBD()
            self._h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            # A read either fills the whole buffer or raises: libnbd need not zero it first.
            self._h.set_pread_initialize(False)
            self._h.set_export_name(export)
            self._h.connect_unix(str(socket))
        except nbd.Error as exc:
            raise NbdError(f"cannot connect to export {export!r}: {exc}") from exc

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, offset: int, length: int) -> bytes:
        """Reader protocol of the pipeline."""
        return self.pread(length, offset)

    def allocation(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """``(offset, length, reads_as_zero)`` runs covering ``[offset, offset+length)``.

        From NBD block status (base:allocation): qemu reports clusters that
        no layer allocates, and zero clusters, as zero.
        """
        runs: list[tuple[int, int, bool]] = []
        pos, end = offset, offset + length

        def collect(_meta: str, start: int, entries: list[int], _err: object) -> int:
            cur = start
            for i in range(0, len(entries) - 1, 2):
                ln, flags = entries[i], entries[i + 1]
                ln = min(ln, end - cur)
                if ln <= 0:
                    break
                runs.append((cur, ln, bool(flags & nbd.STATE_ZERO)))
                cur += ln
            return 0

        while pos < end:
            before = len(runs)
            try:
                self._h.block_status(min(end - pos, 1 << 30), pos, collect)
            except nbd.Error as exc:
                raise NbdError(f"block status at {pos} failed: {exc}") from exc
            if len(runs) == before:
                raise NbdError(f"block status at {pos} returned nothing")
            pos = runs[-1][0] + runs[-1][1]
        return runs

    @property
    def size(self) -> int:
        return int(self._h.get_size())

    @property
    def can_multi_conn(self) -> bool:
        return bool(self._h.can_multi_conn())

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        try:
            self._h.pwrite(data, offset)
        except nbd.Error as exc:
            raise NbdError(f"write of {len(data)} bytes at {offset} failed: {exc}") from exc

    def zero(self, length: int, offset: int) -> None:
        """NBD WRITE_ZEROES: reads back as zeros, also over a backing file."""
        try:
            self._h.zero(length, offset)
        except nbd.Error as exc:
            raise NbdError(f"write-zeroes of {length} bytes at {offset} failed: {exc}") from exc

    def write_many(self, writes: list[tuple[int, memoryview | int]]) -> None:
        """Data (a buffer) or zeros (a length) at each offset, up to :data:`IN_FLIGHT` requests at once.

        A 64 KiB block is copied into a buffer of :data:`_SLOTS` and sent
        with the zero requests before any reply is awaited: one round trip
        for the group instead of one per request, with qemu working on the
        group's requests while later ones arrive.  Any other length is
        written with a synchronous call.  The offsets must not overlap:
        NBD does not order requests in flight.  Sending stops at a request
        libnbd refuses; the first failure is raised once every request sent
        has completed, since libnbd reads the buffers until then.
        """
        for first in range(0, len(writes), IN_FLIGHT):
            self._write_group(writes[first : first + IN_FLIGHT])

    def _write_group(self, writes: list[tuple[int, memoryview | int]]) -> None:
        h = self._h
        sent: list[tuple[int, int, int]] = []  # (cookie, offset, length)
        taken = _SLOTS.take(sum(1 for _, p in writes if not isinstance(p, int) and len(p) == SLOT))
        free = list(taken)
        error: NbdError | None = None
        settled = False  # every request sent has completed (or died with the connection)
        try:
            for offset, payload in writes:
                length = payload if isinstance(payload, int) else len(payload)
                try:
                    if isinstance(payload, int):
                        sent.append((h.aio_zero(payload, offset), offset, length))
                    elif length == SLOT:
                        buf, view = free.pop()
                        view[:] = payload
                        sent.append((h.aio_pwrite(buf, offset), offset, length))
                    else:
                        h.pwrite(payload, offset)
                except nbd.Error as exc:
                    error = NbdError(f"write of {length} bytes at {offset} failed: {exc}")
                    break
            for cookie, offset, length in sent:
                try:
                    while not h.aio_command_completed(cookie):
                        h.poll(-1)
                except nbd.Error as exc:
                    error = error or NbdError(f"write of {length} bytes at {offset} failed: {exc}")
                    if h.aio_is_dead() or h.aio_is_closed():
                        break  # the connection is gone: libnbd has retired every request
            settled = True
        finally:
            # A buffer libnbd may still read from is never handed out again.
            _SLOTS.give(taken if settled else free)
        if error is not None:
            raise error

    def read_buffer(self, offset: int, length: int) -> bytearray:
        """The data as libnbd's own new buffer, without the copy into ``bytes`` of :meth:`read`."""
        try:
            return self._h.pread(length, offset)
        except nbd.Error as exc:
            raise NbdError(f"read of {length} bytes at {offset} failed: {exc}") from exc

    def pread(self, length: int, offset: int) -> bytes:
        try:
            return bytes(self._h.pread(length, offset))
        except nbd.Error as exc:
            raise NbdError(f"read of {length} bytes at {offset} failed: {exc}") from exc

    def flush(self) -> None:
        try:
            self._h.flush()
        except nbd.Error as exc:
            raise NbdError(f"flush failed: {exc}") from exc

    def close(self) -> None:
        """Disconnect; the handle is freed with its last reference (libnbd 1.14 has no close())."""
        with contextlib.suppress(nbd.Error):
            self._h.shutdown()
        close = getattr(self._h, "close", None)
        if close is not None:
            close()
        del self._h


class ConnectionPool:
    """Connections for ``workers`` threads: one each with multi-conn, else one shared.

    A thread's own connection is opened when it first asks: a small layer
    written by one thread costs one connect.
    """

    def __init__(self, socket: Path, export: str, workers: int) -> None:
        first = Connection(socket, export)
        self.conns = [first]
        self.multi = first.can_multi_conn
        self._socket, self._export = socket, export
        self._limit = max(1, workers) if self.multi else 1
        self._local = threading.local()
        self._next = 0
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.conns[0].size

    def for_thread(self) -> Connection:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            with self._lock:
                if self._next >= len(self.conns) and len(self.conns) < self._limit:
                    self.conns.append(Connection(self._socket, self._export))
                conn = self.conns[self._next % len(self.conns)]
                self._next += 1
            self._local.conn = conn
        return conn

    def flush(self) -> None:
        for conn in self.conns:
            conn.flush()

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.conns = []
