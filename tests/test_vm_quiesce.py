"""adapters/libvirt against fake domains: what quiesced froze or paused is always undone; NVRAM reads.

The real guest, agent and libvirtd are in test_vm_libvirt.py; here every
failure can be made to happen at the exact call.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import cast

import libvirt
import pytest

from rbd2qcow2.adapters import libvirt as lv
from rbd2qcow2.core.errors import Cancelled


class FakeDomain:
    """The calls ``quiesced`` makes, recorded; ``fail`` maps a call to what it raises (once per entry)."""

    def __init__(self, state: int = libvirt.VIR_DOMAIN_RUNNING, frozen: int = 2) -> None:
        self._state = state
        self._frozen = frozen
        self.fail: dict[str, list[BaseException]] = {}
        self.calls: list[str] = []
        self.is_frozen = False

    def _call(self, name: str) -> None:
        self.calls.append(name)
        pending = self.fail.get(name)
        if pending:
            raise pending.pop(0)

    def name(self) -> str:
        return "fake"

    def state(self, flags: int = 0) -> list[int]:
        return [self._state, 0]

    def agentSetResponseTimeout(self, timeout: int, flags: int = 0) -> int:
        self.calls.append(f"timeout={timeout}")
        return 0

    def fsFreeze(self, mountpoints: list[str] | None = None, flags: int = 0) -> int:
        self._call("freeze")
        self.is_frozen = self._frozen > 0
        return self._frozen

    def fsThaw(self, mountpoints: list[str] | None = None, flags: int = 0) -> int:
        self._call("thaw")
        was, self.is_frozen = self.is_frozen, False
        return self._frozen if was else 0

    def suspend(self) -> int:
        self._call("suspend")
        self._state = libvirt.VIR_DOMAIN_PAUSED
        return 0

    def resume(self) -> int:
        self._call("resume")
        self._state = libvirt.VIR_DOMAIN_RUNNING
        return 0


def domain(fake: FakeDomain) -> libvirt.virDomain:
    return cast(libvirt.virDomain, fake)


def agent_error() -> libvirt.libvirtError:
    return libvirt.libvirtError("Guest agent is not responding: Guest agent not available for now")


def test_a_freeze_is_thawed_and_each_agent_call_is_bounded() -> None:
    fake = FakeDomain()
    with lv.quiesced(domain(fake), timeout=10) as q:
        assert (q.how, q.frozen, q.warning) == ("frozen", 2, None) and fake.is_frozen
    assert not fake.is_frozen
    blocked = f"timeout={libvirt.VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_BLOCK}"
    # two exchanges per agent call (guest-sync, the command): half the timeout each
    assert fake.calls == ["timeout=5", "freeze", blocked, "timeout=5", "thaw", blocked]


@pytest.mark.parametrize("raised", [RuntimeError("boom"), Cancelled(signal.SIGTERM), KeyboardInterrupt()])
def test_an_error_or_signal_in_the_block_still_thaws(raised: BaseException) -> None:
    fake = FakeDomain()
    with pytest.raises(type(raised)), lv.quiesced(domain(fake)):
        raise raised
    assert not fake.is_frozen and fake.calls.count("thaw") == 1


def test_a_signal_landing_in_the_thaw_does_not_skip_it() -> None:
    fake = FakeDomain()
    fake.fail["thaw"] = [Cancelled(signal.SIGTERM)]
    with pytest.raises(Cancelled), lv.quiesced(domain(fake)):
        pass
    assert not fake.is_frozen and fake.calls.count("thaw") == 2


def test_a_failed_thaw_is_tried_again_then_reported() -> None:
    fake = FakeDomain()
    fake.fail["thaw"] = [agent_error()]
    with lv.quiesced(domain(fake)):
        pass
    assert not fake.is_frozen
    fake = FakeDomain()
    fake.fail["thaw"] = [agent_error(), agent_error()]
    with pytest.raises(lv.LibvirtError, match="may still be frozen"), lv.quiesced(domain(fake)):
        pass


def test_a_failed_freeze_is_thawed_anyway_and_the_domain_paused_instead() -> None:
    fake = FakeDomain()
    fake.fail["freeze"] = [agent_error()]
    with lv.quiesced(domain(fake)) as q:
        assert q.how == "paused" and q.consistent
        assert q.warning is not None and "not available" in q.warning
        assert fake.calls[-1] == "suspend"
    # a slow agent may freeze after libvirt gave up: a thaw follows every failed freeze
    assert fake.calls.index("thaw") < fake.calls.index("suspend")
    assert fake.calls[-1] == "resume" and lv.state(domain(fake)) == "running"


def test_a_freeze_of_nothing_is_no_quiesce() -> None:
    fake = FakeDomain(frozen=0)
    with lv.quiesced(domain(fake)) as q:
        assert q.how == "paused" and q.warning is not None and "no file system" in q.warning
    assert fake.calls[-1] == "resume"


def test_without_pause_the_fallback_is_nothing() -> None:
    fake = FakeDomain()
    fake.fail["freeze"] = [agent_error()]
    with lv.quiesced(domain(fake), pause=False) as q:
        assert q.how == "none" and not q.consistent and q.warning
    assert "suspend" not in fake.calls


def test_a_signal_in_a_paused_block_still_resumes() -> None:
    fake = FakeDomain(frozen=0)
    with pytest.raises(Cancelled), lv.quiesced(domain(fake)):
        raise Cancelled(signal.SIGTERM)
    assert lv.state(domain(fake)) == "running"


@pytest.mark.parametrize(
    ("state", "how"), [(libvirt.VIR_DOMAIN_SHUTOFF, "none"), (libvirt.VIR_DOMAIN_PAUSED, "paused")]
)
def test_a_stopped_or_paused_domain_is_left_as_it_is(state: int, how: str) -> None:
    fake = FakeDomain(state=state)
    with lv.quiesced(domain(fake)) as q:
        assert q.how == how and q.warning is None
    assert fake.calls == []


class FreezeThenSignal(FakeDomain):
    """A signal's exception raised just as the freeze returns (the guest is frozen by then)."""

    def fsFreeze(self, mountpoints: list[str] | None = None, flags: int = 0) -> int:
        super().fsFreeze()
        raise Cancelled(signal.SIGTERM)


