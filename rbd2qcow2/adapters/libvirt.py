"""The libvirt boundary: every call into the ``libvirt`` bindings (Debian's python3-libvirt).

Connections, domains and their state, the inactive XML and NVRAM, and the
guest's quiesce: file systems frozen through the qemu guest agent, or else
the domain paused. libvirt's own errors become :class:`LibvirtError` (exit 74)
or :class:`LibvirtUnavailable` (69); a domain that does not exist is
:class:`~rbd2qcow2.core.errors.NotFound` (66).

Both error classes are defined here (subclasses of ``Error``), not in
``core.errors``, until the VM operations exist.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import libvirt

from ..core.errors import Error, NotFound
from ..core.vm import domain_of

logger = logging.getLogger(__name__)

T = TypeVar("T")
DomainState = Literal["running", "paused", "shut off", "other"]
FREEZE_TIMEOUT = 10.0  # seconds the guest agent gets to freeze (and again to thaw)
# A signal that lands between two bytecodes of a cleanup is retried this many times.
CLEANUP_ATTEMPTS = 3

_STATES: dict[int, DomainState] = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_SHUTDOWN: "running",  # shutting down: still running until it is off
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "shut off",
}


class LibvirtError(Error):
    """libvirt: {}"""

    exit_code = os.EX_IOERR


class LibvirtUnavailable(LibvirtError):
    """libvirt unavailable: {}"""

    exit_code = os.EX_UNAVAILABLE


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr unless a handler takes it; ours are raised instead."""


def _message(exc: libvirt.libvirtError) -> str:
    return str(exc.get_error_message() or exc)


def _call(what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"{what}: {_message(exc)}") from exc


# --- connections and domains -------------------------------------------------------------------


def connect(uri: str | None = None) -> libvirt.virConnect:
    """A read-write connection to ``uri`` (libvirt's default when None)."""
    libvirt.registerErrorHandler(_quiet, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise LibvirtUnavailable(f"cannot connect to {uri or 'the default URI'}: {_message(exc)}") from exc


def lookup(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise NotFound(f"libvirt domain {name} not found at {_uri(conn)}") from exc
        raise LibvirtError(f"looking up domain {name}: {_message(exc)}") from exc


def _uri(conn: libvirt.virConnect) -> str:
    try:
        return conn.getURI()
    except libvirt.libvirtError:
        return "?"


def state(dom: libvirt.virDomain) -> DomainState:
    code = _call(f"state of {dom.name()}", dom.state)[0]
    return _STATES.get(code, "other")


def inactive_xml(dom: libvirt.virDomain) -> str:
    """The persistent definition: what ``define`` takes back (secrets are named, never included)."""
    return _call(f"XML of {dom.name()}", lambda: dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))


def nvram_bytes(dom: libvirt.virDomain, host_root: Path = Path("/")) -> bytes | None:
    """The domain's NVRAM file (firmware variables), or None if it has none or it was never created.

    libvirt has no call that reads it: the file is read where the libvirt host's
    file system is visible (``host_root``: "/" on the host itself), so a domain
    of a remote libvirt is refused rather than read from the wrong machine.
    """
    path = domain_of(inactive_xml(dom)).nvram
    if path is None:
        return None
    uri = _uri(dom.connect())
    if urllib.parse.urlsplit(uri).hostname not in (None, "", "localhost"):
        raise LibvirtError(f"NVRAM of {dom.name()}: {path} is on the host of {uri}, which is not this one")
    try:
        return (host_root / path.lstrip("/")).read_bytes()
    except FileNotFoundError:
        return None  # libvirt creates it from the template on the first start
    except OSError as exc:
        raise LibvirtError(f"NVRAM of {dom.name()}: {path}: {exc.strerror}") from exc


def define(conn: libvirt.virConnect, xml: str) -> libvirt.virDomain:
    return _call("defining a domain", lambda: conn.defineXML(xml))


def undefine(dom: libvirt.virDomain, *, keep_nvram: bool = False) -> None:
    """Remove the persistent definition (and the NVRAM file, unless ``keep_nvram``)."""
    flags = libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM if keep_nvram else libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    _call(f"undefining {dom.name()}", lambda: dom.undefineFlags(flags))


def suspend(dom: libvirt.virDomain) -> None:
    _call(f"pausing {dom.name()}", dom.suspend)


def resume(dom: libvirt.virDomain) -> None:
    _call(f"resuming {dom.name()}", dom.resume)


# --- the guest agent ---------------------------------------------------------------------------


def _bound_agent(dom: libvirt.virDomain, timeout: float) -> None:
    """Make libvirt give up on the agent after ``timeout`` in all.

    Each agent command is two exchanges (guest-sync, then the command), each
    bounded by the domain's agent timeout: half of ``timeout`` each, whole seconds.
    """
    seconds = max(1, math.ceil(timeout / 2))
    _call(f"agent timeout of {dom.name()}", lambda: dom.agentSetResponseTimeout(seconds))


def _unbound_agent(dom: libvirt.virDomain) -> None:
    """Back to libvirt's default (no timeout); a value another tool had set is not known, so not restored."""
    try:
        dom.agentSetResponseTimeout(libvirt.VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_BLOCK)
    except libvirt.libvirtError as exc:
        logger.warning("%s: cannot reset the guest agent's timeout: %s", dom.name(), _message(exc))


def fs_freeze(dom: libvirt.virDomain, timeout: float = FREEZE_TIMEOUT) -> int:
    """Freeze the guest's file systems; how many (0: nothing was mounted, so nothing is quiesced)."""
    _bound_agent(dom, timeout)
    try:
        return _call(f"freezing {dom.name()}", dom.fsFreeze)
    finally:
        _unbound_agent(dom)


def fs_thaw(dom: libvirt.virDomain, timeout: float = FREEZE_TIMEOUT) -> int:
    """Thaw the guest's file systems; how many were frozen (0 when none was)."""
    _bound_agent(dom, timeout)
    try:
        return _call(f"thawing {dom.name()}", dom.fsThaw)
    finally:
        _unbound_agent(dom)


# --- quiesce ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quiesce:
    """What :func:`quiesced` achieved: the guest's file systems frozen, the domain paused, or nothing."""

    how: Literal["frozen", "paused", "none"]
    frozen: int = 0  # file systems frozen
    warning: str | None = None  # why the guest was not frozen, for the point's record

    @property
    def consistent(self) -> bool:
        """True when every disk's snapshot shows the same instant (frozen or paused)."""
        return self.how != "none"


def _always(fn: Callable[[], object]) -> None:
    """Run a cleanup to its end even if a signal's exception (Cancelled, KeyboardInterrupt) lands in it.

    The signal's exception is raised afterwards; an Error of the cleanup itself propagates.
    """
    interrupted: BaseException | None = None
    for _ in range(CLEANUP_ATTEMPTS):
        try:
            fn()
            break
        except Exception:
            raise
        except BaseException as exc:  # re-raised below, once the cleanup has run
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted


def _try_freeze(dom: libvirt.virDomain, timeout: float) -> tuple[int, str | None]:
    """(file systems frozen, None) or (0, why not); never leaves a freeze it did not report."""
    try:
        frozen = fs_freeze(dom, timeout)
    except LibvirtError as exc:
        # A slow agent may still freeze after libvirt gave up: thaw in any case.
        _always(lambda: _thaw_quietly(dom, timeout))
        return 0, f"guest agent freeze failed ({exc}); crash-consistent"
    if frozen == 0:
        return 0, "guest agent froze no file system; crash-consistent"
    return frozen, None


def _thaw(dom: libvirt.virDomain, timeout: float) -> None:
    """Thaw a frozen guest, trying twice; LibvirtError if it may still be frozen."""
    try:
        fs_thaw(dom, timeout)
    except LibvirtError as first:
        logger.warning("%s: thaw failed, trying again: %s", dom.name(), first)
        try:
            fs_thaw(dom, timeout)
        except LibvirtError as exc:
            raise LibvirtError(f"{dom.name()} may still be frozen: {exc}") from exc


def _thaw_quietly(dom: libvirt.virDomain, timeout: float) -> None:
    try:
        fs_thaw(dom, timeout)
    except LibvirtError as exc:
        logger.debug("%s: thaw after a failed freeze: %s", dom.name(), exc)


@contextlib.contextmanager
def quiesced(dom: libvirt.virDomain, timeout: float = FREEZE_TIMEOUT, *, pause: bool = True) -> Iterator[Quiesce]:
    """The guest held still while the block runs: frozen by its agent, else paused, else as it is.

    A running guest's file systems are frozen through the guest agent, each
    agent call bounded by ``timeout``. Where that fails (no agent, a hung
    agent, nothing mounted) the domain is paused instead if ``pause``, so
    that its disks are at least crash-consistent with each other; the reason
    is in :attr:`Quiesce.warning`. A paused or stopped domain is left as it
    is. Whatever was done is undone when the block ends, also on an error or
    a signal; a failed thaw raises :class:`LibvirtError` (the guest may still
    be frozen).
    """
    current = state(dom)
    if current != "running":
        yield Quiesce("paused" if current == "paused" else "none")
        return
    # Set before each call: a signal that lands just as a call returns still finds what to undo.
    thaw_needed = resume_needed = False

    def undo() -> None:
        if thaw_needed:
            _always(lambda: _thaw(dom, timeout))
        if resume_needed:
            _always(lambda: _resume_if_paused(dom))

    try:
        thaw_needed = True
        frozen, warning = _try_freeze(dom, timeout)  # thaws by itself when it reports no freeze
        thaw_needed = frozen > 0
        if warning is not None:
            logger.warning("%s: %s", dom.name(), warning)
        if frozen:
            yield Quiesce("frozen", frozen)
        elif pause:
            resume_needed = True
            suspend(dom)
            yield Quiesce("paused", warning=warning)
        else:
            yield Quiesce("none", warning=warning)
    except BaseException:
        try:
            undo()
        except LibvirtError as exc:  # the first error is the one to report; this one is logged
            logger.error("%s: %s", dom.name(), exc)
        raise
    undo()


def _resume_if_paused(dom: libvirt.virDomain) -> None:
    if state(dom) == "paused":
        resume(dom)


__all__ = [
    "DomainState",
    "LibvirtError",
    "LibvirtUnavailable",
    "Quiesce",
    "connect",
    "define",
    "fs_freeze",
    "fs_thaw",
    "inactive_xml",
    "lookup",
    "nvram_bytes",
    "quiesced",
    "resume",
    "state",
    "suspend",
    "undefine",
]