def test_a_signal_as_the_freeze_returns_still_thaws() -> None:
    fake = FreezeThenSignal()
    with pytest.raises(Cancelled), lv.quiesced(domain(fake)):
        pytest.fail("the block must not run")
    assert not fake.is_frozen and fake.calls.count("thaw") == 1


def test_a_failed_thaw_after_an_error_does_not_hide_the_error() -> None:
    fake = FakeDomain()
    fake.fail["thaw"] = [agent_error(), agent_error()]
    with pytest.raises(RuntimeError, match="boom"), lv.quiesced(domain(fake)):
        raise RuntimeError("boom")


def test_a_failed_suspend_is_reported_and_nothing_is_resumed() -> None:
    fake = FakeDomain(frozen=0)
    fake.fail["suspend"] = [libvirt.libvirtError("cannot pause")]
    with pytest.raises(lv.LibvirtError, match="cannot pause"), lv.quiesced(domain(fake)):
        pytest.fail("the block must not run")
    assert "resume" not in fake.calls


class FakeConnection:
    def __init__(self, uri: str) -> None:
        self.uri = uri

    def getURI(self) -> str:
        return self.uri


class DomainWithNvram(FakeDomain):
    def __init__(self, uri: str, nvram: str) -> None:
        super().__init__()
        self._conn = FakeConnection(uri)
        self._nvram = nvram

    def connect(self) -> FakeConnection:
        return self._conn

    def XMLDesc(self, flags: int = 0) -> str:
        return (
            "<domain><name>fake</name><uuid>8f0c5c1e-3f6b-4a53-9d0e-5b0c6a1f2e34</uuid>"
            f"<os><nvram>{self._nvram}</nvram></os></domain>"
        )


def test_nvram_is_read_from_the_libvirt_hosts_file_system(tmp_path: Path) -> None:
    (tmp_path / "vars.fd").write_bytes(b"firmware variables")
    local = DomainWithNvram("qemu:///system", "/vars.fd")
    assert lv.nvram_bytes(domain(local), host_root=tmp_path) == b"firmware variables"
    assert lv.nvram_bytes(domain(DomainWithNvram("qemu:///system", "/never-started.fd")), tmp_path) is None
    remote = DomainWithNvram("qemu+ssh://root@kvm7/system", "/vars.fd")
    with pytest.raises(lv.LibvirtError, match="kvm7"):
        lv.nvram_bytes(domain(remote), host_root=tmp_path)
